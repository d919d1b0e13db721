//! The primary's handle on a connected peer: requests go out on the data channel in submission
//! order, acknowledgements come back on the meta channel and are routed to the queue that is
//! waiting for them. When the link dies every outstanding request is reported lost, so the
//! writer can mark its blocks out of sync instead of waiting forever.
//!
//! The ledger also follows each write until it is stable on the peer (flushed there), and
//! reports it to the device then, or as lost if the link dies or the peer fails it first: the
//! device keeps the write's activity-log extent until one of the two (DRBD keeps its AL
//! reference until the peer's barrier ack), so an extent never leaves the log while the peer
//! could still lose a write to it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Context;
use std::time::Duration;

use atomic_waker::AtomicWaker;
use rdbd_protocol::repl::{block_crc32c, AckMode, Data, Message, Protocol, ResyncData, State, Trim, Zeroes};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::core::ledger::{ack_for, Answer, Ledger, Request};
use super::link::framed::{FrameWriter, Framed};

/// How the peer answered one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerOutcome {
    /// Acknowledged as the request asked (received, or on disk).
    Done,
    /// The peer could not write it (NegAck): its blocks are out of sync.
    Failed,
    /// The link died first: whether the peer has it is unknown.
    Lost,
}

/// Where a queue collects the outcomes of its requests; the link task fills it and wakes the
/// queue's task.
/// An outcome for the request under a queue's key, with the data of a read the peer answered.
pub type Delivery = (usize, PeerOutcome, Option<Vec<u8>>);

#[derive(Default)]
pub struct Inbox {
    outcomes: Mutex<Vec<Delivery>>,
    waker: AtomicWaker,
}

impl Inbox {
    fn deliver(&self, key: usize, outcome: PeerOutcome) {
        self.deliver_data(key, outcome, None);
    }

    fn deliver_data(&self, key: usize, outcome: PeerOutcome, data: Option<Vec<u8>>) {
        self.outcomes.lock().expect("inbox lock").push((key, outcome, data));
        self.waker.wake();
    }

    /// Registers `cx` for wakeup, then takes what has arrived (in that order, so nothing that
    /// arrives in between is missed).
    pub fn take(&self, cx: &mut Context<'_>, out: &mut Vec<Delivery>) {
        self.waker.register(cx.waker());
        out.append(&mut self.outcomes.lock().expect("inbox lock"));
    }
}

/// Who waits for a request's answer: the queue's inbox and its key there.
struct Waiter {
    inbox: Arc<Inbox>,
    key: usize,
}

/// Everything the link tracks, under one lock. Requests are encoded into `frames` under the same
/// lock that hands out their sequence numbers, so the data channel carries them in `seq` order (a
/// FlushAck then covers exactly the writes with smaller numbers), and a request costs one lock and
/// one encoding on its way to the socket.
struct Outbox {
    /// Encoded frames waiting for the sender task.
    frames: Vec<u8>,
    /// A Disconnect is queued: the sender closes after writing it, nothing more is accepted.
    closing: bool,
    /// Sequence numbers, waiters and the writes not yet stable on the peer (the pure core).
    ledger: Ledger<Waiter>,
}

/// The peer's answer to a block sent for resync, for the sync source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncReply {
    /// Written on the target: the range is in sync (already cleared in the bitmap, see
    /// [`LinkEvents::resynced`]).
    Ack { offset: u64, len: u32 },
    /// The target could not write it: the range stays out of sync.
    Failed { offset: u64, len: u32, errno: u32 },
}

