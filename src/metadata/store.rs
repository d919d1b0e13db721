//! Reading and writing the metadata areas on their device: `create-md`, attach (with the
//! activity log folded into the bitmap after a crash), and the crash-safe updates.
//!
//! Every write here is followed by `fdatasync` before it is reported done: a metadata update
//! that is not durable protects nothing.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::activity_log::{self, ActivityLog, Transaction, EXTENT_BYTES};
use super::bitmap::DirtyBitmap;
use super::generations::Generations;
use super::layout::{Layout, LayoutError, MD_BLOCK};
use super::superblock::{flags, Superblock, SuperblockError};
use crate::storage::MetaIo;

/// Where a resource keeps its metadata (the `meta-disk` setting).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum MetaLocation {
    /// At the end of the backing device itself, which then shows a smaller size to clients.
    #[default]
    Internal,
    /// In a separate file or device.
    External(PathBuf),
}

/// Parameters chosen at `create-md` time.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub bitmap_block: u32,
    pub al_extents: u32,
    pub node_name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error("{path}: {error}")]
    Layout { path: PathBuf, error: LayoutError },
    #[error("{path}: no rdbd metadata found (run `rdbd create-md` first)")]
    NoMetadata { path: PathBuf },
    #[error("{path}: superblock unreadable: {error}")]
    Superblock { path: PathBuf, error: SuperblockError },
    #[error(
        "{path}: already holds rdbd metadata (of node {node}); refusing to overwrite it without --force"
    )]
    Exists { path: PathBuf, node: String },
    #[error("{path}: metadata belongs to node {found:?}, not {expected:?}")]
    WrongNode { path: PathBuf, found: String, expected: String },
    #[error("{path}: metadata describes {recorded} bytes of data but the device now holds {now}")]
    SizeChanged { path: PathBuf, recorded: u64, now: u64 },
}

/// An open metadata area.
pub struct MetaDevice {
    file: Arc<dyn MetaIo>,
    path: PathBuf,
    layout: Layout,
    superblock: Superblock,
}

/// What attaching found, for logging and status.
#[derive(Debug, Clone, Default)]
pub struct AttachReport {
    /// Damaged copies and pages that were detected (and worked around).
    pub damage: Vec<String>,
    /// The previous run did not shut down cleanly.
    pub unclean: bool,
    /// Activity log extents folded into the bitmap.
    pub al_extents_applied: usize,
    /// Dirty blocks after attaching.
    pub dirty_blocks: u64,
}

/// Everything attaching loads.
pub struct Attached {
    pub meta: MetaDevice,
    pub bitmap: DirtyBitmap,
    pub activity_log: ActivityLog,
    pub report: AttachReport,
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> MetaError + '_ {
    move |error| MetaError::Io { path: path.to_owned(), error }
}

fn open_rw(path: &Path) -> Result<File, MetaError> {
    std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(io_err(path))
}

/// The device that holds a resource's metadata, opened, with the sizes its layout depends on.
pub struct MetaArea {
    io: Arc<dyn MetaIo>,
    /// For messages.
    path: PathBuf,
    backing_size: u64,
    meta_size: u64,
    internal: bool,
}

impl MetaArea {
    /// Opens the metadata of `backing` where `location` says.
    pub fn open(backing: &Path, location: &MetaLocation) -> Result<Self, MetaError> {
        let backing_file = open_rw(backing)?;
        let backing_size = backing_file.size().map_err(io_err(backing))?;
        Ok(match location {
            MetaLocation::Internal => MetaArea {
                io: Arc::new(backing_file),
                path: backing.to_owned(),
                backing_size,
                meta_size: backing_size,
                internal: true,
            },
            MetaLocation::External(path) => {
                let file = open_rw(path)?;
                let meta_size = file.size().map_err(io_err(path))?;
                MetaArea { io: Arc::new(file), path: path.clone(), backing_size, meta_size, internal: false }
            }
        })
    }

    /// Internal metadata on `io`, which is also the data disk (`name` for messages).
    pub fn internal(io: Arc<dyn MetaIo>, name: &Path) -> Result<Self, MetaError> {
        let size = io.size().map_err(io_err(name))?;
        Ok(MetaArea { io, path: name.to_owned(), backing_size: size, meta_size: size, internal: true })
    }

    fn layout(&self, bitmap_block: u32, al_extents: u32) -> Result<Layout, MetaError> {
        let layout = if self.internal {
            Layout::internal(self.backing_size, bitmap_block, al_extents)
        } else {
            Layout::external(self.meta_size, self.backing_size, bitmap_block, al_extents)
        };
        layout.map_err(|error| MetaError::Layout { path: self.path.clone(), error })
    }

