//! An [`IoQueue`] on a [`FileDevice`] backed by one io_uring per connection.
//!
//! Each connection owning its ring means completions need no routing and no locks: the
//! connection's task submits, reaps and is woken (through an eventfd registered with the ring and
//! watched by tokio) all by itself. Reads and writes that the kernel splits are resubmitted for
//! the remainder; FUA on trim/zeroes is a follow-up fdatasync.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::task::{Context, Poll};

use io_uring::{opcode, squeue, types, IoUring};
use slab::Slab;
use tokio::io::unix::AsyncFd;

use super::file::FileDevice;
use super::{Completion, IoBuf, IoError, IoOp, IoQueue};

/// Ring size: at least as many entries as a connection keeps in flight.
const RING_ENTRIES: u32 = 256;
/// Chunk of zeroes written when the backing store cannot zero a range by itself.
const ZERO_CHUNK: usize = 1 << 20;

/// Where a multi-step operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The main read/write/fsync/fallocate/fadvise.
    Main,
    /// Writing zeroes in chunks after fallocate was not supported.
    ZeroFill,
    /// The fdatasync that makes a FUA trim or zeroing durable.
    SyncAfter,
}

struct Op {
    tag: u32,
    op: IoOp,
    /// Bytes already done (read/write/zero-fill progress).
    done: u64,
    stage: Stage,
}

pub(super) struct UringQueue {
    device: Arc<FileDevice>,
    ring: IoUring,
    eventfd: AsyncFd<OwnedFd>,
    ops: Slab<Op>,
    /// Operations waiting for room in the submission queue.
    backlog: VecDeque<usize>,
    /// Whether entries were pushed since the last submit.
    unsubmitted: bool,
    zeroes: Option<IoBuf>,
    /// Operations that finished without the ring (inline buffered writes).
    finished: Vec<Completion>,
}

