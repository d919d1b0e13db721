//! The transmission phase of one connection: many requests in flight, replies in completion
//! order.
//!
//! One task drives everything for its connection from a single `poll`: it reads as many requests
//! as have arrived, submits them to the device queue in one batch, turns completions into
//! replies, and sends all pending replies with one vectored send. Batching per wakeup is what
//! keeps the per-request cost low at high queue depths.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use rdbd_protocol::nbd::{
    allocation, cmd_flags, encode_block_status_chunk, encode_error_chunk, encode_offset_data_head, Command,
    ErrorCode, Extent as WireExtent, RequestHeader, SimpleReply,
};
use slab::Slab;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::{debug, warn};

use super::export::MAX_PAYLOAD;
use super::handshake::Negotiated;
use super::outbox::{Body, Outbox, Reply};
use super::pipe::SplicePipe;
use super::socket::Socket;
use crate::storage::{BufPool, Completion, IoBuf, IoError, IoOp, IoQueue};

/// Receive buffer: large enough to take a burst of small requests in one read.
const RECV_BUF: usize = 256 * 1024;
/// Requests accepted but not yet fully replied to, per connection.
const MAX_OUTSTANDING: usize = 512;
/// Payload bytes held by those requests, per connection.
const MAX_OUTSTANDING_BYTES: u64 = 128 << 20;
/// Most extents in one block status reply.
const MAX_EXTENTS: usize = 1024;
/// Rounds of work in one poll before yielding to other tasks.
const ROUNDS_PER_POLL: usize = 32;
/// After shutdown is requested, how long replies may wait for a client that does not read them.
const SHUTDOWN_SEND_GRACE: std::time::Duration = std::time::Duration::from_secs(10);
/// WRITE payloads at least this large are spliced from the socket into the device (when it
/// accepts that), saving one copy of every byte.
const SPLICE_MIN: u32 = 64 * 1024;

/// How a session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// NBD_CMD_DISC.
    Disconnect,
    /// The client closed the connection.
    Closed,
    /// The server is shutting down.
    Shutdown,
    /// The client broke the protocol (the connection was dropped after in-flight requests).
    ProtocolError(String),
    /// The socket failed.
    Io(io::Error),
}

/// A request handed to the device, waiting for its completion.
struct InFlight {
    cookie: u64,
    command: Command,
    offset: u64,
}

/// Where the receiver is in the byte stream.
enum Recv {
    Header,
    /// Reading a WRITE payload straight into its buffer.
    Payload {
        header: RequestHeader,
        buf: IoBuf,
        filled: usize,
    },
    /// Moving a WRITE payload socket → pipe → device. `received` bytes entered the pipe,
    /// `written` of them reached the device.
    Splice {
        header: RequestHeader,
        received: u32,
        written: u32,
    },
    /// Skipping the payload of a refused WRITE; the error reply goes out when it is consumed.
    Discard {
        remaining: u64,
        cookie: u64,
        error: ErrorCode,
    },
}

pub struct Session {
    sock: Socket,
    negotiated: Negotiated,
    size: u64,
    read_only: bool,
    queue: Box<dyn IoQueue>,
    pool: BufPool,
    rbuf: Box<[u8]>,
    rstart: usize,
    rend: usize,
    recv: Recv,
    in_flight: Slab<InFlight>,
    outbox: Outbox,
    completions: Vec<Completion>,
    /// Payload bytes held by accepted requests.
    held_bytes: u64,
    /// Why we stopped reading requests, once we have.
    stopped: Option<SessionEnd>,
    send_failed: bool,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Set at shutdown: when it fires, unsent replies are abandoned.
    send_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Created on the first large write, when the device accepts splicing.
    pipe: Option<SplicePipe>,
    /// After a large write, read only the next header, so that a following large payload stays in
    /// the socket for splicing instead of being copied into the receive buffer.
    header_only_reads: bool,
}

impl Session {
    pub fn new(sock: Socket, negotiated: Negotiated, shutdown: CancellationToken) -> io::Result<Self> {
        let info = negotiated.export.device.info();
        let queue = negotiated.export.device.clone().open_queue()?;
        Ok(Self {
            sock,
            negotiated,
            size: info.size,
            read_only: info.read_only,
            queue,
            pool: BufPool::new(),
            rbuf: vec![0u8; RECV_BUF].into_boxed_slice(),
            rstart: 0,
            rend: 0,
            recv: Recv::Header,
            in_flight: Slab::with_capacity(MAX_OUTSTANDING),
            outbox: Outbox::default(),
            completions: Vec::with_capacity(64),
            held_bytes: 0,
            stopped: None,
            send_failed: false,
            shutdown: Box::pin(shutdown.cancelled_owned()),
            send_deadline: None,
            pipe: None,
            header_only_reads: false,
        })
    }

