//! Replication link decoders on arbitrary bytes: the input is read as a stream of frames, the
//! way a channel's receiver parses its buffer, and also as (kind, payload) handed straight to
//! `Message::decode`. Whatever decodes must re-encode to exactly the input bytes (the encoding
//! is canonical), and the runs of any bitmap message must stay inside the bounds they are
//! checked against.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rdbd_protocol::repl::{
    allowed_on, decode_frame, kind, BitmapCursor, BitmapRuns, Channel, FrameHeader, Message, MAX_PAYLOAD,
};

fuzz_target!(|data: &[u8]| {
    stream(data);
    if let [a, b, payload @ ..] = data {
        let k = u16::from_be_bytes([*a, *b]);
        // Mostly a known kind, so every payload decoder gets the fuzzer's attention.
        message(kind::ALL[usize::from(k) % kind::ALL.len()], payload);
        message(k, payload);
    }
});

/// Back-to-back frames until one does not decode.
fn stream(mut data: &[u8]) {
    loop {
        match decode_frame(data) {
            Ok((m, used)) => {
                frame(&m, &data[..used]);
                data = &data[used..];
            }
            Err(_) => {
                if let Ok(h) = FrameHeader::decode(data) {
                    assert!(h.length <= MAX_PAYLOAD);
                    assert_eq!(h.encode()[..], data[..FrameHeader::LEN]);
                }
                return;
            }
        }
    }
}

fn frame(m: &Message<'_>, bytes: &[u8]) {
    let mut out = Vec::new();
    m.encode(&mut out);
    assert_eq!(out, bytes);
    let mut head = Vec::new();
    m.encode_head(&mut head);
    head.extend_from_slice(m.trailing_data());
    assert_eq!(head, bytes);
    assert!(allowed_on(m.kind(), Channel::Data) || allowed_on(m.kind(), Channel::Meta));
    bitmap(m);
}

fn message(k: u16, payload: &[u8]) {
    if let Ok(m) = Message::decode(k, payload) {
        assert_eq!(m.kind(), k);
        let mut out = Vec::new();
        m.encode(&mut out);
        let header = FrameHeader::decode(&out).expect("own header");
        assert_eq!(header, FrameHeader { kind: k, length: payload.len() as u32 });
        assert_eq!(out[FrameHeader::LEN..], *payload);
        bitmap(&m);
    }
}

fn bitmap(m: &Message<'_>) {
    let Message::BitmapRuns(b) = m else { return };
    let end = b.end_block().expect("decode checked the end");
    assert!(b.run_count() >= 1);
    for total in [0, b.first_block(), end / 2, end, u64::MAX] {
        runs_within(b, total);
    }
    let mut cursor = BitmapCursor::new(end);
    match cursor.accept(b) {
        Ok(runs) => {
            assert_eq!(b.first_block(), 0);
            assert!(runs.map(|r| r.expect("accepted runs are all valid")).all(|r| r.blocks > 0));
            assert_eq!(cursor.finish(end), Ok(()));
        }
        Err(_) => assert_ne!(b.first_block(), 0),
    }
}

fn runs_within(b: &BitmapRuns<'_>, total: u64) {
    let mut next = b.first_block();
    let mut last_dirty = None;
    for run in b.runs(total) {
        let Ok(run) = run else { return };
        assert!(run.blocks > 0);
        assert_eq!(run.start_block, next);
        assert_ne!(last_dirty, Some(run.dirty), "runs alternate");
        last_dirty = Some(run.dirty);
        next = run.start_block + u64::from(run.blocks);
        assert!(next <= total);
    }
}
