//! The replication link between the two nodes of a resource: two TCP channels (data and meta,
//! so acknowledgements never queue behind bulk data), their framing and their handshake.

pub mod connect;
pub mod framed;
pub mod handshake;
