//! Durability under power loss and disk errors, at library level: the Primary's replicated
//! device and its metadata on a disk with a volatile cache ([`FaultyDisk`]), the Secondary's
//! applier on another, joined by the real link over loopback. A power loss drops what a disk
//! did not flush; the checker then holds the two disks against each other: every block where
//! they differ must be marked in the bitmap the restarted Primary attaches with, or the
//! replicas would diverge silently.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::library::{blank_state, identity, params, run, write};
use rdbd::metadata::store::{attach_in, create_in, Attached, CreateOptions, MetaArea};
use rdbd::metadata::superblock::flags;
use rdbd::replication::apply::Applier;
use rdbd::replication::device::{ReplicatedDevice, Tracking};
use rdbd::replication::link::connect::{dial, listen};
use rdbd::replication::peer::LinkOptions;
use rdbd::storage::faulty::{Fault, FaultKind, FaultOp, FaultyDisk, PowerLoss};
use rdbd::storage::{BlockDevice, BufPool, IoOp, IoQueue};
use rdbd_protocol::repl::{Message, Protocol};

const DISK: u64 = 64 << 20;
const EXTENT: u64 = 4 << 20;
const BLOCK: u64 = 4096;

/// Creates the Primary's metadata on `disk` (`al_extents` slots).
fn create_md(disk: &Arc<FaultyDisk>, al_extents: u32) {
    let area = MetaArea::internal(disk.clone(), Path::new("alpha")).unwrap();
    let opts = CreateOptions { bitmap_block: BLOCK as u32, al_extents, node_name: "alpha".into() };
    create_in(&area, &opts, false).unwrap();
}

/// Attaches the Primary's metadata as the daemon does (in use: not clean from now on).
fn attach_md(disk: &Arc<FaultyDisk>) -> Attached {
    let area = MetaArea::internal(disk.clone(), Path::new("alpha")).unwrap();
    let mut attached = attach_in(area, "alpha").unwrap();
    attached.meta.update(|sb| sb.set(flags::AL_CLEAN, false)).unwrap();
    attached
}

/// The Primary's replicated device on `disk`, connected to an applier on `peer_disk`.
struct Pair {
    primary: Arc<FaultyDisk>,
    secondary: Arc<FaultyDisk>,
    device: Arc<ReplicatedDevice>,
    data_size: u64,
    _applier: tokio::task::JoinHandle<()>,
}

async fn pair(al_extents: u32) -> Pair {
    let primary = FaultyDisk::new(DISK);
    create_md(&primary, al_extents);
    let attached = attach_md(&primary);
    let data_size = attached.meta.layout().data_size;
    let secondary = FaultyDisk::new(DISK);
    let secondary_data: Arc<dyn BlockDevice> = secondary.data_device(data_size);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let applier = tokio::spawn(async move {
        let mut est = listen(
            &listener,
            &identity("b", "a"),
            params(Protocol::C, data_size),
            blank_state(),
            &mut |_| {},
        )
        .await
        .unwrap();
        let mut applier = Applier::new(secondary_data, true).unwrap();
        let _ = applier.run(&mut est.data, &mut est.meta).await;
    });
    let est = dial(addr, &identity("a", "b"), params(Protocol::C, data_size), blank_state()).await.unwrap();
    let tracking =
        Tracking { bitmap: attached.bitmap, activity: Some((attached.activity_log, attached.meta)) };
    let device = ReplicatedDevice::new(primary.data_device(data_size), tracking, BLOCK as u32);
    // No flush of the peer unless the test (or the device itself) asks for one.
    let options =
        LinkOptions { auto_flush_interval: Duration::from_secs(3600), ..LinkOptions::new(Protocol::C, true) };
    let (mut reader, writer) = est.data.split();
    let link = device.connect_peer(writer, est.meta, options, None);
    // What the peer sends back on the data channel: answers to a Diskless Primary's reads.
    tokio::spawn(async move {
        while let Ok(message) = reader.recv().await {
            if let Message::ReadReply { seq, data } = message {
                assert!(link.read_reply(seq, data), "a reply to no read");
            }
        }
    });
    Pair { primary, secondary, device, data_size, _applier: applier }
}

/// Asserts that every byte of `data` is `byte` (without printing kilobytes when not).
fn assert_bytes(data: &[u8], byte: u8, what: &str) {
    if let Some(at) = data.iter().position(|&b| b != byte) {
        panic!("{what}: byte {at} is {:#x}, expected {byte:#x}", data[at]);
    }
}

