//! `rdbd events` and `rdbd wait-sync` against two real daemons: what the event stream reports
//! through an initial sync and a reconnect, and how wait-sync ends (in sync, StandAlone,
//! timeout).

mod common;

use std::process::Output;
use std::time::Duration;

use common::cluster::{is_end_of_exists, str_at, Alpha, Beta, Cluster, Node, Options};
use common::{assert_one_line_error, Json};

const SYNC_TIMEOUT: Duration = Duration::from_secs(60);
const STREAM_TIMEOUT: Duration = Duration::from_secs(20);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn parse_stream(out: &Output, node: Node) -> Vec<Json> {
    assert!(out.status.success(), "events on {} failed ({}): {}", node.name(), out.status, text(&out.stderr));
    text(&out.stdout).lines().map(Json::parse).collect()
}

/// Index of the first event at or after `from` matching `event`, `object` and `key == value`.
fn find(events: &[Json], from: usize, event: &str, object: &str, key: &str, value: &str) -> Option<usize> {
    (from..events.len()).find(|&i| {
        let e = &events[i];
        str_at(e, &["event"]) == event
            && str_at(e, &["object"]) == object
            && e.get(key).is_some_and(|v| matches!(v, Json::Str(s) if s == value))
    })
}

fn expect(
    events: &[Json],
    from: usize,
    event: &str,
    object: &str,
    key: &str,
    value: &str,
    node: Node,
) -> usize {
    find(events, from, event, object, key, value).unwrap_or_else(|| {
        let lines: Vec<String> = events.iter().map(|e| format!("{e:?}")).collect();
        panic!(
            "{}: no {event} {object} {key}={value} after line {from}; the stream:\n{}",
            node.name(),
            lines.join("\n")
        )
    })
}

/// The `exists` block: every object once, the `-` marker last, all before the first change.
fn check_exists_block(events: &[Json], node: Node) -> usize {
    let end = events.iter().position(is_end_of_exists).expect("the exists block ends with -");
    let objects: Vec<&str> = events[..end].iter().map(|e| str_at(e, &["object"])).collect();
    assert_eq!(objects, ["resource", "device", "connection", "peer-device"], "{}: {events:?}", node.name());
    for e in &events[..=end] {
        assert_eq!(str_at(e, &["event"]), "exists", "{e:?}");
        assert_eq!(str_at(e, &["resource"]), "r0", "{e:?}");
        assert_eq!(str_at(e, &["node"]), node.name(), "{e:?}");
        assert!(!str_at(e, &["time"]).is_empty(), "{e:?}");
    }
    assert!(events[end + 1..].iter().all(|e| str_at(e, &["event"]) != "exists"), "{events:?}");
    end
}

