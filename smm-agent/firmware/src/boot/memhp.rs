//! RAM hot-plug set-up at boot: whether the machine has DIMM slots (the
//! DSDT QEMU generated names their number), where QEMU may place DIMMs (fw_cfg
//! `etc/reserved-memory-end`), and which ranges a DIMM may never cover. SMM
//! reads the controller on every serve (`smm::memhp`); the logic is
//! `smmvmi_boot::memhp`.

use smmvmi_boot::e820::E820Map;
use smmvmi_boot::fw_cfg as fwc;
use smmvmi_boot::memhp;

use crate::hw::fw_cfg::FwCfg;
use crate::layout::MAX_MAPPED_GIB;
use crate::log;
use crate::smm::config::MemHotplug;

const FOUR_GIB: u64 = 1 << 32;

/// `None` when the machine has no DIMM slots or QEMU reserved no device
/// memory (`-m SIZE,slots=N,maxmem=MAX` turns both on).
pub fn plan(
    fw: &mut FwCfg,
    boot_ram: &E820Map,
    acpi_tables: &[u8],
    lowmem_top: u64,
    tseg: (u64, u64),
) -> Option<MemHotplug> {
    let slots = memhp::slot_count(acpi_tables);
    let file = fwc::find_file(fw, "etc/reserved-memory-end").ok()??;
    let mut end = [0u8; 8];
    fwc::read_item(fw, file.select, file.size, &mut end).ok()?;
    let reserved_end = u64::from_le_bytes(end);
    // The SMM alias of guest memory maps at most MAX_MAPPED_GIB: DIMMs beyond
    // it are refused (outside the window) rather than failing the boot.
    let mapped_end = MAX_MAPPED_GIB << 30;
    if reserved_end > mapped_end {
        log!(
            "device memory ends at {reserved_end:#x}; DIMMs above {mapped_end:#x} (the SMM map's limit) will be refused"
        );
    }
    let window = memhp::device_memory_window(boot_ram, reserved_end.min(mapped_end))?;
    if slots == 0 {
        log!(
            "device memory up to {reserved_end:#x} but no DIMM slots in the DSDT: no RAM hot-plug"
        );
        return None;
    }
    log!(
        "RAM hot-plug: {slots} DIMM slots, device memory {:#x}..{:#x}",
        window.0,
        window.1
    );
    Some(MemHotplug {
        slots,
        window,
        // The 32-bit PCI hole holds MMCONFIG, every BAR the firmware
        // assigns (it places 64-bit BARs there too), the LAPIC, the IOAPIC
        // and the ROM.
        forbidden: [tseg, (lowmem_top, FOUR_GIB - lowmem_top), (0, 0)],
    })
}
