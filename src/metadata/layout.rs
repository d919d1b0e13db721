//! Where the metadata areas live on the metadata device.
//!
//! Internal metadata sits at the end of the backing device, after the data:
//! `[data | bitmap pages | activity log blocks | superblock A | superblock B]`.
//! External metadata fills a separate file or device from offset 0:
//! `[superblock A | superblock B | activity log blocks | bitmap pages]`.
//! Every area is made of 4 KiB blocks, each written whole and carrying its own checksum.

use super::activity_log::SLOTS_PER_BLOCK;
use super::bitmap::BITS_PER_PAGE;

/// Size of every metadata block.
pub const MD_BLOCK: u64 = 4096;

/// Offsets (in bytes, on the metadata device) and sizes of the metadata areas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Bytes of the backing device available for data (the replicated device's size).
    pub data_size: u64,
    /// Bytes of data per bitmap bit.
    pub bitmap_block: u32,
    /// Activity log capacity, in 4 MiB extents.
    pub al_extents: u32,
    pub superblock_offsets: [u64; 2],
    pub al_offset: u64,
    /// Activity log blocks including both copies of each.
    pub al_blocks: u32,
    pub bitmap_offset: u64,
    pub bitmap_pages: u32,
    /// First byte of the metadata area and its total size.
    pub md_offset: u64,
    pub md_size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("the device ({size} bytes) is too small for its metadata ({needed} bytes) plus data")]
    TooSmall { size: u64, needed: u64 },
    #[error("bitmap block size {0} is not a power of two between 4 KiB and 1 MiB")]
    BitmapBlock(u32),
    #[error("al-extents {0} is outside 7..=65534")]
    AlExtents(u32),
    #[error("the metadata device ({size} bytes) is too small: {needed} bytes are needed")]
    MetaTooSmall { size: u64, needed: u64 },
}

fn check_params(bitmap_block: u32, al_extents: u32) -> Result<(), LayoutError> {
    if !bitmap_block.is_power_of_two() || !(4096..=1 << 20).contains(&bitmap_block) {
        return Err(LayoutError::BitmapBlock(bitmap_block));
    }
    if !(7..=65534).contains(&al_extents) {
        return Err(LayoutError::AlExtents(al_extents));
    }
    Ok(())
}

/// (bitmap pages, activity log blocks) for a device of `size` bytes.
fn area_sizes(size: u64, bitmap_block: u32, al_extents: u32) -> (u32, u32) {
    let bits = size.div_ceil(bitmap_block as u64);
    let pages = bits.div_ceil(BITS_PER_PAGE).max(1) as u32;
    let al_blocks = 2 * al_extents.div_ceil(SLOTS_PER_BLOCK as u32);
    (pages, al_blocks)
}

impl Layout {
    /// Metadata at the end of a backing device of `backing_size` bytes.
    pub fn internal(backing_size: u64, bitmap_block: u32, al_extents: u32) -> Result<Self, LayoutError> {
        check_params(bitmap_block, al_extents)?;
        // The bitmap is sized for the whole device, a slight overestimate that avoids a
        // circular dependency between the data size and the metadata size.
        let (bitmap_pages, al_blocks) = area_sizes(backing_size, bitmap_block, al_extents);
        let md_size = (bitmap_pages as u64 + al_blocks as u64 + 2) * MD_BLOCK;
        let needed = md_size + bitmap_block as u64;
        if backing_size < needed {
            return Err(LayoutError::TooSmall { size: backing_size, needed });
        }
        let md_offset = (backing_size - md_size) / MD_BLOCK * MD_BLOCK;
        let data_size = md_offset / bitmap_block as u64 * bitmap_block as u64;
        let bitmap_offset = md_offset;
        let al_offset = bitmap_offset + bitmap_pages as u64 * MD_BLOCK;
        let sb = al_offset + al_blocks as u64 * MD_BLOCK;
        Ok(Self {
            data_size,
            bitmap_block,
            al_extents,
            superblock_offsets: [sb, sb + MD_BLOCK],
            al_offset,
            al_blocks,
            bitmap_offset,
            bitmap_pages,
            md_offset,
            md_size,
        })
    }

