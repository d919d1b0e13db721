//! Handshake phase: greeting, client flags, options and option replies.

use bytes::BufMut;

use super::{info, IHAVEOPT, MAX_STRING_LEN, NBD_MAGIC, OPTION_REPLY_MAGIC};
use crate::wire::{DecodeError, Reader};

/// Server greeting: NBDMAGIC, IHAVEOPT, u16 handshake flags.
pub const GREETING_LEN: usize = 18;

pub fn encode_greeting(handshake_flags: u16) -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    let mut b = &mut out[..];
    b.put_u64(NBD_MAGIC);
    b.put_u64(IHAVEOPT);
    b.put_u16(handshake_flags);
    out
}

/// Returns the handshake flags of a fixed-newstyle greeting.
pub fn decode_greeting(buf: &[u8]) -> Result<u16, DecodeError> {
    let mut r = Reader::new(buf);
    expect_magic(r.u64()?, NBD_MAGIC)?;
    expect_magic(r.u64()?, IHAVEOPT)?;
    r.u16()
}

fn expect_magic(found: u64, expected: u64) -> Result<(), DecodeError> {
    if found == expected {
        Ok(())
    } else {
        Err(DecodeError::BadMagic { expected, found })
    }
}

/// Header of one client option: IHAVEOPT, u32 option, u32 payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    pub const LEN: usize = 16;

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        expect_magic(r.u64()?, IHAVEOPT)?;
        Ok(Self { option: r.u32()?, length: r.u32()? })
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        let mut b = &mut out[..];
        b.put_u64(IHAVEOPT);
        b.put_u32(self.option);
        b.put_u32(self.length);
        out
    }
}

/// Header of one option reply: magic, u32 option (echoed), u32 reply type, u32 payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub length: u32,
}

impl OptionReplyHeader {
    pub const LEN: usize = 20;

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        expect_magic(r.u64()?, OPTION_REPLY_MAGIC)?;
        Ok(Self { option: r.u32()?, reply_type: r.u32()?, length: r.u32()? })
    }

    pub fn encode_into(&self, out: &mut impl BufMut) {
        out.put_u64(OPTION_REPLY_MAGIC);
        out.put_u32(self.option);
        out.put_u32(self.reply_type);
        out.put_u32(self.length);
    }
}

/// Appends a complete option reply (header and payload) to `out`.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, payload: &[u8]) {
    let length = u32::try_from(payload.len()).expect("option reply payload fits in u32");
    OptionReplyHeader { option, reply_type, length }.encode_into(out);
    out.extend_from_slice(payload);
}

/// The name in NBD_OPT_EXPORT_NAME: the whole payload, with no length prefix.
pub fn decode_export_name(payload: &[u8]) -> Result<&str, DecodeError> {
    if payload.len() > MAX_STRING_LEN {
        let len = payload.len() as u64;
        return Err(DecodeError::TooLong { what: "export name", len, limit: MAX_STRING_LEN as u64 });
    }
    std::str::from_utf8(payload).map_err(|_| DecodeError::NotUtf8("export name"))
}

/// The reply to NBD_OPT_EXPORT_NAME: u64 size, u16 transmission flags, and 124 zero bytes unless
/// both sides agreed on NO_ZEROES.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(134);
    out.put_u64(size);
    out.put_u16(flags);
    if !no_zeroes {
        out.put_bytes(0, 124);
    }
    out
}

/// Payload of NBD_OPT_INFO and NBD_OPT_GO: an export name and a list of information requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    pub name: &'a str,
    raw_requests: &'a [u8],
}

impl<'a> InfoRequest<'a> {
    pub fn decode(payload: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(payload);
        let name = r.string32("export name", MAX_STRING_LEN)?;
        let count = r.u16()? as usize;
        let raw_requests = r.bytes(count * 2)?;
        r.finish()?;
        Ok(Self { name, raw_requests })
    }

    /// The requested information types, in the order the client sent them.
    pub fn requests(&self) -> impl Iterator<Item = u16> + 'a {
        self.raw_requests.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]]))
    }

    pub fn encode(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut out = Vec::with_capacity(6 + name.len() + 2 * requests.len());
        out.put_u32(name.len() as u32);
        out.put_slice(name.as_bytes());
        out.put_u16(requests.len() as u16);
        for r in requests {
            out.put_u16(*r);
        }
        out
    }
}

