//! Replication link messages: typed payloads, their encoders and their decoders.
//!
//! Decoding is strict and canonical: unknown enum values, unknown flag bits, trailing bytes and
//! ranges that wrap past 2^64 are errors, so every message that decodes re-encodes to exactly
//! the bytes it came from.

use std::fmt;

use bytes::BufMut;

use super::bitmap::BitmapRuns;
use super::digest::{csums_from_wire, csums_to_wire, DigestAlg};
use super::{kind, payload_bounds, Channel, FrameHeader, MAX_DATA_LEN, MAX_STRING_LEN, MIN_BITMAP_BLOCK};
pub use crate::generations::Generations;
use crate::states::{decode_disk, decode_role};
pub use crate::states::{DiskState, Role};
use crate::wire::{put_str16, DecodeError, Reader};

/// Flag bits of Data, Trim and Zeroes (u16). A receiver rejects bits the message does not
/// define: FUA on all three, MAY_PUNCH on Zeroes only.
pub mod write_flags {
    /// Durable on the receiver's disk before it sends WriteAck.
    pub const FUA: u16 = 1 << 0;
    /// The receiver may deallocate the zeroed range instead of writing zeroes.
    pub const MAY_PUNCH: u16 = 1 << 1;
}

/// Flag bits of State (u32), describing the sender's metadata at handshake time. The bit
/// positions match the superblock flags of the same meaning in the main crate's metadata.
pub mod state_flags {
    /// The sender's data is consistent (it is not a sync target part-way through a resync),
    /// even if possibly outdated.
    pub const CONSISTENT: u32 = 1 << 0;
    /// The sender was Primary when its metadata was last written.
    pub const WAS_PRIMARY: u32 = 1 << 1;
    /// The sender crashed while Primary: writes since its last sync point may be missing on
    /// the peer.
    pub const CRASHED_PRIMARY: u32 = 1 << 2;
    /// The sender's disk was UpToDate when last known.
    pub const WAS_UP_TO_DATE: u32 = 1 << 3;
    /// `new-current-uuid --clear-bitmap` ran on the sender: a just-created peer adopts the
    /// sender's current generation instead of doing the initial full sync.
    pub const SKIP_INITIAL_SYNC: u32 = 1 << 4;
    /// The sender, Secondary, asks to be promoted: both sides decide in this handshake whether
    /// it is (SPEC §4.5).
    pub const PROMOTE_REQUEST: u32 = 1 << 5;
    pub const KNOWN: u32 =
        CONSISTENT | WAS_PRIMARY | CRASHED_PRIMARY | WAS_UP_TO_DATE | SKIP_INITIAL_SYNC | PROMOTE_REQUEST;
}

/// Flag bits of Params (u8).
mod params_flags {
    pub const DATA_INTEGRITY: u8 = 1 << 0;
    pub const DISCARD_MY_DATA: u8 = 1 << 1;
    pub const KNOWN: u8 = DATA_INTEGRITY | DISCARD_MY_DATA;
}

/// Why a node refuses a connection; sent in Refuse just before closing, so that both sides log
/// the same reason. Unknown codes from a newer peer decode as `Unknown` instead of failing,
/// since Refuse may arrive before versions are agreed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefuseCode {
    IncompatibleVersion,
    AuthFailed,
    SizeMismatch,
    UnrelatedData,
    SplitBrain,
    ResourceMismatch,
    Busy,
    /// Replication protocol, bitmap block or data-integrity setting differ between the nodes.
    ConfigMismatch,
    Other,
    /// A code this version does not know; never one of the values above.
    Unknown(u16),
}

impl RefuseCode {
    pub fn from_wire(value: u16) -> Self {
        match value {
            1 => RefuseCode::IncompatibleVersion,
            2 => RefuseCode::AuthFailed,
            3 => RefuseCode::SizeMismatch,
            4 => RefuseCode::UnrelatedData,
            5 => RefuseCode::SplitBrain,
            6 => RefuseCode::ResourceMismatch,
            7 => RefuseCode::Busy,
            8 => RefuseCode::ConfigMismatch,
            0xffff => RefuseCode::Other,
            v => RefuseCode::Unknown(v),
        }
    }

    pub fn to_wire(self) -> u16 {
        match self {
            RefuseCode::IncompatibleVersion => 1,
            RefuseCode::AuthFailed => 2,
            RefuseCode::SizeMismatch => 3,
            RefuseCode::UnrelatedData => 4,
            RefuseCode::SplitBrain => 5,
            RefuseCode::ResourceMismatch => 6,
            RefuseCode::Busy => 7,
            RefuseCode::ConfigMismatch => 8,
            RefuseCode::Other => 0xffff,
            RefuseCode::Unknown(v) => v,
        }
    }
}

