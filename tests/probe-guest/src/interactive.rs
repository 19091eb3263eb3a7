//! `probe.interactive`: after the checks, stay up at CPL3 and answer the
//! outside world, for tests of a VMM's pause/resume, console input and
//! graceful shutdown.
//!
//! One loop, paced by the TSC (every port access is a VM exit, so nothing
//! is polled in a tight loop): about every millisecond it reads COM1's line
//! status and the i8042 status once each (and their data registers when
//! they hold something), and prints a heartbeat when one is due.
//!
//! - Heartbeat (`probe.heartbeat=<ms>`): `probe: tick <n>`, n from 1. A VM
//!   that was paused finds its ticks overdue on resume (the TSC runs on);
//!   it prints one tick then and starts the period over, instead of a burst
//!   of catch-up ticks.
//! - Console: bytes from COM1 collect into a line; `\r` or `\n` ends it
//!   (a `\n` right after `\r` ends nothing) and it is printed as
//!   `probe: console got <line>`: at most [`LINE_MAX`] characters, anything
//!   but printable ASCII as `?`.
//! - ACPI power button: Keel's Generic Event Device keeps its pending
//!   events in a register at port 0x608 (reading clears it; the DSDT's
//!   `_EVT` reads it the same way). Bit 0 set is a power button press: the
//!   probe prints `probe: power-button` and powers off, as a guest's
//!   systemd does. An all-ones byte is no device (QEMU, Firecracker).
//! - Ctrl-Alt-Del: scan codes from the i8042 go through two decoders, one
//!   for set 2 (what a keyboard sends untranslated, Keel's default) and one
//!   for set 1 (what a controller with translation on delivers); the probe
//!   never changes the controller configuration, so it does not know which
//!   it gets. When Delete (or keypad Delete, as Linux accepts) is pressed
//!   while a Ctrl and an Alt key are held, it prints `probe: ctrl-alt-del`
//!   and powers off ([`crate::power::off`]). Neither decoder's modifier
//!   codes appear in the other set's Ctrl-Alt-Del sequence.

use alloc::string::String;

use crate::arch::port::inb;
use crate::arch::tsc;
use crate::{power, println, serial};

/// Longest console line printed; characters past it are dropped.
pub const LINE_MAX: usize = 128;
/// Time between two polls of the devices.
const POLL_US: u64 = 1_000;
/// Bytes taken from COM1 per poll at most (vm-superio's receive FIFO
/// holds 64).
const SERIAL_DRAIN: usize = 64;
/// Bytes taken from the i8042 per poll at most (Keel's buffer holds 16).
const I8042_DRAIN: usize = 16;

/// Keel's GED event register (read clears).
const GED_EVENTS: u16 = 0x608;
/// GED event: the power button was pressed.
const GED_POWER_BUTTON: u8 = 1 << 0;
/// What a port without a device reads.
const NO_DEVICE: u8 = 0xff;

/// i8042 data port.
const I8042_DATA: u16 = 0x60;
/// i8042 status port.
const I8042_STATUS: u16 = 0x64;
/// Status: output buffer full (a byte waits at the data port).
const I8042_OBF: u8 = 1 << 0;
/// Status: the byte comes from the auxiliary (mouse) port.
const I8042_AUX: u8 = 1 << 5;

/// Prints `probe: interactive` and runs the loop; ends the VM only on
/// Ctrl-Alt-Del or an ACPI power button press.
pub fn run(heartbeat_ms: Option<u64>) -> ! {
    println!("probe: interactive");
    let khz = match tsc::khz() {
        Some((khz, _)) => khz,
        None => {
            println!("probe: interactive: TSC rate unknown, waits assume 5 GHz (ticks come late)");
            tsc::cycles_at_least(1000)
        }
    };
    let poll = khz.saturating_mul(POLL_US) / 1000;
    let period = heartbeat_ms.map(|ms| khz.saturating_mul(ms).max(1));

    let mut console = Console::new();
    let mut keyboard = Keyboard::default();
    let mut ticks = 0u64;
    let start = tsc::rdtsc();
    let mut next_poll = start;
    let mut next_tick = period.map(|p| start.wrapping_add(p));
    loop {
        while !reached(tsc::rdtsc(), next_poll) {
            core::hint::spin_loop();
        }
        next_poll = tsc::rdtsc().wrapping_add(poll);

        for _ in 0..SERIAL_DRAIN {
            match serial::read_byte() {
                Some(byte) => console.feed(byte),
                None => break,
            }
        }
        for _ in 0..I8042_DRAIN {
            let status = inb(I8042_STATUS);
            if status & I8042_OBF == 0 {
                break;
            }
            let byte = inb(I8042_DATA);
            if status & I8042_AUX == 0 && keyboard.feed(byte) {
                println!("probe: ctrl-alt-del");
                power::off();
            }
        }
        let events = inb(GED_EVENTS);
        if events != NO_DEVICE && events & GED_POWER_BUTTON != 0 {
            println!("probe: power-button");
            power::off();
        }
        if let (Some(period), Some(due)) = (period, next_tick.as_mut()) {
            let now = tsc::rdtsc();
            if reached(now, *due) {
                ticks += 1;
                println!("probe: tick {ticks}");
                *due = due.wrapping_add(period);
                if reached(now, *due) {
                    // More than a period behind (the VM was paused): start over.
                    *due = now.wrapping_add(period);
                }
            }
        }
    }
}

