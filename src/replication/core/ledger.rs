//! The Primary's ledger of what it asked of its peer: sequence numbers, who waits for each
//! answer, and which writes are not yet stable on the peer's disk. Pure bookkeeping: the link
//! driver (the daemon's [`crate::replication::peer::PeerLink`], or the simulator) sends the
//! frames and feeds the answers back.
//!
//! A write is followed from its submission until it is stable on the peer (a FlushAck covering
//! it, or the WriteAck of a FUA write) or lost (the peer failed it, or the link died first):
//! the caller keeps the write's activity-log extent until then, and marks a lost write's blocks
//! out of sync. DRBD keeps its AL reference until the peer's barrier ack for the same reason.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;

use rdbd_protocol::repl::{AckMode, Protocol};

use super::bugs::{Bug, Bugs};

/// A byte range `[start, end)`.
pub type Range = (u64, u64);

/// What a request asks of the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// A write of this byte range: followed until stable or lost.
    Write {
        range: Range,
        fua: bool,
    },
    Flush,
    /// A read for a Diskless Primary: answered by a read reply.
    Read,
}

/// The peer's answer to a request, as the ledger takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// WriteAck or RecvAck.
    Written,
    Flushed,
    /// NegAck: the peer could not do it.
    Failed,
}

/// The answer a request asks of the peer under `protocol`: flushes, FUA writes and reads always
/// wait for the peer's disk; other writes as the protocol says (A: none, B: on receipt, C: on
/// its disk).
pub fn ack_for(protocol: Protocol, request: &Request) -> AckMode {
    match request {
        Request::Write { fua: false, .. } => protocol.ack_mode(),
        _ => AckMode::Write,
    }
}

/// What one answer settled.
#[derive(Debug)]
pub struct Settled<W> {
    /// Who waited for this answer, and for what.
    pub waiter: Option<(W, Request)>,
    /// Writes now stable on the peer.
    pub stable: Vec<Range>,
    /// Writes the peer may not have (it failed them): out of sync.
    pub lost: Vec<Range>,
}

/// Everything outstanding on one connection.
#[derive(Debug)]
pub struct Ledger<W> {
    next_seq: u64,
    waiting: BTreeMap<u64, (W, Request)>,
    /// Writes sent and not yet stable on the peer, by sequence number: all of them are lost if
    /// the link dies, since an acknowledged write may still sit in the peer's volatile cache.
    unstable: BTreeMap<u64, Range>,
    /// The flush we sent on our own and that is not answered yet.
    auto_flush: Option<u64>,
    bugs: Bugs,
}

impl<W> Default for Ledger<W> {
    fn default() -> Self {
        Self::new(Bugs::NONE)
    }
}

impl<W> Ledger<W> {
    /// An empty ledger; `bugs` plants known bugs for the simulator (none in the daemon).
    pub fn new(bugs: Bugs) -> Self {
        Self { next_seq: 0, waiting: BTreeMap::new(), unstable: BTreeMap::new(), auto_flush: None, bugs }
    }

    /// Records a request and returns its sequence number. `answered`: the peer will answer it
    /// (and `waiter` is kept until then).
    pub fn submit(&mut self, request: Request, answered: bool, waiter: W) -> u64 {
        let seq = self.take_seq();
        if let Request::Write { range, .. } = request {
            self.unstable.insert(seq, range);
        }
        if answered {
            self.waiting.insert(seq, (waiter, request));
        }
        seq
    }

    /// Starts a flush nobody waits for, unless one is already on its way: its sequence number.
    pub fn start_auto_flush(&mut self) -> Option<u64> {
        if self.auto_flush.is_some() {
            return None;
        }
        let seq = self.take_seq();
        self.auto_flush = Some(seq);
        Some(seq)
    }

    fn take_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// The peer answered request `seq`. A FlushAck makes every write before it stable, the
    /// WriteAck of a FUA write that write; a NegAck loses the write, or for a flush every
    /// write before it. None for an answer the peer may not send (to a request never sent,
    /// answered already, or of another kind; a NegAck answers any): a broken peer, whose
    /// answer changes nothing.
    pub fn answer(&mut self, seq: u64, answer: Answer) -> Option<Settled<W>> {
        let auto_flush = self.auto_flush == Some(seq);
        let waiter = match self.waiting.entry(seq) {
            Entry::Occupied(e) if fits(&e.get().1, answer) => Some(e.remove()),
            Entry::Vacant(_) if auto_flush && fits(&Request::Flush, answer) => None,
            _ => return None,
        };
        let is_flush = auto_flush || matches!(waiter, Some((_, Request::Flush)));
        if auto_flush {
            self.auto_flush = None;
        }
        let fua = matches!(waiter, Some((_, Request::Write { fua: true, .. })));
        let settles = match answer {
            Answer::Flushed => true,
            Answer::Written => fua,
            Answer::Failed => true,
        };
        let taken = if !settles {
            Vec::new()
        } else if is_flush {
            let later = self.unstable.split_off(&seq);
            std::mem::replace(&mut self.unstable, later).into_values().collect()
        } else {
            self.unstable.remove(&seq).into_iter().collect()
        };
        let (stable, lost) = if answer == Answer::Failed { (Vec::new(), taken) } else { (taken, Vec::new()) };
        Some(Settled { waiter, stable, lost })
    }

