//! What `rdbd status` shows: the node's role and disk, the connection and replication state,
//! the peer's role and disk, and what is out of sync; as JSON, or as text shaped like
//! `drbdadm status`.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::{Node, NodeState, VerifyResult};
use crate::replication::states::{ConnState, DiskState, ReplState, Role};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub resource: String,
    pub node: String,
    /// The daemon's process.
    pub pid: u32,
    pub role: Role,
    pub disk: DiskState,
    /// The I/O error that failed the disk (Diskless, or Inconsistent under pass_on), or the
    /// operator's detach.
    #[serde(default)]
    pub disk_error: Option<String>,
    pub connection: ConnState,
    pub replication: ReplState,
    pub peer: PeerStatus,
    /// Bytes this node knows differ from the peer (its bitmap).
    pub out_of_sync_bytes: u64,
    /// Extents (4 MiB) in the activity log: what a crash of this node would resync at most.
    #[serde(default)]
    pub activity_log_extents: u32,
    /// While a resync runs: how far it is.
    pub resync: Option<ResyncProgress>,
    /// Bytes of data the last completed resync moved (sent as source, received as target).
    pub last_resync_bytes: Option<u64>,
    /// Resyncs completed (as source or target) since the daemon started.
    pub resyncs_completed: u64,
    /// While an online verify runs: how far it is and what it found so far.
    #[serde(default)]
    pub verify: Option<VerifyProgress>,
    /// The last online verify that ended, and how many have ended since the daemon started.
    #[serde(default)]
    pub last_verify: Option<VerifyResult>,
    #[serde(default)]
    pub verifies_ended: u64,
    /// Where a Primary serves NBD.
    pub nbd: Option<String>,
    /// The kernel block device a Primary attached (`/dev/nbdN`).
    #[serde(default)]
    pub nbd_device: Option<String>,
    pub nbd_clients: usize,
    pub generations: GenerationsStatus,
    /// Why the node is StandAlone, or the last connection failure.
    pub last_error: Option<String>,
    /// The HA supervisor's view (with an `[ha]` table).
    #[serde(default)]
    pub ha: Option<super::ha_report::HaStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    pub node: String,
    pub role: Role,
    pub disk: DiskState,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResyncProgress {
    pub total_bytes: u64,
    pub remaining_bytes: u64,
    pub done_percent: f64,
    /// Average since the resync started.
    pub rate_bytes_per_sec: u64,
    /// At that rate; none before anything moved.
    pub eta_secs: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VerifyProgress {
    #[serde(flatten)]
    pub progress: ResyncProgress,
    pub out_of_sync_blocks: u64,
}

/// Generation identifiers in hex, as `drbdadm show-gi` prints them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GenerationsStatus {
    pub current: String,
    pub bitmap: String,
    pub history: [String; 2],
}

impl Node {
    pub async fn status(&self) -> Status {
        let (nbd, nbd_clients) = match self.nbd.lock().await.as_ref() {
            Some(service) => (self.me().nbd_listen.clone(), service.clients()),
            None => (None, 0),
        };
        let nbd_device = self.kernel_device().await;
        let gens = self.generations();
        let out_of_sync_bytes = self.out_of_sync_bytes();
        let s = self.state().clone();
        let resync = self.resync_progress(&s, out_of_sync_bytes);
        let verify = verify_progress(&s);
        let hex = |v: u64| format!("{v:016X}");
        Status {
            resource: self.config.name.clone(),
            node: self.me().name.clone(),
            pid: std::process::id(),
            role: s.role,
            disk: s.disk,
            disk_error: s.disk_error.clone(),
            connection: s.conn,
            replication: s.repl,
            peer: PeerStatus { node: self.peer_config().name.clone(), role: s.peer_role, disk: s.peer_disk },
            out_of_sync_bytes,
            activity_log_extents: self.device.activity_log_extents(),
            resync,
            last_resync_bytes: s.last_resync_bytes,
            resyncs_completed: s.resyncs_completed,
            verify,
            last_verify: s.last_verify.clone(),
            verifies_ended: s.verifies_ended,
            nbd,
            nbd_device,
            nbd_clients,
            generations: GenerationsStatus {
                current: hex(gens.current),
                bitmap: hex(gens.bitmap),
                history: [hex(gens.history[0]), hex(gens.history[1])],
            },
            last_error: s.last_error,
            ha: self.ha_status(),
        }
    }
}