/// The replication protocol: when the primary may complete a write to its client (DRBD's
/// protocols A, B and C; C by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    /// Local write done and the data handed to the data channel.
    A,
    /// Local write done and the peer has received the data (RecvAck).
    B,
    /// Local write done and the peer's disk write done (WriteAck).
    #[default]
    C,
}
crate::option_spellings!(Protocol { A => "A", B => "B", C => "C" });

impl Protocol {
    /// On the wire as the ASCII letter, which reads well in a packet dump.
    pub fn from_wire(value: u8) -> Option<Self> {
        match value {
            b'A' => Some(Protocol::A),
            b'B' => Some(Protocol::B),
            b'C' => Some(Protocol::C),
            _ => None,
        }
    }

    pub fn to_wire(self) -> u8 {
        match self {
            Protocol::A => b'A',
            Protocol::B => b'B',
            Protocol::C => b'C',
        }
    }

    /// The acknowledgement an ordinary (non-FUA) write requests under this protocol.
    pub fn ack_mode(self) -> AckMode {
        match self {
            Protocol::A => AckMode::None,
            Protocol::B => AckMode::Recv,
            Protocol::C => AckMode::Write,
        }
    }
}

/// Which acknowledgement the receiver of a write sends, chosen per message by the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckMode {
    /// No acknowledgement (protocol A).
    None,
    /// RecvAck as soon as the message has been read (protocol B).
    Recv,
    /// WriteAck (or NegAck) once the write is on the receiver's disk (protocol C, and FUA).
    Write,
}

impl AckMode {
    pub fn from_wire(value: u16) -> Option<Self> {
        match value {
            0 => Some(AckMode::None),
            1 => Some(AckMode::Recv),
            2 => Some(AckMode::Write),
            _ => None,
        }
    }

    pub fn to_wire(self) -> u16 {
        match self {
            AckMode::None => 0,
            AckMode::Recv => 1,
            AckMode::Write => 2,
        }
    }
}

/// `after-sb-0pri`: what to do about a split brain while neither node is Primary. Both nodes
/// must configure the same policy (Params).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AfterSb0 {
    /// Refuse the connection; the operator resolves it.
    Disconnect,
    /// The node that became Primary last loses its changes.
    DiscardYoungerPrimary,
    /// The node that became Primary first loses its changes.
    DiscardOlderPrimary,
    /// A node without changes loses; if both changed, disconnect.
    DiscardZeroChanges,
    /// The node with fewer changed blocks loses.
    DiscardLeastChanges,
    /// A named node loses, and that node is the dialer (its name sorts lower, SPEC §3). The
    /// name is sent as its position so that both sides compare the same value.
    DiscardDialer,
    /// A named node loses, and that node is the listener (its name sorts higher).
    DiscardListener,
}

impl AfterSb0 {
    pub fn from_wire(value: u8) -> Option<Self> {
        match value {
            0 => Some(AfterSb0::Disconnect),
            1 => Some(AfterSb0::DiscardYoungerPrimary),
            2 => Some(AfterSb0::DiscardOlderPrimary),
            3 => Some(AfterSb0::DiscardZeroChanges),
            4 => Some(AfterSb0::DiscardLeastChanges),
            5 => Some(AfterSb0::DiscardDialer),
            6 => Some(AfterSb0::DiscardListener),
            _ => None,
        }
    }

    pub fn to_wire(self) -> u8 {
        match self {
            AfterSb0::Disconnect => 0,
            AfterSb0::DiscardYoungerPrimary => 1,
            AfterSb0::DiscardOlderPrimary => 2,
            AfterSb0::DiscardZeroChanges => 3,
            AfterSb0::DiscardLeastChanges => 4,
            AfterSb0::DiscardDialer => 5,
            AfterSb0::DiscardListener => 6,
        }
    }
}

/// `after-sb-1pri`: split brain while exactly one node is Primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AfterSb1 {
    #[default]
    Disconnect,
    /// Apply the after-sb-0pri outcome only if it discards the Secondary; else disconnect.
    Consensus,
    /// The Secondary loses.
    DiscardSecondary,
    /// Apply the after-sb-0pri outcome; a losing Primary runs its pri-lost-after-sb handler.
    CallPriLostAfterSb,
}

crate::option_spellings!(AfterSb1 {
    Disconnect => "disconnect",
    Consensus => "consensus",
    DiscardSecondary => "discard-secondary",
    CallPriLostAfterSb => "call-pri-lost-after-sb",
});

impl AfterSb1 {
    pub fn from_wire(value: u8) -> Option<Self> {
        match value {
            0 => Some(AfterSb1::Disconnect),
            1 => Some(AfterSb1::Consensus),
            2 => Some(AfterSb1::DiscardSecondary),
            3 => Some(AfterSb1::CallPriLostAfterSb),
            _ => None,
        }
    }

    pub fn to_wire(self) -> u8 {
        match self {
            AfterSb1::Disconnect => 0,
            AfterSb1::Consensus => 1,
            AfterSb1::DiscardSecondary => 2,
            AfterSb1::CallPriLostAfterSb => 3,
        }
    }
}

