//! A running VM and the VMM's control loop: it waits for whatever ends the
//! VM (guest power-off or reset, a vCPU's fatal exit, a signal, an API
//! request), serves pause/resume/shutdown, keeps systemd informed, then
//! stops every vCPU and reports the outcome.

use std::os::fd::AsRawFd;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::legacy::{SerialCounters, GED_POWER_BUTTON};
use devices::virtio::block::BlockCounters;
use devices::virtio::vsock::VsockCounters;
use log::{error, info, warn};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::boot_monitor::{self, BootMonitor, GuestBoot};
use crate::config::ShutdownMethod;
use crate::control::{ControlInbox, ControlRequest, VmState, VmStatus};
use crate::device_manager::{LegacyDevices, NetDeviceInfo};
use crate::exit::VmOutcome;
use crate::systemd;
use crate::teardown_helper::TeardownHelper;
use crate::vstate::vcpu::{self, ExitCounters, VcpuControl, VcpuEvent, VcpuHandle};
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

/// How long vCPUs get to park on a pause request.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the VMM shares with the control API: counters and state.
#[derive(Clone)]
pub struct VmView {
    /// Life-cycle state and uptime.
    pub status: Arc<VmStatus>,
    /// Per-vCPU exit counters.
    pub vcpu_counters: Vec<Arc<ExitCounters>>,
    /// Per-disk counters.
    pub disk_counters: Vec<Arc<BlockCounters>>,
    /// vsock counters.
    pub vsock_counters: Option<Arc<VsockCounters>>,
    /// COM1's counters.
    pub serial_counters: Arc<SerialCounters>,
    /// NICs (with their counters), in configuration order.
    pub nets: Vec<NetDeviceInfo>,
    /// The boot monitor, when enabled.
    pub boot_monitor: Option<Arc<BootMonitor>>,
}

/// The boot monitor's policy: how long to wait, where to tell the outcome.
pub struct BootWatch {
    /// Shared with the serial port and the API.
    pub monitor: Arc<BootMonitor>,
    /// From the vCPUs' start to `timeout`.
    pub timeout: Duration,
    /// Consoles that get a line with the outcome (opened at set-up).
    pub consoles: Vec<boot_monitor::Console>,
}

/// A running VM.
pub struct Vmm {
    // Field order is drop order: vCPU threads stop before the VM and its
    // memory go away.
    vcpus: Vec<VcpuHandle>,
    view: VmView,
    control: Arc<VcpuControl>,
    events: Receiver<VcpuEvent>,
    events_ready: Arc<EventFd>,
    inbox: Option<ControlInbox>,
    boot_watch: Option<BootWatch>,
    shutdown_timeout: Duration,
    shutdown_method: ShutdownMethod,
    legacy: LegacyDevices,
    /// Undoes the NICs' host set-up (taps, bridge membership) once the
    /// vCPUs are gone.
    net_teardown: Option<TeardownHelper>,
    _vm: Vm,
    _memory: GuestMemoryMmap,
}

const TOKEN_VCPU: u64 = 1;
const TOKEN_RESET: u64 = 2;
const TOKEN_POWER: u64 = 3;
const TOKEN_SIGNAL: u64 = 4;
const TOKEN_CONTROL: u64 = 5;
const TOKEN_BOOT: u64 = 6;

/// How long the VMM waits at exit for API answers being written.
const ANSWER_FLUSH_LIMIT: Duration = Duration::from_secs(1);

/// A graceful shutdown in progress.
struct Shutdown {
    deadline: Instant,
    why: &'static str,
}

