//! The primary's handle on a connected peer: requests go out on the data channel in submission
//! order, acknowledgements come back on the meta channel and are routed to the queue that is
//! waiting for them. When the link dies every outstanding request is reported lost, so the
//! writer can mark its blocks out of sync instead of waiting forever.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Context;

use atomic_waker::AtomicWaker;
use rdbd_protocol::repl::{block_crc32c, AckMode, Data, Message, Protocol, Trim, Zeroes};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::link::framed::Framed;

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
#[derive(Default)]
pub struct Inbox {
    outcomes: Mutex<Vec<(usize, PeerOutcome)>>,
    waker: AtomicWaker,
}

impl Inbox {
    fn deliver(&self, key: usize, outcome: PeerOutcome) {
        self.outcomes.lock().expect("inbox lock").push((key, outcome));
        self.waker.wake();
    }

    /// Registers `cx` for wakeup, then takes what has arrived (in that order, so nothing that
    /// arrives in between is missed).
    pub fn take(&self, cx: &mut Context<'_>, out: &mut Vec<(usize, PeerOutcome)>) {
        self.waker.register(cx.waker());
        out.append(&mut self.outcomes.lock().expect("inbox lock"));
    }
}

/// A request waiting for its acknowledgement.
struct Waiter {
    inbox: Arc<Inbox>,
    key: usize,
}

/// A request to send, owning its data.
enum Outgoing {
    Data { seq: u64, offset: u64, fua: bool, ack: AckMode, bytes: Vec<u8> },
    Trim(Trim),
    Zeroes(Zeroes),
    Flush { seq: u64 },
}

/// The connected peer, shared by every queue of the replicated device.
pub struct PeerLink {
    tx: mpsc::UnboundedSender<Outgoing>,
    waiting: Mutex<HashMap<u64, Waiter>>,
    next_seq: AtomicU64,
    alive: AtomicBool,
    protocol: Protocol,
    integrity: bool,
    /// Cancelled when the link dies, to stop both tasks.
    closed: CancellationToken,
}

impl PeerLink {
    /// Takes over an established pair of channels and starts the sender and the
    /// acknowledgement reader on the current runtime.
    pub fn start(data: Framed, meta: Framed, protocol: Protocol, integrity: bool) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let link = Arc::new(Self {
            tx,
            waiting: Mutex::new(HashMap::new()),
            next_seq: AtomicU64::new(1),
            alive: AtomicBool::new(true),
            protocol,
            integrity,
            closed: CancellationToken::new(),
        });
        tokio::spawn(link.clone().send_loop(data, rx));
        tokio::spawn(link.clone().ack_loop(meta));
        link
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// The acknowledgement a request needs: FUA and flushes always wait for the disk.
    fn ack_for(&self, fua: bool) -> AckMode {
        if fua {
            AckMode::Write
        } else {
            self.protocol.ack_mode()
        }
    }

    /// Queues a request; returns whether an acknowledgement will be delivered to `inbox`
    /// under `key` (false when the protocol needs none, or the link is down — then `Lost` is
    /// delivered instead if it was already waiting).
    fn submit(
        &self,
        make: impl FnOnce(u64, AckMode) -> Outgoing,
        fua: bool,
        inbox: &Arc<Inbox>,
        key: usize,
    ) -> bool {
        if !self.is_alive() {
            inbox.deliver(key, PeerOutcome::Lost);
            return true;
        }
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let ack = self.ack_for(fua);
        let wants_ack = ack != AckMode::None;
        if wants_ack {
            self.waiting.lock().expect("waiting lock").insert(seq, Waiter { inbox: inbox.clone(), key });
            // fail_all may have drained the table between the liveness check above and the
            // insert: whoever removes the entry answers it, exactly once.
            if !self.is_alive() {
                self.answer(seq, PeerOutcome::Lost);
                return true;
            }
        }
        if self.tx.send(make(seq, ack)).is_err() {
            self.fail_all();
            if !wants_ack {
                inbox.deliver(key, PeerOutcome::Lost);
                return true;
            }
        }
        wants_ack
    }

