//! Seccomp: one allow-list per thread kind, installed by each thread before
//! it does its work (vCPUs before their first KVM_RUN), after set-up has
//! opened everything the VM needs.
//!
//! The lists are Rust tables ([`policy`]) compiled with rust-vmm's
//! `seccompiler` (`SeccompFilter::new`): they are checked by the compiler,
//! use the `libc` crate's system call numbers, and need no file at run
//! time. A call outside the list traps (`SECCOMP_RET_TRAP`): the SIGSYS
//! handler writes the thread kind and the system call number to stderr,
//! with `write(2)` only, and ends the process with exit code
//! [`EXIT_SECCOMP`] (`exit_group`, which every list allows).

pub mod policy;

use std::cell::Cell;
use std::sync::OnceLock;

use log::warn;
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// `keel`'s exit code when a thread made a forbidden system call.
pub const EXIT_SECCOMP: u8 = 7;

/// The environment variable that makes one thread kind make a forbidden
/// call right after installing its filter (for the tests; it can only make
/// keel end itself).
pub const TEST_VIOLATION_ENV: &str = "KEEL_TEST_SECCOMP_VIOLATION";

/// The system call the test hook makes: `personality(0xffffffff)`, a
/// query with no effect, on no list.
pub const TEST_VIOLATION_SYSCALL: i64 = libc::SYS_personality;

/// Errors of building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A rule or filter that seccompiler refuses.
    #[error("seccomp filter: {0}")]
    Backend(#[from] seccompiler::BackendError),
    /// Compiling a filter to BPF, or installing it.
    #[error("seccomp: {0}")]
    Seccomp(#[from] seccompiler::Error),
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler: {0}")]
    Signal(std::io::Error),
}

/// The kinds of threads, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: the control loop.
    Main,
    /// A vCPU thread.
    Vcpu,
    /// The device thread (virtio queues, disk, tap and vsock I/O).
    Device,
    /// The control API's threads (acceptor, connections, console input).
    Api,
    /// A disk's trim worker (discards that only an ioctl can do).
    Trim,
    /// The NICs' teardown helper (a forked process that keeps
    /// CAP_NET_ADMIN to undo the host set-up at the end).
    Teardown,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 6] = [
        Self::Main,
        Self::Vcpu,
        Self::Device,
        Self::Api,
        Self::Trim,
        Self::Teardown,
    ];

    /// The kind's name (logs, the test hook's values).
    pub fn name(self) -> &'static str {
        match self {
            Self::Main => "main",
            Self::Vcpu => "vcpu",
            Self::Device => "device",
            Self::Api => "api",
            Self::Trim => "trim",
            Self::Teardown => "teardown",
        }
    }
}

/// The compiled filters, one per kind, or none when seccomp is off.
#[derive(Clone, Debug, Default)]
pub struct Filters {
    programs: Option<Vec<(ThreadKind, Vec<BpfProgram>)>>,
    violate: Option<ThreadKind>,
}

impl Filters {
    /// Compiles every kind's filter (`enabled`), or none; installs the
    /// SIGSYS handler. With `enabled` false, warns loudly.
    pub fn new(enabled: bool) -> Result<Self, SeccompError> {
        let violate = std::env::var(TEST_VIOLATION_ENV)
            .ok()
            .and_then(|v| ThreadKind::ALL.into_iter().find(|k| k.name() == v));
        if !enabled {
            warn!("SECCOMP IS OFF (--seccomp off): no thread is confined; for debugging only, never in production");
            return Ok(Filters {
                programs: None,
                violate,
            });
        }
        install_sigsys_handler()?;
        fix_malloc_arenas();
        let arch = TargetArch::x86_64;
        let mut programs = Vec::new();
        for kind in ThreadKind::ALL {
            let main = SeccompFilter::new(
                policy::rules(kind)?,
                SeccompAction::Trap,
                SeccompAction::Allow,
                arch,
            )?;
            // Installed in this order: seccompiler sets no_new_privs with
            // prctl before each filter, which the allow-list forbids.
            let mut list: Vec<BpfProgram> = Vec::new();
            if kind == ThreadKind::Api {
                list.push(clone3_fallback()?);
            }
            list.push(open_refusal(kind)?);
            list.push(main.try_into()?);
            programs.push((kind, list));
        }
        Ok(Filters {
            programs: Some(programs),
            violate,
        })
    }

    /// Confines the calling thread as `kind` (nothing when seccomp is off).
    /// Then, if the test hook names `kind`, makes the forbidden call.
    pub fn apply(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        THREAD_KIND.with(|k| k.set(kind as u8));
        if let Some(programs) = &self.programs {
            for (_, list) in programs.iter().filter(|(k, _)| *k == kind) {
                for prog in list {
                    seccompiler::apply_filter(prog)?;
                }
            }
        }
        if self.violate == Some(kind) {
            // SAFETY: personality(0xffffffff) only reads the persona.
            unsafe { libc::syscall(TEST_VIOLATION_SYSCALL, 0xffff_ffffu64) };
        }
        Ok(())
    }

