//! What the sending node (the Primary, or the sync source) receives on the data channel, and the
//! work it drives from there: resync requests while it is sync source (plain or checksum-based),
//! online verify (started here or by the peer's VerifyStart), the peer's state changes, and
//! Disconnect.
//!
//! A range is read with the range claimed on the replicated device, and the claim is released
//! only after what answers it is queued on the link: an application write to the same range
//! waits, so the data channel carries the two in the order the local disk saw them (SPEC §5.5,
//! §6.y).

use std::sync::Arc;

use rdbd_protocol::repl::{append_digests, kind as repl_kind, DigestAlg, Message, State};
use slab::Slab;
use tokio::sync::mpsc;
use tracing::warn;

use super::controller::STEP;
use super::pace::ResyncConfig;
use super::source_requests::SourceRequests;
use super::target::PERSIST_INTERVAL;
use super::throttle::Throttle;
use crate::replication::device::ReplicatedDevice;
use crate::replication::disk_health::{DiskError, DiskOp};
use crate::replication::link::framed::{FrameError, FrameReader};
use crate::replication::peer::{PeerLink, ResyncReply};
use crate::replication::states::{DiskState, Role};
use crate::replication::verify::{differing_runs, VerifyError, VerifyReport, VerifyRun};
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
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error("local read error at {offset} (errno {errno})")]
    LocalRead { offset: u64, errno: u32 },
}

/// What the inbound task reports to the node.
pub trait SourceEvents: Send {
    /// The peer announced a new role or disk state (raw wire values).
    fn peer_state(&mut self, role: Role, disk: DiskState);
    /// Every block is in sync on the peer: close the resync durably (generations) and return
    /// the final State to send. `bytes`: resync data sent.
    fn resync_finished(&mut self, bytes: u64) -> Result<State, String>;
    /// An online verify of `total` bytes started.
    fn verify_started(&mut self, total: u64);
    /// What the running verify found so far.
    fn verify_progress(&mut self, report: &VerifyReport);
    /// The verify compared everything; the differing blocks are marked out of sync.
    fn verify_finished(&mut self, report: &VerifyReport);
}

/// How this node answers as sync source and verifies.
#[derive(Debug, Clone, Copy)]
pub struct SourceOptions {
    pub pace: ResyncConfig,
    /// Checksum-based resync agreed in Params: the digest the target's requests carry.
    pub csums: Option<DigestAlg>,
    pub verify_alg: DigestAlg,
}

/// What a checksum request carries: the target's digests (one per bitmap block) and their
/// algorithm; `None` for a plain request.
type Digests = Option<(DigestAlg, Vec<u8>)>;

/// The sync source's bookkeeping.
struct Resync {
    device: Arc<ReplicatedDevice>,
    queue: Box<dyn IoQueue>,
    pool: BufPool,
    /// The target's requests: waiting, being read (by queue tag), and when all are done.
    requests: SourceRequests<Digests>,
    /// Yields to application I/O (c-min-rate).
    throttle: Throttle,
    /// Resync data sent.
    bytes: u64,
    finished: bool,
    last_persist: std::time::Instant,
}

/// A running online verify, driven from this side.
struct Verifier {
    device: Arc<ReplicatedDevice>,
    run: VerifyRun,
    queue: Box<dyn IoQueue>,
    pool: BufPool,
    /// The next range, waiting for its claim (`claimed`: got it, not yet read).
    next: Option<(u64, u32)>,
    claimed: bool,
    reading: Slab<(u64, u32)>,
}

