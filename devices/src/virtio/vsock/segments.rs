//! A descriptor chain's buffers of one direction as guest address ranges,
//! gathered into a vector the device keeps and reuses: reading a packet's
//! header, sending its payload to a socket and receiving a socket's bytes
//! into the guest's buffers then need no allocation and no copy through a
//! buffer of the device's own (virtio-queue's `Reader` and `Writer` build
//! a new queue of slices for every chain).

use std::io::ErrorKind;
use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, ReadVolatile,
    VolatileMemoryError, VolatileSlice,
};

/// The device-readable or device-writable buffers of one chain, in chain
/// order, all inside guest memory.
#[derive(Debug, Default)]
pub struct Segments {
    segs: Vec<(GuestAddress, usize)>,
    total: usize,
}

impl Segments {
    /// Room for `max` buffers, so that gathering a chain of at most `max`
    /// descriptors never allocates.
    pub fn with_capacity(max: usize) -> Self {
        Segments {
            segs: Vec::with_capacity(max),
            total: 0,
        }
    }

    /// Replaces the contents with `chain`'s device-writable buffers
    /// (`writable`) or device-readable ones, at most `max` descriptors
    /// looked at. False (and empty) when a buffer lies outside guest memory
    /// or the lengths overflow: the chain is malformed.
    pub fn gather<M>(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<M>,
        writable: bool,
        max: usize,
    ) -> bool
    where
        M: Deref,
        M::Target: vm_memory::GuestMemory,
    {
        self.segs.clear();
        self.total = 0;
        for d in chain.take(max) {
            if d.is_write_only() != writable {
                continue;
            }
            let (addr, len) = (d.addr(), d.len() as usize);
            let Some(total) = self.total.checked_add(len) else {
                self.segs.clear();
                self.total = 0;
                return false;
            };
            if len > 0 && !mem.check_range(addr, len) {
                self.segs.clear();
                self.total = 0;
                return false;
            }
            self.total = total;
            self.segs.push((addr, len));
        }
        true
    }

    /// Bytes in all the buffers.
    pub fn bytes(&self) -> usize {
        self.total
    }

    /// The guest address ranges covering bytes `[offset, offset + len)` of
    /// the buffers, in order (clipped to what there is).
    fn ranges(
        &self,
        offset: usize,
        len: usize,
    ) -> impl Iterator<Item = (GuestAddress, usize)> + '_ {
        let mut skip = offset;
        let mut left = len;
        self.segs.iter().filter_map(move |&(addr, seg_len)| {
            if left == 0 {
                return None;
            }
            if skip >= seg_len {
                skip -= seg_len;
                return None;
            }
            let n = (seg_len - skip).min(left);
            let start = addr.unchecked_add(skip as u64);
            skip = 0;
            left -= n;
            Some((start, n))
        })
    }

    /// Copies bytes `[offset, offset + buf.len())` of the buffers into
    /// `buf`. False when the buffers are too short or memory fails.
    pub fn read_at(&self, mem: &GuestMemoryMmap, offset: usize, buf: &mut [u8]) -> bool {
        if offset
            .checked_add(buf.len())
            .is_none_or(|end| end > self.total)
        {
            return false;
        }
        let mut done = 0;
        for (addr, n) in self.ranges(offset, buf.len()) {
            if mem.read_slice(&mut buf[done..done + n], addr).is_err() {
                return false;
            }
            done += n;
        }
        done == buf.len()
    }

    /// Copies `data` into bytes `[offset, offset + data.len())` of the
    /// buffers. False when the buffers are too short or memory fails.
    pub fn write_at(&self, mem: &GuestMemoryMmap, offset: usize, data: &[u8]) -> bool {
        if offset
            .checked_add(data.len())
            .is_none_or(|end| end > self.total)
        {
            return false;
        }
        let mut done = 0;
        for (addr, n) in self.ranges(offset, data.len()) {
            if mem.write_slice(&data[done..done + n], addr).is_err() {
                return false;
            }
            done += n;
        }
        done == data.len()
    }

    /// Calls `f` with each guest memory slice covering bytes `[offset,
    /// offset + len)`, in order, while it returns `Ok(true)`.
    pub fn each_slice(
        &self,
        mem: &GuestMemoryMmap,
        offset: usize,
        len: usize,
        mut f: impl FnMut(&mut VolatileSlice<'_>) -> std::io::Result<bool>,
    ) -> std::io::Result<()> {
        for (addr, n) in self.ranges(offset, len) {
            for slice in mem.get_slices(addr, n) {
                let mut slice =
                    slice.map_err(|e| std::io::Error::new(ErrorKind::InvalidInput, e))?;
                if !f(&mut slice)? {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Reads from `src` straight into bytes `[offset, offset + len)` of the
    /// buffers, one read per guest slice, until `len` bytes came, `src`
    /// gave less than a slice asked (for now), or it would block after
    /// some bytes came. Returns the bytes read: 0 is `src`'s end of stream
    /// (`len` is not 0); `WouldBlock` before any byte is returned as such.
    pub fn read_from<R: ReadVolatile>(
        &self,
        mem: &GuestMemoryMmap,
        offset: usize,
        len: usize,
        src: &mut R,
    ) -> std::io::Result<usize> {
        let mut got = 0usize;
        let mut first_err = None;
        self.each_slice(mem, offset, len, |slice| {
            let want = slice.len();
            match src.read_volatile(slice) {
                Ok(n) => {
                    got += n;
                    Ok(n == want)
                }
                Err(VolatileMemoryError::IOError(e)) => {
                    if got == 0 {
                        first_err = Some(e);
                    }
                    Ok(false)
                }
                Err(e) => Err(std::io::Error::other(e)),
            }
        })?;
        match first_err {
            Some(e) => Err(e),
            None => Ok(got),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn segs(ranges: &[(u64, usize)]) -> Segments {
        let mut s = Segments::with_capacity(4);
        for &(a, n) in ranges {
            s.segs.push((GuestAddress(a), n));
            s.total += n;
        }
        s
    }

    #[test]
    fn reads_and_writes_across_buffers() {
        let m = mem();
        let s = segs(&[(0x1000, 3), (0x2000, 5), (0x3000, 8)]);
        assert_eq!(s.bytes(), 16);
        let data: Vec<u8> = (0u8..10).collect();
        assert!(s.write_at(&m, 2, &data));
        let mut back = [0u8; 10];
        assert!(s.read_at(&m, 2, &mut back));
        assert_eq!(&back[..], &data[..]);
        // Byte 2 is the last of the first buffer, bytes 3..8 the second.
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x1002)).unwrap(), 0);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), 1);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 6);
        // Past the end: refused, nothing written.
        assert!(!s.write_at(&m, 10, &[1u8; 7]));
        assert!(!s.read_at(&m, usize::MAX, &mut back));
    }

    #[test]
    fn reads_a_socket_into_guest_buffers() {
        let m = mem();
        let s = segs(&[(0x1000, 4), (0x2000, 100)]);
        let (mut a, mut b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        // Nothing there yet: would block, nothing read.
        let e = s.read_from(&m, 2, 50, &mut b).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WouldBlock);
        a.write_all(b"hello world").unwrap();
        // Offset 2: the first buffer takes 2 bytes, the second the rest.
        assert_eq!(s.read_from(&m, 2, 50, &mut b).unwrap(), 11);
        let mut back = [0u8; 11];
        assert!(s.read_at(&m, 2, &mut back));
        assert_eq!(&back, b"hello world");
        drop(a);
        assert_eq!(s.read_from(&m, 2, 50, &mut b).unwrap(), 0, "end of stream");
    }
}
