//! What the HA supervisor reports of itself, for `status` and `events`: the node shows these
//! without knowing the supervisor, which publishes them through its [`NodeHandle`].
//!
//! [`NodeHandle`]: super::handle::NodeHandle

use serde::{Deserialize, Serialize};

use crate::replication::states::{DiskState, Role};

/// What `status` shows of the supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaStatus {
    /// Whether this node may write without its peer now (quorum, a fence, or the policy).
    pub permit: String,
    /// With a witness: who holds its lease, and whether it is reachable.
    #[serde(default)]
    pub lease_holder: Option<String>,
    #[serde(default)]
    pub witness_reachable: Option<bool>,
    pub services: Vec<ServiceStatus>,
    #[serde(default)]
    pub last_action: Option<String>,
    #[serde(default)]
    pub warning: Option<String>,
    /// With `heartbeat-address`: what the second path says of the peer.
    #[serde(default)]
    pub heartbeat: Option<HeartbeatStatus>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceState {
    Stopped,
    Running,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub service: String,
    pub state: ServiceState,
    pub failures: u32,
    #[serde(default)]
    pub last_error: Option<String>,
}

/// What `status` shows of the heartbeat path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatStatus {
    /// The peer was heard within the silence limit.
    pub peer_alive: bool,
    /// Milliseconds since the peer was last heard (none yet: never).
    #[serde(default)]
    pub last_heard_ms: Option<u64>,
    pub peer_role: Role,
    pub peer_disk: DiskState,
    /// The peer confirmed it marked its data Outdated for the current disconnection.
    pub peer_outdated: bool,
    #[serde(default)]
    pub error: Option<String>,
}
