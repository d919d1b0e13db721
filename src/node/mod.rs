//! The per-resource daemon: one node's disk, metadata, role and connection to its peer, driven
//! by the `rdbd` verbs over a control socket.
//!
//! - [`Node`]: state and the role changes (`primary`, `secondary`, `new-current-uuid`, `down`).
//! - [`session`]: connecting to the peer, the sync handshake, resync, replication.
//! - [`control`]: the control socket and its requests.
//! - [`status`]: what `rdbd status` shows.
//! - [`event_stream`]: what `rdbd events` streams (state changes as JSON lines).
//! - [`nbd_service`]: the NBD server a Primary runs.
//! - [`handle`]: the narrow handle a client (the HA supervisor) drives the node through, and
//!   [`ha_report`] what it publishes for `status`.

pub mod control;
mod disk;
pub mod event_stream;
mod events;
pub mod ha_report;
pub mod handle;
pub mod handlers;
mod nbd_service;
mod session;
pub mod status;
mod verify;

pub use verify::VerifyResult;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{NodeConfig, ResourceConfig};
use crate::metadata::generations::Generations;
use crate::metadata::store;
use crate::metadata::superblock::{flags, Superblock};
use crate::nbd::Shards;
use crate::replication::connection_plan;
use crate::replication::device::ReplicatedDevice;
use crate::replication::disk_health::ErrorPolicy;
use crate::replication::peer::PeerLink;
use crate::replication::promotion;
use crate::replication::states::{
    check_demote, check_promote, ConnState, DemoteRefusal, DiskState, PromoteRefusal, ReplState, Role,
};
use crate::storage::BlockDevice;

use nbd_service::NbdService;

/// Directory of control sockets and daemon logs unless [`RUN_DIR_ENV`] says otherwise.
pub const DEFAULT_RUN_DIR: &str = "/run/rdbd";
/// How often idle extents leave the activity log: one that no write touched for one to two of
/// these periods goes, so that a crash resyncs about what was written in the last seconds.
const AL_RETIRE_INTERVAL: Duration = Duration::from_secs(5);
pub const RUN_DIR_ENV: &str = "RDBD_RUN_DIR";

/// The run directory: [`RUN_DIR_ENV`] if set and not empty, else [`DEFAULT_RUN_DIR`].
pub fn run_dir() -> PathBuf {
    match std::env::var_os(RUN_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(DEFAULT_RUN_DIR),
    }
}

/// The control socket of `resource` on `node` (both nodes may run on one machine).
pub fn control_socket(run_dir: &Path, resource: &str, node: &str) -> PathBuf {
    run_dir.join(format!("{resource}.{node}.sock"))
}

