//! The quorum witness: `rdbd witness` runs on a third host, stores no data, and gives its vote
//! (a lease) to at most one node of each two-node resource, so that a node that loses its peer
//! can tell "the peer is dead" from "we are cut apart" (protocol/WITNESS.md).
//!
//! - [`votes`]: the decisions, pure.
//! - [`channel`]: framed messages and the authenticated handshake, for both ends.
//! - [`store`]: the small state the witness keeps across restarts.
//! - [`server`]: the witness's TCP server.

pub mod channel;
pub mod server;
pub mod store;
pub mod votes;

/// Why a witness connection failed.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("malformed witness message: {0}")]
    Decode(#[from] rdbd_protocol::DecodeError),
    #[error("refused by the other end: {0}")]
    Refused(String),
    #[error("authentication failed (wrong secret?)")]
    AuthFailed,
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
}
