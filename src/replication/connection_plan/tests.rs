use proptest::prelude::*;

use super::*;
use crate::metadata::generations::Generations;
use crate::replication::split_brain::AfterSb0Pri;
use crate::replication::states::DiskState;
use rdbd_protocol::repl::{AfterSb1, AfterSb2};
use Role::{Primary, Secondary};

fn side(role: Role, current: u64, bitmap: u64, node_id: u32) -> SideView {
    SideView {
        gens: Generations { current, bitmap, history: [0xA0, 0] },
        role,
        disk: DiskState::UpToDate,
        crashed_primary: false,
        dirty_blocks: 1,
        discard_my_data: false,
        node_id,
    }
}

fn settings<'a>(policies: &'a Policies, rr: RrConflict, alpha: bool) -> Settings<'a> {
    let (me, peer) = if alpha { ("alpha", "beta") } else { ("beta", "alpha") };
    Settings { policies, rr_conflict: rr, me, peer, dialer: alpha, outdated_loses: false }
}

/// alpha's plan, and beta's from the mirrored views.
fn both(alpha: &SideView, beta: &SideView, policies: &Policies, rr: RrConflict) -> (Plan, Plan) {
    let a = plan(alpha, beta, &settings(policies, rr, true)).plan;
    let b = plan(beta, alpha, &settings(policies, rr, false)).plan;
    (a, b)
}

fn proceed(p: Plan) -> Proceed {
    match p {
        Plan::Proceed(go) => go,
        other => panic!("expected to proceed, got {other:?}"),
    }
}

