//! Replication decisions: node and connection states, the sync decision at connect time and
//! split-brain recovery.

pub mod alone_gate;
pub mod apply;
pub mod bitmap_exchange;
pub mod core;
pub mod device;
pub mod disk_health;
pub mod link;
pub mod peer;
pub mod resync;
pub mod source;
pub mod split_brain;
pub mod states;
pub mod sync_decision;
pub mod verify;
