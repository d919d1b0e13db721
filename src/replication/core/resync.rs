//! The sync source: answers the target's requests (it pulls, as in the daemon) with the data
//! of each range, read with the range claimed so that no client write changes it between the
//! read and the send; a bit clears when the target acknowledges the block durable. When the
//! bitmap is clean and nothing is in flight, both sides close the resync with the generation
//! steps of DRBD's model. The requests' bookkeeping is the daemon's (`SourceRequests`).

use crate::metadata::bitmap::DirtyBitmap;
use crate::replication::resync::source_requests::SourceRequests;
use crate::replication::states::DiskState;

use super::bugs::Bug;
use super::io::{Effect, PeerMessage};
use super::ledger::Range;
use super::node::{IoPurpose, Link, NodeCore};

/// Resync reads at once.
const WINDOW: usize = 8;

/// A resync this node is the source of.
pub(super) struct Source<P> {
    /// SyncStart goes out once this metadata image (the rotated generations) is durable.
    announce_at: Option<u64>,
    /// This resync's number: reads of an earlier one may still complete.
    id: u64,
    /// The target's requests, each with what the target holds of its range (a checksum
    /// request) or nothing.
    requests: SourceRequests<Option<P>>,
}

impl<P> std::fmt::Debug for Source<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("announce_at", &self.announce_at)
            .field("id", &self.id)
            .field("requests", &self.requests.counts())
            .finish()
    }
}

impl<P> Source<P> {
    pub(super) fn starting(image: u64, id: u64) -> Self {
        Self { announce_at: Some(image), id, requests: SourceRequests::new(WINDOW) }
    }
}

impl<P: Clone + PartialEq> NodeCore<P> {
    pub(super) fn pump_source(&mut self) {
        if let Some(image) = self.source.as_ref().and_then(|s| s.announce_at) {
            if !self.persisted(image) {
                return;
            }
            self.source.as_mut().expect("checked").announce_at = None;
            self.send(PeerMessage::SyncStart { sync_uuid: self.gens.sync_uuid() });
            self.effects.push_back(Effect::ResyncStarted { source: true });
        }
        loop {
            let Some(source) = self.source.as_mut() else { return };
            if source.requests.complete(self.bitmap.dirty_blocks()) {
                self.finish_as_source();
                return;
            }
            // The peer's writes received before reach this disk first (seed 7999: a Secondary
            // that became source of an `invalidate` read a range its applier was still writing,
            // under protocol B, and the target got the older data).
            let (applier, writes) = (&self.applier, &mut self.writes);
            let unclaimed = self.cfg.bugs.has(Bug::ResyncReadUnclaimed);
            let next = source.requests.next_read(|range| {
                // Planted: the read goes ahead without holding the range.
                !applier.overlaps_unfinished(range) && (unclaimed || writes.claim(range))
            });
            let Some((tag, range)) = next else { return };
            let resync = source.id;
            let io = self.start_io(IoPurpose::ResyncRead { range, tag, resync, claimed: !unclaimed });
            self.effects.push_back(Effect::Read { io, offset: range.0, len: range.1 - range.0 });
        }
    }

    /// The target asks for a range: refused (the link ends) when this node is not its source
    /// or the range is not within the device, as the daemon does.
    pub(super) fn resync_requested(&mut self, offset: u64, len: u64, digest: Option<P>) {
        let fits = offset.checked_add(len).is_some_and(|end| end <= self.cfg.size) && len > 0;
        match self.source.as_mut() {
            Some(source) if fits && source.announce_at.is_none() => {
                source.requests.push((offset, offset + len), digest);
            }
            _ => {
                self.effects.push_back(Effect::DropLink { reason: "resync request this node cannot answer" })
            }
        }
    }

    /// The read of request `tag` of resync `resync` finished (its claim already released).
    pub(super) fn resync_read_done(
        &mut self,
        range: Range,
        tag: usize,
        resync: u64,
        ok: bool,
        data: Option<P>,
    ) {
        let Some(source) = self.source.as_mut().filter(|s| s.id == resync) else { return };
        let Some((_, digest)) = source.requests.read_done(tag) else { return };
        let (offset, len) = (range.0, range.1 - range.0);
        let Some(data) = data.filter(|_| ok) else { return };
        match digest {
            None => self.send(PeerMessage::ResyncData { offset, len, data }),
            // A checksum request: the data only where it differs, and the close either way.
            Some(theirs) => {
                if theirs != data {
                    self.send(PeerMessage::ResyncData { offset, len, data });
                }
                self.send(PeerMessage::ResyncInSync { offset, len });
            }
        }
    }

    pub(super) fn resync_acked(&mut self, offset: u64, len: u64) {
        if self.source.is_none() {
            return;
        }
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
