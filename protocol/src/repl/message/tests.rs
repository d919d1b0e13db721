use super::*;
use crate::repl::{
    allowed_on, decode_frame, BitmapRuns, Channel, DigestAlg, MAX_BITMAP_RUNS, MAX_DATA_LEN, MAX_DIGESTS_LEN,
    MAX_PAYLOAD,
};
use proptest::prelude::*;
use proptest::strategy::Union;

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn be16(v: u16) -> [u8; 2] {
    v.to_be_bytes()
}
fn be32(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}
fn be64(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

fn encoded(m: &Message<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    m.encode(&mut out);
    out
}

/// Decodes a payload the caller knows is valid.
fn decoded(kind: u16, payload: &[u8]) -> Message<'_> {
    Message::decode(kind, payload).unwrap_or_else(|e| panic!("kind {kind:#x}: {e}"))
}

/// Every message of the protocol with its exact payload bytes.
#[test]
fn layout_of_every_message() {
    let runs = [0, 3, 2];
    let cases: Vec<(Message<'_>, u16, Vec<u8>)> = vec![
        (
            Message::Hello(Hello {
                protocol_min: 1,
                protocol_max: 2,
                channel: Channel::Meta,
                node_name: "a",
                resource: "r0",
            }),
            0x0101,
            cat(&[&be16(1), &be16(2), &[2], &be16(1), b"a", &be16(2), b"r0"]),
        ),
        (
            Message::Refuse { code: RefuseCode::AuthFailed, message: "no" },
            0x0102,
            cat(&[&be16(2), &be16(2), b"no"]),
        ),
        (Message::AuthChallenge { nonce: [0x11; 32] }, 0x0103, vec![0x11; 32]),
        (Message::AuthResponse { mac: [0x22; 32] }, 0x0104, vec![0x22; 32]),
        (
            Message::Params(Params {
                protocol: Protocol::C,
                device_size: 0x0102_0304_0506_0708,
                bitmap_block: 4096,
                data_integrity: true,
                discard_my_data: false,
                csums_alg: Some(DigestAlg::Crc32c),
                verify_alg: DigestAlg::Sha256,
                after_sb_0pri: AfterSb0::DiscardListener,
                after_sb_1pri: AfterSb1::DiscardSecondary,
                after_sb_2pri: AfterSb2::CallPriLostAfterSb,
            }),
            0x0105,
            cat(&[&be64(0x0102_0304_0506_0708), &be32(4096), b"C", &[0x01], &[1, 2, 6, 2, 1]]),
        ),
        (
            Message::State(State {
                role: Role::Primary,
                disk: DiskState::Inconsistent,
                flags: state_flags::CONSISTENT | state_flags::CRASHED_PRIMARY,
                generations: Generations { current: 0xaaaa, bitmap: 0xbbbb, history: [0xcccc, 0xdddd] },
                dirty_blocks: 9,
            }),
            0x0106,
            cat(&[&[1, 4], &be32(5), &be64(0xaaaa), &be64(0xbbbb), &be64(0xcccc), &be64(0xdddd), &be64(9)]),
        ),
        (
            Message::BitmapRuns(BitmapRuns::new(64, &runs).unwrap()),
            0x0201,
            cat(&[&be64(64), &be32(0), &be32(3), &be32(2)]),
        ),
        (Message::BitmapDone { total_blocks: 0x10 }, 0x0202, be64(0x10).to_vec()),
        (Message::SyncUuid { uuid: 0xfeed_f00d }, 0x0203, be64(0xfeed_f00d).to_vec()),
        (
            Message::Data(Data {
                seq: 1,
                offset: 4096,
                fua: true,
                ack: AckMode::Write,
                crc32c: 0xdead_beef,
                data: b"xyz",
            }),
            0x0301,
            cat(&[&be64(1), &be64(4096), &be16(1), &be16(2), &be32(0xdead_beef), b"xyz"]),
        ),
        (
            Message::Trim(Trim { seq: 2, offset: 0, len: 8192, fua: false, ack: AckMode::Recv }),
            0x0302,
            cat(&[&be64(2), &be64(0), &be64(8192), &be16(0), &be16(1)]),
        ),
        (
            Message::Zeroes(Zeroes {
                seq: 3,
                offset: 512,
                len: 1024,
                may_punch: true,
                fua: true,
                ack: AckMode::None,
            }),
            0x0303,
            cat(&[&be64(3), &be64(512), &be64(1024), &be16(3), &be16(0)]),
        ),
        (Message::Flush { seq: 4 }, 0x0304, be64(4).to_vec()),
        (Message::RecvAck { seq: 5 }, 0x0401, be64(5).to_vec()),
        (Message::WriteAck { seq: 6 }, 0x0402, be64(6).to_vec()),
        (Message::NegAck { seq: 7, errno: 5 }, 0x0403, cat(&[&be64(7), &be32(5)])),
        (Message::FlushAck { seq: 8 }, 0x0404, be64(8).to_vec()),
        (
            Message::ResyncRequest { offset: 0x10_0000, len: 0x8000 },
            0x0501,
            cat(&[&be64(0x10_0000), &be32(0x8000)]),
        ),
        (
            Message::ResyncData(ResyncData { offset: 0x2000, crc32c: 0x0102_0304, data: &[9, 9] }),
            0x0502,
            cat(&[&be64(0x2000), &be32(0x0102_0304), &[9, 9]]),
        ),
        (Message::ResyncAck { offset: 0x3000, len: 4096 }, 0x0503, cat(&[&be64(0x3000), &be32(4096)])),
        (
            Message::ResyncNegAck { offset: 0x4000, len: 4096, errno: 5 },
            0x0504,
            cat(&[&be64(0x4000), &be32(4096), &be32(5)]),
        ),
        (
            Message::ResyncReadError { offset: 0x5000, len: 512, errno: 61 },
            0x0505,
            cat(&[&be64(0x5000), &be32(512), &be32(61)]),
        ),
        (
            Message::ResyncCsumRequest { offset: 0x6000, len: 8192, digests: &[1, 2, 3, 4, 5, 6, 7, 8] },
            0x0506,
            cat(&[&be64(0x6000), &be32(8192), &[1, 2, 3, 4, 5, 6, 7, 8]]),
        ),
        (Message::ResyncInSync { offset: 0x7000, len: 4096 }, 0x0507, cat(&[&be64(0x7000), &be32(4096)])),
        (Message::Ping, 0x0601, vec![]),
        (Message::PingAck, 0x0602, vec![]),
        (Message::StateChange { role: Role::Secondary, disk: DiskState::UpToDate }, 0x0701, vec![2, 8]),
        (Message::Disconnect { reason: "bye" }, 0x0702, cat(&[&be16(3), b"bye"])),
        (
            Message::VerifyRequest { offset: 0x10_0000, len: 0x10_0000 },
            0x0801,
            cat(&[&be64(0x10_0000), &be32(0x10_0000)]),
        ),
        (
            Message::VerifyReply { offset: 0x8000, len: 4096, digests: &[0xab; 4] },
            0x0802,
            cat(&[&be64(0x8000), &be32(4096), &[0xab; 4]]),
        ),
        (Message::VerifyStart { offset: 0x9000 }, 0x0803, be64(0x9000).to_vec()),
        (
            Message::VerifyDone { checked_bytes: 1 << 30, out_of_sync_blocks: 3 },
            0x0804,
            cat(&[&be64(1 << 30), &be64(3)]),
        ),
        (Message::OutOfSync { offset: 0xa000, len: 512 }, 0x0805, cat(&[&be64(0xa000), &be32(512)])),
        (
            Message::ReadRequest { seq: 11, offset: 0xb000, len: 8192 },
            0x0901,
            cat(&[&be64(11), &be64(0xb000), &be32(8192)]),
        ),
        (Message::ReadReply { seq: 12, data: &[7, 7, 7] }, 0x0902, cat(&[&be64(12), &[7, 7, 7]])),
    ];
    let mut seen: Vec<u16> = Vec::new();
    for (m, k, payload) in &cases {
        assert_eq!(m.kind(), *k, "{m:?}");
        let out = encoded(m);
        let header = FrameHeader { kind: *k, length: payload.len() as u32 }.encode();
        assert_eq!(out[..12], header, "{m:?}");
        assert_eq!(out[12..], payload[..], "{m:?}");
        assert_eq!(decoded(*k, payload), *m);
        seen.push(*k);
    }
    seen.sort_unstable();
    let mut all = kind::ALL.to_vec();
    all.sort_unstable();
    assert_eq!(seen, all, "the table covers every kind");
}

