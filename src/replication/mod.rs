//! Replication, in two halves.
//!
//! Pure (no I/O, no clock): [`states`] (roles, disk and connection states, the role-change
//! checks), [`sync_decision`] (DRBD's generation rule table), [`split_brain`] (the after-sb and
//! rr-conflict policies), [`connection_plan`] (what a connection does with both), [`promotion`]
//! (who may become Primary while the peer is in touch), [`alone_gate`] (writes without the
//! peer), and [`core`]: the node's state machine as inputs and effects,
//! which the simulator (`crate::sim`) drives.
//!
//! The daemon's I/O side: the replicated device on the Primary ([`device`]), the link to the
//! peer ([`link`]: connect, handshake, framing; [`peer`]: the sending side and its ledger of
//! what the peer has stably), the peer's applier ([`apply`]), the disk's health
//! ([`disk_health`]), resync in one place ([`resync`]: setup, bitmap exchange, source, target
//! bookkeeping and I/O, pace) and online verify ([`verify`]).

pub mod alone_gate;
pub mod apply;
pub mod connection_plan;
pub mod core;
pub mod device;
pub mod disk_health;
pub mod link;
pub mod peer;
pub mod promotion;
pub mod resync;
pub mod split_brain;
pub mod states;
pub mod sync_decision;
pub mod verify;
