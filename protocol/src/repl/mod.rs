//! The replication link between two rdbd nodes, specified in `protocol/SPEC.md`.
//!
//! Two TCP connections per peer pair: the data channel (writes, resync data, bitmap, handshake
//! parameters) and the meta channel (acknowledgements and pings), so an ack never waits behind
//! megabytes of bulk data. Every frame is a 12-byte [`FrameHeader`] followed by `length` payload
//! bytes; all integers are big-endian.
//!
//! A receiver reads the header, checks it with [`FrameHeader::decode`] (which rejects unknown
//! kinds and lengths outside the kind's bounds before anything is allocated), checks
//! [`allowed_on`] for the channel, reads exactly `length` bytes and hands them to
//! [`Message::decode`], which borrows strings and data from that buffer.

mod auth;
mod bitmap;
mod digest;
mod message;

pub use auth::{auth_response, is_reflected, verify_response, MAC_LEN, NONCE_LEN};
pub use bitmap::{BitmapCursor, BitmapRun, BitmapRunIter, BitmapRuns, RunLengths};
pub use digest::{append_digests, csums_from_wire, csums_to_wire, DigestAlg};
pub use message::*;

use bytes::BufMut;

use crate::wire::{DecodeError, Reader};

/// "RDBD": first four bytes of every frame, so a stray connection (or a desynchronised stream)
/// is detected on its first header.
pub const MAGIC: u32 = 0x5244_4244;

/// The protocol version this build speaks best.
pub const PROTOCOL_VERSION: u16 = 4;
/// The oldest version this build still speaks. Versions 1 to 3 are not spoken any more (rdbd
/// is pre-release; SPEC.md §11).
pub const PROTOCOL_MIN: u16 = 4;

/// Largest data block one Data or ResyncData message carries: the largest NBD request rdbd
/// accepts, so one client write is always one message.
pub const MAX_DATA_LEN: usize = 32 << 20;

/// No payload is ever longer than this; the largest (Data) is `MAX_DATA_LEN` plus its 24-byte
/// fixed part. Checked before a receiver allocates anything.
pub const MAX_PAYLOAD: u32 = (32 << 20) + 64;

/// Strings (node names, resource names, refusal and disconnect reasons) are at most this long.
/// Encoders truncate longer strings at a character boundary.
pub const MAX_STRING_LEN: usize = 4096;

/// Most run lengths in one BitmapRuns message (64 KiB of runs); senders split larger bitmaps.
pub const MAX_BITMAP_RUNS: usize = 16 * 1024;

/// Smallest bitmap block (bytes of device per bitmap bit) a peer may announce.
pub const MIN_BITMAP_BLOCK: u32 = 512;

/// Most digest bytes in one ResyncCsumRequest or VerifyReply: one SHA-256 digest per 512-byte
/// block of a 32 MiB range, the most any valid request needs.
pub const MAX_DIGESTS_LEN: usize = 2 << 20;

const _: () = assert!((24 + MAX_DATA_LEN) as u64 <= MAX_PAYLOAD as u64);
const _: () = assert!((8 + MAX_DATA_LEN) as u64 <= MAX_PAYLOAD as u64);
const _: () = assert!((8 + 4 * MAX_BITMAP_RUNS) as u64 <= MAX_PAYLOAD as u64);
const _: () = assert!(MAX_DATA_LEN / MIN_BITMAP_BLOCK as usize * DigestAlg::Sha256.len() <= MAX_DIGESTS_LEN);
const _: () = assert!((12 + MAX_DIGESTS_LEN) as u64 <= MAX_PAYLOAD as u64);

/// Message kinds (the `kind` field of the header), grouped by purpose in the high byte. Hello
/// and Refuse keep their numbers and layouts in every version, since they are exchanged before
/// a version is agreed.
pub mod kind {
    pub const HELLO: u16 = 0x0101;
    pub const REFUSE: u16 = 0x0102;
    pub const AUTH_CHALLENGE: u16 = 0x0103;
    pub const AUTH_RESPONSE: u16 = 0x0104;
    pub const PARAMS: u16 = 0x0105;
    pub const STATE: u16 = 0x0106;

    pub const BITMAP_RUNS: u16 = 0x0201;
    pub const BITMAP_DONE: u16 = 0x0202;
    pub const SYNC_UUID: u16 = 0x0203;

    pub const DATA: u16 = 0x0301;
    pub const TRIM: u16 = 0x0302;
    pub const ZEROES: u16 = 0x0303;
    pub const FLUSH: u16 = 0x0304;

