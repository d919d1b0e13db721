//! What the sending node (the Primary, or the sync source) receives on the data channel: resync
//! requests while it is sync source, the peer's state changes, and Disconnect.
//!
//! A requested range is read with the range claimed on the replicated device, and the claim is
//! released only after the block is queued on the link: an application write to the same range
//! waits, so the data channel carries the two in the order the local disk saw them (SPEC §5.5).

use std::collections::VecDeque;
use std::sync::Arc;

use rdbd_protocol::repl::{Message, State};
use slab::Slab;
use tokio::sync::mpsc;
use tracing::warn;

use super::device::ReplicatedDevice;
use super::link::framed::{FrameError, FrameReader};
use super::peer::{PeerLink, ResyncReply};
use super::resync::controller::STEP;
use super::resync::target::PERSIST_INTERVAL;
use super::resync::throttle::Throttle;
use crate::config::ResyncConfig;
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
    #[error("the sync target could not write {len} bytes at offset {offset} (errno {errno})")]
    TargetWriteFailed { offset: u64, len: u32, errno: u32 },
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
    device: Arc<ReplicatedDevice>,
    queue: Box<dyn IoQueue>,
    pool: BufPool,
    /// Requests not yet read, in arrival order (the target asks in disk order).
    pending: VecDeque<(u64, u32)>,
    /// The front of `pending` has its range claimed (an application write held it before).
    front_claimed: bool,
    /// Reads in flight, by queue tag.
    reading: Slab<(u64, u32)>,
    /// Yields to application I/O (c-min-rate).
    throttle: Throttle,
    /// Resync data sent.
    bytes: u64,
    finished: bool,
    last_persist: std::time::Instant,
}

/// Serves the peer's data-channel frames until the link ends. With `resync`, this node is the
/// sync source: it answers ResyncRequests, yielding to application I/O as `pace` says, and
/// once its bitmap is clean, finishes the resync.
pub async fn serve(
    device: Arc<ReplicatedDevice>,
    link: Arc<PeerLink>,
    mut data: FrameReader,
    mut replies: Option<mpsc::UnboundedReceiver<ResyncReply>>,
    pace: ResyncConfig,
    mut events: Box<dyn SourceEvents>,
) -> Result<(), SourceError> {
    let mut resync = match replies {
        Some(_) => Some(Resync {
            device: device.clone(),
            queue: device.resync_local().clone().open_queue().map_err(SourceError::Queue)?,
            pool: BufPool::new(),
            pending: VecDeque::new(),
            front_claimed: false,
            reading: Slab::new(),
            throttle: Throttle::new(pace.c_min_rate, device.app_requests()),
            bytes: 0,
            finished: false,
            last_persist: std::time::Instant::now(),
        }),
        None => None,
    };
    let size = device.info_size();
    let block = device.bitmap_block();
    let mut completions: Vec<Completion> = Vec::new();
    let mut tick = tokio::time::interval(STEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if let Some(r) = resync.as_mut() {
            r.start_reads(&device);
            // Bits are cleared only by the target's acknowledgements: a clean bitmap with
            // nothing left to read means every block is durable on the target.
            if !r.finished && r.pending.is_empty() && r.reading.is_empty() && device.out_of_sync_blocks() == 0
            {
                let state = events.resync_finished(r.bytes).map_err(SourceError::Finish)?;
                if !link.send_state(state) {
                    return Err(SourceError::LinkDown);
                }
                r.finished = true;
            }
        }
        let reading = resync.as_ref().is_some_and(|r| r.queue.in_flight() > 0);
        let claim = resync.as_ref().and_then(|r| r.wants_claim());
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
            reply = next_reply(&mut replies) => match reply {
                None => return Err(SourceError::LinkDown),
                Some(ResyncReply::Ack { offset, len }) => device.with_tracking(|t| {
                    t.bitmap.clear(DirtyBitmap::blocks_of(offset, u64::from(len), block));
                }),
                Some(ResyncReply::Failed { offset, len, errno }) => {
                    // The block stays dirty here; the next connection resyncs it again.
                    return Err(SourceError::TargetWriteFailed { offset, len, errno });
                }
            },
            () = poll_reads(&mut resync, &mut completions), if reading => {
                let r = resync.as_mut().expect("reading implies a resync");
                for c in completions.drain(..) {
                    let (offset, len) = r.reading.remove(c.tag as usize);
                    let range = (offset, offset + u64::from(len));
                    match (c.result, c.buf) {
                        (Ok(()), Some(buf)) => {
                            let sent = link.send_resync_data(offset, &buf);
                            r.pool.give(buf);
                            device.release_range(range);
                            if !sent {
                                return Err(SourceError::LinkDown);
                            }
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
            // An application write holds the range we want next: woken when it is released.
            () = claim_range(&device, claim), if claim.is_some() => {
                if let Some(r) = resync.as_mut() {
                    r.front_claimed = true;
                }
            }
            _ = tick.tick(), if resync.is_some() => {
                if let Some(r) = resync.as_mut() {
                    r.throttle.step(device.app_requests());
                    if !r.finished && r.last_persist.elapsed() >= PERSIST_INTERVAL {
                        // Bits cleared by acknowledgements reach the metadata, so a resync
                        // interrupted by a crash of this node resumes from here.
                        r.last_persist = std::time::Instant::now();
                        if let Err(e) = device.write_stale_bitmap_pages(false) {
                            warn!("cannot record the resync's progress in the metadata: {e}");
                        }
                    }
                }
            }
            () = link.closed() => return Err(SourceError::LinkDown),
        }
    }
}

impl Drop for Resync {
    /// Ranges still claimed when the connection ends are released, or application writes to
    /// them would wait forever.
    fn drop(&mut self) {
        if self.front_claimed {
            if let Some(&(offset, len)) = self.pending.front() {
                self.device.release_range((offset, offset + u64::from(len)));
            }
        }
        for (_, &(offset, len)) in self.reading.iter() {
            self.device.release_range((offset, offset + u64::from(len)));
        }
    }
}

impl Resync {
    /// The range of the front request, when it waits for it (and the throttle lets it go).
    fn wants_claim(&self) -> Option<(u64, u64)> {
        let &(offset, len) = self.pending.front()?;
        (!self.front_claimed && self.throttle.may_send()).then_some((offset, offset + u64::from(len)))
    }

    /// Starts reads for pending requests whose ranges are claimed or free, as far as the
    /// throttle allows.
    fn start_reads(&mut self, device: &ReplicatedDevice) {
        while let Some(&(offset, len)) = self.pending.front() {
            if !self.throttle.may_send() {
                break;
            }
            let claimed = std::mem::take(&mut self.front_claimed);
            if !claimed && !device.claim_range((offset, offset + u64::from(len))) {
                break;
            }
            self.pending.pop_front();
            self.throttle.sent(u64::from(len));
            let buf = self.pool.take(len as usize);
            let tag = self.reading.insert((offset, len));
            self.queue.submit(tag as u32, IoOp::Read { offset, buf });
        }
    }
}

/// Resolves once `range` is claimed (woken by the device when a write releases a range).
async fn claim_range(device: &ReplicatedDevice, range: Option<(u64, u64)>) {
    let Some(range) = range else { return std::future::pending().await };
    std::future::poll_fn(|cx| device.poll_claim_range(range, cx)).await
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
