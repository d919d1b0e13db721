//! Two rdbd daemons on loopback, driven through the CLI the way an operator would, with real NBD
//! clients (fio, python libnbd) writing to the Primary. What is checked is the outcome on disk
//! (both backing files byte-identical over the data area, dirty-only resync) and what the nodes
//! report (`status --json`, one-line errors).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::blocks::{
    assert_blocks, flush, wait_no_clients, write_blocks, zero_blocks, HOLD_CONNECTION, TOOL_TIMEOUT,
};
use common::cluster::{assert_ok, str_at, Alpha, Background, Beta, Cluster, Node, Options, MIB, RES};
use common::{assert_one_line_error, have_python_nbd, have_tool, output_within, python_nbd, Json};
use rdbd_protocol::repl::{Channel, Hello, Message, RefuseCode};
use rustix::process::Signal;

const SYNC_TIMEOUT: Duration = Duration::from_secs(60);
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(30);

fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Per-job (name, error, bytes written) from fio's JSON report.
fn fio_jobs(out: &Output) -> Vec<(String, u64, u64)> {
    let json = Json::parse_tool_output(&out.stdout);
    json.field("jobs")
        .as_array()
        .iter()
        .map(|j| {
            (
                j.field("jobname").as_str().to_string(),
                j.field("error").as_u64(),
                j.field("write").field("io_bytes").as_u64(),
            )
        })
        .collect()
}

fn fio(uri: &str, workdir: &Path) -> Command {
    let mut cmd = Command::new("fio");
    cmd.current_dir(workdir)
        .arg("--output-format=json")
        // Jobs as threads of one process: a kill on the way out leaves no job behind.
        .arg("--thread")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .arg("--verify_state_save=0");
    cmd
}

// ---------------------------------------------------------------------------------------------
// Replication under load
// ---------------------------------------------------------------------------------------------

/// A fresh pair syncs, then random 4 KiB writes at depth 32 plus 1 MiB sequential writes, each
/// verified by fio through the Primary, end on the Secondary's disk byte for byte.
#[test]
fn fresh_pair_fio_random_and_sequential_writes_reach_both_disks() {
    if !have_tool("fio") {
        return;
    }
    let mut c = Cluster::new(Options::default());
    c.start_primary_pair();
    let s = c.status(Beta);
    assert_eq!(str_at(&s, &["role"]), "Secondary");
    assert_eq!(str_at(&s, &["peer", "role"]), "Primary");
    assert!(
        matches!(s.field("last_resync_bytes"), Json::Num(_)),
        "the initial sync did not run (or was not reported): {s:?}"
    );

    let work = tempfile::tempdir().unwrap();
    let mut cmd = fio(&c.nbd_uri(Alpha), work.path());
    cmd.args(["--end_fsync=1", "--verify=crc32c", "--do_verify=1", "--runtime=150"])
        .args(["--name=rand", "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=32M", "--offset=0"])
        .args(["--name=seq", "--rw=write", "--bs=1M", "--iodepth=8", "--size=32M", "--offset=64M"]);
    let started = Instant::now();
    let out = output_within(&mut cmd, TOOL_TIMEOUT);
    assert_ok(&out, "fio", &c);
    let jobs = fio_jobs(&out);
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    for (name, error, written) in &jobs {
        assert_eq!(*error, 0, "fio job {name} failed:\n{}", stderr_of(&out));
        assert_eq!(*written, 32 * MIB, "fio job {name} wrote {written} bytes");
    }
    eprintln!("fio: {:?}", started.elapsed());

    c.assert_same_data();
    // Every block fio wrote carries its verify header: the comparison above is not of zeros.
    assert_eq!(zero_blocks(&c, Beta, 0..32 * MIB), 0, "random writes missing on beta");
    assert_eq!(zero_blocks(&c, Beta, 64 * MIB..96 * MIB), 0, "sequential writes missing on beta");
    let s = c.status(Alpha);
    assert_eq!(s.field("out_of_sync_bytes").as_u64(), 0, "{s:?}");

    // Negative control: one byte changed behind rdbd's back is found, at its offset.
    let offset = 5 * MIB + 4097;
    let mut byte = c.read_disk(Beta, offset, 1);
    byte[0] ^= 0xff;
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::File::options().write(true).open(&c.info(Beta).disk).unwrap(),
        &byte,
        offset,
    )
    .unwrap();
    let err = c.compare_data().expect_err("the comparison missed a changed byte");
    assert!(err.contains(&format!("first at byte {offset} ")), "{err}");
}

