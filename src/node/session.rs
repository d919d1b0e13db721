//! The connection to the peer: connect (the lower node name dials, the other listens), the sync
//! handshake (decision, bitmap exchange, SyncUuid), then replication until the link ends, and
//! again. A role change renegotiates by reconnecting, so each connection has one fixed sender
//! of application writes (SPEC §4).
//!
//! Which side runs what on a connection:
//! - the sender (the Primary; with no Primary, the sync source; else the dialer) runs the
//!   [`PeerLink`](crate::replication::peer::PeerLink) and answers resync requests;
//! - the receiver runs the [`Applier`], which also pulls the resync as sync target.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rdbd_protocol::repl::{self, state_flags, Message, Params, RefuseCode, State};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::event_stream::{EventKind, EventObject};
use super::events::NodeEvents;
use super::handlers::HandlerEvent;
use super::{random_u64, Node, NodeState, Promoting};
use crate::config::AfterSb0Pri;
use crate::metadata::superblock::flags;
use crate::replication::apply::{Applier, ApplyError};
use crate::replication::connection_plan::{Plan, Planned, Settings, SplitBrainFound};
use crate::replication::link::connect::{dial, dials, listen, Established};
use crate::replication::link::framed::FrameError;
use crate::replication::link::handshake::{HandshakeError, Identity};
use crate::replication::peer::LinkOptions;
use crate::replication::promotion::{self, Wishes};
use crate::replication::resync::bitmap_exchange::BitmapExchangeError;
use crate::replication::resync::setup::{self, SetupError, SetupNode};
use crate::replication::resync::source::{self, SourceOptions};
use crate::replication::states::{ConnState, DiskState, ReplState, Role};
use crate::replication::sync_decision::{apply_skip_initial_sync, SideView};

/// This node's State as sent at the handshake and at the end of a resync.
pub fn local_state(node: &Node) -> State {
    state_of(node, &node.state())
}

/// The State for the handshake, taken as it is sent: an alone promotion under way is waited
/// for, and a promotion asked of the peer goes out as PROMOTE_REQUEST. From here on, until the
/// attempt or the connection ends, a promotion is asked of the peer.
fn handshake_state(node: &Node) -> Option<State> {
    let mut s = node.state();
    if s.promoting == Promoting::Alone {
        return None;
    }
    s.state_sent = true;
    s.in_touch_until = None;
    s.request_sent = s.promoting == Promoting::WithPeer;
    let mut state = state_of(node, &s);
    if s.request_sent {
        state.flags |= state_flags::PROMOTE_REQUEST;
    }
    Some(state)
}

/// Read under the node's state lock (the superblock's lock is taken inside it).
fn state_of(node: &Node, s: &NodeState) -> State {
    let sb = node.superblock();
    let mut f = 0;
    if sb.has(flags::CONSISTENT) {
        f |= state_flags::CONSISTENT;
    }
    if s.role == Role::Primary {
        f |= state_flags::WAS_PRIMARY;
    }
    if sb.has(flags::CRASHED_PRIMARY) {
        f |= state_flags::CRASHED_PRIMARY;
    }
    if sb.has(flags::UP_TO_DATE) {
        f |= state_flags::WAS_UP_TO_DATE;
    }
    if s.skip_initial_sync {
        f |= state_flags::SKIP_INITIAL_SYNC;
    }
    State {
        role: s.role,
        disk: s.disk,
        flags: f,
        generations: sb.generations,
        dirty_blocks: node.device.out_of_sync_blocks(),
    }
}

/// `after-sb-0pri` as sent in Params. A named node is sent as its position (dialer or listener,
/// SPEC §3), which both nodes derive alike from the two names.
fn wire_after_sb_0pri(policy: &AfterSb0Pri, me: &str, peer: &str) -> repl::AfterSb0 {
    match policy {
        AfterSb0Pri::Disconnect => repl::AfterSb0::Disconnect,
        AfterSb0Pri::DiscardYoungerPrimary => repl::AfterSb0::DiscardYoungerPrimary,
        AfterSb0Pri::DiscardOlderPrimary => repl::AfterSb0::DiscardOlderPrimary,
        AfterSb0Pri::DiscardZeroChanges => repl::AfterSb0::DiscardZeroChanges,
        AfterSb0Pri::DiscardLeastChanges => repl::AfterSb0::DiscardLeastChanges,
        AfterSb0Pri::DiscardNode(name) => {
            let dialer = if dials(me, peer) { me } else { peer };
            if name.as_str() == dialer {
                repl::AfterSb0::DiscardDialer
            } else {
                repl::AfterSb0::DiscardListener
            }
        }
    }
}

