//! Whether this node's backing disk may still be used, and where its errors are reported.
//!
//! A read, write or flush the local disk fails is reported here by whoever saw it (the
//! Primary's queues, the activity log, the resync, the applier). Under `detach` (DRBD's default
//! `on-io-error`) a write or flush error makes the disk unusable at once, before the failing
//! request is answered: from then on the device sends every request to the peer, and nothing
//! reads the disk again, whose contents can no longer be trusted. The node hears of each error
//! through [`DiskHealth::subscribe`] and carries out the rest (metadata, state, peer, handler).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tokio::sync::mpsc;

use crate::storage::IoError;

/// What a local disk error does (the replication side of `on-io-error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ErrorPolicy {
    /// Any error makes the disk unusable (Failed, then Diskless).
    #[default]
    Detach,
    /// A read error is retried on the peer and the disk stays; write, flush and metadata errors
    /// still detach on a Primary (its data would be stale where the write failed).
    PassOn,
}

/// The operation that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskOp {
    Read,
    Write,
    Flush,
    /// A metadata write (superblock, bitmap, activity log).
    Metadata,
}

impl DiskOp {
    pub const fn as_str(self) -> &'static str {
        match self {
            DiskOp::Read => "read",
            DiskOp::Write => "write",
            DiskOp::Flush => "flush",
            DiskOp::Metadata => "metadata write",
        }
    }
}

/// One failed operation on the local disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskError {
    pub op: DiskOp,
    /// Where, for reads and writes.
    pub offset: Option<u64>,
    pub error: String,
}

impl DiskError {
    pub fn new(op: DiskOp, offset: Option<u64>, error: impl std::fmt::Display) -> Self {
        DiskError { op, offset, error: error.to_string() }
    }

    /// Whether it leaves the disk's contents behind the data that was acknowledged.
    pub fn loses_data(&self) -> bool {
        self.op != DiskOp::Read
    }
}

impl std::fmt::Display for DiskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.offset {
            Some(offset) => {
                write!(f, "local disk {} at offset {offset:#x} failed: {}", self.op.as_str(), self.error)
            }
            None => write!(f, "local disk {} failed: {}", self.op.as_str(), self.error),
        }
    }
}

/// Whether the local disk is in use, and the channel its errors go to.
#[derive(Debug)]
pub struct DiskHealth {
    usable: AtomicBool,
    policy: ErrorPolicy,
    reports: Mutex<Option<mpsc::UnboundedSender<DiskError>>>,
}

impl DiskHealth {
    pub fn new(policy: ErrorPolicy) -> Self {
        DiskHealth { usable: AtomicBool::new(true), policy, reports: Mutex::new(None) }
    }

    pub fn policy(&self) -> ErrorPolicy {
        self.policy
    }

    /// Whether requests may go to the local disk.
    pub fn usable(&self) -> bool {
        self.usable.load(Ordering::Acquire)
    }

    /// The disk is attached again (after `rdbd attach`).
    pub fn attached(&self) {
        self.usable.store(true, Ordering::Release);
    }

    /// Stops all use of the disk (a failure, or the operator's `detach`).
    pub fn detach(&self) {
        self.usable.store(false, Ordering::Release);
    }

    /// Errors from now on go to the returned receiver (the node's).
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<DiskError> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.reports.lock().expect("disk health lock") = Some(tx);
        rx
    }

    /// Records a failed operation: returns whether the disk stopped being used (it had been
    /// usable, and the error detaches it under the policy).
    pub fn failed(&self, error: DiskError) -> bool {
        let detach = self.policy == ErrorPolicy::Detach || error.loses_data();
        let detached_now = detach && self.usable.swap(false, Ordering::AcqRel);
        if let Some(tx) = self.reports.lock().expect("disk health lock").as_ref() {
            let _ = tx.send(error);
        }
        detached_now
    }

    /// Reports an [`IoError`] of the local disk, if it is one (`Io`): a request the disk does
    /// not support, or one past its end, says nothing about the disk's health.
    pub fn check(&self, op: DiskOp, offset: Option<u64>, result: &Result<(), IoError>) -> Option<bool> {
        match result {
            Err(e @ IoError::Io(_)) => Some(self.failed(DiskError::new(op, offset, e))),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detach_stops_use_on_the_first_error_and_reports_every_one() {
        let health = DiskHealth::new(ErrorPolicy::Detach);
        let mut rx = health.subscribe();
        assert!(health.usable());
        assert_eq!(
            health.check(DiskOp::Read, Some(0), &Err(IoError::NotSupported)),
            None,
            "not the disk's fault"
        );
        assert_eq!(health.check(DiskOp::Read, Some(4096), &Err(IoError::Io(libc::EIO))), Some(true));
        assert!(!health.usable());
        assert_eq!(
            health.check(DiskOp::Write, Some(0), &Err(IoError::Io(libc::EIO))),
            Some(false),
            "already"
        );
        assert_eq!(rx.try_recv().unwrap().op, DiskOp::Read);
        assert_eq!(rx.try_recv().unwrap().op, DiskOp::Write);
    }

    #[test]
    fn pass_on_keeps_the_disk_after_a_read_error_but_not_after_a_write_error() {
        let health = DiskHealth::new(ErrorPolicy::PassOn);
        assert!(!health.failed(DiskError::new(DiskOp::Read, Some(0), "EIO")));
        assert!(health.usable());
        assert!(health.failed(DiskError::new(DiskOp::Flush, None, "EIO")));
        assert!(!health.usable());
        let shown = DiskError::new(DiskOp::Write, Some(0x1000), "I/O error (errno 5)").to_string();
        assert_eq!(shown, "local disk write at offset 0x1000 failed: I/O error (errno 5)");
    }
}
