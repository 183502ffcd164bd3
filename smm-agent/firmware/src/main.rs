//! smmvmi firmware for QEMU's q35 machine.
//!
//! Boots a Linux bzImage handed over by fw_cfg, and before Linux runs sets up
//! System Management Mode: TSEG, SMBASE relocation of every CPU, SMI broadcast,
//! SMI_LOCK and D_LCK. Every later SMI enters the agent in locked SMRAM.
//!
//! This crate is the hardware-access room: every `unsafe` block of the
//! firmware lives here, each with a SAFETY comment. The decisions (what to
//! load where, how to parse fw_cfg, what the agent answers) are in the
//! `#![forbid(unsafe_code)]` crates `smmvmi-boot`, `smmvmi-agent` and
//! `smmvmi-mailbox`, which are tested on the host.
//!
//! # Layers
//! Modules import only downward:
//!
//! 1. [`hw`]: the accesses themselves (I/O ports, PCI configuration, CPU
//!    registers, TSC and PM timer, local APIC, debug console and exit, raw
//!    memory as bounds-checked `Region`s, chipset registers, the fw_cfg
//!    device, the IDT). Imports no other firmware module.
//! 2. [`layout`]: every fixed address, size, offset and command number. The
//!    assembly (`src/asm/*.s`) receives them as `const` operands of
//!    `global_asm!` below, never as literals of its own.
//! 3. [`smm`] and [`boot`]: the SMM runtime (SMI entry and rendezvous, the
//!    agent glue, what an exception does in SMM and before Linux) and the one-time boot steps (fw_cfg, e820,
//!    PCI, ACPI, TSEG install/relocate/seal, Linux). `smm` never imports
//!    `boot`; `boot` uses of `smm` only `smm::config`, the configuration
//!    type and the one step that seals it into TSEG.
//! 4. `main` (this file): runs the boot steps in order, and on the first
//!    [`boot::error::BootError`] stops the machine with that error's message
//!    and exit code.
//!
//! What SMM relies on from boot is one value, `smm::config::SmmConfig`,
//! written into the image only by `OpenTseg::seal`, the step that copies the
//! image into TSEG: no store can come after the copy and be lost.
//!
//! It trusts QEMU's fw_cfg to describe the machine (bounds are still
//! checked); it trusts nothing that the guest OS or the host writes into the
//! mailbox. It must never read SMRAM or MMIO on anyone's behalf, and every
//! SMI it takes must return.
#![no_std]
#![no_main]

mod boot;
mod hw;
mod layout;
mod smm;

use core::arch::global_asm;

use smmvmi_boot::e820 as e820_kind;
use smmvmi_boot::fw_cfg as fwc;
use smmvmi_boot::q35;
use smmvmi_mailbox::layout as mb;
use smmvmi_mailbox::records;

use boot::error::BootError;
use boot::{acpi, e820, linux, pci, platform, tseg};
use hw::exit::{ExitCode, exit};
use hw::fw_cfg::FwCfg;
use hw::tsc;
use smm::config::{OpenTseg, SmmConfig};
use smm::{agent, smi};

