//! An in-memory disk that behaves like a real one when things go wrong: a volatile write cache
//! (a write is visible at once but durable only after a flush, or with FUA), a power loss that
//! drops what was not flushed (or keeps a random part of it, sector by sector: a torn write),
//! and errors injected by operation, byte range and count.
//!
//! It is the test bed of every durability claim: the data path runs on it through
//! [`BlockDevice`], the metadata through [`MetaIo`], so internal metadata shares the cache with
//! the data exactly as on a real disk (a flush makes both durable; a metadata write with
//! `RWF_DSYNC` makes only its own range durable).

use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use super::{BlockDevice, Completion, DeviceInfo, Extent, IoError, IoOp, IoQueue, MetaIo};

/// The unit a power loss keeps or drops.
pub const SECTOR: u64 = 512;

/// Which operations a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    Read,
    /// Writes, trims and zeroing (data and metadata).
    Write,
    Flush,
    Any,
}

/// What an injected fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The operation fails with EIO and changes nothing.
    Eio,
    /// A write reaches the cache for its first half only, then fails with EIO.
    ShortWrite,
    /// The power fails in the middle of a write: its first half is on the medium, the rest
    /// never arrives, and the call fails with EIO (the node is gone; a test attaches again).
    TornWrite,
}

/// An injected fault: `op` on any byte of `range` (every offset when `None`; a flush has no
/// range and matches only a fault without one), `count` times (for ever when `None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub op: FaultOp,
    pub range: Option<(u64, u64)>,
    pub count: Option<u32>,
    pub kind: FaultKind,
}

impl Fault {
    /// Every `op` fails with EIO from now on.
    pub fn always(op: FaultOp) -> Self {
        Fault { op, range: None, count: None, kind: FaultKind::Eio }
    }
}

/// What a power loss does to the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerLoss {
    /// Everything not flushed is gone.
    DropAll,
    /// Each unflushed sector independently reached the medium with probability `keep_percent`
    /// (drawn from `seed`): writes in flight are torn.
    Tear { seed: u64, keep_percent: u8 },
}

/// Counters for assertions on how the disk was used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskStats {
    pub writes: u64,
    pub flushes: u64,
    pub power_losses: u64,
    pub injected: u64,
}

struct Model {
    /// What reads return now: the medium with the cache over it.
    visible: Vec<u8>,
    /// What the medium holds: what survives a power loss.
    durable: Vec<u8>,
    /// One bit per sector written since the last flush.
    dirty: Vec<u64>,
    faults: Vec<Fault>,
    stats: DiskStats,
}

impl Model {
    fn mark_dirty(&mut self, start: u64, end: u64) {
        for sector in start / SECTOR..end.div_ceil(SECTOR) {
            self.dirty[(sector / 64) as usize] |= 1 << (sector % 64);
        }
    }

    /// Makes `[start, end)` durable (sector-aligned outwards, like a device would).
    fn persist(&mut self, start: u64, end: u64) {
        let (s, e) =
            (start / SECTOR * SECTOR, (end.div_ceil(SECTOR) * SECTOR).min(self.visible.len() as u64));
        self.durable[s as usize..e as usize].copy_from_slice(&self.visible[s as usize..e as usize]);
        for sector in s / SECTOR..e.div_ceil(SECTOR) {
            self.dirty[(sector / 64) as usize] &= !(1 << (sector % 64));
        }
    }

    fn flush(&mut self) {
        for word in 0..self.dirty.len() {
            let mut bits = std::mem::take(&mut self.dirty[word]);
            while bits != 0 {
                let sector = word as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let (s, e) = (sector * SECTOR, ((sector + 1) * SECTOR).min(self.visible.len() as u64));
                self.durable[s as usize..e as usize].copy_from_slice(&self.visible[s as usize..e as usize]);
            }
        }
        self.stats.flushes += 1;
    }

    /// The first matching fault, used up by one if it has a count.
    fn take_fault(&mut self, op: FaultOp, range: Option<(u64, u64)>) -> Option<FaultKind> {
        let i = self.faults.iter().position(|f| {
            let op_matches = f.op == FaultOp::Any || f.op == op;
            let range_matches = match (f.range, range) {
                (None, _) => true,
                (Some((fs, fe)), Some((s, e))) => fs < e && s < fe,
                (Some(_), None) => false,
            };
            op_matches && range_matches
        })?;
        let kind = self.faults[i].kind;
        if let Some(count) = &mut self.faults[i].count {
            *count -= 1;
            if *count == 0 {
                self.faults.remove(i);
            }
        }
        self.stats.injected += 1;
        Some(kind)
    }

    fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), IoError> {
        let end = offset + data.len() as u64;
        if end > self.visible.len() as u64 {
            return Err(IoError::NoSpace);
        }
        let len = match self.take_fault(FaultOp::Write, Some((offset, end))) {
            None => data.len(),
            Some(FaultKind::Eio) => return Err(IoError::Io(libc::EIO)),
            Some(FaultKind::ShortWrite) => data.len() / 2,
            Some(FaultKind::TornWrite) => {
                let half = offset + data.len() as u64 / 2;
                self.visible[offset as usize..half as usize].copy_from_slice(&data[..data.len() / 2]);
                self.persist(offset, half);
                return Err(IoError::Io(libc::EIO));
            }
        };
        let end_written = offset + len as u64;
        self.visible[offset as usize..end_written as usize].copy_from_slice(&data[..len]);
        self.mark_dirty(offset, end_written);
        self.stats.writes += 1;
        if len < data.len() {
            return Err(IoError::Io(libc::EIO));
        }
        if fua {
            self.persist(offset, end);
        }
        Ok(())
    }

    fn zero(&mut self, offset: u64, len: u64, fua: bool) -> Result<(), IoError> {
        let end =
            offset.checked_add(len).filter(|&e| e <= self.visible.len() as u64).ok_or(IoError::NoSpace)?;
        if self.take_fault(FaultOp::Write, Some((offset, end))).is_some() {
            return Err(IoError::Io(libc::EIO));
        }
        self.visible[offset as usize..end as usize].fill(0);
        self.mark_dirty(offset, end);
        self.stats.writes += 1;
        if fua {
            self.persist(offset, end);
        }
        Ok(())
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let end = offset + buf.len() as u64;
        if end > self.visible.len() as u64 {
            return Err(IoError::Io(libc::EINVAL));
        }
        if self.take_fault(FaultOp::Read, Some((offset, end))).is_some() {
            return Err(IoError::Io(libc::EIO));
        }
        buf.copy_from_slice(&self.visible[offset as usize..end as usize]);
        Ok(())
    }

    fn sync(&mut self) -> Result<(), IoError> {
        if self.take_fault(FaultOp::Flush, None).is_some() {
            return Err(IoError::Io(libc::EIO));
        }
        self.flush();
        Ok(())
    }
}

/// A whole disk (data and, for internal metadata, the metadata after it).
pub struct FaultyDisk {
    model: Mutex<Model>,
    size: u64,
}

impl FaultyDisk {
    /// A zero-filled disk of `size` bytes (a multiple of [`SECTOR`]), everything durable.
    pub fn new(size: u64) -> Arc<Self> {
        assert!(size % SECTOR == 0, "a disk is made of whole sectors");
        let sectors = size / SECTOR;
        Arc::new(FaultyDisk {
            model: Mutex::new(Model {
                visible: vec![0; size as usize],
                durable: vec![0; size as usize],
                dirty: vec![0; sectors.div_ceil(64) as usize],
                faults: Vec::new(),
                stats: DiskStats::default(),
            }),
            size,
        })
    }

