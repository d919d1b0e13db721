//! Operator `invalidate` and online `verify`, both on a connected pair in sync.
//!
//! - `invalidate` (on a Secondary): the peer agrees to become the source of a full sync first
//!   (so two nodes invalidating at once cannot both lose their data), then this disk is durably
//!   Inconsistent with every block marked before its data counts as untrusted.
//! - `verify`: the node that runs it claims a range against its own writes, asks the peer for
//!   its data of that range, and once the reply is there reads its own and compares; blocks that
//!   differ are marked out of sync (a later resync from the Primary repairs them). Both sides
//!   read in the applier's order and with the range claimed, so a write in flight never shows
//!   up as a difference: the peer's read follows every write the requester sent before the
//!   request, the requester's read every write the peer sent before the reply.

use crate::metadata::bitmap::DirtyBitmap;
use crate::replication::states::{DiskState, Role};

use super::bugs::Bug;
use super::io::{Effect, PeerMessage};
use super::ledger::Range;
use super::node::{Link, NodeCore, Promoting};
use super::resync::Source;

/// Verify requests outstanding at once.
const WINDOW: usize = 4;
/// Bitmap blocks one verify request covers.
const RUN_BLOCKS: u64 = 64;

/// An online verify this node runs.
#[derive(Debug)]
pub(super) struct Verifier {
    /// The next bitmap block to ask for.
    cursor: u64,
    /// Asked of the peer and not answered: this node's writes wait until compared.
    asked: Vec<Range>,
    /// Replies being compared (a local read in flight).
    reading: usize,
    out_of_sync: u64,
}

impl<P: Clone + PartialEq> NodeCore<P> {
    pub(super) fn invalidate(&mut self) {
        let peer_up_to_date = matches!(self.link, Link::Up { peer_disk: DiskState::UpToDate, .. });
        let idle = !self.invalidating && self.verifier.is_none() && self.promoting == Promoting::No;
        if self.role == Role::Secondary && peer_up_to_date && self.is_established() && idle {
            self.invalidating = true;
            self.send(PeerMessage::InvalidateRequest);
        }
    }

    /// The peer asks to be invalidated: this node becomes the source of its full sync.
    pub(super) fn peer_invalidates(&mut self) {
        let granted = self.is_established()
            && self.disk == DiskState::UpToDate
            && !self.invalidating
            && self.verifier.is_none();
        self.send(PeerMessage::InvalidateAnswer { granted });
        if !granted {
            return;
        }
        if !self.cfg.bugs.has(Bug::InvalidateWithoutFullSync) {
            self.bitmap.set_all();
        }
        let random = self.random();
        self.gens = self.gens.start_resync_as_source(random);
        // SyncStart goes out once the rotated generations are durable, as after a handshake.
        let image = self.persist();
        self.resyncs += 1;
        self.source = Some(Source::starting(image, self.resyncs));
        if let Link::Up { peer_role, .. } = self.link {
            self.link = Link::Up { peer_role, peer_disk: DiskState::Inconsistent };
        }
    }

    pub(super) fn invalidate_answered(&mut self, granted: bool) {
        if !std::mem::take(&mut self.invalidating) || !granted || !matches!(self.link, Link::Up { .. }) {
            return;
        }
        self.disk = DiskState::Inconsistent;
        if !self.cfg.bugs.has(Bug::InvalidateWithoutFullSync) {
            self.bitmap.set_all();
        }
        self.awaiting_sync_start = true;
        // The data is untrusted once the metadata says so durably (a crash before keeps it).
        self.invalidated_at = Some(self.persist());
    }

    pub(super) fn pump_invalidated(&mut self) {
        if let Some(image) = self.invalidated_at {
            if self.persisted(image) {
                self.invalidated_at = None;
                self.effects.push_back(Effect::Invalidated);
            }
        }
    }

