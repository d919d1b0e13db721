//! Reading and writing replication frames on one TCP channel.

use std::io;
use std::time::Duration;

use rdbd_protocol::repl::{FrameHeader, Message};
use rdbd_protocol::DecodeError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("malformed frame from the peer: {0}")]
    Malformed(#[from] DecodeError),
    #[error("the peer did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the peer closed the connection")]
    Closed,
}

/// One channel: a TCP stream and a reusable receive buffer sized by each frame's checked length.
pub struct Framed {
    stream: TcpStream,
    payload: Vec<u8>,
    out: Vec<u8>,
}

impl Framed {
    pub fn new(stream: TcpStream) -> io::Result<Self> {
        stream.set_nodelay(true)?;
        Ok(Self { stream, payload: Vec::new(), out: Vec::new() })
    }

    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    /// Sends one message.
    pub async fn send(&mut self, message: &Message<'_>) -> Result<(), FrameError> {
        self.out.clear();
        message.encode(&mut self.out);
        self.stream.write_all(&self.out).await?;
        Ok(())
    }

    /// Receives one frame; the message borrows this channel's buffer until the next call.
    pub async fn recv(&mut self) -> Result<Message<'_>, FrameError> {
        let mut head = [0u8; FrameHeader::LEN];
        match self.stream.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
            Err(e) => return Err(e.into()),
        }
        // The header check bounds the length before anything is allocated.
        let header = FrameHeader::decode(&head)?;
        self.payload.resize(header.length as usize, 0);
        self.stream.read_exact(&mut self.payload).await?;
        Ok(Message::decode(header.kind, &self.payload)?)
    }

    /// [`Framed::recv`] with a deadline.
    pub async fn recv_within(&mut self, limit: Duration) -> Result<Message<'_>, FrameError> {
        match tokio::time::timeout(limit, self.recv()).await {
            Ok(result) => result,
            Err(_) => Err(FrameError::Timeout(limit)),
        }
    }
}
