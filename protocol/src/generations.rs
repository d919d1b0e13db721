//! Generation identifiers ("UUIDs"), DRBD 8.4 model: Current, Bitmap, History\[2\].
//!
//! A generation identifier names a state of the replicated data. Comparing the
//! sets of the two nodes at connect time tells which node has newer data and
//! whether a bitmap-based resync is enough (the daemon's sync decision). They
//! live beside the wire formats because both nodes must step them alike: a
//! node's set travels in every State message.
//!
//! Every operation here is pure: it returns the new set and leaves persisting it
//! to the caller. Randomness is passed in, so the code stays deterministic and
//! testable.
//!
//! Bit 0 of every identifier is a role flag ("this node was Primary when the
//! value was made"). It is informational only and is masked off in every
//! comparison ([`same`]).

/// `Current` of freshly created metadata: "no data generation yet".
pub const JUST_CREATED: u64 = 4;

/// Bit 0: the node was Primary when this identifier was created.
pub const PRIMARY_BIT: u64 = 1;

/// Added to the bitmap identifier when a resync starts, so that a source whose
/// `P_SYNC_UUID` was lost can be recognised (rules 51/71) and undone.
pub const NEW_BITMAP_OFFSET: u64 = 0x0001_0000_0000_0000;

/// Equality that ignores the role flag (bit 0), as every comparison must.
pub fn same(a: u64, b: u64) -> bool {
    a & !PRIMARY_BIT == b & !PRIMARY_BIT
}

/// `true` for values that carry no data lineage (empty slot or just created);
/// such values never prove that two nodes share history.
pub fn is_blank(uuid: u64) -> bool {
    same(uuid, 0) || same(uuid, JUST_CREATED)
}

/// Makes a caller-supplied random value safe to use as a new identifier: bit 1
/// is forced on so the result can never be mistaken for 0 or [`JUST_CREATED`]
/// (which would trigger a full sync in the wrong direction). Costs one bit of
/// entropy; 62 remain.
fn fresh(random: u64) -> u64 {
    (random | 2) & !PRIMARY_BIT
}

/// The identifier set of one node's disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Generations {
    /// The generation the local data is in.
    pub current: u64,
    /// The generation the local bitmap tracks changes against (0: none, the
    /// peer was in sync when we last talked).
    pub bitmap: u64,
    /// Older generations, most recent first (0: empty slot).
    pub history: [u64; 2],
}

impl Generations {
    /// The set of freshly created metadata: no data, no history, so the first
    /// connect does a full sync (rules 10/20/30).
    pub const fn just_created() -> Self {
        Generations { current: JUST_CREATED, bitmap: 0, history: [0, 0] }
    }

    /// `true` when the data has never been given a generation.
    pub fn is_just_created(&self) -> bool {
        is_blank(self.current)
    }

    /// Equality of all four identifiers ignoring the role flags: after a
    /// completed resync both nodes hold equivalent sets.
    pub fn equivalent(&self, other: &Generations) -> bool {
        same(self.current, other.current)
            && same(self.bitmap, other.bitmap)
            && same(self.history[0], other.history[0])
            && same(self.history[1], other.history[1])
    }

    /// Pushes `uuid` into the most recent history slot, dropping the oldest.
    fn push_history(&mut self, uuid: u64) {
        self.history[1] = self.history[0];
        self.history[0] = uuid;
    }

    /// Starts a new data generation. Why: a Primary that writes without its
    /// peer (peer lost, promoted while disconnected, `primary --force`) must
    /// make its data distinguishable from the peer's, and remember in `bitmap`
    /// since when its bitmap tracks the changes.
    ///
    /// - `bitmap == 0`: bitmap := current (role bit kept), as DRBD does.
    /// - `bitmap != 0`: the bitmap already tracks every change since that older
    ///   generation, so it is kept (a peer still there gets a bitmap resync,
    ///   rule 70) and the outgoing current goes to history instead of being
    ///   lost (a peer there gets a full resync, rule 80). DRBD 8.4 overwrites
    ///   the bitmap identifier here, which loses the older peer's lineage.
    ///
    /// current := `random` with bit 0 = `primary`.
    #[must_use = "returns the new set; the caller persists it"]
    pub fn new_current(self, random: u64, primary: bool) -> Self {
        let mut g = self;
        if g.bitmap == 0 {
            g.bitmap = g.current;
        } else if !is_blank(g.current) {
            g.push_history(g.current);
        }
        g.current = fresh(random) | u64::from(primary);
        g
    }

    /// `new-current-uuid --clear-bitmap`: the operator declares both nodes'
    /// data identical (e.g. both freshly zeroed), so no initial sync is needed.
    /// Why: a new shared generation with no bitmap identifier makes the next
    /// comparison say "in sync" once the peer adopts it
    /// ([`Generations::adopt_cleared_current`]).
    ///
    /// The old bitmap identifier and the old current (unless blank) go to
    /// history, so a peer that did *not* adopt the new value gets a full,
    /// not a skipped, resync (rule 80).
    #[must_use = "returns the new set; the caller persists it"]
    pub fn clear_bitmap_new_current(self, random: u64) -> Self {
        self.retire_into_history(fresh(random))
    }

