//! A type-0 PCI configuration header: the 256 bytes a function answers
//! with, which of their bits the guest may change, and BAR sizing.
//!
//! Every byte has a write mask; a write keeps the bits the mask does not
//! allow. BAR sizing needs nothing more: a BAR's mask is the complement of
//! its size minus one (and its low flag bits), so the guest's all-ones
//! write reads back as the size, as the PCI spec (3.0, 6.2.5.1) describes.

use super::ConfigError;

/// Bytes of a function's (conventional) configuration space.
pub const CONFIG_SPACE_SIZE: usize = 256;
/// Offset of the first BAR.
pub const BAR0: usize = 0x10;
/// Number of BARs in a type-0 header.
pub const NUM_BARS: usize = 6;
/// Offset of the command register.
pub const COMMAND: usize = 0x04;
/// Offset of the status register.
pub const STATUS: usize = 0x06;
/// Offset of the capabilities pointer.
pub const CAPABILITIES_POINTER: usize = 0x34;
/// Offset of the interrupt line register.
pub const INTERRUPT_LINE: usize = 0x3c;
/// Offset of the interrupt pin register.
pub const INTERRUPT_PIN: usize = 0x3d;
/// Status bit: the function has a capabilities list.
pub const STATUS_CAPABILITIES: u16 = 1 << 4;
/// Command bit: the function decodes its memory BARs.
pub const COMMAND_MEMORY: u16 = 0x2;
/// Command bit: the function may master the bus (DMA, MSI).
pub const COMMAND_BUS_MASTER: u16 = 0x4;
/// Command bit: the function must not assert INTx (PCI 3.0, 6.2.2).
pub const COMMAND_INTX_DISABLE: u16 = 0x400;
/// Status bit: an INTx interrupt is pending in the function (asserted on
/// its pin unless [`COMMAND_INTX_DISABLE`] is set).
pub const STATUS_INTERRUPT: u16 = 1 << 3;
/// Command bits a guest may set: I/O space, memory space, bus master,
/// INTx disable.
const COMMAND_WRITABLE: u16 = 0x1 | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
/// BAR flag: 64-bit memory BAR (type field 0b10).
const BAR_MEM64: u32 = 0b100;
/// BAR flag: prefetchable.
const BAR_PREFETCHABLE: u32 = 0b1000;
/// First byte after the header, where capabilities may go.
const FIRST_CAPABILITY: usize = 0x40;

/// Which address space a memory BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// A 32-bit memory BAR (one register), below 4 GiB.
    Mem32,
    /// A 64-bit memory BAR (two registers), anywhere.
    Mem64,
}

/// What identifies a function: the read-only fields of its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIds {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Revision ID.
    pub revision: u8,
    /// Class code, subclass and programming interface (bits 23:0).
    pub class: u32,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
}

/// One BAR the function has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// BAR index (0-5; a 64-bit BAR also uses index + 1).
    pub index: usize,
    /// Size in bytes (a power of two, at least 16).
    pub size: u64,
    /// 32- or 64-bit.
    pub kind: BarKind,
}

/// A BAR whose decoding the guest changed (it moved the BAR, or switched
/// memory decoding in the command register): the VMM must serve it at its
/// new address, or nowhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarMove {
    /// BAR index.
    pub index: usize,
    /// Where it was decoded before the write (`None`: not decoded).
    pub old: Option<u64>,
    /// Where it is decoded after it (`None`: not decoded).
    pub new: Option<u64>,
}

/// A function's configuration header and its write masks.
#[derive(Clone, Debug)]
pub struct PciConfiguration {
    bytes: [u8; CONFIG_SPACE_SIZE],
    writable: [u8; CONFIG_SPACE_SIZE],
    bars: Vec<Bar>,
    /// Where each BAR of `bars` is decoded now: its last address that was
    /// no sizing value, while memory decoding is on.
    decoded: Vec<Option<u64>>,
    /// Offset of the last capability added (0: none yet).
    last_capability: usize,
    /// Where the next capability goes.
    next_capability: usize,
}

