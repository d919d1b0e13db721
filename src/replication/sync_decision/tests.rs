use proptest::prelude::*;

use super::*;
use crate::metadata::generations::NEW_BITMAP_OFFSET as OFF;
use DiskState::*;
use SyncDecision::*;

const A: u64 = 0xA0;
const B: u64 = 0xB0;
const X: u64 = 0xC0;
const Y: u64 = 0xD0;
const H: u64 = 0xE0;

fn g(current: u64, bitmap: u64, h1: u64, h2: u64) -> Generations {
    Generations { current, bitmap, history: [h1, h2] }
}

fn side(gens: Generations) -> SideView {
    SideView {
        gens,
        role: Role::Secondary,
        disk: UpToDate,
        crashed_primary: false,
        dirty_blocks: 0,
        discard_my_data: false,
        node_id: 1,
    }
}

fn with_disk(mut s: SideView, disk: DiskState) -> SideView {
    s.disk = disk;
    s
}

/// Asserts the decision on both nodes: `local` sees `outcome` by `rule`, the
/// peer sees the mirror (by `peer_rule`).
fn check(local: &SideView, peer: &SideView, outcome: SyncDecision, rule: u32, peer_rule: u32) {
    let here = decide(local, peer);
    assert_eq!((here.outcome, here.rule), (outcome, rule), "local view: {here:?}");
    let there = decide(peer, local);
    assert_eq!((there.outcome, there.rule), (mirror(outcome), peer_rule), "peer view: {there:?}");
}

#[test]
fn mirror_swaps_source_and_target_only() {
    assert_eq!(mirror(SourceBitmap), TargetBitmap);
    assert_eq!(mirror(TargetBitmap), SourceBitmap);
    assert_eq!(mirror(SourceFull), TargetFull);
    assert_eq!(mirror(TargetFull), SourceFull);
    for d in [InSync, SplitBrain { auto_recoverable: true }, SplitBrain { auto_recoverable: false }] {
        assert_eq!(mirror(d), d);
    }
    for d in [Unrelated, NoUsableSource, NoDisk] {
        assert_eq!(mirror(d), d);
    }
}

#[test]
fn rule_10_just_created_both() {
    let l = with_disk(side(Generations::just_created()), Inconsistent);
    let p = with_disk(side(g(JUST_CREATED | 1, 0, 0, 0)), Inconsistent);
    check(&l, &p, InSync, 10, 10);
}

#[test]
fn rule_10_no_data_generation_on_either_side() {
    // DRBD would make both targets (0/0) or sync from the 0 side (0/4).
    check(&side(g(0, 0, 0, 0)), &side(g(0, 0, 0, 0)), InSync, 10, 10);
    check(&side(g(0, 0, 0, 0)), &side(Generations::just_created()), InSync, 10, 10);
}

#[test]
fn rule_20_just_created_self() {
    let l = with_disk(side(Generations::just_created()), Inconsistent);
    check(&l, &side(g(A, 0, 0, 0)), TargetFull, 20, 30);
    // a current of 0 counts as just created
    check(&side(g(0, 0, 0, 0)), &side(g(A, 0, 0, 0)), TargetFull, 20, 30);
}

#[test]
fn rule_30_just_created_peer() {
    let p = with_disk(side(Generations::just_created()), Inconsistent);
    check(&side(g(A, B, H, 0)), &p, SourceFull, 30, 20);
}

#[test]
fn rule_34_source_missed_finish() {
    // Local started as source (A, S, X, ..); the target finished: (A, 0, S, X).
    let s = X + OFF;
    check(&side(g(A, s, X, H)), &side(g(A, 0, s, X)), SourceBitmap, 34, 35);
}

#[test]
fn rule_35_peer_missed_finish() {
    let s = X + OFF;
    check(&side(g(A, 0, s, X)), &side(g(A | 1, s, X, H)), TargetBitmap, 35, 34);
}

#[test]
fn rule_36_source_unfinished() {
    check(&side(g(A, X, H, 0)), &side(g(A, 0, Y, 0)), SourceBitmap, 36, 37);
}

