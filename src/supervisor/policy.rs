//! Who should be Primary, pure: from what this node knows (roles, disks, the connection,
//! whether it may write without its peer) to one action. The supervisor loop feeds it and
//! carries the action out; everything here is decided without I/O.
//!
//! Rules:
//! - Promotion waits longer the worse this node's data may be ([`promotion_delay`]): an UpToDate
//!   node that was connected to its peer in this run promotes at once; one that started alone
//!   (its peer may be rebooting too, with newer data) waits a while for it first; a Consistent
//!   one (in sync once, not known to be the newest) waits longer; Outdated and Inconsistent
//!   data is never promoted automatically. Of a connected pair only an UpToDate node promotes.
//! - Connected to an UpToDate Secondary peer, the first choice (by `preferred-nodes`, then by
//!   name) promotes; the other only after the first choice left the resource unserved for a
//!   grace period (it may have failed to start its services there).
//! - Without the peer, a node promotes only with a permit: the witness's lease, a successful
//!   fence of the peer, or `no-quorum-policy = ignore`. With a witness, every promotion needs
//!   the lease, so that the witness arbitrates even between connected nodes.
//! - A Primary without its peer and without a permit follows `on-quorum-loss` (freeze and
//!   fail-io act on writes, not on the role); one whose peer wrote without it (the witness says
//!   it is outdated) steps down. One whose peer is still heard on the heartbeat path keeps its
//!   role: nobody takes it over.
//! - A Primary whose services failed `migration-threshold` times, or that is not the first
//!   choice under `failback = always` and took over in an outage of its peer, hands over to a
//!   connected UpToDate Secondary. (A switchover is not undone by failback: it is the
//!   operator's choice, not an outage.)

use std::time::Duration;

use crate::config::{Failback, OnQuorumLoss};
use crate::replication::states::{DiskState, Role};

/// Whether this node may act without its peer's consent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    Granted,
    Denied,
    /// The peer is not connected but still heard on the heartbeat path: alive, so neither taken
    /// over nor fenced. A Primary holds its lonely writes until the peer confirms it outdated
    /// itself (then [`Permit::Granted`]).
    PeerAlive,
    /// The peer wrote without this node: its data is stale.
    Outdated,
}

/// How long a node without its peer waits before it promotes, by what it knows of its data;
/// `None`: never on its own (`primary --force` is the operator's call).
pub fn promotion_delay(disk: DiskState, peer_seen: bool) -> Option<Duration> {
    match disk {
        DiskState::UpToDate if peer_seen => Some(Duration::ZERO),
        DiskState::UpToDate => Some(STARTED_ALONE_DELAY),
        DiskState::Consistent => Some(CONSISTENT_DELAY),
        _ => None,
    }
}

/// An UpToDate node that started without its peer waits this long for it (DRBD waits at boot
/// for the peer for the same reason, `degr-wfc-timeout`).
pub const STARTED_ALONE_DELAY: Duration = Duration::from_secs(10);
/// A Consistent node waits this long.
pub const CONSISTENT_DELAY: Duration = Duration::from_secs(20);
/// A node that is handing its role over (switchover) and loses its peer waits this long before
/// it takes the role back: the renegotiation after its demotion drops the link for a moment,
/// and taking the role back then (it still holds the witness's lease) would undo the
/// switchover.
pub const YIELDING_ALONE_DELAY: Duration = Duration::from_secs(3);