/// The daemon's log when it runs detached.
pub fn log_file(run_dir: &Path, resource: &str, node: &str) -> PathBuf {
    run_dir.join(format!("{resource}.{node}.log"))
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Metadata(#[from] store::MetaError),
    #[error(transparent)]
    Disk(#[from] crate::storage::OpenError),
    #[error("cannot promote: {0}")]
    Promote(#[from] PromoteRefusal),
    #[error("cannot demote: {0}")]
    Demote(#[from] DemoteRefusal),
    #[error("{0}")]
    Refused(String),
    #[error("cannot serve NBD on {addr}: {error}")]
    NbdListen { addr: String, error: std::io::Error },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Why this node did not outdate itself at its peer's request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutdateRefusal {
    #[error("this node is Primary or being promoted")]
    Primary,
    #[error("the replication link is still up here")]
    Connected,
    #[error("cannot write the metadata: {0}")]
    Metadata(String),
}

/// What the node knows about itself and its peer.
#[derive(Clone)]
struct NodeState {
    role: Role,
    disk: DiskState,
    conn: ConnState,
    repl: ReplState,
    peer_role: Role,
    peer_disk: DiskState,
    /// Dirty blocks when the running resync started, and when it started (for progress).
    resync_total: u64,
    resync_started: Option<std::time::Instant>,
    /// Resync data sent or received by the last completed resync.
    last_resync_bytes: Option<u64>,
    /// Resyncs completed since the daemon started.
    resyncs_completed: u64,
    /// The last refusal or connection failure, for `status`.
    last_error: Option<String>,
    /// `new-current-uuid --clear-bitmap` ran: announced at the next handshake.
    skip_initial_sync: bool,
    /// `connect --discard-my-data`: at the next handshake this node gives up its changes.
    discard_my_data: bool,
    /// Whether the node tries to connect (false after `disconnect` or a refused handshake).
    want_connection: bool,
    link: Option<Arc<PeerLink>>,
    /// The online verify running, the last one that ended, and how many have ended.
    verify: Option<verify::RunningVerify>,
    last_verify: Option<verify::VerifyResult>,
    verifies_ended: u64,
    /// A promotion is under way: the peer cannot have this node outdate itself meanwhile.
    promoting: Promoting,
    /// This node's State went out in the handshake of the current attempt or connection: a
    /// promotion now is decided with the peer (SPEC §4.7), never alone.
    state_sent: bool,
    /// ... and it asked to be promoted: the handshake's verdict is due.
    request_sent: bool,
    /// The connection was closed to be made again at once: until the next handshake (or this
    /// time), the peer counts as in touch, so a promotion is asked of it.
    in_touch_until: Option<std::time::Instant>,
    /// Why the disk is Diskless, Failed or Inconsistent after an I/O error (or the operator's
    /// `detach`), for `status`.
    disk_error: Option<String>,
    /// The disk was detached by an I/O error (not by the operator): attached again, it is fully
    /// resynced.
    disk_failed: bool,
    /// The current generation was started here since the last completed handshake: the peer
    /// never had it, so writing on without the peer needs no other (see
    /// [`Node::start_own_generation`]).
    own_generation: bool,
}

/// One node of one resource, running.
pub struct Node {
    weak: std::sync::Weak<Node>,
    config: ResourceConfig,
    me: usize,
    device: Arc<ReplicatedDevice>,
    state: Mutex<NodeState>,
    /// Wakes the connection task: reconnect now (role changed, `connect`, `disconnect`).
    renegotiate: Notify,
    shutdown: CancellationToken,
    nbd: tokio::sync::Mutex<Option<NbdService>>,
    shards: Arc<Shards>,
    events: event_stream::EventHub,
    /// Where `verify` sends its start offset: the current connection's sender or receiver.
    verify_starts: Mutex<Option<tokio::sync::mpsc::UnboundedSender<u64>>>,
    /// What the HA supervisor last published (with an `[ha]` table).
    ha_status: Mutex<Option<ha_report::HaStatus>>,
    /// `down` asks the supervisor to stop the services and demote, and waits for it.
    ha_release: HaRelease,
    /// `switchover`: the supervisor hands the role to the peer (cleared once the peer is Primary).
    ha_yield: std::sync::atomic::AtomicBool,
    /// Where the handshake answers a promotion asked of the peer.
    promotion_verdict: Mutex<Option<tokio::sync::oneshot::Sender<Result<(), promotion::Refusal>>>>,
}

/// The handshake between `down` and the supervisor.
#[derive(Default)]
struct HaRelease {
    requested: std::sync::atomic::AtomicBool,
    done: Notify,
}

/// The node state, locked. Dropping it after a mutation pokes the event watcher, so every
/// state change is reported without each call site having to remember it.
struct StateGuard<'a> {
    guard: std::sync::MutexGuard<'a, NodeState>,
    changed: &'a Notify,
    mutated: bool,
}

impl std::ops::Deref for StateGuard<'_> {
    type Target = NodeState;

    fn deref(&self) -> &NodeState {
        &self.guard
    }
}

impl std::ops::DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut NodeState {
        self.mutated = true;
        &mut self.guard
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        if self.mutated {
            // A stored permit if the watcher is busy: the change is picked up at its next diff.
            self.changed.notify_one();
        }
    }
}

/// How a promotion under way is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Promoting {
    No,
    /// Without the peer (it is not in reach): the State exchange waits until it is done.
    Alone,
    /// With the peer, in the next handshake (the answer comes through `promotion_verdict`).
    WithPeer,
}

/// Ends the promotion under way however `promote` returns: a request not yet decided is
/// withdrawn.
struct PromotionUnderWay<'a>(&'a Node);

impl Drop for PromotionUnderWay<'_> {
    fn drop(&mut self) {
        self.0.state().promoting = Promoting::No;
        self.0.promotion_verdict.lock().expect("promotion lock").take();
    }
}

/// Whether `config` fences the peer with a command, without a witness.
fn fencing(config: &ResourceConfig) -> bool {
    config.ha.as_ref().is_some_and(|ha| ha.fence_peer.is_some() && ha.witness.is_none())
}

/// A random generation identifier.
fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    // The OS generator does not fail for 8 bytes after boot; zero would still be made safe.
    let _ = rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty());
    u64::from_le_bytes(bytes)
}

/// The disk state the superblock flags record.
fn disk_from_flags(sb: &Superblock) -> DiskState {
    if !sb.has(flags::CONSISTENT) {
        DiskState::Inconsistent
    } else if sb.has(flags::UP_TO_DATE) {
        DiskState::UpToDate
    } else {
        DiskState::Outdated
    }
}

fn set_disk_flags(sb: &mut Superblock, disk: DiskState) {
    sb.set(flags::CONSISTENT, disk.can_be_sync_source());
    sb.set(flags::UP_TO_DATE, disk == DiskState::UpToDate);
}

