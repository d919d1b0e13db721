//! The dirty bitmap: one bit per block of data that the peer lacks (or may lack).
//!
//! In memory it is a vector of 64-bit words. On disk it is a run of 4 KiB pages, each holding
//! [`BITS_PER_PAGE`] bits followed by a small trailer with the page's index and a CRC-32C, so a
//! page torn by a crash is detected on its own. A damaged page is never trusted: all of its
//! blocks are taken as dirty (a larger resync, never lost data).

use std::ops::Range;

use super::layout::MD_BLOCK;

/// Bits stored in one on-disk page: 4064 bytes of bits, then a 32-byte trailer.
pub const BITS_PER_PAGE: u64 = 4064 * 8;
const WORDS_PER_PAGE: usize = (BITS_PER_PAGE / 64) as usize;
/// "RBMP".
const PAGE_MAGIC: u32 = 0x5242_4d50;
const TRAILER_AT: usize = 4064;
const CRC_AT: usize = MD_BLOCK as usize - 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    #[error("bitmap page {page}: checksum mismatch (torn or corrupt)")]
    Checksum { page: u32 },
    #[error("bitmap page {page}: holds page {found} (misplaced write)")]
    Misplaced { page: u32, found: u32 },
    #[error("bitmap page {page}: not a bitmap page")]
    NotBitmap { page: u32 },
}

/// Which blocks the peer lacks, and which on-disk pages need rewriting.
#[derive(Debug, Clone)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    blocks: u64,
    dirty: u64,
    /// One flag per on-disk page: changed since last written.
    stale_pages: Vec<bool>,
}

impl DirtyBitmap {
    /// An all-clean bitmap for `blocks` blocks.
    pub fn new(blocks: u64) -> Self {
        let pages = blocks.div_ceil(BITS_PER_PAGE).max(1) as usize;
        Self { words: vec![0; pages * WORDS_PER_PAGE], blocks, dirty: 0, stale_pages: vec![false; pages] }
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Number of dirty blocks.
    pub fn dirty_blocks(&self) -> u64 {
        self.dirty
    }

    pub fn pages(&self) -> u32 {
        self.stale_pages.len() as u32
    }

    pub fn is_dirty(&self, block: u64) -> bool {
        block < self.blocks && self.words[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    /// Marks `range` dirty (clipped to the bitmap); returns how many blocks became dirty.
    pub fn set(&mut self, range: Range<u64>) -> u64 {
        self.update(range, true)
    }

    /// Marks `range` clean; returns how many blocks became clean.
    pub fn clear(&mut self, range: Range<u64>) -> u64 {
        self.update(range, false)
    }

    pub fn set_all(&mut self) {
        self.set(0..self.blocks);
    }

    fn update(&mut self, range: Range<u64>, dirty: bool) -> u64 {
        let (start, end) = (range.start, range.end.min(self.blocks));
        if start >= end {
            return 0;
        }
        let mut changed = 0;
        let mut block = start;
        while block < end {
            let word = (block / 64) as usize;
            let bit = block % 64;
            let n = (64 - bit).min(end - block);
            let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << bit };
            let old = self.words[word];
            let new = if dirty { old | mask } else { old & !mask };
            if new != old {
                changed += (old ^ new).count_ones() as u64;
                self.words[word] = new;
                self.stale_pages[word / WORDS_PER_PAGE] = true;
            }
            block += n;
        }
        if dirty {
            self.dirty += changed;
        } else {
            self.dirty -= changed;
        }
        changed
    }

    /// Blocks touched by `len` bytes at `offset`, with `block_size` bytes per block.
    pub fn blocks_of(offset: u64, len: u64, block_size: u32) -> Range<u64> {
        let bs = block_size as u64;
        offset / bs..(offset + len).div_ceil(bs)
    }

    /// The dirty runs as (first block, length), in order, starting at or after `from`.
    pub fn runs_from(&self, from: u64) -> DirtyRuns<'_> {
        DirtyRuns { bitmap: self, next: from }
    }

    /// First dirty block at or after `from`.
    pub fn next_dirty(&self, from: u64) -> Option<u64> {
        self.scan(from, true)
    }

    fn next_clean(&self, from: u64) -> u64 {
        self.scan(from, false).unwrap_or(self.blocks)
    }

    /// First block at or after `from` whose bit equals `dirty`.
    fn scan(&self, from: u64, dirty: bool) -> Option<u64> {
        if from >= self.blocks {
            return None;
        }
        let mut word = (from / 64) as usize;
        let flip = if dirty { 0 } else { u64::MAX };
        let mut bits = (self.words[word] ^ flip) & (u64::MAX << (from % 64));
        loop {
            if bits != 0 {
                let block = word as u64 * 64 + bits.trailing_zeros() as u64;
                return (block < self.blocks).then_some(block);
            }
            word += 1;
            if word as u64 * 64 >= self.blocks {
                return None;
            }
            bits = self.words[word] ^ flip;
        }
    }

    /// Pages changed since they were last taken for writing; marks them written.
    pub fn take_stale_pages(&mut self) -> Vec<u32> {
        let mut out = Vec::new();
        for (i, stale) in self.stale_pages.iter_mut().enumerate() {
            if std::mem::take(stale) {
                out.push(i as u32);
            }
        }
        out
    }

    /// Pages covering `blocks` that changed since last written (for writing before an activity
    /// log extent is evicted); marks them written.
    pub fn take_stale_pages_in(&mut self, blocks: Range<u64>) -> Vec<u32> {
        let first = (blocks.start / BITS_PER_PAGE) as usize;
        let last = (blocks.end.saturating_sub(1) / BITS_PER_PAGE) as usize;
        let mut out = Vec::new();
        for i in first..=last.min(self.stale_pages.len() - 1) {
            if std::mem::take(&mut self.stale_pages[i]) {
                out.push(i as u32);
            }
        }
        out
    }

    /// Marks every page for writing (after creating or reloading metadata).
    pub fn mark_all_pages_stale(&mut self) {
        self.stale_pages.iter_mut().for_each(|p| *p = true);
    }

    /// The on-disk image of page `page`.
    pub fn encode_page(&self, page: u32) -> [u8; MD_BLOCK as usize] {
        let mut b = [0u8; MD_BLOCK as usize];
        let words = &self.words[page as usize * WORDS_PER_PAGE..][..WORDS_PER_PAGE];
        for (chunk, w) in b[..TRAILER_AT].chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        b[TRAILER_AT..TRAILER_AT + 4].copy_from_slice(&PAGE_MAGIC.to_be_bytes());
        b[TRAILER_AT + 4..TRAILER_AT + 8].copy_from_slice(&page.to_be_bytes());
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_be_bytes());
        b
    }

