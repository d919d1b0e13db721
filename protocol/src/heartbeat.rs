//! The second heartbeat path (HEARTBEAT.md): signed UDP datagrams between the two nodes of a
//! resource over another address pair than the replication link, as pure encode/decode
//! functions.
//!
//! Every datagram tells the sender's role and disk and whether its replication link is up, so
//! that a node which lost the link can tell a dead peer from a broken interconnect. A Primary
//! that lost the link asks its peer over this path to mark its data Outdated (DRBD's
//! outdate-peer), instead of shooting it. Datagrams carry an HMAC-SHA256 under the resource's
//! shared secret; freshness comes from echoing the other side's sequence numbers, not clocks.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::repl::MAC_LEN;
use crate::states::{decode_disk, decode_role, DiskState, Role};
use crate::wire::{put_str16, DecodeError, Reader};

/// "RDBH".
pub const MAGIC: u32 = 0x5244_4248;
pub const VERSION: u8 = 1;
/// Resource and node names are at most this many bytes (both are far shorter in practice).
pub const MAX_NAME: usize = 255;
/// No valid datagram is longer: the fixed fields, two names, the MAC.
pub const MAX_DATAGRAM: usize = FIXED_LEN + 2 * (2 + MAX_NAME) + MAC_LEN;
const FIXED_LEN: usize = 4 + 1 + 1 + 2 + 8 * 4 + 3 + 8 + 1;

const FLAG_CONNECTED: u8 = 1;

/// What a datagram is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Sent every ping interval.
    Beat = 1,
    /// "Mark your data Outdated": sent by a node that lost the replication link and would write
    /// (or promote) without its peer.
    OutdateRequest = 2,
    /// The answer to one request, with its [`OutdateResult`].
    OutdateReply = 3,
}

/// The answer to an outdate request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutdateResult {
    /// Not a reply.
    None = 0,
    /// The replier's data is marked Outdated on its disk (or was not UpToDate anyway).
    Outdated = 1,
    /// The replier is Primary (or becoming it): it does not step aside.
    RefusedPrimary = 2,
    /// The replier still sees the replication link up: ask again later.
    RefusedConnected = 3,
    /// The request did not echo one of the replier's recent datagrams (stale or replayed).
    RefusedStale = 4,
    /// The replier could not write its metadata.
    Failed = 5,
}

/// One heartbeat datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    pub kind: Kind,
    /// Random for each run of the sender's daemon.
    pub boot: u64,
    /// Increases with every datagram the sender sends in this run.
    pub seq: u64,
    /// The last (boot, seq) the sender heard from the receiver, 0 if none.
    pub echo_boot: u64,
    pub echo_seq: u64,
    /// The sender's role and disk, one byte each as on the replication link.
    pub role: Role,
    pub disk: DiskState,
    /// The sender's replication link is up.
    pub connected: bool,
    /// An outdate request's id (random), echoed by its reply; 0 in a beat.
    pub request: u64,
    pub result: OutdateResult,
    pub resource: String,
    /// The sender.
    pub node: String,
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeartbeatError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("bad MAC: not signed with this resource's shared secret")]
    BadMac,
    #[error("datagram of {0} bytes: a heartbeat is at most {MAX_DATAGRAM}")]
    TooLong(usize),
}

type HmacSha256 = Hmac<Sha256>;

fn mac_of(secret: &[u8], body: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(b"rdbd heartbeat");
    mac.update(body);
    mac
}

impl Kind {
    fn from_u8(v: u8) -> Result<Self, DecodeError> {
        Ok(match v {
            1 => Kind::Beat,
            2 => Kind::OutdateRequest,
            3 => Kind::OutdateReply,
            other => return Err(DecodeError::Invalid { what: "heartbeat kind", value: other.into() }),
        })
    }
}

impl OutdateResult {
    fn from_u8(v: u8) -> Result<Self, DecodeError> {
        Ok(match v {
            0 => OutdateResult::None,
            1 => OutdateResult::Outdated,
            2 => OutdateResult::RefusedPrimary,
            3 => OutdateResult::RefusedConnected,
            4 => OutdateResult::RefusedStale,
            5 => OutdateResult::Failed,
            other => return Err(DecodeError::Invalid { what: "outdate result", value: other.into() }),
        })
    }
}

impl Datagram {
    /// The datagram, signed with `secret`.
    pub fn encode(&self, secret: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(FIXED_LEN + 4 + self.resource.len() + self.node.len() + MAC_LEN);
        out.extend_from_slice(&MAGIC.to_be_bytes());
        out.push(VERSION);
        out.push(self.kind as u8);
        out.extend_from_slice(&0u16.to_be_bytes());
        for v in [self.boot, self.seq, self.echo_boot, self.echo_seq] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.push(self.role.to_wire());
        out.push(self.disk.to_wire());
        out.push(if self.connected { FLAG_CONNECTED } else { 0 });
        out.extend_from_slice(&self.request.to_be_bytes());
        out.push(self.result as u8);
        put_str16(&mut out, &self.resource, MAX_NAME);
        put_str16(&mut out, &self.node, MAX_NAME);
        let mac = mac_of(secret, &out).finalize().into_bytes();
        out.extend_from_slice(&mac);
        out
    }