impl Node {
    /// Attaches this node's disk and metadata (folding the activity log after a crash) and
    /// marks the metadata in use. The node starts Secondary and not yet connected.
    pub fn attach(config: ResourceConfig, me: usize) -> Result<Arc<Self>, NodeError> {
        let opened = disk::open_disk(&config.nodes[me], fencing(&config))?;
        let disk = opened.disk;
        let policy = match config.disk.on_io_error {
            crate::config::OnIoError::PassOn => ErrorPolicy::PassOn,
            _ => ErrorPolicy::Detach,
        };
        let device = ReplicatedDevice::with_resync_device(
            opened.local,
            opened.resync,
            opened.tracking,
            opened.bitmap_block,
            policy,
        );
        let shards = Arc::new(Shards::per_cpu()?);
        let state = NodeState {
            role: Role::Secondary,
            disk,
            conn: ConnState::Unconnected,
            repl: ReplState::Off,
            peer_role: Role::Unknown,
            peer_disk: DiskState::DUnknown,
            resync_total: 0,
            resync_started: None,
            last_resync_bytes: None,
            resyncs_completed: 0,
            last_error: None,
            skip_initial_sync: false,
            discard_my_data: false,
            want_connection: true,
            link: None,
            verify: None,
            last_verify: None,
            verifies_ended: 0,
            promoting: Promoting::No,
            state_sent: false,
            request_sent: false,
            in_touch_until: None,
            disk_error: None,
            disk_failed: false,
            own_generation: false,
        };
        Ok(Arc::new_cyclic(|weak| Self {
            weak: weak.clone(),
            config,
            me,
            device,
            events: event_stream::EventHub::new(&state),
            state: Mutex::new(state),
            renegotiate: Notify::new(),
            shutdown: CancellationToken::new(),
            nbd: tokio::sync::Mutex::new(None),
            shards,
            verify_starts: Mutex::new(None),
            ha_status: Mutex::new(None),
            ha_release: HaRelease::default(),
            ha_yield: std::sync::atomic::AtomicBool::new(false),
            promotion_verdict: Mutex::new(None),
        }))
    }

    /// This node as the `Arc` it lives in (for work spawned from a `&self` method).
    /// Marks (or clears) on disk that the peer is known outdated: with fencing, a restart then
    /// keeps this node UpToDate (see `disk::open_disk`). Cleared once connected again.
    pub(crate) fn set_peer_outdated(&self, outdated: bool) {
        if self.superblock().has(flags::PEER_OUTDATED) == outdated {
            return;
        }
        if let Err(e) = self.persist(|sb| sb.set(flags::PEER_OUTDATED, outdated)) {
            warn!("cannot write metadata (peer outdated: {outdated}): {e}");
        }
    }

    /// Whether a `fence-peer` command, without a witness, decides who may write alone.
    fn fencing(&self) -> bool {
        fencing(&self.config)
    }

    fn myself(&self) -> Option<Arc<Node>> {
        self.weak.upgrade()
    }

    pub fn config(&self) -> &ResourceConfig {
        &self.config
    }

    pub fn me(&self) -> &NodeConfig {
        &self.config.nodes[self.me]
    }

    pub fn peer_config(&self) -> &NodeConfig {
        &self.config.nodes[1 - self.me]
    }

    pub fn device(&self) -> &Arc<ReplicatedDevice> {
        &self.device
    }