impl PciConfiguration {
    /// A header with these IDs, no BARs, interrupt pin `pin` (0: none,
    /// 1-4: INTA#-INTD#).
    pub fn new(ids: PciIds, pin: u8) -> Self {
        let mut c = Self {
            bytes: [0; CONFIG_SPACE_SIZE],
            writable: [0; CONFIG_SPACE_SIZE],
            bars: Vec::new(),
            decoded: Vec::new(),
            last_capability: 0,
            next_capability: FIRST_CAPABILITY,
        };
        c.put(0x00, &ids.vendor.to_le_bytes());
        c.put(0x02, &ids.device.to_le_bytes());
        c.put(0x08, &[ids.revision]);
        c.put(0x09, &ids.class.to_le_bytes()[..3]);
        c.put(0x2c, &ids.subsystem_vendor.to_le_bytes());
        c.put(0x2e, &ids.subsystem.to_le_bytes());
        c.put(INTERRUPT_PIN, &[pin]);
        c.writable[COMMAND..COMMAND + 2].copy_from_slice(&COMMAND_WRITABLE.to_le_bytes());
        // Cache line size and latency timer are plain read-write bytes.
        c.writable[0x0c] = 0xff;
        c.writable[0x0d] = 0xff;
        c.writable[INTERRUPT_LINE] = 0xff;
        c
    }

    fn put(&mut self, offset: usize, data: &[u8]) {
        self.bytes[offset..offset + data.len()].copy_from_slice(data);
    }

