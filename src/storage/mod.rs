//! The storage interface under the NBD server, and its local-disk implementation.
//!
//! A [`BlockDevice`] is a fixed-size array of bytes. Each client connection opens its own
//! [`IoQueue`] on it: a submission/completion queue pair, like the device's own hardware queues,
//! so that one connection can keep many operations in flight and receive them back in completion
//! order. A replicated device implements the same two traits on top of a local one.

mod buffer;
pub mod faulty;
mod file;
mod meta_io;
mod uring_queue;

pub use buffer::{BufPool, IoBuf, BUF_ALIGN};
pub use file::{FileDevice, OpenError, OpenOptions};
pub use meta_io::MetaIo;

use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::task::{Context, Poll};

/// What a device supports, fixed for its lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    pub size: u64,
    pub read_only: bool,
    pub rotational: bool,
    /// Smallest I/O the device handles efficiently (1 for buffered files).
    pub min_block: u32,
    /// Whether [`IoOp::Trim`] may actually discard (otherwise it succeeds as a no-op).
    pub can_trim: bool,
}

/// One operation on a device. Buffers travel with the operation and come back in its
/// [`Completion`], so the caller can recycle them.
#[derive(Debug)]
pub enum IoOp {
    /// Fill `buf` (all of its length) from `offset`.
    Read { offset: u64, buf: IoBuf },
    /// Write `buf` at `offset`; with `fua`, durable before completion.
    Write { offset: u64, buf: IoBuf, fua: bool },
    /// Make every write completed before this was submitted durable.
    Flush,
    /// Discard a range (advisory: contents afterwards are unspecified).
    Trim { offset: u64, len: u64, fua: bool },
    /// Make a range read as zeroes. `may_punch`: deallocating is allowed. `fast_only`: fail with
    /// [`IoError::NotSupported`] rather than fall back to writing zeroes.
    WriteZeroes { offset: u64, len: u64, may_punch: bool, fast_only: bool, fua: bool },
    /// Prefetch a range into the cache.
    Cache { offset: u64, len: u64 },
}

impl IoOp {
    /// Takes the data buffer out of a finished operation.
    pub fn into_buf(self) -> Option<IoBuf> {
        match self {
            IoOp::Read { buf, .. } | IoOp::Write { buf, .. } => Some(buf),
            _ => None,
        }
    }
}

/// A finished operation, identified by the tag it was submitted with.
#[derive(Debug)]
pub struct Completion {
    pub tag: u32,
    pub result: Result<(), IoError>,
    pub buf: Option<IoBuf>,
}

/// Why an operation failed, in the categories clients can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    #[error("I/O error (errno {0})")]
    Io(i32),
    #[error("no space left on the backing store")]
    NoSpace,
    #[error("the device is read-only")]
    ReadOnly,
    #[error("operation not supported by the backing store")]
    NotSupported,
    #[error("the device is shutting down")]
    Shutdown,
}

impl IoError {
    /// Classifies a (positive) errno from the backing store.
    pub fn from_errno(errno: i32) -> Self {
        match errno {
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => IoError::NoSpace,
            libc::EROFS | libc::EPERM | libc::EACCES => IoError::ReadOnly,
            libc::EOPNOTSUPP => IoError::NotSupported,
            other => IoError::Io(other),
        }
    }
}

/// Allocation state of a run of bytes, for NBD_CMD_BLOCK_STATUS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// Not allocated on the backing store (and reads as zeroes).
    pub hole: bool,
}

/// A fixed-size block device that connections open queues on.
pub trait BlockDevice: Send + Sync {
    fn info(&self) -> DeviceInfo;

    /// Opens a queue for one client connection.
    fn open_queue(self: Arc<Self>) -> std::io::Result<Box<dyn IoQueue>>;

    /// Describes allocation of `[offset, offset+len)` as a run of extents, which may stop short
    /// of `len` (but covers at least one byte). `max_extents` bounds the answer.
    fn block_status(&self, offset: u64, len: u64, max_extents: usize) -> Result<Vec<Extent>, IoError>;

    /// Makes every write completed so far durable, from the calling thread (like
    /// [`IoOp::Flush`], for callers outside a queue: metadata transactions, shutdown).
    fn sync(&self) -> Result<(), IoError>;

    /// Whether [`BlockDevice::splice_write`] works: data can move from a pipe into the device
    /// without passing through user memory.
    fn accepts_splice(&self) -> bool {
        false
    }

    /// Moves up to `len` bytes from the pipe `from` into the device at `offset`, completing like
    /// a (non-FUA) write; returns how many bytes moved.
    fn splice_write(&self, _from: BorrowedFd<'_>, _offset: u64, _len: usize) -> Result<usize, IoError> {
        Err(IoError::NotSupported)
    }
}

/// A submission/completion queue on a device, owned by one connection.
pub trait IoQueue: Send {
    /// Queues `op`; it is started by the next [`IoQueue::poll_complete`].
    fn submit(&mut self, tag: u32, op: IoOp);

    /// Starts queued operations and appends finished ones to `out`. Returns `Ready` when it
    /// appended something or nothing is in flight; otherwise arranges for `cx` to be woken.
    fn poll_complete(&mut self, cx: &mut Context<'_>, out: &mut Vec<Completion>) -> Poll<()>;

    /// Operations submitted and not yet completed.
    fn in_flight(&self) -> usize;
}
