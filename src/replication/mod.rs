//! Replication: the pure decisions (states, the sync decision at connect time, split-brain
//! recovery, the HA gate), the pure state machine in [`core`] (which the simulator drives), and
//! the daemon's I/O side — the replicated device (`device`), the link to the peer (`peer`,
//! `link`), the peer's applier (`apply`), resync (`resync`: the bitmap exchange, the source, the target's bookkeeping) and
//! online verify (`verify`).

pub mod alone_gate;
pub mod apply;
pub mod connection_plan;
pub mod core;
pub mod device;
pub mod disk_health;
pub mod link;
pub mod peer;
pub mod resync;
pub mod split_brain;
pub mod states;
pub mod sync_decision;
pub mod verify;
