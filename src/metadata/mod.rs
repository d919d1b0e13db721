//! Per-replica metadata: generation identifiers, the dirty bitmap, the activity log, and the
//! superblock, with their on-disk layout (internal or external) and crash-safe updates.

pub mod activity_log;
pub mod bitmap;
pub mod generations;
pub mod layout;
pub mod store;
pub mod superblock;
