//! Run-length encoded bitmap transfer: BitmapRuns messages and the checks a receiver applies
//! before it touches its own bitmap.
//!
//! A message covers the blocks from `first_block` on with alternating clean and dirty runs,
//! starting with clean (a zero first run when the first block is dirty). Only the first run may
//! be empty, so the encoding of a given bitmap range is unique.

use std::fmt;

use bytes::BufMut;

use super::MAX_BITMAP_RUNS;
use crate::wire::{DecodeError, Reader};

/// One BitmapRuns message: run lengths in blocks from `first_block` on.
#[derive(Clone, Copy)]
pub struct BitmapRuns<'a> {
    // Private, like the runs: `new` validates the pair, so a built message is always accepted.
    first_block: u64,
    runs: Runs<'a>,
}

/// Decoded messages keep the wire bytes (no allocation); built ones borrow the caller's slice.
#[derive(Clone, Copy)]
enum Runs<'a> {
    Wire(&'a [u8]),
    Native(&'a [u32]),
}

impl<'a> BitmapRuns<'a> {
    /// Builds a message from run lengths (clean first), applying the same checks as the
    /// decoder, so the peer always accepts what this returns: 1 to [`MAX_BITMAP_RUNS`] runs,
    /// none empty but the first, and no run ending past block 2^64.
    pub fn new(first_block: u64, runs: &'a [u32]) -> Result<Self, DecodeError> {
        let this = Self { first_block, runs: Runs::Native(runs) };
        this.validate()?;
        Ok(this)
    }

    pub(crate) fn decode(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        let first_block = r.u64()?;
        let bytes = r.rest();
        if bytes.len() % 4 != 0 {
            return Err(DecodeError::Invalid { what: "bitmap run bytes", value: bytes.len() as u64 });
        }
        let this = Self { first_block, runs: Runs::Wire(bytes) };
        this.validate()?;
        Ok(this)
    }

    fn validate(&self) -> Result<(), DecodeError> {
        let count = self.run_count();
        if count == 0 {
            return Err(DecodeError::Invalid { what: "bitmap run count", value: 0 });
        }
        if count > MAX_BITMAP_RUNS {
            let (len, limit) = (count as u64, MAX_BITMAP_RUNS as u64);
            return Err(DecodeError::TooLong { what: "bitmap runs", len, limit });
        }
        if let Some(i) = self.run_lengths().skip(1).position(|n| n == 0) {
            return Err(DecodeError::Invalid { what: "empty bitmap run at index", value: i as u64 + 1 });
        }
        match self.end_block() {
            Some(_) => Ok(()),
            None => {
                Err(DecodeError::Invalid { what: "bitmap runs overflow from block", value: self.first_block })
            }
        }
    }

    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        out.put_u64(self.first_block);
        match self.runs {
            Runs::Wire(bytes) => out.put_slice(bytes),
            Runs::Native(runs) => runs.iter().for_each(|&n| out.put_u32(n)),
        }
    }

    /// The first block the runs describe.
    pub fn first_block(&self) -> u64 {
        self.first_block
    }

    pub fn run_count(&self) -> usize {
        match self.runs {
            Runs::Wire(bytes) => bytes.len() / 4,
            Runs::Native(runs) => runs.len(),
        }
    }

    /// The raw run lengths, clean first.
    pub fn run_lengths(&self) -> RunLengths<'a> {
        RunLengths { runs: self.runs, index: 0 }
    }

    /// The block after the last one this message covers, or `None` if that passes 2^64.
    pub fn end_block(&self) -> Option<u64> {
        self.run_lengths().try_fold(self.first_block, |end, n| end.checked_add(n.into()))
    }

    /// The non-empty runs as block ranges; an item is an error (and the last one) if a run ends
    /// past `total_blocks` or past 2^64. The receiver checks the whole message this way, or
    /// through [`BitmapCursor::accept`], before changing its bitmap.
    pub fn runs(&self, total_blocks: u64) -> BitmapRunIter<'a> {
        BitmapRunIter {
            lengths: self.run_lengths(),
            next_block: self.first_block,
            dirty: false,
            total_blocks,
            done: false,
        }
    }
}

impl PartialEq for BitmapRuns<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.first_block == other.first_block && self.run_lengths().eq(other.run_lengths())
    }
}

impl Eq for BitmapRuns<'_> {}

impl fmt::Debug for BitmapRuns<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 16;
        let runs: Vec<u32> = self.run_lengths().take(SHOWN).collect();
        f.debug_struct("BitmapRuns")
            .field("first_block", &self.first_block)
            .field("run_count", &self.run_count())
            .field("first_runs", &runs)
            .finish()
    }
}

/// Iterator over the raw run lengths of a [`BitmapRuns`].
#[derive(Clone)]
pub struct RunLengths<'a> {
    runs: Runs<'a>,
    index: usize,
}

