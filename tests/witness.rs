//! The quorum witness as a process (`rdbd witness`), spoken to over TCP by two nodes through
//! the library's witness channel: the lease goes to one node at a time, a partitioned node is
//! outdated and stays so across a restart of the witness, a wrong secret and garbage are refused
//! without harm.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use rdbd::witness::channel::Channel;
use rdbd::witness::WitnessError;
use rdbd_protocol::witness::Claim;

const SECRET: &str = "witness-test-secret";

struct Witness {
    child: Child,
    addr: String,
    dir: Option<tempfile::TempDir>,
    state: std::path::PathBuf,
    lease: String,
}

impl Witness {
    fn start(dir: tempfile::TempDir, lease: &str) -> Witness {
        let state = dir.path().join("witness.json");
        let mut child = Command::new(rdbd_bin())
            .args(["witness", "--listen", "127.0.0.1:0", "--lease", lease, "--state"])
            .arg(&state)
            .env("RDBD_WITNESS_SECRET", SECRET)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start rdbd witness");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        while stderr.read_line(&mut line).unwrap() > 0 && !line.contains("listening on") {
            line.clear();
        }
        let addr = line.trim().rsplit(' ').next().unwrap().to_string();
        // Keep draining its log so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in stderr.lines() {});
        Witness { child, addr, dir: Some(dir), state, lease: lease.into() }
    }

    /// Kills the witness and starts a new one on the same state file.
    fn restart(mut self) -> Witness {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let lease = self.lease.clone();
        Witness::start(self.dir.take().unwrap(), &lease)
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn connect(addr: &str, secret: &str, node: &str) -> Result<Channel, WitnessError> {
    connect_to(addr, secret, "r0", node).await
}

async fn connect_to(addr: &str, secret: &str, resource: &str, node: &str) -> Result<Channel, WitnessError> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    Channel::connect(stream, secret.as_bytes(), resource, node).await
}

/// Waits until the witness is past its first lease period (it grants nothing before): a probe of
/// another resource, which leaves r0's lease and outdated nodes alone, asks until it is granted.
async fn wait_grants(w: &Witness) {
    let mut probe = connect_to(&w.addr, SECRET, "probe", "p1").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for seq in 1.. {
        if ask(&mut probe, claim(seq, "p2", true, true)).await.granted {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "the witness granted nothing within 10 s of its start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn claim(seq: u64, peer: &str, want: bool, connected: bool) -> Claim {
    Claim {
        seq,
        want_lease: want,
        peer: peer.into(),
        peer_connected: connected,
        up_to_date: true,
        peer_up_to_date: connected,
        forced: false,
    }
}

async fn ask(ch: &mut Channel, c: Claim) -> rdbd_protocol::witness::Verdict {
    ch.send_claim(c).await.unwrap();
    ch.read_verdict().await.unwrap()
}

#[tokio::test]
async fn one_lease_at_a_time_and_the_partitioned_node_stays_outdated_across_a_restart() {
    let w = Witness::start(tempfile::tempdir().unwrap(), "1s");
    let mut alpha = connect(&w.addr, SECRET, "alpha").await.unwrap();
    let mut beta = connect(&w.addr, SECRET, "beta").await.unwrap();
    // Nothing is granted in the first lease period after the start.
    assert!(!ask(&mut alpha, claim(1, "beta", true, true)).await.granted);
    wait_grants(&w).await;
    let a = ask(&mut alpha, claim(2, "beta", true, true)).await;
    assert!(a.granted && a.holder == "alpha" && a.lease_ms == 1000, "{a:?}");
    // Cut apart: alpha keeps renewing and reports beta gone; beta is refused and outdated.
    assert!(ask(&mut alpha, claim(3, "beta", true, false)).await.granted);
    let b = ask(&mut beta, claim(1, "alpha", true, false)).await;
    assert!(!b.granted && b.outdated && b.holder == "alpha", "{b:?}");
    // Alpha dies; its lease runs out (no holder), but beta lacks its writes and gets nothing.
    drop(alpha);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for seq in 2.. {
        let b = ask(&mut beta, claim(seq, "alpha", true, false)).await;
        assert!(!b.granted && b.outdated, "{b:?}");
        if b.holder.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "alpha's 1 s lease did not run out within 10 s: {b:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let state = std::fs::read_to_string(&w.state).unwrap();
    assert!(state.contains("beta"), "{state}");

    // A restarted witness remembers.
    let w = w.restart();
    let mut beta = connect(&w.addr, SECRET, "beta").await.unwrap();
    // Past the start-up period, so that the refusal is for the remembered outdate.
    wait_grants(&w).await;
    let b = ask(&mut beta, claim(1, "alpha", true, false)).await;
    assert!(!b.granted && b.outdated, "{b:?}");
    // In sync again with alpha (both UpToDate, connected): beta may hold the lease again.
    let b = ask(&mut beta, claim(2, "alpha", true, true)).await;
    assert!(b.granted && !b.outdated, "{b:?}");
}

#[tokio::test]
async fn a_wrong_secret_replayed_claims_and_garbage_are_refused_and_the_witness_carries_on() {
    let w = Witness::start(tempfile::tempdir().unwrap(), "1s");
    match connect(&w.addr, "not-the-secret", "alpha").await {
        Err(WitnessError::AuthFailed | WitnessError::Refused(_)) => {}
        other => panic!("a wrong secret must fail authentication: {:?}", other.err()),
    }
    // Garbage instead of a Hello: the connection is dropped.
    let mut raw = std::net::TcpStream::connect(&w.addr).unwrap();
    raw.write_all(&[0xff; 64]).unwrap();
    let mut buf = Vec::new();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = std::io::Read::read_to_end(&mut raw, &mut buf);
    // A claim that does not advance the sequence ends the connection.
    let mut alpha = connect(&w.addr, SECRET, "alpha").await.unwrap();
    ask(&mut alpha, claim(5, "beta", false, true)).await;
    alpha.send_claim(claim(5, "beta", true, true)).await.unwrap();
    assert!(alpha.read_verdict().await.is_err(), "a replayed claim must not be answered");
    // A third node of the same resource is refused.
    let mut beta = connect(&w.addr, SECRET, "beta").await.unwrap();
    ask(&mut beta, claim(1, "alpha", false, true)).await;
    let mut gamma = connect(&w.addr, SECRET, "gamma").await.unwrap();
    gamma.send_claim(claim(1, "alpha", true, false)).await.unwrap();
    match gamma.read_verdict().await {
        Err(WitnessError::Refused(message)) => assert!(message.contains("third"), "{message}"),
        other => panic!("a third node must be refused: {other:?}"),
    }
    // And the witness still answers.
    let mut alpha = connect(&w.addr, SECRET, "alpha").await.unwrap();
    assert_eq!(ask(&mut alpha, claim(1, "beta", false, true)).await.seq, 1);
}
