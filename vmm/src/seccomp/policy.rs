//! The allow-lists, one per thread kind (x86-64 system call numbers).
//!
//! Every list starts from [`common`]: what any Rust thread needs to run,
//! allocate, lock, log to stderr and exit. Each kind then adds only what
//! its own work needs once the guest runs; nothing anywhere may `execve`,
//! create a process, open a path, change credentials or load a module.
//! Argument filters narrow `ioctl` (KVM and tap requests by number),
//! `socket` (Unix sockets only), `clone` (threads only), `fcntl` and
//! `prctl`.

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use super::{SeccompError, ThreadKind};

/// The rules of a filter: system call number to its conditions (an empty
/// list allows the call whatever its arguments).
pub type Rules = BTreeMap<i64, Vec<SeccompRule>>;

// ioctl request numbers used after start (kvm-ioctls keeps its own
// private; these are the kernel's `_IO*` values).
/// `KVM_RUN`: `_IO(KVMIO, 0x80)`.
pub const KVM_RUN: u64 = 0xae80;
/// `KVM_GET_REGS`: `_IOR(KVMIO, 0x81, struct kvm_regs)` (fatal-exit dumps).
pub const KVM_GET_REGS: u64 = 0x8090_ae81;
/// `KVM_GET_SREGS`: `_IOR(KVMIO, 0x83, struct kvm_sregs)` (fatal-exit dumps).
pub const KVM_GET_SREGS: u64 = 0x8138_ae83;
/// `KVM_IOEVENTFD`: `_IOW(KVMIO, 0x79, struct kvm_ioeventfd)` (a virtio-pci
/// BAR the guest moves: its queue notifications move with it).
pub const KVM_IOEVENTFD: u64 = 0x4040_ae79;
/// `KVM_SET_GSI_ROUTING`: `_IOW(KVMIO, 0x6a, struct kvm_irq_routing)` (the
/// guest programs, masks or unmasks a virtio-pci MSI-X vector).
pub const KVM_SET_GSI_ROUTING: u64 = 0x4008_ae6a;
/// `TUNSETOFFLOAD`: `_IOW('T', 208, unsigned int)` (virtio-net activation).
pub const TUNSETOFFLOAD: u64 = 0x4004_54d0;
/// `TUNSETQUEUE`: `_IOW('T', 217, int)` (virtio-net multi-queue).
pub const TUNSETQUEUE: u64 = 0x4004_54d9;
/// `BLKDISCARD`: `_IO(0x12, 119)`.
pub const BLKDISCARD: u64 = 0x1277;
/// `BLKZEROOUT`: `_IO(0x12, 127)`.
pub const BLKZEROOUT: u64 = 0x127f;
/// `FIONBIO` (a socket made non-blocking).
pub const FIONBIO: u64 = 0x5421;
/// `FIOCLEX` (close-on-exec set on a descriptor).
pub const FIOCLEX: u64 = 0x5451;

/// The flags of the serial log's `File::create` on rotation.
pub const SERIAL_LOG_OPEN_FLAGS: u64 =
    (libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC) as u64;

/// The allow-list of `kind`.
pub fn rules(kind: ThreadKind) -> Result<Rules, SeccompError> {
    let mut r = common()?;
    match kind {
        ThreadKind::Main => main(&mut r)?,
        ThreadKind::Vcpu => vcpu(&mut r)?,
        ThreadKind::Device => device(&mut r)?,
        ThreadKind::Api => api(&mut r)?,
        ThreadKind::Trim => trim(&mut r)?,
        ThreadKind::Teardown => teardown(&mut r)?,
    }
    Ok(r)
}

fn eq(arg: u8, value: u64) -> Result<SeccompCondition, SeccompError> {
    Ok(SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        value,
    )?)
}

/// A call allowed only when argument `arg` is one of `values`.
fn when_arg_in(r: &mut Rules, call: i64, arg: u8, values: &[u64]) -> Result<(), SeccompError> {
    let rules = r.entry(call).or_default();
    for v in values {
        rules.push(SeccompRule::new(vec![eq(arg, *v)?])?);
    }
    Ok(())
}

/// Serving Unix stream sockets (the API's connections, vsock's host side).
const STREAM_SOCKET_IO: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

fn allow(r: &mut Rules, calls: &[i64]) {
    for c in calls {
        r.insert(*c, Vec::new());
    }
}