    fn superblock_offsets(&self) -> [u64; 2] {
        Layout::superblock_offsets_of(self.internal.then_some(self.backing_size))
    }
}

fn read_block(io: &dyn MetaIo, offset: u64) -> io::Result<[u8; MD_BLOCK as usize]> {
    let mut b = [0u8; MD_BLOCK as usize];
    io.read_into(&mut b, offset)?;
    Ok(b)
}

/// Reads both superblock copies.
fn read_superblocks(
    io: &dyn MetaIo,
    path: &Path,
    offsets: [u64; 2],
) -> Result<(Superblock, Option<SuperblockError>), MetaError> {
    let a = Superblock::decode(&read_block(io, offsets[0]).map_err(io_err(path))?);
    let b = Superblock::decode(&read_block(io, offsets[1]).map_err(io_err(path))?);
    Superblock::pick(a, b).map_err(|error| match error {
        SuperblockError::NotMetadata => MetaError::NoMetadata { path: path.to_owned() },
        error => MetaError::Superblock { path: path.to_owned(), error },
    })
}

/// `create-md`: writes fresh metadata (generation "just created", an empty activity log and a
/// clean bitmap) for `backing`. Refuses to overwrite existing metadata unless `force`.
pub fn create(
    backing: &Path,
    location: &MetaLocation,
    opts: &CreateOptions,
    force: bool,
) -> Result<Layout, MetaError> {
    create_in(&MetaArea::open(backing, location)?, opts, force)
}

/// [`create`] on an opened metadata area.
pub fn create_in(area: &MetaArea, opts: &CreateOptions, force: bool) -> Result<Layout, MetaError> {
    let layout = area.layout(opts.bitmap_block, opts.al_extents)?;
    let (file, path) = (&*area.io, area.path.clone());
    if !force {
        if let Ok((existing, _)) = read_superblocks(file, &path, area.superblock_offsets()) {
            return Err(MetaError::Exists { path, node: existing.node_name });
        }
    }
    let mut bitmap = DirtyBitmap::new(layout.bitmap_bits());
    for page in 0..layout.bitmap_pages {
        file.write_plain(&bitmap.encode_page(page), layout.bitmap_page_offset(page))
            .map_err(io_err(&path))?;
    }
    bitmap.take_stale_pages();
    let mut al = ActivityLog::new(layout.al_extents);
    for (block, image) in al.all_blocks() {
        for copy in 0..2 {
            file.write_plain(&image, layout.al_block_offset(block, copy)).map_err(io_err(&path))?;
        }
    }
    let mut sb = Superblock {
        seq: 0,
        flags: flags::AL_CLEAN,
        data_size: layout.data_size,
        bitmap_block: layout.bitmap_block,
        al_extents: layout.al_extents,
        generations: Generations::just_created(),
        node_name: opts.node_name.clone(),
    };
    for slot in 0..2 {
        sb.seq = slot as u64;
        let image = sb.encode().map_err(|error| MetaError::Superblock { path: path.clone(), error })?;
        file.write_plain(&image, layout.superblock_offsets[slot]).map_err(io_err(&path))?;
    }
    file.make_durable().map_err(io_err(&path))?;
    Ok(layout)
}

/// Attaches to existing metadata: loads the superblock, the bitmap and the activity log. After
/// an unclean shutdown every extent of the activity log is marked dirty. Damaged blocks are
/// reported and never trusted: a damaged bitmap page counts as all dirty, a damaged log as
/// every block dirty.
pub fn attach(backing: &Path, location: &MetaLocation, node_name: &str) -> Result<Attached, MetaError> {
    attach_in(MetaArea::open(backing, location)?, node_name)
}

