//! The peer's side of replication and the sync target: requests reach the disk in the order
//! [`super::apply_order`] keeps (the daemon's applier keeps the same) and are answered once done — a flush, a FUA write and resync data only once the disk has flushed
//! them, since the Primary takes those answers as "stable here".

use std::collections::{BTreeMap, VecDeque};

use super::apply_order::{ApplyOrder, Order};
use super::io::{Effect, PeerMessage};
use super::ledger::Range;
use super::node::{IoPurpose, NodeCore};
use super::peer_answers::Asked;

#[derive(Debug, Clone, Copy)]
enum Running {
    Write {
        asked: Asked,
        fua: bool,
        flushing: bool,
    },
    Flush {
        asked: Asked,
    },
    /// Resync data for request `key` of the target's resync `id` (acknowledged once a later
    /// flush of the target's covers it).
    Resync {
        id: u64,
        key: u64,
    },
    /// A verify's read (either side's); what it compares is in `verifying`.
    Verify,
}

/// A request of the peer's, with the connection it came on (answered only on that one).
type Received<P> = (u64, PeerMessage<P>);

/// Requests received from the peer and not yet answered.
pub(super) struct Applier<P> {
    /// Received and not yet admitted to the order: the front waits for the sync target's
    /// metadata, a verify's claim, or (the end of a resync) for everything before it.
    arrived: VecDeque<Received<P>>,
    /// Admitted, in the order the daemon's applier keeps too.
    order: ApplyOrder<Received<P>>,
    /// Handed out by the order and not yet started (reused).
    ready: Vec<(u64, Received<P>)>,
    /// In flight on the disk, by arrival index, with the connection they came on.
    running: BTreeMap<u64, (u64, Running)>,
    /// Counts connections: answers for an earlier one are not sent.
    connection: u64,
    /// Resync data is written once this metadata image (the disk marked Inconsistent) is durable.
    target_ready_at: Option<u64>,
    /// Verify reads in flight by arrival index: the range, and the peer's data to compare with
    /// (none: this side answers a request).
    verifying: BTreeMap<u64, (Range, Option<P>)>,
}

impl<P> Default for Applier<P> {
    fn default() -> Self {
        Self {
            arrived: VecDeque::new(),
            order: ApplyOrder::default(),
            ready: Vec::new(),
            running: BTreeMap::new(),
            connection: 0,
            target_ready_at: None,
            verifying: BTreeMap::new(),
        }
    }
}

impl<P> Applier<P> {
    pub(super) fn receive(&mut self, message: PeerMessage<P>) {
        self.arrived.push_back((self.connection, message));
    }

    pub(super) fn is_idle(&self) -> bool {
        self.arrived.is_empty() && self.order.waiting() == 0 && self.running.is_empty()
    }

    pub(super) fn target_ready_at(&mut self, image: u64) {
        self.target_ready_at = Some(image);
    }

    pub(super) fn ready_at(&self) -> Option<u64> {
        self.target_ready_at
    }

    /// The connection ended: the peer's writes, TRIMs and flushes received still reach the disk,
    /// in order and without an answer (the peer marks them out of sync all the same), since this
    /// node may be the Primary now, of a client told they are done (seed 60293: a new Primary
    /// dropped its former Primary's last write, queued behind a slow one, and its client's
    /// FLUSH then counted it durable). Resync and verify work is dropped. Returns the ranges of
    /// dropped verify requests, whose claims the caller gives back.
    pub(super) fn link_down(&mut self) -> Vec<Range> {
        let kept = |(_, m): &Received<P>| {
            matches!(m, PeerMessage::Write { .. } | PeerMessage::Trim { .. } | PeerMessage::Flush { .. })
        };
        self.arrived.retain(kept);
        self.connection += 1;
        self.target_ready_at = None;
        self.order
            .drop_waiting_where(|m| !kept(m))
            .into_iter()
            .filter_map(|(_, m)| match m {
                PeerMessage::VerifyRequest { offset, len } => Some((offset, offset + len)),
                _ => None,
            })
            .collect()
    }

