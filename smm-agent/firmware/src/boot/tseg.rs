//! SMM bring-up before Linux runs: TSEG layout, SMM page tables, per-CPU
//! entry stubs, SMBASE relocation of every CPU, SMI broadcast negotiation,
//! then closing and locking SMRAM and a self-test SMI.
//!
//! The TSEG layout is in `layout.rs` (`GDT_OFF` and what follows it).

use smmvmi_boot::fw_cfg::{self, FwCfgIo};
use smmvmi_boot::paging::{Backing, MemoryPlan, PTE_NO_EXECUTE, leaf, table_entry};
use smmvmi_boot::q35;
use smmvmi_boot::sev::SevConfig;

use super::error::BootError;
use crate::hw::fw_cfg::FwCfg;
use crate::hw::memory::Region;
use crate::hw::{chipset, cpu, lapic, pmtimer};
use crate::layout::{
    AP_TRAMPOLINE, APM_CMD_FIRMWARE, FW_BASE, FW_WINDOW, GDT_OFF, IMAGE_OFF, MAX_APIC_ID, MAX_CPUS,
    MAX_MAPPED_GIB, MIN_TSEG, PERCPU_INDEX, PHYS_OFF, PT_OFF, RELOC_AP_TURN, RELOC_BAD_APIC_ID,
    RELOC_CPU_MASK, RELOC_DATA, RELOC_DATA_LEN, RELOC_DONE, RELOC_NEXT_SMBASE, RELOC_STUB,
    RELOC_TILES_BASE, SELFTEST_WORD, SMI_ENTRY_OFFSET, STACK_SIZE, STACKS_OFF, TILE_SIZE,
    TILES_OFF,
};
use crate::log;
use crate::smm::config::{OpenTseg, SealedTseg};

// SAFETY: labels of the templates in `asm/smm.s`; only their addresses are
// taken (to copy and patch the templates), never their contents as `u8`.
unsafe extern "C" {
    static smm_stub_start: u8;
    static smm_stub_end: u8;
    static smm_stub_entry32: u8;
    static smm_stub_entry64: u8;
    static smm_patch_entry32: u8;
    static smm_patch_cr3: u8;
    static smm_patch_entry64: u8;
    static smm_patch_rsp: u8;
    static smm_patch_percpu: u8;
    static smm_patch_gdt: u8;
    static smm_patch_efer: u8;
    static reloc_stub_start: u8;
    static reloc_stub_end: u8;
    static ap_start: u8;
    static ap_start_end: u8;
}

macro_rules! sym {
    ($s:ident) => {
        (&raw const $s) as u64
    };
}

/// A template in the image: its bytes.
fn template(start: u64, end: u64) -> &'static [u8] {
    // SAFETY: [start, end) is a read-only template section of the image
    // (src/asm/smm.s), mapped for the life of the firmware.
    unsafe { core::slice::from_raw_parts(start as *const u8, (end - start) as usize) }
}

/// Where a CPU's SMBASE tile is.
pub fn smbase(tseg: u64, cpu: u32) -> u64 {
    q35::smbase_for_cpu(tseg + TILES_OFF, cpu, TILE_SIZE).expect("TSEG lies below 4 GiB")
}

/// Inputs of the bring-up, gathered by `main`.
pub struct Plan<'a> {
    pub ncpus: u32,
    /// End of the highest RAM range (for the SMM page tables).
    pub phys_end: u64,
    /// RAM `(base, len)`: the e820 RAM and the DIMM hot-plug window. Mapped
    /// private under SEV; everything else (BARs, the mailbox among them,
    /// the local APIC) shared.
    pub ram: &'a [(u64, u64)],
    /// SEV facts (the C-bit).
    pub sev: SevConfig,
}

/// What the installation decided, for the sealed `SmmConfig`.
pub struct Installed {
    /// CR3 of the SMM page tables.
    pub smm_cr3: u64,
    /// The CPU indices (APIC IDs) relocated, one bit each.
    pub cpu_mask: u64,
}

