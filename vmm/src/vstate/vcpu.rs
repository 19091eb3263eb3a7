//! vCPUs: creation and per-vCPU state, and the thread that runs each one.
//!
//! A vCPU thread loops on KVM_RUN and serves port-I/O and MMIO exits from
//! the buses directly; anything that ends the VM (reset, triple fault, an
//! internal error) is reported to the VMM's control loop as a [`VcpuEvent`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::bus::Bus;
use kvm_bindings::{
    CpuId, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::x86_64::regs;

/// Signal used to kick a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

/// Errors of creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl failed.
    #[error("vCPU {0}: {1}: {2}")]
    Kvm(u32, &'static str, kvm_ioctls::Error),
    /// Register set-up failed.
    #[error("vCPU {0}: {1}")]
    Regs(u32, regs::RegsError),
    /// The thread could not be started.
    #[error("vCPU {0}: cannot spawn thread: {1}")]
    Spawn(u32, std::io::Error),
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
}

/// Why a vCPU thread stopped, or something it asks of the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEvent {
    /// The guest asked for a reset (KVM system event).
    Reset,
    /// The guest powered off (KVM system event).
    PowerOff,
    /// The guest reported a crash (KVM system event).
    Crash,
    /// Triple fault: KVM_EXIT_SHUTDOWN.
    TripleFault {
        /// The vCPU.
        index: u32,
        /// Register dump.
        regs: String,
    },
    /// An exit Keel cannot handle, or a failed KVM_RUN.
    Fatal {
        /// The vCPU.
        index: u32,
        /// What happened.
        reason: String,
        /// Register dump.
        regs: String,
    },
}

/// Exit counts of one vCPU, by reason (served by the control API).
#[derive(Debug, Default)]
pub struct ExitCounters {
    /// Port reads.
    pub io_in: AtomicU64,
    /// Port writes.
    pub io_out: AtomicU64,
    /// MMIO reads.
    pub mmio_read: AtomicU64,
    /// MMIO writes.
    pub mmio_write: AtomicU64,
    /// Accesses no device serves.
    pub unhandled_io: AtomicU64,
    /// KVM_RUN interrupted by a signal.
    pub interrupted: AtomicU64,
    /// Any other exit.
    pub other: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Run control of all vCPUs: stop for good, or pause and resume.
#[derive(Debug, Default)]
pub struct VcpuControl {
    stop: AtomicBool,
    pause_requested: AtomicBool,
    parked: Mutex<usize>,
    cv: Condvar,
}

impl VcpuControl {
    /// Whether the vCPUs are told to stop.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn lock_parked(&self) -> std::sync::MutexGuard<'_, usize> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by a vCPU thread between runs: parks while paused.
    fn park_if_paused(&self) {
        if !self.pause_requested.load(Ordering::Acquire) {
            return;
        }
        let mut parked = self.lock_parked();
        *parked += 1;
        self.cv.notify_all();
        while self.pause_requested.load(Ordering::Acquire) && !self.stopping() {
            parked = self.cv.wait(parked).unwrap_or_else(|p| p.into_inner());
        }
        *parked -= 1;
        self.cv.notify_all();
    }

    /// Pauses every vCPU: returns once all `n` are parked outside KVM_RUN
    /// (false if they did not all park within `timeout`).
    pub fn pause(&self, handles: &[VcpuHandle], timeout: Duration) -> bool {
        self.pause_requested.store(true, Ordering::Release);
        let deadline = std::time::Instant::now() + timeout;
        loop {
            for h in handles {
                h.kick();
            }
            let parked = self.lock_parked();
            if *parked >= handles.len() {
                return true;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            let wait = (deadline - now).min(Duration::from_millis(5));
            drop(self.cv.wait_timeout(parked, wait));
        }
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        self.pause_requested.store(false, Ordering::Release);
        let _guard = self.lock_parked();
        self.cv.notify_all();
    }
}

/// What a vCPU thread shares with the rest of the VMM.
#[derive(Clone)]
pub struct VcpuShared {
    /// Port-I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Stop/pause control.
    pub control: Arc<VcpuControl>,
    /// Where events go.
    pub events: Sender<VcpuEvent>,
    /// Written after each event is queued, to wake the control loop.
    pub events_ready: Arc<EventFd>,
}

/// A created vCPU, before its thread starts.
pub struct Vcpu {
    index: u32,
    fd: VcpuFd,
    counters: Arc<ExitCounters>,
}

impl Vcpu {
    /// Configures a freshly created vCPU `index`: CPUID table, MSRs, FPU,
    /// local APIC pins.
    pub fn configure(fd: VcpuFd, index: u32, cpuid: &CpuId) -> Result<Self, VcpuError> {
        fd.set_cpuid2(cpuid)
            .map_err(|e| VcpuError::Kvm(index, "set CPUID", e))?;
        regs::setup_msrs(&fd).map_err(|e| VcpuError::Regs(index, e))?;
        regs::setup_fpu(&fd).map_err(|e| VcpuError::Regs(index, e))?;
        regs::setup_lint(&fd).map_err(|e| VcpuError::Regs(index, e))?;
        Ok(Vcpu {
            index,
            fd,
            counters: Arc::new(ExitCounters::default()),
        })
    }

    /// The KVM vCPU handle (for boot register set-up).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// This vCPU's exit counters.
    pub fn counters(&self) -> Arc<ExitCounters> {
        self.counters.clone()
    }

    /// Starts the vCPU's thread.
    pub fn start(self, shared: VcpuShared) -> Result<VcpuHandle, VcpuError> {
        let index = self.index;
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || self.run(shared))
            .map_err(|e| VcpuError::Spawn(index, e))?;
        Ok(VcpuHandle { thread })
    }

