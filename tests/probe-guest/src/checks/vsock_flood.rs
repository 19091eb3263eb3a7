//! vsock.flood: a guest that sends packets the device wants to answer
//! (REQUESTs to ports nobody listens on, CREDIT_REQUESTs and RWs for
//! connections that do not exist) while it offers no receive buffer, plus
//! RSTs for such connections, as fast as the transmit ring allows. A
//! device that queued an answer to each of them would grow without bound;
//! afterwards the device must still work: once receive buffers are
//! offered it delivers the answers it kept (each a well-formed RST for a
//! flood packet, no more than the packets that wanted one), then a fresh
//! connection to the agent port carries a request and its answer.
//!
//! With `probe.vsock.flood=<packets>,sync` the probe waits for a byte on
//! COM1 after `probe: vsock flood start` (nothing sent yet) and after
//! `probe: vsock flood sent ...` (everything sent and returned, no
//! receive buffer offered yet), so that the host can measure the VMM at
//! both points without guessing how long the flood takes.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::vsock::{describe, hdr, is, printable, raw_send, AGENT_PORT, IO_US, LISTEN_US};
use crate::arch::tsc::{self, Deadline};
use crate::cmdline::VsockFlood;
use crate::fail;
use crate::println;
use crate::rawvsock::{
    Hdr, RawVsock, Received, HDR_LEN, HOST_CID, OP_CREDIT_REQUEST, OP_REQUEST, OP_RESPONSE, OP_RST,
    OP_RW, OP_SHUTDOWN, QUEUE_SIZE, SHUTDOWN_SEND, TYPE_STREAM,
};
use crate::report::CheckResult;
use crate::serial;
use crate::virtio::VirtioDevice;

/// The flood's own ports: (FIRST_LOCAL + i / 4 % LOCAL_SPAN) to
/// (FIRST_REMOTE + i % REMOTE_SPAN) for packet i; nobody listens on the
/// remote ones.
const FIRST_LOCAL: u32 = 70_000;
const LOCAL_SPAN: u32 = 8192;
const FIRST_REMOTE: u32 = 40_000;
const REMOTE_SPAN: u32 = 1000;
/// The local port of the connection to the agent afterwards.
const AFTER_LOCAL: u32 = 90_000;
/// Transmit page: one header slot per descriptor.
const SLOT: usize = 64;
/// Time for the device to return a transmit chain.
const RETURN_US: u64 = 1_000_000;

/// What the flood sent.
#[derive(Default)]
struct Sent {
    requests: u64,
    credit_requests: u64,
    rws: u64,
    rsts: u64,
}

impl Sent {
    /// Packets a device answers (with RST: none of them has a connection).
    fn answerable(&self) -> u64 {
        self.requests + self.credit_requests + self.rws
    }
}

/// Packet `i` of the flood, from the guest `cid`.
fn flood_packet(cid: u64, i: u64) -> Hdr {
    let op = match i % 4 {
        0 => OP_REQUEST,
        1 => OP_CREDIT_REQUEST,
        2 => OP_RW,
        _ => OP_RST,
    };
    Hdr {
        src_cid: cid,
        dst_cid: HOST_CID,
        src_port: FIRST_LOCAL + (i / 4 % u64::from(LOCAL_SPAN)) as u32,
        dst_port: FIRST_REMOTE + (i % u64::from(REMOTE_SPAN)) as u32,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 4096,
        fwd_cnt: 0,
    }
}

/// Waits for a byte on COM1 (the host's go-ahead), at most [`LISTEN_US`].
fn wait_for_host(when: &str) -> Result<(), String> {
    let deadline = Deadline::after_us(LISTEN_US);
    while serial::read_byte().is_none() {
        if deadline.passed() {
            fail!(
                "{when}: no byte on COM1 within {} s (probe.vsock.flood=...,sync)",
                LISTEN_US / 1_000_000
            );
        }
        tsc::delay_us(100);
    }
    Ok(())
}

