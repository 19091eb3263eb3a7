//! MSI-X (PCI 3.0, 6.8.2): the capability, the vector table and the
//! pending-bit array a function exposes in one of its BARs.
//!
//! The table holds, per vector, the message address and data the guest
//! programs and a mask bit. A vector raised while masked (itself, or the
//! whole function) is recorded in the PBA and delivered when unmasked. The
//! VMM turns each programmed vector into a KVM MSI route; a write that
//! changes a vector's message is reported so that it can update the route.

/// Capability ID of MSI-X.
pub const MSIX_CAP_ID: u8 = 0x11;
/// Bytes of one table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Message control: MSI-X enable.
const CTRL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
const CTRL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: masked.
const VECTOR_MASKED: u32 = 1;

/// One vector's message as the guest programmed it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (the target APIC).
    pub address: u64,
    /// Message data (the vector and delivery mode).
    pub data: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    ctrl: u32,
}

impl Default for Entry {
    fn default() -> Self {
        // Every vector starts masked (PCI 3.0, 6.8.2.9).
        Entry {
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            ctrl: VECTOR_MASKED,
        }
    }
}

/// What a table write changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsixUpdate {
    /// The vector's message changed: update its route.
    Message(u16),
    /// The vector was unmasked with an interrupt pending: deliver it now.
    DeliverPending(u16),
}

/// An MSI-X table, its pending bits and the capability's control bits.
#[derive(Clone, Debug)]
pub struct MsixTable {
    entries: Vec<Entry>,
    pba: Vec<u64>,
    control: u16,
}

impl MsixTable {
    /// A table of `vectors` vectors (1-2048), all masked, MSI-X disabled.
    pub fn new(vectors: u16) -> Self {
        let n = usize::from(vectors.clamp(1, 2048));
        MsixTable {
            entries: vec![Entry::default(); n],
            pba: vec![0; n.div_ceil(64)],
            control: 0,
        }
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table has no vector (never: at least one).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of the table in the BAR.
    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * MSIX_ENTRY_SIZE
    }

    /// Bytes of the PBA in the BAR.
    pub fn pba_size(&self) -> u64 {
        self.pba.len() as u64 * 8
    }

    /// The capability's body (ID, next pointer, message control, table and
    /// PBA offsets with their BAR) and its write mask (only the enable and
    /// function-mask bits are writable).
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> ([u8; 12], [u8; 12]) {
        let mut body = [0u8; 12];
        body[0] = MSIX_CAP_ID;
        // Table size minus one, at most 2047: fits 11 bits.
        let size = (self.entries.len() - 1) as u16;
        body[2..4].copy_from_slice(&size.to_le_bytes());
        body[4..8].copy_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        body[8..12].copy_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        let mut mask = [0u8; 12];
        mask[2..4].copy_from_slice(&(CTRL_ENABLE | CTRL_FUNCTION_MASK).to_le_bytes());
        (body, mask)
    }

    /// Takes the message-control word the guest wrote to the capability;
    /// returns the vectors that were pending and can now be delivered.
    pub fn set_control(&mut self, control: u16) -> Vec<u16> {
        self.control = control & (CTRL_ENABLE | CTRL_FUNCTION_MASK);
        let ready: Vec<usize> = (0..self.entries.len())
            .filter(|&v| self.pending(v) && self.deliverable(v))
            .collect();
        for &v in &ready {
            self.set_pending(v, false);
        }
        // At most 2048 vectors: each index fits a u16.
        ready.into_iter().map(|v| v as u16).collect()
    }

    /// Whether MSI-X is enabled (the function then uses no INTx).
    pub fn enabled(&self) -> bool {
        self.control & CTRL_ENABLE != 0
    }

    /// Whether `vector` may deliver now: MSI-X enabled, neither the
    /// function nor the vector masked.
    pub fn may_deliver(&self, vector: u16) -> bool {
        self.deliverable(usize::from(vector))
    }

    fn deliverable(&self, v: usize) -> bool {
        self.enabled()
            && self.control & CTRL_FUNCTION_MASK == 0
            && self
                .entries
                .get(v)
                .is_some_and(|e| e.ctrl & VECTOR_MASKED == 0)
    }

    fn pending(&self, v: usize) -> bool {
        self.pba
            .get(v / 64)
            .is_some_and(|w| w & (1 << (v % 64)) != 0)
    }

    fn set_pending(&mut self, v: usize, on: bool) {
        if let Some(w) = self.pba.get_mut(v / 64) {
            if on {
                *w |= 1 << (v % 64);
            } else {
                *w &= !(1 << (v % 64));
            }
        }
    }

    /// The device raises `vector`: true if it is to be delivered now; else
    /// (masked) it is left pending. A vector beyond the table is dropped.
    pub fn raise(&mut self, vector: u16) -> bool {
        let v = usize::from(vector);
        if v >= self.entries.len() {
            return false;
        }
        if self.deliverable(v) {
            return true;
        }
        self.set_pending(v, true);
        false
    }