/// Payload of one NBD_REP_INFO reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoReply<'a> {
    Export { size: u64, flags: u16 },
    Name(&'a str),
    Description(&'a str),
    BlockSize { minimum: u32, preferred: u32, maximum: u32 },
}

impl<'a> InfoReply<'a> {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            InfoReply::Export { size, flags } => {
                out.put_u16(info::EXPORT);
                out.put_u64(*size);
                out.put_u16(*flags);
            }
            InfoReply::Name(name) => {
                out.put_u16(info::NAME);
                out.put_slice(name.as_bytes());
            }
            InfoReply::Description(text) => {
                out.put_u16(info::DESCRIPTION);
                out.put_slice(text.as_bytes());
            }
            InfoReply::BlockSize { minimum, preferred, maximum } => {
                out.put_u16(info::BLOCK_SIZE);
                out.put_u32(*minimum);
                out.put_u32(*preferred);
                out.put_u32(*maximum);
            }
        }
        out
    }

    pub fn decode(payload: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(payload);
        let kind = r.u16()?;
        let text = |r: &mut Reader<'a>, what| {
            let rest = r.rest();
            if rest.len() > MAX_STRING_LEN {
                let (len, limit) = (rest.len() as u64, MAX_STRING_LEN as u64);
                return Err(DecodeError::TooLong { what, len, limit });
            }
            std::str::from_utf8(rest).map_err(|_| DecodeError::NotUtf8(what))
        };
        let reply = match kind {
            info::EXPORT => InfoReply::Export { size: r.u64()?, flags: r.u16()? },
            info::NAME => InfoReply::Name(text(&mut r, "export name")?),
            info::DESCRIPTION => InfoReply::Description(text(&mut r, "description")?),
            info::BLOCK_SIZE => {
                InfoReply::BlockSize { minimum: r.u32()?, preferred: r.u32()?, maximum: r.u32()? }
            }
            other => return Err(DecodeError::Invalid { what: "info type", value: other.into() }),
        };
        r.finish()?;
        Ok(reply)
    }
}

/// Payload of NBD_REP_SERVER (one entry of NBD_OPT_LIST): u32 name length, name, description.
pub fn encode_server_entry(name: &str, description: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len() + description.len());
    out.put_u32(name.len() as u32);
    out.put_slice(name.as_bytes());
    out.put_slice(description.as_bytes());
    out
}

/// Returns (name, description) of an NBD_REP_SERVER payload.
pub fn decode_server_entry(payload: &[u8]) -> Result<(&str, &str), DecodeError> {
    let mut r = Reader::new(payload);
    let name = r.string32("export name", MAX_STRING_LEN)?;
    let description = std::str::from_utf8(r.rest()).map_err(|_| DecodeError::NotUtf8("description"))?;
    Ok((name, description))
}

/// Payload of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT: an export name and a list
/// of queries, each a u32-length-prefixed string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest<'a> {
    pub export: &'a str,
    count: u32,
    raw_queries: &'a [u8],
}

impl<'a> MetaContextRequest<'a> {
    pub fn decode(payload: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(payload);
        let export = r.string32("export name", MAX_STRING_LEN)?;
        let count = r.u32()?;
        let raw_queries = r.rest();
        // Validate every query now so that iterating later cannot fail.
        let mut q = Reader::new(raw_queries);
        for _ in 0..count {
            q.string32("metadata context query", MAX_STRING_LEN)?;
        }
        q.finish()?;
        Ok(Self { export, count, raw_queries })
    }

    pub fn queries(&self) -> impl Iterator<Item = &'a str> + 'a {
        let mut r = Reader::new(self.raw_queries);
        (0..self.count).map_while(move |_| r.string32("query", MAX_STRING_LEN).ok())
    }

    pub fn query_count(&self) -> u32 {
        self.count
    }

    pub fn encode(export: &str, queries: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        out.put_u32(export.len() as u32);
        out.put_slice(export.as_bytes());
        out.put_u32(queries.len() as u32);
        for q in queries {
            out.put_u32(q.len() as u32);
            out.put_slice(q.as_bytes());
        }
        out
    }
}

/// Payload of NBD_REP_META_CONTEXT: u32 context id, context name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextReply<'a> {
    pub id: u32,
    pub name: &'a str,
}