/// vsock.flood on a fresh setup of `dev`.
pub fn flood(dev: &VirtioDevice, cfg: VsockFlood) -> CheckResult {
    let mut raw = RawVsock::new_without_rx(dev).map_err(|e| format!("raw queue setup: {e}"))?;
    println!(
        "probe: vsock flood start: {} packets, no receive buffers",
        cfg.packets
    );
    if cfg.sync {
        wait_for_host("before the flood")?;
    }
    let t0 = tsc::rdtsc();
    let sent = send_flood(&mut raw, cfg.packets)?;
    let ns = tsc::cycles_to_ns(tsc::rdtsc().wrapping_sub(t0)).unwrap_or(0);
    println!(
        "probe: vsock flood sent {} packets ({} REQUEST, {} CREDIT_REQUEST, {} RW, {} RST) ns={ns}",
        cfg.packets, sent.requests, sent.credit_requests, sent.rws, sent.rsts
    );
    if cfg.sync {
        wait_for_host("after the flood")?;
    }
    raw.post_rx();
    let kept = collect_kept(&mut raw, sent.answerable())?;
    println!("probe: vsock flood kept {kept} answers, each an RST for a flood packet");
    let answer = exchange(&mut raw)?;
    println!("probe: vsock flood reply {}", printable(&answer, 200));
    Ok(())
}

/// Sends `packets` flood packets, each a one-descriptor chain from its
/// own slot of the transmit page, refilling the ring whenever half of it
/// has come back; returns once the device has returned every chain.
fn send_flood(raw: &mut RawVsock, packets: u64) -> Result<Sent, String> {
    let mut sent = Sent::default();
    let mut free: Vec<u16> = (0..QUEUE_SIZE).collect();
    let mut next = 0u64;
    let mut deadline = Deadline::after_us(RETURN_US);
    while next < packets || free.len() < usize::from(QUEUE_SIZE) {
        if next < packets && (free.len() >= usize::from(QUEUE_SIZE / 2) || next + 8 >= packets) {
            let mut offered = false;
            while next < packets {
                let Some(head) = free.pop() else { break };
                let h = flood_packet(raw.cid, next);
                match h.op {
                    OP_REQUEST => sent.requests += 1,
                    OP_CREDIT_REQUEST => sent.credit_requests += 1,
                    OP_RW => sent.rws += 1,
                    _ => sent.rsts += 1,
                }
                let offset = usize::from(head) * SLOT;
                raw.put_tx(offset, &h.to_bytes());
                raw.offer_tx(head, offset, HDR_LEN as u32);
                next += 1;
                offered = true;
            }
            if offered {
                raw.kick_tx();
            }
        }
        let mut progress = false;
        while let Some(head) = raw.tx_done() {
            if head >= QUEUE_SIZE || free.contains(&head) {
                fail!("after {next} packets the device returned chain {head}, which was not out");
            }
            free.push(head);
            progress = true;
        }
        if progress {
            deadline = Deadline::after_us(RETURN_US);
        } else if deadline.passed() {
            fail!(
                "after {next} packets sent, {} transmit chains were not returned within {} ms{}",
                usize::from(QUEUE_SIZE) - free.len(),
                RETURN_US / 1000,
                if raw.needs_reset() {
                    " (DEVICE_NEEDS_RESET)"
                } else {
                    ""
                }
            );
        } else {
            core::hint::spin_loop();
        }
    }
    Ok(sent)
}

/// Whether `r` is a well-formed answer to a flood packet: an RST from the
/// host to the guest, header only, between a flood port pair.
fn is_flood_answer(r: &Received, cid: u64) -> bool {
    let h = r.hdr;
    h.op == OP_RST
        && h.src_cid == HOST_CID
        && h.dst_cid == cid
        && h.type_ == TYPE_STREAM
        && h.len == 0
        && r.used_len as usize == HDR_LEN
        && (FIRST_LOCAL..FIRST_LOCAL + LOCAL_SPAN).contains(&h.dst_port)
        && (FIRST_REMOTE..FIRST_REMOTE + REMOTE_SPAN).contains(&h.src_port)
}

