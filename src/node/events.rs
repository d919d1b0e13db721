//! How the replication tasks report to the node: the peer's state changes, and the end of a
//! resync (the generation identifiers and disk states that change with it).

use std::sync::Arc;

use rdbd_protocol::repl::State;
use tracing::info;

use super::session::local_state;
use super::Node;
use crate::metadata::generations::{Generations, PRIMARY_BIT};
use crate::replication::apply::ApplyEvents;
use crate::replication::disk_health::DiskError;
use crate::replication::resync::source::SourceEvents;
use crate::replication::states::{DiskState, ReplState, Role};
use crate::replication::verify::VerifyReport;

pub struct NodeEvents(pub Arc<Node>);

impl NodeEvents {
    fn peer_state(&self, role: Role, disk: DiskState) {
        let sole_copy = {
            let mut s = self.0.state();
            s.peer_role = role;
            s.peer_disk = disk;
            if s.repl == ReplState::SyncSource && s.peer_disk == DiskState::UpToDate {
                s.repl = ReplState::Established;
                info!("resync finished: the peer is UpToDate");
            }
            s.peer_role == Role::Primary && !s.peer_disk.has_disk() && s.disk == DiskState::UpToDate
        };
        if sole_copy {
            self.0.hold_sole_copy();
        }
    }
}

impl ApplyEvents for NodeEvents {
    fn verify_answered(&mut self, offset: u64, len: u32) {
        self.0.verify_answered(offset, len);
    }

    fn out_of_sync(&mut self, offset: u64, len: u32) {
        self.0.verify_out_of_sync(offset, len);
    }

    fn verify_done(&mut self, checked_bytes: u64, out_of_sync_blocks: u64) {
        let report = VerifyReport { checked_bytes, out_of_sync_blocks, ranges: Vec::new() };
        self.0.verify_finished(Some(&report));
    }

    fn peer_state(&mut self, role: Role, disk: DiskState) {
        NodeEvents::peer_state(self, role, disk);
    }

    fn disk_failed(&mut self, error: DiskError) {
        self.0.on_disk_error(error);
    }

    fn resync_finished(&mut self, source: &State, bytes: u64) -> Result<(Role, DiskState), String> {
        let node = &self.0;
        // The source's final State is sent after it closed the resync: adopt its set as it is
        // (SPEC §6), so both nodes hold the same generations.
        let g = source.generations;
        let gens = Generations { current: g.current & !PRIMARY_BIT, bitmap: 0, history: g.history };
        node.persist_bitmap(false).map_err(|e| e.to_string())?;
        node.persist(|sb| {
            sb.generations = gens;
            super::set_disk_flags(sb, DiskState::UpToDate);
            sb.set(crate::metadata::superblock::flags::CRASHED_PRIMARY, false);
            sb.set(crate::metadata::superblock::flags::FULL_SYNC, false);
        })
        .map_err(|e| e.to_string())?;
        let mut s = node.state();
        s.disk = DiskState::UpToDate;
        s.peer_disk = DiskState::UpToDate;
        s.repl = ReplState::Established;
        s.last_resync_bytes = Some(bytes);
        s.resyncs_completed += 1;
        Ok((s.role, DiskState::UpToDate))
    }
}

impl SourceEvents for NodeEvents {
    fn verify_started(&mut self, total: u64) {
        self.0.verify_started(total, true);
    }

    fn verify_progress(&mut self, report: &VerifyReport) {
        self.0.verify_progress(report);
    }

    fn verify_finished(&mut self, report: &VerifyReport) {
        self.0.verify_progress(report);
        self.0.verify_finished(Some(report));
    }

    fn peer_state(&mut self, role: Role, disk: DiskState) {
        NodeEvents::peer_state(self, role, disk);
    }

    fn resync_finished(&mut self, bytes: u64) -> Result<State, String> {
        let node = &self.0;
        let gens = node.generations().finish_resync_as_source();
        node.persist_bitmap(false).map_err(|e| e.to_string())?;
        node.persist(|sb| {
            sb.generations = gens;
            sb.set(crate::metadata::superblock::flags::CRASHED_PRIMARY, false);
        })
        .map_err(|e| e.to_string())?;
        let mut s = node.state();
        s.last_resync_bytes = Some(bytes);
        s.resyncs_completed += 1;
        drop(s);
        Ok(local_state(node))
    }
}