/// `after-sb-2pri`: split brain while both nodes are Primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AfterSb2 {
    #[default]
    Disconnect,
    /// Apply the after-sb-0pri outcome; the losing Primary runs its pri-lost-after-sb handler.
    CallPriLostAfterSb,
}

crate::option_spellings!(AfterSb2 { Disconnect => "disconnect", CallPriLostAfterSb => "call-pri-lost-after-sb" });

impl AfterSb2 {
    pub fn from_wire(value: u8) -> Option<Self> {
        match value {
            0 => Some(AfterSb2::Disconnect),
            1 => Some(AfterSb2::CallPriLostAfterSb),
            _ => None,
        }
    }

    pub fn to_wire(self) -> u8 {
        match self {
            AfterSb2::Disconnect => 0,
            AfterSb2::CallPriLostAfterSb => 1,
        }
    }
}

/// First frame on each channel, in both directions. Its layout never changes between versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello<'a> {
    /// Inclusive range of protocol versions the sender speaks; see [`super::negotiate`].
    pub protocol_min: u16,
    pub protocol_max: u16,
    pub channel: Channel,
    pub node_name: &'a str,
    pub resource: &'a str,
}

/// Settings both nodes must agree on, exchanged once on the data channel after authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub protocol: Protocol,
    /// Bytes; the nodes refuse each other (SizeMismatch) unless equal.
    pub device_size: u64,
    /// Bytes of device per bitmap bit: a power of two, at least [`MIN_BITMAP_BLOCK`].
    pub bitmap_block: u32,
    /// Data and ResyncData carry a CRC-32C of their data.
    pub data_integrity: bool,
    /// The operator asked this node to become the sync target if the sync decision is split
    /// brain.
    pub discard_my_data: bool,
    /// Checksum-based resync with this digest, or `None` for plain resync.
    pub csums_alg: Option<DigestAlg>,
    /// The digest online verify compares blocks with.
    pub verify_alg: DigestAlg,
    /// Split-brain policies; see [`AfterSb0`], [`AfterSb1`], [`AfterSb2`].
    pub after_sb_0pri: AfterSb0,
    pub after_sb_1pri: AfterSb1,
    pub after_sb_2pri: AfterSb2,
}

impl Params {
    pub const LEN: usize = 19;

    /// What a node offers with every other setting at its default: no data-integrity digests,
    /// no checksum resync, SHA-256 verify, every split-brain policy `disconnect`.
    pub fn with_defaults(protocol: Protocol, device_size: u64, bitmap_block: u32) -> Self {
        Params {
            protocol,
            device_size,
            bitmap_block,
            data_integrity: false,
            discard_my_data: false,
            csums_alg: None,
            verify_alg: DigestAlg::Sha256,
            after_sb_0pri: AfterSb0::Disconnect,
            after_sb_1pri: AfterSb1::Disconnect,
            after_sb_2pri: AfterSb2::Disconnect,
        }
    }
}

/// A node's role, disk state and metadata, exchanged on the data channel after Params, and
/// again by the sync source when a resync ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    pub role: Role,
    pub disk: DiskState,
    /// [`state_flags`]; unknown bits are rejected.
    pub flags: u32,
    pub generations: Generations,
    /// Bits set in the sender's bitmap, for split-brain policies that compare amounts of change.
    pub dirty_blocks: u64,
}

impl State {
    pub const LEN: usize = 46;

    /// A node that knows nothing yet: role Unknown, Diskless, blank generations, no flags.
    pub fn blank() -> Self {
        State {
            role: Role::Unknown,
            disk: DiskState::Diskless,
            flags: 0,
            generations: Generations::default(),
            dirty_blocks: 0,
        }
    }
}

/// An application write, with its data following the fixed part.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Data<'a> {
    /// Identifies the write in its acknowledgement; unique among the sender's writes in flight.
    pub seq: u64,
    /// Byte offset on the device.
    pub offset: u64,
    pub fua: bool,
    pub ack: AckMode,
    /// [`super::block_crc32c`] of `data` when data integrity is on, else 0.
    pub crc32c: u32,
    pub data: &'a [u8],
}

impl Data<'_> {
    /// Payload bytes before the data.
    pub const HEAD_LEN: usize = 24;
}

impl fmt::Debug for Data<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Data")
            .field("seq", &self.seq)
            .field("offset", &self.offset)
            .field("fua", &self.fua)
            .field("ack", &self.ack)
            .field("crc32c", &format_args!("{:#010x}", self.crc32c))
            .field("len", &self.data.len())
            .finish()
    }
}

/// Discard a byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trim {
    pub seq: u64,
    pub offset: u64,
    pub len: u64,
    pub fua: bool,
    pub ack: AckMode,
}

