//! The sync target, on the daemon's own bookkeeping ([`ResyncTarget`]): it asks the source for
//! the runs its bitmap marks (in disk order, within a window), writes the data through the
//! apply order as it arrives, flushes now and then, and only after that flush clears the bits
//! and acknowledges the ranges — so the source never forgets a block that a power loss here
//! could still undo.

use std::time::Duration;

use rdbd_protocol::repl::DigestAlg;

use crate::replication::resync::pace::ResyncConfig;
use crate::replication::resync::target::{Answers, ResyncTarget};

use super::bugs::Bug;
use super::io::{Effect, PeerMessage};
use super::node::{IoPurpose, Link, NodeCore};

/// A resync this node is the target of.
pub(super) struct Target {
    /// Tells a late completion of an earlier resync's flush or write apart.
    pub(super) id: u64,
    pub(super) bookkeeping: ResyncTarget,
    answers: Answers,
    /// Checksum requests whose range this disk is still to read (see `pump_target`).
    to_read: Vec<(u64, u64)>,
}

impl<P: Clone + PartialEq> NodeCore<P> {
    /// Starts pulling (the disk is durably Inconsistent in the source's new generation).
    pub(super) fn start_target(&mut self) {
        self.resyncs += 1;
        // The algorithm is the daemon's to compute; the core sends the data itself (see
        // `PeerMessage::ResyncRequest`).
        let csums = self.cfg.csums.then_some(DigestAlg::Crc32c);
        let bookkeeping =
            ResyncTarget::new(self.cfg.size, self.cfg.bitmap_block, ResyncConfig::default(), csums, self.now);
        self.target =
            Some(Target { id: self.resyncs, bookkeeping, answers: Answers::default(), to_read: Vec::new() });
    }

    /// Requests what the window allows and starts a flush when one is due.
    pub(super) fn pump_target(&mut self) {
        if !matches!(self.link, Link::Up { .. }) || !self.target_ready() {
            return;
        }
        let now = self.now;
        let Some(target) = self.target.as_mut() else { return };
        let (id, csums) = (target.id, target.bookkeeping.csums().is_some());
        let mut requests = Vec::new();
        while let Some((offset, len)) = target.bookkeeping.next_request(&self.bitmap) {
            requests.push((offset, offset + u64::from(len)));
        }
        if !csums {
            for (offset, end) in requests {
                self.send(PeerMessage::ResyncRequest { offset, len: end - offset, digest: None });
            }
        } else {
            // What this disk holds goes with the request, read outside the apply order (as the
            // daemon's: a write of this connection racing the read only makes the two differ)
            // but after any write of the peer's still to land here: one from an earlier
            // connection, which the source no longer has in mind, would land after a read that
            // found the range equal, and the two would differ unmarked (seed 110274).
            target.to_read.extend(requests);
            let mut to_read = std::mem::take(&mut target.to_read);
            to_read.retain(|&range| {
                if self.applier.overlaps_unfinished(range) {
                    return true;
                }
                let io = self.start_io(IoPurpose::CsumRead(range, id));
                self.effects.push_back(Effect::Read { io, offset: range.0, len: range.1 - range.0 });
                false
            });
            if let Some(target) = self.target.as_mut() {
                target.to_read = to_read;
            }
        }
        let Some(target) = self.target.as_mut() else { return };
        if !target.bookkeeping.flush_due(now) {
            return;
        }
        target.bookkeeping.flush_started();
        let id = target.id;
        if self.cfg.bugs.has(Bug::AckResyncBeforeFlush) {
            return self.target_flushed(id, true);
        }
        let io = self.start_io(IoPurpose::TargetFlush(id));
        self.effects.push_back(Effect::Flush { io });
    }

    /// The read for a checksum request is done: the request goes out with what it read (a
    /// failed read detached this disk already, and the link ends).
    pub(super) fn csum_read_done(&mut self, (start, end): (u64, u64), id: u64, ok: bool, data: Option<P>) {
        let current = self.target.as_ref().is_some_and(|t| t.id == id);
        if let (true, true, Some(data)) = (current, ok, data) {
            self.send(PeerMessage::ResyncRequest { offset: start, len: end - start, digest: Some(data) });
        }
    }

    /// ResyncInSync closed the checksum request at `offset` (its data, if any, is written):
    /// false if it closes none (the link ends).
    pub(super) fn target_in_sync(&mut self, offset: u64, len: u64) -> bool {
        let now = self.now;
        let Some(target) = self.target.as_mut() else { return false };
        let Ok(len) = u32::try_from(len) else { return false };
        let Target { bookkeeping, answers, .. } = target;
        if bookkeeping.in_sync(offset, len, now, answers).is_err() {
            return false;
        }
        self.send_target_answers();
        true
    }

    /// Resync data arrived: the request it answers, or `None` if it answers none (the link
    /// ends: the source sent what was not asked for).
    pub(super) fn target_data(&mut self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let target = self.target.as_mut()?;
        let key = target.bookkeeping.data(offset, len as usize).ok()?;
        Some((target.id, key))
    }

    /// A write of resync data for request `key` of resync `id` is done.
    pub(super) fn target_written(&mut self, id: u64, key: u64, ok: bool) {
        let now = self.now;
        let Some(target) = self.target.as_mut().filter(|t| t.id == id) else { return };
        let Target { bookkeeping, answers, .. } = target;
        bookkeeping.written(key, if ok { Ok(()) } else { Err(5) }, now, answers);
        self.send_target_answers();
    }

    /// The flush of resync `id` is done: what it covered is cleared and acknowledged.
    pub(super) fn target_flushed(&mut self, id: u64, ok: bool) {
        let Some(target) = self.target.as_mut().filter(|t| t.id == id) else { return };
        let Target { bookkeeping, answers, .. } = target;
        bookkeeping.flush_done(if ok { Ok(()) } else { Err(5) }, &mut self.bitmap, answers);
        self.send_target_answers();
    }

    /// A failed write or flush detached this disk already (the link ends); only the acks go.
    fn send_target_answers(&mut self) {
        let Some(target) = self.target.as_mut() else { return };
        target.answers.failed.clear();
        for (offset, len) in target.answers.acks.drain(..) {
            self.effects.push_back(Effect::Send(PeerMessage::ResyncAck { offset, len: u64::from(len) }));
        }
    }

    /// The controller's step (the driver's tick stands for its 100 ms).
    pub(super) fn step_target(&mut self, now: Duration) {
        self.now = now;
        if let Some(target) = self.target.as_mut() {
            target.bookkeeping.step();
        }
    }

    /// Resync data is written once the disk is durably marked Inconsistent.
    pub(super) fn target_ready(&self) -> bool {
        self.applier.ready_at().is_some_and(|n| self.persisted(n))
    }

    /// Whether nothing of this resync is outstanding and every block is clean.
    pub(super) fn target_done(&self) -> bool {
        self.target.as_ref().is_none_or(|t| t.bookkeeping.idle()) && self.bitmap.dirty_blocks() == 0
    }
}
