//! The sync target's bookkeeping (SPEC §6): which dirty runs to request next, what has arrived,
//! what is written, what a flush has made durable, and the acknowledgements that allows.
//!
//! The target pulls continuously: requests go out in disk order while the controller's budget
//! and the in-flight window allow, data is written as it arrives, and every so often one flush
//! makes everything written so far durable. Only then are those blocks cleared here and
//! acknowledged, so the source never forgets a block that a crash of this node could still lose.
//! The caller (the daemon's applier, or the simulated core) does the I/O, sends the messages,
//! and gives the time as its own clock (a `Duration` since any fixed origin); this type
//! decides. Pure: no I/O, no clock.

use std::collections::BTreeMap;
use std::time::Duration;

use super::controller::Controller;
use rdbd_protocol::repl::DigestAlg;

use super::pace::ResyncConfig;
use crate::metadata::bitmap::DirtyBitmap;

/// Largest range asked for in one request.
pub const REQUEST_MAX: u64 = 4 << 20;
/// Requests outstanding at once, whatever the budget.
const MAX_REQUESTS: usize = 256;
/// Bytes outstanding at once: the controller's fill target, within these bounds.
const MIN_WINDOW: u64 = 8 << 20;
const MAX_WINDOW: u64 = 256 << 20;
/// A flush is due once this much is written and not yet durable...
const FLUSH_BYTES: u64 = 64 << 20;
/// ...or once the oldest such write is this old.
const FLUSH_AGE: Duration = Duration::from_millis(200);
/// Acknowledgements of adjacent requests are merged up to this size (the SPEC's limit).
const ACK_MAX: u64 = 32 << 20;
/// Cleared bits are written to the metadata at least this often during a resync, so an
/// interrupted resync resumes where it stopped.
pub const PERSIST_INTERVAL: Duration = Duration::from_secs(1);

/// What a resync message answered, for the caller's error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("resync data at offset {offset} ({len} bytes) matches no outstanding request")]
pub struct Unrequested {
    pub offset: u64,
    pub len: u64,
}

/// A request sent to the source and not yet acknowledged.
#[derive(Debug, Clone, Copy)]
struct Request {
    len: u32,
    /// Checksum-based: answered by ResyncData for the blocks that differ, then ResyncInSync.
    csum: bool,
    /// Where the next ResyncData of a checksum request may start (they come in order).
    next: u64,
    /// Its data (or, for a checksum request, its closing message) has arrived.
    answered: bool,
    /// Writes of its data not yet complete.
    writing: u32,
    /// A write of its data failed (errno).
    failed: Option<u32>,
}

/// What the applier must send or do after a step of the bookkeeping.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Answers {
    /// `ResyncAck { offset, len }`: durable here, cleared in the bitmap.
    pub acks: Vec<(u64, u32)>,
    /// `ResyncNegAck { offset, len, errno }`: could not be written.
    pub failed: Vec<(u64, u32, u32)>,
}

pub struct ResyncTarget {
    size: u64,
    block: u64,
    /// Next bitmap block to look at.
    cursor: u64,
    /// The whole bitmap has been requested.
    scanned: bool,
    /// Outstanding requests by offset (not overlapping).
    requests: BTreeMap<u64, Request>,
    /// Bytes requested and not yet answered (what the controller paces).
    in_flight: u64,
    /// Bytes requested and not yet written: the window bounds this, so a target disk slower
    /// than the source's holds the source back instead of piling data up in memory.
    unwritten: u64,
    /// Bytes answered since the last controller step.
    received: u64,
    /// Requests wholly written, waiting for a flush.
    written: Vec<(u64, u32)>,
    written_bytes: u64,
    oldest_written: Option<Duration>,
    /// What the flush in progress covers.
    flushing: Option<Vec<(u64, u32)>>,
    controller: Controller,
    /// Bytes that may still be requested in this step (negative: the last request overshot);
    /// `None`: no limit but the window.
    budget: Option<i64>,
    window: u64,
    last_persist: Duration,
    /// Checksum-based resync with this digest.
    csums: Option<DigestAlg>,
    /// Resync data received and written.
    pub bytes: u64,
    /// Bytes a checksum request found identical (not sent).
    pub same_bytes: u64,
}

