//! The superblock: identity, sizes, flags and generation identifiers of one replica.
//!
//! Two copies are kept and written alternately (copy `seq % 2`), so a write torn by a crash can
//! only damage the copy being written; on open the valid copy with the higher sequence number
//! wins. Each copy is one 4 KiB block ending in a CRC-32C of the rest.

use super::generations::Generations;
use super::layout::MD_BLOCK;

/// "RDBDMETA".
pub const MAGIC: u64 = 0x5244_4244_4d45_5441;
pub const VERSION: u32 = 1;
const NAME_FIELD: usize = 64;
const CRC_AT: usize = MD_BLOCK as usize - 4;

/// Superblock flags.
pub mod flags {
    /// The data is consistent (not in the middle of being resynced as a target).
    pub const CONSISTENT: u32 = 1 << 0;
    /// This node was Primary when the superblock was written.
    pub const PRIMARY: u32 = 1 << 1;
    /// Set while Primary, cleared at a clean demotion: found set at attach, the node crashed
    /// while Primary and its activity log must be folded into the bitmap.
    pub const CRASHED_PRIMARY: u32 = 1 << 2;
    /// The data was UpToDate when last known.
    pub const UP_TO_DATE: u32 = 1 << 3;
    /// The node shut down cleanly: the activity log holds no writes the bitmap lacks.
    pub const AL_CLEAN: u32 = 1 << 4;
    /// The peer was marked Outdated by this node (fencing).
    pub const PEER_OUTDATED: u32 = 1 << 5;
    /// The disk failed (an I/O error detached it): which of its blocks it lost is unknown, so
    /// every one is resynced to it (DRBD's MDF_FULL_SYNC). Cleared when that resync finishes.
    pub const FULL_SYNC: u32 = 1 << 6;
}

/// One replica's persistent identity and state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Incremented on every write; selects the copy to write next and the copy to trust.
    pub seq: u64,
    pub flags: u32,
    pub data_size: u64,
    pub bitmap_block: u32,
    pub al_extents: u32,
    pub generations: Generations,
    /// The node these metadata belong to (a safety check against swapped disks).
    pub node_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SuperblockError {
    #[error("no rdbd metadata (bad magic)")]
    NotMetadata,
    #[error("metadata version {0} is not supported (this build reads version {VERSION})")]
    Version(u32),
    #[error("superblock checksum mismatch (torn or corrupt block)")]
    Checksum,
    #[error("node name of {0} bytes does not fit the superblock")]
    NameTooLong(usize),
}

impl Superblock {
    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    pub fn set(&mut self, flag: u32, on: bool) {
        if on {
            self.flags |= flag;
        } else {
            self.flags &= !flag;
        }
    }

    /// Which of the two copies a write of this superblock goes to.
    pub fn slot(&self) -> usize {
        (self.seq % 2) as usize
    }

    pub fn encode(&self) -> Result<[u8; MD_BLOCK as usize], SuperblockError> {
        let name = self.node_name.as_bytes();
        if name.len() > NAME_FIELD - 1 {
            return Err(SuperblockError::NameTooLong(name.len()));
        }
        let mut b = [0u8; MD_BLOCK as usize];
        let mut w = Writer { buf: &mut b, at: 0 };
        w.u64(MAGIC);
        w.u32(VERSION);
        w.u32(self.flags);
        w.u64(self.seq);
        w.u64(self.data_size);
        w.u32(self.bitmap_block);
        w.u32(self.al_extents);
        let g = &self.generations;
        for v in [g.current, g.bitmap, g.history[0], g.history[1]] {
            w.u64(v);
        }
        w.u8(name.len() as u8);
        w.bytes(name);
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_be_bytes());
        Ok(b)
    }

    pub fn decode(b: &[u8; MD_BLOCK as usize]) -> Result<Self, SuperblockError> {
        let mut r = Reader { buf: b, at: 0 };
        if r.u64() != MAGIC {
            return Err(SuperblockError::NotMetadata);
        }
        let version = r.u32();
        let stored_crc = u32::from_be_bytes(b[CRC_AT..].try_into().expect("4 bytes"));
        if crc32c::crc32c(&b[..CRC_AT]) != stored_crc {
            return Err(SuperblockError::Checksum);
        }
        if version != VERSION {
            return Err(SuperblockError::Version(version));
        }
        let flags = r.u32();
        let seq = r.u64();
        let data_size = r.u64();
        let bitmap_block = r.u32();
        let al_extents = r.u32();
        let generations = Generations { current: r.u64(), bitmap: r.u64(), history: [r.u64(), r.u64()] };
        let name_len = (r.u8() as usize).min(NAME_FIELD - 1);
        let node_name = String::from_utf8_lossy(r.bytes(name_len)).into_owned();
        Ok(Self { seq, flags, data_size, bitmap_block, al_extents, generations, node_name })
    }

    /// Chooses between the two on-disk copies: the valid one with the higher sequence number.
    /// Also returns the error of a damaged copy, to be reported.
    pub fn pick(
        a: Result<Superblock, SuperblockError>,
        b: Result<Superblock, SuperblockError>,
    ) -> Result<(Superblock, Option<SuperblockError>), SuperblockError> {
        match (a, b) {
            (Ok(a), Ok(b)) => Ok((if a.seq >= b.seq { a } else { b }, None)),
            (Ok(good), Err(e)) | (Err(e), Ok(good)) => Ok((good, Some(e))),
            // Report the more telling error: "not metadata" only if neither copy looks like ours.
            (Err(SuperblockError::NotMetadata), Err(e)) | (Err(e), Err(_)) => Err(e),
        }
    }
}