impl UringQueue {
    pub(super) fn new(device: Arc<FileDevice>) -> io::Result<Self> {
        let ring = IoUring::new(RING_ENTRIES)?;
        ring.submitter().register_files(&device.raw_fds())?;
        let efd = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::NONBLOCK | rustix::event::EventfdFlags::CLOEXEC,
        )?;
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        // One kernel worker per connection for work that cannot complete inline: several would
        // only contend for the same file's locks.
        let mut workers = [1u32, 1u32];
        ring.submitter().register_iowq_max_workers(&mut workers)?;
        // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and the same.
        let eventfd = unsafe { AsyncFd::register_with_interest(efd, tokio::io::Interest::READABLE)? };
        Ok(Self {
            device,
            ring,
            eventfd,
            ops: Slab::with_capacity(RING_ENTRIES as usize),
            backlog: VecDeque::new(),
            unsubmitted: false,
            zeroes: None,
            finished: Vec::new(),
        })
    }

    /// Builds the submission entry for the current step of operation `key`.
    fn entry(&mut self, key: usize) -> squeue::Entry {
        let device = &self.device;
        let zeroes = &mut self.zeroes;
        let op = &mut self.ops[key];
        let sync = || opcode::Fsync::new(types::Fixed(0)).flags(types::FsyncFlags::DATASYNC).build();
        let entry = match (op.stage, &mut op.op) {
            (Stage::SyncAfter, _) | (Stage::Main, IoOp::Flush) => sync(),
            (Stage::Main, IoOp::Read { offset, buf }) => {
                let done = op.done as usize;
                let fd = types::Fixed(device.fd_index_for(*offset, buf.len()));
                // SAFETY (pointer validity): buf stays in self.ops until the completion arrives.
                let ptr = unsafe { buf.as_mut_ptr().add(done) };
                opcode::Read::new(fd, ptr, (buf.len() - done) as u32).offset(*offset + op.done).build()
            }
            (Stage::Main, IoOp::Write { offset, buf, fua }) => {
                let done = op.done as usize;
                let fd = types::Fixed(device.fd_index_for(*offset, buf.len()));
                // SAFETY: as above.
                let ptr = unsafe { buf.as_ptr().add(done) };
                let flags = if *fua { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(fd, ptr, (buf.len() - done) as u32)
                    .offset(*offset + op.done)
                    .rw_flags(flags)
                    .build()
            }
            (Stage::Main, IoOp::Trim { offset, len, .. }) => fallocate(*offset, *len, punch_mode()),
            (Stage::Main, IoOp::WriteZeroes { offset, len, may_punch, .. }) => {
                let mode = if *may_punch {
                    punch_mode()
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                fallocate(*offset, *len, mode)
            }
            (Stage::ZeroFill, IoOp::WriteZeroes { offset, len, .. }) => {
                let zeroes = zeroes.get_or_insert_with(|| {
                    let mut z = IoBuf::with_capacity(ZERO_CHUNK);
                    z.set_len(ZERO_CHUNK);
                    z
                });
                let chunk = (*len - op.done).min(ZERO_CHUNK as u64) as u32;
                let start = *offset + op.done;
                let fd = types::Fixed(device.fd_index_for(start, chunk as usize));
                opcode::Write::new(fd, zeroes.as_ptr(), chunk).offset(start).build()
            }
            (Stage::Main, IoOp::Cache { offset, len }) => {
                let len = (*len).min(i64::MAX as u64) as libc::off_t;
                opcode::Fadvise::new(types::Fixed(0), len, libc::POSIX_FADV_WILLNEED).offset(*offset).build()
            }
            (Stage::ZeroFill, _) => unreachable!("only WriteZeroes fills with zeroes"),
        };
        entry.user_data(key as u64)
    }

    /// Pushes `key`'s next step to the submission queue, or parks it in the backlog.
    fn push(&mut self, key: usize) {
        if !self.backlog.is_empty() {
            self.backlog.push_back(key);
            return;
        }
        let entry = self.entry(key);
        // SAFETY: the entry's buffers live in self.ops until its completion is reaped.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.backlog.push_back(key);
        } else {
            self.unsubmitted = true;
        }
    }

    /// Moves backlog entries into free submission slots and tells the kernel about them.
    fn flush_submissions(&mut self) {
        while let Some(&key) = self.backlog.front() {
            let entry = self.entry(key);
            // SAFETY: as in push.
            if unsafe { self.ring.submission().push(&entry) }.is_err() {
                break;
            }
            self.backlog.pop_front();
            self.unsubmitted = true;
        }
        if self.unsubmitted {
            // EBUSY/EAGAIN mean the completion side is full; reaping below makes room.
            if self.ring.submit().is_ok() {
                self.unsubmitted = false;
            }
        }
    }

    /// Handles one completion: either the operation is finished (returned) or its next step is
    /// pushed.
    fn complete_step(&mut self, key: usize, res: i32) -> Option<Completion> {
        let op = &mut self.ops[key];
        let outcome: Result<bool, IoError> = if res == -libc::EINTR || res == -libc::EAGAIN {
            Ok(false) // retry the same step
        } else {
            match (op.stage, &op.op) {
                (Stage::Main, IoOp::Read { buf, .. }) | (Stage::Main, IoOp::Write { buf, .. }) => {
                    if res < 0 {
                        Err(IoError::from_errno(-res))
                    } else if res == 0 {
                        Err(IoError::Io(libc::EIO)) // unexpected end of the backing store
                    } else {
                        op.done += res as u64;
                        Ok(op.done >= buf.len() as u64)
                    }
                }
                (Stage::Main, IoOp::Trim { fua, .. }) => {
                    // Trim is advisory: a store that cannot discard still succeeds.
                    if res < 0 && res != -libc::EOPNOTSUPP && res != -libc::EINVAL {
                        Err(IoError::from_errno(-res))
                    } else if *fua {
                        op.stage = Stage::SyncAfter;
                        Ok(false)
                    } else {
                        Ok(true)
                    }
                }
                (Stage::Main, IoOp::WriteZeroes { fast_only, fua, .. }) => {
                    if res == -libc::EOPNOTSUPP || res == -libc::EINVAL {
                        if *fast_only {
                            Err(IoError::NotSupported)
                        } else {
                            op.stage = Stage::ZeroFill;
                            Ok(false)
                        }
                    } else if res < 0 {
                        Err(IoError::from_errno(-res))
                    } else if *fua {
                        op.stage = Stage::SyncAfter;
                        Ok(false)
                    } else {
                        Ok(true)
                    }
                }
                (Stage::ZeroFill, IoOp::WriteZeroes { len, fua, .. }) => {
                    if res <= 0 {
                        Err(IoError::from_errno(if res == 0 { libc::EIO } else { -res }))
                    } else {
                        op.done += res as u64;
                        if op.done < *len {
                            Ok(false)
                        } else if *fua {
                            op.stage = Stage::SyncAfter;
                            Ok(false)
                        } else {
                            Ok(true)
                        }
                    }
                }
                // Prefetching is a hint: never fail it.
                (Stage::Main, IoOp::Cache { .. }) => Ok(true),
                (Stage::Main, IoOp::Flush) | (Stage::SyncAfter, _) => {
                    if res < 0 {
                        Err(IoError::from_errno(-res))
                    } else {
                        Ok(true)
                    }
                }
                (Stage::ZeroFill, _) => unreachable!("only WriteZeroes fills with zeroes"),
            }
        };
        match outcome {
            Ok(false) => {
                self.push(key);
                None
            }
            Ok(true) => {
                let op = self.ops.remove(key);
                Some(Completion { tag: op.tag, result: Ok(()), buf: op.op.into_buf() })
            }
            Err(e) => {
                let op = self.ops.remove(key);
                Some(Completion { tag: op.tag, result: Err(e), buf: op.op.into_buf() })
            }
        }
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        loop {
            let mut batch: [(u64, i32); 32] = [(0, 0); 32];
            let mut n = 0;
            for cqe in self.ring.completion().take(batch.len()) {
                batch[n] = (cqe.user_data(), cqe.result());
                n += 1;
            }
            if n == 0 {
                return;
            }
            for &(key, res) in &batch[..n] {
                if let Some(done) = self.complete_step(key as usize, res) {
                    out.push(done);
                }
            }
        }
    }

    /// Clears the eventfd counter after a wakeup.
    fn drain_eventfd(&self) {
        let mut counter = [0u8; 8];
        let _ = rustix::io::read(self.eventfd.get_ref(), &mut counter);
    }
}