/// SPEC §6: at the end of a resync "the target adopts the source's generations: current and
/// history from the source, bitmap 0", so both nodes hold the same lineage afterwards (the
/// current identifiers differ only in the Primary bit). Checked after the initial full sync and
/// after a bitmap-based resync.
#[test]
fn after_a_resync_both_nodes_hold_the_same_generations() {
    if !have_python_nbd() {
        return;
    }
    let same_lineage = |c: &Cluster| {
        let gens = Node::BOTH.map(|n| {
            let s = c.status(n);
            let g = s.field("generations");
            let current = u64::from_str_radix(g.field("current").as_str(), 16).unwrap() & !1;
            let history: Vec<String> =
                g.field("history").as_array().iter().map(|h| h.as_str().to_string()).collect();
            (current, g.field("bitmap").as_str().to_string(), history)
        });
        assert_eq!(gens[0], gens[1], "alpha's and beta's generations differ after a resync\n{}", c.diag());
    };
    let mut c = Cluster::new(Options::default());
    c.start_primary_pair();
    same_lineage(&c);
    c.kill(Beta);
    write_blocks(&c, Alpha, 0, 256, 64);
    c.start(Beta);
    c.wait_in_sync(SYNC_TIMEOUT);
    c.wait_for(Beta, "reporting its resync", SYNC_TIMEOUT, |s| {
        matches!(s.field("last_resync_bytes"), Json::Num(_))
    });
    same_lineage(&c);
}