fn params(node: &Node) -> Params {
    let net = &node.config.net;
    Params {
        protocol: node.config.protocol,
        device_size: node.device.info_size(),
        bitmap_block: node.device.bitmap_block(),
        data_integrity: net.data_integrity,
        discard_my_data: node.state().discard_my_data,
        csums_alg: net.csums_alg,
        verify_alg: net.verify_alg,
        after_sb_0pri: wire_after_sb_0pri(&net.after_sb_0pri, &node.me().name, &node.peer_config().name),
        after_sb_1pri: net.after_sb_1pri,
        after_sb_2pri: net.after_sb_2pri,
    }
}

/// How this node answers resync requests and verifies as the connection's sender.
fn source_options(node: &Node) -> SourceOptions {
    let net = &node.config.net;
    SourceOptions { pace: node.config.disk.resync, csums: net.csums_alg, verify_alg: net.verify_alg }
}

/// The digest this resync's requests carry as target: `csums-alg` when set, and with
/// `csums-after-crash-only` only for the resync after a Primary crash (rules 40/41).
fn resync_csums(node: &Node, rule: u32) -> Option<repl::DigestAlg> {
    use crate::replication::sync_decision::rules;
    let net = &node.config.net;
    let after_crash = matches!(rule, rules::CRASHED_PRIMARY | rules::CRASHED_PRIMARY_NOW_PRIMARY);
    net.csums_alg.filter(|_| !net.csums_after_crash_only || after_crash)
}

fn link_options(node: &Node) -> LinkOptions {
    let net = &node.config.net;
    let mut options = LinkOptions::new(node.config.protocol, net.data_integrity);
    options.ping_interval = net.ping_interval;
    options.ping_timeout = net.ping_timeout;
    options
}

/// The Disconnect reason of a connection closed to be made again (a role change, a promotion
/// request to carry): the peer stays in touch meanwhile.
const RENEGOTIATING: &str = "renegotiating after a role change";

/// The Disconnect reason of `rdbd disconnect`: the peer is not in touch any more.
const DISCONNECTING: &str = "disconnected by the operator";

/// How the connection ended.
enum Outcome {
    /// Lost or closed: try again.
    Retry,
    /// Closed by either side to be made again at once (SPEC §4.7): until the next handshake,
    /// for a while, a promotion here is asked of the peer, not made alone.
    Renegotiate,
    /// Refused for a reason retrying cannot fix: StandAlone until `connect`.
    StandAlone(String),
    /// Refused for now (rr-conflict retry-connect, a Diskless Secondary): the reason goes to
    /// status, and the next attempt waits `connect-interval` (or a role change, or `attach`),
    /// so refusals do not spin. The peer's disk state as the handshake showed it.
    RetryLater(String, DiskState),
}