    /// Whether a client write or TRIM the peer sent is not yet done here (received, waiting or
    /// running): a client FLUSH on this node must cover it, since the former Primary's client
    /// may have been told it is done (protocols A and B).
    pub(super) fn holds_peer_writes(&self) -> bool {
        let is_write = |m: &PeerMessage<P>| matches!(m, PeerMessage::Write { .. } | PeerMessage::Trim { .. });
        self.arrived.iter().any(|(_, m)| is_write(m))
            || self.order.waiting_requests().any(|(_, m)| is_write(m))
            || self.running.values().any(|(_, r)| matches!(r, Running::Write { .. }))
    }

    /// Whether a write received from the peer and not yet done (received, waiting or running)
    /// overlaps `range`.
    pub(super) fn overlaps_unfinished(&self, (start, end): Range) -> bool {
        self.order.overlaps_unfinished((start, end))
            || self.arrived.iter().any(|(_, m)| match order_of(m) {
                Order::Range(s, e) => s < end && start < e,
                _ => false,
            })
    }
}

/// How a request from the peer is ordered on this disk.
fn order_of<P>(message: &PeerMessage<P>) -> Order {
    match *message {
        PeerMessage::Write { offset, len, .. }
        | PeerMessage::Trim { offset, len, .. }
        | PeerMessage::ResyncData { offset, len, .. }
        | PeerMessage::VerifyRequest { offset, len }
        | PeerMessage::VerifyReply { offset, len, .. } => Order::Range(offset, offset + len),
        // After the data that came for the same request: it is written by then.
        PeerMessage::ResyncInSync { offset, len } => Order::Range(offset, offset + len),
        PeerMessage::Flush { .. } => Order::Barrier,
        _ => Order::Unordered,
    }
}

impl<P: Clone + PartialEq> NodeCore<P> {
    pub(super) fn pump_applier(&mut self) {
        self.admit_arrived();
        let mut ready = std::mem::take(&mut self.applier.ready);
        self.applier.order.start_ready(|index, message| ready.push((index, message)));
        for (index, message) in ready.drain(..) {
            self.start_applying(index, message);
        }
        self.applier.ready = ready;
    }

    /// Moves what may go on from the front of the arrived requests into the order.
    fn admit_arrived(&mut self) {
        while let Some((_, front)) = self.applier.arrived.front() {
            match *front {
                PeerMessage::ResyncData { .. } | PeerMessage::ResyncInSync { .. } if !self.target_ready() => {
                    return
                }
                PeerMessage::ResyncDone { .. } => {
                    if self.applier.order.waiting() > 0 || !self.applier.running.is_empty() {
                        return;
                    }
                    let Some((_, PeerMessage::ResyncDone { gens })) = self.applier.arrived.pop_front() else {
                        unreachable!("matched at the front")
                    };
                    if !self.target_done() {
                        // As the daemon: the source may end only what this side has whole.
                        self.effects
                            .push_back(Effect::DropLink { reason: "resync ended with blocks missing" });
                        return;
                    }
                    self.finish_as_target(gens);
                    continue;
                }
                // The responder reads with the range claimed against its own writes (held from
                // here until the read is done); the requester's writes have waited since it asked.
                PeerMessage::VerifyRequest { offset, len } if !self.writes.claim((offset, offset + len)) => {
                    return;
                }
                _ => {}
            }
            let received = self.applier.arrived.pop_front().expect("front");
            self.applier.order.push(order_of(&received.1), received);
        }
    }

