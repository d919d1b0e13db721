//! Known bugs the simulator can plant in the core (`rdbd-sim run --inject-bug NAME`), to show
//! that it finds them: a simulator that finds nothing is only proof when it can find these.
//! The daemon never plants any ([`Bugs::NONE`]).

/// One plantable bug; each names the guarantee it breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    /// An activity-log extent leaves the log (eviction or idle retire) before this node's data
    /// is flushed: a power loss then loses writes the peer has, unmarked.
    RetireBeforeLocalFlush,
    /// A client FLUSH is answered once the local disk has flushed, without the peer's FlushAck.
    AckFlushBeforePeer,
    /// A disconnected Secondary promotes without asking the witness: two writers.
    PromoteWithoutQuorum,
    /// When the link dies, writes not yet stable on the peer are not marked out of sync.
    ForgetUnstableOnLinkLoss,
    /// The sync target acknowledges resync data before its disk has flushed it, so the source
    /// clears bits a power loss can still undo.
    AckResyncBeforeFlush,
    /// A replicated write holds its activity-log extents only until the peer has it stably,
    /// even while the local write is still in flight (the daemon's bug until 2026-12-07).
    ReleaseExtentBeforeLocalWrite,
    /// A client TRIM is carried out locally and answered, but never sent to the peer.
    TrimNotReplicated,
    /// An `invalidate`'s full sync covers only the blocks already marked (neither side marks
    /// every block).
    InvalidateWithoutFullSync,
    /// Online verify counts the blocks that differ but does not mark them out of sync.
    VerifySkipsMarking,
    /// The peer's disk fails a replicated write and the applier answers it as written (and
    /// keeps its disk): the Primary never marks the block.
    IgnorePeerWriteError,
    /// A connected (or handshaking) Secondary promotes on its last view of the peer's role
    /// instead of asking the peer (PromoteRequest): two nodes promoted at once both succeed.
    PromoteWithoutAskingPeer,
    /// A sync target stays UpToDate from the sync decision to the end of its resync instead of
    /// being Inconsistent: a node missing blocks its peer has claims to be a full copy.
    SyncTargetClaimsUpToDate,
    /// The operator's `down` of a connected Primary starts a new data generation before
    /// demoting: a switchover done by hand (down, promote the peer, up) ends in a split brain.
    DownStartsNewGeneration,
    /// Writes frozen without the witness's grant (a Primary that lost its peer) keep their
    /// ranges claimed: the reconnect's resync cannot read them, and they wait for that resync.
    FrozenWritesKeepClaims,
    /// The side an after-sb policy discards keeps its data and goes on as if in sync instead of
    /// becoming the sync target: the replicas diverge silently.
    SplitBrainLoserKeepsData,
    /// The sync source reads a requested range without claiming it against client writes: a
    /// write mirrored between the read and the send is overwritten on the target by the older
    /// resync data (the rule of the daemon's own bookkeeping, `SourceRequests`).
    ResyncReadUnclaimed,
}

impl Bug {
    pub const ALL: [Bug; 16] = [
        Bug::RetireBeforeLocalFlush,
        Bug::AckFlushBeforePeer,
        Bug::PromoteWithoutQuorum,
        Bug::ForgetUnstableOnLinkLoss,
        Bug::AckResyncBeforeFlush,
        Bug::ReleaseExtentBeforeLocalWrite,
        Bug::TrimNotReplicated,
        Bug::InvalidateWithoutFullSync,
        Bug::VerifySkipsMarking,
        Bug::IgnorePeerWriteError,
        Bug::PromoteWithoutAskingPeer,
        Bug::SyncTargetClaimsUpToDate,
        Bug::DownStartsNewGeneration,
        Bug::FrozenWritesKeepClaims,
        Bug::SplitBrainLoserKeepsData,
        Bug::ResyncReadUnclaimed,
    ];

