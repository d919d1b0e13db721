//! The replicated device: a [`BlockDevice`] over the local one that mirrors every write to the
//! peer, and that the NBD server exports exactly like a plain file.
//!
//! A write completes when the local write is done and the peer has acknowledged it as the
//! protocol asks (C: on its disk, B: received, A: handed to the link; FUA and FLUSH always wait
//! for the peer's disk). Without a peer, or when the link dies before the acknowledgement, the
//! write still completes locally and its blocks are marked out of sync in the bitmap, to be
//! resynced later. Two overlapping writes are never in flight together, so they reach both disks
//! in the same order.
//!
//! When the local disk fails (see [`DiskHealth`]) the device stops using it and goes on through
//! the peer, DRBD's diskless mode: writes and flushes go to the peer only, reads are answered
//! from the peer's disk, and a read the local disk fails is retried there.

use std::collections::VecDeque;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};

use slab::Slab;

use super::alone_gate::{AloneGate, AloneVerdict};
use super::disk_health::{DiskError, DiskHealth, DiskOp, ErrorPolicy};
use super::link::framed::{FrameWriter, Framed};
use super::peer::{Delivery, Inbox, LinkEvents, LinkOptions, PeerLink, PeerOutcome, ResyncReply, Submitted};
use crate::metadata::activity_log::{extents_of, ActivityLog, Begin, EXTENT_BYTES};
use crate::metadata::bitmap::DirtyBitmap;
use crate::metadata::store::MetaDevice;
use crate::replication::states::{DiskState, Role};
use crate::storage::{BlockDevice, Completion, DeviceInfo, Extent, IoBuf, IoError, IoOp, IoQueue};

pub struct ReplicatedDevice {
    /// The local disk, and the same disk for resync I/O (opened with O_DIRECT where possible,
    /// else the same handle). Replaced when a disk is attached again.
    disks: RwLock<LocalDisks>,
    /// Bumped at every attach: queues reopen their local queue on the new disk.
    disk_epoch: AtomicU64,
    /// Whether the local disk may be used, and where its errors go.
    health: DiskHealth,
    /// The peer has no disk (it is a Diskless Primary): this node holds the only copy, and the
    /// applier marks what it writes for the peer's disk to resync once attached again.
    sole_copy: AtomicBool,
    peer: RwLock<Option<Arc<PeerLink>>>,
    tracking: Mutex<Tracking>,
    bitmap_block: u32,
    /// Byte ranges of writes in flight on any queue.
    writes_in_flight: Mutex<Vec<(u64, u64)>>,
    /// While set, new writes wait (the bitmap is being exchanged with a connecting peer).
    held: std::sync::atomic::AtomicBool,
    /// Woken when the last write in flight is released while writes are held.
    drained: tokio::sync::Notify,
    /// Queues with parked writes (and a sync source waiting for a range), woken when a range
    /// is released or the hold ends.
    parked_wakers: Mutex<Vec<std::task::Waker>>,
    /// An application request was submitted since the sync source last looked (it yields to
    /// application I/O). Set with a load before the store, so the write path leaves the cache
    /// line shared between the shards instead of bouncing it on every request.
    app_active: std::sync::atomic::AtomicBool,
    /// Whether writes only this disk has may be answered (HA quorum).
    alone: AloneGate,
    /// The peer lost writes since [`ReplicatedDevice::take_lost_writes`] last looked.
    lost_writes: AtomicBool,
    /// Extents one part of a split discard spans: a quarter of the activity log at most, so
    /// that parts in flight together still fit.
    discard_part_extents: std::sync::atomic::AtomicU32,
}

/// The local disk as a device, and the handle resync I/O uses.
struct LocalDisks {
    local: Arc<dyn BlockDevice>,
    resync: Arc<dyn BlockDevice>,
}

/// The out-of-sync bitmap and, with on-disk metadata, the activity log that must record every
/// extent before it is written (so a crash of this node leaves a bounded region to resync).
pub struct Tracking {
    pub bitmap: DirtyBitmap,
    pub activity: Option<(ActivityLog, MetaDevice)>,
}

impl ReplicatedDevice {
    pub fn new(local: Arc<dyn BlockDevice>, tracking: Tracking, bitmap_block: u32) -> Arc<Self> {
        Self::with_resync_device(local.clone(), local, tracking, bitmap_block, ErrorPolicy::default())
    }

    /// Like [`ReplicatedDevice::new`], with a second handle on the same disk for resync I/O,
    /// and what a local disk error does.
    pub fn with_resync_device(
        local: Arc<dyn BlockDevice>,
        resync_local: Arc<dyn BlockDevice>,
        tracking: Tracking,
        bitmap_block: u32,
        policy: ErrorPolicy,
    ) -> Arc<Self> {
        let discard_part_extents = Self::discard_parts_for(&tracking);
        Arc::new(Self {
            discard_part_extents: std::sync::atomic::AtomicU32::new(discard_part_extents),
            disks: RwLock::new(LocalDisks { local, resync: resync_local }),
            disk_epoch: AtomicU64::new(0),
            health: DiskHealth::new(policy),
            sole_copy: AtomicBool::new(false),
            lost_writes: AtomicBool::new(false),
            peer: RwLock::new(None),
            tracking: Mutex::new(tracking),
            bitmap_block,
            writes_in_flight: Mutex::new(Vec::new()),
            held: std::sync::atomic::AtomicBool::new(false),
            drained: tokio::sync::Notify::new(),
            parked_wakers: Mutex::new(Vec::new()),
            app_active: std::sync::atomic::AtomicBool::new(false),
            alone: AloneGate::default(),
        })
    }

