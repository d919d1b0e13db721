//! Handshake decoders on arbitrary bytes: the greeting, option headers and replies, and every
//! option payload decoder (export name, INFO/GO request, meta context request, and the replies a
//! client decodes). The input is also read the way the server reads it: a header, then the
//! payload it announces, handed to the decoder for that option. Whatever decodes must iterate
//! without panicking and re-encode to exactly the input bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rdbd_protocol::nbd::{
    decode_export_name, decode_greeting, decode_server_entry, encode_greeting, encode_server_entry, opt,
    InfoReply, InfoRequest, MetaContextReply, MetaContextRequest, OptionHeader, OptionReplyHeader,
    GREETING_LEN, MAX_STRING_LEN,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(flags) = decode_greeting(data) {
        assert_eq!(encode_greeting(flags)[..], data[..GREETING_LEN]);
    }
    if let Ok(h) = OptionReplyHeader::decode(data) {
        let mut out = Vec::new();
        h.encode_into(&mut out);
        assert_eq!(out[..], data[..OptionReplyHeader::LEN]);
    }
    if let Ok(h) = OptionHeader::decode(data) {
        assert_eq!(h.encode()[..], data[..OptionHeader::LEN]);
        // The payload as the server would read it: at most `length` bytes after the header.
        let rest = &data[OptionHeader::LEN..];
        let payload = &rest[..rest.len().min(h.length as usize)];
        match h.option {
            opt::EXPORT_NAME => export_name(payload),
            opt::INFO | opt::GO => info_request(payload),
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => meta_context_request(payload),
            _ => {}
        }
    }
    export_name(data);
    info_request(data);
    meta_context_request(data);
    replies(data);
});

fn export_name(payload: &[u8]) {
    if let Ok(name) = decode_export_name(payload) {
        assert!(name.len() <= MAX_STRING_LEN);
        assert_eq!(name.as_bytes(), payload);
    }
}

fn info_request(payload: &[u8]) {
    if let Ok(request) = InfoRequest::decode(payload) {
        assert!(request.name.len() <= MAX_STRING_LEN);
        let requests: Vec<u16> = request.requests().collect();
        assert_eq!(InfoRequest::encode(request.name, &requests), payload);
    }
}

fn meta_context_request(payload: &[u8]) {
    if let Ok(request) = MetaContextRequest::decode(payload) {
        assert!(request.export.len() <= MAX_STRING_LEN);
        let queries: Vec<&str> = request.queries().collect();
        assert_eq!(queries.len(), request.query_count() as usize, "decode validated every query");
        assert!(queries.iter().all(|q| q.len() <= MAX_STRING_LEN));
        assert_eq!(MetaContextRequest::encode(request.export, &queries), payload);
    }
}

/// Payloads of option replies (what a client decodes).
fn replies(payload: &[u8]) {
    if let Ok(reply) = InfoReply::decode(payload) {
        assert_eq!(reply.encode(), payload);
    }
    if let Ok((name, description)) = decode_server_entry(payload) {
        assert_eq!(encode_server_entry(name, description), payload);
    }
    if let Ok(reply) = MetaContextReply::decode(payload) {
        assert_eq!(reply.encode(), payload);
    }
}