#[test]
fn rule_37_peer_source_unfinished() {
    check(&side(g(A, 0, Y, 0)), &side(g(A, X, H, 0)), TargetBitmap, 37, 36);
}

#[test]
fn rule_40_same_generation_no_crash_is_in_sync() {
    check(&side(g(A, 0, H, 0)), &side(g(A | 1, 0, H, 0)), InSync, 40, 40);
    // both with (different) bitmap identifiers and no crash: still in sync
    check(&side(g(A, X, 0, 0)), &side(g(A, Y, 0, 0)), InSync, 40, 40);
    // roles do not matter without a crashed Primary
    let mut l = side(g(A, 0, 0, 0));
    let mut p = l;
    l.role = Role::Primary;
    p.role = Role::Primary;
    check(&l, &p, InSync, 40, 40);
}

#[test]
fn rule_40_crashed_primary_becomes_source() {
    let mut l = side(g(A, 0, H, 0));
    let p = l;
    l.crashed_primary = true;
    check(&l, &p, SourceBitmap, 40, 40);
    check(&p, &l, TargetBitmap, 40, 40);
}

#[test]
fn rule_40_both_crashed_lower_node_id_is_source() {
    let mut l = side(g(A, 0, H, 0));
    l.crashed_primary = true;
    let mut p = l;
    l.node_id = 1;
    p.node_id = 2;
    check(&l, &p, SourceBitmap, 40, 40);
}

#[test]
fn rule_40_both_crashed_equal_node_ids_cannot_be_ordered() {
    let mut l = side(g(A, 0, H, 0));
    l.crashed_primary = true;
    let p = l;
    check(&l, &p, SplitBrain { auto_recoverable: false }, 40, 40);
    // ... which the operator can resolve
    let mut victim = p;
    victim.discard_my_data = true;
    check(&l, &victim, SourceBitmap, 40, 40);
}

#[test]
fn rule_41_crashed_primary_current_primary_is_source() {
    let mut l = side(g(A, 0, 0, 0));
    let mut p = l;
    l.role = Role::Primary;
    p.crashed_primary = true;
    check(&l, &p, SourceBitmap, 41, 41);
}

#[test]
fn rule_41_crashed_primary_both_primary_is_split_brain() {
    let mut l = side(g(A, 0, 0, 0));
    l.role = Role::Primary;
    l.crashed_primary = true;
    let p = SideView { crashed_primary: false, ..l };
    check(&l, &p, SplitBrain { auto_recoverable: false }, 41, 41);
}

#[test]
fn rule_50_bitmap_peer() {
    check(&side(g(A, 0, H, 0)), &side(g(B, A | 1, H, 0)), TargetBitmap, 50, 70);
}

#[test]
fn rule_51_peer_lost_sync_uuid() {
    // Peer rotated A -> A+OFF as source; local never got the sync UUID.
    check(&side(g(A, 0, H, 0)), &side(g(B, A + OFF, A, H)), TargetBitmap, 51, 71);
}

#[test]
fn rule_60_history_peer() {
    check(&side(g(A, 0, 0, 0)), &side(g(B, X, Y, A)), TargetFull, 60, 80);
}

#[test]
fn rule_70_bitmap_self() {
    check(&side(g(B, A, H, 0)), &side(g(A, 0, H, 0)), SourceBitmap, 70, 50);
}

#[test]
fn rule_71_self_lost_sync_uuid() {
    let source = g(B, A + OFF, A, H);
    check(&side(source), &side(g(A, 0, H, 0)), SourceBitmap, 71, 51);
    // undoing the rotation gives back rule 70
    check(&side(source.undo_resync_start_as_source()), &side(g(A, 0, H, 0)), SourceBitmap, 70, 50);
}

#[test]
fn rule_80_history_self() {
    check(&side(g(B, X, A, 0)), &side(g(A, Y, 0, 0)), SourceFull, 80, 60);
}

