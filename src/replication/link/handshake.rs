//! The handshake on a pair of replication channels: Hello and version negotiation, mutual
//! HMAC challenge–response, then (data channel) Params and State. Any refusal is sent to the
//! peer as a `Refuse` frame with its reason before closing, so both logs say why.

use std::time::Duration;

use rdbd_protocol::repl::{
    self, auth_response, is_reflected, verify_response, Channel, Hello, Message, Params, RefuseCode, State,
    NONCE_LEN, PROTOCOL_MIN, PROTOCOL_VERSION,
};

use super::framed::{FrameError, Framed};

/// Who we are and whom we expect.
#[derive(Debug, Clone, Copy)]
pub struct Identity<'a> {
    pub resource: &'a str,
    pub local_node: &'a str,
    pub peer_node: &'a str,
    /// Both sides prove they know it (no secret configured means the empty secret, so a secret
    /// set on one node only fails authentication like a wrong one).
    pub secret: Option<&'a [u8]>,
    /// How long each step may wait for the peer.
    pub step_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("peer refused the connection ({code:?}): {message}")]
    RefusedByPeer { code: RefuseCode, message: String },
    #[error("refused the peer ({code:?}): {message}")]
    Refused { code: RefuseCode, message: String },
    #[error("peer sent {got} where {expected} was due")]
    Unexpected { expected: &'static str, got: String },
    /// This node cannot tell its State yet (a role change is under way): closed, tried again.
    #[error("this node's role is changing: the handshake is tried again")]
    NotNow,
}

/// This node's State, taken at the moment it is sent (`None`: not now, see
/// [`HandshakeError::NotNow`]). Taken late so that a role change made while the peer was not
/// yet there is in it, and one made after it is decided with the peer.
pub type StateSnapshot<'a> = dyn FnMut() -> Option<State> + Send + 'a;

/// What the data channel's handshake learned about the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerInfo {
    pub version: u16,
    pub params: Params,
    pub state: State,
}

fn describe(m: &Message<'_>) -> String {
    match m {
        Message::Refuse { .. } => "Refuse".into(),
        other => format!("message kind {:#x}", other.kind()),
    }
}

/// Sends a refusal and returns the matching error for our own log.
async fn refuse(ch: &mut Framed, code: RefuseCode, message: String) -> HandshakeError {
    // Best effort: the peer may already be gone.
    let _ = ch.send(&Message::Refuse { code, message: &message }).await;
    HandshakeError::Refused { code, message }
}

fn refused_by_peer(m: &Message<'_>) -> Option<HandshakeError> {
    match m {
        Message::Refuse { code, message } => {
            Some(HandshakeError::RefusedByPeer { code: *code, message: (*message).to_owned() })
        }
        _ => None,
    }
}

/// Hello exchange and authentication on one channel; returns the negotiated version.
pub async fn greet(ch: &mut Framed, channel: Channel, id: &Identity<'_>) -> Result<u16, HandshakeError> {
    ch.send(&Message::Hello(hello(channel, id))).await?;
    let (checked, their_channel) = match ch.recv_within(id.step_timeout).await? {
        Message::Hello(h) => (check_hello(&h, id), h.channel),
        other => return Err(unexpected("Hello", &other)),
    };
    let theirs = match checked {
        Ok(range) => range,
        Err((code, message)) => return Err(refuse(ch, code, message).await),
    };
    if their_channel != channel {
        let message = format!("expected the {channel:?} channel, peer opened {their_channel:?}");
        return Err(refuse(ch, RefuseCode::Other, message).await);
    }
    negotiate_and_authenticate(ch, theirs, id).await
}

/// The listener's side of [`greet`]: the dialer names the channel in its Hello, and the answer
/// names the same one, so the listener can pair channels in whatever order they arrive.
pub async fn greet_incoming(ch: &mut Framed, id: &Identity<'_>) -> Result<(u16, Channel), HandshakeError> {
    let (checked, channel) = match ch.recv_within(id.step_timeout).await? {
        Message::Hello(h) => (check_hello(&h, id), h.channel),
        other => return Err(unexpected("Hello", &other)),
    };
    let theirs = match checked {
        Ok(range) => range,
        Err((code, message)) => return Err(refuse(ch, code, message).await),
    };
    ch.send(&Message::Hello(hello(channel, id))).await?;
    Ok((negotiate_and_authenticate(ch, theirs, id).await?, channel))
}