    fn state(&self) -> StateGuard<'_> {
        StateGuard {
            guard: self.state.lock().expect("node state lock"),
            changed: &self.events.changed,
            mutated: false,
        }
    }

    /// Runs the node until `down` or `stop`: the connection to the peer, in the background.
    /// `clients` (the HA supervisor) end with the node: awaited before the event stream closes,
    /// so that their last events are still reported.
    pub async fn run(self: &Arc<Self>, clients: Vec<tokio::task::JoinHandle<()>>) {
        let watcher_done = CancellationToken::new();
        let watcher = tokio::spawn(event_stream::watch(self.clone(), watcher_done.clone()));
        // The replication link runs on the first shard, where the first NBD connection runs
        // too: a write and its replication then never cross threads.
        let connection = self.shards.spawn_on(0, session::run(self.clone()));
        let retirer = tokio::spawn(retire_idle_extents(self.clone()));
        let disk_watch = tokio::spawn(disk::watch_errors(self.clone(), self.device.health().subscribe()));
        self.shutdown.cancelled().await;
        let _ = connection.await;
        retirer.abort();
        disk_watch.abort();
        for client in clients {
            let _ = client.await;
        }
        // The watcher ends after the session's last changes, which it broadcasts, then
        // `destroy`, before the daemon exits.
        watcher_done.cancel();
        let _ = watcher.await;
    }

    /// A token cancelled when the node stops.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The superblock as last written.
    fn superblock(&self) -> Superblock {
        self.device
            .with_tracking(|t| t.activity.as_ref().expect("a node has metadata").1.superblock().clone())
    }

    pub fn generations(&self) -> Generations {
        self.superblock().generations
    }

    /// Changes the superblock durably. A Diskless node has no metadata to change: nothing is
    /// written. A failed write is a disk error (see [`Node::on_disk_error`]).
    fn persist(&self, change: impl FnOnce(&mut Superblock)) -> Result<(), NodeError> {
        if !self.device.health().usable() {
            return Ok(());
        }
        let result =
            self.device.with_tracking(|t| t.activity.as_mut().expect("a node has metadata").1.update(change));
        self.metadata_result(result)
    }

    /// Writes every bitmap page changed in memory since it was last written.
    fn persist_bitmap(&self, all: bool) -> Result<(), NodeError> {
        if !self.device.health().usable() {
            return Ok(());
        }
        self.metadata_result(self.device.write_stale_bitmap_pages(all))
    }

    /// Sets this node's disk state, in memory and in the superblock flags.
    fn set_disk(&self, disk: DiskState) -> Result<(), NodeError> {
        self.persist(|sb| set_disk_flags(sb, disk))?;
        self.state().disk = disk;
        Ok(())
    }

    /// A Primary without its peer starts a new data generation, so the peer's data is
    /// recognisably older at the next connect and the bitmap says what to resync (DRBD: new
    /// current UUID on peer loss).
    fn primary_without_peer(&self) -> Result<(), NodeError> {
        self.new_generation_without_peer(false)
    }

    /// [`Node::primary_without_peer`], and also for a node no longer Primary whose peer lost
    /// writes it had not made stable (`peer_lost_writes`, a Primary just demoted): with equal
    /// generations the two would compare as in sync and the marks would never resync.
    fn new_generation_without_peer(&self, peer_lost_writes: bool) -> Result<(), NodeError> {
        // A role change reconnects, so the peer never becomes Primary on this connection.
        let role = self.state().role;
        let Some(primary) = connection_plan::generation_on_link_loss(role, peer_lost_writes, false) else {
            return Ok(());
        };
        if let Some(new) = self.start_own_generation(primary)? {
            info!(
                current = format_args!("{:016X}", new.current),
                "new data generation: writing without the peer"
            );
        }
        Ok(())
    }

    /// A generation of this node's own: its data leaves (or is about to) what the peer may
    /// have. Taken also with a bitmap identifier set, which DRBD skips: a sync source whose
    /// SyncUuid never arrived still shares its current generation with the peer, and a peer
    /// that started one of its own from it would count as newer than this node's writes (a
    /// Primary refused forever as its target, no split brain found). The bitmap identifier
    /// stays ([`Generations::new_current`]), so a target that did adopt it is still behind by
    /// the bitmap. Not again before the next completed handshake: the peer never had the
    /// current one, and each new one pushes shared generations out of the history. `None`:
    /// nothing to do.
    fn start_own_generation(&self, primary: bool) -> Result<Option<Generations>, NodeError> {
        {
            // Claimed under the lock: a promotion and a link loss at once take one generation.
            let mut s = self.state();
            if s.own_generation {
                return Ok(None);
            }
            s.own_generation = true;
        }
        let new = self.generations().new_current(random_u64(), primary);
        if let Err(e) = self.persist(|sb| sb.generations = new) {
            self.state().own_generation = false;
            return Err(e);
        }
        Ok(Some(new))
    }

    /// `rdbd primary [--force]`. With the peer in touch (connected, or this node's State already
    /// sent in a handshake under way) the promotion is asked of it in the next handshake, which
    /// grants it or not on both nodes alike (SPEC §4.7); without, it is this node's alone, with a
    /// new data generation.
    pub async fn promote(self: &Arc<Self>, force: bool) -> Result<(), NodeError> {
        let peer = self.peer_config().name.clone();
        // Checked and marked under one lock, so that an outdate request from the peer
        // (heartbeat path) comes either before the check or is refused, and a State snapshot
        // either precedes the decision to go alone or makes this a request.
        let (disk, verdict, connected) = {
            let mut s = self.state();
            if s.role == Role::Primary {
                return Ok(());
            }
            if s.promoting != Promoting::No {
                return Err(NodeError::Refused("a promotion is already under way".into()));
            }
            let connected = s.conn == ConnState::Connected;
            if let (DiskState::Diskless | DiskState::Failed, Some(e)) = (s.disk, &s.disk_error) {
                return Err(NodeError::Refused(format!(
                    "cannot promote: the disk is {} ({e}); `rdbd attach` it first",
                    s.disk
                )));
            }
            if connected && matches!(s.repl, ReplState::SyncTarget | ReplState::WFBitMapT) {
                return Err(NodeError::Refused(
                    "cannot promote a sync target: wait for the resync to finish".into(),
                ));
            }
            check_promote(s.disk, s.peer_role, connected, force).map_err(|e| match e {
                PromoteRefusal::PeerIsPrimary => {
                    NodeError::Refused(format!("cannot promote: {peer} is Primary"))
                }
                e => e.into(),
            })?;
            let renegotiating = s.in_touch_until.is_some_and(|until| std::time::Instant::now() < until);
            let with_peer = connected || s.state_sent || renegotiating;
            s.promoting = if with_peer { Promoting::WithPeer } else { Promoting::Alone };
            let verdict = with_peer.then(|| {
                let (answer, verdict) = tokio::sync::oneshot::channel();
                *self.promotion_verdict.lock().expect("promotion lock") = Some(answer);
                verdict
            });
            (s.disk, verdict, connected)
        };
        let _underway = PromotionUnderWay(self);
        if disk != DiskState::UpToDate {
            // --force: the operator declares this data the newest, in a generation of its own
            // (DRBD: a new current UUID on `primary --force`), so a peer just created gets a
            // full sync from it, and any other peer compares as behind or diverged.
            warn!(%disk, "promoting with --force: this node's data becomes the newest");
            self.set_disk(DiskState::UpToDate)?;
            self.start_own_generation(true)?;
        }
        let alone = verdict.is_none();
        match verdict {
            Some(verdict) => {
                // The next handshake carries the request; granted, the session made this node
                // Primary. Connected, the connection is made again for it; otherwise one is being
                // made: an attempt is not cut short (the peer would wait out a step of it), and
                // one past its State exchange ends by making the connection again (`session`).
                if connected {
                    self.renegotiate.notify_one();
                }
                if let Err(why) = self.await_verdict(verdict, &peer).await {
                    if disk != DiskState::UpToDate {
                        // Not promoted: the operator's --force does not stand either.
                        self.set_disk(disk)?;
                        self.renegotiate.notify_one();
                    }
                    return Err(NodeError::Refused(format!("cannot promote: {why}")));
                }
            }
            None => {
                self.persist(|sb| sb.set(flags::PRIMARY, true))?;
                self.state().role = Role::Primary;
                self.primary_without_peer()?;
            }
        }
        if let Err(e) = self.start_nbd().await {
            self.persist(|sb| sb.set(flags::PRIMARY, false))?;
            self.state().role = Role::Secondary;
            self.renegotiate.notify_one();
            return Err(e);
        }
        info!("role: Primary");
        if alone {
            // The next handshake tells the peer (one under way now waited for this promotion).
            self.renegotiate.notify_one();
        }
        Ok(())
    }

    /// Waits for the handshake's answer to this node's promotion request.
    async fn await_verdict(
        &self,
        verdict: tokio::sync::oneshot::Receiver<Result<(), promotion::Refusal>>,
        peer: &str,
    ) -> Result<(), String> {
        let net = &self.config.net;
        let limit = (net.connect_interval + 2 * net.timeout).max(Duration::from_secs(5));
        match tokio::time::timeout(limit, verdict).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(refusal))) => Err(refusal.describe(peer)),
            Ok(Err(_)) => Err(format!("the connection to {peer} was lost while asking it; try again")),
            Err(_) => Err(format!("{peer} did not answer within {limit:?}; try again")),
        }
    }

    /// `rdbd secondary`.
    pub async fn demote(self: &Arc<Self>) -> Result<(), NodeError> {
        if self.state().role != Role::Primary {
            return Ok(());
        }
        self.give_up_primary().await?;
        info!("role: Secondary");
        self.renegotiate.notify_one();
        Ok(())
    }

    /// Primary → Secondary, refused while NBD clients are connected. It does not renegotiate:
    /// the sync handshake calls it for a Primary whose changes a split-brain policy discards,
    /// and goes on as sync target on the same connection.
    async fn give_up_primary(&self) -> Result<(), NodeError> {
        self.check_release(Role::Primary).await?;
        self.stop_nbd().await;
        let link = self.state().link.clone();
        if let Some(link) = link {
            link.settle(Duration::from_secs(5)).await;
        }
        self.state().role = Role::Secondary;
        self.persist(|sb| sb.set(flags::PRIMARY, false))?;
        Ok(())
    }

    /// Primary → Secondary whatever uses the device (the supervisor after losing quorum, or
    /// when the services would not stop): writes held for quorum fail, NBD clients and the
    /// kernel device are cut off.
    pub async fn demote_forced(self: &Arc<Self>) -> Result<(), NodeError> {
        if self.state().role != Role::Primary {
            return Ok(());
        }
        self.device.alone_gate().deny(true);
        self.device.wake_parked();
        self.stop_nbd().await;
        self.state().role = Role::Secondary;
        self.persist(|sb| sb.set(flags::PRIMARY, false))?;
        warn!("role: Secondary (forced: held writes failed, clients cut off)");
        self.renegotiate.notify_one();
        Ok(())
    }

    /// The role, the disk, and whether the replication link is up, without the whole status.
    pub(crate) fn local_view(&self) -> (Role, DiskState, bool) {
        let s = self.state();
        (s.role, s.disk, s.conn == ConnState::Connected)
    }

    /// The peer, which lost the replication link and would write without this node, asks over
    /// the heartbeat path: this node's data is marked Outdated (on disk before the answer), so
    /// that it is not promoted with it later (DRBD's outdate-peer). Refused by a Primary, one
    /// being promoted, or one that still sees the link up.
    pub(crate) fn outdate_by_peer(&self) -> Result<(), OutdateRefusal> {
        {
            let mut s = self.state();
            if s.role == Role::Primary || s.promoting != Promoting::No {
                return Err(OutdateRefusal::Primary);
            }
            if s.conn == ConnState::Connected {
                return Err(OutdateRefusal::Connected);
            }
            if !matches!(s.disk, DiskState::UpToDate | DiskState::Consistent) {
                return Ok(());
            }
            s.disk = DiskState::Outdated;
        }
        self.persist(|sb| set_disk_flags(sb, DiskState::Outdated))
            .map_err(|e| OutdateRefusal::Metadata(e.to_string()))?;
        warn!("disk: Outdated (the peer writes without this node: it asked over the heartbeat path)");
        Ok(())
    }

    /// At the next handshake this node gives up its changes (the supervisor, for a node whose
    /// peer wrote without it, before it steps down: the reconnect follows at once).
    pub(crate) fn discard_my_data_at_next_connect(&self) {
        let mut s = self.state();
        s.discard_my_data = true;
        s.want_connection = true;
    }

    /// `rdbd switchover [--to PEER]`: a planned move of the Primary role (HA only). The
    /// supervisor stops the chain in reverse and demotes; the peer promotes and starts it.
    /// Waits up to 55 s for the peer to be Primary.
    pub async fn switchover(&self, to: Option<String>) -> Result<(), NodeError> {
        if self.config.ha.is_none() {
            return Err(NodeError::Refused(
                "switchover needs an [ha] table; without it use secondary, then primary on the peer".into(),
            ));
        }
        let peer = self.peer_config().name.clone();
        if let Some(to) = to.filter(|t| *t != peer) {
            let hint = if to == self.me().name {
                "it is this node: run switchover on the Primary"
            } else {
                "not a node of this resource"
            };
            return Err(NodeError::Refused(format!("switchover --to {to}: {hint} (the peer is {peer})")));
        }
        {
            let s = self.state();
            if s.role != Role::Primary {
                return Err(NodeError::Refused(
                    "switchover runs on the Primary; this node is Secondary".into(),
                ));
            }
            if s.conn != ConnState::Connected
                || s.peer_disk != DiskState::UpToDate
                || s.repl != ReplState::Established
            {
                return Err(NodeError::Refused(format!(
                    "switchover needs {peer} connected and UpToDate (it is {}, {})",
                    s.conn, s.peer_disk
                )));
            }
        }
        self.ha_yield.store(true, std::sync::atomic::Ordering::Release);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(55);
        while tokio::time::Instant::now() < deadline {
            if self.state().peer_role == Role::Primary {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The hand-over failed: this node may take its role back (the policy decides).
        self.ha_yield.store(false, std::sync::atomic::Ordering::Release);
        Err(NodeError::Refused(format!("{peer} has not taken over within 55 s; see rdbd status")))
    }

    /// Whether a switchover asked this node to hand its role over.
    pub(crate) fn ha_yielding(&self) -> bool {
        self.ha_yield.load(std::sync::atomic::Ordering::Acquire)
    }

    pub(crate) fn clear_ha_yield(&self) {
        self.ha_yield.store(false, std::sync::atomic::Ordering::Release);
    }

    /// Whether `down` waits for the supervisor to release the resource.
    pub(crate) fn ha_release_requested(&self) -> bool {
        self.ha_release.requested.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The supervisor stopped the services and demoted for `down`.
    pub(crate) fn ha_released(&self) {
        self.ha_release.done.notify_one();
    }

    pub(crate) fn set_ha_status(&self, status: ha_report::HaStatus) {
        *self.ha_status.lock().expect("ha status lock") = Some(status);
    }

    pub(crate) fn ha_status(&self) -> Option<ha_report::HaStatus> {
        self.ha_status.lock().expect("ha status lock").clone()
    }

    /// `rdbd connect [--discard-my-data]`: leave StandAlone and try to reach the peer; with
    /// `discard_my_data`, a split brain is resolved by taking the peer's data (DRBD's manual
    /// recovery), which a Primary cannot do.
    pub fn connect(&self, discard_my_data: bool) -> Result<(), NodeError> {
        let mut s = self.state();
        if discard_my_data && s.role == Role::Primary {
            return Err(NodeError::Refused(
                "--discard-my-data on a Primary: make this node Secondary first".into(),
            ));
        }
        s.want_connection = true;
        s.last_error = None;
        s.discard_my_data |= discard_my_data;
        drop(s);
        self.renegotiate.notify_one();
        Ok(())
    }

    /// `rdbd disconnect`: drop the connection and stay StandAlone.
    pub async fn disconnect(&self) {
        self.state().want_connection = false;
        let link = self.state().link.clone();
        if let Some(link) = link {
            link.settle(Duration::from_secs(5)).await;
        }
        self.renegotiate.notify_one();
        // Wait until the session has ended, so `status` right after says StandAlone.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.state().conn != ConnState::StandAlone && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// `rdbd new-current-uuid [--clear-bitmap]`.
    pub fn new_current_uuid(&self, clear_bitmap: bool) -> Result<(), NodeError> {
        let s = self.state().clone();
        let gens = self.generations();
        if clear_bitmap {
            // Only for blank disks: the operator declares both sides identical (e.g. zeroed).
            if !gens.is_just_created() || s.disk != DiskState::Inconsistent {
                return Err(NodeError::Refused(
                    "--clear-bitmap is only for freshly created metadata (disk Inconsistent, no data generation yet)"
                        .into(),
                ));
            }
            if s.conn != ConnState::Connected || s.peer_disk != DiskState::Inconsistent {
                return Err(NodeError::Refused(
                    "--clear-bitmap needs the peer connected with freshly created metadata too".into(),
                ));
            }
            let new = gens.clear_bitmap_new_current(random_u64());
            self.persist(|sb| {
                sb.generations = new;
                set_disk_flags(sb, DiskState::UpToDate);
            })?;
            self.device.with_tracking(|t| {
                let blocks = t.bitmap.blocks();
                t.bitmap.clear(0..blocks);
            });
            self.persist_bitmap(true)?;
            let mut st = self.state();
            st.disk = DiskState::UpToDate;
            st.skip_initial_sync = true;
            drop(st);
            info!("new current generation with a cleared bitmap: the peer adopts it, no initial sync");
            self.renegotiate.notify_one();
        } else {
            let new = gens.new_current(random_u64(), s.role == Role::Primary);
            self.persist(|sb| sb.generations = new)?;
        }
        Ok(())
    }

    /// What `invalidate` and `invalidate-remote` need: connected, in sync, no resync running.
    fn check_invalidate(&self, verb: &str) -> Result<(), NodeError> {
        let s = self.state();
        if s.conn != ConnState::Connected {
            return Err(NodeError::Refused(format!("{verb} needs the peer connected (now {})", s.conn)));
        }
        if s.repl != ReplState::Established {
            return Err(NodeError::Refused(format!("{verb}: a resync or verify is running ({})", s.repl)));
        }
        Ok(())
    }

    /// Marks every block out of sync (`reset_bitmap`), or keeps the marks verify left, durably.
    fn mark_for_resync(&self, reset_bitmap: bool) -> Result<(), NodeError> {
        if reset_bitmap {
            self.device.with_tracking(|t| t.bitmap.set_all());
        }
        self.persist_bitmap(reset_bitmap)
    }

    /// `rdbd invalidate [--reset-bitmap=no]`: this node's data is declared bad and is pulled
    /// from the peer. The disk becomes Inconsistent, which makes the peer the sync source at
    /// the reconnect that follows, whatever the generations say.
    pub fn invalidate(&self, reset_bitmap: bool) -> Result<(), NodeError> {
        self.check_invalidate("invalidate")?;
        let (role, peer_disk) = {
            let s = self.state();
            (s.role, s.peer_disk)
        };
        if role == Role::Primary {
            return Err(NodeError::Refused(
                "invalidate on a Primary: its clients would read data being replaced; make it Secondary first"
                    .into(),
            ));
        }
        if peer_disk != DiskState::UpToDate {
            return Err(NodeError::Refused(format!(
                "invalidate needs an UpToDate peer to pull from (the peer is {peer_disk})"
            )));
        }
        self.mark_for_resync(reset_bitmap)?;
        self.set_disk(DiskState::Inconsistent)?;
        info!(reset_bitmap, "invalidated: pulling from the peer");
        self.renegotiate.notify_one();
        Ok(())
    }

    /// `rdbd invalidate-remote [--reset-bitmap=no]`: the peer's data is declared bad and this
    /// node's is pushed. A new data generation makes this node's data the newer one, so the
    /// reconnect that follows makes it the sync source (rule 70) of the marked blocks.
    pub fn invalidate_remote(&self, reset_bitmap: bool) -> Result<(), NodeError> {
        self.check_invalidate("invalidate-remote")?;
        let (role, disk, peer_role) = {
            let s = self.state();
            (s.role, s.disk, s.peer_role)
        };
        if peer_role == Role::Primary {
            return Err(NodeError::Refused(
                "invalidate-remote while the peer is Primary: make it Secondary first".into(),
            ));
        }
        if disk != DiskState::UpToDate {
            return Err(NodeError::Refused(format!(
                "invalidate-remote needs this node UpToDate (it is {disk})"
            )));
        }
        self.mark_for_resync(reset_bitmap)?;
        let new = self.generations().new_current(random_u64(), role == Role::Primary);
        self.persist(|sb| sb.generations = new)?;
        info!(reset_bitmap, "peer invalidated: pushing to it");
        self.renegotiate.notify_one();
        Ok(())
    }

    /// `rdbd down` (and SIGTERM): stop serving, leave the peer cleanly, and write the metadata
    /// so the next start needs no activity-log resync. `force` (a signal) skips the in-use check.
    pub async fn down(self: &Arc<Self>, force: bool) -> Result<(), NodeError> {
        if self.config.ha.is_some() {
            // The supervisor stops the services (in reverse) and demotes first.
            self.ha_release.requested.store(true, std::sync::atomic::Ordering::Release);
            let done = self.ha_release.done.notified();
            if self.state().role == Role::Primary
                && tokio::time::timeout(Duration::from_secs(120), done).await.is_err()
            {
                warn!("down: the supervisor did not release the resource within 120 s");
            }
        }
        if !force {
            let role = self.state().role;
            self.check_release(role).await?;
        }
        self.stop_nbd().await;
        self.state().want_connection = false;
        let link = self.state().link.clone();
        if let Some(link) = &link {
            link.settle(Duration::from_secs(5)).await;
        }
        // Secondary before the link closes, and the peer told so: a Primary losing its link
        // would start a generation of its own, and a switchover by hand (promote the peer, `up`
        // this node again) would then find a split brain instead of a resync.
        let disk = {
            let mut s = self.state();
            s.role = Role::Secondary;
            s.disk
        };
        if let Some(link) = link {
            link.send_other(&rdbd_protocol::repl::Message::StateChange { role: Role::Secondary, disk });
            link.close("the peer is going down").await;
        }
        self.shutdown.cancel();
        self.persist_bitmap(false)?;
        // A clean log is trusted at the next start: everything written must be on this disk
        // before it says so, or a power loss now would lose writes no resync would repair.
        if !self.device.health().usable() {
            info!("down: the disk is detached; no metadata written");
            return Ok(());
        }
        if let Err(e) = self.device.sync() {
            warn!("down: flushing the data failed ({e}): the metadata stays unclean");
            self.persist(|sb| sb.set(flags::PRIMARY, false))?;
            return Err(NodeError::Refused(format!("down: flushing the data failed: {e}")));
        }
        self.persist(|sb| {
            sb.set(flags::PRIMARY, false);
            sb.set(flags::AL_CLEAN, true);
        })?;
        info!("down: metadata written cleanly");
        Ok(())
    }

    async fn start_nbd(&self) -> Result<(), NodeError> {
        let mut nbd = self.nbd.lock().await;
        if nbd.is_none() {
            *nbd = NbdService::start(self, self.shards.clone())?;
        }
        Ok(())
    }

    async fn stop_nbd(&self) {
        let service = self.nbd.lock().await.take();
        if let Some(service) = service {
            service.stop().await;
        }
    }

    async fn nbd_clients(&self) -> usize {
        self.nbd.lock().await.as_ref().map_or(0, |s| s.clients())
    }

    /// A Primary gives up serving only when nothing uses the device: no NBD client, and the
    /// kernel device neither mounted, nor held by LVM, nor open in a process (DRBD refuses a
    /// demotion the same way, naming the holder).
    async fn check_release(&self, role: Role) -> Result<(), NodeError> {
        check_demote(role, self.nbd_clients().await)?;
        let holders = self.nbd.lock().await.as_ref().and_then(|s| s.device_holders());
        match holders {
            Some(holders) => Err(NodeError::Refused(format!("cannot demote: {holders}"))),
            None => Ok(()),
        }
    }

    /// The kernel device the Primary attached, as `/dev/nbdN`.
    async fn kernel_device(&self) -> Option<String> {
        self.nbd.lock().await.as_ref().and_then(|s| s.kernel_device())
    }
}

/// Retires the activity log's idle extents every [`AL_RETIRE_INTERVAL`] while the node runs.
async fn retire_idle_extents(node: Arc<Node>) {
    let mut tick = tokio::time::interval(AL_RETIRE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut mark = node.device.activity_clock();
    loop {
        tick.tick().await;
        let now = node.device.activity_clock();
        match node.device.retire_idle_extents(mark) {
            Ok(0) => {}
            Ok(n) => tracing::debug!(extents = n, "idle extents left the activity log"),
            Err(e) => warn!("cannot retire idle extents from the activity log: {e}"),
        }
        mark = now;
    }
}