#[test]
fn rule_90_bitmap_both() {
    check(&side(g(A, X, H, 0)), &side(g(B, X | 1, H, 0)), SplitBrain { auto_recoverable: true }, 90, 90);
}

#[test]
fn rule_90_needs_a_real_common_generation() {
    // Both forced Primary from freshly created metadata: never synced.
    let l = side(Generations::just_created().new_current(A, true));
    let p = side(Generations::just_created().new_current(B, true));
    check(&l, &p, Unrelated, 1000, 1000);
}

#[test]
fn rule_100_history_both() {
    check(&side(g(A, X, H, 0)), &side(g(B, Y, 0, H)), SplitBrain { auto_recoverable: false }, 100, 100);
}

#[test]
fn rule_100_ignores_empty_history_slots() {
    check(&side(g(A, X, 0, 0)), &side(g(B, Y, 0, 0)), Unrelated, 1000, 1000);
}

#[test]
fn rule_1000_unrelated() {
    let d = decide(&side(g(A, 0, X, 0)), &side(g(B, 0, Y, 0)));
    assert_eq!(
        d,
        Decision { outcome: Unrelated, rule: 1000, reason: "no common generation: unrelated data" }
    );
}

#[test]
fn contradicting_lineages_are_a_split_brain() {
    // Each side's current is the other's bitmap identifier (DRBD: both targets).
    check(&side(g(A, B, 0, 0)), &side(g(B, A, 0, 0)), SplitBrain { auto_recoverable: false }, 50, 50);
    // Local behind by history, peer behind by bitmap (DRBD: local target, peer source... and vice versa).
    check(&side(g(A, B, 0, 0)), &side(g(B, X, A, 0)), SplitBrain { auto_recoverable: false }, 60, 50);
}

#[test]
fn no_disk_means_no_handshake() {
    let l = side(g(A, 0, 0, 0));
    for disk in [Diskless, Attaching, Failed, DUnknown] {
        check(&l, &with_disk(side(g(B, 0, 0, 0)), disk), NoDisk, 0, 0);
    }
}

#[test]
fn one_inconsistent_side_becomes_target_bitmap() {
    // The table says local is source (rule 70), but local is Inconsistent.
    let l = with_disk(side(g(B, A, H, 0)), Inconsistent);
    check(&l, &side(g(A, 0, H, 0)), TargetBitmap, 70, 50);
    // In-sync generations with one Inconsistent side still resync.
    let p = with_disk(side(g(A, 0, H, 0)), Inconsistent);
    check(&side(g(A, 0, H, 0)), &p, SourceBitmap, 40, 40);
}

#[test]
fn one_inconsistent_side_keeps_a_full_sync_full() {
    let l = with_disk(side(g(B, X, A, 0)), Inconsistent);
    check(&l, &with_disk(side(g(A, Y, 0, 0)), Outdated), TargetFull, 80, 60);
}

#[test]
fn one_inconsistent_side_resolves_split_brains() {
    let p = with_disk(side(g(B, Y, 0, H)), Inconsistent);
    check(&side(g(A, X, H, 0)), &p, SourceFull, 100, 100);
    let p = with_disk(side(g(B, X, H, 0)), Inconsistent);
    check(&side(g(A, X, H, 0)), &p, SourceBitmap, 90, 90);
}

#[test]
fn inconsistent_side_does_not_override_unrelated_data() {
    let p = with_disk(side(g(B, 0, Y, 0)), Inconsistent);
    check(&side(g(A, 0, X, 0)), &p, Unrelated, 1000, 1000);
}

#[test]
fn discard_my_data_on_one_side_resolves_split_brain() {
    let mut victim = side(g(A, X, H, 0));
    victim.discard_my_data = true;
    let survivor = side(g(B, X, H, 0));
    check(&victim, &survivor, TargetBitmap, 90, 90);
    let mut victim = side(g(A, X, H, 0));
    victim.discard_my_data = true;
    check(&victim, &side(g(B, Y, 0, H)), TargetBitmap, 100, 100);
}