    pub(super) fn start_verify(&mut self) {
        if self.is_established() && self.verifier.is_none() && !self.invalidating {
            self.verifier = Some(Verifier { cursor: 0, asked: Vec::new(), reading: 0, out_of_sync: 0 });
        }
    }

    /// Asks the peer for the next ranges, each claimed against this node's writes until compared.
    pub(super) fn pump_verify(&mut self) {
        let block = u64::from(self.cfg.bitmap_block);
        let blocks = self.bitmap.blocks();
        loop {
            let Some(v) = &self.verifier else { return };
            if v.asked.len() + v.reading >= WINDOW {
                return;
            }
            if v.cursor >= blocks {
                if v.asked.is_empty() && v.reading == 0 {
                    let out_of_sync = v.out_of_sync;
                    self.verifier = None;
                    self.effects.push_back(Effect::VerifyDone { out_of_sync });
                }
                return;
            }
            let end = (v.cursor + RUN_BLOCKS).min(blocks);
            let range = (v.cursor * block, (end * block).min(self.cfg.size));
            // Writes in flight finish first; later ones wait (see `verify_holds`). Not a claim
            // of the write path: the peer's verify reads here must not wait for this one, or two
            // verifies at once wait for each other (seed 52926).
            if self.writes.overlaps_claims(range) {
                return;
            }
            let v = self.verifier.as_mut().expect("checked");
            v.cursor = end;
            v.asked.push(range);
            self.send(PeerMessage::VerifyRequest { offset: range.0, len: range.1 - range.0 });
        }
    }

    /// The link died: the verify ends unfinished (its local reads in flight hold their ranges
    /// in the applier until they complete).
    pub(super) fn verify_link_down(&mut self) {
        self.verifier = None;
    }

    /// Whether this node's verify asked the peer for part of `range`: client writes wait until
    /// it is compared (while compared, the applier's read holds it).
    pub(super) fn verify_holds(&self, (start, end): Range) -> bool {
        self.verifier.as_ref().is_some_and(|v| v.asked.iter().any(|&(s, e)| s < end && start < e))
    }

    /// The requester's reply reaches the front of the applier: its range leaves `asked`
    /// (the local read now holds the claim). Whether a verify still waits for it.
    pub(super) fn verify_reply_reading(&mut self, range: Range) -> bool {
        let Some(v) = self.verifier.as_mut() else { return false };
        let Some(i) = v.asked.iter().position(|&r| r == range) else { return false };
        v.asked.swap_remove(i);
        v.reading += 1;
        true
    }

    /// This side's read for a verify completed: the responder answers, the requester compares.
    pub(super) fn verify_read_done(
        &mut self,
        range: Range,
        peer_data: Option<P>,
        current: bool,
        data: Option<P>,
    ) {
        match peer_data {
            None => {
                self.writes.release(range);
                if let (true, Some(data)) = (current, data) {
                    self.send(PeerMessage::VerifyReply { offset: range.0, len: range.1 - range.0, data });
                }
            }
            Some(theirs) => {
                let Some(v) = self.verifier.as_mut().filter(|_| current) else { return };
                v.reading -= 1;
                if data.as_ref() != Some(&theirs) {
                    let blocks = DirtyBitmap::blocks_of(range.0, range.1 - range.0, self.cfg.bitmap_block);
                    v.out_of_sync += blocks.end - blocks.start;
                    if !self.cfg.bugs.has(Bug::VerifySkipsMarking) {
                        self.bitmap.set(blocks);
                        self.persist();
                    }
                }
            }
        }
    }

    pub(super) fn verify_idle(&self) -> bool {
        self.verifier.is_none() && !self.invalidating && self.invalidated_at.is_none()
    }

    /// The verify this node runs, for diagnostics.
    pub(super) fn describe_verify(&self) -> String {
        match &self.verifier {
            None => "no verify".to_string(),
            Some(v) => format!("verify at {} asked {:?} reading {}", v.cursor, v.asked, v.reading),
        }
    }
}
