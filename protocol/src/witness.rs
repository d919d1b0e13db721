//! The quorum witness protocol (WITNESS.md): what a node and `rdbd witness` say to each other,
//! as pure encode/decode functions.
//!
//! A connection opens like a replication channel (Hello both ways, then mutual challenge-response
//! with the shared secret, [`crate::repl::auth`]). After that the node sends a [`Claim`] every
//! heartbeat and the witness answers each with a [`Verdict`]: whether this node holds the
//! resource's lease (the witness's vote) and for how long. Both carry a MAC under a key derived
//! from the secret and both nonces, so that a relay cannot turn a refusal into a grant.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::repl::{MAC_LEN, NONCE_LEN};
use crate::wire::{put_str16, DecodeError, Reader};

/// "RDBW".
pub const MAGIC: u32 = 0x5244_4257;
pub const VERSION: u32 = 1;
/// Bytes of a frame header: magic, kind, flags (0), payload length.
pub const HEADER_LEN: usize = 12;
/// No witness message is longer.
pub const MAX_PAYLOAD: u32 = 8192;
/// Names and messages are at most this many bytes.
pub const MAX_STRING: usize = 1024;
/// The name the witness uses for itself in Hello and in its authentication response.
pub const WITNESS_NAME: &str = "witness";

const KIND_HELLO: u16 = 1;
const KIND_CHALLENGE: u16 = 2;
const KIND_RESPONSE: u16 = 3;
const KIND_CLAIM: u16 = 4;
const KIND_VERDICT: u16 = 5;
const KIND_REFUSE: u16 = 6;

const CLAIM_WANT_LEASE: u8 = 1;
const CLAIM_PEER_CONNECTED: u8 = 2;
const CLAIM_UP_TO_DATE: u8 = 4;
const CLAIM_PEER_UP_TO_DATE: u8 = 8;
const CLAIM_FORCED: u8 = 16;
const VERDICT_GRANTED: u8 = 1;
const VERDICT_OUTDATED: u8 = 2;

/// What a node tells the witness every heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// Increases with every claim of the connection; the verdict echoes it.
    pub seq: u64,
    /// The node wants the lease: it is Primary, or it would promote.
    pub want_lease: bool,
    /// The other node of the resource.
    pub peer: String,
    pub peer_connected: bool,
    pub up_to_date: bool,
    pub peer_up_to_date: bool,
    /// The operator forced this node Primary (`primary --force`): its data is the newest now,
    /// whatever the witness remembered.
    pub forced: bool,
}

/// The witness's answer to one claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub seq: u64,
    /// The claimant holds the lease for `lease_ms` from when it sent the claim.
    pub granted: bool,
    pub lease_ms: u32,
    /// Who holds the lease now ("" for nobody).
    pub holder: String,
    /// The claimant's data is known to be stale: its peer wrote alone under the lease. It gets
    /// the lease again only after it was in sync with its peer.
    pub outdated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello { version: u32, resource: String, node: String },
    AuthChallenge { nonce: [u8; NONCE_LEN] },
    AuthResponse { mac: [u8; MAC_LEN] },
    Claim { claim: Claim, mac: [u8; MAC_LEN] },
    Verdict { verdict: Verdict, mac: [u8; MAC_LEN] },
    Refuse { message: String },
}

/// A decoded frame header: the kind and how many payload bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: u16,
    pub length: u32,
}

impl FrameHeader {
    /// Checks magic, flags, kind and length before any buffer is sized.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(b);
        let magic = r.u32()?;
        if magic != MAGIC {
            return Err(DecodeError::BadMagic { expected: MAGIC.into(), found: magic.into() });
        }
        let kind = r.u16()?;
        let flags = r.u16()?;
        let length = r.u32()?;
        if flags != 0 {
            return Err(DecodeError::Invalid { what: "frame flags", value: flags.into() });
        }
        if !(KIND_HELLO..=KIND_REFUSE).contains(&kind) {
            return Err(DecodeError::Invalid { what: "witness message kind", value: kind.into() });
        }
        if length > MAX_PAYLOAD {
            return Err(DecodeError::TooLong {
                what: "witness frame",
                len: length.into(),
                limit: MAX_PAYLOAD.into(),
            });
        }
        Ok(Self { kind, length })
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_str16(out, s, MAX_STRING);
}

fn get_str(r: &mut Reader<'_>, what: &'static str) -> Result<String, DecodeError> {
    Ok(r.string16(what, MAX_STRING)?.to_string())
}

fn get_bool_flags(r: &mut Reader<'_>, what: &'static str, known: u8) -> Result<u8, DecodeError> {
    let flags = r.u8()?;
    if flags & !known != 0 {
        return Err(DecodeError::Invalid { what, value: flags.into() });
    }
    Ok(flags)
}