#[test]
fn enum_wire_values() {
    for v in 0..=u16::MAX {
        assert_eq!(RefuseCode::from_wire(v).to_wire(), v);
    }
    assert_eq!(RefuseCode::from_wire(9), RefuseCode::Unknown(9));
    assert_eq!(RefuseCode::Other.to_wire(), 0xffff);
    for v in 0..=u8::MAX {
        if let Some(p) = Protocol::from_wire(v) {
            assert_eq!(p.to_wire(), v);
        }
    }
    assert_eq!(Protocol::from_wire(b'D'), None);
    assert_eq!(
        [Protocol::A, Protocol::B, Protocol::C].map(Protocol::ack_mode),
        [AckMode::None, AckMode::Recv, AckMode::Write]
    );
    assert_eq!(AckMode::from_wire(3), None);
    for v in 0..=u8::MAX {
        if let Some(a) = AfterSb0::from_wire(v) {
            assert_eq!(a.to_wire(), v);
        }
        if let Some(a) = AfterSb1::from_wire(v) {
            assert_eq!(a.to_wire(), v);
        }
        if let Some(a) = AfterSb2::from_wire(v) {
            assert_eq!(a.to_wire(), v);
        }
    }
    assert_eq!((0..=u8::MAX).filter_map(AfterSb0::from_wire).count(), 7);
    assert_eq!((0..=u8::MAX).filter_map(AfterSb1::from_wire).count(), 4);
    assert_eq!((0..=u8::MAX).filter_map(AfterSb2::from_wire).count(), 2);
    assert_eq!(AfterSb0::from_wire(5), Some(AfterSb0::DiscardDialer));
    assert_eq!(AfterSb0::from_wire(6), Some(AfterSb0::DiscardListener));
}

