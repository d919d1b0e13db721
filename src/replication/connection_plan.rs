//! What an established connection does once both sides' views are known: the sync decision,
//! a split brain resolved by policy or left to the operator, the refusals (two Primaries,
//! unrelated data, no usable source, rr-conflict), each side's disk state afterwards, and
//! which side sends. Pure: the session carries the plan out (metadata, events, handlers, the
//! wire), so every path here is tested without a connection.
//!
//! Both nodes compute the plan from the same two views, each as `local`, and reach mirrored
//! plans (the split-brain rules guarantee it, see [`split_brain`]).

use rdbd_protocol::repl::RefuseCode;

use super::split_brain::{self, Policies, Recovery, RrConflict, RrConflictAction};
use super::states::{disk_after_decision, DiskPair, Role};
use super::sync_decision::{
    decide, require_usable_source, resolve_by_outdated, Decision, SideView, SyncDecision,
};

/// The resource's settings the plan reads.
#[derive(Debug, Clone, Copy)]
pub struct Settings<'a> {
    pub policies: &'a Policies,
    pub rr_conflict: RrConflict,
    /// This node's and the peer's names, for messages that read the same on both nodes.
    pub me: &'a str,
    pub peer: &'a str,
    /// This node dialed the connection (it sends when neither side has to).
    pub dialer: bool,
    /// A split brain where exactly one side is Outdated is resolved against that side (see
    /// [`resolve_by_outdated`]). The core takes this rule, modelling a node with its HA
    /// supervisor; the daemon leaves it to its supervisor, which asks for discard-my-data
    /// instead, so that a node without `[ha]` reports the split brain as DRBD 8.4 does.
    pub outdated_loses: bool,
}

/// What [`plan`] decided: the rule table's decision, the plan, and the split brain found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// The rule table's decision (with the Outdated rule when it applies), before any policy.
    pub decision: Decision,
    pub plan: Plan,
    pub split_brain: Option<SplitBrainFound>,
}

/// A split brain the rule table found: reported (event, handler) whether a policy resolved it
/// or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitBrainFound {
    /// What happened, naming nodes: the same text on both nodes.
    pub detail: String,
    /// The policy that resolved it and why this side or the other lost.
    pub resolution: Option<split_brain::Resolution>,
}

/// Why the connection does not go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: RefuseCode,
    pub message: String,
    /// rr-conflict retry-connect: try again later instead of standing alone.
    pub retry: bool,
    /// rr-conflict call-pri-lost, and this node is the Primary that would become target.
    pub call_pri_lost: bool,
}

/// The connection goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proceed {
    pub decision: Decision,
    /// Each side's disk state once the decision is acted on.
    pub disks: DiskPair,
    /// The roles to go on with: a Primary a policy made lose gives its role up first.
    pub local_role: Role,
    pub peer_role: Role,
    /// This node is that Primary: it must become Secondary before the resync, or refuse.
    pub give_up_primary: bool,
    /// This node sends (replication writes, and resync data as source).
    pub sender: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// A side has no disk: there is no sync decision to make (the diskless rules apply).
    NoDisk,
    Refuse(Refusal),
    Proceed(Proceed),
}

/// The whole plan, the decision it started from, and the split brain found on the way.
pub fn plan(local: &SideView, peer: &SideView, settings: &Settings<'_>) -> Planned {
    let mut decision = decide(local, peer);
    if settings.outdated_loses {
        decision = resolve_by_outdated(decision, local.disk, peer.disk);
    }
    let (plan, split_brain) = carry_out(decision, local, peer, settings);
    Planned { decision, plan, split_brain }
}

