//! A running VM and the VMM's control loop: waits for whatever ends the VM
//! (guest power-off or reset, a vCPU's fatal exit, SIGTERM/SIGINT), then
//! stops every vCPU and reports the outcome.

use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use log::{error, info};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use devices::virtio::block::BlockCounters;

use crate::device_manager::LegacyDevices;
use crate::exit::VmOutcome;
use crate::vstate::vcpu::{self, ExitCounters, VcpuEvent, VcpuHandle};
use crate::vstate::vm::Vm;

/// Signals that stop the VM; blocked in every thread and read from a
/// signalfd by the control loop.
fn stop_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set
}

/// Blocks the stop signals in the calling thread (and the threads it
/// spawns afterwards). Call first thing in `main`.
pub fn block_stop_signals() -> nix::Result<()> {
    stop_signals().thread_block()
}

/// A running VM.
pub struct Vmm {
    // Field order is drop order: vCPU threads stop before the VM and its
    // memory go away.
    vcpus: Vec<VcpuHandle>,
    vcpu_counters: Vec<Arc<ExitCounters>>,
    stop: Arc<AtomicBool>,
    events: Receiver<VcpuEvent>,
    events_ready: Arc<EventFd>,
    legacy: LegacyDevices,
    disk_counters: Vec<Arc<BlockCounters>>,
    _vm: Vm,
    _memory: GuestMemoryMmap,
}

const TOKEN_VCPU: u64 = 1;
const TOKEN_RESET: u64 = 2;
const TOKEN_POWER: u64 = 3;
const TOKEN_SIGNAL: u64 = 4;

impl Vmm {
    /// Wraps a built VM (the builder adds vCPUs next).
    pub fn new(
        vm: Vm,
        memory: GuestMemoryMmap,
        legacy: LegacyDevices,
        stop: Arc<AtomicBool>,
        events: Receiver<VcpuEvent>,
        events_ready: Arc<EventFd>,
    ) -> Self {
        Vmm {
            vcpus: Vec::new(),
            vcpu_counters: Vec::new(),
            stop,
            events,
            events_ready,
            legacy,
            disk_counters: Vec::new(),
            _vm: vm,
            _memory: memory,
        }
    }

    /// Keeps the disks' counters.
    pub fn set_disk_counters(&mut self, c: Vec<Arc<BlockCounters>>) {
        self.disk_counters = c;
    }

    /// Counters of each disk, in disk order.
    pub fn disk_counters(&self) -> &[Arc<BlockCounters>] {
        &self.disk_counters
    }

    /// Adds a started vCPU thread.
    pub fn add_vcpu(&mut self, handle: VcpuHandle) {
        self.vcpus.push(handle);
    }

    /// Keeps a vCPU's exit counters.
    pub fn add_vcpu_counters(&mut self, c: Arc<ExitCounters>) {
        self.vcpu_counters.push(c);
    }

    /// The legacy devices (serial, i8042, boot timer).
    pub fn legacy_devices(&self) -> &LegacyDevices {
        &self.legacy
    }

    /// Runs the control loop until the VM ends; then stops all vCPUs.
    pub fn run(mut self) -> VmOutcome {
        let outcome = self.wait_for_end();
        vcpu::stop_all(std::mem::take(&mut self.vcpus), &self.stop);
        let exits: u64 = self
            .vcpu_counters
            .iter()
            .map(|c| {
                use std::sync::atomic::Ordering::Relaxed;
                c.io_in.load(Relaxed)
                    + c.io_out.load(Relaxed)
                    + c.mmio_read.load(Relaxed)
                    + c.mmio_write.load(Relaxed)
            })
            .sum();
        info!("VM ended: {} ({exits} I/O exits)", outcome.describe());
        for (i, c) in self.disk_counters.iter().enumerate() {
            let s = c.snapshot();
            info!(
                "disk {i}: {} reads ({} B), {} writes ({} B), {} flushes, {} discards, {} write-zeroes, {} invalid, {} unsupported, {} I/O errors",
                s.read_ops, s.read_bytes, s.write_ops, s.write_bytes, s.flush_ops, s.discard_ops,
                s.write_zeroes_ops, s.invalid_requests, s.unsupported_requests, s.io_errors
            );
        }
        outcome
    }

    fn wait_for_end(&mut self) -> VmOutcome {
        let sigfd = match SignalFd::with_flags(&stop_signals(), SfdFlags::SFD_CLOEXEC) {
            Ok(fd) => fd,
            Err(e) => return VmOutcome::Fatal(format!("cannot create signalfd: {e}")),
        };
        let epoll = match Epoll::new() {
            Ok(e) => e,
            Err(e) => return VmOutcome::Fatal(format!("cannot create epoll: {e}")),
        };
        let watch = [
            (self.events_ready.as_raw_fd(), TOKEN_VCPU),
            (self.legacy.reset_evt.as_raw_fd(), TOKEN_RESET),
            (self.legacy.power_off_evt.as_raw_fd(), TOKEN_POWER),
            (sigfd.as_raw_fd(), TOKEN_SIGNAL),
        ];
        for (fd, token) in watch {
            if let Err(e) = epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            ) {
                return VmOutcome::Fatal(format!("cannot watch fd {fd}: {e}"));
            }
        }
        let mut ready = [EpollEvent::default(); 4];
        loop {
            let n = match epoll.wait(-1, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return VmOutcome::Fatal(format!("epoll wait: {e}")),
            };
            for ev in &ready[..n] {
                match ev.data() {
                    TOKEN_VCPU => {
                        let _ = self.events_ready.read();
                        if let Ok(event) = self.events.try_recv() {
                            return outcome_of(event);
                        }
                    }
                    TOKEN_RESET => return VmOutcome::Reset,
                    TOKEN_POWER => return VmOutcome::PowerOff,
                    TOKEN_SIGNAL => {
                        let sig = match sigfd.read_signal() {
                            Ok(Some(info)) if info.ssi_signo == libc::SIGINT as u32 => "SIGINT",
                            _ => "SIGTERM",
                        };
                        return VmOutcome::Stopped(sig);
                    }
                    _ => {}
                }
            }
        }
    }
}

fn outcome_of(event: VcpuEvent) -> VmOutcome {
    match event {
        VcpuEvent::Reset => VmOutcome::Reset,
        VcpuEvent::PowerOff => VmOutcome::PowerOff,
        VcpuEvent::Crash => VmOutcome::Crash,
        VcpuEvent::TripleFault { index, regs } => {
            error!("vCPU {index} triple fault\n  {regs}");
            VmOutcome::TripleFault(regs)
        }
        VcpuEvent::Fatal {
            index,
            reason,
            regs,
        } => {
            error!("vCPU {index}: {reason}\n  {regs}");
            VmOutcome::Fatal(format!("vCPU {index}: {reason}"))
        }
    }
}