#[derive(Debug, Clone)]
pub struct Situation<'a> {
    pub me: &'a str,
    pub peer: &'a str,
    pub role: Role,
    pub disk: DiskState,
    pub connected: bool,
    pub peer_role: Role,
    pub peer_disk: DiskState,
    pub resyncing: bool,
    pub preferred: &'a [String],
    pub failback: Failback,
    pub on_quorum_loss: OnQuorumLoss,
    pub permit: Permit,
    /// A witness arbitrates: promotion needs its lease even when connected.
    pub witness: bool,
    /// This node's services failed `migration-threshold` times.
    pub services_failed: bool,
    /// Connected, both Secondary and UpToDate, for longer than the grace period.
    pub unserved_too_long: bool,
    /// `switchover`: this node hands its role to the ready peer.
    pub yielding: bool,
    /// The peer was connected at some time since this daemon started.
    pub peer_seen: bool,
    /// How long the peer has been gone (since start if it never came).
    pub alone_for: Duration,
    /// This Primary was without its peer at some time since it became Primary.
    pub peer_was_lost: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Stay,
    Promote,
    /// Stop the services, then become Secondary.
    Demote(&'static str),
    /// Become Secondary at once: held writes fail, clients are cut off.
    DemoteForced(&'static str),
}

/// Whether `me` comes before `peer` for the Primary role.
pub fn first_choice(me: &str, peer: &str, preferred: &[String]) -> bool {
    let rank = |n: &str| preferred.iter().position(|p| p == n).unwrap_or(usize::MAX);
    (rank(me), me) < (rank(peer), peer)
}

fn pair_ready(s: &Situation) -> bool {
    s.connected && s.peer_role == Role::Secondary && s.peer_disk == DiskState::UpToDate && !s.resyncing
}

/// Whether this Secondary would promote if it had the permit.
fn would_promote(s: &Situation) -> bool {
    if s.role != Role::Secondary || s.resyncing || s.peer_role == Role::Primary {
        return false;
    }
    if !s.connected {
        // A node handing its role over sees the link drop while the pair renegotiates the
        // role change: only a peer gone for longer is a peer lost mid-switchover.
        let floor = if s.yielding { YIELDING_ALONE_DELAY } else { Duration::ZERO };
        return promotion_delay(s.disk, s.peer_seen).is_some_and(|wait| s.alone_for >= wait.max(floor));
    }
    s.disk == DiskState::UpToDate
        && pair_ready(s)
        && !s.services_failed
        && !s.yielding
        && (first_choice(s.me, s.peer, s.preferred) || s.unserved_too_long)
}

/// Whether to ask the witness for the lease: a Primary keeps it, a Secondary asks when it would
/// promote.
pub fn wants_lease(s: &Situation) -> bool {
    s.role == Role::Primary || would_promote(s)
}

pub fn decide(s: &Situation) -> Action {
    match s.role {
        Role::Primary => {
            if !s.connected {
                return match (s.permit, s.on_quorum_loss) {
                    (Permit::Outdated, _) => Action::DemoteForced("the peer wrote without this node"),
                    (Permit::Denied, OnQuorumLoss::Demote) => {
                        Action::DemoteForced("no quorum without the peer")
                    }
                    _ => Action::Stay,
                };
            }
            if pair_ready(s) {
                if s.yielding {
                    return Action::Demote("switchover to the peer");
                }
                if !s.disk.has_disk() {
                    // Serving through the peer works, but the peer's own disk is one hop closer.
                    return Action::Demote("this node's disk failed: moving to the peer");
                }
                if s.services_failed {
                    return Action::Demote("services failed here: moving to the peer");
                }
                if s.failback == Failback::Always
                    && s.peer_was_lost
                    && !first_choice(s.me, s.peer, s.preferred)
                {
                    return Action::Demote("failing back to the preferred node");
                }
            }
            Action::Stay
        }
        _ => {
            if !would_promote(s) {
                return Action::Stay;
            }
            let needs_permit = s.witness || !s.connected;
            if needs_permit && s.permit != Permit::Granted {
                return Action::Stay;
            }
            Action::Promote
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn base<'a>(preferred: &'a [String]) -> Situation<'a> {
        Situation {
            me: "alpha",
            peer: "beta",
            role: Role::Secondary,
            disk: DiskState::UpToDate,
            connected: true,
            peer_role: Role::Secondary,
            peer_disk: DiskState::UpToDate,
            resyncing: false,
            preferred,
            failback: Failback::Never,
            on_quorum_loss: OnQuorumLoss::Freeze,
            permit: Permit::Granted,
            witness: true,
            services_failed: false,
            unserved_too_long: false,
            yielding: false,
            peer_seen: true,
            alone_for: Duration::ZERO,
            peer_was_lost: false,
        }
    }

    /// [`base`] without the peer.
    fn alone<'a>(preferred: &'a [String]) -> Situation<'a> {
        Situation {
            connected: false,
            peer_role: Role::Unknown,
            peer_disk: DiskState::DUnknown,
            ..base(preferred)
        }
    }

    #[test]
    fn a_switchover_hands_the_role_over_and_the_yielding_node_waits() {
        let none: Vec<String> = vec![];
        let p = Situation { role: Role::Primary, yielding: true, ..base(&none) };
        assert_eq!(decide(&p), Action::Demote("switchover to the peer"));
        // Demoted, the first choice does not take it back while it yields...
        let s = Situation { yielding: true, unserved_too_long: true, ..base(&none) };
        assert_eq!(decide(&s), Action::Stay);
        // ...and the peer, second choice, promotes after the grace period.
        let peer = Situation { me: "beta", peer: "alpha", unserved_too_long: true, ..base(&none) };
        assert_eq!(decide(&peer), Action::Promote);
        // Without its peer a yielding node still takes over, but not during the moment the
        // link drops to renegotiate the role change (the switchover bounced back so, when the
        // supervisor looked at the node at every event).
        let alone =
            Situation { connected: false, peer_role: Role::Unknown, peer_disk: DiskState::DUnknown, ..s };
        assert_eq!(decide(&alone), Action::Stay);
        let gone = Situation { alone_for: YIELDING_ALONE_DELAY, ..alone };
        assert_eq!(decide(&gone), Action::Promote);
    }

    #[test]
    fn the_first_choice_of_a_ready_pair_promotes_the_other_waits() {
        let none: Vec<String> = vec![];
        assert_eq!(decide(&base(&none)), Action::Promote, "alpha < beta by name");
        let beta_first = vec!["beta".to_string()];
        assert_eq!(decide(&base(&beta_first)), Action::Stay);
        assert!(!wants_lease(&base(&beta_first)));
        let waited = Situation { unserved_too_long: true, ..base(&beta_first) };
        assert_eq!(decide(&waited), Action::Promote);
        // With a witness even the first choice needs the lease.
        assert_eq!(decide(&Situation { permit: Permit::Denied, ..base(&none) }), Action::Stay);
        assert_eq!(
            decide(&Situation { permit: Permit::Denied, witness: false, ..base(&none) }),
            Action::Promote
        );
    }

    #[test]
    fn without_the_peer_only_a_permit_promotes() {
        let none: Vec<String> = vec![];
        let alone = alone(&none);
        assert_eq!(decide(&alone), Action::Promote);
        assert_eq!(decide(&Situation { permit: Permit::Denied, ..alone.clone() }), Action::Stay);
        assert_eq!(decide(&Situation { permit: Permit::Outdated, ..alone.clone() }), Action::Stay);
        assert_eq!(
            decide(&Situation { permit: Permit::Denied, witness: false, ..alone.clone() }),
            Action::Stay
        );
        for disk in [DiskState::Outdated, DiskState::Inconsistent, DiskState::Consistent] {
            assert_eq!(decide(&Situation { disk, ..alone.clone() }), Action::Stay, "{disk}");
        }
    }

    #[test]
    fn a_primary_whose_disk_failed_hands_over_to_its_ready_peer() {
        let none: Vec<String> = vec![];
        let p = Situation { role: Role::Primary, disk: DiskState::Diskless, ..base(&none) };
        assert_eq!(decide(&p), Action::Demote("this node's disk failed: moving to the peer"));
        let alone = Situation { connected: false, peer_disk: DiskState::DUnknown, ..p.clone() };
        assert_eq!(decide(&alone), Action::Stay, "no peer to hand over to: it serves nothing, but stays");
    }

    #[test]
    fn a_node_without_a_disk_is_never_promoted() {
        let none: Vec<String> = vec![];
        for disk in [DiskState::Diskless, DiskState::Failed] {
            let lonely = Situation { disk, alone_for: Duration::from_secs(3600), ..alone(&none) };
            assert_eq!(decide(&lonely), Action::Stay, "{disk}, alone");
            assert_eq!(decide(&Situation { disk, ..base(&none) }), Action::Stay, "{disk}, connected");
            assert_eq!(promotion_delay(disk, true), None);
        }
    }

    #[test]
    fn the_worse_the_data_the_longer_a_lonely_node_waits() {
        let none: Vec<String> = vec![];
        let alone = alone(&none);
        let at = |disk, peer_seen, secs| {
            decide(&Situation { disk, peer_seen, alone_for: Duration::from_secs(secs), ..alone.clone() })
        };
        assert_eq!(at(DiskState::UpToDate, true, 0), Action::Promote);
        assert_eq!(at(DiskState::UpToDate, false, 9), Action::Stay, "started alone: wait for the peer");
        assert_eq!(at(DiskState::UpToDate, false, 10), Action::Promote);
        assert_eq!(at(DiskState::Consistent, true, 19), Action::Stay);
        assert_eq!(at(DiskState::Consistent, true, 20), Action::Promote);
        for disk in [DiskState::Outdated, DiskState::Inconsistent, DiskState::DUnknown] {
            assert_eq!(at(disk, true, 3600), Action::Stay, "{disk}");
        }
        // Connected, only an UpToDate node promotes, however long it waited.
        let pair =
            Situation { disk: DiskState::Consistent, alone_for: Duration::from_secs(60), ..base(&none) };
        assert_eq!(decide(&pair), Action::Stay);
    }

    #[test]
    fn a_primary_without_quorum_follows_on_quorum_loss() {
        let none: Vec<String> = vec![];
        let p = Situation { role: Role::Primary, connected: false, permit: Permit::Denied, ..base(&none) };
        assert_eq!(decide(&p), Action::Stay, "freeze acts on writes");
        assert_eq!(
            decide(&Situation { on_quorum_loss: OnQuorumLoss::Demote, ..p.clone() }),
            Action::DemoteForced("no quorum without the peer")
        );
        assert!(matches!(
            decide(&Situation { permit: Permit::Outdated, ..p.clone() }),
            Action::DemoteForced(_)
        ));
        assert_eq!(decide(&Situation { permit: Permit::Granted, ..p.clone() }), Action::Stay);
        let alive = Situation { permit: Permit::PeerAlive, on_quorum_loss: OnQuorumLoss::Demote, ..p };
        assert_eq!(decide(&alive), Action::Stay, "a live peer does not take over");
    }

    #[test]
    fn a_secondary_does_not_take_over_from_a_peer_still_heard() {
        let none: Vec<String> = vec![];
        for witness in [false, true] {
            let s = Situation { permit: Permit::PeerAlive, witness, ..alone(&none) };
            assert_eq!(decide(&s), Action::Stay);
        }
    }

    #[test]
    fn a_primary_hands_over_after_failed_services_or_for_failback() {
        let beta_first = vec!["beta".to_string()];
        let p = Situation { role: Role::Primary, peer_was_lost: true, ..base(&beta_first) };
        assert_eq!(decide(&p), Action::Stay, "failback never");
        assert!(matches!(decide(&Situation { failback: Failback::Always, ..p.clone() }), Action::Demote(_)));
        let switched = Situation { failback: Failback::Always, peer_was_lost: false, ..p.clone() };
        assert_eq!(decide(&switched), Action::Stay, "a switchover is not undone by failback");
        assert!(matches!(decide(&Situation { services_failed: true, ..p.clone() }), Action::Demote(_)));
        // Not while the peer is not ready to take over.
        let syncing = Situation { services_failed: true, peer_disk: DiskState::Inconsistent, ..p };
        assert_eq!(decide(&syncing), Action::Stay);
    }

    fn role() -> impl Strategy<Value = Role> {
        prop_oneof![Just(Role::Primary), Just(Role::Secondary), Just(Role::Unknown)]
    }
    fn disk() -> impl Strategy<Value = DiskState> {
        prop_oneof![
            Just(DiskState::UpToDate),
            Just(DiskState::Outdated),
            Just(DiskState::Inconsistent),
            Just(DiskState::Consistent),
            Just(DiskState::DUnknown),
            Just(DiskState::Diskless)
        ]
    }

    /// The ladder's order: UpToDate with the peer seen, UpToDate, Consistent, the rest.
    fn rank(d: DiskState, seen: bool) -> u8 {
        match d {
            DiskState::UpToDate if seen => 3,
            DiskState::UpToDate => 2,
            DiskState::Consistent => 1,
            _ => 0,
        }
    }

    proptest! {
        #[test]
        fn worse_data_never_waits_less(a in disk(), b in disk(), seen_a: bool, seen_b: bool) {
            if rank(a, seen_a) < rank(b, seen_b) {
                let (da, db) = (promotion_delay(a, seen_a), promotion_delay(b, seen_b));
                prop_assert!(db.is_some());
                prop_assert!(da.is_none_or(|x| x > db.unwrap()));
            }
        }

        /// Two connected nodes looking at the same pair never both decide to promote on their
        /// first look (before any grace period ran out), and a node never promotes from a disk
        /// that is not UpToDate, nor past a Primary peer.
        #[test]
        fn connected_nodes_never_both_promote(pref in proptest::collection::vec(prop_oneof![Just("alpha".to_string()), Just("beta".to_string())], 0..3), da in disk(), db in disk(), witness: bool) {
            let a = Situation { disk: da, peer_disk: db, witness, ..base(&pref) };
            let b = Situation { me: "beta", peer: "alpha", disk: db, peer_disk: da, witness, ..base(&pref) };
            prop_assert!(!(decide(&a) == Action::Promote && decide(&b) == Action::Promote));
        }

        #[test]
        fn promotion_needs_good_data_no_primary_peer_and_a_permit(r in role(), d in disk(), pr in role(), pd in disk(), connected: bool, permit in prop_oneof![Just(Permit::Granted), Just(Permit::Denied), Just(Permit::PeerAlive), Just(Permit::Outdated)], witness: bool, grace: bool, peer_seen: bool, alone_secs in 0u64..100) {
            let none: Vec<String> = vec![];
            let alone_for = Duration::from_secs(alone_secs);
            let s = Situation { role: r, disk: d, peer_role: pr, peer_disk: pd, connected, permit, witness, unserved_too_long: grace, peer_seen, alone_for, ..base(&none) };
            if decide(&s) == Action::Promote {
                prop_assert!(d == DiskState::UpToDate || (d == DiskState::Consistent && !connected));
                prop_assert!(connected || alone_for >= promotion_delay(d, peer_seen).unwrap());
                prop_assert!(pr != Role::Primary);
                prop_assert!(r == Role::Secondary);
                prop_assert!(connected || permit == Permit::Granted);
                prop_assert!(!witness || permit == Permit::Granted);
            }
        }
    }
}