    fn model(&self) -> MutexGuard<'_, Model> {
        self.model.lock().expect("faulty disk lock")
    }

    pub fn total_size(&self) -> u64 {
        self.size
    }

    /// The first `size` bytes as a block device (the data area when metadata is internal).
    pub fn data_device(self: &Arc<Self>, size: u64) -> Arc<FaultyData> {
        assert!(size <= self.size);
        Arc::new(FaultyData { disk: self.clone(), size })
    }

    /// The power fails: the cache is lost as `how` says. The disk works again at once (a node
    /// that boots finds what the medium holds).
    pub fn power_off(&self, how: PowerLoss) {
        let mut guard = self.model();
        let m = &mut *guard;
        let mut rng = match how {
            PowerLoss::DropAll => None,
            PowerLoss::Tear { seed, keep_percent } => Some((seed | 1, keep_percent)),
        };
        for word in 0..m.dirty.len() {
            let mut bits = std::mem::take(&mut m.dirty[word]);
            while bits != 0 {
                let sector = word as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let kept = rng.as_mut().is_some_and(|(state, keep)| {
                    *state ^= *state << 13;
                    *state ^= *state >> 7;
                    *state ^= *state << 17;
                    (*state % 100) < u64::from(*keep)
                });
                if kept {
                    let (s, e) = ((sector * SECTOR) as usize, ((sector + 1) * SECTOR) as usize);
                    m.durable[s..e].copy_from_slice(&m.visible[s..e]);
                }
            }
        }
        m.visible.copy_from_slice(&m.durable);
        m.stats.power_losses += 1;
    }

    pub fn inject(&self, fault: Fault) {
        self.model().faults.push(fault);
    }

    pub fn clear_faults(&self) {
        self.model().faults.clear();
    }

    pub fn stats(&self) -> DiskStats {
        self.model().stats
    }

    /// What reads return now.
    pub fn read_visible(&self, offset: u64, len: usize) -> Vec<u8> {
        self.model().visible[offset as usize..offset as usize + len].to_vec()
    }

    /// What would survive a power loss now.
    pub fn read_durable(&self, offset: u64, len: usize) -> Vec<u8> {
        self.model().durable[offset as usize..offset as usize + len].to_vec()
    }

    /// Bytes written and not yet durable.
    pub fn unflushed_bytes(&self) -> u64 {
        self.model().dirty.iter().map(|w| u64::from(w.count_ones())).sum::<u64>() * SECTOR
    }

    fn to_io(e: IoError) -> std::io::Error {
        match e {
            IoError::Io(errno) => std::io::Error::from_raw_os_error(errno),
            IoError::NoSpace => std::io::Error::from_raw_os_error(libc::ENOSPC),
            other => std::io::Error::other(other),
        }
    }
}

impl MetaIo for FaultyDisk {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.size)
    }

    fn read_into(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.model().read(offset, buf).map_err(Self::to_io)
    }

    fn write_plain(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.model().write(offset, data, false).map_err(Self::to_io)
    }

    fn write_durably(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.model().write(offset, data, true).map_err(Self::to_io)
    }

    fn make_durable(&self) -> std::io::Result<()> {
        self.model().sync().map_err(Self::to_io)
    }
}

/// The data area of a [`FaultyDisk`] as a block device.
pub struct FaultyData {
    disk: Arc<FaultyDisk>,
    size: u64,
}

impl FaultyData {
    pub fn disk(&self) -> &Arc<FaultyDisk> {
        &self.disk
    }

    fn run(&self, op: IoOp) -> (Result<(), IoError>, Option<crate::storage::IoBuf>) {
        let mut m = self.disk.model();
        let within = |offset: u64, len: u64| offset.checked_add(len).is_some_and(|end| end <= self.size);
        match op {
            IoOp::Read { offset, mut buf } => {
                let result = if within(offset, buf.len() as u64) {
                    m.read(offset, &mut buf)
                } else {
                    Err(IoError::Io(libc::EINVAL))
                };
                (result, Some(buf))
            }
            IoOp::Write { offset, buf, fua } => {
                let result = if within(offset, buf.len() as u64) {
                    m.write(offset, &buf, fua)
                } else {
                    Err(IoError::NoSpace)
                };
                (result, Some(buf))
            }
            IoOp::Flush => (m.sync(), None),
            IoOp::Trim { offset, len, fua } | IoOp::WriteZeroes { offset, len, fua, .. } => {
                let result =
                    if within(offset, len) { m.zero(offset, len, fua) } else { Err(IoError::NoSpace) };
                (result, None)
            }
            IoOp::Cache { .. } => (Ok(()), None),
        }
    }
}

impl BlockDevice for FaultyData {
    fn info(&self) -> DeviceInfo {
        DeviceInfo { size: self.size, read_only: false, rotational: false, min_block: 1, can_trim: true }
    }

    fn open_queue(self: Arc<Self>) -> std::io::Result<Box<dyn IoQueue>> {
        Ok(Box::new(FaultyQueue { device: self, done: Vec::new() }))
    }

    fn block_status(&self, offset: u64, len: u64, _max_extents: usize) -> Result<Vec<Extent>, IoError> {
        Ok(vec![Extent { len: len.min(self.size.saturating_sub(offset)).max(1), hole: false }])
    }

    fn sync(&self) -> Result<(), IoError> {
        self.disk.model().sync()
    }
}

