//! The peer's side of replication and the sync target: requests are applied in arrival order
//! (a request waits for any earlier one that overlaps it, a flush for every earlier one) and
//! answered once done — a flush, a FUA write and resync data only once the disk has flushed
//! them, since the Primary takes those answers as "stable here".

use std::collections::{BTreeMap, VecDeque};

use crate::metadata::bitmap::DirtyBitmap;

use super::bugs::Bug;
use super::io::{Effect, PeerMessage};
use super::ledger::{Answer, Range};
use super::node::{IoPurpose, NodeCore};

#[derive(Debug, Clone, Copy)]
enum Running {
    Write {
        range: Range,
        seq: u64,
        fua: bool,
        flushing: bool,
    },
    Flush {
        seq: u64,
    },
    Resync {
        range: Range,
        flushing: bool,
    },
    /// A verify's read (either side's), with the peer's data when this side compares.
    Verify {
        range: Range,
    },
}

/// Requests received from the peer and not yet answered.
pub(super) struct Applier<P> {
    queue: VecDeque<PeerMessage<P>>,
    next_position: u64,
    /// In flight on the disk, by queue position, with the connection they came on.
    running: BTreeMap<u64, (u64, Running)>,
    /// Counts connections: answers for an earlier one are not sent.
    connection: u64,
    /// Resync data is written once this metadata image (the disk marked Inconsistent) is durable.
    target_ready_at: Option<u64>,
    /// Verify reads in flight by queue position: the range, and the peer's data to compare with
    /// (none: this side answers a request).
    verifying: BTreeMap<u64, (Range, Option<P>)>,
}

impl<P> Default for Applier<P> {
    fn default() -> Self {
        Self {
            queue: VecDeque::new(),
            next_position: 0,
            running: BTreeMap::new(),
            connection: 0,
            target_ready_at: None,
            verifying: BTreeMap::new(),
        }
    }
}

impl<P> Applier<P> {
    pub(super) fn receive(&mut self, message: PeerMessage<P>) {
        self.queue.push_back(message);
    }

    pub(super) fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.running.is_empty()
    }

    pub(super) fn target_ready_at(&mut self, image: u64) {
        self.target_ready_at = Some(image);
    }

    /// The connection ended: what was not started is dropped (the Primary counts it as lost),
    /// what runs finishes on the disk without an answer.
    pub(super) fn link_down(&mut self) {
        self.queue.clear();
        self.connection += 1;
        self.target_ready_at = None;
    }

    /// Whether a write applied for the peer and still in flight overlaps `range`.
    pub(super) fn overlaps_running(&self, (start, end): Range) -> bool {
        self.running.values().any(|(_, r)| match *r {
            Running::Write { range, .. } | Running::Resync { range, .. } | Running::Verify { range } => {
                range.0 < end && start < range.1
            }
            Running::Flush { .. } => false,
        })
    }
}

