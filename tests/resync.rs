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
