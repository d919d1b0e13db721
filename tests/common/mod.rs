//! Shared harness for integration tests: starts a real `rdbd serve` process and runs real
//! clients against it. Tests that need a tool the machine lacks skip with a message, unless
//! RDBD_REQUIRE_TOOLS=1 (set by the project's test command), where a missing tool is a failure.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn rdbd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_rdbd")
}

/// Whether `tool` is on PATH. Missing: panics under RDBD_REQUIRE_TOOLS=1, else prints a skip note.
pub fn have_tool(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        if std::env::var("RDBD_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!(
                "{tool} is required (RDBD_REQUIRE_TOOLS=1) but not installed; run tools/install-test-deps.sh"
            );
        }
        eprintln!("SKIP: {tool} is not installed (tools/install-test-deps.sh installs it)");
    }
    found
}

/// Whether we run as root (needed for losetup/mount). Prints a skip note when not.
pub fn is_root() -> bool {
    let root = rustix::process::geteuid().is_root();
    if !root {
        eprintln!("SKIP: needs root");
    }
    root
}

/// Debian's python with the libnbd bindings (pyenv's python3 on PATH does not see them).
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

pub fn have_python_nbd() -> bool {
    let ok = Command::new(SYSTEM_PYTHON)
        .args(["-c", "import nbd"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if std::env::var("RDBD_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("python3-libnbd is required (RDBD_REQUIRE_TOOLS=1) but not installed");
        }
        eprintln!("SKIP: python3-libnbd is not installed");
    }
    ok
}

/// A running `rdbd serve` on a file in a temporary directory, listening on a unix socket and on
/// an ephemeral TCP port. Stopped with SIGTERM when dropped.
pub struct Server {
    child: Child,
    pub dir: tempfile::TempDir,
    pub file: PathBuf,
    pub socket: PathBuf,
    /// nbd+unix:///?socket=...
    pub unix_uri: String,
    /// nbd://127.0.0.1:PORT/
    pub tcp_uri: String,
    pub stderr_log: PathBuf,
}

impl Server {
    /// Serves a new sparse file of `size` bytes with the default options.
    pub fn start(size: u64) -> Server {
        Self::start_with(size, &[])
    }

    /// Serves a new sparse file of `size` bytes, with extra `rdbd serve` arguments.
    pub fn start_with(size: u64, extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("disk.img");
        std::fs::File::create(&file).unwrap().set_len(size).unwrap();
        Self::serve(dir, file, extra)
    }

    /// Serves an existing `file` (kept in `dir`), with extra arguments.
    pub fn serve(dir: tempfile::TempDir, file: PathBuf, extra: &[&str]) -> Server {
        let socket = dir.path().join("nbd.sock");
        let stderr_log = dir.path().join("rdbd.log");
        let mut cmd = Command::new(rdbd_bin());
        cmd.arg("serve")
            .arg("--file")
            .arg(&file)
            .arg("--unix")
            .arg(&socket)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .env("RDBD_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_log).unwrap());
        let mut child = cmd.spawn().expect("spawn rdbd");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let (mut tcp_uri, mut unix_uri) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(20);
        while tcp_uri.is_none() || unix_uri.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).unwrap_or_else(|_| {
                let log = std::fs::read_to_string(&stderr_log).unwrap_or_default();
                panic!("rdbd did not start listening; stderr:\n{log}")
            });
            if let Some(uri) = line.strip_prefix("rdbd: listening on ") {
                if uri.starts_with("nbd://") {
                    tcp_uri = Some(uri.to_string());
                } else {
                    unix_uri = Some(uri.to_string());
                }
            }
        }
        Server {
            child,
            dir,
            file,
            socket,
            unix_uri: unix_uri.unwrap(),
            tcp_uri: tcp_uri.unwrap(),
            stderr_log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the server process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// The server's log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for a clean exit; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(self.child.id() as i32).unwrap(),
            rustix::process::Signal::TERM,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("rdbd did not exit within 30 s of SIGTERM; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a command and returns its output; panics with stdout/stderr when it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A file of `len` pseudo-random bytes (deterministic for a seed).
pub fn random_file(path: &Path, len: usize, seed: u64) {
    let mut state = seed | 1;
    let mut data = vec![0u8; len];
    for chunk in data.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let bytes = state.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    std::fs::write(path, data).unwrap();
}
