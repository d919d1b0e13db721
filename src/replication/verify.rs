//! Online verify, the driving side's bookkeeping (SPEC §6.y): which range to compare next, the
//! local digests waiting for the peer's, and what differed.
//!
//! The connection's sender drives: it reads a range locally while holding it against
//! application writes, queues VerifyRequest behind every write its read saw, and compares the
//! peer's digests with its own when VerifyReply comes back. Blocks that differ are reported as
//! runs, which the caller marks out of sync on both nodes. Verify never changes data. The I/O
//! and the messages stay with the caller.

use std::collections::BTreeMap;

use rdbd_protocol::repl::{append_digests, DigestAlg};

/// Largest range compared per request.
pub const VERIFY_REQUEST_MAX: u64 = 1 << 20;
/// Ranges being compared at once.
const WINDOW: usize = 8;
/// Differing runs kept for the report (all are marked; the count is exact).
pub const REPORTED_RANGES: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the peer answered a verify of {len} bytes at {offset} that was not asked for")]
    Unrequested { offset: u64, len: u32 },
    #[error("the peer sent {got} bytes of digests for {len} bytes at {offset}, expected {expected}")]
    DigestCount { offset: u64, len: u32, got: usize, expected: u64 },
}

/// A range asked for: its local digests once the local read is done.
struct Pending {
    len: u32,
    local: Option<Vec<u8>>,
}

/// The outcome of a verify run (or what is known so far).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub checked_bytes: u64,
    pub out_of_sync_blocks: u64,
    /// The first [`REPORTED_RANGES`] differing runs, as (offset, length) in bytes.
    pub ranges: Vec<(u64, u64)>,
}

pub struct VerifyRun {
    alg: DigestAlg,
    block: u32,
    size: u64,
    /// Next offset to compare.
    cursor: u64,
    pending: BTreeMap<u64, Pending>,
    pub report: VerifyReport,
}

impl VerifyRun {
    /// Compares `[start, size)` (start rounded down to a block) with `alg` digests per `block`.
    pub fn new(alg: DigestAlg, block: u32, size: u64, start: u64) -> Self {
        let start = start.min(size) / u64::from(block) * u64::from(block);
        VerifyRun {
            alg,
            block,
            size,
            cursor: start,
            pending: BTreeMap::new(),
            report: VerifyReport::default(),
        }
    }

    /// Bytes left to compare from the cursor (for progress: total = checked + remaining).
    pub fn remaining(&self) -> u64 {
        self.size - self.cursor + self.pending.values().map(|p| u64::from(p.len)).sum::<u64>()
    }

    /// Every range has been compared.
    pub fn is_done(&self) -> bool {
        self.cursor >= self.size && self.pending.is_empty()
    }

    /// The next range to read locally, if the window allows.
    pub fn next_range(&mut self) -> Option<(u64, u32)> {
        if self.cursor >= self.size || self.pending.len() >= WINDOW {
            return None;
        }
        let offset = self.cursor;
        let len = VERIFY_REQUEST_MAX.min(self.size - offset) as u32;
        self.cursor += u64::from(len);
        self.pending.insert(offset, Pending { len, local: None });
        Some((offset, len))
    }

    /// The local read of the range at `offset` finished: its digests are kept for the reply.
    pub fn local_read(&mut self, offset: u64, data: &[u8]) {
        if let Some(p) = self.pending.get_mut(&offset) {
            let mut digests = Vec::new();
            append_digests(self.alg, self.block as usize, data, &mut digests);
            p.local = Some(digests);
        }
    }

    /// The peer's digests for a range: compares them with ours and returns the differing runs
    /// (offset, length in bytes), which the caller marks out of sync.
    pub fn reply(&mut self, offset: u64, len: u32, remote: &[u8]) -> Result<Vec<(u64, u32)>, VerifyError> {
        let expected = self.alg.digests_len(u64::from(len), self.block);
        let asked = self.pending.get(&offset).is_some_and(|p| p.len == len && p.local.is_some());
        if !asked {
            return Err(VerifyError::Unrequested { offset, len });
        }
        if remote.len() as u64 != expected {
            return Err(VerifyError::DigestCount { offset, len, got: remote.len(), expected });
        }
        let local = self.pending.remove(&offset).and_then(|p| p.local).expect("checked above");
        let runs = differing_runs(self.alg.len(), self.block, offset, len, &local, remote);
        self.report.checked_bytes += u64::from(len);
        for &(start, run) in &runs {
            self.report.out_of_sync_blocks += u64::from(run).div_ceil(u64::from(self.block));
            self.record(start, u64::from(run));
        }
        Ok(runs)
    }

