//! The source's side of "application I/O keeps priority" (DRBD's `c-min-rate`): during a step
//! in which the application did I/O on this node, the resync sends at most `c-min-rate` worth of
//! data; in a step without application I/O it is not held back at all. So an idle device
//! resyncs as fast as the disks and the link allow, and a busy one still makes progress at the
//! floor. Pure code: the caller tells each step whether the application was busy.

use super::controller::per_step;

#[derive(Debug, Clone)]
pub struct Throttle {
    /// Bytes per step while the application is busy; 0: never held back.
    floor: u64,
    busy: bool,
    sent: u64,
}

impl Throttle {
    /// `min_rate` in bytes per second (0 turns the throttle off).
    pub fn new(min_rate: u64) -> Self {
        Throttle { floor: per_step(min_rate), busy: false, sent: 0 }
    }

    /// Starts a step: busy if the application made requests during the last one. What the last
    /// step sent beyond the floor counts against this one, so requests larger than a step's
    /// share still average out at the floor.
    /// Only what was sent while throttled carries over: an unthrottled step may have sent any
    /// amount, which must not hold the next busy step back.
    pub fn step(&mut self, app_was_busy: bool) {
        let was_busy = self.busy;
        self.busy = app_was_busy;
        self.sent = if self.busy && was_busy { self.sent.saturating_sub(self.floor) } else { 0 };
    }

    /// Whether another block may be sent in this step.
    pub fn may_send(&self) -> bool {
        self.floor == 0 || !self.busy || self.sent < self.floor
    }

    pub fn sent(&mut self, bytes: u64) {
        self.sent += bytes;
    }

    /// The application was busy during the last step (for status).
    pub fn is_busy(&self) -> bool {
        self.busy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn idle_application_never_holds_the_resync_back() {
        let mut t = Throttle::new(10 * MIB);
        for _ in 0..3 {
            t.step(false);
            for _ in 0..100 {
                assert!(t.may_send());
                t.sent(MIB);
            }
        }
    }

    #[test]
    fn busy_application_limits_a_step_to_the_floor() {
        let mut t = Throttle::new(10 * MIB);
        t.step(true);
        assert!(t.is_busy());
        let mut sent = 0;
        while t.may_send() {
            t.sent(256 << 10);
            sent += 256 << 10;
        }
        assert_eq!(sent, MIB, "10 MiB/s is 1 MiB per 100 ms step");
        // The application went quiet: full speed again.
        t.step(false);
        assert!(t.may_send() && !t.is_busy());
    }

    #[test]
    fn blocks_larger_than_a_step_still_average_out_at_the_floor() {
        // 10 MiB/s is 1 MiB per step; blocks of 4 MiB go one every fourth step.
        let mut t = Throttle::new(10 * MIB);
        let mut sent = 0;
        for _ in 1..=40 {
            t.step(true);
            while t.may_send() {
                t.sent(4 * MIB);
                sent += 4 * MIB;
            }
        }
        assert!((40 * MIB..=44 * MIB).contains(&sent), "{} MiB in 4 s", sent / MIB);
    }

    #[test]
    fn a_busy_step_after_an_idle_one_starts_afresh() {
        let mut t = Throttle::new(10 * MIB);
        t.step(false);
        t.sent(500 * MIB);
        assert!(t.may_send(), "idle: no limit");
        t.step(true);
        assert!(t.is_busy() && t.may_send(), "what the idle step sent is not debt");
    }

    #[test]
    fn zero_floor_turns_the_throttle_off() {
        let mut t = Throttle::new(0);
        t.step(true);
        t.sent(1 << 40);
        assert!(t.may_send());
    }
}