#[test]
fn discard_my_data_on_both_sides_resolves_nothing() {
    let mut l = side(g(A, X, H, 0));
    l.discard_my_data = true;
    let mut p = side(g(B, X, H, 0));
    p.discard_my_data = true;
    check(&l, &p, SplitBrain { auto_recoverable: true }, 90, 90);
}

#[test]
fn discard_my_data_without_split_brain_is_ignored() {
    let mut l = side(g(B, A, H, 0));
    l.discard_my_data = true;
    check(&l, &side(g(A, 0, H, 0)), SourceBitmap, 70, 50);
}

#[test]
fn source_without_consistent_data_cannot_sync() {
    let l = with_disk(side(g(B, A, H, 0)), Inconsistent);
    let p = with_disk(side(g(A, 0, H, 0)), Inconsistent);
    check(&l, &p, NoUsableSource, 70, 50);
    let l = with_disk(side(g(B, A, H, 0)), Negotiating);
    check(&l, &side(g(A, 0, H, 0)), NoUsableSource, 70, 50);
    // The surviving side of a manually resolved split brain must have data.
    let mut victim = with_disk(side(g(A, X, H, 0)), Inconsistent);
    victim.discard_my_data = true;
    check(&victim, &with_disk(side(g(B, X, H, 0)), Inconsistent), NoUsableSource, 90, 90);
}

#[test]
fn outdated_and_consistent_may_be_sources() {
    check(&with_disk(side(g(B, A, H, 0)), Outdated), &side(g(A, 0, H, 0)), SourceBitmap, 70, 50);
    check(&with_disk(side(g(B, A, H, 0)), Consistent), &side(g(A, 0, H, 0)), SourceBitmap, 70, 50);
}

#[test]
fn new_current_with_a_bitmap_still_resyncs_by_bitmap() {
    // Disconnected Primary rotated once (bitmap = A), then again (forced).
    let peer = side(g(A, 0, H, 0));
    let once = g(A, 0, H, 0).new_current(B, true);
    let twice = once.new_current(X, true);
    check(&side(twice), &peer, SourceBitmap, 70, 50);
    // a peer that saw the intermediate generation needs a full sync
    check(&side(twice), &side(g(once.current, 0, 0, 0)), SourceFull, 80, 60);
}

#[test]
fn clear_bitmap_new_current_then_adopt_is_in_sync() {
    let l = Generations::just_created().clear_bitmap_new_current(A);
    let p = Generations::just_created().adopt_cleared_current(l.current);
    check(&side(l), &side(p), InSync, 40, 40);
    // a peer that did not adopt it gets a full sync of the old lineage
    let old = g(B, 0, H, 0);
    check(&side(old.clear_bitmap_new_current(A)), &side(old), SourceFull, 80, 60);
}

// ---- properties -------------------------------------------------------------

/// Identifiers from a small pool, so that the table's equalities (including
/// role-bit variants and sync-UUID offsets) actually occur.
const POOL: &[u64] = &[0, 1, 4, 5, 0x10, 0x11, 0x20, 0x20 + OFF, 0x21 + OFF, 0x20 + 2 * OFF, 0x30, 0x40];

fn pool_uuid() -> impl Strategy<Value = u64> {
    proptest::sample::select(POOL)
}

fn pool_gens() -> impl Strategy<Value = Generations> {
    (pool_uuid(), pool_uuid(), pool_uuid(), pool_uuid()).prop_map(|(c, b, h1, h2)| g(c, b, h1, h2))
}

fn any_gens() -> impl Strategy<Value = Generations> {
    any::<(u64, u64, u64, u64)>().prop_map(|(c, b, h1, h2)| g(c, b, h1, h2))
}

fn any_role() -> impl Strategy<Value = Role> {
    proptest::sample::select(Role::ALL)
}

fn any_disk() -> impl Strategy<Value = DiskState> {
    proptest::sample::select(DiskState::ALL)
}

/// Mostly disks that take part in the handshake, so the table is exercised.
fn handshake_disk() -> impl Strategy<Value = DiskState> {
    prop_oneof![
        9 => proptest::sample::select(&[Negotiating, Inconsistent, Outdated, Consistent, UpToDate][..]),
        1 => any_disk(),
    ]
}

