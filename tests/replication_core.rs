//! The replicated write path at library level: a primary's replicated device over one file, the
//! secondary's applier over another, joined by the real link over loopback.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::library::{blank_state, identity, params, run, write};
use rdbd::metadata::bitmap::DirtyBitmap;
use rdbd::replication::apply::Applier;
use rdbd::replication::device::{ReplicatedDevice, Tracking};
use rdbd::replication::link::connect::{dial, listen};
use rdbd::replication::peer::LinkOptions;
use rdbd::storage::{BlockDevice, BufPool, FileDevice, IoOp, OpenOptions};
use rdbd_protocol::repl::Protocol;

const SIZE: u64 = 16 << 20;

fn file_device(dir: &tempfile::TempDir, name: &str) -> Arc<dyn BlockDevice> {
    let opts = OpenOptions { size: Some(SIZE), ..Default::default() };
    Arc::new(FileDevice::open_file(&dir.path().join(name), &opts).unwrap())
}

/// Connects a primary and a secondary; returns the primary's device and the secondary's task.
async fn pair(
    dir: &tempfile::TempDir,
    protocol: Protocol,
) -> (Arc<ReplicatedDevice>, tokio::task::JoinHandle<rdbd::replication::apply::ApplyStats>) {
    pair_with(dir, protocol, Duration::from_secs(3600)).await
}

