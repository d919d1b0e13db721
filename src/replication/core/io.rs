//! What goes into the node core and what comes out: client requests, peer messages, disk
//! completions and operator commands in; sends, disk and metadata I/O, replies and witness
//! requests out. `P` is the data a write carries; the core never looks inside it.

use rdbd_protocol::repl::AckMode;

use crate::metadata::bitmap::DirtyBitmap;
use crate::metadata::generations::Generations;
use crate::replication::states::{DiskState, Role};
use crate::replication::sync_decision::Decision;

use super::ledger::Answer;

/// The driver's name for one client request.
pub type ClientId = u64;
/// The core's name for one disk or metadata request.
pub type IoId = u64;

/// A request of the client that uses the Primary's device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientRequest<P> {
    Write {
        offset: u64,
        len: u64,
        data: P,
        fua: bool,
    },
    Read {
        offset: u64,
        len: u64,
    },
    Flush,
    /// TRIM/discard: the range reads as zeroes afterwards; ordered and replicated like a write.
    Trim {
        offset: u64,
        len: u64,
    },
}

/// The core's answer to a client request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<P> {
    Done,
    /// A read's data.
    Data(P),
    /// EIO: the request may or may not have taken effect.
    Failed,
}

/// What one node tells the other at connect time (DRBD's P_UUIDS and P_STATE, with the bitmap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub gens: Generations,
    pub role: Role,
    pub disk: DiskState,
    pub crashed_primary: bool,
    pub discard_my_data: bool,
    pub node_id: u32,
    /// The blocks this node's bitmap marks, as runs `[start, end)`.
    pub dirty: Vec<(u64, u64)>,
}

/// A message between the two cores, in order per direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMessage<P> {
    Hello(Hello),
    /// The sync source's rotated bitmap identifier: the target's data belongs to it from now.
    SyncStart {
        sync_uuid: u64,
    },
    /// A client's write, mirrored; `ack`: the answer the protocol asks (none, on receipt, on
    /// the disk).
    Write {
        seq: u64,
        offset: u64,
        len: u64,
        data: P,
        fua: bool,
        ack: AckMode,
    },
    /// A client's TRIM, mirrored: answered like a write.
    Trim {
        seq: u64,
        offset: u64,
        len: u64,
        ack: AckMode,
    },
    Flush {
        seq: u64,
    },
    Ack {
        seq: u64,
        answer: Answer,
    },
    /// The sync target asks for the source's data of this range (it pulls, as in the daemon).
    /// With `digest` (checksum-based resync), what the target holds there: the source sends
    /// its data only where it differs, then closes the request with ResyncInSync. The core
    /// carries the target's data itself as the digest (a digest without collisions).
    ResyncRequest {
        offset: u64,
        len: u64,
        digest: Option<P>,
    },
    /// The answer to one ResyncRequest.
    ResyncData {
        offset: u64,
        len: u64,
        data: P,
    },
    /// Closes a checksum request: what no ResyncData answered was identical on both sides.
    ResyncInSync {
        offset: u64,
        len: u64,
    },
    /// The target has the range durably (adjacent requests' acks merged).
    ResyncAck {
        offset: u64,
        len: u64,
    },
    /// Every block is in sync: the source's generations as they are now.
    ResyncDone {
        gens: Generations,
    },
    /// The sender wants to become Primary while connected (two-phase, so that two nodes
    /// promoting at once cannot both succeed).
    PromoteRequest,
    PromoteAnswer {
        granted: bool,
    },
    /// The sender's role changed.
    Role {
        role: Role,
    },
    /// The sender's operator typed `invalidate`: it asks to become the target of a full sync.
    InvalidateRequest,
    /// Granted: the sender is the full sync's source from now (its SyncStart follows).
    InvalidateAnswer {
        granted: bool,
    },
    /// Online verify: the sender asks for the receiver's data of this range, to compare.
    VerifyRequest {
        offset: u64,
        len: u64,
    },
    VerifyReply {
        offset: u64,
        len: u64,
        data: P,
    },
}

/// A durable image of the node's metadata: what a restart reads back.
#[derive(Debug, Clone)]
pub struct Persisted {
    pub gens: Generations,
    pub disk: DiskState,
    /// Set while Primary: found set at start, the node crashed as Primary.
    pub primary: bool,
    pub bitmap: DirtyBitmap,
    /// Extents in the activity log: written recently, maybe not on the peer.
    pub activity_log: Vec<u32>,
}

/// What the core asks its driver to do.
#[derive(Debug, Clone)]
pub enum Effect<P> {
    Send(PeerMessage<P>),
    /// Write the data disk; completes with [`super::NodeCore::handle_disk`].
    Write {
        io: IoId,
        offset: u64,
        len: u64,
        data: P,
    },
    /// Discard the range of the data disk (it reads as zeroes); completes like a write.
    Discard {
        io: IoId,
        offset: u64,
        len: u64,
    },
    Read {
        io: IoId,
        offset: u64,
        len: u64,
    },
    /// Makes every write completed before it durable.
    Flush {
        io: IoId,
    },
    /// Writes the metadata durably (atomically).
    Persist {
        io: IoId,
        image: Persisted,
    },
    Reply {
        client: ClientId,
        reply: Reply<P>,
    },
    /// Ask the witness for the right to write without the peer (quorum).
    AskWitness,
    /// Give that right back: the peer has everything again.
    ReleaseWitness,
    /// End the connection (split brain, unrelated data, an operator's disconnect).
    DropLink {
        reason: &'static str,
    },
    /// The sync decision this node took at a handshake (for logs, and for the simulator to
    /// check that both sides agree).
    Decided(Decision),
    /// A split brain found at this handshake was resolved by an after-sb policy: the changes
    /// of this node (`discarded_here`) or of the peer are discarded by the resync that follows.
    SplitBrainResolved {
        discarded_here: bool,
    },
    /// This node became sync source: from now its data overwrites the peer's.
    ResyncStarted {
        source: bool,
    },
    /// The role changed.
    RoleChanged(Role),
    /// `invalidate` took effect: the metadata durably says Inconsistent with every block marked,
    /// so this node's data is no longer trusted until a full sync made it whole.
    Invalidated,
    /// An online verify this node ran is complete: `out_of_sync` blocks differed from the
    /// peer's (and are marked out of sync).
    VerifyDone {
        out_of_sync: u64,
    },
}

/// An operator's command (the `rdbd` verbs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Primary,
    Secondary,
    Connect,
    Disconnect,
    /// `connect --discard-my-data`: this node is the split-brain victim.
    DiscardMyData,
    /// On a connected Secondary whose peer is UpToDate: this disk becomes Inconsistent and
    /// takes a full sync from the peer (refused otherwise).
    Invalidate,
    /// Online verify on a connected pair in sync: compares every block with the peer's and
    /// marks those that differ.
    Verify,
    /// `rdbd down`, its first part: a Primary is demoted (refused while requests are in flight)
    /// and every write the peer has is made stable there; the driver then disconnects and stops
    /// the process once the node is quiet.
    Down,
}
