//! The receiving side of replication: applies the peer's writes to the local device and
//! acknowledges them as each message asks (none, on receipt, or once on disk). As a sync target
//! it also pulls the blocks its bitmap marks (SPEC §6): that I/O is in
//! [`super::resync::target_io`].
//!
//! Ordering: a write is started only when it overlaps no earlier write still in flight or
//! waiting, so overlapping writes land in the order they were sent whatever the protocol.
//! FLUSH is a barrier: every write received before it completes, then the device is made
//! durable (fdatasync), then FlushAck — so a FLUSH acknowledged means durable here too.

use std::sync::Arc;
use std::time::Duration;

use rdbd_protocol::repl::{append_digests, block_crc32c, AckMode, DigestAlg, Message, State};
use slab::Slab;
use tokio::sync::mpsc;
use tracing::warn;

use super::core::apply_order::{ApplyOrder, Order};
use super::core::ledger::Answer;
use super::core::peer_answers::Asked;
use super::device::ReplicatedDevice;
use super::disk_health::{DiskError, DiskOp};
use super::link::framed::{FrameError, Framed};
use super::resync::controller::STEP;
use super::resync::pace::ResyncConfig;
use super::resync::target::{Answers, ResyncTarget, Unrequested};
use super::resync::target_io::SyncTarget;
use crate::replication::states::{DiskState, Role};
use crate::storage::{BlockDevice, BufPool, Completion, IoError, IoOp, IoQueue};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("data block at offset {offset} failed its CRC-32C check")]
    Integrity { offset: u64 },
    #[error("peer sent a write beyond the device ({offset} + {len} > {size})")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("peer sent an unexpected message (kind {0:#x}) on the data channel")]
    Unexpected(u16),
    #[error("cannot open a queue on the local device: {0}")]
    Queue(std::io::Error),
    #[error("peer sent {0}")]
    UnrequestedResync(#[from] Unrequested),
    #[error("the sync source could not read {len} bytes at offset {offset} (errno {errno})")]
    SourceReadError { offset: u64, len: u32, errno: u32 },
    #[error("the resync could not be completed: {0}")]
    ResyncFinish(String),
    #[error("nothing heard from the peer for {0:?}: connection lost")]
    PeerSilent(Duration),
    #[error("peer disconnected: {0}")]
    Disconnected(String),
    #[error("{0}")]
    LocalDisk(DiskError),
    #[error("cannot record a write to this only copy in the metadata: {0}")]
    SoleCopyMetadata(String),
}

/// Counters of what was applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub writes: u64,
    pub bytes: u64,
    pub flushes: u64,
    pub failed: u64,
    /// Bytes received and written as resync data.
    pub resync_bytes: u64,
}

/// What the applier reports to the node that runs it.
pub trait ApplyEvents: Send {
    /// The peer announced a new role or disk state (raw wire values).
    fn peer_state(&mut self, role: Role, disk: DiskState);
    /// Every block was resynced and the source sent its final State: make this node's data
    /// UpToDate in the source's generation, durably. `bytes`: resync data received. Returns the
    /// (role, disk) to announce.
    fn resync_finished(&mut self, source: &State, bytes: u64) -> Result<(Role, DiskState), String>;
    /// The peer's verify asked for `len` bytes at `offset`, and their digests went back.
    fn verify_answered(&mut self, _offset: u64, _len: u32) {}
    /// The peer found these bytes out of sync (verify): mark them here too.
    fn out_of_sync(&mut self, _offset: u64, _len: u32) {}
    /// The peer's verify is over.
    fn verify_done(&mut self, _checked_bytes: u64, _out_of_sync_blocks: u64) {}
    /// The local disk failed a request: carry out `on-io-error` now, before the NegAck that
    /// follows tells the peer (which then takes this disk as no longer UpToDate).
    fn disk_failed(&mut self, _error: DiskError) {}
}

/// Events nobody listens to (tests, a plain replica).
pub struct NoEvents;

