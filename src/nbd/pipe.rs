//! A pipe used to move large WRITE payloads from the socket into the backing store without
//! copying them through user memory (splice: socket → pipe moves page references; pipe → file is
//! the one copy into the page cache).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::pipe::PipeFlags;

/// The pipe size we ask for; splicing needs at least [`SplicePipe::MIN_CAPACITY`].
const WANTED_CAPACITY: usize = 1 << 20;

pub struct SplicePipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl SplicePipe {
    /// Must hold a whole receive buffer's worth of payload, which is staged through the pipe.
    pub const MIN_CAPACITY: usize = 256 * 1024;

    /// A non-blocking pipe of at least [`Self::MIN_CAPACITY`] bytes, or `None` when the system
    /// will not make one that large.
    pub fn new() -> io::Result<Option<Self>> {
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        let capacity = rustix::pipe::fcntl_setpipe_size(&write, WANTED_CAPACITY)
            .or_else(|_| rustix::pipe::fcntl_getpipe_size(&write))?;
        Ok((capacity >= Self::MIN_CAPACITY).then_some(Self { read, write, capacity }))
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn read_end(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    pub fn write_end(&self) -> BorrowedFd<'_> {
        self.write.as_fd()
    }

    /// Copies bytes from memory into the pipe; returns how many fit.
    pub fn put(&self, data: &[u8]) -> io::Result<usize> {
        match rustix::io::write(&self.write, data) {
            Ok(n) => Ok(n),
            Err(rustix::io::Errno::AGAIN) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Throws away whatever the pipe holds (after a failed write).
    pub fn clear(&self) {
        let mut scratch = [0u8; 16 * 1024];
        while matches!(rustix::io::read(&self.read, &mut scratch), Ok(n) if n > 0) {}
    }
}
