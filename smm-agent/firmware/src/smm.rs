//! SMM bring-up before Linux runs: TSEG layout, SMM page tables, per-CPU
//! entry stubs, SMBASE relocation of every CPU, SMI broadcast negotiation,
//! then closing and locking SMRAM and a self-test SMI.
//!
//! TSEG layout (offsets from the TSEG base; see also `layout.rs`):
//!
//! | offset | what |
//! |---|---|
//! | 0x000000 | GDT for SMM (code32 0x08, code64 0x10, data 0x18) |
//! | 0x010000 | SMM page tables: identity map of RAM and the 32-bit MMIO hole, the firmware window at `FW_BASE` redirected to the TSEG copy, and an alias of all physical memory at `PHYS_OFF` |
//! | 0x200000 | copy of the firmware image (code, data, bss), 2 MiB |
//! | 0x400000 | one 64 KiB tile per CPU (tile = SMBASE): per-CPU block at +0, entry stub at +0x8000, save state at +0xFE00 |
//! | 0x800000 | one 64 KiB SMM stack per CPU; its lowest 8 bytes hold the CPU's tile address |
//! | 0xC00000 | the agent's SMRAM copies of the request (64 KiB) and of the reply (2 MiB) |

use core::sync::atomic::Ordering;

use smmvmi_boot::fw_cfg::{self, FwCfgIo};
use smmvmi_boot::q35;

use crate::chipset;
use crate::exit::{ExitCode, exit};
use crate::fwcfg::FwCfg;
use crate::layout::{AP_TRAMPOLINE, FW_BASE, FW_WINDOW, PHYS_OFF, RELOC_DATA, RELOC_STUB};
use crate::log;
use crate::memory::Region;
use crate::pmtimer;
use crate::smi::{self, SMM};

pub const GDT_OFF: u64 = 0;
pub const PT_OFF: u64 = 0x1_0000;
pub const IMAGE_OFF: u64 = 0x20_0000;
pub const TILES_OFF: u64 = 0x40_0000;
pub const TILE_SIZE: u64 = 0x1_0000;
pub const MAX_CPUS: u32 = 64;
pub const STACKS_OFF: u64 = 0x80_0000;
pub const STACK_SIZE: u64 = 0x1_0000;
pub const REQUEST_BUF_OFF: u64 = 0xC0_0000;
pub const REQUEST_BUF_LEN: u64 = 0x1_0000;
pub const REPLY_BUF_OFF: u64 = 0xC1_0000;
pub const REPLY_BUF_LEN: u64 = 0x20_0000;
/// The smallest TSEG this layout fits in.
pub const MIN_TSEG: u64 = REPLY_BUF_OFF + REPLY_BUF_LEN;
/// The SMM page tables map at most this much physical memory.
pub const MAX_MAPPED_GIB: u64 = 256;

/// APM command byte used for SMIs the firmware raises itself.
use smmvmi_mailbox::platform::APM_CMD_FIRMWARE;

