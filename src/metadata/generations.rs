//! Generation identifiers, as the metadata stores them: the one definition lives in the wire
//! crate ([`rdbd_protocol::generations`]), since both nodes step them alike and send them in
//! every State message.

pub use rdbd_protocol::generations::*;
