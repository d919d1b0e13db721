//! What `rdbd events` streams: the node's state changes as JSON lines, shaped like
//! `drbdsetup events2`.
//!
//! Every state change goes through the node's state guard, which pokes [`EventHub::changed`]
//! when dropped after a mutation. The watcher task ([`watch`]) then snapshots the fields
//! events report, diffs them with the last snapshot and broadcasts one `change` per object that
//! differs. A change that is undone before the watcher wakes is coalesced away; what is
//! reported last is always the current state. While a resync or an online verify runs, a `progress` line follows
//! every second.
//!
//! The line shape (one JSON object per line; every line carries the object's full state):
//!
//! ```text
//! {"event":"exists","resource":"r0","node":"alpha","object":"resource","role":"Secondary","time":"…"}
//! {"event":"change","resource":"r0","node":"alpha","object":"device","disk":"UpToDate","out_of_sync_bytes":0,"time":"…"}
//! {"event":"change","resource":"r0","node":"alpha","object":"connection","peer":"beta","connection":"StandAlone","peer_role":"Unknown","reason":"split brain detected …","time":"…"}
//! {"event":"progress","resource":"r0","node":"alpha","object":"peer-device","peer":"beta","replication":"SyncSource","peer_disk":"Inconsistent","progress":{…},"time":"…"}
//! {"event":"exists","resource":"r0","node":"alpha","object":"-","time":"…"}
//! {"event":"detected","resource":"r0","node":"alpha","object":"split-brain","peer":"beta","detail":"…","time":"…"}
//! {"event":"call","resource":"r0","node":"alpha","object":"handler","handler":"split-brain","time":"…"}
//! {"event":"destroy","resource":"r0","node":"alpha","object":"resource","role":"Secondary","time":"…"}
//! ```

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::status::ResyncProgress;
use super::{Node, NodeState};
use crate::replication::states::{ConnState, DiskState, ReplState, Role};

/// Events a slow subscriber may fall behind by before it is resynchronised with full state.
const BACKLOG: usize = 1024;
/// How often a running resync reports its progress.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// The object's state when the subscription started (`--now`).
    Exists,
    /// The object's state changed; the line carries its new full state.
    Change,
    /// A resync's or verify's periodic progress (the peer-device's full state, with `progress`).
    Progress,
    /// Something happened that is not a state: a split brain was found.
    Detected,
    /// A handler is being run, and its result.
    Call,
    Response,
    /// The node is going down; the stream ends after this line.
    Destroy,
}

/// What an event is about (`"object"` in the line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "object", rename_all = "kebab-case")]
pub enum EventObject {
    /// The node's role in the resource.
    Resource { role: Role },
    /// The local disk, and the error that failed or detached it.
    Device {
        disk: DiskState,
        out_of_sync_bytes: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// The connection to the peer and what the peer is.
    Connection {
        peer: String,
        connection: ConnState,
        peer_role: Role,
        /// Why the node is StandAlone (status's `last_error`); absent otherwise.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Replication to the peer's disk.
    PeerDevice {
        peer: String,
        replication: ReplState,
        peer_disk: DiskState,
        /// While a resync or a verify runs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        progress: Option<ResyncProgress>,
    },
    /// End of the `exists` block (events2's `exists -`).
    #[serde(rename = "-")]
    EndOfExists,
    /// The sync handshake found that both nodes changed the data.
    SplitBrain { peer: String, detail: String },
    /// A service of the HA chain changed state (`change`).
    Service { service: String, state: super::ha_report::ServiceState, failures: u32 },
    /// A user handler (`call`), then its exit status (`response`).
    Handler {
        handler: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<i32>,
    },
}

/// One line of the stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub event: EventKind,
    pub resource: String,
    pub node: String,
    #[serde(flatten)]
    pub object: EventObject,
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
}

/// The state fields events report, as last broadcast.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Snapshot {
    role: Role,
    disk: DiskState,
    conn: ConnState,
    peer_role: Role,
    reason: Option<String>,
    repl: ReplState,
    peer_disk: DiskState,
    disk_error: Option<String>,
}

