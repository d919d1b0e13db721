//! The Primary's replicated device and its ledger against a scripted fake peer
//! ([`ScriptedPair`]): every acknowledgement is written by the test, so each rule of the write
//! path is checked at the exact moment it matters, in one process and in milliseconds.

mod common;

use std::time::Duration;

use common::scripted_peer::{ScriptedPair, Sent};
use rdbd_protocol::repl::{AckMode, Message, Protocol};

const SIZE: u64 = 16 << 20;
/// How long a request that must not complete yet is watched.
const NOT_YET: Duration = Duration::from_millis(200);

async fn expect_write(pair: &mut ScriptedPair) -> (u64, AckMode) {
    match pair.next_sent().await {
        Sent::Write { seq, ack, .. } => (seq, ack),
        other => panic!("expected a write, got {other:?}"),
    }
}

/// Protocol C: writes 4 KiB at `offset` as request `id`, answers the peer's WriteAck and waits
/// until the write completes.
async fn acknowledged_write(pair: &mut ScriptedPair, id: u32, offset: u64, token: u8) {
    pair.write(id, offset, token, 4096, false);
    let (seq, _) = expect_write(pair).await;
    pair.answer(Message::WriteAck { seq }).await;
    assert!(pair.completion(id).await.result.is_ok());
}

#[tokio::test]
async fn protocol_c_completes_a_write_only_after_the_peers_write_ack() {
    let mut pair = ScriptedPair::new(Protocol::C, SIZE).await;
    pair.write(1, 0, 0xa1, 4096, false);
    let (seq, ack) = expect_write(&mut pair).await;
    assert_eq!(ack, AckMode::Write);
    assert!(pair.completed_within(NOT_YET).await.is_empty(), "completed before the peer had it");
    pair.answer(Message::WriteAck { seq }).await;
    assert!(pair.completion(1).await.result.is_ok());
    assert_eq!(pair.device.out_of_sync_blocks(), 0);
}

#[tokio::test]
async fn acknowledgements_out_of_order_complete_their_own_writes() {
    let mut pair = ScriptedPair::new(Protocol::C, SIZE).await;
    pair.write(1, 0, 0xb1, 4096, false);
    pair.write(2, 65536, 0xb2, 4096, false);
    let (first, _) = expect_write(&mut pair).await;
    let (second, _) = expect_write(&mut pair).await;
    pair.answer(Message::WriteAck { seq: second }).await;
    assert!(pair.completion(2).await.result.is_ok());
    assert!(pair.completed_within(NOT_YET).await.is_empty(), "the first write has no ack yet");
    pair.answer(Message::WriteAck { seq: first }).await;
    assert!(pair.completion(1).await.result.is_ok());
}

/// A WriteAck says the peer's disk has the write, not that it is durable there: until a
/// FlushAck covers it, a lost link marks it out of sync.
#[tokio::test]
async fn a_write_acknowledged_but_not_flushed_on_the_peer_is_marked_when_the_link_dies() {
    let mut pair = ScriptedPair::new(Protocol::C, SIZE).await;
    acknowledged_write(&mut pair, 1, 8192, 0xc1).await;
    let (device, link, _queue) = pair.cut();
    ScriptedPair::link_down(&link).await;
    assert_eq!(device.out_of_sync_blocks(), 1, "the unflushed write is marked for resync");
}

#[tokio::test]
async fn a_client_flush_waits_for_the_peers_flush_ack_and_then_nothing_is_marked() {
    let mut pair = ScriptedPair::new(Protocol::C, SIZE).await;
    acknowledged_write(&mut pair, 1, 0, 0xd1).await;
    pair.flush(2);
    let flush = match pair.next_sent().await {
        Sent::Flush { seq } => seq,
        other => panic!("expected the flush, got {other:?}"),
    };
    assert!(pair.completed_within(NOT_YET).await.is_empty(), "FLUSH answered before the peer flushed");
    pair.answer(Message::FlushAck { seq: flush }).await;
    assert!(pair.completion(2).await.result.is_ok());
    let (device, link, _queue) = pair.cut();
    ScriptedPair::link_down(&link).await;
    assert_eq!(device.out_of_sync_blocks(), 0, "the peer has it durably: nothing to resync");
}