    /// The peer's side of [`Generations::clear_bitmap_new_current`]: adopt the
    /// value the other node generated. Why: both nodes must end with the same
    /// current and no bitmap identifier to compare as in sync.
    #[must_use = "returns the new set; the caller persists it"]
    pub fn adopt_cleared_current(self, current: u64) -> Self {
        self.retire_into_history(current & !PRIMARY_BIT)
    }

    fn retire_into_history(self, new_current: u64) -> Self {
        let mut g = self;
        if g.bitmap != 0 {
            g.push_history(g.bitmap);
        }
        if !is_blank(g.current) && !same(g.current, new_current) {
            g.push_history(g.current);
        }
        g.bitmap = 0;
        g.current = new_current;
        g
    }

    /// The sync source rotates its bitmap identifier before the resync. Why:
    /// the new value, sent to the target as `P_SYNC_UUID`
    /// ([`Generations::sync_uuid`]), becomes the target's current, so an
    /// interrupted resync is recognised next time (the target compares as
    /// behind by bitmap, rule 50).
    ///
    /// bitmap := bitmap + [`NEW_BITMAP_OFFSET`], or a fresh value when the
    /// bitmap identifier is 0 or [`JUST_CREATED`] (or the sum would be); a
    /// non-zero old bitmap identifier moves to history.
    #[must_use = "returns the new set; the caller persists it"]
    pub fn start_resync_as_source(self, random: u64) -> Self {
        let mut g = self;
        let bumped = g.bitmap.wrapping_add(NEW_BITMAP_OFFSET);
        // A bump that wraps onto a blank value would read as "no generation".
        let sync = if is_blank(g.bitmap) || is_blank(bumped) { fresh(random) } else { bumped };
        if g.bitmap != 0 {
            g.push_history(g.bitmap);
        }
        g.bitmap = sync;
        g
    }

    /// The value a source sends to its target (`P_SYNC_UUID`). Only meaningful
    /// on the result of [`Generations::start_resync_as_source`].
    pub fn sync_uuid(&self) -> u64 {
        self.bitmap
    }

    /// Undoes [`Generations::start_resync_as_source`] when the target never
    /// received the sync UUID (rule 71 here, 51 on the peer). Why: keeps the
    /// history from filling with rotations that no peer ever saw. The oldest
    /// history slot cannot be recovered and is kept as is (a duplicate).
    #[must_use = "returns the new set; the caller persists it"]
    pub fn undo_resync_start_as_source(self) -> Self {
        let mut g = self;
        g.bitmap = g.history[0];
        g.history[0] = g.history[1];
        g
    }

    /// The sync target adopts the source's sync UUID as its current and drops
    /// its bitmap identifier. Why: while Inconsistent its data belongs to the
    /// generation being synced; if the resync breaks, the source still has
    /// that value as its bitmap identifier, and the resync resumes bitmap-based
    /// (rule 50). The role flag is cleared: a target is Secondary.
    #[must_use = "returns the new set; the caller persists it"]
    pub fn start_resync_as_target(self, sync_uuid: u64) -> Self {
        Generations { current: sync_uuid & !PRIMARY_BIT, bitmap: 0, ..self }
    }

    /// The target takes over the source's lineage when the resync completes.
    /// Why: both nodes now hold the same data, so they must hold equivalent
    /// sets (the next comparison says in sync, rule 40).
    ///
    /// `source` is the source's set as the target knows it: either as reported
    /// at the handshake (before the source rotated, which is what DRBD uses) or
    /// as reported after the rotation (recognised by its bitmap identifier
    /// being this node's current, the sync UUID). Both give the set that
    /// [`Generations::finish_resync_as_source`] gives on the source.
    #[must_use = "returns the new set; the caller persists it"]
    pub fn finish_resync_as_target(self, source: &Generations) -> Self {
        let current = source.current & !PRIMARY_BIT;
        if same(source.bitmap, self.current) {
            // Post-rotation view: the source's set is (C, sync, older, _).
            Generations { current, bitmap: 0, history: [source.bitmap, source.history[0]] }
        } else {
            // Handshake view: the source will push its bitmap identifier (or,
            // if it had none, keep its history) behind the sync UUID.
            let older = if source.bitmap != 0 { source.bitmap } else { source.history[0] };
            Generations { current, bitmap: 0, history: [self.current, older] }
        }
    }

