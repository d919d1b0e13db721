//! The order in which the peer's requests reach this node's disk: one rule, used by the daemon's
//! applier and by the core the simulator drives, so that the simulation proves the order the
//! daemon keeps.
//!
//! - A request that writes a range (or reads it in write order: verify, a Diskless Primary's
//!   read) starts once no earlier request that overlaps it is still waiting or running, and no
//!   earlier barrier is still waiting. Requests to other ranges overtake it: the peer's acks
//!   say which writes are done, in whatever order they finish.
//! - A barrier (the peer's FLUSH) starts once every earlier ranged request is complete, so the
//!   flush covers all of them; later requests wait until it has started.
//! - An unordered request (the sync target's own flush, a checksum read) starts at once.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// How one request is ordered against the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Writes (or reads in write order) the bytes `[start, end)`.
    Range(u64, u64),
    Barrier,
    Unordered,
}

/// Requests in arrival order, each waiting until [`ApplyOrder::start_ready`] hands it out and
/// then running until [`ApplyOrder::done`].
#[derive(Debug)]
pub struct ApplyOrder<T> {
    /// Not started, in arrival order, with their arrival index.
    waiting: VecDeque<(u64, Order, T)>,
    /// Ranges started and not done, by arrival index.
    running: BTreeMap<u64, (u64, u64)>,
    /// Arrival indices of ranged requests not done (waiting or running): a barrier waits for
    /// every one older than itself.
    open: BTreeSet<u64>,
    next_index: u64,
}

impl<T> Default for ApplyOrder<T> {
    fn default() -> Self {
        Self { waiting: VecDeque::new(), running: BTreeMap::new(), open: BTreeSet::new(), next_index: 0 }
    }
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

impl<T> ApplyOrder<T> {
    /// Queues a request behind everything received before it; returns its arrival index, which
    /// [`ApplyOrder::done`] takes.
    pub fn push(&mut self, order: Order, request: T) -> u64 {
        let index = self.next_index;
        self.next_index += 1;
        if let Order::Range(..) = order {
            self.open.insert(index);
        }
        self.waiting.push_back((index, order, request));
        index
    }

    /// Hands `start` every waiting request that nothing earlier holds back, oldest first.
    pub fn start_ready(&mut self, mut start: impl FnMut(u64, T)) {
        let mut i = 0;
        while i < self.waiting.len() {
            let (index, order, _) = self.waiting[i];
            let blocked = match order {
                Order::Unordered => false,
                Order::Barrier => self.open.first().is_some_and(|&first| first < index),
                Order::Range(start, end) => {
                    let range = (start, end);
                    self.running.values().any(|&r| overlaps(r, range))
                        || self.waiting.iter().take(i).any(|&(_, o, _)| match o {
                            Order::Barrier => true,
                            Order::Range(s, e) => overlaps((s, e), range),
                            Order::Unordered => false,
                        })
                }
            };
            if blocked {
                i += 1;
                continue;
            }
            let (index, order, request) = self.waiting.remove(i).expect("index in range");
            if let Order::Range(start, end) = order {
                self.running.insert(index, (start, end));
            }
            start(index, request);
        }
    }

    /// The request with this arrival index is complete (a late or repeated call is harmless).
    pub fn done(&mut self, index: u64) {
        self.running.remove(&index);
        self.open.remove(&index);
    }

    /// Whether a ranged request not yet done overlaps `range` (running or waiting).
    pub fn overlaps_running(&self, range: (u64, u64)) -> bool {
        self.running.values().any(|&r| overlaps(r, range))
    }

    /// Whether a ranged request not yet done overlaps `range`, running or still waiting: what
    /// a read of this node's own (a sync source's) must let land first.
    pub fn overlaps_unfinished(&self, range: (u64, u64)) -> bool {
        self.overlaps_running(range)
            || self
                .waiting
                .iter()
                .any(|&(_, order, _)| matches!(order, Order::Range(s, e) if overlaps((s, e), range)))
    }

    /// Nothing waits and nothing ranged runs.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.open.is_empty()
    }

    /// The requests not yet started, oldest first.
    pub fn waiting_requests(&self) -> impl Iterator<Item = &T> {
        self.waiting.iter().map(|(_, _, request)| request)
    }

