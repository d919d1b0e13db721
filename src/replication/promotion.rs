//! Who may become Primary while the two nodes are in touch: a promotion is a state change of the
//! pair, which the peer may refuse (DRBD's cluster-wide state change), so two Primaries never
//! exist. Pure; one rule for both ways of asking:
//!
//! - the core asks over the established link (PromoteRequest) and the peer answers with
//!   [`answer`];
//! - the daemon asks in the handshake (a flag in its State; a role change reconnects anyway),
//!   where both sides see both wishes and the sync decision at once and reach the same
//!   [`at_handshake`] verdicts without another round trip.
//!
//! When both ask at the same moment, the side that resolves conflicts (the dialer, DRBD's
//! RESOLVE_CONFLICTS) wins and the other is refused: one of them is promoted, never both.

use super::connection_plan::{plan, Plan, Planned, Settings};
use super::states::Role;
use super::sync_decision::SideView;

/// Why a promotion asked of the peer was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The peer is Primary.
    PeerPrimary,
    /// The peer is being promoted itself, and wins the tie.
    PeerPromoting,
    /// This node's data is older: the handshake makes it the sync target.
    SyncTarget,
    /// The handshake found a split brain: it is resolved before anyone is promoted.
    SplitBrain,
    /// The connection does not go on (the plan's refusal).
    NotConnected(String),
}

impl Refusal {
    /// The refusal as the operator reads it, naming the peer ("cannot promote: " comes first).
    pub fn describe(&self, peer: &str) -> String {
        match self {
            Refusal::PeerPrimary => format!("{peer} is Primary"),
            Refusal::PeerPromoting => format!("{peer} is being promoted"),
            Refusal::SyncTarget => {
                format!("{peer} has newer data: this node is its sync target until the resync ends")
            }
            Refusal::SplitBrain => format!("split brain with {peer}: resolve it first"),
            Refusal::NotConnected(why) => format!("the connection to {peer} was refused: {why}"),
        }
    }
}

/// The node asked to agree to its peer's promotion, as its answer depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asked {
    pub role: Role,
    /// It is being promoted itself (asked its own peer, or asks in this handshake).
    pub promoting: bool,
    /// It wins ties (the dialer).
    pub resolves_conflicts: bool,
}

/// The asked node's answer. A node that agrees while being promoted itself lost the tie and gives
/// its own promotion up (its peer, which won, refuses it in turn).
pub fn answer(asked: Asked) -> Result<(), Refusal> {
    if asked.role == Role::Primary {
        return Err(Refusal::PeerPrimary);
    }
    if asked.promoting && asked.resolves_conflicts {
        return Err(Refusal::PeerPromoting);
    }
    Ok(())
}

/// Whether each side asked to be promoted in this handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Wishes {
    pub local: bool,
    pub peer: bool,
}

/// The answers to the promotions asked in one handshake (`None`: not asked).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Verdicts {
    pub local: Option<Result<(), Refusal>>,
    pub peer: Option<Result<(), Refusal>>,
}

impl Verdicts {
    pub fn local_granted(&self) -> bool {
        matches!(self.local, Some(Ok(())))
    }

    pub fn peer_granted(&self) -> bool {
        matches!(self.peer, Some(Ok(())))
    }
}