/// SIGKILL of the Secondary while fio writes: the Primary keeps serving, records what changes,
/// and when the Secondary comes back only those blocks are resynced (not the whole device).
#[test]
fn secondary_killed_under_load_resyncs_only_what_changed() {
    if !have_tool("fio") || !have_python_nbd() {
        return;
    }
    // fio writes in [0, FIO_REGION); the known pattern goes to BLOCKS distinct blocks spread over
    // [PATTERN_BASE, PATTERN_BASE + SLOTS * 4 KiB). Nothing else is written.
    const FIO_REGION: u64 = 16 * MIB;
    const PATTERN_BASE: u64 = 128 * MIB;
    const SLOTS: u64 = 4096;
    const BLOCKS: u64 = 2000;
    let mut c = Cluster::new(Options::default());
    c.start_primary_pair();
    let size = c.data_size();
    assert!(PATTERN_BASE + SLOTS * 4096 <= size);
    // Everything written after the initial sync lies in fio's region (which holds the writes in
    // flight at the kill) and the pattern's region: the resync may not exceed them (generous:
    // whole regions, so 4 MiB activity-log extents fit too), a small part of a full sync.
    let bound = FIO_REGION + SLOTS * 4096;
    assert!(bound < size / 4);

    let work = tempfile::tempdir().unwrap();
    let mut cmd = fio(&c.nbd_uri(Alpha), work.path());
    cmd.args(["--name=load", "--rw=randwrite", "--bs=4k", "--iodepth=32", "--offset=0"])
        .arg(format!("--size={FIO_REGION}"))
        .args(["--time_based=1", "--runtime=120"]);
    let mut load = Background::spawn(&mut cmd, work.path(), "fio-load");
    c.wait_for(Alpha, "serving fio", Duration::from_secs(20), |s| s.field("nbd_clients").as_u64() >= 1);
    // Writes in flight on the link when the Secondary dies: fio's data has reached beta's disk
    // (zeroes there until then), and fio, at iodepth 32, keeps more coming.
    c.wait_data_written(Beta, 0..FIO_REGION, Duration::from_secs(20));
    assert!(load.is_running(), "fio ended early");
    c.kill(Beta);

    // The Primary notices and keeps serving: the known pattern goes in while beta is away.
    c.wait_for(Alpha, "disconnected", Duration::from_secs(20), |s| str_at(s, &["connection"]) != "Connected");
    write_blocks(&c, Alpha, PATTERN_BASE, SLOTS, BLOCKS);
    assert!(load.is_running(), "fio stopped while the Secondary was down");
    let s = c.status(Alpha);
    let dirty = s.field("out_of_sync_bytes").as_u64();
    assert!(
        (BLOCKS * 4096..=bound).contains(&dirty),
        "alpha's bitmap holds {dirty} bytes; expected between {} and {bound}: {s:?}",
        BLOCKS * 4096
    );

    // Back with fio still writing: a bitmap-based resync, bounded by what changed.
    c.start(Beta);
    c.wait_in_sync(SYNC_TIMEOUT);
    let s = c.wait_for(Beta, "reporting its resync", SYNC_TIMEOUT, |s| {
        matches!(s.field("last_resync_bytes"), Json::Num(_))
    });
    let resynced = s.field("last_resync_bytes").as_u64();
    eprintln!("out of sync while beta was down: {dirty} bytes; resynced: {resynced} bytes; bound {bound}");
    assert!(resynced > 0, "nothing was resynced: {s:?}");
    assert!(
        resynced <= bound,
        "resynced {resynced} bytes, more than the {bound} bytes that can have changed (device {size} bytes)"
    );

    let out = load.stop(Some(Signal::TERM), Duration::from_secs(30));
    for (name, error, written) in fio_jobs(&out) {
        assert_eq!(error, 0, "fio job {name} failed:\n{}", stderr_of(&out));
        assert!(written > 0, "fio job {name} wrote nothing");
    }
    wait_no_clients(&c, Alpha);
    flush(&c, Alpha);
    c.wait_in_sync(SYNC_TIMEOUT);
    c.assert_same_data();
    assert_blocks(&c, Beta, PATTERN_BASE, SLOTS, BLOCKS);
}

/// Several connections write random data to the same 64 KiB at once (sizes from 512 bytes to
/// the whole range, unaligned to 4 KiB): whichever write wins on the Primary must win on the
/// Secondary too.
#[test]
fn overlapping_concurrent_writes_from_several_connections_leave_identical_disks() {
    if !have_tool("fio") {
        return;
    }
    let mut c = Cluster::new(Options::default());
    c.start_primary_pair();
    let work = tempfile::tempdir().unwrap();
    let mut cmd = fio(&c.nbd_uri(Alpha), work.path());
    cmd.args(["--rw=randwrite", "--offset=0", "--size=64k", "--io_size=16M", "--iodepth=32"])
        .args(["--norandommap=1", "--refill_buffers=1", "--end_fsync=1", "--runtime=120"])
        .args(["--name=small", "--numjobs=3", "--bsrange=512-16k", "--blockalign=512"])
        .args(["--name=whole", "--numjobs=1", "--bs=64k"]);
    let out = output_within(&mut cmd, TOOL_TIMEOUT);
    assert_ok(&out, "fio", &c);
    let jobs = fio_jobs(&out);
    assert_eq!(jobs.len(), 4, "fio did not run four connections: {jobs:?}");
    for (name, error, written) in &jobs {
        assert_eq!(*error, 0, "fio job {name} failed:\n{}", stderr_of(&out));
        assert!(*written >= 15 * MIB, "fio job {name} wrote only {written} bytes");
    }
    flush(&c, Alpha);
    c.assert_same_data();
    assert_eq!(zero_blocks(&c, Beta, 0..64 * 1024), 0, "the overlapped range was not written");
}

// ---------------------------------------------------------------------------------------------
// Refusals: both nodes end StandAlone and say why
// ---------------------------------------------------------------------------------------------