impl<'a> MetaContextReply<'a> {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.name.len());
        out.put_u32(self.id);
        out.put_slice(self.name.as_bytes());
        out
    }

    pub fn decode(payload: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(payload);
        let id = r.u32()?;
        let name = std::str::from_utf8(r.rest()).map_err(|_| DecodeError::NotUtf8("context name"))?;
        Ok(Self { id, name })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::{handshake_flags, opt, rep};
    use proptest::prelude::*;

    #[test]
    fn greeting_layout() {
        let g = encode_greeting(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
        assert_eq!(decode_greeting(&g), Ok(3));
    }

    #[test]
    fn option_header_rejects_bad_magic() {
        let mut h = OptionHeader { option: opt::GO, length: 7 }.encode();
        h[0] ^= 1;
        assert!(matches!(OptionHeader::decode(&h), Err(DecodeError::BadMagic { .. })));
    }

    #[test]
    fn info_request_with_truncated_list_is_rejected() {
        let mut p = InfoRequest::encode("disk", &[info::NAME, info::BLOCK_SIZE]);
        p.pop();
        assert!(matches!(InfoRequest::decode(&p), Err(DecodeError::Truncated { .. })));
    }

    #[test]
    fn info_request_name_length_beyond_payload_is_rejected() {
        let mut p = InfoRequest::encode("disk", &[]);
        p[3] = 200;
        assert!(InfoRequest::decode(&p).is_err());
    }

    #[test]
    fn info_request_with_trailing_bytes_is_rejected() {
        let mut p = InfoRequest::encode("", &[info::NAME]);
        p.push(0);
        assert_eq!(InfoRequest::decode(&p), Err(DecodeError::TrailingBytes(1)));
    }

    #[test]
    fn meta_context_count_larger_than_payload_is_rejected() {
        let mut p = MetaContextRequest::encode("", &["base:allocation"]);
        p[7] = 2;
        assert!(MetaContextRequest::decode(&p).is_err());
    }

    #[test]
    fn option_reply_is_header_plus_payload() {
        let mut out = Vec::new();
        encode_option_reply(&mut out, opt::LIST, rep::ACK, &[]);
        let h = OptionReplyHeader::decode(&out).unwrap();
        assert_eq!(h, OptionReplyHeader { option: opt::LIST, reply_type: rep::ACK, length: 0 });
        assert_eq!(out.len(), OptionReplyHeader::LEN);
    }

    #[test]
    fn export_name_reply_lengths() {
        assert_eq!(encode_export_name_reply(1 << 30, 1, true).len(), 10);
        assert_eq!(encode_export_name_reply(1 << 30, 1, false).len(), 134);
    }

    fn name() -> impl Strategy<Value = String> {
        proptest::string::string_regex("[a-zA-Z0-9_./é-]{0,64}").unwrap()
    }

    proptest! {
        #[test]
        fn option_header_round_trip(option: u32, length: u32) {
            let h = OptionHeader { option, length };
            prop_assert_eq!(OptionHeader::decode(&h.encode()), Ok(h));
        }

        #[test]
        fn option_reply_header_round_trip(option: u32, reply_type: u32, length: u32) {
            let h = OptionReplyHeader { option, reply_type, length };
            let mut out = Vec::new();
            h.encode_into(&mut out);
            prop_assert_eq!(OptionReplyHeader::decode(&out), Ok(h));
        }

        #[test]
        fn greeting_round_trip(flags: u16) {
            prop_assert_eq!(decode_greeting(&encode_greeting(flags)), Ok(flags));
        }

        #[test]
        fn info_request_round_trip(n in name(), reqs in proptest::collection::vec(any::<u16>(), 0..16)) {
            let payload = InfoRequest::encode(&n, &reqs);
            let decoded = InfoRequest::decode(&payload).unwrap();
            prop_assert_eq!(decoded.name, n.as_str());
            prop_assert_eq!(decoded.requests().collect::<Vec<_>>(), reqs);
        }

        #[test]
        fn info_reply_round_trip(size: u64, flags: u16, n in name(), a: u32, b: u32, c: u32) {
            for reply in [
                InfoReply::Export { size, flags },
                InfoReply::Name(&n),
                InfoReply::Description(&n),
                InfoReply::BlockSize { minimum: a, preferred: b, maximum: c },
            ] {
                let encoded = reply.encode();
                prop_assert_eq!(InfoReply::decode(&encoded), Ok(reply.clone()));
            }
        }

        #[test]
        fn server_entry_round_trip(n in name(), d in name()) {
            let payload = encode_server_entry(&n, &d);
            prop_assert_eq!(decode_server_entry(&payload), Ok((n.as_str(), d.as_str())));
        }

        #[test]
        fn meta_context_request_round_trip(e in name(), qs in proptest::collection::vec(name(), 0..8)) {
            let refs: Vec<&str> = qs.iter().map(String::as_str).collect();
            let payload = MetaContextRequest::encode(&e, &refs);
            let decoded = MetaContextRequest::decode(&payload).unwrap();
            prop_assert_eq!(decoded.export, e.as_str());
            prop_assert_eq!(decoded.query_count() as usize, refs.len());
            prop_assert_eq!(decoded.queries().collect::<Vec<_>>(), refs);
        }

        #[test]
        fn meta_context_reply_round_trip(id: u32, n in name()) {
            let r = MetaContextReply { id, name: &n };
            let encoded = r.encode();
            prop_assert_eq!(MetaContextReply::decode(&encoded), Ok(r));
        }

        #[test]
        fn decoders_never_panic_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_greeting(&bytes);
            let _ = OptionHeader::decode(&bytes);
            let _ = OptionReplyHeader::decode(&bytes);
            let _ = decode_export_name(&bytes);
            if let Ok(r) = InfoRequest::decode(&bytes) { let _ = r.requests().count(); }
            let _ = InfoReply::decode(&bytes);
            let _ = decode_server_entry(&bytes);
            if let Ok(r) = MetaContextRequest::decode(&bytes) { let _ = r.queries().count(); }
            let _ = MetaContextReply::decode(&bytes);
        }
    }
}
