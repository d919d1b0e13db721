//! One node's state, owned in one place: role, disk, generations, bitmap and activity log, the
//! connection and what is outstanding on it. Inputs arrive through the `handle_*` methods;
//! after each, [`NodeCore::poll_effect`] yields what the driver must do. No I/O, no clock: time
//! passes only as [`NodeCore::handle_tick`] calls, randomness (new generation identifiers) comes
//! from a seed.
//!
//! This file holds the state, the connection lifecycle (handshake and sync decision) and the
//! role changes; the Primary's request path is in `write_path.rs`, the peer's side of
//! replication and resync in `applier.rs`, the sync source in `resync.rs`.

use std::collections::{BTreeMap, VecDeque};

use rdbd_protocol::repl::Protocol;

use crate::metadata::activity_log::{extents_of, ActivityLog, EXTENT_BYTES};
use crate::metadata::bitmap::DirtyBitmap;
use crate::metadata::generations::Generations;
use crate::replication::connection_plan::{self, Plan, Settings};
use crate::replication::promotion;
use crate::replication::split_brain::{Policies, RrConflict};
use crate::replication::states::{check_promote, DiskState, Role};
use crate::replication::sync_decision::{SideView, SyncDecision};

use super::applier::Applier;
use super::bugs::{Bug, Bugs};
use super::io::{ClientId, Command, Effect, Hello, IoId, PeerMessage, Persisted};
use super::ledger::{Ledger, Range};
use super::peer_answers::Asked;
use super::resync::Source;
use super::target::Target;
use super::verify::Verifier;
use super::write_path::WritePath;

/// How long a demotion waits for the peer to make this node's writes stable before it goes on
/// anyway (the daemon's `give_up_primary`).
const SETTLE: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a refused connection waits before the next attempt (`connect-interval`).
const RETRY_CONNECT_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// What a node is, beyond what its metadata says.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub node_id: u32,
    /// Bytes of the replicated device.
    pub size: u64,
    /// Bytes one bitmap bit covers.
    pub bitmap_block: u32,
    pub al_extents: u32,
    /// When a replicated write is done for the client (DRBD's protocol A, B or C).
    pub protocol: Protocol,
    /// Seeds the generation identifiers this node makes.
    pub seed: u64,
    /// The after-sb policies (the same on both nodes, as the daemon's handshake requires).
    pub policies: Policies,
    /// What a handshake that would make a Primary the sync target does.
    pub rr_conflict: RrConflict,
    /// Checksum-based resync (`csums-alg`): the target sends what it holds of each range, and
    /// the source sends only what differs.
    pub csums: bool,
    /// Bugs planted for the simulator; [`Bugs::NONE`] elsewhere.
    pub bugs: Bugs,
}

/// The connection as the core sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Down,
    /// Connected; the Hellos are being exchanged. New writes wait.
    Handshake,
    /// Replicating; the peer's role and disk as last heard.
    Up {
        peer_role: Role,
        peer_disk: DiskState,
    },
}

/// The right to write without the peer, as the witness gave it (quorum).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    None,
    Asked,
    Held,
    /// The witness gave it to the peer: this node's data is outdated.
    Refused,
}

/// A promotion in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Promoting {
    No,
    /// Connected: waiting for the peer's consent.
    AskedPeer,
    /// Disconnected: waiting for the witness.
    AskedWitness,
}

/// Why a disk or metadata request was made, to route its completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IoPurpose {
    /// A client request's local part.
    Client(ClientId),
    /// The local flush before an activity-log transaction that evicts extents.
    AlFlush,
    /// The flush a restarted node makes before it trusts its data.
    StartupFlush,
    /// The local flush before idle extents retire; `mark` is the log's clock it retires by.
    RetireFlush { mark: u64 },
    /// A metadata image with this sequence number.
    Persist(u64),
    /// The applier's write or flush for the peer's request at this queue position.
    Apply(u64),
    /// The sync source's read of this range (its request's tag), for the resync with this
    /// number; `claimed` unless a planted bug read it without the claim.
    ResyncRead { range: Range, tag: usize, resync: u64, claimed: bool },
    /// The sync target's flush, for the resync with this number.
    TargetFlush(u64),
    /// The sync target's read of a range for its checksum request, for the resync with this
    /// number.
    CsumRead(Range, u64),
    /// A verify's read of the range the applier runs at this queue position.
    VerifyRead(u64),
}

