//! RAM plugged after boot, read from QEMU's ACPI memory hot-plug
//! controller on every serve (`smmvmi_boot::memhp` decides what is
//! accepted). What neither the guest OS nor the host can do through this
//! path: make the agent read outside QEMU's device-memory window, or over
//! SMRAM, the PCI hole or a BAR (refused whatever the slot reports). What
//! the host can do: report a DIMM that is not there (reads then return what
//! QEMU maps there, as for any RAM the host controls).

use smmvmi_agent::RamMap;
use smmvmi_boot::memhp::{self, MhpIo, Policy};
use x86_64::instructions::port::Port;

use super::config::MemHotplug;

struct Ports;

impl MhpIo for Ports {
    fn read32(&mut self, off: u16) -> u32 {
        // SAFETY: the controller's ports (0xA00..0xA17); reads have no side
        // effects.
        unsafe { Port::<u32>::new(memhp::MHP_BASE + off).read() }
    }
    fn read8(&mut self, off: u16) -> u8 {
        // SAFETY: as in `read32`.
        unsafe { Port::<u8>::new(memhp::MHP_BASE + off).read() }
    }
    fn write32(&mut self, off: u16, v: u32) {
        // SAFETY: only the selector is written (`memhp::scan`), and it is
        // left on a slot that reads as the guest's selection did.
        unsafe { Port::<u32>::new(memhp::MHP_BASE + off).write(v) }
    }
}

/// `boot` plus the DIMMs plugged now (those the policy accepts; a RAM map
/// that is full keeps its boot ranges).
pub fn ram_now(boot: &RamMap, hp: &MemHotplug) -> RamMap {
    let scan = memhp::scan(
        &mut Ports,
        hp.slots,
        &Policy {
            window: hp.window,
            forbidden: &hp.forbidden,
        },
    );
    let mut ram = boot.clone();
    for d in scan.dimms() {
        let _ = ram.push(d.addr, d.size);
    }
    ram
}