fn carry_out(
    decision: Decision,
    local: &SideView,
    peer: &SideView,
    settings: &Settings<'_>,
) -> (Plan, Option<SplitBrainFound>) {
    if decision.outcome == SyncDecision::NoDisk {
        return (Plan::NoDisk, None);
    }
    // Two Primaries whose data diverged are reported as the split brain they are.
    let diverged = matches!(decision.outcome, SyncDecision::SplitBrain { .. } | SyncDecision::Unrelated);
    if local.role == Role::Primary && peer.role == Role::Primary && !diverged {
        return (refuse(RefuseCode::Other, "both nodes are Primary: refusing to connect".to_string()), None);
    }
    let (mut local_role, mut peer_role) = (local.role, peer.role);
    let mut give_up_primary = false;
    let mut found = None;
    let decision = if matches!(decision.outcome, SyncDecision::SplitBrain { .. }) {
        let (report, resolved) = resolve_split_brain(decision, local, peer, settings);
        found = Some(report);
        match resolved {
            Ok((resolution, resolved)) => {
                if resolution.local_must_give_up_primary() {
                    give_up_primary = true;
                    local_role = Role::Secondary;
                } else if resolution.loser_is_primary {
                    // The peer gives up its role, or, if it cannot, refuses in place of its
                    // bitmap and this node goes StandAlone too.
                    peer_role = Role::Secondary;
                }
                resolved
            }
            Err(refusal) => return (Plan::Refuse(refusal), found),
        }
    } else {
        decision
    };
    let outcome = decision.outcome;
    match outcome {
        SyncDecision::Unrelated => {
            let message = format!("unrelated data: the nodes share no data generation ({})", decision.reason);
            return (refuse(RefuseCode::UnrelatedData, message), found);
        }
        SyncDecision::NoUsableSource | SyncDecision::NoDisk | SyncDecision::SplitBrain { .. } => {
            let message = format!("no resync possible: {}", decision.reason);
            return (refuse(RefuseCode::Other, message), found);
        }
        _ => {}
    }
    let action = split_brain::rr_conflict(outcome, local_role, peer_role, settings.rr_conflict);
    if action.refuses() {
        let (me, them) = (settings.me, settings.peer);
        let (primary, other) = if outcome.is_target() { (me, them) } else { (them, me) };
        let conflict =
            format!("{primary} is Primary with older data than {other} and would become sync target");
        let refusal = match action {
            // Both nodes keep connecting (if both are set so: rr-conflict is not in Params, as
            // in DRBD).
            RrConflictAction::RetryConnect => Refusal {
                code: RefuseCode::Other,
                message: format!("{conflict}; rr-conflict retry-connect: retrying"),
                retry: true,
                call_pri_lost: false,
            },
            _ => Refusal {
                code: RefuseCode::Other,
                message: format!("{conflict} (rr-conflict {})", settings.rr_conflict),
                retry: false,
                call_pri_lost: action == RrConflictAction::CallPriLost { here: true },
            },
        };
        return (Plan::Refuse(refusal), found);
    }
    let disks = disk_after_decision(outcome, local.disk, peer.disk);
    let sender = local_role == Role::Primary
        || (peer_role != Role::Primary && (outcome.is_source() || (!outcome.is_target() && settings.dialer)));
    let proceed = Proceed { decision, disks, local_role, peer_role, give_up_primary, sender };
    (Plan::Proceed(proceed), found)
}

fn refuse(code: RefuseCode, message: String) -> Plan {
    Plan::Refuse(Refusal { code, message, retry: false, call_pri_lost: false })
}

/// The after-sb policy for the number of Primaries picks the side whose changes are discarded,
/// or the split brain is left to the operator (refused).
fn resolve_split_brain(
    d: Decision,
    local: &SideView,
    peer: &SideView,
    settings: &Settings<'_>,
) -> (SplitBrainFound, Result<(split_brain::Resolution, Decision), Refusal>) {
    let (me, them) = (settings.me, settings.peer);
    let resolved = match split_brain::recover(d, local, peer, settings.policies, me, them) {
        Recovery::Resolved(r) => {
            let decision = require_usable_source(r.decision(&d), local.disk, peer.disk);
            if decision.outcome.is_source() || decision.outcome.is_target() {
                Ok((r, decision))
            } else {
                Err(format!("{} picked a side, but {}", r.policy, decision.reason))
            }
        }
        Recovery::Unresolved { reason } => Err(reason),
        Recovery::NotSplitBrain => Err(d.reason.to_string()),
    };
    // Every text names nodes, not "local" and "peer": both logs read the same.
    let detected = format!("split brain detected (rule {}: {})", d.rule, d.reason);
    let loser = |r: &split_brain::Resolution| if r.local_loses() { me } else { them };
    match resolved {
        Ok((r, decision)) => {
            let detail = format!(
                "{detected}; resolved by {}: {}'s changes are discarded ({})",
                r.policy,
                loser(&r),
                r.reason
            );
            (SplitBrainFound { detail, resolution: Some(r.clone()) }, Ok((r, decision)))
        }
        Err(reason) => {
            let detail = format!("{detected}; unresolved: {reason}");
            let message =
                format!("{detected}: both nodes changed the data; not resolved ({reason}); resolve manually");
            let refusal =
                Refusal { code: RefuseCode::SplitBrain, message, retry: false, call_pri_lost: false };
            (SplitBrainFound { detail, resolution: None }, Err(refusal))
        }
    }
}

/// What losing the link does to this node's generations: `Some(primary)` when it starts one of
/// its own, taken as Primary or not (`primary`: the flag DRBD keeps in the identifier's lowest
/// bit, which the after-sb policies read). A Primary does (it writes on without the peer: DRBD's
/// new current UUID on peer loss), and so does a node no longer Primary whose writes the peer may
/// lack (demoted with writes unstable there: with equal generations the two would compare as in
/// sync at reconnect and the marks would never resync) — unless the peer became Primary on that
/// connection since: its data is the newer one, and the marks resync from it (seed 192651).
pub fn generation_on_link_loss(role: Role, peer_lacks_writes: bool, peer_took_over: bool) -> Option<bool> {
    match role {
        Role::Primary => Some(true),
        _ if peer_lacks_writes && !peer_took_over => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