/// Installs everything in TSEG (still open) that SMI entry needs, and
/// relocates the SMBASE of every CPU into it.
pub fn install_and_relocate(open: &OpenTseg, plan: &Plan) -> Result<Installed, BootError> {
    if plan.ncpus == 0 || plan.ncpus > MAX_CPUS {
        return Err(BootError::CpuCount { ncpus: plan.ncpus });
    }
    let tseg = open.region();
    let tseg_base = open.base();
    tseg.fill(0, MIN_TSEG, 0);

    // GDT
    for (i, d) in [
        0u64,
        0x00cf_9a00_0000_ffff,
        0x00af_9a00_0000_ffff,
        0x00cf_9200_0000_ffff,
    ]
    .iter()
    .enumerate()
    {
        tseg.write_u64(GDT_OFF + i as u64 * 8, *d);
    }

    let cr3 = build_page_tables(&tseg, plan)?;

    let stub = template(sym!(smm_stub_start), sym!(smm_stub_end));
    let rel = |s: u64| s - sym!(smm_stub_start);
    // A tile (stub, stack) for every possible APIC ID: CPU index = APIC ID.
    for cpu in 0..MAX_CPUS {
        let base = smbase(tseg_base, cpu);
        let off = base - tseg_base;
        let entry = off + SMI_ENTRY_OFFSET;
        tseg.write(entry, stub);
        let at = base + SMI_ENTRY_OFFSET;
        // Immediates inside instructions: unaligned, written as bytes.
        let patch32 = |sym: u64, v: u64| tseg.write(entry + rel(sym), &(v as u32).to_le_bytes());
        let patch64 = |sym: u64, v: u64| tseg.write(entry + rel(sym), &v.to_le_bytes());
        patch32(sym!(smm_patch_entry32), at + rel(sym!(smm_stub_entry32)));
        patch32(sym!(smm_patch_cr3), cr3);
        patch32(sym!(smm_patch_entry64), at + rel(sym!(smm_stub_entry64)));
        let stack = STACKS_OFF + u64::from(cpu) * STACK_SIZE;
        tseg.write_u64(stack, base);
        patch64(sym!(smm_patch_rsp), tseg_base + stack + STACK_SIZE);
        patch64(sym!(smm_patch_percpu), base);
        patch32(sym!(smm_patch_gdt), tseg_base + GDT_OFF);
        patch32(sym!(smm_patch_efer), smm_efer_bits());
        tseg.write_u32(off + PERCPU_INDEX, cpu);
    }
    let cpu_mask = relocate(tseg_base, plan)?;
    Ok(Installed {
        smm_cr3: cr3,
        cpu_mask,
    })
}

const EFER_LME: u64 = 1 << 8;
const EFER_NXE: u64 = 1 << 11;

/// EFER bits the SMM entry stub sets: long mode, and NX when available.
fn smm_efer_bits() -> u64 {
    EFER_LME | if cpu::has_nx() { EFER_NXE } else { 0 }
}

