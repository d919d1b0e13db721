//! The sync target's I/O, carried out by the applier (which owns the disk queues and the
//! channels on the target): resync data written on the resync queue, the flush that makes it
//! durable before it is acknowledged, checksum requests, and the end of the resync. What to
//! request and acknowledge is the pure bookkeeping of [`super::target`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdbd_protocol::repl::{block_crc32c, AckMode, Message, State};
use tracing::{info, warn};

use super::target::ResyncTarget;
use crate::replication::device::ReplicatedDevice;

use crate::replication::apply::{errno_of, Applier, ApplyError, Kind, Received};
use crate::replication::disk_health::DiskOp;
use crate::storage::{IoError, IoOp};

/// A resync this node is the target of: the pure bookkeeping, the device whose bitmap it
/// clears, and the origin of the bookkeeping's clock.
pub struct SyncTarget {
    pub target: ResyncTarget,
    pub device: Arc<ReplicatedDevice>,
    pub origin: Instant,
}

impl SyncTarget {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

impl Applier {
    /// ResyncData: written like an application write (ordered against overlapping ones), and
    /// acknowledged only once a flush made it durable.
    pub(in crate::replication) fn resync_data(
        &mut self,
        offset: u64,
        data: &[u8],
        crc32c: u32,
    ) -> Result<(), ApplyError> {
        let Some(SyncTarget { target, .. }) = self.resync.as_mut() else {
            return Err(ApplyError::Unexpected(rdbd_protocol::repl::kind::RESYNC_DATA));
        };
        let len = data.len();
        if self.integrity && block_crc32c(data) != crc32c {
            return Err(ApplyError::Integrity { offset });
        }
        let request = target.data(offset, len)?;
        let range = (offset, offset + len as u64);
        let mut buf = self.pool.take(len);
        buf.copy_from_slice(data);
        self.stats.resync_bytes += len as u64;
        // The request's offset stands in for a sequence number: it names the request.
        let op = IoOp::Write { offset, buf, fua: false };
        self.enqueue(request, AckMode::None, range, op, Kind::ResyncWrite);
        Ok(())
    }

    /// ResyncInSync: the source found the range identical (checksum resync).
    pub(in crate::replication) fn resync_in_sync(&mut self, offset: u64, len: u32) -> Result<(), ApplyError> {
        let Some(sync) = self.resync.as_mut() else {
            return Err(ApplyError::Unexpected(rdbd_protocol::repl::kind::RESYNC_IN_SYNC));
        };
        let now = sync.now();
        sync.target.in_sync(offset, len, now, &mut self.answers)?;
        Ok(())
    }

    /// The source's final State: valid only once every requested block is written and acked.
    pub(in crate::replication) fn resync_end(&mut self, state: &State) -> Result<(), ApplyError> {
        let Some(sync) = &self.resync else {
            return Err(ApplyError::Unexpected(Message::State(*state).kind()));
        };
        let remaining = sync.device.out_of_sync_blocks();
        if !sync.target.idle() || remaining > 0 {
            return Err(ApplyError::ResyncFinish(format!(
                "the source finished while {remaining} blocks were still out of sync here"
            )));
        }
        let (role, disk) =
            self.events.resync_finished(state, self.stats.resync_bytes).map_err(ApplyError::ResyncFinish)?;
        self.resync = None;
        info!(bytes = self.stats.resync_bytes, "resync finished: this node is UpToDate");
        Message::StateChange { role, disk }.encode(&mut self.outgoing);
        Ok(())
    }

    /// Requests what the controller allows, starts a flush when one is due, and sends the
    /// acknowledgements the bookkeeping decided.
    pub(in crate::replication) fn pump_resync(&mut self) {
        let Some(SyncTarget { target, device, origin }) = self.resync.as_mut() else { return };
        let now = origin.elapsed();
        while let Some((offset, len)) = device.with_tracking(|t| target.next_request(&t.bitmap)) {
            if target.csums().is_none() {
                Message::ResyncRequest { offset, len }.encode(&mut self.outgoing);
                continue;
            }
            // A checksum request carries the digests of what this node has: read it first.
            // Not ordered against application writes: a write racing the read only makes the
            // digests differ, and then the source sends the block.
            let buf = self.pool.take(len as usize);
            let range = (offset, offset + u64::from(len));
            let read =
                Received::new(offset, AckMode::None, range, IoOp::Read { offset, buf }, Kind::CsumRead);
            self.order.push(Kind::CsumRead.order(range), read);
        }
        let flush = target.flush_due(now);
        if flush {
            target.flush_started();
        }
        if target.persist_due(now) {
            // Cleared bits reach the metadata, so an interrupted resync resumes from here.
            if let Err(e) = device.write_stale_bitmap_pages(false) {
                warn!("cannot record the resync's progress in the metadata: {e}");
            }
        }
        self.acks.extend(self.answers.acks.drain(..).map(|(offset, len)| Message::ResyncAck { offset, len }));
        self.acks.extend(self.answers.failed.drain(..).map(|(offset, len, errno)| Message::ResyncNegAck {
            offset,
            len,
            errno,
        }));
        if flush {
            self.enqueue(0, AckMode::None, (0, 0), IoOp::Flush, Kind::ResyncFlush);
        }
        self.start_ready();
    }

    pub(in crate::replication) fn resync_written(
        &mut self,
        request: u64,
        offset: u64,
        result: Result<(), IoError>,
    ) {
        if let Err(e) = result {
            warn!(offset, "writing resync data failed: {e:?}");
            self.stats.failed += 1;
            self.disk_failed(DiskOp::Write, Some(offset), e);
        }
        let Some(sync) = self.resync.as_mut() else { return };
        let now = sync.now();
        sync.target.written(request, result.map_err(errno_of), now, &mut self.answers);
    }

    /// The flush made the written resync data durable: the bookkeeping clears and acknowledges
    /// it (SPEC §6).
    pub(in crate::replication) fn resync_flushed(&mut self, result: Result<(), IoError>) {
        if let Err(e) = result {
            self.disk_failed(DiskOp::Flush, None, e);
        }
        let Some(SyncTarget { target, device, .. }) = self.resync.as_mut() else { return };
        device
            .with_tracking(|t| target.flush_done(result.map_err(errno_of), &mut t.bitmap, &mut self.answers));
    }
}