    /// Keeps a differing run for the report, merged with the previous one when adjacent.
    fn record(&mut self, start: u64, len: u64) {
        record_range(&mut self.report.ranges, start, len);
    }
}

/// Adds a differing run to a report's ranges: merged with the last one when adjacent, dropped
/// once [`REPORTED_RANGES`] are kept.
pub fn record_range(ranges: &mut Vec<(u64, u64)>, start: u64, len: u64) {
    if let Some((o, l)) = ranges.last_mut() {
        if *o + *l == start {
            *l += len;
            return;
        }
    }
    if ranges.len() < REPORTED_RANGES {
        ranges.push((start, len));
    }
}

/// Runs of blocks whose digests differ, as byte ranges within `(offset, len)`.
pub fn differing_runs(
    digest_len: usize,
    block: u32,
    offset: u64,
    len: u32,
    local: &[u8],
    remote: &[u8],
) -> Vec<(u64, u32)> {
    let end = offset + u64::from(len);
    let mut runs: Vec<(u64, u32)> = Vec::new();
    for (i, (a, b)) in local.chunks(digest_len).zip(remote.chunks(digest_len)).enumerate() {
        if a == b {
            continue;
        }
        let start = offset + i as u64 * u64::from(block);
        let n = (end - start).min(u64::from(block)) as u32;
        match runs.last_mut() {
            Some((o, l)) if *o + u64::from(*l) == start => *l += n,
            _ => runs.push((start, n)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digests(alg: DigestAlg, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        append_digests(alg, 4096, data, &mut out);
        out
    }

    #[test]
    fn differing_blocks_come_back_as_runs_and_are_counted() {
        let size = 3 * VERIFY_REQUEST_MAX + 8192;
        let mut v = VerifyRun::new(DigestAlg::Sha256, 4096, size, 0);
        let mut ranges = Vec::new();
        while let Some(r) = v.next_range() {
            ranges.push(r);
        }
        assert_eq!(ranges.len(), 4);
        assert_eq!(ranges[3], (3 << 20, 8192), "the last range is what is left");
        for &(offset, len) in &ranges {
            let ours = vec![1u8; len as usize];
            let mut theirs = ours.clone();
            if offset == 1 << 20 {
                // Blocks 1, 2 and 9 of this range differ.
                for block in [1usize, 2, 9] {
                    theirs[block * 4096 + 17] ^= 0xff;
                }
            }
            v.local_read(offset, &ours);
            let runs = v.reply(offset, len, &digests(DigestAlg::Sha256, &theirs)).unwrap();
            if offset == 1 << 20 {
                assert_eq!(runs, vec![((1 << 20) + 4096, 8192), ((1 << 20) + 9 * 4096, 4096)]);
            } else {
                assert!(runs.is_empty());
            }
        }
        assert!(v.is_done());
        assert_eq!(v.report.checked_bytes, size);
        assert_eq!(v.report.out_of_sync_blocks, 3);
        assert_eq!(v.report.ranges, vec![((1 << 20) + 4096, 8192), ((1 << 20) + 9 * 4096, 4096)]);
    }

    #[test]
    fn replies_that_were_not_asked_for_or_have_the_wrong_size_are_errors() {
        let mut v = VerifyRun::new(DigestAlg::Crc32c, 4096, 1 << 20, 0);
        let (offset, len) = v.next_range().unwrap();
        let d = digests(DigestAlg::Crc32c, &vec![0u8; len as usize]);
        assert!(
            matches!(v.reply(offset, len, &d), Err(VerifyError::Unrequested { .. })),
            "before the local read"
        );
        v.local_read(offset, &vec![0u8; len as usize]);
        assert!(matches!(v.reply(offset, len, &d[4..]), Err(VerifyError::DigestCount { .. })));
        assert!(matches!(v.reply(4096, len, &d), Err(VerifyError::Unrequested { .. })));
        assert_eq!(v.reply(offset, len, &d), Ok(vec![]));
        assert!(v.is_done());
    }

    #[test]
    fn a_start_offset_is_rounded_to_a_block_and_the_window_is_bounded() {
        let mut v = VerifyRun::new(DigestAlg::Crc32c, 4096, 64 << 20, 5000);
        assert_eq!(v.next_range(), Some((4096, 1 << 20)));
        for _ in 1..WINDOW {
            assert!(v.next_range().is_some());
        }
        assert_eq!(v.next_range(), None, "window full");
        assert_eq!(v.remaining(), (64 << 20) - 4096);
    }
}
