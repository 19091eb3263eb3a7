//! The probe guest: a small freestanding x86-64 ELF that a VMM boots through
//! the PVH entry. It checks what the VMM set up (boot information, memory
//! map, CPUID, MP table, serial port) and reports one line per check on
//! COM1, then ends the VM (or idles, or with `probe.interactive` serves the
//! console and keyboard until Ctrl-Alt-Del). See README.md for the protocol.
//!
//! Kernel mode is emulated ~2000x slower than user mode on the machines it
//! targets, so the CPL0 part is a few dozen instructions of assembly
//! (`arch::entry`); all of the Rust code runs at CPL3 with IOPL 3 and calls
//! the syscall gate (`int3`, see `arch::syscall`) for the few things that
//! need CPL0.

#![no_std]
#![no_main]

extern crate alloc;

mod acpi;
mod arch;
mod blkdev;
mod checks;
mod cmdline;
mod heap;
mod interactive;
mod mem;
mod mptable;
mod netdev;
mod pci;
mod power;
mod rawblk;
mod rawvsock;
mod report;
mod scratch;
mod serial;
mod start_info;
mod table_bytes;
mod virtio;
mod vsockdev;

use alloc::string::String;
use core::panic::PanicInfo;

use arch::entry::{BOOT_MILESTONE_PORT, MILESTONE_DONE};
use arch::{idt, paging, pic, port, syscall};
use cmdline::Options;
use report::{one_line, Report};
use start_info::StartInfo;

/// The Rust entry, called at CPL3 by `arch::entry` with the start_info
/// address the VMM put in EBX.
#[no_mangle]
extern "C" fn probe_main(start_info_paddr: u64) -> ! {
    idt::init();
    paging::init();
    serial::init();
    pic::mask_all();
    println!("probe: start");
    println!(
        "probe: identity map with {} pages",
        if paging::uses_1g_pages() {
            "1 GiB"
        } else {
            "2 MiB"
        }
    );

    let info = StartInfo::read(start_info_paddr);
    match &info {
        Ok(i) => println!(
            "probe: start_info at {:#x}: magic {:#x} version {} flags {:#x} modules {} at {:#x} rsdp {:#x} memmap {} at {:#x}",
            i.paddr, i.magic, i.version, i.flags, i.nr_modules, i.modlist_paddr, i.rsdp_paddr, i.memmap_entries, i.memmap_paddr
        ),
        Err(e) => println!("probe: start_info unreadable: {e}"),
    }
    let cmdline = info
        .as_ref()
        .map_err(Clone::clone)
        .and_then(StartInfo::cmdline);
    // Options are taken from the printable part only; boot.cmdline reports
    // anything else.
    let text: String = match &cmdline {
        Ok(bytes) => bytes
            .iter()
            .map(|&b| if b.is_ascii() { char::from(b) } else { '?' })
            .collect(),
        Err(_) => String::new(),
    };
    match &cmdline {
        Ok(_) => println!("probe: cmdline {}", one_line(&text)),
        Err(e) => println!("probe: cmdline unavailable: {}", one_line(e)),
    }
    let options = Options::parse(&text);
    if let Some(word) = options.echo {
        println!("probe: echo {}", one_line(word));
    }
    virtio::describe(&options.virtio_mmio);

    let ctx = checks::Context {
        info: &info,
        cmdline: &cmdline,
        options: &options,
    };
    let mut report = Report::new(&options);
    checks::run_all(&ctx, &mut report);
    port::outb(BOOT_MILESTONE_PORT, MILESTONE_DONE);
    report.summary();
    if let Some(marker) = options.boot_marker {
        // In two prints: the VMM must match the byte stream, not lines or
        // single writes.
        serial::write_fmt(format_args!("GUESTOS BOOT "));
        println!(
            "{}",
            match marker {
                cmdline::BootMarker::Success => "SUCCESS",
                cmdline::BootMarker::Failure => "FAILURE",
            }
        );
    }

    if options.interactive {
        interactive::run(options.heartbeat_ms);
    }
    if options.idle {
        println!("probe: idle");
        loop {
            syscall::idle();
        }
    }
    match options.end {
        cmdline::End::PowerOff => power::off(),
        cmdline::End::Reset => power::reset(),
        cmdline::End::TripleFault => syscall::triple_fault(),
        cmdline::End::AcpiReset => power::acpi_reset(),
    }
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    println!("PROBE FAIL panic: {}", one_line(&alloc::format!("{info}")));
    power::off()
}

/// Referenced by the prebuilt `alloc` (built for unwinding); never called
/// with `panic = "abort"`.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

/// Referenced by landing pads in the prebuilt `alloc`; unreachable since
/// nothing unwinds with `panic = "abort"`.
#[no_mangle]
pub extern "C" fn _Unwind_Resume() -> ! {
    power::off()
}
