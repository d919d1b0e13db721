//! Roles and states of a node and its connection, spelled as DRBD spells them
//! (so `rdbd status` reads like `drbdadm status`), and the pure checks that
//! guard role changes.

use serde::{Deserialize, Serialize};

pub use rdbd_protocol::drbd_spellings;
pub use rdbd_protocol::states::{DiskState, ParseStateError, Role};

use crate::replication::sync_decision::SyncDecision;

/// The state of the connection to the peer (DRBD 9 names; the transient
/// failure states collapse into `Unconnected`/`Connecting`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ConnState {
    /// Not trying to connect (after `disconnect` or an unresolved split brain).
    StandAlone,
    Disconnecting,
    /// Configured, connect attempt not started yet.
    Unconnected,
    Connecting,
    Connected,
}
drbd_spellings!(
    ConnState,
    "connection state",
    [StandAlone, Disconnecting, Unconnected, Connecting, Connected]
);

/// The replication state with the peer (meaningful while connected).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReplState {
    /// Not connected.
    Off,
    /// Connected, in sync, replicating.
    Established,
    /// Bitmap exchange before a resync, as source / as target.
    WFBitMapS,
    WFBitMapT,
    SyncSource,
    SyncTarget,
    /// Online verify, on the side that drives it / on the side that answers.
    VerifyS,
    VerifyT,
}
drbd_spellings!(
    ReplState,
    "replication state",
    [Off, Established, WFBitMapS, WFBitMapT, SyncSource, SyncTarget, VerifyS, VerifyT]
);

/// Why a promotion to Primary is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PromoteRefusal {
    /// Two Primaries would write divergent data.
    #[error("peer is Primary")]
    PeerIsPrimary,
    /// The local data might be stale or incomplete; the operator may insist.
    #[error("local disk is {0}; use --force to promote anyway")]
    NeedsForce(DiskState),
    /// There is no local data to serve; force cannot help.
    #[error("local disk is {0}; cannot promote without an attached disk holding data")]
    NoUsableDisk(DiskState),
}

/// May this node become Primary?
///
/// - Refused while connected to a Primary peer, even with `force`: a second
///   Primary would diverge. While disconnected the peer's role is unknown and
///   is not checked (the new generation made on promotion exposes a split
///   brain at the next connect).
/// - Without `force` only `UpToDate` data may be promoted.
/// - With `force`, `Consistent`, `Outdated` and `Inconsistent` are accepted
///   (the operator takes responsibility), but never a disk that has no data or
///   is still being attached.
pub fn check_promote(
    local_disk: DiskState,
    peer_role: Role,
    connected: bool,
    force: bool,
) -> Result<(), PromoteRefusal> {
    if connected && peer_role == Role::Primary {
        return Err(PromoteRefusal::PeerIsPrimary);
    }
    match local_disk {
        DiskState::UpToDate => Ok(()),
        DiskState::Consistent | DiskState::Outdated | DiskState::Inconsistent => {
            if force {
                Ok(())
            } else {
                Err(PromoteRefusal::NeedsForce(local_disk))
            }
        }
        DiskState::Diskless
        | DiskState::Attaching
        | DiskState::Failed
        | DiskState::Negotiating
        | DiskState::DUnknown => Err(PromoteRefusal::NoUsableDisk(local_disk)),
    }
}

/// Why a demotion to Secondary is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DemoteRefusal {
    /// Demoting under open clients would fail their I/O.
    #[error("device is in use by {0} NBD client(s); disconnect them first")]
    InUse(usize),
}

/// May this node become Secondary? Refused while NBD clients are attached
/// (DRBD refuses while the device is held open). Demoting a node that is not
/// Primary is a no-op and allowed.
pub fn check_demote(local_role: Role, open_clients: usize) -> Result<(), DemoteRefusal> {
    if local_role == Role::Primary && open_clients > 0 {
        return Err(DemoteRefusal::InUse(open_clients));
    }
    Ok(())
}

/// Only a Primary serves the NBD export: a Secondary's data may change under
/// the client through replication or resync.
pub fn may_serve_nbd(role: Role) -> bool {
    role == Role::Primary
}

/// Both nodes' disk states, from one node's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskPair {
    pub local: DiskState,
    pub peer: DiskState,
}