/// One node's replication core.
pub struct NodeCore<P> {
    pub(super) cfg: CoreConfig,
    pub(super) role: Role,
    pub(super) disk: DiskState,
    pub(super) gens: Generations,
    /// Crashed while Primary and not resynced since (DRBD's MDF_CRASHED_PRIMARY).
    pub(super) crashed_primary: bool,
    pub(super) bitmap: DirtyBitmap,
    pub(super) al: ActivityLog,
    /// The extents the durable activity log holds (what a metadata image records).
    pub(super) logged: Vec<u32>,
    pub(super) link: Link,
    pub(super) ledger: Ledger<ClientId>,
    pub(super) want_connect: bool,
    pub(super) discard_my_data: bool,
    pub(super) grant: Grant,
    pub(super) promoting: Promoting,
    pub(super) writes: WritePath<P>,
    pub(super) applier: Applier<P>,
    pub(super) source: Option<Source<P>>,
    pub(super) target: Option<Target>,
    /// The driver's clock as of its last tick (paces the sync target).
    pub(super) now: std::time::Duration,
    /// Waiting for the source's SyncStart.
    pub(super) awaiting_sync_start: bool,
    /// Resyncs this node started as source (tells a late read of an ended one apart).
    pub(super) resyncs: u64,
    /// Asked the peer to be the source of an `invalidate`'s full sync.
    pub(super) invalidating: bool,
    /// `invalidate` took effect once this metadata image is durable.
    pub(super) invalidated_at: Option<u64>,
    pub(super) verifier: Option<Verifier>,
    /// The peer became Primary on this connection: its data is the newer from then on.
    peer_took_over: bool,
    /// Connected, and this node's Hello not yet sent.
    hello_due: bool,
    /// The peer's Hello, received before this node's went out.
    peer_hello: Option<Hello>,
    /// A restart's flush is not done yet: what the killed process left in the page cache
    /// (and the disk in its volatile cache) is not known durable, so this node neither
    /// offers its data to the peer (Hello) nor is promoted.
    startup_flush_pending: bool,
    /// The current generation was started here since the last handshake: the peer never had
    /// it, so writes without the peer need no other.
    own_generation: bool,
    pub(super) io: BTreeMap<IoId, IoPurpose>,
    next_io: IoId,
    /// Metadata images: the latest requested, the one in flight, the latest durable.
    persist_wanted: u64,
    persist_in_flight: Option<u64>,
    pub(super) persist_durable: u64,
    pub(super) effects: VecDeque<Effect<P>>,
    rng: u64,
    /// A demotion waits for the peer's flush since then (reset when the role changes or the
    /// link goes down).
    settling_since: Option<std::time::Duration>,
    /// A refused connection is tried again from then (rr-conflict retry-connect).
    retry_at: Option<std::time::Duration>,
    /// The activity log's clock at the last tick: extents unused since are idle.
    retire_mark: u64,
}

impl<P: Clone + PartialEq> NodeCore<P> {
    /// A node whose data is in generation `gens` with `disk`, freshly started (Secondary).
    pub fn new(cfg: CoreConfig, gens: Generations, disk: DiskState) -> Self {
        let blocks = cfg.size.div_ceil(u64::from(cfg.bitmap_block));
        let (al_extents, bugs, seed) = (cfg.al_extents, cfg.bugs, cfg.seed);
        Self {
            cfg,
            role: Role::Secondary,
            disk,
            gens,
            crashed_primary: false,
            bitmap: DirtyBitmap::new(blocks),
            al: ActivityLog::new(al_extents),
            logged: Vec::new(),
            link: Link::Down,
            ledger: Ledger::new(bugs),
            want_connect: true,
            discard_my_data: false,
            grant: Grant::None,
            promoting: Promoting::No,
            writes: WritePath::default(),
            applier: Applier::default(),
            source: None,
            target: None,
            now: std::time::Duration::ZERO,
            retry_at: None,
            settling_since: None,
            awaiting_sync_start: false,
            resyncs: 0,
            invalidating: false,
            invalidated_at: None,
            verifier: None,
            peer_took_over: false,
            hello_due: false,
            peer_hello: None,
            startup_flush_pending: false,
            own_generation: false,
            io: BTreeMap::new(),
            next_io: 0,
            persist_wanted: 0,
            persist_in_flight: None,
            persist_durable: 0,
            effects: VecDeque::new(),
            rng: seed,
            retire_mark: 0,
        }
    }

    /// A node starting from its durable metadata after a crash or power loss: the activity
    /// log's extents are folded into the bitmap (they may differ from the peer) and stay in the
    /// log, which lets them go only after a local flush — a resync may clear their bits while
    /// their data still sits in a volatile cache that survived a killed process.
    pub fn restart(cfg: CoreConfig, image: &Persisted) -> Self {
        let (size, bitmap_block) = (cfg.size, cfg.bitmap_block);
        let mut core = Self::new(cfg, image.gens, image.disk);
        core.bitmap = image.bitmap.clone();
        for &extent in &image.activity_log {
            let start = u64::from(extent) * EXTENT_BYTES;
            let end = (start + EXTENT_BYTES).min(size);
            if start < end {
                core.bitmap.set(DirtyBitmap::blocks_of(start, end - start, bitmap_block));
            }
            core.al.begin(extent);
        }
        if let Some(tx) = core.al.prepare() {
            core.al.committed(tx);
        }
        for &extent in &image.activity_log {
            core.al.end(extent);
        }
        core.logged = image.activity_log.clone();
        core.crashed_primary = image.primary;
        core.persist();
        // Seed 97588: a Secondary applied its Primary's write (unflushed), was killed, came back
        // as sync source of that block (the former Primary had marked it), sent its page-cache
        // copy and cleared the mark; a power loss then took the block from this disk, and
        // nothing marked it any more.
        core.startup_flush_pending = true;
        let io = core.start_io(IoPurpose::StartupFlush);
        core.effects.push_back(Effect::Flush { io });
        core
    }