#[test]
fn hello_rejects_bad_fields() {
    let hello = |channel: u8, name: &[u8], extra: &[u8]| {
        let mut p = cat(&[&be16(1), &be16(1), &[channel], &be16(name.len() as u16), name, &be16(0)]);
        p.extend_from_slice(extra);
        p
    };
    assert!(Message::decode(kind::HELLO, &hello(1, b"n", b"")).is_ok());
    let p = hello(3, b"n", b"");
    assert_eq!(Message::decode(kind::HELLO, &p), Err(DecodeError::Invalid { what: "channel", value: 3 }));
    let p = hello(1, &[0xff, 0xfe], b"");
    assert_eq!(Message::decode(kind::HELLO, &p), Err(DecodeError::NotUtf8("node name")));
    let p = hello(1, &[b'x'; MAX_STRING_LEN + 1], b"");
    assert!(matches!(Message::decode(kind::HELLO, &p), Err(DecodeError::TooLong { what: "node name", .. })));
    let p = hello(1, &[b'x'; MAX_STRING_LEN], b"");
    assert!(Message::decode(kind::HELLO, &p).is_ok());
    let p = hello(1, b"n", b"!");
    assert_eq!(Message::decode(kind::HELLO, &p), Err(DecodeError::TrailingBytes(1)));
    // The resource name's length claims more than the payload holds.
    let mut p = hello(1, b"n", b"");
    let len = p.len();
    p[len - 1] = 5;
    assert!(matches!(Message::decode(kind::HELLO, &p), Err(DecodeError::Truncated { needed: 5 })));
}

#[test]
fn params_and_state_reject_bad_fields() {
    let params = |block: u32, protocol: u8, flags: u8| {
        cat(&[&be64(1 << 30), &be32(block), &[protocol, flags], &[0, 2, 0, 0, 0]])
    };
    assert!(Message::decode(kind::PARAMS, &params(4096, b'A', 3)).is_ok());
    assert!(Message::decode(kind::PARAMS, &params(512, b'B', 0)).is_ok());
    for block in [0, 256, 1000, 4097, u32::MAX] {
        let p = params(block, b'C', 0);
        let e = Message::decode(kind::PARAMS, &p);
        assert_eq!(e, Err(DecodeError::Invalid { what: "bitmap block", value: block.into() }));
    }
    assert!(Message::decode(kind::PARAMS, &params(4096, b'D', 0)).is_err());
    assert!(Message::decode(kind::PARAMS, &params(4096, 3, 0)).is_err());
    assert!(Message::decode(kind::PARAMS, &params(4096, b'C', 4)).is_err());
    // The five policy bytes: each one's largest value decodes, the next one does not.
    let with = |at: usize, v: u8| {
        let mut p = params(4096, b'C', 0);
        p[14 + at] = v;
        p
    };
    let names = ["csums alg", "verify alg", "after-sb-0pri", "after-sb-1pri", "after-sb-2pri"];
    for (at, (what, max)) in names.into_iter().zip([2u8, 2, 6, 3, 1]).enumerate() {
        assert!(Message::decode(kind::PARAMS, &with(at, max)).is_ok(), "{what}");
        let p = with(at, max + 1);
        let e = Message::decode(kind::PARAMS, &p);
        assert_eq!(e, Err(DecodeError::Invalid { what, value: u64::from(max) + 1 }));
    }
    assert_eq!(
        Message::decode(kind::PARAMS, &with(1, 0)),
        Err(DecodeError::Invalid { what: "verify alg", value: 0 }),
        "verify needs an algorithm"
    );
    let Ok(Message::Params(p)) = Message::decode(kind::PARAMS, &with(0, 0)) else { panic!() };
    assert_eq!(p.csums_alg, None);
    // A version-1 Params (14 bytes) is too short.
    let p = params(4096, b'C', 0);
    assert!(Message::decode(kind::PARAMS, &p[..14]).is_err());

    let state = |flags: u32| cat(&[&[1, 2], &be32(flags), &[0; 40]]);
    assert!(Message::decode(kind::STATE, &state(state_flags::KNOWN)).is_ok());
    let p = state(1 << 6);
    let e = Message::decode(kind::STATE, &p);
    assert_eq!(e, Err(DecodeError::Invalid { what: "state flags", value: 64 }));
}