/// Connects, runs and reconnects until the node shuts down.
pub async fn run(node: Arc<Node>) {
    let me = node.me().clone();
    let peer = node.peer_config().clone();
    let dialer = dials(&me.name, &peer.name);
    // The listener is bound lazily and again after a failure (the address may be in use for a
    // while, e.g. by a previous instance).
    let mut listener: Option<TcpListener> = None;
    let mut backoff = Duration::from_millis(50);
    loop {
        if node.shutdown.is_cancelled() {
            break;
        }
        if !dialer && listener.is_none() && node.state().want_connection {
            match TcpListener::bind(&me.address).await {
                Ok(l) => listener = Some(l),
                Err(e) => {
                    let message = format!("cannot listen on {}: {e}", me.address);
                    warn!("{message}");
                    node.state().last_error = Some(message);
                    tokio::select! {
                        _ = node.shutdown.cancelled() => break,
                        _ = node.renegotiate.notified() => {}
                        _ = tokio::time::sleep(node.config.net.connect_interval) => {}
                    }
                    continue;
                }
            }
        }
        if !node.state().want_connection {
            node.state().conn = ConnState::StandAlone;
            tokio::select! {
                _ = node.shutdown.cancelled() => break,
                _ = node.renegotiate.notified() => continue,
            }
        }
        node.state().conn = ConnState::Connecting;
        let secret = node.config.net.shared_secret.clone();
        let id = Identity {
            resource: &node.config.name,
            local_node: &me.name,
            peer_node: &peer.name,
            secret: secret.as_deref().map(str::as_bytes),
            step_timeout: node.config.net.timeout.max(Duration::from_secs(1)),
        };
        let params = params(&node);
        let attempt = async {
            let state = || handshake_state(&node);
            match &listener {
                Some(l) => {
                    // A stranger (or a misconfigured peer) is refused and logged; we keep
                    // waiting for the real peer, and status shows the last refusal.
                    let mut rejected = |e: &HandshakeError| node.state().last_error = Some(e.to_string());
                    listen(l, &id, params, state, &mut rejected).await
                }
                None => {
                    let addr = resolve(&peer.address).await?;
                    dial(addr, &id, params, state).await
                }
            }
        };
        let established = tokio::select! {
            _ = node.shutdown.cancelled() => break,
            _ = node.renegotiate.notified() => {
                handshake_over(&node);
                continue;
            }
            result = attempt => result,
        };
        if established.is_err() {
            handshake_over(&node);
        }
        match established {
            Ok(est) => {
                backoff = Duration::from_millis(50);
                info!(peer = %peer.name, "connected");
                node.state().last_error = None;
                let outcome = session(&node, est, params.discard_my_data, dialer).await;
                end_session(&node);
                match outcome {
                    Outcome::Retry => {}
                    Outcome::Renegotiate => {
                        // Both sides connect again at once; the handshake's own time limit bounds
                        // how long the peer counts as in touch if it does not.
                        let mut s = node.state();
                        if s.want_connection {
                            s.in_touch_until = Some(std::time::Instant::now() + node.config.net.timeout);
                        }
                    }
                    Outcome::StandAlone(message) => set_standalone(&node, message),
                    Outcome::RetryLater(message, peer_disk) => {
                        {
                            let mut s = node.state();
                            s.last_error = Some(message);
                            s.peer_disk = peer_disk;
                        }
                        tokio::select! {
                            _ = node.shutdown.cancelled() => break,
                            _ = node.renegotiate.notified() => {}
                            _ = tokio::time::sleep(node.config.net.connect_interval) => {}
                        }
                    }
                }
            }
            Err(e @ (HandshakeError::Refused { .. } | HandshakeError::RefusedByPeer { .. })) => {
                warn!("connection refused: {e}");
                set_standalone(&node, e.to_string());
            }
            Err(e) => {
                tracing::debug!("connecting to {} failed: {e}", peer.name);
                {
                    let mut s = node.state();
                    s.last_error = Some(e.to_string());
                    if !matches!(e, HandshakeError::NotNow) {
                        // Not in touch: a promotion from now on goes alone (one asked already
                        // waits for the next handshake, or its time limit).
                        s.in_touch_until = None;
                    }
                }
                tokio::select! {
                    _ = node.shutdown.cancelled() => break,
                    _ = node.renegotiate.notified() => {}
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(node.config.net.connect_interval);
            }
        }
    }
    end_session(&node);
}

async fn resolve(address: &str) -> Result<SocketAddr, HandshakeError> {
    let mut addrs = tokio::net::lookup_host(address).await.map_err(FrameError::Io)?;
    addrs.next().ok_or_else(|| {
        let missing =
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("{address} does not resolve"));
        FrameError::Io(missing).into()
    })
}

fn set_standalone(node: &Node, message: String) {
    let asking = {
        let mut s = node.state();
        s.want_connection = false;
        s.conn = ConnState::StandAlone;
        s.last_error = Some(message.clone());
        s.promoting == Promoting::WithPeer
    };
    if asking {
        // No handshake will carry the request: its `promote` hears why now.
        if let Some(answer) = node.promotion_verdict.lock().expect("promotion lock").take() {
            let _ = answer.send(Err(promotion::Refusal::NotConnected(message)));
        }
    }
}

/// The attempt or the connection ended: a promotion asked from now on goes alone unless the next
/// State goes out first. One asked in it that got no verdict stays asked: the next handshake
/// carries it again (the peer decided nothing it keeps: a verdict lasts as long as its
/// connection), and `promote` gives up after its time limit.
fn handshake_over(node: &Node) {
    let mut s = node.state();
    s.state_sent = false;
    s.request_sent = false;
}

