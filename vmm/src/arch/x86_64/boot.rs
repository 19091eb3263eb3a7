//! Loading the payload (kernel, initrd, command line) and writing the boot
//! information the kernel reads: PVH `hvm_start_info` or the Linux zero page.

use std::fs::File;
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{KernelLoader, KernelLoaderResult};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    self, E820Entry, CMDLINE_START, HIMEM_START, INITRD_ADDR_MAX, MMIO_HOLE_START, PVH_INFO_START,
    PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};
use super::regs::EntryMode;

/// Errors of loading the payload.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A payload file cannot be opened or read.
    #[error("cannot read {what} {path}: {source}")]
    Open {
        /// kernel or initrd.
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The kernel is neither a loadable ELF nor a bzImage.
    #[error("cannot load kernel {path}: not an x86-64 ELF ({elf}) nor a bzImage ({bzimage})")]
    Kernel {
        /// The file.
        path: String,
        /// Why the ELF loader refused it.
        elf: linux_loader::loader::Error,
        /// Why the bzImage loader refused it.
        bzimage: linux_loader::loader::Error,
    },
    /// The initrd does not fit between the kernel and the top of low memory.
    #[error("initrd of {size} bytes does not fit in guest memory below {limit:#x} above the kernel (ends at {kernel_end:#x})")]
    InitrdTooLarge {
        /// Its size.
        size: u64,
        /// Highest address usable.
        limit: u64,
        /// Where the kernel ends.
        kernel_end: u64,
    },
    /// Writing to guest memory failed.
    #[error("cannot write {0} to guest memory: {1}")]
    Memory(&'static str, String),
    /// The command line could not be written.
    #[error("kernel command line: {0}")]
    Cmdline(String),
}

/// Where the loaded kernel starts executing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelEntry {
    /// Which protocol the boot vCPU uses.
    pub mode: EntryMode,
    /// Guest address of the first instruction.
    pub entry: u64,
}

/// What [`load_payload`] placed in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct LoadedPayload {
    /// How to enter the kernel.
    pub entry: KernelEntry,
    /// Initrd location and size.
    pub initrd: Option<(u64, u64)>,
    setup_header: Option<setup_header>,
}

/// A kernel or initrd: a file, or bytes read from elsewhere (the guest's
/// boot partition).
#[derive(Clone, Copy, Debug)]
pub enum Image<'a> {
    /// A file.
    Path(&'a Path),
    /// Bytes, with a name for messages.
    Bytes {
        /// Where they came from.
        name: &'a str,
        /// The image.
        data: &'a [u8],
    },
}

impl Image<'_> {
    fn name(&self) -> String {
        match self {
            Image::Path(p) => p.display().to_string(),
            Image::Bytes { name, .. } => name.to_string(),
        }
    }
}

/// An opened [`Image`]: readable (volatile too, for guest memory) and
/// seekable.
enum Reader<'a> {
    File(File),
    Bytes(std::io::Cursor<&'a [u8]>),
}

impl std::io::Read for Reader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Reader::File(f) => f.read(buf),
            Reader::Bytes(c) => c.read(buf),
        }
    }
}

impl std::io::Seek for Reader<'_> {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        match self {
            Reader::File(f) => f.seek(to),
            Reader::Bytes(c) => c.seek(to),
        }
    }
}

impl vm_memory::ReadVolatile for Reader<'_> {
    fn read_volatile<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        buf: &mut vm_memory::VolatileSlice<B>,
    ) -> Result<usize, vm_memory::VolatileMemoryError> {
        match self {
            Reader::File(f) => f.read_volatile(buf),
            Reader::Bytes(c) => c.read_volatile(buf),
        }
    }
}

impl Reader<'_> {
    fn len(&self) -> std::io::Result<u64> {
        match self {
            Reader::File(f) => f.metadata().map(|m| m.len()),
            Reader::Bytes(c) => Ok(c.get_ref().len() as u64),
        }
    }
}

fn open<'a>(what: &'static str, image: Image<'a>) -> Result<Reader<'a>, BootError> {
    match image {
        Image::Path(path) => File::open(path)
            .map(Reader::File)
            .map_err(|source| BootError::Open {
                what,
                path: path.display().to_string(),
                source,
            }),
        Image::Bytes { data, .. } => Ok(Reader::Bytes(std::io::Cursor::new(data))),
    }
}

/// Loads the kernel: an ELF through its PVH note when present, otherwise
/// its 64-bit entry; a bzImage through the 64-bit boot protocol.
fn load_kernel(
    mem: &GuestMemoryMmap,
    path: Image<'_>,
) -> Result<(KernelLoaderResult, KernelEntry), BootError> {
    let mut file = open("kernel", path)?;
    let elf_err = match Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => {
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => KernelEntry {
                    mode: EntryMode::Pvh,
                    entry: addr.0,
                },
                _ => KernelEntry {
                    mode: EntryMode::Linux64,
                    entry: r.kernel_load.0,
                },
            };
            return Ok((r, entry));
        }
        Err(e) => e,
    };
    let mut file = open("kernel", path)?;
    match BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
        // The 64-bit entry point is 0x200 past the protected-mode code.
        Ok(r) => Ok((
            r,
            KernelEntry {
                mode: EntryMode::Linux64,
                entry: r.kernel_load.0 + 0x200,
            },
        )),
        Err(bzimage) => Err(BootError::Kernel {
            path: path.name(),
            elf: elf_err,
            bzimage,
        }),
    }
}

