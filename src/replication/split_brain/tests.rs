use proptest::prelude::*;

use super::*;
use crate::metadata::generations::Generations;
use crate::replication::states::DiskState;
use Role::{Primary, Secondary};

const BITMAP: u64 = 0xB0;

/// A side of a rule-90 split brain: `older` sets the Primary bit of its bitmap generation.
fn view(role: Role, older: bool, dirty_blocks: u64, node_id: u32) -> SideView {
    SideView {
        gens: Generations {
            current: 0xC0 + u64::from(node_id) * 0x10,
            bitmap: BITMAP | u64::from(older),
            history: [0xA0, 0],
        },
        role,
        disk: DiskState::UpToDate,
        crashed_primary: false,
        dirty_blocks,
        discard_my_data: false,
        node_id,
    }
}

fn secondary(dirty_blocks: u64, node_id: u32) -> SideView {
    view(Secondary, false, dirty_blocks, node_id)
}

fn split_brain(auto_recoverable: bool) -> Decision {
    Decision {
        outcome: SyncDecision::SplitBrain { auto_recoverable },
        rule: if auto_recoverable { 90 } else { 100 },
        reason: "the data diverged",
    }
}

fn policies(p0: AfterSb0Pri, p1: AfterSb1, p2: AfterSb2) -> Policies {
    Policies { after_sb_0pri: p0, after_sb_1pri: p1, after_sb_2pri: p2 }
}

fn only_0pri(p0: AfterSb0Pri) -> Policies {
    policies(p0, AfterSb1::Disconnect, AfterSb2::Disconnect)
}

