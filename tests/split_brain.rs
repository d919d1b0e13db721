//! Automatic split-brain recovery (after-sb-0pri, -1pri, -2pri), the split-brain and
//! pri-lost-after-sb handlers, and rr-conflict, with two real daemons driven through the CLI.
//!
//! Every scenario splits an in-sync pair the way an operator would: both `disconnect`, beta
//! becomes Primary too, each writes blocks of its own and blocks both write (with different
//! data), the roles are set for the policy under test, and both `connect`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::blocks::{
    assert_tagged_blocks, wait_no_clients, write_tagged_blocks, zero_blocks, HOLD_CONNECTION,
};
use common::cluster::{assert_ok, str_at, Alpha, Background, Beta, Cluster, Node, Options, MIB, RES};
use common::relay::Relay;
use common::{have_python_nbd, python_nbd, Json};
use rdbd_protocol::repl::kind;
use rustix::process::Signal;

const SYNC_TIMEOUT: Duration = Duration::from_secs(60);
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(30);
/// Small disks: the initial full sync of each pair is quick.
const FILE_SIZE: u64 = 32 * MIB;
const SLOTS: u64 = 256;
const BLOCK: u64 = 4096;
/// Where alpha and beta write blocks of their own, and blocks both write.
const OWN: [u64; 2] = [0, 2 * MIB];
const SHARED: u64 = 4 * MIB;

fn idx(node: Node) -> usize {
    node as usize
}

/// Tells alpha's blocks from beta's.
fn tag(node: Node) -> u64 {
    idx(node) as u64 + 1
}

/// What each node writes while apart: (own blocks, shared blocks).
type Writes = [(u64, u64); 2];

fn options(net: &str, tables: &str) -> Options {
    Options { file_size: [FILE_SIZE; 2], net: net.into(), tables: tables.into(), ..Options::default() }
}

/// An in-sync pair (alpha Primary) split apart: both disconnect, beta becomes Primary after
/// alpha (alpha is the older Primary), both write `writes`, and every node not in `primaries`
/// becomes Secondary again. Nothing is connected yet.
fn split(opts: Options, writes: Writes, primaries: &[Node]) -> Cluster {
    let mut c = Cluster::new(opts);
    c.start_primary_pair();
    for node in Node::BOTH {
        c.verb_ok(node, &["disconnect"]);
    }
    // UpToDate and disconnected: no --force needed.
    c.verb_ok(Beta, &["primary"]);
    for node in Node::BOTH {
        let (own, shared) = writes[idx(node)];
        if own > 0 {
            write_tagged_blocks(&c, node, OWN[idx(node)], SLOTS, own, tag(node));
        }
        if shared > 0 {
            write_tagged_blocks(&c, node, SHARED, SLOTS, shared, tag(node));
        }
    }
    for node in Node::BOTH {
        if !primaries.contains(&node) {
            wait_no_clients(&c, node);
            c.verb_ok(node, &["secondary"]);
        }
    }
    c
}

fn connect_both(c: &Cluster) {
    for node in [Beta, Alpha] {
        c.verb_ok(node, &["connect"]);
    }
}

/// The stream of `rdbd events` that `follow_events` started, up to now.
fn stream_lines(mut stream: Background, node: Node) -> Vec<Json> {
    let out = stream.stop(Some(Signal::TERM), Duration::from_secs(20));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!text.is_empty(), "no events from {}", node.name());
    text.lines().map(Json::parse).collect()
}

/// `loser` went SyncTarget and then UpToDate, as its event stream tells.
fn assert_was_sync_target(events: &[Json], loser: Node) {
    let field = |e: &Json, key: &str| match e.get(key) {
        Some(Json::Str(s)) => s.clone(),
        _ => String::new(),
    };
    let target = events.iter().position(|e| {
        str_at(e, &["event"]) == "change"
            && str_at(e, &["object"]) == "peer-device"
            && field(e, "replication") == "SyncTarget"
    });
    let up_to_date = target.and_then(|t| {
        events[t..].iter().position(|e| {
            str_at(e, &["event"]) == "change"
                && str_at(e, &["object"]) == "device"
                && field(e, "disk") == "UpToDate"
        })
    });
    assert!(
        up_to_date.is_some(),
        "{} was not SyncTarget and then UpToDate; its events:\n{}",
        loser.name(),
        events.iter().map(|e| format!("{e:?}")).collect::<Vec<_>>().join("\n")
    );
}

