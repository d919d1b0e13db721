//! Wire formats spoken by rdbd, as pure encode/decode functions with no I/O.
//!
//! - [`nbd`]: the Network Block Device protocol (handshake and transmission), as served to the
//!   Linux kernel, qemu, libnbd and fio.
//! - [`repl`]: the replication link between two rdbd nodes, specified in `SPEC.md`.
//! - [`witness`]: what a node and the quorum witness (`rdbd witness`) say to each other.
//! - [`heartbeat`]: the signed UDP datagrams of the second heartbeat path between two nodes.
//! - [`generations`]: the generation identifiers a node's State carries, and their pure steps.
//! - [`states`]: a node's role and disk state, as every wire format and the daemon name them.
//!
//! Every decoder takes untrusted bytes and returns a typed error instead of panicking; no decoder
//! allocates based on a length field it has not checked against a limit.

pub mod generations;
pub mod heartbeat;
pub mod nbd;
pub mod repl;
mod spellings;
pub mod states;
mod wire;
pub mod witness;

pub use wire::DecodeError;
