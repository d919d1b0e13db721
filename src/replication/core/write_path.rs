//! The Primary's request path: a client request is admitted in order once its range is free
//! and its activity-log extents are logged, goes to the local disk and to the peer, and is
//! answered when both have it (protocol C) — or, without the peer, when the witness lets this
//! node write alone. A write keeps its extents in the log until it is on the local disk *and*
//! stable on the peer (or marked out of sync); an extent leaves the log only after a local
//! flush, so a power loss never loses a write the peer has without a mark.

use std::collections::{BTreeMap, VecDeque};

use rdbd_protocol::repl::AckMode;

use crate::metadata::activity_log::{extents_of, Begin, Transaction};
use crate::metadata::bitmap::DirtyBitmap;
use crate::replication::states::{DiskState, Role};

use super::bugs::Bug;
use super::io::{ClientId, ClientRequest, Effect, PeerMessage, Reply};
use super::ledger::{ack_for, Answer, Range, Request};
use super::node::{Grant, IoPurpose, Link, NodeCore};

/// Where the peer's part of a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerPart {
    Waiting,
    Done,
    /// Not sent, failed or lost: the peer may lack it (a write is marked out of sync).
    Missing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Write { range: Range, fua: bool },
    Flush,
    Read,
}

#[derive(Debug)]
struct Op<P> {
    kind: Kind,
    /// The local part: `None` while in flight, then whether it succeeded.
    local: Option<bool>,
    /// A FUA write's local flush is still to come after its write.
    fua_flush_pending: bool,
    peer: PeerPart,
    data: Option<P>,
    /// A write still holds its range (see [`WritePath::claim`]).
    claimed: bool,
    /// A write the ledger follows until it is stable on the peer.
    followed: bool,
}

/// An activity-log transaction on its way to the metadata.
#[derive(Debug)]
enum AlStep {
    /// Flushing the data before extents leave the log.
    Flushing(Transaction),
    /// The metadata image with this number records the transaction.
    Persisting(Transaction, u64),
    /// Flushing the data before idle extents retire.
    Retiring,
}

/// The Primary's requests in flight.
pub(super) struct WritePath<P> {
    queue: VecDeque<(ClientId, ClientRequest<P>)>,
    ops: BTreeMap<ClientId, Op<P>>,
    /// Ranges no other write or resync read may touch: writes in flight and resync reads.
    claims: Vec<Range>,
    al_step: Option<AlStep>,
    /// Admitted writes waiting for the activity-log transaction that logs their extents.
    al_waiting: Vec<(ClientId, ClientRequest<P>)>,
}

impl<P> Default for WritePath<P> {
    fn default() -> Self {
        Self {
            queue: VecDeque::new(),
            ops: BTreeMap::new(),
            claims: Vec::new(),
            al_step: None,
            al_waiting: Vec::new(),
        }
    }
}

fn release(claims: &mut Vec<Range>, range: Range) {
    if let Some(i) = claims.iter().position(|&r| r == range) {
        claims.swap_remove(i);
    }
}

fn overlaps(claims: &[Range], (start, end): Range) -> bool {
    claims.iter().any(|&(s, e)| s < end && start < e)
}

impl<P> WritePath<P> {
    /// No write admitted is still waiting for its activity-log transaction to be dispatched.
    pub(super) fn is_drained_for_hello(&self) -> bool {
        self.al_waiting.is_empty() && self.al_step.is_none()
    }

