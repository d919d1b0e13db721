//! A scripted fake peer: the Primary's replicated device connected over loopback to a peer
//! whose every answer the test writes by hand (after Crucible's dummy downstairs). It holds
//! the other end of the real link, so the device and its ledger are tested in one process,
//! with acknowledgements withheld, reordered, failed or cut exactly where a test wants them.

use std::sync::Arc;
use std::time::Duration;

use super::library::{blank_state, identity, params};
use rdbd::metadata::bitmap::DirtyBitmap;
use rdbd::replication::device::{ReplicatedDevice, Tracking};
use rdbd::replication::link::connect::{dial, listen, Established};
use rdbd::replication::peer::{LinkOptions, PeerLink};
use rdbd::storage::faulty::FaultyDisk;
use rdbd::storage::{BlockDevice, BufPool, Completion, IoOp, IoQueue};
use rdbd_protocol::repl::{AckMode, Message, Protocol};

/// What the device sent: the parts a script answers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    Write { seq: u64, offset: u64, len: u64, fua: bool, ack: AckMode },
    Flush { seq: u64 },
    Other(String),
}

/// The Primary's device (on a [`FaultyDisk`] without metadata), its link, a client queue, and
/// the scripted peer's end of both channels.
pub struct ScriptedPair {
    pub disk: Arc<FaultyDisk>,
    pub device: Arc<ReplicatedDevice>,
    pub link: Arc<PeerLink>,
    pub queue: Box<dyn IoQueue>,
    pub pool: BufPool,
    peer: Established,
}

impl ScriptedPair {
    /// A device of `size` bytes replicating under `protocol`; automatic peer flushes are off so
    /// that every frame the peer sees comes from the test's own requests.
    pub async fn new(protocol: Protocol, size: u64) -> Self {
        let disk = FaultyDisk::new(size);
        // No metadata: the bitmap lives in memory, which is all these tests look at.
        let tracking = Tracking { bitmap: DirtyBitmap::new(size / 4096), activity: None };
        let data: Arc<dyn BlockDevice> = disk.data_device(size);
        let device = ReplicatedDevice::new(data, tracking, 4096);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = listener.local_addr().expect("local address");
        let peer = tokio::spawn(async move {
            listen(&listener, &identity("b", "a"), params(protocol, size), blank_state(), &mut |_| {}).await
        });
        let est = dial(addr, &identity("a", "b"), params(protocol, size), blank_state()).await.expect("dial");
        let peer = peer.await.expect("listener task").expect("listen");
        let options = LinkOptions {
            auto_flush_interval: Duration::from_secs(3600),
            ..LinkOptions::new(protocol, true)
        };
        let link = device.connect_peer(est.data.split().1, est.meta, options, None);
        let queue = device.clone().open_queue().expect("client queue");
        ScriptedPair { disk, device, link, queue, pool: BufPool::new(), peer }
    }

    /// A client write of `len` bytes of `byte` at `offset`, tagged `tag`.
    pub fn write(&mut self, tag: u32, offset: u64, byte: u8, len: usize, fua: bool) {
        let mut buf = self.pool.take(len);
        buf.fill(byte);
        self.queue.submit(tag, IoOp::Write { offset, buf, fua });
    }

    pub fn flush(&mut self, tag: u32) {
        self.queue.submit(tag, IoOp::Flush);
    }

    /// The next frame the device sent on the data channel (within 5 s).
    pub async fn next_sent(&mut self) -> Sent {
        let message = tokio::time::timeout(Duration::from_secs(5), self.peer.data.recv())
            .await
            .expect("the device sent nothing for 5 s")
            .expect("data channel");
        match message {
            Message::Data(d) => {
                Sent::Write { seq: d.seq, offset: d.offset, len: d.data.len() as u64, fua: d.fua, ack: d.ack }
            }
            Message::Flush { seq } => Sent::Flush { seq },
            other => Sent::Other(format!("{other:?}")),
        }
    }

    /// Answers on the meta channel, as the peer's applier would.
    pub async fn answer(&mut self, message: Message<'_>) {
        self.peer.meta.send(&message).await.expect("meta channel");
    }

    /// Client requests completed within `limit` (none: an empty list).
    pub async fn completed_within(&mut self, limit: Duration) -> Vec<Completion> {
        completed_within(&mut self.queue, limit).await
    }

    /// Waits (at most 5 s) until the client request `tag` completes; returns its result.
    pub async fn completion(&mut self, tag: u32) -> Completion {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(!left.is_zero(), "request {tag} not completed within 5 s");
            let done = self.completed_within(left).await;
            if let Some(c) = done.into_iter().find(|c| c.tag == tag) {
                return c;
            }
        }
    }

    /// The peer goes away: both channels close.
    pub fn cut(self) -> (Arc<ReplicatedDevice>, Arc<PeerLink>, Box<dyn IoQueue>) {
        drop(self.peer);
        (self.device, self.link, self.queue)
    }

    /// Waits (at most 10 s) until the link is seen down.
    pub async fn link_down(link: &PeerLink) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while link.is_alive() {
            assert!(std::time::Instant::now() < deadline, "the link did not end");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Requests of `queue` completed within `limit` (none: an empty list).
pub async fn completed_within(queue: &mut Box<dyn IoQueue>, limit: Duration) -> Vec<Completion> {
    let mut done = Vec::new();
    let _ = tokio::time::timeout(limit, async {
        while done.is_empty() {
            std::future::poll_fn(|cx| queue.poll_complete(cx, &mut done)).await;
        }
    })
    .await;
    done
}
