//! Online verify on the node: the `verify` verb, what a running verify has found (for status
//! and events), and how its end is recorded. The comparison itself runs on the connection's
//! sender (`replication::resync::source`); the receiver answers and learns the results from the
//! sender's OutOfSync and VerifyDone messages.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use std::sync::Arc;

use super::handlers::HandlerEvent;
use super::{Node, NodeError};
use crate::replication::states::{ConnState, DiskState, ReplState};
use crate::replication::verify::{record_range, VerifyReport};

/// A verify in progress on this node.
#[derive(Debug, Clone)]
pub(super) struct RunningVerify {
    /// Bytes to compare in all.
    pub total: u64,
    pub report: VerifyReport,
    pub started: Instant,
}

/// The last verify that ended, as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VerifyResult {
    /// It compared everything (false: the connection ended first).
    pub completed: bool,
    pub checked_bytes: u64,
    pub out_of_sync_blocks: u64,
    /// The first differing runs, as (offset, length) in bytes.
    pub out_of_sync_ranges: Vec<(u64, u64)>,
    pub seconds: f64,
}

impl RunningVerify {
    fn end(&self, completed: bool) -> VerifyResult {
        VerifyResult {
            completed,
            checked_bytes: self.report.checked_bytes,
            out_of_sync_blocks: self.report.out_of_sync_blocks,
            out_of_sync_ranges: self.report.ranges.clone(),
            seconds: self.started.elapsed().as_secs_f64(),
        }
    }
}

impl Node {
    /// `rdbd verify [--start OFFSET]`: compares both replicas by digests while in use. Refused
    /// unless connected, in sync and both disks UpToDate.
    pub fn verify(&self, start: u64) -> Result<(), NodeError> {
        {
            let s = self.state();
            if s.conn != ConnState::Connected {
                return Err(NodeError::Refused(format!("verify needs the peer connected (now {})", s.conn)));
            }
            if s.repl != ReplState::Established {
                return Err(NodeError::Refused(format!(
                    "verify: a resync or verify is running ({})",
                    s.repl
                )));
            }
            if s.disk != DiskState::UpToDate || s.peer_disk != DiskState::UpToDate {
                return Err(NodeError::Refused(format!(
                    "verify needs both disks UpToDate (here {}, peer {})",
                    s.disk, s.peer_disk
                )));
            }
        }
        if start >= self.device.info_size() {
            return Err(NodeError::Refused(format!(
                "verify --start {start} is past the end of the device ({} bytes)",
                self.device.info_size()
            )));
        }
        let sent =
            self.verify_starts.lock().expect("verify lock").as_ref().is_some_and(|tx| tx.send(start).is_ok());
        if !sent {
            return Err(NodeError::Refused("verify: the connection is being set up; try again".into()));
        }
        info!(start, "online verify requested");
        Ok(())
    }

    /// A verify began on this node (as the side that drives it, or answering the peer's).
    pub(super) fn verify_started(&self, total: u64, driving: bool) {
        let mut s = self.state();
        s.verify = Some(RunningVerify { total, report: VerifyReport::default(), started: Instant::now() });
        s.repl = if driving { ReplState::VerifyS } else { ReplState::VerifyT };
        info!(bytes = total, "online verify started");
    }

    /// What the driving side has found so far.
    pub(super) fn verify_progress(&self, report: &VerifyReport) {
        if let Some(v) = self.state().verify.as_mut() {
            v.report = report.clone();
        }
    }

    /// The receiving side answered a verify request for `len` bytes.
    pub(super) fn verify_answered(&self, offset: u64, len: u32) {
        let starting = self.state().verify.is_none();
        if starting {
            self.verify_started(self.device.info_size() - offset, false);
        }
        if let Some(v) = self.state().verify.as_mut() {
            v.report.checked_bytes += u64::from(len);
        }
    }

    /// The peer's verify found these bytes different: marked here too.
    pub(super) fn verify_out_of_sync(&self, offset: u64, len: u32) {
        self.device.mark_out_of_sync((offset, offset + u64::from(len)));
        let block = u64::from(self.device.bitmap_block());
        if let Some(v) = self.state().verify.as_mut() {
            v.report.out_of_sync_blocks += u64::from(len).div_ceil(block);
            record_range(&mut v.report.ranges, offset, u64::from(len));
        }
    }

    /// The verify is over (`report`: the driving side's final numbers). Records the result,
    /// writes the marked blocks to the metadata and runs the out-of-sync handler if blocks differ.
    pub(super) fn verify_finished(self: &Arc<Self>, report: Option<&VerifyReport>) {
        let result = {
            let mut s = self.state();
            let Some(mut running) = s.verify.take() else { return };
            if let Some(report) = report {
                running.report.checked_bytes = report.checked_bytes;
                running.report.out_of_sync_blocks = report.out_of_sync_blocks;
            }
            if s.repl == ReplState::VerifyS || s.repl == ReplState::VerifyT {
                s.repl = ReplState::Established;
            }
            let result = running.end(true);
            s.last_verify = Some(result.clone());
            s.verifies_ended += 1;
            result
        };
        if let Err(e) = self.persist_bitmap(false) {
            warn!("cannot write the blocks verify marked to the metadata: {e}");
        }
        if result.out_of_sync_blocks == 0 {
            info!(bytes = result.checked_bytes, "online verify found no blocks out of sync");
            return;
        }
        warn!(
            blocks = result.out_of_sync_blocks,
            bytes = result.checked_bytes,
            "online verify found blocks out of sync; they are marked for the next resync"
        );
        let blocks = result.out_of_sync_blocks.to_string();
        self.spawn_handler(HandlerEvent::OutOfSync, vec![("RDBD_OUT_OF_SYNC_BLOCKS", blocks)]);
    }

    /// The connection ended while a verify ran: it is recorded as interrupted.
    pub(super) fn verify_interrupted(&self) {
        let mut s = self.state();
        if let Some(running) = s.verify.take() {
            warn!("online verify interrupted: the connection ended");
            s.last_verify = Some(running.end(false));
            s.verifies_ended += 1;
        }
    }
}
