//! A simulated disk with a volatile write cache: a completed write is visible but durable only
//! once a flush issued after it completes. A power loss keeps an arbitrary subset of what was
//! not flushed (the cache wrote some of it back, a write in flight may have landed or not); a
//! crash of the process (SIGKILL) keeps everything, since the disk itself still runs.
//!
//! Data is one token (`u64`) per block: the simulator's clients write unique tokens, so any
//! block's value names the write it came from.

use std::collections::BTreeMap;

use crate::replication::core::io::Persisted;

/// Bytes per simulated block (one token each).
pub const BLOCK: u64 = 4096;

pub struct SimDisk {
    durable: Vec<u64>,
    /// Block → its completed, unflushed writes as (write version, token), oldest first: a
    /// flush makes the latest one it covers durable, even when a later write replaced it.
    cache: BTreeMap<u64, Vec<(u64, u64)>>,
    versions: u64,
    /// The metadata as a restart finds it.
    pub meta: Option<Persisted>,
}

impl SimDisk {
    pub fn new(blocks: u64) -> Self {
        Self { durable: vec![0; blocks as usize], cache: BTreeMap::new(), versions: 0, meta: None }
    }

    pub fn blocks(&self) -> u64 {
        self.durable.len() as u64
    }

    /// What a read of `block` returns now.
    pub fn read_block(&self, block: u64) -> u64 {
        self.cache
            .get(&block)
            .and_then(|w| w.last())
            .map_or(self.durable[block as usize], |&(_, token)| token)
    }

    /// What `block` holds durably (what a power loss now would keep at least).
    pub fn durable_block(&self, block: u64) -> u64 {
        self.durable[block as usize]
    }

    /// The tokens of `len` bytes at `offset`.
    pub fn read(&self, offset: u64, len: u64) -> Vec<u64> {
        (offset / BLOCK..(offset + len).div_ceil(BLOCK)).map(|b| self.read_block(b)).collect()
    }

    /// A write completes: visible, not durable.
    pub fn write(&mut self, offset: u64, data: &[u64]) {
        for (i, &token) in data.iter().enumerate() {
            self.versions += 1;
            self.cache.entry(offset / BLOCK + i as u64).or_default().push((self.versions, token));
        }
    }

    /// The mark a flush submitted now covers, for [`SimDisk::flush_done`].
    pub fn flush_mark(&self) -> u64 {
        self.versions
    }

    /// A flush submitted at `mark` completes: everything written before it is durable.
    pub fn flush_done(&mut self, mark: u64) {
        let durable = &mut self.durable;
        self.cache.retain(|&block, writes| {
            let covered = writes.partition_point(|&(version, _)| version <= mark);
            if covered > 0 {
                durable[block as usize] = writes[covered - 1].1;
                writes.drain(..covered);
            }
            !writes.is_empty()
        });
    }

    /// The power goes: each block keeps its durable value or any of its unflushed writes, as
    /// `pick(n)` (in `0..=n`, 0: none) says — the drive may have written back any of them.
    pub fn power_loss(&mut self, mut pick: impl FnMut(usize) -> usize) {
        for (block, writes) in std::mem::take(&mut self.cache) {
            let chosen = pick(writes.len());
            if chosen > 0 {
                self.durable[block as usize] = writes[chosen - 1].1;
            }
        }
    }

    /// `invalidate` took effect: the data is whatever `garbage` says per block (the operator
    /// invalidates a disk because its data cannot be trusted, so the simulator makes it so).
    pub fn scramble(&mut self, mut garbage: impl FnMut(u64) -> u64) {
        self.cache.clear();
        for (block, value) in self.durable.iter_mut().enumerate() {
            *value = garbage(block as u64);
        }
    }

    /// Silent corruption: `block` reads as `token` from now, if no write of it sits in the
    /// cache (the medium rots, not what is cached). Whether it rotted.
    pub fn rot(&mut self, block: u64, token: u64) -> bool {
        if self.cache.contains_key(&block) {
            return false;
        }
        self.durable[block as usize] = token;
        true
    }

    /// A write that was in flight when the power went lands, block by block, as `keep` says.
    pub fn torn_write(&mut self, offset: u64, data: &[u64], mut keep: impl FnMut() -> bool) {
        for (i, &token) in data.iter().enumerate() {
            if keep() {
                self.durable[(offset / BLOCK) as usize + i] = token;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_flushed_writes_survive_a_power_loss_that_keeps_nothing() {
        let mut d = SimDisk::new(4);
        d.write(0, &[7]);
        let mark = d.flush_mark();
        d.write(BLOCK, &[8]);
        d.flush_done(mark);
        d.write(0, &[9]);
        assert_eq!(d.read(0, 2 * BLOCK), vec![9, 8], "completed writes are visible");
        d.power_loss(|_| 0);
        assert_eq!(d.read(0, 2 * BLOCK), vec![7, 0]);
    }

    #[test]
    fn a_later_flush_never_brings_back_older_data() {
        let mut d = SimDisk::new(1);
        d.write(0, &[1]);
        let early = d.flush_mark();
        d.write(0, &[2]);
        let late = d.flush_mark();
        d.flush_done(late);
        d.write(0, &[3]);
        d.flush_done(early);
        d.power_loss(|_| 0);
        assert_eq!(d.read_block(0), 2);
    }

    #[test]
    fn a_flush_covers_a_write_that_a_later_one_replaced_in_the_cache() {
        let mut d = SimDisk::new(1);
        d.write(0, &[1]);
        let mark = d.flush_mark();
        d.write(0, &[2]);
        d.flush_done(mark);
        d.power_loss(|_| 0);
        assert_eq!(d.read_block(0), 1);
    }
}