fn refusal(p: Plan) -> Refusal {
    match p {
        Plan::Refuse(r) => r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn in_sync_the_dialer_sends() {
    let (a, b) = (side(Secondary, 0xC0, 0, 0), side(Secondary, 0xC0, 0, 1));
    let (pa, pb) = both(&a, &b, &Policies::default(), RrConflict::default());
    let (pa, pb) = (proceed(pa), proceed(pb));
    assert_eq!(pa.decision.outcome, SyncDecision::InSync);
    assert!(pa.sender && !pb.sender);
}

#[test]
fn the_primary_sends_even_as_listener() {
    let (a, b) = (side(Secondary, 0xC0, 0, 0), side(Primary, 0xC0, 0, 1));
    let (pa, pb) = both(&a, &b, &Policies::default(), RrConflict::default());
    assert!(!proceed(pa).sender && proceed(pb).sender);
}

#[test]
fn two_primaries_in_sync_are_refused() {
    let (a, b) = (side(Primary, 0xC0, 0, 0), side(Primary, 0xC0, 0, 1));
    let (pa, _) = both(&a, &b, &Policies::default(), RrConflict::default());
    assert!(refusal(pa).message.contains("both nodes are Primary"));
}

#[test]
fn a_split_brain_left_to_the_operator_is_refused_and_reported() {
    let (a, b) = (side(Secondary, 0xC0, 0xB0, 0), side(Secondary, 0xD0, 0xB0, 1));
    let planned = plan(&a, &b, &settings(&Policies::default(), RrConflict::default(), true));
    let (r, found) = (refusal(planned.plan), planned.split_brain);
    assert_eq!(r.code, RefuseCode::SplitBrain);
    let found = found.expect("reported");
    assert!(found.resolution.is_none() && found.detail.contains("unresolved"), "{found:?}");
}

#[test]
fn a_policy_that_discards_the_primary_makes_it_give_up_its_role() {
    let policies = Policies {
        after_sb_0pri: AfterSb0Pri::DiscardNode("alpha".into()),
        after_sb_1pri: AfterSb1::CallPriLostAfterSb,
        after_sb_2pri: AfterSb2::Disconnect,
    };
    let (a, b) = (side(Primary, 0xC0, 0xB0, 0), side(Secondary, 0xD0, 0xB0, 1));
    let (pa, pb) = both(&a, &b, &policies, RrConflict::default());
    let (pa, pb) = (proceed(pa), proceed(pb));
    assert!(pa.decision.outcome.is_target() && pb.decision.outcome.is_source());
    assert!(pa.give_up_primary && pa.local_role == Secondary, "{pa:?}");
    assert!(!pb.give_up_primary && pb.peer_role == Secondary, "{pb:?}");
    assert!(pb.sender, "the winner sends the resync");
    // discard-secondary instead: beta, the Secondary, loses; nobody gives up a role.
    let policies = Policies { after_sb_1pri: AfterSb1::DiscardSecondary, ..policies };
    let (pa, pb) = both(&a, &b, &policies, RrConflict::default());
    let (pa, pb) = (proceed(pa), proceed(pb));
    assert!(pa.decision.outcome.is_source() && !pa.give_up_primary && !pb.give_up_primary);
}

#[test]
fn rr_conflict_refuses_a_primary_with_older_data_or_retries() {
    // beta is Primary with the older generation: it would become target.
    let (a, b) = (side(Secondary, 0xD0, 0xC0, 0), side(Primary, 0xC0, 0, 1));
    let (pa, pb) = both(&a, &b, &Policies::default(), RrConflict::Disconnect);
    let (ra, rb) = (refusal(pa), refusal(pb));
    assert!(ra.message.contains("beta is Primary with older data than alpha"), "{ra:?}");
    assert_eq!(ra.message, rb.message, "both nodes say the same");
    let (pa, pb) = both(&a, &b, &Policies::default(), RrConflict::RetryConnect);
    assert!(refusal(pa).retry && refusal(pb).retry);
    let (_, pb) = both(&a, &b, &Policies::default(), RrConflict::CallPriLost);
    assert!(refusal(pb).call_pri_lost, "the Primary that would be overwritten runs pri-lost");
}

#[test]
fn with_the_outdated_rule_the_outdated_side_of_a_split_brain_loses() {
    let (mut a, b) = (side(Secondary, 0xC0, 0xB0, 0), side(Secondary, 0xD0, 0xB0, 1));
    a.disk = DiskState::Outdated;
    let policies = Policies::default();
    let without = plan(&a, &b, &settings(&policies, RrConflict::default(), true));
    assert_eq!(refusal(without.plan).code, RefuseCode::SplitBrain, "DRBD's way: the operator decides");
    let with = Settings { outdated_loses: true, ..settings(&policies, RrConflict::default(), true) };
    let planned = plan(&a, &b, &with);
    assert!(planned.split_brain.is_none(), "not a split brain once the rule applied");
    assert_eq!(proceed(planned.plan).decision.outcome, SyncDecision::TargetBitmap);
}

#[test]
fn no_disk_on_either_side_is_left_to_the_diskless_rules() {
    let mut a = side(Primary, 0xC0, 0, 0);
    a.disk = DiskState::Diskless;
    let (pa, pb) = both(&a, &side(Secondary, 0xC0, 0, 1), &Policies::default(), RrConflict::default());
    assert_eq!((pa, pb), (Plan::NoDisk, Plan::NoDisk));
}

fn arb_side(node_id: u32) -> impl Strategy<Value = SideView> {
    let uuid = prop::sample::select(vec![0u64, 4, 0xA0, 0xB0, 0xC0, 0xD0]);
    let disk = prop::sample::select(vec![
        DiskState::UpToDate,
        DiskState::Consistent,
        DiskState::Outdated,
        DiskState::Inconsistent,
        DiskState::Diskless,
    ]);
    (uuid.clone(), uuid, any::<[bool; 4]>(), disk, 0u64..3).prop_map(
        move |(current, bitmap, [primary, pbit, crashed, discard], disk, dirty_blocks)| SideView {
            gens: Generations { current: current | u64::from(pbit), bitmap, history: [0xA0, 0] },
            role: if primary { Primary } else { Secondary },
            disk,
            crashed_primary: crashed,
            dirty_blocks,
            discard_my_data: discard,
            node_id,
        },
    )
}

fn arb_policies() -> impl Strategy<Value = (Policies, RrConflict)> {
    let p0 = prop::sample::select(vec![
        AfterSb0Pri::Disconnect,
        AfterSb0Pri::DiscardYoungerPrimary,
        AfterSb0Pri::DiscardOlderPrimary,
        AfterSb0Pri::DiscardZeroChanges,
        AfterSb0Pri::DiscardLeastChanges,
        AfterSb0Pri::DiscardNode("alpha".into()),
    ]);
    let p1 = prop::sample::select(AfterSb1::ALL.to_vec());
    let p2 = prop::sample::select(AfterSb2::ALL.to_vec());
    let rr = prop::sample::select(RrConflict::ALL.to_vec());
    (p0, p1, p2, rr).prop_map(|(after_sb_0pri, after_sb_1pri, after_sb_2pri, rr)| {
        (Policies { after_sb_0pri, after_sb_1pri, after_sb_2pri }, rr)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// Both nodes reach mirrored plans: both refuse alike, or both go on with mirrored
    /// outcomes, disks and roles and exactly one sender; a Primary is never a sync target once
    /// the plan is carried out.
    #[test]
    fn both_nodes_reach_mirrored_plans(alpha in arb_side(0), beta in arb_side(1), (p, rr) in arb_policies()) {
        let (pa, pb) = both(&alpha, &beta, &p, rr);
        match (pa, pb) {
            (Plan::NoDisk, Plan::NoDisk) => {}
            (Plan::Refuse(ra), Plan::Refuse(rb)) => {
                prop_assert_eq!(ra.code, rb.code);
                prop_assert_eq!(ra.retry, rb.retry);
            }
            (Plan::Proceed(ga), Plan::Proceed(gb)) => {
                let (oa, ob) = (ga.decision.outcome, gb.decision.outcome);
                prop_assert_eq!(oa.is_source(), ob.is_target(), "{:?} / {:?}", oa, ob);
                prop_assert_eq!(oa.is_target(), ob.is_source(), "{:?} / {:?}", oa, ob);
                prop_assert_eq!(oa.is_full(), ob.is_full());
                prop_assert_eq!((ga.disks.local, ga.disks.peer), (gb.disks.peer, gb.disks.local));
                prop_assert_eq!((ga.local_role, ga.peer_role), (gb.peer_role, gb.local_role));
                prop_assert!(ga.sender != gb.sender, "exactly one side sends");
                prop_assert!(!(oa.is_target() && ga.local_role == Primary), "a Primary target");
                prop_assert!(!(ob.is_target() && gb.local_role == Primary), "a Primary target");
            }
            (a, b) => prop_assert!(false, "alpha {:?}, beta {:?}", a, b),
        }
    }
}

#[test]
fn a_link_loss_starts_a_generation_for_a_primary_and_for_writes_the_peer_lacks() {
    assert_eq!(generation_on_link_loss(Primary, false, false), Some(true));
    assert_eq!(generation_on_link_loss(Primary, true, false), Some(true));
    assert_eq!(
        generation_on_link_loss(Secondary, true, false),
        Some(false),
        "demoted, writes unstable there"
    );
    assert_eq!(generation_on_link_loss(Secondary, false, false), None);
    assert_eq!(generation_on_link_loss(Secondary, true, true), None, "the peer took over: its data is newer");
}