impl ResyncTarget {
    /// Pulls every block marked in the bitmap of a device of `size` bytes (`block` bytes a
    /// bit), paced by `pace`; with `csums`, by checksum requests (the caller reads each range
    /// first and sends its digests). `now`: the caller's clock.
    pub fn new(size: u64, block: u32, pace: ResyncConfig, csums: Option<DigestAlg>, now: Duration) -> Self {
        let block = u64::from(block);
        let mut controller = Controller::new(pace);
        let budget = controller.step(0, 0).map(|b| b as i64);
        let window = controller.window().clamp(MIN_WINDOW, MAX_WINDOW);
        Self {
            size,
            block,
            cursor: 0,
            scanned: false,
            requests: BTreeMap::new(),
            in_flight: 0,
            unwritten: 0,
            received: 0,
            written: Vec::new(),
            written_bytes: 0,
            oldest_written: None,
            flushing: None,
            controller,
            budget,
            window,
            last_persist: now,
            csums,
            bytes: 0,
            same_bytes: 0,
        }
    }

    /// The digest of checksum-based requests, if this resync uses them.
    pub fn csums(&self) -> Option<DigestAlg> {
        self.csums
    }

    /// Nothing requested, being written or waiting for durability.
    pub fn idle(&self) -> bool {
        self.requests.is_empty() && self.written.is_empty() && self.flushing.is_none()
    }

    /// One controller step (every [`super::controller::STEP`]): refills the request budget.
    pub fn step(&mut self) {
        let received = std::mem::take(&mut self.received);
        tracing::debug!(
            received,
            in_flight = self.in_flight,
            unwritten = self.unwritten,
            outstanding = self.requests.len(),
            written = self.written_bytes,
            flushing = self.flushing.is_some(),
            "resync step"
        );
        let allow = self.controller.step(received, self.in_flight);
        // Debt from an overshooting request is carried; an unused budget is not (no bursts).
        self.budget = allow.map(|allow| self.budget.unwrap_or(0).min(0) + allow as i64);
    }

    /// The next range to request, if the budget and the window allow and a block `bitmap`
    /// marks is left.
    pub fn next_request(&mut self, bitmap: &DirtyBitmap) -> Option<(u64, u32)> {
        if self.scanned
            || self.budget.is_some_and(|b| b <= 0)
            || self.unwritten >= self.window
            || self.requests.len() >= MAX_REQUESTS
        {
            return None;
        }
        let max_blocks = (REQUEST_MAX / self.block).max(1);
        let run = bitmap.runs_from(self.cursor).next();
        let Some((start, len)) = run else {
            self.scanned = true;
            return None;
        };
        let len = len.min(max_blocks);
        self.cursor = start + len;
        let offset = start * self.block;
        let bytes = (len * self.block).min(self.size.saturating_sub(offset));
        if bytes == 0 {
            self.scanned = true;
            return None;
        }
        let csum = self.csums.is_some();
        let request =
            Request { len: bytes as u32, csum, next: offset, answered: false, writing: 0, failed: None };
        self.requests.insert(offset, request);
        self.in_flight += bytes;
        self.unwritten += bytes;
        if let Some(budget) = self.budget.as_mut() {
            *budget -= bytes as i64;
        }
        Some((offset, bytes as u32))
    }

    /// ResyncData arrived: for exactly an outstanding plain request, or inside a checksum
    /// request after what came before. Returns the request it belongs to; the caller writes the
    /// data and reports with [`Self::written`] under that key.
    pub fn data(&mut self, offset: u64, len: usize) -> Result<u64, Unrequested> {
        let unrequested = Unrequested { offset, len: len as u64 };
        let (&key, r) = self.requests.range_mut(..=offset).next_back().ok_or(unrequested)?;
        let end = key + u64::from(r.len);
        let fits = if r.csum {
            offset >= r.next && offset + len as u64 <= end && len > 0
        } else {
            key == offset && r.len as usize == len
        };
        if r.answered || !fits {
            return Err(unrequested);
        }
        r.writing += 1;
        self.bytes += len as u64;
        if r.csum {
            r.next = offset + len as u64;
        } else {
            r.answered = true;
            self.in_flight -= len as u64;
            self.received += len as u64;
        }
        Ok(key)
    }