/// The link is gone: forget the peer's state, keep what the bitmap learned, and, as Primary (or
/// demoted with writes the peer lost), start a generation of its own so the peer is
/// recognisably behind.
fn end_session(node: &Node) {
    handshake_over(node);
    *node.verify_starts.lock().expect("verify lock") = None;
    node.verify_interrupted();
    let on_disk = super::disk_from_flags(&node.superblock());
    {
        let mut s = node.state();
        if s.repl == ReplState::WFBitMapT
            && s.disk == DiskState::Inconsistent
            && node.device.health().usable()
        {
            // The resync never started: the data is as it was, and so is its disk state.
            s.disk = on_disk;
        }
        s.link = None;
        s.peer_role = Role::Unknown;
        s.peer_disk = DiskState::DUnknown;
        s.repl = ReplState::Off;
        if s.conn != ConnState::StandAlone {
            s.conn = ConnState::Connecting;
        }
    }
    node.device.clear_peer();
    node.device.set_sole_copy(false);
    node.device.release_writes();
    let peer_lost_writes = node.device.take_lost_writes();
    if let Err(e) =
        node.new_generation_without_peer(peer_lost_writes).and_then(|()| node.persist_bitmap(false))
    {
        warn!("cannot write metadata after losing the peer: {e}");
    }
}

/// Closes a connection just established, to make it again at once.
async fn renegotiate(est: &mut Established) -> Outcome {
    let _ = est.data.send(&Message::Disconnect { reason: RENEGOTIATING }).await;
    Outcome::Renegotiate
}

/// The handshake's verdict on this node's promotion request, carried out and told to the
/// waiting `promote`: `Ok(true)` this node is Primary now; `Err` granted, but nobody waits for
/// it any more (the request was withdrawn), so the connection must not go on as if it were.
fn settle_promotion(node: &Node, verdict: Result<(), promotion::Refusal>) -> Result<bool, ()> {
    node.state().request_sent = false;
    let answer = node.promotion_verdict.lock().expect("promotion lock").take();
    let Some(answer) = answer else {
        return if verdict.is_ok() { Err(()) } else { Ok(false) };
    };
    if let Err(refusal) = verdict {
        info!("promotion refused: {}", refusal.describe(&node.peer_config().name));
        let _ = answer.send(Err(refusal));
        return Ok(false);
    }
    if let Err(e) = node.persist(|sb| sb.set(flags::PRIMARY, true)) {
        warn!("cannot write metadata for the promotion: {e}");
        return Err(());
    }
    node.state().role = Role::Primary;
    if answer.send(Ok(())).is_err() {
        // `promote` gave up at this very moment: not Primary after all.
        let _ = node.persist(|sb| sb.set(flags::PRIMARY, false));
        node.state().role = Role::Secondary;
        return Err(());
    }
    Ok(true)
}

fn view(state: &State, params_discard: bool, dialer: bool) -> SideView {
    SideView {
        gens: state.generations,
        role: state.role,
        disk: state.disk,
        crashed_primary: state.flags & state_flags::CRASHED_PRIMARY != 0,
        dirty_blocks: state.dirty_blocks,
        discard_my_data: params_discard,
        // The dialer holds DRBD's "resolve conflicts" role (SPEC §4.4).
        node_id: if dialer { 0 } else { 1 },
    }
}

/// How long a refusing node keeps reading after its Refuse (see [`send_refuse`]).
const REFUSE_LINGER: Duration = Duration::from_secs(1);

/// Refuses on the data channel and goes StandAlone. The peer mostly reaches the same decision;
/// when it cannot know (a losing Primary's NBD clients), it reads the Refuse instead of a
/// bitmap and goes StandAlone too.
async fn refuse(est: &mut Established, code: RefuseCode, message: String) -> Outcome {
    send_refuse(est, code, &message).await;
    Outcome::StandAlone(message)
}