impl Claim {
    /// The bytes the claim's MAC covers (everything but the MAC).
    pub fn body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.peer.len());
        out.extend_from_slice(&self.seq.to_be_bytes());
        let mut flags = 0;
        for (set, bit) in [
            (self.want_lease, CLAIM_WANT_LEASE),
            (self.peer_connected, CLAIM_PEER_CONNECTED),
            (self.up_to_date, CLAIM_UP_TO_DATE),
            (self.peer_up_to_date, CLAIM_PEER_UP_TO_DATE),
            (self.forced, CLAIM_FORCED),
        ] {
            if set {
                flags |= bit;
            }
        }
        out.push(flags);
        put_str(&mut out, &self.peer);
        out
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let seq = r.u64()?;
        let known =
            CLAIM_WANT_LEASE | CLAIM_PEER_CONNECTED | CLAIM_UP_TO_DATE | CLAIM_PEER_UP_TO_DATE | CLAIM_FORCED;
        let flags = get_bool_flags(r, "claim flags", known)?;
        Ok(Self {
            seq,
            want_lease: flags & CLAIM_WANT_LEASE != 0,
            peer: get_str(r, "peer name")?,
            peer_connected: flags & CLAIM_PEER_CONNECTED != 0,
            up_to_date: flags & CLAIM_UP_TO_DATE != 0,
            peer_up_to_date: flags & CLAIM_PEER_UP_TO_DATE != 0,
            forced: flags & CLAIM_FORCED != 0,
        })
    }
}

impl Verdict {
    /// The bytes the verdict's MAC covers.
    pub fn body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.holder.len());
        out.extend_from_slice(&self.seq.to_be_bytes());
        let mut flags = 0;
        if self.granted {
            flags |= VERDICT_GRANTED;
        }
        if self.outdated {
            flags |= VERDICT_OUTDATED;
        }
        out.push(flags);
        out.extend_from_slice(&self.lease_ms.to_be_bytes());
        put_str(&mut out, &self.holder);
        out
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let seq = r.u64()?;
        let flags = get_bool_flags(r, "verdict flags", VERDICT_GRANTED | VERDICT_OUTDATED)?;
        let lease_ms = r.u32()?;
        Ok(Self {
            seq,
            granted: flags & VERDICT_GRANTED != 0,
            lease_ms,
            holder: get_str(r, "lease holder")?,
            outdated: flags & VERDICT_OUTDATED != 0,
        })
    }
}

impl Message {
    fn kind(&self) -> u16 {
        match self {
            Message::Hello { .. } => KIND_HELLO,
            Message::AuthChallenge { .. } => KIND_CHALLENGE,
            Message::AuthResponse { .. } => KIND_RESPONSE,
            Message::Claim { .. } => KIND_CLAIM,
            Message::Verdict { .. } => KIND_VERDICT,
            Message::Refuse { .. } => KIND_REFUSE,
        }
    }

    /// The whole frame: header and payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut payload = Vec::new();
        match self {
            Message::Hello { version, resource, node } => {
                payload.extend_from_slice(&version.to_be_bytes());
                put_str(&mut payload, resource);
                put_str(&mut payload, node);
            }
            Message::AuthChallenge { nonce } => payload.extend_from_slice(nonce),
            Message::AuthResponse { mac } => payload.extend_from_slice(mac),
            Message::Claim { claim, mac } => {
                payload = claim.body();
                payload.extend_from_slice(mac);
            }
            Message::Verdict { verdict, mac } => {
                payload = verdict.body();
                payload.extend_from_slice(mac);
            }
            Message::Refuse { message } => put_str(&mut payload, message),
        }
        let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
        frame.extend_from_slice(&MAGIC.to_be_bytes());
        frame.extend_from_slice(&self.kind().to_be_bytes());
        frame.extend_from_slice(&0u16.to_be_bytes());
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(&payload);
        frame
    }

    /// Decodes the payload of a frame of `kind` (from [`FrameHeader::decode`]); strict: no
    /// trailing bytes, no unknown flags, valid UTF-8.
    pub fn decode(kind: u16, payload: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(payload);
        let message = match kind {
            KIND_HELLO => Message::Hello {
                version: r.u32()?,
                resource: get_str(&mut r, "resource name")?,
                node: get_str(&mut r, "node name")?,
            },
            KIND_CHALLENGE => Message::AuthChallenge { nonce: r.array()? },
            KIND_RESPONSE => Message::AuthResponse { mac: r.array()? },
            KIND_CLAIM => Message::Claim { claim: Claim::decode(&mut r)?, mac: r.array()? },
            KIND_VERDICT => Message::Verdict { verdict: Verdict::decode(&mut r)?, mac: r.array()? },
            KIND_REFUSE => Message::Refuse { message: get_str(&mut r, "refusal")? },
            other => return Err(DecodeError::Invalid { what: "witness message kind", value: other.into() }),
        };
        r.finish()?;
        Ok(message)
    }
}

type HmacSha256 = Hmac<Sha256>;

/// The key that signs a connection's claims and verdicts, from the shared secret and both
/// challenges, so that it is new for every connection.
pub fn session_key(secret: &[u8], node_nonce: &[u8; NONCE_LEN], witness_nonce: &[u8; NONCE_LEN]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(b"rdbd witness session");
    mac.update(node_nonce);
    mac.update(witness_nonce);
    mac.finalize().into_bytes().into()
}

