//! A local file or block device as a [`BlockDevice`].
//!
//! I/O goes through a per-connection io_uring ([`super::uring_queue`]). By default the page cache
//! is used (like qemu-nbd's and nbdkit's defaults): reads of hot data come from memory and
//! FLUSH/FUA reach the disk through fdatasync/RWF_DSYNC. With `direct`, aligned requests bypass
//! the page cache (O_DIRECT) and unaligned ones use a second, buffered descriptor.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::SeekFrom;

use super::uring_queue::UringQueue;
use super::{BlockDevice, DeviceInfo, Extent, IoError, IoQueue};

/// How to open the backing store.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    pub read_only: bool,
    /// Use O_DIRECT for aligned I/O.
    pub direct: bool,
    /// Expected size. For a file: created sparse at this size if missing or empty, otherwise it
    /// must match (see `prefix`). For a block device: serve only the first `size` bytes.
    pub size: Option<u64>,
    /// A file may be larger than `size`: only its first `size` bytes are served (the rest holds
    /// rdbd's internal metadata).
    pub prefix: bool,
}

/// Why the backing store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path}: no such file (give --size to create it)")]
    Missing { path: PathBuf },
    #[error("{path}: is not a regular file{hint}")]
    NotAFile { path: PathBuf, hint: &'static str },
    #[error("{path}: is not a block device")]
    NotABlockDevice { path: PathBuf },
    #[error("{path}: size mismatch: it has {actual} bytes, --size asks for {requested}")]
    SizeMismatch { path: PathBuf, actual: u64, requested: u64 },
    #[error("{path}: size is zero")]
    Empty { path: PathBuf },
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: io::Error },
}

/// A regular file or a block device, shared by all connections.
#[derive(Debug)]
pub struct FileDevice {
    path: PathBuf,
    buffered: File,
    direct: Option<File>,
    info: DeviceInfo,
    is_block_device: bool,
    /// Copy plain buffered writes into the page cache from the calling thread instead of the
    /// ring (see [`writes_block_in_ring`]).
    inline_buffered_writes: bool,
}