/// The connection's plan with the promotions asked in its handshake decided: the plan as the
/// roles are once a granted side is Primary, and the verdicts. Both nodes compute it from the
/// same two views and wishes, each as `local`, and reach mirrored verdicts, so a side granted
/// here is Primary for both.
///
/// A wish is granted when the plan goes on (or a side has no disk, where there is no sync
/// decision) without a split brain, the asking side is not the sync target, and the other side
/// agrees by [`answer`].
pub fn at_handshake(
    local: &SideView,
    peer: &SideView,
    settings: &Settings<'_>,
    wishes: Wishes,
) -> (Planned, Verdicts) {
    let planned = plan(local, peer, settings);
    if !wishes.local && !wishes.peer {
        return (planned, Verdicts::default());
    }
    let verdict = |asking_is_local: bool| -> Result<(), Refusal> {
        let (other, other_wishes, other_dials) = if asking_is_local {
            (peer, wishes.peer, !settings.dialer)
        } else {
            (local, wishes.local, settings.dialer)
        };
        if planned.split_brain.is_some() {
            return Err(Refusal::SplitBrain);
        }
        let becomes_target = match &planned.plan {
            Plan::NoDisk => false,
            Plan::Refuse(refusal) => return Err(Refusal::NotConnected(refusal.message.clone())),
            Plan::Proceed(go) => {
                let outcome = go.decision.outcome;
                if asking_is_local {
                    outcome.is_target()
                } else {
                    outcome.is_source()
                }
            }
        };
        answer(Asked { role: other.role, promoting: other_wishes, resolves_conflicts: other_dials })?;
        if becomes_target {
            return Err(Refusal::SyncTarget);
        }
        Ok(())
    };
    let verdicts =
        Verdicts { local: wishes.local.then(|| verdict(true)), peer: wishes.peer.then(|| verdict(false)) };
    if !verdicts.local_granted() && !verdicts.peer_granted() {
        return (planned, verdicts);
    }
    let promoted = |side: &SideView, granted: bool| SideView {
        role: if granted { Role::Primary } else { side.role },
        ..*side
    };
    let local = promoted(local, verdicts.local_granted());
    let peer = promoted(peer, verdicts.peer_granted());
    (plan(&local, &peer, settings), verdicts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::generations::Generations;
    use crate::replication::split_brain::{Policies, RrConflict};
    use crate::replication::states::DiskState;

    fn side(role: Role, current: u64, dialer: bool) -> SideView {
        SideView {
            gens: Generations { current, bitmap: 0, history: [0; 2] },
            role,
            disk: DiskState::UpToDate,
            crashed_primary: false,
            dirty_blocks: 0,
            discard_my_data: false,
            node_id: if dialer { 0 } else { 1 },
        }
    }

    fn settings(policies: &Policies, dialer: bool) -> Settings<'_> {
        let (me, peer) = if dialer { ("alpha", "beta") } else { ("beta", "alpha") };
        Settings { policies, rr_conflict: RrConflict::Disconnect, me, peer, dialer, outdated_loses: false }
    }

    /// Both nodes' verdicts for one handshake: alpha dials. (alpha's, beta's), each as local.
    fn both(alpha: SideView, beta: SideView, wishes: Wishes) -> (Verdicts, Verdicts) {
        let policies = Policies::default();
        let (_, at_alpha) = at_handshake(&alpha, &beta, &settings(&policies, true), wishes);
        let mirrored = Wishes { local: wishes.peer, peer: wishes.local };
        let (_, at_beta) = at_handshake(&beta, &alpha, &settings(&policies, false), mirrored);
        (at_alpha, at_beta)
    }

    #[test]
    fn the_asked_node_refuses_as_primary_and_wins_a_tie_only_if_it_resolves_conflicts() {
        let asked =
            |role, promoting, resolves_conflicts| answer(Asked { role, promoting, resolves_conflicts });
        assert_eq!(asked(Role::Secondary, false, false), Ok(()));
        assert_eq!(asked(Role::Secondary, false, true), Ok(()));
        assert_eq!(asked(Role::Primary, false, false), Err(Refusal::PeerPrimary));
        assert_eq!(asked(Role::Secondary, true, true), Err(Refusal::PeerPromoting));
        assert_eq!(asked(Role::Secondary, true, false), Ok(()));
    }

    #[test]
    fn both_asking_at_once_promotes_the_dialer_only_and_both_nodes_agree() {
        let (alpha, beta) = (side(Role::Secondary, 0x100, true), side(Role::Secondary, 0x100, false));
        let (at_alpha, at_beta) = both(alpha, beta, Wishes { local: true, peer: true });
        assert_eq!(at_alpha.local, Some(Ok(())));
        assert_eq!(at_alpha.peer, Some(Err(Refusal::PeerPromoting)));
        assert_eq!(at_beta.local, at_alpha.peer);
        assert_eq!(at_beta.peer, at_alpha.local);
    }

    #[test]
    fn a_granted_side_sends_and_the_other_sees_it_primary() {
        let policies = Policies::default();
        let (alpha, beta) = (side(Role::Secondary, 0x100, true), side(Role::Secondary, 0x100, false));
        // beta, the listener, asks alone: granted, and beta becomes the sender.
        let (planned, verdicts) =
            at_handshake(&beta, &alpha, &settings(&policies, false), Wishes { local: true, peer: false });
        assert!(verdicts.local_granted());
        let Plan::Proceed(go) = planned.plan else { panic!("{planned:?}") };
        assert_eq!((go.local_role, go.peer_role, go.sender), (Role::Primary, Role::Secondary, true));
        let (planned, verdicts) =
            at_handshake(&alpha, &beta, &settings(&policies, true), Wishes { local: false, peer: true });
        assert!(verdicts.peer_granted());
        let Plan::Proceed(go) = planned.plan else { panic!("{planned:?}") };
        assert_eq!((go.local_role, go.peer_role, go.sender), (Role::Secondary, Role::Primary, false));
    }

    #[test]
    fn a_primary_peer_an_older_disk_or_a_split_brain_refuse_the_promotion() {
        let ask = Wishes { local: false, peer: true };
        // alpha Primary: beta's wish refused on both nodes.
        let (at_alpha, at_beta) =
            both(side(Role::Primary, 0x100, true), side(Role::Secondary, 0x100, false), ask);
        assert_eq!(at_alpha.peer, Some(Err(Refusal::PeerPrimary)));
        assert_eq!(at_beta.local, Some(Err(Refusal::PeerPrimary)));
        // beta is behind alpha (alpha's history holds beta's current): beta becomes target.
        let mut ahead = side(Role::Secondary, 0x200, true);
        ahead.gens.bitmap = 0x100;
        let (at_alpha, at_beta) = both(ahead, side(Role::Secondary, 0x100, false), ask);
        assert_eq!(at_alpha.peer, Some(Err(Refusal::SyncTarget)));
        assert_eq!(at_beta.local, Some(Err(Refusal::SyncTarget)));
        // beta ahead: it is the sync source, and may be promoted.
        let mut ahead = side(Role::Secondary, 0x200, false);
        ahead.gens.bitmap = 0x100;
        let (at_alpha, at_beta) = both(side(Role::Secondary, 0x100, true), ahead, ask);
        assert_eq!((at_alpha.peer, at_beta.local), (Some(Ok(())), Some(Ok(()))));
        // Diverged: a split brain, nobody promoted through it.
        let (mut a, mut b) = (side(Role::Secondary, 0x200, true), side(Role::Secondary, 0x300, false));
        (a.gens.bitmap, b.gens.bitmap) = (0x100, 0x100);
        let (at_alpha, at_beta) = both(a, b, ask);
        assert_eq!(at_alpha.peer, Some(Err(Refusal::SplitBrain)));
        assert_eq!(at_beta.local, Some(Err(Refusal::SplitBrain)));
    }

    #[test]
    fn refusals_name_the_peer() {
        assert_eq!(Refusal::PeerPrimary.describe("beta"), "beta is Primary");
        assert_eq!(Refusal::PeerPromoting.describe("beta"), "beta is being promoted");
    }
}