/// The MAC of a claim's or verdict's `body` (the kind is bound in, so one cannot pass for the other).
pub fn message_mac(key: &[u8; 32], kind_is_claim: bool, body: &[u8]) -> [u8; MAC_LEN] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(if kind_is_claim { b"claim" } else { b"verdict" });
    mac.update(body);
    mac.finalize().into_bytes().into()
}

/// Checks a MAC from [`message_mac`] in constant time.
pub fn verify_message_mac(key: &[u8; 32], kind_is_claim: bool, body: &[u8], mac: &[u8; MAC_LEN]) -> bool {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(if kind_is_claim { b"claim" } else { b"verdict" });
    m.update(body);
    m.verify_slice(mac).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(m: &Message) -> Message {
        let frame = m.encode();
        let header = FrameHeader::decode(frame[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(header.length as usize, frame.len() - HEADER_LEN);
        Message::decode(header.kind, &frame[HEADER_LEN..]).unwrap()
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-z0-9-]{0,20}"
    }

    proptest! {
        #[test]
        fn claims_and_verdicts_round_trip(seq: u64, flags in 0u8..32, peer in name(), lease_ms: u32, mac: [u8; 32]) {
            let claim = Claim {
                seq, want_lease: flags & 1 != 0, peer: peer.clone(), peer_connected: flags & 2 != 0,
                up_to_date: flags & 4 != 0, peer_up_to_date: flags & 8 != 0, forced: flags & 16 != 0,
            };
            let m = Message::Claim { claim, mac };
            prop_assert_eq!(roundtrip(&m), m);
            let verdict = Verdict { seq, granted: flags & 1 != 0, lease_ms, holder: peer, outdated: flags & 2 != 0 };
            let m = Message::Verdict { verdict, mac };
            prop_assert_eq!(roundtrip(&m), m);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(kind in 0u16..8, payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(m) = Message::decode(kind, &payload) {
                // One encoding per message: what decodes re-encodes to the same bytes.
                prop_assert_eq!(&m.encode()[HEADER_LEN..], &payload[..]);
            }
        }
    }

    #[test]
    fn handshake_messages_round_trip() {
        for m in [
            Message::Hello { version: VERSION, resource: "res0".into(), node: "alpha".into() },
            Message::AuthChallenge { nonce: [7; NONCE_LEN] },
            Message::AuthResponse { mac: [9; MAC_LEN] },
            Message::Refuse { message: "wrong secret".into() },
        ] {
            assert_eq!(roundtrip(&m), m);
        }
    }

    #[test]
    fn headers_are_checked_before_any_buffer_is_sized() {
        let mut frame = Message::Refuse { message: "x".into() }.encode();
        let header = |f: &[u8]| FrameHeader::decode(f[..HEADER_LEN].try_into().unwrap());
        frame[8..12].copy_from_slice(&(MAX_PAYLOAD + 1).to_be_bytes());
        assert!(matches!(header(&frame), Err(DecodeError::TooLong { .. })));
        frame[4..6].copy_from_slice(&99u16.to_be_bytes());
        assert!(matches!(header(&frame), Err(DecodeError::Invalid { .. })));
        frame[0] = 0;
        assert!(matches!(header(&frame), Err(DecodeError::BadMagic { .. })));
    }

    #[test]
    fn unknown_flag_bits_and_trailing_bytes_are_rejected() {
        let claim = Claim {
            seq: 1,
            want_lease: true,
            peer: "beta".into(),
            peer_connected: false,
            up_to_date: true,
            peer_up_to_date: false,
            forced: false,
        };
        let mut payload = claim.body();
        payload.extend_from_slice(&[0; MAC_LEN]);
        payload[8] |= 0x80;
        assert!(Message::decode(KIND_CLAIM, &payload).is_err());
        payload[8] &= 0x7f;
        payload.push(0);
        assert!(matches!(Message::decode(KIND_CLAIM, &payload), Err(DecodeError::TrailingBytes(1))));
    }

    #[test]
    fn a_verdict_mac_does_not_verify_a_changed_verdict_or_another_key() {
        let key = session_key(b"secret", &[1; NONCE_LEN], &[2; NONCE_LEN]);
        let other = session_key(b"secret", &[1; NONCE_LEN], &[3; NONCE_LEN]);
        let v = Verdict { seq: 5, granted: false, lease_ms: 3000, holder: "alpha".into(), outdated: false };
        let mac = message_mac(&key, false, &v.body());
        assert!(verify_message_mac(&key, false, &v.body(), &mac));
        assert!(!verify_message_mac(&other, false, &v.body(), &mac));
        assert!(!verify_message_mac(&key, true, &v.body(), &mac), "a verdict cannot pass for a claim");
        let forged = Verdict { granted: true, ..v };
        assert!(!verify_message_mac(&key, false, &forged.body(), &mac));
    }
}