fn hello<'a>(channel: Channel, id: &Identity<'a>) -> Hello<'a> {
    Hello {
        protocol_min: PROTOCOL_MIN,
        protocol_max: PROTOCOL_VERSION,
        channel,
        node_name: id.local_node,
        resource: id.resource,
    }
}

/// Checks the peer's Hello names our resource and our peer; returns its version range, or the
/// refusal to send.
fn check_hello(h: &Hello<'_>, id: &Identity<'_>) -> Result<(u16, u16), (RefuseCode, String)> {
    let problem = if h.resource != id.resource {
        Some((
            RefuseCode::ResourceMismatch,
            format!("expected resource {}, peer serves {}", id.resource, h.resource),
        ))
    } else if h.node_name != id.peer_node {
        Some((
            RefuseCode::ResourceMismatch,
            format!("expected node {}, peer is {}", id.peer_node, h.node_name),
        ))
    } else {
        None
    };
    match problem {
        Some(refusal) => Err(refusal),
        None => Ok((h.protocol_min, h.protocol_max)),
    }
}

async fn negotiate_and_authenticate(
    ch: &mut Framed,
    theirs: (u16, u16),
    id: &Identity<'_>,
) -> Result<u16, HandshakeError> {
    let Some(version) = repl::negotiate((PROTOCOL_MIN, PROTOCOL_VERSION), theirs) else {
        let message = format!(
            "no common protocol version: we speak {PROTOCOL_MIN}..={PROTOCOL_VERSION}, peer {}..={}",
            theirs.0, theirs.1
        );
        return Err(refuse(ch, RefuseCode::IncompatibleVersion, message).await);
    };
    authenticate(ch, id.secret.unwrap_or_default(), id).await?;
    Ok(version)
}

fn unexpected(expected: &'static str, got: &Message<'_>) -> HandshakeError {
    refused_by_peer(got).unwrap_or_else(|| HandshakeError::Unexpected { expected, got: describe(got) })
}

/// Mutual challenge–response: each side proves it knows the secret by MACing the other's nonce.
async fn authenticate(ch: &mut Framed, secret: &[u8], id: &Identity<'_>) -> Result<(), HandshakeError> {
    let mut nonce = [0u8; NONCE_LEN];
    rustix::rand::getrandom(&mut nonce, rustix::rand::GetRandomFlags::empty())
        .map_err(|e| FrameError::Io(e.into()))?;
    ch.send(&Message::AuthChallenge { nonce }).await?;
    let peer_nonce = match ch.recv_within(id.step_timeout).await? {
        Message::AuthChallenge { nonce } => nonce,
        other => return Err(unexpected("AuthChallenge", &other)),
    };
    if is_reflected(&nonce, &peer_nonce) {
        return Err(refuse(ch, RefuseCode::AuthFailed, "challenge reflected back".into()).await);
    }
    let mac = auth_response(secret, &peer_nonce, id.local_node);
    ch.send(&Message::AuthResponse { mac }).await?;
    let peer_mac = match ch.recv_within(id.step_timeout).await? {
        Message::AuthResponse { mac } => mac,
        other => return Err(unexpected("AuthResponse", &other)),
    };
    if !verify_response(secret, &nonce, id.peer_node, &peer_mac) {
        let message = format!(
            "node {} does not know the shared secret (or shared-secret is set on one node only)",
            id.peer_node
        );
        return Err(refuse(ch, RefuseCode::AuthFailed, message).await);
    }
    Ok(())
}

