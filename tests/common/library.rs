//! Fixtures for the tests that drive the library directly (a replicated device and an applier
//! joined by the real link over loopback): the handshake's identity, parameters and state, and
//! submitting requests to a queue.

use std::time::Duration;

use rdbd::replication::link::handshake::Identity;
use rdbd::storage::{BufPool, Completion, IoOp, IoQueue};
use rdbd_protocol::repl::{Params, Protocol, State};

/// `local` connecting to `peer` for resource "r" with a shared secret.
pub fn identity<'a>(local: &'a str, peer: &'a str) -> Identity<'a> {
    Identity {
        resource: "r",
        local_node: local,
        peer_node: peer,
        secret: Some(b"k"),
        step_timeout: Duration::from_secs(5),
    }
}

/// The parameters both sides offer: `protocol`, a device of `size` bytes, 4 KiB bitmap blocks,
/// data integrity on, every policy at its default.
pub fn params(protocol: Protocol, size: u64) -> Params {
    Params { data_integrity: true, ..Params::with_defaults(protocol, size, 4096) }
}

/// A State with nothing in it (these tests skip the sync decision), as the handshake takes it.
pub fn blank_state() -> impl FnMut() -> Option<State> + Send {
    || Some(State::blank())
}

/// Submits `ops` and waits (at most 30 s) for all of them.
pub async fn run(queue: &mut Box<dyn IoQueue>, ops: Vec<IoOp>) -> Vec<Completion> {
    let n = ops.len();
    for (tag, op) in ops.into_iter().enumerate() {
        queue.submit(tag as u32, op);
    }
    let mut done = Vec::new();
    let all = async {
        while done.len() < n {
            std::future::poll_fn(|cx| queue.poll_complete(cx, &mut done)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), all).await.expect("requests unanswered for 30 s");
    done
}

/// A write of `len` bytes of `byte` at `offset`.
pub fn write(pool: &mut BufPool, offset: u64, byte: u8, len: usize) -> IoOp {
    let mut buf = pool.take(len);
    buf.fill(byte);
    IoOp::Write { offset, buf, fua: false }
}
