//! Reading and writing replication frames on one TCP channel.

use std::io;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use rdbd_protocol::repl::{FrameHeader, Message};
use rdbd_protocol::DecodeError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
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

/// One channel: both directions of a TCP stream. Receiving is cancellation-safe (bytes read
/// stay in the buffer), so a receive can sit in a `select!` next to other work.
pub struct Framed {
    reader: FrameReader,
    writer: FrameWriter,
}

/// The receiving half of a channel.
pub struct FrameReader {
    stream: OwnedReadHalf,
    rbuf: BytesMut,
    /// Bytes of the frame last returned, dropped at the next receive.
    consumed: usize,
}

/// The sending half of a channel.
pub struct FrameWriter {
    stream: OwnedWriteHalf,
    out: Vec<u8>,
}

impl Framed {
    pub fn new(stream: TcpStream) -> io::Result<Self> {
        stream.set_nodelay(true)?;
        let (read, write) = stream.into_split();
        Ok(Self {
            reader: FrameReader { stream: read, rbuf: BytesMut::with_capacity(64 * 1024), consumed: 0 },
            writer: FrameWriter { stream: write, out: Vec::new() },
        })
    }

    /// Separates the halves, so one task can send while another receives.
    pub fn split(self) -> (FrameReader, FrameWriter) {
        (self.reader, self.writer)
    }

    /// Both halves, borrowed, to send and receive at the same time.
    pub fn halves(&mut self) -> (&mut FrameReader, &mut FrameWriter) {
        (&mut self.reader, &mut self.writer)
    }

    /// Sends one message.
    pub async fn send(&mut self, message: &Message<'_>) -> Result<(), FrameError> {
        self.writer.send(message).await
    }

    /// Sends `messages` with one write.
    pub async fn send_all(&mut self, messages: &[Message<'_>]) -> Result<(), FrameError> {
        for m in messages {
            self.writer.queue(m);
        }
        self.writer.flush().await
    }

    /// Receives one frame; the message borrows this channel's buffer until the next call.
    pub async fn recv(&mut self) -> Result<Message<'_>, FrameError> {
        self.reader.recv().await
    }

    /// [`Framed::recv`] with a deadline.
    pub async fn recv_within(&mut self, limit: Duration) -> Result<Message<'_>, FrameError> {
        self.reader.recv_within(limit).await
    }

    /// See [`FrameReader::recv_buffered`].
    pub fn recv_buffered(&mut self) -> Option<Result<Message<'_>, FrameError>> {
        self.reader.recv_buffered()
    }
}

impl FrameWriter {
    /// Sends one message (and anything queued before it).
    pub async fn send(&mut self, message: &Message<'_>) -> Result<(), FrameError> {
        self.queue(message);
        self.flush().await
    }

    /// Adds a message to the batch that [`FrameWriter::flush`] sends with one write.
    pub fn queue(&mut self, message: &Message<'_>) {
        message.encode(&mut self.out);
    }

    /// Bytes queued and not yet flushed.
    pub fn queued(&self) -> usize {
        self.out.len()
    }

    /// Sends frames encoded elsewhere (a batch of whole frames).
    pub async fn write_encoded(&mut self, frames: &[u8]) -> Result<(), FrameError> {
        self.flush().await?;
        self.stream.write_all(frames).await?;
        Ok(())
    }

    /// Sends every queued message.
    pub async fn flush(&mut self) -> Result<(), FrameError> {
        if !self.out.is_empty() {
            let sent = self.stream.write_all(&self.out).await;
            self.out.clear();
            sent?;
        }
        Ok(())
    }
}

impl FrameReader {
    /// Receives one frame; the message borrows this channel's buffer until the next call.
    pub async fn recv(&mut self) -> Result<Message<'_>, FrameError> {
        self.rbuf.advance(std::mem::take(&mut self.consumed));
        loop {
            if self.rbuf.len() >= FrameHeader::LEN {
                // The header check bounds the length before the buffer grows for it.
                let header = FrameHeader::decode(&self.rbuf[..FrameHeader::LEN])?;
                let total = FrameHeader::LEN + header.length as usize;
                if self.rbuf.len() >= total {
                    self.consumed = total;
                    return Ok(Message::decode(header.kind, &self.rbuf[FrameHeader::LEN..total])?);
                }
                self.rbuf.reserve(total - self.rbuf.len());
            }
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(FrameError::Closed);
            }
        }
    }

    /// The next frame if it is already wholly in the buffer; never reads the socket. Lets a
    /// receiver handle everything one read brought before it answers.
    pub fn recv_buffered(&mut self) -> Option<Result<Message<'_>, FrameError>> {
        let pending = self.rbuf.len() - self.consumed;
        if pending < FrameHeader::LEN {
            return None;
        }
        let start = self.consumed;
        let header = match FrameHeader::decode(&self.rbuf[start..start + FrameHeader::LEN]) {
            Ok(h) => h,
            Err(e) => return Some(Err(e.into())),
        };
        let total = FrameHeader::LEN + header.length as usize;
        if pending < total {
            return None;
        }
        self.rbuf.advance(std::mem::take(&mut self.consumed));
        self.consumed = total;
        Some(Message::decode(header.kind, &self.rbuf[FrameHeader::LEN..total]).map_err(FrameError::from))
    }

    /// [`FrameReader::recv`] with a deadline.
    pub async fn recv_within(&mut self, limit: Duration) -> Result<Message<'_>, FrameError> {
        match tokio::time::timeout(limit, self.recv()).await {
            Ok(result) => result,
            Err(_) => Err(FrameError::Timeout(limit)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A message sent alone must not go out again with the next batch.
    #[tokio::test]
    async fn each_frame_goes_out_once_whether_sent_alone_or_batched() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (mut a, mut b) = (Framed::new(a.unwrap()).unwrap(), Framed::new(b.unwrap().0).unwrap());
        a.send(&Message::SyncUuid { uuid: 1 }).await.unwrap();
        a.send_all(&[Message::Flush { seq: 2 }, Message::Flush { seq: 3 }]).await.unwrap();
        a.send(&Message::Ping).await.unwrap();
        drop(a);
        let mut got = Vec::new();
        while let Ok(m) = b.recv().await {
            got.push(format!("{m:?}"));
        }
        assert_eq!(got, ["SyncUuid { uuid: 1 }", "Flush { seq: 2 }", "Flush { seq: 3 }", "Ping"]);
    }

    #[tokio::test]
    async fn buffered_frames_are_taken_without_reading_and_interleave_with_recv() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (mut a, mut b) = (Framed::new(a.unwrap()).unwrap(), Framed::new(b.unwrap().0).unwrap());
        let batch: Vec<Message<'_>> = (1..=5).map(|seq| Message::Flush { seq }).collect();
        a.send_all(&batch).await.unwrap();
        assert!(matches!(b.recv().await.unwrap(), Message::Flush { seq: 1 }));
        let mut seqs = Vec::new();
        while let Some(m) = b.recv_buffered() {
            match m.unwrap() {
                Message::Flush { seq } => seqs.push(seq),
                other => panic!("{other:?}"),
            }
        }
        // One write, one read: normally all of it; whatever was not yet read comes by recv.
        while seqs.len() < 4 {
            match b.recv().await.unwrap() {
                Message::Flush { seq } => seqs.push(seq),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(seqs, [2, 3, 4, 5]);
        a.send(&Message::Ping).await.unwrap();
        assert!(b.recv_buffered().is_none(), "nothing is read from the socket without recv");
        assert!(matches!(b.recv().await.unwrap(), Message::Ping));
    }
}
