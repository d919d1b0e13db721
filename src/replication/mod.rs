//! Replication decisions: node and connection states, and the sync decision at connect time.

pub mod apply;
pub mod bitmap_exchange;
pub mod device;
pub mod link;
pub mod peer;
pub mod resync;
pub mod source;
pub mod states;
pub mod sync_decision;
