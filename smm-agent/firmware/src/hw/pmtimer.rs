//! Time from the ACPI PM timer (3.579545 MHz, 24 bits) at PMBASE + 8; it
//! works in SMM and before Linux, and does not depend on TSC calibration.

use x86_64::instructions::port::Port;

use smmvmi_boot::q35::PMBASE;

const HZ: u64 = 3_579_545;
const MASK: u32 = 0x00ff_ffff;

fn now() -> u32 {
    // SAFETY: PMBASE is programmed before any timer use (lpc setup);
    // reading PM1_TMR has no side effects.
    unsafe { Port::<u32>::new(PMBASE + 8).read() & MASK }
}

/// Counts elapsed time while polled at least every 4.6 s (timer wrap).
pub struct Stopwatch {
    last: u32,
    ticks: u64,
}

impl Stopwatch {
    pub fn start() -> Self {
        Self {
            last: now(),
            ticks: 0,
        }
    }

    /// Microseconds since `start`.
    pub fn elapsed_us(&mut self) -> u64 {
        let t = now();
        self.ticks += u64::from(t.wrapping_sub(self.last) & MASK);
        self.last = t;
        self.ticks * 1_000_000 / HZ
    }
}

/// Busy-waits `us` microseconds.
pub fn delay_us(us: u64) {
    let mut sw = Stopwatch::start();
    while sw.elapsed_us() < us {
        core::hint::spin_loop();
    }
}

/// Spins until `done()` or `timeout_us`; returns whether `done()` became true.
pub fn wait_until(timeout_us: u64, mut done: impl FnMut() -> bool) -> bool {
    let mut sw = Stopwatch::start();
    loop {
        if done() {
            return true;
        }
        if sw.elapsed_us() >= timeout_us {
            return done();
        }
        core::hint::spin_loop();
    }
}