#[test]
fn writes_reject_bad_flags_ack_and_wrapping_ranges() {
    let data = |offset: u64, flags: u16, ack: u16, body: &[u8]| {
        cat(&[&be64(1), &be64(offset), &be16(flags), &be16(ack), &be32(0), body])
    };
    assert!(Message::decode(kind::DATA, &data(0, write_flags::FUA, 2, b"x")).is_ok());
    assert!(Message::decode(kind::DATA, &data(0, write_flags::MAY_PUNCH, 2, b"x")).is_err());
    assert!(Message::decode(kind::DATA, &data(0, 0x8000, 2, b"x")).is_err());
    assert!(Message::decode(kind::DATA, &data(0, 0, 3, b"x")).is_err());
    assert!(Message::decode(kind::DATA, &data(u64::MAX, 0, 0, b"")).is_ok(), "an empty range at the end");
    assert!(Message::decode(kind::DATA, &data(u64::MAX, 0, 0, b"x")).is_err());
    assert!(Message::decode(kind::DATA, &data(u64::MAX - 1, 0, 0, b"x")).is_ok());

    let range = |offset: u64, len: u64, flags: u16| {
        cat(&[&be64(1), &be64(offset), &be64(len), &be16(flags), &be16(0)])
    };
    assert!(Message::decode(kind::TRIM, &range(0, u64::MAX, write_flags::FUA)).is_ok());
    assert!(Message::decode(kind::TRIM, &range(1, u64::MAX, 0)).is_err());
    assert!(Message::decode(kind::TRIM, &range(0, 1, write_flags::MAY_PUNCH)).is_err());
    assert!(Message::decode(kind::ZEROES, &range(0, 1, write_flags::MAY_PUNCH | write_flags::FUA)).is_ok());
    assert!(Message::decode(kind::ZEROES, &range(0, 1, 4)).is_err());
    assert!(Message::decode(kind::ZEROES, &range(u64::MAX, 1, 0)).is_err());

    let resync = |offset: u64, len: u32| cat(&[&be64(offset), &be32(len)]);
    assert!(Message::decode(kind::RESYNC_REQUEST, &resync(0, MAX_DATA_LEN as u32)).is_ok());
    assert!(matches!(
        Message::decode(kind::RESYNC_REQUEST, &resync(0, MAX_DATA_LEN as u32 + 1)),
        Err(DecodeError::TooLong { what: "resync block", .. })
    ));
    assert!(Message::decode(kind::RESYNC_ACK, &resync(u64::MAX, 1)).is_err());
    let rd = cat(&[&be64(u64::MAX), &be32(0), b"z"]);
    assert!(Message::decode(kind::RESYNC_DATA, &rd).is_err());

    // The new range messages follow the same rules.
    for k in [kind::RESYNC_IN_SYNC, kind::VERIFY_REQUEST, kind::OUT_OF_SYNC] {
        assert!(Message::decode(k, &resync(u64::MAX - 8, 8)).is_ok(), "{k:#x}");
        assert!(Message::decode(k, &resync(u64::MAX - 8, 9)).is_err(), "{k:#x}");
        assert!(Message::decode(k, &resync(0, MAX_DATA_LEN as u32)).is_ok(), "{k:#x}");
        assert!(matches!(
            Message::decode(k, &resync(0, MAX_DATA_LEN as u32 + 1)),
            Err(DecodeError::TooLong { .. })
        ));
    }
    for k in [kind::RESYNC_CSUM_REQUEST, kind::VERIFY_REPLY] {
        let with = |offset: u64, len: u32, digests: &[u8]| cat(&[&resync(offset, len), digests]);
        let p = with(0, 4096, &[]);
        let Ok(m) = Message::decode(k, &p) else { panic!("{k:#x}") };
        assert_eq!(m.kind(), k);
        assert!(Message::decode(k, &with(u64::MAX, 1, &[0; 4])).is_err(), "{k:#x}");
        assert!(matches!(
            Message::decode(k, &with(0, MAX_DATA_LEN as u32 + 1, &[0; 4])),
            Err(DecodeError::TooLong { .. })
        ));
        assert!(Message::decode(k, &with(0, MAX_DATA_LEN as u32, &vec![0; MAX_DIGESTS_LEN])).is_ok());
        assert!(matches!(
            Message::decode(k, &with(0, MAX_DATA_LEN as u32, &vec![0; MAX_DIGESTS_LEN + 1])),
            Err(DecodeError::TooLong { what: "payload", .. })
        ));
    }
}

