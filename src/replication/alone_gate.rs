//! Whether a write that reached only this node's disk (the peer is gone, or lost it), or a read
//! made without the peer, may be answered. Without HA it always may, as in DRBD. With a quorum
//! witness it may only while this node holds the witness's lease: past it, the peer may have
//! been promoted, and answering would let two nodes accept writes (or a read return what the
//! new Primary has since overwritten). Such a request is then held (freeze) or failed (fail-io).
//!
//! Connected again as the Primary, the node opens the gate for requests a dead link left behind
//! (their blocks are marked for the peer's resync, and this node stays the source). The device
//! closes that opening itself, before the dying link reports any write lost: a supervisor tick
//! later would be too late, as the writes it answered in between could be lost to a takeover.
//!
//! Checked on the completion path of every lonely write: a few atomics and a clock read.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// What to do with a write the peer does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AloneVerdict {
    Answer,
    Hold,
    Fail,
}

pub struct AloneGate {
    base: Instant,
    /// Nanoseconds after `base` until which lonely writes are answered; u64::MAX: always.
    until_ns: AtomicU64,
    /// The link epoch (the disconnection) that permission is for: the peer was outdated for
    /// that one, and may have caught up and been cleared since.
    until_epoch: AtomicU64,
    /// Past that moment: fail rather than hold.
    fail: AtomicBool,
    /// Bumped each time a link dies: an opening for an older link counts no more.
    link_epoch: AtomicU64,
    /// The link epoch the gate is open for while connected (0: not open).
    open_epoch: AtomicU64,
}

impl Default for AloneGate {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            until_ns: AtomicU64::new(u64::MAX),
            until_epoch: AtomicU64::new(0),
            fail: AtomicBool::new(false),
            link_epoch: AtomicU64::new(1),
            open_epoch: AtomicU64::new(0),
        }
    }
}

impl AloneGate {
    pub fn verdict(&self) -> AloneVerdict {
        let until = self.until_ns.load(Ordering::Acquire);
        let epoch = self.link_epoch.load(Ordering::Acquire);
        if until == u64::MAX
            || self.open_epoch.load(Ordering::Acquire) == epoch
            || (self.until_epoch.load(Ordering::Acquire) == epoch
                && (self.base.elapsed().as_nanos() as u64) < until)
        {
            AloneVerdict::Answer
        } else if self.fail.load(Ordering::Acquire) {
            AloneVerdict::Fail
        } else {
            AloneVerdict::Hold
        }
    }

    /// Lonely writes are answered until `deadline` (the local end of a lease), while the link
    /// stays in `epoch` (the disconnection the permission was granted for), then held or failed
    /// as `fail` says.
    pub fn allow_until(&self, deadline: Instant, epoch: u64, fail: bool) {
        let ns = deadline.saturating_duration_since(self.base).as_nanos().min(u64::MAX as u128 - 1) as u64;
        self.fail.store(fail, Ordering::Release);
        self.until_epoch.store(epoch, Ordering::Release);
        self.until_ns.store(ns, Ordering::Release);
    }

    /// Lonely writes are always answered (no HA, or the policy accepts the risk).
    pub fn allow_always(&self) {
        self.until_ns.store(u64::MAX, Ordering::Release);
    }

    /// Lonely writes are not answered from now on: held or failed as `fail` says.
    pub fn deny(&self, fail: bool) {
        self.fail.store(fail, Ordering::Release);
        self.open_epoch.store(0, Ordering::Release);
        self.until_ns.store(0, Ordering::Release);
    }

    /// The current link's epoch, to pass to [`AloneGate::open_while_connected`] once the link
    /// is seen alive after reading it.
    pub fn link_epoch(&self) -> u64 {
        self.link_epoch.load(Ordering::Acquire)
    }

    /// Connected with this node as the source: writes the last link lost are answered, until
    /// the link of `epoch` dies.
    pub fn open_while_connected(&self, epoch: u64) {
        self.open_epoch.store(epoch, Ordering::Release);
    }

    /// The link is dying: called before it reports any write lost.
    pub fn peer_lost(&self) {
        self.link_epoch.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn answers_until_the_deadline_then_holds_or_fails() {
        let gate = AloneGate::default();
        assert_eq!(gate.verdict(), AloneVerdict::Answer);
        gate.allow_until(Instant::now() + Duration::from_millis(50), gate.link_epoch(), false);
        assert_eq!(gate.verdict(), AloneVerdict::Answer);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(gate.verdict(), AloneVerdict::Hold);
        gate.deny(true);
        assert_eq!(gate.verdict(), AloneVerdict::Fail);
        gate.allow_always();
        assert_eq!(gate.verdict(), AloneVerdict::Answer);
        gate.deny(false);
        let epoch = gate.link_epoch();
        gate.open_while_connected(epoch);
        assert_eq!(gate.verdict(), AloneVerdict::Answer);
        gate.peer_lost();
        assert_eq!(gate.verdict(), AloneVerdict::Hold);
        gate.open_while_connected(epoch);
        assert_eq!(gate.verdict(), AloneVerdict::Hold, "an opening for a dead link counts no more");
        gate.allow_until(Instant::now() - Duration::from_secs(1), gate.link_epoch(), false);
        assert_eq!(gate.verdict(), AloneVerdict::Hold, "a deadline in the past");
        gate.allow_until(Instant::now() + Duration::from_secs(10), gate.link_epoch(), false);
        assert_eq!(gate.verdict(), AloneVerdict::Answer);
        gate.peer_lost();
        assert_eq!(gate.verdict(), AloneVerdict::Hold, "granted for the previous disconnection");
    }
}
