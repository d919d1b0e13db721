//! The sync decision made when two nodes connect: who is sync source, whether
//! the bitmap suffices, or whether the data diverged (split brain).
//!
//! Both nodes run [`decide`] independently on the same pair of views (each
//! with itself as `local`) and must reach mirrored results; the rule table is
//! therefore evaluated symmetrically (see [`compare_generations`]), which is
//! checked by a property test.
//!
//! [`decide`] = [`compare_generations`] (DRBD's rule table) followed by the
//! post-processing steps that need no split-brain policy:
//! [`resolve_by_disk_states`], [`resolve_by_discard_my_data`] and
//! [`require_usable_source`]. A split-brain policy layer (after-sb-Npri) belongs
//! between the first two steps and the discard step, as in DRBD.

use crate::metadata::generations::{is_blank, same, Generations, JUST_CREATED, NEW_BITMAP_OFFSET};
use crate::replication::states::{DiskState, Role};

/// DRBD 8.4 rule numbers (and rdbd's own for the cases DRBD does not number).
pub mod rules {
    /// A side has no disk to compare (rdbd; DRBD skips the handshake).
    pub const NO_DISK: u32 = 0;
    pub const JUST_CREATED_BOTH: u32 = 10;
    pub const JUST_CREATED_SELF: u32 = 20;
    pub const JUST_CREATED_PEER: u32 = 30;
    /// Local was source, missed the end of the resync (history confirms).
    pub const SOURCE_MISSED_FINISH: u32 = 34;
    /// Peer was source, missed the end of the resync (history confirms).
    pub const PEER_MISSED_FINISH: u32 = 35;
    /// Like 34 without the history confirmation.
    pub const SOURCE_UNFINISHED: u32 = 36;
    /// Like 35 without the history confirmation.
    pub const PEER_SOURCE_UNFINISHED: u32 = 37;
    pub const CRASHED_PRIMARY: u32 = 40;
    /// Rule 40 while a node is Primary now.
    pub const CRASHED_PRIMARY_NOW_PRIMARY: u32 = 41;
    pub const BITMAP_PEER: u32 = 50;
    /// The peer started a resync as source but we never got its sync UUID.
    pub const PEER_LOST_SYNC_UUID: u32 = 51;
    pub const HISTORY_PEER: u32 = 60;
    pub const BITMAP_SELF: u32 = 70;
    /// We started a resync as source but the peer never got our sync UUID.
    pub const SELF_LOST_SYNC_UUID: u32 = 71;
    pub const HISTORY_SELF: u32 = 80;
    pub const BITMAP_BOTH: u32 = 90;
    pub const HISTORY_BOTH: u32 = 100;
    pub const UNRELATED: u32 = 1000;
}

/// What one node knows about one side of the connection (itself or its peer)
/// at handshake time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SideView {
    pub gens: Generations,
    /// The role now.
    pub role: Role,
    /// The side's own disk state (the real one, not `Negotiating`, when known).
    pub disk: DiskState,
    /// The side crashed while Primary (its writes since the last sync point
    /// may be missing on the peer).
    pub crashed_primary: bool,
    /// Blocks set in the side's bitmap; for split-brain policies (least
    /// changes), not used by [`decide`].
    pub dirty_blocks: u64,
    /// The operator ran `connect --discard-my-data` on this side.
    pub discard_my_data: bool,
    /// Breaks exact ties deterministically (DRBD's RESOLVE_CONFLICTS).
    pub node_id: u32,
}

/// The outcome, from the `local` side's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SyncDecision {
    /// Same data; no resync.
    InSync,
    /// Local is source; only the blocks in the bitmaps are sent.
    SourceBitmap,
    /// Local is target; only the blocks in the bitmaps are fetched.
    TargetBitmap,
    /// Local is source of a full resync.
    SourceFull,
    /// Local is target of a full resync.
    TargetFull,
    /// The data diverged. `auto_recoverable`: both sides branched from the
    /// same generation (rule 90), so after-sb policies may pick a victim and
    /// the bitmaps cover the differences; otherwise disconnect.
    SplitBrain { auto_recoverable: bool },
    /// No common generation: refuse to connect.
    Unrelated,
    /// The rule table picked a source whose disk is not consistent: this
    /// connection cannot sync.
    NoUsableSource,
    /// A side has no disk in the handshake (Diskless, Attaching, Failed, or
    /// unknown): nothing to compare, no resync.
    NoDisk,
}

