//! The HA supervisor with a quorum witness, on three hosts in network namespaces
//! (tests/common/netns.rs): a writer on each node writes and flushes blocks through that node's
//! NBD server (blocks of its own) and logs what was acknowledged. Whatever is cut or killed, the
//! acknowledged writes of the two writers never interleave (at no moment do both nodes accept
//! writes), every block ends holding the last write acknowledged to it (no acknowledged write is
//! lost), and the replicas end identical.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::cluster::{str_at, Alpha, Background, Beta, Cluster, Node, Options, Placement, MIB};
use common::netns::{Link, Net, ALPHA_HEARTBEAT, ALPHA_IP, BETA_HEARTBEAT, BETA_IP, WITNESS_IP};
use common::*;

const WRITER_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ha/writer.py");
const BLOCKS: u64 = 256;
const SECRET: &str = "witness-secret";

struct Setup {
    cluster: Cluster,
    witness: Option<Child>,
    writers: Vec<(Child, PathBuf)>,
    stop_file: PathBuf,
    // Last: the namespaces outlive every process in them.
    net: Net,
    /// One scenario at a time: these are about timing, and a loaded machine delays pings.
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(w) = &mut self.witness {
            let _ = w.kill();
            let _ = w.wait();
        }
        for (w, _) in &mut self.writers {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Namespaces, the witness, and an HA pair whose alpha is Primary and holds the lease.
fn setup(extra_ha: &str) -> Option<Setup> {
    setup_with(&format!("witness = \"{WITNESS_IP}:7788\"\nwitness-secret = \"{SECRET}\"\n{extra_ha}"), true)
}

/// Namespaces and an HA pair with `ha` in its [ha] table, alpha Primary; with `witness`, the
/// witness runs and alpha holds its lease.
fn setup_with(ha: &str, witness: bool) -> Option<Setup> {
    setup_opts(ha, Extras { witness, ..Extras::default() })
}

#[derive(Default)]
struct Extras {
    /// Run the witness (the [ha] table names it).
    witness: bool,
    /// The nodes also talk over the second heartbeat path.
    heartbeat: bool,
    /// Searched first for the daemons' commands.
    path_prefix: Option<PathBuf>,
}

/// As [`setup_with`], with more to set up.
fn setup_opts(ha: &str, extras: Extras) -> Option<Setup> {
    let Extras { witness, heartbeat, path_prefix } = extras;
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if !have_python_nbd() || !have_tool("nsenter") {
        return None;
    }
    let serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let net = Net::create()?;
    let ha = format!("[ha]\n{ha}\n");
    let mut cluster = Cluster::new(Options {
        file_size: [64 * MIB; 2],
        // The default timers: with [ha], a silent link is declared dead after 1.5 s.
        tables: ha,
        placement: Some(Placement {
            netns: [net.alpha.clone(), net.beta.clone()],
            ip: [ALPHA_IP.into(), BETA_IP.into()],
            heartbeat: heartbeat.then(|| [ALPHA_HEARTBEAT.into(), BETA_HEARTBEAT.into()]),
        }),
        path_prefix,
        ..Options::default()
    });
    let witness = witness.then(|| {
        let witness_log = File::create(cluster.dir.path().join("witness.log")).unwrap();
        Net::command(&net.witness, rdbd_bin())
            .args(["witness", "--listen", &format!("{WITNESS_IP}:7788"), "--lease", "2s", "--state"])
            .arg(cluster.dir.path().join("witness.json"))
            .env("RDBD_WITNESS_SECRET", SECRET)
            .stdout(Stdio::null())
            .stderr(witness_log)
            .spawn()
            .expect("start the witness")
    });
    cluster.start_primary_pair();
    if witness.is_some() {
        // The witness grants nothing in its first lease period; then alpha, Primary, holds it.
        cluster.wait_for(Alpha, "holding the witness's lease", Duration::from_secs(20), |s| {
            s.get("ha").and_then(|h| h.get("lease_holder")).is_some_and(|h| h.as_str() == "alpha")
        });
    }
    let stop_file = cluster.dir.path().join("stop-writers");
    let mut setup = Setup { cluster, witness, writers: Vec::new(), stop_file, net, _serial: serial };
    for node in Node::BOTH {
        let log = setup.cluster.dir.path().join(format!("writer-{}.log", node.name()));
        let ns = if node == Alpha { &setup.net.alpha } else { &setup.net.beta };
        let child = Net::command(ns, SYSTEM_PYTHON)
            .arg(WRITER_PY)
            .arg(setup.cluster.nbd_uri(node))
            .arg(node.name())
            .arg((node as u64 * BLOCKS).to_string())
            .arg(BLOCKS.to_string())
            .arg(&log)
            .arg(&setup.stop_file)
            .arg("240")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a writer");
        setup.writers.push((child, log));
    }
    Some(setup)
}

#[derive(Debug, Clone)]
struct Ack {
    writer: String,
    seq: u64,
    block: u64,
    ns: u64,
}

fn acks(log: &Path) -> Vec<Ack> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 5 && f[0] == "ack").then(|| Ack {
                writer: f[1].into(),
                seq: f[2].parse().unwrap(),
                block: f[3].parse().unwrap(),
                ns: f[4].parse().unwrap(),
            })
        })
        .collect()
}