impl Vmm {
    /// Wraps a built VM (the builder adds vCPUs next).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vm: Vm,
        memory: GuestMemoryMmap,
        legacy: LegacyDevices,
        control: Arc<VcpuControl>,
        events: Receiver<VcpuEvent>,
        events_ready: Arc<EventFd>,
        status: Arc<VmStatus>,
        shutdown_timeout: Duration,
    ) -> Self {
        Vmm {
            vcpus: Vec::new(),
            view: VmView {
                status,
                vcpu_counters: Vec::new(),
                disk_counters: Vec::new(),
                vsock_counters: None,
                serial_counters: legacy.serial_counters.clone(),
                nets: Vec::new(),
                boot_monitor: None,
            },
            control,
            events,
            events_ready,
            inbox: None,
            boot_watch: None,
            shutdown_timeout,
            shutdown_method: ShutdownMethod::default(),
            legacy,
            net_teardown: None,
            _vm: vm,
            _memory: memory,
        }
    }

    /// Keeps the disks' counters.
    pub fn set_disk_counters(&mut self, c: Vec<Arc<BlockCounters>>) {
        self.view.disk_counters = c;
    }

    /// Keeps the vsock device's counters.
    pub fn set_vsock_counters(&mut self, c: Option<Arc<VsockCounters>>) {
        self.view.vsock_counters = c;
    }

    /// Keeps the NICs (for the API) and what undoes their host set-up
    /// (run when the VMM is dropped).
    pub fn set_nets(&mut self, nets: Vec<NetDeviceInfo>, teardown: Option<TeardownHelper>) {
        self.view.nets = nets;
        self.net_teardown = teardown;
    }

    /// How a graceful shutdown asks the guest (the ACPI power button
    /// by default).
    pub fn set_shutdown_method(&mut self, method: ShutdownMethod) {
        self.shutdown_method = method;
    }

    /// Adds a started vCPU thread.
    pub fn add_vcpu(&mut self, handle: VcpuHandle) {
        self.vcpus.push(handle);
    }

    /// Keeps a vCPU's exit counters.
    pub fn add_vcpu_counters(&mut self, c: Arc<ExitCounters>) {
        self.view.vcpu_counters.push(c);
    }

    /// Watches the guest's boot (the monitor must already see the serial
    /// output).
    pub fn set_boot_watch(&mut self, watch: BootWatch) {
        self.view.boot_monitor = Some(watch.monitor.clone());
        self.boot_watch = Some(watch);
    }

    /// Accepts control requests from `inbox` (the API's channel).
    pub fn set_control_inbox(&mut self, inbox: ControlInbox) {
        self.inbox = Some(inbox);
    }

    /// What the control API reads.
    pub fn view(&self) -> VmView {
        self.view.clone()
    }

    /// The legacy devices (serial, i8042, boot timer).
    pub fn legacy_devices(&self) -> &LegacyDevices {
        &self.legacy
    }

    /// Runs the control loop until the VM ends; then stops all vCPUs.
    pub fn run(mut self) -> VmOutcome {
        self.view.status.set(VmState::Running);
        systemd::ready(&self.status_line());
        let outcome = self.wait_for_end();
        vcpu::stop_all(std::mem::take(&mut self.vcpus), &self.control);
        self.set_state(VmState::Stopped);
        if let Some(inbox) = &self.inbox {
            // The answer to the request that ended the VM (stop, shutdown)
            // reaches its client before the process exits.
            inbox.wait_for_answers(ANSWER_FLUSH_LIMIT);
        }
        info!("VM ended: {}", outcome.describe());
        for (i, c) in self.view.disk_counters.iter().enumerate() {
            let s = c.snapshot();
            info!(
                "disk {i}: {} reads ({} B), {} writes ({} B), {} flushes, {} discards, {} write-zeroes, {} invalid, {} unsupported, {} I/O errors, {} cow_limit_errors",
                s.read_ops, s.read_bytes, s.write_ops, s.write_bytes, s.flush_ops, s.discard_ops,
                s.write_zeroes_ops, s.invalid_requests, s.unsupported_requests, s.io_errors,
                s.cow_limit_errors
            );
        }
        for (i, n) in self.view.nets.iter().enumerate() {
            let c: Vec<String> = n
                .counters
                .pairs()
                .into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            info!("net {i} ({}): {}", n.tap, c.join(" "));
        }
        systemd::stopping(&outcome.describe());
        // Taps Keel created go away, bridge membership it added is undone.
        if let Some(helper) = self.net_teardown.take() {
            helper.finish();
        }
        outcome
    }

    fn set_state(&self, s: VmState) {
        if self.view.status.state() != s {
            self.view.status.set(s);
            systemd::status(&self.status_line());
        }
    }

    /// systemd's STATUS=: `VM <state>`, and `; guest boot <outcome>` with
    /// the boot monitor.
    fn status_line(&self) -> String {
        let vm = format!("VM {}", self.view.status.state().name());
        match &self.view.boot_monitor {
            Some(m) => format!("{vm}; guest boot {}", m.state().name()),
            None => vm,
        }
    }

    /// Tells the log, systemd and the configured consoles how the guest's
    /// boot went.
    fn report_boot(&self, outcome: GuestBoot) {
        match outcome {
            GuestBoot::Success => info!("boot monitor: {}", outcome.console_line()),
            _ => warn!("boot monitor: {}", outcome.console_line()),
        }
        systemd::status(&self.status_line());
        if let Some(w) = &self.boot_watch {
            boot_monitor::write_consoles(&w.consoles, outcome.console_line());
        }
    }

    fn pause(&mut self) -> Result<(), String> {
        match self.view.status.state() {
            VmState::Running => {
                if self.control.pause(&self.vcpus, PAUSE_TIMEOUT) {
                    self.set_state(VmState::Paused);
                    Ok(())
                } else {
                    self.control.resume();
                    Err("vCPUs did not pause in time".into())
                }
            }
            VmState::Paused => Ok(()),
            s => Err(format!("cannot pause a VM that is {}", s.name())),
        }
    }

    fn resume(&mut self) -> Result<(), String> {
        match self.view.status.state() {
            VmState::Paused => {
                self.control.resume();
                self.set_state(VmState::Running);
                Ok(())
            }
            VmState::Running => Ok(()),
            s => Err(format!("cannot resume a VM that is {}", s.name())),
        }
    }

    /// Types Ctrl-Alt-Del into the guest (resuming it first if paused).
    fn ctrl_alt_del(&mut self) -> Result<(), String> {
        if self.view.status.state() == VmState::Paused {
            self.resume()?;
        }
        let mut kbd = self.legacy.i8042.lock().unwrap_or_else(|p| p.into_inner());
        kbd.trigger_ctrl_alt_del().map_err(|e| e.to_string())
    }

    /// Presses the ACPI power button (a GED event), resuming a paused
    /// guest first.
    fn press_power_button(&mut self) -> Result<(), String> {
        if self.view.status.state() == VmState::Paused {
            self.resume()?;
        }
        let mut ged = self.legacy.ged.lock().unwrap_or_else(|p| p.into_inner());
        ged.notify(GED_POWER_BUTTON)
            .map_err(|e| format!("cannot press the power button: {e}"))
    }

    fn begin_shutdown(
        &mut self,
        timeout: Duration,
        why: &'static str,
        pending: &mut Option<Shutdown>,
    ) -> Result<(), String> {
        if pending.is_some() {
            return Ok(());
        }
        let (how, asked) = match self.shutdown_method {
            ShutdownMethod::Acpi => ("ACPI power button", self.press_power_button()),
            ShutdownMethod::CtrlAltDel => ("Ctrl-Alt-Del", self.ctrl_alt_del()),
        };
        info!(
            "graceful shutdown ({why}): {how}, forced stop in {} s",
            timeout.as_secs()
        );
        if let Err(e) = asked {
            warn!("graceful shutdown: {e}; waiting for the timeout");
        }
        self.set_state(VmState::ShuttingDown);
        *pending = Some(Shutdown {
            deadline: Instant::now() + timeout,
            why,
        });
        Ok(())
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
        let mut watch = vec![
            (self.events_ready.as_raw_fd(), TOKEN_VCPU),
            (self.legacy.reset_evt.as_raw_fd(), TOKEN_RESET),
            (self.legacy.power_off_evt.as_raw_fd(), TOKEN_POWER),
            (sigfd.as_raw_fd(), TOKEN_SIGNAL),
        ];
        if let Some(inbox) = &self.inbox {
            watch.push((inbox.wake.as_raw_fd(), TOKEN_CONTROL));
        }
        // The boot timeout counts from here, the vCPUs' start.
        let mut boot_deadline = None;
        if let Some(w) = &self.boot_watch {
            watch.push((w.monitor.wake.as_raw_fd(), TOKEN_BOOT));
            boot_deadline = Some(Instant::now() + w.timeout);
        }
        for (fd, token) in watch {
            if let Err(e) = epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            ) {
                return VmOutcome::Fatal(format!("cannot watch fd {fd}: {e}"));
            }
        }
        let watchdog = systemd::watchdog_interval();
        let mut next_watchdog = watchdog.map(|w| Instant::now() + w);
        let mut shutdown: Option<Shutdown> = None;
        let mut ready = [EpollEvent::default(); 8];
        loop {
            let now = Instant::now();
            if let Some(s) = &shutdown {
                if now >= s.deadline {
                    warn!(
                        "guest did not shut down in time ({}); forcing it off",
                        s.why
                    );
                    return VmOutcome::Stopped("shutdown timeout; forced stop");
                }
            }
            if boot_deadline.is_some_and(|at| now >= at) {
                boot_deadline = None;
                if let Some(w) = &self.boot_watch {
                    if w.monitor.time_out() {
                        self.report_boot(GuestBoot::Timeout);
                    }
                }
            }
            if let (Some(at), Some(every)) = (next_watchdog, watchdog) {
                if now >= at {
                    systemd::watchdog();
                    next_watchdog = Some(now + every);
                }
            }
            let wake_at = [
                shutdown.as_ref().map(|s| s.deadline),
                next_watchdog,
                boot_deadline,
            ]
            .into_iter()
            .flatten()
            .min();
            let timeout_ms = wake_at.map_or(-1, |t| {
                t.saturating_duration_since(now)
                    .as_millis()
                    .min(i32::MAX as u128) as i32
            });
            let n = match epoll.wait(timeout_ms, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return VmOutcome::Fatal(format!("epoll wait: {e}")),
            };
            for ev in &ready[..n] {
                match ev.data() {
                    TOKEN_VCPU => {
                        let _ = self.events_ready.read();
                        if let Ok(event) = self.events.try_recv() {
                            return graceful(outcome_of(event), &shutdown);
                        }
                    }
                    TOKEN_RESET => return graceful(VmOutcome::Reset, &shutdown),
                    TOKEN_POWER => return graceful(VmOutcome::PowerOff, &shutdown),
                    TOKEN_SIGNAL => {
                        let sig = match sigfd.read_signal() {
                            Ok(Some(info)) if info.ssi_signo == libc::SIGINT as u32 => "SIGINT",
                            _ => "SIGTERM",
                        };
                        if shutdown.is_some() {
                            // A second signal while shutting down: stop now.
                            return VmOutcome::Stopped(if sig == "SIGINT" {
                                "SIGINT"
                            } else {
                                "SIGTERM"
                            });
                        }
                        let why = if sig == "SIGINT" { "SIGINT" } else { "SIGTERM" };
                        let timeout = self.shutdown_timeout;
                        let _ = self.begin_shutdown(timeout, why, &mut shutdown);
                    }
                    TOKEN_BOOT => {
                        if let Some(w) = &self.boot_watch {
                            let _ = w.monitor.wake.read();
                            boot_deadline = None;
                            self.report_boot(w.monitor.state());
                        }
                    }
                    TOKEN_CONTROL => {
                        if let Some(end) = self.serve_requests(&mut shutdown) {
                            return end;
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Answers queued API requests; returns an outcome if one ends the VM.
    fn serve_requests(&mut self, shutdown: &mut Option<Shutdown>) -> Option<VmOutcome> {
        let reqs: Vec<_> = match &self.inbox {
            Some(inbox) => {
                let _ = inbox.wake.read();
                inbox.rx.try_iter().collect()
            }
            None => return None,
        };
        for (req, reply) in reqs {
            let answer = match req {
                ControlRequest::Pause => self.pause(),
                ControlRequest::Resume => self.resume(),
                ControlRequest::CtrlAltDel => self.ctrl_alt_del(),
                ControlRequest::Shutdown { timeout } => {
                    self.begin_shutdown(timeout, "API request", shutdown)
                }
                ControlRequest::Stop => {
                    let _ = reply.send(Ok(()));
                    return Some(VmOutcome::Stopped("API stop request"));
                }
            };
            let _ = reply.send(answer);
        }
        None
    }
}

/// After a requested shutdown, the guest going down by any clean route
/// (power-off, reset) is the expected, successful end.
fn graceful(outcome: VmOutcome, shutdown: &Option<Shutdown>) -> VmOutcome {
    match (outcome, shutdown) {
        (VmOutcome::PowerOff | VmOutcome::Reset, Some(_)) => {
            VmOutcome::Stopped("graceful shutdown")
        }
        (o, _) => o,
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
