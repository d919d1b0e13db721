//! Transmission decoders on arbitrary bytes: request headers (read as a stream of back-to-back
//! requests, the way the server parses its receive buffer), simple replies, structured reply
//! chunk headers and the chunk payloads a client decodes (error and block status). Whatever
//! decodes must re-encode to exactly the input bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rdbd_protocol::nbd::{
    chunk, decode_block_status, encode_block_status_chunk, encode_error_chunk, ChunkHeader, Command,
    ErrorChunk, ErrorCode, RequestHeader, SimpleReply,
};

fuzz_target!(|data: &[u8]| {
    requests(data);
    if let Ok(r) = SimpleReply::decode(data) {
        let mut out = Vec::new();
        r.encode_into(&mut out);
        assert_eq!(out[..], data[..SimpleReply::LEN]);
        let _ = ErrorCode::from_wire(r.error);
    }
    if let Ok(h) = ChunkHeader::decode(data) {
        let mut out = Vec::new();
        h.encode_into(&mut out);
        assert_eq!(out[..], data[..ChunkHeader::LEN]);
        let rest = &data[ChunkHeader::LEN..];
        let payload = &rest[..rest.len().min(h.length as usize)];
        match h.chunk_type {
            chunk::ERROR | chunk::ERROR_OFFSET => error_chunk(h.cookie, payload),
            chunk::BLOCK_STATUS => block_status(h.cookie, payload),
            _ => {}
        }
    }
    error_chunk(0, data);
    block_status(0, data);
});

/// Back-to-back request headers, skipping WRITE payloads, until one does not decode.
fn requests(mut data: &[u8]) {
    while let Ok(h) = RequestHeader::decode(data) {
        assert_eq!(h.encode()[..], data[..RequestHeader::LEN]);
        data = &data[RequestHeader::LEN..];
        match Command::from_wire(h.command) {
            Some(command) => {
                assert_eq!(command.to_wire(), h.command);
                if command == Command::Write {
                    data = &data[data.len().min(h.length as usize)..];
                }
            }
            None => assert!(h.command > 7),
        }
    }
}

fn error_chunk(cookie: u64, payload: &[u8]) {
    if let Ok(e) = ErrorChunk::decode(payload) {
        assert!(e.message.len() <= u16::MAX as usize);
        // Re-encoding gives the same error and message (trailing bytes are not kept).
        let mut out = Vec::new();
        encode_error_chunk(&mut out, cookie, e.error, e.message);
        let header = ChunkHeader::decode(&out).expect("own chunk header");
        assert_eq!(header.length as usize, out.len() - ChunkHeader::LEN);
        assert_eq!(out[ChunkHeader::LEN..], payload[..6 + e.message.len()]);
    }
}

fn block_status(cookie: u64, payload: &[u8]) {
    if let Ok((context, extents)) = decode_block_status(payload) {
        assert!(!extents.is_empty());
        assert_eq!(extents.len(), (payload.len() - 4) / 8);
        let mut out = Vec::new();
        encode_block_status_chunk(&mut out, cookie, context, &extents);
        assert_eq!(out[ChunkHeader::LEN..], *payload);
    }
}