    pub(super) fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.ops.is_empty() && self.al_waiting.is_empty() && self.al_step.is_none()
    }

    /// Claims `range` for a resync read unless a write in flight overlaps it.
    pub(super) fn claim(&mut self, range: Range) -> bool {
        if overlaps(&self.claims, range) {
            return false;
        }
        self.claims.push(range);
        true
    }

    /// Whether a write in flight (or a resync read) holds part of `range`.
    pub(super) fn overlaps_claims(&self, range: Range) -> bool {
        overlaps(&self.claims, range)
    }

    pub(super) fn release(&mut self, range: Range) {
        release(&mut self.claims, range);
    }

    pub(super) fn describe(&self) -> String {
        format!(
            "queued {}, ops {:?}, claims {:?}, al step {}, al waiting {}",
            self.queue.len(),
            self.ops.iter().map(|(id, op)| (id, op.kind, op.local, op.peer)).collect::<Vec<_>>(),
            self.claims,
            self.al_step.is_some(),
            self.al_waiting.len()
        )
    }

    /// The link died: these requests will get no answer from the peer.
    pub(super) fn peer_lost(&mut self, waiters: &[ClientId]) {
        for id in waiters {
            if let Some(op) = self.ops.get_mut(id) {
                op.peer = PeerPart::Missing;
            }
        }
    }
}

impl<P: Clone + PartialEq> NodeCore<P> {
    /// A client request for this node's device.
    pub fn handle_client(&mut self, id: ClientId, request: ClientRequest<P>) {
        self.writes.queue.push_back((id, request));
        self.pump();
    }

    /// The peer has a disk to replicate to.
    fn replicating(&self) -> bool {
        matches!(self.link, Link::Up { peer_disk, .. } if peer_disk.has_disk())
    }

    pub(super) fn pump_writes(&mut self) {
        self.advance_al_step();
        self.admit();
        self.complete_ready();
    }

