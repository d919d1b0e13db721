//! What the sending node (the Primary, or the sync source) receives on the data channel: resync
//! requests while it is sync source, the peer's state changes, and Disconnect.
//!
//! A requested range is read with the range claimed on the replicated device, and the claim is
//! released only after the block is queued on the link: an application write to the same range
//! waits, so the data channel carries the two in the order the local disk saw them (SPEC §5.5).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use rdbd_protocol::repl::{Message, State};
use slab::Slab;
use tokio::sync::mpsc;
use tracing::warn;

use super::device::ReplicatedDevice;
use super::link::framed::{FrameError, FrameReader};
use super::peer::{PeerLink, ResyncReply};
use crate::metadata::bitmap::DirtyBitmap;
use crate::storage::{BufPool, Completion, IoOp, IoQueue};

/// Largest request a target may make (SPEC §6).
pub const RESYNC_REQUEST_LIMIT: u32 = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("peer sent an unexpected message (kind {0:#x}) on the data channel")]
    Unexpected(u16),
    #[error("peer asked for {len} bytes at {offset}, outside the device or over the limit")]
    BadRequest { offset: u64, len: u32 },
    #[error("cannot open a queue on the local device: {0}")]
    Queue(std::io::Error),
    #[error("peer disconnected: {0}")]
    Disconnected(String),
    #[error("the resync could not be completed: {0}")]
    Finish(String),
    #[error("the replication link is down")]
    LinkDown,
}

/// What the inbound task reports to the node.
pub trait SourceEvents: Send {
    /// The peer announced a new role or disk state (raw wire values).
    fn peer_state(&mut self, role: u8, disk: u8);
    /// Every block is in sync on the peer: close the resync durably (generations) and return
    /// the final State to send. `bytes`: resync data sent.
    fn resync_finished(&mut self, bytes: u64) -> Result<State, String>;
}

/// The sync source's bookkeeping.
struct Resync {
    queue: Box<dyn IoQueue>,
    pool: BufPool,
    /// Requests waiting for their range to be free of application writes.
    pending: VecDeque<(u64, u32)>,
    /// Reads in flight, by queue tag.
    reading: Slab<(u64, u32)>,
    /// Blocks sent and not yet acknowledged.
    unacked: usize,
    /// Resync data sent.
    bytes: u64,
    finished: bool,
}

/// Serves the peer's data-channel frames until the link ends. With `resync`, this node is the
/// sync source: it answers ResyncRequests and, once its bitmap is clean, finishes the resync.
pub async fn serve(
    device: Arc<ReplicatedDevice>,
    link: Arc<PeerLink>,
    mut data: FrameReader,
    mut replies: Option<mpsc::UnboundedReceiver<ResyncReply>>,
    mut events: Box<dyn SourceEvents>,
) -> Result<(), SourceError> {
    let mut resync = match replies {
        Some(_) => Some(Resync {
            queue: device.local().clone().open_queue().map_err(SourceError::Queue)?,
            pool: BufPool::new(),
            pending: VecDeque::new(),
            reading: Slab::new(),
            unacked: 0,
            bytes: 0,
            finished: false,
        }),
        None => None,
    };
    let size = device.info_size();
    let block = device.bitmap_block();
    let mut completions: Vec<Completion> = Vec::new();
    loop {
        if let Some(r) = resync.as_mut() {
            r.start_reads(&device);
            if !r.finished
                && r.pending.is_empty()
                && r.reading.is_empty()
                && r.unacked == 0
                && device.out_of_sync_blocks() == 0
            {
                let state = events.resync_finished(r.bytes).map_err(SourceError::Finish)?;
                if !link.send_state(state) {
                    return Err(SourceError::LinkDown);
                }
                r.finished = true;
            }
        }
        let reading = resync.as_ref().is_some_and(|r| r.queue.in_flight() > 0);
        let waiting_claims = resync.as_ref().is_some_and(|r| !r.pending.is_empty());
        tokio::select! {
            received = data.recv() => match received? {
                Message::ResyncRequest { offset, len } => {
                    let Some(r) = resync.as_mut() else {
                        return Err(SourceError::Unexpected(Message::ResyncRequest { offset, len }.kind()));
                    };
                    let valid = len > 0
                        && len <= RESYNC_REQUEST_LIMIT
                        && offset.checked_add(u64::from(len)).is_some_and(|end| end <= size)
                        && offset % u64::from(block) == 0;
                    if !valid {
                        return Err(SourceError::BadRequest { offset, len });
                    }
                    r.pending.push_back((offset, len));
                }
                Message::StateChange { role, disk } => events.peer_state(role, disk),
                Message::Disconnect { reason } => return Err(SourceError::Disconnected(reason.to_owned())),
                other => return Err(SourceError::Unexpected(other.kind())),
            },
            reply = next_reply(&mut replies) => {
                let Some(reply) = reply else { return Err(SourceError::LinkDown) };
                let r = resync.as_mut().expect("replies only with a resync");
                r.unacked = r.unacked.saturating_sub(1);
                match reply {
                    ResyncReply::Ack { offset, len } => device.with_tracking(|t| {
                        t.bitmap.clear(DirtyBitmap::blocks_of(offset, u64::from(len), block));
                    }),
                    ResyncReply::Failed { offset, len, errno } => {
                        warn!(offset, len, errno, "the sync target could not write a block; it stays out of sync");
                    }
                }
            },
            () = poll_reads(&mut resync, &mut completions), if reading => {
                let r = resync.as_mut().expect("reading implies a resync");
                for c in completions.drain(..) {
                    let (offset, len) = r.reading.remove(c.tag as usize);
                    let range = (offset, offset + u64::from(len));
                    match (c.result, c.buf) {
                        (Ok(()), Some(buf)) => {
                            let sent = link.send_resync_data(offset, buf);
                            device.release_range(range);
                            if !sent {
                                return Err(SourceError::LinkDown);
                            }
                            r.unacked += 1;
                            r.bytes += u64::from(len);
                        }
                        (result, _) => {
                            device.release_range(range);
                            let errno = match result { Err(crate::storage::IoError::Io(e)) => e as u32, _ => libc::EIO as u32 };
                            warn!(offset, len, errno, "reading a block for the resync failed");
                            return Err(SourceError::Finish(format!("local read error at {offset} (errno {errno})")));
                        }
                    }
                }
            },
            // An application write holds a range we want: look again shortly.
            () = tokio::time::sleep(Duration::from_millis(1)), if waiting_claims => {}
            () = link.closed() => return Err(SourceError::LinkDown),
        }
    }
}

impl Resync {
    /// Starts reads for pending requests whose ranges are free.
    fn start_reads(&mut self, device: &ReplicatedDevice) {
        while let Some(&(offset, len)) = self.pending.front() {
            if !device.claim_range((offset, offset + u64::from(len))) {
                break;
            }
            self.pending.pop_front();
            let buf = self.pool.take(len as usize);
            let tag = self.reading.insert((offset, len));
            self.queue.submit(tag as u32, IoOp::Read { offset, buf });
        }
    }
}

async fn next_reply(replies: &mut Option<mpsc::UnboundedReceiver<ResyncReply>>) -> Option<ResyncReply> {
    match replies {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn poll_reads(resync: &mut Option<Resync>, out: &mut Vec<Completion>) {
    let Some(r) = resync.as_mut() else { return std::future::pending().await };
    std::future::poll_fn(|cx| r.queue.poll_complete(cx, out)).await
}