impl Snapshot {
    pub(super) fn of(s: &NodeState) -> Self {
        Snapshot {
            role: s.role,
            disk: s.disk,
            conn: s.conn,
            peer_role: s.peer_role,
            reason: if s.conn == ConnState::StandAlone { s.last_error.clone() } else { None },
            repl: s.repl,
            peer_disk: s.peer_disk,
            disk_error: s.disk_error.clone(),
        }
    }

    /// A resync or an online verify runs (both report progress).
    fn syncing(&self) -> bool {
        matches!(
            self.repl,
            ReplState::SyncSource | ReplState::SyncTarget | ReplState::VerifyS | ReplState::VerifyT
        )
    }
}

/// The node's side of the stream.
pub(super) struct EventHub {
    /// Poked by the state guard after a mutation.
    pub(super) changed: Notify,
    tx: broadcast::Sender<Event>,
    /// Held while diffing and sending, so a subscriber's `exists` snapshot and the changes it
    /// receives afterwards fit together exactly.
    last: Mutex<Snapshot>,
    adhoc_tx: mpsc::UnboundedSender<Event>,
    adhoc_rx: Mutex<Option<mpsc::UnboundedReceiver<Event>>>,
}

impl EventHub {
    pub(super) fn new(initial: &NodeState) -> Self {
        let (tx, _) = broadcast::channel(BACKLOG);
        let (adhoc_tx, adhoc_rx) = mpsc::unbounded_channel();
        EventHub {
            changed: Notify::new(),
            tx,
            last: Mutex::new(Snapshot::of(initial)),
            adhoc_tx,
            adhoc_rx: Mutex::new(Some(adhoc_rx)),
        }
    }
}

/// A subscription: the state at the moment of subscribing, then every event after it.
pub struct Subscription {
    /// Each object's state as `exists` lines, ended by the `-` marker.
    pub exists: Vec<Event>,
    pub events: broadcast::Receiver<Event>,
}

/// RFC 3339 in UTC with milliseconds, e.g. `2025-03-01T12:34:56.789Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (400-year eras of 146 097 days, with
/// years starting in March so the leap day falls last).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

impl Node {
    fn event(&self, event: EventKind, object: EventObject) -> Event {
        Event {
            event,
            resource: self.config.name.clone(),
            node: self.me().name.clone(),
            object,
            time: rfc3339(SystemTime::now()),
        }
    }

    fn object_resource(&self, s: &Snapshot) -> EventObject {
        EventObject::Resource { role: s.role }
    }

    fn object_device(&self, s: &Snapshot) -> EventObject {
        EventObject::Device {
            disk: s.disk,
            out_of_sync_bytes: self.out_of_sync_bytes(),
            error: s.disk_error.clone(),
        }
    }

    fn object_connection(&self, s: &Snapshot) -> EventObject {
        EventObject::Connection {
            peer: self.peer_config().name.clone(),
            connection: s.conn,
            peer_role: s.peer_role,
            reason: s.reason.clone(),
        }
    }

    fn object_peer_device(&self, s: &Snapshot) -> EventObject {
        let progress = if s.syncing() {
            let state = self.state.lock().expect("node state lock");
            self.resync_progress(&state, self.out_of_sync_bytes())
                .or_else(|| super::status::verify_progress(&state).map(|v| v.progress))
        } else {
            None
        };
        EventObject::PeerDevice {
            peer: self.peer_config().name.clone(),
            replication: s.repl,
            peer_disk: s.peer_disk,
            progress,
        }
    }

    /// Every object's state, in the order changes are reported.
    fn objects(&self, s: &Snapshot) -> [EventObject; 4] {
        [
            self.object_resource(s),
            self.object_device(s),
            self.object_connection(s),
            self.object_peer_device(s),
        ]
    }