    /// Admits queued requests in order while they can start.
    fn admit(&mut self) {
        while let Some((id, request)) = self.writes.queue.front() {
            let id = *id;
            if self.role != Role::Primary || self.disk == DiskState::Diskless {
                self.writes.queue.pop_front();
                self.effects.push_back(Effect::Reply { client: id, reply: Reply::Failed });
                continue;
            }
            if self.link == Link::Handshake || self.writes.al_step.is_some() {
                return;
            }
            match request {
                ClientRequest::Read { offset, len } => {
                    // Cut off from the peer, this node's data may be stale (the peer may write
                    // now): reads wait for the witness, as writes do.
                    let range = (*offset, offset + len);
                    if !self.answers_writes() || self.range_busy(range) {
                        return;
                    }
                    let (offset, len) = (*offset, *len);
                    self.writes.queue.pop_front();
                    let io = self.start_io(IoPurpose::Client(id));
                    self.effects.push_back(Effect::Read { io, offset, len });
                    let op = Op {
                        kind: Kind::Read,
                        local: None,
                        fua_flush_pending: false,
                        peer: PeerPart::Done,
                        data: None,
                        claimed: false,
                        followed: false,
                    };
                    self.writes.ops.insert(id, op);
                }
                ClientRequest::Flush => {
                    // A node just promoted flushes only once its former Primary's writes are
                    // on this disk (seeds 437431, 489729, 745125: under protocols A and B a
                    // FLUSH here was answered before such a write landed; a power loss then
                    // lost it, and this node, a crashed Primary, became sync source).
                    if self.applier.holds_peer_writes() {
                        return;
                    }
                    self.writes.queue.pop_front();
                    self.start_flush(id);
                }
                ClientRequest::Write { offset, len, .. } | ClientRequest::Trim { offset, len } => {
                    let range = (*offset, offset + len);
                    if self.range_busy(range) {
                        return;
                    }
                    match self.log_extents(range) {
                        Begin::Full => return,
                        Begin::Hot => {
                            let request = self.writes.queue.pop_front().expect("front").1;
                            self.writes.claims.push(range);
                            self.dispatch_write(id, request);
                        }
                        Begin::Pending => {
                            let entry = self.writes.queue.pop_front().expect("front");
                            self.writes.claims.push(range);
                            self.writes.al_waiting.push(entry);
                            self.start_al_transaction();
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Another write is in flight on `range`: one of ours, a resync read, a range this node's
    /// verify compares, or one the peer sent that the applier has not finished — running
    /// (a node just promoted may still be applying its former Primary's writes; two overlapping
    /// writes in flight end in either order: seeds 1220138, 1636581) or still waiting (under
    /// protocol A or B the former Primary's client was answered before; seed 304173: a read
    /// right after a switchover returned the older data).
    fn range_busy(&self, range: Range) -> bool {
        overlaps(&self.writes.claims, range)
            || self.applier.overlaps_unfinished(range)
            || self.verify_holds(range)
    }

    /// Counts a write on its extents: `Hot` when all are logged, `Pending` when a transaction
    /// must log some first, `Full` (nothing counted) when the log has no free slot.
    fn log_extents(&mut self, (start, end): Range) -> Begin {
        let extents = extents_of(start, end - start);
        let mut result = Begin::Hot;
        for (n, extent) in extents.clone().enumerate() {
            match self.al.begin(extent) {
                Begin::Hot => {}
                Begin::Pending => result = Begin::Pending,
                Begin::Full => {
                    for undo in extents.clone().take(n) {
                        self.al.end(undo);
                    }
                    // Slots held by writes unstable on the peer free up at its next FlushAck.
                    if matches!(self.link, Link::Up { .. }) {
                        self.flush_peer();
                    }
                    return Begin::Full;
                }
            }
        }
        result
    }

    fn start_al_transaction(&mut self) {
        let Some(tx) = self.al.prepare() else {
            return self.al_logged();
        };
        if tx.evicted.is_empty() || self.cfg.bugs.has(Bug::RetireBeforeLocalFlush) {
            self.persist_al(tx);
        } else {
            // Evicted extents' writes must be on this disk before the log forgets them.
            let io = self.start_io(IoPurpose::AlFlush);
            self.effects.push_back(Effect::Flush { io });
            self.writes.al_step = Some(AlStep::Flushing(tx));
        }
    }

    fn persist_al(&mut self, tx: Transaction) {
        self.logged = self.al.active_extents().collect();
        let image = self.persist();
        self.writes.al_step = Some(AlStep::Persisting(tx, image));
    }

    pub(super) fn al_flushed(&mut self, ok: bool) {
        match self.writes.al_step.take() {
            Some(AlStep::Flushing(tx)) if ok => self.persist_al(tx),
            Some(AlStep::Flushing(tx)) => {
                // The flush failed: the transaction is not written; its writes fail.
                self.al.failed(tx);
                self.fail_al_waiting();
            }
            other => self.writes.al_step = other,
        }
    }

    fn advance_al_step(&mut self) {
        if let Some(AlStep::Persisting(_, image)) = &self.writes.al_step {
            if self.persisted(*image) {
                let Some(AlStep::Persisting(tx, _)) = self.writes.al_step.take() else { unreachable!() };
                self.al.committed(tx);
                if self.al.has_pending() {
                    self.start_al_transaction();
                } else {
                    self.al_logged();
                }
            }
        }
    }

    /// Every waiting write's extents are logged: they start — unless this node stopped being
    /// Primary meanwhile (the witness gave the peer the right to write; seed 1242453: such a
    /// write landed during the resync that made this node the peer's copy).
    fn al_logged(&mut self) {
        if self.role != Role::Primary {
            return self.fail_al_waiting();
        }
        for (id, request) in std::mem::take(&mut self.writes.al_waiting) {
            self.dispatch_write(id, request);
        }
    }

    fn fail_al_waiting(&mut self) {
        for (id, request) in std::mem::take(&mut self.writes.al_waiting) {
            if let ClientRequest::Write { offset, len, .. } | ClientRequest::Trim { offset, len } = request {
                self.writes.release((offset, offset + len));
                for extent in extents_of(offset, len) {
                    self.al.end(extent);
                }
            }
            self.effects.push_back(Effect::Reply { client: id, reply: Reply::Failed });
        }
    }

    /// Idle extents (no write began on them since `mark`, none holds them) leave the log,
    /// after a local flush makes their writes durable here.
    pub(super) fn retire_idle_extents(&mut self, mark: u64) {
        if self.writes.al_step.is_some() || self.al.unused_since(mark).is_empty() {
            return;
        }
        if self.cfg.bugs.has(Bug::RetireBeforeLocalFlush) {
            return self.retire_flushed(true, mark);
        }
        let io = self.start_io(IoPurpose::RetireFlush { mark });
        self.effects.push_back(Effect::Flush { io });
        self.writes.al_step = Some(AlStep::Retiring);
    }

    pub(super) fn retire_flushed(&mut self, ok: bool, mark: u64) {
        if matches!(self.writes.al_step, Some(AlStep::Retiring)) {
            self.writes.al_step = None;
        }
        if !ok || self.writes.al_step.is_some() {
            return;
        }
        if let Some(tx) = self.al.retire(|_| true, mark) {
            self.persist_al(tx);
        }
    }

    fn start_flush(&mut self, id: ClientId) {
        let io = self.start_io(IoPurpose::Client(id));
        self.effects.push_back(Effect::Flush { io });
        let peer = if self.replicating() {
            let seq = self.ledger.submit(Request::Flush, true, id);
            self.effects.push_back(Effect::Send(PeerMessage::Flush { seq }));
            PeerPart::Waiting
        } else {
            PeerPart::Missing
        };
        let op = Op {
            kind: Kind::Flush,
            local: None,
            fua_flush_pending: false,
            peer,
            data: None,
            claimed: false,
            followed: false,
        };
        self.writes.ops.insert(id, op);
    }

    /// A write (or TRIM) whose extents are logged goes to the local disk and the peer.
    fn dispatch_write(&mut self, id: ClientId, request: ClientRequest<P>) {
        let (offset, len, data, fua) = match request {
            ClientRequest::Write { offset, len, data, fua } => (offset, len, Some(data), fua),
            ClientRequest::Trim { offset, len } => (offset, len, None, false),
            _ => return,
        };
        let range = (offset, offset + len);
        let io = self.start_io(IoPurpose::Client(id));
        self.effects.push_back(match &data {
            Some(data) => Effect::Write { io, offset, len, data: data.clone() },
            None => Effect::Discard { io, offset, len },
        });
        if data.is_none() && self.replicating() && self.cfg.bugs.has(Bug::TrimNotReplicated) {
            // Planted: the TRIM counts as mirrored without being sent.
            let kind = Kind::Write { range, fua };
            let op = Op {
                kind,
                local: None,
                fua_flush_pending: false,
                peer: PeerPart::Done,
                data: None,
                claimed: true,
                followed: false,
            };
            self.writes.ops.insert(id, op);
            return;
        }
        let followed = self.replicating();
        let peer = if followed {
            // A second count on the extents, released when the peer has the write stably (the
            // first goes with the local write).
            if !self.cfg.bugs.has(Bug::ReleaseExtentBeforeLocalWrite) {
                for extent in extents_of(offset, len) {
                    self.al.begin(extent);
                }
            }
            let request = Request::Write { range, fua };
            let ack = ack_for(self.cfg.protocol, &request);
            let seq = self.ledger.submit(request, ack != AckMode::None, id);
            let message = match data {
                Some(data) => PeerMessage::Write { seq, offset, len, data, fua, ack },
                None => PeerMessage::Trim { seq, offset, len, ack },
            };
            self.effects.push_back(Effect::Send(message));
            // Protocol A: done for the client once handed to the link.
            if ack == AckMode::None {
                PeerPart::Done
            } else {
                PeerPart::Waiting
            }
        } else {
            self.bitmap.set(DirtyBitmap::blocks_of(offset, len, self.cfg.bitmap_block));
            PeerPart::Missing
        };
        let kind = Kind::Write { range, fua };
        let op = Op { kind, local: None, fua_flush_pending: fua, peer, data: None, claimed: true, followed };
        self.writes.ops.insert(id, op);
    }

    pub(super) fn client_io_done(&mut self, id: ClientId, ok: bool, data: Option<P>) {
        let Some(op) = self.writes.ops.get_mut(&id) else { return };
        let planted = op.followed && self.cfg.bugs.has(Bug::ReleaseExtentBeforeLocalWrite);
        if let Kind::Write { range: (start, end), .. } = op.kind {
            if op.local.is_none() && !planted {
                // The local write is done (or failed): its count on the extents ends.
                for extent in extents_of(start, end - start) {
                    self.al.end(extent);
                }
            }
        }
        if ok && op.fua_flush_pending && op.local.is_none() {
            // FUA: the write is done, now its flush.
            op.local = Some(true);
            let io = self.start_io(IoPurpose::Client(id));
            self.effects.push_back(Effect::Flush { io });
            return;
        }
        op.fua_flush_pending = false;
        // Detached meanwhile: a read's data or a write's success no longer counts.
        let attached = self.disk != DiskState::Diskless;
        op.local = Some(ok && attached && op.local != Some(false));
        op.data = data;
    }

    pub(super) fn peer_answered(&mut self, seq: u64, answer: Answer) {
        let Some(settled) = self.ledger.answer(seq, answer) else {
            self.effects
                .push_back(Effect::DropLink { reason: "the peer answered a request it was not sent" });
            return;
        };
        self.settle_peer_writes(&settled.stable, &settled.lost);
        if let Some((id, _)) = settled.waiter {
            if let Some(op) = self.writes.ops.get_mut(&id) {
                op.peer = if answer == Answer::Failed { PeerPart::Missing } else { PeerPart::Done };
            }
        }
        if answer == Answer::Failed {
            self.effects.push_back(Effect::DropLink { reason: "the peer failed a request" });
        }
    }

    /// Answers the requests whose parts are all done.
    fn complete_ready(&mut self) {
        // A write only this disk has is answered when the witness lets this node write alone, or
        // once the peer is back and a resync has given it every marked block; it fails once
        // this node is no longer Primary (the witness gave the peer the right to write).
        let synced = matches!(self.link, Link::Up { peer_disk: DiskState::UpToDate, .. })
            && self.is_established()
            && self.disk == DiskState::UpToDate;
        let alone_ok = self.grant == Grant::Held || synced;
        let alone_fails = self.role != Role::Primary;
        // A write waiting only for that permission frees its range, so that a resync can read
        // it (and so make it the peer's too).
        let frozen_keep = !alone_ok && self.cfg.bugs.has(Bug::FrozenWritesKeepClaims);
        for op in self.writes.ops.values_mut() {
            if let Kind::Write { range, .. } = op.kind {
                if frozen_keep && op.peer == PeerPart::Missing {
                    // Planted: a frozen write keeps its range until it is answered.
                    continue;
                }
                if op.claimed && op.local.is_some() && !op.fua_flush_pending && op.peer != PeerPart::Waiting {
                    op.claimed = false;
                    release(&mut self.writes.claims, range);
                }
            }
        }
        let ready: Vec<ClientId> = self
            .writes
            .ops
            .iter()
            .filter(|(_, op)| op.local.is_some() && !op.fua_flush_pending)
            .filter(|(_, op)| {
                let peer_ok = op.peer == PeerPart::Done
                    || (op.kind == Kind::Flush && self.cfg.bugs.has(Bug::AckFlushBeforePeer));
                peer_ok
                    || op.peer == PeerPart::Missing && (alone_ok || alone_fails || op.local == Some(false))
            })
            .map(|(&id, _)| id)
            .collect();
        let need_witness = self.writes.ops.values().any(|op| {
            op.local == Some(true)
                && !op.fua_flush_pending
                && op.peer == PeerPart::Missing
                && op.kind != Kind::Read
        }) && !alone_ok;
        for id in ready {
            let op = self.writes.ops.remove(&id).expect("listed above");
            if let (Kind::Write { range, .. }, true) = (op.kind, op.claimed) {
                self.writes.release(range);
            }
            let unanswerable = op.peer == PeerPart::Missing && !alone_ok && op.kind != Kind::Read;
            let reply = match (op.local, op.kind, op.data) {
                (Some(false), _, _) => Reply::Failed,
                _ if unanswerable => Reply::Failed,
                (_, Kind::Read, Some(data)) => Reply::Data(data),
                (_, Kind::Read, None) => Reply::Failed,
                _ => Reply::Done,
            };
            self.effects.push_back(Effect::Reply { client: id, reply });
        }
        if need_witness && self.grant == Grant::None && self.link == Link::Down {
            self.ask_witness();
        }
    }
}
