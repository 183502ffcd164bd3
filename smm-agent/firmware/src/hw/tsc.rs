//! Time from the TSC, calibrated against the ACPI PM timer at boot.
//!
//! SMM code waits with the TSC, not the PM timer: under QEMU's multi-threaded
//! TCG every port read takes the global I/O lock, and a CPU spinning on port
//! reads starves the other vCPUs of the very lock they need to take their
//! SMI (measured: host-SMI p50 4 ms / p99 108 ms with the PM timer, see
//! README). The rate measured at boot travels to SMM in the sealed
//! `SmmConfig` (the SMI rendezvous converts its bounds with it).

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
