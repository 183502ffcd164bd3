//! The boot page tables under AMD SEV. The reset path (`asm/reset.s`)
//! maps 0..4 GiB with 2 MiB pages, all private when SEV is active; this
//! step rewrites them as `smmvmi_boot::paging` decides: the first 2 MiB
//! with 4 KiB pages so that the fw_cfg DMA area (`layout::FW_CFG_DMA_AREA`)
//! is shared, and, once the e820 map is known, everything that is not RAM
//! (the 32-bit PCI hole: BARs, MMCONFIG, local APIC, IOAPIC, flash)
//! shared. Without SEV the entries differ from the reset path's only in
//! the 4 KiB split of the first 2 MiB.

use smmvmi_boot::e820::{self, E820Map};
use smmvmi_boot::paging::{
    MemoryPlan, PAGE_2M, PAGE_4K, PagingError, check_reset_path, table_entry,
};
use smmvmi_boot::sev::SevConfig;

use super::error::BootError;
use crate::hw::cpu;
use crate::hw::memory::Region;
use crate::layout::{BOOT_PD, BOOT_PT_LOW, FW_CFG_DMA_AREA, FW_CFG_DMA_AREA_LEN};
use crate::log;

// SAFETY: `boot_c_mask_high` is a 4-byte, 4-aligned `.bss` word defined in
// `asm/reset.s`, matching the declared `u32`.
unsafe extern "C" {
    /// Upper half of the C-bit mask the reset path put in every entry.
    static boot_c_mask_high: u32;
}

/// The memory devices and the host read and write (shared under SEV).
const SHARED: [(u64, u64); 1] = [(FW_CFG_DMA_AREA, FW_CFG_DMA_AREA_LEN)];

/// Before the first fw_cfg DMA: checks that the reset path used the C-bit
/// `sev` says, and makes the fw_cfg DMA area shared. The rest of 0..4 GiB
/// stays private until [`apply_ram_map`].
pub fn init(sev: &SevConfig) -> Result<(), BootError> {
    // SAFETY: a u32 in the image's .bss, written once by the reset path
    // before Rust ran.
    let asm = unsafe { core::ptr::read_volatile(&raw const boot_c_mask_high) };
    check_reset_path(sev, asm).map_err(BootError::Paging)?;
    match sev.c_bit_mask() {
        0 => log!("page tables: no C-bit (SEV not active)"),
        _ => log!(
            "page tables: SEV active, C-bit {}; RAM private, fw_cfg DMA area and MMIO shared",
            sev.c_bit
        ),
    }
    remap(sev, &[(0, e820::FOUR_GIB)])
}

/// RAM as `(base, len)` ranges: the e820 map's RAM entries and `extra`
/// (the DIMM hot-plug window), what `smmvmi_boot::paging` maps private.
pub struct RamRanges {
    list: [(u64, u64); e820::CAPACITY + 1],
    n: usize,
}

impl RamRanges {
    pub fn new(map: &E820Map, extra: Option<(u64, u64)>) -> Self {
        let mut r = RamRanges {
            list: [(0, 0); e820::CAPACITY + 1],
            n: 0,
        };
        let ram = map.iter().filter(|e| e.kind == e820::RAM);
        for range in ram.map(|e| (e.addr, e.len)).chain(extra) {
            r.list[r.n] = range;
            r.n += 1;
        }
        r
    }

    pub fn as_slice(&self) -> &[(u64, u64)] {
        &self.list[..self.n]
    }
}

/// Once the e820 map is read: RAM private, the rest of 0..4 GiB shared.
pub fn apply_ram_map(sev: &SevConfig, map: &E820Map) -> Result<(), BootError> {
    remap(sev, RamRanges::new(map, None).as_slice())
}

fn remap(sev: &SevConfig, ram: &[(u64, u64)]) -> Result<(), BootError> {
    let plan = MemoryPlan {
        ram,
        shared: &SHARED,
    };
    // SAFETY: the boot page tables the reset path built (layout.rs: four
    // page directories at BOOT_PD, the spare page table at BOOT_PT_LOW),
    // live. Every entry is one aligned 64-bit store, and the firmware's own
    // image, stack and tables are private RAM in every version written
    // here, so no access between two stores sees a wrong mapping of them.
    let (pd, pt) = unsafe {
        (
            Region::new(BOOT_PD, 4 * 0x1000),
            Region::new(BOOT_PT_LOW, 0x1000),
        )
    };
    if sev.active {
        // Lines of the DMA area cached as private must not be read back as
        // shared ones.
        cpu::clflush_range(FW_CFG_DMA_AREA, FW_CFG_DMA_AREA_LEN);
    }
    for i in 0..512 {
        let e = plan
            .pte_4k(sev, i * PAGE_4K, 0)
            .map_err(BootError::Paging)?;
        pt.write_u64(i * 8, e);
    }
    for i in 0..2048 {
        let e = match plan.pde_2m(sev, i * PAGE_2M, 0) {
            Ok(e) => e,
            Err(PagingError::Mixed { .. }) if i == 0 => table_entry(sev, BOOT_PT_LOW),
            Err(e) => return Err(BootError::Paging(e)),
        };
        pd.write_u64(i * 8, e);
    }
    cpu::reload_cr3();
    Ok(())
}
