//! The second heartbeat path: signed UDP datagrams to the peer over another address pair
//! (`heartbeat-address`), every ping interval (wire format: protocol/HEARTBEAT.md).
//!
//! It answers one question the replication link cannot: when the link is silent, is the peer
//! dead, or only the interconnect? A peer still heard here is alive, so nobody fences it and a
//! Secondary does not take over. A Primary that lost the link asks the peer over this path to
//! mark its data Outdated, and writes on alone once the peer confirms (DRBD's outdate-peer).
//!
//! Freshness without clocks: every datagram echoes the last (boot, seq) heard from the other
//! side. An outdate request counts only if it echoes one of this node's datagrams of the last
//! few seconds, so a recorded request replayed later is refused.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdbd_protocol::heartbeat::{Datagram, Kind, OutdateResult, MAX_DATAGRAM};
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

pub use crate::node::ha_report::HeartbeatStatus;
use crate::node::handle::NodeHandle;
use crate::node::OutdateRefusal;
use crate::replication::states::{DiskState, Role};

/// How old an echoed datagram of ours may be for an outdate request to count.
const ECHO_MAX_AGE: Duration = Duration::from_secs(5);
/// After a failed bind or send, wait this long before trying again.
const RETRY: Duration = Duration::from_secs(1);

/// What this node last heard from its peer on the heartbeat path.
#[derive(Debug, Clone, Copy)]
struct Heard {
    at: Instant,
    role: Role,
    disk: DiskState,
    connected: bool,
}

/// An outdate request for one disconnection (link epoch) and its answer.
#[derive(Debug, Clone, Copy)]
struct Ask {
    epoch: u64,
    request: u64,
    answer: OutdateResult,
}

#[derive(Default)]
struct State {
    heard: Option<Heard>,
    ask: Option<Ask>,
    /// Why the path does not work (bind failed...), for `status`.
    error: Option<String>,
}

/// Shared between the supervisor and the heartbeat task.
pub struct HeartbeatShared {
    state: Mutex<State>,
    /// A peer older than this is silent: the replication link's own limit.
    silence: Duration,
    /// The supervisor asked for an outdate: send it now, not at the next tick.
    ask_now: Notify,
    /// A datagram changed what the supervisor decides from.
    pub changed: Notify,
}

impl HeartbeatShared {
    pub fn new(silence: Duration) -> Self {
        Self { state: Mutex::default(), silence, ask_now: Notify::new(), changed: Notify::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("heartbeat state lock")
    }

    /// The peer's role if it was heard within the silence limit.
    pub fn peer_alive(&self, now: Instant) -> Option<Role> {
        let heard = self.lock().heard?;
        (now.saturating_duration_since(heard.at) < self.silence).then_some(heard.role)
    }

    /// Asks the peer to outdate itself for the disconnection `epoch`. The task repeats the
    /// request every interval until it is answered; a refusal is asked again at the next call.
    pub fn ask_outdate(&self, epoch: u64) {
        let mut s = self.lock();
        match &mut s.ask {
            Some(a) if a.epoch == epoch => {
                if matches!(a.answer, OutdateResult::None | OutdateResult::Outdated) {
                    return;
                }
                // Refused (the peer still saw the link up, or was being promoted): ask again.
                a.answer = OutdateResult::None;
            }
            _ => s.ask = Some(Ask { epoch, request: random_nonzero(), answer: OutdateResult::None }),
        }
        drop(s);
        self.ask_now.notify_one();
    }

    /// Whether the peer confirmed it is Outdated for the disconnection `epoch`.
    pub fn peer_outdated_for(&self, epoch: u64) -> bool {
        self.lock().ask.is_some_and(|a| a.epoch == epoch && a.answer == OutdateResult::Outdated)
    }

    pub fn status(&self, now: Instant, epoch: u64) -> HeartbeatStatus {
        let s = self.lock();
        let age = s.heard.map(|h| now.saturating_duration_since(h.at));
        HeartbeatStatus {
            peer_alive: age.is_some_and(|a| a < self.silence),
            last_heard_ms: age.map(|a| a.as_millis() as u64),
            peer_role: s.heard.map_or(Role::Unknown, |h| h.role),
            peer_disk: s.heard.map_or(DiskState::DUnknown, |h| h.disk),
            peer_outdated: s.ask.is_some_and(|a| a.epoch == epoch && a.answer == OutdateResult::Outdated),
            error: s.error.clone(),
        }
    }
}

fn random_nonzero() -> u64 {
    let mut bytes = [0u8; 8];
    let _ = rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty());
    u64::from_le_bytes(bytes) | 1
}