impl SyncDecision {
    /// The same outcome seen from the other node.
    pub const fn mirror(self) -> Self {
        match self {
            SyncDecision::SourceBitmap => SyncDecision::TargetBitmap,
            SyncDecision::TargetBitmap => SyncDecision::SourceBitmap,
            SyncDecision::SourceFull => SyncDecision::TargetFull,
            SyncDecision::TargetFull => SyncDecision::SourceFull,
            other => other,
        }
    }

    /// Local becomes sync source.
    pub const fn is_source(self) -> bool {
        matches!(self, SyncDecision::SourceBitmap | SyncDecision::SourceFull)
    }

    /// Local becomes sync target.
    pub const fn is_target(self) -> bool {
        matches!(self, SyncDecision::TargetBitmap | SyncDecision::TargetFull)
    }

    /// Every block is resynced, not just those in the bitmaps.
    pub const fn is_full(self) -> bool {
        matches!(self, SyncDecision::SourceFull | SyncDecision::TargetFull)
    }
}

/// The same outcome seen from the other node (source ↔ target).
pub const fn mirror(d: SyncDecision) -> SyncDecision {
    d.mirror()
}

/// An outcome with the rule that produced it, for logs and `status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub outcome: SyncDecision,
    /// DRBD's rule number (see [`rules`]); post-processing keeps the number of
    /// the table rule it overrode.
    pub rule: u32,
    pub reason: &'static str,
}

const fn dec(outcome: SyncDecision, rule: u32, reason: &'static str) -> Decision {
    Decision { outcome, rule, reason }
}

/// The role flag is ignored in every comparison.
const fn m(uuid: u64) -> u64 {
    uuid & !1
}

/// The full decision: rule table plus the post-processing that needs no
/// split-brain policy.
pub fn decide(local: &SideView, peer: &SideView) -> Decision {
    if !local.disk.has_disk() || !peer.disk.has_disk() {
        return dec(SyncDecision::NoDisk, rules::NO_DISK, "a side has no disk: nothing to compare");
    }
    let d = compare_generations(local, peer);
    let d = resolve_by_disk_states(d, local.disk, peer.disk);
    let d = resolve_by_discard_my_data(d, local.discard_my_data, peer.discard_my_data);
    let d = resolve_marked_blocks(d, local, peer);
    require_usable_source(d, local.disk, peer.disk)
}

/// Same data generation, but blocks are marked out of sync (an online verify found them, or a
/// damaged bitmap page was taken as dirty): with exactly one Primary, its data — what clients
/// see — is resynced over the marked blocks, as DRBD users expect from a disconnect/connect
/// after a verify. Without a Primary neither side is known to be right: the marks stay for
/// `invalidate --reset-bitmap=no` or `invalidate-remote --reset-bitmap=no`.
pub fn resolve_marked_blocks(d: Decision, local: &SideView, peer: &SideView) -> Decision {
    if d.outcome != SyncDecision::InSync || (local.dirty_blocks == 0 && peer.dirty_blocks == 0) {
        return d;
    }
    let (outcome, reason) = match (local.role == Role::Primary, peer.role == Role::Primary) {
        (true, false) => (SyncDecision::SourceBitmap, "in sync but blocks are marked: the Primary is source"),
        (false, true) => (SyncDecision::TargetBitmap, "in sync but blocks are marked: the Primary is source"),
        _ => return d,
    };
    Decision { outcome, rule: d.rule, reason }
}

