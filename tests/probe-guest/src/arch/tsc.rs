//! The time stamp counter (RDTSC is allowed at CPL3): busy waits, and its
//! rate for turning cycle counts into nanoseconds.

use core::sync::atomic::{AtomicU64, Ordering};

use super::syscall;

/// A TSC rate no CPU exceeds, so that waits last at least as long as asked
/// without knowing the real rate.
const MAX_TSC_KHZ: u64 = 5_000_000;

/// Reads the TSC.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Busy-waits at least `us` microseconds (longer on a slower TSC).
pub fn delay_us(us: u64) {
    let start = rdtsc();
    let cycles = cycles_at_least(us);
    while rdtsc().wrapping_sub(start) < cycles {
        core::hint::spin_loop();
    }
}

/// TSC cycles that take at least `us` microseconds on any CPU: a bound for
/// timeouts that does not depend on knowing the rate.
pub fn cycles_at_least(us: u64) -> u64 {
    us.saturating_mul(MAX_TSC_KHZ / 1000)
}

/// TSC cycles for `us` microseconds at the calibrated rate, or at the
/// highest rate (as [`cycles_at_least`]) when it is unknown: for waits on
/// something outside the VM (a host process), which should last about as
/// long as asked.
pub fn cycles_us(us: u64) -> u64 {
    match khz() {
        Some((khz, _)) => us.saturating_mul(khz) / 1000,
        None => cycles_at_least(us),
    }
}

/// A point in time `us` microseconds from now (see [`cycles_us`]).
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    start: u64,
    cycles: u64,
}

impl Deadline {
    /// `us` microseconds from now.
    pub fn after_us(us: u64) -> Self {
        Deadline {
            start: rdtsc(),
            cycles: cycles_us(us),
        }
    }

    /// Whether it has passed.
    pub fn passed(&self) -> bool {
        rdtsc().wrapping_sub(self.start) > self.cycles
    }
}

/// Where the TSC rate came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// CPUID leaf 0x40000010 EAX (the VMM's TSC kHz).
    HypervisorLeaf,
    /// CPUID leaf 0x15 (crystal clock times the TSC/crystal ratio).
    Leaf15,
    /// CPUID leaf 0x16 EAX (processor base frequency, MHz).
    Leaf16,
    /// The KVM pvclock scale factors (MSR_KVM_SYSTEM_TIME_NEW).
    KvmClock,
}

impl Source {
    /// A short name for output.
    pub fn name(self) -> &'static str {
        match self {
            Source::HypervisorLeaf => "cpuid 0x40000010",
            Source::Leaf15 => "cpuid 0x15",
            Source::Leaf16 => "cpuid 0x16",
            Source::KvmClock => "kvmclock",
        }
    }
}

/// Calibrated rate in kHz (0: not yet; u64::MAX: no source found) and its
/// source (index into SOURCES).
static KHZ: AtomicU64 = AtomicU64::new(0);
static SOURCE: AtomicU64 = AtomicU64::new(0);
const SOURCES: [Source; 4] = [
    Source::HypervisorLeaf,
    Source::Leaf15,
    Source::Leaf16,
    Source::KvmClock,
];

/// Plausible TSC rates: 100 MHz to 20 GHz.
fn plausible(khz: u64) -> Option<u64> {
    (100_000..=20_000_000).contains(&khz).then_some(khz)
}

/// The TSC rate in kHz and where it came from, found once: CPUID leaf
/// 0x40000010 (as the VMM sets it), leaf 0x15, leaf 0x16, then the KVM
/// pvclock's TSC-to-nanoseconds scale. CPUID runs at CPL0 (the syscall
/// gate), so the VMM's table answers. `None` when nothing gives a rate.
pub fn khz() -> Option<(u64, Source)> {
    match KHZ.load(Ordering::Relaxed) {
        0 => {}
        u64::MAX => return None,
        khz => return Some((khz, SOURCES[SOURCE.load(Ordering::Relaxed) as usize])),
    }
    let found = calibrate();
    match found {
        Some((khz, source)) => {
            let index = SOURCES.iter().position(|&s| s == source).unwrap_or(0);
            SOURCE.store(index as u64, Ordering::Relaxed);
            KHZ.store(khz, Ordering::Relaxed);
        }
        None => KHZ.store(u64::MAX, Ordering::Relaxed),
    }
    found
}

