//! This node's view of the witness's lease, pure. A lease granted for `lease_ms` runs, on this
//! node's clock, from when the claim was **sent** (the witness counts from when it received it,
//! later), shortened by a margin for clocks that run at slightly different rates. So this node
//! stops relying on its lease before the witness could give it to the peer.
//!
//! Writing without the peer needs more than a lease: a lease granted on a claim that said the
//! peer is gone, because that claim outdated the peer at the witness. Only then can the peer
//! never be promoted without these writes (it would lose acknowledged writes otherwise).

use std::time::{Duration, Instant};

use rdbd_protocol::witness::Verdict;

/// Fraction of the lease this node relies on, and a fixed margin besides.
const LEASE_SHARE_PERCENT: u32 = 85;
const LEASE_MARGIN: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseView {
    until: Option<Instant>,
    /// The end of a lease granted on a claim that reported the peer disconnected, and the
    /// device's link epoch (that disconnection) when the claim was made.
    alone_until: Option<(Instant, u64)>,
    /// Who holds the lease, as of the last verdict ("" nobody).
    pub holder: String,
    /// The witness knows this node's data is stale.
    pub outdated: bool,
    /// A verdict arrived within the last lease period.
    pub witness_reachable: bool,
}

/// How long a lease of `lease_ms` counts here.
pub fn local_lease(lease_ms: u32) -> Duration {
    (Duration::from_millis(lease_ms.into()) * LEASE_SHARE_PERCENT / 100).saturating_sub(LEASE_MARGIN)
}

impl LeaseView {
    /// The verdict on a claim sent at `sent`, which reported the peer connected or not (as of
    /// link epoch `epoch`).
    pub fn on_verdict(&mut self, sent: Instant, claimed_peer_connected: bool, epoch: u64, verdict: &Verdict) {
        self.until = verdict.granted.then(|| sent + local_lease(verdict.lease_ms));
        self.alone_until = self.until.filter(|_| !claimed_peer_connected).map(|u| (u, epoch));
        self.holder = verdict.holder.clone();
        self.outdated = verdict.outdated;
        self.witness_reachable = true;
    }

    /// No verdict came (the witness is unreachable): what was granted still runs out.
    pub fn on_silence(&mut self) {
        self.witness_reachable = false;
    }

    pub fn held(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| now < u)
    }

    /// Until when this node may write without its peer (its peer is outdated at the witness),
    /// and for which disconnection (link epoch).
    pub fn alone_until(&self) -> Option<(Instant, u64)> {
        self.alone_until
    }

    /// Whether this node may write without its peer now, the link being in `epoch`.
    pub fn held_alone(&self, now: Instant, epoch: u64) -> bool {
        self.alone_until.is_some_and(|(u, e)| now < u && e == epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(granted: bool) -> Verdict {
        Verdict {
            seq: 1,
            granted,
            lease_ms: 2000,
            holder: if granted { "alpha".into() } else { String::new() },
            outdated: false,
        }
    }

    #[test]
    fn a_lease_counts_from_the_claim_and_ends_before_the_witnesss() {
        let mut view = LeaseView::default();
        let sent = Instant::now();
        view.on_verdict(sent, true, 1, &verdict(true));
        assert!(view.held(sent + Duration::from_millis(1600)));
        assert!(!view.held_alone(sent, 1), "claimed with the peer connected: the peer is not outdated");
        assert!(!view.held(sent + Duration::from_millis(1651)), "1700 ms minus the margin, of 2000");
        // Silence keeps what was granted until it runs out; a refusal ends it at once.
        view.on_silence();
        assert!(view.held(sent + Duration::from_millis(1000)) && !view.witness_reachable);
        view.on_verdict(sent, false, 1, &verdict(true));
        assert!(view.held_alone(sent + Duration::from_millis(1600), 1));
        assert!(!view.held_alone(sent, 2), "granted for another disconnection");
        view.on_verdict(sent, false, 1, &verdict(false));
        assert!(!view.held(sent) && !view.held_alone(sent, 1));
        assert_eq!(local_lease(0), Duration::ZERO);
    }
}
