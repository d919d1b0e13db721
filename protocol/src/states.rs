//! A node's role and disk state: one vocabulary for the wire, the metadata, `status` and the
//! configuration. Spelled as DRBD spells them (so `rdbd status` reads like `drbdadm status`);
//! on the wire as one byte each (SPEC.md §4).

use serde::{Deserialize, Serialize};

/// A string did not name a state of the expected kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {input:?} (expected one of: {})", .expected.join(", "))]
pub struct ParseStateError {
    /// What was being parsed ("role", "disk state", ...).
    pub kind: &'static str,
    /// The rejected input.
    pub input: String,
    /// The accepted spellings.
    pub expected: &'static [&'static str],
}

/// Display, FromStr (ASCII case-insensitive) and the list of DRBD spellings for
/// a fieldless enum whose variant names are those spellings. Serde derives use
/// the same names, exactly.
#[macro_export]
macro_rules! drbd_spellings {
    ($ty:ident, $kind:literal, [$($variant:ident),+ $(,)?]) => {
        impl $ty {
            /// Every value, in declaration order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];
            /// The DRBD spellings, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$(stringify!($variant)),+];

            /// DRBD's spelling of this value.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => stringify!($variant)),+
                }
            }
        }

        impl ::std::fmt::Display for $ty {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl ::std::str::FromStr for $ty {
            type Err = $crate::states::ParseStateError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::ALL.iter().copied().find(|v| v.as_str().eq_ignore_ascii_case(s)).ok_or_else(|| {
                    $crate::states::ParseStateError { kind: $kind, input: s.to_owned(), expected: Self::NAMES }
                })
            }
        }
    };
}

/// A node's role. Only a Primary accepts application I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum Role {
    Primary = 1,
    Secondary = 2,
    /// The peer's role while not connected.
    Unknown = 0,
}
crate::drbd_spellings!(Role, "role", [Primary, Secondary, Unknown]);

/// The state of a node's backing disk. Declared in DRBD's order, so states
/// with better data compare greater (`UpToDate > Consistent > Outdated >
/// Inconsistent`); `DUnknown` (a peer's disk while disconnected) sits between
/// Outdated and Consistent, as in DRBD.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum DiskState {
    /// No backing disk attached.
    Diskless,
    /// Attach in progress (metadata being read).
    Attaching,
    /// I/O error; about to become Diskless.
    Failed,
    /// Attached and connecting; the real state is settled by the handshake.
    Negotiating,
    /// Data is not usable (a resync target, or never synced).
    Inconsistent,
    /// Consistent but known to be stale: not promotable without force.
    Outdated,
    /// The peer's disk state while disconnected.
    DUnknown,
    /// Consistent, but whether it is the newest is not known (not connected).
    Consistent,
    /// Consistent and the newest data: the only state that allows I/O.
    UpToDate,
}
crate::drbd_spellings!(
    DiskState,
    "disk state",
    [Diskless, Attaching, Failed, Negotiating, Inconsistent, Outdated, DUnknown, Consistent, UpToDate]
);

impl DiskState {
    /// A node whose own disk is in one of these states takes part in the sync
    /// handshake (DRBD: local and peer disk at least Negotiating).
    pub const fn has_disk(self) -> bool {
        matches!(
            self,
            DiskState::Negotiating
                | DiskState::Inconsistent
                | DiskState::Outdated
                | DiskState::Consistent
                | DiskState::UpToDate
        )
    }

    /// The data is self-consistent, so the disk may be a sync source
    /// (DRBD: better than Inconsistent).
    pub const fn can_be_sync_source(self) -> bool {
        matches!(self, DiskState::Outdated | DiskState::Consistent | DiskState::UpToDate)
    }
}

impl Role {
    /// The byte on the wire.
    pub const fn to_wire(self) -> u8 {
        self as u8
    }

    /// None for a byte that names no role: decoders reject it.
    pub const fn from_wire(value: u8) -> Option<Self> {
        match value {
            0 => Some(Role::Unknown),
            1 => Some(Role::Primary),
            2 => Some(Role::Secondary),
            _ => None,
        }
    }
}

impl DiskState {
    /// The byte on the wire: the declaration order, worst to best.
    pub const fn to_wire(self) -> u8 {
        self as u8
    }

    /// None for a byte that names no disk state: decoders reject it.
    pub const fn from_wire(value: u8) -> Option<Self> {
        match value {
            0 => Some(DiskState::Diskless),
            1 => Some(DiskState::Attaching),
            2 => Some(DiskState::Failed),
            3 => Some(DiskState::Negotiating),
            4 => Some(DiskState::Inconsistent),
            5 => Some(DiskState::Outdated),
            6 => Some(DiskState::DUnknown),
            7 => Some(DiskState::Consistent),
            8 => Some(DiskState::UpToDate),
            _ => None,
        }
    }
}

/// Reads a role byte; a value that names none is invalid input.
pub(crate) fn decode_role(value: u8) -> Result<Role, crate::DecodeError> {
    Role::from_wire(value).ok_or(crate::DecodeError::Invalid { what: "role", value: value.into() })
}

/// Reads a disk-state byte; a value that names none is invalid input.
pub(crate) fn decode_disk(value: u8) -> Result<DiskState, crate::DecodeError> {
    DiskState::from_wire(value).ok_or(crate::DecodeError::Invalid { what: "disk state", value: value.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_survives_the_wire() {
        for &role in Role::ALL {
            assert_eq!(Role::from_wire(role.to_wire()), Some(role));
        }
        for &disk in DiskState::ALL {
            assert_eq!(DiskState::from_wire(disk.to_wire()), Some(disk));
        }
        assert_eq!(Role::from_wire(3), None);
        assert_eq!(DiskState::from_wire(9), None);
    }

    #[test]
    fn names_parse_back_ignoring_case() {
        assert_eq!("uptodate".parse::<DiskState>(), Ok(DiskState::UpToDate));
        assert_eq!("PRIMARY".parse::<Role>(), Ok(Role::Primary));
        assert!("Master".parse::<Role>().unwrap_err().to_string().contains("Primary, Secondary, Unknown"));
    }
}