impl Setup {
    fn acked(&self, node: Node) -> usize {
        acks(&self.writers[node as usize].1).len()
    }

    /// Waits until `node`'s writer got `more` acknowledgements beyond what it has now.
    fn wait_acks(&self, node: Node, more: usize, timeout: Duration) {
        let target = self.acked(node) + more;
        let ok = wait_until(timeout, || self.acked(node) >= target);
        assert!(
            ok,
            "{}'s writer got no acknowledgement within {timeout:?}\n{}",
            node.name(),
            self.cluster.diag()
        );
    }

    /// Stops the writers and checks: no interleaving beyond `switches` hand-overs, each block
    /// holds its last acknowledged write, the replicas are identical.
    fn finish(mut self, switches: usize) {
        std::fs::write(&self.stop_file, b"").unwrap();
        for (w, _) in &mut self.writers {
            assert!(wait_exit_within(w, Duration::from_secs(10)).is_some(), "a writer did not stop");
        }
        let mut all: Vec<Ack> = self.writers.iter().flat_map(|(_, log)| acks(log)).collect();
        all.sort_by_key(|a| a.ns);
        let changes = all.windows(2).filter(|p| p[0].writer != p[1].writer).count();
        let per_writer: BTreeMap<&str, usize> = all.iter().fold(BTreeMap::new(), |mut m, a| {
            *m.entry(a.writer.as_str()).or_default() += 1;
            m
        });
        eprintln!("acknowledged writes: {per_writer:?}, hand-overs between writers: {changes}");
        assert!(
            changes <= switches,
            "the writers' acknowledgements interleave ({changes} changes, at most {switches} hand-overs expected): \
             two nodes accepted writes at once"
        );
        self.cluster.wait_in_sync(Duration::from_secs(60));
        self.cluster.assert_same_data();
        // Each block holds the last write acknowledged to it (data area at the start of the file).
        let mut last: BTreeMap<u64, &Ack> = BTreeMap::new();
        for a in &all {
            last.insert(a.block, a);
        }
        let file = File::open(&self.cluster.info(Alpha).disk).unwrap();
        let mut buf = [0u8; 64];
        for (block, ack) in last {
            file.read_exact_at(&mut buf, block * 4096).unwrap();
            let text = String::from_utf8_lossy(&buf);
            let head = text.split('\n').next().unwrap_or("");
            let f: Vec<&str> = head.split(' ').collect();
            let (writer, seq) =
                (f.first().copied().unwrap_or(""), f.get(1).and_then(|s| s.parse::<u64>().ok()));
            // A write the writer started after its last acknowledged one may have landed too.
            let ok = writer == ack.writer && seq.is_some_and(|s| s >= ack.seq);
            assert!(ok, "block {block} holds {head:?}, but {} {} was acknowledged last", ack.writer, ack.seq);
        }
    }
}

fn role(cluster: &Cluster, node: Node) -> String {
    cluster.try_status(node).map(|s| str_at(&s, &["role"]).to_string()).unwrap_or_default()
}

#[test]
fn a_killed_primary_is_replaced_automatically() {
    let Some(mut s) = setup("") else { return };
    s.wait_acks(Alpha, 20, Duration::from_secs(30));
    let killed = monotonic_ns();
    s.cluster.kill(Alpha);
    s.wait_acks(Beta, 1, Duration::from_secs(30));
    let first = acks(&s.writers[1].1).first().map(|a| a.ns).unwrap();
    eprintln!(
        "failover: beta's writer got its first acknowledgement {:.2} s after the kill",
        (first - killed) as f64 / 1e9
    );
    assert_eq!(role(&s.cluster, Beta), "Primary");
    // Alpha comes back as Secondary and resyncs from beta.
    s.cluster.start(Alpha);
    s.wait_acks(Beta, 20, Duration::from_secs(30));
    assert_eq!(role(&s.cluster, Alpha), "Secondary");
    s.finish(1);
}

