//! A virtio-net device driven by virtio-drivers' low-level `VirtIONetRaw`
//! over the MMIO transport, polled from CPL3 with bounded waits: receive
//! buffers stay posted and the used rings are polled; transmit chains are
//! kept in flight (up to half the queue) and reclaimed as the device
//! returns them.
//!
//! virtio-drivers negotiates only MAC, STATUS, VERSION_1, EVENT_IDX and
//! INDIRECT_DESC: no MRG_RXBUF (a frame must fit one receive buffer) and
//! no receive offloads (the host's frames arrive fully checksummed). The
//! probe's transport ([`ProbeTransport::ack_also`]) acks CSUM and
//! HOST_TSO4 as well when asked, for `net.tso`: transmit offloads only
//! change what the driver may write in a transmit header, which the probe
//! writes itself.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::mem::ManuallyDrop;

use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::{DeviceStatus, DeviceType, Transport};

use crate::arch::{phys, tsc};
use crate::virtio::{ProbeHal, ProbeTransport, VirtioDevice};

/// Descriptors per queue (Keel offers 256).
pub const QUEUE_SIZE: usize = 128;
/// Receive buffers kept posted (one descriptor each).
const RX_BUFFERS: usize = QUEUE_SIZE;
/// Transmit chains kept in flight at most.
const TX_IN_FLIGHT: usize = QUEUE_SIZE / 2;
/// How long the device may keep a transmit chain (at the highest TSC rate).
const TX_US: u64 = 2_000_000;

/// VIRTIO_NET_F_CSUM: the device completes checksums (NEEDS_CSUM).
pub const F_CSUM: u64 = 1 << 0;
/// VIRTIO_NET_F_MTU.
pub const F_MTU: u64 = 1 << 3;
/// VIRTIO_NET_F_HOST_TSO4.
pub const F_HOST_TSO4: u64 = 1 << 11;

/// virtio-mmio registers.
const REG_CONFIG: u64 = 0x100;

/// An initialized network device.
pub struct Nic {
    /// Dropped by hand (see `Drop`), before the buffers go.
    net: ManuallyDrop<VirtIONetRaw<ProbeHal, ProbeTransport, QUEUE_SIZE>>,
    /// Register window.
    /// virtio-mmio register window (`None` over virtio-pci).
    base: Option<u64>,
    /// Features the device offers.
    pub offered: u64,
    /// Of the extra features asked for, those offered (and so acked).
    pub extra: u64,
    /// The device's MAC address.
    pub mac: [u8; 6],
    /// The MTU from the config space (1500 when VIRTIO_NET_F_MTU is not offered).
    pub mtu: u16,
    /// Length of the virtio-net header before each frame (12 with VERSION_1).
    pub hdr_len: usize,
    /// Posted receive buffers, by token (head descriptor).
    rx: Vec<Option<Box<[u8]>>>,
    /// Transmit buffers the device has, with their tokens.
    tx: VecDeque<(u16, Vec<u8>)>,
    /// Transmit chains the device returned.
    pub tx_done: u64,
    /// A chain never came back: the device is not used again.
    broken: Option<String>,
}

impl Nic {
    /// Resets the device, reads what it offers, initializes the driver
    /// (acking `extra` features too where offered) and posts the receive
    /// buffers.
    pub fn open(dev: &VirtioDevice, extra: u64) -> Result<Self, String> {
        Self::open_transport(dev.transport()?, dev.mmio_base(), extra)
    }

    /// As [`open`](Self::open), on `transport` (`base`: its virtio-mmio
    /// window, if it is one).
    pub fn open_transport(
        mut transport: ProbeTransport,
        base: Option<u64>,
        extra: u64,
    ) -> Result<Self, String> {
        if transport.device_type() != DeviceType::Network {
            return Err(format!(
                "device is {:?}, not a network device",
                transport.device_type()
            ));
        }
        // struct virtio_net_config: mac[6], status, max_virtqueue_pairs, mtu.
        let config_mtu = match base {
            Some(base) => (phys::read_u32(base + REG_CONFIG + 8) >> 16) as u16,
            None => transport.read_config_space::<u16>(10).unwrap_or(0),
        };
        transport.set_status(DeviceStatus::empty());
        transport.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
        let offered = transport.read_device_features();
        // Of `extra`, what the device offers; HOST_TSO4 requires CSUM
        // (virtio 5.1.3.1).
        let mut extra = offered & extra;
        if extra & F_CSUM == 0 {
            extra &= !F_HOST_TSO4;
        }
        transport.ack_also(extra);
        let net = VirtIONetRaw::<ProbeHal, _, QUEUE_SIZE>::new(transport)
            .map_err(|e| format!("virtio-drivers init: {e}"))?;
        let mtu = if offered & F_MTU != 0 {
            config_mtu
        } else {
            1500
        };
        let mut hdr = [0u8; 16];
        let hdr_len = net
            .fill_buffer_header(&mut hdr)
            .map_err(|e| format!("virtio-net header: {e}"))?;
        let mut nic = Nic {
            mac: net.mac_address(),
            net: ManuallyDrop::new(net),
            base,
            offered,
            extra,
            mtu,
            hdr_len,
            rx: (0..QUEUE_SIZE).map(|_| None).collect(),
            tx: VecDeque::new(),
            tx_done: 0,
            broken: None,
        };
        // A whole frame (no MRG_RXBUF) with a VLAN tag, rounded up.
        let rx_len = (usize::from(mtu) + 14 + 4 + hdr_len)
            .max(1526)
            .next_multiple_of(64);
        for _ in 0..RX_BUFFERS {
            nic.post(vec![0u8; rx_len].into_boxed_slice())?;
        }
        Ok(nic)
    }