impl FileDevice {
    /// Opens (or, with `size`, creates) a regular file.
    pub fn open_file(path: &Path, opts: &OpenOptions) -> Result<Self, OpenError> {
        let io_err = |error| OpenError::Io { path: path.to_owned(), error };
        let meta = match std::fs::metadata(path) {
            Ok(meta) => Some(meta),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(e)),
        };
        match (&meta, opts.size) {
            (None, None) => return Err(OpenError::Missing { path: path.to_owned() }),
            (Some(m), _) if m.file_type().is_block_device() => {
                let hint = " (it is a block device: use --device)";
                return Err(OpenError::NotAFile { path: path.to_owned(), hint });
            }
            (Some(m), _) if !m.is_file() => {
                return Err(OpenError::NotAFile { path: path.to_owned(), hint: "" })
            }
            _ => {}
        }
        let create = meta.is_none();
        let buffered = open(path, opts.read_only, false, create && !opts.read_only).map_err(io_err)?;
        let mut size = buffered.metadata().map_err(io_err)?.len();
        if let Some(requested) = opts.size {
            if size == 0 && !opts.read_only {
                buffered.set_len(requested).map_err(io_err)?;
                size = requested;
            } else if opts.prefix && requested <= size {
                size = requested;
            } else if size != requested {
                return Err(OpenError::SizeMismatch { path: path.to_owned(), actual: size, requested });
            }
        }
        if size == 0 {
            return Err(OpenError::Empty { path: path.to_owned() });
        }
        let direct =
            opts.direct.then(|| open(path, opts.read_only, true, false)).transpose().map_err(io_err)?;
        let info = DeviceInfo {
            size,
            read_only: opts.read_only,
            rotational: false,
            min_block: if opts.direct { 512 } else { 1 },
            can_trim: true,
        };
        let inline_buffered_writes = writes_block_in_ring(&buffered);
        Ok(Self {
            path: path.to_owned(),
            buffered,
            direct,
            info,
            is_block_device: false,
            inline_buffered_writes,
        })
    }

    /// Opens a block device.
    pub fn open_block_device(path: &Path, opts: &OpenOptions) -> Result<Self, OpenError> {
        let io_err = |error| OpenError::Io { path: path.to_owned(), error };
        let meta = std::fs::metadata(path).map_err(io_err)?;
        if !meta.file_type().is_block_device() {
            return Err(OpenError::NotABlockDevice { path: path.to_owned() });
        }
        let buffered = open(path, opts.read_only, false, false).map_err(io_err)?;
        let device_size = block_device_size(&buffered).map_err(io_err)?;
        let size = match opts.size {
            Some(requested) if requested > device_size => {
                return Err(OpenError::SizeMismatch { path: path.to_owned(), actual: device_size, requested })
            }
            Some(requested) => requested,
            None => device_size,
        };
        if size == 0 {
            return Err(OpenError::Empty { path: path.to_owned() });
        }
        let direct =
            opts.direct.then(|| open(path, opts.read_only, true, false)).transpose().map_err(io_err)?;
        let sector = logical_block_size(&buffered).unwrap_or(512);
        let info = DeviceInfo {
            size,
            read_only: opts.read_only,
            rotational: sysfs_rotational(&meta).unwrap_or(false),
            min_block: if opts.direct { sector } else { 1 },
            can_trim: true,
        };
        Ok(Self {
            path: path.to_owned(),
            buffered,
            direct,
            info,
            is_block_device: true,
            inline_buffered_writes: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    pub(super) fn inline_buffered_writes(&self) -> bool {
        self.inline_buffered_writes
    }

    /// Writes `data` at `offset` through the buffered descriptor, from this thread.
    pub(super) fn write_buffered_now(&self, mut data: &[u8], mut offset: u64) -> Result<(), IoError> {
        while !data.is_empty() {
            match rustix::io::pwrite(&self.buffered, data, offset) {
                Ok(0) => return Err(IoError::Io(libc::EIO)),
                Ok(n) => {
                    data = &data[n..];
                    offset += n as u64;
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(IoError::from_errno(e.raw_os_error())),
            }
        }
        Ok(())
    }

    /// Descriptors to register with each ring: the buffered one first, then the direct one.
    pub(super) fn raw_fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.buffered.as_raw_fd()];
        fds.extend(self.direct.as_ref().map(|f| f.as_raw_fd()));
        fds
    }

    /// Which registered descriptor serves an I/O at `offset` of `len` bytes: the direct one
    /// when it exists and the request is aligned to the logical block size.
    pub(super) fn fd_index_for(&self, offset: u64, len: usize) -> u32 {
        let align = self.info.min_block as u64;
        let aligned = offset % align == 0 && len as u64 % align == 0;
        if self.direct.is_some() && aligned {
            1
        } else {
            0
        }
    }
}

/// Whether io_uring would hand every buffered write on this file to a kernel worker thread.
///
/// io_uring completes a buffered write inline only on filesystems that support non-blocking
/// buffered writes (XFS and btrfs); elsewhere (ext4, tmpfs, ...) each write is punted to an
/// io-wq thread, which costs several times the CPU of the page-cache copy itself. On those we copy
/// in the caller's thread (a page-cache copy, ~2 µs for 4 KiB).
fn writes_block_in_ring(file: &File) -> bool {
    const XFS_SUPER_MAGIC: i64 = 0x5846_5342;
    const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;
    match rustix::fs::fstatfs(file) {
        Ok(st) => !matches!(st.f_type, XFS_SUPER_MAGIC | BTRFS_SUPER_MAGIC),
        Err(_) => true,
    }
}

fn open(path: &Path, read_only: bool, direct: bool, create: bool) -> io::Result<File> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(!read_only).create(create);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

/// `_IOR(0x12, 114, u64)` and `_IO(0x12, 104)` from linux/fs.h.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

fn logical_block_size(file: &File) -> Option<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut size) };
    (rc == 0 && size > 0).then_some(size as u32)
}

fn sysfs_rotational(meta: &std::fs::Metadata) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    let rdev = meta.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let text = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/queue/rotational")).ok()?;
    Some(text.trim() == "1")
}

impl BlockDevice for FileDevice {
    fn info(&self) -> DeviceInfo {
        self.info
    }

