//! Waiting by the time stamp counter (RDTSC is allowed at CPL3).

/// A TSC rate no CPU exceeds, so that waits last at least as long as asked
/// without knowing the real rate.
const MAX_TSC_KHZ: u64 = 5_000_000;

fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Busy-waits at least `us` microseconds (longer on a slower TSC).
pub fn delay_us(us: u64) {
    let start = rdtsc();
    let cycles = us.saturating_mul(MAX_TSC_KHZ / 1000);
    while rdtsc().wrapping_sub(start) < cycles {
        core::hint::spin_loop();
    }
}
