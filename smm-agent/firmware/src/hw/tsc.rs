//! Time from the TSC, calibrated against the ACPI PM timer at boot.
//!
//! SMM code waits with the TSC, not the PM timer: under QEMU's multi-threaded
//! TCG every port read takes the global I/O lock, and a CPU spinning on port
//! reads starves the other vCPUs of the very lock they need to take their
//! SMI (measured: host-SMI p50 4 ms / p99 108 ms with the PM timer, see
//! README). The rate measured at boot travels to SMM in the sealed
//! `SmmConfig` (`smm::clock` waits with it).

use super::pmtimer;

pub fn now() -> u64 {
    // SAFETY: RDTSC has no side effects (CR4.TSD is clear in SMM and boot).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Measures TSC ticks per millisecond over 10 ms of PM timer.
pub fn calibrate() -> u64 {
    let t0 = now();
    pmtimer::delay_us(10_000);
    ((now() - t0) / 10).max(1)
}

/// Spins until `done()` or `timeout_us` of TSC time at `ticks_per_ms`;
/// returns `done()`.
///
/// Elapsed time is `now - start` with wrapping arithmetic: the guest can
/// write the TSC (near `u64::MAX`, say), and an absolute deadline would then
/// never arrive. A TSC that jumps only shortens the wait.
pub fn wait_until(ticks_per_ms: u64, timeout_us: u64, mut done: impl FnMut() -> bool) -> bool {
    let per_ms = ticks_per_ms.max(1);
    let ticks = timeout_us.saturating_mul(per_ms) / 1000;
    let start = now();
    loop {
        if done() {
            return true;
        }
        if now().wrapping_sub(start) >= ticks {
            return done();
        }
        core::hint::spin_loop();
    }
}
