//! The boot CPU's local APIC (xAPIC MMIO at 0xFEE00000), for starting the
//! application processors.

use super::memory::Region;
use super::pmtimer;

/// The xAPIC of each CPU (identity mapped by the boot page tables).
pub const LAPIC_BASE: u64 = 0xfee0_0000;
const ICR_LOW: u64 = 0x300;
const ICR_HIGH: u64 = 0x310;
const DELIVERY_PENDING: u32 = 1 << 12;
/// Destination shorthand "all excluding self", level assert.
const ALL_BUT_SELF: u32 = (0b11 << 18) | (1 << 14);
const INIT: u32 = 0b101 << 8;
const STARTUP: u32 = 0b110 << 8;

fn send(icr: u32) {
    // SAFETY: the local APIC page is identity mapped by the boot page
    // tables and is this CPU's own APIC; ICR writes send IPIs.
    let apic = unsafe { Region::new(LAPIC_BASE, 0x1000) };
    apic.write_u32(ICR_HIGH, 0);
    apic.write_u32(ICR_LOW, icr);
    pmtimer::wait_until(100_000, || apic.read_u32(ICR_LOW) & DELIVERY_PENDING == 0);
}

/// INIT-SIPI-SIPI to every other CPU, starting them in real mode at
/// `entry` (4 KiB aligned, below 1 MiB).
pub fn start_aps(entry: u64) {
    assert!(entry.is_multiple_of(0x1000) && entry < 0x10_0000);
    send(ALL_BUT_SELF | INIT);
    pmtimer::delay_us(10_000);
    for _ in 0..2 {
        send(ALL_BUT_SELF | STARTUP | (entry >> 12) as u32);
        pmtimer::delay_us(200);
    }
}
