//! The control packets the device owes the guest (RST, REQUEST, RESPONSE,
//! SHUTDOWN, CREDIT_UPDATE), bounded the way Firecracker's vsock muxer
//! bounds its RX queue: a guest that sends packets without posting receive
//! buffers cannot make the host queue grow.
//!
//! The queue holds at most [`MAX_CONTROL`] packets. When it is full, a
//! connection's packet is not queued but remembered in the connection as
//! [`Owed`] (a few flags, so at most one of each kind per connection), and so
//! is every later packet of that connection, to keep their order; once the
//! queue has drained, [`ControlQueue::resync`] makes the owed packets again
//! from the connections' current state. A packet of no connection (an RST
//! for an unknown port, a refused or closed connection) is dropped when the
//! queue is full and counted: the guest learns of the reset when it next
//! sends on that port.

use std::collections::VecDeque;

use super::connection::{ConnState, Connection};
use super::packet::{Header, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_SHUTDOWN};

/// Most control packets queued at once (a few per connection of the
/// connection limit).
pub const MAX_CONTROL: usize = 1024;

/// Control packets a connection is owed while the queue was full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Owed {
    /// Its REQUEST (host-initiated, still connecting) or RESPONSE.
    pub open: bool,
    /// A CREDIT_UPDATE.
    pub credit: bool,
    /// A SHUTDOWN with these flags (0: none).
    pub shutdown: u32,
}

impl Owed {
    /// Whether nothing is owed.
    pub fn is_empty(&self) -> bool {
        *self == Owed::default()
    }
}

/// What [`ControlQueue::push`] did with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Queued.
    Queued,
    /// Remembered in its connection, to be made again by `resync`.
    Deferred,
    /// Dropped (the queue is full and the packet belongs to no connection).
    Dropped,
}

/// The bounded queue of control packets for the guest.
#[derive(Debug, Default)]
pub struct ControlQueue {
    queue: VecDeque<Header>,
    /// Some connection owes packets (`resync` has work to do).
    deferred: bool,
}

impl ControlQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `h`, a packet of `conn` if it belongs to a connection still
    /// open (see the module documentation for a full queue).
    pub fn push(&mut self, h: Header, conn: Option<&mut Connection>) -> Pushed {
        match conn {
            Some(c) if !c.owed.is_empty() || self.queue.len() >= MAX_CONTROL => {
                match h.op {
                    OP_REQUEST | OP_RESPONSE => c.owed.open = true,
                    OP_CREDIT_UPDATE => c.owed.credit = true,
                    OP_SHUTDOWN => c.owed.shutdown |= h.flags,
                    _ => return Pushed::Dropped,
                }
                self.deferred = true;
                Pushed::Deferred
            }
            None if self.queue.len() >= MAX_CONTROL => Pushed::Dropped,
            _ => {
                self.queue.push_back(h);
                Pushed::Queued
            }
        }
    }

    /// The next packet to send.
    pub fn pop(&mut self) -> Option<Header> {
        self.queue.pop_front()
    }

    /// Whether no packet is queued.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Packets queued.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Once the queue has drained: queues what `conns` are owed, made
    /// afresh by `header(conn, op, flags)` (so a CREDIT_UPDATE carries the
    /// current counters), in the order the protocol needs (open, credit,
    /// shutdown). At most three packets per connection.
    pub fn resync<'a>(
        &mut self,
        conns: impl Iterator<Item = &'a mut Connection>,
        header: impl Fn(&Connection, u16, u32) -> Header,
    ) {
        if !self.deferred || !self.queue.is_empty() {
            return;
        }
        self.deferred = false;
        for c in conns {
            let owed = std::mem::take(&mut c.owed);
            if owed.open {
                let op = if c.state == ConnState::Connecting {
                    OP_REQUEST
                } else {
                    OP_RESPONSE
                };
                self.queue.push_back(header(c, op, 0));
            }
            if owed.credit {
                c.last_fwd_cnt_sent = c.fwd_cnt;
                self.queue.push_back(header(c, OP_CREDIT_UPDATE, 0));
            }
            if owed.shutdown != 0 {
                self.queue.push_back(header(c, OP_SHUTDOWN, owed.shutdown));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::vsock::packet::OP_RST;
    use std::os::unix::net::UnixStream;

    fn pkt(op: u16, flags: u32) -> Header {
        Header {
            op,
            flags,
            ..Default::default()
        }
    }

    #[test]
    fn a_full_queue_defers_a_connections_packets_in_order_and_drops_the_rest() {
        let (s, _peer) = UnixStream::pair().unwrap();
        let mut conn = Connection::new(s, ConnState::Established, 5, 6);
        let mut q = ControlQueue::new();
        for _ in 0..MAX_CONTROL {
            assert_eq!(q.push(pkt(OP_RST, 0), None), Pushed::Queued);
        }
        assert_eq!(q.push(pkt(OP_RST, 0), None), Pushed::Dropped);
        assert_eq!(q.len(), MAX_CONTROL, "never more than the bound");
        for _ in 0..10_000 {
            let p = q.push(pkt(OP_CREDIT_UPDATE, 0), Some(&mut conn));
            assert_eq!(p, Pushed::Deferred);
        }
        assert_eq!(
            q.push(pkt(OP_RESPONSE, 0), Some(&mut conn)),
            Pushed::Deferred
        );
        assert_eq!(
            q.push(pkt(OP_SHUTDOWN, 2), Some(&mut conn)),
            Pushed::Deferred
        );
        assert_eq!(q.len(), MAX_CONTROL);
        // Not before the queue has drained.
        let header = |_: &Connection, op, flags| pkt(op, flags);
        q.resync(std::iter::once(&mut conn), header);
        assert_eq!(q.len(), MAX_CONTROL);
        while q.pop().is_some() {}
        q.resync(std::iter::once(&mut conn), header);
        let ops: Vec<(u16, u32)> = std::iter::from_fn(|| q.pop())
            .map(|h| (h.op, h.flags))
            .collect();
        assert_eq!(
            ops,
            [(OP_RESPONSE, 0), (OP_CREDIT_UPDATE, 0), (OP_SHUTDOWN, 2)]
        );
        assert!(conn.owed.is_empty());
        // Owing nothing, the connection's packets are queued again.
        assert_eq!(
            q.push(pkt(OP_CREDIT_UPDATE, 0), Some(&mut conn)),
            Pushed::Queued
        );
    }
}