fn consistent_disk() -> impl Strategy<Value = DiskState> {
    proptest::sample::select(&[Inconsistent, Outdated, Consistent, UpToDate][..])
}

fn view(
    gens: impl Strategy<Value = Generations>,
    disk: impl Strategy<Value = DiskState>,
) -> impl Strategy<Value = SideView> {
    (gens, any_role(), disk, any::<bool>(), 0..10u64, any::<bool>(), 0..3u32).prop_map(
        |(gens, role, disk, crashed_primary, dirty_blocks, discard_my_data, node_id)| SideView {
            gens,
            role,
            disk,
            crashed_primary,
            dirty_blocks,
            discard_my_data,
            node_id,
        },
    )
}

/// Runs a complete resync from `source` to `target` and returns both sides'
/// sets afterwards; `source_seen` chooses which of the source's sets the target
/// was told about (handshake or after rotation).
fn complete_resync(
    source: Generations,
    target: Generations,
    random: u64,
    post_rotation_view: bool,
) -> (Generations, Generations) {
    let started = source.start_resync_as_source(random);
    let target = target.start_resync_as_target(started.sync_uuid());
    let seen = if post_rotation_view { started } else { source };
    (started.finish_resync_as_source(), target.finish_resync_as_target(&seen))
}

/// The views after a completed resync: same roles and ids, both UpToDate, no
/// crash flags, no discard requests.
fn after_sync(v: &SideView, gens: Generations) -> SideView {
    SideView { gens, disk: UpToDate, crashed_primary: false, discard_my_data: false, dirty_blocks: 0, ..*v }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8192))]

    /// The two nodes decide independently and must agree.
    #[test]
    fn decide_is_antisymmetric(a in view(pool_gens(), handshake_disk()), b in view(pool_gens(), handshake_disk())) {
        let here = decide(&a, &b);
        let there = decide(&b, &a);
        prop_assert_eq!(here.outcome, mirror(there.outcome), "{:?} / {:?}", here, there);
    }

    /// The rule table on its own agrees too (a policy layer may use it).
    #[test]
    fn compare_generations_is_antisymmetric(a in view(pool_gens(), any_disk()), b in view(pool_gens(), any_disk())) {
        prop_assert_eq!(compare_generations(&a, &b).outcome, mirror(compare_generations(&b, &a).outcome));
    }
}