/// Write zeroes to a byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Zeroes {
    pub seq: u64,
    pub offset: u64,
    pub len: u64,
    /// The receiver may punch a hole instead of writing zeroes.
    pub may_punch: bool,
    pub fua: bool,
    pub ack: AckMode,
}

/// A block of resync data from the sync source, answering a ResyncRequest.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ResyncData<'a> {
    pub offset: u64,
    /// [`super::block_crc32c`] of `data` when data integrity is on, else 0.
    pub crc32c: u32,
    pub data: &'a [u8],
}

impl ResyncData<'_> {
    /// Payload bytes before the data.
    pub const HEAD_LEN: usize = 12;
}

impl fmt::Debug for ResyncData<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResyncData")
            .field("offset", &self.offset)
            .field("crc32c", &format_args!("{:#010x}", self.crc32c))
            .field("len", &self.data.len())
            .finish()
    }
}

/// Every message of the replication link. Strings and data borrow from the decoded payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    Hello(Hello<'a>),
    Refuse {
        code: RefuseCode,
        message: &'a str,
    },
    AuthChallenge {
        nonce: [u8; 32],
    },
    AuthResponse {
        mac: [u8; 32],
    },
    Params(Params),
    State(State),
    BitmapRuns(BitmapRuns<'a>),
    /// Ends a bitmap transfer; `total_blocks` must equal the blocks the runs covered.
    BitmapDone {
        total_blocks: u64,
    },
    /// From the sync source before a resync: the target's new current generation.
    SyncUuid {
        uuid: u64,
    },
    Data(Data<'a>),
    Trim(Trim),
    Zeroes(Zeroes),
    /// Complete every write received before this one, make them durable, then FlushAck.
    Flush {
        seq: u64,
    },
    RecvAck {
        seq: u64,
    },
    WriteAck {
        seq: u64,
    },
    /// The write or flush `seq` failed on the peer's disk with `errno` (Linux value).
    NegAck {
        seq: u64,
        errno: u32,
    },
    FlushAck {
        seq: u64,
    },
    Ping,
    PingAck,
    /// From the sync target: send `len` bytes at `offset`.
    ResyncRequest {
        offset: u64,
        len: u32,
    },
    ResyncData(ResyncData<'a>),
    /// From the sync target: the resync block at `offset` is on its disk.
    ResyncAck {
        offset: u64,
        len: u32,
    },
    /// From the sync target: writing the resync block failed.
    ResyncNegAck {
        offset: u64,
        len: u32,
        errno: u32,
    },
    /// From the sync source, instead of ResyncData: reading the requested block failed.
    ResyncReadError {
        offset: u64,
        len: u32,
        errno: u32,
    },
    /// From the sync target, with checksum-based resync: resync `len` bytes at `offset`,
    /// sending only the blocks whose digest differs from the target's. `digests` holds one
    /// digest (`csums_alg`) per bitmap block of the range; the receiver checks the count.
    ResyncCsumRequest {
        offset: u64,
        len: u32,
        digests: &'a [u8],
    },
    /// From the sync source: the ResyncCsumRequest at (`offset`, `len`) is fully answered;
    /// whatever part of it came in no ResyncData was identical.
    ResyncInSync {
        offset: u64,
        len: u32,
    },
    StateChange {
        role: Role,
        disk: DiskState,
    },
    Disconnect {
        reason: &'a str,
    },
    /// From the verify sender: read `len` bytes at `offset` (ordered like a write) and answer
    /// with their digests.
    VerifyRequest {
        offset: u64,
        len: u32,
    },
    /// Answer to VerifyRequest: one digest (`verify_alg`) per bitmap block of the range.
    VerifyReply {
        offset: u64,
        len: u32,
        digests: &'a [u8],
    },
    /// From the connection's receiver: please run an online verify starting at `offset`.
    VerifyStart {
        offset: u64,
    },
    /// From the verify sender: the verify is over.
    VerifyDone {
        checked_bytes: u64,
        out_of_sync_blocks: u64,
    },
    /// Mark these bytes out of sync in your bitmap (verify found them different, or a write to
    /// them failed on one side).
    OutOfSync {
        offset: u64,
        len: u32,
    },
    /// From a Primary without a disk of its own (Diskless): read `len` bytes at `offset` after
    /// every write sent before this, and answer with ReadReply (or NegAck on a read error).
    ReadRequest {
        seq: u64,
        offset: u64,
        len: u32,
    },
    /// Answer to ReadRequest `seq`, on the data channel: exactly the bytes asked for.
    ReadReply {
        seq: u64,
        data: &'a [u8],
    },
}

impl<'a> Message<'a> {
    pub fn kind(&self) -> u16 {
        match self {
            Message::Hello(_) => kind::HELLO,
            Message::Refuse { .. } => kind::REFUSE,
            Message::AuthChallenge { .. } => kind::AUTH_CHALLENGE,
            Message::AuthResponse { .. } => kind::AUTH_RESPONSE,
            Message::Params(_) => kind::PARAMS,
            Message::State(_) => kind::STATE,
            Message::BitmapRuns(_) => kind::BITMAP_RUNS,
            Message::BitmapDone { .. } => kind::BITMAP_DONE,
            Message::SyncUuid { .. } => kind::SYNC_UUID,
            Message::Data(_) => kind::DATA,
            Message::Trim(_) => kind::TRIM,
            Message::Zeroes(_) => kind::ZEROES,
            Message::Flush { .. } => kind::FLUSH,
            Message::RecvAck { .. } => kind::RECV_ACK,
            Message::WriteAck { .. } => kind::WRITE_ACK,
            Message::NegAck { .. } => kind::NEG_ACK,
            Message::FlushAck { .. } => kind::FLUSH_ACK,
            Message::Ping => kind::PING,
            Message::PingAck => kind::PING_ACK,
            Message::ResyncRequest { .. } => kind::RESYNC_REQUEST,
            Message::ResyncData(_) => kind::RESYNC_DATA,
            Message::ResyncAck { .. } => kind::RESYNC_ACK,
            Message::ResyncNegAck { .. } => kind::RESYNC_NEG_ACK,
            Message::ResyncReadError { .. } => kind::RESYNC_READ_ERROR,
            Message::StateChange { .. } => kind::STATE_CHANGE,
            Message::Disconnect { .. } => kind::DISCONNECT,
            Message::ResyncCsumRequest { .. } => kind::RESYNC_CSUM_REQUEST,
            Message::ResyncInSync { .. } => kind::RESYNC_IN_SYNC,
            Message::VerifyRequest { .. } => kind::VERIFY_REQUEST,
            Message::VerifyReply { .. } => kind::VERIFY_REPLY,
            Message::VerifyStart { .. } => kind::VERIFY_START,
            Message::VerifyDone { .. } => kind::VERIFY_DONE,
            Message::OutOfSync { .. } => kind::OUT_OF_SYNC,
            Message::ReadRequest { .. } => kind::READ_REQUEST,
            Message::ReadReply { .. } => kind::READ_REPLY,
        }
    }

    /// The data block that follows the fixed fields (Data, ResyncData), else empty.
    pub fn trailing_data(&self) -> &'a [u8] {
        match self {
            Message::Data(d) => d.data,
            Message::ResyncData(d) => d.data,
            Message::ReadReply { data, .. } => data,
            _ => &[],
        }
    }

    /// Appends the whole frame, header and payload.
    ///
    /// The caller keeps strings within [`MAX_STRING_LEN`] (longer ones are truncated), data
    /// within [`MAX_DATA_LEN`], digests within [`super::MAX_DIGESTS_LEN`] and bitmap messages
    /// within [`super::MAX_BITMAP_RUNS`]; a frame outside these limits is rejected by the peer.
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.encode_head(out);
        out.extend_from_slice(self.trailing_data());
    }

    /// Appends the header and the fixed fields, leaving out [`Self::trailing_data`], which the
    /// header's length already counts: the caller sends the data from its own buffer (with
    /// `writev`) instead of copying it. For messages without data this is [`Self::encode`].
    pub fn encode_head(&self, out: &mut Vec<u8>) {
        let start = out.len();
        FrameHeader { kind: self.kind(), length: 0 }.encode_into(out);
        self.encode_fields(out);
        let payload = out.len() - start - FrameHeader::LEN + self.trailing_data().len();
        // Saturates instead of wrapping so an oversized caller bug yields a frame the peer
        // rejects, never one that parses as something else.
        let length = u32::try_from(payload).unwrap_or(u32::MAX);
        out[start + 8..start + FrameHeader::LEN].copy_from_slice(&length.to_be_bytes());
    }

    fn encode_fields(&self, out: &mut Vec<u8>) {
        match *self {
            Message::Hello(h) => {
                out.put_u16(h.protocol_min);
                out.put_u16(h.protocol_max);
                out.put_u8(h.channel.to_wire());
                put_str(out, h.node_name);
                put_str(out, h.resource);
            }
            Message::Refuse { code, message } => {
                out.put_u16(code.to_wire());
                put_str(out, message);
            }
            Message::AuthChallenge { nonce } => out.put_slice(&nonce),
            Message::AuthResponse { mac } => out.put_slice(&mac),
            Message::Params(p) => {
                out.put_u64(p.device_size);
                out.put_u32(p.bitmap_block);
                out.put_u8(p.protocol.to_wire());
                let mut flags = 0;
                if p.data_integrity {
                    flags |= params_flags::DATA_INTEGRITY;
                }
                if p.discard_my_data {
                    flags |= params_flags::DISCARD_MY_DATA;
                }
                out.put_u8(flags);
                out.put_u8(csums_to_wire(p.csums_alg));
                out.put_u8(p.verify_alg.to_wire());
                out.put_u8(p.after_sb_0pri.to_wire());
                out.put_u8(p.after_sb_1pri.to_wire());
                out.put_u8(p.after_sb_2pri.to_wire());
            }
            Message::State(s) => {
                out.put_u8(s.role.to_wire());
                out.put_u8(s.disk.to_wire());
                out.put_u32(s.flags);
                out.put_u64(s.generations.current);
                out.put_u64(s.generations.bitmap);
                out.put_u64(s.generations.history[0]);
                out.put_u64(s.generations.history[1]);
                out.put_u64(s.dirty_blocks);
            }
            Message::BitmapRuns(b) => b.encode_into(out),
            Message::BitmapDone { total_blocks } => out.put_u64(total_blocks),
            Message::SyncUuid { uuid } => out.put_u64(uuid),
            Message::Data(d) => {
                out.put_u64(d.seq);
                out.put_u64(d.offset);
                out.put_u16(write_flag_bits(d.fua, false));
                out.put_u16(d.ack.to_wire());
                out.put_u32(d.crc32c);
            }
            Message::Trim(t) => {
                put_range_write(out, t.seq, t.offset, t.len, write_flag_bits(t.fua, false), t.ack)
            }
            Message::Zeroes(z) => {
                put_range_write(out, z.seq, z.offset, z.len, write_flag_bits(z.fua, z.may_punch), z.ack)
            }
            Message::Flush { seq }
            | Message::RecvAck { seq }
            | Message::WriteAck { seq }
            | Message::FlushAck { seq } => out.put_u64(seq),
            Message::NegAck { seq, errno } => {
                out.put_u64(seq);
                out.put_u32(errno);
            }
            Message::ReadRequest { seq, offset, len } => {
                out.put_u64(seq);
                out.put_u64(offset);
                out.put_u32(len);
            }
            Message::ReadReply { seq, .. } => out.put_u64(seq),
            Message::Ping | Message::PingAck => {}
            Message::ResyncRequest { offset, len }
            | Message::ResyncAck { offset, len }
            | Message::ResyncInSync { offset, len }
            | Message::VerifyRequest { offset, len }
            | Message::OutOfSync { offset, len } => {
                out.put_u64(offset);
                out.put_u32(len);
            }
            Message::ResyncData(d) => {
                out.put_u64(d.offset);
                out.put_u32(d.crc32c);
            }
            Message::ResyncNegAck { offset, len, errno }
            | Message::ResyncReadError { offset, len, errno } => {
                out.put_u64(offset);
                out.put_u32(len);
                out.put_u32(errno);
            }
            Message::StateChange { role, disk } => {
                out.put_u8(role.to_wire());
                out.put_u8(disk.to_wire());
            }
            Message::Disconnect { reason } => put_str(out, reason),
            Message::ResyncCsumRequest { offset, len, digests }
            | Message::VerifyReply { offset, len, digests } => {
                out.put_u64(offset);
                out.put_u32(len);
                out.put_slice(digests);
            }
            Message::VerifyStart { offset } => out.put_u64(offset),
            Message::VerifyDone { checked_bytes, out_of_sync_blocks } => {
                out.put_u64(checked_bytes);
                out.put_u64(out_of_sync_blocks);
            }
        }
    }

    /// Decodes the payload of a message of `kind`, borrowing strings and data from it. Checks
    /// the payload against the kind's bounds itself, so it is safe on any input.
    pub fn decode(kind: u16, payload: &'a [u8]) -> Result<Message<'a>, DecodeError> {
        let (_, max) =
            payload_bounds(kind).ok_or(DecodeError::Invalid { what: "message kind", value: kind.into() })?;
        if payload.len() as u64 > u64::from(max) {
            let (len, limit) = (payload.len() as u64, max.into());
            return Err(DecodeError::TooLong { what: "payload", len, limit });
        }
        let mut r = Reader::new(payload);
        let message = match kind {
            kind::HELLO => Message::Hello(Hello {
                protocol_min: r.u16()?,
                protocol_max: r.u16()?,
                channel: {
                    let v = r.u8()?;
                    Channel::from_wire(v).ok_or(DecodeError::Invalid { what: "channel", value: v.into() })?
                },
                node_name: r.string16("node name", MAX_STRING_LEN)?,
                resource: r.string16("resource name", MAX_STRING_LEN)?,
            }),
            kind::REFUSE => Message::Refuse {
                code: RefuseCode::from_wire(r.u16()?),
                message: r.string16("refusal message", MAX_STRING_LEN)?,
            },
            kind::AUTH_CHALLENGE => Message::AuthChallenge { nonce: r.array()? },
            kind::AUTH_RESPONSE => Message::AuthResponse { mac: r.array()? },
            kind::PARAMS => Message::Params(decode_params(&mut r)?),
            kind::STATE => Message::State(decode_state(&mut r)?),
            kind::BITMAP_RUNS => Message::BitmapRuns(BitmapRuns::decode(&mut r)?),
            kind::BITMAP_DONE => Message::BitmapDone { total_blocks: r.u64()? },
            kind::SYNC_UUID => Message::SyncUuid { uuid: r.u64()? },
            kind::DATA => {
                let (seq, offset) = (r.u64()?, r.u64()?);
                let (fua, _) = decode_write_flags(r.u16()?, write_flags::FUA)?;
                let ack = decode_ack(r.u16()?)?;
                let crc32c = r.u32()?;
                let data = r.rest();
                check_range(offset, data.len() as u64)?;
                Message::Data(Data { seq, offset, fua, ack, crc32c, data })
            }
            kind::TRIM => {
                let (seq, offset, len) = (r.u64()?, r.u64()?, r.u64()?);
                check_range(offset, len)?;
                let (fua, _) = decode_write_flags(r.u16()?, write_flags::FUA)?;
                Message::Trim(Trim { seq, offset, len, fua, ack: decode_ack(r.u16()?)? })
            }
            kind::ZEROES => {
                let (seq, offset, len) = (r.u64()?, r.u64()?, r.u64()?);
                check_range(offset, len)?;
                let (fua, may_punch) =
                    decode_write_flags(r.u16()?, write_flags::FUA | write_flags::MAY_PUNCH)?;
                Message::Zeroes(Zeroes { seq, offset, len, may_punch, fua, ack: decode_ack(r.u16()?)? })
            }
            kind::FLUSH => Message::Flush { seq: r.u64()? },
            kind::RECV_ACK => Message::RecvAck { seq: r.u64()? },
            kind::WRITE_ACK => Message::WriteAck { seq: r.u64()? },
            kind::NEG_ACK => Message::NegAck { seq: r.u64()?, errno: r.u32()? },
            kind::FLUSH_ACK => Message::FlushAck { seq: r.u64()? },
            kind::PING => Message::Ping,
            kind::PING_ACK => Message::PingAck,
            kind::RESYNC_REQUEST => {
                let (offset, len) = decode_range32(&mut r, "resync block")?;
                Message::ResyncRequest { offset, len }
            }
            kind::RESYNC_DATA => {
                let (offset, crc32c) = (r.u64()?, r.u32()?);
                let data = r.rest();
                check_range(offset, data.len() as u64)?;
                Message::ResyncData(ResyncData { offset, crc32c, data })
            }
            kind::RESYNC_ACK => {
                let (offset, len) = decode_range32(&mut r, "resync block")?;
                Message::ResyncAck { offset, len }
            }
            kind::RESYNC_NEG_ACK => {
                let (offset, len) = decode_range32(&mut r, "resync block")?;
                Message::ResyncNegAck { offset, len, errno: r.u32()? }
            }
            kind::RESYNC_READ_ERROR => {
                let (offset, len) = decode_range32(&mut r, "resync block")?;
                Message::ResyncReadError { offset, len, errno: r.u32()? }
            }
            kind::STATE_CHANGE => {
                Message::StateChange { role: decode_role(r.u8()?)?, disk: decode_disk(r.u8()?)? }
            }
            kind::DISCONNECT => {
                Message::Disconnect { reason: r.string16("disconnect reason", MAX_STRING_LEN)? }
            }
            kind::RESYNC_CSUM_REQUEST => {
                let (offset, len) = decode_range32(&mut r, "resync block")?;
                Message::ResyncCsumRequest { offset, len, digests: r.rest() }
            }
            kind::RESYNC_IN_SYNC => {
                let (offset, len) = decode_range32(&mut r, "resync block")?;
                Message::ResyncInSync { offset, len }
            }
            kind::VERIFY_REQUEST => {
                let (offset, len) = decode_range32(&mut r, "verify block")?;
                Message::VerifyRequest { offset, len }
            }
            kind::VERIFY_REPLY => {
                let (offset, len) = decode_range32(&mut r, "verify block")?;
                Message::VerifyReply { offset, len, digests: r.rest() }
            }
            kind::VERIFY_START => Message::VerifyStart { offset: r.u64()? },
            kind::VERIFY_DONE => {
                Message::VerifyDone { checked_bytes: r.u64()?, out_of_sync_blocks: r.u64()? }
            }
            kind::OUT_OF_SYNC => {
                let (offset, len) = decode_range32(&mut r, "out-of-sync range")?;
                Message::OutOfSync { offset, len }
            }
            kind::READ_REQUEST => {
                let seq = r.u64()?;
                let (offset, len) = decode_range32(&mut r, "read request")?;
                Message::ReadRequest { seq, offset, len }
            }
            kind::READ_REPLY => Message::ReadReply { seq: r.u64()?, data: r.rest() },
            other => return Err(DecodeError::Invalid { what: "message kind", value: other.into() }),
        };
        r.finish()?;
        Ok(message)
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_str16(out, s, MAX_STRING_LEN);
}

fn put_range_write(out: &mut Vec<u8>, seq: u64, offset: u64, len: u64, flags: u16, ack: AckMode) {
    out.put_u64(seq);
    out.put_u64(offset);
    out.put_u64(len);
    out.put_u16(flags);
    out.put_u16(ack.to_wire());
}

fn write_flag_bits(fua: bool, may_punch: bool) -> u16 {
    let mut flags = 0;
    if fua {
        flags |= write_flags::FUA;
    }
    if may_punch {
        flags |= write_flags::MAY_PUNCH;
    }
    flags
}

/// Returns (FUA, MAY_PUNCH) after rejecting any bit outside `allowed`.
fn decode_write_flags(flags: u16, allowed: u16) -> Result<(bool, bool), DecodeError> {
    if flags & !allowed != 0 {
        return Err(DecodeError::Invalid { what: "write flags", value: flags.into() });
    }
    Ok((flags & write_flags::FUA != 0, flags & write_flags::MAY_PUNCH != 0))
}

fn decode_ack(value: u16) -> Result<AckMode, DecodeError> {
    AckMode::from_wire(value).ok_or(DecodeError::Invalid { what: "ack mode", value: value.into() })
}

/// A range must end at or before 2^64, so that `offset + len` never wraps in the receiver.
fn check_range(offset: u64, len: u64) -> Result<(), DecodeError> {
    match offset.checked_add(len) {
        Some(_) => Ok(()),
        None => Err(DecodeError::Invalid { what: "range end (offset + length overflows)", value: offset }),
    }
}

/// An (offset u64, len u32) range: `len` at most [`MAX_DATA_LEN`], and not wrapping.
fn decode_range32(r: &mut Reader<'_>, what: &'static str) -> Result<(u64, u32), DecodeError> {
    let (offset, len) = (r.u64()?, r.u32()?);
    if len as usize > MAX_DATA_LEN {
        let limit = MAX_DATA_LEN as u64;
        return Err(DecodeError::TooLong { what, len: len.into(), limit });
    }
    check_range(offset, len.into())?;
    Ok((offset, len))
}

fn decode_params(r: &mut Reader<'_>) -> Result<Params, DecodeError> {
    let device_size = r.u64()?;
    let bitmap_block = r.u32()?;
    if !bitmap_block.is_power_of_two() || bitmap_block < MIN_BITMAP_BLOCK {
        return Err(DecodeError::Invalid { what: "bitmap block", value: bitmap_block.into() });
    }
    let p = r.u8()?;
    let protocol =
        Protocol::from_wire(p).ok_or(DecodeError::Invalid { what: "protocol", value: p.into() })?;
    let flags = r.u8()?;
    if flags & !params_flags::KNOWN != 0 {
        return Err(DecodeError::Invalid { what: "params flags", value: flags.into() });
    }
    let v = r.u8()?;
    let csums_alg = csums_from_wire(v).ok_or(DecodeError::Invalid { what: "csums alg", value: v.into() })?;
    let v = r.u8()?;
    let verify_alg =
        DigestAlg::from_wire(v).ok_or(DecodeError::Invalid { what: "verify alg", value: v.into() })?;
    let v = r.u8()?;
    let after_sb_0pri =
        AfterSb0::from_wire(v).ok_or(DecodeError::Invalid { what: "after-sb-0pri", value: v.into() })?;
    let v = r.u8()?;
    let after_sb_1pri =
        AfterSb1::from_wire(v).ok_or(DecodeError::Invalid { what: "after-sb-1pri", value: v.into() })?;
    let v = r.u8()?;
    let after_sb_2pri =
        AfterSb2::from_wire(v).ok_or(DecodeError::Invalid { what: "after-sb-2pri", value: v.into() })?;
    Ok(Params {
        protocol,
        device_size,
        bitmap_block,
        data_integrity: flags & params_flags::DATA_INTEGRITY != 0,
        discard_my_data: flags & params_flags::DISCARD_MY_DATA != 0,
        csums_alg,
        verify_alg,
        after_sb_0pri,
        after_sb_1pri,
        after_sb_2pri,
    })
}

fn decode_state(r: &mut Reader<'_>) -> Result<State, DecodeError> {
    let (role, disk) = (decode_role(r.u8()?)?, decode_disk(r.u8()?)?);
    let flags = r.u32()?;
    if flags & !state_flags::KNOWN != 0 {
        return Err(DecodeError::Invalid { what: "state flags", value: flags.into() });
    }
    let generations = Generations { current: r.u64()?, bitmap: r.u64()?, history: [r.u64()?, r.u64()?] };
    Ok(State { role, disk, flags, generations, dirty_blocks: r.u64()? })
}

#[cfg(test)]
mod tests;