/// Every operation completes when it is submitted; the completion is handed out at the next
/// poll, as a real queue would.
struct FaultyQueue {
    device: Arc<FaultyData>,
    done: Vec<Completion>,
}

impl IoQueue for FaultyQueue {
    fn submit(&mut self, tag: u32, op: IoOp) {
        let (result, buf) = self.device.run(op);
        self.done.push(Completion { tag, result, buf });
    }

    fn poll_complete(&mut self, _cx: &mut Context<'_>, out: &mut Vec<Completion>) -> Poll<()> {
        out.append(&mut self.done);
        Poll::Ready(())
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unflushed_writes_are_lost_at_power_off_and_flushed_ones_stay() {
        let disk = FaultyDisk::new(1 << 20);
        disk.write_plain(&[1; 4096], 0).unwrap();
        disk.make_durable().unwrap();
        disk.write_plain(&[2; 4096], 0).unwrap();
        disk.write_plain(&[3; 4096], 8192).unwrap();
        assert_eq!(disk.read_visible(0, 1), vec![2], "a write is visible at once");
        assert_eq!(disk.unflushed_bytes(), 8192);
        disk.power_off(PowerLoss::DropAll);
        assert_eq!(disk.read_visible(0, 4096), vec![1; 4096], "the flushed write survives");
        assert_eq!(disk.read_visible(8192, 4096), vec![0; 4096], "the unflushed one is gone");
    }

    #[test]
    fn a_durable_write_persists_only_its_own_range() {
        let disk = FaultyDisk::new(1 << 20);
        disk.write_plain(&[5; 4096], 0).unwrap();
        disk.write_durably(&[6; 4096], 65536).unwrap();
        disk.power_off(PowerLoss::DropAll);
        assert_eq!(disk.read_visible(0, 4096), vec![0; 4096]);
        assert_eq!(disk.read_visible(65536, 4096), vec![6; 4096]);
    }

    #[test]
    fn a_torn_power_loss_keeps_some_sectors_of_a_write() {
        let disk = FaultyDisk::new(1 << 20);
        disk.write_plain(&[9; 65536], 0).unwrap();
        disk.power_off(PowerLoss::Tear { seed: 7, keep_percent: 50 });
        let after = disk.read_visible(0, 65536);
        let kept = after.chunks(SECTOR as usize).filter(|s| s[0] == 9).count();
        assert!(kept > 0 && kept < 128, "{kept} of 128 sectors kept");
        assert!(after.chunks(SECTOR as usize).all(|s| s.iter().all(|&b| b == s[0])), "sector-atomic");
    }

    #[test]
    fn faults_hit_their_operation_and_range_and_run_out() {
        let disk = FaultyDisk::new(1 << 20);
        let data = disk.data_device(1 << 19);
        disk.inject(Fault {
            op: FaultOp::Write,
            range: Some((4096, 8192)),
            count: Some(1),
            kind: FaultKind::Eio,
        });
        disk.inject(Fault { op: FaultOp::Flush, range: None, count: Some(1), kind: FaultKind::Eio });
        assert!(disk.write_plain(&[1; 4096], 0).is_ok(), "outside the range");
        assert!(disk.write_plain(&[1; 4096], 4096).is_err());
        assert!(disk.write_plain(&[1; 4096], 4096).is_ok(), "the count ran out");
        assert_eq!(data.sync(), Err(IoError::Io(libc::EIO)));
        assert_eq!(data.sync(), Ok(()));
        disk.inject(Fault { op: FaultOp::Write, range: None, count: Some(1), kind: FaultKind::ShortWrite });
        assert!(disk.write_plain(&[7; 4096], 0).is_err());
        assert_eq!(disk.read_visible(0, 4096)[..2048], [7; 2048]);
        assert_eq!(disk.read_visible(2048, 1), vec![1], "only the first half reached the disk");
        assert_eq!(disk.stats().injected, 3);
        disk.inject(Fault { op: FaultOp::Write, range: None, count: Some(1), kind: FaultKind::TornWrite });
        assert!(disk.write_durably(&[8; 4096], 8192).is_err());
        disk.power_off(PowerLoss::DropAll);
        assert_eq!(disk.read_visible(8192, 2048), vec![8; 2048], "the first half reached the medium");
        assert_eq!(disk.read_visible(8192 + 2048, 1), vec![0], "the rest never did");
    }
}
