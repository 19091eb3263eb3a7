//! i8042 PS/2 controller with a keyboard: enough for a guest to reset the
//! machine (command 0xFE, or pulsing the output port's reset line) and for
//! the VMM to ask for a graceful shutdown by typing Ctrl-Alt-Del.
//!
//! vm-superio's i8042 only knows the reset command; a graceful stop needs a
//! keyboard that can deliver scan codes and raise IRQ 1, so the model lives
//! here.

use std::collections::VecDeque;

use vm_superio::Trigger;

use super::EventFdTrigger;
use crate::bus::{read_byte_register, BusDevice};

/// Data port; the command/status port is 4 above it.
pub const I8042_PORT_DATA: u64 = 0x60;
/// Length of the port range (0x60..=0x64).
pub const I8042_PORT_LEN: u64 = 5;

const OFF_DATA: u64 = 0;
const OFF_CMD: u64 = 4;

// Status register bits.
const SB_OUT_FULL: u8 = 0x01;
const SB_SYS: u8 = 0x04;
const SB_LAST_WAS_CMD: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;

// Controller configuration byte bits.
const CB_KBD_INT: u8 = 0x01;
const CB_SYS: u8 = 0x04;
const CB_KBD_DISABLE: u8 = 0x10;
const CB_XLATE: u8 = 0x40;

const OUT_BUF_CAP: usize = 16;

/// Errors of injecting keys.
#[derive(Debug, thiserror::Error)]
pub enum I8042Error {
    /// The guest has not drained earlier scan codes.
    #[error("i8042 output buffer full: the guest is not reading its keyboard")]
    BufferFull,
    /// The keyboard interrupt could not be raised.
    #[error("cannot raise the keyboard interrupt: {0}")]
    Irq(std::io::Error),
}

/// Ctrl-Alt-Del (press, then release) in scan code set 2.
const CAD_SET2: [u8; 11] = [
    0x14, 0x11, 0xe0, 0x71, // press LCtrl, LAlt, Delete
    0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14, // release in reverse order
];
/// The same in set 1, for a guest that turned on controller translation.
const CAD_SET1: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];

/// Which data byte the controller expects after a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    None,
    WriteConfig,
    WriteOutputPort,
    WriteKbdOutBuf,
    KbdArgument,
    AuxByte,
}

/// The controller and its keyboard.
pub struct I8042 {
    irq: EventFdTrigger,
    reset: EventFdTrigger,
    status: u8,
    config: u8,
    pending: Pending,
    out: VecDeque<u8>,
}

impl I8042 {
    /// A controller raising `irq` (IRQ 1) and signalling `reset` when the
    /// guest resets the machine.
    pub fn new(irq: EventFdTrigger, reset: EventFdTrigger) -> Self {
        I8042 {
            irq,
            reset,
            status: SB_SYS | SB_KBD_ENABLED,
            config: CB_KBD_INT | CB_SYS,
            pending: Pending::None,
            out: VecDeque::with_capacity(OUT_BUF_CAP),
        }
    }

