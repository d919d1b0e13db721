//! The node's backing disk: opening it with its metadata (at start and at `rdbd attach`), what
//! an I/O error does (`on-io-error`), and the operator's `detach`.
//!
//! - `detach` (default) and `call-local-io-error`: the disk goes Failed, then Diskless. Its
//!   metadata is marked Inconsistent (and for a full resync) if it can still be written, so that
//!   it is never trusted as UpToDate again without one; attached again, every block is resynced
//!   to it, since which ones it lost is unknown (after the operator's `detach`, only what
//!   changed); the peer hears it (a Primary's device announces it before
//!   any further request, see [`crate::replication::disk_health`]); a Diskless Primary goes on
//!   serving through the peer; a Diskless Secondary is never promoted.
//! - `pass_on`: a read error is retried on the peer and changes nothing else; a write or flush
//!   error on a Secondary leaves its disk Inconsistent (a resync repairs it), on a Primary it
//!   detaches (a Primary is never left on a disk that lacks what it acknowledged). Metadata
//!   errors always detach.

use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::event_stream::{EventKind, EventObject};
use super::handlers::HandlerEvent;
use super::{disk_from_flags, set_disk_flags, Node, NodeError};
use crate::config::{NodeConfig, OnIoError};
use crate::metadata::store::{self, MetaError};
use crate::metadata::superblock::flags;
use crate::replication::device::Tracking;
use crate::replication::disk_health::{DiskError, DiskOp};
use crate::replication::states::{ConnState, DiskState, Role};
use crate::storage::{BlockDevice, FileDevice, OpenOptions};

/// A backing disk opened with its metadata.
pub(super) struct OpenedDisk {
    pub local: Arc<dyn BlockDevice>,
    pub resync: Arc<dyn BlockDevice>,
    pub tracking: Tracking,
    pub disk: DiskState,
    pub bitmap_block: u32,
}

/// Opens `node`'s disk and metadata (folding the activity log after a crash) and marks the
/// metadata in use. With `fencing` (a `fence-peer` command and no witness), DRBD's rule at
/// attach: a disk that was UpToDate is only Consistent until the peer is heard, or fenced, or
/// the operator forces it, unless this node marked the peer outdated: the peer may have
/// written without it meanwhile, and a fence result of 5 ("unreachable") does not prove
/// otherwise (issue 15).
pub(super) fn open_disk(node: &NodeConfig, fencing: bool) -> Result<OpenedDisk, NodeError> {
    let attached = store::attach(&node.disk, &node.meta_disk, &node.name)?;
    for damage in &attached.report.damage {
        warn!("metadata damage detected: {damage}");
    }
    if attached.report.unclean {
        info!(
            extents = attached.report.al_extents_applied,
            dirty_blocks = attached.report.dirty_blocks,
            "previous run did not shut down cleanly: activity log folded into the bitmap"
        );
    }
    let mut meta = attached.meta;
    let data_size = meta.layout().data_size;
    let bitmap_block = meta.superblock().bitmap_block;
    let was_primary = meta.superblock().has(flags::PRIMARY);
    // In use from now on: a crash before the clean shutdown folds the activity log, and a
    // crash while Primary is remembered.
    meta.update(|sb| {
        sb.set(flags::AL_CLEAN, false);
        if was_primary {
            sb.set(flags::CRASHED_PRIMARY, true);
            sb.set(flags::PRIMARY, false);
        }
    })?;
    let mut disk = disk_from_flags(meta.superblock());
    if fencing && disk == DiskState::UpToDate && !meta.superblock().has(flags::PEER_OUTDATED) {
        info!("disk: Consistent (fencing is configured: UpToDate again once the peer is heard)");
        disk = DiskState::Consistent;
    }
    let mut bitmap = attached.bitmap;
    if meta.superblock().has(flags::FULL_SYNC) {
        info!("the disk failed before: every block is resynced to it");
        bitmap.set_all();
    }
    let opts = OpenOptions { size: Some(data_size), prefix: true, ..Default::default() };
    let is_file = std::fs::metadata(&node.disk).map(|m| m.file_type().is_file()).unwrap_or(true);
    let open = |opts: &OpenOptions| {
        if is_file {
            FileDevice::open_file(&node.disk, opts)
        } else {
            FileDevice::open_block_device(&node.disk, opts)
        }
    };
    let local: Arc<dyn BlockDevice> = Arc::new(open(&opts)?);
    // What a killed predecessor left in the page cache (and the disk in its volatile cache) is
    // made durable before this node offers its data: as a sync source it would send blocks a
    // power loss could still take from it, unmarked (found by the simulator, seed 97588).
    local.sync().map_err(|e| {
        NodeError::Io(std::io::Error::other(format!("flushing {} before use: {e}", node.disk.display())))
    })?;
    // Resync moves bulk data the page cache would only hold up: O_DIRECT (which measured
    // 2.8x buffered copying here), where the file system supports it.
    let resync: Arc<dyn BlockDevice> = match open(&OpenOptions { direct: true, ..opts.clone() }) {
        Ok(direct) => Arc::new(direct),
        Err(e) => {
            info!("resync uses the page cache: cannot open {} with O_DIRECT: {e}", node.disk.display());
            local.clone()
        }
    };
    let tracking = Tracking { bitmap, activity: Some((attached.activity_log, meta)) };
    Ok(OpenedDisk { local, resync, tracking, disk, bitmap_block })
}

