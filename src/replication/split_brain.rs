//! Automatic split-brain recovery (DRBD 8.4's after-sb-0pri, -1pri, -2pri) and the rr-conflict
//! check, as pure functions.
//!
//! The session applies [`recover`] after [`sync_decision::decide`] when the outcome is a
//! recoverable split brain (rule 90: both sides branched from the same generation, so the two
//! bitmaps cover every difference). It picks the side whose changes are discarded, or leaves the
//! split brain unresolved. An unrecoverable split brain is never resolved by a policy: only
//! `connect --discard-my-data` does that, and [`sync_decision::decide`] already applied it.
//!
//! Both nodes evaluate the same pair of views, each with itself as `local`, and must reach
//! mirrored results, or one would wait for a resync the other never starts. Every rule here is
//! therefore antisymmetric, ties are broken by node id (equal ids stay unresolved), and the
//! messages name nodes rather than "local" and "peer" so both logs read the same.
//!
//! [`sync_decision::decide`]: crate::replication::sync_decision::decide

mod policies;

use crate::metadata::generations::PRIMARY_BIT;
use crate::replication::states::Role;
use crate::replication::sync_decision::{Decision, SideView, SyncDecision};
pub use policies::{AfterSb0Pri, Policies, RrConflict};
use rdbd_protocol::repl::{AfterSb1, AfterSb2};

/// What [`recover`] concluded, from the local side's point of view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// The decision is not a split brain: nothing for a policy to do.
    NotSplitBrain,
    /// A policy picked the side whose changes are discarded.
    Resolved(Resolution),
    /// The split brain stands: the connection is refused (StandAlone) and the operator decides.
    Unresolved {
        /// Why, e.g. "after-sb-1pri is disconnect"; the same text on both nodes.
        reason: String,
    },
}

/// A split brain resolved by policy: a bitmap-based resync from the winner to the loser.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolution {
    /// `SourceBitmap` (the peer loses) or `TargetBitmap` (local loses).
    pub outcome: SyncDecision,
    /// The policies that decided, as configured, e.g.
    /// "after-sb-1pri consensus, after-sb-0pri discard-least-changes".
    pub policy: String,
    /// Why that side lost, naming nodes; the same text on both nodes.
    pub reason: String,
    /// The losing side is Primary now. It must give the role up before it can become sync
    /// target: the session demotes it when no NBD client is connected, else runs the
    /// pri-lost-after-sb handler and refuses the connection.
    pub loser_is_primary: bool,
}

impl Resolution {
    /// Local's changes are discarded.
    pub fn local_loses(&self) -> bool {
        self.outcome.is_target()
    }

    /// Local is the losing Primary (see [`Resolution::loser_is_primary`]).
    pub fn local_must_give_up_primary(&self) -> bool {
        self.loser_is_primary && self.local_loses()
    }

    /// The sync decision to continue with (keeps the rule number of the split brain).
    pub fn decision(&self, split_brain: &Decision) -> Decision {
        Decision {
            outcome: self.outcome,
            rule: split_brain.rule,
            reason: if self.local_loses() {
                "split brain resolved by policy: local discards its changes"
            } else {
                "split brain resolved by policy: peer discards its changes"
            },
        }
    }

    /// The same resolution seen from the other node.
    pub fn mirror(&self) -> Self {
        Resolution { outcome: self.outcome.mirror(), ..self.clone() }
    }
}

impl Recovery {
    /// The same result seen from the other node.
    pub fn mirror(&self) -> Self {
        match self {
            Recovery::Resolved(r) => Recovery::Resolved(r.mirror()),
            other => other.clone(),
        }
    }
}