    /// Types Ctrl-Alt-Del: press and release, in the scan code set the guest
    /// reads. Fails without side effects when the guest's buffer is full.
    pub fn trigger_ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        let codes: &[u8] = if self.config & CB_XLATE != 0 {
            &CAD_SET1
        } else {
            &CAD_SET2
        };
        if self.out.len() + codes.len() > OUT_BUF_CAP {
            return Err(I8042Error::BufferFull);
        }
        for &c in codes {
            self.push(c);
        }
        self.kbd_interrupt().map_err(I8042Error::Irq)
    }

    fn push(&mut self, byte: u8) {
        if self.out.len() < OUT_BUF_CAP {
            self.out.push_back(byte);
        }
        self.status |= SB_OUT_FULL;
    }

    fn respond(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.push(b);
        }
        // Interrupt delivery failures are logged, not fatal: the guest can
        // still poll the status register.
        if let Err(e) = self.kbd_interrupt() {
            log::warn!("i8042: {e}");
        }
    }

    fn kbd_interrupt(&self) -> std::io::Result<()> {
        if self.config & CB_KBD_INT != 0
            && self.config & CB_KBD_DISABLE == 0
            && !self.out.is_empty()
        {
            self.irq.trigger()?;
        }
        Ok(())
    }

    fn request_reset(&self) {
        if let Err(e) = self.reset.trigger() {
            log::error!("i8042: reset request lost: {e}");
        }
    }

    fn command(&mut self, cmd: u8) {
        self.status |= SB_LAST_WAS_CMD;
        match cmd {
            0x20 => {
                let c = self.config;
                self.respond(&[c]);
            }
            0x60 => self.pending = Pending::WriteConfig,
            0xa7 | 0xa8 => {} // no auxiliary (mouse) port: enable/disable ignored
            0xa9 => self.respond(&[0xff]), // aux interface test: no port
            0xaa => self.respond(&[0x55]), // self test passed
            0xab => self.respond(&[0x00]), // keyboard interface test passed
            0xad => self.config |= CB_KBD_DISABLE,
            0xae => self.config &= !CB_KBD_DISABLE,
            0xc0 => self.respond(&[0x00]),
            0xd0 => self.respond(&[0x01]), // output port: reset line high
            0xd1 => self.pending = Pending::WriteOutputPort,
            0xd2 => self.pending = Pending::WriteKbdOutBuf,
            0xd3 | 0xd4 => self.pending = Pending::AuxByte,
            0xfe => self.request_reset(),
            // Pulse output lines: bit 0 clear pulses the reset line.
            0xf0..=0xff if cmd & 1 == 0 => self.request_reset(),
            _ => {}
        }
    }

    fn data(&mut self, byte: u8) {
        self.status &= !SB_LAST_WAS_CMD;
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::WriteConfig => {
                self.config = byte;
                if byte & CB_SYS != 0 {
                    self.status |= SB_SYS;
                }
            }
            Pending::WriteOutputPort => {
                if byte & 1 == 0 {
                    self.request_reset();
                }
            }
            Pending::WriteKbdOutBuf => self.respond(&[byte]),
            Pending::AuxByte => {}
            Pending::KbdArgument => self.respond(&[0xfa]),
            Pending::None => self.keyboard_command(byte),
        }
    }

    fn keyboard_command(&mut self, cmd: u8) {
        match cmd {
            0xff => {
                self.out.clear();
                self.respond(&[0xfa, 0xaa]); // ack, self test passed
            }
            0xf2 => self.respond(&[0xfa, 0xab, 0x83]), // MF2 keyboard
            // Commands taking an argument byte: LEDs, scan code set, typematic.
            0xed | 0xf0 | 0xf3 => {
                self.pending = Pending::KbdArgument;
                self.respond(&[0xfa]);
            }
            _ => self.respond(&[0xfa]),
        }
    }

    fn read_data(&mut self) -> u8 {
        let byte = self.out.pop_front().unwrap_or(0);
        if self.out.is_empty() {
            self.status &= !SB_OUT_FULL;
        } else if let Err(e) = self.kbd_interrupt() {
            log::warn!("i8042: {e}");
        }
        byte
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            OFF_DATA => self.read_data(),
            OFF_CMD => self.status,
            _ => 0,
        };
        read_byte_register(data, value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else { return };
        match offset {
            OFF_DATA => self.data(byte),
            OFF_CMD => self.command(byte),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    struct Rig {
        dev: I8042,
        irq: EventFd,
        reset: EventFd,
    }

    fn rig() -> Rig {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = I8042::new(
            EventFdTrigger::try_clone_from(&irq).unwrap(),
            EventFdTrigger::try_clone_from(&reset).unwrap(),
        );
        Rig { dev, irq, reset }
    }

    fn drain(dev: &mut I8042) -> Vec<u8> {
        let mut v = Vec::new();
        let mut b = [0u8];
        loop {
            dev.read(OFF_CMD, &mut b);
            if b[0] & SB_OUT_FULL == 0 {
                return v;
            }
            dev.read(OFF_DATA, &mut b);
            v.push(b[0]);
        }
    }

    #[test]
    fn reset_command_and_output_port_pulse_reset() {
        let mut r = rig();
        r.dev.write(OFF_CMD, &[0xfe]);
        assert_eq!(r.reset.read().unwrap(), 1);
        r.dev.write(OFF_CMD, &[0xd1]);
        r.dev.write(OFF_DATA, &[0x00]);
        assert_eq!(r.reset.read().unwrap(), 1);
        r.dev.write(OFF_CMD, &[0xd1]);
        r.dev.write(OFF_DATA, &[0x01]);
        assert!(r.reset.read().is_err(), "reset line kept high: no reset");
    }

    #[test]
    fn linux_style_probe_sequence() {
        let mut r = rig();
        r.dev.write(OFF_CMD, &[0xaa]);
        assert_eq!(drain(&mut r.dev), [0x55]);
        r.dev.write(OFF_CMD, &[0x20]);
        let cfg = drain(&mut r.dev)[0];
        assert_eq!(cfg & CB_KBD_INT, CB_KBD_INT);
        r.dev.write(OFF_CMD, &[0x60]);
        r.dev.write(OFF_DATA, &[cfg | CB_XLATE]);
        r.dev.write(OFF_CMD, &[0x20]);
        assert_eq!(drain(&mut r.dev), [cfg | CB_XLATE]);
        r.dev.write(OFF_DATA, &[0xf2]);
        assert_eq!(drain(&mut r.dev), [0xfa, 0xab, 0x83]);
        r.dev.write(OFF_DATA, &[0xed]);
        r.dev.write(OFF_DATA, &[0x07]);
        assert_eq!(drain(&mut r.dev), [0xfa, 0xfa]);
        assert!(r.irq.read().unwrap() >= 1);
    }

    #[test]
    fn ctrl_alt_del_in_the_guests_scan_code_set() {
        let mut r = rig();
        r.dev.trigger_ctrl_alt_del().unwrap();
        assert_eq!(r.irq.read().unwrap(), 1);
        assert_eq!(drain(&mut r.dev), CAD_SET2);
        r.dev.write(OFF_CMD, &[0x60]);
        r.dev.write(OFF_DATA, &[CB_KBD_INT | CB_SYS | CB_XLATE]);
        r.dev.trigger_ctrl_alt_del().unwrap();
        assert_eq!(drain(&mut r.dev), CAD_SET1);
    }

    #[test]
    fn a_guest_that_never_reads_gets_no_more_than_the_buffer() {
        let mut r = rig();
        r.dev.trigger_ctrl_alt_del().unwrap();
        assert!(matches!(
            r.dev.trigger_ctrl_alt_del(),
            Err(I8042Error::BufferFull)
        ));
        assert_eq!(drain(&mut r.dev), CAD_SET2, "first sequence intact");
    }

    #[test]
    fn disabled_keyboard_raises_no_interrupt() {
        let mut r = rig();
        r.dev.write(OFF_CMD, &[0xad]);
        r.dev.trigger_ctrl_alt_del().unwrap();
        assert!(r.irq.read().is_err());
    }
}
