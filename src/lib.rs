//! rdbd: a replicated block device in userspace.
//!
//! - [`storage`]: the block device interface and the local-disk implementation (io_uring).
//! - [`nbd`]: the NBD server that exports a device to the kernel, qemu, libnbd and fio.
//! - [`kernel`]: attaching the kernel's NBD client (`/dev/nbdN`) to that server.
//! - [`replication`]: node/connection states and the connect-time sync decision (pure logic).
//! - [`config`]: resource files (`/etc/rdbd/<res>.toml`): the two nodes and their options.
//! - [`supervisor`]: the HA supervisor: automatic roles and the service chain.
//! - [`witness`]: the quorum witness that breaks the tie between two nodes cut apart.

pub mod config;
pub mod kernel;
pub mod metadata;
pub mod nbd;
pub mod node;
pub mod replication;
pub mod sim;
pub mod storage;
pub mod supervisor;
pub mod witness;
