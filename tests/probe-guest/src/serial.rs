//! COM1, a 16550 UART at I/O port 0x3f8, driven by polling.
//!
//! Each port access is a VM exit, so output is written in bursts: when the
//! line status says the transmitter is empty (THRE), a 16550A with its FIFO
//! enabled takes 16 bytes; a plain 16450-style UART takes one.

use core::fmt;
use core::sync::atomic::{AtomicU8, Ordering};

use crate::arch::port::{inb, outb};

/// I/O base of COM1.
pub const COM1: u16 = 0x3f8;
/// Transmit holding register (write) / receive buffer (read).
const THR: u16 = 0;
/// Receive buffer register (read; the same offset as THR).
const RBR: u16 = 0;
/// Interrupt enable register.
const IER: u16 = 1;
/// FIFO control register (write) / interrupt identification (read).
const FCR_IIR: u16 = 2;
/// Line control register.
const LCR: u16 = 3;
/// Line status register.
const LSR: u16 = 5;
/// Scratch register.
pub const SCR: u16 = 7;
/// Line status: data ready (the receive buffer holds a byte).
const LSR_DR: u8 = 1 << 0;
const LSR_THRE: u8 = 1 << 5;
const IIR_FIFO_ENABLED: u8 = 0xc0;
/// Bounded wait for THRE, so a stuck UART cannot hang the probe.
const THRE_POLLS: u32 = 1_000_000;

/// Bytes the transmitter accepts after THRE (1 until [`init`] found a FIFO).
static BURST: AtomicU8 = AtomicU8::new(1);
/// Bytes left in the current burst.
static CREDIT: AtomicU8 = AtomicU8::new(0);

/// Sets 8N1, interrupts off, FIFOs on (and detects them).
pub fn init() {
    outb(COM1 + IER, 0);
    outb(COM1 + LCR, 0x03);
    outb(COM1 + FCR_IIR, 0x07);
    let burst = if inb(COM1 + FCR_IIR) & IIR_FIFO_ENABLED == IIR_FIFO_ENABLED {
        16
    } else {
        1
    };
    BURST.store(burst, Ordering::Relaxed);
}

/// Writes one byte, waiting for room in the transmitter.
pub fn write_byte(byte: u8) {
    let mut credit = CREDIT.load(Ordering::Relaxed);
    if credit == 0 {
        for _ in 0..THRE_POLLS {
            if inb(COM1 + LSR) & LSR_THRE != 0 {
                break;
            }
        }
        credit = BURST.load(Ordering::Relaxed);
    }
    outb(COM1 + THR, byte);
    CREDIT.store(credit - 1, Ordering::Relaxed);
}

/// Reads a received byte if the line status says one is waiting: one LSR
/// read (a VM exit) when nothing is there, two when something is.
pub fn read_byte() -> Option<u8> {
    (inb(COM1 + LSR) & LSR_DR != 0).then(|| inb(COM1 + RBR))
}

/// Writes `bytes` as they are.
pub fn write_bytes(bytes: &[u8]) {
    bytes.iter().copied().for_each(write_byte);
}

/// A [`fmt::Write`] sink on COM1.
pub struct Writer;

impl fmt::Write for Writer {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Formats to COM1 (used by [`println!`](crate::println)).
pub fn write_fmt(args: fmt::Arguments<'_>) {
    // Writer never fails.
    let _ = fmt::Write::write_fmt(&mut Writer, args);
}

/// Prints a line on COM1 (`\n`-terminated).
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::serial::write_fmt(format_args!("{}\n", format_args!($($arg)*)))
    };
}
