//! The witness's decisions, pure: which node of a resource holds the lease (the witness's vote,
//! so that of two nodes that cannot see each other at most one has quorum), and which node's
//! data is known to be stale. No I/O and no clock: the caller passes the time.
//!
//! Rules (protocol/WITNESS.md §3):
//! - A node that wants the lease gets it unless another node holds an unexpired one, or the
//!   node is outdated. A lease lasts `lease` from the claim; renewing extends it.
//! - A holder that reports its peer disconnected writes alone: the peer becomes outdated and
//!   gets no lease until it reports itself in sync with that peer (both UpToDate, connected).
//!   So a node that lost quorum cannot regain it through the witness alone, even after the
//!   node that kept quorum died: its data lacks that node's writes.
//! - A node forced Primary by the operator is not outdated any more; its peer is.
//! - After the witness starts it grants nothing for one lease period: a node may still hold a
//!   lease from before the restart, which the witness no longer remembers.
//! - At most two nodes per resource.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rdbd_protocol::witness::{Claim, Verdict};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VoteError {
    #[error("resource {resource} already has the nodes {known:?}; {node} is a third")]
    ThirdNode { resource: String, node: String, known: Vec<String> },
    #[error("node {node} names itself as its own peer")]
    SelfPeer { node: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Lease {
    node: String,
    expires: Instant,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Resource {
    nodes: BTreeSet<String>,
    lease: Option<Lease>,
    outdated: BTreeSet<String>,
}

/// Every resource's lease and outdated nodes.
#[derive(Debug, Clone)]
pub struct Votes {
    resources: BTreeMap<String, Resource>,
    lease: Duration,
    /// No lease is granted before this (one lease period after the start).
    grants_from: Instant,
}

/// What the witness must remember across a restart: the outdated nodes of each resource.
pub type Persistent = BTreeMap<String, BTreeSet<String>>;

impl Votes {
    /// Votes of a witness started at `now` that remembers `outdated` from before.
    pub fn new(lease: Duration, outdated: Persistent, now: Instant) -> Self {
        let resources = outdated
            .into_iter()
            .map(|(name, outdated)| (name, Resource { nodes: outdated.clone(), lease: None, outdated }))
            .collect();
        Self { resources, lease, grants_from: now + lease }
    }

    /// Answers `claim` from `node` of `resource` at `now`. The second value says whether what
    /// must persist changed: it must be written durably before the verdict is sent.
    pub fn claim(
        &mut self,
        resource: &str,
        node: &str,
        claim: &Claim,
        now: Instant,
    ) -> Result<(Verdict, bool), VoteError> {
        if claim.peer == node {
            return Err(VoteError::SelfPeer { node: node.to_string() });
        }
        let before = self.persistent_of(resource);
        let r = self.resources.entry(resource.to_string()).or_default();
        for name in [node, claim.peer.as_str()] {
            if !r.nodes.contains(name) {
                if r.nodes.len() >= 2 {
                    return Err(VoteError::ThirdNode {
                        resource: resource.to_string(),
                        node: name.to_string(),
                        known: r.nodes.iter().cloned().collect(),
                    });
                }
                r.nodes.insert(name.to_string());
            }
        }
        if claim.peer_connected && claim.up_to_date && claim.peer_up_to_date {
            r.outdated.remove(node);
            r.outdated.remove(&claim.peer);
        }
        if claim.forced {
            r.outdated.remove(node);
        }
        let live_holder = r.lease.as_ref().filter(|l| l.expires > now).map(|l| l.node.clone());
        let outdated = r.outdated.contains(node);
        let free = live_holder.as_deref().is_none_or(|h| h == node);
        let granted = claim.want_lease && !outdated && free && now >= self.grants_from;
        if granted {
            r.lease = Some(Lease { node: node.to_string(), expires: now + self.lease });
            if !claim.peer_connected || claim.forced {
                r.outdated.insert(claim.peer.clone());
            }
        } else if !claim.want_lease && live_holder.as_deref() == Some(node) {
            // Demoted: the lease goes back at once.
            r.lease = None;
        }
        let holder = r.lease.as_ref().filter(|l| l.expires > now).map(|l| l.node.clone()).unwrap_or_default();
        let verdict = Verdict {
            seq: claim.seq,
            granted,
            lease_ms: if granted { self.lease.as_millis() as u32 } else { 0 },
            holder,
            outdated,
        };
        let changed = self.persistent_of(resource) != before;
        Ok((verdict, changed))
    }

    fn persistent_of(&self, resource: &str) -> BTreeSet<String> {
        self.resources.get(resource).map(|r| r.outdated.clone()).unwrap_or_default()
    }

    /// What to write to the state file.
    pub fn persistent(&self) -> Persistent {
        self.resources
            .iter()
            .filter(|(_, r)| !r.outdated.is_empty())
            .map(|(name, r)| (name.clone(), r.outdated.clone()))
            .collect()
    }

    /// The live lease holder of `resource`, if any (for the witness's status).
    pub fn holder(&self, resource: &str, now: Instant) -> Option<&str> {
        let r = self.resources.get(resource)?;
        r.lease.as_ref().filter(|l| l.expires > now).map(|l| l.node.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LEASE: Duration = Duration::from_secs(2);

    fn claim(peer: &str, want: bool, connected: bool) -> Claim {
        Claim {
            seq: 1,
            want_lease: want,
            peer: peer.into(),
            peer_connected: connected,
            up_to_date: true,
            peer_up_to_date: connected,
            forced: false,
        }
    }

    /// Votes past the start-up grace period, and that time.
    fn started() -> (Votes, Instant) {
        let t0 = Instant::now();
        (Votes::new(LEASE, Persistent::new(), t0), t0 + LEASE)
    }

    fn ask(v: &mut Votes, node: &str, c: &Claim, now: Instant) -> Verdict {
        v.claim("r0", node, c, now).unwrap().0
    }

    #[test]
    fn the_primary_keeps_the_lease_and_a_partitioned_secondary_is_refused_and_outdated() {
        let (mut v, t) = started();
        assert!(ask(&mut v, "alpha", &claim("beta", true, true), t).granted);
        // The link breaks: alpha renews, reporting beta gone; beta asks.
        assert!(ask(&mut v, "alpha", &claim("beta", true, false), t + Duration::from_millis(400)).granted);
        let b = ask(&mut v, "beta", &claim("alpha", true, false), t + Duration::from_millis(500));
        assert!(!b.granted);
        assert_eq!(b.holder, "alpha");
        assert!(b.outdated);
        // Alpha dies: its lease runs out, but beta lacks alpha's writes: still refused.
        let later = t + Duration::from_secs(10);
        let b = ask(&mut v, "beta", &claim("alpha", true, false), later);
        assert!(!b.granted && b.outdated && b.holder.is_empty());
        assert_eq!(v.persistent()["r0"], BTreeSet::from(["beta".to_string()]));
    }

    #[test]
    fn a_dead_primarys_lease_expires_and_the_up_to_date_secondary_gets_it() {
        let (mut v, t) = started();
        assert!(ask(&mut v, "alpha", &claim("beta", true, true), t).granted);
        // Alpha crashes without a word: beta is refused until the lease is over.
        assert!(!ask(&mut v, "beta", &claim("alpha", true, false), t + Duration::from_millis(1900)).granted);
        let b = ask(&mut v, "beta", &claim("alpha", true, false), t + Duration::from_millis(2001));
        assert!(b.granted && b.holder == "beta");
        // Now alpha is the stale one, until both are in sync again.
        let a = ask(&mut v, "alpha", &claim("beta", true, false), t + Duration::from_secs(30));
        assert!(!a.granted && a.outdated);
        ask(&mut v, "beta", &claim("alpha", true, true), t + Duration::from_secs(31));
        assert!(v.persistent().is_empty());
    }

    #[test]
    fn nothing_is_granted_in_the_first_lease_period_after_a_restart() {
        let t0 = Instant::now();
        let mut v = Votes::new(LEASE, Persistent::new(), t0);
        assert!(!ask(&mut v, "alpha", &claim("beta", true, true), t0 + Duration::from_millis(100)).granted);
        assert!(ask(&mut v, "alpha", &claim("beta", true, true), t0 + LEASE).granted);
    }

    #[test]
    fn the_outdated_set_survives_a_restart() {
        let t0 = Instant::now();
        let remembered = Persistent::from([("r0".to_string(), BTreeSet::from(["beta".to_string()]))]);
        let mut v = Votes::new(LEASE, remembered, t0);
        let b = ask(&mut v, "beta", &claim("alpha", true, false), t0 + LEASE * 2);
        assert!(!b.granted && b.outdated);
    }

    #[test]
    fn a_forced_primary_clears_its_own_outdated_mark() {
        let remembered = Persistent::from([("r0".to_string(), BTreeSet::from(["beta".to_string()]))]);
        let t0 = Instant::now();
        let mut v = Votes::new(LEASE, remembered, t0);
        let forced = Claim { forced: true, ..claim("alpha", true, false) };
        let (b, changed) = v.claim("r0", "beta", &forced, t0 + LEASE).unwrap();
        assert!(b.granted && !b.outdated && changed);
        assert_eq!(v.persistent()["r0"], BTreeSet::from(["alpha".to_string()]));
    }

    #[test]
    fn giving_up_the_lease_frees_it_at_once() {
        let (mut v, t) = started();
        assert!(ask(&mut v, "alpha", &claim("beta", true, true), t).granted);
        assert!(!ask(&mut v, "alpha", &claim("beta", false, true), t).granted);
        assert!(ask(&mut v, "beta", &claim("alpha", true, true), t).granted);
    }

    #[test]
    fn a_third_node_or_a_self_peer_is_refused() {
        let (mut v, t) = started();
        ask(&mut v, "alpha", &claim("beta", true, true), t);
        assert!(matches!(
            v.claim("r0", "gamma", &claim("alpha", true, true), t),
            Err(VoteError::ThirdNode { .. })
        ));
        assert!(matches!(
            v.claim("r0", "alpha", &claim("alpha", true, true), t),
            Err(VoteError::SelfPeer { .. })
        ));
        // Other resources are independent.
        assert!(v.claim("r1", "gamma", &claim("delta", true, true), t).unwrap().0.granted);
    }

    proptest! {
        /// Whatever the claims and their timing, two nodes never hold unexpired leases at once,
        /// and a node outdated by its peer's lonely lease gets none until it reported being in
        /// sync.
        #[test]
        fn at_most_one_unexpired_lease(steps in proptest::collection::vec((any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>(), 0u64..1500), 1..300)) {
            let (mut v, mut now) = started();
            let mut expiry: BTreeMap<&str, Instant> = BTreeMap::new();
            let mut lonely_writer: Option<&str> = None;
            for (is_alpha, want, connected, in_sync, advance) in steps {
                now += Duration::from_millis(advance);
                let (node, peer) = if is_alpha { ("alpha", "beta") } else { ("beta", "alpha") };
                let c = Claim { peer_up_to_date: in_sync && connected, ..claim(peer, want, connected) };
                let verdict = ask(&mut v, node, &c, now);
                if c.peer_connected && c.peer_up_to_date {
                    lonely_writer = None;
                }
                if verdict.granted {
                    prop_assert!(lonely_writer != Some(peer), "{} got a lease while outdated", node);
                    expiry.insert(node, now + LEASE);
                    if !connected {
                        lonely_writer = Some(node);
                    }
                } else if !want {
                    expiry.remove(node);
                }
                let live = expiry.values().filter(|&&e| e > now).count();
                prop_assert!(live <= 1, "two live leases at {:?}: {:?}", now, expiry);
            }
        }
    }
}