    fn start_applying(&mut self, position: u64, (connection, message): Received<P>) {
        let running = match message {
            PeerMessage::Write { seq, offset, len, data, fua, ack } => {
                let io = self.start_io(IoPurpose::Apply(position));
                self.effects.push_back(Effect::Write { io, offset, len, data });
                Running::Write { asked: Asked::Write { seq, ack }, fua, flushing: false }
            }
            PeerMessage::Trim { seq, offset, len, ack } => {
                let io = self.start_io(IoPurpose::Apply(position));
                self.effects.push_back(Effect::Discard { io, offset, len });
                Running::Write { asked: Asked::Write { seq, ack }, fua: false, flushing: false }
            }
            PeerMessage::ResyncData { offset, len, data } => {
                let Some((id, key)) = self.target_data(offset, len) else {
                    self.applier.order.done(position);
                    self.effects.push_back(Effect::DropLink { reason: "resync data nobody asked for" });
                    return;
                };
                let io = self.start_io(IoPurpose::Apply(position));
                self.effects.push_back(Effect::Write { io, offset, len, data });
                Running::Resync { id, key }
            }
            PeerMessage::ResyncInSync { offset, len } => {
                self.applier.order.done(position);
                if !self.target_in_sync(offset, len) {
                    self.effects.push_back(Effect::DropLink { reason: "in-sync answer nobody asked for" });
                }
                return;
            }
            PeerMessage::Flush { seq } => {
                let io = self.start_io(IoPurpose::Apply(position));
                self.effects.push_back(Effect::Flush { io });
                Running::Flush { asked: Asked::Flush { seq } }
            }
            PeerMessage::VerifyRequest { offset, len } => {
                self.start_verify_read(position, (offset, offset + len), None)
            }
            PeerMessage::VerifyReply { offset, len, data } => {
                let range = (offset, offset + len);
                if !self.verify_reply_reading(range) {
                    self.applier.order.done(position);
                    return;
                }
                self.start_verify_read(position, range, Some(data))
            }
            _ => {
                self.applier.order.done(position);
                return;
            }
        };
        self.applier.running.insert(position, (connection, running));
    }

    pub(super) fn apply_done(&mut self, position: u64, ok: bool) {
        let Some((connection, running)) = self.applier.running.remove(&position) else { return };
        let current = connection == self.applier.connection;
        match running {
            Running::Write { asked, fua: true, flushing: false } if ok => {
                self.flush_for(position, connection, Running::Write { asked, fua: true, flushing: true });
            }
            Running::Write { asked, .. } | Running::Flush { asked } => {
                if let Some(answer) = asked.on_done(ok).filter(|_| current) {
                    self.send(PeerMessage::Ack { seq: asked.seq(), answer });
                }
            }

            // Verify reads complete through `verify_applied`.
            Running::Verify => {}
            Running::Resync { id, key } => self.target_written(id, key, ok),
        }
        // A FUA write being flushed holds its range until the flush is done.
        if !self.applier.running.contains_key(&position) {
            self.applier.order.done(position);
        }
    }

    fn start_verify_read(&mut self, position: u64, range: Range, theirs: Option<P>) -> Running {
        let io = self.start_io(IoPurpose::VerifyRead(position));
        self.effects.push_back(Effect::Read { io, offset: range.0, len: range.1 - range.0 });
        self.applier.verifying.insert(position, (range, theirs));
        Running::Verify
    }

    pub(super) fn verify_applied(&mut self, position: u64, ok: bool, data: Option<P>) {
        let Some((connection, _)) = self.applier.running.remove(&position) else { return };
        self.applier.order.done(position);
        let Some((range, theirs)) = self.applier.verifying.remove(&position) else { return };
        let current = connection == self.applier.connection;
        self.verify_read_done(range, theirs, current, data.filter(|_| ok));
    }

    /// Flushes the disk for the request at `position`, which is answered when the flush is done.
    fn flush_for(&mut self, position: u64, connection: u64, running: Running) {
        let io = self.start_io(IoPurpose::Apply(position));
        self.effects.push_back(Effect::Flush { io });
        self.applier.running.insert(position, (connection, running));
    }
}
