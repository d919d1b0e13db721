//! Two rdbd nodes (alpha and beta) on loopback, driven through the real `rdbd` binary.
//!
//! Each [`Cluster`] has its own temporary directory holding the backing files, one config
//! directory per node (so the nodes can be given different files, as two machines would have),
//! a run directory (control sockets) and the daemons' logs, and its own ports. The daemons run
//! as `rdbd up --foreground` children owned by the cluster: SIGKILL is one call, and dropping
//! the cluster kills whatever is still running, so nothing outlives a test (not even when the
//! test binary itself dies: PR_SET_PDEATHSIG sends them SIGKILL).
//!
//! Every wait is bounded; a timeout panics with both nodes' status and the tails of their logs.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::{output_within, rdbd_bin, wait_exit_within, Json};

pub const RES: &str = "r0";
pub const MIB: u64 = 1 << 20;

/// The verbs wait up to 60 s for the daemon themselves; the CLI gets a little more.
const VERB_TIMEOUT: Duration = Duration::from_secs(90);
/// `up` waits 20 s for a daemon to answer; so do we.
const START_TIMEOUT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(50);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Node {
    /// Sorts lower: dials.
    Alpha,
    /// Listens.
    Beta,
}

pub use Node::{Alpha, Beta};

impl Node {
    pub const BOTH: [Node; 2] = [Alpha, Beta];

    pub fn name(self) -> &'static str {
        match self {
            Alpha => "alpha",
            Beta => "beta",
        }
    }

    pub fn peer(self) -> Node {
        match self {
            Alpha => Beta,
            Beta => Alpha,
        }
    }

    pub fn idx(self) -> usize {
        self as usize
    }
}

/// How to build a cluster; the default is a healthy pair of 256 MiB disks with one secret.
#[derive(Clone, Debug)]
pub struct Options {
    /// Size of each node's backing file (the data area is smaller: metadata sits at its end).
    pub file_size: [u64; 2],
    /// `net.shared-secret` in each node's own config file.
    pub secret: [Option<String>; 2],
    pub protocol: &'static str,
    /// More `key = value` lines for the `[net]` table.
    pub net: String,
    /// More tables (`[disk]`, `[handlers]`...), written before the nodes.
    pub tables: String,
    /// Run each daemon in a network namespace with the given address (its NBD stays on that
    /// namespace's loopback).
    pub placement: Option<Placement>,
    /// A directory searched first for the daemons' commands (stand-ins for reboot and the like).
    pub path_prefix: Option<PathBuf>,
    /// Each node's existing disk (a block device, or a symlink to one, such as
    /// [`super::powerloss::ForgetfulDisk::path`]) instead of a new backing file of `file_size`.
    pub disks: Option<[PathBuf; 2]>,
    /// Each node's metadata in a file of its own (`meta-disk`) instead of at the end of its
    /// disk: a metadata write then flushes only that file, not the data disk.
    pub external_meta: bool,
}

/// Where the daemons run: a network namespace and an address each.
#[derive(Clone, Debug)]
pub struct Placement {
    pub netns: [String; 2],
    pub ip: [String; 2],
    /// Each node's `heartbeat-address` (the second heartbeat path), if any.
    pub heartbeat: Option<[String; 2]>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            file_size: [256 * MIB; 2],
            secret: [Some("s3cret".into()), Some("s3cret".into())],
            protocol: "C",
            net: String::new(),
            tables: String::new(),
            placement: None,
            path_prefix: None,
            disks: None,
            external_meta: false,
        }
    }
}

/// An external metadata file: room for the bitmap of a few GiB and the activity log.
const EXTERNAL_META_SIZE: u64 = 16 * MIB;

pub struct NodeInfo {
    pub node: Node,
    pub config_dir: PathBuf,
    pub disk: PathBuf,
    /// The metadata file, with `Options::external_meta`.
    pub meta: Option<PathBuf>,
    pub repl_port: u16,
    pub nbd_port: u16,
    /// The daemon's stdout and stderr, across restarts.
    pub log: PathBuf,
    /// Bytes of replicated data (from `show-md` right after `create-md`).
    pub data_size: u64,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub run_dir: PathBuf,
    pub nodes: [NodeInfo; 2],
    daemons: [Option<Child>; 2],
    placement: Option<Placement>,
    path_prefix: Option<PathBuf>,
}