async fn write_ok(queue: &mut Box<dyn IoQueue>, pool: &mut BufPool, offset: u64, byte: u8, len: usize) {
    for c in run(queue, vec![write(pool, offset, byte, len)]).await {
        assert!(c.result.is_ok(), "write at {offset}: {:?}", c.result);
    }
}

/// After a power loss of the Primary (and maybe of the Secondary): the Primary attaches again,
/// and every block whose durable contents differ between the two disks must be marked out of
/// sync, or nothing would ever resync it. Returns how many blocks differ.
fn check_no_silent_divergence(p: &Pair) -> u64 {
    let attached = attach_md(&p.primary);
    let mut differ = 0;
    for block in 0..p.data_size / BLOCK {
        let a = p.primary.read_durable(block * BLOCK, BLOCK as usize);
        let b = p.secondary.read_durable(block * BLOCK, BLOCK as usize);
        if a != b {
            differ += 1;
            assert!(
                attached.bitmap.is_dirty(block),
                "block {block} (offset {:#x}) differs between the replicas but is not marked out of sync \
                 (activity log folded: {} extents)",
                block * BLOCK,
                attached.report.al_extents_applied
            );
        }
    }
    differ
}

/// The report: a write stable on the peer (flushed there) but only in the Primary's own
/// cache must keep its extent in the activity log until the Primary's disk has it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_extent_leaves_the_log_only_once_this_disk_has_its_writes() {
    let p = pair(67).await;
    let mut queue = p.device.clone().open_queue().unwrap();
    let mut pool = BufPool::new();
    write_ok(&mut queue, &mut pool, 0, 0xab, 1 << 20).await;
    let link = p.device.peer().unwrap();
    assert!(link.settle(Duration::from_secs(10)).await, "the peer flushes");
    assert_eq!(p.secondary.unflushed_bytes(), 0, "stable on the peer");

    // Idle since the mark: the retire may take the extent out, but only with this disk's
    // writes durable first.
    let mark = p.device.activity_clock();
    assert_eq!(p.device.retire_idle_extents(mark).unwrap(), 1, "the idle extent leaves the log");
    p.primary.power_off(PowerLoss::DropAll);
    assert_eq!(check_no_silent_divergence(&p), 0, "its writes were made durable before it left");
    assert_bytes(&p.primary.read_visible(0, 4096), 0xab, "the write, durable before it left the log");
}

/// A write acknowledged by the peer but not yet flushed there keeps its extent in the log
/// (DRBD keeps the reference until the peer's barrier ack): an eviction that needs its slot waits
/// for the peer to flush. Both nodes then lose power: the replicas may hold different data
/// where the peer lost unflushed writes, but never unmarked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extent_with_writes_unstable_on_the_peer_is_not_evicted() {
    let p = pair(7).await;
    let mut queue = p.device.clone().open_queue().unwrap();
    let mut pool = BufPool::new();
    // Seven extents fill the log; the peer holds their writes in its cache only.
    for e in 0..7u64 {
        write_ok(&mut queue, &mut pool, e * EXTENT, 0x10 + e as u8, 64 << 10).await;
    }
    // The Primary's own cache reaches its disk (as writeback would do at any time).
    p.primary.data_device(p.data_size).sync().unwrap();
    // An eighth extent needs a slot: the least recently used one may go only once the peer
    // has its write stably.
    tokio::time::timeout(
        Duration::from_secs(10),
        write_ok(&mut queue, &mut pool, 7 * EXTENT, 0x17, 64 << 10),
    )
    .await
    .expect("an eviction waits for the peer's flush, not for ever");
    assert_eq!(p.device.activity_log_extents(), 7);
    assert_bytes(&p.secondary.read_durable(0, 4096), 0x10, "stable on the peer before it left the log");
    p.secondary.power_off(PowerLoss::DropAll);
    p.primary.power_off(PowerLoss::DropAll);
    check_no_silent_divergence(&p);
}