unsafe extern "C" {
    static __fw_start: u8;
    static __fw_end: u8;
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
pub struct Plan {
    pub tseg_base: u64,
    pub tseg_size: u64,
    pub ncpus: u32,
    /// End of the highest RAM range (for the SMM page tables).
    pub phys_end: u64,
}

fn fail(msg: core::fmt::Arguments) -> ! {
    log!("SMM setup failed: {msg}");
    exit(ExitCode::SmmSetup)
}

/// Installs everything in TSEG (still open) that SMI entry needs, and
/// relocates the SMBASE of every CPU into it. Returns the mask of CPU
/// indices (APIC IDs) present.
pub fn install_and_relocate(plan: &Plan) -> u64 {
    if plan.ncpus == 0 || plan.ncpus > MAX_CPUS {
        fail(format_args!(
            "fw_cfg reports {} CPUs; this firmware supports 1 to {MAX_CPUS}",
            plan.ncpus
        ));
    }
    // SAFETY: TSEG is open (T_EN clear at reset), lies in RAM below 4 GiB
    // (checked by the caller against the e820 map), is identity mapped by
    // the boot page tables, and nothing else uses it before Linux.
    let tseg = unsafe { Region::new(plan.tseg_base, plan.tseg_size) };
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

    let cr3 = build_page_tables(&tseg, plan);
    SMM.smm_cr3.store(cr3, Ordering::Relaxed);

    let stub = template(sym!(smm_stub_start), sym!(smm_stub_end));
    let rel = |s: u64| s - sym!(smm_stub_start);
    // A tile (stub, stack) for every possible APIC ID: CPU index = APIC ID.
    for cpu in 0..MAX_CPUS {
        let base = smbase(plan.tseg_base, cpu);
        let off = base - plan.tseg_base;
        let entry = off + q35::SMI_ENTRY_OFFSET;
        tseg.write(entry, stub);
        let at = base + q35::SMI_ENTRY_OFFSET;
        // Immediates inside instructions: unaligned, written as bytes.
        let patch32 = |sym: u64, v: u64| tseg.write(entry + rel(sym), &(v as u32).to_le_bytes());
        let patch64 = |sym: u64, v: u64| tseg.write(entry + rel(sym), &v.to_le_bytes());
        patch32(sym!(smm_patch_entry32), at + rel(sym!(smm_stub_entry32)));
        patch32(sym!(smm_patch_cr3), cr3);
        patch32(sym!(smm_patch_entry64), at + rel(sym!(smm_stub_entry64)));
        let stack = STACKS_OFF + u64::from(cpu) * STACK_SIZE;
        tseg.write_u64(stack, base);
        patch64(sym!(smm_patch_rsp), plan.tseg_base + stack + STACK_SIZE);
        patch64(sym!(smm_patch_percpu), base);
        patch32(sym!(smm_patch_gdt), plan.tseg_base + GDT_OFF);
        patch32(sym!(smm_patch_efer), smm_efer_bits());
        tseg.write_u32(off + smi::PERCPU_INDEX, cpu);
    }
    relocate(plan)
}

const EFER_LME: u64 = 1 << 8;
const EFER_NXE: u64 = 1 << 11;
/// Page-table bit: no execute (needs EFER.NXE).
const PTE_NX: u64 = 1 << 63;

/// Whether the CPU has the NX bit (CPUID 0x80000001:EDX[20]).
fn has_nx() -> bool {
    core::arch::x86_64::__cpuid(0x8000_0000).eax >= 0x8000_0001
        && core::arch::x86_64::__cpuid(0x8000_0001).edx & (1 << 20) != 0
}

/// EFER bits the SMM entry stub sets: long mode, and NX when available.
fn smm_efer_bits() -> u64 {
    EFER_LME | if has_nx() { EFER_NXE } else { 0 }
}

/// Builds the SMM page tables; returns CR3.
///
/// Only TSEG (entry stubs) and the firmware window are executable: guest
/// memory, in the identity map and in the alias, is mapped no-execute, so
/// SMM never runs code the guest could have placed.
fn build_page_tables(tseg: &Region, plan: &Plan) -> u64 {
    let gib = plan.phys_end.max(1 << 32).div_ceil(1 << 30);
    if gib > MAX_MAPPED_GIB {
        fail(format_args!(
            "RAM ends at {:#x}; the SMM page tables map at most {MAX_MAPPED_GIB} GiB",
            plan.phys_end
        ));
    }
    let base = plan.tseg_base;
    let pml4 = PT_OFF;
    let pdpt_id = PT_OFF + 0x1000;
    let pdpt_alias = PT_OFF + 0x2000;
    let pt_fw = PT_OFF + 0x3000;
    let pd0_id = PT_OFF + 0x4000;
    let pd0_alias = PT_OFF + 0x5000;
    let pd = |g: u64| PT_OFF + 0x6000 + (g - 1) * 0x1000;
    tseg.fill(PT_OFF, 0x6000 + (gib - 1) * 0x1000, 0);
    const P_RW: u64 = 0x3;
    const PS: u64 = 0x80;
    let nx = if has_nx() { PTE_NX } else { 0 };
    tseg.write_u64(pml4, (base + pdpt_id) | P_RW);
    tseg.write_u64(
        pml4 + (PHYS_OFF >> 39 & 0x1ff) * 8,
        (base + pdpt_alias) | P_RW,
    );
    for g in 0..gib {
        let (id, alias) = if g == 0 {
            (pd0_id, pd0_alias)
        } else {
            (pd(g), pd(g))
        };
        tseg.write_u64(pdpt_id + g * 8, (base + id) | P_RW);
        tseg.write_u64(pdpt_alias + g * 8, (base + alias) | P_RW);
        for e in 0..512 {
            let page = (g << 30) | (e << 21);
            let in_tseg = page < base + plan.tseg_size && base < page + (2 << 20);
            let v = page | PS | P_RW;
            tseg.write_u64(id + e * 8, if in_tseg { v } else { v | nx });
            if g == 0 {
                tseg.write_u64(alias + e * 8, v | nx);
            }
        }
    }
    // The firmware window at FW_BASE (one 2 MiB PD slot) -> the TSEG copy.
    const { assert!(FW_BASE.is_multiple_of(2 << 20) && FW_BASE < (1 << 30) && FW_WINDOW == 2 << 20) };
    tseg.write_u64(pd0_id + (FW_BASE >> 21) * 8, (base + pt_fw) | P_RW);
    for i in 0..512 {
        tseg.write_u64(pt_fw + i * 8, (base + IMAGE_OFF + i * 0x1000) | P_RW);
    }
    base + pml4
}

/// The boot CPU's initial APIC ID (CPUID.1:EBX[31:24]).
fn own_apic_id() -> u32 {
    core::arch::x86_64::__cpuid(1).ebx >> 24
}

/// SMBASE relocation: the BSP first, then every AP, one at a time, each with
/// an SMI to itself (broadcast is not negotiated yet). Each CPU moves to the
/// tile of its APIC ID. Returns the mask of APIC IDs relocated.
fn relocate(plan: &Plan) -> u64 {
    // SAFETY: RELOC_STUB (0x38000) and RELOC_DATA/AP_TRAMPOLINE (0x8000,
    // 0x9000) are low RAM that nothing uses before Linux; see layout.rs.
    let stub = unsafe { Region::new(RELOC_STUB, 0x1000) };
    // SAFETY: as above.
    let data = unsafe { Region::new(RELOC_DATA, 0x1000) };
    // SAFETY: as above.
    let tramp = unsafe { Region::new(AP_TRAMPOLINE, 0x1000) };
    stub.write(0, template(sym!(reloc_stub_start), sym!(reloc_stub_end)));
    data.fill(0, 0x1000, 0);
    // Offsets in RELOC_DATA shared with src/asm/smm.s.
    const NEXT: u64 = 0;
    const DONE: u64 = 4;
    const TURN: u64 = 12;
    const TILES_BASE: u64 = 16;
    const CPU_MASK: u64 = 24;
    const BAD_APIC_ID: u64 = 32;

    let bsp = own_apic_id();
    if bsp >= MAX_CPUS {
        fail(format_args!(
            "the boot CPU has APIC ID {bsp}; this firmware supports APIC IDs 0 to {}",
            MAX_CPUS - 1
        ));
    }
    data.write_u32(TILES_BASE, (plan.tseg_base + TILES_OFF) as u32);
    data.write_u32(NEXT, smbase(plan.tseg_base, bsp) as u32);
    chipset::raise_apm_smi(APM_CMD_FIRMWARE);
    if !pmtimer::wait_until(1_000_000, || data.read_u32(DONE) == 1) {
        fail(format_args!(
            "the boot CPU took no SMI within 1 s of an APM write; is SMM enabled (-machine smm=on)?"
        ));
    }
    let mut mask = 1u64 << bsp;
    if plan.ncpus > 1 {
        tramp.write(0, template(sym!(ap_start), sym!(ap_start_end)));
        crate::lapic::start_aps(AP_TRAMPOLINE);
        let want = plan.ncpus - 1;
        if !pmtimer::wait_until(10_000_000, || data.read_u32(TURN) == want) {
            fail(format_args!(
                "fw_cfg reports {} CPUs but only {} of {want} application processors checked in within 10 s",
                plan.ncpus,
                data.read_u32(TURN)
            ));
        }
        let bad = data.read_u32(BAD_APIC_ID);
        if bad != 0 {
            fail(format_args!(
                "an application processor has APIC ID {bad}; this firmware supports APIC IDs 0 to {}",
                MAX_CPUS - 1
            ));
        }
        mask |= data.read_u64(CPU_MASK);
    }
    if mask.count_ones() != plan.ncpus {
        fail(format_args!(
            "fw_cfg reports {} CPUs but {} distinct APIC IDs relocated (mask {mask:#x})",
            plan.ncpus,
            mask.count_ones()
        ));
    }
    mask
}

/// Asks QEMU for SMI broadcast and locks the negotiation. Without it a
/// monitor-raised SMI crashes QEMU 7.2, so it is required.
pub fn negotiate_broadcast(fw: &mut FwCfg) -> u64 {
    let supported = fw_cfg::read_file_u64(fw, q35::SMI_SUPPORTED_FEATURES);
    let requested = fw_cfg::find_file(fw, q35::SMI_REQUESTED_FEATURES);
    let ok = fw_cfg::find_file(fw, q35::SMI_FEATURES_OK);
    let (Ok(Some(supported)), Ok(Some(requested)), Ok(Some(ok))) = (supported, requested, ok)
    else {
        fail(format_args!(
            "QEMU offers no SMI feature negotiation (etc/smi/* fw_cfg files); use q35 with QEMU >= 2.9"
        ));
    };
    if supported & q35::SMI_FEATURE_BROADCAST == 0 {
        fail(format_args!(
            "QEMU does not offer SMI broadcast (supported features {supported:#x}); the host-injector needs it"
        ));
    }
    let want = q35::SMI_FEATURE_BROADCAST;
    if let Err(e) = fw.write(requested.select, &want.to_le_bytes()) {
        fail(format_args!("writing {}: {e}", q35::SMI_REQUESTED_FEATURES));
    }
    let mut b = [0u8; 1];
    fw.select(ok.select);
    fw.read(&mut b);
    if b[0] != 1 {
        fail(format_args!(
            "QEMU refused SMI features {want:#x} ({} reads {})",
            q35::SMI_FEATURES_OK,
            b[0]
        ));
    }
    want
}

/// Copies the firmware image (with `SMM` filled in) into TSEG, closes TSEG,
/// locks SMRAM and the SMI enables, and checks that TSEG now reads as all
/// ones from outside SMM.
pub fn seal(plan: &Plan) {
    let start = sym!(__fw_start);
    let len = sym!(__fw_end) - start;
    // SAFETY: [start, start + len) is the running image itself (code, data,
    // bss), mapped and readable; we copy it as bytes.
    let image = unsafe { core::slice::from_raw_parts(start as *const u8, len as usize) };
    // SAFETY: TSEG, still open; see `install_and_relocate`.
    let tseg = unsafe { Region::new(plan.tseg_base, plan.tseg_size) };
    tseg.write(IMAGE_OFF, image);

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
        fail(format_args!(
            "SMRAM did not lock (SMRAM={smram:#04x}, ESMRAMC={esmramc:#04x}, TSEG reads {probe:#x}, expected all ones)"
        ));
    }
}

/// Raises one broadcast SMI and waits until the agent reports it served it.
pub fn self_test() {
    // SAFETY: RELOC_DATA is low RAM reserved for SMM bring-up (layout.rs).
    let data = unsafe { Region::new(RELOC_DATA, 0x1000) };
    data.write_u32(smi::SELFTEST_WORD, 0);
    chipset::raise_apm_smi(APM_CMD_FIRMWARE);
    if !pmtimer::wait_until(2_000_000, || data.read_u32(smi::SELFTEST_WORD) != 0) {
        fail(format_args!("the self-test SMI was not served within 2 s"));
    }
    log!(
        "self-test SMI served: {} of the CPUs present in SMM",
        data.read_u32(smi::SELFTEST_WORD)
    );
}
