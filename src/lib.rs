//! rdbd: a replicated block device in userspace.
//!
//! - [`storage`]: the block device interface and the local-disk implementation (io_uring).
//! - [`nbd`]: the NBD server that exports a device to the kernel, qemu, libnbd and fio.
//! - [`kernel`]: attaching the kernel's NBD client (`/dev/nbdN`) to that server.
//! - [`replication`]: the replicated device, the link to the peer, the applier, resync and
//!   verify, and the pure decisions; [`replication::core`] is the replication state machine as
//!   pure code.
//! - [`metadata`]: the on-disk metadata: superblock, generations (defined in the wire crate,
//!   `rdbd_protocol::generations`, which both nodes step alike), bitmap, activity log.
//! - [`node`]: the per-resource daemon: disk, role, connection lifecycle, control socket.
//! - [`sim`]: the deterministic whole-cluster simulator that drives [`replication::core`].
//! - [`config`]: resource files (`/etc/rdbd/<res>.toml`): the two nodes and their options.
//! - [`supervisor`]: the HA supervisor: automatic roles and the service chain; a client of the
//!   node through [`node::handle::NodeHandle`], which the node does not know.
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
