//! Setting up a resync once the sync decision made this node source or target (SPEC §4.5,
//! §4.6): the bitmaps are merged (all of it for a full sync), the merged bitmap is durable, then
//! the source rotates its generations, durably, before it sends the sync identifier the target
//! adopts. The node keeps its metadata; it takes part through [`SetupNode`].

use std::error::Error;
use std::time::Duration;

use rdbd_protocol::repl::Message;
use tracing::info;

use super::bitmap_exchange;
use crate::replication::device::ReplicatedDevice;
use crate::replication::link::connect::Established;
use crate::replication::sync_decision::SyncDecision;

/// Any failure of the setup; a [`bitmap_exchange::BitmapExchangeError::Refused`] inside says
/// the peer could not carry out the decision.
pub type SetupError = Box<dyn Error + Send + Sync>;

/// What the setup asks of the node that owns the metadata.
pub trait SetupNode: Sync {
    /// Writes the bitmap's changed pages (after the merge).
    fn persist_bitmap(&self) -> Result<(), SetupError>;
    /// As source: rotates and persists the generations; returns the sync identifier to send.
    /// `total`: blocks to resync.
    fn start_as_source(&self, total: u64) -> Result<u64, SetupError>;
    /// As target: adopts `sync_uuid`, persists it and the Inconsistent disk.
    fn start_as_target(&self, sync_uuid: u64, total: u64) -> Result<(), SetupError>;
}

/// Runs the setup on the data channel; `step` bounds each wait for the peer.
pub async fn prepare(
    device: &ReplicatedDevice,
    est: &mut Established,
    outcome: SyncDecision,
    step: Duration,
    node: &dyn SetupNode,
) -> Result<(), SetupError> {
    if outcome.is_full() {
        device.with_tracking(|t| t.bitmap.set_all());
    } else {
        let snapshot = device.with_tracking(|t| t.bitmap.clone());
        let mut merged = snapshot.clone();
        let (reader, writer) = est.data.halves();
        let (sent, received) = tokio::join!(
            bitmap_exchange::send(writer, &snapshot),
            bitmap_exchange::receive(reader, &mut merged, step)
        );
        // The peer's answer first: a Refuse in place of its bitmap explains a failed send.
        let added = received?;
        sent?;
        device.with_tracking(|t| {
            for (start, len) in merged.runs_from(0) {
                t.bitmap.set(start..start + len);
            }
        });
        info!(added, "bitmaps exchanged");
    }
    node.persist_bitmap()?;
    let total = device.out_of_sync_blocks();
    if outcome.is_source() {
        // Durable before the target can adopt it: a source that crashed before would not know
        // the target's new current (unrelated data).
        let uuid = node.start_as_source(total)?;
        est.data.send(&Message::SyncUuid { uuid }).await?;
    } else {
        let uuid = match est.data.recv_within(step).await? {
            Message::SyncUuid { uuid } => uuid,
            other => return Err(format!("expected SyncUuid, got message kind {:#x}", other.kind()).into()),
        };
        node.start_as_target(uuid, total)?;
    }
    info!(blocks = total, full = outcome.is_full(), "resync starting");
    Ok(())
}