/// With receive buffers offered: a REQUEST to the agent port, then every
/// packet until its RESPONSE; all before it must be answers the device
/// kept from the flood, at most `answerable` of them. Returns how many.
fn collect_kept(raw: &mut RawVsock, answerable: u64) -> Result<u64, String> {
    let req = hdr(raw, OP_REQUEST, AFTER_LOCAL, AGENT_PORT, 0);
    raw_send(raw, &req, HDR_LEN, None)?;
    let cid = raw.cid;
    let mut kept = 0u64;
    let mut wrong: Option<String> = None;
    let mut last: Option<Received> = None;
    let stopped = raw.receive_each(IO_US, |r| {
        if r.hdr.dst_port == AFTER_LOCAL {
            last = Some(r);
            return true;
        }
        if !is_flood_answer(&r, cid) {
            wrong = Some(describe(core::slice::from_ref(&r)));
            return true;
        }
        kept += 1;
        kept > answerable
    });
    if let Some(w) = wrong {
        fail!("after {kept} answers to the flood, a packet that is none: {w}");
    }
    if kept > answerable {
        fail!(
            "the device delivered more answers than the {answerable} flood packets that wanted one"
        );
    }
    match last {
        Some(r) if is(&r.hdr, OP_RESPONSE, AFTER_LOCAL, AGENT_PORT) => Ok(kept),
        Some(r) => fail!(
            "after {kept} answers to the flood, a REQUEST to port {AGENT_PORT} got {}, want RESPONSE",
            describe(core::slice::from_ref(&r))
        ),
        None if stopped => fail!("after {kept} answers to the flood: stopped without a RESPONSE"),
        None => fail!(
            "after {kept} answers to the flood, no RESPONSE to a REQUEST to port {AGENT_PORT} within {} s",
            IO_US / 1_000_000
        ),
    }
}

/// On the open connection to the agent: the HostOS request, SHUTDOWN(SEND),
/// the answer to the host's SHUTDOWN, then RST. Returns the answer.
fn exchange(raw: &mut RawVsock) -> Result<Vec<u8>, String> {
    let request = format!(
        "{{\"sender_cid\": {}, \"message\": \"GetVsockProtocol\"}}",
        raw.cid
    );
    let rw = hdr(raw, OP_RW, AFTER_LOCAL, AGENT_PORT, request.len() as u32);
    let payload = Some((request.as_bytes(), request.len() as u32));
    raw_send(raw, &rw, HDR_LEN, payload)?;
    let mut shut = hdr(raw, OP_SHUTDOWN, AFTER_LOCAL, AGENT_PORT, 0);
    shut.flags = SHUTDOWN_SEND;
    raw_send(raw, &shut, HDR_LEN, None)?;
    let mut answer = Vec::new();
    let mut end: Option<u16> = None;
    raw.receive_each(IO_US, |r| {
        if r.hdr.dst_port != AFTER_LOCAL || r.hdr.src_port != AGENT_PORT {
            return false;
        }
        match r.hdr.op {
            OP_RW => {
                answer.extend_from_slice(&r.payload);
                false
            }
            OP_SHUTDOWN | OP_RST => {
                end = Some(r.hdr.op);
                true
            }
            _ => false,
        }
    });
    let rst = hdr(raw, OP_RST, AFTER_LOCAL, AGENT_PORT, 0);
    raw_send(raw, &rst, HDR_LEN, None)?;
    match end {
        Some(OP_SHUTDOWN) if !answer.is_empty() => Ok(answer),
        Some(OP_SHUTDOWN) => fail!("the agent's answer was empty"),
        Some(_) => fail!(
            "the agent connection was reset after {} bytes",
            answer.len()
        ),
        None => fail!(
            "no end of the agent's answer within {} s ({} bytes so far)",
            IO_US / 1_000_000,
            answer.len()
        ),
    }
}