    /// Whether filters are installed.
    pub fn enabled(&self) -> bool {
        self.programs.is_some()
    }
}

/// glibc's malloc reads `/sys/devices/system/cpu/online` the first time a
/// new thread makes it consider another arena, unless the arena limit is
/// set; under the filters that `openat` would kill Keel (an API connection
/// thread met it). The limit is glibc's own default, 8 per CPU.
fn fix_malloc_arenas() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let max = libc::c_int::try_from(cpus.saturating_mul(8)).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt only sets a malloc tunable.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, max) } != 1 {
        warn!("cannot set malloc's arena limit; a new thread may trip the seccomp filter");
    }
}

/// A second filter for every kind: `openat` fails with EACCES (a vCPU's
/// serial log rotation excepted, see [`policy::denied_opens`]) instead of
/// killing Keel, so that glibc's lazy reads of `/proc` and `/sys` files
/// fail softly; nothing can be opened either way.
fn open_refusal(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let f = SeccompFilter::new(
        policy::denied_opens(kind)?,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        TargetArch::x86_64,
    )?;
    Ok(f.try_into()?)
}

/// A second filter for threads that create threads: `clone3` answers
/// ENOSYS (its flags sit in memory, out of a filter's reach), so the C
/// library uses `clone`, whose flags the allow-list checks.
fn clone3_fallback() -> Result<BpfProgram, SeccompError> {
    let f = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )?;
    Ok(f.try_into()?)
}

thread_local! {
    /// The calling thread's kind, for the SIGSYS report (a plain TLS read
    /// in the handler).
    static THREAD_KIND: Cell<u8> = const { Cell::new(u8::MAX) };
}

/// The filters, once built: threads started later read them here.
static FILTERS: OnceLock<Filters> = OnceLock::new();

/// Keeps `filters` for [`apply_current`]; the first call wins.
pub fn set_global(filters: Filters) {
    let _ = FILTERS.set(filters);
}

/// Confines the calling thread as `kind` with the filters kept by
/// [`set_global`] (nothing if none were kept: unit tests, seccomp off).
pub fn apply_current(kind: ThreadKind) -> Result<(), SeccompError> {
    match FILTERS.get() {
        Some(f) => f.apply(kind),
        None => Ok(()),
    }
}

/// [`apply_current`] for a thread that has no one to report to: a filter
/// that cannot be installed ends Keel (exit code [`EXIT_SECCOMP`]) rather
/// than leave the thread unconfined.
pub fn confine(kind: ThreadKind) {
    if let Err(e) = apply_current(kind) {
        log::error!("{} thread: {e}; stopping", kind.name());
        std::process::exit(i32::from(EXIT_SECCOMP));
    }
}