fn assert_both_mention(errors: &[String; 2], needles: &[&str]) {
    for (node, error) in Node::BOTH.iter().zip(errors) {
        let lower = error.to_lowercase();
        assert!(
            needles.iter().any(|n| lower.contains(&n.to_lowercase())),
            "{}'s last_error does not mention any of {needles:?}: {error}",
            node.name()
        );
    }
}

/// Neither node may have taken anything from the other.
fn assert_never_connected(c: &Cluster) {
    for node in Node::BOTH {
        let s = c.status(node);
        assert_eq!(str_at(&s, &["replication"]), "Off", "{s:?}");
        assert!(matches!(s.field("last_resync_bytes"), Json::Null), "{s:?}");
    }
}

#[test]
fn wrong_secret_is_refused_and_reported_on_both_nodes() {
    for secrets in [["s3cret", "other"], ["s3cret", ""]] {
        // "" stands for no secret configured on beta.
        let secret = secrets.map(|s| (!s.is_empty()).then(|| s.to_string()));
        let mut c = Cluster::new(Options { secret, ..Options::default() });
        c.start_both();
        // The dialer gives up (StandAlone, as DRBD does after a failed authentication); the
        // listener keeps waiting for a peer that knows the secret, and says what it refused.
        let a =
            c.wait_for(Alpha, "StandAlone", REFUSAL_TIMEOUT, |s| str_at(s, &["connection"]) == "StandAlone");
        let b = c.wait_for(Beta, "a refusal reported", REFUSAL_TIMEOUT, |s| {
            !matches!(s.field("last_error"), Json::Null)
        });
        let errors = [a.field("last_error").as_str().to_string(), b.field("last_error").as_str().to_string()];
        assert_both_mention(&errors, &["secret", "authfailed"]);
        assert_never_connected(&c);
    }
}

#[test]
fn different_sizes_leave_both_nodes_standalone_naming_the_sizes() {
    let mut c = Cluster::new(Options { file_size: [256 * MIB, 320 * MIB], ..Options::default() });
    let sizes = [c.info(Alpha).data_size, c.info(Beta).data_size];
    assert_ne!(sizes[0], sizes[1]);
    c.start_both();
    let errors = c.wait_standalone(REFUSAL_TIMEOUT);
    for (node, error) in Node::BOTH.iter().zip(&errors) {
        for size in sizes {
            assert!(
                error.contains(&size.to_string()),
                "{}'s last_error does not name {size}: {error}",
                node.name()
            );
        }
    }
    assert_both_mention(&errors, &["size"]);
    assert_never_connected(&c);
}

/// Each node promoted with --force while the other was away, on freshly created metadata: no
/// common generation, so "unrelated data", and neither disk is touched.
#[test]
fn independently_promoted_nodes_are_unrelated() {
    if !have_python_nbd() {
        return;
    }
    let mut c = Cluster::new(Options::default());
    for (node, base) in [(Alpha, 0), (Beta, 8 * MIB)] {
        c.start(node);
        c.verb_ok(node, &["primary", "--force"]);
        write_blocks(&c, node, base, 256, 64);
        c.down(node);
    }
    c.start_both();
    let errors = c.wait_standalone(REFUSAL_TIMEOUT);
    assert_both_mention(&errors, &["unrelated"]);
    assert_never_connected(&c);
    assert_blocks(&c, Alpha, 0, 256, 64);
    assert_blocks(&c, Beta, 8 * MIB, 256, 64);
    assert_eq!(zero_blocks(&c, Alpha, 8 * MIB..9 * MIB), 256, "beta's data reached alpha");
    assert_eq!(zero_blocks(&c, Beta, 0..MIB), 256, "alpha's data reached beta");
}

/// A pair in sync is disconnected, each side becomes Primary and writes; set up for split brain.
fn diverge(c: &mut Cluster) {
    c.start_primary_pair();
    for node in [Alpha, Beta] {
        c.verb_ok(node, &["disconnect"]);
    }
    for node in Node::BOTH {
        c.wait_for(node, "StandAlone", Duration::from_secs(20), |s| {
            str_at(s, &["connection"]) == "StandAlone"
        });
    }
    // UpToDate and disconnected: no --force needed.
    c.verb_ok(Beta, &["primary"]);
    write_blocks(c, Alpha, 0, 256, 64);
    write_blocks(c, Beta, 4 * MIB, 256, 64);
}

