//! Transmission phase: requests, simple replies and structured reply chunks.

use bytes::BufMut;

use super::{chunk, reply_flags, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC};
use crate::wire::{truncate_utf8, DecodeError, Reader};

/// NBD commands (the `type` field of a request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
}

impl Command {
    pub fn from_wire(value: u16) -> Option<Self> {
        Some(match value {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            _ => return None,
        })
    }

    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
        }
    }
}

/// A request header in the compact (non-extended) format. `command` is kept raw so that a
/// server can answer an unknown command with EINVAL instead of failing to decode it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    pub const LEN: usize = 28;

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let magic = r.u32()?;
        if magic != REQUEST_MAGIC {
            let (expected, found) = (REQUEST_MAGIC.into(), magic.into());
            return Err(DecodeError::BadMagic { expected, found });
        }
        Ok(Self { flags: r.u16()?, command: r.u16()?, cookie: r.u64()?, offset: r.u64()?, length: r.u32()? })
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        let mut b = &mut out[..];
        b.put_u32(REQUEST_MAGIC);
        b.put_u16(self.flags);
        b.put_u16(self.command);
        b.put_u64(self.cookie);
        b.put_u64(self.offset);
        b.put_u32(self.length);
        out
    }
}

/// A simple reply: magic, u32 error, u64 cookie; a successful READ's data follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

impl SimpleReply {
    pub const LEN: usize = 16;

    pub fn encode_into(&self, out: &mut impl BufMut) {
        out.put_u32(SIMPLE_REPLY_MAGIC);
        out.put_u32(self.error);
        out.put_u64(self.cookie);
    }

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let magic = r.u32()?;
        if magic != SIMPLE_REPLY_MAGIC {
            let (expected, found) = (SIMPLE_REPLY_MAGIC.into(), magic.into());
            return Err(DecodeError::BadMagic { expected, found });
        }
        Ok(Self { error: r.u32()?, cookie: r.u64()? })
    }
}

/// The header of one structured reply chunk; `length` bytes of payload follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub chunk_type: u16,
    pub cookie: u64,
    pub length: u32,
}

impl ChunkHeader {
    pub const LEN: usize = 20;

    pub fn encode_into(&self, out: &mut impl BufMut) {
        out.put_u32(STRUCTURED_REPLY_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.chunk_type);
        out.put_u64(self.cookie);
        out.put_u32(self.length);
    }

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let magic = r.u32()?;
        if magic != STRUCTURED_REPLY_MAGIC {
            let (expected, found) = (STRUCTURED_REPLY_MAGIC.into(), magic.into());
            return Err(DecodeError::BadMagic { expected, found });
        }
        Ok(Self { flags: r.u16()?, chunk_type: r.u16()?, cookie: r.u64()?, length: r.u32()? })
    }

    pub fn is_done(&self) -> bool {
        self.flags & reply_flags::DONE != 0
    }
}

/// Bytes of the chunk header plus the offset that precede the data of an OFFSET_DATA chunk.
pub const OFFSET_DATA_HEAD_LEN: usize = ChunkHeader::LEN + 8;

/// Writes the head of a final OFFSET_DATA chunk carrying `data_len` bytes read at `offset`.
pub fn encode_offset_data_head(out: &mut impl BufMut, cookie: u64, offset: u64, data_len: u32) {
    let length = data_len + 8;
    ChunkHeader { flags: reply_flags::DONE, chunk_type: chunk::OFFSET_DATA, cookie, length }.encode_into(out);
    out.put_u64(offset);
}

/// Length of a final ERROR chunk without a message.
pub const ERROR_CHUNK_LEN: usize = ChunkHeader::LEN + 6;

/// Writes a final ERROR chunk with `error` and a human-readable `message`.
pub fn encode_error_chunk(out: &mut impl BufMut, cookie: u64, error: u32, message: &str) {
    let message = truncate_utf8(message, u16::MAX as usize);
    let length = 6 + message.len() as u32;
    ChunkHeader { flags: reply_flags::DONE, chunk_type: chunk::ERROR, cookie, length }.encode_into(out);
    out.put_u32(error);
    out.put_u16(message.len() as u16);
    out.put_slice(message.as_bytes());
}

/// The payload of an ERROR or ERROR_OFFSET chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorChunk<'a> {
    pub error: u32,
    pub message: &'a str,
}

impl<'a> ErrorChunk<'a> {
    pub fn decode(payload: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(payload);
        let error = r.u32()?;
        let len = r.u16()? as usize;
        let message =
            std::str::from_utf8(r.bytes(len)?).map_err(|_| DecodeError::NotUtf8("error message"))?;
        Ok(Self { error, message })
    }
}

/// One block status descriptor: a run of `length` bytes sharing `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u32,
    pub flags: u32,
}

/// Writes a final BLOCK_STATUS chunk for one metadata context.
pub fn encode_block_status_chunk(out: &mut impl BufMut, cookie: u64, context_id: u32, extents: &[Extent]) {
    let length = 4 + 8 * extents.len() as u32;
    ChunkHeader { flags: reply_flags::DONE, chunk_type: chunk::BLOCK_STATUS, cookie, length }
        .encode_into(out);
    out.put_u32(context_id);
    for e in extents {
        out.put_u32(e.length);
        out.put_u32(e.flags);
    }
}