#[test]
fn decode_checks_kind_and_length_itself() {
    assert_eq!(Message::decode(0, &[]), Err(DecodeError::Invalid { what: "message kind", value: 0 }));
    assert_eq!(
        Message::decode(0xffff, &[]),
        Err(DecodeError::Invalid { what: "message kind", value: 0xffff })
    );
    assert!(matches!(Message::decode(kind::PING, &[0]), Err(DecodeError::TooLong { len: 1, limit: 0, .. })));
    assert!(matches!(Message::decode(kind::WRITE_ACK, &[0; 7]), Err(DecodeError::Truncated { needed: 1 })));
    assert!(matches!(Message::decode(kind::WRITE_ACK, &[0; 9]), Err(DecodeError::TooLong { .. })));
    assert_eq!(Message::decode(kind::STATE_CHANGE, &[1]), Err(DecodeError::Truncated { needed: 1 }));
}

#[test]
fn largest_data_block_fits_and_one_more_byte_does_not() {
    let block = vec![0xa5u8; MAX_DATA_LEN];
    let m =
        Message::Data(Data { seq: 9, offset: 0, fua: false, ack: AckMode::Write, crc32c: 0, data: &block });
    let out = encoded(&m);
    assert!(out.len() - FrameHeader::LEN <= MAX_PAYLOAD as usize);
    assert_eq!(decode_frame(&out), Ok((m, out.len())));
    let mut payload = out[FrameHeader::LEN..].to_vec();
    payload.push(0);
    assert!(matches!(Message::decode(kind::DATA, &payload), Err(DecodeError::TooLong { .. })));
    let m = Message::ResyncData(ResyncData { offset: 0, crc32c: 0, data: &block });
    let out = encoded(&m);
    assert_eq!(decode_frame(&out), Ok((m, out.len())));
    // A caller bug (more than the limit) gives a frame the peer rejects at the header.
    payload.resize(MAX_DATA_LEN + 1, 0);
    let m =
        Message::Data(Data { seq: 9, offset: 0, fua: false, ack: AckMode::Write, crc32c: 0, data: &payload });
    assert!(matches!(FrameHeader::decode(&encoded(&m)), Err(DecodeError::TooLong { .. })));
}

#[test]
fn long_strings_are_truncated_at_a_char_boundary() {
    let long = format!("a{}", "é".repeat(2500));
    let out = encoded(&Message::Disconnect { reason: &long });
    let Ok((Message::Disconnect { reason }, _)) = decode_frame(&out) else { panic!("does not decode") };
    assert_eq!(reason.len(), MAX_STRING_LEN - 1);
    assert!(long.starts_with(reason));
    let exact = "x".repeat(MAX_STRING_LEN);
    let out = encoded(&Message::Refuse { code: RefuseCode::Other, message: &exact });
    assert_eq!(
        decode_frame(&out),
        Ok((Message::Refuse { code: RefuseCode::Other, message: &exact }, out.len()))
    );
}

#[test]
fn encode_head_leaves_out_only_the_data() {
    let block = [1u8, 2, 3, 4, 5];
    let data =
        Data { seq: 1, offset: 8, fua: false, ack: AckMode::Recv, crc32c: block_crc(&block), data: &block };
    for m in [Message::Data(data), Message::ResyncData(ResyncData { offset: 8, crc32c: 7, data: &block })] {
        let mut head = Vec::new();
        m.encode_head(&mut head);
        let header = FrameHeader::decode(&head).unwrap();
        assert_eq!(header.length as usize, head.len() - FrameHeader::LEN + block.len());
        assert_eq!(m.trailing_data(), &block);
        head.extend_from_slice(&block);
        assert_eq!(head, encoded(&m));
    }
    let mut head = Vec::new();
    Message::Ping.encode_head(&mut head);
    assert_eq!(head, encoded(&Message::Ping));
    // Appending to a buffer that already holds frames patches the right length field.
    let mut out = encoded(&Message::Ping);
    Message::Data(data).encode(&mut out);
    assert_eq!(decode_frame(&out[12..]), Ok((Message::Data(data), out.len() - 12)));
}