/// Both sides wrote while disconnected and both are still Primary at `connect`: as DRBD does,
/// the nodes must say "split brain" (the data diverged), not only that two Primaries cannot
/// connect.
#[test]
fn split_brain_with_both_primary_is_reported_as_split_brain() {
    if !have_python_nbd() {
        return;
    }
    let mut c = Cluster::new(Options::default());
    diverge(&mut c);
    for node in [Beta, Alpha] {
        c.verb_ok(node, &["connect"]);
    }
    let errors = c.wait_standalone(REFUSAL_TIMEOUT);
    assert_both_mention(&errors, &["split brain"]);
}

/// The same divergence with beta demoted again before `connect` (the usual operator path):
/// split brain on both nodes, no resync in either direction.
#[test]
fn split_brain_after_both_sides_wrote_is_detected_on_both_nodes() {
    if !have_python_nbd() {
        return;
    }
    let mut c = Cluster::new(Options::default());
    diverge(&mut c);
    c.verb_ok(Beta, &["secondary"]);
    for node in [Beta, Alpha] {
        c.verb_ok(node, &["connect"]);
    }
    let errors = c.wait_standalone(REFUSAL_TIMEOUT);
    assert_both_mention(&errors, &["split brain"]);
    // Each side kept its own writes; nothing was synced over them.
    assert_blocks(&c, Alpha, 0, 256, 64);
    assert_blocks(&c, Beta, 4 * MIB, 256, 64);
    assert_eq!(zero_blocks(&c, Alpha, 4 * MIB..5 * MIB), 256, "beta's writes reached alpha");
}

/// DRBD's manual recovery: the victim (beta) becomes Secondary and connects with
/// --discard-my-data, the survivor connects; only the blocks changed on either side since the
/// split are resynced, and both end with the survivor's data.
#[test]
fn split_brain_manual_recovery_discards_the_victims_changes_only() {
    if !have_python_nbd() {
        return;
    }
    let mut c = Cluster::new(Options::default());
    diverge(&mut c);
    // A Primary cannot discard its data.
    let stderr = c.verb_fails(Beta, &["connect", "--discard-my-data"]);
    assert!(stderr.contains("Secondary first"), "{stderr}");
    c.verb_ok(Beta, &["secondary"]);
    c.verb_ok(Beta, &["connect", "--discard-my-data"]);
    c.verb_ok(Alpha, &["connect"]);
    c.wait_in_sync(Duration::from_secs(60));
    let b = c.status(Beta);
    assert_eq!(str_at(&b, &["role"]), "Secondary", "{b:?}");
    // 64 blocks written on each side; the split's own generation change adds nothing else.
    let resynced = b.field("last_resync_bytes").as_u64();
    assert!((2 * 64 * 4096..=4 * 64 * 4096).contains(&resynced), "resynced {resynced} bytes: {b:?}");
    assert_blocks(&c, Beta, 0, 256, 64);
    assert_eq!(zero_blocks(&c, Beta, 4 * MIB..5 * MIB), 256, "beta's own writes were not discarded");
    c.assert_same_data();
}

// ---------------------------------------------------------------------------------------------
// Roles and verbs
// ---------------------------------------------------------------------------------------------