/// Returns the context id and the extents of a BLOCK_STATUS chunk payload.
pub fn decode_block_status(payload: &[u8]) -> Result<(u32, Vec<Extent>), DecodeError> {
    let mut r = Reader::new(payload);
    let context_id = r.u32()?;
    if r.remaining() == 0 || r.remaining() % 8 != 0 {
        let value = r.remaining() as u64;
        return Err(DecodeError::Invalid { what: "block status descriptor bytes", value });
    }
    let mut extents = Vec::with_capacity(r.remaining() / 8);
    while r.remaining() > 0 {
        extents.push(Extent { length: r.u32()?, flags: r.u32()? });
    }
    Ok((context_id, extents))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_header_layout() {
        let h = RequestHeader { flags: 1, command: 1, cookie: 0x0102, offset: 4096, length: 512 };
        let b = h.encode();
        assert_eq!(&b[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[4..8], &[0, 1, 0, 1]);
        assert_eq!(b.len(), RequestHeader::LEN);
    }

    #[test]
    fn request_with_bad_magic_is_rejected() {
        let mut b = RequestHeader { flags: 0, command: 0, cookie: 1, offset: 0, length: 1 }.encode();
        b[3] = 0;
        assert!(matches!(RequestHeader::decode(&b), Err(DecodeError::BadMagic { .. })));
    }

    #[test]
    fn unknown_commands_stay_raw() {
        assert_eq!(Command::from_wire(8), None);
        assert_eq!(Command::from_wire(0xffff), None);
        for c in 0..8 {
            assert_eq!(Command::from_wire(c).map(Command::to_wire), Some(c));
        }
    }

    #[test]
    fn error_chunk_carries_message() {
        let mut out = Vec::new();
        encode_error_chunk(&mut out, 9, 22, "offset beyond end");
        let h = ChunkHeader::decode(&out).unwrap();
        assert!(h.is_done());
        assert_eq!(h.chunk_type, chunk::ERROR);
        let e = ErrorChunk::decode(&out[ChunkHeader::LEN..]).unwrap();
        assert_eq!(e, ErrorChunk { error: 22, message: "offset beyond end" });
    }

    #[test]
    fn block_status_needs_at_least_one_extent() {
        assert!(decode_block_status(&[0, 0, 0, 1]).is_err());
    }

    proptest! {
        #[test]
        fn request_round_trip(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
            let h = RequestHeader { flags, command, cookie, offset, length };
            prop_assert_eq!(RequestHeader::decode(&h.encode()), Ok(h));
        }

        #[test]
        fn simple_reply_round_trip(error: u32, cookie: u64) {
            let r = SimpleReply { error, cookie };
            let mut out = Vec::new();
            r.encode_into(&mut out);
            prop_assert_eq!(out.len(), SimpleReply::LEN);
            prop_assert_eq!(SimpleReply::decode(&out), Ok(r));
        }

        #[test]
        fn chunk_header_round_trip(flags: u16, chunk_type: u16, cookie: u64, length: u32) {
            let h = ChunkHeader { flags, chunk_type, cookie, length };
            let mut out = Vec::new();
            h.encode_into(&mut out);
            prop_assert_eq!(ChunkHeader::decode(&out), Ok(h));
        }

        #[test]
        fn offset_data_head_round_trip(cookie: u64, offset: u64, len in 0u32..(1 << 25)) {
            let mut out = Vec::new();
            encode_offset_data_head(&mut out, cookie, offset, len);
            prop_assert_eq!(out.len(), OFFSET_DATA_HEAD_LEN);
            let h = ChunkHeader::decode(&out).unwrap();
            prop_assert_eq!((h.cookie, h.length, h.chunk_type), (cookie, len + 8, chunk::OFFSET_DATA));
            prop_assert_eq!(&out[20..], &offset.to_be_bytes());
        }

        #[test]
        fn error_chunk_round_trip(cookie: u64, error: u32, msg in "\\PC{0,40}") {
            let mut out = Vec::new();
            encode_error_chunk(&mut out, cookie, error, &msg);
            let h = ChunkHeader::decode(&out).unwrap();
            prop_assert_eq!(h.length as usize, out.len() - ChunkHeader::LEN);
            let e = ErrorChunk::decode(&out[ChunkHeader::LEN..]).unwrap();
            prop_assert_eq!(e, ErrorChunk { error, message: &msg });
        }

        #[test]
        fn block_status_round_trip(cookie: u64, id: u32,
                                   ext in proptest::collection::vec((1u32.., any::<u32>()), 1..32)) {
            let extents: Vec<Extent> = ext.iter().map(|&(length, flags)| Extent { length, flags }).collect();
            let mut out = Vec::new();
            encode_block_status_chunk(&mut out, cookie, id, &extents);
            let h = ChunkHeader::decode(&out).unwrap();
            prop_assert_eq!(h.length as usize, out.len() - ChunkHeader::LEN);
            prop_assert_eq!(decode_block_status(&out[ChunkHeader::LEN..]), Ok((id, extents)));
        }

        #[test]
        fn decoders_never_panic_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = RequestHeader::decode(&bytes);
            let _ = SimpleReply::decode(&bytes);
            let _ = ChunkHeader::decode(&bytes);
            let _ = ErrorChunk::decode(&bytes);
            let _ = decode_block_status(&bytes);
        }
    }
}