/// Who loses, as (name, flagged as a losing Primary), seen from alpha (local) and checked to
/// be the mirror of beta's view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Loses(&'static str),
    /// The loser is Primary and must give the role up.
    PrimaryLoses(&'static str),
    Unresolved(&'static str),
}

fn run(alpha: &SideView, beta: &SideView, p: &Policies) -> Recovery {
    let here = recover(split_brain(true), alpha, beta, p, "alpha", "beta");
    let there = recover(split_brain(true), beta, alpha, p, "beta", "alpha");
    assert_eq!(here, there.mirror(), "alpha and beta disagree");
    here
}

fn check(alpha: &SideView, beta: &SideView, p: &Policies, want: Want) {
    let got = run(alpha, beta, p);
    let case = format!("{p:?}\n  alpha {alpha:?}\n  beta {beta:?}\n  got {got:?}");
    match (&got, want) {
        (Recovery::Resolved(r), Want::Loses(name) | Want::PrimaryLoses(name)) => {
            let loser = if r.local_loses() { "alpha" } else { "beta" };
            assert_eq!(loser, name, "{case}");
            let flagged = matches!(want, Want::PrimaryLoses(_));
            assert_eq!(r.loser_is_primary, flagged, "{case}");
            assert_eq!(r.local_must_give_up_primary(), flagged && loser == "alpha", "{case}");
            assert!(r.reason.contains(name), "{case}");
        }
        (Recovery::Unresolved { reason }, Want::Unresolved(fragment)) => {
            assert!(reason.contains(fragment), "should contain {fragment:?}: {case}");
        }
        (_, want) => panic!("want {want:?}: {case}"),
    }
}

use Want::*;

#[test]
fn only_recoverable_split_brains_are_resolved() {
    let (a, b) = (secondary(0, 1), secondary(5, 2));
    let p = only_0pri(AfterSb0Pri::DiscardZeroChanges);
    assert!(matches!(recover(split_brain(true), &a, &b, &p, "alpha", "beta"), Recovery::Resolved(_)));
    match recover(split_brain(false), &a, &b, &p, "alpha", "beta") {
        Recovery::Unresolved { reason } => assert!(reason.contains("--discard-my-data"), "{reason}"),
        other => panic!("{other:?}"),
    }
    for outcome in
        [SyncDecision::InSync, SyncDecision::SourceBitmap, SyncDecision::TargetFull, SyncDecision::Unrelated]
    {
        let d = Decision { outcome, rule: 50, reason: "x" };
        assert_eq!(recover(d, &a, &b, &p, "alpha", "beta"), Recovery::NotSplitBrain);
    }
}

#[test]
fn resolution_gives_the_decision_to_continue_with() {
    let (a, b) = (secondary(0, 1), secondary(5, 2));
    let Recovery::Resolved(r) = run(&a, &b, &only_0pri(AfterSb0Pri::DiscardZeroChanges)) else { panic!() };
    assert_eq!(r.outcome, SyncDecision::TargetBitmap);
    assert_eq!(r.policy, "after-sb-0pri discard-zero-changes");
    assert_eq!(r.reason, "alpha has no changes since the split");
    let d = r.decision(&split_brain(true));
    assert_eq!((d.outcome, d.rule), (SyncDecision::TargetBitmap, 90));
    assert_eq!(r.mirror().decision(&split_brain(true)).outcome, SyncDecision::SourceBitmap);
}

#[test]
fn after_sb_0pri_table() {
    use AfterSb0Pri::*;
    let node = |n: &str| DiscardNode(n.to_string());
    // (policy, alpha, beta, want); alpha has node id 1 (loses ties) unless stated.
    let cases = [
        (Disconnect, secondary(0, 1), secondary(5, 2), Unresolved("after-sb-0pri is disconnect")),
        // younger: the side without the Primary bit was promoted after the split.
        (DiscardYoungerPrimary, view(Secondary, true, 9, 1), view(Secondary, false, 1, 2), Loses("beta")),
        (DiscardYoungerPrimary, view(Secondary, false, 1, 1), view(Secondary, true, 9, 2), Loses("alpha")),
        (DiscardOlderPrimary, view(Secondary, true, 1, 1), view(Secondary, false, 9, 2), Loses("alpha")),
        (DiscardOlderPrimary, view(Secondary, false, 9, 1), view(Secondary, true, 1, 2), Loses("beta")),
        // Equal bits: zero changes, then least changes, then the node id.
        (DiscardYoungerPrimary, view(Secondary, true, 0, 1), view(Secondary, true, 3, 2), Loses("alpha")),
        (DiscardYoungerPrimary, secondary(7, 1), secondary(3, 2), Loses("beta")),
        (DiscardOlderPrimary, secondary(3, 1), secondary(7, 2), Loses("alpha")),
        (DiscardOlderPrimary, secondary(3, 2), secondary(3, 1), Loses("beta")),
        (DiscardOlderPrimary, secondary(0, 1), secondary(0, 2), Loses("alpha")),
        (DiscardOlderPrimary, secondary(3, 1), secondary(3, 1), Unresolved("node ids are equal")),
        (DiscardZeroChanges, secondary(0, 1), secondary(5, 2), Loses("alpha")),
        (DiscardZeroChanges, secondary(5, 1), secondary(0, 2), Loses("beta")),
        (DiscardZeroChanges, secondary(0, 2), secondary(0, 1), Loses("beta")),
        (DiscardZeroChanges, secondary(0, 1), secondary(0, 2), Loses("alpha")),
        (DiscardZeroChanges, secondary(0, 7), secondary(0, 7), Unresolved("cannot break the tie")),
        (
            DiscardZeroChanges,
            secondary(1, 1),
            secondary(500, 2),
            Unresolved("both nodes changed blocks since the split (alpha 1, beta 500)"),
        ),
        // The Primary bits play no part in the other policies.
        (DiscardZeroChanges, view(Secondary, true, 0, 1), view(Secondary, false, 5, 2), Loses("alpha")),
        (DiscardLeastChanges, secondary(1, 1), secondary(500, 2), Loses("alpha")),
        (DiscardLeastChanges, secondary(500, 1), secondary(1, 2), Loses("beta")),
        (DiscardLeastChanges, secondary(0, 1), secondary(1, 2), Loses("alpha")),
        (DiscardLeastChanges, secondary(8, 1), secondary(8, 2), Loses("alpha")),
        (DiscardLeastChanges, secondary(8, 3), secondary(8, 2), Loses("beta")),
        (
            DiscardLeastChanges,
            secondary(8, 3),
            secondary(8, 3),
            Unresolved("as many blocks (alpha 8, beta 8)"),
        ),
        (node("alpha"), secondary(500, 1), secondary(0, 2), Loses("alpha")),
        (node("beta"), secondary(0, 1), secondary(500, 2), Loses("beta")),
        (node("gamma"), secondary(0, 1), secondary(500, 2), Unresolved("not exactly one of the two nodes")),
    ];
    for (p0, alpha, beta, want) in cases {
        let p = only_0pri(p0.clone());
        check(&alpha, &beta, &p, want);
    }
}

#[test]
fn after_sb_1pri_table() {
    use AfterSb0Pri as Z;
    use AfterSb1 as O;
    let primary = |dirty, id| view(Primary, false, dirty, id);
    // (1pri policy, 0pri policy, alpha, beta, want)
    let cases = [
        (
            O::Disconnect,
            Z::DiscardLeastChanges,
            primary(9, 1),
            secondary(1, 2),
            Unresolved("after-sb-1pri is disconnect"),
        ),
        // consensus: the 0pri result, if it discards the Secondary.
        (O::Consensus, Z::DiscardLeastChanges, primary(9, 1), secondary(1, 2), Loses("beta")),
        (O::Consensus, Z::DiscardLeastChanges, secondary(1, 1), primary(9, 2), Loses("alpha")),
        (
            O::Consensus,
            Z::DiscardLeastChanges,
            primary(1, 1),
            secondary(9, 2),
            Unresolved("would discard the Primary alpha"),
        ),
        (
            O::Consensus,
            Z::DiscardZeroChanges,
            primary(0, 1),
            secondary(9, 2),
            Unresolved("would discard the Primary"),
        ),
        (
            O::Consensus,
            Z::DiscardZeroChanges,
            primary(2, 1),
            secondary(9, 2),
            Unresolved("both nodes changed blocks"),
        ),
        (
            O::Consensus,
            Z::Disconnect,
            primary(9, 1),
            secondary(1, 2),
            Unresolved("after-sb-0pri is disconnect"),
        ),
        (O::Consensus, Z::DiscardNode("beta".into()), primary(0, 1), secondary(9, 2), Loses("beta")),
        // discard-secondary, whatever the changes and the 0pri policy.
        (O::DiscardSecondary, Z::Disconnect, primary(0, 1), secondary(9, 2), Loses("beta")),
        (O::DiscardSecondary, Z::DiscardNode("beta".into()), secondary(9, 2), primary(0, 1), Loses("alpha")),
        // call-pri-lost-after-sb: the 0pri result; a losing Primary is flagged.
        (O::CallPriLostAfterSb, Z::DiscardLeastChanges, primary(9, 1), secondary(1, 2), Loses("beta")),
        (
            O::CallPriLostAfterSb,
            Z::DiscardLeastChanges,
            primary(1, 1),
            secondary(9, 2),
            PrimaryLoses("alpha"),
        ),
        (
            O::CallPriLostAfterSb,
            Z::DiscardNode("beta".into()),
            secondary(1, 1),
            primary(9, 2),
            PrimaryLoses("beta"),
        ),
        (
            O::CallPriLostAfterSb,
            Z::Disconnect,
            primary(1, 1),
            secondary(9, 2),
            Unresolved("after-sb-0pri is disconnect"),
        ),
    ];
    for (p1, p0, alpha, beta, want) in cases {
        let p = policies(p0.clone(), p1, AfterSb2::CallPriLostAfterSb);
        check(&alpha, &beta, &p, want);
    }
}

#[test]
fn after_sb_2pri_table() {
    use AfterSb0Pri as Z;
    use AfterSb2 as T;
    let primary = |dirty, id| view(Primary, false, dirty, id);
    let cases = [
        (
            T::Disconnect,
            Z::DiscardLeastChanges,
            primary(1, 1),
            primary(9, 2),
            Unresolved("after-sb-2pri is disconnect"),
        ),
        (T::CallPriLostAfterSb, Z::DiscardLeastChanges, primary(1, 1), primary(9, 2), PrimaryLoses("alpha")),
        (T::CallPriLostAfterSb, Z::DiscardLeastChanges, primary(9, 1), primary(1, 2), PrimaryLoses("beta")),
        (
            T::CallPriLostAfterSb,
            Z::DiscardNode("beta".into()),
            primary(1, 1),
            primary(9, 2),
            PrimaryLoses("beta"),
        ),
        (
            T::CallPriLostAfterSb,
            Z::Disconnect,
            primary(1, 1),
            primary(9, 2),
            Unresolved("after-sb-0pri is disconnect"),
        ),
        (
            T::CallPriLostAfterSb,
            Z::DiscardZeroChanges,
            primary(1, 1),
            primary(9, 2),
            Unresolved("both nodes changed"),
        ),
    ];
    for (p2, p0, alpha, beta, want) in cases {
        let p = policies(p0.clone(), AfterSb1::DiscardSecondary, p2);
        check(&alpha, &beta, &p, want);
    }
}

#[test]
fn the_number_of_primaries_selects_the_policy() {
    let p = policies(AfterSb0Pri::DiscardLeastChanges, AfterSb1::Disconnect, AfterSb2::Disconnect);
    check(&secondary(1, 1), &secondary(9, 2), &p, Loses("alpha"));
    check(&view(Primary, false, 1, 1), &secondary(9, 2), &p, Unresolved("after-sb-1pri"));
    check(&view(Primary, false, 1, 1), &view(Primary, false, 9, 2), &p, Unresolved("after-sb-2pri"));
    // A peer whose role is not known counts as not Primary.
    check(&view(Role::Unknown, false, 1, 1), &secondary(9, 2), &p, Loses("alpha"));
}

#[test]
fn rr_conflict_actions() {
    use RrConflictAction as A;
    use SyncDecision::*;
    // (outcome, local role, peer role, policy, action)
    let cases = [
        (TargetBitmap, Secondary, Primary, RrConflict::Disconnect, A::Proceed),
        (SourceFull, Primary, Secondary, RrConflict::Disconnect, A::Proceed),
        (InSync, Primary, Primary, RrConflict::Disconnect, A::Proceed),
        (SplitBrain { auto_recoverable: true }, Primary, Primary, RrConflict::CallPriLost, A::Proceed),
        (TargetBitmap, Secondary, Secondary, RrConflict::CallPriLost, A::Proceed),
        (TargetBitmap, Primary, Secondary, RrConflict::Disconnect, A::Disconnect),
        (TargetFull, Primary, Secondary, RrConflict::Disconnect, A::Disconnect),
        (SourceBitmap, Secondary, Primary, RrConflict::Disconnect, A::Disconnect),
        (TargetBitmap, Primary, Secondary, RrConflict::CallPriLost, A::CallPriLost { here: true }),
        (SourceFull, Secondary, Primary, RrConflict::CallPriLost, A::CallPriLost { here: false }),
        (TargetBitmap, Primary, Primary, RrConflict::CallPriLost, A::CallPriLost { here: true }),
        (TargetBitmap, Primary, Secondary, RrConflict::RetryConnect, A::RetryConnect),
        (SourceBitmap, Secondary, Primary, RrConflict::RetryConnect, A::RetryConnect),
    ];
    for (outcome, local, peer, policy, want) in cases {
        let got = rr_conflict(outcome, local, peer, policy);
        assert_eq!(got, want, "{outcome:?} {local:?} {peer:?} {policy:?}");
        assert_eq!(got.refuses(), want != A::Proceed);
        // The other node reaches the same verdict; the handler runs on exactly one of them.
        let there = rr_conflict(outcome.mirror(), peer, local, policy);
        match (got, there) {
            (A::CallPriLost { here }, A::CallPriLost { here: there }) => assert_ne!(here, there),
            (got, there) => assert_eq!(got, there),
        }
    }
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Primary), Just(Secondary), Just(Role::Unknown)]
}

