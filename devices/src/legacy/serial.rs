//! The 16550A UART on COM1, from vm-superio, with Keel's output sinks.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use log::warn;
use vm_superio::serial::NoEvents;

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
    /// `guestos-serial.log`).
    File(File),
    /// The VMM's standard output.
    Stdout(io::Stdout),
    /// Discarded.
    Off,
}

impl SerialSink {
    /// Creates (or truncates) the log file at `path`.
    pub fn file(path: &Path) -> io::Result<Self> {
        File::create(path).map(SerialSink::File)
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

/// COM1: a vm-superio 16550A whose interrupt is an eventfd (a KVM irqfd).
pub struct Serial {
    uart: vm_superio::Serial<EventFdTrigger, NoEvents, SerialSink>,
}

impl Serial {
    /// A UART raising `irq` and writing to `sink`.
    pub fn new(irq: EventFdTrigger, sink: SerialSink) -> Self {
        Serial {
            uart: vm_superio::Serial::new(irq, sink),
        }
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
            // A lost byte (full disk, closed stdout) must not stop the guest.
            if let Err(e) = self.uart.write(off, *byte) {
                warn!("serial: {e:?}");
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
            SerialSink::file(&path).unwrap(),
        );
        s.write(1, &[0x02]); // IER: THR empty interrupt
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        let mut out = String::new();
        File::open(&path).unwrap().read_to_string(&mut out).unwrap();
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
