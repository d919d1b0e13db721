//! Establishing the pair of channels between the two nodes.
//!
//! The node whose name sorts lower dials; the other listens. The dialer opens the data channel,
//! completes its Hello and authentication, then opens the meta channel the same way; finally
//! Params and State are exchanged on the data channel. A listener that meets a connection that
//! fails the handshake (a stale attempt, a stranger) drops it and keeps waiting.

use std::net::SocketAddr;

use rdbd_protocol::repl::{Channel, Params, State};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use super::framed::{FrameError, Framed};
use super::handshake::{exchange_state, greet, greet_incoming, HandshakeError, Identity, PeerInfo};

/// Which side of the connection this node takes: the lower node name dials.
pub fn dials(local_node: &str, peer_node: &str) -> bool {
    local_node < peer_node
}

/// Both channels, authenticated, and what the peer reported.
pub struct Established {
    pub data: Framed,
    pub meta: Framed,
    pub peer: PeerInfo,
    /// This node's State as the peer got it.
    pub sent: State,
}

async fn connect_channel(
    addr: SocketAddr,
    channel: Channel,
    id: &Identity<'_>,
) -> Result<(Framed, u16), HandshakeError> {
    let stream = tokio::time::timeout(id.step_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| FrameError::Timeout(id.step_timeout))?
        .map_err(FrameError::Io)?;
    let mut framed = Framed::new(stream).map_err(FrameError::Io)?;
    let version = greet(&mut framed, channel, id).await?;
    Ok((framed, version))
}

/// The dialing side: one attempt to establish both channels with the peer at `addr`.
pub async fn dial(
    addr: SocketAddr,
    id: &Identity<'_>,
    params: Params,
    mut state: impl FnMut() -> Option<State> + Send,
) -> Result<Established, HandshakeError> {
    let (mut data, version) = connect_channel(addr, Channel::Data, id).await?;
    let (meta, _) = connect_channel(addr, Channel::Meta, id).await?;
    let (peer, sent) = exchange_state(&mut data, id, version, params, &mut state).await?;
    Ok(Established { data, meta, peer, sent })
}