proptest! {
    /// Arbitrary identifiers: no panic (no overflow), still antisymmetric.
    #[test]
    fn decide_never_panics(a in view(any_gens(), any_disk()), b in view(any_gens(), any_disk())) {
        let here = decide(&a, &b);
        prop_assert_eq!(here.outcome, mirror(decide(&b, &a).outcome));
        let _ = (a.gens.new_current(b.gens.current, true), a.gens.start_resync_as_source(b.gens.bitmap));
        let _ = a.gens.finish_resync_as_target(&b.gens).undo_resync_start_as_source();
    }

    /// Whenever a resync is decided and runs to completion with no further
    /// writes, both sides hold equivalent sets and compare in sync.
    #[test]
    fn completed_resync_is_in_sync(
        a in view(pool_gens(), consistent_disk()),
        b in view(pool_gens(), consistent_disk()),
        random in any::<u64>(),
        post_rotation_view in any::<bool>(),
    ) {
        let d = decide(&a, &b);
        prop_assume!(d.outcome.is_source() || d.outcome.is_target());
        let (src, tgt) = if d.outcome.is_source() { (&a, &b) } else { (&b, &a) };
        let (src_gens, tgt_gens) = complete_resync(src.gens, tgt.gens, random, post_rotation_view);
        prop_assert!(src_gens.equivalent(&tgt_gens), "{:?} vs {:?}", src_gens, tgt_gens);
        let after = decide(&after_sync(src, src_gens), &after_sync(tgt, tgt_gens));
        prop_assert_eq!(after.outcome, InSync);
        prop_assert!(after.rule == 10 || after.rule == 40, "{:?}", after);
    }

    /// A resync interrupted after the target adopted the sync UUID resumes in
    /// the same direction; one where only the source missed the end is rule 34
    /// and in sync once the source catches up.
    #[test]
    fn interrupted_resync_resumes(
        a in view(pool_gens(), consistent_disk()),
        b in view(pool_gens(), consistent_disk()),
        random in any::<u64>(),
    ) {
        let d = decide(&a, &b);
        prop_assume!(d.outcome.is_source() || d.outcome.is_target());
        let (src, tgt) = if d.outcome.is_source() { (&a, &b) } else { (&b, &a) };
        let started = src.gens.start_resync_as_source(random);
        let tgt_started = tgt.gens.start_resync_as_target(started.sync_uuid());
        let src_view = SideView { gens: started, disk: UpToDate, discard_my_data: false, ..*src };
        let tgt_view = SideView { gens: tgt_started, disk: Inconsistent, discard_my_data: false, ..*tgt };
        prop_assert!(decide(&src_view, &tgt_view).outcome.is_source());

        // (A source without a data generation would leave both blank: rule 10.)
        prop_assume!(!src.gens.is_just_created());
        let tgt_done = tgt_started.finish_resync_as_target(&src.gens);
        let missed = decide(&src_view, &after_sync(tgt, tgt_done));
        prop_assert_eq!((missed.outcome, missed.rule), (SourceBitmap, 34));
        let caught_up = decide(&after_sync(src, started.finish_resync_as_source()), &after_sync(tgt, tgt_done));
        prop_assert_eq!(caught_up.outcome, InSync);
    }

    /// A node that writes alone (new generation) is the bitmap source when
    /// the unchanged peer comes back.
    #[test]
    fn new_current_then_reconnect_is_bitmap_source(
        synced in pool_gens(),
        random in any::<u64>(),
        primary in any::<bool>(),
        writer in view(Just(g(0, 0, 0, 0)), Just(UpToDate)),
        other in view(Just(g(0, 0, 0, 0)), proptest::sample::select(&[Outdated, Consistent, UpToDate][..])),
    ) {
        let synced = Generations { bitmap: 0, ..synced };
        prop_assume!(!synced.is_just_created());
        let wrote = synced.new_current(random, primary);
        prop_assume!(![synced.current, synced.history[0], synced.history[1]].iter().any(|&u| same(u, wrote.current)));
        let w = SideView { gens: wrote, discard_my_data: false, ..writer };
        let o = SideView { gens: synced, discard_my_data: false, ..other };
        let d = decide(&w, &o);
        prop_assert_eq!((d.outcome, d.rule), (SourceBitmap, 70));
        let d = decide(&o, &w);
        prop_assert_eq!((d.outcome, d.rule), (TargetBitmap, 50));
    }

    /// Both nodes writing alone from the same generation is a split brain that
    /// policies may recover from; discarding one side and resyncing ends it.
    #[test]
    fn both_new_current_is_split_brain(
        synced in pool_gens(),
        r1 in any::<u64>(),
        r2 in any::<u64>(),
        a in view(Just(g(0, 0, 0, 0)), consistent_disk()),
        b in view(Just(g(0, 0, 0, 0)), consistent_disk()),
    ) {
        let synced = Generations { bitmap: 0, ..synced };
        prop_assume!(!synced.is_just_created());
        let (ga, gb) = (synced.new_current(r1, true), synced.new_current(r2, true));
        let known = [synced.current, synced.history[0], synced.history[1], gb.current];
        prop_assume!(!known.iter().any(|&u| same(u, ga.current)));
        prop_assume!(!known[..3].iter().any(|&u| same(u, gb.current)));
        let a = SideView { gens: ga, disk: UpToDate, discard_my_data: false, ..a };
        let b = SideView { gens: gb, disk: UpToDate, discard_my_data: false, ..b };
        let d = decide(&a, &b);
        prop_assert_eq!((d.outcome, d.rule), (SplitBrain { auto_recoverable: true }, 90));

        let victim = SideView { discard_my_data: true, ..b };
        let d = decide(&a, &victim);
        prop_assert_eq!((d.outcome, d.rule), (SourceBitmap, 90));
        let (sa, sb) = complete_resync(ga, gb, r1 ^ r2, false);
        prop_assert_eq!(decide(&after_sync(&a, sa), &after_sync(&b, sb)).outcome, InSync);
    }
}