    /// Loads page `page` from its on-disk image. A damaged page marks all of its blocks dirty
    /// and returns the error for reporting.
    pub fn load_page(&mut self, page: u32, b: &[u8; MD_BLOCK as usize]) -> Result<(), PageError> {
        let check = || {
            let magic = u32::from_be_bytes(b[TRAILER_AT..TRAILER_AT + 4].try_into().expect("4 bytes"));
            let stored = u32::from_be_bytes(b[CRC_AT..].try_into().expect("4 bytes"));
            if crc32c::crc32c(&b[..CRC_AT]) != stored {
                return Err(PageError::Checksum { page });
            }
            if magic != PAGE_MAGIC {
                return Err(PageError::NotBitmap { page });
            }
            let found = u32::from_be_bytes(b[TRAILER_AT + 4..TRAILER_AT + 8].try_into().expect("4 bytes"));
            if found != page {
                return Err(PageError::Misplaced { page, found });
            }
            Ok(())
        };
        let first = page as u64 * BITS_PER_PAGE;
        let range = first..first + BITS_PER_PAGE;
        if let Err(e) = check() {
            self.set(range);
            return Err(e);
        }
        self.clear(range.clone());
        let base = page as usize * WORDS_PER_PAGE;
        for (i, chunk) in b[..TRAILER_AT].chunks_exact(8).enumerate() {
            let first_block = (base + i) as u64 * 64;
            if first_block >= self.blocks {
                break;
            }
            // Bits beyond the last block are ignored.
            let valid = self.blocks - first_block;
            let mask = if valid >= 64 { u64::MAX } else { (1u64 << valid) - 1 };
            let w = u64::from_le_bytes(chunk.try_into().expect("8 bytes")) & mask;
            self.words[base + i] = w; // the page's range was cleared above
            self.dirty += w.count_ones() as u64;
        }
        self.stale_pages[page as usize] = false;
        Ok(())
    }
}

/// Iterator over dirty runs, see [`DirtyBitmap::runs_from`].
pub struct DirtyRuns<'a> {
    bitmap: &'a DirtyBitmap,
    next: u64,
}

