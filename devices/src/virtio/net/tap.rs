//! Tap devices through /dev/net/tun: one non-blocking fd per queue, with a
//! 12-byte `virtio_net_hdr_v1` in front of every frame (IFF_VNET_HDR).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// `struct ifreq` as TUNSETIFF/TUNSETQUEUE read it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const TUN_IOC: u32 = b'T' as u32;
const fn iow(nr: u32) -> libc::c_ulong {
    // _IOW('T', nr, int): direction write (1), size 4.
    ((1u32 << 30) | (4 << 16) | (TUN_IOC << 8) | nr) as libc::c_ulong
}
const TUNSETIFF: libc::c_ulong = iow(202);
const TUNSETOFFLOAD: libc::c_ulong = iow(208);
const TUNSETVNETHDRSZ: libc::c_ulong = iow(216);
const TUNSETQUEUE: libc::c_ulong = iow(217);

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_ATTACH_QUEUE: libc::c_short = 0x0200;
const IFF_DETACH_QUEUE: libc::c_short = 0x0400;

/// TUNSETOFFLOAD: the tap may hand us frames with partial checksums.
pub const TUN_F_CSUM: u32 = 0x01;
/// ... TCPv4 segmentation offload frames.
pub const TUN_F_TSO4: u32 = 0x02;
/// ... TCPv6 segmentation offload frames.
pub const TUN_F_TSO6: u32 = 0x04;
/// ... TSO frames with ECN (CWR) set.
pub const TUN_F_TSO_ECN: u32 = 0x08;
/// ... UDP fragmentation offload frames.
pub const TUN_F_UFO: u32 = 0x10;

/// Size of the virtio-net header in front of every frame (virtio 1.x).
pub const VNET_HDR_LEN: usize = 12;

/// Longest interface name (IFNAMSIZ less the terminating NUL).
pub const MAX_IFNAME: usize = libc::IFNAMSIZ - 1;

/// One queue of a tap device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// Checks an interface name as the kernel would (`dev_valid_name`).
pub fn valid_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_IFNAME {
        return Err(format!("must be 1 to {MAX_IFNAME} characters"));
    }
    if name == "." || name == ".." {
        return Err("not a valid interface name".into());
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || !b.is_ascii_graphic())
    {
        return Err("no '/', ':', spaces or non-ASCII characters".into());
    }
    Ok(())
}

fn ifreq(name: &str, flags: libc::c_short) -> io::Result<IfReq> {
    valid_ifname(name).map_err(|why| io::Error::new(io::ErrorKind::InvalidInput, why))?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    Ok(req)
}

impl Tap {
    /// Opens (creating it if needed) queue fds of tap `name`: `queues` of
    /// them, IFF_MULTI_QUEUE when more than one. Each fd is non-blocking
    /// and carries a 12-byte virtio-net header.
    pub fn open(name: &str, queues: usize) -> io::Result<Vec<Tap>> {
        let mut flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if queues > 1 {
            flags |= IFF_MULTI_QUEUE;
        }
        let mut taps = Vec::with_capacity(queues);
        for _ in 0..queues.max(1) {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open("/dev/net/tun")?;
            let mut req = ifreq(name, flags)?;
            // SAFETY: TUNSETIFF reads (and writes back) one ifreq we own.
            if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
                return Err(io::Error::last_os_error());
            }
            let tap = Tap {
                file,
                name: name.to_string(),
            };
            tap.ioctl_int(TUNSETVNETHDRSZ, VNET_HDR_LEN as libc::c_int)?;
            taps.push(tap);
        }
        Ok(taps)
    }

    /// A "tap" on any frame-preserving, non-blocking fd (e.g. one end of a
    /// `SOCK_SEQPACKET` socketpair), for the fuzz targets: frames carry the
    /// 12-byte virtio-net header as on a real tap; the tun ioctls fail and
    /// the device only warns. Only with the `fuzzing` feature.
    #[cfg(feature = "fuzzing")]
    pub fn from_file(file: File, name: &str) -> Tap {
        Tap {
            file,
            name: name.to_string(),
        }
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn ioctl_int(&self, req: libc::c_ulong, value: libc::c_int) -> io::Result<()> {
        // SAFETY: these tun ioctls read one int through the pointer.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), req, &value) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// TUNSETOFFLOAD: which offloaded frames (TUN_F_*) the tap may pass us,
    /// i.e. what the guest's driver accepts. A device-wide setting.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Attaches (`true`) or detaches this queue of a multi-queue tap: the
    /// kernel steers frames only to attached queues.
    pub fn set_queue_attached(&self, attached: bool) -> io::Result<()> {
        let mut req = ifreq(
            &self.name,
            if attached {
                IFF_ATTACH_QUEUE
            } else {
                IFF_DETACH_QUEUE
            },
        )?;
        // SAFETY: TUNSETQUEUE reads one ifreq we own.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETQUEUE, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one frame (with its header) into `buf`.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec describes `buf`, borrowed mutably for the call.
        unsafe { self.readv(&iov) }
    }

    /// Reads one frame (with its header), scattered over `iov`.
    ///
    /// # Safety
    /// Every iovec must describe memory valid for writes of its length
    /// that nothing else accesses during the call.
    pub unsafe fn readv(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        syscall_len(libc::readv(
            self.file.as_raw_fd(),
            iov.as_ptr(),
            iov_count(iov),
        ))
    }

    /// Writes one frame, header included, gathered from `iov`.
    ///
    /// # Safety
    /// Every iovec must describe memory valid for reads of its length.
    pub unsafe fn writev(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        syscall_len(libc::writev(
            self.file.as_raw_fd(),
            iov.as_ptr(),
            iov_count(iov),
        ))
    }

    /// Writes one frame, header included, from a host buffer.
    pub fn write(&self, frame: &[u8]) -> io::Result<usize> {
        let iov = [libc::iovec {
            iov_base: frame.as_ptr() as *mut libc::c_void,
            iov_len: frame.len(),
        }];
        // SAFETY: the iovec describes `frame`.
        unsafe { self.writev(&iov) }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// An iovec array's length as readv/writev take it.
fn iov_count(iov: &[libc::iovec]) -> libc::c_int {
    iov.len().min(libc::c_int::MAX as usize) as libc::c_int
}

/// A byte count returned by a system call, or its errno.
fn syscall_len(n: isize) -> io::Result<usize> {
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}
