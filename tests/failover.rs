//! Failover: SIGKILL of the Primary under a writer that flushes after every round, promotion of
//! the Secondary, and a checker that every block holds at least the last flushed round
//! (`failover/rounds.py`, over libnbd); then the crashed node rejoins and its activity log
//! bounds what is resynced.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::{str_at, Alpha, Beta, Cluster, Options, MIB};
use common::*;

const ROUNDS_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/failover/rounds.py");
/// Blocks the writer cycles through (16 MiB: several activity-log extents).
const BLOCKS: u64 = 4096;

/// The writer's progress log: (last round whose FLUSH returned, last round begun).
fn rounds(log: &std::path::Path) -> (u64, u64) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let last = |kind: &str| {
        text.lines().filter_map(|l| l.strip_prefix(kind)).filter_map(|n| n.trim().parse().ok()).max()
    };
    (last("flushed ").unwrap_or(0), last("begun ").unwrap_or(0))
}

/// Whether a block of `disk` holds a write of round `round` (rounds.py's block header: the magic,
/// the block and the round, big-endian).
fn round_started(disk: &std::path::Path, round: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let mut data = vec![0u8; (BLOCKS * 4096) as usize];
    let read = std::fs::File::open(disk).and_then(|f| f.read_exact_at(&mut data, 0));
    read.is_ok() && data.chunks(4096).any(|b| b.starts_with(b"RDBDCHK1") && b[16..24] == round.to_be_bytes())
}

/// The system python running `rounds.py` with `args`.
fn rounds_py(args: &[&str]) -> Command {
    let mut cmd = Command::new(SYSTEM_PYTHON);
    cmd.arg(ROUNDS_PY).args(args);
    cmd
}