impl Iterator for RunLengths<'_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        let n = match self.runs {
            Runs::Wire(bytes) => {
                let chunk = bytes.get(self.index * 4..self.index * 4 + 4)?;
                u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]])
            }
            Runs::Native(runs) => *runs.get(self.index)?,
        };
        self.index += 1;
        Some(n)
    }
}

/// A run of blocks that are all clean or all dirty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapRun {
    pub start_block: u64,
    pub blocks: u32,
    pub dirty: bool,
}

/// See [`BitmapRuns::runs`].
#[derive(Clone)]
pub struct BitmapRunIter<'a> {
    lengths: RunLengths<'a>,
    next_block: u64,
    dirty: bool,
    total_blocks: u64,
    done: bool,
}

impl Iterator for BitmapRunIter<'_> {
    type Item = Result<BitmapRun, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            let blocks = self.lengths.next()?;
            let dirty = self.dirty;
            self.dirty = !dirty;
            if blocks == 0 {
                continue;
            }
            let start_block = self.next_block;
            let Some(end) = start_block.checked_add(blocks.into()) else {
                self.done = true;
                let value = start_block;
                return Some(Err(DecodeError::Invalid { what: "bitmap run overflows at block", value }));
            };
            if end > self.total_blocks {
                self.done = true;
                let (len, limit) = (end, self.total_blocks);
                return Some(Err(DecodeError::TooLong { what: "bitmap runs (end block)", len, limit }));
            }
            self.next_block = end;
            return Some(Ok(BitmapRun { start_block, blocks, dirty }));
        }
        None
    }
}

/// Follows one bitmap transfer: messages must cover `0..total_blocks` in order without gaps or
/// overlaps, and BitmapDone must name the same total. Keeps a peer from setting bits past the
/// device or leaving part of the bitmap unsent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapCursor {
    next_block: u64,
    total_blocks: u64,
}

impl BitmapCursor {
    pub fn new(total_blocks: u64) -> Self {
        Self { next_block: 0, total_blocks }
    }

    /// The first block the next message must start at.
    pub fn next_block(&self) -> u64 {
        self.next_block
    }