    pub const RECV_ACK: u16 = 0x0401;
    pub const WRITE_ACK: u16 = 0x0402;
    pub const NEG_ACK: u16 = 0x0403;
    pub const FLUSH_ACK: u16 = 0x0404;

    pub const RESYNC_REQUEST: u16 = 0x0501;
    pub const RESYNC_DATA: u16 = 0x0502;
    pub const RESYNC_ACK: u16 = 0x0503;
    pub const RESYNC_NEG_ACK: u16 = 0x0504;
    pub const RESYNC_READ_ERROR: u16 = 0x0505;
    pub const RESYNC_CSUM_REQUEST: u16 = 0x0506;
    pub const RESYNC_IN_SYNC: u16 = 0x0507;

    pub const PING: u16 = 0x0601;
    pub const PING_ACK: u16 = 0x0602;

    pub const STATE_CHANGE: u16 = 0x0701;
    pub const DISCONNECT: u16 = 0x0702;

    pub const VERIFY_REQUEST: u16 = 0x0801;
    pub const VERIFY_REPLY: u16 = 0x0802;
    pub const VERIFY_START: u16 = 0x0803;
    pub const VERIFY_DONE: u16 = 0x0804;
    pub const OUT_OF_SYNC: u16 = 0x0805;

    pub const READ_REQUEST: u16 = 0x0901;
    pub const READ_REPLY: u16 = 0x0902;

    /// Every kind of this version, for tests and fuzzers.
    pub const ALL: [u16; 35] = [
        HELLO,
        REFUSE,
        AUTH_CHALLENGE,
        AUTH_RESPONSE,
        PARAMS,
        STATE,
        BITMAP_RUNS,
        BITMAP_DONE,
        SYNC_UUID,
        DATA,
        TRIM,
        ZEROES,
        FLUSH,
        RECV_ACK,
        WRITE_ACK,
        NEG_ACK,
        FLUSH_ACK,
        RESYNC_REQUEST,
        RESYNC_DATA,
        RESYNC_ACK,
        RESYNC_NEG_ACK,
        RESYNC_READ_ERROR,
        RESYNC_CSUM_REQUEST,
        RESYNC_IN_SYNC,
        PING,
        PING_ACK,
        STATE_CHANGE,
        DISCONNECT,
        VERIFY_REQUEST,
        VERIFY_REPLY,
        VERIFY_START,
        VERIFY_DONE,
        OUT_OF_SYNC,
        READ_REQUEST,
        READ_REPLY,
    ];
}

/// The smallest and largest payload a message of `kind` can have, or `None` for an unknown
/// kind. Lets a receiver reject a frame from its header alone: a Ping claiming 32 MiB is as
/// malformed as a Data message claiming 4 GiB.
pub fn payload_bounds(kind: u16) -> Option<(u32, u32)> {
    const STR: u32 = 2 + MAX_STRING_LEN as u32;
    const DATA: u32 = MAX_DATA_LEN as u32;
    const DIGESTS: u32 = MAX_DIGESTS_LEN as u32;
    let fixed = |n: u32| Some((n, n));
    match kind {
        kind::HELLO => Some((9, 5 + 2 * STR)),
        kind::REFUSE => Some((4, 2 + STR)),
        kind::AUTH_CHALLENGE | kind::AUTH_RESPONSE => fixed(32),
        kind::PARAMS => fixed(Params::LEN as u32),
        kind::STATE => fixed(State::LEN as u32),
        kind::BITMAP_RUNS => Some((12, 8 + 4 * MAX_BITMAP_RUNS as u32)),
        kind::BITMAP_DONE | kind::SYNC_UUID => fixed(8),
        kind::DATA => Some((Data::HEAD_LEN as u32, Data::HEAD_LEN as u32 + DATA)),
        kind::TRIM | kind::ZEROES => fixed(28),
        kind::FLUSH | kind::RECV_ACK | kind::WRITE_ACK | kind::FLUSH_ACK => fixed(8),
        kind::NEG_ACK => fixed(12),
        kind::RESYNC_REQUEST | kind::RESYNC_ACK => fixed(12),
        kind::RESYNC_DATA => Some((ResyncData::HEAD_LEN as u32, ResyncData::HEAD_LEN as u32 + DATA)),
        kind::RESYNC_NEG_ACK | kind::RESYNC_READ_ERROR => fixed(16),
        kind::RESYNC_CSUM_REQUEST | kind::VERIFY_REPLY => Some((12, 12 + DIGESTS)),
        kind::RESYNC_IN_SYNC | kind::VERIFY_REQUEST | kind::OUT_OF_SYNC => fixed(12),
        kind::VERIFY_START => fixed(8),
        kind::VERIFY_DONE => fixed(16),
        kind::PING | kind::PING_ACK => fixed(0),
        kind::STATE_CHANGE => fixed(2),
        kind::DISCONNECT => Some((2, STR)),
        kind::READ_REQUEST => fixed(20),
        kind::READ_REPLY => Some((8, 8 + DATA)),
        _ => None,
    }
}

