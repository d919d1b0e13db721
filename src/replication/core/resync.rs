//! The sync source: reads the blocks its bitmap marks (after the peer's were merged in at the
//! handshake) and sends them, a few runs at a time; a bit clears when the target has the block
//! durably. A range being read is claimed, so no client write changes it between the read and
//! the send. When the bitmap is clean and nothing is in flight, both sides close the resync
//! with the generation steps of DRBD's model.

use crate::metadata::bitmap::DirtyBitmap;
use crate::replication::states::DiskState;

use super::io::PeerMessage;
use super::ledger::Range;
use super::node::{IoPurpose, Link, NodeCore};

/// Resync reads and unanswered sends at once.
const WINDOW: usize = 8;
/// Bitmap blocks one resync request covers at most.
const RUN_BLOCKS: u64 = 8;

/// A resync this node is the source of.
#[derive(Debug)]
pub(super) struct Source {
    /// SyncStart goes out once this metadata image (the rotated generations) is durable.
    announce_at: Option<u64>,
    /// This resync's number: reads of an earlier one may still complete.
    id: u64,
    /// The next block to look at; wraps to 0 once everything sent is answered.
    cursor: u64,
    reading: usize,
    unacked: usize,
}

impl Source {
    pub(super) fn starting(image: u64, id: u64) -> Self {
        Self { announce_at: Some(image), id, cursor: 0, reading: 0, unacked: 0 }
    }
}

impl<P: Clone + PartialEq> NodeCore<P> {
    pub(super) fn pump_source(&mut self) {
        let block = u64::from(self.cfg.bitmap_block);
        if let Some(image) = self.source.as_ref().and_then(|s| s.announce_at) {
            if !self.persisted(image) {
                return;
            }
            self.source.as_mut().expect("checked").announce_at = None;
            self.send(PeerMessage::SyncStart { sync_uuid: self.gens.sync_uuid() });
            self.effects.push_back(super::io::Effect::ResyncStarted { source: true });
        }
        loop {
            let Some(source) = &self.source else { return };
            if source.reading + source.unacked >= WINDOW {
                return;
            }
            let (cursor, idle) = (source.cursor, source.reading == 0 && source.unacked == 0);
            let Some((first, len)) = self.bitmap.runs_from(cursor).next() else {
                if !idle {
                    return;
                }
                if self.bitmap.dirty_blocks() == 0 {
                    return self.finish_as_source();
                }
                self.source.as_mut().expect("checked").cursor = 0;
                continue;
            };
            let end = first + len.min(RUN_BLOCKS);
            let range = (first * block, (end * block).min(self.cfg.size));
            if !self.writes.claim(range) {
                return;
            }
            let source = self.source.as_mut().expect("checked");
            source.cursor = end;
            source.reading += 1;
            let id = source.id;
            let io = self.start_io(IoPurpose::ResyncRead(range, id));
            self.effects.push_back(super::io::Effect::Read { io, offset: range.0, len: range.1 - range.0 });
        }
    }

    pub(super) fn resync_read_done(&mut self, range: Range, resync: u64, ok: bool, data: Option<P>) {
        self.writes.release(range);
        let Some(source) = self.source.as_mut().filter(|s| s.id == resync) else { return };
        source.reading -= 1;
        if let (true, Some(data)) = (ok, data) {
            source.unacked += 1;
            self.send(PeerMessage::ResyncData { offset: range.0, len: range.1 - range.0, data });
        }
    }

    pub(super) fn resync_acked(&mut self, offset: u64, len: u64) {
        let Some(source) = self.source.as_mut() else { return };
        source.unacked = source.unacked.saturating_sub(1);
        self.bitmap.clear(DirtyBitmap::blocks_of(offset, len, self.cfg.bitmap_block));
    }

    fn finish_as_source(&mut self) {
        self.source = None;
        // The target derives its lineage from the rotated set (see finish_resync_as_target).
        let rotated = self.gens;
        self.gens = self.gens.finish_resync_as_source();
        self.crashed_primary = false;
        if let Link::Up { peer_role, .. } = self.link {
            self.link = Link::Up { peer_role, peer_disk: DiskState::UpToDate };
        }
        self.persist();
        self.send(PeerMessage::ResyncDone { gens: rotated });
    }
}