    pub fn write(&self, offset: u64, data: &[u8], fua: bool, inbox: &Arc<Inbox>, key: usize) -> bool {
        let bytes = data.to_vec();
        self.submit(|seq, ack| Outgoing::Data { seq, offset, fua, ack, bytes }, fua, inbox, key)
    }

    pub fn trim(&self, offset: u64, len: u64, fua: bool, inbox: &Arc<Inbox>, key: usize) -> bool {
        self.submit(|seq, ack| Outgoing::Trim(Trim { seq, offset, len, fua, ack }), fua, inbox, key)
    }

    pub fn zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fua: bool,
        inbox: &Arc<Inbox>,
        key: usize,
    ) -> bool {
        let make = |seq, ack| Outgoing::Zeroes(Zeroes { seq, offset, len, may_punch, fua, ack });
        self.submit(make, fua, inbox, key)
    }

    /// A flush always waits for the peer's FlushAck (durable there too).
    pub fn flush(&self, inbox: &Arc<Inbox>, key: usize) -> bool {
        self.submit(|seq, _| Outgoing::Flush { seq }, true, inbox, key)
    }

    /// Drops the connection (as `rdbd disconnect` does); outstanding requests are reported lost.
    pub fn disconnect(&self) {
        self.fail_all();
    }

    /// Marks the link dead and reports every outstanding request lost.
    fn fail_all(&self) {
        self.alive.store(false, Ordering::Release);
        self.closed.cancel();
        let waiting: Vec<Waiter> =
            self.waiting.lock().expect("waiting lock").drain().map(|(_, w)| w).collect();
        for w in waiting {
            w.inbox.deliver(w.key, PeerOutcome::Lost);
        }
    }

    fn answer(&self, seq: u64, outcome: PeerOutcome) {
        if let Some(w) = self.waiting.lock().expect("waiting lock").remove(&seq) {
            w.inbox.deliver(w.key, outcome);
        }
    }

    async fn send_loop(self: Arc<Self>, mut data: Framed, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
        loop {
            let out = tokio::select! {
                _ = self.closed.cancelled() => break,
                out = rx.recv() => match out {
                    Some(out) => out,
                    None => break,
                },
            };
            let sent = match &out {
                Outgoing::Data { seq, offset, fua, ack, bytes } => {
                    let crc32c = if self.integrity { block_crc32c(bytes) } else { 0 };
                    let m = Data { seq: *seq, offset: *offset, fua: *fua, ack: *ack, crc32c, data: bytes };
                    data.send(&Message::Data(m)).await
                }
                Outgoing::Trim(t) => data.send(&Message::Trim(*t)).await,
                Outgoing::Zeroes(z) => data.send(&Message::Zeroes(*z)).await,
                Outgoing::Flush { seq } => data.send(&Message::Flush { seq: *seq }).await,
            };
            if let Err(e) = sent {
                warn!("replication data channel failed: {e}");
                break;
            }
        }
        self.fail_all();
    }

    async fn ack_loop(self: Arc<Self>, mut meta: Framed) {
        loop {
            let received = tokio::select! {
                _ = self.closed.cancelled() => break,
                received = meta.recv() => received,
            };
            match received {
                Ok(Message::WriteAck { seq } | Message::RecvAck { seq } | Message::FlushAck { seq }) => {
                    self.answer(seq, PeerOutcome::Done)
                }
                Ok(Message::NegAck { seq, errno }) => {
                    warn!(seq, errno, "peer failed a write; its blocks are out of sync");
                    self.answer(seq, PeerOutcome::Failed)
                }
                Ok(Message::Ping) => {
                    if meta.send(&Message::PingAck).await.is_err() {
                        break;
                    }
                }
                Ok(Message::PingAck) => {}
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