/// [`attach`] on an opened metadata area.
pub fn attach_in(area: MetaArea, node_name: &str) -> Result<Attached, MetaError> {
    // The layout depends on parameters stored in the superblock; the superblock's position
    // does not.
    let (sb, damaged_sb) = read_superblocks(&*area.io, &area.path, area.superblock_offsets())?;
    let layout = area.layout(sb.bitmap_block, sb.al_extents)?;
    let MetaArea { io: file, path, .. } = area;
    if sb.node_name != node_name {
        return Err(MetaError::WrongNode { path, found: sb.node_name, expected: node_name.to_owned() });
    }
    if sb.data_size != layout.data_size {
        return Err(MetaError::SizeChanged { path, recorded: sb.data_size, now: layout.data_size });
    }
    let mut report = AttachReport::default();
    if let Some(e) = damaged_sb {
        report.damage.push(format!("one superblock copy: {e}"));
    }

    let mut bitmap = DirtyBitmap::new(layout.bitmap_bits());
    for page in 0..layout.bitmap_pages {
        let image = read_block(&*file, layout.bitmap_page_offset(page)).map_err(io_err(&path))?;
        if let Err(e) = bitmap.load_page(page, &image) {
            report.damage.push(format!("{e}: its blocks are taken as out of sync"));
        }
    }

    let mut copies = Vec::new();
    let al_blocks = layout.al_blocks / 2;
    for block in 0..al_blocks {
        let a = read_block(&*file, layout.al_block_offset(block, 0)).map_err(io_err(&path))?;
        let b = read_block(&*file, layout.al_block_offset(block, 1)).map_err(io_err(&path))?;
        copies.push((a, b));
    }
    let activity_log = match activity_log::recover(&copies) {
        Ok(recovered) => {
            for (block, copy, e) in &recovered.damaged_copies {
                report.damage.push(format!("activity log block {block} copy {copy}: {e}"));
            }
            report.unclean = !sb.has(flags::AL_CLEAN);
            if report.unclean {
                for extent in recovered.extents() {
                    let first = extent as u64 * EXTENT_BYTES;
                    bitmap.set(DirtyBitmap::blocks_of(first, EXTENT_BYTES, layout.bitmap_block));
                    report.al_extents_applied += 1;
                }
            }
            ActivityLog::restore(layout.al_extents, &recovered)
        }
        Err(e) => {
            report.damage.push(format!("{e}: every block is taken as out of sync"));
            report.unclean = true;
            bitmap.set_all();
            ActivityLog::new(layout.al_extents)
        }
    };
    report.dirty_blocks = bitmap.dirty_blocks();
    let meta = MetaDevice { file, path, layout, superblock: sb };
    Ok(Attached { meta, bitmap, activity_log, report })
}

