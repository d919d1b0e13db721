//! The deterministic simulator of a whole cluster (`rdbd-sim`): two [`NodeCore`]s — the same
//! core the daemon's replication is built on — with simulated disks that forget unflushed
//! writes, a network that delays, stalls and cuts, a witness, a client whose acknowledged
//! writes form the oracle, and an operator typing commands at random moments. One seed decides
//! everything, so a failing seed replays exactly.
//!
//! - `world`: the event loop, faults, and the invariants checked after every step.
//! - `disk`: the disk with a volatile cache.
//! - `oracle`: what the client was told, and what must therefore survive.
//!
//! [`NodeCore`]: crate::replication::core::NodeCore

mod disk;
mod oracle;
mod world;

pub use world::{run, Options, RunResult, Violation};