impl ApplyEvents for NoEvents {
    fn peer_state(&mut self, _: Role, _: DiskState) {}
    fn resync_finished(&mut self, _: &State, _: u64) -> Result<(Role, DiskState), String> {
        Err("no resync was expected".into())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::replication) enum Kind {
    /// An application write (Data, Trim, Zeroes).
    Write,
    /// An application FLUSH: a barrier.
    Flush,
    /// Resync data being written.
    ResyncWrite,
    /// The flush that makes written resync data durable before it is acknowledged.
    ResyncFlush,
    /// Reading a range to send its digests in a checksum-based resync request.
    CsumRead,
    /// Reading a range for the peer's online verify: ordered like a write, so it sees exactly
    /// the writes the peer sent before the request.
    VerifyRead,
    /// Reading for a Diskless Primary, ordered like a write: it sees every write sent before.
    PeerRead,
}

/// A request received and not yet acknowledged.
pub(in crate::replication) struct Received {
    pub(in crate::replication) seq: u64,
    pub(in crate::replication) ack: AckMode,
    /// Arrival index in the [`ApplyOrder`], set when it starts.
    pub(in crate::replication) index: u64,
    /// Byte range written (empty for a flush).
    pub(in crate::replication) range: (u64, u64),
    pub(in crate::replication) op: Option<IoOp>,
    pub(in crate::replication) kind: Kind,
}

impl Received {
    pub(in crate::replication) fn new(
        seq: u64,
        ack: AckMode,
        range: (u64, u64),
        op: IoOp,
        kind: Kind,
    ) -> Self {
        Self { seq, ack, index: 0, range, op: Some(op), kind }
    }

    /// What the peer asked to hear about this request (resync, verify and the Diskless
    /// Primary's reads are answered by their own messages).
    fn asked(&self) -> Option<Asked> {
        match self.kind {
            Kind::Write => Some(Asked::Write { seq: self.seq, ack: self.ack }),
            Kind::Flush => Some(Asked::Flush { seq: self.seq }),
            _ => None,
        }
    }
}

/// The frame of an answer: on receipt a RecvAck, once done (`done`) a WriteAck, FlushAck or
/// NegAck carrying `errno`.
fn ack_message(seq: u64, answer: Answer, done: bool, errno: u32) -> Message<'static> {
    match answer {
        Answer::Written if !done => Message::RecvAck { seq },
        Answer::Written => Message::WriteAck { seq },
        Answer::Flushed => Message::FlushAck { seq },
        Answer::Failed => Message::NegAck { seq, errno },
    }
}

impl Kind {
    /// How a request of this kind is ordered against the others (a verify read or a read for
    /// the Diskless Primary is ordered like a write: it must see exactly the writes sent before
    /// it).
    pub(in crate::replication) fn order(self, (start, end): (u64, u64)) -> Order {
        match self {
            Kind::Write | Kind::ResyncWrite | Kind::VerifyRead | Kind::PeerRead => Order::Range(start, end),
            Kind::Flush => Order::Barrier,
            // The target's flush is issued only when no resync write is in flight; a checksum
            // read racing a write only makes the digests differ (then the source sends the block).
            Kind::ResyncFlush | Kind::CsumRead => Order::Unordered,
        }
    }

    /// Goes to the resync queue (when there is one).
    fn is_resync_io(self) -> bool {
        matches!(self, Kind::ResyncWrite | Kind::CsumRead)
    }
}

/// Tag bit of operations on the resync queue.
pub(in crate::replication) const RESYNC_QUEUE: u32 = 1 << 31;

/// Applies the peer's replication stream to a device.
pub struct Applier {
    pub(in crate::replication) queue: Box<dyn IoQueue>,
    /// Resync writes go to their own queue on the device opened for resync (O_DIRECT where
    /// possible: a bulk copy has nothing to gain from the page cache); its tags carry
    /// [`RESYNC_QUEUE`].
    pub(in crate::replication) resync_queue: Option<Box<dyn IoQueue>>,
    pub(in crate::replication) pool: BufPool,
    pub(in crate::replication) integrity: bool,
    pub(in crate::replication) size: u64,
    /// Started on the device; the key is the queue tag.
    pub(in crate::replication) running: Slab<Received>,
    /// Received and not started: held back by an overlap or a barrier.
    pub(in crate::replication) order: ApplyOrder<Received>,
    pub(in crate::replication) acks: Vec<Message<'static>>,
    /// Digests being encoded (reused).
    pub(in crate::replication) digests: Vec<u8>,
    /// The local disk failed a request: the connection ends once the NegAck is out, and the
    /// next handshake finds the disk detached (or Inconsistent, under pass_on).
    pub(in crate::replication) disk_failure: Option<DiskError>,
    /// The device whose bitmap records what this node writes while it holds the only copy (its
    /// peer is a Diskless Primary).
    pub(in crate::replication) tracker: Option<Arc<ReplicatedDevice>>,
    /// Frames for the peer's data channel (resync requests, verify replies, state changes),
    /// encoded, since some carry digests computed here.
    pub(in crate::replication) outgoing: Vec<u8>,
    /// Digest and block size of online verify, as agreed in Params.
    pub(in crate::replication) verify_alg: DigestAlg,
    pub(in crate::replication) block: u32,
    /// This node's operator asks for a verify (from this offset): sent to the peer, which
    /// drives it.
    pub(in crate::replication) verify_starts: Option<mpsc::UnboundedReceiver<u64>>,
    pub(in crate::replication) completions: Vec<Completion>,
    pub(in crate::replication) resync: Option<SyncTarget>,
    /// What the resync bookkeeping decided to acknowledge (reused).
    pub(in crate::replication) answers: Answers,
    pub(in crate::replication) events: Box<dyn ApplyEvents>,
    /// Silence on both channels for this long means the peer is gone.
    pub(in crate::replication) silence_limit: Option<Duration>,
    pub stats: ApplyStats,
}

