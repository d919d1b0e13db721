//! The sync source's bookkeeping, without I/O: the target's requests in the order they came (the
//! target asks in disk order), which of them are being read, and when the resync is complete.
//! The daemon's source (`source.rs`) and the core's (`core/resync.rs`) both run it, so the
//! simulator proves the daemon's rule.
//!
//! A request is read with its range claimed against client writes (the driver claims it), and
//! the claim is released only once the answer is queued on the link: a client write to that range
//! then follows the resync data on the link, in the order the local disk saw the two.

use std::collections::VecDeque;

use slab::Slab;

/// Bytes `start..end` of the device.
pub type Range = (u64, u64);

/// The requests of one resync, each with what the driver keeps of it (`R`: the target's
/// digests of a checksum request, or nothing).
#[derive(Debug)]
pub struct SourceRequests<R> {
    /// Not read yet, in arrival order.
    pending: VecDeque<(Range, R)>,
    /// The front's range was claimed while it waited (a client write held it before).
    front_claimed: bool,
    /// Being read, by the tag the driver's read carries.
    reading: Slab<(Range, R)>,
    /// Reads at once, at most.
    window: usize,
}

impl<R> SourceRequests<R> {
    /// No request yet; at most `window` reads at once.
    pub fn new(window: usize) -> Self {
        Self { pending: VecDeque::new(), front_claimed: false, reading: Slab::new(), window: window.max(1) }
    }

    /// The target asks for `range`.
    pub fn push(&mut self, range: Range, request: R) {
        self.pending.push_back((range, request));
    }

    /// The range the next read waits for, when the window has room and it is not claimed yet.
    pub fn wants_claim(&self) -> Option<Range> {
        let (range, _) = self.pending.front()?;
        (!self.front_claimed && self.reading.len() < self.window).then_some(*range)
    }

    /// The driver got the claim [`SourceRequests::wants_claim`] asked for.
    pub fn front_claimed(&mut self) {
        self.front_claimed = !self.pending.is_empty();
    }

    /// The next request to read: the front, when the window has room and its range is claimed
    /// (`claim` is asked unless the claim came while it waited). Returns the tag the read is
    /// to carry and the range.
    pub fn next_read(&mut self, claim: impl FnOnce(Range) -> bool) -> Option<(usize, Range)> {
        let &(range, _) = self.pending.front()?;
        if self.reading.len() >= self.window {
            return None;
        }
        if !std::mem::take(&mut self.front_claimed) && !claim(range) {
            return None;
        }
        let request = self.pending.pop_front().expect("front exists");
        Some((self.reading.insert(request), range))
    }

    /// The read with `tag` is done: its range and request. The driver answers it, then releases
    /// the range. `None` for a tag not being read.
    pub fn read_done(&mut self, tag: usize) -> Option<(Range, R)> {
        self.reading.try_remove(tag)
    }

    /// The resync is complete: nothing left to read, nothing being read, and no block out of
    /// sync. Bits clear only on the target's acknowledgements (of data on its disk), so a clean
    /// bitmap with nothing in flight here means every block is durable there.
    pub fn complete(&self, dirty_blocks: u64) -> bool {
        self.pending.is_empty() && self.reading.is_empty() && dirty_blocks == 0
    }

    /// Requests waiting and being read (for status and logs).
    pub fn counts(&self) -> (usize, usize) {
        (self.pending.len(), self.reading.len())
    }

    /// The ranges this resync holds claimed: the reads in flight and a front that got its
    /// claim while waiting. The driver releases them when the resync ends before they are
    /// answered, or client writes to them would wait forever.
    pub fn claimed(&self) -> Vec<Range> {
        let front = self.pending.front().filter(|_| self.front_claimed).map(|(r, _)| *r);
        self.reading.iter().map(|(_, (r, _))| *r).chain(front).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_start_in_arrival_order_within_the_window_once_claimed() {
        let mut requests = SourceRequests::new(2);
        for i in 0..4u64 {
            requests.push((i * 10, i * 10 + 10), i);
        }
        assert_eq!(requests.next_read(|_| false), None, "a range a client write holds waits");
        assert_eq!(requests.wants_claim(), Some((0, 10)));
        requests.front_claimed();
        let (a, range) = requests.next_read(|_| panic!("claimed while waiting")).unwrap();
        assert_eq!(range, (0, 10));
        let (b, range) = requests.next_read(|_| true).unwrap();
        assert_eq!(range, (10, 20));
        assert_eq!(requests.next_read(|_| true), None, "the window is full");
        assert_eq!(requests.wants_claim(), None, "no claim while the window is full");
        assert_eq!(requests.claimed(), vec![(0, 10), (10, 20)]);
        assert_eq!(requests.read_done(b), Some(((10, 20), 1)));
        assert_eq!(requests.read_done(b), None, "done once");
        let (_, range) = requests.next_read(|_| true).unwrap();
        assert_eq!(range, (20, 30));
        assert_eq!(requests.read_done(a), Some(((0, 10), 0)));
    }

    #[test]
    fn complete_only_with_nothing_pending_nothing_read_and_a_clean_bitmap() {
        let mut requests = SourceRequests::new(8);
        assert!(requests.complete(0));
        assert!(!requests.complete(1), "blocks the target has not acknowledged");
        requests.push((0, 4096), ());
        assert!(!requests.complete(0), "a request not read yet");
        let (tag, _) = requests.next_read(|_| true).unwrap();
        assert!(!requests.complete(0), "a read in flight");
        requests.read_done(tag);
        assert!(requests.complete(0));
    }

    #[test]
    fn a_front_claimed_while_waiting_is_reported_for_release() {
        let mut requests = SourceRequests::new(1);
        requests.push((0, 4096), ());
        requests.push((4096, 8192), ());
        requests.front_claimed();
        assert_eq!(requests.claimed(), vec![(0, 4096)]);
        let (tag, _) = requests.next_read(|_| panic!("claimed while waiting")).unwrap();
        assert_eq!(requests.claimed(), vec![(0, 4096)], "now as a read in flight");
        requests.read_done(tag);
        assert!(requests.claimed().is_empty());
    }
}