    /// Checks the MAC (in constant time) before anything else is believed, then decodes
    /// strictly: known kind and flags, no trailing bytes.
    pub fn decode(bytes: &[u8], secret: &[u8]) -> Result<Self, HeartbeatError> {
        if bytes.len() > MAX_DATAGRAM {
            return Err(HeartbeatError::TooLong(bytes.len()));
        }
        if bytes.len() < FIXED_LEN + 4 + MAC_LEN {
            return Err(DecodeError::Truncated { needed: FIXED_LEN + 4 + MAC_LEN - bytes.len() }.into());
        }
        let (body, mac) = bytes.split_at(bytes.len() - MAC_LEN);
        mac_of(secret, body).verify_slice(mac).map_err(|_| HeartbeatError::BadMac)?;
        let mut r = Reader::new(body);
        let magic = r.u32()?;
        if magic != MAGIC {
            return Err(DecodeError::BadMagic { expected: MAGIC.into(), found: magic.into() }.into());
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(DecodeError::Invalid { what: "heartbeat version", value: version.into() }.into());
        }
        let kind = Kind::from_u8(r.u8()?)?;
        let reserved = r.u16()?;
        if reserved != 0 {
            return Err(
                DecodeError::Invalid { what: "heartbeat reserved field", value: reserved.into() }.into()
            );
        }
        let (boot, seq, echo_boot, echo_seq) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
        let (role, disk) = (decode_role(r.u8()?)?, decode_disk(r.u8()?)?);
        let flags = r.u8()?;
        if flags & !FLAG_CONNECTED != 0 {
            return Err(DecodeError::Invalid { what: "heartbeat flags", value: flags.into() }.into());
        }
        let request = r.u64()?;
        let result = OutdateResult::from_u8(r.u8()?)?;
        let resource = r.string16("resource name", MAX_NAME)?.to_string();
        let node = r.string16("node name", MAX_NAME)?.to_string();
        r.finish()?;
        Ok(Datagram {
            kind,
            boot,
            seq,
            echo_boot,
            echo_seq,
            role,
            disk,
            connected: flags & FLAG_CONNECTED != 0,
            request,
            result,
            resource,
            node,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn beat() -> Datagram {
        Datagram {
            kind: Kind::OutdateRequest,
            boot: 7,
            seq: 42,
            echo_boot: 9,
            echo_seq: 40,
            role: Role::Primary,
            disk: DiskState::UpToDate,
            connected: false,
            request: 0xfeed,
            result: OutdateResult::None,
            resource: "res0".into(),
            node: "alpha".into(),
        }
    }

    #[test]
    fn round_trips_and_rejects_another_secret() {
        let d = beat();
        let bytes = d.encode(b"s3cret");
        assert!(bytes.len() <= MAX_DATAGRAM);
        assert_eq!(Datagram::decode(&bytes, b"s3cret"), Ok(d));
        assert_eq!(Datagram::decode(&bytes, b"other"), Err(HeartbeatError::BadMac));
    }

    #[test]
    fn a_changed_bit_breaks_the_mac() {
        let bytes = beat().encode(b"s3cret");
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 1;
            assert!(Datagram::decode(&b, b"s3cret").is_err(), "byte {i}");
        }
    }

    #[test]
    fn signed_nonsense_is_rejected_by_the_decoder() {
        let mut body = beat().encode(b"k");
        body.truncate(body.len() - MAC_LEN);
        body[5] = 9; // unknown kind
        let mac = mac_of(b"k", &body).finalize().into_bytes();
        body.extend_from_slice(&mac);
        assert!(matches!(Datagram::decode(&body, b"k"), Err(HeartbeatError::Decode(_))));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            let _ = Datagram::decode(&bytes, b"s3cret");
        }

        #[test]
        fn any_datagram_round_trips(boot: u64, seq: u64, echo_seq: u64, request: u64, connected: bool,
                                    node in "[a-z]{1,20}", role in 0u8..3, disk in 0u8..9) {
            let (role, disk) = (Role::from_wire(role).unwrap(), DiskState::from_wire(disk).unwrap());
            let d = Datagram { boot, seq, echo_seq, request, connected, node, role, disk, ..beat() };
            prop_assert_eq!(Datagram::decode(&d.encode(b"x"), b"x"), Ok(d));
        }
    }
}