    // --- what the driver and the simulator may look at ---

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn disk(&self) -> DiskState {
        self.disk
    }

    pub fn gens(&self) -> Generations {
        self.gens
    }

    pub fn link(&self) -> Link {
        self.link
    }

    pub fn grant(&self) -> Grant {
        self.grant
    }

    /// Whether bitmap block `block` is marked out of sync.
    pub fn is_out_of_sync(&self, block: u64) -> bool {
        self.bitmap.is_dirty(block)
    }

    pub fn out_of_sync_blocks(&self) -> u64 {
        self.bitmap.dirty_blocks()
    }

    /// Connected, in sync, nothing resyncing.
    pub fn is_established(&self) -> bool {
        matches!(self.link, Link::Up { .. }) && self.source.is_none() && !self.awaiting_sync_start
    }

    /// Whether this node answers client writes now: a Primary replicating to its peer, or one
    /// the witness lets write alone.
    pub fn answers_writes(&self) -> bool {
        self.role == Role::Primary
            && self.disk != DiskState::Diskless
            && (matches!(self.link, Link::Up { .. }) || self.grant == Grant::Held)
    }

    /// Nothing in flight anywhere: no client request, disk I/O, unanswered peer request or
    /// metadata write.
    pub fn is_quiet(&self) -> bool {
        self.io.is_empty()
            && self.writes.is_idle()
            && self.applier.is_idle()
            && self.ledger.is_settled()
            && self.persist_in_flight.is_none()
            && self.persist_wanted == self.persist_durable
            && self.verify_idle()
    }

    /// What is in flight, for diagnostics.
    pub fn describe_work(&self) -> String {
        format!(
            "source {:?}, awaiting SyncStart {}, io {:?}, {}, ledger unstable {}, {}",
            self.source,
            self.awaiting_sync_start,
            self.io.values().collect::<Vec<_>>(),
            self.writes.describe(),
            self.ledger.unstable_writes(),
            self.describe_verify()
        )
    }

    /// The connection wants to be up (no operator disconnect, no split brain).
    pub fn wants_connection(&self) -> bool {
        // A detached node has nothing to replicate until its disk is attached again.
        self.want_connect && self.disk != DiskState::Diskless && self.retry_at.is_none_or(|at| self.now >= at)
    }

    /// The next thing the driver must do.
    pub fn poll_effect(&mut self) -> Option<Effect<P>> {
        self.effects.pop_front()
    }

    // --- inputs ---

    /// Time passed (the driver calls this every few hundred milliseconds; `now` is its clock):
    /// idle extents leave the activity log, writes unstable on the peer get a flush, a grant no
    /// longer needed goes back, the sync target's pace steps.
    pub fn handle_tick(&mut self, now: std::time::Duration) {
        self.step_target(now);
        if self.disk == DiskState::Diskless {
            return;
        }
        self.retire_idle_extents(self.retire_mark);
        self.retire_mark = self.al.clock();
        if matches!(self.link, Link::Up { .. }) && self.ledger.unstable_writes() > 0 {
            self.flush_peer();
        }
        self.release_grant_if_synced();
        self.pump();
    }

    /// An operator's command. Refusals are silent here: the role and states show the outcome.
    pub fn handle_command(&mut self, command: Command) {
        match command {
            Command::Primary => self.promote(),
            Command::Secondary => self.demote(),
            Command::Connect => {
                self.want_connect = true;
                self.retry_at = None;
            }
            Command::Disconnect => {
                self.want_connect = false;
                if self.link != Link::Down {
                    self.effects.push_back(Effect::DropLink { reason: "operator disconnect" });
                }
            }
            Command::DiscardMyData => {
                if self.role == Role::Secondary {
                    self.discard_my_data = true;
                }
            }
            Command::Invalidate => self.invalidate(),
            Command::Verify => self.start_verify(),
            Command::Down => self.go_down(),
        }
        self.pump();
    }