fn block_crc(data: &[u8]) -> u32 {
    crate::repl::block_crc32c(data)
}

#[test]
fn frame_stream_and_partial_reads() {
    let block = [7u8; 100];
    let messages = [
        Message::Ping,
        Message::WriteAck { seq: 3 },
        Message::Data(Data { seq: 4, offset: 512, fua: true, ack: AckMode::Write, crc32c: 0, data: &block }),
        Message::Disconnect { reason: "done" },
    ];
    let mut stream = Vec::new();
    messages.iter().for_each(|m| m.encode(&mut stream));
    let mut rest = &stream[..];
    for m in &messages {
        let (got, used) = decode_frame(rest).unwrap();
        assert_eq!(got, *m);
        for cut in 0..used {
            assert!(
                matches!(decode_frame(&rest[..cut]), Err(DecodeError::Truncated { .. })),
                "a prefix of {cut} bytes means read more"
            );
        }
        rest = &rest[used..];
    }
    assert!(rest.is_empty());
    // A frame whose (complete) payload is too short for its fields is malformed, not partial.
    let mut frame = FrameHeader { kind: kind::HELLO, length: 9 }.encode().to_vec();
    frame.extend_from_slice(&[0, 1, 0, 1, 1, 0, 5, 0, 0]);
    assert_eq!(decode_frame(&frame), Err(DecodeError::Invalid { what: "payload length", value: 9 }));
}

// ---- property tests ----

fn leak_str(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn leak_bytes(v: Vec<u8>) -> &'static [u8] {
    Box::leak(v.into_boxed_slice())
}

fn arb_str() -> impl Strategy<Value = &'static str> {
    prop_oneof![8 => "\\PC{0,24}", 1 => "[a-z]{4090,4096}"].prop_map(leak_str)
}

fn arb_data() -> impl Strategy<Value = &'static [u8]> {
    proptest::collection::vec(any::<u8>(), 0..1024).prop_map(leak_bytes)
}

fn arb_ack() -> impl Strategy<Value = AckMode> {
    prop_oneof![Just(AckMode::None), Just(AckMode::Recv), Just(AckMode::Write)]
}

fn arb_channel() -> impl Strategy<Value = Channel> {
    prop_oneof![Just(Channel::Data), Just(Channel::Meta)]
}

fn arb_protocol() -> impl Strategy<Value = Protocol> {
    prop_oneof![Just(Protocol::A), Just(Protocol::B), Just(Protocol::C)]
}

fn arb_digest_alg() -> impl Strategy<Value = DigestAlg> {
    prop_oneof![Just(DigestAlg::Crc32c), Just(DigestAlg::Sha256)]
}

/// The five policy fields of Params: (csums, verify, after-sb-0pri, -1pri, -2pri).
fn arb_policies() -> impl Strategy<Value = (Option<DigestAlg>, DigestAlg, AfterSb0, AfterSb1, AfterSb2)> {
    (
        proptest::option::of(arb_digest_alg()),
        arb_digest_alg(),
        (0u8..=6).prop_map(|v| AfterSb0::from_wire(v).unwrap()),
        (0u8..=3).prop_map(|v| AfterSb1::from_wire(v).unwrap()),
        (0u8..=1).prop_map(|v| AfterSb2::from_wire(v).unwrap()),
    )
}

static LARGEST_DIGESTS: [u8; MAX_DIGESTS_LEN] = [0x5a; MAX_DIGESTS_LEN];

/// Raw digest bytes: usually a few digests, sometimes the most a message may carry.
fn arb_digests() -> impl Strategy<Value = &'static [u8]> {
    prop_oneof![
        16 => proptest::collection::vec(any::<u8>(), 0..256).prop_map(leak_bytes),
        1 => Just(&LARGEST_DIGESTS[..]),
    ]
}

/// (offset, len) with offset + len <= 2^64.
fn arb_range(max_len: u64) -> impl Strategy<Value = (u64, u64)> {
    (any::<u64>(), 0..=max_len).prop_map(|(o, l)| (o.min(u64::MAX - l), l))
}

fn arb_resync_range() -> impl Strategy<Value = (u64, u32)> {
    arb_range(MAX_DATA_LEN as u64).prop_map(|(o, l)| (o, l as u32))
}

fn arb_bitmap_runs() -> impl Strategy<Value = BitmapRuns<'static>> {
    (any::<u64>(), 0u32..4, proptest::collection::vec(1u32.., 0..48)).prop_map(|(first, head, tail)| {
        let mut runs = vec![head];
        runs.extend(tail);
        let sum: u64 = runs.iter().map(|&n| u64::from(n)).sum();
        let runs: &'static [u32] = Box::leak(runs.into_boxed_slice());
        BitmapRuns::new(first.min(u64::MAX - sum), runs).unwrap()
    })
}