    /// The name `--inject-bug` takes.
    pub const fn name(self) -> &'static str {
        match self {
            Bug::RetireBeforeLocalFlush => "retire-before-local-flush",
            Bug::AckFlushBeforePeer => "ack-flush-before-peer",
            Bug::PromoteWithoutQuorum => "promote-without-quorum",
            Bug::ForgetUnstableOnLinkLoss => "forget-unstable-on-link-loss",
            Bug::AckResyncBeforeFlush => "ack-resync-before-flush",
            Bug::ReleaseExtentBeforeLocalWrite => "release-extent-before-local-write",
            Bug::TrimNotReplicated => "trim-not-replicated",
            Bug::InvalidateWithoutFullSync => "invalidate-without-full-sync",
            Bug::VerifySkipsMarking => "verify-skips-marking",
            Bug::IgnorePeerWriteError => "ignore-peer-write-error",
            Bug::PromoteWithoutAskingPeer => "promote-without-asking-peer",
            Bug::SyncTargetClaimsUpToDate => "sync-target-claims-up-to-date",
            Bug::DownStartsNewGeneration => "down-starts-new-generation",
            Bug::FrozenWritesKeepClaims => "frozen-writes-keep-claims",
            Bug::SplitBrainLoserKeepsData => "split-brain-loser-keeps-data",
            Bug::ResyncReadUnclaimed => "resync-read-unclaimed",
        }
    }

    pub const fn describe(self) -> &'static str {
        match self {
            Bug::RetireBeforeLocalFlush => {
                "an activity-log extent leaves the log before the local data flush"
            }
            Bug::AckFlushBeforePeer => "a client FLUSH is answered before the peer's FlushAck",
            Bug::PromoteWithoutQuorum => "a disconnected Secondary promotes without the witness",
            Bug::ForgetUnstableOnLinkLoss => "writes unstable on the peer are not marked when the link dies",
            Bug::AckResyncBeforeFlush => "the sync target acknowledges resync data before flushing it",
            Bug::ReleaseExtentBeforeLocalWrite => {
                "a write's extent leaves its count when the peer has it, the local write in flight"
            }
            Bug::TrimNotReplicated => "a TRIM is applied locally and answered but not mirrored",
            Bug::InvalidateWithoutFullSync => "invalidate's full sync covers only the blocks already marked",
            Bug::VerifySkipsMarking => "online verify counts differing blocks but does not mark them",
            Bug::IgnorePeerWriteError => "the peer answers a write its disk failed as written",
            Bug::PromoteWithoutAskingPeer => {
                "a connected Secondary promotes on its last view of the peer, without asking it"
            }
            Bug::SyncTargetClaimsUpToDate => "a sync target stays UpToDate until its resync ends",
            Bug::DownStartsNewGeneration => "down of a connected Primary starts a new generation first",
            Bug::FrozenWritesKeepClaims => "writes frozen without the witness keep their ranges claimed",
            Bug::SplitBrainLoserKeepsData => "the side an after-sb policy discards goes on as if in sync",
            Bug::ResyncReadUnclaimed => {
                "the sync source reads a range without claiming it against client writes"
            }
        }
    }

    pub fn from_name(name: &str) -> Option<Bug> {
        Bug::ALL.into_iter().find(|b| b.name() == name)
    }

    const fn bit(self) -> u32 {
        1 << self as u32
    }
}

/// A set of planted bugs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bugs(u32);

impl Bugs {
    pub const NONE: Bugs = Bugs(0);

    pub const fn only(bug: Bug) -> Bugs {
        Bugs(bug.bit())
    }

    pub const fn has(self, bug: Bug) -> bool {
        self.0 & bug.bit() != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_sets_hold_only_what_was_planted() {
        for bug in Bug::ALL {
            assert_eq!(Bug::from_name(bug.name()), Some(bug));
            assert!(Bugs::only(bug).has(bug));
            assert!(!Bugs::NONE.has(bug));
        }
        assert!(!Bugs::only(Bug::AckFlushBeforePeer).has(Bug::PromoteWithoutQuorum));
        assert_eq!(Bug::from_name("no-such-bug"), None);
    }
}