/// Which of the two TCP connections a frame travels on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Writes, resync data, bitmap and the handshake parameters: ordered bulk traffic.
    Data,
    /// Acknowledgements and pings: small frames that must not queue behind bulk data.
    Meta,
}

impl Channel {
    pub fn from_wire(value: u8) -> Option<Self> {
        match value {
            1 => Some(Channel::Data),
            2 => Some(Channel::Meta),
            _ => None,
        }
    }

    pub fn to_wire(self) -> u8 {
        match self {
            Channel::Data => 1,
            Channel::Meta => 2,
        }
    }
}

/// Whether a message of `kind` may arrive on `channel`; a receiver closes the connection
/// otherwise. Hello, Refuse, the authentication pair and Disconnect go on both.
pub fn allowed_on(kind: u16, channel: Channel) -> bool {
    let both = matches!(
        kind,
        kind::HELLO | kind::REFUSE | kind::AUTH_CHALLENGE | kind::AUTH_RESPONSE | kind::DISCONNECT
    );
    let meta = matches!(
        kind,
        kind::RECV_ACK
            | kind::WRITE_ACK
            | kind::NEG_ACK
            | kind::FLUSH_ACK
            | kind::RESYNC_ACK
            | kind::RESYNC_NEG_ACK
            | kind::PING
            | kind::PING_ACK
    );
    let known = payload_bounds(kind).is_some();
    both || match channel {
        Channel::Meta => meta,
        Channel::Data => known && !meta,
    }
}

/// The 12-byte frame header: magic, kind, flags (reserved, zero), payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: u16,
    pub length: u32,
}

impl FrameHeader {
    pub const LEN: usize = 12;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        let mut b = &mut out[..];
        self.encode_into(&mut b);
        out
    }

    pub fn encode_into(&self, out: &mut impl BufMut) {
        out.put_u32(MAGIC);
        out.put_u16(self.kind);
        out.put_u16(0);
        out.put_u32(self.length);
    }

    /// Decodes and checks a header: magic, zero flags, a known kind, and a length within that
    /// kind's [`payload_bounds`] (so at most [`MAX_PAYLOAD`]).
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let magic = r.u32()?;
        if magic != MAGIC {
            return Err(DecodeError::BadMagic { expected: MAGIC.into(), found: magic.into() });
        }
        let kind = r.u16()?;
        let flags = r.u16()?;
        let length = r.u32()?;
        if flags != 0 {
            return Err(DecodeError::Invalid { what: "frame flags", value: flags.into() });
        }
        let (min, max) =
            payload_bounds(kind).ok_or(DecodeError::Invalid { what: "message kind", value: kind.into() })?;
        if length > max {
            return Err(DecodeError::TooLong { what: "payload", len: length.into(), limit: max.into() });
        }
        if length < min {
            return Err(DecodeError::Invalid { what: "payload length", value: length.into() });
        }
        Ok(Self { kind, length })
    }
}

/// Decodes one complete frame from the start of `buf` and returns the message and the bytes it
/// used. `Truncated` means `buf` does not yet hold the whole frame (read more); every other
/// error means the stream is malformed and the connection must be closed.
pub fn decode_frame(buf: &[u8]) -> Result<(Message<'_>, usize), DecodeError> {
    let header = FrameHeader::decode(buf)?;
    let end = FrameHeader::LEN + header.length as usize;
    if buf.len() < end {
        return Err(DecodeError::Truncated { needed: end - buf.len() });
    }
    match Message::decode(header.kind, &buf[FrameHeader::LEN..end]) {
        Ok(message) => Ok((message, end)),
        // The whole payload is here, so a short field is a malformed frame, not a partial read.
        Err(DecodeError::Truncated { .. }) => {
            Err(DecodeError::Invalid { what: "payload length", value: header.length.into() })
        }
        Err(e) => Err(e),
    }
}