/// Sends Refuse, then reads (and drops) what the peer still sends until it closes or refuses
/// too, for a moment: closing with unread data resets the connection, and a reset can discard
/// the Refuse before the peer has read it.
async fn send_refuse(est: &mut Established, code: RefuseCode, message: &str) {
    warn!("{message}");
    let _ = est.data.send(&Message::Refuse { code, message }).await;
    let _ = tokio::time::timeout(REFUSE_LINGER, async {
        while let Ok(m) = est.data.recv().await {
            if matches!(m, Message::Refuse { .. }) {
                break;
            }
        }
    })
    .await;
}

/// A split brain the plan found: an event for `rdbd events` and the `split-brain` handler,
/// resolved by a policy or not.
fn report_split_brain(node: &Arc<Node>, found: &SplitBrainFound) {
    let them = node.peer_config().name.clone();
    node.emit_event(
        EventKind::Detected,
        EventObject::SplitBrain { peer: them, detail: found.detail.clone() },
    );
    // DRBD 8.4 runs `split-brain` only for a split brain it leaves unresolved, and
    // `initial-split-brain` (which rdbd does not have) for every one. rdbd's one handler runs for
    // every split brain: a resolution by policy discards one node's changes, which the operator
    // needs to hear about as much.
    node.spawn_handler(HandlerEvent::SplitBrain, Vec::new());
    if let Some(r) = &found.resolution {
        // Names nodes, not "local" and "peer": both logs read the same.
        let loser = if r.local_loses() { &node.me().name } else { &node.peer_config().name };
        warn!("split brain resolved by {}: {loser}'s changes are discarded ({})", r.policy, r.reason);
    }
}