/// What the replicated device hears from the link about the writes it follows: each write
/// submitted with [`Submitted::followed`] is reported exactly once, to `stable` or `lost`.
pub trait LinkEvents: Send + Sync {
    /// The link is dying: called before any write can be seen lost or start without a peer.
    fn dying(&self);
    /// These writes are stable on the peer (a FlushAck covered them, or a FUA write was acked).
    fn stable(&self, ranges: &[(u64, u64)]);
    /// These writes may be missing on the peer (the link died before they were stable, or the
    /// peer failed them): their ranges are out of sync.
    fn lost(&self, ranges: &[(u64, u64)]);
    /// The dying link is about to report writes lost: called under the link's lock, before
    /// anyone can see the link closed (so must not block).
    fn losing(&self) {}
    /// The sync target has this resync range durably: it is in sync. Taken in the order the
    /// acks arrive, so a later NegAck's marks are never undone by an earlier ResyncAck.
    fn resynced(&self, offset: u64, len: u32);
}

/// What [`PeerLink`] did with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Submitted {
    /// An outcome will be delivered to the inbox (false when the protocol needs no answer).
    pub answered: bool,
    /// The write's range is followed until stable or lost (see [`LinkEvents`]); false when the
    /// link was already down (the outcome is then `Lost`) or the request writes nothing.
    pub followed: bool,
}

/// Capacity the sender keeps in its buffer between bursts.
const SEND_BUFFER_KEEP: usize = 4 << 20;

/// Unstable writes that trigger a flush of our own, so the set lost with a link stays bounded
/// (SPEC §5.6 says why not more often).
const AUTO_FLUSH_WRITES: usize = 65536;

/// How a link replicates.
#[derive(Debug, Clone, Copy)]
pub struct LinkOptions {
    pub protocol: Protocol,
    /// Send a CRC-32C with every data block.
    pub integrity: bool,
    /// While writes are unstable on the peer, flush it at least this often (SPEC §5.6).
    pub auto_flush_interval: std::time::Duration,
    /// After this long without a frame on the meta channel, send Ping (`ping-interval`).
    pub ping_interval: std::time::Duration,
    /// A Ping unanswered for this long means the peer is dead (`ping-timeout`).
    pub ping_timeout: std::time::Duration,
}

impl LinkOptions {
    pub fn new(protocol: Protocol, integrity: bool) -> Self {
        Self {
            protocol,
            integrity,
            auto_flush_interval: std::time::Duration::from_secs(5),
            ping_interval: std::time::Duration::from_secs(10),
            ping_timeout: std::time::Duration::from_secs(1),
        }
    }
}

/// The connected peer, shared by every queue of the replicated device.
pub struct PeerLink {
    outbox: Mutex<Outbox>,
    /// Wakes the sender task when frames are queued.
    queued: tokio::sync::Notify,
    events: Arc<dyn LinkEvents>,
    /// Cleared (before the ledger is emptied) when the link dies.
    alive: AtomicBool,
    protocol: Protocol,
    integrity: bool,
    /// Cancelled when the link dies, to stop both tasks.
    closed: CancellationToken,
    /// Where ResyncAck and ResyncNegAck go (the sync source's task), while this node is one.
    resync_replies: Option<mpsc::UnboundedSender<ResyncReply>>,
}

impl PeerLink {
    /// Takes over an established pair of channels and starts the sender and the
    /// acknowledgement reader on the current runtime.
    pub fn start(
        data: FrameWriter,
        meta: Framed,
        options: LinkOptions,
        events: Arc<dyn LinkEvents>,
        resync_replies: Option<mpsc::UnboundedSender<ResyncReply>>,
    ) -> Arc<Self> {
        let LinkOptions { protocol, integrity, auto_flush_interval, ping_interval, ping_timeout } = options;
        let link = Arc::new(Self {
            outbox: Mutex::new(Outbox { frames: Vec::new(), closing: false, ledger: Ledger::default() }),
            queued: tokio::sync::Notify::new(),
            events,
            alive: AtomicBool::new(true),
            protocol,
            integrity,
            closed: CancellationToken::new(),
            resync_replies,
        });
        tokio::spawn(link.clone().send_loop(data, auto_flush_interval));
        tokio::spawn(link.clone().ack_loop(meta, ping_interval, ping_timeout));
        link
    }