/// Makes a child die with the test process (the kernel sends SIGKILL when the spawning thread
/// exits; children are spawned from the test's own thread, which outlives them).
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// A TCP port free on 127.0.0.1 now. Taken below the kernel's ephemeral range when there is
/// room, so no outgoing connection (of this or a parallel test) can grab it before rdbd binds it;
/// a per-process counter keeps the tests of one binary apart.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|w| w.parse::<u32>().ok()))
        .unwrap_or(32768);
    const BASE: u32 = 12000;
    if low > BASE + 1000 {
        let span = low - BASE;
        let seed = std::process::id().wrapping_mul(7919) % span;
        for _ in 0..span {
            let port = BASE + (seed + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
            if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
                return port as u16;
            }
        }
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().unwrap().port()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The last `n` lines of a daemon log, without the `status` requests the waits poll with.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.contains("req=Status")).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Cluster {
    /// Writes the config files and backing files (unless `opts.disks` names the disks) and runs
    /// `create-md` on both nodes; nothing is started.
    pub fn new(opts: Options) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let run_dir = dir.path().join("run");
        std::fs::create_dir_all(&run_dir).unwrap();
        let ports: Vec<(u16, u16)> = (0..2).map(|_| (free_port(), free_port())).collect();
        let nodes = Node::BOTH.map(|node| {
            let i = node.idx();
            let disk = match &opts.disks {
                Some(disks) => disks[i].clone(),
                None => {
                    let disk = dir.path().join(format!("{}.img", node.name()));
                    File::create(&disk).unwrap().set_len(opts.file_size[i]).unwrap();
                    disk
                }
            };
            let meta = opts.external_meta.then(|| {
                let meta = dir.path().join(format!("{}.meta", node.name()));
                File::create(&meta).unwrap().set_len(EXTERNAL_META_SIZE).unwrap();
                meta
            });
            NodeInfo {
                node,
                config_dir: dir.path().join(format!("etc-{}", node.name())),
                disk,
                meta,
                repl_port: ports[i].0,
                nbd_port: ports[i].1,
                log: dir.path().join(format!("{}.log", node.name())),
                data_size: 0,
            }
        });
        let mut cluster = Cluster {
            dir,
            run_dir,
            nodes,
            daemons: [None, None],
            placement: opts.placement.clone(),
            path_prefix: opts.path_prefix.clone(),
        };
        for node in Node::BOTH {
            let config = cluster.config_text(&opts, node);
            let info = cluster.info(node);
            std::fs::create_dir_all(&info.config_dir).unwrap();
            std::fs::write(info.config_dir.join(format!("{RES}.toml")), config).unwrap();
            cluster.verb_ok(node, &["create-md"]);
            let show = text(&cluster.verb_ok(node, &["show-md"]).stdout);
            let size = show
                .lines()
                .find_map(|l| l.strip_prefix("data-size "))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no data-size in show-md output:\n{show}"));
            cluster.nodes[node.idx()].data_size = size;
        }
        cluster
    }

    /// The resource file as `node` sees it: the same for both nodes except for its secret.
    fn config_text(&self, opts: &Options, node: Node) -> String {
        let mut out = format!("protocol = \"{}\"\n\n[net]\n", opts.protocol);
        if let Some(secret) = &opts.secret[node.idx()] {
            out += &format!("shared-secret = \"{secret}\"\n");
        }
        // Reconnect quickly after the peer comes back (the default is 10 s).
        out += "connect-interval = \"500ms\"\n";
        out += &opts.net;
        out += "\n";
        out += &opts.tables;
        for n in &self.nodes {
            let host = opts.placement.as_ref().map_or("127.0.0.1", |p| p.ip[n.node.idx()].as_str());
            out += &format!(
                "\n[[node]]\nname = \"{}\"\naddress = \"{host}:{}\"\ndisk = \"{}\"\nnbd-listen = \"127.0.0.1:{}\"\n",
                n.node.name(),
                n.repl_port,
                n.disk.display(),
                n.nbd_port
            );
            if let Some(meta) = &n.meta {
                out += &format!("meta-disk = \"{}\"\n", meta.display());
            }
            if let Some(hb) = opts.placement.as_ref().and_then(|p| p.heartbeat.as_ref()) {
                out += &format!("heartbeat-address = \"{}\"\n", hb[n.node.idx()]);
            }
        }
        out
    }

    pub fn info(&self, node: Node) -> &NodeInfo {
        &self.nodes[node.idx()]
    }

    /// The data area's size (both nodes' when they agree, which every test but one needs).
    pub fn data_size(&self) -> u64 {
        let (a, b) = (self.info(Alpha).data_size, self.info(Beta).data_size);
        assert_eq!(a, b, "the nodes' data areas differ in size");
        a
    }

    pub fn nbd_uri(&self, node: Node) -> String {
        format!("nbd://127.0.0.1:{}/{RES}", self.info(node).nbd_port)
    }

    pub fn nbd_addr(&self, node: Node) -> String {
        format!("127.0.0.1:{}", self.info(node).nbd_port)
    }

    pub fn repl_addr(&self, node: Node) -> String {
        format!("127.0.0.1:{}", self.info(node).repl_port)
    }

    /// `rdbd <verb> r0 --node NODE <rest...>` as `node`'s machine would run it.
    pub fn command(&self, node: Node, args: &[&str]) -> Command {
        let info = self.info(node);
        let mut cmd = Command::new(rdbd_bin());
        cmd.arg(args[0])
            .arg(RES)
            .args(["--node", node.name()])
            .args(&args[1..])
            .env("RDBD_CONFIG_DIR", &info.config_dir)
            .env("RDBD_RUN_DIR", &self.run_dir)
            .env_remove("RDBD_NODE");
        cmd
    }

    /// Runs a verb (bounded in time) and returns its output, whatever the exit status.
    pub fn rdbd(&self, node: Node, args: &[&str]) -> Output {
        let mut cmd = self.command(node, args);
        cmd.env_remove("RDBD_LOG");
        output_within(&mut cmd, VERB_TIMEOUT)
    }

    /// Runs a verb that must succeed.
    pub fn verb_ok(&self, node: Node, args: &[&str]) -> Output {
        let out = self.rdbd(node, args);
        assert!(
            out.status.success(),
            "rdbd {args:?} on {} failed ({}):\nstdout:\n{}\nstderr:\n{}\n{}",
            node.name(),
            out.status,
            text(&out.stdout),
            text(&out.stderr),
            self.diag()
        );
        out
    }

    /// Runs a verb that must fail cleanly (non-zero exit, no panic, no signal); returns stderr.
    pub fn verb_fails(&self, node: Node, args: &[&str]) -> String {
        let out = self.rdbd(node, args);
        let stderr = text(&out.stderr);
        assert!(
            !out.status.success(),
            "rdbd {args:?} on {} succeeded; stdout:\n{}",
            node.name(),
            text(&out.stdout)
        );
        assert!(out.status.code().is_some(), "rdbd {args:?} died from a signal: {}", out.status);
        assert_ne!(out.status.code(), Some(101), "rdbd {args:?} panicked:\n{stderr}");
        stderr
    }

    /// Starts `rdbd up --foreground` for `node` and waits until it answers `status`.
    pub fn start(&mut self, node: Node) {
        assert!(self.daemons[node.idx()].is_none(), "{} is already started", node.name());
        let info = self.info(node);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&info.log).unwrap();
        let mut cmd = match &self.placement {
            // Only the daemon lives in the namespace; the verbs reach it over its unix socket.
            Some(p) => {
                let plain = self.command(node, &["up", "--foreground"]);
                let mut cmd = super::netns::Net::command(&p.netns[node.idx()], rdbd_bin());
                cmd.args(plain.get_args());
                for (k, v) in plain.get_envs() {
                    match v {
                        Some(v) => cmd.env(k, v),
                        None => cmd.env_remove(k),
                    };
                }
                cmd
            }
            None => self.command(node, &["up", "--foreground"]),
        };
        if let Some(dir) = &self.path_prefix {
            let path = std::env::var("PATH").unwrap_or_default();
            cmd.env("PATH", format!("{}:{path}", dir.display()));
        }
        cmd.stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        let child = die_with_parent(&mut cmd).spawn().expect("spawn rdbd up --foreground");
        self.daemons[node.idx()] = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.try_status(node).is_some() {
                return;
            }
            if let Some(status) = self.daemons[node.idx()].as_mut().unwrap().try_wait().unwrap() {
                self.daemons[node.idx()] = None;
                panic!("{} exited at start ({status}); log:\n{}", node.name(), tail(&self.log(node), 40));
            }
            if Instant::now() > deadline {
                panic!("{} did not answer within {START_TIMEOUT:?}\n{}", node.name(), self.diag());
            }
            std::thread::sleep(POLL);
        }
    }

    pub fn start_both(&mut self) {
        self.start(Alpha);
        self.start(Beta);
    }

    /// SIGKILL: the daemon gets no chance to write anything.
    pub fn kill(&mut self, node: Node) {
        let mut child =
            self.daemons[node.idx()].take().unwrap_or_else(|| panic!("{} is not running", node.name()));
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Whether our daemon for `node` is still running.
    pub fn is_running(&mut self, node: Node) -> bool {
        match self.daemons[node.idx()].as_mut() {
            Some(child) => child.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// Waits up to `timeout` for `node`'s daemon to exit (after `down`); its exit status.
    pub fn wait_exit(&mut self, node: Node, timeout: Duration) -> ExitStatus {
        let child =
            self.daemons[node.idx()].as_mut().unwrap_or_else(|| panic!("{} is not running", node.name()));
        match wait_exit_within(child, timeout) {
            Some(status) => {
                self.daemons[node.idx()] = None;
                status
            }
            None => panic!("{} did not exit within {timeout:?}\n{}", node.name(), self.diag()),
        }
    }

    /// `rdbd down`, then the daemon must exit 0.
    pub fn down(&mut self, node: Node) {
        self.verb_ok(node, &["down"]);
        let status = self.wait_exit(node, Duration::from_secs(20));
        assert!(status.success(), "{} exited with {status} after down\n{}", node.name(), self.diag());
    }

    pub fn log(&self, node: Node) -> String {
        std::fs::read_to_string(&self.info(node).log).unwrap_or_default()
    }

    /// `rdbd status --json`, or `None` when the daemon does not answer.
    pub fn try_status(&self, node: Node) -> Option<Json> {
        let out = self.rdbd(node, &["status", "--json"]);
        out.status.success().then(|| Json::parse(text(&out.stdout).trim()))
    }

    pub fn status(&self, node: Node) -> Json {
        let out = self.rdbd(node, &["status", "--json"]);
        assert!(
            out.status.success(),
            "status of {} failed: {}\n{}",
            node.name(),
            text(&out.stderr),
            tail(&self.log(node), 40)
        );
        Json::parse(text(&out.stdout).trim())
    }

    /// Polls `node`'s status until `cond` holds; returns that status. Panics after `timeout`
    /// with the last status seen and both logs.
    pub fn wait_for(
        &self,
        node: Node,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&Json) -> bool,
    ) -> Json {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.try_status(node);
            if let Some(s) = &status {
                if cond(s) {
                    return status.unwrap();
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "{}: not {what} within {timeout:?}; last status: {}\n{}",
                    node.name(),
                    status.map_or("(no answer)".to_string(), |s| format!("{s:?}")),
                    self.diag()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Both connected, Established, and both disks UpToDate on both views.
    pub fn wait_in_sync(&self, timeout: Duration) {
        for node in Node::BOTH {
            self.wait_for(node, "connected and in sync", timeout, in_sync);
        }
    }

    /// Both StandAlone with a reason; returns each node's `last_error`.
    pub fn wait_standalone(&self, timeout: Duration) -> [String; 2] {
        Node::BOTH.map(|node| {
            let s = self.wait_for(node, "StandAlone with a reason", timeout, |s| {
                str_at(s, &["connection"]) == "StandAlone" && !matches!(s.field("last_error"), Json::Null)
            });
            s.field("last_error").as_str().to_string()
        })
    }

    /// Up both, `primary --force` on alpha once they are connected, and wait for the initial
    /// full sync to finish. (Promoting while alpha is still dialing can strand both nodes
    /// StandAlone: see `an_abandoned_handshake_does_not_strand_the_pair` in tests/cluster.rs.)
    pub fn start_primary_pair(&mut self) {
        self.start_both();
        for node in Node::BOTH {
            self.wait_for(node, "connected", Duration::from_secs(30), |s| {
                str_at(s, &["connection"]) == "Connected"
            });
        }
        self.verb_ok(Alpha, &["primary", "--force"]);
        self.wait_in_sync(Duration::from_secs(60));
        let s = self.status(Alpha);
        assert_eq!(str_at(&s, &["role"]), "Primary", "{s:?}");
    }

    /// Waits until `node`'s backing file holds data in `range` (it was all zeroes): writes to
    /// that range have reached this node's disk.
    pub fn wait_data_written(&self, node: Node, range: std::ops::Range<u64>, timeout: Duration) {
        let disk = &self.info(node).disk;
        let written = super::wait_until(timeout, || super::holds_data(disk, range.clone()));
        assert!(written, "{}: nothing written in {range:?} within {timeout:?}\n{}", node.name(), self.diag());
    }

    /// Compares both backing files over the data area; on a difference, says where.
    pub fn compare_data(&self) -> Result<(), String> {
        let size = self.data_size();
        let mut a = File::open(&self.info(Alpha).disk).unwrap();
        let mut b = File::open(&self.info(Beta).disk).unwrap();
        const CHUNK: usize = 4 << 20;
        let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
        let (mut first, mut last, mut blocks) = (None, 0u64, 0u64);
        let mut pos = 0u64;
        while pos < size {
            let n = CHUNK.min((size - pos) as usize);
            a.read_exact(&mut ba[..n]).unwrap();
            b.read_exact(&mut bb[..n]).unwrap();
            if ba[..n] != bb[..n] {
                for (i, (x, y)) in ba[..n].chunks(4096).zip(bb[..n].chunks(4096)).enumerate() {
                    if x != y {
                        let at = pos + i as u64 * 4096;
                        let byte = x.iter().zip(y).position(|(p, q)| p != q).unwrap() as u64;
                        first.get_or_insert(at + byte);
                        last = at;
                        blocks += 1;
                    }
                }
            }
            pos += n as u64;
        }
        match first {
            None => Ok(()),
            Some(offset) => Err(format!(
                "the data areas differ: first at byte {offset} ({offset:#x}); {blocks} differing 4 KiB blocks, \
                 the last at {last:#x}"
            )),
        }
    }

    pub fn assert_same_data(&self) {
        if let Err(e) = self.compare_data() {
            panic!("{e}\n{}", self.diag());
        }
    }

    /// `len` bytes of `node`'s backing file at `offset`.
    pub fn read_disk(&self, node: Node, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        File::open(&self.info(node).disk).unwrap().read_exact_at(&mut buf, offset).unwrap();
        buf
    }

    /// `rdbd events r0 --now` on `node`, in the background, once its `exists` block is out (so
    /// nothing that follows can be missed). Stop it to read the stream.
    pub fn follow_events(&self, node: Node) -> Background {
        let what = format!("events-{}", node.name());
        let stream = Background::spawn(&mut self.command(node, &["events", "--now"]), self.dir.path(), &what);
        let subscribed = super::wait_until(Duration::from_secs(20), || {
            read_lines(&stream.stdout).iter().any(is_end_of_exists)
        });
        assert!(
            subscribed,
            "no exists block from {what}:\n{}\n{}",
            std::fs::read_to_string(&stream.stdout).unwrap_or_default(),
            self.diag()
        );
        stream
    }

    /// nbdsh running `code` against `node`'s export (must succeed).
    pub fn nbdsh(&self, node: Node, code: &str) {
        let out = output_within(super::nbdsh().args(["-u", &self.nbd_uri(node), "-c", code]), VERB_TIMEOUT);
        assert_ok(&out, &format!("nbdsh on {}: {code}", node.name()), self);
    }

    /// `rdbd verify` from `node` (must succeed): the number of blocks out of sync and what it
    /// printed.
    pub fn verify_blocks(&self, node: Node) -> (u64, String) {
        let out = self.rdbd(node, &["verify"]);
        let stdout = text(&out.stdout);
        let printed = format!("{stdout}{}", text(&out.stderr));
        assert!(
            out.status.success(),
            "verify on {} failed ({}):\n{printed}\n{}",
            node.name(),
            out.status,
            self.diag()
        );
        // "r0: verify done: 255.9 MiB compared in 0.7 s, 5 blocks out of sync (20 KiB), ..." or
        // "..., no blocks out of sync" (the progress lines before it count "so far").
        let done = stdout.lines().find(|l| l.contains("verify done:"));
        let count = done
            .and_then(|l| match l.split_once(" blocks out of sync") {
                Some((head, _)) if head.ends_with(" no") => Some(0),
                Some((head, _)) => head.split_whitespace().last()?.parse().ok(),
                None => None,
            })
            .unwrap_or_else(|| {
                panic!("no \"verify done: ... N blocks out of sync\" in verify's output:\n{printed}")
            });
        (count, printed)
    }

    /// Both statuses and log tails, for failure messages.
    pub fn diag(&self) -> String {
        let mut out = String::new();
        for node in Node::BOTH {
            let status = self.try_status(node).map_or("(no answer)".into(), |s| format!("{s:?}"));
            out += &format!(
                "--- {} status: {status}\n--- {} log (tail):\n{}\n",
                node.name(),
                node.name(),
                tail(&self.log(node), 30)
            );
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for node in Node::BOTH {
                eprintln!("--- {} log (tail):\n{}", node.name(), tail(&self.log(node), 60));
            }
        }
        for child in self.daemons.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Asserts that a client process succeeded; on failure, with its output and both nodes' state.
pub fn assert_ok(out: &Output, what: &str, cluster: &Cluster) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr),
        cluster.diag()
    );
}

/// The string at `path` in a status document.
pub fn str_at<'a>(s: &'a Json, path: &[&str]) -> &'a str {
    path.iter().fold(s, |v, key| v.field(key)).as_str()
}

/// The complete JSON lines of a file still being written.
fn read_lines(path: &Path) -> Vec<Json> {
    let content = std::fs::read_to_string(path).unwrap_or_default();
    content.split_inclusive('\n').filter(|l| l.ends_with('\n')).map(|l| Json::parse(l.trim())).collect()
}

/// The end of an event stream's `exists` block.
pub fn is_end_of_exists(e: &Json) -> bool {
    str_at(e, &["event"]) == "exists" && str_at(e, &["object"]) == "-"
}

/// Connected and Established, this node and its peer UpToDate.
pub fn in_sync(s: &Json) -> bool {
    str_at(s, &["connection"]) == "Connected"
        && str_at(s, &["replication"]) == "Established"
        && str_at(s, &["disk"]) == "UpToDate"
        && str_at(s, &["peer", "disk"]) == "UpToDate"
}

/// A client process (fio, python) run in the background, stopped and reaped by [`Self::stop`] or
/// killed when dropped. Its output goes to files so it never blocks on a full pipe.
pub struct Background {
    child: Option<Child>,
    what: String,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Background {
    pub fn spawn(cmd: &mut Command, dir: &Path, what: &str) -> Background {
        let stdout = dir.join(format!("{what}.out"));
        let stderr = dir.join(format!("{what}.err"));
        cmd.stdin(Stdio::null())
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap());
        let child = die_with_parent(cmd).spawn().unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
        Background { child: Some(child), what: what.into(), stdout, stderr }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Sends `signal` (unless it has exited already), waits up to `timeout` (then SIGKILL and
    /// panic) and returns what it printed.
    pub fn stop(&mut self, signal: Option<rustix::process::Signal>, timeout: Duration) -> Output {
        let mut child = self.child.take().expect("stopped twice");
        if let Some(signal) = signal {
            if child.try_wait().unwrap().is_none() {
                let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
                let _ = rustix::process::kill_process(pid, signal);
            }
        }
        let Some(status) = wait_exit_within(&mut child, timeout) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{} did not exit within {timeout:?}; stderr:\n{}", self.what, self.read(&self.stderr));
        };
        Output {
            status,
            stdout: std::fs::read(&self.stdout).unwrap_or_default(),
            stderr: std::fs::read(&self.stderr).unwrap_or_default(),
        }
    }

    /// Waits for it to finish on its own.
    pub fn wait(&mut self, timeout: Duration) -> Output {
        self.stop(None, timeout)
    }

    fn read(&self, path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
