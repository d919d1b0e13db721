//! The NBD server: handshake, transmission, and connection handling.

mod export;
mod handshake;
mod outbox;
mod pipe;
mod server;
mod session;
mod shards;
mod socket;

pub use export::{Export, Exports, MAX_PAYLOAD};
pub use handshake::{negotiate, HandshakeError, Negotiated};
pub use server::{Listener, Server};
pub use session::{Session, SessionEnd};
pub use shards::Shards;
pub use socket::Socket;
