//! Resync through the CLI with two real daemons: `invalidate` and `invalidate-remote`, resyncs
//! interrupted by SIGKILL and link cuts, application I/O during a full resync. What is checked
//! is the outcome on disk (both backing files byte-identical, blocks corrupted behind rdbd's back
//! repaired) and the bytes each resync moved (`last_resync_bytes`).

mod common;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::assert_one_line_error;
use common::cluster::{str_at, Alpha, Beta, Cluster, Node, Options};

const SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// Overwrites `len` bytes of `node`'s backing file at `offset` with `byte`, behind rdbd's back.
fn corrupt(c: &Cluster, node: Node, offset: u64, len: usize, byte: u8) {
    let file = std::fs::File::options().write(true).open(&c.info(node).disk).unwrap();
    file.write_all_at(&vec![byte; len], offset).unwrap();
    file.sync_all().unwrap();
}

fn resyncs_completed(c: &Cluster, node: Node) -> u64 {
    c.status(node).field("resyncs_completed").as_u64()
}

/// Waits until `node` has completed more than `before` resyncs and both are in sync; returns the
/// bytes the last resync moved.
fn wait_resync_after(c: &Cluster, node: Node, before: u64) -> u64 {
    c.wait_for(node, "reporting a new resync", SYNC_TIMEOUT, |s| {
        str_at(s, &["replication"]) == "Established" && s.field("resyncs_completed").as_u64() > before
    });
    c.wait_in_sync(SYNC_TIMEOUT);
    c.status(node).field("last_resync_bytes").as_u64()
}

/// `invalidate` on the Secondary pulls every block again (repairing blocks changed behind
/// rdbd's back); `invalidate-remote` on the Primary pushes every block; with
/// `--reset-bitmap=no` only what is marked (here: nothing) moves. Refusals are one line.
#[test]
fn invalidate_and_invalidate_remote_resync_from_the_right_side() {
    let mut c = Cluster::new(Options::default());
    c.start_primary_pair();
    let size = c.data_size();
    c.assert_same_data();

    // Refused where it would be wrong, with a reason.
    let err = c.verb_fails(Alpha, &["invalidate"]);
    assert_one_line_error(&err, &["Primary"]);
    let err = c.verb_fails(Beta, &["invalidate-remote"]);
    assert_one_line_error(&err, &["peer is Primary"]);
    let err = c.verb_fails(Beta, &["invalidate", "--reset-bitmap", "maybe"]);
    assert!(err.contains("yes or no"), "{err}");

    // Beta's copy is damaged in three places; invalidate on beta pulls everything back.
    for (i, offset) in [0, 100 << 20, size - 4096].into_iter().enumerate() {
        corrupt(&c, Beta, offset, 4096, 0xa0 + i as u8);
    }
    assert!(c.compare_data().is_err(), "the corruption did not take");
    let before = resyncs_completed(&c, Beta);
    c.verb_ok(Beta, &["invalidate"]);
    let moved = wait_resync_after(&c, Beta, before);
    assert_eq!(moved, size, "invalidate resyncs the whole device");
    c.assert_same_data();

    // Nothing is marked: invalidate-remote --reset-bitmap=no moves nothing, and the pair is
    // in sync again at once.
    let before = resyncs_completed(&c, Alpha);
    c.verb_ok(Alpha, &["invalidate-remote", "--reset-bitmap", "no"]);
    let moved = wait_resync_after(&c, Alpha, before);
    assert_eq!(moved, 0);

    // The whole device, from the Primary, repairing a damaged block on the way.
    corrupt(&c, Beta, 7 << 20, 8192, 0x5a);
    let before = resyncs_completed(&c, Alpha);
    c.verb_ok(Alpha, &["invalidate-remote"]);
    let moved = wait_resync_after(&c, Alpha, before);
    assert_eq!(moved, size);
    c.assert_same_data();
    let s = c.status(Beta);
    assert_eq!(str_at(&s, &["disk"]), "UpToDate", "{s:?}");
}