    fn discard_parts_for(tracking: &Tracking) -> u32 {
        let slots = tracking.activity.as_ref().map_or(u32::MAX, |(log, _)| log.capacity());
        (slots / 4).clamp(1, DISCARD_PART_EXTENTS)
    }

    /// The local disk's health: whether it is in use, and its errors.
    pub fn health(&self) -> &DiskHealth {
        &self.health
    }

    /// A disk is attached again (`rdbd attach`): queues move to it as their local I/O drains, and
    /// the bitmap and activity log are its. The caller has ended the peer's link first, so that
    /// no write followed on the old disk's log reports to the new one.
    pub fn attach_disk(&self, local: Arc<dyn BlockDevice>, resync: Arc<dyn BlockDevice>, tracking: Tracking) {
        self.discard_part_extents.store(Self::discard_parts_for(&tracking), Ordering::Relaxed);
        *self.tracking.lock().expect("tracking lock") = tracking;
        *self.disks.write().expect("disks lock") = LocalDisks { local, resync };
        self.disk_epoch.fetch_add(1, Ordering::AcqRel);
        self.health.attached();
        self.wake_parked();
    }

    /// Whether this node holds the only copy (its peer is a Diskless Primary).
    pub fn sole_copy(&self) -> bool {
        self.sole_copy.load(Ordering::Acquire)
    }

    pub fn set_sole_copy(&self, sole: bool) {
        self.sole_copy.store(sole, Ordering::Release);
    }

    /// Marks `range` out of sync durably before this node writes it as the only copy, so that the
    /// peer's disk, attached again, is resynced over it even after a crash here.
    pub fn mark_durably(&self, range: (u64, u64)) -> Result<(), crate::metadata::store::MetaError> {
        self.mark_out_of_sync(range);
        self.write_stale_bitmap_pages(false)
    }

    /// The gate for writes the peer does not have; after opening it, [`ReplicatedDevice::wake_parked`].
    pub fn alone_gate(&self) -> &AloneGate {
        &self.alone
    }

    /// Opens the alone gate for as long as the current link lives; false if there is none.
    pub fn open_alone_gate_while_connected(&self) -> bool {
        let epoch = self.alone.link_epoch();
        // Read before looking at the link: a link that dies after this bumps the epoch.
        if self.peer().is_none() {
            return false;
        }
        self.alone.open_while_connected(epoch);
        true
    }

