//! The `fence-peer` command's exit codes, as DRBD defines them, and what they permit.

use super::policy::Permit;

/// What a `fence-peer` run established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceOutcome {
    /// 3: the peer's disk is Inconsistent; 4: Outdated; 7: the peer was shot (STONITH).
    PeerFenced,
    /// 5: the peer is unreachable; it counts as outdated only if this node is UpToDate.
    PeerUnreachable,
    /// 6: the peer is Primary: this node outdates itself.
    PeerIsPrimary,
    /// Anything else: nothing is known; writes stay held, no promotion.
    Failed,
}

pub fn outcome(exit_code: Option<i32>) -> FenceOutcome {
    match exit_code {
        Some(3 | 4 | 7) => FenceOutcome::PeerFenced,
        Some(5) => FenceOutcome::PeerUnreachable,
        Some(6) => FenceOutcome::PeerIsPrimary,
        _ => FenceOutcome::Failed,
    }
}

/// The permit a fence outcome gives a node whose disk is `up_to_date` or not.
pub fn permit(outcome: FenceOutcome, up_to_date: bool) -> Permit {
    match outcome {
        FenceOutcome::PeerFenced => Permit::Granted,
        FenceOutcome::PeerUnreachable if up_to_date => Permit::Granted,
        FenceOutcome::PeerIsPrimary => Permit::Outdated,
        _ => Permit::Denied,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drbds_exit_codes() {
        for code in [3, 4, 7] {
            assert_eq!(permit(outcome(Some(code)), false), Permit::Granted, "{code}");
        }
        assert_eq!(permit(outcome(Some(5)), true), Permit::Granted);
        assert_eq!(permit(outcome(Some(5)), false), Permit::Denied);
        assert_eq!(permit(outcome(Some(6)), true), Permit::Outdated);
        for code in [Some(0), Some(1), Some(2), Some(8), Some(127), None] {
            assert_eq!(permit(outcome(code), true), Permit::Denied, "{code:?}");
        }
    }
}