/// What every thread needs: memory, locks, time, signals' return, logging
/// to stderr, and ending the thread or the process.
fn common() -> Result<Rules, SeccompError> {
    let mut r = Rules::new();
    allow(
        &mut r,
        &[
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_writev,
            libc::SYS_close,
            libc::SYS_futex,
            libc::SYS_mmap,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_mprotect,
            libc::SYS_madvise,
            libc::SYS_brk,
            libc::SYS_rt_sigprocmask,
            libc::SYS_rt_sigreturn,
            libc::SYS_sigaltstack,
            libc::SYS_sched_yield,
            libc::SYS_sched_getaffinity,
            libc::SYS_nanosleep,
            libc::SYS_clock_nanosleep,
            libc::SYS_clock_gettime,
            libc::SYS_gettid,
            libc::SYS_getpid,
            libc::SYS_getrandom,
            libc::SYS_restart_syscall,
            libc::SYS_rseq,
            libc::SYS_set_robust_list,
            libc::SYS_exit,
            libc::SYS_exit_group,
            // A panic aborts the process: raise(SIGABRT).
            libc::SYS_tgkill,
            // Answered EACCES by the second filter ([`denied_opens`]),
            // except the vCPU's serial log rotation: glibc opens files
            // lazily (`/proc/sys/vm/overcommit_memory` the first time a
            // malloc arena other than the main one shrinks) and copes with
            // a refusal, which a kill would not let it do.
            libc::SYS_openat,
        ],
    );
    // `dup` of an eventfd (`EventFd::try_clone`) and the std's own
    // close-on-exec checks.
    when_arg_in(
        &mut r,
        libc::SYS_fcntl,
        1,
        &[
            libc::F_DUPFD_CLOEXEC as u64,
            libc::F_GETFD as u64,
            libc::F_SETFD as u64,
            libc::F_GETFL as u64,
            libc::F_SETFL as u64,
        ],
    )?;
    // Thread names (std sets them at thread start; harmless later).
    when_arg_in(
        &mut r,
        libc::SYS_prctl,
        0,
        &[libc::PR_SET_NAME as u64, libc::PR_GET_NAME as u64],
    )?;
    Ok(r)
}

/// The control loop: epoll on eventfds and a signalfd, vCPU kicks and
/// joins at the end, systemd notifications (a Unix datagram socket), the
/// boot monitor's consoles (opened at set-up, written here), telling the
/// tap teardown helper to go and reaping it.
fn main(r: &mut Rules) -> Result<(), SeccompError> {
    allow(
        r,
        &[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_create1,
            libc::SYS_signalfd4,
            libc::SYS_eventfd2,
            libc::SYS_connect,
            libc::SYS_sendto,
            libc::SYS_sendmsg,
            libc::SYS_recvfrom,
            libc::SYS_recvmsg,
            libc::SYS_bind,
            libc::SYS_getsockname,
            libc::SYS_setsockopt,
            libc::SYS_poll,
            libc::SYS_ppoll,
            // Reaping the tap teardown helper.
            libc::SYS_wait4,
        ],
    );
    // sd-notify's datagram socket.
    when_arg_in(r, libc::SYS_socket, 0, &[libc::AF_UNIX as u64])?;
    Ok(())
}

/// A vCPU: KVM_RUN and the register reads of a fatal exit's report; the
/// buses it serves write eventfds (interrupts, queue notifications, the
/// device thread's hand-offs), the serial output (file or stdout) and the
/// boot timer's log line; a virtio-net activation sets tap offloads; on a
/// PCI machine, a BAR move re-registers ioeventfds and an MSI-X table or
/// control write replaces KVM's GSI routing table. The
/// serial log's rotation (`--serial file=PATH,max_size=..`) runs on the vCPU
/// that writes the byte: it renames the backups and creates `PATH` afresh,
/// so `rename` and one `openat` (write-only, create, truncate, close-on-exec:
/// `File::create`, nothing that could read a file) are allowed here only.
fn vcpu(r: &mut Rules) -> Result<(), SeccompError> {
    when_arg_in(
        r,
        libc::SYS_ioctl,
        1,
        &[
            KVM_RUN,
            KVM_GET_REGS,
            KVM_GET_SREGS,
            KVM_IOEVENTFD,
            KVM_SET_GSI_ROUTING,
            TUNSETOFFLOAD,
            TUNSETQUEUE,
        ],
    )?;
    allow(r, &[libc::SYS_epoll_ctl]);
    allow(
        r,
        &[libc::SYS_rename, libc::SYS_renameat, libc::SYS_renameat2],
    );
    Ok(())
}