#[test]
fn cutting_only_the_replication_link_keeps_the_primary_and_outdates_the_secondary() {
    let Some(s) = setup("") else { return };
    s.wait_acks(Alpha, 20, Duration::from_secs(30));
    s.net.cut(Link::AlphaBeta);
    s.cluster.wait_for(Beta, "disconnected", Duration::from_secs(20), |st| {
        str_at(st, &["connection"]) != "Connected"
    });
    // Alpha keeps its lease and goes on; beta is refused it, and stays Secondary.
    s.wait_acks(Alpha, 50, Duration::from_secs(30));
    // A window, not a wait: for 3 s more (past the 2 s lease) nobody promotes beta.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(role(&s.cluster, Beta), "Secondary");
    assert_eq!(s.acked(Beta), 0);
    s.net.mend(Link::AlphaBeta);
    s.wait_acks(Alpha, 20, Duration::from_secs(30));
    s.finish(0);
}

#[test]
fn an_isolated_primary_freezes_and_the_peer_takes_over() {
    let Some(s) = setup("") else { return };
    isolate_alpha_until_beta_serves(&s);
    rejoin_alpha_and_finish(s);
}

/// Cuts alpha off from beta and the witness, waits until beta serves, and checks that alpha
/// acknowledged nothing since.
fn isolate_alpha_until_beta_serves(s: &Setup) {
    s.wait_acks(Alpha, 20, Duration::from_secs(30));
    s.net.cut(Link::AlphaBeta);
    s.net.cut(Link::AlphaWitness);
    let cut_at = Instant::now();
    s.wait_acks(Beta, 20, Duration::from_secs(30));
    eprintln!("beta took over {:.1} s after alpha was cut off", cut_at.elapsed().as_secs_f64());
    let alpha_last = acks(&s.writers[0].1).last().map(|a| a.ns).unwrap();
    let beta_first = acks(&s.writers[1].1).first().map(|a| a.ns).unwrap();
    assert!(alpha_last < beta_first, "alpha acknowledged a write after beta took over");
}

/// Mends alpha's links: alpha learns it was outdated, is (or stays) Secondary, and rejoins as
/// the sync target; then the final checks.
fn rejoin_alpha_and_finish(s: Setup) {
    s.net.mend(Link::AlphaWitness);
    s.net.mend(Link::AlphaBeta);
    s.cluster.wait_for(Alpha, "Secondary and connected", Duration::from_secs(30), |st| {
        str_at(st, &["role"]) == "Secondary" && str_at(st, &["connection"]) == "Connected"
    });
    s.wait_acks(Beta, 20, Duration::from_secs(30));
    s.finish(1);
}

/// One 4 KiB write at the offset given, then a flush.
const ONE_WRITE: &str = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"late" * 1024, int(sys.argv[2]))
h.flush()
h.shutdown()
"#;

/// Issue 15, item 5: every link cut, nobody holds the lease, so alpha freezes its writes and
/// beta cannot take over; once the links heal, the pair reconnects within a connect-interval
/// or so and the frozen writes are answered. Before, the frozen writes kept their ranges
/// claimed and the reconnect's hold for the bitmap exchange waited its whole `timeout` (6 s).
#[test]
fn a_frozen_primary_reconnects_at_once_when_the_links_heal() {
    let Some(s) = setup("") else { return };
    s.wait_acks(Alpha, 20, Duration::from_secs(30));
    for link in [Link::AlphaBeta, Link::AlphaWitness, Link::BetaWitness] {
        s.net.cut(link);
    }
    // Frozen: alpha's lease ran out (the witness's permit is denied) and its writer hears
    // nothing any more.
    s.cluster.wait_for(Alpha, "without its lease", Duration::from_secs(20), |st| {
        str_at(st, &["connection"]) != "Connected" && str_at(st, &["ha", "permit"]) == "Denied"
    });
    let frozen = s.acked(Alpha);
    // A write that starts now is frozen with its range (the HA writer is stuck on a FLUSH,
    // which has none).
    let mut cmd = Net::command(&s.net.alpha, SYSTEM_PYTHON);
    cmd.args(["-c", ONE_WRITE, &s.cluster.nbd_uri(Alpha), &(32 * MIB).to_string()]);
    let mut late = Background::spawn(&mut cmd, s.cluster.dir.path(), "late-writer");
    // A window, not a wait: past the link timeout, nothing is acknowledged.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(s.acked(Alpha), frozen, "alpha acknowledged writes without quorum");
    assert!(late.is_running(), "a write without quorum was answered");
    assert_eq!(role(&s.cluster, Beta), "Secondary");
    let healed = Instant::now();
    for link in [Link::AlphaBeta, Link::AlphaWitness, Link::BetaWitness] {
        s.net.mend(link);
    }
    s.wait_acks(Alpha, 5, Duration::from_secs(30));
    let out = late.wait(Duration::from_secs(30));
    assert!(out.status.success(), "the frozen write failed: {}", String::from_utf8_lossy(&out.stderr));
    let resumed = healed.elapsed();
    eprintln!("alpha's writes resumed {:.1} s after the links healed", resumed.as_secs_f64());
    // connect-interval 500 ms, the handshake and a bitmap resync: well under the 6 s timeout
    // the hold used to wait.
    assert!(
        resumed < Duration::from_secs(4),
        "alpha's writes resumed only after {resumed:?}\n{}",
        s.cluster.diag()
    );
    s.finish(0);
}

