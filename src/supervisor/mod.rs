//! The HA supervisor: with an `[ha]` table the daemon chooses its role itself and runs the
//! service chain on the Primary.
//!
//! - [`policy`]: who should be Primary, pure.
//! - [`lease`]: this node's view of the witness's lease, pure.
//! - [`fence`]: the `fence-peer` command's exit codes.
//! - [`witness_client`]: the claims to the witness.
//! - [`heartbeat`]: the second heartbeat path, and outdating the peer over it.
//! - [`services`]: the chain: plans (pure) and their runner.
//!
//! The supervisor is a client of the node: it holds a [`NodeHandle`], not the node. The loop
//! here looks at the node at each event of its stream, a few times a second besides, and at
//! once when the witness's verdict changes: it computes the permit to act without the peer,
//! sets the alone gate that holds or fails writes the peer does not have, and carries out the
//! policy's action.

pub mod fence;
pub mod heartbeat;
pub mod lease;
pub mod policy;
pub mod services;
pub mod witness_client;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use crate::config::{HaConfig, NoQuorumPolicy, OnDemoteFailure, OnQuorumLoss};
pub use crate::node::ha_report::HaStatus;
use crate::node::handle::NodeHandle;
use crate::node::status::Status;
use crate::replication::states::{ConnState, DiskState, ReplState, Role};
use heartbeat::HeartbeatShared;
use policy::{Action, Permit, Situation};
use services::{Chain, ServiceStatus};
use witness_client::WitnessShared;

/// How often the loop looks when nothing wakes it.
const TICK: Duration = Duration::from_millis(200);
/// How long a ready pair may stay without a Primary before the second choice promotes.
const PROMOTE_GRACE: Duration = Duration::from_secs(5);
/// A Secondary waits this long after losing its peer before it runs `fence-peer`.
const SECONDARY_FENCE_DELAY: Duration = Duration::from_secs(3);
/// How often the lease holder retries a connection the handshake refused.
const RECONNECT_RETRY: Duration = Duration::from_secs(3);
/// A link down for less than this may be the pair renegotiating (a role change drops it for a
/// few milliseconds): nobody is fenced, promoted or demoted for it. Writes the peer lacks are
/// held by the gate meanwhile, so waiting costs latency, never safety. Short, as it adds to a
/// takeover after a silent peer (1 s here made `benches/failover.py`'s isolate case 0.6 s
/// slower; this much adds nothing the lease does not already wait).
const LINK_SETTLE: Duration = Duration::from_millis(300);
/// After a failed promotion or demotion, wait this long before trying again.
const RETRY_DELAY: Duration = Duration::from_secs(2);

struct Supervisor {
    node: NodeHandle,
    ha: HaConfig,
    witness: Option<Arc<WitnessShared>>,
    heartbeat: Option<Arc<HeartbeatShared>>,
    chain: Chain,
    /// The fence outcome for the current disconnection.
    fenced: Option<Permit>,
    ready_since: Option<Instant>,
    retry_at: Option<Instant>,
    last_monitor: Instant,
    last_action: Option<String>,
    warning: Option<String>,
    /// `down` asked, and the services are stopped and the node demoted.
    released: bool,
    /// When the lease holder next retries a refused connection.
    reconnect_at: Option<Instant>,
    /// Since when the peer is gone (since start if it never came): the Secondary's fencing
    /// delay, and the promotion ladder's.
    disconnected_since: Option<Instant>,
    /// The peer was connected at some time since start.
    peer_seen: bool,
    /// Primary, and without the peer at some time since the promotion (failback is for that).
    peer_lost_as_primary: bool,
    /// The chain's states as last published, for `events`.
    last_services: Vec<ServiceStatus>,
}