impl Iterator for DirtyRuns<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let start = self.bitmap.next_dirty(self.next)?;
        let end = self.bitmap.next_clean(start);
        self.next = end;
        Some((start, end - start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn set_clear_count_and_runs() {
        let mut bm = DirtyBitmap::new(1000);
        assert_eq!(bm.set(10..20), 10);
        assert_eq!(bm.set(15..70), 50);
        assert_eq!(bm.dirty_blocks(), 60);
        assert_eq!(bm.clear(30..40), 10);
        assert_eq!(bm.runs_from(0).collect::<Vec<_>>(), vec![(10, 20), (40, 30)]);
        assert_eq!(bm.runs_from(45).collect::<Vec<_>>(), vec![(45, 25)]);
        assert!(bm.is_dirty(69) && !bm.is_dirty(70) && !bm.is_dirty(5000));
        assert_eq!(bm.set(990..2000), 10, "clipped to the bitmap");
        assert_eq!(bm.runs_from(0).last(), Some((990, 10)));
    }

    #[test]
    fn pages_round_trip_and_damage_means_dirty() {
        let blocks = 3 * BITS_PER_PAGE - 5;
        let mut bm = DirtyBitmap::new(blocks);
        bm.set(3..9);
        bm.set(BITS_PER_PAGE * 2 + 100..BITS_PER_PAGE * 2 + 164);
        let images: Vec<_> = (0..bm.pages()).map(|p| bm.encode_page(p)).collect();

        let mut loaded = DirtyBitmap::new(blocks);
        for (p, img) in images.iter().enumerate() {
            loaded.load_page(p as u32, img).unwrap();
        }
        assert_eq!(loaded.runs_from(0).collect::<Vec<_>>(), bm.runs_from(0).collect::<Vec<_>>());
        assert_eq!(loaded.dirty_blocks(), bm.dirty_blocks());

        let mut torn = images[1];
        torn[17] ^= 1;
        let mut damaged = DirtyBitmap::new(blocks);
        assert_eq!(damaged.load_page(1, &torn), Err(PageError::Checksum { page: 1 }));
        assert_eq!(damaged.dirty_blocks(), BITS_PER_PAGE, "a torn page is taken as all dirty");
        assert_eq!(damaged.load_page(1, &images[0]), Err(PageError::Misplaced { page: 1, found: 0 }));
        assert_eq!(damaged.load_page(0, &[0u8; 4096]), Err(PageError::Checksum { page: 0 }));
    }

    #[test]
    fn stale_pages_are_tracked() {
        let mut bm = DirtyBitmap::new(4 * BITS_PER_PAGE);
        bm.set(5..6);
        bm.set(3 * BITS_PER_PAGE..3 * BITS_PER_PAGE + 1);
        assert_eq!(bm.take_stale_pages_in(0..10), vec![0]);
        assert_eq!(bm.take_stale_pages(), vec![3]);
        assert!(bm.take_stale_pages().is_empty());
        bm.set(5..6);
        assert!(bm.take_stale_pages().is_empty(), "no change, nothing to write");
    }

    #[test]
    fn blocks_of_byte_ranges() {
        assert_eq!(DirtyBitmap::blocks_of(0, 4096, 4096), 0..1);
        assert_eq!(DirtyBitmap::blocks_of(4095, 2, 4096), 0..2);
        assert_eq!(DirtyBitmap::blocks_of(8192, 1, 4096), 2..3);
    }

    proptest! {
        /// The bitmap agrees with a plain Vec<bool> model under any sequence of updates.
        #[test]
        fn matches_a_simple_model(blocks in 1u64..3000, ops in proptest::collection::vec((any::<bool>(), 0u64..3100, 0u64..400), 1..40)) {
            let mut bm = DirtyBitmap::new(blocks);
            let mut model = vec![false; blocks as usize];
            for (dirty, start, len) in ops {
                if dirty { bm.set(start..start + len); } else { bm.clear(start..start + len); }
                for b in start..(start + len).min(blocks) { model[b as usize] = dirty; }
            }
            prop_assert_eq!(bm.dirty_blocks(), model.iter().filter(|d| **d).count() as u64);
            let mut from_runs = vec![false; blocks as usize];
            for (s, l) in bm.runs_from(0) {
                prop_assert!(l > 0);
                for b in s..s + l { from_runs[b as usize] = true; }
            }
            prop_assert_eq!(from_runs, model);
        }
    }
}