/// Applies the after-sb policy for the number of Primaries (0, 1 or 2, from the views' roles)
/// to a split brain. `local_name` and `peer_name` are the node names, for `discard-node-NAME`
/// and messages.
pub fn recover(
    d: Decision,
    local: &SideView,
    peer: &SideView,
    policies: &Policies,
    local_name: &str,
    peer_name: &str,
) -> Recovery {
    match d.outcome {
        SyncDecision::SplitBrain { auto_recoverable: true } => {}
        SyncDecision::SplitBrain { auto_recoverable: false } => {
            return Recovery::Unresolved {
                reason: format!(
                    "{} (rule {}): no policy applies, only connect --discard-my-data on one node resolves it",
                    d.reason, d.rule
                ),
            };
        }
        _ => return Recovery::NotSplitBrain,
    }
    let sides =
        Sides { local: Side { view: local, name: local_name }, peer: Side { view: peer, name: peer_name } };
    let result = match (local.role == Role::Primary, peer.role == Role::Primary) {
        (false, false) => after_sb_0pri(&policies.after_sb_0pri, &sides)
            .map(|v| (format!("after-sb-0pri {}", policies.after_sb_0pri), v)),
        (true, true) => after_sb_2pri(policies, &sides),
        _ => after_sb_1pri(policies, &sides),
    };
    match result {
        Ok((policy, verdict)) => {
            let loser = sides.get(verdict.loser);
            Recovery::Resolved(Resolution {
                outcome: match verdict.loser {
                    Loser::Local => SyncDecision::TargetBitmap,
                    Loser::Peer => SyncDecision::SourceBitmap,
                },
                policy,
                reason: verdict.reason,
                loser_is_primary: loser.view.role == Role::Primary,
            })
        }
        Err(reason) => Recovery::Unresolved { reason },
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Loser {
    Local,
    Peer,
}

/// A side that loses, and why.
struct Verdict {
    loser: Loser,
    reason: String,
}

struct Side<'a> {
    view: &'a SideView,
    name: &'a str,
}

struct Sides<'a> {
    local: Side<'a>,
    peer: Side<'a>,
}

impl Sides<'_> {
    fn get(&self, which: Loser) -> &Side<'_> {
        match which {
            Loser::Local => &self.local,
            Loser::Peer => &self.peer,
        }
    }

    /// The verdict that `which` loses.
    fn loses(&self, which: Loser, why: impl FnOnce(&str) -> String) -> Verdict {
        Verdict { loser: which, reason: why(self.get(which).name) }
    }

    /// Both sides in an order both nodes agree on (by name), for messages about both.
    fn in_name_order(&self) -> [&Side<'_>; 2] {
        if self.local.name <= self.peer.name {
            [&self.local, &self.peer]
        } else {
            [&self.peer, &self.local]
        }
    }

    /// "alpha 3, beta 5": the changed blocks of both sides.
    fn changes(&self) -> String {
        let [a, b] = self.in_name_order();
        format!("{} {}, {} {}", a.name, a.view.dirty_blocks, b.name, b.view.dirty_blocks)
    }
}

/// after-sb-0pri: the outcome the other two policies build on.
fn after_sb_0pri(policy: &AfterSb0Pri, s: &Sides) -> Result<Verdict, String> {
    match policy {
        AfterSb0Pri::Disconnect => Err("after-sb-0pri is disconnect".to_string()),
        AfterSb0Pri::DiscardYoungerPrimary | AfterSb0Pri::DiscardOlderPrimary => {
            let younger = *policy == AfterSb0Pri::DiscardYoungerPrimary;
            match by_primary_bit(s, younger) {
                Some(verdict) => Ok(verdict),
                None => {
                    const UNDECIDED: &str = "the bitmap generations do not tell which node was Primary first";
                    by_changes(s, Fallthrough::Yes)
                        .map(|v| Verdict { reason: format!("{UNDECIDED}; {}", v.reason), ..v })
                        .map_err(|r| format!("after-sb-0pri {policy}: {UNDECIDED}; {r}"))
                }
            }
        }
        AfterSb0Pri::DiscardZeroChanges => by_changes(s, Fallthrough::No),
        AfterSb0Pri::DiscardLeastChanges => least_changes(s),
        AfterSb0Pri::DiscardNode(victim) => {
            match (s.local.name == victim, s.peer.name == victim) {
                (true, false) => Ok(s.loses(Loser::Local, |n| format!("discard-node-{n} names {n}"))),
                (false, true) => Ok(s.loses(Loser::Peer, |n| format!("discard-node-{n} names {n}"))),
                // Configuration validation rules both out; stay safe if it did not run.
                _ => Err(format!(
                    "after-sb-0pri discard-node-{victim}: {victim:?} is not exactly one of the two nodes"
                )),
            }
        }
    }
}