#[test]
fn with_on_quorum_loss_fail_io_an_isolated_primary_fails_its_writes_instead_of_holding_them() {
    let Some(s) = setup("on-quorum-loss = \"fail-io\"") else { return };
    isolate_alpha_until_beta_serves(&s);
    // Alpha's client was told its writes failed (it logs the error and reconnects).
    let alpha_log = std::fs::read_to_string(&s.writers[0].1).unwrap();
    assert!(alpha_log.lines().any(|l| l.starts_with("error alpha")), "alpha's writer saw no failed write");
    rejoin_alpha_and_finish(s);
}

#[test]
fn with_on_quorum_loss_demote_an_isolated_primary_steps_down_by_itself() {
    let Some(s) = setup("on-quorum-loss = \"demote\"") else { return };
    isolate_alpha_until_beta_serves(&s);
    // Still cut off, alpha steps down on its own (once its lease ran out, before beta's began).
    s.cluster.wait_for(Alpha, "Secondary while cut off", Duration::from_secs(10), |st| {
        str_at(st, &["role"]) == "Secondary"
    });
    rejoin_alpha_and_finish(s);
}

#[test]
fn losing_the_witness_changes_nothing_while_the_pair_is_connected() {
    let Some(s) = setup("") else { return };
    s.wait_acks(Alpha, 20, Duration::from_secs(30));
    s.net.cut(Link::AlphaWitness);
    s.net.cut(Link::BetaWitness);
    // A window, not a wait: two lease periods without the witness change nothing.
    std::thread::sleep(Duration::from_secs(4));
    s.wait_acks(Alpha, 50, Duration::from_secs(30));
    assert_eq!(role(&s.cluster, Beta), "Secondary");
    s.net.mend(Link::AlphaWitness);
    s.net.mend(Link::BetaWitness);
    s.finish(0);
}

#[test]
fn repeated_cuts_and_heals_never_let_two_nodes_accept_writes() {
    let Some(s) = setup("") else { return };
    let mut handovers = 0;
    for round in 0..4 {
        let primary = if role(&s.cluster, Alpha) == "Primary" { Alpha } else { Beta };
        s.wait_acks(primary, 5, Duration::from_secs(30));
        // Alternately the replication link alone, and every link of the Primary.
        let links: &[Link] = match (round % 2, primary) {
            (0, _) => &[Link::AlphaBeta],
            (_, Alpha) => &[Link::AlphaBeta, Link::AlphaWitness],
            (_, Beta) => &[Link::AlphaBeta, Link::BetaWitness],
        };
        for &l in links {
            s.net.cut(l);
        }
        // A window, not a wait: the cut lasts past the link timeout and the lease, whatever the
        // nodes make of it.
        std::thread::sleep(Duration::from_secs(6));
        for &l in links {
            s.net.mend(l);
        }
        s.cluster.wait_in_sync(Duration::from_secs(60));
        let now = if role(&s.cluster, Alpha) == "Primary" { Alpha } else { Beta };
        if now != primary {
            handovers += 1;
        }
    }
    eprintln!("{handovers} hand-overs in 4 rounds");
    s.finish(handovers);
}