/// Serves the peer's data-channel frames until the link ends. With `replies`, this node is
/// the sync source: it answers resync requests, yielding to application I/O as the pace says,
/// and once its bitmap is clean, finishes the resync. A verify starts when `verify_starts`
/// (this node's operator) or the peer asks for one.
pub async fn serve(
    device: Arc<ReplicatedDevice>,
    link: Arc<PeerLink>,
    mut data: FrameReader,
    mut replies: Option<mpsc::UnboundedReceiver<ResyncReply>>,
    mut verify_starts: mpsc::UnboundedReceiver<u64>,
    options: SourceOptions,
    mut events: Box<dyn SourceEvents>,
) -> Result<(), SourceError> {
    let mut resync = match replies {
        Some(_) => Some(Resync {
            device: device.clone(),
            queue: device.resync_local().clone().open_queue().map_err(SourceError::Queue)?,
            pool: BufPool::new(),
            // No window of its own: the target's asks within its own, and the throttle paces.
            requests: SourceRequests::new(usize::MAX),
            throttle: Throttle::new(options.pace.c_min_rate),
            bytes: 0,
            finished: false,
            last_persist: std::time::Instant::now(),
        }),
        None => None,
    };
    let mut verify: Option<Verifier> = None;
    let size = device.info_size();
    let block = device.bitmap_block();
    let mut completions: Vec<Completion> = Vec::new();
    let mut verify_completions: Vec<Completion> = Vec::new();
    let mut tick = tokio::time::interval(STEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if let Some(r) = resync.as_mut() {
            r.start_reads(&device);
            // Bits are cleared only by the target's acknowledgements: a clean bitmap with
            // nothing left to read means every block is durable on the target.
            if !r.finished && r.requests.complete(device.out_of_sync_blocks()) {
                let state = events.resync_finished(r.bytes).map_err(SourceError::Finish)?;
                if !link.send_state(state) {
                    return Err(SourceError::LinkDown);
                }
                r.finished = true;
            }
        }
        if let Some(v) = verify.as_mut() {
            v.start_reads();
            if v.run.is_done() {
                let report = std::mem::take(&mut v.run.report);
                verify = None;
                let done = Message::VerifyDone {
                    checked_bytes: report.checked_bytes,
                    out_of_sync_blocks: report.out_of_sync_blocks,
                };
                if !link.send_other(&done) {
                    return Err(SourceError::LinkDown);
                }
                if let Err(e) = device.write_stale_bitmap_pages(false) {
                    warn!("cannot record the blocks verify found in the metadata: {e}");
                }
                events.verify_finished(&report);
            }
        }
        let reading = resync.as_ref().is_some_and(|r| r.queue.in_flight() > 0);
        let claim = resync.as_ref().and_then(|r| r.wants_claim());
        let verify_reading = verify.as_ref().is_some_and(|v| v.queue.in_flight() > 0);
        let verify_claim = verify.as_ref().and_then(|v| v.wants_claim());
        tokio::select! {
            received = data.recv() => match received? {
                Message::ResyncRequest { offset, len } => {
                    let r = resync.as_mut().ok_or(SourceError::Unexpected(repl_kind::RESYNC_REQUEST))?;
                    check_request(offset, len, size, block)?;
                    r.requests.push((offset, offset + u64::from(len)), None);
                }
                Message::ResyncCsumRequest { offset, len, digests } => {
                    let r = resync.as_mut().ok_or(SourceError::Unexpected(repl_kind::RESYNC_CSUM_REQUEST))?;
                    let alg = options.csums.ok_or(SourceError::Unexpected(repl_kind::RESYNC_CSUM_REQUEST))?;
                    check_request(offset, len, size, block)?;
                    if digests.len() as u64 != alg.digests_len(u64::from(len), block) {
                        return Err(SourceError::BadRequest { offset, len });
                    }
                    r.requests.push((offset, offset + u64::from(len)), Some((alg, digests.to_vec())));
                }
                Message::VerifyReply { offset, len, digests } => {
                    let v = verify.as_mut().ok_or(SourceError::Unexpected(repl_kind::VERIFY_REPLY))?;
                    for (start, run) in v.run.reply(offset, len, digests)? {
                        device.mark_out_of_sync((start, start + u64::from(run)));
                        if !link.send_other(&Message::OutOfSync { offset: start, len: run }) {
                            return Err(SourceError::LinkDown);
                        }
                    }
                    events.verify_progress(&v.run.report);
                }
                Message::VerifyStart { offset } => {
                    verify = start_verify(&device, verify, offset, options.verify_alg, &mut *events)?;
                }
                Message::StateChange { role, disk } => events.peer_state(role, disk),
                // The peer's disk could not read this range: it differs until resynced.
                Message::OutOfSync { offset, len } => {
                    check_request(offset, len.max(1), size, 1)?;
                    device.mark_out_of_sync((offset, offset + u64::from(len)));
                }
                Message::ReadReply { seq, data } => {
                    if !link.read_reply(seq, data) {
                        return Err(SourceError::Unexpected(repl_kind::READ_REPLY));
                    }
                }
                Message::Disconnect { reason } => return Err(SourceError::Disconnected(reason.to_owned())),
                other => return Err(SourceError::Unexpected(other.kind())),
            },
            start = verify_starts.recv() => {
                if let Some(offset) = start {
                    verify = start_verify(&device, verify, offset, options.verify_alg, &mut *events)?;
                }
            }
            reply = next_reply(&mut replies) => match reply {
                None => return Err(SourceError::LinkDown),
                // Cleared by the link as it read the ack; the loop looks whether that was the last.
                Some(ResyncReply::Ack { .. }) => {}
                Some(ResyncReply::Failed { offset, len, errno }) => {
                    // The block stays dirty here; the next connection resyncs it again.
                    return Err(SourceError::TargetWriteFailed { offset, len, errno });
                }
            },
            () = poll_queue(resync.as_mut().map(|r| &mut r.queue), &mut completions), if reading => {
                let r = resync.as_mut().expect("reading implies a resync");
                for c in completions.drain(..) {
                    let (range, digests) = r.requests.read_done(c.tag as usize).expect("a read in flight");
                    let sent = r.answer(&link, range, &digests, c, block);
                    device.release_range(range);
                    sent?;
                }
            },
            () = poll_queue(verify.as_mut().map(|v| &mut v.queue), &mut verify_completions), if verify_reading => {
                let v = verify.as_mut().expect("reading implies a verify");
                for c in verify_completions.drain(..) {
                    let (offset, len) = v.reading.remove(c.tag as usize);
                    let queued = v.local_read(&link, offset, len, c);
                    device.release_range((offset, offset + u64::from(len)));
                    queued?;
                }
            },
            // An application write holds the range we want next: woken when it is released.
            () = claim_range(&device, claim), if claim.is_some() => {
                if let Some(r) = resync.as_mut() {
                    r.requests.front_claimed();
                }
            }
            () = claim_range(&device, verify_claim), if verify_claim.is_some() => {
                if let Some(v) = verify.as_mut() {
                    v.claimed = true;
                }
            }
            _ = tick.tick(), if resync.is_some() => {
                if let Some(r) = resync.as_mut() {
                    let (pending, reading) = r.requests.counts();
                    tracing::debug!(
                        pending,
                        reading,
                        may_send = r.throttle.may_send(),
                        sent = r.bytes,
                        "resync source step"
                    );
                    r.throttle.step(device.take_app_activity());
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

fn check_request(offset: u64, len: u32, size: u64, block: u32) -> Result<(), SourceError> {
    let valid = len > 0
        && len <= RESYNC_REQUEST_LIMIT
        && offset.checked_add(u64::from(len)).is_some_and(|end| end <= size)
        && offset % u64::from(block) == 0;
    if valid {
        Ok(())
    } else {
        Err(SourceError::BadRequest { offset, len })
    }
}

/// Starts a verify from `offset` unless one runs already (then that one goes on).
fn start_verify(
    device: &Arc<ReplicatedDevice>,
    running: Option<Verifier>,
    offset: u64,
    alg: DigestAlg,
    events: &mut dyn SourceEvents,
) -> Result<Option<Verifier>, SourceError> {
    if running.is_some() {
        return Ok(running);
    }
    let run = VerifyRun::new(alg, device.bitmap_block(), device.info_size(), offset);
    events.verify_started(run.remaining());
    Ok(Some(Verifier {
        device: device.clone(),
        run,
        // Through the page cache, like the application's writes it is compared after.
        queue: device.local().clone().open_queue().map_err(SourceError::Queue)?,
        pool: BufPool::new(),
        next: None,
        claimed: false,
        reading: Slab::new(),
    }))
}

fn read_errno(result: Result<(), crate::storage::IoError>) -> u32 {
    match result {
        Err(crate::storage::IoError::Io(e)) => e as u32,
        _ => libc::EIO as u32,
    }
}

impl Drop for Resync {
    /// Ranges still claimed when the connection ends are released, or application writes to
    /// them would wait forever.
    fn drop(&mut self) {
        for range in self.requests.claimed() {
            self.device.release_range(range);
        }
    }
}

impl Resync {
    /// The range of the front request, when it waits for it (and the throttle lets it go).
    fn wants_claim(&self) -> Option<(u64, u64)> {
        self.requests.wants_claim().filter(|_| self.throttle.may_send())
    }

    /// Starts reads for pending requests whose ranges are claimed or free, as far as the
    /// throttle allows.
    fn start_reads(&mut self, device: &ReplicatedDevice) {
        while self.throttle.may_send() {
            let Some((tag, (offset, end))) = self.requests.next_read(|range| device.claim_range(range))
            else {
                break;
            };
            self.throttle.sent(end - offset);
            let buf = self.pool.take((end - offset) as usize);
            self.queue.submit(tag as u32, IoOp::Read { offset, buf });
        }
    }

    /// Answers a request whose read finished: all of it, or with the target's digests only
    /// the blocks that differ, then ResyncInSync.
    fn answer(
        &mut self,
        link: &PeerLink,
        (offset, end): (u64, u64),
        digests: &Digests,
        c: Completion,
        block: u32,
    ) -> Result<(), SourceError> {
        // Within RESYNC_REQUEST_LIMIT (check_request).
        let len = (end - offset) as u32;
        let buf = match (c.result, c.buf) {
            (Ok(()), Some(buf)) => buf,
            (result, _) => {
                let errno = read_errno(result);
                warn!(offset, len, errno, "reading a block for the resync failed");
                let error = crate::storage::IoError::Io(errno as i32);
                self.device.health().failed(DiskError::new(DiskOp::Read, Some(offset), error));
                return Err(SourceError::LocalRead { offset, errno });
            }
        };
        let sent = match digests {
            None => {
                self.bytes += u64::from(len);
                link.send_resync_data(offset, &buf)
            }
            Some((alg, theirs)) => {
                let alg = *alg;
                let mut ours = Vec::with_capacity(theirs.len());
                append_digests(alg, block as usize, &buf, &mut ours);
                let mut sent = true;
                for (start, run) in differing_runs(alg.len(), block, offset, len, &ours, theirs) {
                    let at = (start - offset) as usize;
                    self.bytes += u64::from(run);
                    sent &= link.send_resync_data(start, &buf[at..at + run as usize]);
                }
                sent && link.send_other(&Message::ResyncInSync { offset, len })
            }
        };
        self.pool.give(buf);
        if sent {
            Ok(())
        } else {
            Err(SourceError::LinkDown)
        }
    }
}

impl Drop for Verifier {
    fn drop(&mut self) {
        if self.claimed {
            if let Some((offset, len)) = self.next {
                self.device.release_range((offset, offset + u64::from(len)));
            }
        }
        for (_, &(offset, len)) in self.reading.iter() {
            self.device.release_range((offset, offset + u64::from(len)));
        }
    }
}

impl Verifier {
    fn wants_claim(&self) -> Option<(u64, u64)> {
        let (offset, len) = self.next?;
        (!self.claimed).then_some((offset, offset + u64::from(len)))
    }

    /// Reads the next ranges whose claims succeed.
    fn start_reads(&mut self) {
        loop {
            if self.next.is_none() {
                self.next = self.run.next_range();
            }
            let Some((offset, len)) = self.next else { return };
            let claimed = std::mem::take(&mut self.claimed);
            if !claimed && !self.device.claim_range((offset, offset + u64::from(len))) {
                return;
            }
            self.next = None;
            let buf = self.pool.take(len as usize);
            let tag = self.reading.insert((offset, len));
            self.queue.submit(tag as u32, IoOp::Read { offset, buf });
        }
    }

    /// The local read of a range finished: keep its digests and queue VerifyRequest while the
    /// range is still claimed, so the peer reads it after exactly the writes this read saw.
    fn local_read(
        &mut self,
        link: &PeerLink,
        offset: u64,
        len: u32,
        c: Completion,
    ) -> Result<(), SourceError> {
        let buf = match (c.result, c.buf) {
            (Ok(()), Some(buf)) => buf,
            (result, _) => {
                let errno = read_errno(result);
                let error = crate::storage::IoError::Io(errno as i32);
                self.device.health().failed(DiskError::new(DiskOp::Read, Some(offset), error));
                return Err(SourceError::LocalRead { offset, errno });
            }
        };
        self.run.local_read(offset, &buf);
        self.pool.give(buf);
        if link.send_other(&Message::VerifyRequest { offset, len }) {
            Ok(())
        } else {
            Err(SourceError::LinkDown)
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

async fn poll_queue(queue: Option<&mut Box<dyn IoQueue>>, out: &mut Vec<Completion>) {
    let Some(queue) = queue else { return std::future::pending().await };
    std::future::poll_fn(|cx| queue.poll_complete(cx, out)).await
}