fn punch_mode() -> i32 {
    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
}

fn fallocate(offset: u64, len: u64, mode: i32) -> squeue::Entry {
    opcode::Fallocate::new(types::Fixed(0), len).offset(offset).mode(mode).build()
}

impl IoQueue for UringQueue {
    fn submit(&mut self, tag: u32, op: IoOp) {
        if let IoOp::Write { offset, buf, fua: false } = &op {
            if self.device.inline_buffered_writes() && self.device.fd_index_for(*offset, buf.len()) == 0 {
                let result = self.device.write_buffered_now(buf, *offset);
                self.finished.push(Completion { tag, result, buf: op.into_buf() });
                return;
            }
        }
        if let IoOp::WriteZeroes { may_punch: false, fast_only: true, .. } = op {
            if self.device.is_block_device() {
                // A block device zeroes without deallocating only by a method that may fall back
                // to writing zeroes, which is not the fast path FAST_ZERO asks for.
                self.finished.push(Completion { tag, result: Err(IoError::NotSupported), buf: None });
                return;
            }
        }
        let key = self.ops.insert(Op { tag, op, done: 0, stage: Stage::Main });
        self.push(key);
    }

    fn poll_complete(&mut self, cx: &mut Context<'_>, out: &mut Vec<Completion>) -> Poll<()> {
        let before = out.len();
        out.append(&mut self.finished);
        loop {
            self.flush_submissions();
            self.reap(out);
            if out.len() > before || self.ops.is_empty() {
                return Poll::Ready(());
            }
            if self.unsubmitted || !self.backlog.is_empty() {
                continue; // follow-up steps were queued by reap
            }
            match self.eventfd.poll_read_ready(cx) {
                Poll::Ready(Ok(mut guard)) => {
                    self.drain_eventfd();
                    guard.clear_ready();
                }
                Poll::Ready(Err(_)) => {
                    // The eventfd cannot fail in practice; fall back to blocking for one event.
                    let _ = self.ring.submit_and_wait(1);
                }
                Poll::Pending => {
                    // A completion may have landed between reaping and registering the waker.
                    if self.ring.completion().is_empty() {
                        return Poll::Pending;
                    }
                }
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.ops.len() + self.finished.len()
    }
}

impl Drop for UringQueue {
    fn drop(&mut self) {
        // The kernel may still write into buffers we own: wait for every operation to finish
        // before they are freed.
        let mut sink = Vec::new();
        while !self.ops.is_empty() {
            self.flush_submissions();
            self.reap(&mut sink);
            if self.ops.is_empty() {
                break;
            }
            if self.ring.submit_and_wait(1).is_err() {
                std::thread::yield_now();
            }
            sink.clear();
        }
    }
}