    /// ResyncInSync closed the checksum request at `offset`: what came in no ResyncData was
    /// identical.
    pub fn in_sync(
        &mut self,
        offset: u64,
        len: u32,
        now: Duration,
        out: &mut Answers,
    ) -> Result<(), Unrequested> {
        let unrequested = Unrequested { offset, len: u64::from(len) };
        let r = self.requests.get_mut(&offset).ok_or(unrequested)?;
        if !r.csum || r.answered || r.len != len {
            return Err(unrequested);
        }
        r.answered = true;
        self.same_bytes += (offset + u64::from(len)) - r.next;
        self.in_flight -= u64::from(len);
        self.received += u64::from(len);
        if r.writing == 0 {
            self.complete(offset, now, out);
        }
        Ok(())
    }

    /// A write of the request at `offset` completed (`Err(errno)`: failed).
    pub fn written(&mut self, offset: u64, result: Result<(), u32>, now: Duration, out: &mut Answers) {
        let Some(r) = self.requests.get_mut(&offset) else { return };
        r.writing -= 1;
        if let Err(errno) = result {
            r.failed.get_or_insert(errno);
        }
        if r.answered && r.writing == 0 {
            self.complete(offset, now, out);
        }
    }

    /// Every part of the request at `offset` arrived and is written: it waits for a flush.
    fn complete(&mut self, offset: u64, now: Duration, out: &mut Answers) {
        let r = self.requests.remove(&offset).expect("completing an outstanding request");
        self.unwritten -= u64::from(r.len);
        match r.failed {
            Some(errno) => out.failed.push((offset, r.len, errno)),
            None => {
                self.written.push((offset, r.len));
                self.written_bytes += u64::from(r.len);
                self.oldest_written.get_or_insert(now);
            }
        }
    }

    /// Whether a flush should start now.
    pub fn flush_due(&self, now: Duration) -> bool {
        if self.flushing.is_some() || self.written.is_empty() {
            return false;
        }
        self.written_bytes >= FLUSH_BYTES
            || self.requests.is_empty()
            || self.oldest_written.is_some_and(|t| now.saturating_sub(t) >= FLUSH_AGE)
    }

    /// The caller starts a flush: it covers everything written so far.
    pub fn flush_started(&mut self) {
        self.flushing = Some(std::mem::take(&mut self.written));
        self.written_bytes = 0;
        self.oldest_written = None;
    }

    /// The flush finished: clears the blocks it made durable in `bitmap` (`block` bytes a bit)
    /// and acknowledges them (or, if it failed, reports them failed).
    pub fn flush_done(&mut self, result: Result<(), u32>, bitmap: &mut DirtyBitmap, out: &mut Answers) {
        let Some(mut done) = self.flushing.take() else { return };
        match result {
            Ok(()) => {
                let block = self.block as u32;
                for &(offset, len) in &done {
                    bitmap.clear(DirtyBitmap::blocks_of(offset, u64::from(len), block));
                }
                done.sort_unstable();
                out.acks.extend(merge_adjacent(&done));
            }
            Err(errno) => out.failed.extend(done.into_iter().map(|(o, l)| (o, l, errno))),
        }
    }

    /// Whether the cleared bits should be written to the metadata now (and marks them so).
    pub fn persist_due(&mut self, now: Duration) -> bool {
        if now.saturating_sub(self.last_persist) < PERSIST_INTERVAL {
            return false;
        }
        self.last_persist = now;
        true
    }
}