/// Waits (bounded) until the link is gone.
async fn link_ends(device: &ReplicatedDevice) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while device.peer().is_some() {
        assert!(std::time::Instant::now() < deadline, "the link did not end");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The Secondary's disk fails a flush: the writes it covered may be lost there, so they are
/// marked out of sync (never answered as if both disks had them, and never forgotten), and the
/// link ends so that the next handshake resyncs them or finds the peer's disk detached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_the_peer_fails_marks_every_write_it_covered() {
    let p = pair(67).await;
    let mut queue = p.device.clone().open_queue().unwrap();
    let mut pool = BufPool::new();
    write_ok(&mut queue, &mut pool, 0, 0x31, 8192).await;
    write_ok(&mut queue, &mut pool, EXTENT, 0x32, 4096).await;
    assert_eq!(p.device.out_of_sync_blocks(), 0, "acknowledged by the peer (protocol C)");
    p.secondary.inject(Fault::always(FaultOp::Flush));
    let done = run(&mut queue, vec![IoOp::Flush]).await;
    assert!(
        done[0].result.is_ok(),
        "durable on this node, and the peer's lack is recorded: {:?}",
        done[0].result
    );
    assert_eq!(p.device.out_of_sync_blocks(), 3, "both writes the failed flush covered");
    link_ends(&p.device).await;
    p.secondary.power_off(PowerLoss::DropAll);
    p.primary.power_off(PowerLoss::DropAll);
    check_no_silent_divergence(&p);
}

/// A write the Secondary's disk fails is out of sync at once, and the link ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_peer_fails_is_marked_out_of_sync() {
    let p = pair(67).await;
    let mut queue = p.device.clone().open_queue().unwrap();
    let mut pool = BufPool::new();
    p.secondary.inject(Fault {
        op: FaultOp::Write,
        range: Some((EXTENT, EXTENT + 1)),
        count: None,
        kind: FaultKind::Eio,
    });
    write_ok(&mut queue, &mut pool, 0, 0x41, 4096).await;
    write_ok(&mut queue, &mut pool, EXTENT, 0x42, 4096).await;
    link_ends(&p.device).await;
    // The failed write, and the one before it that no flush made stable on the peer.
    assert_eq!(p.device.out_of_sync_blocks(), 2);
    p.secondary.power_off(PowerLoss::DropAll);
    p.primary.power_off(PowerLoss::DropAll);
    check_no_silent_divergence(&p);
}

/// A zeroing wider than the activity log can hold (10 extents through 7 slots) is done in parts
/// instead of waiting for ever for slots, on both disks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discard_wider_than_the_activity_log_completes() {
    let p = pair(7).await;
    let mut queue = p.device.clone().open_queue().unwrap();
    let mut pool = BufPool::new();
    write_ok(&mut queue, &mut pool, 0, 0x55, 4096).await;
    write_ok(&mut queue, &mut pool, 9 * EXTENT, 0x56, 4096).await;
    let len = 10 * EXTENT;
    let zero = IoOp::WriteZeroes { offset: 0, len, may_punch: false, fast_only: false, fua: false };
    let done = tokio::time::timeout(Duration::from_secs(20), run(&mut queue, vec![zero]))
        .await
        .expect("the zeroing stalled");
    assert_eq!(done.len(), 1, "one completion for the client's request, not one per part");
    assert!(done[0].result.is_ok(), "{:?}", done[0].result);
    assert!(run(&mut queue, vec![IoOp::Flush]).await[0].result.is_ok());
    for disk in [&p.primary, &p.secondary] {
        assert_bytes(&disk.read_durable(0, 4096), 0, "the first extent, zeroed");
        assert_bytes(&disk.read_durable(9 * EXTENT, 4096), 0, "the last extent, zeroed");
    }
}

async fn read_back(queue: &mut Box<dyn IoQueue>, pool: &mut BufPool, offset: u64, len: usize) -> Vec<u8> {
    let buf = pool.take(len);
    let mut done = run(queue, vec![IoOp::Read { offset, buf }]).await;
    let c = done.pop().unwrap();
    assert!(c.result.is_ok(), "read at {offset}: {:?}", c.result);
    c.buf.unwrap().to_vec()
}