/// After `connect`: `winner`'s data is on both disks (its own and the shared blocks; the
/// loser's own blocks are back to what the winner has there, zeros), the disks are identical,
/// the resync moved exactly the blocks changed on either side, the loser was the sync target,
/// and online verify finds nothing out of sync.
fn assert_resolved(c: &Cluster, winner: Node, writes: Writes, loser_events: Background) {
    let loser = winner.peer();
    c.wait_in_sync(SYNC_TIMEOUT);
    for node in Node::BOTH {
        let (own, shared) = writes[idx(winner)];
        assert_tagged_blocks(c, node, OWN[idx(winner)], SLOTS, own, tag(winner));
        assert_tagged_blocks(c, node, SHARED, SLOTS, shared, tag(winner));
        let loser_own = OWN[idx(loser)];
        let zeros = zero_blocks(c, node, loser_own..loser_own + SLOTS * BLOCK);
        assert_eq!(zeros as u64, SLOTS, "{}: {}'s own changes were not discarded", node.name(), loser.name());
    }
    c.assert_same_data();
    let changed = writes[0].0 + writes[1].0 + writes[0].1.max(writes[1].1);
    let s = c.status(loser);
    let resynced = s.field("last_resync_bytes").as_u64();
    assert_eq!(resynced, changed * BLOCK, "{changed} blocks changed: {s:?}");
    assert_was_sync_target(&stream_lines(loser_events, loser), loser);
    let out = c.verb_ok(loser, &["verify"]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("no blocks out of sync"), "verify after the recovery: {report}");
}

/// One policy: split, connect, and `winner`'s data must win.
fn resolves(net: &str, writes: Writes, primaries: &[Node], winner: Node) {
    if !have_python_nbd() {
        return;
    }
    let c = split(options(net, ""), writes, primaries);
    let events = c.follow_events(winner.peer());
    connect_both(&c);
    assert_resolved(&c, winner, writes, events);
    for node in Node::BOTH {
        let role = if primaries.contains(&node) { "Primary" } else { "Secondary" };
        assert_eq!(str_at(&c.status(node), &["role"]), role, "{}", node.name());
    }
    // Both nodes say alike who lost, and why.
    let line = |node| {
        let log = c.log(node);
        let line = log.lines().find(|l| l.contains("split brain resolved by")).map(|l| {
            let at = l.find("split brain resolved by").unwrap();
            l[at..].to_string()
        });
        line.unwrap_or_else(|| panic!("{} logged no resolution\n{}", node.name(), c.diag()))
    };
    let (a, b) = (line(Alpha), line(Beta));
    assert_eq!(a, b);
    assert!(a.contains(&format!("{}'s changes are discarded", winner.peer().name())), "{a}");
}