impl<P: Clone + PartialEq> NodeCore<P> {
    pub(super) fn pump_applier(&mut self) {
        while let Some(front) = self.applier.queue.front() {
            match front {
                PeerMessage::Write { offset, len, .. }
                | PeerMessage::Trim { offset, len, .. }
                | PeerMessage::ResyncData { offset, len, .. } => {
                    let is_resync = matches!(front, PeerMessage::ResyncData { .. });
                    if self.applier.overlaps_running((*offset, offset + len)) {
                        return;
                    }
                    if is_resync && !self.applier.target_ready_at.is_some_and(|n| self.persisted(n)) {
                        return;
                    }
                }
                PeerMessage::Flush { .. } | PeerMessage::ResyncDone { .. }
                    if !self.applier.running.is_empty() =>
                {
                    return;
                }
                PeerMessage::VerifyRequest { offset, len } | PeerMessage::VerifyReply { offset, len, .. } => {
                    let range = (*offset, offset + len);
                    if self.applier.overlaps_running(range) {
                        return;
                    }
                    // The responder reads with the range claimed against its own writes; the
                    // requester's writes have waited since it asked.
                    let request = matches!(front, PeerMessage::VerifyRequest { .. });
                    if request && !self.writes.claim(range) {
                        return;
                    }
                }
                _ => {}
            }
            let message = self.applier.queue.pop_front().expect("front");
            let position = self.applier.next_position;
            self.applier.next_position += 1;
            let connection = self.applier.connection;
            let running = match message {
                PeerMessage::Write { seq, offset, len, data, fua } => {
                    let io = self.start_io(IoPurpose::Apply(position));
                    self.effects.push_back(Effect::Write { io, offset, len, data });
                    Running::Write { range: (offset, offset + len), seq, fua, flushing: false }
                }
                PeerMessage::Trim { seq, offset, len } => {
                    let io = self.start_io(IoPurpose::Apply(position));
                    self.effects.push_back(Effect::Discard { io, offset, len });
                    Running::Write { range: (offset, offset + len), seq, fua: false, flushing: false }
                }
                PeerMessage::ResyncData { offset, len, data } => {
                    let io = self.start_io(IoPurpose::Apply(position));
                    self.effects.push_back(Effect::Write { io, offset, len, data });
                    Running::Resync { range: (offset, offset + len), flushing: false }
                }
                PeerMessage::Flush { seq } => {
                    let io = self.start_io(IoPurpose::Apply(position));
                    self.effects.push_back(Effect::Flush { io });
                    Running::Flush { seq }
                }
                PeerMessage::ResyncDone { gens } => {
                    self.finish_as_target(gens);
                    continue;
                }
                PeerMessage::VerifyRequest { offset, len } => {
                    self.start_verify_read(position, (offset, offset + len), None)
                }
                PeerMessage::VerifyReply { offset, len, data } => {
                    let range = (offset, offset + len);
                    if !self.verify_reply_reading(range) {
                        continue;
                    }
                    self.start_verify_read(position, range, Some(data))
                }
                _ => continue,
            };
            self.applier.running.insert(position, (connection, running));
        }
    }

    pub(super) fn apply_done(&mut self, position: u64, ok: bool) {
        let Some((connection, running)) = self.applier.running.remove(&position) else { return };
        let current = connection == self.applier.connection;
        let answer = if ok { Answer::Written } else { Answer::Failed };
        match running {
            Running::Write { range, seq, fua: true, flushing: false } if ok => {
                self.flush_for(
                    position,
                    connection,
                    Running::Write { range, seq, fua: true, flushing: true },
                );
            }
            Running::Write { seq, .. } => {
                if current {
                    self.send(PeerMessage::Ack { seq, answer });
                }
            }
            Running::Flush { seq } => {
                if current {
                    let answer = if ok { Answer::Flushed } else { Answer::Failed };
                    self.send(PeerMessage::Ack { seq, answer });
                }
            }
            Running::Resync { range, flushing: false }
                if ok && !self.cfg.bugs.has(Bug::AckResyncBeforeFlush) =>
            {
                self.flush_for(position, connection, Running::Resync { range, flushing: true });
            }
            // Verify reads complete through `verify_applied`.
            Running::Verify { .. } => {}
            Running::Resync { range: (start, end), .. } => {
                if ok {
                    self.bitmap.clear(DirtyBitmap::blocks_of(start, end - start, self.cfg.bitmap_block));
                    if current {
                        self.send(PeerMessage::ResyncAck { offset: start, len: end - start });
                    }
                }
            }
        }
    }

    fn start_verify_read(&mut self, position: u64, range: Range, theirs: Option<P>) -> Running {
        let io = self.start_io(IoPurpose::VerifyRead(position));
        self.effects.push_back(Effect::Read { io, offset: range.0, len: range.1 - range.0 });
        self.applier.verifying.insert(position, (range, theirs));
        Running::Verify { range }
    }

    pub(super) fn verify_applied(&mut self, position: u64, ok: bool, data: Option<P>) {
        let Some((connection, _)) = self.applier.running.remove(&position) else { return };
        let Some((range, theirs)) = self.applier.verifying.remove(&position) else { return };
        let current = connection == self.applier.connection;
        self.verify_read_done(range, theirs, current, data.filter(|_| ok));
    }

    /// Flushes the disk for the request at `position`, which is answered when the flush is done.
    fn flush_for(&mut self, position: u64, connection: u64, running: Running) {
        let io = self.start_io(IoPurpose::Apply(position));
        self.effects.push_back(Effect::Flush { io });
        self.applier.running.insert(position, (connection, running));
    }
}