/// Protocol B completes on receipt; the write is still followed to its flush.
#[tokio::test]
async fn protocol_b_completes_on_receipt_and_marks_what_the_peer_never_flushed() {
    let mut pair = ScriptedPair::new(Protocol::B, SIZE).await;
    pair.write(1, 4096, 0xe1, 4096, false);
    let (seq, ack) = expect_write(&mut pair).await;
    assert_eq!(ack, AckMode::Recv);
    pair.answer(Message::RecvAck { seq }).await;
    assert!(pair.completion(1).await.result.is_ok());
    let (device, link, _queue) = pair.cut();
    ScriptedPair::link_down(&link).await;
    assert_eq!(device.out_of_sync_blocks(), 1);
}

/// A FUA write is durable on the peer once acknowledged: a lost link leaves it unmarked.
#[tokio::test]
async fn an_acknowledged_fua_write_is_stable_on_the_peer() {
    let mut pair = ScriptedPair::new(Protocol::C, SIZE).await;
    pair.write(1, 0, 0xf1, 4096, true);
    let seq = match pair.next_sent().await {
        Sent::Write { seq, fua: true, .. } => seq,
        other => panic!("expected a FUA write, got {other:?}"),
    };
    pair.answer(Message::WriteAck { seq }).await;
    assert!(pair.completion(1).await.result.is_ok());
    let (device, link, _queue) = pair.cut();
    ScriptedPair::link_down(&link).await;
    assert_eq!(device.out_of_sync_blocks(), 0);
}

/// The peer's disk failed the write: this node has it, the range is marked, and the link ends.
#[tokio::test]
async fn a_negack_marks_the_write_and_ends_the_link() {
    let mut pair = ScriptedPair::new(Protocol::C, SIZE).await;
    pair.write(1, 1 << 20, 0x11, 8192, false);
    let (seq, _) = expect_write(&mut pair).await;
    pair.answer(Message::NegAck { seq, errno: 5 }).await;
    assert!(pair.completion(1).await.result.is_ok(), "the local disk has it");
    ScriptedPair::link_down(&pair.link).await;
    assert_eq!(pair.device.out_of_sync_blocks(), 2);
}

/// A peer that acknowledges a write it was never sent is broken: the link ends, nothing
/// panics, and the write in flight is marked.
#[tokio::test]
async fn an_ack_for_an_unknown_write_ends_the_link() {
    let mut pair = ScriptedPair::new(Protocol::C, SIZE).await;
    pair.write(1, 0, 0x22, 4096, false);
    let (seq, _) = expect_write(&mut pair).await;
    pair.answer(Message::WriteAck { seq: seq + 1000 }).await;
    ScriptedPair::link_down(&pair.link).await;
    assert!(pair.completion(1).await.result.is_ok(), "the write completes locally");
    assert_eq!(pair.device.out_of_sync_blocks(), 1);
}

/// A link that dies with a write unanswered completes it locally and marks it.
#[tokio::test]
async fn a_write_in_flight_when_the_peer_vanishes_completes_and_is_marked() {
    let mut pair = ScriptedPair::new(Protocol::C, SIZE).await;
    pair.write(1, 12288, 0x33, 4096, false);
    let _ = expect_write(&mut pair).await;
    let (device, link, mut queue) = pair.cut();
    ScriptedPair::link_down(&link).await;
    let mut done = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        while done.is_empty() {
            std::future::poll_fn(|cx| queue.poll_complete(cx, &mut done)).await;
        }
    })
    .await
    .expect("the write was not completed after the link died");
    assert!(done[0].result.is_ok());
    assert_eq!(device.out_of_sync_blocks(), 1);
}
