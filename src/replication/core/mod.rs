//! The replication core: one node's state and decisions as pure code with no I/O and no clock.
//! Drivers feed it what happened (`handle_*`) and carry out what it asks
//! ([`NodeCore::poll_effect`]), so a seeded simulation (`rdbd-sim`) runs it under a simulated
//! world of disks, links, crashes and operators.
//!
//! - [`node`]: the state, the connection lifecycle (handshake, sync decision) and role changes.
//! - `write_path`: the Primary's requests, the activity log and the ledger.
//! - `applier`: the peer's side of replication, and the sync target.
//! - [`apply_order`]: the order the peer's requests reach the disk in (also the daemon's
//!   applier's).
//! - `resync`: the sync source; `target`: the sync target, on the daemon's own bookkeeping
//!   (`resync::target::ResyncTarget`): it pulls.
//! - `verify`: operator `invalidate` and online `verify`.
//! - [`ledger`]: what the Primary asked of its peer and which writes are stable there (also
//!   used by the daemon's link).
//! - [`peer_answers`]: what the receiving side answers, and when (also the daemon's applier's).
//! - [`io`]: the inputs and effects.
//! - [`bugs`]: known bugs the simulator plants to show it can find them.

mod applier;
pub mod apply_order;
pub mod bugs;
pub mod io;
pub mod ledger;
pub mod node;
pub mod peer_answers;
mod resync;
mod target;
mod verify;
mod write_path;

pub use node::{CoreConfig, Grant, Link, NodeCore};

#[cfg(test)]
mod tests;
