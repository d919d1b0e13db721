//! How much resync data the sync target may ask for, step by step: DRBD's resync pace options
//! (`resync-rate`, `c-plan-ahead`, `c-fill-target`, `c-delay-target`, `c-max-rate`).
//!
//! The target pulls. Every [`STEP`] it tells the controller how much resync data arrived during
//! the last step and how much it has requested and not yet received (in flight), and the
//! controller answers with a budget for the next step, or with no limit:
//! - `c-plan-ahead` zero: the fixed `resync-rate`.
//! - `c-fill-target` set (the default): keep that many bytes in flight. The target's window does
//!   exactly that, issuing a request whenever an answer arrives, so the pipeline runs as fast as
//!   disks and link allow; only `c-max-rate`, when set, limits the bytes per step. (DRBD's
//!   controller approaches the fill level step by step over `c-plan-ahead`; with sub-millisecond
//!   latencies that ramp alone would take seconds, so rdbd holds the level from the start.)
//! - `c-fill-target` zero: DRBD's dynamic controller. It aims at `c-delay-target` worth of data
//!   in flight at the current rate, requests what arrived plus a correction towards that level,
//!   spreads each correction over the `c-plan-ahead` horizon so one slow step does not make it
//!   lurch, and caps the result by `c-max-rate`.
//!
//! Pure code: no clock, no I/O; the caller drives it.

use std::collections::VecDeque;
use std::time::Duration;

use super::pace::ResyncConfig;

/// One controller step, as in DRBD.
pub const STEP: Duration = Duration::from_millis(100);

/// What the first step may request before anything has arrived (with no fill target to aim at).
const FIRST_STEP_MIN: u64 = 1 << 20;

/// Bytes of `rate` (bytes per second) that fit in one step.
pub fn per_step(rate: u64) -> u64 {
    (rate as u128 * STEP.as_millis() / 1000) as u64
}

#[derive(Debug, Clone)]
pub struct Controller {
    config: ResyncConfig,
    /// Corrections planned for the coming steps (bytes, may be negative); empty when fixed.
    plan: VecDeque<i64>,
    /// Sum of `plan`.
    planned: i64,
    started: bool,
}

impl Controller {
    pub fn new(config: ResyncConfig) -> Self {
        let steps = (config.c_plan_ahead.as_millis() / STEP.as_millis()) as usize;
        Controller { config, plan: VecDeque::from(vec![0; steps]), planned: 0, started: false }
    }

    /// Whether the dynamic controller runs (else the fixed rate applies).
    pub fn is_dynamic(&self) -> bool {
        !self.plan.is_empty()
    }

    /// The most bytes that may be in flight: the fill target, or (in delay-target mode, where
    /// the budget paces the resync) a generous bound on memory.
    pub fn window(&self) -> u64 {
        match self.config.c_fill_target {
            0 => 256 << 20,
            fill => fill,
        }
    }