    /// Takes the waiter of read `seq`, if `seq` is a read we sent.
    pub fn take_read(&mut self, seq: u64) -> Option<W> {
        match self.waiting.get(&seq) {
            Some((_, Request::Read)) => self.waiting.remove(&seq).map(|(w, _)| w),
            _ => None,
        }
    }

    /// The link died: every write not stable is lost (its blocks are out of sync), and every
    /// waiter hears so.
    pub fn fail_all(&mut self) -> (Vec<Range>, Vec<W>) {
        let unstable = std::mem::take(&mut self.unstable);
        let waiting = std::mem::take(&mut self.waiting);
        self.auto_flush = None;
        let lost = if self.bugs.has(Bug::ForgetUnstableOnLinkLoss) {
            Vec::new()
        } else {
            unstable.into_values().collect()
        };
        (lost, waiting.into_values().map(|(w, _)| w).collect())
    }

    /// Writes sent that a peer crash could still lose.
    pub fn unstable_writes(&self) -> usize {
        self.unstable.len()
    }

    /// Nothing is waiting for an answer and every write is stable.
    pub fn is_settled(&self) -> bool {
        self.unstable.is_empty() && self.waiting.is_empty()
    }
}

/// Whether `answer` is one `request` takes: a NegAck answers any.
fn fits(request: &Request, answer: Answer) -> bool {
    matches!(
        (request, answer),
        (_, Answer::Failed) | (Request::Flush, Answer::Flushed) | (Request::Write { .. }, Answer::Written)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(start: u64, fua: bool) -> Request {
        Request::Write { range: (start, start + 4096), fua }
    }

    #[test]
    fn only_answers_to_requests_sent_and_of_their_kind_are_taken() {
        let mut l = Ledger::default();
        let w = l.submit(write(0, false), true, "w");
        let f = l.submit(Request::Flush, true, "f");
        let quiet = l.submit(write(8192, false), false, "protocol A");
        assert!(l.answer(w, Answer::Flushed).is_none(), "a FlushAck for a write");
        assert!(l.answer(f, Answer::Written).is_none(), "a WriteAck for a flush");
        assert!(l.answer(quiet, Answer::Written).is_none(), "nobody asked for this ack");
        assert!(l.answer(f + 100, Answer::Failed).is_none(), "never sent");
        assert_eq!(l.unstable_writes(), 2, "a refused answer changes nothing");
        assert!(l.answer(w, Answer::Written).is_some());
        assert!(l.answer(w, Answer::Written).is_none(), "answered already");
        let auto = l.start_auto_flush().unwrap();
        assert!(l.answer(auto, Answer::Flushed).is_some());
        assert!(l.answer(f, Answer::Flushed).is_some());
    }

    #[test]
    fn a_flush_ack_makes_every_earlier_write_stable_and_no_later_one() {
        let mut l = Ledger::default();
        let a = l.submit(write(0, false), true, "a");
        let _ = l.answer(a, Answer::Written);
        let f = l.submit(Request::Flush, true, "f");
        l.submit(write(8192, false), true, "b");
        let s = l.answer(f, Answer::Flushed).unwrap();
        assert_eq!(s.stable, vec![(0, 4096)]);
        assert_eq!(s.waiter.map(|w| w.0), Some("f"));
        assert_eq!(l.unstable_writes(), 1);
    }

    #[test]
    fn a_fua_write_is_stable_once_written_a_plain_one_is_not() {
        let mut l = Ledger::default();
        let plain = l.submit(write(0, false), true, 1);
        let fua = l.submit(write(4096, true), true, 2);
        assert!(l.answer(plain, Answer::Written).unwrap().stable.is_empty());
        assert_eq!(l.answer(fua, Answer::Written).unwrap().stable, vec![(4096, 8192)]);
        assert_eq!(l.unstable_writes(), 1);
    }

    #[test]
    fn a_failed_flush_loses_every_write_before_it() {
        let mut l = Ledger::default();
        l.submit(write(0, false), false, 1);
        l.submit(write(4096, false), false, 2);
        let f = l.start_auto_flush().unwrap();
        assert_eq!(l.start_auto_flush(), None, "one auto flush at a time");
        let s = l.answer(f, Answer::Failed).unwrap();
        assert_eq!(s.lost, vec![(0, 4096), (4096, 8192)]);
        assert!(s.stable.is_empty() && s.waiter.is_none());
        assert!(l.start_auto_flush().is_some());
    }

    #[test]
    fn a_dead_link_loses_every_unstable_write_and_answers_every_waiter() {
        let mut l = Ledger::default();
        let a = l.submit(write(0, false), true, 1);
        let _ = l.answer(a, Answer::Written);
        l.submit(Request::Read, true, 2);
        let (lost, waiters) = l.fail_all();
        assert_eq!(lost, vec![(0, 4096)], "acknowledged but not flushed on the peer");
        assert_eq!(waiters, vec![2]);
        assert!(l.is_settled());
    }

    #[test]
    fn the_planted_bug_forgets_unstable_writes() {
        let mut l = Ledger::new(Bugs::only(Bug::ForgetUnstableOnLinkLoss));
        l.submit(write(0, false), false, ());
        assert!(l.fail_all().0.is_empty());
    }

    #[test]
    fn only_reads_are_taken_as_reads() {
        let mut l = Ledger::default();
        let w = l.submit(write(0, false), true, 1);
        let r = l.submit(Request::Read, true, 2);
        assert_eq!(l.take_read(w), None);
        assert_eq!(l.take_read(r), Some(2));
    }
}