/// The `openat` calls of `kind` answered EACCES by the second filter
/// (every one, but for a vCPU those with the serial log's flags).
pub fn denied_opens(kind: ThreadKind) -> Result<Rules, SeccompError> {
    let mut r = Rules::new();
    let rules = if kind == ThreadKind::Vcpu {
        vec![SeccompRule::new(vec![SeccompCondition::new(
            2,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Ne,
            SERIAL_LOG_OPEN_FLAGS,
        )?])?]
    } else {
        Vec::new()
    };
    r.insert(libc::SYS_openat, rules);
    Ok(r)
}

/// The device thread (event-manager loop): virtio queues, disk I/O (sync
/// or io_uring, set up when the guest's driver starts a disk), discard and
/// write-zeroes, tap reads/writes, vsock's Unix sockets (accepting host
/// connections, connecting to host listeners for the guest) and its close
/// timer.
fn device(r: &mut Rules) -> Result<(), SeccompError> {
    allow(
        r,
        &[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_eventfd2,
            libc::SYS_readv,
            libc::SYS_preadv,
            libc::SYS_preadv2,
            libc::SYS_pread64,
            libc::SYS_pwritev,
            libc::SYS_pwritev2,
            libc::SYS_pwrite64,
            libc::SYS_lseek,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            libc::SYS_fallocate,
            // vsock's close timer (created at set-up).
            libc::SYS_timerfd_settime,
            libc::SYS_timerfd_gettime,
            libc::SYS_io_uring_setup,
            libc::SYS_io_uring_enter,
            libc::SYS_io_uring_register,
            libc::SYS_connect,
        ],
    );
    allow(r, STREAM_SOCKET_IO);
    when_arg_in(r, libc::SYS_socket, 0, &[libc::AF_UNIX as u64])?;
    when_arg_in(
        r,
        libc::SYS_ioctl,
        1,
        &[
            TUNSETOFFLOAD,
            TUNSETQUEUE,
            BLKDISCARD,
            BLKZEROOUT,
            FIONBIO,
            FIOCLEX,
        ],
    )?;
    Ok(())
}

/// A disk's trim worker: discard and write-zeroes on the one disk it was
/// given (BLKDISCARD/BLKZEROOUT on a block device, fallocate on a file);
/// it answers through a channel and an eventfd (`write`, in [`common`]).
fn trim(r: &mut Rules) -> Result<(), SeccompError> {
    allow(r, &[libc::SYS_fallocate]);
    when_arg_in(r, libc::SYS_ioctl, 1, &[BLKDISCARD, BLKZEROOUT])?;
    Ok(())
}

/// The NICs' teardown helper: waits on a pipe, then talks rtnetlink
/// (a NETLINK_ROUTE socket: bound, connected to the kernel, one request and
/// its answer at a time) to delete the taps Keel created or take the others
/// off their bridge. It keeps CAP_NET_ADMIN, so its list is the shortest
/// that does that.
fn teardown(r: &mut Rules) -> Result<(), SeccompError> {
    when_arg_in(r, libc::SYS_socket, 0, &[libc::AF_NETLINK as u64])?;
    allow(
        r,
        &[
            libc::SYS_bind,
            libc::SYS_getsockname,
            libc::SYS_connect,
            libc::SYS_sendto,
            libc::SYS_recvfrom,
        ],
    );
    Ok(())
}

/// The API: accepting connections, one thread per connection (`clone`
/// with CLONE_THREAD only; `clone3`, whose flags a filter cannot see, fails
/// with ENOSYS and the C library falls back to `clone`), reading requests
/// and writing answers and console streams.
fn api(r: &mut Rules) -> Result<(), SeccompError> {
    allow(r, &[libc::SYS_setpriority]);
    allow(r, STREAM_SOCKET_IO);
    // Allowed here, answered ENOSYS by the second filter (see
    // [`super::clone3_fallback`]).
    allow(r, &[libc::SYS_clone3]);
    r.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
            libc::CLONE_THREAD as u64,
        )?])?],
    );
    when_arg_in(r, libc::SYS_ioctl, 1, &[FIONBIO, FIOCLEX])?;
    Ok(())
}