/// Builds the SMM page tables; returns CR3.
///
/// Only TSEG (entry stubs) and the firmware window are executable: guest
/// memory, in the identity map and in the alias, is mapped no-execute, so
/// SMM never runs code the guest could have placed.
///
/// Under SEV (`smmvmi_boot::paging`): RAM, TSEG and the tables carry the
/// C-bit, so the agent reads the guest's private memory in plaintext (and a
/// page the guest shares with the host as ciphertext); MMIO, the mailbox
/// BAR among it, does not. CR3 carries no C-bit: the entry stub loads it in
/// 32-bit mode, and the CPU walks an SEV guest's tables as private anyway.
fn build_page_tables(tseg: &Region, plan: &Plan) -> Result<u64, BootError> {
    let gib = plan.phys_end.max(1 << 32).div_ceil(1 << 30);
    if gib > MAX_MAPPED_GIB {
        return Err(BootError::TooMuchRam {
            phys_end: plan.phys_end,
        });
    }
    let base = tseg.base();
    let pml4 = PT_OFF;
    let pdpt_id = PT_OFF + 0x1000;
    let pdpt_alias = PT_OFF + 0x2000;
    let pt_fw = PT_OFF + 0x3000;
    let pd0_id = PT_OFF + 0x4000;
    let pd0_alias = PT_OFF + 0x5000;
    let pd = |g: u64| PT_OFF + 0x6000 + (g - 1) * 0x1000;
    tseg.fill(PT_OFF, 0x6000 + (gib - 1) * 0x1000, 0);
    let sev = &plan.sev;
    let mem = MemoryPlan {
        ram: plan.ram,
        shared: &[],
    };
    let nx = if cpu::has_nx() { PTE_NO_EXECUTE } else { 0 };
    tseg.write_u64(pml4, table_entry(sev, base + pdpt_id));
    tseg.write_u64(
        pml4 + (PHYS_OFF >> 39 & 0x1ff) * 8,
        table_entry(sev, base + pdpt_alias),
    );
    for g in 0..gib {
        let (id, alias) = if g == 0 {
            (pd0_id, pd0_alias)
        } else {
            (pd(g), pd(g))
        };
        tseg.write_u64(pdpt_id + g * 8, table_entry(sev, base + id));
        tseg.write_u64(pdpt_alias + g * 8, table_entry(sev, base + alias));
        for e in 0..512 {
            let page = (g << 30) | (e << 21);
            let in_tseg = page < base + tseg.len() && base < page + (2 << 20);
            let v = |extra| mem.pde_2m(sev, page, extra).map_err(BootError::Paging);
            tseg.write_u64(id + e * 8, v(if in_tseg { 0 } else { nx })?);
            if g == 0 {
                tseg.write_u64(alias + e * 8, v(nx)?);
            }
        }
    }
    // The firmware window at FW_BASE (one 2 MiB PD slot) -> the TSEG copy.
    const { assert!(FW_BASE.is_multiple_of(2 << 20) && FW_BASE < (1 << 30) && FW_WINDOW == 2 << 20) };
    tseg.write_u64(pd0_id + (FW_BASE >> 21) * 8, table_entry(sev, base + pt_fw));
    for i in 0..512 {
        let page = base + IMAGE_OFF + i * 0x1000;
        tseg.write_u64(pt_fw + i * 8, leaf(sev, page, Backing::Private, 0));
    }
    Ok(base + pml4)
}

/// SMBASE relocation: the BSP first, then every AP, one at a time, each with
/// an SMI to itself (broadcast is not negotiated yet). Each CPU moves to the
/// tile of its APIC ID. Returns the mask of APIC IDs relocated.
fn relocate(tseg_base: u64, plan: &Plan) -> Result<u64, BootError> {
    // SAFETY: RELOC_STUB (0x38000) and RELOC_DATA/AP_TRAMPOLINE (0x8000,
    // 0x9000) are low RAM that nothing uses before Linux; see layout.rs.
    let stub = unsafe { Region::new(RELOC_STUB, 0x1000) };
    // SAFETY: as above.
    let data = unsafe { Region::new(RELOC_DATA, RELOC_DATA_LEN) };
    // SAFETY: as above.
    let tramp = unsafe { Region::new(AP_TRAMPOLINE, 0x1000) };
    stub.write(0, template(sym!(reloc_stub_start), sym!(reloc_stub_end)));
    data.fill(0, RELOC_DATA_LEN, 0);

    let bsp = cpu::initial_apic_id();
    if bsp > MAX_APIC_ID {
        return Err(BootError::BspApicId { apic_id: bsp });
    }
    data.write_u32(RELOC_TILES_BASE, (tseg_base + TILES_OFF) as u32);
    data.write_u32(RELOC_NEXT_SMBASE, smbase(tseg_base, bsp) as u32);
    chipset::raise_apm_smi(APM_CMD_FIRMWARE);
    if !pmtimer::wait_until(1_000_000, || data.read_u32(RELOC_DONE) == 1) {
        return Err(BootError::BspNoSmi);
    }
    let mut mask = 1u64 << bsp;
    if plan.ncpus > 1 {
        tramp.write(0, template(sym!(ap_start), sym!(ap_start_end)));
        lapic::start_aps(AP_TRAMPOLINE);
        let want = plan.ncpus - 1;
        if !pmtimer::wait_until(10_000_000, || data.read_u32(RELOC_AP_TURN) == want) {
            return Err(BootError::ApsMissing {
                ncpus: plan.ncpus,
                arrived: data.read_u32(RELOC_AP_TURN),
            });
        }
        let bad = data.read_u32(RELOC_BAD_APIC_ID);
        if bad != 0 {
            return Err(BootError::ApApicId { apic_id: bad });
        }
        mask |= data.read_u64(RELOC_CPU_MASK);
    }
    if mask.count_ones() != plan.ncpus {
        return Err(BootError::ApicIdsRelocated {
            ncpus: plan.ncpus,
            mask,
        });
    }
    Ok(mask)
}

