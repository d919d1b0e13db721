//! The I/O the metadata needs from its device: small positioned reads and writes, each write
//! durable on its own or with a flush of everything, from the calling thread.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Synchronous positioned I/O with durable writes: what the metadata (superblock, bitmap,
/// activity log) needs from the device it lives on. Files and block devices implement it; so
/// does the fault-injecting disk of the tests ([`super::faulty::FaultyDisk`]).
pub trait MetaIo: Send + Sync {
    /// Bytes on the device.
    fn size(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset`.
    fn read_into(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// A plain write: durable only after [`MetaIo::make_durable`].
    fn write_plain(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Writes `data` at `offset` and makes just that range durable.
    fn write_durably(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Makes everything written so far durable.
    fn make_durable(&self) -> io::Result<()>;
}

impl MetaIo for File {
    fn size(&self) -> io::Result<u64> {
        let meta = self.metadata()?;
        if meta.is_file() {
            return Ok(meta.len());
        }
        // Block device: its size is where seeking to the end lands.
        rustix::fs::seek(self, rustix::fs::SeekFrom::End(0)).map_err(io::Error::from)
    }

    fn read_into(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }

    fn write_plain(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(data, offset)
    }

    /// `RWF_DSYNC`: with internal metadata the file is also the data disk, and an `fdatasync`
    /// would write back every dirty data page too, which under application load costs hundreds
    /// of milliseconds per metadata update.
    fn write_durably(&self, mut data: &[u8], mut offset: u64) -> io::Result<()> {
        while !data.is_empty() {
            let iov = [std::io::IoSlice::new(data)];
            match rustix::io::pwritev2(self, &iov, offset, rustix::io::ReadWriteFlags::DSYNC) {
                Ok(0) => {
                    return Err(io::Error::new(io::ErrorKind::WriteZero, "metadata write made no progress"))
                }
                Ok(n) => {
                    data = &data[n..];
                    offset += n as u64;
                }
                Err(rustix::io::Errno::INTR) => {}
                // A file system without per-write sync: write, then sync the whole file.
                Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::INVAL) => {
                    self.write_all_at(data, offset)?;
                    return self.sync_data();
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn make_durable(&self) -> io::Result<()> {
        self.sync_all()
    }
}