impl MetaDevice {
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn superblock(&self) -> &Superblock {
        &self.superblock
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes `sb` the durable superblock (written to the copy after the current one).
    pub fn write_superblock(&mut self, mut sb: Superblock) -> Result<(), MetaError> {
        sb.seq = self.superblock.seq + 1;
        let image = sb.encode().map_err(|error| MetaError::Superblock { path: self.path.clone(), error })?;
        let offset = self.layout.superblock_offsets[sb.slot()];
        self.file.write_durably(&image, offset).map_err(io_err(&self.path))?;
        self.superblock = sb;
        Ok(())
    }

    /// Changes the superblock with `change` and writes it.
    pub fn update(&mut self, change: impl FnOnce(&mut Superblock)) -> Result<(), MetaError> {
        let mut sb = self.superblock.clone();
        change(&mut sb);
        self.write_superblock(sb)
    }

    /// Writes bitmap pages (those the bitmap reports stale) durably.
    pub fn write_bitmap_pages(&self, bitmap: &DirtyBitmap, pages: &[u32]) -> Result<(), MetaError> {
        // Consecutive pages are consecutive on disk: one durable write per run.
        let mut run: Vec<u8> = Vec::new();
        let mut start = None;
        for (i, &page) in pages.iter().enumerate() {
            start.get_or_insert(page);
            run.extend_from_slice(&bitmap.encode_page(page));
            if pages.get(i + 1) != Some(&(page + 1)) {
                let offset = self.layout.bitmap_page_offset(start.take().expect("run started"));
                self.file.write_durably(&run, offset).map_err(io_err(&self.path))?;
                run.clear();
            }
        }
        Ok(())
    }

    /// Writes an activity log transaction durably. The bitmap pages of evicted extents must
    /// have been written first (see [`Transaction::evicted`]).
    pub fn write_transaction(&self, tx: &Transaction) -> Result<(), MetaError> {
        for w in &tx.blocks {
            let offset = self.layout.al_block_offset(w.block, w.copy);
            self.file.write_durably(&w.image, offset).map_err(io_err(&self.path))?;
        }
        Ok(())
    }

    /// Writes every stale bitmap page, then the bitmap pages of the evicted extents and the
    /// transaction: the order that keeps a crash at any point safe.
    pub fn commit(&self, bitmap: &mut DirtyBitmap, tx: &Transaction) -> Result<(), MetaError> {
        let bb = self.layout.bitmap_block;
        let mut pages = Vec::new();
        for &extent in &tx.evicted {
            let range = DirtyBitmap::blocks_of(extent as u64 * EXTENT_BYTES, EXTENT_BYTES, bb);
            pages.extend(bitmap.take_stale_pages_in(range));
        }
        pages.sort_unstable();
        pages.dedup();
        self.write_bitmap_pages(bitmap, &pages)?;
        self.write_transaction(tx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::activity_log::Begin;
    use std::os::unix::fs::FileExt;

    const SIZE: u64 = 256 << 20;

    fn backing(dir: &tempfile::TempDir) -> PathBuf {
        let path = dir.path().join("disk.img");
        File::create(&path).unwrap().set_len(SIZE).unwrap();
        path
    }

    fn opts() -> CreateOptions {
        CreateOptions { bitmap_block: 4096, al_extents: 61, node_name: "alpha".into() }
    }

    /// Writes to `extent` the way the data path will: log it, set its bits while the peer is away.
    fn write_while_disconnected(a: &mut Attached, extent: u32) {
        assert_eq!(a.activity_log.begin(extent), Begin::Pending);
        let tx = a.activity_log.prepare().unwrap();
        a.meta.commit(&mut a.bitmap, &tx).unwrap();
        a.activity_log.committed(tx);
        let first = extent as u64 * EXTENT_BYTES;
        a.bitmap.set(DirtyBitmap::blocks_of(first + 8192, 4096, 4096));
        a.activity_log.end(extent);
    }

    #[test]
    fn create_then_attach_a_clean_device() {
        let dir = tempfile::tempdir().unwrap();
        let disk = backing(&dir);
        let layout = create(&disk, &MetaLocation::Internal, &opts(), false).unwrap();
        assert!(layout.data_size < SIZE && layout.data_size > SIZE - (1 << 20));
        let a = attach(&disk, &MetaLocation::Internal, "alpha").unwrap();
        assert_eq!(a.meta.superblock().generations, Generations::just_created());
        assert_eq!(a.report.dirty_blocks, 0);
        assert!(!a.report.unclean && a.report.damage.is_empty());
    }

    #[test]
    fn existing_metadata_is_not_overwritten_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let disk = backing(&dir);
        create(&disk, &MetaLocation::Internal, &opts(), false).unwrap();
        let err = create(&disk, &MetaLocation::Internal, &opts(), false).unwrap_err();
        assert!(matches!(err, MetaError::Exists { .. }), "{err}");
        create(&disk, &MetaLocation::Internal, &opts(), true).unwrap();
    }

    #[test]
    fn attach_refuses_missing_metadata_and_another_nodes_disk() {
        let dir = tempfile::tempdir().unwrap();
        let disk = backing(&dir);
        assert!(matches!(attach(&disk, &MetaLocation::Internal, "alpha"), Err(MetaError::NoMetadata { .. })));
        create(&disk, &MetaLocation::Internal, &opts(), false).unwrap();
        let err = attach(&disk, &MetaLocation::Internal, "beta").err().unwrap();
        assert!(matches!(err, MetaError::WrongNode { .. }), "{err}");
    }

    #[test]
    fn after_a_crash_the_activity_log_bounds_the_out_of_sync_region() {
        let dir = tempfile::tempdir().unwrap();
        let disk = backing(&dir);
        create(&disk, &MetaLocation::Internal, &opts(), false).unwrap();
        let mut a = attach(&disk, &MetaLocation::Internal, "alpha").unwrap();
        a.meta.update(|sb| sb.set(flags::AL_CLEAN, false)).unwrap();
        write_while_disconnected(&mut a, 3);
        write_while_disconnected(&mut a, 40);
        drop(a); // crash: no clean shutdown, bitmap pages never written

        let b = attach(&disk, &MetaLocation::Internal, "alpha").unwrap();
        assert!(b.report.unclean);
        assert_eq!(b.report.al_extents_applied, 2);
        let per_extent = EXTENT_BYTES / 4096;
        assert_eq!(b.bitmap.dirty_blocks(), 2 * per_extent, "exactly the two logged extents");
        assert!(b.bitmap.is_dirty(3 * per_extent) && b.bitmap.is_dirty(40 * per_extent + per_extent - 1));
        assert!(!b.bitmap.is_dirty(4 * per_extent));
    }

    #[test]
    fn evicted_extents_keep_their_bits_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let disk = backing(&dir);
        let small = CreateOptions { al_extents: 7, ..opts() };
        create(&disk, &MetaLocation::Internal, &small, false).unwrap();
        let mut a = attach(&disk, &MetaLocation::Internal, "alpha").unwrap();
        a.meta.update(|sb| sb.set(flags::AL_CLEAN, false)).unwrap();
        // Ten extents through a seven-slot log: the first three are evicted.
        for e in 0..10 {
            write_while_disconnected(&mut a, e);
        }
        drop(a);
        let b = attach(&disk, &MetaLocation::Internal, "alpha").unwrap();
        let block_in = |e: u64| e * (EXTENT_BYTES / 4096) + 2;
        for e in 0..10 {
            assert!(b.bitmap.is_dirty(block_in(e)), "extent {e}'s write is remembered");
        }
    }

    #[test]
    fn torn_superblock_copy_falls_back_to_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let disk = backing(&dir);
        create(&disk, &MetaLocation::Internal, &opts(), false).unwrap();
        let mut a = attach(&disk, &MetaLocation::Internal, "alpha").unwrap();
        a.meta.update(|sb| sb.generations.current = 0x1234_5678).unwrap();
        let written = a.meta.superblock().slot();
        let offset = a.meta.layout().superblock_offsets[written];
        drop(a);
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.write_all_at(&[0xff; 16], offset + 100).unwrap();
        let b = attach(&disk, &MetaLocation::Internal, "alpha").unwrap();
        assert_eq!(b.meta.superblock().generations, Generations::just_created(), "the older copy is used");
        assert_eq!(b.report.damage.len(), 1, "{:?}", b.report.damage);
    }

