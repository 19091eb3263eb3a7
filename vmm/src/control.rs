//! What the outside world (the control API, signals, systemd) can ask of a
//! running VM, and the state it reports back.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use vmm_sys_util::eventfd::EventFd;

/// Life-cycle state of the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// Being built.
    Starting,
    /// vCPUs running.
    Running,
    /// vCPUs parked by a pause request.
    Paused,
    /// The guest was asked to shut down (power button or Ctrl-Alt-Del);
    /// waiting for it to go down.
    ShuttingDown,
    /// Ended.
    Stopped,
}

impl VmState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => VmState::Starting,
            1 => VmState::Running,
            2 => VmState::Paused,
            3 => VmState::ShuttingDown,
            _ => VmState::Stopped,
        }
    }

    /// The name the API and systemd STATUS use.
    pub fn name(self) -> &'static str {
        match self {
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::ShuttingDown => "shutting-down",
            VmState::Stopped => "stopped",
        }
    }
}

/// Shared, lock-free view of the VM's state.
#[derive(Debug)]
pub struct VmStatus {
    state: AtomicU8,
    started: Instant,
}

impl VmStatus {
    /// A VM starting now.
    pub fn new(started: Instant) -> Self {
        VmStatus {
            state: AtomicU8::new(VmState::Starting as u8),
            started,
        }
    }

    /// Current state.
    pub fn state(&self) -> VmState {
        VmState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Sets the state.
    pub fn set(&self, s: VmState) {
        self.state.store(s as u8, Ordering::Release);
    }

    /// Time since the VMM started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}

/// A request to the control loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlRequest {
    /// Park every vCPU.
    Pause,
    /// Let them run again.
    Resume,
    /// Ask the guest (`control.shutdown_method`), then a forced stop after
    /// `timeout`.
    Shutdown {
        /// How long the guest gets.
        timeout: Duration,
    },
    /// Stop now.
    Stop,
    /// Type Ctrl-Alt-Del only (no deadline).
    CtrlAltDel,
}

/// A request and where its answer goes.
pub type Envelope = (ControlRequest, Sender<Result<(), String>>);

/// The API's handle on the control loop.
#[derive(Clone)]
pub struct ControlHandle {
    tx: Sender<Envelope>,
    wake: Arc<EventFd>,
    answering: Arc<AtomicUsize>,
    /// The VM's state.
    pub status: Arc<VmStatus>,
}

/// The control loop's end.
pub struct ControlInbox {
    /// Incoming requests.
    pub rx: Receiver<Envelope>,
    /// Written on each request.
    pub wake: Arc<EventFd>,
    answering: Arc<AtomicUsize>,
}

/// Held by the API while it handles a request and writes the answer: the
/// VMM waits for these before it exits, so that the client of a `stop`
/// or `shutdown` hears the answer rather than a closed connection.
pub struct AnswerGuard(Arc<AtomicUsize>);

impl Drop for AnswerGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ControlInbox {
    /// Waits (at most `limit`) until no API answer is being written.
    pub fn wait_for_answers(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.answering.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// A connected handle/inbox pair.
pub fn channel(status: Arc<VmStatus>) -> std::io::Result<(ControlHandle, ControlInbox)> {
    let (tx, rx) = mpsc::channel();
    let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
    let answering = Arc::new(AtomicUsize::new(0));
    Ok((
        ControlHandle {
            tx,
            wake: wake.clone(),
            answering: answering.clone(),
            status,
        },
        ControlInbox {
            rx,
            wake,
            answering,
        },
    ))
}

impl ControlHandle {
    /// Marks an answer as being prepared until the guard is dropped.
    pub fn answering(&self) -> AnswerGuard {
        self.answering.fetch_add(1, Ordering::SeqCst);
        AnswerGuard(self.answering.clone())
    }

    /// Sends `req` and waits (at most `wait`) for the loop's answer.
    pub fn request(&self, req: ControlRequest, wait: Duration) -> Result<(), String> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send((req, tx))
            .map_err(|_| "the VM is no longer running".to_string())?;
        let _ = self.wake.write(1);
        rx.recv_timeout(wait)
            .map_err(|_| "the VMM did not answer in time".to_string())?
    }
}