/// Any valid message of the protocol.
fn arb_message() -> impl Strategy<Value = Message<'static>> {
    let arms: Vec<BoxedStrategy<Message<'static>>> = vec![
        (any::<u16>(), any::<u16>(), arb_channel(), arb_str(), arb_str())
            .prop_map(|(protocol_min, protocol_max, channel, node_name, resource)| {
                Message::Hello(Hello { protocol_min, protocol_max, channel, node_name, resource })
            })
            .boxed(),
        (any::<u16>(), arb_str())
            .prop_map(|(c, message)| Message::Refuse { code: RefuseCode::from_wire(c), message })
            .boxed(),
        any::<[u8; 32]>().prop_map(|nonce| Message::AuthChallenge { nonce }).boxed(),
        any::<[u8; 32]>().prop_map(|mac| Message::AuthResponse { mac }).boxed(),
        (arb_protocol(), any::<u64>(), 9u32..32, any::<bool>(), any::<bool>(), arb_policies())
            .prop_map(|(protocol, device_size, shift, data_integrity, discard_my_data, policies)| {
                let (csums_alg, verify_alg, after_sb_0pri, after_sb_1pri, after_sb_2pri) = policies;
                Message::Params(Params {
                    protocol,
                    device_size,
                    bitmap_block: 1 << shift,
                    data_integrity,
                    discard_my_data,
                    csums_alg,
                    verify_alg,
                    after_sb_0pri,
                    after_sb_1pri,
                    after_sb_2pri,
                })
            })
            .boxed(),
        (any::<(u8, u8, u32)>(), any::<[u64; 5]>())
            .prop_map(|((role, disk, flags), [current, bitmap, h0, h1, dirty_blocks])| {
                Message::State(State {
                    role: Role::from_wire(role % 3).unwrap(),
                    disk: DiskState::from_wire(disk % 9).unwrap(),
                    flags: flags & state_flags::KNOWN,
                    generations: Generations { current, bitmap, history: [h0, h1] },
                    dirty_blocks,
                })
            })
            .boxed(),
        arb_bitmap_runs().prop_map(Message::BitmapRuns).boxed(),
        any::<u64>().prop_map(|total_blocks| Message::BitmapDone { total_blocks }).boxed(),
        any::<u64>().prop_map(|uuid| Message::SyncUuid { uuid }).boxed(),
        (any::<u64>(), any::<u64>(), any::<bool>(), arb_ack(), any::<u32>(), arb_data())
            .prop_map(|(seq, offset, fua, ack, crc32c, data)| {
                let offset = offset.min(u64::MAX - data.len() as u64);
                Message::Data(Data { seq, offset, fua, ack, crc32c, data })
            })
            .boxed(),
        (any::<u64>(), arb_range(u64::MAX), any::<bool>(), arb_ack())
            .prop_map(|(seq, (offset, len), fua, ack)| Message::Trim(Trim { seq, offset, len, fua, ack }))
            .boxed(),
        (any::<u64>(), arb_range(u64::MAX), any::<bool>(), any::<bool>(), arb_ack())
            .prop_map(|(seq, (offset, len), may_punch, fua, ack)| {
                Message::Zeroes(Zeroes { seq, offset, len, may_punch, fua, ack })
            })
            .boxed(),
        any::<u64>().prop_map(|seq| Message::Flush { seq }).boxed(),
        any::<u64>().prop_map(|seq| Message::RecvAck { seq }).boxed(),
        any::<u64>().prop_map(|seq| Message::WriteAck { seq }).boxed(),
        any::<(u64, u32)>().prop_map(|(seq, errno)| Message::NegAck { seq, errno }).boxed(),
        any::<u64>().prop_map(|seq| Message::FlushAck { seq }).boxed(),
        Just(Message::Ping).boxed(),
        Just(Message::PingAck).boxed(),
        arb_resync_range().prop_map(|(offset, len)| Message::ResyncRequest { offset, len }).boxed(),
        (any::<u64>(), any::<u32>(), arb_data())
            .prop_map(|(offset, crc32c, data)| {
                let offset = offset.min(u64::MAX - data.len() as u64);
                Message::ResyncData(ResyncData { offset, crc32c, data })
            })
            .boxed(),
        arb_resync_range().prop_map(|(offset, len)| Message::ResyncAck { offset, len }).boxed(),
        (arb_resync_range(), any::<u32>())
            .prop_map(|((offset, len), errno)| Message::ResyncNegAck { offset, len, errno })
            .boxed(),
        (arb_resync_range(), any::<u32>())
            .prop_map(|((offset, len), errno)| Message::ResyncReadError { offset, len, errno })
            .boxed(),
        any::<(u8, u8)>()
            .prop_map(|(role, disk)| Message::StateChange {
                role: Role::from_wire(role % 3).unwrap(),
                disk: DiskState::from_wire(disk % 9).unwrap(),
            })
            .boxed(),
        arb_str().prop_map(|reason| Message::Disconnect { reason }).boxed(),
        (arb_resync_range(), arb_digests())
            .prop_map(|((offset, len), digests)| Message::ResyncCsumRequest { offset, len, digests })
            .boxed(),
        arb_resync_range().prop_map(|(offset, len)| Message::ResyncInSync { offset, len }).boxed(),
        arb_resync_range().prop_map(|(offset, len)| Message::VerifyRequest { offset, len }).boxed(),
        (arb_resync_range(), arb_digests())
            .prop_map(|((offset, len), digests)| Message::VerifyReply { offset, len, digests })
            .boxed(),
        any::<u64>().prop_map(|offset| Message::VerifyStart { offset }).boxed(),
        any::<(u64, u64)>()
            .prop_map(|(checked_bytes, out_of_sync_blocks)| Message::VerifyDone {
                checked_bytes,
                out_of_sync_blocks,
            })
            .boxed(),
        arb_resync_range().prop_map(|(offset, len)| Message::OutOfSync { offset, len }).boxed(),
        (any::<u64>(), arb_resync_range())
            .prop_map(|(seq, (offset, len))| Message::ReadRequest { seq, offset, len })
            .boxed(),
        (any::<u64>(), arb_data()).prop_map(|(seq, data)| Message::ReadReply { seq, data }).boxed(),
    ];
    assert_eq!(arms.len(), kind::ALL.len(), "one arm per kind");
    Union::new(arms)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Every message survives encode → header check → decode unchanged, uses exactly the bytes
    /// it announced, and may travel on at least one channel.
    #[test]
    fn every_message_round_trips(m in arb_message()) {
        let out = encoded(&m);
        let header = FrameHeader::decode(&out).unwrap();
        prop_assert_eq!(header.kind, m.kind());
        prop_assert_eq!(header.length as usize, out.len() - FrameHeader::LEN);
        prop_assert_eq!(Message::decode(header.kind, &out[FrameHeader::LEN..]), Ok(m));
        prop_assert_eq!(decode_frame(&out), Ok((m, out.len())));
        let mut head = Vec::new();
        m.encode_head(&mut head);
        head.extend_from_slice(m.trailing_data());
        prop_assert_eq!(head, out);
        prop_assert!(allowed_on(m.kind(), Channel::Data) || allowed_on(m.kind(), Channel::Meta));
    }

    /// Messages back to back in one buffer decode in order.
    #[test]
    fn streams_decode_in_order(ms in proptest::collection::vec(arb_message(), 1..8)) {
        let mut stream = Vec::new();
        ms.iter().for_each(|m| m.encode(&mut stream));
        let mut rest = &stream[..];
        for m in &ms {
            let (got, used) = decode_frame(rest).unwrap();
            prop_assert_eq!(got, *m);
            rest = &rest[used..];
        }
        prop_assert!(rest.is_empty());
    }

    /// Arbitrary (kind, bytes): decode never panics, and whatever decodes re-encodes to exactly
    /// the same bytes (the encoding is canonical).
    #[test]
    fn decode_never_panics(
        k in prop_oneof![proptest::sample::select(kind::ALL.to_vec()), any::<u16>()],
        payload in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        if let Ok(m) = Message::decode(k, &payload) {
            let out = encoded(&m);
            prop_assert_eq!(&out[..FrameHeader::LEN], &FrameHeader { kind: k, length: payload.len() as u32 }.encode());
            prop_assert_eq!(&out[FrameHeader::LEN..], &payload[..]);
        }
        let _ = decode_frame(&payload);
    }

    /// Valid frames with one byte changed: never a panic, and anything that still decodes is
    /// canonical.
    #[test]
    fn mutated_frames_never_panic(m in arb_message(), at: usize, byte: u8) {
        let mut out = encoded(&m);
        let at = at % out.len();
        out[at] = byte;
        if let Ok((got, used)) = decode_frame(&out) {
            prop_assert_eq!(encoded(&got), &out[..used]);
        }
    }
}

#[test]
fn bitmap_run_limit_matches_payload_bound() {
    let runs = vec![1u32; MAX_BITMAP_RUNS];
    let out = encoded(&Message::BitmapRuns(BitmapRuns::new(0, &runs).unwrap()));
    assert!(decode_frame(&out).is_ok());
}