/// The datagrams this node sent lately, to check what a request echoes.
struct SentLog {
    boot: u64,
    sent: VecDeque<(u64, Instant)>,
}

impl SentLog {
    /// Whether (boot, seq) names a datagram this run sent within `max_age`.
    fn is_recent(&self, boot: u64, seq: u64, now: Instant, max_age: Duration) -> bool {
        boot == self.boot
            && self.sent.iter().any(|&(s, at)| s == seq && now.saturating_duration_since(at) <= max_age)
    }

    fn record(&mut self, seq: u64, now: Instant, max_age: Duration) {
        self.sent.push_back((seq, now));
        while self.sent.front().is_some_and(|&(_, at)| now.saturating_duration_since(at) > max_age) {
            self.sent.pop_front();
        }
    }
}

/// The newest (boot, seq) heard from the peer: older or repeated datagrams are ignored.
#[derive(Default)]
struct PeerSeq {
    last: Option<(u64, u64)>,
}

impl PeerSeq {
    /// Accepts a datagram that is newer than the last one of the same run, or from another run.
    fn accept(&mut self, boot: u64, seq: u64) -> bool {
        match self.last {
            Some((b, s)) if b == boot && seq <= s => false,
            _ => {
                self.last = Some((boot, seq));
                true
            }
        }
    }
}

/// What the receiver answers to an outdate request.
fn outdate_answer(fresh: bool, outcome: impl FnOnce() -> Result<(), OutdateRefusal>) -> OutdateResult {
    if !fresh {
        return OutdateResult::RefusedStale;
    }
    match outcome() {
        Ok(()) => OutdateResult::Outdated,
        Err(OutdateRefusal::Primary) => OutdateResult::RefusedPrimary,
        Err(OutdateRefusal::Connected) => OutdateResult::RefusedConnected,
        Err(OutdateRefusal::Metadata(_)) => OutdateResult::Failed,
    }
}

struct Task {
    node: NodeHandle,
    shared: Arc<HeartbeatShared>,
    secret: Vec<u8>,
    resource: String,
    me: String,
    peer: String,
    peer_address: String,
    log: SentLog,
    seq: u64,
    peer_seq: PeerSeq,
    /// Dropped datagrams since the last report (bad MAC, garbage, replays).
    dropped: u64,
}