struct Writer<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn bytes(&mut self, v: &[u8]) {
        self.buf[self.at..self.at + v.len()].copy_from_slice(v);
        self.at += v.len();
    }
    fn u8(&mut self, v: u8) {
        self.bytes(&[v]);
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_be_bytes());
    }
}

/// Reads fixed fields from a block whose size is known to hold them all.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let v = &self.buf[self.at..self.at + n];
        self.at += n;
        v
    }
    fn u8(&mut self) -> u8 {
        self.bytes(1)[0]
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes(4).try_into().expect("4 bytes"))
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.bytes(8).try_into().expect("8 bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(seq: u64) -> Superblock {
        Superblock {
            seq,
            flags: flags::CONSISTENT | flags::UP_TO_DATE,
            data_size: 1 << 30,
            bitmap_block: 4096,
            al_extents: 1237,
            generations: Generations { current: 0xabcd_0001, bitmap: 0, history: [7, 9] },
            node_name: "alpha".into(),
        }
    }

    #[test]
    fn round_trip() {
        let sb = sample(5);
        assert_eq!(Superblock::decode(&sb.encode().unwrap()), Ok(sb));
    }

    #[test]
    fn a_flipped_bit_is_detected() {
        let mut b = sample(5).encode().unwrap();
        b[100] ^= 0x10;
        assert_eq!(Superblock::decode(&b), Err(SuperblockError::Checksum));
    }

    #[test]
    fn zeroes_are_not_metadata() {
        assert_eq!(Superblock::decode(&[0u8; 4096]), Err(SuperblockError::NotMetadata));
    }

    #[test]
    fn newer_valid_copy_wins_and_torn_copy_is_reported() {
        let (sb, damage) = Superblock::pick(Ok(sample(4)), Ok(sample(5))).unwrap();
        assert_eq!((sb.seq, damage), (5, None));
        let (sb, damage) = Superblock::pick(Ok(sample(4)), Err(SuperblockError::Checksum)).unwrap();
        assert_eq!((sb.seq, damage), (4, Some(SuperblockError::Checksum)));
        assert_eq!(
            Superblock::pick(Err(SuperblockError::NotMetadata), Err(SuperblockError::Checksum)),
            Err(SuperblockError::Checksum)
        );
    }

    #[test]
    fn long_names_are_refused() {
        let mut sb = sample(1);
        sb.node_name = "x".repeat(64);
        assert_eq!(sb.encode(), Err(SuperblockError::NameTooLong(64)));
    }

    proptest! {
        #[test]
        fn any_superblock_round_trips(seq: u64, flags: u32, size: u64, bb: u32, al: u32,
                                      c: u64, bm: u64, h0: u64, h1: u64, name in "[a-z0-9.-]{0,63}") {
            let sb = Superblock { seq, flags, data_size: size, bitmap_block: bb, al_extents: al,
                generations: Generations { current: c, bitmap: bm, history: [h0, h1] }, node_name: name };
            prop_assert_eq!(Superblock::decode(&sb.encode().unwrap()), Ok(sb));
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 4096)) {
            let _ = Superblock::decode(bytes.as_slice().try_into().unwrap());
        }
    }
}