    /// The witness answered [`Effect::AskWitness`].
    pub fn handle_witness(&mut self, granted: bool) {
        if self.grant != Grant::Asked {
            return;
        }
        if granted {
            self.grant = Grant::Held;
            // A generation changes only while disconnected: a Hello already sent carries the
            // old one, and a peer that is back gets the marked blocks by resync anyway.
            if self.link != Link::Down {
                self.drop_witness_promotion();
            } else if self.promoting == Promoting::AskedWitness {
                // The disk may have changed while the witness answered.
                if check_promote(self.disk, Role::Unknown, false, false).is_ok() {
                    self.become_primary(true);
                } else {
                    self.promoting = Promoting::No;
                }
            }
        } else if self.link != Link::Down {
            // Connected again: the handshake has settled whose data is newer, and the peer
            // consents to the roles; the refusal is stale.
            self.grant = Grant::None;
            self.drop_witness_promotion();
        } else {
            self.grant = Grant::Refused;
            self.promoting = Promoting::No;
            if matches!(self.disk, DiskState::UpToDate | DiskState::Consistent) {
                self.disk = DiskState::Outdated;
                self.persist();
            }
            if self.role == Role::Primary {
                // The peer writes now: what waits for the witness here fails.
                self.set_role(Role::Secondary);
            }
        }
        self.pump();
    }

    /// A connection to the peer is established: the handshake starts.
    pub fn handle_link_up(&mut self) {
        self.link = Link::Handshake;
        self.hello_due = true;
        self.peer_took_over = false;
        // A promotion asked of the witness is void: the peer is back and will be asked.
        if self.promoting == Promoting::AskedWitness {
            self.promoting = Promoting::No;
        }
        self.pump();
    }

    /// Sends this node's Hello once no write admitted before the link came up is still to be
    /// dispatched (new ones wait while handshaking): the bitmap it carries then holds every
    /// block such a write marks, as the daemon holds writes and drains them before the bitmap
    /// exchange (seed 2140: a write dispatched after the Hello marked a block the sync target
    /// never learned of, and the resync never ended).
    pub(super) fn pump_hello(&mut self) {
        if self.link != Link::Handshake {
            return;
        }
        if self.hello_due {
            if !self.writes.is_drained_for_hello() || self.startup_flush_pending {
                return;
            }
            self.send_hello();
        }
        // The peer's Hello is taken once ours is out (the decision assumes both bitmaps known).
        if let Some(hello) = self.peer_hello.take() {
            self.handshake(hello);
        }
    }

    fn send_hello(&mut self) {
        self.hello_due = false;
        let dirty = self.bitmap.runs_from(0).map(|(first, len)| (first, first + len)).collect();
        let hello = Hello {
            gens: self.gens,
            role: self.role,
            disk: self.disk,
            crashed_primary: self.crashed_primary,
            discard_my_data: self.discard_my_data,
            node_id: self.cfg.node_id,
            dirty,
        };
        self.effects.push_back(Effect::Send(PeerMessage::Hello(hello)));
    }

    /// The connection ended (or never completed). Writes not stable on the peer are out of
    /// sync; a Primary needs the witness to go on writing alone.
    pub fn handle_link_down(&mut self) {
        if self.link == Link::Down {
            return;
        }
        self.link = Link::Down;
        self.hello_due = false;
        self.peer_hello = None;
        self.settling_since = None;
        let (lost, waiters) = self.ledger.fail_all();
        self.settle_peer_writes(&[], &lost);
        // The daemon's rule (seed 192651: a node that handed its role over took a generation
        // for its old writes, claimed to be newer than the Primary, and the pair never
        // connected again).
        if connection_plan::generation_on_link_loss(self.role, !lost.is_empty(), self.peer_took_over)
            .is_some()
        {
            self.new_generation();
        }
        self.writes.peer_lost(&waiters);
        for claim in self.applier.link_down() {
            self.writes.release(claim);
        }
        self.invalidating = false;
        self.verify_link_down();
        self.source = None;
        self.target = None;
        self.awaiting_sync_start = false;
        if self.promoting == Promoting::AskedPeer {
            self.promoting = Promoting::No;
        }
        if self.role == Role::Primary && self.grant == Grant::None {
            self.ask_witness();
        }
        self.pump();
    }