// The assembly takes every layout fact as a `const` operand (`{NAME}` in
// the .s file), never as a literal of its own.
global_asm!(include_str!("asm/x86.s"), options(att_syntax));
global_asm!(
    include_str!("asm/reset.s"),
    BOOT_PML4 = const layout::BOOT_PML4,
    BOOT_PDPT = const layout::BOOT_PDPT,
    BOOT_PD = const layout::BOOT_PD,
    BOOT_PT_PAGES = const layout::BOOT_PT_PAGES,
    SEL_CODE32 = const layout::SEL_CODE32,
    SEL_CODE64 = const layout::SEL_CODE64,
    SEL_DATA = const layout::SEL_DATA,
    CPUID_SEV_LEAF = const smmvmi_boot::sev::CPUID_SEV_LEAF,
    CPUID_SEV_SUPPORTED = const smmvmi_boot::sev::CPUID_SEV_SUPPORTED,
    CPUID_C_BIT_MASK = const smmvmi_boot::sev::CPUID_C_BIT_MASK,
    MSR_SEV_STATUS = const smmvmi_boot::sev::MSR_SEV_STATUS,
    SEV_STATUS_SEV_ENABLED = const smmvmi_boot::sev::SEV_STATUS_SEV_ENABLED,
    options(att_syntax)
);
global_asm!(include_str!("asm/mem.s"), options(att_syntax));
global_asm!(
    include_str!("asm/smm.s"),
    RELOC_DATA = const layout::RELOC_DATA,
    RELOC_NEXT_SMBASE = const layout::RELOC_NEXT_SMBASE,
    RELOC_DONE = const layout::RELOC_DONE,
    RELOC_AP_TICKET = const layout::RELOC_AP_TICKET,
    RELOC_AP_TURN = const layout::RELOC_AP_TURN,
    RELOC_TILES_BASE = const layout::RELOC_TILES_BASE,
    RELOC_CPU_MASK = const layout::RELOC_CPU_MASK,
    RELOC_BAD_APIC_ID = const layout::RELOC_BAD_APIC_ID,
    RELOC_AP_STACK_TOP = const layout::RELOC_AP_STACK_TOP,
    TILE_SHIFT = const layout::TILE_SHIFT,
    MAX_APIC_ID = const layout::MAX_APIC_ID,
    SMI_ENTRY_OFFSET = const layout::SMI_ENTRY_OFFSET,
    SAVE_STATE_SMBASE = const layout::SAVE_STATE_SMBASE,
    PERCPU_FXSAVE = const layout::PERCPU_FXSAVE,
    PERCPU_SAVED_RSP = const layout::PERCPU_SAVED_RSP,
    SEL_CODE32 = const layout::SEL_CODE32,
    SEL_CODE64 = const layout::SEL_CODE64,
    SEL_DATA = const layout::SEL_DATA,
    GDT_ENTRIES = const layout::GDT_ENTRIES,
    APM_CNT_PORT = const q35::APM_CNT_PORT,
    APM_CMD_FIRMWARE = const layout::APM_CMD_FIRMWARE,
    options(att_syntax)
);

// SAFETY: a unique symbol name, called once by `start64` (asm/reset.s)
// with the C ABI, no arguments, and never returned from.
#[unsafe(no_mangle)]
extern "C" fn firmware_main() -> ! {
    hw::idt::init();
    log!("firmware {} starting", env!("CARGO_PKG_VERSION"));
    match boot() {
        Ok(prepared) => linux::enter(prepared),
        Err(e) => e.stop(),
    }
}

