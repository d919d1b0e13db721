//! Block digests for checksum-based resync and online verify (SPEC §6.2, §6.7, §6.8).
//!
//! Both messages that carry digests (ResyncCsumRequest, VerifyReply) hold one digest per
//! bitmap block of their range, back to back, with the algorithm agreed in Params. The codec
//! carries them as raw bytes; [`DigestAlg::digests_len`] is the length a receiver expects.

use sha2::{Digest, Sha256};

/// A block digest algorithm, as agreed in Params (`csums_alg`, `verify_alg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DigestAlg {
    /// [`super::block_crc32c`], 4 bytes big-endian: fast (a CPU instruction) and catches
    /// corruption, but two different blocks with the same CRC are easy to construct.
    Crc32c,
    /// SHA-256, 32 bytes: collisions are infeasible to find; SHA-NI makes it fast enough.
    #[default]
    Sha256,
}
crate::option_spellings!(DigestAlg { Crc32c => "crc32c", Sha256 => "sha256" });

impl DigestAlg {
    /// The wire value in Params: 1 crc32c, 2 sha256. (0 means "none" for `csums_alg` and is
    /// handled by [`csums_from_wire`] / [`csums_to_wire`].)
    pub fn from_wire(value: u8) -> Option<Self> {
        match value {
            1 => Some(DigestAlg::Crc32c),
            2 => Some(DigestAlg::Sha256),
            _ => None,
        }
    }

    pub fn to_wire(self) -> u8 {
        match self {
            DigestAlg::Crc32c => 1,
            DigestAlg::Sha256 => 2,
        }
    }

    /// Bytes of one digest.
    #[allow(clippy::len_without_is_empty)] // a digest is never empty
    pub const fn len(self) -> usize {
        match self {
            DigestAlg::Crc32c => 4,
            DigestAlg::Sha256 => 32,
        }
    }

    /// Appends the digest of `data` (one block) to `out`.
    pub fn digest_into(self, data: &[u8], out: &mut Vec<u8>) {
        match self {
            DigestAlg::Crc32c => out.extend_from_slice(&super::block_crc32c(data).to_be_bytes()),
            DigestAlg::Sha256 => out.extend_from_slice(&Sha256::digest(data)),
        }
    }

    /// Bytes of the digests covering `len` bytes in blocks of `block` bytes: one digest per
    /// block, the last one possibly shorter. What a receiver checks a digest message against.
    /// `block` must not be 0 (Params guarantees at least 512).
    pub fn digests_len(self, len: u64, block: u32) -> u64 {
        len.div_ceil(u64::from(block)) * self.len() as u64
    }
}

/// `csums_alg` from its Params value: 0 none, else a [`DigestAlg`]; `None` outer for an
/// unknown value.
pub fn csums_from_wire(value: u8) -> Option<Option<DigestAlg>> {
    match value {
        0 => Some(None),
        v => DigestAlg::from_wire(v).map(Some),
    }
}

/// The Params value of `csums_alg`.
pub fn csums_to_wire(alg: Option<DigestAlg>) -> u8 {
    alg.map_or(0, DigestAlg::to_wire)
}

/// Appends one digest per `block`-sized chunk of `data` to `out` (the last chunk may be
/// shorter). Panics if `block` is 0.
pub fn append_digests(alg: DigestAlg, block: usize, data: &[u8], out: &mut Vec<u8>) {
    assert!(block > 0, "digest block size 0");
    out.reserve(data.len().div_ceil(block) * alg.len());
    for chunk in data.chunks(block) {
        alg.digest_into(chunk, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn sha256_of_a_zero_block() {
        let mut out = Vec::new();
        append_digests(DigestAlg::Sha256, 4096, &[0u8; 4096], &mut out);
        assert_eq!(hex(&out), "ad7facb2586fc6e966c004d7d1d16b024f5805ff7cb47c7a85dabd8b48892ca7");
    }

    #[test]
    fn sha256_known_answer() {
        let mut out = Vec::new();
        DigestAlg::Sha256.digest_into(b"abc", &mut out);
        assert_eq!(hex(&out), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn crc32c_digests_are_big_endian_per_chunk() {
        let mut out = Vec::new();
        // Three chunks: "1234", "5678", "9" (the last one shorter).
        append_digests(DigestAlg::Crc32c, 4, b"123456789", &mut out);
        assert_eq!(out.len(), 12);
        assert_eq!(out[..4], crc32c::crc32c(b"1234").to_be_bytes());
        assert_eq!(out[8..], crc32c::crc32c(b"9").to_be_bytes());
        // The whole buffer in one chunk: the standard check value.
        let mut out = Vec::new();
        append_digests(DigestAlg::Crc32c, 4096, b"123456789", &mut out);
        assert_eq!(out, [0xE3, 0x06, 0x92, 0x83]);
    }

    #[test]
    fn appends_after_existing_bytes_and_counts_match() {
        let data = vec![7u8; 3 * 4096 + 100];
        for alg in [DigestAlg::Crc32c, DigestAlg::Sha256] {
            let mut out = vec![0xff];
            append_digests(alg, 4096, &data, &mut out);
            assert_eq!(out[0], 0xff);
            assert_eq!(out.len() as u64 - 1, alg.digests_len(data.len() as u64, 4096));
            assert_eq!(out.len() - 1, 4 * alg.len());
            assert_eq!(out[1..1 + alg.len()], out[1 + alg.len()..1 + 2 * alg.len()], "equal blocks");
        }
        let mut out = Vec::new();
        append_digests(DigestAlg::Sha256, 4096, &[], &mut out);
        assert!(out.is_empty());
        assert_eq!(DigestAlg::Sha256.digests_len(0, 4096), 0);
        assert_eq!(DigestAlg::Crc32c.digests_len(4097, 4096), 8);
    }

    #[test]
    fn wire_values() {
        for v in 0..=u8::MAX {
            if let Some(a) = DigestAlg::from_wire(v) {
                assert_eq!(a.to_wire(), v);
            }
            if let Some(c) = csums_from_wire(v) {
                assert_eq!(csums_to_wire(c), v);
            }
        }
        assert_eq!(DigestAlg::from_wire(0), None);
        assert_eq!(csums_from_wire(0), Some(None));
        assert_eq!(csums_from_wire(2), Some(Some(DigestAlg::Sha256)));
        assert_eq!(csums_from_wire(3), None);
    }
}