#[test]
fn a_switchover_moves_the_primary_role_to_the_peer() {
    // Failback moves back after an outage of the preferred node, not after an operator's move.
    let Some(mut s) = setup("preferred-nodes = [\"alpha\"]\nfailback = \"always\"") else { return };
    s.wait_acks(Alpha, 20, Duration::from_secs(30));
    // Mistakes are one-line refusals.
    let e = s.cluster.verb_fails(Beta, &["switchover"]);
    assert!(e.contains("runs on the Primary"), "{e}");
    let e = s.cluster.verb_fails(Alpha, &["switchover", "--to", "gamma"]);
    assert!(e.contains("not a node of this resource"), "{e}");
    // A planned move: the NBD client of alpha goes first (the chain would stop its users).
    let (writer, _) = &mut s.writers[0];
    let _ = writer.kill();
    let _ = writer.wait();
    let out = s.cluster.verb_ok(Alpha, &["switchover", "--to", "beta"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("moved to beta"));
    assert_eq!(role(&s.cluster, Beta), "Primary");
    assert_eq!(role(&s.cluster, Alpha), "Secondary");
    s.wait_acks(Beta, 20, Duration::from_secs(30));
    // Alpha, preferred, does not take it back: a window, not a wait (7 s of nobody moving).
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(role(&s.cluster, Beta), "Primary");
    s.finish(1);
}

/// A `fence-peer` command that emulates STONITH: it kills the peer's daemon (the test wrote its
/// pid) and answers 7, "the peer was shot". `fence.log` lists who fenced whom.
fn stonith_script(dir: &Path) -> PathBuf {
    let script = dir.join("fence.sh");
    let body = format!(
        "#!/bin/sh\necho \"$RDBD_NODE fences $RDBD_PEER\" >> {d}/fence.log\nkill -9 \"$(cat {d}/$RDBD_PEER.pid)\" 2>/dev/null\nexit 7\n",
        d = dir.display()
    );
    std::fs::write(&script, body).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    script
}

/// Where the STONITH script finds the daemons to kill.
fn write_pids(s: &Setup, dir: &Path) {
    for node in Node::BOTH {
        let pid = s.cluster.status(node).field("pid").as_u64();
        std::fs::write(dir.join(format!("{}.pid", node.name())), pid.to_string()).unwrap();
    }
}

/// A `fence-peer` command that reaches nothing: it answers 5, "the peer is unreachable", and
/// lists who tried in `fence.log`.
fn unreachable_script(dir: &Path) -> PathBuf {
    let script = dir.join("fence.sh");
    let body =
        format!("#!/bin/sh\necho \"$RDBD_NODE fences $RDBD_PEER\" >> {}/fence.log\nexit 5\n", dir.display());
    std::fs::write(&script, body).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    script
}

/// Issue 15, item 3: with `fence-peer` and no witness, a Secondary restarted alone does not
/// trust its own UpToDate (DRBD attaches such a disk Consistent): while the Primary, cut off
/// from it, goes on writing, a fence result of 5 ("unreachable") does not let it take over.
/// Before, it promoted itself 10 s after it came up: two Primaries, one with stale data. Once
/// the link heals it rejoins as the sync target.
#[test]
fn with_fence_peer_a_secondary_restarted_alone_does_not_take_over_on_an_unreachable_peer() {
    let dir = tempfile::tempdir().unwrap();
    let script = unreachable_script(dir.path());
    let Some(mut s) = setup_with(&format!("fence-peer = \"{}\"", script.display()), false) else { return };
    s.wait_acks(Alpha, 20, Duration::from_secs(30));
    // Beta reboots, and comes back without its link to alpha; alpha (UpToDate, its fence
    // answered 5) writes on alone.
    s.cluster.kill(Beta);
    s.net.cut(Link::AlphaBeta);
    s.wait_acks(Alpha, 20, Duration::from_secs(30));
    s.cluster.start(Beta);
    let fence_log = dir.path().join("fence.log");
    let st = s.cluster.wait_for(Beta, "refused after fencing alpha", Duration::from_secs(90), |st| {
        let fenced = std::fs::read_to_string(&fence_log).unwrap_or_default().contains("beta fences alpha");
        fenced && str_at(st, &["ha", "permit"]) == "Denied"
    });
    assert_eq!(str_at(&st, &["role"]), "Secondary", "{st:?}");
    assert_eq!(str_at(&st, &["disk"]), "Consistent", "{st:?}");
    assert_eq!(s.acked(Beta), 0, "beta served writes");
    s.net.mend(Link::AlphaBeta);
    s.cluster.wait_for(Beta, "back as alpha's Secondary", Duration::from_secs(60), |st| {
        str_at(st, &["role"]) == "Secondary"
            && str_at(st, &["disk"]) == "UpToDate"
            && str_at(st, &["connection"]) == "Connected"
    });
    s.wait_acks(Alpha, 20, Duration::from_secs(30));
    s.finish(0);
}

#[test]
fn with_fence_peer_a_cut_link_leaves_the_primary_writing_and_the_secondary_shot() {
    let dir = tempfile::tempdir().unwrap();
    let script = stonith_script(dir.path());
    let Some(mut s) = setup_with(&format!("fence-peer = \"{}\"", script.display()), false) else { return };
    write_pids(&s, dir.path());
    s.wait_acks(Alpha, 20, Duration::from_secs(30));
    s.net.cut(Link::AlphaBeta);
    // Alpha fences at once and goes on; beta, which would wait 3 s first, is shot before.
    s.cluster.wait_exit(Beta, Duration::from_secs(30));
    s.wait_acks(Alpha, 50, Duration::from_secs(30));
    let log = std::fs::read_to_string(dir.path().join("fence.log")).unwrap();
    assert!(log.lines().all(|l| l == "alpha fences beta") && !log.is_empty(), "{log}");
    assert_eq!(s.acked(Beta), 0);
    s.net.mend(Link::AlphaBeta);
    s.cluster.start(Beta);
    s.wait_acks(Alpha, 20, Duration::from_secs(30));
    s.finish(0);
}

#[test]
fn with_fence_peer_a_killed_primary_is_fenced_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let script = stonith_script(dir.path());
    let Some(mut s) = setup_with(&format!("fence-peer = \"{}\"", script.display()), false) else { return };
    write_pids(&s, dir.path());
    s.wait_acks(Alpha, 20, Duration::from_secs(30));
    let killed = Instant::now();
    s.cluster.kill(Alpha);
    s.wait_acks(Beta, 1, Duration::from_secs(30));
    eprintln!(
        "beta took over {:.1} s after the kill (3 s of it the Secondary's fencing delay)",
        killed.elapsed().as_secs_f64()
    );
    // (More than once if the link also looked dead earlier, under load: always beta, though.)
    let log = std::fs::read_to_string(dir.path().join("fence.log")).unwrap();
    assert!(log.lines().all(|l| l == "beta fences alpha") && !log.is_empty(), "{log}");
    s.cluster.start(Alpha);
    s.wait_acks(Beta, 20, Duration::from_secs(30));
    s.finish(1);
}

