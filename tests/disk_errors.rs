//! A failing disk under a real pair (`on-io-error`): nodes on [`ForgetfulDisk`]s whose writes
//! or reads fail on demand (nbdkit's error filter), driven through the `rdbd` binary.
//!
//! - The Secondary's disk fails while the client writes and flushes: it is detached (Diskless),
//!   the client's FLUSH still succeeds (the Primary's disk has the data, and the peer's lack is
//!   marked), the Secondary is never promoted, not even with --force, and `events` reports it.
//!   The Primary then loses power and comes back with every acknowledged write; the repaired
//!   disk is attached again and resynced, and verify finds nothing out of sync.
//! - The Primary's disk fails: it goes on serving through the peer (reads too), and after a
//!   switch of roles its disk is attached again and resynced.
//! - A read the Primary's disk fails is answered by the peer (detach; pass_on keeps the disk).
//! - `call-local-io-error` runs the `local-io-error` handler; `detach`/`attach` by the operator.
//!
//! Needs root and the forgetful disks' tools; one test at a time.
//! `cargo test --test disk_errors -- --test-threads=1`

mod common;

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use common::cluster::{is_end_of_exists, str_at, Alpha, Beta, Node, Options, MIB};
use common::powerloss::ForgetfulPair;
use common::*;

const DISK_SIZE: u64 = 256 * MIB;
const WAIT: Duration = Duration::from_secs(60);

fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A pair on forgetful disks with `tables` in its resource file, alpha Primary and in sync.
fn pair(tables: &str) -> Option<(ForgetfulPair, MutexGuard<'static, ()>)> {
    let serial = serial();
    if !have_python_nbd() || !have_tool("nbdsh") {
        return None;
    }
    let mut pair = ForgetfulPair::new(DISK_SIZE, Options { tables: tables.into(), ..Options::default() })?;
    pair.cluster.start_primary_pair();
    Some((pair, serial))
}

/// `len` bytes of `byte` at `offset` through `node`'s export (in requests of at most 8 MiB),
/// then a FLUSH (which must succeed).
fn write_flushed(pair: &ForgetfulPair, node: Node, offset: u64, len: u64, byte: char) {
    let step = len.min(8 * MIB);
    let code = format!(
        "for o in range({offset}, {}, {step}):\n    h.pwrite(b'{byte}' * {step}, o)\nh.flush()",
        offset + len
    );
    pair.cluster.nbdsh(node, &code);
}

/// Reads back through `node`'s export (in requests of at most 8 MiB) and asserts the bytes.
fn assert_reads(pair: &ForgetfulPair, node: Node, offset: u64, len: u64, byte: char) {
    let step = len.min(8 * MIB);
    let code = format!(
        "for o in range({offset}, {}, {step}):\n    assert h.pread({step}, o) == b'{byte}' * {step}, f'wrong data at {{o}}'",
        offset + len
    );
    pair.cluster.nbdsh(node, &code);
}

fn disk_of(s: &Json) -> &str {
    str_at(s, &["disk"])
}

fn disk_error(s: &Json) -> String {
    match s.get("disk_error") {
        Some(Json::Str(e)) => e.clone(),
        other => panic!("no disk_error in status: {other:?}"),
    }
}

/// After a repair: `attach` on `node`, the resync, and verify finding nothing; both replicas
/// identical.
fn attach_and_resync(pair: &mut ForgetfulPair, node: Node) {
    pair.disk(node).fail_writes(false);
    pair.disk(node).fail_reads(false);
    pair.cluster.verb_ok(node, &["attach"]);
    pair.cluster.wait_in_sync(WAIT);
    let (out_of_sync, printed) = pair.cluster.verify_blocks(node.peer());
    assert_eq!(out_of_sync, 0, "{printed}");
    pair.cluster.assert_same_data();
}