    /// Subscribes to the stream. The `exists` block is the state the next change will be
    /// relative to: nothing falls between the two, and nothing is reported twice.
    pub fn subscribe_events(&self) -> Subscription {
        let last = self.events.last.lock().expect("event snapshot lock");
        let events = self.events.tx.subscribe();
        let mut exists: Vec<Event> =
            self.objects(&last).into_iter().map(|o| self.event(EventKind::Exists, o)).collect();
        drop(last);
        exists.push(self.event(EventKind::Exists, EventObject::EndOfExists));
        Subscription { exists, events }
    }

    /// Reports something that is not a state (a split brain, a handler call) to every
    /// subscriber, after the state changes that preceded it. Safe to call while holding the
    /// node state.
    pub fn emit_event(&self, kind: EventKind, object: EventObject) {
        // Queued for the watcher, which first reports pending state changes.
        let _ = self.events.adhoc_tx.send(self.event(kind, object));
    }

    /// Diffs the state with the last snapshot and broadcasts a change per object that differs;
    /// with `progress`, a progress line too if a resync runs.
    fn publish_changes(&self, progress: bool) {
        let mut last = self.events.last.lock().expect("event snapshot lock");
        let now = Snapshot::of(&self.state.lock().expect("node state lock"));
        let send = |object| {
            // No subscriber is not an error.
            let _ = self.events.tx.send(self.event(EventKind::Change, object));
        };
        if now.conn != last.conn || now.peer_role != last.peer_role || now.reason != last.reason {
            send(self.object_connection(&now));
        }
        let peer_device_changed = now.repl != last.repl || now.peer_disk != last.peer_disk;
        if peer_device_changed {
            send(self.object_peer_device(&now));
        }
        if now.disk != last.disk || now.disk_error != last.disk_error {
            send(self.object_device(&now));
        }
        if now.role != last.role {
            send(self.object_resource(&now));
        }
        if progress && now.syncing() && !peer_device_changed {
            let _ = self.events.tx.send(self.event(EventKind::Progress, self.object_peer_device(&now)));
        }
        *last = now;
    }
}

