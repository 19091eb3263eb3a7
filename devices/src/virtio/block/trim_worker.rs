//! The disk's trim worker: a thread of its own that runs the discards no
//! io_uring operation can do (BLKDISCARD on a block device) and the
//! discards and write-zeroes around a copy-on-write range, so that the
//! device thread, which serves every disk, NIC and vsock, never waits for
//! one. A discard of 2 GiB on a thin LVM volume can take seconds.
//!
//! The device thread validates the request and reads its segment from guest
//! memory before it hands the job over: the worker sees only disk offsets
//! and never touches guest memory. It answers through a channel and an
//! eventfd that the device thread watches. At most one job per request slot
//! is ever queued (a virtqueue has as many slots as descriptors), so the
//! channel is bounded by the disk's queue count times the queue size. Jobs
//! come from every queue of the disk; a result names its queue.
//!
//! The worker runs only once someone takes it from the device
//! ([`VirtioBlock::take_trim_worker`](super::VirtioBlock::take_trim_worker))
//! and calls [`TrimWorker::run`] on a thread (Keel confines that thread with
//! its own seccomp allow-list first). A device whose worker nobody took does
//! these trims inline, as a device with the synchronous engine always does.

use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};

use log::warn;
use vmm_sys_util::eventfd::EventFd;

use super::backend::DiskBackend;

/// What to do with the pieces of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TrimOp {
    /// Deallocate (DISCARD).
    Discard,
    /// Zero, deallocating if `unmap` (WRITE_ZEROES).
    Zeroes {
        /// The request's unmap flag.
        unmap: bool,
    },
}

/// One discard or write-zeroes request, already validated.
#[derive(Debug)]
pub(crate) struct TrimJob {
    /// The activation of the queue the request came from.
    pub generation: u64,
    /// The position of that queue among those served.
    pub queue: u16,
    /// The request's slot.
    pub tag: u16,
    /// What to do.
    pub op: TrimOp,
    /// Byte ranges of the disk (at most two: around a copy-on-write range).
    pub pieces: [(u64, u64); 2],
    /// How many of `pieces` are used.
    pub count: usize,
}

/// The result of a job.
#[derive(Debug)]
pub(crate) struct TrimDone {
    /// As in the job.
    pub generation: u64,
    /// As in the job.
    pub queue: u16,
    /// As in the job.
    pub tag: u16,
    /// 0, or the negated errno of the first piece that failed.
    pub res: i32,
}

/// The device thread's end of the worker.
#[derive(Debug)]
pub(crate) struct TrimQueue {
    jobs: SyncSender<TrimJob>,
    done: Receiver<TrimDone>,
    /// Written by the worker after each job.
    done_evt: EventFd,
}

/// The worker's end: runs jobs until the device is dropped.
#[derive(Debug)]
pub struct TrimWorker {
    disk: DiskBackend,
    jobs: Receiver<TrimJob>,
    done: mpsc::Sender<TrimDone>,
    done_evt: EventFd,
}

/// Both ends of a worker for `disk` (a second descriptor of the device's
/// disk) whose queue holds up to `depth` jobs.
pub(crate) fn channel(disk: DiskBackend, depth: usize) -> std::io::Result<(TrimQueue, TrimWorker)> {
    let (jobs_tx, jobs_rx) = mpsc::sync_channel(depth);
    let (done_tx, done_rx) = mpsc::channel();
    let done_evt = EventFd::new(libc::EFD_NONBLOCK)?;
    let worker_evt = done_evt.try_clone()?;
    Ok((
        TrimQueue {
            jobs: jobs_tx,
            done: done_rx,
            done_evt,
        },
        TrimWorker {
            disk,
            jobs: jobs_rx,
            done: done_tx,
            done_evt: worker_evt,
        },
    ))
}

impl TrimQueue {
    /// Queues `job`; gives it back if the worker is gone or (which the slot
    /// count rules out) its queue is full, for the caller to run inline.
    pub fn submit(&self, job: TrimJob) -> Result<(), TrimJob> {
        self.jobs.try_send(job).map_err(|e| match e {
            TrySendError::Full(j) | TrySendError::Disconnected(j) => j,
        })
    }

    /// The eventfd that says results are waiting.
    pub fn done_evt(&self) -> &EventFd {
        &self.done_evt
    }

    /// Takes every result waiting (and the eventfd's count).
    pub fn take_done(&self, mut f: impl FnMut(TrimDone)) {
        let _ = self.done_evt.read();
        while let Ok(d) = self.done.try_recv() {
            f(d);
        }
    }
}

/// Runs `op` on `pieces` of `disk`: 0 or the first failure's negated errno.
pub(crate) fn run_job(disk: &DiskBackend, op: TrimOp, pieces: &[(u64, u64)]) -> i32 {
    let r = pieces.iter().try_for_each(|&(offset, len)| match op {
        TrimOp::Discard => disk.discard(offset, len),
        TrimOp::Zeroes { unmap } => disk.write_zeroes(offset, len, unmap),
    });
    match r {
        Ok(()) => 0,
        Err(e) => {
            warn!("virtio-blk: {op:?} failed: {e}");
            -e.raw_os_error().unwrap_or(libc::EIO)
        }
    }
}

impl TrimWorker {
    /// Serves jobs until the device (the sending end) is dropped.
    pub fn run(self) {
        while let Ok(job) = self.jobs.recv() {
            let count = job.count.min(job.pieces.len());
            let res = run_job(&self.disk, job.op, &job.pieces[..count]);
            let done = TrimDone {
                generation: job.generation,
                queue: job.queue,
                tag: job.tag,
                res,
            };
            if self.done.send(done).is_err() {
                return;
            }
            if let Err(e) = self.done_evt.write(1) {
                warn!("virtio-blk: trim worker cannot signal: {e}");
            }
        }
    }
}