/// One established connection: the sync decision, then replication until the link ends.
/// `discard` is the discard-my-data flag this node sent in the handshake: the decision must use
/// exactly what the peer saw (and `est.sent`, the State), or the two nodes could decide
/// differently.
async fn session(node: &Arc<Node>, mut est: Established, discard: bool, dialer: bool) -> Outcome {
    let sent = est.sent;
    let wishes = Wishes {
        local: sent.flags & state_flags::PROMOTE_REQUEST != 0,
        peer: est.peer.state.flags & state_flags::PROMOTE_REQUEST != 0,
    };
    if node.state().promoting == Promoting::WithPeer && !wishes.local {
        // Asked after this node's State went out: the next handshake carries the request.
        return renegotiate(&mut est).await;
    }
    let mut local = view(&sent, discard, dialer);
    let mut peer = view(&est.peer.state, est.peer.params.discard_my_data, !dialer);
    let adopted = apply_skip_initial_sync(
        &mut local,
        &mut peer,
        sent.flags & state_flags::SKIP_INITIAL_SYNC != 0,
        est.peer.state.flags & state_flags::SKIP_INITIAL_SYNC != 0,
    );
    if adopted {
        info!("the peer cleared its bitmap on blank disks: adopting its generation, no initial sync");
        let gens = local.gens;
        if let Err(e) = node.persist(|sb| {
            sb.generations = gens;
            super::set_disk_flags(sb, DiskState::UpToDate);
        }) {
            return Outcome::StandAlone(format!("cannot write metadata: {e}"));
        }
        node.device.with_tracking(|t| {
            let blocks = t.bitmap.blocks();
            t.bitmap.clear(0..blocks);
        });
        node.state().disk = DiskState::UpToDate;
    }
    {
        // Both flags are for one handshake (DRBD clears discard-my-data once it connected).
        let mut s = node.state();
        s.skip_initial_sync = false;
        s.discard_my_data = false;
    }
    let settings = Settings {
        policies: &node.config.net.split_brain_policies(),
        rr_conflict: node.config.net.rr_conflict,
        me: &node.me().name,
        peer: &node.peer_config().name,
        dialer,
        outdated_loses: false,
    };
    let (Planned { plan, split_brain, .. }, verdicts) =
        promotion::at_handshake(&local, &peer, &settings, wishes);
    if let Some(found) = &split_brain {
        report_split_brain(node, found);
    }
    if verdicts.peer_granted() {
        info!("the peer is promoted");
        peer.role = Role::Primary;
    }
    if let Some(verdict) = verdicts.local {
        match settle_promotion(node, verdict) {
            Ok(true) => local.role = Role::Primary,
            Ok(false) => {}
            // The peer counts this node as Primary: the next handshake tells it otherwise.
            Err(()) => return renegotiate(&mut est).await,
        }
    }
    let go = match plan {
        Plan::NoDisk => return diskless_session(node, est, &local, &peer).await,
        Plan::Refuse(refusal) => {
            if refusal.call_pri_lost {
                node.spawn_handler(HandlerEvent::PriLost, Vec::new());
            }
            if refusal.retry {
                send_refuse(&mut est, refusal.code, &refusal.message).await;
                // The operator's discard-my-data stands until a handshake goes through.
                node.state().discard_my_data = discard;
                return Outcome::RetryLater(refusal.message, DiskState::DUnknown);
            }
            return refuse(&mut est, refusal.code, refusal.message).await;
        }
        Plan::Proceed(go) => go,
    };
    let (decision, outcome) = (go.decision, go.decision.outcome);
    info!(outcome = ?outcome, rule = decision.rule, reason = decision.reason, "sync decision");
    if go.give_up_primary {
        if let Err(e) = node.give_up_primary().await {
            let handler = if node.spawn_handler(HandlerEvent::PriLostAfterSb, Vec::new()) {
                "; pri-lost-after-sb handler run"
            } else {
                ""
            };
            let policy = split_brain.and_then(|f| f.resolution).map(|r| r.policy).unwrap_or_default();
            let message = format!(
                "split brain: {policy} discards the changes of the Primary {}, which cannot become Secondary \
                 ({e}){handler}; resolve manually",
                node.me().name
            );
            return refuse(&mut est, RefuseCode::SplitBrain, message).await;
        }
        info!("role: Secondary (this Primary's changes are discarded)");
    }
    let (local, peer) = (SideView { role: go.local_role, ..local }, SideView { role: go.peer_role, ..peer });
    let disks = go.disks;
    let asked_meanwhile = {
        let mut s = node.state();
        // Asked since the check above, while this handshake was deciding: `promote` saw it
        // under way and left it to end in a new one, which carries the request.
        let asked_meanwhile = s.promoting == Promoting::WithPeer && !wishes.local;
        if !asked_meanwhile {
            s.conn = ConnState::Connected;
            // Replicating again: the peer may adopt this generation (a resync, or equal data).
            s.own_generation = false;
            s.peer_role = peer.role;
            s.peer_disk = disks.peer;
            s.repl = match outcome {
                o if o.is_source() => ReplState::WFBitMapS,
                o if o.is_target() => ReplState::WFBitMapT,
                _ => ReplState::Established,
            };
            if outcome.is_target() {
                // Not UpToDate from the decision on (issue 15), in the same change as the state
                // that says so: `status`, the witness, the HA policy and the OCF score never see
                // a sync target UpToDate. On disk it becomes Inconsistent with the SyncUuid, before
                // any resync data is written; a link lost before that puts back the disk state on
                // disk (`end_session`).
                s.disk = DiskState::Inconsistent;
            }
        }
        asked_meanwhile
    };
    if asked_meanwhile {
        return renegotiate(&mut est).await;
    }
    // The peer is heard again: what fencing established about it no longer stands.
    node.set_peer_outdated(false);
    if !outcome.is_target() && disks.local != local.disk {
        if let Err(e) = node.set_disk(disks.local) {
            return Outcome::StandAlone(format!("cannot write metadata: {e}"));
        }
    }
    let sender = go.sender;
    let resyncing = outcome.is_source() || outcome.is_target();
    // The bitmap must not change between its exchange and the start of replication. Writes the
    // quorum gate froze do not count: they are on this disk and marked, only their answers
    // wait (for the gate this connection opens), so they gave their ranges up. A hold that
    // times out goes on all the same: what is still in flight marked its blocks when it
    // started without the peer.
    if sender && !node.device.hold_writes(node.config.net.timeout).await {
        warn!("writes in flight did not finish within {:?} for the bitmap exchange", node.config.net.timeout);
    }
    if resyncing {
        let step = node.config.net.timeout.max(Duration::from_secs(1));
        if let Err(e) = setup::prepare(&node.device, &mut est, outcome, step, node.as_ref()).await {
            node.device.release_writes();
            if let Some(BitmapExchangeError::Refused(message)) = e.downcast_ref() {
                // The peer could not carry out the decision (a losing Primary with NBD
                // clients): StandAlone on both nodes, with the peer's reason.
                let message = format!("{} refused: {message}", node.peer_config().name);
                warn!("{message}");
                return Outcome::StandAlone(message);
            }
            warn!("resync handshake failed: {e}");
            return Outcome::Retry;
        }
    } else if let Err(e) = node.persist(|sb| sb.set(flags::CRASHED_PRIMARY, false)) {
        return Outcome::StandAlone(format!("cannot write metadata: {e}"));
    }
    if sender {
        run_sender(node, est, outcome.is_source()).await
    } else {
        let csums = outcome.is_target().then(|| resync_csums(node, decision.rule)).flatten();
        run_receiver(node, est, outcome.is_target(), csums).await
    }
}

