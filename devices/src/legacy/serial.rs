//! The 16550A UART on COM1, from vm-superio, with Keel's output sinks.

use std::io::{self, Write};
use std::path::Path;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use log::warn;
use vm_superio::serial::NoEvents;

use super::serial_log::RotatingLog;
use super::EventFdTrigger;
use crate::bus::BusDevice;

/// COM1's I/O base.
pub const COM1_PORT: u64 = 0x3f8;
/// COM1's ISA interrupt line.
pub const COM1_IRQ: u32 = 4;
/// Number of UART registers.
pub const SERIAL_PORT_LEN: u64 = 8;

/// Where the guest's serial output goes.
pub enum SerialSink {
    /// A log file, truncated when the VM starts (like HostOS's
    /// `guestos-serial.log`), rotated at its size cap.
    File(RotatingLog),
    /// The VMM's standard output.
    Stdout(io::Stdout),
    /// Discarded.
    Off,
}

impl SerialSink {
    /// Creates (or truncates) the log file at `path`, rotated when it
    /// would grow past `max_size` bytes, keeping `max_backups` old ones.
    pub fn file(path: &Path, max_size: u64, max_backups: u32) -> io::Result<Self> {
        RotatingLog::create(path, max_size, max_backups).map(SerialSink::File)
    }
}

impl Write for SerialSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SerialSink::File(f) => f.write(buf),
            SerialSink::Stdout(s) => s.write(buf),
            SerialSink::Off => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            SerialSink::File(_) | SerialSink::Off => Ok(()),
            SerialSink::Stdout(s) => s.flush(),
        }
    }
}

/// Console watchers: every byte the guest writes is also offered to each
/// subscriber (a control-API console client), without ever blocking the
/// guest: a subscriber that falls behind loses bytes, and they are counted.
#[derive(Debug, Default)]
pub struct ConsoleHub {
    count: AtomicUsize,
    clients: Mutex<Vec<(u64, SyncSender<u8>)>>,
    next_id: AtomicU64,
    /// Bytes dropped for slow subscribers.
    pub dropped: AtomicU64,
}

/// Buffer of one console subscriber.
const SUBSCRIBER_BUFFER: usize = 64 << 10;

impl ConsoleHub {
    /// Adds a subscriber; returns its id and the receiving end.
    pub fn subscribe(&self) -> (u64, Receiver<u8>) {
        let (tx, rx) = sync_channel(SUBSCRIBER_BUFFER);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut c = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        c.push((id, tx));
        self.count.store(c.len(), Ordering::Release);
        (id, rx)
    }

    /// Removes subscriber `id`.
    pub fn unsubscribe(&self, id: u64) {
        let mut c = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        c.retain(|(i, _)| *i != id);
        self.count.store(c.len(), Ordering::Release);
    }

    fn offer(&self, bytes: &[u8]) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut c = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        c.retain(|(_, tx)| {
            for &b in bytes {
                match tx.try_send(b) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => {
                        self.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(TrySendError::Disconnected(_)) => return false,
                }
            }
            true
        });
        self.count.store(c.len(), Ordering::Release);
    }
}

/// Sees every byte the guest writes to the serial port, in order, on the
/// vCPU thread that writes it: it must be quick and must never block.
pub trait OutputWatcher: Send + Sync {
    /// The guest wrote `bytes` (the UART passes one byte at a time).
    fn watch(&self, bytes: &[u8]);
}

/// The configured sink plus the console watchers.
pub struct TeeSink {
    sink: SerialSink,
    hub: Arc<ConsoleHub>,
    watchers: Vec<Arc<dyn OutputWatcher>>,
}

impl Write for TeeSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for w in &self.watchers {
            w.watch(buf);
        }
        self.hub.offer(buf);
        self.sink.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sink.flush()
    }
}

/// What the serial port counts (shown by `GET /v1/counters`).
#[derive(Debug, Default)]
pub struct SerialCounters {
    /// Guest bytes the sink failed to take (full disk, closed stdout, a
    /// failed log rotation).
    pub lost_bytes: AtomicU64,
}

/// COM1: a vm-superio 16550A whose interrupt is an eventfd (a KVM irqfd).
pub struct Serial {
    uart: vm_superio::Serial<EventFdTrigger, NoEvents, TeeSink>,
    counters: Arc<SerialCounters>,
    /// A sink error was logged: later ones are only counted.
    error_logged: bool,
}

impl Serial {
    /// A UART raising `irq` and writing to `sink`.
    pub fn new(irq: EventFdTrigger, sink: SerialSink) -> Self {
        Self::with_hub(irq, sink, Arc::new(ConsoleHub::default()))
    }

    /// A UART whose output also goes to the watchers of `hub`.
    pub fn with_hub(irq: EventFdTrigger, sink: SerialSink, hub: Arc<ConsoleHub>) -> Self {
        Serial {
            uart: vm_superio::Serial::new(
                irq,
                TeeSink {
                    sink,
                    hub,
                    watchers: Vec::new(),
                },
            ),
            counters: Arc::new(SerialCounters::default()),
            error_logged: false,
        }
    }