#[test]
fn a_secondary_whose_disk_fails_is_detached_never_promoted_and_attached_again() {
    let Some((mut pair, _serial)) = pair("") else { return };
    write_flushed(&pair, Alpha, 0, MIB, 'a');
    let events = pair.cluster.follow_events(Beta);
    pair.disk(Beta).fail_writes(true);
    // The client's writes and FLUSH succeed: the Primary's disk has them and the peer's failure
    // is marked, never answered as if both disks had them.
    write_flushed(&pair, Alpha, 8 * MIB, 2 * MIB, 'b');
    let b = pair.cluster.wait_for(Beta, "Diskless", WAIT, |s| disk_of(s) == "Diskless");
    assert!(disk_error(&b).contains("failed"), "{b:?}");
    let a = pair
        .cluster
        .wait_for(Alpha, "told of the peer's disk", WAIT, |s| str_at(s, &["peer", "disk"]) == "Diskless");
    assert_eq!(str_at(&a, &["disk"]), "UpToDate");
    assert!(a.field("out_of_sync_bytes").as_u64() >= 2 * MIB, "the failed writes are marked: {a:?}");

    // Reported as a change of the device, with the error.
    let mut events = events;
    let stream = events.stop(Some(rustix::process::Signal::TERM), Duration::from_secs(10));
    let lines: Vec<Json> = String::from_utf8_lossy(&stream.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(Json::parse)
        .collect();
    let past_exists = lines.iter().skip_while(|e| !is_end_of_exists(e)).skip(1);
    let detached = past_exists
        .filter(|e| str_at(e, &["object"]) == "device" && str_at(e, &["disk"]) == "Diskless")
        .find(|e| e.get("error").is_some());
    assert!(detached.is_some(), "no device change to Diskless with its error in:\n{lines:?}");

    // The Primary loses power: the Diskless node is not promoted, not even by force.
    pair.power_loss(Alpha);
    pair.cluster.wait_for(Beta, "disconnected", WAIT, |s| str_at(s, &["connection"]) != "Connected");
    for args in [&["primary"][..], &["primary", "--force"]] {
        let stderr = pair.cluster.verb_fails(Beta, args);
        assert_one_line_error(&stderr, &["cannot promote", "Diskless", "attach"]);
    }
    // The Primary comes back with every acknowledged write.
    pair.power_on(Alpha);
    pair.cluster.verb_ok(Alpha, &["primary"]);
    assert_reads(&pair, Alpha, 0, MIB, 'a');
    assert_reads(&pair, Alpha, 8 * MIB, 2 * MIB, 'b');
    attach_and_resync(&mut pair, Beta);
    assert_reads(&pair, Alpha, 8 * MIB, 2 * MIB, 'b');
}

#[test]
fn a_primary_whose_disk_fails_serves_through_its_peer() {
    let Some((mut pair, _serial)) = pair("") else { return };
    write_flushed(&pair, Alpha, 0, MIB, 'a');
    pair.disk(Alpha).fail_writes(true);
    // The local flush fails, the peer's succeeds: answered, and the disk is detached.
    write_flushed(&pair, Alpha, 4 * MIB, MIB, 'b');
    let a = pair.cluster.wait_for(Alpha, "Diskless", WAIT, |s| disk_of(s) == "Diskless");
    assert_eq!(str_at(&a, &["role"]), "Primary", "a Diskless Primary keeps serving: {a:?}");
    assert!(disk_error(&a).starts_with("local disk"), "{a:?}");
    let text = String::from_utf8_lossy(&pair.cluster.verb_ok(Alpha, &["status"]).stdout).into_owned();
    assert!(text.contains("disk:Diskless (local disk"), "{text}");
    // Reads and writes go through the peer.
    assert_reads(&pair, Alpha, 0, MIB, 'a');
    assert_reads(&pair, Alpha, 4 * MIB, MIB, 'b');
    write_flushed(&pair, Alpha, 12 * MIB, MIB, 'c');
    assert_reads(&pair, Alpha, 12 * MIB, MIB, 'c');
    // A Diskless Primary is not re-attached while it serves (it would be resynced as it does):
    // the roles change first.
    let stderr = pair.cluster.verb_fails(Alpha, &["attach"]);
    assert_one_line_error(&stderr, &["Primary"]);
    pair.cluster.verb_ok(Alpha, &["secondary"]);
    pair.cluster.verb_ok(Beta, &["primary"]);
    attach_and_resync(&mut pair, Alpha);
    for (offset, byte) in [(0, 'a'), (4 * MIB, 'b'), (12 * MIB, 'c')] {
        assert_reads(&pair, Beta, offset, MIB, byte);
    }
}

#[test]
fn a_read_the_primarys_disk_fails_is_answered_by_the_peer() {
    for (policy, detaches) in [("detach", true), ("pass_on", false)] {
        let Some((mut pair, _serial)) = pair(&format!("[disk]\non-io-error = \"{policy}\"\n")) else {
            return;
        };
        write_flushed(&pair, Alpha, 0, 2 * MIB, 'r');
        // Out of the page cache, so that the read reaches the failing disk.
        std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
        pair.disk(Alpha).fail_reads(true);
        assert_reads(&pair, Alpha, 0, 2 * MIB, 'r');
        pair.disk(Alpha).fail_reads(false);
        let a = pair.cluster.status(Alpha);
        assert_eq!(disk_of(&a) == "Diskless", detaches, "{policy}: {a:?}");
    }
}

#[test]
fn call_local_io_error_runs_its_handler() {
    let marker = tempfile::tempdir().unwrap();
    let file = marker.path().join("called");
    let tables = format!(
        "[disk]\non-io-error = \"call-local-io-error\"\n[handlers]\nlocal-io-error = \"echo \\\"$RDBD_EVENT $RDBD_NODE $RDBD_DISK_ERROR\\\" > {}\"\n",
        file.display()
    );
    let Some((mut pair, _serial)) = pair(&tables) else { return };
    pair.disk(Beta).fail_writes(true);
    write_flushed(&pair, Alpha, 0, MIB, 'h');
    pair.cluster.wait_for(Beta, "Diskless", WAIT, |s| disk_of(s) == "Diskless");
    assert!(wait_until(WAIT, || file.exists()), "the handler did not run\n{}", pair.cluster.diag());
    let called = std::fs::read_to_string(&file).unwrap();
    assert!(called.starts_with("local-io-error beta local disk"), "{called}");
}

#[test]
fn the_operator_detaches_and_attaches_a_disk() {
    let Some((mut pair, _serial)) = pair("") else { return };
    pair.cluster.verb_ok(Beta, &["detach"]);
    let b = pair.cluster.status(Beta);
    assert_eq!(disk_of(&b), "Diskless");
    assert_eq!(disk_error(&b), "detached by the operator");
    write_flushed(&pair, Alpha, 16 * MIB, MIB, 'd');
    // A Primary without a connected UpToDate peer has nothing to serve from once detached.
    let stderr = pair.cluster.verb_fails(Alpha, &["detach"]);
    assert_one_line_error(&stderr, &["cannot detach", "beta"]);
    attach_and_resync(&mut pair, Beta);
    let b = pair.cluster.status(Beta);
    assert!(b.field("last_resync_bytes").as_u64() >= MIB, "what changed while detached: {b:?}");
    // Detaching the Primary with its peer connected: it serves through the peer.
    pair.cluster.verb_ok(Alpha, &["detach"]);
    assert_reads(&pair, Alpha, 16 * MIB, MIB, 'd');
}

/// The sync target's disk fails in the middle of a resync: the resync ends (it does not hang
/// on the block that failed), the target is detached, and after the repair and `attach` the
/// resync finishes what was left.
#[test]
fn a_resync_whose_target_disk_fails_ends_and_finishes_after_attach() {
    // A capped rate keeps the resync running long enough to fail in its middle.
    let Some((mut pair, _serial)) = pair("[disk]\nc-max-rate = \"16MiB\"\n") else { return };
    pair.cluster.verb_ok(Beta, &["disconnect"]);
    write_flushed(&pair, Alpha, 0, 64 * MIB, 's');
    pair.cluster.verb_ok(Beta, &["connect"]);
    // In its middle: part of the resync is done on beta, part is left.
    pair.cluster.wait_for(Beta, "sync target with part of the resync done", WAIT, |s| {
        str_at(s, &["replication"]) == "SyncTarget"
            && matches!(s.field("resync"), Json::Obj(_))
            && s.field("resync").field("remaining_bytes").as_u64()
                < s.field("resync").field("total_bytes").as_u64()
    });
    pair.disk(Beta).fail_writes(true);
    let b = pair.cluster.wait_for(Beta, "Diskless", WAIT, |s| disk_of(s) == "Diskless");
    assert!(disk_error(&b).starts_with("local disk"), "{b:?}");
    let a = pair
        .cluster
        .wait_for(Alpha, "the resync ended", WAIT, |s| str_at(s, &["replication"]) != "SyncSource");
    assert!(a.field("out_of_sync_bytes").as_u64() > 0, "the rest stays marked: {a:?}");
    attach_and_resync(&mut pair, Beta);
    assert_reads(&pair, Alpha, 0, 64 * MIB, 's');
}

/// The Secondary's disk fails a read (here, the peer's online verify): the range is marked on the
/// Primary before the Secondary detaches, so that when the node comes back with the disk, whose
/// sectors there were lost (zeroed while it was off), the resync rewrites them.
#[test]
fn a_range_the_secondary_could_not_read_is_resynced_when_it_comes_back() {
    use std::os::unix::fs::FileExt;
    let Some((mut pair, _serial)) = pair("") else { return };
    write_flushed(&pair, Alpha, 32 * MIB, 4 * MIB, 'v');
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    pair.disk(Beta).fail_reads(true);
    let verify = pair.cluster.rdbd(Alpha, &["verify", "--start", &(32 * MIB).to_string()]);
    assert!(!verify.status.success(), "the verify cannot finish: beta cannot read");
    pair.cluster.wait_for(Beta, "Diskless", WAIT, |s| disk_of(s) == "Diskless");
    let a =
        pair.cluster.wait_for(Alpha, "the range marked", WAIT, |s| s.field("out_of_sync_bytes").as_u64() > 0);
    assert!(a.field("out_of_sync_bytes").as_u64() <= 4 * MIB, "only what beta could not read: {a:?}");
    // The node goes down, and the sectors are lost: zeroed on the medium while it is off.
    pair.power_loss(Beta);
    pair.disk(Beta).fail_reads(false);
    let image = std::fs::OpenOptions::new().write(true).open(pair.disk(Beta).image()).unwrap();
    image.write_all_at(&vec![0u8; MIB as usize], 32 * MIB).unwrap();
    drop(image);
    pair.power_on(Beta);
    pair.cluster.wait_in_sync(WAIT);
    let (out_of_sync, printed) = pair.cluster.verify_blocks(Alpha);
    assert_eq!(out_of_sync, 0, "{printed}");
    pair.cluster.assert_same_data();
}