/// Turns state changes into events until `done` (the node has stopped); ends with `destroy`.
pub(super) async fn watch(node: Arc<Node>, done: CancellationToken) {
    let Some(mut adhoc) = node.events.adhoc_rx.lock().expect("event queue lock").take() else {
        return; // Already watched.
    };
    let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = done.cancelled() => break,
            _ = node.events.changed.notified() => node.publish_changes(false),
            _ = tick.tick() => node.publish_changes(true),
            Some(event) = adhoc.recv() => {
                node.publish_changes(false);
                let _ = node.events.tx.send(event);
            }
        }
    }
    node.publish_changes(false);
    while let Ok(event) = adhoc.try_recv() {
        let _ = node.events.tx.send(event);
    }
    let role = node.events.last.lock().expect("event snapshot lock").role;
    let _ = node.events.tx.send(node.event(EventKind::Destroy, EventObject::Resource { role }));
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::metadata::store::{self, CreateOptions};

    /// A node of a two-node resource on a small file, attached but not connected.
    fn node(dir: &std::path::Path) -> Arc<Node> {
        let disk = dir.join("alpha.img");
        std::fs::File::create(&disk).unwrap().set_len(64 << 20).unwrap();
        let text = format!(
            "[[node]]\nname = \"alpha\"\naddress = \"127.0.0.1:1\"\ndisk = \"{}\"\n\n\
             [[node]]\nname = \"beta\"\naddress = \"127.0.0.1:2\"\ndisk = \"/nonexistent\"\n",
            disk.display()
        );
        let config = crate::config::parse(&dir.join("r0.toml"), &text).unwrap();
        let me = &config.nodes[0];
        let opts = CreateOptions {
            bitmap_block: config.disk.bitmap_block as u32,
            al_extents: config.disk.al_extents,
            node_name: me.name.clone(),
        };
        store::create(&me.disk, &me.meta_disk, &opts, false).unwrap();
        Node::attach(config, 0).unwrap()
    }

    async fn next(events: &mut broadcast::Receiver<Event>) -> Event {
        tokio::time::timeout(Duration::from_secs(5), events.recv()).await.expect("an event").unwrap()
    }

    #[tokio::test]
    async fn changes_follow_the_exists_block_and_adhoc_events_follow_the_changes() {
        let dir = tempfile::tempdir().unwrap();
        let node = node(dir.path());
        let done = CancellationToken::new();
        let watcher = tokio::spawn(watch(node.clone(), done.clone()));
        let Subscription { exists, mut events } = node.subscribe_events();
        let objects: Vec<_> = exists.iter().map(|e| (e.event, e.object.clone())).collect();
        assert_eq!(objects[0], (EventKind::Exists, EventObject::Resource { role: Role::Secondary }));
        assert_eq!(objects[4], (EventKind::Exists, EventObject::EndOfExists));
        assert_eq!(exists.len(), 5);

        node.state().role = Role::Primary;
        let e = next(&mut events).await;
        assert_eq!((e.event, e.object), (EventKind::Change, EventObject::Resource { role: Role::Primary }));

        // Reading the state reports nothing; emitting while holding it does not deadlock, and
        // the change made under the same lock comes first.
        let _ = node.state().role;
        {
            let mut s = node.state();
            s.conn = ConnState::StandAlone;
            s.last_error = Some("split brain detected".into());
            let detail = "both changed".to_string();
            node.emit_event(EventKind::Detected, EventObject::SplitBrain { peer: "beta".into(), detail });
        }
        let e = next(&mut events).await;
        assert_eq!(e.event, EventKind::Change);
        assert!(
            matches!(&e.object, EventObject::Connection { connection: ConnState::StandAlone, reason: Some(r), .. }
                if r == "split brain detected"),
            "{e:?}"
        );
        let e = next(&mut events).await;
        assert_eq!(e.event, EventKind::Detected);
        assert!(matches!(e.object, EventObject::SplitBrain { .. }), "{e:?}");

        done.cancel();
        let e = next(&mut events).await;
        assert_eq!((e.event, e.object), (EventKind::Destroy, EventObject::Resource { role: Role::Primary }));
        watcher.await.unwrap();
        assert!(events.try_recv().is_err(), "nothing after destroy");
    }

    #[test]
    fn rfc3339_dates() {
        let at = |secs: u64, ms: u64| rfc3339(UNIX_EPOCH + Duration::from_millis(secs * 1000 + ms));
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(1_709_210_096, 789), "2024-02-29T12:34:56.789Z");
        assert_eq!(at(4_102_444_799, 999), "2099-12-31T23:59:59.999Z");
    }

    #[test]
    fn lines_have_the_documented_shape() {
        let event = Event {
            event: EventKind::Change,
            resource: "r0".into(),
            node: "alpha".into(),
            object: EventObject::Connection {
                peer: "beta".into(),
                connection: ConnState::Connected,
                peer_role: Role::Secondary,
                reason: None,
            },
            time: "2024-02-29T12:34:56.789Z".into(),
        };
        let json = serde_json::to_string(&event).unwrap();
        assert_eq!(
            json,
            r#"{"event":"change","resource":"r0","node":"alpha","object":"connection","peer":"beta","connection":"Connected","peer_role":"Secondary","time":"2024-02-29T12:34:56.789Z"}"#
        );
        assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), event);
        let end = Event { event: EventKind::Exists, object: EventObject::EndOfExists, ..event.clone() };
        let json = serde_json::to_string(&end).unwrap();
        assert!(json.contains(r#""event":"exists""#) && json.contains(r#""object":"-""#), "{json}");
        assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), end);
        let peer_device = Event {
            event: EventKind::Progress,
            object: EventObject::PeerDevice {
                peer: "beta".into(),
                replication: ReplState::SyncTarget,
                peer_disk: DiskState::UpToDate,
                progress: Some(ResyncProgress {
                    total_bytes: 100,
                    remaining_bytes: 40,
                    done_percent: 60.0,
                    rate_bytes_per_sec: 10,
                    eta_secs: Some(4),
                }),
            },
            ..event
        };
        let json = serde_json::to_string(&peer_device).unwrap();
        assert!(
            json.contains(r#""object":"peer-device""#) && json.contains(r#""done_percent":60.0"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), peer_device);
    }
}
