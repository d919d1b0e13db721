//! Runs the libnbd scripts in tests/nbdsh/ (Debian's python3-libnbd, under /usr/bin/python3)
//! against a fresh `rdbd serve`, over the unix socket and over TCP. Each script gets the URI and
//! the export size as arguments, exits non-zero with a "FAIL: ..." line on any unexpected result
//! and prints "ok" when it ran to the end. The scripts use libnbd's strict mode off and opt mode
//! to send what a normal client would not.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SIZE: u64 = 64 << 20;
/// Longest any one script may run.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

/// Every script in tests/nbdsh/ (helpers start with `_`).
const SCRIPTS: &[&str] = &["handshake_opt_mode", "meta_context", "pipelined_aio", "strict_mode_requests"];

fn script_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("nbdsh")
}

/// Runs `script` with `args`, killing it after SCRIPT_TIMEOUT; returns (success, output).
fn run_with_timeout(script: &Path, args: &[&str], scratch: &Path) -> (bool, String) {
    let out_path = scratch.join("script.out");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut child = Command::new(SYSTEM_PYTHON)
        .arg(script)
        .args(args)
        // Keep __pycache__ out of the source tree.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {SYSTEM_PYTHON} {}: {e}", script.display()));
    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut output = std::fs::read_to_string(&out_path).unwrap_or_default();
    // libnbd's own debug lines (before a script installs its callback) are noise here.
    output = output.lines().filter(|l| !l.starts_with("libnbd: debug")).collect::<Vec<_>>().join("\n");
    match status {
        Some(s) => (s.success(), format!("{s}\n{output}")),
        None => (false, format!("killed after {SCRIPT_TIMEOUT:?}\n{output}")),
    }
}

fn run_script(name: &str) {
    if !have_python_nbd() {
        return;
    }
    let script = script_dir().join(format!("{name}.py"));
    assert!(script.is_file(), "{} is missing", script.display());
    for tcp in [false, true] {
        let mut server = Server::start(SIZE);
        let uri = if tcp { server.tcp_uri.clone() } else { server.unix_uri.clone() };
        let (ok, output) = run_with_timeout(&script, &[&uri, &SIZE.to_string()], server.dir.path());
        let log = server.log();
        let tail: Vec<&str> = log.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
        assert!(
            ok && output.lines().last() == Some("ok"),
            "{name}.py against {uri} failed: {output}\n--- last lines of the server log:\n{}",
            tail.join("\n")
        );
        assert!(server.is_running(), "rdbd exited during {name}.py; log:\n{log}");
        assert!(server.stop().success(), "rdbd did not stop cleanly after {name}.py");
    }
}

#[test]
fn handshake_opt_mode() {
    run_script("handshake_opt_mode");
}

#[test]
fn meta_context() {
    run_script("meta_context");
}

#[test]
fn pipelined_aio() {
    run_script("pipelined_aio");
}

#[test]
fn strict_mode_requests() {
    run_script("strict_mode_requests");
}

/// A script added to tests/nbdsh/ without a test above would silently never run.
#[test]
fn every_script_has_a_test() {
    let mut found: Vec<String> = std::fs::read_dir(script_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".py") && !n.starts_with('_'))
        .map(|n| n.trim_end_matches(".py").to_string())
        .collect();
    found.sort();
    assert_eq!(found, SCRIPTS, "tests/nbdsh/*.py and the SCRIPTS list differ");
}