#[test]
fn a_cleared_bitmap_is_adopted_by_a_just_created_peer_on_both_nodes() {
    let fresh = with_disk(side(Generations::just_created()), Inconsistent);
    let cleared = side(Generations::just_created().clear_bitmap_new_current(0x5550));
    // On the node that was just created:
    let (mut local, mut peer) = (fresh, cleared);
    assert!(apply_skip_initial_sync(&mut local, &mut peer, false, true));
    assert_eq!(local.disk, UpToDate);
    assert_eq!(decide(&local, &peer).outcome, InSync);
    // On the node that cleared its bitmap, the same pair of views:
    let (mut local2, mut peer2) = (cleared, fresh);
    assert!(!apply_skip_initial_sync(&mut local2, &mut peer2, true, false));
    assert_eq!(peer2.gens, local.gens);
    assert_eq!(decide(&local2, &peer2).outcome, InSync);
}

#[test]
fn a_cleared_bitmap_is_not_adopted_by_a_peer_with_data() {
    let with_data = side(g(X, 0, 0, 0));
    let cleared = side(Generations::just_created().clear_bitmap_new_current(0x5550));
    let (mut local, mut peer) = (with_data, cleared);
    assert!(!apply_skip_initial_sync(&mut local, &mut peer, false, true));
    assert_eq!(local, with_data);
    assert_eq!(decide(&local, &peer).outcome, Unrelated);
}

#[test]
fn marked_blocks_in_the_same_generation_resync_from_the_primary() {
    let gens = Generations { current: 0x1234_5678_0000, bitmap: 0, history: [0, 0] };
    let side = |role, dirty_blocks, node_id| SideView {
        gens,
        role,
        disk: UpToDate,
        crashed_primary: false,
        dirty_blocks,
        discard_my_data: false,
        node_id,
    };
    let (p, s) = (side(Role::Primary, 0, 0), side(Role::Secondary, 5, 1));
    assert_eq!(decide(&p, &s).outcome, SourceBitmap);
    assert_eq!(decide(&s, &p).outcome, TargetBitmap);
    let (a, b) = (side(Role::Secondary, 5, 0), side(Role::Secondary, 5, 1));
    assert_eq!(decide(&a, &b).outcome, InSync, "no Primary: neither side is known to be right");
    let (a, b) = (side(Role::Primary, 0, 0), side(Role::Secondary, 0, 1));
    assert_eq!(decide(&a, &b).outcome, InSync, "nothing marked");
}

#[test]
fn a_recoverable_split_brain_resolves_against_the_single_outdated_side() {
    let sb =
        Decision { outcome: SplitBrain { auto_recoverable: true }, rule: rules::BITMAP_BOTH, reason: "" };
    assert_eq!(resolve_by_outdated(sb, Outdated, UpToDate).outcome, TargetBitmap);
    assert_eq!(resolve_by_outdated(sb, UpToDate, Outdated).outcome, SourceBitmap);
    assert_eq!(
        resolve_by_outdated(sb, Outdated, Outdated).outcome,
        sb.outcome,
        "both outdated: no side known"
    );
    assert_eq!(resolve_by_outdated(sb, UpToDate, UpToDate).outcome, sb.outcome);
    let hard = Decision { outcome: SplitBrain { auto_recoverable: false }, ..sb };
    assert_eq!(
        resolve_by_outdated(hard, Outdated, UpToDate).outcome,
        hard.outcome,
        "bitmaps do not cover it"
    );
    let in_sync = Decision { outcome: InSync, ..sb };
    assert_eq!(resolve_by_outdated(in_sync, Outdated, UpToDate).outcome, InSync);
}