fn writer(uri: &str, log: &std::path::Path) -> Child {
    rounds_py(&["write", uri, &BLOCKS.to_string(), log.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the writer")
}

#[test]
fn a_killed_primary_loses_no_flushed_write_and_rejoins_with_a_bounded_resync() {
    if !have_python_nbd() {
        return;
    }
    let mut cluster = Cluster::new(Options { file_size: [512 * MIB; 2], ..Options::default() });
    cluster.start_primary_pair();

    let log = cluster.dir.path().join("rounds.log");
    let mut child = writer(&cluster.nbd_uri(Alpha), &log);
    let started = Instant::now();
    while rounds(&log).0 < 3 {
        assert!(started.elapsed() < Duration::from_secs(60), "the writer made no progress");
        assert!(child.try_wait().unwrap().is_none(), "the writer died before the kill");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Kill in the middle of a round: the next round's writes have begun landing on alpha's disk.
    let disk = cluster.info(Alpha).disk.clone();
    let mid_round = wait_until(Duration::from_secs(60), || round_started(&disk, rounds(&log).0 + 1));
    assert!(mid_round, "the writer began no round after round {}", rounds(&log).0);
    cluster.kill(Alpha);
    let _ = child.wait();
    let (flushed, begun) = rounds(&log);
    assert!(flushed >= 3);

    // The survivor sees its peer gone, is still UpToDate, and takes over without --force.
    cluster.wait_for(Beta, "disconnected", Duration::from_secs(30), |s| {
        str_at(s, &["connection"]) != "Connected"
    });
    cluster.verb_ok(Beta, &["primary"]);
    let check = run_ok_within(
        &mut rounds_py(&[
            "check",
            &cluster.nbd_uri(Beta),
            &BLOCKS.to_string(),
            &flushed.to_string(),
            &(begun + 1).to_string(),
        ]),
        Duration::from_secs(120),
    );
    eprintln!("checker: {}", String::from_utf8_lossy(&check.stdout).trim());

    // The crashed node comes back: Secondary, sync target, resync bounded by its activity log
    // (the writer's 16 MiB are 4 extents; beta wrote nothing as Primary), not the whole device.
    cluster.start(Alpha);
    cluster.wait_in_sync(Duration::from_secs(60));
    let a = cluster.status(Alpha);
    assert_eq!(str_at(&a, &["role"]), "Secondary", "{a:?}");
    let resynced = a.field("last_resync_bytes").as_u64();
    assert!(resynced > 0, "the crashed Primary's hot extents must be resynced: {a:?}");
    assert!(resynced <= 16 * MIB, "resync not bounded by the activity log: {resynced} bytes");
    assert!(cluster.log(Alpha).contains("activity log folded"), "{}", cluster.log(Alpha));

    // And the pair is identical again, through the new Primary.
    let flush = "h.flush()";
    run_ok_within(nbdsh().args(["-u", &cluster.nbd_uri(Beta), "-c", flush]), Duration::from_secs(30));

    cluster.assert_same_data();
}

/// Writes one 4 KiB block at the start of each 4 MiB extent of `extents`, then flushes.
fn touch_extents(uri: &str, extents: std::ops::Range<u64>) {
    let code = format!(
        "for e in range({}, {}):\n    h.pwrite(b'x' * 4096, e * 4 * 1048576)\nh.flush()",
        extents.start, extents.end
    );
    run_ok_within(nbdsh().args(["-u", uri, "-c", &code]), Duration::from_secs(60));
}

#[test]
fn idle_extents_leave_the_activity_log_so_a_crash_resyncs_only_recent_writes() {
    if !have_python_nbd() {
        return;
    }
    let mut cluster = Cluster::new(Options { file_size: [512 * MIB; 2], ..Options::default() });
    cluster.start_primary_pair();
    // 32 extents written, then idle: the peer holds them stably, so they leave the log.
    touch_extents(&cluster.nbd_uri(Alpha), 0..32);
    assert!(cluster.status(Alpha).field("activity_log_extents").as_u64() >= 32);
    cluster.wait_for(Alpha, "the idle extents retired", Duration::from_secs(40), |s| {
        s.field("activity_log_extents").as_u64() == 0
    });
    // One more extent written just before the crash is all the log holds.
    touch_extents(&cluster.nbd_uri(Alpha), 50..51);
    assert_eq!(cluster.status(Alpha).field("activity_log_extents").as_u64(), 1);
    cluster.kill(Alpha);
    cluster.wait_for(Beta, "disconnected", Duration::from_secs(30), |s| {
        str_at(s, &["connection"]) != "Connected"
    });
    cluster.verb_ok(Beta, &["primary"]);
    cluster.start(Alpha);
    cluster.wait_in_sync(Duration::from_secs(60));
    let resynced = cluster.status(Alpha).field("last_resync_bytes").as_u64();
    // That one extent, not the 33 written since the pair was made.
    assert_eq!(resynced, 4 * MIB, "{}", cluster.log(Alpha));
    cluster.assert_same_data();
}

#[test]
fn a_primary_that_crashed_alone_is_the_source_when_the_peer_was_not_promoted() {
    if !have_tool("fio") {
        return;
    }
    let mut cluster = Cluster::new(Options::default());
    cluster.start_primary_pair();
    // The Secondary goes away cleanly, the Primary writes alone and crashes.
    cluster.down(Beta);
    let fio = Command::new("fio")
        .args([
            "--name=alone",
            "--ioengine=nbd",
            &format!("--uri={}", cluster.nbd_uri(Alpha)),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=32M",
            "--io_size=8M",
        ])
        .output()
        .unwrap();
    assert!(fio.status.success(), "{}", String::from_utf8_lossy(&fio.stderr));
    cluster.kill(Alpha);
    // Both come back as Secondary; the crashed Primary holds the newer data and must be the
    // source (rule: bitmap generation of alpha = current of beta), whatever the roles now.
    cluster.start_both();
    cluster.wait_in_sync(Duration::from_secs(60));
    let b = cluster.status(Beta);
    let resynced = b.field("last_resync_bytes").as_u64();
    // The 8 MiB written alone (random 4 KiB blocks in 32 MiB), within the extents the activity
    // log holds: at most the 32 MiB region.
    assert!((4 * MIB..=32 * MIB).contains(&resynced), "{b:?}");
    cluster.assert_same_data();
}