/// Carries out the policy for every error the disk reports, until the node stops.
pub(super) async fn watch_errors(node: Arc<Node>, mut errors: mpsc::UnboundedReceiver<DiskError>) {
    while let Some(e) = errors.recv().await {
        node.on_disk_error(e);
    }
}

impl Node {
    /// A metadata write's result; an I/O error there is a disk error (it always detaches).
    pub(super) fn metadata_result(&self, result: Result<(), MetaError>) -> Result<(), NodeError> {
        if let Err(MetaError::Io { error, .. }) = &result {
            self.on_disk_error(DiskError::new(DiskOp::Metadata, None, error));
        }
        Ok(result?)
    }

    /// What `on-io-error` does with one error of the local disk. Returns whether the disk is
    /// still attached (pass_on keeps it for errors that lose no data).
    pub(crate) fn on_disk_error(self: &Node, e: DiskError) -> bool {
        let policy = self.config.disk.on_io_error;
        let already = matches!(self.state().disk, DiskState::Diskless | DiskState::Failed);
        if already {
            return false;
        }
        let device_detached = !self.device.health().usable();
        let primary = self.state().role == Role::Primary;
        let detach = device_detached
            || policy != OnIoError::PassOn
            || e.op == DiskOp::Metadata
            || (primary && e.loses_data());
        if detach {
            self.detach_disk(&e.to_string(), true);
            return false;
        }
        if e.loses_data() {
            // pass_on on a Secondary: the disk lacks what the peer wrote; a resync repairs it.
            error!("{e}: the disk is Inconsistent (on-io-error pass_on)");
            let written = self.device.with_tracking(|t| match t.activity.as_mut() {
                Some((_, meta)) => meta.update(|sb| set_disk_flags(sb, DiskState::Inconsistent)),
                None => Ok(()),
            });
            if let Err(write) = written {
                self.detach_disk(&format!("{e}; then the metadata write failed: {write}"), true);
                return false;
            }
            let mut s = self.state();
            s.disk = DiskState::Inconsistent;
            s.disk_error = Some(e.to_string());
            s.last_error = Some(e.to_string());
        } else {
            warn!("{e}: retried on the peer (on-io-error pass_on)");
            self.state().last_error = Some(e.to_string());
        }
        true
    }

    /// The disk leaves use: Failed then Diskless (`failed`), or Diskless at the operator's
    /// request. Its metadata says Inconsistent after a failure, Outdated after a detach, if it
    /// can still be written; the peer hears it; `call-local-io-error` runs its handler.
    fn detach_disk(&self, reason: &str, failed: bool) {
        self.device.health().detach();
        {
            let mut s = self.state();
            if failed {
                s.disk = DiskState::Failed;
            }
            s.disk_failed |= failed;
            s.disk_error = Some(reason.to_string());
            s.last_error = Some(reason.to_string());
        }
        let mark = if failed { DiskState::Inconsistent } else { DiskState::Outdated };
        let written = self.device.with_tracking(|t| match t.activity.as_mut() {
            Some((_, meta)) => meta.update(|sb| {
                set_disk_flags(sb, mark.min(disk_from_flags(sb)));
                sb.set(flags::FULL_SYNC, failed || sb.has(flags::FULL_SYNC));
            }),
            None => Ok(()),
        });
        if let Err(e) = written {
            warn!("cannot mark the detached disk {mark} in its metadata: {e}");
        }
        let (role, link) = {
            let mut s = self.state();
            s.disk = DiskState::Diskless;
            (s.role, s.link.clone())
        };
        if failed {
            error!("{reason}: the disk is detached (on-io-error {})", self.config.disk.on_io_error);
        } else {
            info!("disk detached by the operator");
        }
        self.emit_event(
            EventKind::Change,
            EventObject::Device {
                disk: DiskState::Diskless,
                out_of_sync_bytes: 0,
                error: Some(reason.to_string()),
            },
        );
        if failed && self.config.disk.on_io_error == OnIoError::CallLocalIoError {
            if let Some(node) = self.myself() {
                node.spawn_handler(HandlerEvent::LocalIoError, vec![("RDBD_DISK_ERROR", reason.to_string())]);
            }
        }
        match link {
            // The Primary goes on through the peer on this connection; the peer marks what this
            // disk misses from now on.
            Some(link) if role == Role::Primary => {
                use rdbd_protocol::repl::Message;
                link.send_other(&Message::StateChange { role: Role::Primary, disk: DiskState::Diskless });
            }
            // Anything else connects again, and the handshake shows the disk gone.
            _ => self.renegotiate.notify_one(),
        }
    }