/// Every boot step, in order: the machine, SMM (sealed and locked), then
/// Linux loaded and ready to enter.
fn boot() -> Result<linux::Prepared, BootError> {
    // SEV: the C-bit the reset path used, and the fw_cfg DMA area shared
    // before the first DMA.
    let sev = hw::cpu::sev_config();
    boot::paging::init(&sev)?;
    let mut fw = FwCfg { dma: false };
    fwc::check_signature(&mut fw).map_err(BootError::FwCfg)?;
    fw.dma = fwc::dma_supported(&mut fw);

    // Chipset: is this q35 with SMRAM and SMI support?
    platform::check_and_enable_smi()?;

    // Memory map.
    let e820 = e820::read(&mut fw)?;
    boot::paging::apply_ram_map(&sev, &e820)?;
    let lowmem = e820.lowmem_top().ok_or(BootError::NoLowRam)?;
    let (tseg_base, tseg_size) = platform::tseg_range(lowmem)?;
    log!("tseg base={tseg_base:#x} size={tseg_size:#x}");
    let acpi_base = tseg_base - layout::ACPI_AREA_LEN;

    // PCI before ACPI: QEMU builds the tables from both.
    let (mailbox, virtio_mem) = pci::assign()?;
    let rsdp = acpi::install(&mut fw, acpi_base)?;
    log!("ACPI tables at {acpi_base:#x}, RSDP {rsdp:#x}");

    // SAFETY: the ACPI area the table-loader just filled: firmware-owned RAM
    // below TSEG, identity mapped, nothing else writes it before Linux; the
    // slice is dropped before Linux runs.
    let acpi_tables = unsafe {
        core::slice::from_raw_parts(acpi_base as *const u8, layout::ACPI_AREA_LEN as usize)
    };
    let memhp = boot::memhp::plan(&mut fw, &e820, acpi_tables, lowmem, (tseg_base, tseg_size));
    let ncpus = fwc::read_u16_le(&mut fw, fwc::NB_CPUS).into();
    // DIMMs plugged later are RAM too (private under SEV).
    let hotplug = memhp.map(|hp| (hp.window.0, hp.window.1 - hp.window.0));
    let ram = boot::paging::RamRanges::new(&e820, hotplug);
    let plan = tseg::Plan {
        ncpus,
        // The SMM alias of guest memory covers DIMMs plugged later too.
        phys_end: e820
            .highest_ram_end()
            .max(memhp.map_or(0, |hp| hp.window.1)),
        ram: ram.as_slice(),
        sev,
    };
    // SAFETY: [tseg_base, +tseg_size) is TSEG as the MCH reports it, at the
    // top of RAM below 4 GiB (platform::tseg_range), open since reset (T_EN
    // clear), identity mapped by the boot page tables, and used by nothing
    // else before Linux.
    let Some(open) = (unsafe { OpenTseg::claim(tseg_base, tseg_size) }) else {
        unreachable!("TSEG is claimed once, here");
    };
    let installed = tseg::install_and_relocate(&open, &plan)?;
    let cpu_mask = installed.cpu_mask;
    log!("SMBASE relocated on {ncpus} CPUs (APIC IDs mask {cpu_mask:#x})");
    let doorbell = mailbox.is_some_and(|m| m.doorbell.is_some());
    let features =
        tseg::negotiate_broadcast(&mut fw)? | if doorbell { mb::FEATURE_DOORBELL } else { 0 };
    let config = SmmConfig {
        smm_cr3: installed.smm_cr3,
        ncpus,
        cpu_mask,
        mailbox,
        features,
        memhp,
        mem_flags: if memhp.is_some() {
            records::MEM_DIMM_HOTPLUG
        } else {
            0
        } | if virtio_mem {
            records::MEM_VIRTIO_MEM_REFUSED
        } else {
            0
        },
        tsc_per_ms: tsc::calibrate(),
    };
    let handoff = e820::handoff(
        &e820,
        &[
            (tseg_base, tseg_size, e820_kind::RESERVED),
            (acpi_base, layout::ACPI_AREA_LEN, e820_kind::ACPI),
        ],
    )?;
    agent::provision(&mut fw, &handoff, tseg_base, tseg_size);
    tseg::lock(open.seal(config))?;
    agent::scrub_boot_copy();
    tseg::self_test()?;
    log!("SMM locked; SMI broadcast on");

    linux::prepare(&mut fw, &handoff, acpi_base, rsdp, sev.active)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    hw::console::print(format_args!("smmvmi: PANIC: {info}\n"));
    if smi::in_smm() {
        // In SMM a panic must not stop the machine: take the fault path
        // (reported in the mailbox, the SMI returns, the VM runs on).
        // The SMM IDT turns the #UD into `smi::on_exception` and the SMI's
        // normal exit.
        hw::cpu::raise_invalid_opcode()
    }
    exit(ExitCode::Panic)
}

/// The prebuilt `core` is compiled with unwinding tables that name this
/// symbol; with `panic = "abort"` it is never called.
// SAFETY: a unique symbol name that nothing calls (see above).
#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}