/// `siginfo_t` for SIGSYS, as the kernel lays it out on x86-64.
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// Appends the decimal digits of `n` to `buf` at `at`; returns the new end.
fn put_decimal(buf: &mut [u8], mut at: usize, n: u64) -> usize {
    let mut digits = [0u8; 20];
    let mut len = 0;
    let mut v = n;
    loop {
        digits[len] = b'0' + (v % 10) as u8;
        len += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    while len > 0 && at < buf.len() {
        len -= 1;
        buf[at] = digits[len];
        at += 1;
    }
    at
}

fn put(buf: &mut [u8], at: usize, s: &[u8]) -> usize {
    let n = s.len().min(buf.len() - at);
    buf[at..at + n].copy_from_slice(&s[..n]);
    at + n
}

/// The report line: `keel: ERROR seccomp: the <kind> thread made forbidden
/// system call <n>; killing keel`.
/// A thread that did not confine itself (it inherited its creator's
/// filter) is named by its thread name (`comm`).
fn report_line(buf: &mut [u8], kind: u8, comm: &[u8], syscall: i64) -> usize {
    let name = ThreadKind::ALL
        .iter()
        .find(|k| **k as u8 == kind)
        .map_or(comm, |k| k.name().as_bytes());
    let mut at = put(buf, 0, b"keel: ERROR seccomp: the ");
    at = put(buf, at, name);
    at = put(buf, at, b" thread made forbidden system call ");
    at = put_decimal(buf, at, syscall as u64);
    put(buf, at, b"; killing keel\n")
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS, laid out as
    // `SigsysInfo` on x86-64 (si_call_addr, si_syscall, si_arch).
    let nr = unsafe { (*(info as *const SigsysInfo)).syscall };
    let kind = THREAD_KIND.try_with(Cell::get).unwrap_or(u8::MAX);
    let mut comm = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes and a NUL into `comm`;
    // prctl is a plain system call (every list allows PR_GET_NAME).
    unsafe { libc::prctl(libc::PR_GET_NAME, comm.as_mut_ptr()) };
    let comm_len = comm.iter().position(|b| *b == 0).unwrap_or(16);
    let mut buf = [0u8; 128];
    let len = report_line(&mut buf, kind, &comm[..comm_len], i64::from(nr));
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `buf` is ours.
    unsafe {
        libc::write(libc::STDERR_FILENO, buf.as_ptr().cast(), len);
        libc::_exit(i32::from(EXIT_SECCOMP));
    }
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is valid; the handler only makes
    // async-signal-safe calls.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Signal(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The PCI machine's request numbers are `_IOW(KVMIO, nr, struct)`.
    #[test]
    fn pci_request_numbers_match_their_structures() {
        let iow = |nr: u64, size: usize| (1u64 << 30) | ((size as u64) << 16) | (0xae << 8) | nr;
        let ioeventfd = std::mem::size_of::<kvm_bindings::kvm_ioeventfd>();
        let routing = std::mem::size_of::<kvm_bindings::kvm_irq_routing>();
        assert_eq!(policy::KVM_IOEVENTFD, iow(0x79, ioeventfd));
        assert_eq!(policy::KVM_SET_GSI_ROUTING, iow(0x6a, routing));
    }

    #[test]
    fn every_kind_compiles() {
        for kind in ThreadKind::ALL {
            let f = SeccompFilter::new(
                policy::rules(kind).unwrap(),
                SeccompAction::Trap,
                SeccompAction::Allow,
                TargetArch::x86_64,
            )
            .unwrap();
            let p: BpfProgram = f.try_into().unwrap();
            assert!(!p.is_empty(), "{kind:?}");
        }
    }

    #[test]
    fn only_the_kinds_that_need_them_get_risky_calls() {
        let has = |k, c| policy::rules(k).unwrap().contains_key(&c);
        for k in ThreadKind::ALL {
            for c in [
                libc::SYS_execve,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_open,
                libc::SYS_ptrace,
                libc::SYS_setuid,
                TEST_VIOLATION_SYSCALL,
            ] {
                assert!(!has(k, c), "{k:?} allows {c}");
            }
            assert_eq!(has(k, libc::SYS_clone), k == ThreadKind::Api, "{k:?}");
            // openat passes the main list, to be refused softly by the
            // second filter (the vCPU's serial log rotation excepted).
            let denied = policy::denied_opens(k).unwrap();
            assert_eq!(
                denied[&libc::SYS_openat].len(),
                usize::from(k == ThreadKind::Vcpu),
                "{k:?}"
            );
        }
        assert!(has(ThreadKind::Vcpu, libc::SYS_ioctl));
        assert!(!has(ThreadKind::Vcpu, libc::SYS_socket));
    }

    /// In a thread of its own (filters are per thread): opening fails with
    /// EACCES under every kind's filters, instead of killing the process;
    /// a vCPU may still create the serial log.
    #[test]
    fn opens_are_refused_softly_and_only_the_serial_log_is_created() {
        let filters = Filters::new(true).unwrap();
        let log = std::env::temp_dir().join(format!("keel-seccomp-log-{}", std::process::id()));
        for kind in ThreadKind::ALL {
            let (f, log2) = (filters.clone(), log.clone());
            let (read, create) = std::thread::spawn(move || {
                f.apply(kind).unwrap();
                let read = std::fs::File::open("/proc/sys/vm/overcommit_memory")
                    .map(drop)
                    .map_err(|e| e.raw_os_error());
                let create = std::fs::File::create(&log2)
                    .map(drop)
                    .map_err(|e| e.raw_os_error());
                (read, create)
            })
            .join()
            .unwrap();
            assert_eq!(read, Err(Some(libc::EACCES)), "{kind:?}");
            if kind == ThreadKind::Vcpu {
                assert_eq!(create, Ok(()), "{kind:?}");
            } else {
                assert_eq!(create, Err(Some(libc::EACCES)), "{kind:?}");
            }
        }
        std::fs::remove_file(&log).unwrap();
    }

    #[test]
    fn the_report_names_the_thread_and_the_call() {
        let mut buf = [0u8; 128];
        let n = report_line(&mut buf, ThreadKind::Vcpu as u8, b"vcpu0", 135);
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "keel: ERROR seccomp: the vcpu thread made forbidden system call 135; killing keel\n"
        );
        let n = report_line(&mut buf, u8::MAX, b"keel-api-conn", 0);
        assert!(std::str::from_utf8(&buf[..n])
            .unwrap()
            .contains("the keel-api-conn thread made forbidden system call 0;"));
    }
}