impl Applier {
    pub fn new(device: Arc<dyn BlockDevice>, integrity: bool) -> Result<Self, ApplyError> {
        let size = device.info().size;
        let queue = device.open_queue().map_err(ApplyError::Queue)?;
        Ok(Self {
            queue,
            resync_queue: None,
            pool: BufPool::new(),
            integrity,
            size,
            running: Slab::new(),
            order: ApplyOrder::default(),
            acks: Vec::new(),
            outgoing: Vec::new(),
            digests: Vec::new(),
            disk_failure: None,
            tracker: None,
            verify_alg: DigestAlg::Sha256,
            block: 4096,
            verify_starts: None,
            completions: Vec::new(),
            resync: None,
            answers: Answers::default(),
            events: Box::new(NoEvents),
            silence_limit: None,
            stats: ApplyStats::default(),
        })
    }

    /// Also pulls the blocks `device`'s bitmap marks, as the sync target, paced by `pace`, with
    /// checksum requests when `csums` is set.
    pub fn with_resync(
        mut self,
        device: Arc<ReplicatedDevice>,
        pace: ResyncConfig,
        csums: Option<DigestAlg>,
    ) -> Result<Self, ApplyError> {
        self.resync_queue = Some(device.resync_local().open_queue().map_err(ApplyError::Queue)?);
        let origin = std::time::Instant::now();
        let target =
            ResyncTarget::new(device.info_size(), device.bitmap_block(), pace, csums, Duration::ZERO);
        self.resync = Some(SyncTarget { target, device, origin });
        Ok(self)
    }

    fn in_flight(&self) -> usize {
        self.queue.in_flight() + self.resync_queue.as_ref().map_or(0, |q| q.in_flight())
    }