/// Asks QEMU for SMI broadcast and locks the negotiation. Without it a
/// monitor-raised SMI crashes QEMU 7.2, so it is required.
pub fn negotiate_broadcast(fw: &mut FwCfg) -> Result<u64, BootError> {
    let supported = fw_cfg::read_file_u64(fw, q35::SMI_SUPPORTED_FEATURES);
    let requested = fw_cfg::find_file(fw, q35::SMI_REQUESTED_FEATURES);
    let ok = fw_cfg::find_file(fw, q35::SMI_FEATURES_OK);
    let (Ok(Some(supported)), Ok(Some(requested)), Ok(Some(ok))) = (supported, requested, ok)
    else {
        return Err(BootError::NoSmiNegotiation);
    };
    if supported & q35::SMI_FEATURE_BROADCAST == 0 {
        return Err(BootError::NoSmiBroadcast { supported });
    }
    let want = q35::SMI_FEATURE_BROADCAST;
    fw.write(requested.select, &want.to_le_bytes())
        .map_err(BootError::SmiFeaturesWrite)?;
    let mut b = [0u8; 1];
    fw.select(ok.select);
    fw.read(&mut b);
    if b[0] != 1 {
        return Err(BootError::SmiFeaturesRefused { want, ok: b[0] });
    }
    Ok(want)
}

/// Closes TSEG (which holds the image and its sealed configuration), locks
/// SMRAM and the SMI enables, and checks that TSEG now reads as all ones
/// from outside SMM.
pub fn lock(sealed: SealedTseg) -> Result<(), BootError> {
    let tseg = sealed.region();
    let esmramc = chipset::mch_read8(q35::MCH_ESMRAMC);
    chipset::mch_write8(q35::MCH_ESMRAMC, q35::esmramc_close(esmramc));
    let smram = chipset::mch_read8(q35::MCH_SMRAM);
    chipset::mch_write8(q35::MCH_SMRAM, q35::smram_enable(smram));
    chipset::mch_write8(q35::MCH_SMRAM, q35::smram_lock(smram));
    chipset::lock_smi_enable();

    let smram = chipset::mch_read8(q35::MCH_SMRAM);
    let esmramc = chipset::mch_read8(q35::MCH_ESMRAMC);
    let probe = tseg.read_u32(0);
    log!("smram={smram:#04x} esmramc={esmramc:#04x} tseg[0] from outside SMM={probe:#010x}");
    if !q35::smram_locked(smram) || probe != 0xffff_ffff {
        return Err(BootError::SmramNotLocked {
            smram,
            esmramc,
            probe,
        });
    }
    Ok(())
}

/// Raises one broadcast SMI and waits until the agent reports it served it.
pub fn self_test() -> Result<(), BootError> {
    // SAFETY: RELOC_DATA is low RAM reserved for SMM bring-up (layout.rs).
    let data = unsafe { Region::new(RELOC_DATA, RELOC_DATA_LEN) };
    data.write_u32(SELFTEST_WORD, 0);
    chipset::raise_apm_smi(APM_CMD_FIRMWARE);
    if !pmtimer::wait_until(2_000_000, || data.read_u32(SELFTEST_WORD) != 0) {
        return Err(BootError::SelfTest);
    }
    log!(
        "self-test SMI served: {} of the CPUs present in SMM",
        data.read_u32(SELFTEST_WORD)
    );
    Ok(())
}