/// Nanoseconds in `cycles` TSC cycles, if the rate is known.
pub fn cycles_to_ns(cycles: u64) -> Option<u64> {
    let (khz, _) = khz()?;
    u64::try_from(u128::from(cycles) * 1_000_000 / u128::from(khz)).ok()
}

fn calibrate() -> Option<(u64, Source)> {
    let hv = syscall::cpuid(0x4000_0000, 0);
    let kvm = hv.ebx == 0x4b4d_564b && hv.ecx == 0x564b_4d56 && hv.edx == 0x4d;
    if hv.eax >= 0x4000_0010 {
        if let Some(khz) = plausible(u64::from(syscall::cpuid(0x4000_0010, 0).eax)) {
            return Some((khz, Source::HypervisorLeaf));
        }
    }
    let max = syscall::cpuid(0, 0).eax;
    if max >= 0x15 {
        let l = syscall::cpuid(0x15, 0);
        if l.eax != 0 && l.ebx != 0 && l.ecx != 0 {
            let hz = u64::from(l.ecx) * u64::from(l.ebx) / u64::from(l.eax);
            if let Some(khz) = plausible(hz / 1000) {
                return Some((khz, Source::Leaf15));
            }
        }
    }
    if max >= 0x16 {
        if let Some(khz) = plausible(u64::from(syscall::cpuid(0x16, 0).eax & 0xffff) * 1000) {
            return Some((khz, Source::Leaf16));
        }
    }
    if kvm && hv.eax >= 0x4000_0001 {
        // KVM_FEATURE_CLOCKSOURCE2: MSR_KVM_SYSTEM_TIME_NEW exists.
        if syscall::cpuid(0x4000_0001, 0).eax & (1 << 3) != 0 {
            if let Some(khz) = kvmclock_khz().and_then(plausible) {
                return Some((khz, Source::KvmClock));
            }
        }
    }
    None
}

/// `struct pvclock_vcpu_time_info`, which KVM fills in.
#[repr(C, align(64))]
struct PvClock {
    version: u32,
    pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    pad: [u8; 2],
}

static mut PVCLOCK: PvClock = PvClock {
    version: 0,
    pad0: 0,
    tsc_timestamp: 0,
    system_time: 0,
    tsc_to_system_mul: 0,
    tsc_shift: 0,
    flags: 0,
    pad: [0; 2],
};

const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

/// The TSC rate KVM uses for the guest, from the pvclock scale: KVM sets
/// `ns = ((tsc << shift) * mul) >> 32` (a right shift for negative
/// shifts), so the rate is 10^6 * 2^32 / (mul * 2^shift) kHz. The pvclock
/// area is enabled only for this read and disabled again.
fn kvmclock_khz() -> Option<u64> {
    let area = &raw mut PVCLOCK;
    syscall::wrmsr(MSR_KVM_SYSTEM_TIME_NEW, area as u64 | 1);
    let deadline = rdtsc().wrapping_add(cycles_at_least(100_000));
    let mut scale = None;
    while rdtsc() < deadline {
        // SAFETY: a static written only by KVM while enabled; read with
        // volatile loads, checked against the version protocol.
        let (v1, mul, shift, v2) = unsafe {
            let v1 = (&raw const (*area).version).read_volatile();
            core::sync::atomic::fence(Ordering::Acquire);
            let mul = (&raw const (*area).tsc_to_system_mul).read_volatile();
            let shift = (&raw const (*area).tsc_shift).read_volatile();
            core::sync::atomic::fence(Ordering::Acquire);
            (v1, mul, shift, (&raw const (*area).version).read_volatile())
        };
        if v1 != 0 && v1 % 2 == 0 && v1 == v2 && mul != 0 {
            scale = Some((mul, shift));
            break;
        }
        core::hint::spin_loop();
    }
    syscall::wrmsr(MSR_KVM_SYSTEM_TIME_NEW, 0);
    let (mul, shift) = scale?;
    let khz = (1_000_000u128 << 32) / u128::from(mul);
    let khz = if shift >= 0 {
        khz >> shift
    } else {
        khz << -shift
    };
    u64::try_from(khz).ok()
}