impl Node {
    /// Bytes this node knows differ from the peer.
    pub(super) fn out_of_sync_bytes(&self) -> u64 {
        let block = u64::from(self.device.bitmap_block());
        (self.device.out_of_sync_blocks() * block).min(self.device.info_size())
    }

    /// How far the running resync is; `None` when none runs.
    pub(super) fn resync_progress(&self, s: &NodeState, out_of_sync_bytes: u64) -> Option<ResyncProgress> {
        if !matches!(s.repl, ReplState::SyncSource | ReplState::SyncTarget) {
            return None;
        }
        let block = u64::from(self.device.bitmap_block());
        let total_bytes = (s.resync_total * block).min(self.device.info_size());
        let elapsed = s.resync_started.map_or(0.0, |t| t.elapsed().as_secs_f64());
        Some(progress(total_bytes, out_of_sync_bytes.min(total_bytes), elapsed))
    }
}

/// How far the running online verify is; `None` when none runs.
pub(super) fn verify_progress(s: &NodeState) -> Option<VerifyProgress> {
    s.verify.as_ref().map(|v| {
        let done = v.report.checked_bytes.min(v.total);
        VerifyProgress {
            progress: progress(v.total, v.total - done, v.started.elapsed().as_secs_f64()),
            out_of_sync_blocks: v.report.out_of_sync_blocks,
        }
    })
}

/// Done percentage, average rate and time left of `total` bytes with `remaining` left after
/// `elapsed` seconds.
fn progress(total_bytes: u64, remaining_bytes: u64, elapsed: f64) -> ResyncProgress {
    let done = total_bytes.saturating_sub(remaining_bytes);
    let done_percent = if total_bytes == 0 { 100.0 } else { done as f64 * 100.0 / total_bytes as f64 };
    let rate = if elapsed > 0.0 { (done as f64 / elapsed) as u64 } else { 0 };
    let eta_secs = (rate > 0).then(|| remaining_bytes.div_ceil(rate));
    ResyncProgress { total_bytes, remaining_bytes, done_percent, rate_bytes_per_sec: rate, eta_secs }
}