const HEARTBEAT: Extras = Extras { witness: false, heartbeat: true, path_prefix: None };

fn fence_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("fence.log")).unwrap_or_default()
}

/// A flag of the heartbeat path in a node's status (false when there is none).
fn heartbeat_flag(status: &Json, flag: &str) -> bool {
    status
        .get("ha")
        .and_then(|h| h.get("heartbeat"))
        .and_then(|h| h.get(flag))
        .is_some_and(|v| *v == Json::Bool(true))
}

fn disk(cluster: &Cluster, node: Node) -> String {
    cluster.try_status(node).map(|s| str_at(&s, &["disk"]).to_string()).unwrap_or_default()
}

#[test]
fn with_a_second_heartbeat_path_a_cut_link_outdates_the_secondary_instead_of_shooting_it() {
    let dir = tempfile::tempdir().unwrap();
    let script = stonith_script(dir.path());
    let Some(s) = setup_opts(&format!("fence-peer = \"{}\"", script.display()), HEARTBEAT) else {
        return;
    };
    write_pids(&s, dir.path());
    s.cluster.wait_for(Beta, "hearing alpha on the heartbeat path", Duration::from_secs(10), |st| {
        heartbeat_flag(st, "peer_alive")
    });
    s.wait_acks(Alpha, 20, Duration::from_secs(30));
    s.net.cut(Link::AlphaBeta);
    // Alpha has beta outdate itself over the second path and writes on; nobody is shot.
    s.cluster.wait_for(Beta, "outdated by alpha", Duration::from_secs(15), |st| {
        str_at(st, &["disk"]) == "Outdated"
    });
    s.wait_acks(Alpha, 50, Duration::from_secs(30));
    let status = s.cluster.try_status(Alpha).unwrap();
    assert!(heartbeat_flag(&status, "peer_outdated"), "{status:?}");
    // Past beta's fencing delay, and with the second path cut too: an Outdated Secondary
    // neither fences nor promotes. Windows, not waits: 4 s (the delay is 3 s), then 5 s.
    std::thread::sleep(Duration::from_secs(4));
    s.net.cut(Link::Heartbeat);
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(fence_log(dir.path()), "", "a live peer was fenced");
    assert_eq!(role(&s.cluster, Beta), "Secondary");
    assert_eq!(disk(&s.cluster, Beta), "Outdated");
    assert_eq!(s.acked(Beta), 0);
    s.net.mend(Link::AlphaBeta);
    s.net.mend(Link::Heartbeat);
    s.cluster.wait_for(Beta, "resynced and UpToDate", Duration::from_secs(60), |st| {
        str_at(st, &["disk"]) == "UpToDate" && str_at(st, &["replication"]) == "Established"
    });
    s.wait_acks(Alpha, 20, Duration::from_secs(30));
    s.finish(0);
}