    /// One step: `received` bytes of resync data arrived during the last step, `in_flight` bytes
    /// are requested and not yet received. Returns the bytes that may be requested during the
    /// next step, or `None` for no limit but the window.
    pub fn step(&mut self, received: u64, in_flight: u64) -> Option<u64> {
        if !self.is_dynamic() {
            return Some(per_step(self.config.resync_rate).max(1));
        }
        let request = if self.config.c_fill_target > 0 {
            None
        } else if !self.started {
            // Nothing has arrived yet to derive a rate from: start at the fixed rate (at least
            // a mebibyte), then follow what arrives.
            self.started = true;
            Some(per_step(self.config.resync_rate).max(FIRST_STEP_MIN))
        } else {
            let steps = (self.config.c_delay_target.as_millis() / STEP.as_millis()) as u64;
            let want = received.saturating_mul(steps);
            let correction = want as i64 - in_flight as i64 - self.planned;
            let slots = self.plan.len() as i64;
            let share = correction / slots;
            for slot in self.plan.iter_mut() {
                *slot += share;
            }
            // Integer division leaves a remainder: it goes to the step taken now.
            *self.plan.front_mut().expect("a dynamic plan has steps") += correction - share * slots;
            self.planned += correction;
            let now = self.plan.pop_front().expect("a dynamic plan has steps");
            self.plan.push_back(0);
            self.planned -= now;
            Some((received as i64 + now).max(0) as u64)
        };
        match (self.config.c_max_rate, request) {
            (0, request) => request,
            (max, None) => Some(per_step(max).max(1)),
            (max, Some(request)) => Some(request.min(per_step(max).max(1))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    fn config() -> ResyncConfig {
        ResyncConfig::default()
    }

    /// A pipeline that delivers everything requested within the step, at most `capacity` bytes
    /// per step, with the target keeping at most the window in flight: the bytes delivered
    /// during each of `steps` steps.
    fn simulate(mut c: Controller, capacity: u64, steps: usize) -> Vec<u64> {
        let (mut in_flight, mut received, mut delivered) = (0u64, 0u64, Vec::new());
        for _ in 0..steps {
            let room = c.window().saturating_sub(in_flight);
            // Without a budget the window refills as answers arrive: the step moves capacity.
            let ask = c.step(received, in_flight).map_or(capacity.max(room), |b| b.min(room));
            in_flight += ask;
            received = in_flight.min(capacity);
            in_flight -= received;
            delivered.push(received);
        }
        delivered
    }

    #[test]
    fn fixed_rate_when_plan_ahead_is_zero() {
        let c = ResyncConfig { c_plan_ahead: Duration::ZERO, resync_rate: 10 * MIB, ..config() };
        let mut ctl = Controller::new(c);
        assert!(!ctl.is_dynamic());
        for _ in 0..5 {
            assert_eq!(ctl.step(123, 456), Some(MIB));
        }
    }

    #[test]
    fn the_default_holds_the_fill_target_in_flight_without_a_budget() {
        let mut ctl = Controller::new(config());
        assert_eq!(ctl.window(), config().c_fill_target);
        assert_eq!(ctl.step(0, 0), None, "no budget: as fast as the window turns over");
        assert_eq!(ctl.step(70 * MIB, 32 * MIB), None);
    }

    #[test]
    fn max_rate_caps_every_step() {
        let c = ResyncConfig { c_max_rate: 20 * MIB, ..config() };
        let delivered = simulate(Controller::new(c), 500 * MIB, 40);
        assert!(delivered.iter().all(|&d| d == 2 * MIB), "{delivered:?}");
    }

    #[test]
    fn delay_target_mode_follows_a_fast_pipeline_up() {
        let c = ResyncConfig { c_fill_target: 0, ..config() };
        let delivered = simulate(Controller::new(c), 30 * MIB, 80);
        assert!(delivered[0] > 0, "the first step starts the resync");
        assert!(delivered[79] >= 29 * MIB, "{delivered:?}");
    }

    #[test]
    fn delay_target_mode_settles_near_the_delay_target_in_flight() {
        let c = ResyncConfig { c_fill_target: 0, ..config() };
        let mut ctl = Controller::new(c);
        let (mut in_flight, mut received) = (0u64, 0u64);
        for _ in 0..400 {
            in_flight += ctl.step(received, in_flight).unwrap();
            // A pipeline that moves 5 MiB per step whatever is asked.
            received = in_flight.min(5 * MIB);
            in_flight -= received;
        }
        // One second (the delay target) at 5 MiB per step.
        let want = 50 * MIB;
        assert!(in_flight.abs_diff(want) <= want / 10, "in flight {in_flight}, want {want}");
    }

    proptest! {
        /// Whatever the pipeline does, a budget never exceeds the rate cap, and the controller
        /// never stalls at zero while the pipeline delivers.
        #[test]
        fn budgets_stay_within_the_cap(
            max_mib in 1u64..1000,
            fill_mib in 0u64..256,
            capacities in proptest::collection::vec(0u64..2000 * MIB, 1..100),
        ) {
            let c = ResyncConfig { c_max_rate: max_mib * MIB, c_fill_target: fill_mib * MIB, ..config() };
            let mut ctl = Controller::new(c);
            let (mut in_flight, mut received) = (0u64, 0u64);
            for capacity in capacities {
                let ask = ctl.step(received, in_flight);
                prop_assert!(ask.is_some_and(|a| a <= per_step(max_mib * MIB).max(1)));
                in_flight += ask.unwrap();
                received = in_flight.min(capacity);
                in_flight -= received;
            }
        }
    }
}