    /// Writes sent that a peer crash could still lose (for status).
    pub fn unstable_writes(&self) -> usize {
        self.outbox().ledger.unstable_writes()
    }

    fn outbox(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().expect("outbox lock")
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Queues a request whose outcome goes to `inbox` under `key` (see [`Submitted`]).
    fn submit<'a>(
        &self,
        make: impl FnOnce(u64, AckMode) -> Message<'a>,
        request: Request,
        inbox: &Arc<Inbox>,
        key: usize,
    ) -> Submitted {
        let ack = ack_for(self.protocol, &request);
        let answered = ack != AckMode::None;
        let range = match request {
            Request::Write { range, .. } => Some(range),
            _ => None,
        };
        let unstable = {
            let mut outbox = self.outbox();
            // fail_all clears `alive` before it empties the ledger under this lock: seen alive
            // here, whatever is recorded below is answered or reported by it.
            if !self.is_alive() || outbox.closing {
                drop(outbox);
                inbox.deliver(key, PeerOutcome::Lost);
                return Submitted { answered: true, followed: false };
            }
            let Outbox { frames, ledger, .. } = &mut *outbox;
            let seq = ledger.submit(request, answered, Waiter { inbox: inbox.clone(), key });
            make(seq, ack).encode(frames);
            ledger.unstable_writes()
        };
        self.queued.notify_one();
        if range.is_some() && unstable >= AUTO_FLUSH_WRITES {
            self.auto_flush();
        }
        Submitted { answered, followed: range.is_some() }
    }

    pub fn write(&self, offset: u64, data: &[u8], fua: bool, inbox: &Arc<Inbox>, key: usize) -> Submitted {
        let range = (offset, offset + data.len() as u64);
        let integrity = self.integrity;
        let make = |seq, ack| {
            let crc32c = if integrity { block_crc32c(data) } else { 0 };
            Message::Data(Data { seq, offset, fua, ack, crc32c, data })
        };
        self.submit(make, Request::Write { range, fua }, inbox, key)
    }

    pub fn trim(&self, offset: u64, len: u64, fua: bool, inbox: &Arc<Inbox>, key: usize) -> Submitted {
        let make = |seq, ack| Message::Trim(Trim { seq, offset, len, fua, ack });
        self.submit(make, Request::Write { range: (offset, offset + len), fua }, inbox, key)
    }