/// Each side's disk state once a sync decision is acted on, as DRBD's state
/// sanitizing sets it:
///
/// - a sync source is `UpToDate` (its data is the newest of the pair) and the
///   target `Inconsistent` until the resync completes;
/// - in sync: `Consistent` and `Outdated` become `UpToDate` (connected with
///   identical generations, nothing newer exists); other states are kept, so
///   two `Inconsistent` just-created disks stay `Inconsistent`;
/// - no sync (split brain, unrelated data, no usable source, no disk): the
///   connection is dropped or never synced, states are unchanged.
pub fn disk_after_decision(outcome: SyncDecision, local: DiskState, peer: DiskState) -> DiskPair {
    let refresh = |d: DiskState| match d {
        DiskState::Consistent | DiskState::Outdated => DiskState::UpToDate,
        other => other,
    };
    if outcome.is_source() {
        DiskPair { local: DiskState::UpToDate, peer: DiskState::Inconsistent }
    } else if outcome.is_target() {
        DiskPair { local: DiskState::Inconsistent, peer: DiskState::UpToDate }
    } else if outcome == SyncDecision::InSync {
        DiskPair { local: refresh(local), peer: refresh(peer) }
    } else {
        DiskPair { local, peer }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::de::value::{Error as DeError, StrDeserializer};
    use serde::de::IntoDeserializer;
    use std::fmt;
    use std::str::FromStr;

    fn roundtrip<T>(all: &[T])
    where
        T: Copy + fmt::Display + FromStr<Err = ParseStateError> + PartialEq + fmt::Debug,
        T: for<'de> Deserialize<'de>,
    {
        for &v in all {
            let s = v.to_string();
            assert_eq!(s.parse::<T>().unwrap(), v);
            assert_eq!(s.to_ascii_lowercase().parse::<T>().unwrap(), v);
            let de: StrDeserializer<'_, DeError> = s.as_str().into_deserializer();
            assert_eq!(T::deserialize(de).unwrap(), v, "serde spelling of {s}");
        }
    }

    #[test]
    fn drbd_spellings_roundtrip() {
        roundtrip(Role::ALL);
        roundtrip(DiskState::ALL);
        roundtrip(ConnState::ALL);
        roundtrip(ReplState::ALL);
        assert_eq!(DiskState::UpToDate.to_string(), "UpToDate");
        assert_eq!(DiskState::DUnknown.to_string(), "DUnknown");
        assert_eq!(ConnState::StandAlone.to_string(), "StandAlone");
        assert_eq!(ReplState::SyncSource.to_string(), "SyncSource");
        assert_eq!(ReplState::WFBitMapT.to_string(), "WFBitMapT");
        assert_eq!(Role::Secondary.to_string(), "Secondary");
        assert_eq!(format!("{:>10}", Role::Primary), "   Primary");
    }

    #[test]
    fn unknown_spelling_is_a_typed_error() {
        let err = "UpToDat".parse::<DiskState>().unwrap_err();
        assert_eq!(err.kind, "disk state");
        assert_eq!(err.input, "UpToDat");
        let msg = err.to_string();
        assert!(msg.starts_with("unknown disk state \"UpToDat\" (expected one of: Diskless, "), "{msg}");
        assert!(msg.ends_with("UpToDate)"), "{msg}");
        let de: StrDeserializer<'_, DeError> = "uptodate".into_deserializer();
        assert!(DiskState::deserialize(de).is_err(), "serde is exact");
    }

    #[test]
    fn disk_states_order_by_data_quality() {
        use DiskState::*;
        assert!(UpToDate > Consistent);
        assert!(Consistent > Outdated);
        assert!(Outdated > Inconsistent);
        assert!(Inconsistent > Diskless);
        let mut sorted = DiskState::ALL.to_vec();
        sorted.sort();
        assert_eq!(sorted, DiskState::ALL);
        assert_eq!(DiskState::ALL.iter().filter(|d| d.can_be_sync_source()).count(), 3);
        assert!(!DUnknown.can_be_sync_source() && !DUnknown.has_disk());
        assert!(Negotiating.has_disk() && !Negotiating.can_be_sync_source());
    }

    #[test]
    fn promote_refused_while_peer_is_primary() {
        let err = check_promote(DiskState::UpToDate, Role::Primary, true, false).unwrap_err();
        assert_eq!(err, PromoteRefusal::PeerIsPrimary);
        assert_eq!(err.to_string(), "peer is Primary");
        // force does not allow two Primaries
        assert_eq!(
            check_promote(DiskState::UpToDate, Role::Primary, true, true),
            Err(PromoteRefusal::PeerIsPrimary)
        );
    }

    #[test]
    fn promote_while_disconnected_ignores_the_stale_peer_role() {
        assert_eq!(check_promote(DiskState::UpToDate, Role::Primary, false, false), Ok(()));
        assert_eq!(check_promote(DiskState::UpToDate, Role::Unknown, false, false), Ok(()));
    }

    #[test]
    fn promote_up_to_date_is_allowed() {
        assert_eq!(check_promote(DiskState::UpToDate, Role::Secondary, true, false), Ok(()));
    }

    #[test]
    fn promote_not_up_to_date_needs_force() {
        for disk in [DiskState::Inconsistent, DiskState::Outdated, DiskState::Consistent] {
            let err = check_promote(disk, Role::Secondary, true, false).unwrap_err();
            assert_eq!(err, PromoteRefusal::NeedsForce(disk));
            assert_eq!(check_promote(disk, Role::Unknown, false, true), Ok(()));
        }
        assert_eq!(
            PromoteRefusal::NeedsForce(DiskState::Inconsistent).to_string(),
            "local disk is Inconsistent; use --force to promote anyway"
        );
    }

    #[test]
    fn promote_without_data_is_refused_even_with_force() {
        for disk in [
            DiskState::Diskless,
            DiskState::Failed,
            DiskState::Attaching,
            DiskState::Negotiating,
            DiskState::DUnknown,
        ] {
            for force in [false, true] {
                assert_eq!(
                    check_promote(disk, Role::Secondary, true, force),
                    Err(PromoteRefusal::NoUsableDisk(disk))
                );
            }
        }
        assert_eq!(
            PromoteRefusal::NoUsableDisk(DiskState::Diskless).to_string(),
            "local disk is Diskless; cannot promote without an attached disk holding data"
        );
    }

    #[test]
    fn demote_refused_while_clients_are_attached() {
        let err = check_demote(Role::Primary, 2).unwrap_err();
        assert_eq!(err, DemoteRefusal::InUse(2));
        assert_eq!(err.to_string(), "device is in use by 2 NBD client(s); disconnect them first");
        assert_eq!(check_demote(Role::Primary, 0), Ok(()));
        assert_eq!(check_demote(Role::Secondary, 0), Ok(()));
    }

    #[test]
    fn only_primary_serves_nbd() {
        assert!(may_serve_nbd(Role::Primary));
        assert!(!may_serve_nbd(Role::Secondary));
        assert!(!may_serve_nbd(Role::Unknown));
    }

    #[test]
    fn disks_after_a_resync_decision() {
        use DiskState::*;
        let d = disk_after_decision(SyncDecision::SourceBitmap, Outdated, UpToDate);
        assert_eq!(d, DiskPair { local: UpToDate, peer: Inconsistent });
        let d = disk_after_decision(SyncDecision::TargetFull, UpToDate, Consistent);
        assert_eq!(d, DiskPair { local: Inconsistent, peer: UpToDate });
        let d = disk_after_decision(SyncDecision::InSync, Consistent, UpToDate);
        assert_eq!(d, DiskPair { local: UpToDate, peer: UpToDate });
        let d = disk_after_decision(SyncDecision::InSync, Inconsistent, Inconsistent);
        assert_eq!(d, DiskPair { local: Inconsistent, peer: Inconsistent });
        let d = disk_after_decision(SyncDecision::SplitBrain { auto_recoverable: true }, UpToDate, Outdated);
        assert_eq!(d, DiskPair { local: UpToDate, peer: Outdated });
    }

    fn any_disk() -> impl Strategy<Value = DiskState> {
        proptest::sample::select(DiskState::ALL)
    }

    fn any_outcome() -> impl Strategy<Value = SyncDecision> {
        proptest::sample::select(vec![
            SyncDecision::InSync,
            SyncDecision::SourceBitmap,
            SyncDecision::TargetBitmap,
            SyncDecision::SourceFull,
            SyncDecision::TargetFull,
            SyncDecision::SplitBrain { auto_recoverable: true },
            SyncDecision::SplitBrain { auto_recoverable: false },
            SyncDecision::Unrelated,
            SyncDecision::NoUsableSource,
            SyncDecision::NoDisk,
        ])
    }

    proptest! {
        /// Both nodes compute their own and the peer's disk state; the results
        /// must agree.
        #[test]
        fn disk_after_decision_agrees_on_both_nodes(o in any_outcome(), a in any_disk(), b in any_disk()) {
            let here = disk_after_decision(o, a, b);
            let there = disk_after_decision(o.mirror(), b, a);
            prop_assert_eq!(here.local, there.peer);
            prop_assert_eq!(here.peer, there.local);
        }
    }
}