impl Status {
    /// `drbdadm status` layout:
    ///
    /// ```text
    /// res0 role:Primary
    ///   disk:UpToDate
    ///   beta role:Secondary
    ///     replication:SyncSource peer-disk:Inconsistent done:42.17
    /// ```
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{} role:{}", self.resource, self.role);
        match &self.disk_error {
            Some(e) => {
                let _ = writeln!(out, "  disk:{} ({e})", self.disk);
            }
            None => {
                let _ = writeln!(out, "  disk:{}", self.disk);
            }
        }
        if self.connection == ConnState::Connected {
            let _ = writeln!(out, "  {} role:{}", self.peer.node, self.peer.role);
            let mut line = format!("    replication:{} peer-disk:{}", self.replication, self.peer.disk);
            if let Some(r) = self.resync.as_ref().or(self.verify.as_ref().map(|v| &v.progress)) {
                let _ = write!(line, " done:{:.2}", r.done_percent);
                if r.rate_bytes_per_sec > 0 {
                    let _ = write!(line, " rate:{}KiB/s", r.rate_bytes_per_sec / 1024);
                }
                if let Some(eta) = r.eta_secs {
                    let _ = write!(line, " eta:{eta}s");
                }
            }
            if self.out_of_sync_bytes > 0 {
                let _ = write!(line, " out-of-sync:{}KiB", self.out_of_sync_bytes / 1024);
            }
            let _ = writeln!(out, "{line}");
        } else {
            let _ = writeln!(out, "  {} connection:{}", self.peer.node, self.connection);
            if self.out_of_sync_bytes > 0 {
                let _ = writeln!(out, "    out-of-sync:{}KiB", self.out_of_sync_bytes / 1024);
            }
            if let Some(e) = &self.last_error {
                if self.connection == ConnState::StandAlone || self.peer.disk == DiskState::Diskless {
                    let _ = writeln!(out, "    reason: {e}");
                }
            }
        }
        if let Some(addr) = &self.nbd {
            let _ = writeln!(out, "  nbd:{addr} clients:{}", self.nbd_clients);
        }
        if let Some(device) = &self.nbd_device {
            let _ = writeln!(out, "  device:{device}");
        }
        if let Some(ha) = &self.ha {
            let mut line = format!("  ha: permit:{}", ha.permit);
            if let Some(holder) = &ha.lease_holder {
                let holder = if holder.is_empty() { "-" } else { holder };
                let _ = write!(line, " lease:{holder}");
            }
            if ha.witness_reachable == Some(false) {
                line += " witness:unreachable";
            }
            if let Some(hb) = &ha.heartbeat {
                line += if hb.peer_alive { " heartbeat:alive" } else { " heartbeat:silent" };
                if hb.peer_outdated {
                    line += " peer-outdated";
                }
            }
            let _ = writeln!(out, "{line}");
            for s in &ha.services {
                let state = serde_json::to_value(s.state).ok().and_then(|v| v.as_str().map(String::from));
                let _ = write!(out, "    {} {}", s.service, state.unwrap_or_default());
                if s.failures > 0 {
                    let _ = write!(out, " failures:{}", s.failures);
                }
                let _ = writeln!(out);
            }
            if let Some(w) = &ha.warning {
                let _ = writeln!(out, "    warning: {w}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> Status {
        Status {
            resource: "res0".into(),
            node: "alpha".into(),
            pid: 1,
            role: Role::Primary,
            disk: DiskState::UpToDate,
            disk_error: None,
            connection: ConnState::Connected,
            replication: ReplState::SyncSource,
            peer: PeerStatus { node: "beta".into(), role: Role::Secondary, disk: DiskState::Inconsistent },
            out_of_sync_bytes: 1 << 20,
            activity_log_extents: 3,
            resync: Some(ResyncProgress {
                total_bytes: 4 << 20,
                remaining_bytes: 1 << 20,
                done_percent: 75.0,
                rate_bytes_per_sec: 3 << 20,
                eta_secs: Some(1),
            }),
            last_resync_bytes: None,
            resyncs_completed: 0,
            verify: None,
            last_verify: None,
            verifies_ended: 0,
            nbd: Some("127.0.0.1:10809".into()),
            nbd_device: None,
            nbd_clients: 1,
            generations: GenerationsStatus {
                current: "0".into(),
                bitmap: "0".into(),
                history: ["0".into(), "0".into()],
            },
            last_error: None,
            ha: None,
        }
    }

    #[test]
    fn text_is_shaped_like_drbdadm_status() {
        assert_eq!(
            status().to_text(),
            "res0 role:Primary\n  disk:UpToDate\n  beta role:Secondary\n    replication:SyncSource \
             peer-disk:Inconsistent done:75.00 rate:3072KiB/s eta:1s out-of-sync:1024KiB\n  nbd:127.0.0.1:10809 clients:1\n"
        );
        let mut s = status();
        s.connection = ConnState::StandAlone;
        s.last_error = Some("split brain detected".into());
        s.nbd = None;
        assert_eq!(
            s.to_text(),
            "res0 role:Primary\n  disk:UpToDate\n  beta connection:StandAlone\n    out-of-sync:1024KiB\n    \
             reason: split brain detected\n"
        );
        let mut s = status();
        s.disk = DiskState::Diskless;
        s.disk_error = Some("local disk write at offset 0x0 failed: I/O error (errno 5)".into());
        s.resync = None;
        s.replication = ReplState::Established;
        s.peer.disk = DiskState::UpToDate;
        s.out_of_sync_bytes = 0;
        assert!(
            s.to_text().starts_with(
                "res0 role:Primary\n  disk:Diskless (local disk write at offset 0x0 failed: I/O error (errno 5))\n"
            ),
            "{}",
            s.to_text()
        );
    }

    #[test]
    fn json_round_trips() {
        let s = status();
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"role\":\"Primary\""), "{json}");
        assert_eq!(serde_json::from_str::<Status>(&json).unwrap(), s);
    }
}
