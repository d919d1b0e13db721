//! Resync: bringing the sync target's blocks up to the source's, pipelined and paced.
//!
//! - [`bitmap_exchange`]: both sides' bitmaps merged at connect time, before a resync.
//! - [`source`]: the source's side: reads what the target asks for and sends it.
//! - [`pace`]: the settings of the pace (DRBD's `resync-rate` and `c-*` options).
//! - [`controller`]: how much the target asks for per step, from those settings.
//! - [`throttle`]: how the source yields to application I/O (`c-min-rate`).
//! - [`target`]: the target's bookkeeping: what to request next, what arrived, what is written
//!   and durable, and which acknowledgements that allows.
//!
//! The I/O itself stays with the tasks that own the disks and channels: the applier
//! ([`super::apply`]) on the target, the inbound task ([`source`]) on the source.

pub mod bitmap_exchange;
pub mod controller;
pub mod pace;
pub mod source;
pub mod target;
pub mod throttle;