    /// Metadata in its own file or device of `meta_size` bytes, for `backing_size` bytes of data.
    pub fn external(
        meta_size: u64,
        backing_size: u64,
        bitmap_block: u32,
        al_extents: u32,
    ) -> Result<Self, LayoutError> {
        check_params(bitmap_block, al_extents)?;
        let data_size = backing_size / bitmap_block as u64 * bitmap_block as u64;
        if data_size == 0 {
            return Err(LayoutError::TooSmall { size: backing_size, needed: bitmap_block as u64 });
        }
        let (bitmap_pages, al_blocks) = area_sizes(data_size, bitmap_block, al_extents);
        let md_size = (bitmap_pages as u64 + al_blocks as u64 + 2) * MD_BLOCK;
        if meta_size < md_size {
            return Err(LayoutError::MetaTooSmall { size: meta_size, needed: md_size });
        }
        let al_offset = 2 * MD_BLOCK;
        let bitmap_offset = al_offset + al_blocks as u64 * MD_BLOCK;
        Ok(Self {
            data_size,
            bitmap_block,
            al_extents,
            superblock_offsets: [0, MD_BLOCK],
            al_offset,
            al_blocks,
            bitmap_offset,
            bitmap_pages,
            md_offset: 0,
            md_size,
        })
    }

    /// Where the two superblock copies are, which does not depend on the layout parameters:
    /// the last two 4 KiB blocks of an internal device, the first two of an external one.
    pub fn superblock_offsets_of(internal_device_size: Option<u64>) -> [u64; 2] {
        match internal_device_size {
            Some(size) => {
                let end = size / MD_BLOCK * MD_BLOCK;
                [end.saturating_sub(2 * MD_BLOCK), end.saturating_sub(MD_BLOCK)]
            }
            None => [0, MD_BLOCK],
        }
    }

    /// Bitmap bits in use: one per `bitmap_block` bytes of data.
    pub fn bitmap_bits(&self) -> u64 {
        self.data_size.div_ceil(self.bitmap_block as u64)
    }

    /// Offset of bitmap page `page`.
    pub fn bitmap_page_offset(&self, page: u32) -> u64 {
        self.bitmap_offset + page as u64 * MD_BLOCK
    }

    /// Offset of copy `copy` (0 or 1) of activity log block `block`.
    pub fn al_block_offset(&self, block: u32, copy: u32) -> u64 {
        self.al_offset + (2 * block as u64 + copy as u64) * MD_BLOCK
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn internal_areas_end_at_the_device_end() {
        let size = 10u64 << 30;
        let l = Layout::internal(size, 4096, 1237).unwrap();
        assert_eq!(l.superblock_offsets[1] + MD_BLOCK, l.md_offset + l.md_size);
        assert!(l.md_offset + l.md_size <= size);
        assert!(l.data_size <= l.md_offset);
        // 10 GiB at 4 KiB per bit: 2.6 M bits, about 81 pages.
        assert_eq!(l.bitmap_pages as u64, (size / 4096).div_ceil(BITS_PER_PAGE));
    }

    #[test]
    fn external_starts_with_superblocks() {
        let l = Layout::external(1 << 20, 1 << 30, 4096, 1237).unwrap();
        assert_eq!(l.superblock_offsets, [0, 4096]);
        assert_eq!(l.data_size, 1 << 30);
        assert!(l.bitmap_offset + l.bitmap_pages as u64 * MD_BLOCK <= 1 << 20);
    }

    #[test]
    fn too_small_devices_are_refused() {
        assert!(matches!(Layout::internal(8192, 4096, 1237), Err(LayoutError::TooSmall { .. })));
        assert!(matches!(Layout::external(4096, 1 << 30, 4096, 1237), Err(LayoutError::MetaTooSmall { .. })));
        assert!(matches!(Layout::internal(1 << 30, 3000, 1237), Err(LayoutError::BitmapBlock(3000))));
        assert!(matches!(Layout::internal(1 << 30, 4096, 3), Err(LayoutError::AlExtents(3))));
    }

    proptest! {
        #[test]
        fn internal_areas_never_overlap(size in (1u64 << 20)..(1u64 << 44), shift in 12u32..=20, al in 7u32..=65534) {
            if let Ok(l) = Layout::internal(size, 1 << shift, al) {
                prop_assert!(l.data_size <= l.bitmap_offset);
                prop_assert!(l.bitmap_offset + l.bitmap_pages as u64 * MD_BLOCK <= l.al_offset);
                prop_assert!(l.al_offset + l.al_blocks as u64 * MD_BLOCK <= l.superblock_offsets[0]);
                prop_assert!(l.superblock_offsets[1] + MD_BLOCK <= size);
                prop_assert_eq!(l.superblock_offsets, Layout::superblock_offsets_of(Some(size)));
                prop_assert!(l.bitmap_pages as u64 * BITS_PER_PAGE >= l.bitmap_bits());
                prop_assert_eq!(l.data_size % (1u64 << shift), 0);
            }
        }
    }
}
