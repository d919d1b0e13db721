//! The smallest end-to-end check: a real client sees the export.

mod common;
use common::*;
use std::process::Command;

#[test]
fn nbdinfo_sees_size() {
    if !have_tool("nbdinfo") {
        return;
    }
    let mut server = Server::start(64 << 20);
    let out = run_ok(Command::new("nbdinfo").args(["--size", &server.unix_uri]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), (64u64 << 20).to_string());
    assert!(server.stop().success());
}

/// The README's main command: two nodes, initial sync, writes through NBD, status, clean stop.
#[test]
fn the_two_node_demo_runs_and_ends_with_identical_replicas() {
    let run_dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rdbd"))
        .args(["demo", "--size", "64M", "--write", "16M"])
        .env("TMPDIR", run_dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("initial sync: "), "{text}");
    assert!(text.contains("16 MiB written and flushed"), "{text}");
    assert!(text.contains("replication:Established peer-disk:UpToDate"), "{text}");
    assert!(text.contains("The two replicas are byte-identical"), "{text}");
    // Cleaned up after itself.
    assert_eq!(std::fs::read_dir(run_dir.path()).unwrap().count(), 0);
}