    /// Checks the next message of the transfer as a whole and returns its runs, every one of
    /// which is `Ok`. On error nothing is consumed, and the connection should be closed.
    pub fn accept<'a>(&mut self, runs: &BitmapRuns<'a>) -> Result<BitmapRunIter<'a>, DecodeError> {
        if runs.first_block != self.next_block {
            return Err(DecodeError::Invalid { what: "bitmap runs first block", value: runs.first_block });
        }
        let end = runs.end_block().ok_or(DecodeError::Invalid {
            what: "bitmap runs overflow from block",
            value: runs.first_block,
        })?;
        if end > self.total_blocks {
            let (len, limit) = (end, self.total_blocks);
            return Err(DecodeError::TooLong { what: "bitmap runs (end block)", len, limit });
        }
        self.next_block = end;
        Ok(runs.runs(self.total_blocks))
    }

    /// Checks BitmapDone: the announced total is ours and every block has been covered.
    pub fn finish(&self, total_blocks: u64) -> Result<(), DecodeError> {
        if total_blocks != self.total_blocks {
            return Err(DecodeError::Invalid { what: "bitmap total blocks", value: total_blocks });
        }
        if self.next_block != self.total_blocks {
            return Err(DecodeError::Invalid {
                what: "bitmap transfer ended at block",
                value: self.next_block,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repl::{decode_frame, kind, Message};
    use proptest::prelude::*;

    fn decode(payload: &[u8]) -> Result<BitmapRuns<'_>, DecodeError> {
        match Message::decode(kind::BITMAP_RUNS, payload)? {
            Message::BitmapRuns(b) => Ok(b),
            other => panic!("decoded as {other:?}"),
        }
    }

    fn runs_of(b: &BitmapRuns<'_>, total: u64) -> Vec<(u64, u32, bool)> {
        b.runs(total).map(|r| r.map(|r| (r.start_block, r.blocks, r.dirty)).unwrap()).collect()
    }

    #[test]
    fn layout_and_runs() {
        let b = BitmapRuns::new(100, &[0, 3, 2, 1]).unwrap();
        let mut out = Vec::new();
        Message::BitmapRuns(b).encode(&mut out);
        let payload = [
            0, 0, 0, 0, 0, 0, 0, 100, //
            0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0, 1,
        ];
        assert_eq!(&out[12..], &payload);
        assert_eq!(u32::from_be_bytes(out[8..12].try_into().unwrap()), 24);
        let d = decode(&payload).unwrap();
        assert_eq!(d, b);
        assert_eq!(d.end_block(), Some(106));
        assert_eq!(runs_of(&d, 106), [(100, 3, true), (103, 2, false), (105, 1, true)]);
    }

    #[test]
    fn rejects_malformed_runs() {
        assert!(BitmapRuns::new(0, &[]).is_err());
        assert!(BitmapRuns::new(0, &[1, 0, 1]).is_err(), "only the first run may be empty");
        assert!(BitmapRuns::new(0, &[0]).is_ok());
        assert!(BitmapRuns::new(u64::MAX, &[1]).is_err(), "end past 2^64");
        assert!(BitmapRuns::new(u64::MAX - 1, &[1]).is_ok());
        assert!(BitmapRuns::new(0, &vec![1; MAX_BITMAP_RUNS + 1]).is_err());
        assert!(BitmapRuns::new(0, &vec![1; MAX_BITMAP_RUNS]).is_ok());
        assert!(decode(&[0; 8]).is_err(), "no runs");
        assert!(decode(&[0; 13]).is_err(), "partial run");
        let mut wraps = vec![0xff; 8];
        wraps.extend_from_slice(&[0, 0, 0, 1]);
        assert!(decode(&wraps).is_err());
    }

    #[test]
    fn runs_past_total_blocks_are_an_error() {
        let b = BitmapRuns::new(0, &[4, 4]).unwrap();
        let items: Vec<_> = b.runs(6).collect();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0], Ok(BitmapRun { start_block: 0, blocks: 4, dirty: false }));
        assert!(matches!(items[1], Err(DecodeError::TooLong { len: 8, limit: 6, .. })));
        assert_eq!(runs_of(&b, 8).len(), 2);
    }

    #[test]
    fn cursor_checks_order_coverage_and_total() {
        let a = BitmapRuns::new(0, &[2, 3]).unwrap();
        let b = BitmapRuns::new(5, &[0, 5]).unwrap();
        let mut c = BitmapCursor::new(10);
        assert!(c.accept(&b).is_err(), "must start at block 0");
        assert!(c.finish(10).is_err(), "nothing covered yet");
        assert_eq!(c.accept(&a).unwrap().filter_map(Result::ok).filter(|r| r.dirty).count(), 1);
        assert!(c.accept(&a).is_err(), "overlap");
        assert_eq!(c.next_block(), 5);
        assert!(c.finish(10).is_err(), "gap at the end");
        let runs: Vec<_> = c.accept(&b).unwrap().collect();
        assert_eq!(runs, [Ok(BitmapRun { start_block: 5, blocks: 5, dirty: true })]);
        assert!(c.finish(11).is_err(), "totals differ");
        assert_eq!(c.finish(10), Ok(()));
        let mut c = BitmapCursor::new(4);
        assert!(c.accept(&a).is_err(), "past the device");
        assert_eq!(c.next_block(), 0, "an error consumes nothing");
    }

    proptest! {
        #[test]
        fn round_trip_and_reconstruct(first in 0u64..1 << 40, head in 0u32..5,
                                      tail in proptest::collection::vec(1u32..1000, 0..64)) {
            let mut lengths = vec![head];
            lengths.extend(tail);
            let b = BitmapRuns::new(first, &lengths).unwrap();
            let mut out = Vec::new();
            Message::BitmapRuns(b).encode(&mut out);
            let (m, used) = decode_frame(&out).unwrap();
            prop_assert_eq!(used, out.len());
            let Message::BitmapRuns(d) = m else { panic!("{m:?}") };
            prop_assert_eq!(d, b);
            // The runs tile first..end exactly, alternating, never two of a kind in a row.
            let end = d.end_block().unwrap();
            let mut next = first;
            let mut last_dirty = None;
            for run in d.runs(end) {
                let run = run.unwrap();
                prop_assert_eq!(run.start_block, next);
                prop_assert!(last_dirty != Some(run.dirty));
                last_dirty = Some(run.dirty);
                next += u64::from(run.blocks);
            }
            prop_assert_eq!(next, end);
            prop_assert!(end == first || d.runs(end - 1).any(|r| r.is_err()));
            // A transfer that starts with this message is accepted only from block 0.
            let mut c = BitmapCursor::new(end);
            prop_assert_eq!(c.accept(&d).is_ok(), first == 0);
            prop_assert_eq!(c.finish(end).is_ok(), first == 0);
        }

        #[test]
        fn runs_never_panic(first: u64, total: u64, lengths in proptest::collection::vec(any::<u32>(), 0..32)) {
            let mut payload = first.to_be_bytes().to_vec();
            lengths.iter().for_each(|n| payload.extend_from_slice(&n.to_be_bytes()));
            if let Ok(b) = decode(&payload) {
                let mut covered = 0u64;
                for run in b.runs(total) {
                    match run {
                        Ok(r) => {
                            prop_assert!(r.blocks > 0);
                            prop_assert!(r.start_block + u64::from(r.blocks) <= total);
                            covered += u64::from(r.blocks);
                        }
                        Err(_) => break,
                    }
                }
                prop_assert!(covered <= total);
                let _ = BitmapCursor::new(total).accept(&b);
            }
        }
    }
}