    /// The peer is a Diskless Primary: this node holds the only copy. It starts a data
    /// generation of its own (see [`Node::start_own_generation`]), so that the peer's disk,
    /// attached again, is recognisably older and resynced by bitmap, and from now on the applier
    /// marks what it writes (see [`ReplicatedDevice::mark_durably`]).
    ///
    /// [`ReplicatedDevice::mark_durably`]: crate::replication::device::ReplicatedDevice::mark_durably
    pub(super) fn hold_sole_copy(&self) {
        if self.device.sole_copy() {
            return;
        }
        if let Err(e) = self.start_own_generation(false) {
            warn!("cannot start a new data generation as the only copy: {e}");
        }
        self.device.set_sole_copy(true);
        if let Err(e) = self.persist_bitmap(false) {
            warn!("cannot write the bitmap: {e}");
        }
        info!("the Primary's disk is detached: this node holds the only copy and marks what it writes");
    }

    /// `rdbd detach`: stop using the disk, as DRBD's detach. Its data is flushed and its
    /// metadata written first; it is then Outdated (consistent, but the peer goes on without it).
    /// A Primary may detach only while an UpToDate peer is connected to serve through.
    pub async fn detach(&self) -> Result<(), NodeError> {
        {
            let s = self.state();
            if s.disk == DiskState::Diskless {
                return Ok(());
            }
            if s.role == Role::Primary
                && (s.conn != ConnState::Connected || s.peer_disk != DiskState::UpToDate)
            {
                return Err(NodeError::Refused(format!(
                    "cannot detach: this Primary would have no data to serve; {} is {} and {}",
                    self.peer_config().name,
                    s.conn,
                    s.peer_disk
                )));
            }
        }
        if let Err(e) = self.device.sync() {
            warn!("detach: flushing the data failed: {e}");
        }
        let _ = self.persist_bitmap(false);
        self.detach_disk("detached by the operator", false);
        Ok(())
    }

    /// `rdbd attach`: use the disk again (a replaced one, or the same after its fault was
    /// repaired). The connection starts over, and the handshake resyncs what the disk lacks.
    pub async fn attach_disk(&self) -> Result<(), NodeError> {
        let (disk, role) = {
            let s = self.state();
            (s.disk, s.role)
        };
        if disk != DiskState::Diskless {
            return Err(NodeError::Refused(format!("the disk is attached already ({disk})")));
        }
        if role == Role::Primary {
            // DRBD resyncs a Primary's disk while it serves; rdbd does not make a Primary a
            // sync target.
            return Err(NodeError::Refused(
                "cannot attach while Primary: its disk would be resynced under its clients; make this node \
                 Secondary (or switch over) first"
                    .into(),
            ));
        }
        let mut opened = open_disk(self.me(), self.fencing())?;
        if self.state().disk_failed {
            // Which blocks the failed disk lost is unknown (its metadata may not even say it
            // failed): every one is resynced to it, and it is Inconsistent until then.
            opened.tracking.bitmap.set_all();
            opened.disk = DiskState::Inconsistent;
            if let Some((_, meta)) = opened.tracking.activity.as_mut() {
                meta.update(|sb| {
                    set_disk_flags(sb, DiskState::Inconsistent);
                    sb.set(flags::FULL_SYNC, true);
                })?;
            }
        }
        let size = opened.local.info().size;
        if size != self.device.info_size() {
            return Err(NodeError::Refused(format!(
                "cannot attach: the disk holds {size} bytes of data, the device has {}",
                self.device.info_size()
            )));
        }
        // The old disk's writes followed by the link report to its activity log: end the link
        // before the new log takes over.
        let link = self.state().link.clone();
        if let Some(link) = link {
            link.settle(std::time::Duration::from_secs(5)).await;
            link.close("attaching a disk").await;
        }
        self.device.attach_disk(opened.local, opened.resync, opened.tracking);
        {
            let mut s = self.state();
            s.disk = opened.disk;
            s.disk_error = None;
            s.disk_failed = false;
            s.last_error = None;
        }
        info!(disk = %opened.disk, "disk attached");
        self.renegotiate.notify_one();
        Ok(())
    }
}