    /// The port's counters.
    pub fn counters(&self) -> Arc<SerialCounters> {
        self.counters.clone()
    }

    /// Adds a watcher of the guest's output (see [`OutputWatcher`]).
    pub fn add_watcher(&mut self, watcher: Arc<dyn OutputWatcher>) {
        self.uart.writer_mut().watchers.push(watcher);
    }

    /// Queues bytes for the guest to read; returns how many fit in the FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> io::Result<usize> {
        self.uart
            .enqueue_raw_bytes(input)
            .map_err(|e| io::Error::other(format!("{e:?}")))
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(off), [byte]) = (u8::try_from(offset), &mut *data) {
            *byte = self.uart.read(off);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [byte]) = (u8::try_from(offset), data) {
            // A lost byte (full disk, closed stdout) must not stop the
            // guest, nor flood the host's log: the first is logged, every
            // one is counted.
            if let Err(e) = self.uart.write(off, *byte) {
                self.counters.lost_bytes.fetch_add(1, Ordering::Relaxed);
                if !std::mem::replace(&mut self.error_logged, true) {
                    warn!("serial: guest output lost: {e:?} (further losses are only counted: lost_bytes in GET /v1/counters)");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn writes_reach_the_log_file_and_raise_the_irq() {
        let dir = std::env::temp_dir().join(format!("keel-serial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        std::fs::write(&path, b"old contents").unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(
            EventFdTrigger::try_clone_from(&irq).unwrap(),
            SerialSink::file(&path, 1 << 20, 3).unwrap(),
        );
        s.write(1, &[0x02]); // IER: THR empty interrupt
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        let mut out = String::new();
        std::fs::File::open(&path)
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(
            out, "hi\n",
            "log is truncated at start, then holds the output"
        );
        assert!(irq.read().unwrap() >= 1);
        // Scratch register round trip, as the probe checks it.
        s.write(7, &[0x5a]);
        let mut b = [0u8];
        s.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn console_watchers_see_output_and_never_block_the_guest() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let hub = Arc::new(ConsoleHub::default());
        let mut s = Serial::with_hub(EventFdTrigger(irq), SerialSink::Off, hub.clone());
        let (id, rx) = hub.subscribe();
        for b in b"ok\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(rx.try_iter().collect::<Vec<u8>>(), b"ok\n");
        // A watcher that never reads loses bytes past its buffer, counted.
        let (_slow, _rx2) = hub.subscribe();
        for _ in 0..(SUBSCRIBER_BUFFER + 10) {
            s.write(0, b"x");
        }
        assert!(hub.dropped.load(Ordering::Relaxed) >= 10);
        hub.unsubscribe(id);
        drop(rx);
    }

    #[test]
    fn watchers_see_every_byte_in_order() {
        struct Collect(Mutex<Vec<u8>>);
        impl OutputWatcher for Collect {
            fn watch(&self, bytes: &[u8]) {
                self.0.lock().unwrap().extend_from_slice(bytes);
            }
        }
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(EventFdTrigger(irq), SerialSink::Off);
        let seen = Arc::new(Collect(Mutex::new(Vec::new())));
        s.add_watcher(seen.clone());
        for b in b"GUESTOS BOOT" {
            s.write(0, &[*b]);
        }
        assert_eq!(*seen.0.lock().unwrap(), b"GUESTOS BOOT");
    }

    /// Counts the log records about lost serial output.
    struct LossLog(AtomicUsize);
    impl log::Log for LossLog {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, r: &log::Record) {
            if r.args()
                .to_string()
                .starts_with("serial: guest output lost")
            {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        fn flush(&self) {}
    }
    static LOSS_LOG: LossLog = LossLog(AtomicUsize::new(0));

    #[test]
    fn a_failing_sink_is_logged_once_and_every_lost_byte_counted() {
        log::set_logger(&LOSS_LOG).expect("no other test sets a logger");
        log::set_max_level(log::LevelFilter::Warn);
        let dir = std::env::temp_dir().join(format!("keel-serial-loss-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(EventFdTrigger(irq), SerialSink::file(&path, 4, 1).unwrap());
        for b in b"abcd" {
            s.write(0, &[*b]);
        }
        // PATH.1 is a non-empty directory: every rotation, so every
        // further byte, fails.
        std::fs::create_dir_all(dir.join("console.log.1").join("x")).unwrap();
        for _ in 0..100 {
            s.write(0, b"x");
        }
        assert_eq!(s.counters().lost_bytes.load(Ordering::Relaxed), 100);
        assert_eq!(LOSS_LOG.0.load(Ordering::Relaxed), 1, "logged once");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn odd_sized_accesses_are_ignored() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(EventFdTrigger(irq), SerialSink::Off);
        let mut b = [0u8; 2];
        s.read(0, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        s.write(7, &[1, 2]);
        let mut one = [0u8];
        s.read(7, &mut one);
        assert_eq!(one[0], 0);
    }
}
