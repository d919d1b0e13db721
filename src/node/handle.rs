//! The narrow handle the HA supervisor drives a node through. The supervisor is a client of
//! the node, as an operator is: it reads the node's status and event stream, issues role
//! commands, and sets the gate for writes the peer does not have. It does not own the node,
//! and the node does not know it (it only shows what the supervisor publishes, see
//! [`ha_report`](super::ha_report)).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::event_stream::{EventKind, EventObject, Subscription};
use super::ha_report::{HaStatus, ServiceState};
use super::status::Status;
use super::{Node, NodeError, OutdateRefusal};
use crate::config::{NetConfig, NodeConfig};
use crate::replication::alone_gate::AloneGate;
use crate::replication::states::{DiskState, Role};

/// A client's hold on a running node; cheap to clone.
#[derive(Clone)]
pub struct NodeHandle {
    node: Arc<Node>,
}

impl Node {
    /// A handle for a client that drives this node (the HA supervisor).
    pub fn handle(self: &Arc<Self>) -> NodeHandle {
        NodeHandle { node: self.clone() }
    }
}

impl NodeHandle {
    pub fn resource(&self) -> &str {
        &self.node.config().name
    }

    pub fn me(&self) -> &NodeConfig {
        self.node.me()
    }

    pub fn peer(&self) -> &NodeConfig {
        self.node.peer_config()
    }

    pub fn net(&self) -> &NetConfig {
        &self.node.config().net
    }

    /// Cancelled when the node goes down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.node.shutdown_token()
    }

    pub async fn status(&self) -> Status {
        self.node.status().await
    }

    /// The role, the disk, and whether the replication link is up, without the whole status.
    pub fn local_view(&self) -> (Role, DiskState, bool) {
        self.node.local_view()
    }

    /// The node's event stream, as `rdbd events` sees it.
    pub fn subscribe_events(&self) -> Subscription {
        self.node.subscribe_events()
    }

    /// Publishes the supervisor's own state for `status`.
    pub fn publish(&self, status: HaStatus) {
        self.node.set_ha_status(status);
    }

    /// Reports a service's change of state on the event stream.
    pub fn service_changed(&self, service: String, state: ServiceState, failures: u32) {
        self.node.emit_event(EventKind::Change, EventObject::Service { service, state, failures });
    }

    /// The supervisor promotes only with a permit (the witness's lease, a fence result, its
    /// policy): that makes a Consistent disk (one attached under fencing) the newest data, as
    /// an operator's `--force` would.
    pub async fn promote(&self) -> Result<(), NodeError> {
        let (_, disk, _) = self.node.local_view();
        self.node.promote(disk == crate::replication::states::DiskState::Consistent).await
    }

    pub async fn demote(&self) -> Result<(), NodeError> {
        self.node.demote().await
    }

    /// Demotes even with writes held: they fail and the clients are cut off.
    pub async fn demote_forced(&self) -> Result<(), NodeError> {
        self.node.demote_forced().await
    }

    pub fn connect(&self, discard_my_data: bool) -> Result<(), NodeError> {
        self.node.connect(discard_my_data)
    }

    /// At the next handshake this node gives up its changes.
    pub fn discard_my_data_at_next_connect(&self) {
        self.node.discard_my_data_at_next_connect();
    }

    /// The peer asked over the heartbeat path: mark this node's data Outdated.
    /// A fence of the peer succeeded (it is outdated or down): remembered on disk, so that this
    /// node, restarted, trusts its UpToDate without fencing again (DRBD's peer-outdated flag).
    pub fn peer_fenced(&self) {
        self.node.set_peer_outdated(true);
    }

    pub fn outdate_by_peer(&self) -> Result<(), OutdateRefusal> {
        self.node.outdate_by_peer()
    }

    /// The gate for writes the peer does not have.
    pub fn alone_gate(&self) -> &AloneGate {
        self.node.device().alone_gate()
    }

    /// Connected again as the Primary: what the last link lost is marked for the peer.
    pub fn open_alone_gate_while_connected(&self) {
        self.node.device().open_alone_gate_while_connected();
    }

    /// Writes parked at the gate look again.
    pub fn wake_parked(&self) {
        self.node.device().wake_parked();
    }

    /// Whether a `switchover` asked this node to hand its role over.
    pub fn yielding(&self) -> bool {
        self.node.ha_yielding()
    }

    /// The peer took over: the switchover is done.
    pub fn clear_yield(&self) {
        self.node.clear_ha_yield();
    }

    /// Whether `down` waits for the supervisor to stop the services and demote.
    pub fn release_requested(&self) -> bool {
        self.node.ha_release_requested()
    }

    /// The services are stopped and the node demoted for `down`.
    pub fn released(&self) {
        self.node.ha_released();
    }
}