/// A side of the handshake has no disk (Diskless). A Diskless Primary with an UpToDate peer
/// goes on through it: it sends every request, reads included, and the peer, now the only copy,
/// marks what it writes for the Primary's disk to resync once attached again (DRBD's diskless
/// mode). Otherwise there is nothing to replicate: both nodes try again every connect-interval,
/// status naming the disk, until `rdbd attach` there.
async fn diskless_session(node: &Arc<Node>, est: Established, local: &SideView, peer: &SideView) -> Outcome {
    let served_through = |diskless: &SideView, other: &SideView| {
        diskless.role == Role::Primary && !diskless.disk.has_disk() && other.disk == DiskState::UpToDate
    };
    let (me, them) = (&node.me().name, &node.peer_config().name);
    if !served_through(local, peer) && !served_through(peer, local) {
        let (who, disk) = if local.disk.has_disk() { (them, peer.disk) } else { (me, local.disk) };
        let message = format!("{who}'s disk is {disk}: nothing to replicate until `rdbd attach` on {who}");
        info!("{message}");
        return Outcome::RetryLater(message, peer.disk);
    }
    {
        let mut s = node.state();
        s.conn = ConnState::Connected;
        s.repl = ReplState::Established;
        s.peer_role = peer.role;
        s.peer_disk = peer.disk;
    }
    if local.role == Role::Primary {
        info!("Diskless Primary: serving through {them}");
        run_sender(node, est, false).await
    } else {
        node.hold_sole_copy();
        run_receiver(node, est, false, None).await
    }
}

/// The node's part in setting up a resync: its metadata and the state `status` shows.
impl SetupNode for Node {
    fn persist_bitmap(&self) -> Result<(), SetupError> {
        Ok(Node::persist_bitmap(self, true)?)
    }

    fn start_as_source(&self, total: u64) -> Result<u64, SetupError> {
        let gens = self.generations().start_resync_as_source(random_u64());
        self.persist(|sb| sb.generations = gens)?;
        let mut s = self.state();
        s.repl = ReplState::SyncSource;
        s.resync_total = total;
        s.resync_started = Some(std::time::Instant::now());
        s.peer_disk = DiskState::Inconsistent;
        Ok(gens.sync_uuid())
    }

    fn start_as_target(&self, sync_uuid: u64, total: u64) -> Result<(), SetupError> {
        let gens = self.generations().start_resync_as_target(sync_uuid);
        self.persist(|sb| {
            sb.generations = gens;
            super::set_disk_flags(sb, DiskState::Inconsistent);
            sb.set(flags::CRASHED_PRIMARY, false);
        })?;
        let mut s = self.state();
        s.disk = DiskState::Inconsistent;
        s.repl = ReplState::SyncTarget;
        s.resync_total = total;
        s.resync_started = Some(std::time::Instant::now());
        Ok(())
    }
}

