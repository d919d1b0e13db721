//! One witness connection: framed messages, the handshake (Hello both ways, mutual
//! challenge-response), and claims and verdicts signed with the connection's session key.

use std::time::Duration;

use rdbd_protocol::repl::{auth_response, is_reflected, verify_response, NONCE_LEN};
use rdbd_protocol::witness::{
    message_mac, session_key, verify_message_mac, Claim, FrameHeader, Message, Verdict, HEADER_LEN, VERSION,
    WITNESS_NAME,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::WitnessError;

/// The handshake must be over within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// An authenticated connection, from either end.
pub struct Channel {
    stream: TcpStream,
    key: [u8; 32],
    /// The other end's name (the node's, on the witness).
    pub peer_name: String,
    /// The resource the node speaks for.
    pub resource: String,
}

async fn read_message(stream: &mut TcpStream) -> Result<Message, WitnessError> {
    let mut header = [0u8; HEADER_LEN];
    stream.read_exact(&mut header).await?;
    let header = FrameHeader::decode(&header)?;
    let mut payload = vec![0u8; header.length as usize];
    stream.read_exact(&mut payload).await?;
    Ok(Message::decode(header.kind, &payload)?)
}

async fn write_message(stream: &mut TcpStream, m: &Message) -> Result<(), WitnessError> {
    stream.write_all(&m.encode()).await?;
    Ok(())
}

/// Reads the next message; a Refuse becomes [`WitnessError::Refused`].
async fn expect(stream: &mut TcpStream) -> Result<Message, WitnessError> {
    match read_message(stream).await? {
        Message::Refuse { message } => Err(WitnessError::Refused(message)),
        m => Ok(m),
    }
}

fn nonce() -> Result<[u8; NONCE_LEN], WitnessError> {
    let mut n = [0u8; NONCE_LEN];
    rustix::rand::getrandom(&mut n, rustix::rand::GetRandomFlags::empty()).map_err(std::io::Error::from)?;
    Ok(n)
}

/// Sends a refusal and returns the error it stands for.
async fn refuse(stream: &mut TcpStream, error: WitnessError) -> WitnessError {
    let _ = write_message(stream, &Message::Refuse { message: error.to_string() }).await;
    error
}

/// The challenge-response part, the same on both ends: returns (own nonce, peer nonce).
async fn authenticate(
    stream: &mut TcpStream,
    secret: &[u8],
    own_name: &str,
    peer_name: &str,
) -> Result<([u8; NONCE_LEN], [u8; NONCE_LEN]), WitnessError> {
    let own = nonce()?;
    write_message(stream, &Message::AuthChallenge { nonce: own }).await?;
    let Message::AuthChallenge { nonce: theirs } = expect(stream).await? else {
        return Err(refuse(stream, WitnessError::Protocol("expected AuthChallenge".into())).await);
    };
    if is_reflected(&own, &theirs) {
        return Err(refuse(stream, WitnessError::AuthFailed).await);
    }
    write_message(stream, &Message::AuthResponse { mac: auth_response(secret, &theirs, own_name) }).await?;
    let Message::AuthResponse { mac } = expect(stream).await? else {
        return Err(refuse(stream, WitnessError::Protocol("expected AuthResponse".into())).await);
    };
    if !verify_response(secret, &own, peer_name, &mac) {
        return Err(refuse(stream, WitnessError::AuthFailed).await);
    }
    Ok((own, theirs))
}

impl Channel {
    /// The node's end: introduces `node` of `resource` and authenticates both ways.
    pub async fn connect(
        stream: TcpStream,
        secret: &[u8],
        resource: &str,
        node: &str,
    ) -> Result<Self, WitnessError> {
        tokio::time::timeout(HANDSHAKE_TIMEOUT, Self::connect_inner(stream, secret, resource, node))
            .await
            .map_err(|_| WitnessError::Timeout(HANDSHAKE_TIMEOUT))?
    }

    async fn connect_inner(
        mut stream: TcpStream,
        secret: &[u8],
        resource: &str,
        node: &str,
    ) -> Result<Self, WitnessError> {
        stream.set_nodelay(true)?;
        let hello = Message::Hello { version: VERSION, resource: resource.into(), node: node.into() };
        write_message(&mut stream, &hello).await?;
        match expect(&mut stream).await? {
            Message::Hello { version: VERSION, node, .. } if node == WITNESS_NAME => {}
            Message::Hello { version, node, .. } => {
                let e = WitnessError::Protocol(format!(
                    "{node} speaks witness protocol {version}, not {VERSION}"
                ));
                return Err(refuse(&mut stream, e).await);
            }
            _ => return Err(refuse(&mut stream, WitnessError::Protocol("expected Hello".into())).await),
        }
        let (own, theirs) = authenticate(&mut stream, secret, node, WITNESS_NAME).await?;
        let key = session_key(secret, &own, &theirs);
        Ok(Self { stream, key, peer_name: WITNESS_NAME.into(), resource: resource.into() })
    }

    /// The witness's end: learns who speaks and authenticates both ways.
    pub async fn accept(stream: TcpStream, secret: &[u8]) -> Result<Self, WitnessError> {
        tokio::time::timeout(HANDSHAKE_TIMEOUT, Self::accept_inner(stream, secret))
            .await
            .map_err(|_| WitnessError::Timeout(HANDSHAKE_TIMEOUT))?
    }

    async fn accept_inner(mut stream: TcpStream, secret: &[u8]) -> Result<Self, WitnessError> {
        stream.set_nodelay(true)?;
        let (resource, node) = match expect(&mut stream).await? {
            Message::Hello { version: VERSION, resource, node }
                if node != WITNESS_NAME && !resource.is_empty() =>
            {
                (resource, node)
            }
            Message::Hello { version, .. } if version != VERSION => {
                let e = WitnessError::Protocol(format!("witness protocol {version} is not {VERSION}"));
                return Err(refuse(&mut stream, e).await);
            }
            _ => {
                return Err(
                    refuse(&mut stream, WitnessError::Protocol("expected a node's Hello".into())).await
                )
            }
        };
        let hello = Message::Hello { version: VERSION, resource: String::new(), node: WITNESS_NAME.into() };
        write_message(&mut stream, &hello).await?;
        let (own, theirs) = authenticate(&mut stream, secret, WITNESS_NAME, &node).await?;
        let key = session_key(secret, &theirs, &own);
        Ok(Self { stream, key, peer_name: node, resource })
    }

    pub async fn send_claim(&mut self, claim: Claim) -> Result<(), WitnessError> {
        let mac = message_mac(&self.key, true, &claim.body());
        write_message(&mut self.stream, &Message::Claim { claim, mac }).await
    }

    pub async fn read_claim(&mut self) -> Result<Claim, WitnessError> {
        match expect(&mut self.stream).await? {
            Message::Claim { claim, mac } if verify_message_mac(&self.key, true, &claim.body(), &mac) => {
                Ok(claim)
            }
            Message::Claim { .. } => Err(WitnessError::AuthFailed),
            _ => Err(WitnessError::Protocol("expected Claim".into())),
        }
    }

    pub async fn send_verdict(&mut self, verdict: Verdict) -> Result<(), WitnessError> {
        let mac = message_mac(&self.key, false, &verdict.body());
        write_message(&mut self.stream, &Message::Verdict { verdict, mac }).await
    }

    pub async fn read_verdict(&mut self) -> Result<Verdict, WitnessError> {
        match expect(&mut self.stream).await? {
            Message::Verdict { verdict, mac }
                if verify_message_mac(&self.key, false, &verdict.body(), &mac) =>
            {
                Ok(verdict)
            }
            Message::Verdict { .. } => Err(WitnessError::AuthFailed),
            _ => Err(WitnessError::Protocol("expected Verdict".into())),
        }
    }

    /// Refuses with `message` and closes.
    pub async fn refuse(mut self, message: String) {
        let _ = write_message(&mut self.stream, &Message::Refuse { message }).await;
    }
}