/// Runs until the node stops.
pub async fn run(node: NodeHandle, ha: HaConfig) {
    let env = BTreeMap::from([
        ("RDBD_RESOURCE".to_string(), node.resource().to_string()),
        ("RDBD_NODE".to_string(), node.me().name.clone()),
        ("RDBD_PEER".to_string(), node.peer().name.clone()),
    ]);
    let witness = ha.witness.clone().map(|config| {
        let shared = Arc::new(WitnessShared::default());
        let fail_io = ha.on_quorum_loss == OnQuorumLoss::FailIo;
        tokio::spawn(witness_client::run(node.clone(), config, shared.clone(), fail_io));
        shared
    });
    let heartbeat = node.me().heartbeat_address.is_some().then(|| {
        let net = &node.net();
        // The same limit as the replication link's: silent this long, the peer is gone.
        let shared = Arc::new(HeartbeatShared::new(net.ping_interval * 2 + net.ping_timeout));
        tokio::spawn(heartbeat::run(node.clone(), shared.clone(), net.ping_interval));
        shared
    });
    let warning = (ha.witness.is_none() && ha.fence_peer.is_none()).then(|| match ha.no_quorum_policy {
        NoQuorumPolicy::Stop => {
            "no witness and no fence-peer: no automatic takeover when the peer is lost".to_string()
        }
        NoQuorumPolicy::Ignore => {
            "no-quorum-policy = ignore without witness or fence-peer: a cut link makes both nodes Primary"
                .to_string()
        }
    });
    if let Some(w) = &warning {
        warn!("{w}");
    }
    let chain = Chain::new(&ha.services, env);
    let mut s = Supervisor {
        node,
        ha,
        witness,
        heartbeat,
        chain,
        fenced: None,
        ready_since: None,
        retry_at: None,
        last_monitor: Instant::now(),
        last_action: None,
        warning,
        released: false,
        reconnect_at: None,
        disconnected_since: None,
        peer_seen: false,
        peer_lost_as_primary: false,
        last_services: Vec::new(),
    };
    s.last_services = s.chain.status();
    let shutdown = s.node.shutdown_token();
    // The node's event stream wakes the loop at each change of state; the tick remains for
    // what time alone changes (grace periods, retries, service monitors).
    let mut events = s.node.subscribe_events().events;
    loop {
        let verdict = async {
            match &s.witness {
                Some(w) => w.changed.notified().await,
                None => std::future::pending().await,
            }
        };
        let heard = async {
            match &s.heartbeat {
                Some(h) => h.changed.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(TICK) => {}
            _ = verdict => {}
            _ = heard => {}
            changed = events.recv() => {
                if matches!(changed, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                    break;
                }
            }
        }
        s.step().await;
    }
    // `down` stops the services before the daemon lets go of the device.
    if s.chain.any_running() {
        if let Err(e) = s.chain.stop_all().await {
            error!("stopping the services at shutdown: {e}");
        }
    }
}

impl Supervisor {
    async fn step(&mut self) {
        if self.node.release_requested() {
            return self.release().await;
        }
        let status = self.node.status().await;
        let now = Instant::now();
        let connected = status.connection == ConnState::Connected;
        if connected {
            self.fenced = None;
            self.disconnected_since = None;
            self.peer_seen = true;
        } else {
            self.disconnected_since.get_or_insert(now);
        }
        if status.role != Role::Primary {
            self.peer_lost_as_primary = false;
        } else if !connected && !self.link_settling(now) {
            self.peer_lost_as_primary = true;
        }
        let both_ready = connected
            && status.role == Role::Secondary
            && status.peer.role == Role::Secondary
            && status.disk == DiskState::UpToDate
            && status.peer.disk == DiskState::UpToDate;
        if !both_ready {
            self.ready_since = None;
        } else if self.ready_since.is_none() {
            self.ready_since = Some(now);
        }
        if connected && status.peer.role == Role::Primary {
            // The peer took over: this node's failures are history, a switchover is done.
            self.chain.reset_failures();
            self.node.clear_yield();
        }
        let (me, peer) = (self.node.me().name.clone(), self.node.peer().name.clone());
        // Whether this node is Primary or would promote with a permit: only then is one sought
        // (the witness's lease, a fence).
        let wants = policy::wants_lease(&self.situation(&status, now, Permit::Denied, &me, &peer));
        let permit = self.permit(&status, connected, now, wants).await;
        self.set_gate(status.role, connected, permit);
        if let Some(w) = &self.witness {
            w.want.store(wants, Ordering::Release);
        }
        let action = policy::decide(&self.situation(&status, now, permit, &me, &peer));
        if self.retry_at.is_some_and(|t| now < t) && action != Action::Stay {
            return self.publish(permit);
        }
        if action != Action::Stay && !connected && self.link_settling(now) {
            return self.publish(permit);
        }
        match action {
            Action::Stay => {
                if status.role == Role::Primary
                    && now.duration_since(self.last_monitor) >= self.ha.monitor_interval
                {
                    self.last_monitor = now;
                    if let Err(e) = self.chain.monitor().await {
                        warn!("service chain failed: {e}");
                    }
                }
            }
            Action::Promote => self.promote().await,
            Action::Demote(reason) => self.demote(reason, false).await,
            Action::DemoteForced(reason) => {
                if permit == Permit::Outdated {
                    self.node.discard_my_data_at_next_connect();
                }
                self.demote(reason, true).await
            }
        }
        // A node the peer wrote without rejoins as the one whose changes go.
        if permit == Permit::Outdated && !connected && status.role == Role::Secondary {
            let _ = self.node.connect(true);
        }
        // The lease holder retries a connection the handshake refused (a split brain with a
        // Primary that was frozen, which learns from the witness that it must give way). Not
        // after the operator's own `disconnect`, which leaves no error.
        let refused = status.connection == ConnState::StandAlone && status.last_error.is_some();
        if refused
            && self.witness.is_some()
            && permit == Permit::Granted
            && self.reconnect_at.is_none_or(|t| now >= t)
        {
            self.reconnect_at = Some(now + RECONNECT_RETRY);
            let _ = self.node.connect(false);
        }
        self.publish(permit);
    }

    /// The link is down, but not yet for [`LINK_SETTLE`].
    fn link_settling(&self, now: Instant) -> bool {
        self.disconnected_since.is_some_and(|t| now.duration_since(t) < LINK_SETTLE)
    }

    fn situation<'a>(
        &'a self,
        status: &Status,
        now: Instant,
        permit: Permit,
        me: &'a str,
        peer: &'a str,
    ) -> Situation<'a> {
        Situation {
            me,
            peer,
            role: status.role,
            disk: status.disk,
            connected: status.connection == ConnState::Connected,
            peer_role: status.peer.role,
            peer_disk: status.peer.disk,
            resyncing: matches!(status.replication, ReplState::SyncSource | ReplState::SyncTarget),
            preferred: &self.ha.preferred_nodes,
            failback: self.ha.failback,
            on_quorum_loss: self.ha.on_quorum_loss,
            permit,
            witness: self.witness.is_some(),
            services_failed: self.chain.failures() >= self.ha.migration_threshold,
            unserved_too_long: self.ready_since.is_some_and(|t| now.duration_since(t) >= PROMOTE_GRACE),
            yielding: self.node.yielding(),
            peer_seen: self.peer_seen,
            alone_for: self.disconnected_since.map_or(Duration::ZERO, |t| now.duration_since(t)),
            peer_was_lost: self.peer_lost_as_primary,
        }
    }

    /// For `down`: stop the services, step down, and act no more.
    async fn release(&mut self) {
        if self.released {
            return;
        }
        // The lease is kept until the node is Secondary: stopping the chain still writes (the
        // unmount's flush), and without its peer only the lease lets those writes through.
        if let Err(e) = self.chain.stop_all().await {
            error!("down: stopping the services: {e}");
        }
        if let Err(e) = self.node.demote().await {
            warn!("down: demotion refused ({e}); forcing it");
            let _ = self.node.demote_forced().await;
        }
        if let Some(w) = &self.witness {
            w.want.store(false, Ordering::Release);
        }
        self.released = true;
        self.last_action = Some("released for down".into());
        self.node.released();
    }

    /// May this node act without its peer? `wants`: it is Primary or would promote with a
    /// permit; a node that would not is given none (and shoots nobody).
    async fn permit(&mut self, status: &Status, connected: bool, now: Instant, wants: bool) -> Permit {
        if let Some(w) = &self.witness {
            let view = w.view.lock().expect("lease view lock");
            // Without the peer, only a lease that outdated the peer lets this node act alone.
            let epoch = self.node.alone_gate().link_epoch();
            let granted = if connected { view.held(now) } else { view.held_alone(now, epoch) };
            return if view.outdated {
                Permit::Outdated
            } else if granted {
                Permit::Granted
            } else {
                Permit::Denied
            };
        }
        if connected {
            return Permit::Granted;
        }
        if let Some(hb) = &self.heartbeat {
            let epoch = self.node.alone_gate().link_epoch();
            if hb.peer_outdated_for(epoch) {
                return Permit::Granted;
            }
            if hb.peer_alive(now).is_some() {
                // Only the interconnect broke. A Primary has its peer outdate itself and then
                // writes on; nobody fences a live peer, and a Secondary does not take over.
                if status.role == Role::Primary {
                    hb.ask_outdate(epoch);
                }
                return Permit::PeerAlive;
            }
        }
        if !wants {
            // It would not take over anyway (its data, or still waiting): no reason to fence.
            return Permit::Denied;
        }
        if let Some(command) = self.ha.fence_peer.clone() {
            // A Secondary fences only after a delay, so that of two nodes cut apart the Primary
            // shoots first and both cannot shoot each other.
            if self.link_settling(now) {
                return Permit::Denied;
            }
            let since = self.disconnected_since.unwrap_or(now);
            if status.role != Role::Primary && now.duration_since(since) < SECONDARY_FENCE_DELAY {
                return Permit::Denied;
            }
            if self.fenced.is_none() {
                self.fenced = Some(self.fence(&command, status.disk == DiskState::UpToDate).await);
            }
            return self.fenced.unwrap_or(Permit::Denied);
        }
        match self.ha.no_quorum_policy {
            NoQuorumPolicy::Ignore => Permit::Granted,
            NoQuorumPolicy::Stop => Permit::Denied,
        }
    }

    async fn fence(&mut self, command: &str, up_to_date: bool) -> Permit {
        info!(command, "fencing the peer");
        let out = self.shell(command).kill_on_drop(true).status().await;
        let code = out.ok().and_then(|s| s.code());
        let outcome = fence::outcome(code);
        let permit = fence::permit(outcome, up_to_date);
        info!(?code, ?outcome, ?permit, "fence-peer ended");
        if outcome == fence::FenceOutcome::PeerFenced {
            self.node.peer_fenced();
        }
        if permit == Permit::Denied {
            // Tried again at the next step after a pause, not in a tight loop.
            self.retry_at = Some(Instant::now() + RETRY_DELAY);
            self.fenced = None;
            tokio::time::sleep(RETRY_DELAY).await;
        }
        permit
    }

    /// Writes the peer lacks are answered only while this node may write without it.
    fn set_gate(&self, role: Role, connected: bool, permit: Permit) {
        let gate = self.node.alone_gate();
        let fail = self.ha.on_quorum_loss == OnQuorumLoss::FailIo;
        let before = gate.verdict();
        match (&self.witness, permit) {
            // Without a witness and without fencing, nobody promotes automatically: DRBD's way.
            (None, _) if self.ha.fence_peer.is_none() => gate.allow_always(),
            (None, Permit::Granted) => gate.allow_always(),
            (None, _) => gate.deny(fail),
            (Some(w), _) => {
                let view = w.view.lock().expect("lease view lock");
                match view.alone_until().filter(|_| !view.outdated) {
                    Some((until, epoch)) => gate.allow_until(until, epoch, fail),
                    None => gate.deny(fail),
                }
            }
        }
        // Connected as the Primary, the node opened the gate for this link when it connected
        // (`run_sender`); a `deny` above closed it again, so it is opened anew. (The device
        // closes it the moment the link dies.)
        if connected && role == Role::Primary {
            self.node.open_alone_gate_while_connected();
        }
        let after = gate.verdict();
        if after != before {
            if role == Role::Primary && !connected {
                info!(?before, ?after, "writes without the peer: gate changed");
            }
            self.node.wake_parked();
        }
    }

    async fn promote(&mut self) {
        info!("supervisor: promoting");
        if let Err(e) = self.node.promote().await {
            warn!("supervisor: promotion refused: {e}");
            self.retry_at = Some(Instant::now() + RETRY_DELAY);
            return;
        }
        self.last_action = Some("promoted".into());
        self.last_monitor = Instant::now();
        if let Err(e) = self.chain.start_all().await {
            warn!("supervisor: services did not start ({e}); demoting");
            self.last_action = Some(format!("services failed to start: {e}"));
            if let Err(e) = self.node.demote().await {
                error!("supervisor: demotion after failed services: {e}");
            }
            self.retry_at = Some(Instant::now() + RETRY_DELAY);
        }
    }

    async fn demote(&mut self, reason: &str, forced: bool) {
        info!(reason, forced, "supervisor: demoting");
        let stopped = self.chain.stop_all().await;
        let demoted = if forced {
            self.node.demote_forced().await
        } else {
            match &stopped {
                Ok(()) => self.node.demote().await,
                Err(e) => Err(crate::node::NodeError::Refused(e.clone())),
            }
        };
        match demoted {
            Ok(()) => self.last_action = Some(format!("demoted: {reason}")),
            Err(e) => {
                error!("supervisor: cannot demote ({reason}): {e}");
                self.last_action = Some(format!("demotion failed: {e}"));
                self.retry_at = Some(Instant::now() + RETRY_DELAY);
                self.escalate().await;
            }
        }
    }

    /// A Primary that cannot step down must not go on writing while the peer takes over.
    async fn escalate(&self) {
        let command = match self.ha.on_demote_failure {
            OnDemoteFailure::Stay => return,
            OnDemoteFailure::Reboot => "reboot -f",
            OnDemoteFailure::Poweroff => "poweroff -f",
        };
        error!(command, "on-demote-failure");
        if let Err(e) = self.shell(command).status().await {
            error!(command, "on-demote-failure: cannot run it: {e}");
        }
    }

    /// `command` run by the shell, told which resource and nodes it is about.
    fn shell(&self, command: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(command)
            .env("RDBD_RESOURCE", self.node.resource())
            .env("RDBD_NODE", &self.node.me().name)
            .env("RDBD_PEER", &self.node.peer().name)
            .env("RDBD_PEER_ADDRESS", &self.node.peer().address);
        cmd
    }

    fn publish(&mut self, permit: Permit) {
        let services = self.chain.status();
        for s in &services {
            let before = self.last_services.iter().find(|b| b.service == s.service);
            if before.is_none_or(|b| b.state != s.state || b.failures != s.failures) {
                self.node.service_changed(s.service.clone(), s.state, s.failures);
            }
        }
        self.last_services = services;
        let (lease_holder, witness_reachable) = match &self.witness {
            Some(w) => {
                let view = w.view.lock().expect("lease view lock");
                (Some(view.holder.clone()), Some(view.witness_reachable))
            }
            None => (None, None),
        };
        let status = HaStatus {
            permit: format!("{permit:?}"),
            lease_holder,
            witness_reachable,
            services: self.chain.status(),
            last_action: self.last_action.clone(),
            warning: self.warning.clone(),
            heartbeat: self
                .heartbeat
                .as_ref()
                .map(|h| h.status(Instant::now(), self.node.alone_gate().link_epoch())),
        };
        self.node.publish(status);
    }
}