const MIB: u64 = 1 << 20;

/// The resync's done percentage on `node` (0 when none runs).
fn done_percent(s: &common::Json) -> f64 {
    match s.field("resync") {
        common::Json::Null => 0.0,
        r => r.field("done_percent").as_f64(),
    }
}

/// Waits until the resync `node` runs is at least `percent` done; its status then.
fn wait_done(c: &Cluster, node: Node, percent: f64) -> common::Json {
    c.wait_for(node, &format!("resyncing, {percent}% done"), SYNC_TIMEOUT, |s| {
        matches!(str_at(s, &["replication"]), "SyncSource" | "SyncTarget") && done_percent(s) >= percent
    })
}

/// Waits until `node` runs a resync whose total differs from `before` (a new one) or is in sync;
/// that resync's total (0 when in sync).
fn next_resync_total(c: &Cluster, node: Node, before: u64) -> u64 {
    let s = c.wait_for(node, "resyncing anew", SYNC_TIMEOUT, |s| {
        common::cluster::in_sync(s)
            || (matches!(str_at(s, &["replication"]), "SyncSource" | "SyncTarget")
                && s.field("resync").field("total_bytes").as_u64() != before)
    });
    match s.field("resync") {
        common::Json::Null => 0,
        r => r.field("total_bytes").as_u64(),
    }
}