    /// A message from the peer on the current connection.
    pub fn handle_message(&mut self, message: PeerMessage<P>) {
        if self.link == Link::Down || self.disk == DiskState::Diskless {
            return;
        }
        match message {
            PeerMessage::Hello(hello) => self.peer_hello = Some(hello),
            PeerMessage::SyncStart { sync_uuid } => self.start_as_target(sync_uuid),
            PeerMessage::Ack { seq, answer } => self.peer_answered(seq, answer),
            PeerMessage::ResyncAck { offset, len } => self.resync_acked(offset, len),
            PeerMessage::ResyncRequest { offset, len, digest } => self.resync_requested(offset, len, digest),
            PeerMessage::PromoteRequest => self.peer_wants_promotion(),
            PeerMessage::PromoteAnswer { granted } => self.promotion_answered(granted),
            PeerMessage::Role { role } => {
                self.peer_took_over |= role == Role::Primary;
                if let Link::Up { peer_disk, .. } = self.link {
                    self.link = Link::Up { peer_role: role, peer_disk };
                }
            }
            PeerMessage::InvalidateRequest => self.peer_invalidates(),
            PeerMessage::InvalidateAnswer { granted } => self.invalidate_answered(granted),
            // Protocol B: answered on receipt (a failure later still sends its NegAck).
            m @ (PeerMessage::Write { seq, ack, .. } | PeerMessage::Trim { seq, ack, .. }) => {
                let asked = Asked::Write { seq, ack };
                if let Some(answer) = asked.on_receipt() {
                    self.send(PeerMessage::Ack { seq, answer });
                }
                self.applier.receive(m);
            }
            m @ (PeerMessage::VerifyRequest { .. }
            | PeerMessage::VerifyReply { .. }
            | PeerMessage::Flush { .. }
            | PeerMessage::ResyncData { .. }
            | PeerMessage::ResyncInSync { .. }
            | PeerMessage::ResyncDone { .. }) => self.applier.receive(m),
        }
        self.pump();
    }

    /// A disk or metadata request completed (`ok: false`: the disk failed it); a read's data.
    pub fn handle_disk(&mut self, io: IoId, ok: bool, data: Option<P>) {
        let Some(purpose) = self.io.remove(&io) else { return };
        let ignored = matches!(purpose, IoPurpose::Apply(_)) && self.cfg.bugs.has(Bug::IgnorePeerWriteError);
        let ok = ok || ignored;
        if !ok && !matches!(purpose, IoPurpose::Persist(_)) {
            // DRBD's on-io-error=detach: the disk is not trusted from now (what this request
            // was for fails below; the peer learns it when the link drops).
            self.detach();
        }
        match purpose {
            IoPurpose::Client(id) => self.client_io_done(id, ok, data),
            IoPurpose::AlFlush => self.al_flushed(ok),
            IoPurpose::StartupFlush => self.startup_flush_pending = false,
            IoPurpose::RetireFlush { mark } => self.retire_flushed(ok, mark),
            IoPurpose::Persist(n) => {
                self.persist_in_flight = None;
                if ok {
                    self.persist_durable = self.persist_durable.max(n);
                }
            }
            IoPurpose::Apply(position) => self.apply_done(position, ok),
            IoPurpose::ResyncRead { range, tag, resync, claimed } => {
                if claimed {
                    self.writes.release(range);
                }
                self.resync_read_done(range, tag, resync, ok, data)
            }
            IoPurpose::TargetFlush(resync) => self.target_flushed(resync, ok),
            IoPurpose::CsumRead(range, resync) => self.csum_read_done(range, resync, ok, data),
            IoPurpose::VerifyRead(position) => self.verify_applied(position, ok, data),
        }
        self.pump();
    }

    /// The data disk failed a request: this node goes Diskless. It answers client I/O with
    /// errors, is never promoted (no disk to check) and never a sync source, and leaves the
    /// connection, so the peer marks what it mirrored and did not hear back as out of sync.
    /// The metadata is not written again (it sits on the failed disk); attaching the disk
    /// again starts from it ([`NodeCore::restart`]), and the peer resyncs what it marked.
    fn detach(&mut self) {
        if self.disk == DiskState::Diskless {
            return;
        }
        self.disk = DiskState::Diskless;
        self.source = None;
        self.target = None;
        self.awaiting_sync_start = false;
        self.invalidating = false;
        self.invalidated_at = None;
        self.verifier = None;
        self.promoting = Promoting::No;
        if self.link != Link::Down {
            self.effects.push_back(Effect::DropLink { reason: "local disk failed: detached" });
        }
    }

    pub fn is_diskless(&self) -> bool {
        self.disk == DiskState::Diskless
    }

    // --- shared helpers for the other parts of the core ---

    pub(super) fn start_io(&mut self, purpose: IoPurpose) -> IoId {
        self.next_io += 1;
        self.io.insert(self.next_io, purpose);
        self.next_io
    }

    /// Asks for the metadata as it is now to be made durable; returns the image's number, for
    /// [`NodeCore::persisted`].
    pub(super) fn persist(&mut self) -> u64 {
        self.persist_wanted += 1;
        self.persist_wanted
    }

    /// Whether image `n` (or a later one) is durable.
    pub(super) fn persisted(&self, n: u64) -> bool {
        self.persist_durable >= n
    }