    /// The source closes the resync: its bitmap identifier moves to history
    /// and is cleared. Why: the peer is in sync again, so the bitmap no longer
    /// tracks changes against any older generation.
    #[must_use = "returns the new set; the caller persists it"]
    pub fn finish_resync_as_source(self) -> Self {
        let mut g = self;
        if g.bitmap != 0 {
            g.push_history(g.bitmap);
        }
        g.bitmap = 0;
        g
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: u64 = 0x1000;
    const H1: u64 = 0x2000;
    const H2: u64 = 0x3000;

    fn synced() -> Generations {
        Generations { current: C, bitmap: 0, history: [H1, H2] }
    }

    #[test]
    fn same_ignores_the_role_bit() {
        assert!(same(0x10, 0x11));
        assert!(!same(0x10, 0x12));
        assert!(is_blank(5));
        assert!(is_blank(1));
        assert!(!is_blank(6));
    }

    #[test]
    fn just_created_is_four() {
        let g = Generations::just_created();
        assert_eq!(g, Generations { current: 4, bitmap: 0, history: [0, 0] });
        assert!(g.is_just_created());
    }

    #[test]
    fn new_current_moves_current_into_bitmap_keeping_the_role_bit() {
        let g = Generations { current: C | 1, ..synced() }.new_current(0x5550, false);
        assert_eq!(g.bitmap, C | 1);
        assert_eq!(g.current, 0x5552);
        assert_eq!(g.history, [H1, H2]);
        let p = synced().new_current(0x5550, true);
        assert_eq!(p.current, 0x5553);
    }

    #[test]
    fn new_current_with_a_bitmap_keeps_it_and_retires_current_to_history() {
        let g = Generations { current: 0x7000, bitmap: C, history: [H1, H2] }.new_current(0x9000, true);
        assert_eq!(g.bitmap, C);
        assert_eq!(g.history, [0x7000, H1]);
        assert!(same(g.current, 0x9002));
    }

    #[test]
    fn new_current_never_yields_a_blank_current() {
        for r in [0, 1, 4, 5] {
            assert!(!Generations::just_created().new_current(r, false).is_just_created());
        }
    }

    #[test]
    fn clear_bitmap_new_current_drops_bitmap_and_keeps_lineage() {
        let g =
            Generations { current: 0x7000, bitmap: C, history: [H1, H2] }.clear_bitmap_new_current(0x9000);
        assert_eq!(g, Generations { current: 0x9002, bitmap: 0, history: [0x7000, C] });
        let fresh = Generations::just_created().clear_bitmap_new_current(0x9000);
        assert_eq!(fresh, Generations { current: 0x9002, bitmap: 0, history: [0, 0] });
        let peer = Generations::just_created().adopt_cleared_current(fresh.current);
        assert!(peer.equivalent(&fresh));
    }

    #[test]
    fn resync_start_as_source_bumps_a_bitmap_and_pushes_it_to_history() {
        let src =
            Generations { current: 0x7000, bitmap: C, history: [H1, H2] }.start_resync_as_source(0xdead);
        assert_eq!(src.bitmap, C + NEW_BITMAP_OFFSET);
        assert_eq!(src.sync_uuid(), C + NEW_BITMAP_OFFSET);
        assert_eq!(src.history, [C, H1]);
    }

    #[test]
    fn resync_start_as_source_without_bitmap_uses_the_random_value() {
        let src = synced().start_resync_as_source(0xdead0);
        assert_eq!(src.bitmap, 0xdead2);
        assert_eq!(src.history, [H1, H2]);
        let jc = Generations { current: 0x7000, bitmap: JUST_CREATED, history: [0, 0] };
        let src = jc.start_resync_as_source(0xdead0);
        assert_eq!(src.bitmap, 0xdead2);
        assert_eq!(src.history, [JUST_CREATED, 0]);
    }

    #[test]
    fn undo_resync_start_restores_the_bitmap() {
        let before = Generations { current: 0x7000, bitmap: C, history: [H1, H2] };
        let undone = before.start_resync_as_source(1).undo_resync_start_as_source();
        assert_eq!(undone.current, before.current);
        assert_eq!(undone.bitmap, before.bitmap);
        assert_eq!(undone.history[0], before.history[0]);
    }

    #[test]
    fn resync_target_adopts_sync_uuid_then_source_set() {
        let source = Generations { current: 0x7001, bitmap: C, history: [H1, H2] };
        let started = source.start_resync_as_source(0);
        let target = synced().start_resync_as_target(started.sync_uuid());
        assert_eq!(target, Generations { current: C + NEW_BITMAP_OFFSET, bitmap: 0, history: [H1, H2] });
        let source_done = started.finish_resync_as_source();
        assert_eq!(
            source_done,
            Generations { current: 0x7001, bitmap: 0, history: [C + NEW_BITMAP_OFFSET, C] }
        );
        // Either view of the source gives the same result on the target.
        assert!(target.finish_resync_as_target(&source).equivalent(&source_done));
        assert!(target.finish_resync_as_target(&started).equivalent(&source_done));
    }

    #[test]
    fn resync_from_a_source_without_bitmap_identifier() {
        let source = Generations { current: 0x7000, bitmap: 0, history: [H1, H2] };
        let started = source.start_resync_as_source(0xabc0);
        let target = Generations::just_created().start_resync_as_target(started.sync_uuid());
        let source_done = started.finish_resync_as_source();
        assert_eq!(source_done, Generations { current: 0x7000, bitmap: 0, history: [0xabc2, H1] });
        assert!(target.finish_resync_as_target(&source).equivalent(&source_done));
        assert!(target.finish_resync_as_target(&started).equivalent(&source_done));
    }

    #[test]
    fn finish_as_source_without_bitmap_keeps_history() {
        assert_eq!(synced().finish_resync_as_source(), synced());
    }
}