#[test]
fn roles_promotion_demotion_and_verbs_without_a_daemon() {
    if !have_python_nbd() {
        return;
    }
    let mut c = Cluster::new(Options::default());
    c.start_primary_pair();

    // Only one Primary while connected.
    let stderr = c.verb_fails(Beta, &["primary"]);
    assert_one_line_error(&stderr, &["cannot promote: alpha is Primary"]);
    let stderr = c.verb_fails(Beta, &["primary", "--force"]);
    assert_one_line_error(&stderr, &["cannot promote: alpha is Primary"]);
    assert_eq!(str_at(&c.status(Beta), &["role"]), "Secondary");

    // Only the Primary serves NBD.
    let refused = TcpStream::connect(c.nbd_addr(Beta));
    assert!(
        matches!(&refused, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "beta's NBD address did not refuse: {refused:?}"
    );
    assert!(matches!(c.status(Beta).field("nbd"), Json::Null));

    // No demotion under a connected client; it works once the client has gone.
    let work = tempfile::tempdir().unwrap();
    let release = work.path().join("release");
    let mut cmd = python_nbd(HOLD_CONNECTION, &[&c.nbd_uri(Alpha), release.to_str().unwrap()]);
    let mut client = Background::spawn(&mut cmd, work.path(), "hold");
    c.wait_for(Alpha, "serving a client", Duration::from_secs(20), |s| s.field("nbd_clients").as_u64() == 1);
    let stderr = c.verb_fails(Alpha, &["secondary"]);
    assert_one_line_error(&stderr, &["in use"]);
    assert_eq!(str_at(&c.status(Alpha), &["role"]), "Primary");
    std::fs::write(&release, b"").unwrap();
    let out = client.wait(Duration::from_secs(30));
    assert_ok(&out, "the held NBD client", &c);
    wait_no_clients(&c, Alpha);
    c.verb_ok(Alpha, &["secondary"]);
    let s = c.status(Alpha);
    assert_eq!(str_at(&s, &["role"]), "Secondary", "{s:?}");
    assert!(matches!(s.field("nbd"), Json::Null), "{s:?}");
    assert!(TcpStream::connect(c.nbd_addr(Alpha)).is_err(), "a Secondary still serves NBD");
    c.wait_in_sync(SYNC_TIMEOUT);
    // With no Primary, beta may now take over without --force.
    c.verb_ok(Beta, &["primary"]);
    c.wait_for(Alpha, "seeing beta Primary", SYNC_TIMEOUT, |s| str_at(s, &["peer", "role"]) == "Primary");

    // `up` on a running node is a no-op.
    for node in Node::BOTH {
        let out = c.rdbd(node, &["up"]);
        if !stdout_of(&out).contains("already up") {
            // A second daemon was started behind our back: stop it before failing.
            let _ = c.rdbd(node, &["down"]);
        }
        assert!(out.status.success(), "second up failed: {}", stderr_of(&out));
        assert!(stdout_of(&out).contains("already up"), "second up: {}", stdout_of(&out));
    }
    c.wait_in_sync(SYNC_TIMEOUT);

    // A node that is not up: every verb says so in one line; `down` is a no-op.
    c.verb_ok(Alpha, &["down"]);
    assert!(c.wait_exit(Alpha, Duration::from_secs(20)).success());
    c.kill(Beta); // its control socket file stays behind
    for node in Node::BOTH {
        let verbs: [&[&str]; 7] = [
            &["status"],
            &["status", "--json"],
            &["primary"],
            &["secondary"],
            &["connect"],
            &["disconnect"],
            &["new-current-uuid"],
        ];
        for verb in verbs {
            let stderr = c.verb_fails(node, verb);
            assert_one_line_error(&stderr, &["rdbd up"]);
        }
        let out = c.verb_ok(node, &["down"]);
        assert!(stdout_of(&out).contains("not up"), "{}", stdout_of(&out));
    }
}

/// `new-current-uuid --clear-bitmap` on blank disks: both UpToDate at once, no resync at all,
/// and a plain `primary` works.
#[test]
fn clear_bitmap_skips_the_initial_sync() {
    let mut c = Cluster::new(Options::default());
    c.start_both();
    for node in Node::BOTH {
        c.wait_for(node, "connected, both Inconsistent", SYNC_TIMEOUT, |s| {
            str_at(s, &["connection"]) == "Connected"
                && str_at(s, &["disk"]) == "Inconsistent"
                && str_at(s, &["peer", "disk"]) == "Inconsistent"
        });
    }
    // Without it, an Inconsistent node cannot be promoted.
    let stderr = c.verb_fails(Alpha, &["primary"]);
    assert_one_line_error(&stderr, &["--force"]);

    c.verb_ok(Alpha, &["new-current-uuid", "--clear-bitmap"]);
    c.wait_in_sync(SYNC_TIMEOUT);
    for node in Node::BOTH {
        let s = c.status(node);
        assert!(matches!(s.field("last_resync_bytes"), Json::Null), "{} resynced: {s:?}", node.name());
        assert_eq!(s.field("out_of_sync_bytes").as_u64(), 0, "{s:?}");
    }
    let gens = Node::BOTH.map(|n| str_at(&c.status(n), &["generations", "current"]).to_string());
    assert_eq!(gens[0], gens[1], "the nodes do not share the new generation");

    c.verb_ok(Alpha, &["primary"]);
    c.wait_in_sync(SYNC_TIMEOUT);
    c.wait_for(Beta, "seeing alpha Primary", SYNC_TIMEOUT, |s| str_at(s, &["peer", "role"]) == "Primary");
    assert_eq!(str_at(&c.status(Alpha), &["role"]), "Primary");
    // Promotion renegotiates the connection and may run an empty bitmap resync (SPEC §3,
    // "Renegotiation"), but it moves no data.
    for node in Node::BOTH {
        let s = c.status(node);
        let moved = match s.field("last_resync_bytes") {
            Json::Null => 0,
            n => n.as_u64(),
        };
        assert_eq!(moved, 0, "{} resynced data after a promotion: {s:?}", node.name());
    }
    // Twice is refused: the disks are no longer blank.
    let stderr = c.verb_fails(Alpha, &["new-current-uuid", "--clear-bitmap"]);
    assert_one_line_error(&stderr, &["clear-bitmap"]);
}

// ---------------------------------------------------------------------------------------------
// The replication port: version negotiation, stray and abandoned handshakes
// ---------------------------------------------------------------------------------------------

/// Reads one frame from `stream`: its kind and payload (checked by `FrameHeader::decode`).
fn read_frame(stream: &mut TcpStream) -> std::io::Result<(u16, Vec<u8>)> {
    use rdbd_protocol::repl::FrameHeader;
    let mut head = [0u8; FrameHeader::LEN];
    stream.read_exact(&mut head)?;
    let header = FrameHeader::decode(&head).map_err(|e| std::io::Error::other(format!("bad header: {e}")))?;
    let mut payload = vec![0u8; header.length as usize];
    stream.read_exact(&mut payload)?;
    Ok((header.kind, payload))
}

/// Sends a Hello claiming to be alpha but speaking only version 9 to beta's replication port;
/// returns beta's Refuse (code, message). Beta's own Hello, sent first, is skipped.
fn incompatible_hello(c: &Cluster) -> (RefuseCode, String) {
    let mut stream = TcpStream::connect(c.repl_addr(Beta)).expect("beta listens for alpha");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut frame = Vec::new();
    let hello =
        Hello { protocol_min: 9, protocol_max: 9, channel: Channel::Data, node_name: "alpha", resource: RES };
    Message::Hello(hello).encode(&mut frame);
    stream.write_all(&frame).unwrap();
    for _ in 0..4 {
        let (k, payload) = read_frame(&mut stream).expect("beta closed without a Refuse");
        match Message::decode(k, &payload).expect("beta sent a malformed frame") {
            Message::Hello(h) => assert!(h.protocol_min <= h.protocol_max && h.protocol_max < 9, "{h:?}"),
            Message::Refuse { code, message } => return (code, message.to_string()),
            other => panic!("beta sent kind {:#x} to a peer it cannot talk to", other.kind()),
        }
    }
    panic!("no Refuse within four frames");
}

/// A Hello speaking only version 9 gets Refuse{IncompatibleVersion} naming the versions; the
/// daemon stays up, and (after `connect`, see the next test) pairs with its real peer.
#[test]
fn incompatible_protocol_version_is_refused() {
    let mut c = Cluster::new(Options::default());
    c.start(Beta);
    let (code, message) = incompatible_hello(&c);
    assert_eq!(code, RefuseCode::IncompatibleVersion, "{message}");
    assert!(message.contains('9'), "the refusal does not name the versions: {message}");
    assert!(c.is_running(Beta), "beta died\n{}", c.diag());
    c.start(Alpha);
    if str_at(&c.status(Beta), &["connection"]) == "StandAlone" {
        // Known: the listener goes StandAlone (see the ignored test below); `connect` recovers.
        c.verb_ok(Beta, &["connect"]);
    }
    for node in Node::BOTH {
        c.wait_for(node, "connected to its peer", SYNC_TIMEOUT, |s| {
            str_at(s, &["connection"]) == "Connected"
        });
    }
}

/// The Refuse above is sent before authentication, so it may come from anyone who can reach the
/// port: it must not stop the listener from pairing with its real, authenticated peer.
#[test]
fn a_stray_incompatible_hello_does_not_stop_the_listener() {
    let mut c = Cluster::new(Options::default());
    c.start(Beta);
    let (code, _) = incompatible_hello(&c);
    assert_eq!(code, RefuseCode::IncompatibleVersion);
    c.start(Alpha);
    for node in Node::BOTH {
        c.wait_for(node, "connected to its peer", Duration::from_secs(20), |s| {
            str_at(s, &["connection"]) == "Connected"
        });
    }
}

/// Sends `message` as one frame.
fn send_frame(stream: &mut TcpStream, message: &Message<'_>) {
    let mut frame = Vec::new();
    message.encode(&mut frame);
    stream.write_all(&frame).unwrap();
}

/// Reads one frame and hands the decoded message to `f`.
fn recv_frame<T>(stream: &mut TcpStream, f: impl FnOnce(Message<'_>) -> T) -> T {
    let (k, payload) = read_frame(stream).expect("beta closed the channel");
    f(Message::decode(k, &payload).expect("beta sent a malformed frame"))
}

/// What a dialer leaves behind when it abandons an attempt between its two channels (its
/// connection task is woken by a role change, or it crashes): a data channel that passed Hello
/// and authentication, and no meta channel. Beta then waits for the meta channel; the dialer's
/// next attempt opens a data channel first. That must not strand the pair: the old attempt is
/// stale, the new one is the real peer.
#[test]
fn an_abandoned_handshake_does_not_strand_the_pair() {
    use rdbd_protocol::repl::{auth_response, verify_response, NONCE_LEN, PROTOCOL_MIN, PROTOCOL_VERSION};
    let secret = b"s3cret";
    let mut c = Cluster::new(Options::default());
    c.start(Beta);
    {
        let mut stream = TcpStream::connect(c.repl_addr(Beta)).expect("beta listens for alpha");
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let hello = Hello {
            protocol_min: PROTOCOL_MIN,
            protocol_max: PROTOCOL_VERSION,
            channel: Channel::Data,
            node_name: "alpha",
            resource: RES,
        };
        send_frame(&mut stream, &Message::Hello(hello));
        recv_frame(&mut stream, |m| assert!(matches!(m, Message::Hello(_)), "{m:?}"));
        let nonce = [0x5a; NONCE_LEN];
        send_frame(&mut stream, &Message::AuthChallenge { nonce });
        let theirs = recv_frame(&mut stream, |m| match m {
            Message::AuthChallenge { nonce } => nonce,
            other => panic!("expected AuthChallenge, got {other:?}"),
        });
        send_frame(&mut stream, &Message::AuthResponse { mac: auth_response(secret, &theirs, "alpha") });
        let mac = recv_frame(&mut stream, |m| match m {
            Message::AuthResponse { mac } => mac,
            other => panic!("expected AuthResponse, got {other:?}"),
        });
        assert!(verify_response(secret, &nonce, "beta", &mac), "beta's answer does not verify");
        // Dropped here, as the abandoned attempt's socket is.
    }
    c.start(Alpha);
    for node in Node::BOTH {
        c.wait_for(node, "connected to its peer", Duration::from_secs(20), |s| {
            str_at(s, &["connection"]) == "Connected"
        });
    }
}