/// After [`greet`] on the data channel: exchanges and checks Params, then State.
pub async fn exchange_state(
    ch: &mut Framed,
    id: &Identity<'_>,
    version: u16,
    ours: Params,
    snapshot: &mut StateSnapshot<'_>,
) -> Result<(PeerInfo, State), HandshakeError> {
    ch.send(&Message::Params(ours)).await?;
    let params = match ch.recv_within(id.step_timeout).await? {
        Message::Params(p) => p,
        other => return Err(unexpected("Params", &other)),
    };
    if params.device_size != ours.device_size {
        let message = format!(
            "device sizes differ: {} has {} bytes, {} has {}",
            id.local_node, ours.device_size, id.peer_node, params.device_size
        );
        return Err(refuse(ch, RefuseCode::SizeMismatch, message).await);
    }
    if params.discard_my_data && ours.discard_my_data {
        let message = "both nodes were told to discard their data (connect --discard-my-data): only one can"
            .to_string();
        return Err(refuse(ch, RefuseCode::ConfigMismatch, message).await);
    }
    if (params.protocol, params.bitmap_block, params.data_integrity)
        != (ours.protocol, ours.bitmap_block, ours.data_integrity)
    {
        let message = format!(
            "settings differ: protocol {:?}/{:?}, bitmap block {}/{}, data integrity {}/{}",
            ours.protocol,
            params.protocol,
            ours.bitmap_block,
            params.bitmap_block,
            ours.data_integrity,
            params.data_integrity
        );
        return Err(refuse(ch, RefuseCode::ConfigMismatch, message).await);
    }
    if (params.csums_alg, params.verify_alg) != (ours.csums_alg, ours.verify_alg)
        || (params.after_sb_0pri, params.after_sb_1pri, params.after_sb_2pri)
            != (ours.after_sb_0pri, ours.after_sb_1pri, ours.after_sb_2pri)
    {
        let message = format!(
            "settings differ: csums-alg {:?}/{:?}, verify-alg {:?}/{:?}, after-sb-0pri {:?}/{:?}, \
             after-sb-1pri {:?}/{:?}, after-sb-2pri {:?}/{:?}",
            ours.csums_alg,
            params.csums_alg,
            ours.verify_alg,
            params.verify_alg,
            ours.after_sb_0pri,
            params.after_sb_0pri,
            ours.after_sb_1pri,
            params.after_sb_1pri,
            ours.after_sb_2pri,
            params.after_sb_2pri
        );
        return Err(refuse(ch, RefuseCode::ConfigMismatch, message).await);
    }
    let sent = snapshot().ok_or(HandshakeError::NotNow)?;
    ch.send(&Message::State(sent)).await?;
    let state = match ch.recv_within(id.step_timeout).await? {
        Message::State(s) => s,
        other => return Err(unexpected("State", &other)),
    };
    Ok((PeerInfo { version, params, state }, sent))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdbd_protocol::repl::{AfterSb0, AfterSb1, AfterSb2, DigestAlg, Generations, Protocol};
    use tokio::net::{TcpListener, TcpStream};

    fn identity<'a>(local: &'a str, peer: &'a str, secret: Option<&'a [u8]>) -> Identity<'a> {
        Identity {
            resource: "res0",
            local_node: local,
            peer_node: peer,
            secret,
            step_timeout: Duration::from_secs(5),
        }
    }

    fn params(size: u64) -> Params {
        Params::with_defaults(Protocol::C, size, 4096)
    }

    fn state(current: u64) -> State {
        State { generations: Generations { current, ..Default::default() }, ..State::blank() }
    }

    async fn pair() -> (Framed, Framed) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (Framed::new(a.unwrap()).unwrap(), Framed::new(b.unwrap().0).unwrap())
    }

    /// One end of the data-channel handshake.
    async fn side(mut ch: Framed, id: Identity<'_>, p: Params, s: State) -> Result<PeerInfo, HandshakeError> {
        let version = greet(&mut ch, Channel::Data, &id).await?;
        let (peer, sent) = exchange_state(&mut ch, &id, version, p, &mut || Some(s)).await?;
        assert_eq!(sent, s);
        Ok(peer)
    }

    /// Runs the full data-channel handshake on both ends.
    async fn handshake(
        a: Identity<'_>,
        b: Identity<'_>,
        pa: Params,
        pb: Params,
    ) -> (Result<PeerInfo, HandshakeError>, Result<PeerInfo, HandshakeError>) {
        let (ca, cb) = pair().await;
        tokio::join!(side(ca, a, pa, state(10)), side(cb, b, pb, state(20)))
    }

    #[tokio::test]
    async fn matching_secrets_connect_and_exchange_state() {
        let s: &[u8] = b"correct horse";
        let (ra, rb) = handshake(
            identity("alpha", "beta", Some(s)),
            identity("beta", "alpha", Some(s)),
            params(1 << 30),
            params(1 << 30),
        )
        .await;
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!(ra.version, PROTOCOL_VERSION);
        assert_eq!(ra.state.generations.current, 20);
        assert_eq!(rb.state.generations.current, 10);
        assert_eq!(rb.params.device_size, 1 << 30);
    }

    #[tokio::test]
    async fn a_wrong_secret_is_refused_on_both_sides() {
        let (ra, rb) = handshake(
            identity("alpha", "beta", Some(b"right")),
            identity("beta", "alpha", Some(b"wrong")),
            params(1 << 30),
            params(1 << 30),
        )
        .await;
        for r in [ra, rb] {
            let e = r.unwrap_err();
            assert!(
                matches!(
                    e,
                    HandshakeError::Refused { code: RefuseCode::AuthFailed, .. }
                        | HandshakeError::RefusedByPeer { code: RefuseCode::AuthFailed, .. }
                ),
                "{e}"
            );
        }
    }

    #[tokio::test]
    async fn a_secret_on_one_side_only_is_refused() {
        let (ra, rb) = handshake(
            identity("alpha", "beta", Some(b"s")),
            identity("beta", "alpha", None),
            params(4096),
            params(4096),
        )
        .await;
        assert!(ra.is_err() && rb.is_err());
        let text = format!("{} / {}", ra.unwrap_err(), rb.unwrap_err());
        assert!(text.contains("one node only"), "{text}");
    }

    #[tokio::test]
    async fn different_sizes_are_refused_with_both_sizes_named() {
        let (ra, rb) = handshake(
            identity("alpha", "beta", None),
            identity("beta", "alpha", None),
            params(1 << 30),
            params(2 << 30),
        )
        .await;
        let e = ra.unwrap_err().to_string();
        assert!(e.contains("SizeMismatch") && e.contains(&(1u64 << 30).to_string()), "{e}");
        assert!(rb.is_err());
    }

    #[tokio::test]
    async fn different_digest_or_split_brain_settings_are_refused_with_both_values_named() {
        let base = params(4096);
        let cases = [
            (Params { csums_alg: Some(DigestAlg::Crc32c), ..base }, "csums-alg None/Some(Crc32c)"),
            (Params { verify_alg: DigestAlg::Crc32c, ..base }, "verify-alg Sha256/Crc32c"),
            (
                Params { after_sb_0pri: AfterSb0::DiscardDialer, ..base },
                "after-sb-0pri Disconnect/DiscardDialer",
            ),
            (Params { after_sb_1pri: AfterSb1::Consensus, ..base }, "after-sb-1pri Disconnect/Consensus"),
            (
                Params { after_sb_2pri: AfterSb2::CallPriLostAfterSb, ..base },
                "after-sb-2pri Disconnect/CallPriLostAfterSb",
            ),
        ];
        for (theirs, named) in cases {
            let (ra, rb) =
                handshake(identity("alpha", "beta", None), identity("beta", "alpha", None), base, theirs)
                    .await;
            let e = ra.unwrap_err().to_string();
            assert!(e.contains("ConfigMismatch") && e.contains(named), "{e}");
            assert!(rb.is_err());
        }
    }

    #[tokio::test]
    async fn an_unexpected_node_is_refused() {
        let (ra, rb) = handshake(
            identity("alpha", "beta", None),
            identity("gamma", "alpha", None),
            params(4096),
            params(4096),
        )
        .await;
        assert!(ra.unwrap_err().to_string().contains("expected node beta, peer is gamma"));
        assert!(rb.is_err());
    }
}