    /// Requests not yet started.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Forgets the requests not yet started that `forget` picks (the connection they came on
    /// ended), and returns them; the others keep their places. Running ones still end with
    /// [`ApplyOrder::done`].
    pub fn drop_waiting_where(&mut self, mut forget: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut dropped = Vec::new();
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for (index, order, request) in self.waiting.drain(..) {
            if forget(&request) {
                self.open.remove(&index);
                dropped.push(request);
            } else {
                kept.push_back((index, order, request));
            }
        }
        self.waiting = kept;
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn started(order: &mut ApplyOrder<&'static str>) -> Vec<&'static str> {
        let mut out = Vec::new();
        order.start_ready(|_, r| out.push(r));
        out
    }

    #[test]
    fn overlapping_writes_wait_and_others_overtake() {
        let mut o = ApplyOrder::default();
        let a = o.push(Order::Range(0, 8), "a");
        o.push(Order::Range(4, 12), "b");
        o.push(Order::Range(100, 108), "c");
        assert_eq!(started(&mut o), ["a", "c"]);
        o.done(a);
        assert_eq!(started(&mut o), ["b"]);
        assert!(!o.is_idle());
    }

    #[test]
    fn a_barrier_waits_for_every_earlier_write_and_holds_later_ones() {
        let mut o = ApplyOrder::default();
        let a = o.push(Order::Range(0, 8), "a");
        o.push(Order::Barrier, "flush");
        o.push(Order::Range(100, 108), "later");
        o.push(Order::Unordered, "free");
        assert_eq!(started(&mut o), ["a", "free"]);
        o.done(a);
        assert_eq!(started(&mut o), ["flush", "later"]);
    }

    #[test]
    fn dropping_the_waiting_frees_what_they_held() {
        let mut o = ApplyOrder::default();
        let a = o.push(Order::Range(0, 8), "a");
        o.push(Order::Range(0, 8), "b");
        assert_eq!(started(&mut o), ["a"]);
        assert_eq!(o.drop_waiting_where(|_| true), ["b"]);
        o.push(Order::Barrier, "flush");
        assert!(started(&mut o).is_empty(), "the running write still holds the barrier");
        o.done(a);
        assert_eq!(started(&mut o), ["flush"]);
        assert!(o.is_idle());
    }

    /// One step of a random schedule: a new request, or the completion of a running one.
    #[derive(Debug, Clone)]
    enum Step {
        Push(Order),
        Finish(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0u64..16, 1u64..4).prop_map(|(s, l)| Step::Push(Order::Range(s, s + l))),
            1 => Just(Step::Push(Order::Barrier)),
            1 => Just(Step::Push(Order::Unordered)),
            4 => any::<usize>().prop_map(Step::Finish),
        ]
    }

    proptest! {
        /// Whatever the arrival and completion order: overlapping requests run one at a time in
        /// arrival order, a barrier starts only after every earlier ranged request is done and
        /// before any later one starts, and once everything is done nothing is left waiting.
        #[test]
        fn the_order_holds_under_any_schedule(steps in proptest::collection::vec(step(), 1..80)) {
            let mut o: ApplyOrder<(u64, Order)> = ApplyOrder::default();
            let mut orders = Vec::new();
            let mut running: Vec<(u64, Order)> = Vec::new();
            let mut finished = BTreeSet::new();
            let mut started_at = BTreeMap::new();
            let mut clock = 0u64;
            let mut check = |o: &mut ApplyOrder<(u64, Order)>, running: &mut Vec<(u64, Order)>,
                             finished: &BTreeSet<u64>, started_at: &mut BTreeMap<u64, u64>,
                             orders: &Vec<Order>| {
                o.start_ready(|index, (i, order)| {
                    assert_eq!(index, i);
                    clock += 1;
                    started_at.insert(index, clock);
                    for (j, earlier) in orders.iter().enumerate().take(index as usize) {
                        let j = j as u64;
                        match (earlier, order) {
                            (Order::Range(a, b), Order::Range(c, d)) if overlaps((*a, *b), (c, d)) => {
                                assert!(finished.contains(&j), "{index} overlaps {j}, not done")
                            }
                            (Order::Range(..), Order::Barrier) => {
                                assert!(finished.contains(&j), "barrier {index} before {j} done")
                            }
                            (Order::Barrier, Order::Range(..) | Order::Barrier) => {
                                assert!(started_at.contains_key(&j), "{index} overtook barrier {j}")
                            }
                            _ => {}
                        }
                    }
                    running.push((index, order));
                });
            };
            for s in steps {
                match s {
                    Step::Push(order) => {
                        let index = orders.len() as u64;
                        orders.push(order);
                        prop_assert_eq!(o.push(order, (index, order)), index);
                    }
                    Step::Finish(k) if !running.is_empty() => {
                        let (index, _) = running.remove(k % running.len());
                        finished.insert(index);
                        o.done(index);
                    }
                    Step::Finish(_) => {}
                }
                check(&mut o, &mut running, &finished, &mut started_at, &orders);
            }
            while let Some((index, _)) = running.pop() {
                finished.insert(index);
                o.done(index);
                check(&mut o, &mut running, &finished, &mut started_at, &orders);
            }
            prop_assert!(o.is_idle());
            prop_assert_eq!(finished.len(), orders.len());
        }
    }
}