#[test]
fn with_a_second_heartbeat_path_a_killed_primary_is_still_fenced_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let script = stonith_script(dir.path());
    let Some(mut s) = setup_opts(&format!("fence-peer = \"{}\"", script.display()), HEARTBEAT) else {
        return;
    };
    write_pids(&s, dir.path());
    s.wait_acks(Alpha, 20, Duration::from_secs(30));
    s.cluster.kill(Alpha);
    // The second path falls silent with the daemon: beta fences and takes over.
    s.wait_acks(Beta, 1, Duration::from_secs(30));
    let log = fence_log(dir.path());
    assert!(log.lines().all(|l| l == "beta fences alpha") && !log.is_empty(), "{log}");
    s.cluster.start(Alpha);
    s.wait_acks(Beta, 20, Duration::from_secs(30));
    s.finish(1);
}

#[test]
fn with_a_second_heartbeat_path_no_quorum_policy_ignore_does_not_split_the_brain_on_a_cut_link() {
    let Some(s) = setup_opts("no-quorum-policy = \"ignore\"", HEARTBEAT) else { return };
    s.cluster.wait_for(Beta, "hearing alpha on the heartbeat path", Duration::from_secs(10), |st| {
        heartbeat_flag(st, "peer_alive")
    });
    // Garbage and datagrams under another secret, at beta's heartbeat port, change nothing.
    let (host, port) = BETA_HEARTBEAT.rsplit_once(':').unwrap();
    let spray = format!(
        "import os, socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         for n in range(300):\n    s.sendto(os.urandom(n % 400), ('{host}', {port}))\n\
         s.sendto(b'RDBH\\x01\\x02' + bytes(200), ('{host}', {port}))\n"
    );
    let sent = Net::command(&s.net.alpha, SYSTEM_PYTHON).args(["-c", &spray]).status().unwrap();
    assert!(sent.success());
    s.wait_acks(Alpha, 20, Duration::from_secs(30));
    let status = s.cluster.try_status(Beta).expect("beta still answers");
    assert!(heartbeat_flag(&status, "peer_alive") && str_at(&status, &["disk"]) == "UpToDate", "{status:?}");
    let log = std::fs::read_to_string(&s.cluster.info(Beta).log).unwrap();
    assert!(log.contains("heartbeat datagram dropped"), "beta did not report the garbage");
    s.net.cut(Link::AlphaBeta);
    // Without the second path beta would take the link's silence for a dead peer and promote.
    s.cluster.wait_for(Beta, "outdated by alpha", Duration::from_secs(15), |st| {
        str_at(st, &["disk"]) == "Outdated"
    });
    s.wait_acks(Alpha, 50, Duration::from_secs(30));
    // A window, not a wait: for 3 s more (past the link timeout) beta does not promote.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(role(&s.cluster, Beta), "Secondary");
    assert_eq!(s.acked(Beta), 0);
    s.net.mend(Link::AlphaBeta);
    s.wait_acks(Alpha, 20, Duration::from_secs(30));
    s.finish(0);
}

#[test]
fn a_node_that_starts_without_its_peer_waits_for_it_before_it_takes_over() {
    // Loopback is enough: nothing is cut, one node simply comes up alone.
    let mut cluster = Cluster::new(Options {
        file_size: [64 * MIB; 2],
        tables: "[ha]\nno-quorum-policy = \"ignore\"\n".into(),
        ..Options::default()
    });
    cluster.start_primary_pair();
    cluster.wait_in_sync(Duration::from_secs(60));
    cluster.down(Alpha);
    cluster.down(Beta);
    let started = Instant::now();
    cluster.start(Beta);
    // UpToDate, but the peer has not been seen in this run: it may be rebooting with newer data.
    // A window, not a wait: for 7 s (of the 10 s it waits) beta does not promote.
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(role(&cluster, Beta), "Secondary", "promoted before waiting for the peer");
    cluster.wait_for(Beta, "Primary after waiting for the peer", Duration::from_secs(30), |s| {
        str_at(s, &["role"]) == "Primary"
    });
    let waited = started.elapsed().as_secs_f64();
    eprintln!("beta, alone from its start, promoted after {waited:.1} s");
    assert!(waited >= 10.0, "{waited}");
}