    /// The message of `vector`.
    pub fn message(&self, vector: u16) -> Option<MsiMessage> {
        let e = self.entries.get(usize::from(vector))?;
        Some(MsiMessage {
            address: u64::from(e.addr_lo) | (u64::from(e.addr_hi) << 32),
            data: e.data,
        })
    }

    /// A guest read of the table (`offset` into it); only dword accesses
    /// inside the table return data, others read 0.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let value = self.table_dword(offset).unwrap_or(0);
        fill(data, offset % 4, u64::from(value));
    }

    fn table_dword(&self, offset: u64) -> Option<u32> {
        let e = self
            .entries
            .get(usize::try_from(offset / MSIX_ENTRY_SIZE).ok()?)?;
        Some(match offset % MSIX_ENTRY_SIZE / 4 {
            0 => e.addr_lo,
            1 => e.addr_hi,
            2 => e.data,
            _ => e.ctrl,
        })
    }

    /// A guest write of the table (dword or qword accesses).
    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> Vec<MsixUpdate> {
        let mut updates = Vec::new();
        for (i, chunk) in data.chunks(4).enumerate() {
            let Ok(word) = <[u8; 4]>::try_from(chunk) else {
                continue;
            };
            let off = offset + 4 * i as u64;
            let Ok(v) = usize::try_from(off / MSIX_ENTRY_SIZE) else {
                continue;
            };
            let Some(e) = self.entries.get_mut(v) else {
                continue;
            };
            let value = u32::from_le_bytes(word);
            let before = *e;
            match off % MSIX_ENTRY_SIZE / 4 {
                0 => e.addr_lo = value,
                1 => e.addr_hi = value,
                2 => e.data = value,
                _ => e.ctrl = value & VECTOR_MASKED,
            }
            let vector = v as u16;
            if (before.addr_lo, before.addr_hi, before.data) != (e.addr_lo, e.addr_hi, e.data) {
                updates.push(MsixUpdate::Message(vector));
            }
            if before.ctrl & VECTOR_MASKED != 0 && self.pending(v) && self.deliverable(v) {
                self.set_pending(v, false);
                updates.push(MsixUpdate::DeliverPending(vector));
            }
        }
        updates
    }

    /// A guest read of the PBA (read-only).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let word = usize::try_from(offset / 8)
            .ok()
            .and_then(|w| self.pba.get(w))
            .copied()
            .unwrap_or(0);
        fill(data, offset % 8, word);
    }
}

/// Copies the bytes of `value` from byte `start` on into `data` (zeros
/// past its end).
fn fill(data: &mut [u8], start: u64, value: u64) {
    let bytes = value.to_le_bytes();
    let start = start as usize;
    for (i, b) in data.iter_mut().enumerate() {
        *b = bytes.get(start + i).copied().unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w32(t: &mut MsixTable, off: u64, v: u32) -> Vec<MsixUpdate> {
        t.write_table(off, &v.to_le_bytes())
    }

    fn r32(t: &MsixTable, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read_table(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn capability_describes_the_table() {
        let t = MsixTable::new(3);
        let (body, mask) = t.capability(0, 0x4000, 0x5000);
        assert_eq!(body[0], MSIX_CAP_ID);
        assert_eq!(u16::from_le_bytes([body[2], body[3]]), 2, "size - 1");
        assert_eq!(u32::from_le_bytes(body[4..8].try_into().unwrap()), 0x4000);
        assert_eq!(u32::from_le_bytes(body[8..12].try_into().unwrap()), 0x5000);
        assert_eq!(u16::from_le_bytes([mask[2], mask[3]]), 0xc000);
        assert_eq!((t.table_size(), t.pba_size()), (48, 8));
    }

    #[test]
    fn programmed_vectors_deliver_and_masked_ones_wait() {
        let mut t = MsixTable::new(2);
        assert_eq!(r32(&t, 12), VECTOR_MASKED, "masked at reset");
        assert_eq!(w32(&mut t, 16, 0xfee0_0000), [MsixUpdate::Message(1)]);
        assert_eq!(w32(&mut t, 24, 0x41), [MsixUpdate::Message(1)]);
        assert_eq!(r32(&t, 16), 0xfee0_0000);
        assert_eq!(r32(&t, 24), 0x41);
        assert_eq!(
            t.message(1),
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x41
            })
        );
        // Disabled, then masked: pending, shown in the PBA.
        assert!(!t.raise(1));
        assert!(t.set_control(CTRL_ENABLE | CTRL_FUNCTION_MASK).is_empty());
        let mut pba = [0u8; 8];
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        // Unmask the vector: still function-masked.
        assert!(w32(&mut t, 28, 0).is_empty());
        // Unmask the function: the pending vector goes out.
        assert_eq!(t.set_control(CTRL_ENABLE), [1]);
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        assert!(t.raise(1));
        assert!(!t.raise(0), "vector 0 is still masked");
        assert_eq!(w32(&mut t, 12, 0), [MsixUpdate::DeliverPending(0)]);
        assert!(!t.raise(7), "no such vector");
        // Reads past the table: zeros.
        assert_eq!(r32(&t, 64), 0);
    }
}