    /// The power fails in the middle of a metadata write (a superblock update, then an activity
    /// log transaction), on the fault-injecting disk: attaching again finds the copy written
    /// before, and every extent a completed transaction logged.
    #[test]
    fn a_metadata_write_torn_by_a_power_loss_leaves_the_previous_copy() {
        use crate::storage::faulty::{Fault, FaultKind, FaultOp, FaultyDisk, PowerLoss};
        let disk = FaultyDisk::new(SIZE);
        let area = || MetaArea::internal(disk.clone(), Path::new("faulty")).unwrap();
        create_in(&area(), &opts(), false).unwrap();
        let mut a = attach_in(area(), "alpha").unwrap();
        a.meta.update(|sb| sb.set(flags::AL_CLEAN, false)).unwrap();
        write_while_disconnected(&mut a, 3);
        a.meta.update(|sb| sb.generations.current = 0xabc).unwrap();
        let torn = Fault { op: FaultOp::Write, range: None, count: Some(1), kind: FaultKind::TornWrite };
        disk.inject(torn);
        assert!(a.meta.update(|sb| sb.generations.current = 0xdef).is_err());
        drop(a);
        disk.power_off(PowerLoss::DropAll);
        let mut b = attach_in(area(), "alpha").unwrap();
        assert_eq!(b.meta.superblock().generations.current, 0xabc, "the copy before the torn one");
        assert_eq!(b.report.damage.len(), 1, "{:?}", b.report.damage);
        // The same for an activity log transaction: the extent logged before stays.
        b.meta.update(|sb| sb.set(flags::AL_CLEAN, false)).unwrap();
        disk.inject(torn);
        assert_eq!(b.activity_log.begin(9), crate::metadata::activity_log::Begin::Pending);
        let tx = b.activity_log.prepare().unwrap();
        assert!(b.meta.commit(&mut b.bitmap, &tx).is_err());
        drop(b);
        disk.power_off(PowerLoss::DropAll);
        let c = attach_in(area(), "alpha").unwrap();
        assert!(c.report.unclean);
        let per_extent = EXTENT_BYTES / 4096;
        assert!(c.bitmap.is_dirty(3 * per_extent), "extent 3 was logged before the torn write");
    }

    #[test]
    fn a_damaged_bitmap_page_is_reported_and_taken_as_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let disk = backing(&dir);
        let layout = create(&disk, &MetaLocation::Internal, &opts(), false).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.write_all_at(&[0x55; 8], layout.bitmap_page_offset(0) + 40).unwrap();
        let b = attach(&disk, &MetaLocation::Internal, "alpha").unwrap();
        assert_eq!(b.report.damage.len(), 1);
        let page_blocks = crate::metadata::bitmap::BITS_PER_PAGE;
        assert_eq!(b.bitmap.dirty_blocks(), page_blocks, "exactly the damaged page's blocks");
        assert!(b.bitmap.is_dirty(0) && !b.bitmap.is_dirty(page_blocks));
    }

    #[test]
    fn external_metadata_leaves_the_backing_device_whole() {
        let dir = tempfile::tempdir().unwrap();
        let disk = backing(&dir);
        let meta = dir.path().join("meta.img");
        File::create(&meta).unwrap().set_len(1 << 20).unwrap();
        let location = MetaLocation::External(meta);
        let layout = create(&disk, &location, &opts(), false).unwrap();
        assert_eq!(layout.data_size, SIZE);
        let a = attach(&disk, &location, "alpha").unwrap();
        assert_eq!(a.meta.layout().data_size, SIZE);
    }
}