/// discard-younger-primary (`younger`) or -older-primary: bit 0 of a side's bitmap generation
/// says it was Primary when it started its new generation, i.e. it was the Primary at the split
/// (the older Primary); a side without it was promoted later (the younger). Equal bits decide
/// nothing.
fn by_primary_bit(s: &Sides, younger: bool) -> Option<Verdict> {
    let bit = |side: &Side| side.view.gens.bitmap & PRIMARY_BIT != 0;
    let (local_older, peer_older) = (bit(&s.local), bit(&s.peer));
    if local_older == peer_older {
        return None;
    }
    // The younger side is the one without the bit.
    let younger_side = if local_older { Loser::Peer } else { Loser::Local };
    let loser = match (younger, younger_side) {
        (true, side) => side,
        (false, Loser::Local) => Loser::Peer,
        (false, Loser::Peer) => Loser::Local,
    };
    Some(s.loses(loser, |n| {
        if younger {
            format!("{n} became Primary after the split (the younger Primary)")
        } else {
            format!("{n} was Primary at the split (the older Primary)")
        }
    }))
}

/// Whether discard-zero-changes continues with least-changes when both sides changed (it
/// does when reached from younger/older-primary, as in DRBD).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fallthrough {
    Yes,
    No,
}

/// discard-zero-changes: a side without changes loses (nothing of value is discarded).
fn by_changes(s: &Sides, fallthrough: Fallthrough) -> Result<Verdict, String> {
    match (s.local.view.dirty_blocks == 0, s.peer.view.dirty_blocks == 0) {
        (true, false) => Ok(s.loses(Loser::Local, |n| format!("{n} has no changes since the split"))),
        (false, true) => Ok(s.loses(Loser::Peer, |n| format!("{n} has no changes since the split"))),
        (true, true) => tie_break(s, "neither node has changes since the split"),
        (false, false) if fallthrough == Fallthrough::Yes => least_changes(s),
        (false, false) => Err(format!(
            "after-sb-0pri discard-zero-changes: both nodes changed blocks since the split ({})",
            s.changes()
        )),
    }
}

/// discard-least-changes: the side with fewer changed blocks loses.
fn least_changes(s: &Sides) -> Result<Verdict, String> {
    let (l, p) = (s.local.view.dirty_blocks, s.peer.view.dirty_blocks);
    let why = |n: &str| format!("{n} has fewer changed blocks ({})", s.changes());
    match l.cmp(&p) {
        std::cmp::Ordering::Less => Ok(s.loses(Loser::Local, why)),
        std::cmp::Ordering::Greater => Ok(s.loses(Loser::Peer, why)),
        std::cmp::Ordering::Equal => {
            tie_break(s, &format!("both nodes changed as many blocks ({})", s.changes()))
        }
    }
}

/// Ties: the side with the lower node id (the one that holds DRBD's RESOLVE_CONFLICTS) loses.
fn tie_break(s: &Sides, tie: &str) -> Result<Verdict, String> {
    let (l, p) = (s.local.view.node_id, s.peer.view.node_id);
    let why = |n: &str| format!("{tie}; {n} has the lower node id");
    match l.cmp(&p) {
        std::cmp::Ordering::Less => Ok(s.loses(Loser::Local, why)),
        std::cmp::Ordering::Greater => Ok(s.loses(Loser::Peer, why)),
        std::cmp::Ordering::Equal => Err(format!("{tie}, and the node ids are equal: cannot break the tie")),
    }
}