    pub fn zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fua: bool,
        inbox: &Arc<Inbox>,
        key: usize,
    ) -> Submitted {
        let make = |seq, ack| Message::Zeroes(Zeroes { seq, offset, len, may_punch, fua, ack });
        self.submit(make, Request::Write { range: (offset, offset + len), fua }, inbox, key)
    }

    /// A flush always waits for the peer's FlushAck (durable there too).
    pub fn flush(&self, inbox: &Arc<Inbox>, key: usize) -> Submitted {
        self.submit(|seq, _| Message::Flush { seq }, Request::Flush, inbox, key)
    }

    /// Reads from the peer's disk, after every write sent before (a Diskless Primary's read):
    /// the data comes with the `Done` outcome.
    pub fn read(&self, offset: u64, len: u32, inbox: &Arc<Inbox>, key: usize) -> Submitted {
        self.submit(|seq, _| Message::ReadRequest { seq, offset, len }, Request::Read, inbox, key)
    }

    /// The peer answered read `seq` (ReadReply, on the data channel). An answer to no read of
    /// ours is a protocol error: false.
    pub fn read_reply(&self, seq: u64, data: &[u8]) -> bool {
        let waiter = self.outbox().ledger.take_read(seq);
        match waiter {
            Some(w) => {
                w.inbox.deliver_data(w.key, PeerOutcome::Done, Some(data.to_vec()));
                true
            }
            None => false,
        }
    }

    /// Has the peer make every write sent so far stable soon (the activity log needs a slot
    /// that such writes hold): a flush of our own, unless one is already on its way.
    pub fn request_flush(&self) {
        self.auto_flush();
    }

    /// Sends a flush nobody waits for, unless one is already on its way.
    fn auto_flush(&self) {
        let mut outbox = self.outbox();
        if outbox.closing || !self.is_alive() {
            return;
        }
        let Some(seq) = outbox.ledger.start_auto_flush() else { return };
        Message::Flush { seq }.encode(&mut outbox.frames);
        drop(outbox);
        self.queued.notify_one();
    }

    /// Drops the connection at once; outstanding requests are reported lost.
    pub fn disconnect(&self) {
        self.fail_all();
    }

    /// Queues a frame that is not an application request (resync data, state).
    pub fn send_other(&self, message: &Message<'_>) -> bool {
        let mut outbox = self.outbox();
        if !self.is_alive() || outbox.closing {
            return false;
        }
        message.encode(&mut outbox.frames);
        outbox.closing = matches!(message, Message::Disconnect { .. });
        drop(outbox);
        self.queued.notify_one();
        true
    }

    /// Has the peer mark `range` out of sync (in messages of at most 32 MiB), after every request
    /// queued before.
    pub fn send_out_of_sync(&self, (start, end): (u64, u64)) -> bool {
        let mut sent = true;
        let mut at = start;
        while at < end {
            let len = (end - at).min(rdbd_protocol::repl::MAX_DATA_LEN as u64) as u32;
            sent &= self.send_other(&Message::OutOfSync { offset: at, len });
            at += u64::from(len);
        }
        sent
    }

    /// Sends a block for the resync target after every write queued before it.
    pub fn send_resync_data(&self, offset: u64, data: &[u8]) -> bool {
        let crc32c = if self.integrity { block_crc32c(data) } else { 0 };
        self.send_other(&Message::ResyncData(ResyncData { offset, crc32c, data }))
    }

    pub fn send_state(&self, state: State) -> bool {
        self.send_other(&Message::State(state))
    }

    /// Makes every write sent so far stable on the peer (one flush), waiting at most `limit`;
    /// returns whether it did. Called before a deliberate disconnect so nothing needs a resync.
    pub async fn settle(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.is_alive() && tokio::time::Instant::now() < deadline {
            let settled = self.outbox().ledger.is_settled();
            if settled {
                return true;
            }
            self.auto_flush();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        false
    }

    /// Sends Disconnect after everything queued, then closes the link.
    pub async fn close(&self, reason: &str) {
        if self.send_other(&Message::Disconnect { reason }) {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.closed.cancelled()).await;
        }
        self.fail_all();
    }

    /// Resolves when the link has died.
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }

    /// Marks the link dead and reports every outstanding request lost.
    fn fail_all(&self) {
        self.events.dying();
        self.alive.store(false, Ordering::Release);
        self.closed.cancel();
        let (lost, waiting) = {
            let mut outbox = self.outbox();
            let taken = outbox.ledger.fail_all();
            if !taken.0.is_empty() {
                self.events.losing();
            }
            taken
        };
        if !lost.is_empty() {
            self.events.lost(&lost);
        }
        for w in waiting {
            w.inbox.deliver(w.key, PeerOutcome::Lost);
        }
    }

    /// The peer answered request `seq` (see `Ledger::answer`); false for an answer it may not
    /// send: the link then ends (a peer that acknowledges what it was never asked is broken).
    fn answer(&self, seq: u64, answer: Answer) -> bool {
        let Some(settled) = self.outbox().ledger.answer(seq, answer) else {
            warn!(seq, ?answer, "the peer answered a request it was not sent; dropping the link");
            return false;
        };
        if !settled.stable.is_empty() {
            self.events.stable(&settled.stable);
        }
        if !settled.lost.is_empty() {
            self.events.lost(&settled.lost);
        }
        if let Some((w, _)) = settled.waiter {
            let outcome = if answer == Answer::Failed { PeerOutcome::Failed } else { PeerOutcome::Done };
            w.inbox.deliver(w.key, outcome);
        }
        true
    }

    fn forward(&self, reply: ResyncReply) {
        if let Some(tx) = &self.resync_replies {
            let _ = tx.send(reply);
        }
    }

    async fn send_loop(self: Arc<Self>, mut data: FrameWriter, auto_flush_interval: std::time::Duration) {
        // The first check comes one period in (a plain interval would fire at once).
        let start = tokio::time::Instant::now() + auto_flush_interval;
        let mut tick = tokio::time::interval_at(start, auto_flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Swapped with the ledger's, so frames are encoded into one while the other is written.
        let mut sending = Vec::new();
        loop {
            let closing = {
                let mut outbox = self.outbox();
                std::mem::swap(&mut outbox.frames, &mut sending);
                outbox.closing
            };
            if !sending.is_empty() {
                if let Err(e) = data.write_encoded(&sending).await {
                    warn!("replication data channel failed: {e}");
                    break;
                }
                sending.clear();
                if sending.capacity() > SEND_BUFFER_KEEP {
                    sending.shrink_to(SEND_BUFFER_KEEP);
                }
                continue;
            }
            if closing {
                break;
            }
            tokio::select! {
                _ = self.closed.cancelled() => break,
                _ = tick.tick() => {
                    if self.unstable_writes() > 0 {
                        self.auto_flush();
                    }
                }
                () = self.queued.notified() => {}
            }
        }
        self.fail_all();
    }

    /// Reads acknowledgements; also the liveness check: after `ping_interval` of silence a Ping
    /// goes out, and if nothing at all arrives within `ping_timeout` of it the peer is dead.
    async fn ack_loop(self: Arc<Self>, mut meta: Framed, ping_interval: Duration, ping_timeout: Duration) {
        let mut pinged = false;
        loop {
            let wait = if pinged { ping_timeout } else { ping_interval };
            let received = tokio::select! {
                _ = self.closed.cancelled() => break,
                received = tokio::time::timeout(wait, meta.recv()) => received,
            };
            let Ok(received) = received else {
                if pinged {
                    warn!("peer did not answer a ping within {ping_timeout:?}: connection lost");
                    break;
                }
                if meta.send(&Message::Ping).await.is_err() {
                    break;
                }
                pinged = true;
                continue;
            };
            pinged = false;
            match received {
                Ok(Message::FlushAck { seq }) => {
                    if !self.answer(seq, Answer::Flushed) {
                        break;
                    }
                }
                Ok(Message::WriteAck { seq }) | Ok(Message::RecvAck { seq }) => {
                    if !self.answer(seq, Answer::Written) {
                        break;
                    }
                }
                Ok(Message::NegAck { seq, errno }) => {
                    // The peer left UpToDate before it answered so (SPEC §5.1): what it failed is
                    // out of sync, and the link ends so that the next handshake resyncs it or
                    // finds the peer's disk detached. Acks behind this one (a resync's among
                    // them) must not clear what it marked.
                    warn!(
                        seq,
                        errno, "peer failed a write or flush: its blocks are out of sync; reconnecting"
                    );
                    let _ = self.answer(seq, Answer::Failed);
                    break;
                }
                Ok(Message::Ping) => {
                    if meta.send(&Message::PingAck).await.is_err() {
                        break;
                    }
                }
                Ok(Message::PingAck) => {}
                Ok(Message::ResyncAck { offset, len }) if self.resync_replies.is_some() => {
                    self.events.resynced(offset, len);
                    self.forward(ResyncReply::Ack { offset, len })
                }
                Ok(Message::ResyncNegAck { offset, len, errno }) if self.resync_replies.is_some() => {
                    self.forward(ResyncReply::Failed { offset, len, errno })
                }
                Ok(other) => {
                    warn!(kind = other.kind(), "unexpected message on the meta channel; dropping the link");
                    break;
                }
                Err(e) => {
                    warn!("replication meta channel ended: {e}");
                    break;
                }
            }
        }
        self.fail_all();
    }
}