async fn pair_with(
    dir: &tempfile::TempDir,
    protocol: Protocol,
    auto_flush: Duration,
) -> (Arc<ReplicatedDevice>, tokio::task::JoinHandle<rdbd::replication::apply::ApplyStats>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let secondary_dev = file_device(dir, "b.img");
    let secondary = tokio::spawn(async move {
        let ident = identity("b", "a");
        let mut est =
            listen(&listener, &ident, params(protocol, SIZE), blank_state(), &mut |_| {}).await.unwrap();
        let mut applier = Applier::new(secondary_dev, true).unwrap();
        applier.run(&mut est.data, &mut est.meta).await.unwrap()
    });
    let ident = identity("a", "b");
    let est = dial(addr, &ident, params(protocol, SIZE), blank_state()).await.unwrap();
    let tracking = Tracking { bitmap: DirtyBitmap::new(SIZE / 4096), activity: None };
    let device = ReplicatedDevice::new(file_device(dir, "a.img"), tracking, 4096);
    // No automatic flush during a test: what is stable on the peer is decided by the test.
    let options = LinkOptions { auto_flush_interval: auto_flush, ..LinkOptions::new(protocol, true) };
    device.connect_peer(est.data.split().1, est.meta, options, None);
    (device, secondary)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_c_writes_reach_both_disks_and_overlaps_keep_their_order() {
    let dir = tempfile::tempdir().unwrap();
    let (device, _secondary) = pair(&dir, Protocol::C).await;
    let mut queue = device.clone().open_queue().unwrap();
    let mut pool = BufPool::new();
    // Many writes, some overlapping, all in flight together; the last one to a byte wins.
    let mut ops = Vec::new();
    for i in 0..64u64 {
        ops.push(write(&mut pool, (i * 37 * 4096) % (SIZE - 65536), i as u8 + 1, 65536));
    }
    ops.push(write(&mut pool, 0, 0xee, 4096));
    ops.push(IoOp::WriteZeroes { offset: 8192, len: 100, may_punch: false, fast_only: false, fua: false });
    ops.push(IoOp::Flush);
    for c in run(&mut queue, ops).await {
        assert!(c.result.is_ok(), "{:?}", c.result);
    }
    // The flush was acknowledged by the peer after every earlier write was on its disk.
    let a = std::fs::read(dir.path().join("a.img")).unwrap();
    let b = std::fs::read(dir.path().join("b.img")).unwrap();
    assert!(a == b, "the replicas differ");
    assert!(a[..4096].iter().all(|&x| x == 0xee), "the later overlapping write wins");
    assert!(a[4096..8192].iter().all(|&x| x == 1) && a[8192..8292].iter().all(|&x| x == 0));
    assert_eq!(device.out_of_sync_blocks(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_continue_without_the_peer_and_are_marked_out_of_sync() {
    let dir = tempfile::tempdir().unwrap();
    let (device, secondary) = pair(&dir, Protocol::C).await;
    let mut queue = device.clone().open_queue().unwrap();
    let mut pool = BufPool::new();
    let done = run(&mut queue, vec![write(&mut pool, 0, 1, 4096), IoOp::Flush]).await;
    assert!(done.iter().all(|c| c.result.is_ok()));

    // The peer goes away: writes still complete, and their blocks are remembered.
    device.peer().unwrap().disconnect();
    secondary.abort();
    let done =
        run(&mut queue, vec![write(&mut pool, 1 << 20, 2, 8192), write(&mut pool, 4 << 20, 3, 4096)]).await;
    assert!(done.iter().all(|c| c.result.is_ok()));
    assert_eq!(device.out_of_sync_blocks(), 3, "two blocks and one block");
    assert!(device.peer().is_none());
}

/// With on-disk metadata, every block written while the peer is away is found out of sync
/// after a crash: evicted extents through the bitmap pages written at eviction, hot ones through
/// the activity log folded in at attach.
#[tokio::test(flavor = "current_thread")]
async fn writes_without_peer_survive_a_crash_in_the_metadata() {
    use rdbd::metadata::store::{attach, create, CreateOptions, MetaLocation};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.img");
    std::fs::File::create(&path).unwrap().set_len(128 << 20).unwrap();
    let opts = CreateOptions { bitmap_block: 4096, al_extents: 7, node_name: "a".into() };
    let layout = create(&path, &MetaLocation::Internal, &opts, false).unwrap();
    let mut attached = attach(&path, &MetaLocation::Internal, "a").unwrap();
    attached.meta.update(|sb| sb.set(rdbd::metadata::superblock::flags::AL_CLEAN, false)).unwrap();

    let open = OpenOptions { size: Some(layout.data_size), prefix: true, ..Default::default() };
    let local: Arc<dyn BlockDevice> = Arc::new(FileDevice::open_file(&path, &open).unwrap());
    let tracking =
        Tracking { bitmap: attached.bitmap, activity: Some((attached.activity_log, attached.meta)) };
    let device = ReplicatedDevice::new(local, tracking, 4096);
    let mut queue = device.clone().open_queue().unwrap();
    let mut pool = BufPool::new();
    // Twelve extents through a seven-slot log (4 MiB apart), one block each.
    let offsets: Vec<u64> = (0..12u64).map(|e| e * (4 << 20) + 12288).collect();
    for &off in &offsets {
        let done = run(&mut queue, vec![write(&mut pool, off, 9, 4096)]).await;
        assert!(done[0].result.is_ok());
    }
    assert_eq!(device.out_of_sync_blocks(), 12);
    drop(queue);
    drop(device); // a crash: no clean shutdown, the last bitmap pages never written

    let again = attach(&path, &MetaLocation::Internal, "a").unwrap();
    assert!(again.report.unclean);
    for off in offsets {
        assert!(again.bitmap.is_dirty(off / 4096), "block at {off} was written without the peer");
    }
}

/// A write the peer acknowledged is not safe until a flush covers it (the peer's cache could lose
/// it): losing the link before that marks it out of sync; after a flush nothing is marked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_but_unflushed_writes_are_marked_when_the_link_dies() {
    for flush_first in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (device, secondary) = pair(&dir, Protocol::C).await;
        let mut queue = device.clone().open_queue().unwrap();
        let mut pool = BufPool::new();
        let mut ops = vec![write(&mut pool, 0, 1, 8192), write(&mut pool, 1 << 20, 2, 4096)];
        if flush_first {
            ops.push(IoOp::Flush);
        }
        assert!(run(&mut queue, ops).await.iter().all(|c| c.result.is_ok()));
        device.peer().unwrap().disconnect();
        secondary.abort();
        let expected = if flush_first { 0 } else { 3 };
        assert_eq!(device.out_of_sync_blocks(), expected, "flush first: {flush_first}");
    }
}

/// Without any FLUSH from the client, the link flushes the peer on its own, so what a link loss
/// can cost stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_flushes_the_peer_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let (device, secondary) = pair_with(&dir, Protocol::C, Duration::from_millis(50)).await;
    let mut queue = device.clone().open_queue().unwrap();
    let mut pool = BufPool::new();
    assert!(run(&mut queue, vec![write(&mut pool, 0, 1, 8192)]).await.iter().all(|c| c.result.is_ok()));
    let link = device.peer().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while link.unstable_writes() > 0 {
        assert!(std::time::Instant::now() < deadline, "no automatic flush within 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    link.disconnect();
    secondary.abort();
    assert_eq!(device.out_of_sync_blocks(), 0, "the flushed write is stable on the peer");
}

/// An idle link stays up while the peer answers pings, and a peer that stops answering is
/// declared dead within ping-interval + ping-timeout, its unstable writes marked out of sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_detected_by_ping_timeout() {
    use rdbd::replication::link::framed::Framed;
    let dir = tempfile::tempdir().unwrap();
    let fast = |protocol| LinkOptions {
        auto_flush_interval: Duration::from_secs(3600),
        ping_interval: Duration::from_millis(50),
        ping_timeout: Duration::from_millis(100),
        ..LinkOptions::new(protocol, true)
    };

    // A live peer (the real applier) keeps answering: still connected after many ping rounds.
    let (device, _secondary) = pair(&dir, Protocol::C).await;
    let link = device.peer().unwrap();
    link.disconnect();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let secondary_dev = file_device(&dir, "c.img");
    tokio::spawn(async move {
        let ident = identity("b", "a");
        let mut est =
            listen(&listener, &ident, params(Protocol::C, SIZE), blank_state(), &mut |_| {}).await.unwrap();
        let mut applier = Applier::new(secondary_dev, true).unwrap();
        let _ = applier.run(&mut est.data, &mut est.meta).await;
    });
    let est = dial(addr, &identity("a", "b"), params(Protocol::C, SIZE), blank_state()).await.unwrap();
    let link = device.connect_peer(est.data.split().1, est.meta, fast(Protocol::C), None);
    // A window, not a wait: "stays connected" holds over four ping rounds (the link does not
    // count the pings answered).
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(link.is_alive(), "a peer that answers pings stays connected");

    // A peer whose process hangs: its sockets stay open but nothing is read or answered.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<(Framed, Framed)>();
    tokio::spawn(async move {
        let ident = identity("b", "a");
        let est =
            listen(&listener, &ident, params(Protocol::C, SIZE), blank_state(), &mut |_| {}).await.unwrap();
        let _ = tx.send((est.data, est.meta)); // kept open, never read
    });
    let est = dial(addr, &identity("a", "b"), params(Protocol::C, SIZE), blank_state()).await.unwrap();
    let _hung = rx.await.unwrap();
    link.disconnect();
    let before = device.out_of_sync_blocks();
    let connected_at = std::time::Instant::now();
    let link = device.connect_peer(est.data.split().1, est.meta, fast(Protocol::A), None);
    let mut queue = device.clone().open_queue().unwrap();
    let mut pool = BufPool::new();
    // Protocol A completes without the peer's answer; the write stays unstable on the peer.
    assert!(run(&mut queue, vec![write(&mut pool, 2 << 20, 5, 4096)]).await.iter().all(|c| c.result.is_ok()));
    while link.is_alive() {
        assert!(connected_at.elapsed() < Duration::from_secs(5), "a silent peer was not detected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Silence must last ping-interval, then the ping go unanswered for ping-timeout.
    assert!(connected_at.elapsed() >= Duration::from_millis(150), "declared dead too early");
    assert_eq!(device.out_of_sync_blocks(), before + 1, "the unstable write is marked");
}

/// The bitmap exchange holds new writes and waits for those in flight: it learns at once when
/// the last one is done, and reports a hold that timed out (the session then connects again
/// rather than send a bitmap a late write could still change).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holding_writes_waits_for_the_last_one_in_flight_and_reports_a_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let tracking = Tracking { bitmap: DirtyBitmap::new(SIZE / 4096), activity: None };
    let device = ReplicatedDevice::new(file_device(&dir, "a.img"), tracking, 4096);
    assert!(device.hold_writes(Duration::from_millis(50)).await, "nothing in flight: drained at once");
    device.release_writes();

    // A range held as a write in flight would be.
    assert!(device.claim_range((0, 4096)));
    assert!(!device.hold_writes(Duration::from_millis(50)).await, "still in flight: timed out");
    assert!(!device.claim_range((8192, 12288)), "held: no new write starts");
    let releaser = {
        let device = device.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            device.release_range((0, 4096));
        })
    };
    let started = std::time::Instant::now();
    assert!(device.hold_writes(Duration::from_secs(30)).await);
    assert!(started.elapsed() < Duration::from_secs(10), "woken by the release, not the limit");
    releaser.await.unwrap();
    device.release_writes();
    assert!(device.claim_range((8192, 12288)), "released: writes start again");
}

/// Cut off from the peer with the quorum gate closed, a read is held as a write is (the peer may
/// have been promoted and written since, so this disk may be stale); it is answered once the
/// gate opens, and failed when the gate fails what it holds (fail-io).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_peer_reads_wait_for_the_quorum_gate_as_writes_do() {
    let dir = tempfile::tempdir().unwrap();
    let tracking = Tracking { bitmap: DirtyBitmap::new(SIZE / 4096), activity: None };
    let device = ReplicatedDevice::new(file_device(&dir, "a.img"), tracking, 4096);
    let mut queue = device.clone().open_queue().unwrap();
    let mut pool = BufPool::new();
    let done = run(&mut queue, vec![write(&mut pool, 0, 7, 4096)]).await;
    assert!(done[0].result.is_ok(), "no HA: the gate is open");

    device.alone_gate().deny(false);
    queue.submit(1, IoOp::Read { offset: 0, buf: pool.take(4096) });
    let mut done = Vec::new();
    let answered = tokio::time::timeout(Duration::from_millis(300), async {
        while done.is_empty() {
            std::future::poll_fn(|cx| queue.poll_complete(cx, &mut done)).await;
        }
    })
    .await;
    assert!(answered.is_err(), "a read without the peer was answered through a closed gate: {done:?}");

    device.alone_gate().allow_always();
    device.wake_parked();
    tokio::time::timeout(Duration::from_secs(30), async {
        while done.is_empty() {
            std::future::poll_fn(|cx| queue.poll_complete(cx, &mut done)).await;
        }
    })
    .await
    .expect("the read is answered once the gate opens");
    assert!(done[0].result.is_ok(), "{:?}", done[0].result);
    assert!(done[0].buf.as_ref().unwrap().iter().all(|&b| b == 7));

    device.alone_gate().deny(true);
    let failed = run(&mut queue, vec![IoOp::Read { offset: 0, buf: pool.take(4096) }]).await;
    assert!(failed[0].result.is_err(), "fail-io: a read without the peer fails");
}