#[test]
fn events_follow_an_initial_sync_a_reconnect_and_the_end() {
    let mut c = Cluster::new(Options::default());
    c.start_both();
    for node in Node::BOTH {
        c.wait_for(node, "connected", Duration::from_secs(30), |s| str_at(s, &["connection"]) == "Connected");
    }
    let mut streams = [c.follow_events(Alpha), c.follow_events(Beta)];

    c.verb_ok(Alpha, &["primary", "--force"]);
    // Right after promoting, the peer is still Inconsistent: wait-sync waits out the full sync.
    let waited = c.verb_ok(Alpha, &["wait-sync"]);
    let stdout = text(&waited.stdout);
    assert_eq!(stdout.lines().last(), Some("r0: UpToDate/UpToDate"), "{stdout}");
    let all_output = stdout + &text(&waited.stderr);
    assert!(!all_output.contains('\x1b'), "terminal escapes without a terminal: {all_output:?}");
    c.wait_in_sync(SYNC_TIMEOUT);

    c.verb_ok(Alpha, &["disconnect"]);
    c.verb_ok(Alpha, &["connect"]);
    c.wait_in_sync(SYNC_TIMEOUT);
    // The other requests are served while two subscriptions stay open.
    assert_eq!(str_at(&c.status(Alpha), &["role"]), "Primary");

    c.verb_ok(Alpha, &["secondary"]);
    c.down(Alpha);
    c.down(Beta);
    let [alpha, beta] = Node::BOTH.map(|node| {
        let out = streams[node as usize].wait(STREAM_TIMEOUT);
        parse_stream(&out, node)
    });

    let start = check_exists_block(&alpha, Alpha);
    let promoted = expect(&alpha, start, "change", "resource", "role", "Primary", Alpha);
    let syncing = expect(&alpha, start, "change", "peer-device", "replication", "SyncSource", Alpha);
    let synced = expect(&alpha, syncing, "change", "peer-device", "peer_disk", "UpToDate", Alpha);
    assert!(promoted < synced, "alpha: Primary before the sync ended: {alpha:?}");
    let dropped = expect(&alpha, synced, "change", "connection", "connection", "StandAlone", Alpha);
    let back = expect(&alpha, dropped, "change", "connection", "connection", "Connected", Alpha);
    expect(&alpha, back, "change", "resource", "role", "Secondary", Alpha);
    let last = alpha.last().unwrap();
    assert_eq!((str_at(last, &["event"]), str_at(last, &["object"])), ("destroy", "resource"), "{alpha:?}");

    let start = check_exists_block(&beta, Beta);
    assert_eq!(str_at(&beta[1], &["disk"]), "Inconsistent", "{beta:?}");
    let target = expect(&beta, start, "change", "peer-device", "replication", "SyncTarget", Beta);
    let up_to_date = expect(&beta, target, "change", "device", "disk", "UpToDate", Beta);
    let primary_peer = expect(&beta, start, "change", "connection", "peer_role", "Primary", Beta);
    assert!(primary_peer < target, "beta: the Primary peer before the sync: {beta:?}");
    let gone = expect(&beta, up_to_date, "change", "connection", "connection", "Connecting", Beta);
    expect(&beta, gone, "change", "connection", "connection", "Connected", Beta);
    // Progress lines, if the sync lasted long enough for one, carry the numbers.
    for e in beta.iter().chain(&alpha).filter(|e| str_at(e, &["event"]) == "progress") {
        let p = e.field("progress");
        assert!((0.0..=100.0).contains(&p.field("done_percent").as_f64()), "{e:?}");
        p.field("remaining_bytes").as_u64();
    }
    assert_eq!(str_at(beta.last().unwrap(), &["event"]), "destroy", "{beta:?}");
}

#[test]
fn wait_sync_fails_naming_the_reason_and_events_needs_a_daemon() {
    let secret = [Some("s3cret".to_string()), Some("other".to_string())];
    let mut c = Cluster::new(Options { secret, ..Options::default() });
    let stderr = c.verb_fails(Alpha, &["events", "--now"]);
    assert_one_line_error(&stderr, &["r0", "no daemon"]);
    let stderr = c.verb_fails(Alpha, &["wait-sync"]);
    assert_one_line_error(&stderr, &["r0", "no daemon"]);

    // Alone, alpha keeps trying to connect: the timeout ends the wait.
    c.start(Alpha);
    let stderr = c.verb_fails(Alpha, &["wait-sync", "--timeout", "1s"]);
    assert_one_line_error(&stderr, &["r0", "not in sync after 1s"]);

    // A wrong secret leaves the dialer StandAlone with a reason.
    c.start(Beta);
    let s = c.wait_for(Alpha, "StandAlone", Duration::from_secs(30), |s| {
        str_at(s, &["connection"]) == "StandAlone" && !matches!(s.field("last_error"), Json::Null)
    });
    let reason = s.field("last_error").as_str().to_string();
    let stderr = c.verb_fails(Alpha, &["wait-sync", "--timeout", "1s"]);
    assert_one_line_error(&stderr, &["r0", "StandAlone", &reason]);
    let stderr = c.verb_fails(Alpha, &["wait-sync", "--timeout", "soon"]);
    assert!(stderr.contains("invalid duration"), "{stderr}");
}