    fn usable(&self) -> Result<(), String> {
        match &self.broken {
            Some(why) => Err(format!("device unusable: {why}")),
            None => Ok(()),
        }
    }

    fn post(&mut self, mut buf: Box<[u8]>) -> Result<(), String> {
        // SAFETY: the buffer is kept (boxed, so it does not move) in
        // `self.rx` until the device returns it or is reset.
        let token = unsafe { self.net.receive_begin(&mut buf) }
            .map_err(|e| format!("posting a receive buffer: {e}"))?;
        let slot = self
            .rx
            .get_mut(usize::from(token))
            .ok_or_else(|| format!("receive token {token} out of range"))?;
        *slot = Some(buf);
        Ok(())
    }

    /// The next received frame (Ethernet, the virtio-net header stripped);
    /// `None` when nothing is waiting.
    pub fn recv(&mut self) -> Result<Option<Vec<u8>>, String> {
        self.usable()?;
        let Some(token) = self.net.poll_receive() else {
            return Ok(None);
        };
        let mut buf = self
            .rx
            .get_mut(usize::from(token))
            .and_then(Option::take)
            .ok_or_else(|| {
                format!("device returned receive chain {token}, which was not posted")
            })?;
        // SAFETY: `buf` is the buffer posted with `token`.
        let result = unsafe { self.net.receive_complete(token, &mut buf) };
        let out = match result {
            Ok((hdr, len)) if hdr + len <= buf.len() => Ok(Some(buf[hdr..hdr + len].to_vec())),
            Ok((hdr, len)) => Err(format!(
                "used.len {} exceeds the {}-byte buffer",
                hdr + len,
                buf.len()
            )),
            Err(e) => Err(format!("receive: {e}")),
        };
        self.post(buf)?;
        out
    }

    /// Takes back the transmit chains the device returned.
    fn reclaim(&mut self) -> Result<(), String> {
        while let Some(token) = self.net.poll_transmit() {
            let i = self
                .tx
                .iter()
                .position(|(t, _)| *t == token)
                .ok_or_else(|| format!("device returned transmit chain {token}, not in flight"))?;
            let (_, buf) = self.tx.remove(i).unwrap_or_default();
            // SAFETY: `buf` is the buffer submitted with `token`.
            unsafe { self.net.transmit_complete(token, &buf) }
                .map_err(|e| format!("transmit completion: {e}"))?;
            self.tx_done += 1;
        }
        Ok(())
    }

    /// Queues `frame` (an Ethernet frame) with the virtio-net header `hdr`
    /// (all zeroes when `None`: no offload). Waits, bounded, for room.
    pub fn send_with(&mut self, hdr: Option<&[u8]>, frame: &[u8]) -> Result<(), String> {
        self.usable()?;
        self.reclaim()?;
        let start = tsc::rdtsc();
        let limit = tsc::cycles_at_least(TX_US);
        while self.tx.len() >= TX_IN_FLIGHT || !self.net.can_send() {
            if tsc::rdtsc().wrapping_sub(start) > limit {
                let why = format!(
                    "the device kept {} transmit chains for {} s",
                    self.tx.len(),
                    TX_US / 1_000_000
                );
                self.broken = Some(why.clone());
                return Err(why);
            }
            core::hint::spin_loop();
            self.reclaim()?;
        }
        let mut buf = vec![0u8; self.hdr_len + frame.len()];
        if let Some(h) = hdr {
            let n = h.len().min(self.hdr_len);
            buf[..n].copy_from_slice(&h[..n]);
        }
        buf[self.hdr_len..].copy_from_slice(frame);
        // SAFETY: `buf` moves into `self.tx` (its heap data stays put) and
        // is not touched until the device returns it or is reset.
        let token =
            unsafe { self.net.transmit_begin(&buf) }.map_err(|e| format!("transmit: {e}"))?;
        self.tx.push_back((token, buf));
        Ok(())
    }

    /// Queues `frame` with no offload.
    pub fn send(&mut self, frame: &[u8]) -> Result<(), String> {
        self.send_with(None, frame)
    }

    /// Waits, bounded, until the device has returned every transmit chain.
    pub fn flush(&mut self) -> Result<(), String> {
        self.usable()?;
        let start = tsc::rdtsc();
        let limit = tsc::cycles_at_least(TX_US);
        loop {
            self.reclaim()?;
            if self.tx.is_empty() {
                return Ok(());
            }
            if tsc::rdtsc().wrapping_sub(start) > limit {
                let why = format!("{} transmit chains not returned", self.tx.len());
                self.broken = Some(why.clone());
                return Err(why);
            }
            core::hint::spin_loop();
        }
    }
}

impl Drop for Nic {
    /// Resets the device (it lets go of every buffer), then lets the driver
    /// go; virtio-drivers' own teardown waits for QueueReady to read 0
    /// without a bound, so if a reset leaves it set the driver is leaked.
    fn drop(&mut self) {
        if let Some(base) = self.base {
            if !crate::virtio::quiesce(base, 2, false) {
                return;
            }
        }
        // SAFETY: dropped once, here; `net` is not used afterwards.
        unsafe { ManuallyDrop::drop(&mut self.net) };
    }
}