#[test]
fn a_primary_that_cannot_step_down_reboots_as_on_demote_failure_says() {
    let dir = tempfile::tempdir().unwrap();
    // A stand-in for reboot: it logs, and stops the node as a reboot would (SIGKILL).
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let reboot = bin.join("reboot");
    let d = dir.path().display();
    std::fs::write(
        &reboot,
        format!("#!/bin/sh\necho \"$RDBD_NODE reboot $*\" >> {d}/reboot.log\nkill -9 \"$(cat {d}/$RDBD_NODE.pid)\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(&reboot, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let extras = Extras { witness: true, path_prefix: Some(bin), ..Extras::default() };
    let ha = format!(
        "witness = \"{WITNESS_IP}:7788\"\nwitness-secret = \"{SECRET}\"\non-demote-failure = \"reboot\""
    );
    let Some(mut s) = setup_opts(&ha, extras) else { return };
    write_pids(&s, dir.path());
    s.wait_acks(Alpha, 20, Duration::from_secs(30));
    // A switchover while alpha's NBD client still writes: the demotion is refused (the device
    // is in use), so alpha must not stay Primary beside the peer that takes over.
    let mut switchover = s
        .cluster
        .command(Alpha, &["switchover"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    s.cluster.wait_exit(Alpha, Duration::from_secs(30));
    let _ = switchover.wait();
    let log = std::fs::read_to_string(dir.path().join("reboot.log")).unwrap_or_default();
    assert_eq!(log.trim(), "alpha reboot -f");
    assert!(
        s.cluster.log(Alpha).contains("demotion failed") || s.cluster.log(Alpha).contains("cannot demote")
    );
    s.wait_acks(Beta, 1, Duration::from_secs(30));
    s.cluster.start(Alpha);
    s.wait_acks(Beta, 20, Duration::from_secs(30));
    s.finish(1);
}

#[test]
fn the_chain_runs_on_the_primary_is_monitored_and_moves_after_too_many_failures() {
    // Two exec services whose state is a file per node; monitors every second; one failure moves.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let service = |name: &str| {
        format!(
            "\n[[service]]\nkind = \"exec\"\nname = \"{name}\"\nstart = \"touch {d}/{name}.$RDBD_NODE\"\n\
             stop = \"rm -f {d}/{name}.$RDBD_NODE\"\nmonitor = \"test -e {d}/{name}.$RDBD_NODE\"\n"
        )
    };
    let ha = format!(
        "witness = \"{WITNESS_IP}:7788\"\nwitness-secret = \"{SECRET}\"\nmonitor-interval = \"1s\"\nmigration-threshold = 1\n{}{}",
        service("first"),
        service("second")
    );
    let Some(mut s) = setup_with(&ha, true) else { return };
    // No NBD clients here: a planned demotion waits for its users to go, which the chain would
    // stop in a real deployment.
    for (w, _) in &mut s.writers {
        let _ = w.kill();
        let _ = w.wait();
    }
    let mut events = s.cluster.command(Alpha, &["events"]);
    let events = events.stdout(Stdio::piped()).spawn().unwrap();
    // alpha was made Primary by hand: the supervisor hands the role to the chain only when it
    // promotes itself. A switchover and back puts the chain on alpha.
    s.cluster.verb_ok(Alpha, &["switchover"]);
    s.cluster.wait_for(Beta, "running its chain", Duration::from_secs(30), chain_running);
    s.cluster.verb_ok(Beta, &["switchover"]);
    s.cluster.wait_for(Alpha, "running its chain", Duration::from_secs(30), chain_running);
    assert!(dir.path().join("first.alpha").exists() && dir.path().join("second.alpha").exists());
    assert!(!dir.path().join("first.beta").exists(), "beta stopped its chain when it handed over");
    // The first service dies: restarted with what follows it, counted, and, past the
    // threshold, the resource moves to beta.
    std::fs::remove_file(dir.path().join("first.alpha")).unwrap();
    s.cluster.wait_for(Beta, "Primary after alpha's failure", Duration::from_secs(60), |st| {
        str_at(st, &["role"]) == "Primary" && chain_running(st)
    });
    s.cluster
        .wait_for(Alpha, "Secondary", Duration::from_secs(30), |st| str_at(st, &["role"]) == "Secondary");
    assert!(!dir.path().join("second.alpha").exists());
    // `events` reported the services' transitions.
    let mut events = events;
    let _ = events.kill();
    let out = events.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().any(|l| l.contains("\"object\":\"service\"")
            && l.contains("exec:first")
            && l.contains("\"running\"")),
        "no service event in:\n{text}"
    );
    assert!(text.lines().any(|l| l.contains("exec:first") && l.contains("\"failures\":1")), "{text}");
    s.finish(0);
}

fn chain_running(status: &Json) -> bool {
    let Some(Json::Arr(services)) = status.get("ha").and_then(|h| h.get("services")) else { return false };
    let states: Vec<&str> = services.iter().filter_map(|s| s.get("state")).map(Json::as_str).collect();
    states == ["running", "running"]
}