/// The highest version both ranges (inclusive `(min, max)`) contain, or `None` if they do not
/// overlap, either range is inverted, or the overlap is only version 0 (never valid).
pub fn negotiate(ours: (u16, u16), theirs: (u16, u16)) -> Option<u16> {
    if ours.0 > ours.1 || theirs.0 > theirs.1 {
        return None;
    }
    let low = ours.0.max(theirs.0).max(1);
    let high = ours.1.min(theirs.1);
    (low <= high).then_some(high)
}

/// CRC-32C (Castagnoli) of a data block, as carried in Data and ResyncData when data integrity
/// is on. Castagnoli rather than the IEEE polynomial: better error detection at block sizes
/// and a dedicated CPU instruction on x86-64 (SSE4.2) and ARMv8, which the `crc32c` crate uses.
pub fn block_crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_layout() {
        let h = FrameHeader { kind: kind::DATA, length: 0x0102_0304 };
        assert_eq!(h.encode(), [0x52, 0x44, 0x42, 0x44, 0x03, 0x01, 0, 0, 1, 2, 3, 4]);
        assert_eq!(&h.encode()[..4], b"RDBD");
        assert_eq!(FrameHeader::decode(&h.encode()), Ok(h));
    }

    #[test]
    fn header_rejects_bad_magic_flags_and_kind() {
        let good = FrameHeader { kind: kind::PING, length: 0 }.encode();
        let mut b = good;
        b[0] = b'X';
        assert!(matches!(FrameHeader::decode(&b), Err(DecodeError::BadMagic { .. })));
        let mut b = good;
        b[7] = 1;
        assert_eq!(FrameHeader::decode(&b), Err(DecodeError::Invalid { what: "frame flags", value: 1 }));
        let b = FrameHeader { kind: 0, length: 0 }.encode();
        assert_eq!(FrameHeader::decode(&b), Err(DecodeError::Invalid { what: "message kind", value: 0 }));
        let b = FrameHeader { kind: 0x0703, length: 0 }.encode();
        assert!(FrameHeader::decode(&b).is_err());
        let b = FrameHeader { kind: 0x0806, length: 0 }.encode();
        assert!(FrameHeader::decode(&b).is_err());
        assert!(matches!(FrameHeader::decode(&good[..11]), Err(DecodeError::Truncated { needed: 1 })));
    }

    #[test]
    fn header_claiming_4_gib_is_rejected() {
        for k in kind::ALL {
            let b = FrameHeader { kind: k, length: u32::MAX }.encode();
            assert!(matches!(FrameHeader::decode(&b), Err(DecodeError::TooLong { len: 0xffff_ffff, .. })));
        }
    }

    #[test]
    fn header_length_limits_per_kind() {
        let data_max = (Data::HEAD_LEN + MAX_DATA_LEN) as u32;
        let ok = |kind, length| FrameHeader::decode(&FrameHeader { kind, length }.encode()).is_ok();
        assert!(ok(kind::DATA, data_max));
        assert!(!ok(kind::DATA, data_max + 1));
        assert!(!ok(kind::DATA, MAX_PAYLOAD + 1));
        assert!(!ok(kind::DATA, Data::HEAD_LEN as u32 - 1));
        assert!(ok(kind::RESYNC_DATA, (ResyncData::HEAD_LEN + MAX_DATA_LEN) as u32));
        assert!(!ok(kind::RESYNC_DATA, (ResyncData::HEAD_LEN + MAX_DATA_LEN) as u32 + 1));
        assert!(ok(kind::PING, 0));
        assert!(!ok(kind::PING, 1));
        assert!(!ok(kind::WRITE_ACK, 7));
        assert!(!ok(kind::WRITE_ACK, 9));
        assert!(ok(kind::BITMAP_RUNS, 8 + 4 * MAX_BITMAP_RUNS as u32));
        assert!(!ok(kind::BITMAP_RUNS, 8 + 4 * MAX_BITMAP_RUNS as u32 + 1));
        assert!(!ok(kind::HELLO, 5 + 2 * (2 + MAX_STRING_LEN as u32) + 1));
        for k in [kind::RESYNC_CSUM_REQUEST, kind::VERIFY_REPLY] {
            assert!(ok(k, 12));
            assert!(!ok(k, 11));
            assert!(ok(k, 12 + MAX_DIGESTS_LEN as u32));
            assert!(!ok(k, 12 + MAX_DIGESTS_LEN as u32 + 1));
        }
        assert!(ok(kind::VERIFY_START, 8) && !ok(kind::VERIFY_START, 12));
        assert!(ok(kind::VERIFY_DONE, 16) && !ok(kind::VERIFY_DONE, 12));
        for k in kind::ALL {
            let (min, max) = payload_bounds(k).unwrap();
            assert!(min <= max && max <= MAX_PAYLOAD, "kind {k:#x}");
        }
    }

    #[test]
    fn every_kind_is_listed_once() {
        let mut all = kind::ALL.to_vec();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), kind::ALL.len());
        let known = (0..=u16::MAX).filter(|&k| payload_bounds(k).is_some()).count();
        assert_eq!(known, kind::ALL.len());
    }

    #[test]
    fn channels() {
        use kind::*;
        for k in [HELLO, REFUSE, AUTH_CHALLENGE, AUTH_RESPONSE, DISCONNECT] {
            assert!(allowed_on(k, Channel::Data) && allowed_on(k, Channel::Meta));
        }
        for k in [RECV_ACK, WRITE_ACK, NEG_ACK, FLUSH_ACK, RESYNC_ACK, RESYNC_NEG_ACK, PING, PING_ACK] {
            assert!(!allowed_on(k, Channel::Data) && allowed_on(k, Channel::Meta), "{k:#x}");
        }
        for k in [PARAMS, STATE, BITMAP_RUNS, BITMAP_DONE, SYNC_UUID, DATA, TRIM, ZEROES, FLUSH] {
            assert!(allowed_on(k, Channel::Data) && !allowed_on(k, Channel::Meta), "{k:#x}");
        }
        for k in [
            RESYNC_REQUEST,
            RESYNC_DATA,
            RESYNC_READ_ERROR,
            RESYNC_CSUM_REQUEST,
            RESYNC_IN_SYNC,
            STATE_CHANGE,
        ] {
            assert!(allowed_on(k, Channel::Data) && !allowed_on(k, Channel::Meta), "{k:#x}");
        }
        for k in [VERIFY_REQUEST, VERIFY_REPLY, VERIFY_START, VERIFY_DONE, OUT_OF_SYNC] {
            assert!(allowed_on(k, Channel::Data) && !allowed_on(k, Channel::Meta), "{k:#x}");
        }
        assert!(!allowed_on(0, Channel::Data) && !allowed_on(0, Channel::Meta));
        assert_eq!(Channel::from_wire(0), None);
        assert_eq!(Channel::from_wire(3), None);
        for c in [Channel::Data, Channel::Meta] {
            assert_eq!(Channel::from_wire(c.to_wire()), Some(c));
        }
    }

    #[test]
    fn version_negotiation() {
        assert_eq!(negotiate((1, 1), (1, 1)), Some(1));
        assert_eq!(negotiate((1, 3), (2, 5)), Some(3));
        assert_eq!(negotiate((2, 5), (1, 3)), Some(3));
        assert_eq!(negotiate((1, 1), (2, 2)), None);
        assert_eq!(negotiate((3, 1), (1, 3)), None, "inverted range");
        assert_eq!(negotiate((0, 0), (0, 0)), None, "version 0 is never valid");
        assert_eq!(negotiate((0, 2), (0, 2)), Some(2));
        assert_eq!(negotiate((PROTOCOL_MIN, PROTOCOL_VERSION), (1, u16::MAX)), Some(PROTOCOL_VERSION));
    }

    #[test]
    fn crc32c_known_answer() {
        assert_eq!(block_crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(block_crc32c(b""), 0);
        assert_eq!(block_crc32c(&[0u8; 32]), 0x8A91_36AA);
    }

    proptest! {
        #[test]
        fn header_round_trip(k in proptest::sample::select(kind::ALL.to_vec()), frac in 0.0f64..=1.0) {
            let (min, max) = payload_bounds(k).unwrap();
            let length = min + ((max - min) as f64 * frac) as u32;
            let h = FrameHeader { kind: k, length };
            prop_assert_eq!(FrameHeader::decode(&h.encode()), Ok(h));
        }

        #[test]
        fn negotiate_is_symmetric_and_within_both(a: (u16, u16), b: (u16, u16)) {
            let v = negotiate(a, b);
            prop_assert_eq!(v, negotiate(b, a));
            if let Some(v) = v {
                prop_assert!(v >= 1 && a.0 <= v && v <= a.1 && b.0 <= v && v <= b.1);
                prop_assert!(v == a.1 || v == b.1, "highest common version");
            }
        }

        #[test]
        fn header_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..16)) {
            let _ = FrameHeader::decode(&bytes);
            let _ = decode_frame(&bytes);
        }
    }
}