    /// Whether the application submitted a request, on any queue, since the last call.
    pub fn take_app_activity(&self) -> bool {
        self.app_active.swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    /// Writes the bitmap pages changed since they were last written (`all`: every page) to the
    /// metadata, durably.
    pub fn write_stale_bitmap_pages(&self, all: bool) -> Result<(), crate::metadata::store::MetaError> {
        self.with_tracking(|t| {
            let Some((_, meta)) = &t.activity else { return Ok(()) };
            if all {
                t.bitmap.mark_all_pages_stale();
            }
            let pages = t.bitmap.take_stale_pages();
            meta.write_bitmap_pages(&t.bitmap, &pages)
        })
    }

    /// Claims `range` for a resync read like [`ReplicatedDevice::claim_range`]; when a write
    /// holds it, arranges for `cx` to be woken when a range is released and returns `Pending`.
    pub fn poll_claim_range(&self, range: (u64, u64), cx: &mut Context<'_>) -> Poll<()> {
        if self.try_claim(range) {
            return Poll::Ready(());
        }
        let mut wakers = self.parked_wakers.lock().expect("wakers lock");
        if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
            wakers.push(cx.waker().clone());
        }
        drop(wakers);
        // Released between the first try and the registration: not missed.
        if self.try_claim(range) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Stops new writes from starting and waits (at most `limit`) until none is in flight, so
    /// the bitmap stops changing while it is sent to a connecting peer. Returns whether the
    /// writes drained; the hold stays until [`ReplicatedDevice::release_writes`] either way.
    /// A write still in flight when the bitmap goes out may mark its blocks after it (one
    /// waiting for its activity-log transaction), so the caller must not go on without them.
    pub async fn hold_writes(&self, limit: std::time::Duration) -> bool {
        self.held.store(true, std::sync::atomic::Ordering::SeqCst);
        let drained = async {
            loop {
                // Registered before the check, so a release in between is not missed.
                let notified = self.drained.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.writes_in_flight.lock().expect("ranges lock").is_empty() {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, drained).await.is_ok()
    }

    pub fn release_writes(&self) {
        self.held.store(false, std::sync::atomic::Ordering::SeqCst);
        self.wake_parked();
    }

    /// Has every queue with parked or frozen requests look at them again (a range was
    /// released, a hold ended, or the alone gate changed).
    pub fn wake_parked(&self) {
        for waker in std::mem::take(&mut *self.parked_wakers.lock().expect("wakers lock")) {
            waker.wake();
        }
    }

    /// Logs the extents of `range` before it is written. `Ok(false)`: every log slot is busy,
    /// try again after a write completes. A metadata write failure fails the write: an
    /// unlogged write could be lost silently after a crash.
    fn activate(&self, (start, end): (u64, u64)) -> Result<bool, IoError> {
        if !self.health.usable() {
            // Diskless: the disk holding the log is gone; the peer tracks what it writes.
            return Ok(true);
        }
        let mut t = self.tracking.lock().expect("tracking lock");
        let Tracking { bitmap, activity } = &mut *t;
        let Some((log, meta)) = activity else { return Ok(true) };
        let extents = extents_of(start, end - start);
        let mut cold = false;
        for (n, extent) in extents.clone().enumerate() {
            match log.begin(extent) {
                Begin::Hot => {}
                Begin::Pending => cold = true,
                Begin::Full => {
                    for undo in extents.clone().take(n) {
                        log.end(undo);
                    }
                    // Slots held by writes the peer has not made stable are freed by its next
                    // FlushAck: ask for one now rather than at the next periodic flush.
                    if let Some(peer) = self.peer() {
                        peer.request_flush();
                    }
                    return Ok(false);
                }
            }
        }
        if !cold {
            // Every extent is already logged: the common case costs no scan of the log.
            return Ok(true);
        }
        // Transactions are synchronous here and under the lock, so one is never in flight
        // when another is prepared.
        while let Some(tx) = log.prepare() {
            // An evicted extent's writes must be on this disk before the log forgets it: a
            // power loss would otherwise lose them here while the peer has them, unmarked. One
            // flush per transaction (DRBD's AL write carries a preflush for the same reason).
            let durable = if tx.evicted.is_empty() { Ok(()) } else { self.local().sync() };
            let committed = durable
                .map_err(|e| e.to_string())
                .and_then(|()| meta.commit(bitmap, &tx).map_err(|e| e.to_string()));
            match committed {
                Ok(()) => log.committed(tx),
                Err(e) => {
                    tracing::error!("activity log write failed: {e}");
                    log.failed(tx);
                    for extent in extents {
                        log.end(extent);
                    }
                    self.health.failed(DiskError::new(DiskOp::Metadata, None, format!("activity log: {e}")));
                    return Err(IoError::Io(libc::EIO));
                }
            }
        }
        Ok(true)
    }

    /// Extents the activity log holds now.
    pub fn activity_log_extents(&self) -> u32 {
        self.with_tracking(|t| t.activity.as_ref().map_or(0, |(log, _)| log.active_extents().count() as u32))
    }

    /// The activity log's clock now: the mark for a later [`ReplicatedDevice::retire_idle_extents`].
    pub fn activity_clock(&self) -> u64 {
        self.with_tracking(|t| t.activity.as_ref().map_or(0, |(log, _)| log.clock()))
    }

    /// Takes out of the activity log the extents no write has begun on since `mark` and none
    /// holds (in flight, or not yet stable on the peer: see [`LinkEvents`]), so that a crash of
    /// this node resyncs the extents written recently rather than every one the log has room
    /// for. Their writes are made durable on this disk first (one flush, outside the lock), or a
    /// power loss could lose them here while the peer has them. Returns how many left.
    pub fn retire_idle_extents(&self, mark: u64) -> Result<usize, crate::metadata::store::MetaError> {
        // Idle now: every write to them completed before the flush below starts. One that
        // begins meanwhile uses its extent after the mark, which keeps it in the log.
        let mut idle = self
            .with_tracking(|t| t.activity.as_ref().map(|(log, _)| log.unused_since(mark)))
            .unwrap_or_default();
        if idle.is_empty() {
            return Ok(0);
        }
        idle.sort_unstable();
        if !self.health.usable() {
            return Ok(0);
        }
        if let Err(e) = self.local().sync() {
            self.health.failed(DiskError::new(DiskOp::Flush, None, e));
            let error = std::io::Error::other(format!("flushing the data before the activity log: {e}"));
            return Err(crate::metadata::store::MetaError::Io { path: "data disk".into(), error });
        }
        let mut t = self.tracking.lock().expect("tracking lock");
        let Tracking { bitmap, activity } = &mut *t;
        let Some((log, meta)) = activity else { return Ok(0) };
        let Some(tx) = log.retire(|e| idle.binary_search(&e).is_ok(), mark) else { return Ok(0) };
        let retired = tx.evicted.len();
        match meta.commit(bitmap, &tx) {
            Ok(()) => {
                log.committed(tx);
                Ok(retired)
            }
            Err(e) => {
                log.failed(tx);
                Err(e)
            }
        }
    }

    /// Writes the link followed are settled: stable on the peer, or (`lost`) marked out of sync;
    /// their extents may leave the activity log now, and writes waiting for a slot look again.
    fn release_followed(&self, ranges: &[(u64, u64)], lost: bool) {
        // Diskless: the log and bitmap are the failed disk's; the peer tracks what it lacks.
        if self.health.usable() {
            let mut t = self.tracking.lock().expect("tracking lock");
            let Tracking { bitmap, activity } = &mut *t;
            for &(start, end) in ranges {
                if lost {
                    bitmap.set(DirtyBitmap::blocks_of(start, end - start, self.bitmap_block));
                }
                if let Some((log, _)) = activity {
                    for extent in extents_of(start, end - start) {
                        log.end(extent);
                    }
                }
            }
        }
        self.wake_parked();
    }

    /// Counts one more holder on `range`'s extents, which are logged already (its write was
    /// activated).
    fn hold_extents(&self, (start, end): (u64, u64)) {
        let mut t = self.tracking.lock().expect("tracking lock");
        if let Some((log, _)) = &mut t.activity {
            for extent in extents_of(start, end - start) {
                log.begin(extent);
            }
        }
    }

    fn deactivate(&self, (start, end): (u64, u64)) {
        let mut t = self.tracking.lock().expect("tracking lock");
        if let Some((log, _)) = &mut t.activity {
            for extent in extents_of(start, end - start) {
                log.end(extent);
            }
        }
    }

    /// Starts mirroring to the peer at the other end of `data` and `meta` (after the handshake).
    /// Writes the peer may lose when the link dies are marked out of sync here, and each write
    /// keeps its activity-log extent until the peer has it stably. A sync source passes where
    /// the peer's resync acknowledgements go.
    pub fn connect_peer(
        self: &Arc<Self>,
        data: FrameWriter,
        meta: Framed,
        options: LinkOptions,
        resync_replies: Option<tokio::sync::mpsc::UnboundedSender<ResyncReply>>,
    ) -> Arc<PeerLink> {
        let events = Arc::new(DeviceLinkEvents(Arc::downgrade(self)));
        let link = PeerLink::start(data, meta, options, events, resync_replies);
        *self.peer.write().expect("peer lock") = Some(link.clone());
        link
    }

    /// The Primary's disk was just detached: the peer hears it before any request sent from now
    /// on, so that it marks every one for this disk's resync (and holds the only copy).
    fn announce_detached(&self) {
        tracing::error!("the local disk failed: detached; serving through the peer");
        if let Some(peer) = self.peer() {
            use rdbd_protocol::repl::Message;
            peer.send_other(&Message::StateChange { role: Role::Primary, disk: DiskState::Diskless });
        }
    }

    /// Stops mirroring (the peer is gone or disconnected).
    pub fn clear_peer(&self) {
        *self.peer.write().expect("peer lock") = None;
    }

    /// Whether a link died with writes unstable on the peer since the last call.
    pub fn take_lost_writes(&self) -> bool {
        self.lost_writes.swap(false, Ordering::AcqRel)
    }

    /// The peer, while its link is alive.
    pub fn peer(&self) -> Option<Arc<PeerLink>> {
        self.peer.read().expect("peer lock").as_ref().filter(|p| p.is_alive()).cloned()
    }

    pub fn out_of_sync_blocks(&self) -> u64 {
        self.tracking.lock().expect("tracking lock").bitmap.dirty_blocks()
    }

    /// Runs `f` on the bitmap and activity log (for persisting them, or for resync).
    pub fn with_tracking<R>(&self, f: impl FnOnce(&mut Tracking) -> R) -> R {
        f(&mut self.tracking.lock().expect("tracking lock"))
    }

    /// The backing device under the replication.
    pub fn local(&self) -> Arc<dyn BlockDevice> {
        self.disks.read().expect("disks lock").local.clone()
    }

    /// The backing device for resync reads and writes.
    pub fn resync_local(&self) -> Arc<dyn BlockDevice> {
        self.disks.read().expect("disks lock").resync.clone()
    }

    pub fn info_size(&self) -> u64 {
        self.info().size
    }

    pub fn bitmap_block(&self) -> u32 {
        self.bitmap_block
    }

    /// Reserves `range` for a resync read, unless a write in flight overlaps it; application
    /// writes to it wait until [`ReplicatedDevice::release_range`] (SPEC §5.5).
    pub fn claim_range(&self, range: (u64, u64)) -> bool {
        self.try_claim(range)
    }

    pub fn release_range(&self, range: (u64, u64)) {
        self.release(range)
    }

    pub fn mark_out_of_sync(&self, (start, end): (u64, u64)) {
        let blocks = DirtyBitmap::blocks_of(start, end - start, self.bitmap_block);
        self.tracking.lock().expect("tracking lock").bitmap.set(blocks);
    }

    /// Reserves `range` for a write unless a write in flight overlaps it.
    fn try_claim(&self, range: (u64, u64)) -> bool {
        if self.held.load(std::sync::atomic::Ordering::SeqCst) {
            return false;
        }
        let mut ranges = self.writes_in_flight.lock().expect("ranges lock");
        if ranges.iter().any(|r| r.0 < range.1 && range.0 < r.1) {
            return false;
        }
        ranges.push(range);
        true
    }

    fn release(&self, range: (u64, u64)) {
        let mut ranges = self.writes_in_flight.lock().expect("ranges lock");
        if let Some(i) = ranges.iter().position(|r| *r == range) {
            ranges.swap_remove(i);
        }
        let drained = ranges.is_empty() && self.held.load(std::sync::atomic::Ordering::SeqCst);
        drop(ranges);
        if drained {
            self.drained.notify_waiters();
        }
        self.wake_parked();
    }
}

impl BlockDevice for ReplicatedDevice {
    fn info(&self) -> DeviceInfo {
        self.disks.read().expect("disks lock").local.info()
    }

    fn open_queue(self: Arc<Self>) -> std::io::Result<Box<dyn IoQueue>> {
        let local_epoch = self.disk_epoch.load(Ordering::Acquire);
        let local = self.local().open_queue()?;
        Ok(Box::new(ReplicatedQueue {
            device: self,
            local,
            local_epoch,
            inbox: Arc::new(Inbox::default()),
            ops: Slab::new(),
            parked: VecDeque::new(),
            local_done: Vec::new(),
            peer_done: Vec::new(),
            early: Vec::new(),
            split: Vec::new(),
            ready: Vec::new(),
            frozen: Vec::new(),
        }))
    }

    fn block_status(&self, offset: u64, len: u64, max_extents: usize) -> Result<Vec<Extent>, IoError> {
        if !self.health.usable() {
            return Ok(vec![Extent { len: len.max(1), hole: false }]);
        }
        self.local().block_status(offset, len, max_extents)
    }

    fn sync(&self) -> Result<(), IoError> {
        if !self.health.usable() {
            return Err(IoError::Io(libc::EIO));
        }
        self.local().sync()
    }

    // Splicing would bypass the copy the peer needs: not offered.
    fn accepts_splice(&self) -> bool {
        false
    }

    fn splice_write(&self, _from: BorrowedFd<'_>, _offset: u64, _len: usize) -> Result<usize, IoError> {
        Err(IoError::NotSupported)
    }
}

/// What the link reports, as the device takes it: a stable write releases its activity-log
/// extents; a link's death closes the alone gate first, then marks what the peer may lack out of
/// sync, in the same locked step that releases the extents, so that no extent can leave the log
/// between the two.
struct DeviceLinkEvents(std::sync::Weak<ReplicatedDevice>);

impl LinkEvents for DeviceLinkEvents {
    fn dying(&self) {
        if let Some(device) = self.0.upgrade() {
            device.alone.peer_lost();
        }
    }

    fn stable(&self, ranges: &[(u64, u64)]) {
        if let Some(device) = self.0.upgrade() {
            device.release_followed(ranges, false);
        }
    }

    fn lost(&self, ranges: &[(u64, u64)]) {
        if let Some(device) = self.0.upgrade() {
            device.release_followed(ranges, true);
        }
    }

    fn losing(&self) {
        if let Some(device) = self.0.upgrade() {
            device.lost_writes.store(true, Ordering::Release);
        }
    }

    fn resynced(&self, offset: u64, len: u32) {
        if let Some(device) = self.0.upgrade() {
            let blocks = DirtyBitmap::blocks_of(offset, u64::from(len), device.bitmap_block);
            device.with_tracking(|t| t.bitmap.clear(blocks));
        }
    }
}

/// One request on its way through the local disk and the peer.
struct Op {
    tag: u32,
    /// Bytes written, for writes (ordering and out-of-sync marking).
    range: Option<(u64, u64)>,
    local: Option<Result<(), IoError>>,
    buf: Option<IoBuf>,
    waiting_for_peer: bool,
    /// The link follows the write until the peer has it stably, and releases its activity-log
    /// extents then (otherwise they are released when the op completes).
    followed: bool,
    /// The peer does not have it (gone, or lost it), or a read made without the peer:
    /// answered only through the alone gate.
    alone: bool,
    /// The request went to the peer (which has it unless reported lost or failed).
    sent: bool,
    /// A read's offset: a read the local disk fails is retried on the peer.
    read_at: Option<u64>,
    /// Served by the peer alone (diskless, or a read moved there): its local result stands in.
    remote: bool,
    /// A write's range is still claimed (overlapping writes and resync reads wait for it). A
    /// write the alone gate holds gives its claim up: it is on this disk and marked for the
    /// peer, only its answer waits, and the reconnect that would open the gate must not wait
    /// for it (issue 15: the bitmap exchange's hold timed out on frozen writes).
    claimed: bool,
}

pub struct ReplicatedQueue {
    device: Arc<ReplicatedDevice>,
    local: Box<dyn IoQueue>,
    /// The device's disk epoch `local` was opened in.
    local_epoch: u64,
    inbox: Arc<Inbox>,
    ops: Slab<Op>,
    /// Writes waiting for an overlapping write in flight to finish.
    parked: VecDeque<(u32, IoOp)>,
    local_done: Vec<Completion>,
    peer_done: Vec<Delivery>,
    /// Requests refused before they started (activity log write failed).
    early: Vec<Completion>,
    /// Client requests cut into parts (a discard wider than the activity log may hold): tag,
    /// parts still running, and the first error.
    split: Vec<(u32, usize, Result<(), IoError>)>,
    /// Keys of ops whose local and peer parts are both done (reused, never reallocated).
    ready: Vec<usize>,
    /// Keys of done ops the alone gate holds (frozen: no quorum without the peer).
    frozen: Vec<usize>,
}

/// Extents one part of a trim or zeroing may span at most (64 MiB): a request may cover 4 GiB,
/// more than the activity log can hold at once, and it would wait for ever for slots (DRBD caps
/// discards for the same reason).
const DISCARD_PART_EXTENTS: u32 = 16;

/// A trim or zeroing wider than `part_extents` extents, cut at extent boundaries.
fn split_discard(op: &IoOp, part_extents: u32) -> Option<Vec<IoOp>> {
    let (offset, len) = match op {
        IoOp::Trim { offset, len, .. } | IoOp::WriteZeroes { offset, len, .. } => (*offset, *len),
        _ => return None,
    };
    let part = u64::from(part_extents) * EXTENT_BYTES;
    let end = offset + len;
    if extents_of(offset, len).count() <= part_extents as usize {
        return None;
    }
    let mut parts = Vec::new();
    let mut at = offset;
    while at < end {
        let next = ((at / part + 1) * part).min(end);
        parts.push(match op {
            IoOp::Trim { fua, .. } => IoOp::Trim { offset: at, len: next - at, fua: *fua },
            IoOp::WriteZeroes { may_punch, fast_only, fua, .. } => IoOp::WriteZeroes {
                offset: at,
                len: next - at,
                may_punch: *may_punch,
                fast_only: *fast_only,
                fua: *fua,
            },
            _ => unreachable!("only discards are split"),
        });
        at = next;
    }
    Some(parts)
}

/// Hands a finished request to the client; a part of a split one (see `split`) only once it is
/// the last, with the first error of any part.
fn finish(split: &mut Vec<(u32, usize, Result<(), IoError>)>, c: Completion, out: &mut Vec<Completion>) {
    let Some(i) = split.iter().position(|(tag, ..)| *tag == c.tag) else {
        return out.push(c);
    };
    let (_, left, result) = &mut split[i];
    *left -= 1;
    if result.is_ok() {
        *result = c.result;
    }
    if *left == 0 {
        let (tag, _, result) = split.swap_remove(i);
        out.push(Completion { tag, result, buf: None });
    }
}

fn write_range(op: &IoOp) -> Option<(u64, u64)> {
    match op {
        IoOp::Write { offset, buf, .. } => Some((*offset, offset + buf.len() as u64)),
        IoOp::Trim { offset, len, .. } | IoOp::WriteZeroes { offset, len, .. } => {
            Some((*offset, offset + len))
        }
        _ => None,
    }
}

impl ReplicatedQueue {
    /// Starts a request whose range (if a write) is claimed and logged.
    fn start(&mut self, tag: u32, op: IoOp) {
        self.follow_attached_disk();
        if !self.device.health.usable() {
            return self.start_remote(tag, op);
        }
        let key = self.ops.vacant_key();
        let range = write_range(&op);
        let peer = self.device.peer();
        let not_sent = Submitted { answered: false, followed: false };
        // A write the link follows holds its extents twice: once until it is on this disk, once
        // until it is stable on the peer. Taken before the peer can answer, dropped below if the
        // link does not follow it.
        let peer_hold = match (&peer, range) {
            (Some(_), Some(range)) => {
                self.device.hold_extents(range);
                Some(range)
            }
            _ => None,
        };
        let sent = match (&peer, &op) {
            (Some(p), IoOp::Write { offset, buf, fua }) => p.write(*offset, buf, *fua, &self.inbox, key),
            (Some(p), IoOp::Trim { offset, len, fua }) => p.trim(*offset, *len, *fua, &self.inbox, key),
            (Some(p), IoOp::WriteZeroes { offset, len, may_punch, fua, .. }) => {
                p.zeroes(*offset, *len, *may_punch, *fua, &self.inbox, key)
            }
            (Some(p), IoOp::Flush) => p.flush(&self.inbox, key),
            (None, _) => {
                if let Some(range) = range {
                    self.device.mark_out_of_sync(range);
                }
                not_sent
            }
            (Some(_), IoOp::Read { .. } | IoOp::Cache { .. }) => not_sent,
        };
        if let (Some(range), false) = (peer_hold, sent.followed) {
            self.device.deactivate(range);
        }
        let writes = range.is_some() || matches!(op, IoOp::Flush);
        let read_at = match &op {
            IoOp::Read { offset, .. } => Some(*offset),
            _ => None,
        };
        self.ops.insert(Op {
            tag,
            range,
            local: None,
            buf: None,
            waiting_for_peer: sent.answered,
            followed: sent.followed,
            // Cut off from the peer, this disk may be stale (the peer may have been promoted
            // and written): a read waits for the gate as a write does, as in the core.
            alone: peer.is_none() && (writes || read_at.is_some()),
            sent: peer.is_some() && writes,
            read_at,
            remote: false,
            claimed: range.is_some(),
        });
        self.local.submit(key as u32, op);
    }

    /// Starts a request on the peer alone: this node's disk failed or is detached (DRBD's
    /// diskless mode). Without a peer there is no data to serve: EIO.
    fn start_remote(&mut self, tag: u32, op: IoOp) {
        let key = self.ops.vacant_key();
        let range = write_range(&op);
        let Some(peer) = self.device.peer() else {
            if let Some(range) = range {
                self.device.release(range);
            }
            return self.fail_early(tag, op, IoError::Io(libc::EIO));
        };
        let inbox = &self.inbox;
        let (sent, buf) = match op {
            IoOp::Read { offset, buf } => (peer.read(offset, buf.len() as u32, inbox, key), Some(buf)),
            IoOp::Write { offset, buf, fua } => (peer.write(offset, &buf, fua, inbox, key), Some(buf)),
            IoOp::Trim { offset, len, fua } => (peer.trim(offset, len, fua, inbox, key), None),
            IoOp::WriteZeroes { offset, len, may_punch, fua, .. } => {
                (peer.zeroes(offset, len, may_punch, fua, inbox, key), None)
            }
            IoOp::Flush => (peer.flush(inbox, key), None),
            IoOp::Cache { .. } => (Submitted { answered: false, followed: false }, None),
        };
        self.ops.insert(Op {
            tag,
            range,
            local: Some(Ok(())),
            buf,
            waiting_for_peer: sent.answered,
            followed: sent.followed,
            alone: false,
            sent: true,
            read_at: None,
            remote: true,
            claimed: range.is_some(),
        });
        if !sent.answered {
            self.ready.push(key);
        }
    }

    /// Moves to the disk attached since this queue opened its local queue, once nothing runs on
    /// the old one.
    fn follow_attached_disk(&mut self) {
        let epoch = self.device.disk_epoch.load(Ordering::Acquire);
        if epoch == self.local_epoch || self.local.in_flight() > 0 {
            return;
        }
        match self.device.local().open_queue() {
            Ok(queue) => {
                self.local = queue;
                self.local_epoch = epoch;
            }
            Err(e) => tracing::warn!("cannot open a queue on the attached disk: {e}"),
        }
    }

    /// The local disk failed `key`'s request. Reports it (which may detach the disk), and
    /// retries a read on the peer; returns whether the op goes on there.
    fn local_failed(&mut self, key: usize, error: IoError, buf: Option<IoBuf>) -> bool {
        let op = &self.ops[key];
        let (kind, offset) = match (op.read_at, op.range) {
            (Some(offset), _) => (DiskOp::Read, Some(offset)),
            (None, Some((start, _))) => (DiskOp::Write, Some(start)),
            (None, None) => (DiskOp::Flush, None),
        };
        if self.device.health.failed(DiskError::new(kind, offset, error)) {
            self.device.announce_detached();
        }
        let peer = self.device.peer();
        // This disk lacks what the peer has (a write it failed), or cannot read it: the peer
        // keeps the range marked, so the resync to this disk, attached again, covers it.
        let read = op.read_at.zip(buf.as_ref()).map(|(at, b)| (at, at + b.len() as u64));
        if let (Some(range), Some(peer)) = (op.range.or(read), &peer) {
            peer.send_out_of_sync(range);
        }
        let (Some(offset), Some(peer), Some(buf)) = (op.read_at, peer, buf) else { return false };
        let sent = peer.read(offset, buf.len() as u32, &self.inbox, key);
        let op = &mut self.ops[key];
        op.buf = Some(buf);
        op.remote = true;
        op.local = Some(Ok(()));
        op.waiting_for_peer = sent.answered;
        true
    }

    /// Starts parked writes whose overlap has cleared, in order.
    fn unpark(&mut self) {
        let mut i = 0;
        while i < self.parked.len() {
            let range = write_range(&self.parked[i].1).expect("only writes park");
            let blocked_by_earlier = self.parked.iter().take(i).any(|(_, o)| {
                let r = write_range(o).expect("only writes park");
                r.0 < range.1 && range.0 < r.1
            });
            if blocked_by_earlier {
                i += 1;
                continue;
            }
            match self.admit(range) {
                Ok(true) => {
                    let (tag, op) = self.parked.remove(i).expect("index in range");
                    self.start(tag, op);
                }
                Ok(false) => i += 1,
                Err(e) => {
                    let (tag, op) = self.parked.remove(i).expect("index in range");
                    self.fail_early(tag, op, e);
                }
            }
        }
    }

    /// Claims a write's range and logs its extents; `Ok(false)` means it must wait.
    fn admit(&mut self, range: (u64, u64)) -> Result<bool, IoError> {
        if !self.device.try_claim(range) {
            return Ok(false);
        }
        match self.device.activate(range) {
            Ok(true) => Ok(true),
            // The log's write failed and detached the disk: the peer takes the write.
            Err(_) if !self.device.health.usable() => Ok(true),
            other => {
                self.device.release(range);
                other
            }
        }
    }

    /// Completes a request that failed before it was started.
    fn fail_early(&mut self, tag: u32, op: IoOp, error: IoError) {
        self.early.push(Completion { tag, result: Err(error), buf: op.into_buf() });
    }

    /// Submits one request (or part) to the device and the peer.
    fn submit_one(&mut self, tag: u32, op: IoOp) {
        if let Some(range) = write_range(&op) {
            if !self.parked.is_empty() {
                self.parked.push_back((tag, op));
                return;
            }
            match self.admit(range) {
                Ok(true) => {}
                Ok(false) => {
                    self.parked.push_back((tag, op));
                    return;
                }
                Err(e) => return self.fail_early(tag, op, e),
            }
        }
        self.start(tag, op);
    }
}

impl IoQueue for ReplicatedQueue {
    fn submit(&mut self, tag: u32, op: IoOp) {
        if !self.device.app_active.load(std::sync::atomic::Ordering::Relaxed) {
            self.device.app_active.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        match split_discard(&op, self.device.discard_part_extents.load(Ordering::Relaxed)) {
            None => self.submit_one(tag, op),
            Some(parts) => {
                self.split.push((tag, parts.len(), Ok(())));
                for part in parts {
                    self.submit_one(tag, part);
                }
            }
        }
    }

    fn poll_complete(&mut self, cx: &mut Context<'_>, out: &mut Vec<Completion>) -> Poll<()> {
        let before = out.len();
        for c in self.early.drain(..) {
            finish(&mut self.split, c, out);
        }
        self.unpark();
        if self.local.in_flight() > 0 {
            let _ = self.local.poll_complete(cx, &mut self.local_done);
        }
        self.inbox.take(cx, &mut self.peer_done);
        for c in std::mem::take(&mut self.local_done) {
            let key = c.tag as usize;
            if !self.ops.contains(key) {
                continue;
            }
            if let Err(e @ IoError::Io(_)) = c.result {
                if self.local_failed(key, e, c.buf) {
                    continue;
                }
                self.ops[key].local = Some(c.result);
            } else {
                let op = &mut self.ops[key];
                op.local = Some(c.result);
                op.buf = c.buf;
            }
            if !self.ops[key].waiting_for_peer {
                self.ready.push(key);
            }
        }
        for (key, outcome, data) in self.peer_done.drain(..) {
            if let Some(op) = self.ops.get_mut(key) {
                op.waiting_for_peer = false;
                if outcome != PeerOutcome::Done {
                    if op.remote {
                        // No disk has it: the request fails.
                        op.local = Some(Err(IoError::Io(libc::EIO)));
                    } else if let Some(range) = op.range {
                        self.device.mark_out_of_sync(range);
                    }
                    op.alone = true;
                }
                if let (Some(data), Some(buf)) = (data, op.buf.as_mut()) {
                    if data.len() == buf.len() {
                        buf.copy_from_slice(&data);
                    } else {
                        op.local = Some(Err(IoError::Io(libc::EIO)));
                    }
                }
                if op.local.is_some() {
                    self.ready.push(key);
                }
            }
        }
        // Frozen ops get another look: the gate may have opened (or turned to failing them).
        self.ready.append(&mut self.frozen);
        for key in self.ready.drain(..) {
            let op = &mut self.ops[key];
            let local_ok = op.local.as_ref().is_some_and(|r| r.is_ok());
            if op.alone && local_ok && !op.remote {
                match self.device.alone.verdict() {
                    AloneVerdict::Answer => {}
                    AloneVerdict::Hold => {
                        if let (Some(range), true) = (op.range, op.claimed) {
                            op.claimed = false;
                            self.device.release(range);
                        }
                        self.frozen.push(key);
                        continue;
                    }
                    AloneVerdict::Fail => op.local = Some(Err(IoError::Io(libc::EIO))),
                }
            } else if !local_ok && op.read_at.is_none() && op.sent && !op.alone {
                // This disk failed the write or flush, the peer has it: DRBD's rule, a request
                // succeeds when either disk has it (this one is detached now).
                op.local = Some(Ok(()));
            }
            let op = self.ops.remove(key);
            if let Some(range) = op.range {
                // The local write's count; a followed write's other count goes when the peer
                // has it stably (release_followed). A remote op has no local count.
                if !op.remote || !op.followed {
                    self.device.deactivate(range);
                }
                if op.claimed {
                    self.device.release(range);
                }
            }
            let result = op.local.expect("ready ops have a local result");
            finish(&mut self.split, Completion { tag: op.tag, result, buf: op.buf }, out);
        }
        if !self.frozen.is_empty() {
            // Woken when the gate changes (wake_parked).
            let mut wakers = self.device.parked_wakers.lock().expect("wakers lock");
            if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                wakers.push(cx.waker().clone());
            }
            drop(wakers);
            // Changed between the look above and the registration: not missed.
            if self.device.alone.verdict() != AloneVerdict::Hold {
                cx.waker().wake_by_ref();
            }
        }
        if out.len() == before && !self.parked.is_empty() {
            self.unpark();
            if !self.parked.is_empty() {
                // Blocked by another queue's write, a resync read or a hold: woken on release.
                let mut wakers = self.device.parked_wakers.lock().expect("wakers lock");
                if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                    wakers.push(cx.waker().clone());
                }
                drop(wakers);
                self.unpark();
            }
        }
        if out.len() > before || (self.ops.is_empty() && self.parked.is_empty() && self.early.is_empty()) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    fn in_flight(&self) -> usize {
        self.ops.len() + self.parked.len() + self.early.len()
    }
}