    fn open_queue(self: Arc<Self>) -> io::Result<Box<dyn IoQueue>> {
        Ok(Box::new(UringQueue::new(self)?))
    }

    fn block_status(&self, offset: u64, len: u64, max_extents: usize) -> Result<Vec<Extent>, IoError> {
        let end = offset.saturating_add(len).min(self.info.size);
        if self.is_block_device || offset >= end {
            return Ok(vec![Extent { len: end.saturating_sub(offset).max(1), hole: false }]);
        }
        let fd = self.buffered.as_fd();
        let mut extents: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end && extents.len() < max_extents {
            // Where the next data starts (ENXIO: no data after pos), and where it ends.
            let data = match rustix::fs::seek(fd, SeekFrom::Data(pos)) {
                Ok(d) => d.min(end),
                Err(rustix::io::Errno::NXIO) => end,
                Err(e) => return Err(IoError::from_errno(e.raw_os_error())),
            };
            let (run_end, hole) = if data > pos {
                (data, true)
            } else {
                match rustix::fs::seek(fd, SeekFrom::Hole(pos)) {
                    Ok(h) => (h.min(end), false),
                    Err(rustix::io::Errno::NXIO) => (end, false),
                    Err(e) => return Err(IoError::from_errno(e.raw_os_error())),
                }
            };
            if run_end <= pos {
                // The file shrank underneath us; report the rest as data.
                extents.push(Extent { len: end - pos, hole: false });
                break;
            }
            match extents.last_mut() {
                Some(last) if last.hole == hole => last.len += run_end - pos,
                _ => extents.push(Extent { len: run_end - pos, hole }),
            }
            pos = run_end;
        }
        Ok(extents)
    }

    fn sync(&self) -> Result<(), IoError> {
        // Covers the direct descriptor too: the flush reaches the device's cache either way.
        rustix::fs::fdatasync(&self.buffered).map_err(|e| IoError::from_errno(e.raw_os_error()))
    }

    /// Splicing bypasses O_DIRECT, so it is offered only for page-cache mode.
    fn accepts_splice(&self) -> bool {
        !self.info.read_only && self.direct.is_none()
    }

    fn splice_write(&self, from: BorrowedFd<'_>, offset: u64, len: usize) -> Result<usize, IoError> {
        let mut at = offset;
        loop {
            match rustix::pipe::splice(
                from,
                None,
                &self.buffered,
                Some(&mut at),
                len,
                rustix::pipe::SpliceFlags::MORE,
            ) {
                Ok(n) => return Ok(n),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(IoError::from_errno(e.raw_os_error())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn sparse_file(dir: &tempfile::TempDir, size: u64) -> PathBuf {
        let path = dir.path().join("disk.img");
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        path
    }

    #[test]
    fn missing_file_without_size_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = FileDevice::open_file(&dir.path().join("nope"), &OpenOptions::default()).unwrap_err();
        assert!(matches!(err, OpenError::Missing { .. }), "{err}");
    }

    #[test]
    fn missing_file_with_size_is_created_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.img");
        let opts = OpenOptions { size: Some(1 << 20), ..Default::default() };
        let dev = FileDevice::open_file(&path, &opts).unwrap();
        assert_eq!(dev.info().size, 1 << 20);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
    }

    #[test]
    fn size_mismatch_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = sparse_file(&dir, 4096);
        let opts = OpenOptions { size: Some(8192), ..Default::default() };
        let err = FileDevice::open_file(&path, &opts).unwrap_err();
        assert!(err.to_string().contains("size mismatch"), "{err}");
    }

    #[test]
    fn block_status_finds_data_between_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = sparse_file(&dir, 16 << 20);
        File::options().write(true).open(&path).unwrap().write_all_at(&[1u8; 65536], 4 << 20).unwrap();
        let dev = FileDevice::open_file(&path, &OpenOptions::default()).unwrap();
        let extents = dev.block_status(0, 16 << 20, 100).unwrap();
        let total: u64 = extents.iter().map(|e| e.len).sum();
        assert_eq!(total, 16 << 20);
        assert!(extents[0].hole);
        let data: Vec<_> = extents.iter().filter(|e| !e.hole).collect();
        assert_eq!(data.len(), 1, "{extents:?}");
        assert!(data[0].len >= 65536);
    }
}