/// after-sb-1pri, with (policy description, verdict).
fn after_sb_1pri(p: &Policies, s: &Sides) -> Result<(String, Verdict), String> {
    let primary_loses = |v: &Verdict| s.get(v.loser).view.role == Role::Primary;
    let combined = format!("after-sb-1pri {}, after-sb-0pri {}", p.after_sb_1pri, p.after_sb_0pri);
    match p.after_sb_1pri {
        AfterSb1::Disconnect => Err("after-sb-1pri is disconnect".to_string()),
        AfterSb1::Consensus => {
            let verdict =
                after_sb_0pri(&p.after_sb_0pri, s).map_err(|r| format!("after-sb-1pri consensus: {r}"))?;
            if primary_loses(&verdict) {
                return Err(format!(
                    "after-sb-1pri consensus: after-sb-0pri {} would discard the Primary {} ({})",
                    p.after_sb_0pri,
                    s.get(verdict.loser).name,
                    verdict.reason
                ));
            }
            Ok((combined, verdict))
        }
        AfterSb1::DiscardSecondary => {
            let secondary = if s.local.view.role == Role::Primary { Loser::Peer } else { Loser::Local };
            let verdict = s.loses(secondary, |n| format!("{n} is the Secondary"));
            Ok((format!("after-sb-1pri {}", p.after_sb_1pri), verdict))
        }
        AfterSb1::CallPriLostAfterSb => {
            let verdict = after_sb_0pri(&p.after_sb_0pri, s)
                .map_err(|r| format!("after-sb-1pri call-pri-lost-after-sb: {r}"))?;
            Ok((combined, verdict))
        }
    }
}

/// after-sb-2pri, with (policy description, verdict). The loser is a Primary either way.
fn after_sb_2pri(p: &Policies, s: &Sides) -> Result<(String, Verdict), String> {
    match p.after_sb_2pri {
        AfterSb2::Disconnect => Err("after-sb-2pri is disconnect".to_string()),
        AfterSb2::CallPriLostAfterSb => {
            let verdict = after_sb_0pri(&p.after_sb_0pri, s)
                .map_err(|r| format!("after-sb-2pri call-pri-lost-after-sb: {r}"))?;
            Ok((format!("after-sb-2pri {}, after-sb-0pri {}", p.after_sb_2pri, p.after_sb_0pri), verdict))
        }
    }
}

/// What the session does when the sync decision would make a Primary the sync target
/// (`rr-conflict`). Overwriting the data under a Primary's clients is never an option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RrConflictAction {
    /// No Primary becomes sync target: go on with the resync.
    Proceed,
    /// Refuse the connection and go StandAlone.
    Disconnect,
    /// Run the pri-lost handler on the Primary that would become target (on this node when
    /// `here`), then refuse and go StandAlone.
    CallPriLost { here: bool },
    /// Refuse this attempt but keep connecting (not StandAlone): once the Primary is demoted, the
    /// next attempt syncs.
    RetryConnect,
}

impl RrConflictAction {
    /// The connection is refused.
    pub fn refuses(self) -> bool {
        self != RrConflictAction::Proceed
    }
}

/// The rr-conflict check, on the decision after split-brain recovery (a losing Primary that
/// was demoted is Secondary by then).
pub fn rr_conflict(
    outcome: SyncDecision,
    local_role: Role,
    peer_role: Role,
    policy: RrConflict,
) -> RrConflictAction {
    let local_primary_target = outcome.is_target() && local_role == Role::Primary;
    let peer_primary_target = outcome.is_source() && peer_role == Role::Primary;
    if !local_primary_target && !peer_primary_target {
        return RrConflictAction::Proceed;
    }
    match policy {
        RrConflict::Disconnect => RrConflictAction::Disconnect,
        RrConflict::CallPriLost => RrConflictAction::CallPriLost { here: local_primary_target },
        RrConflict::RetryConnect => RrConflictAction::RetryConnect,
    }
}

#[cfg(test)]
mod tests;
