//! Resync: bringing the sync target's blocks up to the source's, pipelined and paced.
//!
//! - [`setup`]: from the sync decision to the first request: bitmaps merged, generations
//!   rotated, the sync identifier handed over.
//! - [`bitmap_exchange`]: both sides' bitmaps merged at connect time, before a resync.
//! - [`source`]: the source's side: reads what the target asks for and sends it.
//! - [`source_requests`]: the source's bookkeeping of those requests. Pure; the simulated
//!   core's source (`core/resync.rs`) runs it too.
//! - [`pace`]: the settings of the pace (DRBD's `resync-rate` and `c-*` options).
//! - [`controller`]: how much the target asks for per step, from those settings.
//! - [`throttle`]: how the source yields to application I/O (`c-min-rate`).
//! - [`target`]: the target's bookkeeping: what to request next, what arrived, what is written
//!   and durable, and which acknowledgements that allows. Pure; the simulated core's target
//!   (`core/target.rs`) runs it too.
//! - [`target_io`]: the target's I/O, carried out by the applier ([`super::apply`]), which owns
//!   the disk queues and channels on the target.

pub mod bitmap_exchange;
pub mod controller;
pub mod pace;
pub mod setup;
pub mod source;
pub mod source_requests;
pub mod target;
pub mod target_io;
pub mod throttle;