    fn dword(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.bytes[offset..offset + 4]);
        u32::from_le_bytes(b)
    }

    /// Adds a memory BAR of `size` bytes (a power of two, at least 16) at
    /// `index`, placed at `addr` (aligned to its size). A 64-bit BAR takes
    /// `index` and `index + 1`.
    pub fn add_bar(&mut self, bar: Bar, addr: u64) -> Result<(), ConfigError> {
        let regs = match bar.kind {
            BarKind::Mem32 => 1,
            BarKind::Mem64 => 2,
        };
        if bar.index + regs > NUM_BARS || self.bars.iter().any(|b| b.overlaps(&bar)) {
            return Err(ConfigError::BarIndex(bar.index));
        }
        let too_big = bar.kind == BarKind::Mem32 && bar.size > 1 << 31;
        if !bar.size.is_power_of_two() || bar.size < 16 || too_big {
            return Err(ConfigError::BarSize(bar.size));
        }
        if addr & (bar.size - 1) != 0 || (bar.kind == BarKind::Mem32 && addr > u64::from(u32::MAX))
        {
            return Err(ConfigError::BarAddress(addr));
        }
        let mask = !(bar.size - 1);
        let off = BAR0 + 4 * bar.index;
        let flags = match bar.kind {
            BarKind::Mem32 => 0,
            BarKind::Mem64 => BAR_MEM64 | BAR_PREFETCHABLE,
        };
        self.put(off, &((addr as u32) | flags).to_le_bytes());
        self.writable[off..off + 4].copy_from_slice(&((mask as u32) & !0xf).to_le_bytes());
        if bar.kind == BarKind::Mem64 {
            self.put(off + 4, &((addr >> 32) as u32).to_le_bytes());
            self.writable[off + 4..off + 8].copy_from_slice(&((mask >> 32) as u32).to_le_bytes());
        }
        self.bars.push(bar);
        self.decoded.push(self.memory_enabled().then_some(addr));
        Ok(())
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        u16::from_le_bytes([self.bytes[COMMAND], self.bytes[COMMAND + 1]])
    }

    fn memory_enabled(&self) -> bool {
        self.command() & COMMAND_MEMORY != 0
    }

    /// Sets the command register as firmware leaves it (no move is
    /// reported: the VMM places the BARs itself).
    pub fn set_command(&mut self, command: u16) {
        self.put(COMMAND, &(command & COMMAND_WRITABLE).to_le_bytes());
        let on = self.memory_enabled();
        for (n, bar) in self.bars.iter().enumerate() {
            let addr = on.then(|| self.bar_address(bar.index)).flatten();
            self.decoded[n] = addr;
        }
    }

    /// Where the BAR at `index` is decoded now (`None`: no such BAR, or
    /// memory decoding off).
    pub fn bar_decoded(&self, index: usize) -> Option<u64> {
        let n = self.bars.iter().position(|b| b.index == index)?;
        self.decoded[n]
    }

    /// The guest-programmed address of the BAR at `index`.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bars.iter().find(|b| b.index == index)?;
        let off = BAR0 + 4 * index;
        let low = u64::from(self.dword(off) & !0xf);
        Some(match bar.kind {
            BarKind::Mem32 => low,
            BarKind::Mem64 => low | (u64::from(self.dword(off + 4)) << 32),
        })
    }

    /// The BARs this function has.
    pub fn bars(&self) -> &[Bar] {
        &self.bars
    }

    /// Appends a capability: `body` starts with its ID byte and a placeholder
    /// next-pointer byte, which this fills in. `writable` (as long as
    /// `body`, or empty for read-only) marks the bits the guest may change.
    /// Returns the capability's offset.
    pub fn add_capability(&mut self, body: &[u8], writable: &[u8]) -> Result<usize, ConfigError> {
        let off = self.next_capability;
        let len = body.len();
        let end = off + len;
        if len < 2 || end > CONFIG_SPACE_SIZE || !(writable.is_empty() || writable.len() == len) {
            return Err(ConfigError::CapabilitySpace(len));
        }
        self.put(off, body);
        self.bytes[off + 1] = 0;
        if !writable.is_empty() {
            self.writable[off..end].copy_from_slice(writable);
        }
        // Link it: from the header's pointer or the previous capability.
        let link = match self.last_capability {
            0 => CAPABILITIES_POINTER,
            prev => prev + 1,
        };
        self.bytes[link] = off as u8;
        let status = u16::from_le_bytes([self.bytes[STATUS], self.bytes[STATUS + 1]]);
        self.put(STATUS, &(status | STATUS_CAPABILITIES).to_le_bytes());
        self.last_capability = off;
        // Capabilities are dword aligned.
        self.next_capability = (end + 3) & !3;
        Ok(off)
    }

    /// The current bytes at `offset` (for the device's own use).
    pub fn bytes(&self, offset: usize, len: usize) -> Option<&[u8]> {
        self.bytes.get(offset..offset.checked_add(len)?)
    }

    /// Sets read-only bytes (status registers a device model updates).
    pub fn set_bytes(&mut self, offset: usize, data: &[u8]) -> Result<(), ConfigError> {
        let end = offset
            .checked_add(data.len())
            .filter(|&e| e <= CONFIG_SPACE_SIZE)
            .ok_or(ConfigError::CapabilitySpace(data.len()))?;
        self.bytes[offset..end].copy_from_slice(data);
        Ok(())
    }

    /// A guest read of `data.len()` bytes at `offset`; bytes past the end of
    /// the space read as 0 (no extended configuration space).
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i)
                .and_then(|o| self.bytes.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// A guest write; only writable bits change. Returns the BARs whose
    /// decoding the write changed: moved to an address that is no sizing
    /// value (the all-ones pattern the guest writes to size a BAR), or
    /// switched on or off with the command register's memory bit.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Vec<BarMove> {
        for (i, &v) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i).filter(|&o| o < CONFIG_SPACE_SIZE) else {
                break;
            };
            let m = self.writable[o];
            self.bytes[o] = (self.bytes[o] & !m) | (v & m);
        }
        let mut moves = Vec::new();
        let on = self.memory_enabled();
        for (n, bar) in self.bars.iter().enumerate() {
            let Some(addr) = self.bar_address(bar.index) else {
                continue;
            };
            let old = self.decoded[n];
            let new = match (on, bar.is_sizing(addr)) {
                (false, _) => None,
                (true, true) => old,
                (true, false) => Some(addr),
            };
            if new != old {
                self.decoded[n] = new;
                moves.push(BarMove {
                    index: bar.index,
                    old,
                    new,
                });
            }
        }
        moves
    }
}