/// `new-current-uuid --clear-bitmap` ran on a side (its State carried SKIP_INITIAL_SYNC): when
/// the other side was just created, it takes over that side's generations and is UpToDate, so
/// the pair compares as in sync and skips the initial full sync. Both nodes apply this to their
/// two views before [`decide`], so they agree. Returns whether the local side adopted.
pub fn apply_skip_initial_sync(
    local: &mut SideView,
    peer: &mut SideView,
    local_skip: bool,
    peer_skip: bool,
) -> bool {
    fn adopt(from: &SideView, to: &mut SideView) -> bool {
        let cleared =
            from.gens.bitmap == 0 && !from.gens.is_just_created() && from.disk == DiskState::UpToDate;
        if !cleared || !to.gens.is_just_created() || !to.disk.has_disk() {
            return false;
        }
        to.gens = to.gens.adopt_cleared_current(from.gens.current);
        to.disk = DiskState::UpToDate;
        true
    }
    match (local_skip, peer_skip) {
        (false, true) => adopt(peer, local),
        (true, false) => {
            adopt(local, peer);
            false
        }
        // Both or neither: nothing to adopt (two clears are two different generations).
        _ => false,
    }
}

/// DRBD's rule table (`drbd_uuid_compare`), evaluated so that the two nodes
/// always reach mirrored results.
///
/// DRBD tests "local is behind" rules (50, 51, 60) before "peer is behind"
/// rules (70, 71, 80); when both kinds match, each node would conclude it is
/// the target. Here both groups are evaluated and a match on both sides is a
/// split brain that cannot be auto-recovered (each side's current generation
/// is an ancestor of the other's: the lineages contradict each other).
///
/// Other deviations from DRBD 8.4, all for symmetry or safety:
/// - both currents blank (0 or just created) is rule 10, in sync (DRBD makes a
///   current of 0 a full-sync source towards a just-created peer, and with
///   both at 0 both nodes would be targets);
/// - rule 90 does not count a just-created bitmap identifier as a common
///   ancestor, and rule 100 skips empty and just-created history slots (as
///   DRBD 9 does for empty slots): two independently created disks are
///   unrelated, not a recoverable split brain;
/// - rule 40 ties (both crashed Primary, both Secondary now): the lower
///   node id is source; equal ids cannot be ordered and are an unrecoverable
///   split brain.
pub fn compare_generations(local: &SideView, peer: &SideView) -> Decision {
    use SyncDecision::*;
    let (l, p) = (&local.gens, &peer.gens);
    let (lc, pc) = (m(l.current), m(p.current));

    if lc == JUST_CREATED && pc == JUST_CREATED {
        return dec(InSync, rules::JUST_CREATED_BOTH, "both sides were just created");
    }
    match (is_blank(lc), is_blank(pc)) {
        (true, true) => {
            return dec(InSync, rules::JUST_CREATED_BOTH, "neither side has a data generation");
        }
        (true, false) => {
            return dec(TargetFull, rules::JUST_CREATED_SELF, "local was just created, peer has data");
        }
        (false, true) => {
            return dec(SourceFull, rules::JUST_CREATED_PEER, "peer was just created, local has data");
        }
        (false, false) => {}
    }

    if lc == pc {
        return compare_same_current(local, peer);
    }

    match (behind(l, p), behind(p, l)) {
        (Some((rule, full, reason)), None) => dec(if full { TargetFull } else { TargetBitmap }, rule, reason),
        (None, Some((rule, full, _))) => {
            let (rule, reason) = mirrored_rule(rule);
            dec(if full { SourceFull } else { SourceBitmap }, rule, reason)
        }
        (Some((rule, _, _)), Some(_)) => dec(
            SplitBrain { auto_recoverable: false },
            rule,
            "each side's current generation is an ancestor of the other's",
        ),
        (None, None) => {
            let (lb, pb) = (m(l.bitmap), m(p.bitmap));
            if lb == pb && !is_blank(lb) {
                return dec(
                    SplitBrain { auto_recoverable: true },
                    rules::BITMAP_BOTH,
                    "both sides started a new generation from the same one",
                );
            }
            let shared = l.history.iter().any(|&a| !is_blank(a) && p.history.iter().any(|&b| same(a, b)));
            if shared {
                dec(
                    SplitBrain { auto_recoverable: false },
                    rules::HISTORY_BOTH,
                    "the data diverged; the sides share only an older generation",
                )
            } else {
                dec(Unrelated, rules::UNRELATED, "no common generation: unrelated data")
            }
        }
    }
}