    /// Serves requests until the client disconnects, the server shuts down, or the connection
    /// fails. In-flight requests always complete before this returns.
    pub async fn run(mut self) -> SessionEnd {
        std::future::poll_fn(|cx| self.poll_run(cx)).await;
        self.sock.shutdown_write();
        self.stopped.take().unwrap_or(SessionEnd::Closed)
    }

    fn stop(&mut self, why: SessionEnd) {
        if self.stopped.is_none() {
            self.stopped = Some(why);
        }
    }

    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.stopped.is_none() && self.shutdown.as_mut().poll(cx).is_ready() {
            self.stop(SessionEnd::Shutdown);
            self.send_deadline = Some(Box::pin(tokio::time::sleep(SHUTDOWN_SEND_GRACE)));
        }
        // In-flight I/O always completes, but a client that stops reading cannot hold the
        // shutdown forever.
        if let Some(deadline) = &mut self.send_deadline {
            if deadline.as_mut().poll(cx).is_ready() && !self.outbox.is_empty() {
                warn!("client did not read its last replies; closing");
                self.send_failed = true;
            }
        }
        for _ in 0..ROUNDS_PER_POLL {
            let mut progress = false;

            if self.stopped.is_none() && self.has_room() {
                match self.poll_receive(cx) {
                    Poll::Ready(Ok(())) => progress = true,
                    Poll::Ready(Err(end)) => {
                        self.stop(end);
                        progress = true;
                    }
                    Poll::Pending => {}
                }
            }

            if self.queue.in_flight() > 0 {
                if let Poll::Ready(()) = self.queue.poll_complete(cx, &mut self.completions) {
                    progress |= !self.completions.is_empty();
                    let mut completions = std::mem::take(&mut self.completions);
                    for c in completions.drain(..) {
                        self.complete(c);
                    }
                    self.completions = completions;
                }
            }

            if !self.outbox.is_empty() && !self.send_failed {
                match self.poll_send(cx) {
                    Poll::Ready(Ok(())) => progress = true,
                    Poll::Ready(Err(e)) => {
                        debug!("send failed: {e}");
                        self.send_failed = true;
                        self.stop(SessionEnd::Io(e));
                        progress = true;
                    }
                    Poll::Pending => {}
                }
            }

            if self.stopped.is_some()
                && self.in_flight.is_empty()
                && self.queue.in_flight() == 0
                && (self.outbox.is_empty() || self.send_failed)
            {
                return Poll::Ready(());
            }
            if !progress {
                return Poll::Pending;
            }
        }
        // Still busy: let other connections run, then come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn has_room(&self) -> bool {
        let outstanding = self.in_flight.len() + self.outbox.len();
        outstanding == 0 || (outstanding < MAX_OUTSTANDING && self.held_bytes < MAX_OUTSTANDING_BYTES)
    }

    /// Reads from the socket and dispatches every complete request. `Ready(Ok)` means progress.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SessionEnd>> {
        if matches!(self.recv, Recv::Splice { .. }) {
            return self.poll_splice(cx);
        }
        // A WRITE payload is read directly into its own buffer.
        if let Recv::Payload { buf, filled, .. } = &mut self.recv {
            let len = buf.len();
            let target = &mut buf.spare_mut()[*filled..len];
            let n = match std::task::ready!(self.sock.poll_read(cx, target)) {
                Ok(0) => return Poll::Ready(Err(SessionEnd::Closed)),
                Ok(n) => n,
                Err(e) => return Poll::Ready(Err(SessionEnd::Io(e))),
            };
            *filled += n;
            if *filled == buf.len() {
                let Recv::Payload { header, buf, .. } = std::mem::replace(&mut self.recv, Recv::Header)
                else {
                    unreachable!()
                };
                self.submit_write(header, buf);
            }
            return Poll::Ready(Ok(()));
        }

        // Requests left buffered when we last ran out of room come before new bytes.
        if self.rend > self.rstart {
            let before = self.rstart;
            self.parse_buffered()?;
            if self.rstart != before || !matches!(self.recv, Recv::Header) {
                return Poll::Ready(Ok(()));
            }
        }
        // What is left is less than one header: move it to the front so the read has room.
        if self.rstart > 0 {
            self.rbuf.copy_within(self.rstart..self.rend, 0);
            self.rend -= self.rstart;
            self.rstart = 0;
        }
        let end = if self.header_only_reads {
            (self.rstart + RequestHeader::LEN).max(self.rend + 1).min(self.rbuf.len())
        } else {
            self.rbuf.len()
        };
        let n = match std::task::ready!(self.sock.poll_read(cx, &mut self.rbuf[self.rend..end])) {
            Ok(0) => return Poll::Ready(Err(SessionEnd::Closed)),
            Ok(n) => n,
            Err(e) => return Poll::Ready(Err(SessionEnd::Io(e))),
        };
        self.rend += n;
        self.parse_buffered()?;
        Poll::Ready(Ok(()))
    }

    /// Dispatches the requests sitting in the receive buffer.
    fn parse_buffered(&mut self) -> Result<(), SessionEnd> {
        loop {
            if let Recv::Discard { remaining, cookie, error } = &mut self.recv {
                let take = (*remaining).min((self.rend - self.rstart) as u64);
                self.rstart += take as usize;
                *remaining -= take;
                if *remaining > 0 {
                    return Ok(());
                }
                let (cookie, error) = (*cookie, *error);
                self.recv = Recv::Header;
                self.reply_error(cookie, Command::Write, error);
            }
            if !matches!(self.recv, Recv::Header) || !self.has_room() {
                return Ok(());
            }
            let available = self.rend - self.rstart;
            if available < RequestHeader::LEN {
                return Ok(());
            }
            let header = RequestHeader::decode(&self.rbuf[self.rstart..self.rstart + RequestHeader::LEN])
                .map_err(|e| SessionEnd::ProtocolError(e.to_string()))?;
            self.rstart += RequestHeader::LEN;
            self.dispatch(header)?;
        }
    }

    /// Checks a request and hands it to the device (or answers it directly).
    fn dispatch(&mut self, h: RequestHeader) -> Result<(), SessionEnd> {
        let command = Command::from_wire(h.command);
        if command == Some(Command::Write) {
            return self.start_write(h);
        }
        self.header_only_reads = false;
        let command = match self.validate(&h, command) {
            Ok(c) => c,
            Err(error) => {
                self.reply_error(h.cookie, command.unwrap_or(Command::Flush), error);
                return Ok(());
            }
        };
        let (offset, len) = (h.offset, u64::from(h.length));
        let fua = h.flags & cmd_flags::FUA != 0;
        let op = match command {
            Command::Disc => return Err(SessionEnd::Disconnect),
            Command::Read => {
                let buf = self.pool.take(h.length as usize);
                self.held_bytes += len;
                IoOp::Read { offset, buf }
            }
            Command::Flush => IoOp::Flush,
            Command::Trim => IoOp::Trim { offset, len, fua },
            Command::WriteZeroes => IoOp::WriteZeroes {
                offset,
                len,
                may_punch: h.flags & cmd_flags::NO_HOLE == 0,
                fast_only: h.flags & cmd_flags::FAST_ZERO != 0,
                fua,
            },
            Command::Cache => IoOp::Cache { offset, len },
            Command::BlockStatus => {
                self.block_status(&h);
                return Ok(());
            }
            Command::Write => unreachable!("handled above"),
        };
        self.submit(h.cookie, command, offset, op);
        Ok(())
    }

    fn submit(&mut self, cookie: u64, command: Command, offset: u64, op: IoOp) {
        let tag = self.in_flight.insert(InFlight { cookie, command, offset });
        self.queue.submit(tag as u32, op);
    }

    /// A WRITE header: refuse it (skipping its payload) or start receiving the payload.
    fn start_write(&mut self, h: RequestHeader) -> Result<(), SessionEnd> {
        if let Err(error) = self.validate(&h, Some(Command::Write)) {
            self.recv = Recv::Discard { remaining: h.length.into(), cookie: h.cookie, error };
            return Ok(());
        }
        if self.try_start_splice(&h) {
            return Ok(());
        }
        self.header_only_reads = false;
        let len = h.length as usize;
        let mut buf = self.pool.take(len);
        self.held_bytes += len as u64;
        let have = (self.rend - self.rstart).min(len);
        buf[..have].copy_from_slice(&self.rbuf[self.rstart..self.rstart + have]);
        self.rstart += have;
        if have == len {
            self.submit_write(h, buf);
        } else {
            self.recv = Recv::Payload { header: h, buf, filled: have };
        }
        Ok(())
    }

    /// Starts splicing a large write's payload when the device accepts it. The part of the
    /// payload already in the receive buffer is copied into the pipe first.
    fn try_start_splice(&mut self, h: &RequestHeader) -> bool {
        let device = &self.negotiated.export.device;
        if h.length < SPLICE_MIN || h.flags & cmd_flags::FUA != 0 || !device.accepts_splice() {
            return false;
        }
        if self.pipe.is_none() {
            match SplicePipe::new() {
                Ok(Some(pipe)) => self.pipe = Some(pipe),
                Ok(None) | Err(_) => return false,
            }
        }
        let Some(pipe) = &self.pipe else { return false };
        let have = (self.rend - self.rstart).min(h.length as usize);
        // The pipe is empty and holds at least a whole receive buffer, so this always fits.
        match pipe.put(&self.rbuf[self.rstart..self.rstart + have]) {
            Ok(n) if n == have => {}
            _ => {
                pipe.clear();
                return false;
            }
        }
        self.rstart += have;
        self.header_only_reads = true;
        self.recv = Recv::Splice { header: *h, received: have as u32, written: 0 };
        true
    }

    /// Advances a spliced write: drains the pipe into the device, then moves more of the payload
    /// from the socket into the pipe.
    fn poll_splice(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SessionEnd>> {
        let Recv::Splice { header, mut received, mut written } =
            std::mem::replace(&mut self.recv, Recv::Header)
        else {
            unreachable!("poll_splice outside the splice state")
        };
        let Some(pipe) = &self.pipe else { unreachable!("splice state without a pipe") };
        let device = self.negotiated.export.device.clone();
        loop {
            while written < received {
                let offset = header.offset + u64::from(written);
                match device.splice_write(pipe.read_end(), offset, (received - written) as usize) {
                    Ok(n) if n > 0 => written += n as u32,
                    result => {
                        // Drop what is buffered, skip the rest of the payload, then report.
                        pipe.clear();
                        let e = result.err().unwrap_or(IoError::Io(libc::EIO));
                        debug!(offset, "spliced write failed: {e}");
                        let remaining = u64::from(header.length - received);
                        let error = error_code(Command::Write, e);
                        self.recv = Recv::Discard { remaining, cookie: header.cookie, error };
                        return Poll::Ready(Ok(()));
                    }
                }
            }
            if received == header.length {
                self.reply_ok(header.cookie);
                return Poll::Ready(Ok(()));
            }
            let want = ((header.length - received) as usize).min(pipe.capacity());
            match self.sock.poll_splice_to(cx, pipe.write_end(), want) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(SessionEnd::Closed)),
                Poll::Ready(Ok(n)) => received += n as u32,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(SessionEnd::Io(e))),
                Poll::Pending => {
                    self.recv = Recv::Splice { header, received, written };
                    return Poll::Pending;
                }
            }
        }
    }

    fn submit_write(&mut self, h: RequestHeader, buf: IoBuf) {
        let fua = h.flags & cmd_flags::FUA != 0;
        self.submit(h.cookie, Command::Write, h.offset, IoOp::Write { offset: h.offset, buf, fua });
    }

    /// The protocol's checks on a request: known command, flags valid for it, range inside the
    /// export, writes allowed.
    fn validate(&self, h: &RequestHeader, command: Option<Command>) -> Result<Command, ErrorCode> {
        let command = command.ok_or(ErrorCode::Inval)?;
        let mut allowed = cmd_flags::FUA;
        match command {
            Command::Read if self.negotiated.structured => allowed |= cmd_flags::DF,
            Command::WriteZeroes => allowed |= cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO,
            Command::BlockStatus => allowed |= cmd_flags::REQ_ONE,
            _ => {}
        }
        if h.flags & !allowed != 0 {
            return Err(ErrorCode::Inval);
        }
        let writes = matches!(command, Command::Write | Command::Trim | Command::WriteZeroes);
        if writes && self.read_only {
            return Err(ErrorCode::Perm);
        }
        if matches!(command, Command::Flush | Command::Disc) {
            return Ok(command);
        }
        if h.length == 0 {
            return Err(ErrorCode::Inval);
        }
        if matches!(command, Command::Read | Command::Write) && h.length > MAX_PAYLOAD {
            return Err(ErrorCode::Inval);
        }
        let in_range = h.offset.checked_add(h.length.into()).is_some_and(|end| end <= self.size);
        if !in_range {
            // Writing past the end is "no space"; every other access past the end is invalid.
            let grows = matches!(command, Command::Write | Command::WriteZeroes);
            return Err(if grows { ErrorCode::NoSpc } else { ErrorCode::Inval });
        }
        if command == Command::BlockStatus && self.negotiated.allocation_context.is_none() {
            return Err(ErrorCode::Inval);
        }
        Ok(command)
    }

    fn block_status(&mut self, h: &RequestHeader) {
        let max = if h.flags & cmd_flags::REQ_ONE != 0 { 1 } else { MAX_EXTENTS };
        let device = self.negotiated.export.device.clone();
        match device.block_status(h.offset, h.length.into(), max) {
            Ok(extents) => {
                let mut budget = u64::from(h.length);
                let wire: Vec<WireExtent> = extents
                    .iter()
                    .map_while(|e| {
                        let len = e.len.min(budget);
                        budget -= len;
                        let flags = if e.hole { allocation::HOLE | allocation::ZERO } else { 0 };
                        (len > 0).then_some(WireExtent { length: len as u32, flags })
                    })
                    .collect();
                let context = self.negotiated.allocation_context.unwrap_or_default();
                let mut body = Vec::with_capacity(24 + 8 * wire.len());
                encode_block_status_chunk(&mut body, h.cookie, context, &wire);
                self.outbox.push(Reply::new(|_| {}, Body::Bytes(body)));
            }
            Err(e) => self.reply_error(h.cookie, Command::BlockStatus, error_code(Command::BlockStatus, e)),
        }
    }

    /// Turns a device completion into a reply.
    fn complete(&mut self, c: Completion) {
        let Some(req) = self.in_flight.try_remove(c.tag as usize) else {
            warn!(tag = c.tag, "completion for an unknown request");
            return;
        };
        let held = c.buf.as_ref().map_or(0, |b| b.len() as u64);
        match (req.command, c.result, c.buf) {
            (Command::Read, Ok(()), Some(buf)) => {
                let (cookie, structured) = (req.cookie, self.negotiated.structured);
                self.held_bytes -= held;
                let len = buf.len() as u32;
                self.outbox.push(Reply::new(
                    |b| {
                        if structured {
                            encode_offset_data_head(b, cookie, req.offset, len)
                        } else {
                            SimpleReply { error: 0, cookie }.encode_into(b)
                        }
                    },
                    Body::Data(buf),
                ));
            }
            (command, result, buf) => {
                if let Some(buf) = buf {
                    self.held_bytes -= held;
                    self.pool.give(buf);
                }
                match result {
                    Ok(()) => self.reply_ok(req.cookie),
                    Err(e) => {
                        debug!(?command, offset = req.offset, "I/O failed: {e}");
                        self.reply_error(req.cookie, command, error_code(command, e));
                    }
                }
            }
        }
    }

    fn reply_ok(&mut self, cookie: u64) {
        self.outbox.push(Reply::new(|b| SimpleReply { error: 0, cookie }.encode_into(b), Body::None));
    }

    fn reply_error(&mut self, cookie: u64, command: Command, error: ErrorCode) {
        let code = error as u32;
        let reply = if self.negotiated.structured {
            let mut body = Vec::with_capacity(64);
            encode_error_chunk(&mut body, cookie, code, error_message(command, error));
            Reply::new(|_| {}, Body::Bytes(body))
        } else {
            Reply::new(|b| SimpleReply { error: code, cookie }.encode_into(b), Body::None)
        };
        self.outbox.push(reply);
    }

    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut iov = Outbox::empty_iov();
        let count = self.outbox.gather(&mut iov);
        let sent = std::task::ready!(self.sock.poll_write_vectored(cx, &iov[..count]))?;
        if sent == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        self.outbox.advance(sent, &mut self.pool);
        Poll::Ready(Ok(()))
    }
}

fn error_code(command: Command, e: IoError) -> ErrorCode {
    match e {
        IoError::Io(_) => ErrorCode::Io,
        IoError::NoSpace => ErrorCode::NoSpc,
        IoError::ReadOnly => ErrorCode::Perm,
        IoError::NotSupported if command == Command::WriteZeroes => ErrorCode::NotSup,
        IoError::NotSupported => ErrorCode::Io,
        IoError::Shutdown => ErrorCode::Shutdown,
    }
}

fn error_message(command: Command, error: ErrorCode) -> &'static str {
    match (command, error) {
        (_, ErrorCode::Inval) => "invalid request: unknown command or flag, bad length, or beyond the end",
        (_, ErrorCode::NoSpc) => "write beyond the end of the export or no space on the backing store",
        (_, ErrorCode::Perm) => "the export is read-only",
        (Command::WriteZeroes, ErrorCode::NotSup) => "fast zeroing is not supported here",
        (_, ErrorCode::Io) => "I/O error on the backing store",
        (_, ErrorCode::Shutdown) => "the server is shutting down",
        _ => "request failed",
    }
}

#[cfg(test)]
mod tests;
