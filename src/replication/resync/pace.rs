//! How fast a resync goes: the settings of DRBD's dynamic resync controller and its
//! fixed-rate fallback, owned by the resync (the resource file's `[disk]` table fills them).

use std::time::Duration;

/// Resync defaults. DRBD's controller defaults cap a resync at 100 MiB/s and keep 50 KiB in
/// flight; rdbd's aim at the speed of the disks: no cap, a deeper fill, and a floor under
/// application load that still finishes a resync in reasonable time.
pub const DEFAULT_RESYNC_RATE: u64 = 250 << 10;
pub const DEFAULT_C_PLAN_AHEAD: Duration = Duration::from_secs(2);
pub const DEFAULT_C_FILL_TARGET: u64 = 16 << 20;
pub const DEFAULT_C_DELAY_TARGET: Duration = Duration::from_secs(1);
pub const DEFAULT_C_MAX_RATE: u64 = 0;
pub const DEFAULT_C_MIN_RATE: u64 = 16 << 20;

/// Resync pace (DRBD's dynamic resync controller and its fixed-rate fallback).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncConfig {
    /// Fixed rate in bytes/s, used when `c_plan_ahead` is zero.
    pub resync_rate: u64,
    /// How far ahead the controller plans; zero turns it off (fixed `resync_rate`).
    pub c_plan_ahead: Duration,
    /// Bytes the controller keeps in flight; zero: aim at `c_delay_target` instead.
    pub c_fill_target: u64,
    /// With no fill target: keep this much time's worth of data in flight.
    pub c_delay_target: Duration,
    /// Upper bound in bytes/s; zero: no bound (as fast as disks and link allow).
    pub c_max_rate: u64,
    /// While the application does I/O, the resync is slowed down to this rate (bytes/s), not
    /// further; zero: the resync never yields.
    pub c_min_rate: u64,
}

impl Default for ResyncConfig {
    fn default() -> Self {
        ResyncConfig {
            resync_rate: DEFAULT_RESYNC_RATE,
            c_plan_ahead: DEFAULT_C_PLAN_AHEAD,
            c_fill_target: DEFAULT_C_FILL_TARGET,
            c_delay_target: DEFAULT_C_DELAY_TARGET,
            c_max_rate: DEFAULT_C_MAX_RATE,
            c_min_rate: DEFAULT_C_MIN_RATE,
        }
    }
}
