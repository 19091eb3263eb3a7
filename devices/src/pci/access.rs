//! The guest's two ways into configuration space: the legacy port pair
//! (configuration mechanism #1: an address register at 0xCF8, data at
//! 0xCFC-0xCFF) and the PCI Express ECAM window (4 KiB per function, bus in
//! bits 27:20 of the offset, device in 19:15, function in 14:12).

use std::sync::Arc;

use super::root::PciRoot;
use super::BarMove;
use crate::bus::BusDevice;

/// Bytes of I/O ports the legacy mechanism takes (0xCF8-0xCFF).
pub const CONFIG_IO_LEN: u64 = 8;
/// Bytes of ECAM window per bus.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;
/// The address register's enable bit.
const CONFIG_ENABLE: u32 = 1 << 31;

/// Told about every BAR the guest moves: (device number, the move).
pub type BarMoveHandler = Arc<dyn Fn(u8, BarMove) + Send + Sync>;

/// A function's address on the bus and a register offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Target {
    bus: u8,
    device: u8,
    function: u8,
    offset: usize,
}

fn read(root: &PciRoot, t: Target, data: &mut [u8]) {
    root.config_read(t.bus, t.device, t.function, t.offset, data);
}

fn write(root: &PciRoot, on_move: &BarMoveHandler, t: Target, data: &[u8]) {
    for m in root.config_write(t.bus, t.device, t.function, t.offset, data) {
        on_move(t.device, m);
    }
}

/// Configuration mechanism #1 at ports 0xCF8-0xCFF.
pub struct PciConfigIo {
    root: Arc<PciRoot>,
    on_move: BarMoveHandler,
    address: u32,
}

impl PciConfigIo {
    /// Serves `root`'s configuration space through the ports.
    pub fn new(root: Arc<PciRoot>, on_move: BarMoveHandler) -> Self {
        Self {
            root,
            on_move,
            address: 0,
        }
    }

    /// The target of a data-port access at `port_offset` (0-3 into 0xCFC),
    /// if the address register enables one.
    fn target(&self, port_offset: u64) -> Option<Target> {
        let a = self.address;
        (a & CONFIG_ENABLE != 0).then(|| Target {
            bus: (a >> 16) as u8,
            device: ((a >> 11) & 0x1f) as u8,
            function: ((a >> 8) & 0x7) as u8,
            // Register bits 7:2 pick the dword; the port offset the byte.
            offset: (a & 0xfc) as usize + port_offset as usize,
        })
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => match self.target(offset - 4) {
                Some(t) => read(&self.root, t, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            // Only a dword write latches the address (byte writes to
            // 0xCF8-0xCFB are other registers on a real chipset).
            0 => {
                if let Ok(b) = <[u8; 4]>::try_from(data) {
                    self.address = u32::from_le_bytes(b);
                }
            }
            4..=7 => {
                if let Some(t) = self.target(offset - 4) {
                    write(&self.root, &self.on_move, t, data);
                }
            }
            _ => {}
        }
    }
}

/// The ECAM window (memory-mapped configuration), bus 0 only.
pub struct PciConfigMmio {
    root: Arc<PciRoot>,
    on_move: BarMoveHandler,
}

impl PciConfigMmio {
    /// Serves `root`'s configuration space through the ECAM window.
    pub fn new(root: Arc<PciRoot>, on_move: BarMoveHandler) -> Self {
        Self { root, on_move }
    }

