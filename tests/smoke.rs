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