    fn report(&self, shared: &VcpuShared, event: VcpuEvent) {
        // The control loop may already be gone when the VMM is exiting.
        if shared.events.send(event).is_ok() {
            let _ = shared.events_ready.write(1);
        }
    }

    fn run(mut self, shared: VcpuShared) {
        // Before the first KVM_RUN.
        crate::seccomp::confine(crate::seccomp::ThreadKind::Vcpu);
        while !shared.control.stopping() {
            shared.control.park_if_paused();
            if shared.control.stopping() {
                return;
            }
            let event = match self.fd.run() {
                Ok(exit) => match handle_exit(exit, &shared, &self.counters) {
                    ExitAction::Continue => continue,
                    ExitAction::Stop(event) => event,
                    ExitAction::Fatal(reason) => VcpuEvent::Fatal {
                        index: self.index,
                        reason,
                        regs: dump_regs(&self.fd),
                    },
                    ExitAction::TripleFault => VcpuEvent::TripleFault {
                        index: self.index,
                        regs: dump_regs(&self.fd),
                    },
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    bump(&self.counters.interrupted);
                    continue;
                }
                Err(e) => VcpuEvent::Fatal {
                    index: self.index,
                    reason: format!("KVM_RUN failed: {e}"),
                    regs: dump_regs(&self.fd),
                },
            };
            self.report(&shared, event);
            return;
        }
    }
}

enum ExitAction {
    Continue,
    Stop(VcpuEvent),
    TripleFault,
    Fatal(String),
}

fn handle_exit(exit: VcpuExit, shared: &VcpuShared, c: &ExitCounters) -> ExitAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            bump(&c.io_in);
            if !shared.pio.read(u64::from(port), data) {
                bump(&c.unhandled_io);
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            bump(&c.io_out);
            if !shared.pio.write(u64::from(port), data) {
                bump(&c.unhandled_io);
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            bump(&c.mmio_read);
            if !shared.mmio.read(addr, data) {
                bump(&c.unhandled_io);
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            bump(&c.mmio_write);
            if !shared.mmio.write(addr, data) {
                bump(&c.unhandled_io);
            }
        }
        VcpuExit::Shutdown => return ExitAction::TripleFault,
        VcpuExit::SystemEvent(kind, _) => {
            return match kind {
                KVM_SYSTEM_EVENT_RESET => ExitAction::Stop(VcpuEvent::Reset),
                KVM_SYSTEM_EVENT_SHUTDOWN => ExitAction::Stop(VcpuEvent::PowerOff),
                KVM_SYSTEM_EVENT_CRASH => ExitAction::Stop(VcpuEvent::Crash),
                other => ExitAction::Fatal(format!("unknown KVM system event {other}")),
            }
        }
        VcpuExit::InternalError => {
            return ExitAction::Fatal(
                "KVM internal error (emulation failure or invalid state)".into(),
            )
        }
        VcpuExit::FailEntry(reason, cpu) => {
            return ExitAction::Fatal(format!(
                "KVM entry failure: hardware reason {reason:#x} on host CPU {cpu}"
            ))
        }
        other => {
            bump(&c.other);
            return ExitAction::Fatal(format!("unhandled vCPU exit {other:?}"));
        }
    }
    ExitAction::Continue
}

/// Registers, segments and control registers, for a fatal exit's report.
pub fn dump_regs(fd: &VcpuFd) -> String {
    let mut s = String::new();
    match fd.get_regs() {
        Ok(r) => s.push_str(&format!(
            "rip={:#018x} rsp={:#018x} rflags={:#x}\n  rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x}\n  r8={:#x} r9={:#x} r10={:#x} r11={:#x} r12={:#x} r13={:#x} r14={:#x} r15={:#x}",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9,
            r.r10, r.r11, r.r12, r.r13, r.r14, r.r15
        )),
        Err(e) => s.push_str(&format!("registers unavailable: {e}")),
    }
    if let Ok(sr) = fd.get_sregs() {
        s.push_str(&format!(
            "\n  cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}\n  cs={:#x}(base {:#x} l={} db={} dpl={}) ss={:#x} gdt={:#x}/{:#x} idt={:#x}/{:#x}",
            sr.cr0, sr.cr2, sr.cr3, sr.cr4, sr.efer, sr.cs.selector, sr.cs.base, sr.cs.l, sr.cs.db,
            sr.cs.dpl, sr.ss.selector, sr.gdt.base, sr.gdt.limit, sr.idt.base, sr.idt.limit
        ));
    }
    s
}

/// A running vCPU thread.
pub struct VcpuHandle {
    thread: JoinHandle<()>,
}

impl VcpuHandle {
    /// Interrupts the thread's KVM_RUN (it returns EINTR).
    pub fn kick(&self) {
        // ESRCH (thread already gone) is fine.
        let _ = self.thread.kill(kick_signal());
    }
}

/// Installs the no-op handler of the kick signal: its only job is to make
/// KVM_RUN return EINTR. Call once before starting vCPUs.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    register_signal_handler(kick_signal(), noop).map_err(VcpuError::Signal)
}

/// Stops every vCPU thread: sets `stop`, wakes parked ones, then kicks
/// each thread out of KVM_RUN until it has returned (a kick can land just
/// before a thread enters KVM_RUN, so it is repeated).
pub fn stop_all(handles: Vec<VcpuHandle>, control: &VcpuControl) {
    control.stop.store(true, Ordering::Release);
    control.resume();
    for h in handles {
        while !h.thread.is_finished() {
            h.kick();
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = h.thread.join();
    }
}