/// Is `me` behind `other` (rules 50, 51, 60, from `me`'s side)? Gives the
/// rule, whether a full sync is needed, and the reason. Evaluated for both
/// sides by [`compare_generations`]; `behind(peer, local)` is rules 70, 71, 80.
fn behind(me: &Generations, other: &Generations) -> Option<(u32, bool, &'static str)> {
    let c = m(me.current);
    if c == m(other.bitmap) {
        return Some((rules::BITMAP_PEER, false, "peer's bitmap tracks changes since local's generation"));
    }
    let oh1 = m(other.history[0]);
    if c == oh1 && oh1.wrapping_add(NEW_BITMAP_OFFSET) == m(other.bitmap) {
        return Some((
            rules::PEER_LOST_SYNC_UUID,
            false,
            "peer started a resync as source but local never got the sync UUID",
        ));
    }
    if other.history.iter().any(|&h| same(h, c)) {
        return Some((rules::HISTORY_PEER, true, "local's generation is in the peer's history"));
    }
    None
}

/// The rule number and reason of a "behind" rule found on the peer's side.
fn mirrored_rule(peer_rule: u32) -> (u32, &'static str) {
    match peer_rule {
        rules::BITMAP_PEER => (rules::BITMAP_SELF, "local's bitmap tracks changes since peer's generation"),
        rules::PEER_LOST_SYNC_UUID => (
            rules::SELF_LOST_SYNC_UUID,
            "local started a resync as source but the peer never got the sync UUID",
        ),
        _ => (rules::HISTORY_SELF, "peer's generation is in local's history"),
    }
}

/// Rules 34-41: equal current generations.
fn compare_same_current(local: &SideView, peer: &SideView) -> Decision {
    use SyncDecision::*;
    let (l, p) = (&local.gens, &peer.gens);
    let (lb, pb) = (m(l.bitmap) != 0, m(p.bitmap) != 0);
    if lb && !pb {
        return if same(l.bitmap, p.history[0]) && same(l.history[0], p.history[1]) {
            dec(
                SourceBitmap,
                rules::SOURCE_MISSED_FINISH,
                "local was sync source and missed the end of the resync",
            )
        } else {
            dec(SourceBitmap, rules::SOURCE_UNFINISHED, "local was sync source; the resync did not finish")
        };
    }
    if !lb && pb {
        return if same(p.bitmap, l.history[0]) && same(p.history[0], l.history[1]) {
            dec(
                TargetBitmap,
                rules::PEER_MISSED_FINISH,
                "peer was sync source and missed the end of the resync",
            )
        } else {
            dec(
                TargetBitmap,
                rules::PEER_SOURCE_UNFINISHED,
                "peer was sync source; the resync did not finish",
            )
        };
    }

    if !local.crashed_primary && !peer.crashed_primary {
        return dec(InSync, rules::CRASHED_PRIMARY, "same generation and no crashed Primary");
    }
    match (local.role == Role::Primary, peer.role == Role::Primary) {
        (true, true) => {
            return dec(
                SplitBrain { auto_recoverable: false },
                rules::CRASHED_PRIMARY_NOW_PRIMARY,
                "same generation after a Primary crash, and both sides are Primary",
            );
        }
        (true, false) => {
            return dec(
                SourceBitmap,
                rules::CRASHED_PRIMARY_NOW_PRIMARY,
                "same generation after a Primary crash; local is Primary",
            );
        }
        (false, true) => {
            return dec(
                TargetBitmap,
                rules::CRASHED_PRIMARY_NOW_PRIMARY,
                "same generation after a Primary crash; peer is Primary",
            );
        }
        (false, false) => {}
    }
    match (local.crashed_primary, peer.crashed_primary) {
        (true, false) => dec(SourceBitmap, rules::CRASHED_PRIMARY, "local crashed as Primary"),
        (false, true) => dec(TargetBitmap, rules::CRASHED_PRIMARY, "peer crashed as Primary"),
        _ if local.node_id < peer.node_id => {
            dec(SourceBitmap, rules::CRASHED_PRIMARY, "both crashed as Primary; lower node id is source")
        }
        _ if local.node_id > peer.node_id => {
            dec(TargetBitmap, rules::CRASHED_PRIMARY, "both crashed as Primary; lower node id is source")
        }
        _ => dec(
            SplitBrain { auto_recoverable: false },
            rules::CRASHED_PRIMARY,
            "both crashed as Primary and the node ids are equal: cannot choose a source",
        ),
    }
}