#[test]
fn after_sb_0pri_discard_zero_changes_discards_the_side_that_wrote_nothing() {
    resolves(r#"after-sb-0pri = "discard-zero-changes""#, [(0, 0), (24, 8)], &[], Beta);
}

#[test]
fn after_sb_0pri_discard_least_changes_keeps_the_side_with_more_changes() {
    resolves(r#"after-sb-0pri = "discard-least-changes""#, [(32, 16), (16, 16)], &[], Alpha);
}

/// Beta became Primary after the split: the younger Primary loses, although it changed more
/// (least-changes, the fallback when the roles cannot tell, would pick alpha).
#[test]
fn after_sb_0pri_discard_younger_primary_discards_the_node_promoted_later() {
    resolves(r#"after-sb-0pri = "discard-younger-primary""#, [(16, 8), (32, 16)], &[], Alpha);
}

#[test]
fn after_sb_0pri_discard_older_primary_discards_the_primary_at_the_split() {
    resolves(r#"after-sb-0pri = "discard-older-primary""#, [(32, 16), (16, 8)], &[], Beta);
}

#[test]
fn after_sb_0pri_discard_node_discards_the_named_node() {
    resolves(r#"after-sb-0pri = "discard-node-beta""#, [(16, 8), (32, 16)], &[], Alpha);
}

#[test]
fn after_sb_1pri_discard_secondary_keeps_the_primary() {
    resolves(r#"after-sb-1pri = "discard-secondary""#, [(32, 16), (16, 8)], &[Beta], Beta);
}

/// consensus: the 0pri result stands because it discards the Secondary.
#[test]
fn after_sb_1pri_consensus_follows_0pri_when_it_discards_the_secondary() {
    let net = "after-sb-0pri = \"discard-least-changes\"\nafter-sb-1pri = \"consensus\"";
    resolves(net, [(32, 16), (16, 8)], &[Alpha], Alpha);
}

/// A file a handler appends its `$RDBD_EVENT $RDBD_RESOURCE $RDBD_PEER` to, per node.
fn handler_command(marks: &Path, name: &str) -> String {
    format!(
        "echo \"$RDBD_EVENT $RDBD_RESOURCE $RDBD_PEER\" >> '{}'.\"$RDBD_NODE\"",
        marks.join(name).display()
    )
}

fn handler_lines(marks: &Path, name: &str, node: Node) -> Vec<String> {
    let file = marks.join(format!("{name}.{}", node.name()));
    std::fs::read_to_string(file).unwrap_or_default().lines().map(str::to_string).collect()
}

/// The default (disconnect): StandAlone on both with the policy's reason, each disk keeps its
/// own data, and the split-brain handler runs on both nodes with its environment.
#[test]
fn unresolved_split_brain_stays_standalone_and_runs_the_split_brain_handler() {
    if !have_python_nbd() {
        return;
    }
    let marks = tempfile::tempdir().unwrap();
    let tables = format!("[handlers]\nsplit-brain = {:?}\n", handler_command(marks.path(), "split-brain"));
    let writes = [(16, 8), (16, 8)];
    let c = split(options("", &tables), writes, &[]);
    connect_both(&c);
    let errors = c.wait_standalone(REFUSAL_TIMEOUT);
    for (node, error) in Node::BOTH.iter().zip(&errors) {
        assert!(error.contains("split brain"), "{}: {error}", node.name());
        assert!(error.contains("after-sb-0pri is disconnect"), "{}: {error}", node.name());
        assert_tagged_blocks(&c, *node, SHARED, SLOTS, 8, tag(*node));
        assert_tagged_blocks(&c, *node, OWN[idx(*node)], SLOTS, 16, tag(*node));
    }
    for node in Node::BOTH {
        let expected = format!("split-brain r0 {}", node.peer().name());
        let ran = common::wait_until(Duration::from_secs(10), || {
            handler_lines(marks.path(), "split-brain", node).contains(&expected)
        });
        assert!(ran, "{}: handler lines {:?}", node.name(), handler_lines(marks.path(), "split-brain", node));
    }
}

/// after-sb-2pri call-pri-lost-after-sb (with 0pri discard-node-beta): beta, Primary, loses.
/// While an NBD client uses it, it cannot give up its role: the pri-lost-after-sb handler runs
/// there and both nodes go StandAlone. Once the client is gone, the next connect demotes beta
/// and resyncs it from alpha.
#[test]
fn after_sb_2pri_call_pri_lost_after_sb_demotes_the_loser_or_runs_its_handler() {
    if !have_python_nbd() {
        return;
    }
    let marks = tempfile::tempdir().unwrap();
    let net = "after-sb-0pri = \"discard-node-beta\"\nafter-sb-2pri = \"call-pri-lost-after-sb\"";
    let tables = format!("[handlers]\npri-lost-after-sb = {:?}\n", handler_command(marks.path(), "pri-lost"));
    let writes = [(16, 8), (32, 16)];
    let c = split(options(net, &tables), writes, &[Alpha, Beta]);

    let release = marks.path().join("release");
    let mut cmd = python_nbd(HOLD_CONNECTION, &[&c.nbd_uri(Beta), release.to_str().unwrap()]);
    let mut client = Background::spawn(&mut cmd, marks.path(), "hold");
    c.wait_for(Beta, "serving a client", Duration::from_secs(20), |s| s.field("nbd_clients").as_u64() == 1);
    connect_both(&c);
    let errors = c.wait_standalone(REFUSAL_TIMEOUT);
    for (node, error) in Node::BOTH.iter().zip(&errors) {
        assert!(
            error.contains("split brain") && error.contains("cannot become Secondary"),
            "{}: {error}",
            node.name()
        );
    }
    let ran = common::wait_until(Duration::from_secs(10), || {
        handler_lines(marks.path(), "pri-lost", Beta) == ["pri-lost-after-sb r0 alpha"]
    });
    assert!(ran, "beta's pri-lost-after-sb handler: {:?}", handler_lines(marks.path(), "pri-lost", Beta));
    assert!(handler_lines(marks.path(), "pri-lost", Alpha).is_empty(), "the winner ran pri-lost-after-sb");
    assert_tagged_blocks(&c, Beta, OWN[1], SLOTS, 32, tag(Beta));
    assert_eq!(str_at(&c.status(Beta), &["role"]), "Primary");

    std::fs::write(&release, b"").unwrap();
    let out = client.wait(Duration::from_secs(30));
    assert_ok(&out, "the held NBD client", &c);
    wait_no_clients(&c, Beta);
    let events = c.follow_events(Beta);
    connect_both(&c);
    assert_resolved(&c, Alpha, writes, events);
    assert_eq!(str_at(&c.status(Alpha), &["role"]), "Primary");
    assert_eq!(str_at(&c.status(Beta), &["role"]), "Secondary");
    // A Primary that could give up its role has lost nothing it serves: no handler.
    assert_eq!(handler_lines(marks.path(), "pri-lost", Beta).len(), 1, "pri-lost-after-sb ran again");
}

/// rr-conflict retry-connect: beta (which connects with --discard-my-data) is Primary, so it
/// would become sync target. Both nodes keep connecting instead of going StandAlone, and the
/// resync starts once beta is Secondary.
#[test]
fn rr_conflict_retry_connect_keeps_connecting_until_the_primary_is_demoted() {
    if !have_python_nbd() {
        return;
    }
    let writes = [(16, 8), (16, 8)];
    let c = split(options(r#"rr-conflict = "retry-connect""#, ""), writes, &[]);
    c.verb_ok(Beta, &["connect", "--discard-my-data"]);
    c.verb_ok(Beta, &["primary"]);
    c.verb_ok(Alpha, &["connect"]);
    for node in Node::BOTH {
        c.wait_for(
            node,
            "refusing for the rr-conflict",
            REFUSAL_TIMEOUT,
            |s| matches!(s.field("last_error"), Json::Str(e) if e.contains("rr-conflict retry-connect")),
        );
    }
    // Three more attempts (one per connect interval, 500 ms here), each refused: still trying,
    // never StandAlone.
    let attempts = || c.log(Beta).matches(": connected peer=").count();
    let target = attempts() + 3;
    let deadline = std::time::Instant::now() + REFUSAL_TIMEOUT;
    while attempts() < target {
        for node in Node::BOTH {
            let s = c.status(node);
            assert_ne!(str_at(&s, &["connection"]), "StandAlone", "{}: {s:?}", node.name());
            assert_ne!(str_at(&s, &["replication"]), "SyncTarget", "{}: {s:?}", node.name());
        }
        assert!(std::time::Instant::now() < deadline, "beta stopped connecting\n{}", c.diag());
        std::thread::sleep(Duration::from_millis(50));
    }
    let events = c.follow_events(Beta);
    c.verb_ok(Beta, &["secondary"]);
    assert_resolved(&c, Alpha, writes, events);
}

/// A sync source whose SyncUuid never arrived (a one-way cut right before it) still shares its
/// current generation with the target, and has a bitmap identifier set. Both are then promoted
/// alone and write: the target (UpToDate still, as the resync never started there) first, then
/// the source, which stays Primary. The source must take a generation of its own despite the
/// bitmap identifier: otherwise the target's new generation, started from the shared one,
/// counts as newer, the Primary would be its sync target, and every reconnect is refused, with
/// no split brain found for the operator to resolve. Found by the simulator (seed 879769).
#[test]
fn a_source_whose_sync_uuid_was_lost_promoted_alone_makes_a_split_brain() {
    if !have_python_nbd() {
        return;
    }
    let mut c = Cluster::new(options("", ""));
    // Alpha dials beta through the relay.
    let relay = Relay::start(c.repl_addr(Beta));
    let config = c.info(Alpha).config_dir.join(format!("{RES}.toml"));
    let text = std::fs::read_to_string(&config).unwrap();
    let beta = format!("address = \"{}\"", c.repl_addr(Beta));
    assert!(text.contains(&beta), "{text}");
    std::fs::write(&config, text.replace(&beta, &format!("address = \"127.0.0.1:{}\"", relay.port))).unwrap();
    c.start_primary_pair();
    write_tagged_blocks(&c, Alpha, SHARED, SLOTS, 8, 0);

    // Alpha crashes as Primary: at its return it is the source of its activity log's resync,
    // and the SyncUuid it sends is lost with all that follows on the link.
    relay.lose_from(kind::SYNC_UUID);
    c.kill(Alpha);
    c.start(Alpha);
    assert!(common::wait_until(SYNC_TIMEOUT, || relay.lost()), "no SyncUuid sent\n{}", c.diag());
    for node in Node::BOTH {
        c.wait_for(node, "without the peer", SYNC_TIMEOUT, |s| str_at(s, &["connection"]) != "Connected");
    }
    let (a, b) = (c.status(Alpha), c.status(Beta));
    // The role flag (bit 0) aside.
    let gens =
        |s: &Json, which: &str| u64::from_str_radix(str_at(s, &["generations", which]), 16).unwrap() & !1;
    assert_ne!(gens(&a, "bitmap"), 0, "alpha holds the sync identifier: {a:?}");
    assert_eq!(gens(&a, "current"), gens(&b, "current"), "beta never adopted it: {b:?}");

    // Both write alone, beta first; alpha stays Primary.
    for node in [Beta, Alpha] {
        c.verb_ok(node, &["primary"]);
        write_tagged_blocks(&c, node, OWN[idx(node)], SLOTS, 16, tag(node));
    }
    wait_no_clients(&c, Beta);
    c.verb_ok(Beta, &["secondary"]);

    // Reconnected: both wrote, a split brain (after-sb-1pri disconnect), not a refusal forever.
    relay.mend();
    let errors = c.wait_standalone(REFUSAL_TIMEOUT);
    for (node, error) in Node::BOTH.iter().zip(&errors) {
        assert!(error.contains("split brain"), "{}: {error}\n{}", node.name(), c.diag());
    }
    // The operator's recovery: beta's changes go.
    c.verb_ok(Beta, &["connect", "--discard-my-data"]);
    c.verb_ok(Alpha, &["connect"]);
    c.wait_in_sync(SYNC_TIMEOUT);
    for node in Node::BOTH {
        assert_tagged_blocks(&c, node, OWN[idx(Alpha)], SLOTS, 16, tag(Alpha));
        let own = OWN[idx(Beta)];
        assert_eq!(zero_blocks(&c, node, own..own + SLOTS * BLOCK) as u64, SLOTS, "{}", node.name());
    }
    c.assert_same_data();
}