/// Small ranges, so that equal bits, equal counts, zero counts and equal node ids all occur.
fn side_view() -> impl Strategy<Value = SideView> {
    (role(), any::<bool>(), 0u64..4, 0u32..3, any::<u64>()).prop_map(|(role, older, dirty, id, current)| {
        let mut v = view(role, older, dirty, id);
        v.gens.current = current;
        v
    })
}

fn policies_strategy() -> impl Strategy<Value = Policies> {
    let p0 = prop_oneof![
        Just(AfterSb0Pri::Disconnect),
        Just(AfterSb0Pri::DiscardYoungerPrimary),
        Just(AfterSb0Pri::DiscardOlderPrimary),
        Just(AfterSb0Pri::DiscardZeroChanges),
        Just(AfterSb0Pri::DiscardLeastChanges),
        Just(AfterSb0Pri::DiscardNode("alpha".into())),
        Just(AfterSb0Pri::DiscardNode("beta".into())),
        Just(AfterSb0Pri::DiscardNode("gamma".into())),
    ];
    let p1 = prop::sample::select(AfterSb1::ALL);
    let p2 = prop::sample::select(AfterSb2::ALL);
    (p0, p1, p2).prop_map(|(p0, p1, p2)| policies(p0, p1, p2))
}

proptest! {
    /// Both nodes, each evaluating with itself as local, reach mirrored results, and a
    /// resolution always flags a losing Primary.
    #[test]
    fn both_nodes_agree(
        alpha in side_view(),
        beta in side_view(),
        p in policies_strategy(),
        recoverable in any::<bool>(),
    ) {
        let d = split_brain(recoverable);
        let here = recover(d, &alpha, &beta, &p, "alpha", "beta");
        let there = recover(d, &beta, &alpha, &p, "beta", "alpha");
        prop_assert_eq!(&here, &there.mirror());
        match &here {
            Recovery::Resolved(r) => {
                prop_assert!(recoverable);
                prop_assert!(matches!(r.outcome, SyncDecision::SourceBitmap | SyncDecision::TargetBitmap));
                let loser = if r.local_loses() { &alpha } else { &beta };
                prop_assert_eq!(r.loser_is_primary, loser.role == Primary);
                let primaries = [&alpha, &beta].iter().filter(|v| v.role == Primary).count();
                if primaries == 2 {
                    prop_assert!(r.loser_is_primary);
                }
                if primaries == 1 && p.after_sb_1pri != AfterSb1::CallPriLostAfterSb {
                    prop_assert!(!r.loser_is_primary, "only call-pri-lost-after-sb discards a Primary");
                }
            }
            Recovery::Unresolved { .. } => {}
            Recovery::NotSplitBrain => prop_assert!(false, "a split brain was not recognised"),
        }
    }
}
