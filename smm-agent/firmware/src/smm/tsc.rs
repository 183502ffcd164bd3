//! Waiting in SMM: the TSC at the rate measured at boot and sealed into
//! SMRAM with the rest of the configuration.

use super::config::config;
use crate::hw;

/// Spins until `done()` or `timeout_us`; returns `done()` (see
/// [`hw::tsc::wait_until`]).
pub fn wait_until(timeout_us: u64, done: impl FnMut() -> bool) -> bool {
    hw::tsc::wait_until(config().tsc_per_ms, timeout_us, done)
}