/// Places the initrd at the highest page-aligned address that ends below
/// the limit, above the kernel.
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: Image<'_>,
    mem_size: u64,
    kernel_end: u64,
    addr_max: u64,
) -> Result<(u64, u64), BootError> {
    let mut file = open("initrd", path)?;
    let size = file.len().map_err(|source| BootError::Open {
        what: "initrd",
        path: path.name(),
        source,
    })?;
    let limit = mem_size
        .min(MMIO_HOLE_START)
        .min(addr_max.saturating_add(1));
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end)
        .ok_or(BootError::InitrdTooLarge {
            size,
            limit,
            kernel_end,
        })?;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooLarge {
        size,
        limit,
        kernel_end,
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|e| BootError::Memory("initrd", e.to_string()))?;
    Ok((addr, size))
}

/// Loads kernel, initrd and command line into guest memory.
pub fn load_payload(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: Image<'_>,
    initrd: Option<Image<'_>>,
    cmdline: &str,
) -> Result<LoadedPayload, BootError> {
    let (result, entry) = load_kernel(mem, kernel)?;
    let addr_max = result
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|m| *m != 0)
        .unwrap_or(INITRD_ADDR_MAX);
    let initrd = initrd
        .map(|p| load_initrd(mem, p, mem_size, result.kernel_end, addr_max))
        .transpose()?;
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    if bytes.len() > layout::CMDLINE_MAX_SIZE {
        return Err(BootError::Cmdline(format!(
            "{} bytes, at most {}",
            bytes.len() - 1,
            layout::CMDLINE_MAX_SIZE - 1
        )));
    }
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    Ok(LoadedPayload {
        entry,
        initrd,
        setup_header: result.setup_header,
    })
}

/// Writes the boot information for `payload`: PVH start_info with the
/// memory map and module list, or the Linux zero page with its e820 table.
pub fn write_boot_info(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    payload: &LoadedPayload,
    cmdline_len: usize,
) -> Result<(), BootError> {
    let map = layout::e820_map(mem_size);
    match payload.entry.mode {
        EntryMode::Pvh => write_pvh_info(mem, &map, payload.initrd),
        EntryMode::Linux64 => {
            write_zero_page(mem, &map, payload.initrd, payload.setup_header, cmdline_len)
        }
    }
}

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    map: &[E820Entry],
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let entries: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    if let Some((addr, size)) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
        params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
        params.set_modules(
            &[hvm_modlist_entry {
                paddr: addr,
                size,
                ..Default::default()
            }],
            GuestAddress(PVH_MODLIST_START),
        );
    }
    params.set_sections(&entries, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|e| BootError::Memory("PVH start_info", e.to_string()))
}

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

fn write_zero_page(
    mem: &GuestMemoryMmap,
    map: &[E820Entry],
    initrd: Option<(u64, u64)>,
    header: Option<setup_header>,
    cmdline_len: usize,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    if map.len() > params.e820_table.len() {
        return Err(BootError::Memory("e820 table", "too many entries".into()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| BootError::Memory("zero page", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
    }

    #[test]
    fn pvh_info_holds_memmap_cmdline_and_initrd() {
        let size = 64 << 20;
        let m = mem(size);
        let map = layout::e820_map(size);
        write_pvh_info(&m, &map, Some((0x300_0000, 0x1234))).unwrap();
        let info: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.memmap_entries as usize, map.len());
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 0x1234));
        let last: hvm_memmap_table_entry = m
            .read_obj(GuestAddress(PVH_MEMMAP_START + 24 * (map.len() as u64 - 1)))
            .unwrap();
        assert_eq!(last.addr + last.size, size);
    }

    #[test]
    fn initrd_goes_high_and_respects_the_kernel() {
        let size = 64 << 20;
        let m = mem(size);
        let dir = std::env::temp_dir().join(format!("keel-initrd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("initrd");
        std::fs::write(&p, vec![0xabu8; 10_000]).unwrap();
        let (addr, len) =
            load_initrd(&m, Image::Path(&p), size, 0x200_0000, INITRD_ADDR_MAX).unwrap();
        assert_eq!(len, 10_000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + len <= size && addr + len > size - 8192);
        let b: u8 = m.read_obj(GuestAddress(addr + 9_999)).unwrap();
        assert_eq!(b, 0xab);
        assert!(matches!(
            load_initrd(&m, Image::Path(&p), size, size - 4096, INITRD_ADDR_MAX),
            Err(BootError::InitrdTooLarge { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn garbage_kernel_is_refused_with_both_reasons() {
        let m = mem(64 << 20);
        let dir = std::env::temp_dir().join(format!("keel-kernel-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("kernel");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let e = load_payload(&m, 64 << 20, Image::Path(&p), None, "").unwrap_err();
        assert!(matches!(e, BootError::Kernel { .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