/// Cuts the replication link under both nodes: every TCP connection to beta's replication port
/// is destroyed (`ss -K`, a reset to the peer), as a failing switch or cable would.
fn cut_link(c: &Cluster) {
    let port = format!(":{}", c.info(Beta).repl_port);
    let out = common::output_within(
        std::process::Command::new("ss").args(["-K", "dst", "127.0.0.1", "dport", "=", &port]),
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "ss -K failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Waits until a resync runs on `node` again; the bytes it set out to move.
fn resumed_total(c: &Cluster, node: Node) -> u64 {
    let s = c.wait_for(node, "resyncing again", SYNC_TIMEOUT, |s| {
        matches!(str_at(s, &["replication"]), "SyncSource" | "SyncTarget") || common::cluster::in_sync(s)
    });
    match s.field("resync") {
        common::Json::Null => 0,
        r => r.field("total_bytes").as_u64(),
    }
}

/// A full initial sync interrupted four times — SIGKILL of the target, a link cut (TCP reset
/// under both nodes), a disconnect/connect, SIGKILL of the source — resumes each time from what
/// is still out of sync, as recorded in the bitmaps, not from zero, and ends with identical
/// replicas.
#[test]
fn an_interrupted_resync_resumes_where_it_stopped() {
    // Slow enough to interrupt on purpose; progress reaches the metadata every second.
    let tables = "[disk]\nc-max-rate = \"64MiB\"\nc-fill-target = \"4MiB\"\n".to_string();
    let mut c = Cluster::new(Options { file_size: [512 * MIB; 2], tables, ..Options::default() });
    let size = c.data_size();
    c.start_both();
    for node in Node::BOTH {
        c.wait_for(node, "connected", SYNC_TIMEOUT, |s| str_at(s, &["connection"]) == "Connected");
    }
    c.verb_ok(Alpha, &["primary", "--force"]);
    // What a resumed resync may resend beyond what was still out of sync: the data in flight
    // and what reached the disk after the last recorded progress (1 s at 64 MiB/s), generously.
    let margin = 96 * MIB;

    // 1. The target dies, well past the first second of progress recorded in its metadata (so
    // that what it kept exceeds what the 1 s recording lag may lose).
    wait_done(&c, Beta, 40.0);
    c.kill(Beta);
    let remaining = c.status(Alpha).field("out_of_sync_bytes").as_u64();
    c.start(Beta);
    let total = resumed_total(&c, Beta);
    eprintln!("target killed: {remaining} bytes were out of sync, the resumed resync has {total}");
    assert!(
        total <= remaining + margin && total < size - 64 * MIB,
        "resync restarted from far back: {total} of {size}"
    );

    // 2. The link is cut: both channels reset under the nodes (`ss -K`), not a clean disconnect.
    // The nodes reconnect within milliseconds: the new resync is told by its new total.
    let before = wait_done(&c, Beta, 50.0).field("resync").field("total_bytes").as_u64();
    let remaining = c.status(Alpha).field("out_of_sync_bytes").as_u64();
    cut_link(&c);
    let total = next_resync_total(&c, Beta, before);
    eprintln!("link cut: {remaining} bytes were out of sync, the resumed resync has {total}");
    assert!(total <= remaining + margin, "resync restarted from far back: {total} of {size}");

    // 2b. And a clean disconnect and connect.
    let before = wait_done(&c, Beta, 55.0).field("resync").field("total_bytes").as_u64();
    c.verb_ok(Alpha, &["disconnect"]);
    let remaining = c.status(Alpha).field("out_of_sync_bytes").as_u64();
    c.verb_ok(Alpha, &["connect"]);
    let total = next_resync_total(&c, Beta, before);
    eprintln!("disconnect: {remaining} bytes were out of sync, the resumed resync has {total}");
    assert!(total <= remaining + margin, "resync restarted from far back: {total} of {size}");

    // 3. The source (the Primary) dies; it comes back as a Secondary and is still the source.
    wait_done(&c, Beta, 65.0);
    let remaining = c.status(Beta).field("out_of_sync_bytes").as_u64();
    c.kill(Alpha);
    c.start(Alpha);
    let total = resumed_total(&c, Beta);
    eprintln!("source killed: {remaining} bytes were out of sync, the resumed resync has {total}");
    assert!(total <= remaining + margin, "resync restarted from far back: {total} of {size}");

    c.wait_in_sync(SYNC_TIMEOUT);
    c.assert_same_data();
}

/// fio writes on the Primary through a full resync: it keeps making progress every second, and
/// so does the resync (at least at c-min-rate); afterwards the replicas are identical.
#[test]
fn the_application_keeps_making_progress_during_a_full_resync() {
    if !common::have_tool("fio") {
        return;
    }
    let tables = "[disk]\nc-min-rate = \"24MiB\"\n".to_string();
    let mut c = Cluster::new(Options { file_size: [512 * MIB; 2], tables, ..Options::default() });
    c.start_both();
    for node in Node::BOTH {
        c.wait_for(node, "connected", SYNC_TIMEOUT, |s| str_at(s, &["connection"]) == "Connected");
    }
    c.verb_ok(Alpha, &["primary", "--force"]);
    let work = tempfile::tempdir().unwrap();
    let mut fio = std::process::Command::new("fio");
    fio.current_dir(work.path())
        .args(["--thread", "--ioengine=nbd", "--output-format=json", "--name=app", "--rw=randwrite"])
        .args(["--bs=4k", "--iodepth=8", "--size=64M", "--time_based=1", "--runtime=8"])
        .args(["--write_iops_log=app", "--log_avg_msec=1000"])
        .arg(format!("--uri={}", c.nbd_uri(Alpha)));
    let mut load = common::cluster::Background::spawn(&mut fio, work.path(), "fio");
    c.wait_for(Alpha, "serving fio", SYNC_TIMEOUT, |s| s.field("nbd_clients").as_u64() >= 1);
    c.wait_data_written(Alpha, 0..64 * MIB, SYNC_TIMEOUT);
    // Progress shows when a flush has made blocks durable on the target; under a writing
    // application that flush may take a second or two. fio runs 8 s: the resync must move on
    // (or end) while it still writes.
    let early = done_percent(&c.status(Beta));
    let mut under_load = false;
    c.wait_for(Beta, &format!("resyncing on from {early}% under load"), SYNC_TIMEOUT, |s| {
        let moved = done_percent(s) > early || common::cluster::in_sync(s);
        under_load = moved && load.is_running();
        moved
    });
    assert!(under_load, "the resync stood still at {early}% while fio wrote");
    let out = load.wait(Duration::from_secs(60));
    assert!(out.status.success(), "fio failed: {}", String::from_utf8_lossy(&out.stderr));
    // One line per second: "msec, iops, direction, bs, offset".
    let log = std::fs::read_to_string(work.path().join("app_iops.1.log")).unwrap();
    let per_second: Vec<u64> = log.lines().filter_map(|l| l.split(',').nth(1)?.trim().parse().ok()).collect();
    eprintln!("application IOPS per second during the resync: {per_second:?}");
    assert!(per_second.len() >= 7, "{log}");
    assert!(per_second.iter().all(|&iops| iops >= 200), "the application stalled: {per_second:?}");
    c.wait_in_sync(SYNC_TIMEOUT);
    c.assert_same_data();
}

fn last_verify(c: &Cluster, node: Node) -> common::Json {
    c.status(node).field("last_verify").clone()
}

/// Online verify finds blocks changed behind rdbd's back in the Secondary's backing file, from
/// either node, reports their number and ranges, marks them on both nodes; a resync of the marked
/// blocks only (`invalidate-remote --reset-bitmap=no`) repairs them, and verify then reports 0.
/// Verify runs while fio writes report nothing (no false positives from writes in flight).
#[test]
fn verify_finds_corrupted_blocks_and_never_reports_writes_in_flight() {
    if !common::have_tool("fio") {
        return;
    }
    let marks = tempfile::tempdir().unwrap();
    let marker = marks.path().join("out-of-sync");
    let tables = format!(
        "[handlers]\nout-of-sync = \"echo $RDBD_EVENT $RDBD_NODE $RDBD_OUT_OF_SYNC_BLOCKS >> {}\"\n",
        marker.display()
    );
    let mut c = Cluster::new(Options { tables, ..Options::default() });
    c.start_primary_pair();
    let size = c.data_size();

    // While fio writes, verify compares a moving target: it must see no difference.
    let work = tempfile::tempdir().unwrap();
    let mut fio = std::process::Command::new("fio");
    fio.current_dir(work.path())
        .args(["--thread", "--ioengine=nbd", "--name=app", "--rw=randwrite", "--bs=4k", "--iodepth=16"])
        // Long enough for three verifies on a loaded machine; stopped once they are done.
        .args(["--size=128M", "--time_based=1", "--runtime=120"])
        .arg(format!("--uri={}", c.nbd_uri(Alpha)));
    let mut load = common::cluster::Background::spawn(&mut fio, work.path(), "fio");
    c.wait_data_written(Alpha, 0..128 * MIB, Duration::from_secs(20));
    for node in [Alpha, Beta, Alpha] {
        let started = std::time::Instant::now();
        let out = c.verb_ok(node, &["verify"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        eprintln!("verify on {} under load: {:?}: {text}", node.name(), started.elapsed());
        assert!(text.contains("no blocks out of sync"), "verify under load on {}: {text}", node.name());
        assert!(load.is_running(), "fio ended before the verifies did");
    }
    let out = load.stop(Some(rustix::process::Signal::INT), Duration::from_secs(30));
    // Interrupted, fio exits with 128, but still reports each job's error status.
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("err= 0"), "fio: {report}\n{}", String::from_utf8_lossy(&out.stderr));
    c.assert_same_data();

    // One block, a run of three, and the last block, changed on beta behind rdbd's back.
    corrupt(&c, Beta, 5 * MIB, 4096, 0x11);
    corrupt(&c, Beta, 9 * MIB + 8192, 3 * 4096, 0x22);
    corrupt(&c, Beta, size - 4096, 4096, 0x33);
    for node in [Beta, Alpha] {
        let out = c.verb_ok(node, &["verify"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(text.contains("5 blocks out of sync"), "verify on {}: {text}", node.name());
        for n in Node::BOTH {
            let v = last_verify(&c, n);
            assert!(v.field("completed").as_bool(), "{v:?}");
            assert_eq!(v.field("checked_bytes").as_u64(), size, "{} compared everything", n.name());
            assert_eq!(v.field("out_of_sync_blocks").as_u64(), 5, "{}: {v:?}", n.name());
            let ranges: Vec<(u64, u64)> = v
                .field("out_of_sync_ranges")
                .as_array()
                .iter()
                .map(|r| (r.as_array()[0].as_u64(), r.as_array()[1].as_u64()))
                .collect();
            assert_eq!(ranges, vec![(5 * MIB, 4096), (9 * MIB + 8192, 12288), (size - 4096, 4096)]);
            assert_eq!(c.status(n).field("out_of_sync_bytes").as_u64(), 5 * 4096, "marked on {}", n.name());
        }
    }

    // The out-of-sync handler ran on both nodes, for each of the two verifies.
    let ran = common::wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&marker).is_ok_and(|t| t.lines().count() >= 4)
    });
    let lines = std::fs::read_to_string(&marker).unwrap_or_default();
    assert!(ran, "out-of-sync handler lines: {lines:?}");
    for node in ["alpha", "beta"] {
        assert!(lines.contains(&format!("out-of-sync {node} 5")), "{lines:?}");
    }

    // Only the marked blocks move, and then the replicas agree.
    let before = resyncs_completed(&c, Alpha);
    c.verb_ok(Alpha, &["invalidate-remote", "--reset-bitmap=no"]);
    let moved = wait_resync_after(&c, Alpha, before);
    assert_eq!(moved, 5 * 4096, "only the marked blocks are resynced");
    c.assert_same_data();
    let out = c.verb_ok(Beta, &["verify"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("no blocks out of sync"));

    // As DRBD users know it: after a verify, a disconnect/connect resyncs the marked blocks
    // from the Primary.
    corrupt(&c, Beta, 11 * MIB, 4096, 0x66);
    let out = c.verb_ok(Alpha, &["verify"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 blocks out of sync"));
    let before = resyncs_completed(&c, Alpha);
    c.verb_ok(Beta, &["disconnect"]);
    c.verb_ok(Beta, &["connect"]);
    assert_eq!(wait_resync_after(&c, Alpha, before), 4096);
    c.assert_same_data();

    // Refused where it cannot run.
    c.verb_ok(Alpha, &["disconnect"]);
    let err = c.verb_fails(Alpha, &["verify"]);
    assert_one_line_error(&err, &["verify needs the peer connected"]);
}

/// With `csums-alg`, the target sends digests and the source only the blocks that differ: an
/// initial sync of two blank disks moves no data, and `invalidate` of a replica that differs in
/// five blocks moves exactly those five.
#[test]
fn checksum_resync_sends_only_the_blocks_that_differ() {
    let net = "csums-alg = \"sha256\"\n".to_string();
    let mut c = Cluster::new(Options { net, ..Options::default() });
    c.start_primary_pair();
    assert_eq!(c.status(Alpha).field("last_resync_bytes").as_u64(), 0, "blank disks are identical");
    c.assert_same_data();

    corrupt(&c, Beta, 3 * MIB, 4096, 0x44);
    corrupt(&c, Beta, 77 * MIB, 4 * 4096, 0x55);
    let before = resyncs_completed(&c, Alpha);
    c.verb_ok(Beta, &["invalidate"]);
    let moved = wait_resync_after(&c, Alpha, before);
    assert_eq!(moved, 5 * 4096, "only the differing blocks are sent");
    assert_eq!(c.status(Beta).field("last_resync_bytes").as_u64(), 5 * 4096);
    c.assert_same_data();
}