/// The Primary's disk fails a write (on-io-error detach): the write is answered, since the peer
/// has it, the disk is detached before anything else reads it, and from then on the peer serves
/// reads and takes writes alone (DRBD's diskless mode).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_whose_disk_fails_serves_through_the_peer() {
    let p = pair(67).await;
    let mut queue = p.device.clone().open_queue().unwrap();
    let mut pool = BufPool::new();
    write_ok(&mut queue, &mut pool, 0, 0x61, 8192).await;
    p.primary.inject(Fault::always(FaultOp::Write));
    write_ok(&mut queue, &mut pool, 65536, 0x62, 4096).await;
    assert!(!p.device.health().usable(), "the failed disk is detached");
    assert_bytes(&p.primary.read_visible(65536, 4096), 0, "the failed write never reached this disk");
    assert_bytes(&read_back(&mut queue, &mut pool, 65536, 4096).await, 0x62, "read from the peer");
    assert_bytes(&read_back(&mut queue, &mut pool, 0, 8192).await, 0x61, "older data from the peer");
    p.primary.clear_faults();
    write_ok(&mut queue, &mut pool, 131072, 0x63, 4096).await;
    assert!(run(&mut queue, vec![IoOp::Flush]).await[0].result.is_ok());
    assert_bytes(&p.secondary.read_durable(131072, 4096), 0x63, "durable on the peer");
    assert_bytes(&p.primary.read_visible(131072, 4096), 0, "nothing reaches the detached disk");
}

/// A read the local disk fails is retried on the peer, whatever the policy; under pass_on the
/// disk stays in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_the_local_disk_fails_is_answered_by_the_peer() {
    let p = pair(67).await;
    let mut queue = p.device.clone().open_queue().unwrap();
    let mut pool = BufPool::new();
    write_ok(&mut queue, &mut pool, 0, 0x71, 8192).await;
    p.primary.inject(Fault { op: FaultOp::Read, range: Some((0, 1)), count: Some(1), kind: FaultKind::Eio });
    assert_bytes(&read_back(&mut queue, &mut pool, 0, 8192).await, 0x71, "the peer's copy");
    assert!(!p.device.health().usable(), "detach: a read error detaches too");
}

/// A NegAck marks the failed write, and no ack behind it may clear that mark: a ResyncAck for
/// the same range that arrives after it (the target wrote the resync block, then failed the
/// newer application write over it) is never taken, since the link ends at the NegAck. A
/// scripted peer answers in exactly that order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_ack_after_a_negack_does_not_clear_its_mark() {
    let primary = FaultyDisk::new(DISK);
    create_md(&primary, 67);
    let attached = attach_md(&primary);
    let size = attached.meta.layout().data_size;
    let tracking =
        Tracking { bitmap: attached.bitmap, activity: Some((attached.activity_log, attached.meta)) };
    let device = ReplicatedDevice::new(primary.data_device(size), tracking, BLOCK as u32);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (peer_tx, peer_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let est =
            listen(&listener, &identity("b", "a"), params(Protocol::C, size), blank_state(), &mut |_| {})
                .await
                .unwrap();
        let _ = peer_tx.send(est);
    });
    let est = dial(addr, &identity("a", "b"), params(Protocol::C, size), blank_state()).await.unwrap();
    let mut peer = peer_rx.await.unwrap();
    let (replies_tx, mut replies) = tokio::sync::mpsc::unbounded_channel();
    let options =
        LinkOptions { auto_flush_interval: Duration::from_secs(3600), ..LinkOptions::new(Protocol::C, true) };
    let link = device.connect_peer(est.data.split().1, est.meta, options, Some(replies_tx));

    // The application writes 4 KiB at 64 KiB; the peer fails it, then acknowledges the resync
    // of the 1 MiB around it.
    let mut queue = device.clone().open_queue().unwrap();
    let mut pool = BufPool::new();
    queue.submit(0, write(&mut pool, 65536, 0x5a, 4096));
    let seq = match peer.data.recv().await.unwrap() {
        Message::Data(d) => d.seq,
        other => panic!("expected the write, got {other:?}"),
    };
    peer.meta.send(&Message::NegAck { seq, errno: 5 }).await.unwrap();
    peer.meta.send(&Message::ResyncAck { offset: 0, len: 1 << 20 }).await.unwrap();
    let mut done = Vec::new();
    while done.is_empty() {
        std::future::poll_fn(|cx| queue.poll_complete(cx, &mut done)).await;
    }
    assert!(done[0].result.is_ok(), "this disk has it: {:?}", done[0].result);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while link.is_alive() {
        assert!(std::time::Instant::now() < deadline, "the link did not end at the NegAck");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(replies.try_recv().is_err(), "no resync ack behind the NegAck is taken");
    assert_eq!(device.out_of_sync_blocks(), 1, "the failed write stays marked");
}