    fn image(&self) -> Persisted {
        Persisted {
            gens: self.gens,
            disk: self.disk,
            // Writes made as Primary may still be unflushed here while the log holds their
            // extents: a crash until then counts as a Primary's crash (DRBD's rule 40).
            primary: self.role == Role::Primary || self.crashed_primary || !self.logged.is_empty(),
            bitmap: self.bitmap.clone(),
            activity_log: self.logged.clone(),
        }
    }

    pub(super) fn random(&mut self) -> u64 {
        // splitmix64: deterministic per seed, good enough for identifiers.
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Writes the peer settled: `stable` ones may leave the activity log, `lost` ones are out of
    /// sync first.
    pub(super) fn settle_peer_writes(&mut self, stable: &[Range], lost: &[Range]) {
        for &(start, end) in lost {
            self.bitmap.set(DirtyBitmap::blocks_of(start, end - start, self.cfg.bitmap_block));
        }
        for &(start, end) in stable.iter().chain(lost) {
            for extent in extents_of(start, end - start) {
                self.al.end(extent);
            }
        }
    }

    /// Asks the peer to flush (a flush nobody waits for), unless one is on its way.
    pub(super) fn flush_peer(&mut self) {
        if let Some(seq) = self.ledger.start_auto_flush() {
            self.effects.push_back(Effect::Send(PeerMessage::Flush { seq }));
        }
    }

    pub(super) fn send(&mut self, message: PeerMessage<P>) {
        if self.link != Link::Down {
            self.effects.push_back(Effect::Send(message));
        }
    }

    pub(super) fn ask_witness(&mut self) {
        self.grant = Grant::Asked;
        self.effects.push_back(Effect::AskWitness);
    }

    /// A new data generation: this data differs (or is about to) from what the peer may have.
    /// Not again for a generation the peer never shared, but also with a bitmap identifier
    /// left by an unfinished resync as source (DRBD skips then): the current one may be the
    /// peer's too (it never got the SyncStart), and a peer that started a generation of its
    /// own from it would count as newer than this node's writes (seed 879769: a Primary
    /// refused forever as the target of its demoted peer). The bitmap identifier stays, so a
    /// target that did get the SyncStart is still behind by the bitmap.
    fn new_generation(&mut self) {
        if self.own_generation {
            return;
        }
        self.own_generation = true;
        let random = self.random();
        self.gens = self.gens.new_current(random, self.role == Role::Primary);
        self.persist();
    }

    /// Moves everything forward that waits on something that may have happened: the metadata
    /// writer, the Primary's queue, the applier and the sync source.
    pub(super) fn pump(&mut self) {
        loop {
            let before = (self.effects.len(), self.io.len(), self.persist_wanted);
            self.pump_writes();
            self.pump_hello();
            // Before the applier: the data counts as untrusted before resync data lands.
            self.pump_invalidated();
            self.pump_applier();
            self.pump_target();
            self.pump_source();
            self.pump_verify();
            let attached = self.disk != DiskState::Diskless;
            if attached && self.persist_in_flight.is_none() && self.persist_wanted > self.persist_durable {
                let n = self.persist_wanted;
                let io = self.start_io(IoPurpose::Persist(n));
                self.persist_in_flight = Some(n);
                let image = self.image();
                self.effects.push_back(Effect::Persist { io, image });
            }
            if (self.effects.len(), self.io.len(), self.persist_wanted) == before {
                break;
            }
        }
    }

    // --- the handshake ---

    fn view(&self) -> SideView {
        SideView {
            gens: self.gens,
            role: self.role,
            disk: self.disk,
            crashed_primary: self.crashed_primary,
            dirty_blocks: self.bitmap.dirty_blocks(),
            discard_my_data: self.discard_my_data,
            node_id: self.cfg.node_id,
        }
    }

    fn handshake(&mut self, hello: Hello) {
        if self.link != Link::Handshake {
            return;
        }
        let peer = SideView {
            gens: hello.gens,
            role: hello.role,
            disk: hello.disk,
            crashed_primary: hello.crashed_primary,
            dirty_blocks: hello.dirty.iter().map(|(a, b)| b - a).sum(),
            discard_my_data: hello.discard_my_data,
            node_id: hello.node_id,
        };
        // The daemon's plan, with the resource's policies and the Outdated rule of a node with
        // its supervisor.
        let (me, them) = if self.cfg.node_id == 0 { ("node0", "node1") } else { ("node1", "node0") };
        let settings = Settings {
            policies: &self.cfg.policies,
            rr_conflict: self.cfg.rr_conflict,
            me,
            peer: them,
            dialer: self.cfg.node_id == 0,
            outdated_loses: true,
        };
        let planned = connection_plan::plan(&self.view(), &peer, &settings);
        self.effects.push_back(Effect::Decided(planned.decision));
        self.discard_my_data = false;
        let go = match planned.plan {
            // A Primary a split-brain policy discards is not demoted here (the daemon demotes
            // it only when nothing uses the device, else both sides stand alone): either side
            // of such a plan stands alone.
            Plan::Proceed(go) if !go.give_up_primary && go.peer_role == hello.role => go,
            // rr-conflict retry-connect: not now, but again after a while (the Primary may be
            // demoted meanwhile), as the daemon waits its connect-interval.
            Plan::Refuse(refusal) if refusal.retry => {
                self.retry_at = Some(self.now + RETRY_CONNECT_AFTER);
                self.effects.push_back(Effect::DropLink { reason: planned.decision.reason });
                return;
            }
            // Two Primaries, a split brain left to the operator, unrelated data, no usable
            // source, a Primary that would be overwritten, a side without a disk: stand alone
            // until an operator acts.
            _ => {
                self.want_connect = false;
                self.effects.push_back(Effect::DropLink { reason: planned.decision.reason });
                return;
            }
        };
        if let Some(resolution) = planned.split_brain.and_then(|found| found.resolution) {
            let lost = resolution.local_loses();
            if lost && self.cfg.bugs.has(Bug::SplitBrainLoserKeepsData) {
                // Planted: the losing side goes on as if the two were in sync.
                self.link = Link::Up { peer_role: hello.role, peer_disk: go.disks.peer };
                self.own_generation = false;
                return;
            }
            self.effects.push_back(Effect::SplitBrainResolved { discarded_here: lost });
        }
        let outcome = go.decision.outcome;
        let pair = go.disks;
        self.link = Link::Up { peer_role: hello.role, peer_disk: pair.peer };
        // Replicating again: the peer may adopt this generation (a resync, or equal data).
        self.own_generation = false;
        self.grant = match self.grant {
            Grant::Refused => Grant::None,
            other => other,
        };
        if outcome.is_source() || outcome.is_target() {
            for &(start, end) in &hello.dirty {
                self.bitmap.set(start..end);
            }
            if outcome.is_full() {
                self.bitmap.set_all();
            }
        }
        if outcome.is_source() {
            let random = self.random();
            self.gens = self.gens.start_resync_as_source(random);
            self.disk = pair.local;
            // The rotated identifier is durable before the target adopts it: a source that
            // crashed before would not know the target's new current (unrelated data).
            let image = self.persist();
            self.resyncs += 1;
            self.source = Some(Source::starting(image, self.resyncs));
        } else if outcome.is_target() {
            self.awaiting_sync_start = true;
        } else if self.disk != pair.local {
            self.disk = pair.local;
            self.persist();
        }
        if outcome == SyncDecision::InSync && self.crashed_primary {
            self.crashed_primary = false;
            self.persist();
        }
    }

    // --- roles ---

    fn promote(&mut self) {
        let busy = self.promoting != Promoting::No || self.invalidating || self.startup_flush_pending;
        if self.role == Role::Primary || busy {
            return;
        }
        match self.link {
            // The peer's role is not known yet: refused.
            Link::Handshake if self.cfg.bugs.has(Bug::PromoteWithoutAskingPeer) => {
                // Planted: taken for a Secondary, as its Hello is still on its way.
                if check_promote(self.disk, Role::Secondary, true, false).is_ok() {
                    self.become_primary(false);
                }
            }
            Link::Handshake => {}
            Link::Up { peer_role, .. } => {
                if check_promote(self.disk, peer_role, true, false).is_ok() && self.is_established() {
                    if self.cfg.bugs.has(Bug::PromoteWithoutAskingPeer) {
                        // Planted: the last view of the peer's role decides, not the peer.
                        return self.become_primary(false);
                    }
                    self.promoting = Promoting::AskedPeer;
                    self.send(PeerMessage::PromoteRequest);
                }
            }
            Link::Down => {
                if check_promote(self.disk, Role::Unknown, false, false).is_err() {
                    return;
                }
                if self.cfg.bugs.has(Bug::PromoteWithoutQuorum) || self.grant == Grant::Held {
                    self.become_primary(true);
                } else if self.grant != Grant::Asked {
                    self.promoting = Promoting::AskedWitness;
                    self.ask_witness();
                }
            }
        }
    }

    /// Becomes Primary; `alone`: without the peer, so with a new data generation.
    fn become_primary(&mut self, alone: bool) {
        self.promoting = Promoting::No;
        self.set_role(Role::Primary);
        if alone {
            self.new_generation();
        }
    }

    fn set_role(&mut self, role: Role) {
        self.role = role;
        self.settling_since = None;
        if role == Role::Primary {
            // A Primary's data is what clients were told: an earlier --discard-my-data no longer
            // applies to it (seed 206865 discarded acknowledged writes this way).
            self.discard_my_data = false;
        }
        self.persist();
        self.send(PeerMessage::Role { role });
        self.effects.push_back(Effect::RoleChanged(role));
    }

    /// Refused while requests are in flight and, connected, until every write the peer has is
    /// stable there (it asks for the flush) or [`SETTLE`] passed since the first refusal: the
    /// daemon's demotion waits for the peer's flush as long (`give_up_primary`). A peer
    /// promoted next then holds what this node's clients were told is done.
    fn demote(&mut self) {
        if self.role != Role::Primary || !self.writes.is_idle() {
            return;
        }
        if matches!(self.link, Link::Up { .. }) && self.ledger.unstable_writes() > 0 {
            // A refusal long ago (the operator gave up then) does not count for this attempt.
            let since = match self.settling_since {
                Some(since) if self.now.saturating_sub(since) <= 2 * SETTLE => since,
                _ => *self.settling_since.insert(self.now),
            };
            if self.now.saturating_sub(since) < SETTLE {
                self.flush_peer();
                return;
            }
        }
        self.set_role(Role::Secondary);
    }

    /// `down`: demoted, and leaving the peer with everything. The writes it has are made
    /// stable there before the driver disconnects: a write it might lack would be this node's
    /// alone at the link loss (a new generation, see `handle_link_down`), and the switchover
    /// done by hand that follows (promote the peer, `up` here) would find a split brain instead
    /// of a resync from the new Primary. The data generation stays: the peer has all of it.
    fn go_down(&mut self) {
        if self.role == Role::Primary {
            if !self.writes.is_idle() {
                return;
            }
            if self.cfg.bugs.has(Bug::DownStartsNewGeneration) && matches!(self.link, Link::Up { .. }) {
                // Planted: as if writing without the peer from now on.
                self.new_generation();
            }
            self.set_role(Role::Secondary);
        }
        if matches!(self.link, Link::Up { .. }) && self.ledger.unstable_writes() > 0 {
            self.flush_peer();
        }
    }

    fn peer_wants_promotion(&mut self) {
        let asked = promotion::Asked {
            role: self.role,
            promoting: self.promoting == Promoting::AskedPeer,
            // The dialer wins a tie, as in the daemon's handshake.
            resolves_conflicts: self.cfg.node_id == 0,
        };
        let granted = promotion::answer(asked).is_ok();
        if granted {
            // Lost the tie, if there was one: the peer refuses this node's request in turn.
            if self.promoting == Promoting::AskedPeer {
                self.promoting = Promoting::No;
            }
            self.peer_took_over = true;
            if let Link::Up { peer_disk, .. } = self.link {
                self.link = Link::Up { peer_role: Role::Primary, peer_disk };
            }
        }
        self.send(PeerMessage::PromoteAnswer { granted });
    }

    /// A promotion asked of the witness is void once connected; one asked of the peer is not
    /// the witness's to end (seed 378732: a stale refusal ended it after the peer had consented,
    /// and the peer took this node for Primary from then on).
    fn drop_witness_promotion(&mut self) {
        if self.promoting == Promoting::AskedWitness {
            self.promoting = Promoting::No;
        }
    }

    fn promotion_answered(&mut self, granted: bool) {
        if self.promoting != Promoting::AskedPeer {
            if granted {
                // The peer now counts this node as Primary: tell it what it is.
                self.send(PeerMessage::Role { role: self.role });
            }
            return;
        }
        self.promoting = Promoting::No;
        if granted && matches!(self.link, Link::Up { .. }) {
            self.become_primary(false);
        }
    }

    /// Connected and in sync again: the right to write alone goes back to the witness.
    fn release_grant_if_synced(&mut self) {
        let synced = matches!(self.link, Link::Up { peer_disk: DiskState::UpToDate, .. })
            && self.is_established()
            && self.disk == DiskState::UpToDate;
        if self.grant == Grant::Held && synced {
            self.grant = Grant::None;
            self.effects.push_back(Effect::ReleaseWitness);
        }
    }

    /// The peer's resync made this node's data whole: it takes the source's lineage.
    pub(super) fn finish_as_target(&mut self, source: Generations) {
        self.gens = self.gens.finish_resync_as_target(&source);
        self.target = None;
        self.disk = DiskState::UpToDate;
        self.crashed_primary = false;
        self.awaiting_sync_start = false;
        if let Link::Up { peer_role, .. } = self.link {
            self.link = Link::Up { peer_role, peer_disk: DiskState::UpToDate };
        }
        self.persist();
    }

    fn start_as_target(&mut self, sync_uuid: u64) {
        if !self.awaiting_sync_start {
            return;
        }
        self.gens = self.gens.start_resync_as_target(sync_uuid);
        if !self.cfg.bugs.has(Bug::SyncTargetClaimsUpToDate) {
            self.disk = DiskState::Inconsistent;
        }
        let image = self.persist();
        // Resync data is asked for and written only once the disk is durably marked Inconsistent.
        self.applier.target_ready_at(image);
        self.start_target();
        self.effects.push_back(Effect::ResyncStarted { source: false });
    }
}