/// When exactly one side is Inconsistent, the disk states decide the
/// direction, whatever the table said: the Inconsistent side cannot be a
/// source and has no data worth keeping. Full syncs (and unrecoverable split
/// brains) stay full, since the bitmaps do not cover the differences.
/// Unrelated data is never synced.
pub fn resolve_by_disk_states(d: Decision, local: DiskState, peer: DiskState) -> Decision {
    use SyncDecision::*;
    let local_inc = local == DiskState::Inconsistent && peer.can_be_sync_source();
    let peer_inc = peer == DiskState::Inconsistent && local.can_be_sync_source();
    if !(local_inc || peer_inc) || matches!(d.outcome, Unrelated | NoUsableSource | NoDisk) {
        return d;
    }
    let full = d.outcome.is_full() || d.outcome == SplitBrain { auto_recoverable: false };
    let outcome = match (peer_inc, full) {
        (true, true) => SourceFull,
        (true, false) => SourceBitmap,
        (false, true) => TargetFull,
        (false, false) => TargetBitmap,
    };
    Decision {
        outcome,
        rule: d.rule,
        reason: "exactly one side is Inconsistent: the consistent side is sync source",
    }
}

/// `connect --discard-my-data` on exactly one side resolves a split brain:
/// that side becomes target of a bitmap-based resync (as DRBD's manual
/// recovery does). On both sides or neither it resolves nothing.
pub fn resolve_by_discard_my_data(d: Decision, local_discard: bool, peer_discard: bool) -> Decision {
    if !matches!(d.outcome, SyncDecision::SplitBrain { .. }) || local_discard == peer_discard {
        return d;
    }
    let (outcome, reason) = if local_discard {
        (SyncDecision::TargetBitmap, "split brain resolved: local discards its data")
    } else {
        (SyncDecision::SourceBitmap, "split brain resolved: peer discards its data")
    };
    Decision { outcome, rule: d.rule, reason }
}

/// A split brain where exactly one side is Outdated: that side learnt (from the witness or the
/// peer) that the other was allowed to write without it, so whatever it wrote on its own was
/// never acknowledged as replicated; it becomes the target of a bitmap resync, as if its
/// operator had typed `connect --discard-my-data`.
pub fn resolve_by_outdated(d: Decision, local: DiskState, peer: DiskState) -> Decision {
    let recoverable = d.outcome == SyncDecision::SplitBrain { auto_recoverable: true };
    let (local_out, peer_out) = (local == DiskState::Outdated, peer == DiskState::Outdated);
    if !recoverable || local_out == peer_out {
        return d;
    }
    let (outcome, reason) = if local_out {
        (SyncDecision::TargetBitmap, "split brain resolved: the local side is Outdated")
    } else {
        (SyncDecision::SourceBitmap, "split brain resolved: the peer is Outdated")
    };
    Decision { outcome, rule: d.rule, reason }
}

/// A source must have consistent data (better than Inconsistent); otherwise
/// the connection cannot sync and must not pretend to.
pub fn require_usable_source(d: Decision, local: DiskState, peer: DiskState) -> Decision {
    let bad = (d.outcome.is_source() && !local.can_be_sync_source())
        || (d.outcome.is_target() && !peer.can_be_sync_source());
    if bad {
        Decision {
            outcome: SyncDecision::NoUsableSource,
            rule: d.rule,
            reason: "the side chosen as sync source has no consistent data",
        }
    } else {
        d
    }
}

#[cfg(test)]
mod tests;