/// Adjacent ranges merged, each at most [`ACK_MAX`]; `ranges` sorted by offset.
fn merge_adjacent(ranges: &[(u64, u32)]) -> Vec<(u64, u32)> {
    let mut out: Vec<(u64, u32)> = Vec::new();
    for &(offset, len) in ranges {
        match out.last_mut() {
            Some((o, l)) if *o + u64::from(*l) == offset && u64::from(*l) + u64::from(len) <= ACK_MAX => {
                *l += len;
            }
            _ => out.push((offset, len)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    const T0: Duration = Duration::ZERO;

    /// A bitmap of a device of `size` bytes with the runs `dirty` (first block, blocks) set.
    fn bitmap(size: u64, dirty: &[(u64, u64)]) -> DirtyBitmap {
        let mut bitmap = DirtyBitmap::new(size / 4096);
        for &(start, len) in dirty {
            bitmap.set(start..start + len);
        }
        bitmap
    }

    fn target(bitmap: &DirtyBitmap, pace: ResyncConfig, csums: Option<DigestAlg>) -> ResyncTarget {
        ResyncTarget::new(bitmap.blocks() * 4096, 4096, pace, csums, T0)
    }

    /// [`REQUEST_MAX`] in bytes and in 4 KiB blocks.
    const R: u64 = REQUEST_MAX;
    const RB: u64 = REQUEST_MAX / 4096;

    #[test]
    fn requests_cover_the_dirty_runs_in_order_and_in_pieces_of_at_most_request_max() {
        // Blocks 0..10, a run of 2.5 requests from block 300, and the last block.
        let size = 64 * MIB;
        let last = size / 4096 - 1;
        let dev = bitmap(size, &[(0, 10), (300, 2 * RB + RB / 2), (last, 1)]);
        let mut t = target(&dev, ResyncConfig::default(), None);
        let mut got = Vec::new();
        while let Some(r) = t.next_request(&dev) {
            got.push(r);
        }
        assert_eq!(
            got,
            vec![
                (0, 40960),
                (300 * 4096, R as u32),
                ((300 + RB) * 4096, R as u32),
                ((300 + 2 * RB) * 4096, (R / 2) as u32),
                (last * 4096, 4096)
            ]
        );
        assert!(t.next_request(&dev).is_none());
    }

    #[test]
    fn blocks_are_acknowledged_only_after_the_flush_that_made_them_durable() {
        let mut dev = bitmap(4 * R, &[(0, 2 * RB)]);
        let mut t = target(&dev, ResyncConfig::default(), None);
        let (a, b) = (t.next_request(&dev).unwrap(), t.next_request(&dev).unwrap());
        assert_eq!((a, b), ((0, R as u32), (R, R as u32)));
        let mut out = Answers::default();
        assert_eq!(t.data(R, 4096), Err(Unrequested { offset: R, len: 4096 }), "wrong length");
        assert!(t.data(3 * R, R as usize).is_err(), "never requested");
        t.data(0, R as usize).unwrap();
        assert!(t.data(0, R as usize).is_err(), "answered twice");
        t.written(0, Ok(()), T0, &mut out);
        assert!(!t.flush_due(T0), "young, small, and another request is outstanding");
        assert!(t.flush_due(FLUSH_AGE));
        t.data(R, R as usize).unwrap();
        t.written(R, Ok(()), T0, &mut out);
        assert!(t.flush_due(T0), "nothing else outstanding");
        t.flush_started();
        assert_eq!(dev.dirty_blocks(), 2 * RB, "nothing cleared before the flush completes");
        assert_eq!(out, Answers::default());
        t.flush_done(Ok(()), &mut dev, &mut out);
        assert_eq!(out.acks, vec![(0, 2 * R as u32)], "adjacent requests merged into one ack");
        assert_eq!(dev.dirty_blocks(), 0);
        assert!(t.idle());
        assert_eq!(t.bytes, 2 * R);
    }

    #[test]
    fn a_failed_write_or_flush_is_reported_and_leaves_the_blocks_dirty() {
        let mut dev = bitmap(4 * R, &[(0, 3 * RB)]);
        let mut t = target(&dev, ResyncConfig::default(), None);
        let mut out = Answers::default();
        while t.next_request(&dev).is_some() {}
        t.data(0, R as usize).unwrap();
        t.written(0, Err(5), T0, &mut out);
        assert_eq!(out.failed, vec![(0, R as u32, 5)]);
        for at in [R, 2 * R] {
            t.data(at, R as usize).unwrap();
            t.written(at, Ok(()), T0, &mut out);
        }
        t.flush_started();
        t.flush_done(Err(28), &mut dev, &mut out);
        assert_eq!(out.failed[1..], [(R, R as u32, 28), (2 * R, R as u32, 28)]);
        assert!(out.acks.is_empty());
        assert_eq!(dev.dirty_blocks(), 3 * RB);
    }

    #[test]
    fn the_window_counts_data_until_it_is_written_and_the_budget_bounds_each_step() {
        let dev = bitmap(512 * MIB, &[(0, 512 * MIB / 4096)]);
        let pace = ResyncConfig { c_fill_target: 4 * R, ..ResyncConfig::default() };
        let mut t = target(&dev, pace, None);
        let mut out = Answers::default();
        let mut n = 0;
        while t.next_request(&dev).is_some() {
            n += 1;
        }
        assert_eq!(n, 4, "the window is the fill target");
        t.data(0, R as usize).unwrap();
        assert!(t.next_request(&dev).is_none(), "arrived but not written: still in the window");
        t.written(0, Ok(()), T0, &mut out);
        assert!(t.next_request(&dev).is_some(), "written: one more at once");
        assert!(t.next_request(&dev).is_none());
        // With a rate cap, the budget bounds each step too.
        let dev = bitmap(512 * MIB, &[(0, 512 * MIB / 4096)]);
        let pace = ResyncConfig { c_max_rate: 20 * R, ..ResyncConfig::default() };
        let mut t = target(&dev, pace, None);
        let mut n = 0;
        while t.next_request(&dev).is_some() {
            n += 1;
        }
        assert_eq!(n, 2, "20 requests per second is 2 per step");
        t.step();
        assert_eq!((t.next_request(&dev).is_some(), t.next_request(&dev).is_some()), (true, true));
        assert!(t.next_request(&dev).is_none());
    }

    #[test]
    fn a_checksum_request_takes_partial_data_in_order_and_closes_with_in_sync() {
        let mut dev = bitmap(4 * MIB, &[(0, 256)]);
        let mut t = target(&dev, ResyncConfig::default(), Some(DigestAlg::Crc32c));
        let mut out = Answers::default();
        assert_eq!(t.next_request(&dev), Some((0, MIB as u32)));
        assert_eq!(t.data(8192, 4096), Ok(0), "a differing block inside the request");
        assert!(t.data(4096, 4096).is_err(), "not before what came already");
        assert!(t.data(MIB - 4096, 8192).is_err(), "not past the request");
        assert_eq!(t.data(65536, 8192), Ok(0));
        t.written(0, Ok(()), T0, &mut out);
        assert!(t.in_sync(0, 4096, T0, &mut out).is_err(), "the whole request or nothing");
        t.in_sync(0, MIB as u32, T0, &mut out).unwrap();
        assert!(!t.flush_due(FLUSH_AGE), "one write is still running");
        t.written(0, Ok(()), T0, &mut out);
        assert!(t.flush_due(T0));
        t.flush_started();
        t.flush_done(Ok(()), &mut dev, &mut out);
        assert_eq!(out.acks, vec![(0, MIB as u32)], "identical blocks are acknowledged too");
        assert_eq!((t.bytes, t.same_bytes), (12288, MIB - 73728));
        assert_eq!(dev.dirty_blocks(), 0);
    }

    #[test]
    fn merging_stops_at_gaps_and_at_the_limit() {
        let m = MIB as u32;
        let ranges: Vec<(u64, u32)> = (0..40).map(|i| (i * MIB, m)).chain([(50 * MIB, m)]).collect();
        assert_eq!(merge_adjacent(&ranges), vec![(0, 32 * m), (32 * MIB, 8 * m), (50 * MIB, m)]);
    }
}