impl Bar {
    fn overlaps(&self, other: &Bar) -> bool {
        let regs = |b: &Bar| match b.kind {
            BarKind::Mem32 => b.index..b.index + 1,
            BarKind::Mem64 => b.index..b.index + 2,
        };
        let (a, b) = (regs(self), regs(other));
        a.start < b.end && b.start < a.end
    }

    /// Whether `addr` is what the BAR reads after all-ones was written to
    /// (one of) its registers: the guest is sizing it, not moving it.
    fn is_sizing(&self, addr: u64) -> bool {
        let mask = !(self.size - 1);
        let low = mask & 0xffff_fff0;
        match self.kind {
            BarKind::Mem32 => addr == low,
            BarKind::Mem64 => addr & 0xffff_fff0 == low || addr >> 32 == mask >> 32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PciIds {
        PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: 0x01_00_00,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        }
    }

    fn read32(c: &PciConfiguration, off: usize) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn ids_are_read_only() {
        let mut c = PciConfiguration::new(ids(), 1);
        assert_eq!(read32(&c, 0), 0x1042_1af4);
        c.write(0, &[0; 4]);
        assert_eq!(read32(&c, 0), 0x1042_1af4);
        assert_eq!(read32(&c, 8) >> 8, 0x01_00_00);
        assert_eq!(read32(&c, 0x2c), 0x0040_1af4);
        // Command: only the documented bits stick.
        c.write(COMMAND, &[0xff, 0xff]);
        let mut cmd = [0u8; 2];
        c.read(COMMAND, &mut cmd);
        assert_eq!(u16::from_le_bytes(cmd), COMMAND_WRITABLE);
        // Interrupt line is read-write, the pin is not.
        c.write(INTERRUPT_LINE, &[11, 3]);
        let mut b = [0u8; 2];
        c.read(INTERRUPT_LINE, &mut b);
        assert_eq!(b, [11, 1]);
        // Beyond the space: zeros.
        let mut far = [0xaau8; 4];
        c.read(0x100, &mut far);
        assert_eq!(far, [0; 4]);
    }

    #[test]
    fn bar32_sizes_and_moves() {
        let mut c = PciConfiguration::new(ids(), 0);
        let bar = Bar {
            index: 1,
            size: 0x1000,
            kind: BarKind::Mem32,
        };
        c.add_bar(bar, 0xc000_2000).unwrap();
        assert_eq!(c.bar_decoded(1), None, "memory decoding off at reset");
        c.set_command(COMMAND_MEMORY);
        assert_eq!(c.bar_decoded(1), Some(0xc000_2000));
        assert_eq!(read32(&c, 0x14), 0xc000_2000);
        // Sizing: write all ones, read back the size mask.
        assert!(c.write(0x14, &[0xff; 4]).is_empty());
        assert_eq!(read32(&c, 0x14), 0xffff_f000);
        assert_eq!(!(read32(&c, 0x14) & !0xf) + 1, 0x1000);
        // Restore, then move.
        assert!(c.write(0x14, &0xc000_2000u32.to_le_bytes()).is_empty());
        let moved = c.write(0x14, &0xc001_0000u32.to_le_bytes());
        assert_eq!(
            moved,
            [BarMove {
                index: 1,
                old: Some(0xc000_2000),
                new: Some(0xc001_0000)
            }]
        );
        // Memory decoding off, then on: the BAR stops and starts being decoded.
        let off = c.write(COMMAND, &0u16.to_le_bytes());
        assert_eq!(
            off,
            [BarMove {
                index: 1,
                old: Some(0xc001_0000),
                new: None
            }]
        );
        assert!(c.write(0x14, &[0xff; 4]).is_empty(), "sizing while off");
        assert!(c.write(0x14, &0xc001_0000u32.to_le_bytes()).is_empty());
        let on = c.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(on[0].new, Some(0xc001_0000));
        // Low bits below the size are not writable.
        c.write(0x14, &0xc001_0abcu32.to_le_bytes());
        assert_eq!(c.bar_address(1), Some(0xc001_0000));
        // An unimplemented BAR reads 0 and stays 0 (size 0).
        c.write(0x10, &[0xff; 4]);
        assert_eq!(read32(&c, 0x10), 0);
    }

    #[test]
    fn bar64_sizes_both_halves() {
        let mut c = PciConfiguration::new(ids(), 0);
        let bar = Bar {
            index: 0,
            size: 0x4000,
            kind: BarKind::Mem64,
        };
        c.add_bar(bar, 0x40_0000_0000).unwrap();
        c.set_command(COMMAND_MEMORY);
        assert_eq!(read32(&c, 0x10), BAR_MEM64 | BAR_PREFETCHABLE);
        assert_eq!(read32(&c, 0x14), 0x40);
        c.write(0x10, &[0xff; 4]);
        assert_eq!(read32(&c, 0x10), 0xffff_c000 | BAR_MEM64 | BAR_PREFETCHABLE);
        c.write(0x14, &[0xff; 4]);
        assert_eq!(read32(&c, 0x14), 0xffff_ffff);
        let size = !(u64::from(read32(&c, 0x14)) << 32 | u64::from(read32(&c, 0x10) & !0xf)) + 1;
        assert_eq!(size, 0x4000);
        c.write(0x10, &0u32.to_le_bytes());
        let moved = c.write(0x14, &0x80u32.to_le_bytes());
        assert_eq!(moved.len(), 1);
        assert_eq!(c.bar_address(0), Some(0x80_0000_0000));
    }

    #[test]
    fn bars_are_checked() {
        let mut c = PciConfiguration::new(ids(), 0);
        let b = |index, size, kind| Bar { index, size, kind };
        let e = c.add_bar(b(5, 0x1000, BarKind::Mem64), 0);
        assert_eq!(e, Err(ConfigError::BarIndex(5)));
        let e = c.add_bar(b(0, 0x1800, BarKind::Mem32), 0);
        assert_eq!(e, Err(ConfigError::BarSize(0x1800)));
        let e = c.add_bar(b(0, 0x1000, BarKind::Mem32), 0x800);
        assert_eq!(e, Err(ConfigError::BarAddress(0x800)));
        let e = c.add_bar(b(0, 0x1000, BarKind::Mem32), 1 << 32);
        assert_eq!(e, Err(ConfigError::BarAddress(1 << 32)));
        c.add_bar(b(0, 0x1000, BarKind::Mem64), 0).unwrap();
        let e = c.add_bar(b(1, 0x1000, BarKind::Mem32), 0);
        assert_eq!(e, Err(ConfigError::BarIndex(1)));
    }

    #[test]
    fn capabilities_chain() {
        let mut c = PciConfiguration::new(ids(), 0);
        let a = c.add_capability(&[0x09, 0xff, 1, 2, 3], &[]).unwrap();
        let b = c
            .add_capability(&[0x11, 0xff, 0, 0], &[0, 0, 0xff, 0])
            .unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x48, "dword aligned");
        let mut s = [0u8; 2];
        c.read(STATUS, &mut s);
        assert_ne!(u16::from_le_bytes(s) & STATUS_CAPABILITIES, 0);
        let mut p = [0u8];
        c.read(CAPABILITIES_POINTER, &mut p);
        assert_eq!(p[0], 0x40);
        c.read(0x41, &mut p);
        assert_eq!(p[0], 0x48);
        c.read(0x49, &mut p);
        assert_eq!(p[0], 0, "end of list");
        c.write(0x4a, &[0x55]);
        c.write(0x42, &[0x55]);
        assert_eq!(c.bytes(0x4a, 1), Some(&[0x55][..]));
        assert_eq!(c.bytes(0x42, 1), Some(&[1][..]));
        assert!(c.add_capability(&[0; 300], &[]).is_err());
    }
}