/// Whether TSC value `now` is at or past `deadline`.
fn reached(now: u64, deadline: u64) -> bool {
    now.wrapping_sub(deadline) as i64 >= 0
}

/// A console line being typed.
struct Console {
    line: String,
    after_cr: bool,
}

impl Console {
    fn new() -> Self {
        Console {
            line: String::with_capacity(LINE_MAX),
            after_cr: false,
        }
    }

    fn feed(&mut self, byte: u8) {
        let after_cr = core::mem::replace(&mut self.after_cr, byte == b'\r');
        match byte {
            b'\n' if after_cr => {}
            b'\r' | b'\n' => {
                println!("probe: console got {}", self.line);
                self.line.clear();
            }
            _ if self.line.len() >= LINE_MAX => {}
            0x20..=0x7e => self.line.push(char::from(byte)),
            _ => self.line.push('?'),
        }
    }
}

const LCTRL: u8 = 1 << 0;
const RCTRL: u8 = 1 << 1;
const LALT: u8 = 1 << 2;
const RALT: u8 = 1 << 3;

/// A decoded key event.
enum Key {
    /// A Ctrl or Alt key (its bit).
    Modifier(u8),
    /// Delete or keypad Delete.
    Delete,
    /// Anything else.
    Other,
}

/// Modifier state; `event` reports Delete pressed with Ctrl and Alt held.
#[derive(Default)]
struct Modifiers(u8);

impl Modifiers {
    fn event(&mut self, key: Key, released: bool) -> bool {
        match key {
            Key::Modifier(bit) if released => self.0 &= !bit,
            Key::Modifier(bit) => self.0 |= bit,
            Key::Delete => {
                return !released && self.0 & (LCTRL | RCTRL) != 0 && self.0 & (LALT | RALT) != 0
            }
            Key::Other => {}
        }
        false
    }
}

/// Scan code set 2: `E0` extended prefix, `F0` break prefix, `E1` (Pause)
/// marks the next code as one to ignore.
#[derive(Default)]
struct Set2 {
    extended: bool,
    release: bool,
    pause: bool,
    mods: Modifiers,
}

impl Set2 {
    fn feed(&mut self, byte: u8) -> bool {
        match byte {
            0xe0 => self.extended = true,
            0xe1 => self.pause = true,
            0xf0 => self.release = true,
            code => {
                let extended = core::mem::take(&mut self.extended);
                let release = core::mem::take(&mut self.release);
                if core::mem::take(&mut self.pause) {
                    return false;
                }
                let key = match (extended, code) {
                    (false, 0x14) => Key::Modifier(LCTRL),
                    (true, 0x14) => Key::Modifier(RCTRL),
                    (false, 0x11) => Key::Modifier(LALT),
                    (true, 0x11) => Key::Modifier(RALT),
                    (_, 0x71) => Key::Delete,
                    _ => Key::Other,
                };
                return self.mods.event(key, release);
            }
        }
        false
    }
}

/// Scan code set 1: `E0` extended prefix, bit 7 set on a release, `E1`
/// (Pause) marks the next code as one to ignore.
#[derive(Default)]
struct Set1 {
    extended: bool,
    pause: bool,
    mods: Modifiers,
}

impl Set1 {
    fn feed(&mut self, byte: u8) -> bool {
        match byte {
            0xe0 => self.extended = true,
            0xe1 => self.pause = true,
            _ => {
                let extended = core::mem::take(&mut self.extended);
                if core::mem::take(&mut self.pause) {
                    return false;
                }
                let key = match (extended, byte & 0x7f) {
                    (false, 0x1d) => Key::Modifier(LCTRL),
                    (true, 0x1d) => Key::Modifier(RCTRL),
                    (false, 0x38) => Key::Modifier(LALT),
                    (true, 0x38) => Key::Modifier(RALT),
                    (_, 0x53) => Key::Delete,
                    _ => Key::Other,
                };
                return self.mods.event(key, byte & 0x80 != 0);
            }
        }
        false
    }
}

/// Both decoders, fed the same bytes.
#[derive(Default)]
struct Keyboard {
    set2: Set2,
    set1: Set1,
}

impl Keyboard {
    /// Takes one byte from the i8042; true on Ctrl-Alt-Del.
    fn feed(&mut self, byte: u8) -> bool {
        // Both run on every byte, so neither loses track of its prefixes.
        let set2 = self.set2.feed(byte);
        let set1 = self.set1.feed(byte);
        set2 || set1
    }
}