    /// Completions from both queues (resync tags marked), registering `cx` with both.
    fn poll_queues(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let before = self.completions.len();
        let _ = self.queue.poll_complete(cx, &mut self.completions);
        if let Some(q) = self.resync_queue.as_mut() {
            let start = self.completions.len();
            let _ = q.poll_complete(cx, &mut self.completions);
            for c in &mut self.completions[start..] {
                c.tag &= !RESYNC_QUEUE;
            }
        }
        if self.completions.len() > before || self.in_flight() == 0 {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }

    /// Marks every write in `device`'s bitmap, durably, while it holds the only copy.
    pub fn with_tracker(mut self, device: Arc<ReplicatedDevice>) -> Self {
        self.tracker = Some(device);
        self
    }

    pub fn with_events(mut self, events: Box<dyn ApplyEvents>) -> Self {
        self.events = events;
        self
    }

    /// Answers the peer's online verify with `alg` digests per `block` bytes, and forwards this
    /// node's requests for a verify (`starts`) to the peer.
    pub fn with_verify(mut self, alg: DigestAlg, block: u32, starts: mpsc::UnboundedReceiver<u64>) -> Self {
        self.verify_alg = alg;
        self.block = block;
        self.verify_starts = Some(starts);
        self
    }

    /// Declares the peer dead after `limit` without any frame (the primary pings when idle).
    pub fn with_silence_limit(mut self, limit: Duration) -> Self {
        self.silence_limit = Some(limit);
        self
    }

    /// Applies messages from `data` and acknowledges on `meta` until the peer closes the data
    /// channel; then finishes what is in flight. When the link fails instead, what was received
    /// still reaches the disk (see [`Applier::finish_received`]).
    pub async fn run(&mut self, data: &mut Framed, meta: &mut Framed) -> Result<ApplyStats, ApplyError> {
        let result = self.serve(data, meta).await;
        if let Err(e) = &result {
            if !matches!(e, ApplyError::LocalDisk(_)) {
                self.finish_received().await;
            }
        }
        result
    }

    /// The link failed: the peer's requests received still reach the disk, in order and
    /// unanswered (the peer marks them out of sync all the same), since this node may be
    /// promoted next for clients that were told they are done — as the simulator's core does
    /// (seed 60293: a new Primary dropped its former Primary's queued write, which its client's
    /// FLUSH then counted durable). Not after a disk failure: nothing more goes to that disk.
    async fn finish_received(&mut self) {
        loop {
            self.acks.clear();
            self.outgoing.clear();
            self.start_ready();
            if self.running.is_empty() {
                // Nothing runs, so nothing can unblock what may still wait: done.
                return;
            }
            std::future::poll_fn(|cx| self.poll_queues(cx)).await;
            if self.completions.is_empty() && self.in_flight() == 0 {
                // Nothing on the disk to wait for: never spin.
                return;
            }
            for c in std::mem::take(&mut self.completions) {
                self.complete(c);
            }
            if self.disk_failure.is_some() {
                return;
            }
        }
    }

    async fn serve(&mut self, data: &mut Framed, meta: &mut Framed) -> Result<ApplyStats, ApplyError> {
        let mut open = true;
        let mut meta_open = true;
        let mut disconnect_reason = None;
        // Without a limit, a day stands for "never" (an Instant cannot hold more without overflow).
        let silence = self.silence_limit.unwrap_or(Duration::from_secs(86_400));
        let mut heard = tokio::time::Instant::now();
        let mut verify_starts = self.verify_starts.take();
        // The resync controller's steps.
        let mut tick = tokio::time::interval(STEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.pump_resync();
        while open || !self.running.is_empty() || self.order.waiting() > 0 {
            // Everything due goes out in one write per channel.
            if !self.acks.is_empty() {
                meta.send_all(&self.acks).await?;
                self.acks.clear();
            }
            if !self.outgoing.is_empty() {
                data.halves().1.write_encoded(&self.outgoing).await?;
                self.outgoing.clear();
            }
            let busy = self.in_flight() > 0;
            tokio::select! {
                received = data.recv(), if open => {
                    heard = tokio::time::Instant::now();
                    match received {
                        Ok(Message::Disconnect { reason }) => {
                            disconnect_reason = Some(reason.to_owned());
                            open = false;
                        }
                        Ok(message) => self.accept(message)?,
                        Err(FrameError::Closed) => open = false,
                        Err(e) => return Err(e.into()),
                    }
                },
                // The primary's liveness pings arrive on the meta channel.
                received = meta.recv(), if meta_open => {
                    heard = tokio::time::Instant::now();
                    match received {
                        Ok(Message::Ping) => self.acks.push(Message::PingAck),
                        Ok(Message::PingAck) => {}
                        Ok(other) => return Err(ApplyError::Unexpected(other.kind())),
                        Err(FrameError::Closed) => meta_open = false,
                        Err(e) => return Err(e.into()),
                    }
                },
                () = std::future::poll_fn(|cx| self.poll_queues(cx)), if busy => {
                    for c in std::mem::take(&mut self.completions) {
                        self.complete(c);
                    }
                }
                () = tokio::time::sleep_until(heard + silence), if open => {
                    return Err(ApplyError::PeerSilent(silence));
                }
                start = next_start(&mut verify_starts) => {
                    match start {
                        Some(offset) => Message::VerifyStart { offset }.encode(&mut self.outgoing),
                        None => verify_starts = None,
                    }
                }
                _ = tick.tick(), if self.resync.is_some() => {
                    if let Some(sync) = self.resync.as_mut() {
                        sync.target.step();
                    }
                }
            }
            // Everything the last read brought is handled before anything is answered, so one
            // ack frame batch goes back per read instead of one per write.
            while open {
                match data.recv_buffered() {
                    None => break,
                    Some(Ok(Message::Disconnect { reason })) => {
                        disconnect_reason = Some(reason.to_owned());
                        open = false;
                    }
                    Some(Ok(message)) => self.accept(message)?,
                    Some(Err(e)) => return Err(e.into()),
                }
            }
            self.start_ready();
            self.collect_ready_completions();
            self.pump_resync();
            if let Some(failure) = self.disk_failure.take() {
                // The NegAck and OutOfSync go out first: the peer marks what this disk failed.
                meta.send_all(&self.acks).await?;
                data.halves().1.write_encoded(&self.outgoing).await?;
                return Err(ApplyError::LocalDisk(failure));
            }
            if !open && self.in_flight() == 0 && self.order.waiting() > 0 && self.running.is_empty() {
                // Nothing can unblock what waits: cannot happen, but never spin.
                break;
            }
        }
        meta.send_all(&self.acks).await?;
        self.acks.clear();
        match disconnect_reason {
            Some(reason) => Err(ApplyError::Disconnected(reason)),
            None => Ok(self.stats),
        }
    }

    /// Takes the completions that are ready now (writes copied into the page cache complete at
    /// once), without waiting, so their acks join this round's batch.
    fn collect_ready_completions(&mut self) {
        if self.in_flight() == 0 {
            return;
        }
        // The task's own waker is registered again by the select's poll before it sleeps.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let _ = self.poll_queues(&mut cx);
        for c in std::mem::take(&mut self.completions) {
            self.complete(c);
        }
        self.start_ready();
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(u64, u64), ApplyError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok((offset, end)),
            _ => Err(ApplyError::OutOfRange { offset, len, size: self.size }),
        }
    }

    fn accept(&mut self, message: Message<'_>) -> Result<(), ApplyError> {
        if self.disk_failure.is_some() {
            // The connection ends after this round: nothing more reaches the failed disk.
            return Ok(());
        }
        if let (Some(device), Message::Data(_) | Message::Trim(_) | Message::Zeroes(_)) =
            (&self.tracker, &message)
        {
            if device.sole_copy() {
                let (offset, len) = match &message {
                    Message::Data(d) => (d.offset, d.data.len() as u64),
                    Message::Trim(t) => (t.offset, t.len),
                    Message::Zeroes(z) => (z.offset, z.len),
                    _ => unreachable!("matched above"),
                };
                let range = self.check_range(offset, len)?;
                device.mark_durably(range).map_err(|e| ApplyError::SoleCopyMetadata(e.to_string()))?;
            }
        }
        let (seq, ack, range, op, kind) = match message {
            Message::Data(d) => {
                if self.integrity && block_crc32c(d.data) != d.crc32c {
                    return Err(ApplyError::Integrity { offset: d.offset });
                }
                let range = self.check_range(d.offset, d.data.len() as u64)?;
                let mut buf = self.pool.take(d.data.len());
                buf.copy_from_slice(d.data);
                (d.seq, d.ack, range, IoOp::Write { offset: d.offset, buf, fua: d.fua }, Kind::Write)
            }
            Message::Trim(t) => {
                let range = self.check_range(t.offset, t.len)?;
                (t.seq, t.ack, range, IoOp::Trim { offset: t.offset, len: t.len, fua: t.fua }, Kind::Write)
            }
            Message::Zeroes(z) => {
                let range = self.check_range(z.offset, z.len)?;
                let op = IoOp::WriteZeroes {
                    offset: z.offset,
                    len: z.len,
                    may_punch: z.may_punch,
                    fast_only: false,
                    fua: z.fua,
                };
                (z.seq, z.ack, range, op, Kind::Write)
            }
            Message::Flush { seq } => (seq, AckMode::Write, (0, 0), IoOp::Flush, Kind::Flush),
            Message::ResyncData(d) => return self.resync_data(d.offset, d.data, d.crc32c),
            Message::ResyncInSync { offset, len } => return self.resync_in_sync(offset, len),
            Message::VerifyRequest { offset, len } => {
                let range = self.check_range(offset, u64::from(len))?;
                let buf = self.pool.take(len as usize);
                (0, AckMode::None, range, IoOp::Read { offset, buf }, Kind::VerifyRead)
            }
            Message::ReadRequest { seq, offset, len } => {
                let range = self.check_range(offset, u64::from(len))?;
                let buf = self.pool.take(len as usize);
                (seq, AckMode::None, range, IoOp::Read { offset, buf }, Kind::PeerRead)
            }
            Message::OutOfSync { offset, len } => {
                self.check_range(offset, u64::from(len))?;
                self.events.out_of_sync(offset, len);
                return Ok(());
            }
            Message::VerifyDone { checked_bytes, out_of_sync_blocks } => {
                self.events.verify_done(checked_bytes, out_of_sync_blocks);
                return Ok(());
            }
            Message::ResyncReadError { offset, len, errno } => {
                return Err(ApplyError::SourceReadError { offset, len, errno })
            }
            Message::State(state) => return self.resync_end(&state),
            Message::StateChange { role, disk } => {
                self.events.peer_state(role, disk);
                return Ok(());
            }
            other => {
                tracing::warn!(message = ?other, "unexpected on the data channel");
                return Err(ApplyError::Unexpected(other.kind()));
            }
        };
        self.enqueue(seq, ack, range, op, kind);
        Ok(())
    }

    pub(in crate::replication) fn enqueue(
        &mut self,
        seq: u64,
        ack: AckMode,
        range: (u64, u64),
        op: IoOp,
        kind: Kind,
    ) {
        let received = Received::new(seq, ack, range, op, kind);
        if let Some(answer) = received.asked().and_then(Asked::on_receipt) {
            self.acks.push(ack_message(seq, answer, false, 0));
        }
        self.order.push(kind.order(range), received);
    }

    /// Starts every waiting request that no earlier request holds back.
    pub(in crate::replication) fn start_ready(&mut self) {
        let Self { order, running, queue, resync_queue, .. } = self;
        order.start_ready(|index, mut r| {
            r.index = index;
            let op = r.op.take().expect("waiting requests hold their operation");
            let resync = r.kind.is_resync_io();
            let tag = running.insert(r) as u32;
            match resync_queue.as_mut() {
                Some(q) if resync => q.submit(tag | RESYNC_QUEUE, op),
                _ => queue.submit(tag, op),
            }
        });
    }

    /// Reports a failure of the local disk (once per connection: the connection ends).
    pub(in crate::replication) fn disk_failed(&mut self, op: DiskOp, offset: Option<u64>, error: IoError) {
        let failure = DiskError::new(op, offset, error);
        if self.disk_failure.is_none() {
            self.events.disk_failed(failure.clone());
            self.disk_failure = Some(failure);
        }
    }

    /// This disk could not read `range`: the peer marks it, so that the resync to this disk
    /// (attached again, or Inconsistent under pass_on) rewrites it.
    fn read_failed(&mut self, range: (u64, u64), error: IoError) {
        let len = (range.1 - range.0) as u32;
        Message::OutOfSync { offset: range.0, len }.encode(&mut self.outgoing);
        self.disk_failed(DiskOp::Read, Some(range.0), error);
    }

    fn complete(&mut self, c: Completion) {
        let Some(r) = self.running.try_remove(c.tag as usize) else { return };
        self.order.done(r.index);
        if r.kind == Kind::PeerRead {
            return self.peer_read_done(r, c);
        }
        if matches!(r.kind, Kind::CsumRead | Kind::VerifyRead) {
            return self.digests_read(r, c);
        }
        if let Some(buf) = c.buf {
            self.pool.give(buf);
        }
        match r.kind {
            Kind::Flush => self.stats.flushes += 1,
            Kind::Write => {
                self.stats.writes += 1;
                self.stats.bytes += r.range.1 - r.range.0;
            }
            Kind::ResyncWrite => return self.resync_written(r.seq, r.range.0, c.result),
            Kind::ResyncFlush => return self.resync_flushed(c.result),
            Kind::CsumRead | Kind::VerifyRead | Kind::PeerRead => unreachable!("handled above"),
        }
        let mut errno = 0;
        if let Err(e) = c.result {
            // This disk leaves UpToDate first (on-io-error), then the peer marks the range
            // out of sync (or every write the flush covered) on the NegAck.
            self.stats.failed += 1;
            if let IoError::Io(_) = e {
                let (op, offset) = if r.kind == Kind::Flush {
                    (DiskOp::Flush, None)
                } else {
                    (DiskOp::Write, Some(r.range.0))
                };
                self.disk_failed(op, offset, e);
            }
            errno = errno_of(e);
        }
        if let Some(answer) = r.asked().and_then(|asked| asked.on_done(c.result.is_ok())) {
            self.acks.push(ack_message(r.seq, answer, true, errno));
        }
    }

    /// A read for the Diskless Primary finished: its data goes back, or a NegAck.
    fn peer_read_done(&mut self, r: Received, c: Completion) {
        match (c.result, c.buf) {
            (Ok(()), Some(buf)) => {
                Message::ReadReply { seq: r.seq, data: &buf }.encode(&mut self.outgoing);
                self.pool.give(buf);
            }
            (result, buf) => {
                if let Some(buf) = buf {
                    self.pool.give(buf);
                }
                let e = result.err().unwrap_or(IoError::Io(libc::EIO));
                warn!(offset = r.range.0, "reading for the Diskless Primary failed: {e}");
                self.read_failed(r.range, e);
                self.acks.push(Message::NegAck { seq: r.seq, errno: errno_of(e) });
            }
        }
    }

    /// A read for digests finished: the checksum request or the verify reply goes out. A read
    /// error ends the connection (this disk is failing; the peer treats it as lost).
    fn digests_read(&mut self, r: Received, c: Completion) {
        let (offset, len) = (r.range.0, (r.range.1 - r.range.0) as u32);
        let Some(buf) = c.buf.filter(|_| c.result.is_ok()) else {
            warn!(offset, len, "reading for digests failed: {:?}", c.result);
            self.read_failed(r.range, c.result.err().unwrap_or(IoError::Io(libc::EIO)));
            return;
        };
        self.digests.clear();
        match r.kind {
            Kind::CsumRead => {
                let Some(alg) = self.resync.as_ref().and_then(|s| s.target.csums()) else { return };
                append_digests(alg, self.block as usize, &buf, &mut self.digests);
                Message::ResyncCsumRequest { offset, len, digests: &self.digests }.encode(&mut self.outgoing);
            }
            _ => {
                append_digests(self.verify_alg, self.block as usize, &buf, &mut self.digests);
                Message::VerifyReply { offset, len, digests: &self.digests }.encode(&mut self.outgoing);
                self.events.verify_answered(offset, len);
            }
        }
        self.pool.give(buf);
    }
}

async fn next_start(starts: &mut Option<mpsc::UnboundedReceiver<u64>>) -> Option<u64> {
    match starts {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

pub(in crate::replication) fn errno_of(e: IoError) -> u32 {
    match e {
        IoError::Io(errno) => errno as u32,
        IoError::NoSpace => libc::ENOSPC as u32,
        IoError::ReadOnly => libc::EROFS as u32,
        IoError::NotSupported => libc::EOPNOTSUPP as u32,
        IoError::Shutdown => libc::ESHUTDOWN as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{FileDevice, OpenOptions};
    use rdbd_protocol::repl::Data;
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (Framed, Framed) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (Framed::new(a.unwrap()).unwrap(), Framed::new(b.unwrap().0).unwrap())
    }

    /// A file device of `size` bytes in `dir`, and its path.
    fn file_device(dir: &tempfile::TempDir, size: u64) -> (Arc<dyn BlockDevice>, std::path::PathBuf) {
        let path = dir.path().join("disk.img");
        let opts = OpenOptions { size: Some(size), ..Default::default() };
        (Arc::new(FileDevice::open_file(&path, &opts).unwrap()), path)
    }

    fn data(seq: u64, offset: u64, bytes: &[u8], ack: AckMode) -> Message<'_> {
        Message::Data(Data { seq, offset, fua: false, ack, crc32c: block_crc32c(bytes), data: bytes })
    }

    /// The primary's side of the test: sends `messages`, closes, collects every ack.
    async fn primary(mut data: Framed, mut meta: Framed, messages: Vec<Message<'_>>) -> Vec<String> {
        for m in &messages {
            data.send(m).await.unwrap();
        }
        drop(data);
        let mut acks = Vec::new();
        while let Ok(m) = meta.recv().await {
            acks.push(format!("{m:?}"));
        }
        acks
    }

    #[tokio::test(flavor = "current_thread")]
    async fn writes_are_applied_in_order_and_acknowledged_as_asked() {
        let dir = tempfile::tempdir().unwrap();
        let (device, path) = file_device(&dir, 8 << 20);
        let ((pd, sd), (pm, sm)) = (pair().await, pair().await);

        // Overlapping writes without write acks (protocol A) must land in sending order;
        // the last one to the same bytes wins.
        let first = vec![1u8; 65536];
        let second = vec![2u8; 4096];
        let third = vec![3u8; 8192];
        let messages = vec![
            data(1, 0, &first, AckMode::None),
            data(2, 4096, &second, AckMode::None),
            data(3, 1 << 20, &third, AckMode::Recv),
            data(4, 2 << 20, &third, AckMode::Write),
            Message::Zeroes(rdbd_protocol::repl::Zeroes {
                seq: 5,
                offset: 6000,
                len: 100,
                may_punch: false,
                fua: false,
                ack: AckMode::Write,
            }),
            Message::Flush { seq: 6 },
        ];
        let mut applier = Applier::new(device, true).unwrap();
        let (mut sd, mut sm) = (sd, sm);
        let (acks, stats) = tokio::join!(primary(pd, pm, messages), async move {
            let stats = applier.run(&mut sd, &mut sm).await.unwrap();
            drop(sm);
            stats
        });
        assert_eq!(
            stats,
            ApplyStats {
                writes: 5,
                bytes: 65536 + 4096 + 8192 + 8192 + 100,
                flushes: 1,
                failed: 0,
                resync_bytes: 0
            }
        );
        assert!(acks.contains(&"RecvAck { seq: 3 }".to_string()), "{acks:?}");
        assert!(acks.contains(&"WriteAck { seq: 4 }".to_string()), "{acks:?}");
        assert!(acks.contains(&"WriteAck { seq: 5 }".to_string()), "{acks:?}");
        assert_eq!(
            acks.last().map(String::as_str),
            Some("FlushAck { seq: 6 }"),
            "the barrier is acknowledged last"
        );
        assert!(!acks.iter().any(|a| a.contains("seq: 1 ") || a.contains("seq: 2 ")), "protocol A: no acks");

        let disk = std::fs::read(&path).unwrap();
        assert!(disk[..4096].iter().all(|&b| b == 1));
        assert!(disk[4096..6000].iter().all(|&b| b == 2), "the later overlapping write wins");
        assert!(disk[6000..6100].iter().all(|&b| b == 0), "zeroed");
        assert!(disk[6100..8192].iter().all(|&b| b == 2));
        assert!(disk[8192..65536].iter().all(|&b| b == 1));
        assert!(disk[1 << 20..(1 << 20) + 8192].iter().all(|&b| b == 3));
    }

    /// The link fails (here: a frame that is not one) after two overlapping writes arrived in
    /// one read: the second waited behind the first, and still reaches the disk.
    #[tokio::test(flavor = "current_thread")]
    async fn writes_received_before_the_link_failed_still_reach_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (device, path) = file_device(&dir, 1 << 20);
        let ((mut pd, mut sd), (_pm, mut sm)) = (pair().await, pair().await);
        let (first, second) = (vec![1u8; 65536], vec![2u8; 4096]);
        let mut frames = Vec::new();
        data(1, 0, &first, AckMode::Write).encode(&mut frames);
        data(2, 0, &second, AckMode::Write).encode(&mut frames);
        frames.extend_from_slice(&[0xEE; 64]);
        pd.halves().1.write_encoded(&frames).await.unwrap();
        let mut applier = Applier::new(device, true).unwrap();
        let err = applier.run(&mut sd, &mut sm).await.unwrap_err();
        assert!(matches!(err, ApplyError::Frame(_)), "{err}");
        let disk = std::fs::read(&path).unwrap();
        assert!(disk[..4096].iter().all(|&b| b == 2), "the second write landed, after the first");
        assert!(disk[4096..65536].iter().all(|&b| b == 1));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_corrupted_block_and_an_out_of_range_write_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let opts = OpenOptions { size: Some(1 << 20), ..Default::default() };
        let device: Arc<dyn BlockDevice> =
            Arc::new(FileDevice::open_file(&dir.path().join("d.img"), &opts).unwrap());
        for (offset, crc_ok) in [(0u64, false), (1 << 20, true)] {
            let ((mut pd, mut sd), (_pm, mut sm)) = (pair().await, pair().await);
            let bytes = vec![7u8; 4096];
            let crc = if crc_ok { block_crc32c(&bytes) } else { 12345 };
            let m = Message::Data(Data {
                seq: 1,
                offset,
                fua: false,
                ack: AckMode::Write,
                crc32c: crc,
                data: &bytes,
            });
            pd.send(&m).await.unwrap();
            let mut applier = Applier::new(device.clone(), true).unwrap();
            let err = applier.run(&mut sd, &mut sm).await.unwrap_err();
            if crc_ok {
                assert!(matches!(err, ApplyError::OutOfRange { .. }), "{err}");
            } else {
                assert!(matches!(err, ApplyError::Integrity { offset: 0 }), "{err}");
            }
        }
    }
}
