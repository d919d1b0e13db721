//! A non-blocking stream socket (TCP, unix, or one end of a socketpair) driven by tokio's
//! reactor, with the few operations the NBD server needs.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::task::{Context, Poll};

use rustix::net::SendFlags;
use rustix::pipe::SpliceFlags;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

pub struct Socket {
    fd: AsyncFd<OwnedFd>,
}

impl Socket {
    /// Wraps a connected stream socket; it is switched to non-blocking mode.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        rustix::io::ioctl_fionbio(&fd, true)?;
        // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and the same.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE)? };
        Ok(Self { fd })
    }

    /// Reads into `buf`; `Ok(0)` is end of stream.
    pub fn poll_read(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = std::task::ready!(self.fd.poll_read_ready(cx))?;
            match guard.try_io(|fd| Ok(rustix::io::read(fd.get_ref(), &mut *buf)?)) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    /// Sends as much of `bufs` as the socket takes now.
    pub fn poll_write_vectored(&self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = std::task::ready!(self.fd.poll_write_ready(cx))?;
            let send = |fd: &AsyncFd<OwnedFd>| {
                let mut control = rustix::net::SendAncillaryBuffer::default();
                Ok(rustix::net::sendmsg(fd.get_ref(), bufs, &mut control, SendFlags::NOSIGNAL)?)
            };
            match guard.try_io(send) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    /// Moves up to `len` bytes from the socket into the pipe `to` without copying them through
    /// user memory; `Ok(0)` is end of stream. The pipe must have room.
    pub fn poll_splice_to(
        &self,
        cx: &mut Context<'_>,
        to: BorrowedFd<'_>,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
        loop {
            let mut guard = std::task::ready!(self.fd.poll_read_ready(cx))?;
            match guard.try_io(|fd| Ok(rustix::pipe::splice(fd.get_ref(), None, to, None, len, flags)?)) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    pub async fn read_exact(&self, mut buf: &mut [u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let n = std::future::poll_fn(|cx| self.poll_read(cx, buf)).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            buf = &mut buf[n..];
        }
        Ok(())
    }

    pub async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let n = std::future::poll_fn(|cx| self.poll_write_vectored(cx, &[IoSlice::new(buf)])).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            buf = &buf[n..];
        }
        Ok(())
    }

    /// Reads and throws away `len` bytes without buffering more than a small chunk.
    pub async fn discard(&self, mut len: u64) -> io::Result<()> {
        let mut scratch = [0u8; 4096];
        while len > 0 {
            let chunk = len.min(scratch.len() as u64) as usize;
            self.read_exact(&mut scratch[..chunk]).await?;
            len -= chunk as u64;
        }
        Ok(())
    }

    /// Half-closes the sending side so the peer sees end of stream after our last reply.
    pub fn shutdown_write(&self) {
        let _ = rustix::net::shutdown(self.fd.get_ref().as_fd(), rustix::net::Shutdown::Write);
    }
}