    fn target(offset: u64) -> Target {
        Target {
            bus: (offset >> 20) as u8,
            device: ((offset >> 15) & 0x1f) as u8,
            function: ((offset >> 12) & 0x7) as u8,
            offset: (offset & 0xfff) as usize,
        }
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        read(&self.root, Self::target(offset), data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        write(&self.root, &self.on_move, Self::target(offset), data);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::pci::config::{Bar, BarKind, PciConfiguration, PciIds};
    use crate::pci::PciDevice;

    struct Dev(PciConfiguration);
    impl PciDevice for Dev {
        fn config_read(&mut self, offset: usize, data: &mut [u8]) {
            self.0.read(offset, data);
        }
        fn config_write(&mut self, offset: usize, data: &[u8]) -> Vec<BarMove> {
            self.0.write(offset, data)
        }
    }

    type Moves = Arc<Mutex<Vec<(u8, BarMove)>>>;

    fn setup() -> (Arc<PciRoot>, BarMoveHandler, Moves) {
        let mut root = PciRoot::new();
        let ids = PciIds {
            vendor: 0x1af4,
            device: 0x1041,
            revision: 1,
            class: 0x02_00_00,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        };
        let mut c = PciConfiguration::new(ids, 1);
        let bar = Bar {
            index: 0,
            size: 0x4000,
            kind: BarKind::Mem64,
        };
        c.add_bar(bar, 0x1_0000_0000).unwrap();
        c.set_command(crate::pci::config::COMMAND_MEMORY);
        assert_eq!(root.add_device(Arc::new(Mutex::new(Dev(c)))), Ok(1));
        let moves: Moves = Arc::default();
        let m = moves.clone();
        let handler: BarMoveHandler = Arc::new(move |d, mv| m.lock().unwrap().push((d, mv)));
        (Arc::new(root), handler, moves)
    }

    fn cam_addr(dev: u32, reg: u32) -> [u8; 4] {
        (CONFIG_ENABLE | (dev << 11) | reg).to_le_bytes()
    }

    #[test]
    fn legacy_ports_reach_every_function() {
        let (root, h, moves) = setup();
        let mut io = PciConfigIo::new(root, h);
        let mut b = [0u8; 4];
        // Disabled: all ones.
        io.read(4, &mut b);
        assert_eq!(b, [0xff; 4]);
        io.write(0, &cam_addr(0, 0));
        io.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), u32::from_le_bytes(cam_addr(0, 0)));
        io.read(4, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x0d57_8086, "host bridge");
        io.write(0, &cam_addr(1, 0));
        io.read(4, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x1041_1af4);
        // A 16-bit read of the device ID at 0xCFE.
        let mut w = [0u8; 2];
        io.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1041);
        // Interrupt pin (byte 0x3d) through 0xCFD.
        io.write(0, &cam_addr(1, 0x3c));
        let mut p = [0u8];
        io.read(5, &mut p);
        assert_eq!(p[0], 1);
        // A byte write to 0xCF8 does not change the address.
        io.write(0, &[0]);
        io.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), u32::from_le_bytes(cam_addr(1, 0x3c)));
        // Empty slot.
        io.write(0, &cam_addr(7, 0));
        io.read(4, &mut b);
        assert_eq!(b, [0xff; 4]);
        // Moving the BAR through the ports is reported.
        io.write(0, &cam_addr(1, 0x14));
        io.write(4, &2u32.to_le_bytes());
        let got = moves.lock().unwrap().clone();
        let mv = BarMove {
            index: 0,
            old: Some(0x1_0000_0000),
            new: Some(0x2_0000_0000),
        };
        assert_eq!(got, [(1, mv)]);
    }

    #[test]
    fn ecam_reaches_every_function() {
        let (root, h, moves) = setup();
        let mut ecam = PciConfigMmio::new(root, h);
        let mut b = [0u8; 4];
        ecam.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x0d57_8086);
        let dev1 = 1 << 15;
        ecam.read(dev1, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x1041_1af4);
        ecam.read(dev1 + (1 << 12), &mut b);
        assert_eq!(b, [0xff; 4], "function 1");
        ecam.read(ECAM_BUS_SIZE + dev1, &mut b);
        assert_eq!(b, [0xff; 4], "bus 1");
        // BAR sizing through ECAM: all ones, then the size.
        ecam.write(dev1 + 0x10, &[0xff; 4]);
        ecam.write(dev1 + 0x14, &[0xff; 4]);
        ecam.read(dev1 + 0x10, &mut b);
        assert_eq!(u32::from_le_bytes(b) & !0xf, 0xffff_c000);
        assert!(moves.lock().unwrap().is_empty(), "sizing is no move");
        ecam.write(dev1 + 0x10, &0x8000u32.to_le_bytes());
        ecam.write(dev1 + 0x14, &1u32.to_le_bytes());
        let got = moves.lock().unwrap().clone();
        assert_eq!(got.last().map(|m| m.1.new), Some(Some(0x1_0000_8000)));
        // Extended configuration space reads 0.
        ecam.read(dev1 + 0x100, &mut b);
        assert_eq!(b, [0; 4]);
    }
}
