//! Shared harness for integration tests: starts a real `rdbd serve` process and runs real
//! clients against it. Tests that need a tool the machine lacks skip with a message, unless
//! RDBD_REQUIRE_TOOLS=1 (set by the project's test command), where a missing tool is a failure.
#![allow(dead_code)]

pub mod blocks;
pub mod cluster;
pub mod library;
pub mod netns;
pub mod powerloss;
pub mod relay;
pub mod scripted_peer;
pub mod vm;

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
        Self::launch(dir, "--file", file, extra)
    }

    /// Serves the block device `device` (e.g. a loop device), with extra arguments; `dir` holds
    /// the socket and the log.
    pub fn serve_device(dir: tempfile::TempDir, device: PathBuf, extra: &[&str]) -> Server {
        Self::launch(dir, "--device", device, extra)
    }

    fn launch(dir: tempfile::TempDir, backing_flag: &str, file: PathBuf, extra: &[&str]) -> Server {
        let socket = dir.path().join("nbd.sock");
        let stderr_log = dir.path().join("rdbd.log");
        let mut cmd = Command::new(rdbd_bin());
        cmd.arg("serve")
            .arg(backing_flag)
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

    /// The unix-socket URI naming export `name` (the printed `unix_uri` asks for "").
    pub fn unix_uri_for(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.socket.display())
    }

    /// Sends `signal` to the server without waiting.
    pub fn signal(&self, signal: rustix::process::Signal) {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(self.child.id() as i32).unwrap(),
            signal,
        );
    }

    /// Waits up to `timeout` for the server to exit on its own; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
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
    assert_success(cmd, out)
}

/// `out`, after asserting that `cmd` succeeded (showing what it printed if not).
fn assert_success(cmd: &Command, out: Output) -> Output {
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Asserts that `stderr` is one `rdbd: error:` line mentioning every needle.
pub fn assert_one_line_error(stderr: &str, needles: &[&str]) {
    let lines: Vec<&str> = stderr.trim_end().lines().collect();
    assert_eq!(lines.len(), 1, "expected a one-line error, got:\n{stderr}");
    assert!(lines[0].starts_with("rdbd: error: "), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "error does not mention {needle:?}: {stderr}");
    }
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

/// Runs a command with its output captured, killing it (and failing the test) if it does not
/// finish within `timeout`.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> Output {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out_pipe.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err_pipe.read_to_end(&mut buf);
        buf
    });
    let Some(status) = wait_exit_within(&mut child, timeout) else {
        let _ = child.kill();
        let _ = child.wait();
        let stdout = out_reader.join().unwrap_or_default();
        let stderr = err_reader.join().unwrap_or_default();
        panic!(
            "{cmd:?} did not finish within {timeout:?}:\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        );
    };
    Output { status, stdout: out_reader.join().unwrap(), stderr: err_reader.join().unwrap() }
}

/// Waits for `child` to exit, at most `timeout`; `None` if it is still running then.
pub fn wait_exit_within(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Like [`run_ok`], bounded by `timeout`.
pub fn run_ok_within(cmd: &mut Command, timeout: Duration) -> Output {
    let out = output_within(cmd, timeout);
    assert_success(cmd, out)
}

/// `nbdsh`, made to run under the system python that has the libnbd bindings (the script
/// execs whatever `python3` comes first on PATH).
pub fn nbdsh() -> Command {
    let path = std::env::var("PATH").unwrap_or_default();
    let mut cmd = Command::new("nbdsh");
    cmd.env("PATH", format!("/usr/bin:/bin:{path}"));
    cmd
}

/// The system python running `script` (which may `import nbd`) with `args` as `sys.argv[1..]`.
pub fn python_nbd(script: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(SYSTEM_PYTHON);
    cmd.arg("-c").arg(script).args(args);
    cmd
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `file` holds a byte other than zero in `range`: on a disk that started zeroed, whether
/// writes have landed there.
pub fn holds_data(file: &Path, range: std::ops::Range<u64>) -> bool {
    use std::os::unix::fs::FileExt;
    let Ok(f) = std::fs::File::open(file) else { return false };
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = range.start;
    while pos < range.end {
        let want = buf.len().min((range.end - pos) as usize);
        let got = f.read_at(&mut buf[..want], pos).unwrap_or(0);
        if got == 0 {
            return false;
        }
        if buf[..got].iter().any(|&b| b != 0) {
            return true;
        }
        pos += got as u64;
    }
    false
}

/// A parsed JSON value with accessors that panic with context, to keep assertions short
/// (numbers are kept as their text).
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// Parses a complete JSON document; panics with context on malformed input.
    pub fn parse(text: &str) -> Json {
        let value: serde_json::Value =
            serde_json::from_str(text).unwrap_or_else(|e| panic!("malformed JSON ({e}): {text}"));
        Json::from(value)
    }

    /// Parses the JSON object in a tool's stdout, skipping chatter before the first `{` line
    /// (fio prints "fio: connected to NBD server" first).
    pub fn parse_tool_output(stdout: &[u8]) -> Json {
        let text = String::from_utf8_lossy(stdout);
        let start = text
            .find("\n{")
            .map(|i| i + 1)
            .or_else(|| text.starts_with('{').then_some(0))
            .unwrap_or_else(|| panic!("no JSON object in output:\n{text}"));
        Json::parse(text[start..].trim_end())
    }

    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// `self[key]`, panicking with the document when the key is missing.
    pub fn field(&self, key: &str) -> &Json {
        self.get(key).unwrap_or_else(|| panic!("no field {key:?} in {self:?}"))
    }

    pub fn as_str(&self) -> &str {
        match self {
            Json::Str(s) => s,
            other => panic!("expected a string, got {other:?}"),
        }
    }

    pub fn as_bool(&self) -> bool {
        match self {
            Json::Bool(b) => *b,
            other => panic!("expected a boolean, got {other:?}"),
        }
    }

    pub fn as_u64(&self) -> u64 {
        match self {
            Json::Num(n) => n.parse().unwrap_or_else(|_| panic!("not an unsigned integer: {n}")),
            other => panic!("expected a number, got {other:?}"),
        }
    }

    pub fn as_f64(&self) -> f64 {
        match self {
            Json::Num(n) => n.parse().unwrap_or_else(|_| panic!("not a number: {n}")),
            other => panic!("expected a number, got {other:?}"),
        }
    }

    pub fn as_array(&self) -> &[Json] {
        match self {
            Json::Arr(items) => items,
            other => panic!("expected an array, got {other:?}"),
        }
    }
}

impl From<serde_json::Value> for Json {
    fn from(value: serde_json::Value) -> Self {
        use serde_json::Value;
        match value {
            Value::Null => Json::Null,
            Value::Bool(b) => Json::Bool(b),
            Value::Number(n) => Json::Num(n.to_string()),
            Value::String(s) => Json::Str(s),
            Value::Array(items) => Json::Arr(items.into_iter().map(Json::from).collect()),
            Value::Object(fields) => Json::Obj(fields.into_iter().map(|(k, v)| (k, Json::from(v))).collect()),
        }
    }
}