/// Runs until the node stops. `interval`: how often a beat goes out.
pub async fn run(node: NodeHandle, shared: Arc<HeartbeatShared>, interval: Duration) {
    let (Some(local), Some(peer_address)) =
        (node.me().heartbeat_address.clone(), node.peer().heartbeat_address.clone())
    else {
        return;
    };
    let Some(secret) = node.net().shared_secret.clone() else {
        return;
    };
    let shutdown = node.shutdown_token();
    let socket = loop {
        match UdpSocket::bind(&local).await {
            Ok(s) => break s,
            Err(e) => {
                let message = format!("cannot bind the heartbeat address {local}: {e}");
                if shared.lock().error.replace(message.clone()).is_none() {
                    warn!("{message}");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    };
    shared.lock().error = None;
    info!(local, peer = peer_address, "heartbeat path up");
    let mut task = Task {
        resource: node.resource().to_string(),
        me: node.me().name.clone(),
        peer: node.peer().name.clone(),
        node,
        shared,
        secret: secret.into_bytes(),
        peer_address,
        log: SentLog { boot: random_nonzero(), sent: VecDeque::new() },
        seq: 0,
        peer_seq: PeerSeq::default(),
        dropped: 0,
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let mut echo = (0u64, 0u64);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => task.send_beat_or_ask(&socket, echo).await,
            _ = task.shared.ask_now.notified() => task.send_beat_or_ask(&socket, echo).await,
            received = socket.recv_from(&mut buf) => match received {
                Ok((len, from)) => {
                    if let Some(heard) = task.receive(&socket, &buf[..len], from).await {
                        echo = heard;
                    }
                }
                Err(e) => debug!("heartbeat receive: {e}"),
            },
        }
    }
}

impl Task {
    fn datagram(&mut self, kind: Kind, echo: (u64, u64), request: u64, result: OutdateResult) -> Vec<u8> {
        let (role, disk, connected) = self.node.local_view();
        self.seq += 1;
        self.log.record(self.seq, Instant::now(), ECHO_MAX_AGE);
        Datagram {
            kind,
            boot: self.log.boot,
            seq: self.seq,
            echo_boot: echo.0,
            echo_seq: echo.1,
            role,
            disk,
            connected,
            request,
            result,
            resource: self.resource.clone(),
            node: self.me.clone(),
        }
        .encode(&self.secret)
    }

    async fn send(&self, socket: &UdpSocket, bytes: &[u8], to: Option<SocketAddr>) {
        let sent = match to {
            Some(addr) => socket.send_to(bytes, addr).await,
            None => socket.send_to(bytes, self.peer_address.as_str()).await,
        };
        if let Err(e) = sent {
            // The path is down: that is what silence on it means, nothing to report each time.
            debug!("heartbeat send: {e}");
        }
    }

    /// A beat, or the pending outdate request (which carries the same state as a beat).
    async fn send_beat_or_ask(&mut self, socket: &UdpSocket, echo: (u64, u64)) {
        let pending = self.shared.lock().ask.filter(|a| a.answer == OutdateResult::None);
        let bytes = match pending {
            Some(ask) => self.datagram(Kind::OutdateRequest, echo, ask.request, OutdateResult::None),
            None => self.datagram(Kind::Beat, echo, 0, OutdateResult::None),
        };
        self.send(socket, &bytes, None).await;
    }

    /// Handles one datagram; returns the (boot, seq) to echo from now on if it was valid.
    async fn receive(&mut self, socket: &UdpSocket, bytes: &[u8], from: SocketAddr) -> Option<(u64, u64)> {
        let d = match Datagram::decode(bytes, &self.secret) {
            Ok(d) if d.resource == self.resource && d.node == self.peer => d,
            Ok(d) => {
                self.drop_datagram(from, &format!("from {:?} of resource {:?}", d.node, d.resource));
                return None;
            }
            Err(e) => {
                self.drop_datagram(from, &e.to_string());
                return None;
            }
        };
        if !self.peer_seq.accept(d.boot, d.seq) {
            self.drop_datagram(from, "old or repeated");
            return None;
        }
        let now = Instant::now();
        let heard = Heard { at: now, role: d.role, disk: d.disk, connected: d.connected };
        let changed = {
            let mut s = self.shared.lock();
            let before = s.heard.map(|h| (h.role, h.disk, h.connected));
            s.heard = Some(heard);
            let mut changed = before != Some((heard.role, heard.disk, heard.connected));
            if d.kind == Kind::OutdateReply {
                if let Some(ask) = s.ask.as_mut().filter(|a| a.request == d.request) {
                    changed |= ask.answer != d.result;
                    ask.answer = d.result;
                }
            }
            changed
        };
        if d.kind == Kind::OutdateReply {
            info!(result = ?d.result, "the peer answered the outdate request");
        }
        if changed {
            self.shared.changed.notify_one();
        }
        let echo_now = (d.boot, d.seq);
        if d.kind == Kind::OutdateRequest {
            let fresh = self.log.is_recent(d.echo_boot, d.echo_seq, now, ECHO_MAX_AGE);
            let node = self.node.clone();
            let result = outdate_answer(fresh, || node.outdate_by_peer());
            info!(?result, "the peer asked this node to outdate itself over the heartbeat path");
            let reply = self.datagram(Kind::OutdateReply, echo_now, d.request, result);
            self.send(socket, &reply, Some(from)).await;
        }
        Some(echo_now)
    }

    fn drop_datagram(&mut self, from: SocketAddr, why: &str) {
        self.dropped += 1;
        // The first, then every hundredth: a stray sender must not flood the log.
        if self.dropped % 100 == 1 {
            warn!(%from, dropped = self.dropped, "heartbeat datagram dropped: {why}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outdate_request_counts_only_if_it_echoes_a_recent_datagram_of_this_run() {
        let t0 = Instant::now();
        let mut log = SentLog { boot: 7, sent: VecDeque::new() };
        log.record(1, t0, ECHO_MAX_AGE);
        log.record(2, t0 + Duration::from_secs(1), ECHO_MAX_AGE);
        let now = t0 + Duration::from_secs(2);
        assert!(log.is_recent(7, 1, now, ECHO_MAX_AGE));
        assert!(!log.is_recent(8, 1, now, ECHO_MAX_AGE), "another run's");
        assert!(!log.is_recent(7, 3, now, ECHO_MAX_AGE), "never sent");
        let later = t0 + Duration::from_secs(6);
        assert!(!log.is_recent(7, 1, later, ECHO_MAX_AGE), "too old");
        assert!(log.is_recent(7, 2, later, ECHO_MAX_AGE));
        log.record(3, t0 + Duration::from_millis(5500), ECHO_MAX_AGE);
        assert_eq!(log.sent.len(), 2, "old entries leave the log");
    }

    #[test]
    fn repeated_and_older_datagrams_of_a_run_are_ignored() {
        let mut p = PeerSeq::default();
        assert!(p.accept(1, 5));
        assert!(!p.accept(1, 5));
        assert!(!p.accept(1, 4));
        assert!(p.accept(1, 6));
        assert!(p.accept(2, 1), "the peer restarted");
    }

    #[test]
    fn the_answer_follows_the_node() {
        assert_eq!(outdate_answer(false, || Ok(())), OutdateResult::RefusedStale);
        assert_eq!(outdate_answer(true, || Ok(())), OutdateResult::Outdated);
        assert_eq!(outdate_answer(true, || Err(OutdateRefusal::Primary)), OutdateResult::RefusedPrimary);
        assert_eq!(outdate_answer(true, || Err(OutdateRefusal::Connected)), OutdateResult::RefusedConnected);
        assert_eq!(outdate_answer(true, || Err(OutdateRefusal::Metadata("x".into()))), OutdateResult::Failed);
    }

    #[test]
    fn an_ask_is_made_once_per_disconnection_and_repeated_after_a_refusal() {
        let shared = HeartbeatShared::new(Duration::from_millis(1500));
        shared.ask_outdate(3);
        let first = shared.lock().ask.unwrap().request;
        shared.ask_outdate(3);
        assert_eq!(shared.lock().ask.unwrap().request, first);
        shared.lock().ask.as_mut().unwrap().answer = OutdateResult::RefusedConnected;
        shared.ask_outdate(3);
        assert_eq!(shared.lock().ask.unwrap().answer, OutdateResult::None, "asked again");
        assert_eq!(shared.lock().ask.unwrap().request, first, "the same request");
        shared.lock().ask.as_mut().unwrap().answer = OutdateResult::Outdated;
        assert!(shared.peer_outdated_for(3));
        assert!(!shared.peer_outdated_for(4), "for that disconnection only");
        shared.ask_outdate(4);
        assert_ne!(shared.lock().ask.unwrap().request, first);
    }
}