/// The listening side: accepts connections until an authenticated data channel and meta
/// channel of the peer are both there (in either order; a newer channel of a kind replaces an
/// older one, so an attempt the dialer abandoned cannot be paired with its next one), then
/// exchanges Params and State. Connections that fail the Hello or authentication are dropped
/// and reported to `rejected`, and the wait goes on: whoever can reach the port must not be able
/// to stop the node from connecting to its real peer. Refusals after both channels are
/// authenticated (sizes, settings) are returned.
pub async fn listen(
    listener: &TcpListener,
    id: &Identity<'_>,
    params: Params,
    mut state: impl FnMut() -> Option<State> + Send,
    rejected: &mut (dyn FnMut(&HandshakeError) + Send),
) -> Result<Established, HandshakeError> {
    let (mut data, mut meta): (Option<(Framed, u16)>, Option<Framed>) = (None, None);
    loop {
        let (stream, from) = listener.accept().await.map_err(FrameError::Io)?;
        debug!(%from, "replication connection accepted");
        let mut framed = match Framed::new(stream) {
            Ok(f) => f,
            Err(e) => {
                warn!(%from, "cannot set up a replication connection: {e}");
                continue;
            }
        };
        match greet_incoming(&mut framed, id).await {
            Ok((version, Channel::Data)) => data = Some((framed, version)),
            Ok((_, Channel::Meta)) => meta = Some(framed),
            Err(e) => {
                warn!(%from, "replication connection dropped during its handshake: {e}");
                rejected(&e);
                continue;
            }
        }
        if data.is_some() && meta.is_some() {
            let ((mut data, version), meta) = (data.take().expect("checked"), meta.take().expect("checked"));
            let (peer, sent) = exchange_state(&mut data, id, version, params, &mut state).await?;
            return Ok(Established { data, meta, peer, sent });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdbd_protocol::repl::{DiskState, Generations, Message, Protocol, RefuseCode, Role};
    use std::time::Duration;

    fn id<'a>(local: &'a str, peer: &'a str, secret: &'a [u8]) -> Identity<'a> {
        Identity {
            resource: "res0",
            local_node: local,
            peer_node: peer,
            secret: Some(secret),
            step_timeout: Duration::from_secs(5),
        }
    }

    fn params() -> Params {
        Params { data_integrity: true, ..Params::with_defaults(Protocol::C, 1 << 30, 4096) }
    }

    /// The State snapshot a node takes when it sends it: always this one.
    fn state(current: u64) -> impl FnMut() -> Option<State> + Send {
        let state = State {
            role: Role::Primary,
            disk: DiskState::UpToDate,
            generations: Generations { current, ..Default::default() },
            dirty_blocks: 3,
            ..State::blank()
        };
        move || Some(state)
    }

    #[test]
    fn the_lower_name_dials() {
        assert!(dials("alpha", "beta"));
        assert!(!dials("beta", "alpha"));
    }

    #[tokio::test]
    async fn both_channels_come_up_and_carry_frames() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ida, idb) = (id("alpha", "beta", b"s3cret"), id("beta", "alpha", b"s3cret"));
        let mut ignore = |_: &HandshakeError| {};
        let (a, b) = tokio::join!(
            dial(addr, &ida, params(), state(0xa)),
            listen(&listener, &idb, params(), state(0xb), &mut ignore),
        );
        let (mut a, mut b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.peer.state.generations.current, 0xb);
        assert_eq!(b.peer.state.generations.current, 0xa);
        // The meta channel is a separate stream: a ping on it arrives while data is idle.
        a.meta.send(&Message::Ping).await.unwrap();
        assert!(matches!(b.meta.recv().await.unwrap(), Message::Ping));
        b.data.send(&Message::Flush { seq: 7 }).await.unwrap();
        assert!(matches!(a.data.recv().await.unwrap(), Message::Flush { seq: 7 }));
    }

    #[tokio::test]
    async fn a_stranger_is_dropped_and_the_real_peer_still_connects() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ida, idb) = (id("alpha", "beta", b"k"), id("beta", "alpha", b"k"));
        let mut ignore = |_: &HandshakeError| {};
        let server = listen(&listener, &idb, params(), state(2), &mut ignore);
        let clients = async {
            // Garbage that is not a replication frame, then a client that gives up mid-handshake.
            use tokio::io::AsyncWriteExt;
            let mut junk = TcpStream::connect(addr).await.unwrap();
            junk.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
            drop(junk);
            drop(TcpStream::connect(addr).await.unwrap());
            dial(addr, &ida, params(), state(1)).await
        };
        let (b, a) = tokio::join!(server, clients);
        assert_eq!(b.unwrap().peer.state.generations.current, 1);
        assert_eq!(a.unwrap().peer.state.generations.current, 2);
    }

    #[tokio::test]
    async fn a_wrong_secret_is_refused_and_the_listener_keeps_waiting() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ida, idb) = (id("alpha", "beta", b"one"), id("beta", "alpha", b"two"));
        let mut seen = Vec::new();
        let mut record = |e: &HandshakeError| seen.push(e.to_string());
        let server = tokio::time::timeout(
            Duration::from_millis(500),
            listen(&listener, &idb, params(), state(2), &mut record),
        );
        let (a, b) = tokio::join!(dial(addr, &ida, params(), state(1)), server);
        match a.err().unwrap() {
            HandshakeError::Refused { code, .. } | HandshakeError::RefusedByPeer { code, .. } => {
                assert_eq!(code, RefuseCode::AuthFailed)
            }
            other => panic!("expected an authentication refusal, got {other}"),
        }
        assert!(b.is_err(), "the listener is still waiting for its real peer");
        assert!(seen.iter().any(|e| e.contains("shared secret")), "{seen:?}");
    }

    #[tokio::test]
    async fn an_abandoned_channel_is_not_paired_with_the_next_attempt() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ida, idb) = (id("alpha", "beta", b"k"), id("beta", "alpha", b"k"));
        let mut ignore = |_: &HandshakeError| {};
        let server = listen(&listener, &idb, params(), state(2), &mut ignore);
        let client = async {
            // An authenticated data channel whose meta channel never comes.
            let (abandoned, _) = connect_channel(addr, Channel::Data, &ida).await.unwrap();
            drop(abandoned);
            dial(addr, &ida, params(), state(1)).await
        };
        let (b, a) = tokio::join!(server, client);
        assert_eq!(b.unwrap().peer.state.generations.current, 1);
        assert_eq!(a.unwrap().peer.state.generations.current, 2);
    }
}