/// The sending side: the link carries application writes (and resync data as source).
async fn run_sender(node: &Arc<Node>, est: Established, source: bool) -> Outcome {
    let Established { data, meta, .. } = est;
    let (reader, writer) = data.split();
    let (replies_tx, replies_rx) = if source {
        let (tx, rx) = mpsc::unbounded_channel();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let link = node.device.connect_peer(writer, meta, link_options(node), replies_tx);
    let (verify_tx, verify_rx) = mpsc::unbounded_channel();
    *node.verify_starts.lock().expect("verify lock") = Some(verify_tx);
    node.state().link = Some(link.clone());
    node.device.release_writes();
    // Connected again as the Primary: what the last link lost went out marked in the bitmap, and
    // a sync target is not promoted before it has it all, so requests held at the quorum gate
    // are answered now. The node does it, not the supervisor, whose step may be waiting on such
    // a request (a read of `vgchange` after a promotion renegotiated the link).
    if node.state().role == Role::Primary && node.device.open_alone_gate_while_connected() {
        node.device.wake_parked();
    }
    let events = Box::new(NodeEvents(node.clone()));
    let served = source::serve(
        node.device.clone(),
        link.clone(),
        reader,
        replies_rx,
        verify_rx,
        source_options(node),
        events,
    );
    tokio::select! {
        result = served => {
            link.disconnect();
            match result {
                Err(source::SourceError::Disconnected(reason)) if reason == RENEGOTIATING => {
                    info!("connection ended: the peer renegotiates");
                    Outcome::Renegotiate
                }
                Err(e) => {
                    info!("connection ended: {e}");
                    Outcome::Retry
                }
                Ok(()) => {
                    info!("connection ended");
                    Outcome::Retry
                }
            }
        }
        _ = node.renegotiate.notified() => {
            link.settle(Duration::from_secs(5)).await;
            if !node.state().want_connection {
                link.close(DISCONNECTING).await;
                return Outcome::Retry;
            }
            link.close(RENEGOTIATING).await;
            Outcome::Renegotiate
        }
        _ = node.shutdown.cancelled() => {
            link.disconnect();
            Outcome::Retry
        }
    }
}

/// The receiving side: apply the peer's writes (and pull the resync as target).
async fn run_receiver(
    node: &Arc<Node>,
    est: Established,
    target: bool,
    csums: Option<repl::DigestAlg>,
) -> Outcome {
    let Established { mut data, mut meta, .. } = est;
    let local = node.device.local().clone();
    let mut applier = match Applier::new(local, node.config.net.data_integrity) {
        Ok(a) => a,
        Err(e) => return Outcome::StandAlone(e.to_string()),
    };
    if target {
        applier = match applier.with_resync(node.device.clone(), node.config.disk.resync, csums) {
            Ok(a) => a,
            Err(e) => return Outcome::StandAlone(e.to_string()),
        };
    }
    let net = &node.config.net;
    let (verify_tx, verify_rx) = mpsc::unbounded_channel();
    *node.verify_starts.lock().expect("verify lock") = Some(verify_tx);
    let mut applier = applier
        .with_tracker(node.device.clone())
        .with_verify(net.verify_alg, node.device.bitmap_block(), verify_rx)
        .with_events(Box::new(NodeEvents(node.clone())))
        .with_silence_limit(net.ping_interval * 2 + net.ping_timeout);
    tokio::select! {
        result = applier.run(&mut data, &mut meta) => match result {
            Err(ApplyError::Disconnected(reason)) if reason == RENEGOTIATING => {
                info!("connection ended: the peer renegotiates");
                return Outcome::Renegotiate;
            }
            Ok(stats) => info!(writes = stats.writes, resync_bytes = stats.resync_bytes, "connection ended"),
            Err(e) => info!("connection ended: {e}"),
        },
        _ = node.renegotiate.notified() => {
            if !node.state().want_connection {
                let _ = data.send(&Message::Disconnect { reason: DISCONNECTING }).await;
                return Outcome::Retry;
            }
            info!("{RENEGOTIATING}");
            let _ = data.send(&Message::Disconnect { reason: RENEGOTIATING }).await;
            return Outcome::Renegotiate;
        }
        _ = node.shutdown.cancelled() => {}
    }
    Outcome::Retry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discard_node_is_sent_as_dialer_or_listener_alike_on_both_nodes() {
        let alpha = AfterSb0Pri::DiscardNode("alpha".into());
        let beta = AfterSb0Pri::DiscardNode("beta".into());
        // "alpha" sorts lower, so it dials; both nodes send the same code for the same name.
        for (me, peer) in [("alpha", "beta"), ("beta", "alpha")] {
            assert_eq!(wire_after_sb_0pri(&alpha, me, peer), repl::AfterSb0::DiscardDialer);
            assert_eq!(wire_after_sb_0pri(&beta, me, peer), repl::AfterSb0::DiscardListener);
        }
        assert_eq!(wire_after_sb_0pri(&AfterSb0Pri::Disconnect, "a", "b"), repl::AfterSb0::Disconnect);
        let least = AfterSb0Pri::DiscardLeastChanges;
        assert_eq!(wire_after_sb_0pri(&least, "a", "b"), repl::AfterSb0::DiscardLeastChanges);
    }
}
