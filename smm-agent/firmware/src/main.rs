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
//! It trusts QEMU's fw_cfg to describe the machine (bounds are still
//! checked); it trusts nothing that the guest OS or the host writes into the
//! mailbox. It must never read SMRAM or MMIO on anyone's behalf, and every
//! SMI it takes must return.
#![no_std]
#![no_main]

mod acpi;
mod agent;
mod chipset;
mod console;
mod exceptions;
mod exit;
mod fwcfg;
mod lapic;
mod layout;
mod linux;
mod memory;
mod pci_cfg;
mod pmtimer;
mod smi;
mod smm;
mod tsc;

use core::arch::global_asm;
use core::sync::atomic::Ordering;

use smmvmi_boot::e820::{self, E820Map};
use smmvmi_boot::fw_cfg as fwc;
use smmvmi_boot::pci;
use smmvmi_boot::q35;

use exit::{ExitCode, exit};
use fwcfg::FwCfg;
use smi::SMM;

global_asm!(include_str!("asm/x86.s"), options(att_syntax));
global_asm!(include_str!("asm/reset.s"), options(att_syntax));
global_asm!(include_str!("asm/mem.s"), options(att_syntax));
global_asm!(include_str!("asm/smm.s"), options(att_syntax));

/// The mailbox device: QEMU `ivshmem-plain` (1af4:1110), shared memory in BAR2.
use smmvmi_mailbox::platform::{
    IVSHMEM_BAR_SHMEM as IVSHMEM_BAR, IVSHMEM_DEVICE_ID as IVSHMEM_DEVICE,
    IVSHMEM_VENDOR_ID as IVSHMEM_VENDOR,
};

fn mailbox_min() -> u64 {
    smmvmi_mailbox::layout::MIN_MAILBOX_SIZE as u64
}

fn fatal(code: ExitCode, msg: core::fmt::Arguments) -> ! {
    log!("error: {msg}");
    exit(code)
}

#[unsafe(no_mangle)]
extern "C" fn firmware_main() -> ! {
    exceptions::init();
    log!("firmware {} starting", env!("CARGO_PKG_VERSION"));

    let mut fw = FwCfg { dma: false };
    if let Err(e) = fwc::check_signature(&mut fw) {
        fatal(ExitCode::FwCfg, format_args!("{e}"));
    }
    fw.dma = fwc::dma_supported(&mut fw);

    // Chipset: is this q35 with SMRAM and SMI support?
    let id = chipset::mch_device_id();
    if id != q35::MCH_DEVICE_ID {
        fatal(
            ExitCode::NoSmram,
            format_args!(
                "host bridge device id {id:#06x}, expected q35 MCH {:#06x}: run with -machine q35",
                q35::MCH_DEVICE_ID
            ),
        );
    }
    let esmramc = chipset::mch_read8(q35::MCH_ESMRAMC);
    if !q35::smram_present(esmramc) {
        fatal(
            ExitCode::NoSmram,
            format_args!(
                "ESMRAMC reads {esmramc:#04x}, expected {:#04x}: the machine has no SMRAM; run with -machine q35,smm=on",
                q35::ESMRAMC_RESET_WITH_SMRAM
            ),
        );
    }
    chipset::enable_pm_io();
    if chipset::smi_en() & q35::SMI_EN_APMC_EN != 0 {
        fatal(
            ExitCode::NoSmram,
            format_args!("SMI_EN.APMC_EN is set at reset: this QEMU has no SMI support (smm=off?)"),
        );
    }
    chipset::enable_apm_smi();

    // Memory map.
    let e820 = read_e820(&mut fw);
    let Some(lowmem) = e820.lowmem_top() else {
        fatal(
            ExitCode::TooLittleRam,
            format_args!("etc/e820 has no RAM above 1 MiB below 4 GiB"),
        );
    };
    let Some(tseg_size) = chipset::tseg_bytes() else {
        fatal(
            ExitCode::NoSmram,
            format_args!(
                "the MCH reports no extended TSEG; use QEMU >= 2.10 with -global mch.extended-tseg-mbytes=16"
            ),
        );
    };
    if tseg_size < smm::MIN_TSEG {
        fatal(
            ExitCode::NoSmram,
            format_args!(
                "TSEG is {} MiB, need at least {} MiB: add -global mch.extended-tseg-mbytes=16",
                tseg_size >> 20,
                smm::MIN_TSEG.div_ceil(1 << 20)
            ),
        );
    }
    let Some(tseg_base) = q35::tseg_base(lowmem, tseg_size) else {
        fatal(
            ExitCode::TooLittleRam,
            format_args!(
                "RAM below 4 GiB ends at {lowmem:#x}, too little for a {} MiB TSEG",
                tseg_size >> 20
            ),
        );
    };
    log!("tseg base={tseg_base:#x} size={tseg_size:#x}");
    let acpi_base = tseg_base - acpi::AREA_LEN;

    // PCI: MMCONFIG first, BARs next; QEMU builds the ACPI tables (MCFG,
    // _CRS of the host bridge) from both when the table-loader is read.
    chipset::enable_mmconfig();
    let windows = pci::Windows {
        mem_hole: Some((q35::PCIEXBAR_BASE, q35::PCIEXBAR_BASE + q35::PCIEXBAR_SIZE)),
        ..pci::Windows::default()
    };
    let assigned = match pci::assign(&mut pci_cfg::Cf8, &windows) {
        Ok(a) => a,
        Err(e) => fatal(ExitCode::Pci, format_args!("{e}")),
    };
    for b in assigned.bars() {
        log!(
            "pci {:02x}:{:02x}.{} {:04x}:{:04x} BAR{} {:?} {:#x}+{:#x}",
            b.bdf.bus,
            b.bdf.dev,
            b.bdf.func,
            b.vendor,
            b.device,
            b.bar,
            b.kind,
            b.addr,
            b.size
        );
    }
    match assigned.find(IVSHMEM_VENDOR, IVSHMEM_DEVICE, IVSHMEM_BAR) {
        Some(b) if b.size > smm::REPLY_BUF_LEN || b.size < mailbox_min() => log!(
            "error: the ivshmem-plain BAR is {} KiB; the agent supports {} KiB to {} KiB (e.g. size=1M): no mailbox",
            b.size >> 10,
            mailbox_min() >> 10,
            smm::REPLY_BUF_LEN >> 10
        ),
        Some(b) => {
            let bdf = u32::from(b.bdf.bus) << 8 | u32::from(b.bdf.dev) << 3 | u32::from(b.bdf.func);
            SMM.mailbox_pa.store(b.addr, Ordering::Relaxed);
            SMM.mailbox_len.store(b.size, Ordering::Relaxed);
            SMM.mailbox_bdf.store(bdf, Ordering::Relaxed);
            smi::announce_booting(b.addr, b.size);
            log!(
                "mailbox: ivshmem BAR{IVSHMEM_BAR} at {:#x}, {} KiB",
                b.addr,
                b.size >> 10
            );
        }
        None => log!("no ivshmem-plain device: the agent has no mailbox and will serve nothing"),
    }
    let rsdp = match acpi::install(&mut fw, acpi_base) {
        Ok(None) => fatal(
            ExitCode::NoAcpi,
            format_args!(
                "QEMU provides no ACPI tables (no fw_cfg etc/table-loader): drop -no-acpi / acpi=off; Linux needs them to see every CPU"
            ),
        ),
        Ok(Some(loaded)) => match loaded.rsdp() {
            Ok(r) => r,
            Err(e) => fatal(ExitCode::NoAcpi, format_args!("{e}")),
        },
        Err(e) => fatal(ExitCode::NoAcpi, format_args!("{e}")),
    };
    log!("ACPI tables at {acpi_base:#x}, RSDP {rsdp:#x}");

    let ncpus = fwc::read_u16_le(&mut fw, fwc::NB_CPUS).into();
    let plan = smm::Plan {
        tseg_base,
        tseg_size,
        ncpus,
        phys_end: e820.highest_ram_end(),
    };
    let cpu_mask = smm::install_and_relocate(&plan);
    SMM.cpu_mask.store(cpu_mask, Ordering::Relaxed);
    log!("SMBASE relocated on {ncpus} CPUs (APIC IDs mask {cpu_mask:#x})");
    let features = smm::negotiate_broadcast(&mut fw);
    SMM.ncpus.store(ncpus, Ordering::Relaxed);
    SMM.tseg_base.store(tseg_base, Ordering::Relaxed);
    SMM.tseg_size.store(tseg_size, Ordering::Relaxed);
    SMM.features.store(features, Ordering::Relaxed);
    SMM.boot_selftest.store(true, Ordering::Relaxed);
    SMM.tsc_per_ms.store(tsc::calibrate(), Ordering::Relaxed);
    let mut handoff = e820.clone();
    let reserve = [
        (tseg_base, tseg_size, e820::RESERVED),
        (acpi_base, acpi::AREA_LEN, e820::ACPI),
    ];
    let carved = reserve
        .iter()
        .try_for_each(|&(addr, len, kind)| handoff.reserve(addr, len, kind))
        .and_then(|()| handoff.add_legacy_holes());
    if let Err(e) = carved {
        fatal(ExitCode::TooLittleRam, format_args!("e820: {e}"));
    }
    agent::provision(&mut fw, &handoff, tseg_base, tseg_size);
    smm::seal(&plan);
    agent::scrub_boot_copy();
    smm::self_test();
    log!("SMM locked; SMI broadcast on");

    let prepared = linux::prepare(&mut fw, &handoff, acpi_base, rsdp);
    linux::enter(prepared)
}

fn read_e820(fw: &mut FwCfg) -> E820Map {
    let file = match fwc::find_file(fw, "etc/e820") {
        Ok(Some(f)) => f,
        Ok(None) => fatal(
            ExitCode::FwCfg,
            format_args!("fw_cfg has no etc/e820 file: QEMU too old?"),
        ),
        Err(e) => fatal(ExitCode::FwCfg, format_args!("{e}")),
    };
    let mut buf = [0u8; smmvmi_boot::e820::CAPACITY * smmvmi_boot::e820::ENTRY_LEN];
    let bytes = match fwc::read_item(fw, file.select, file.size, &mut buf) {
        Ok(b) => b,
        Err(e) => fatal(ExitCode::FwCfg, format_args!("etc/e820: {e}")),
    };
    match E820Map::parse(bytes) {
        Ok(m) => m,
        Err(e) => fatal(ExitCode::FwCfg, format_args!("etc/e820: {e}")),
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    console::print(format_args!("smmvmi: PANIC: {info}\n"));
    if smi::in_smm() {
        // In SMM a panic must not stop the machine: take the fault path
        // (reported in the mailbox, the SMI returns, the VM runs on).
        // SAFETY: `ud2` raises #UD, which the SMM IDT turns into
        // `smi::on_exception` and the SMI's normal exit.
        unsafe { core::arch::asm!("ud2", options(nomem, nostack, noreturn)) }
    }
    exit(ExitCode::Panic)
}

/// The prebuilt `core` is compiled with unwinding tables that name this
/// symbol; with `panic = "abort"` it is never called.
#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}
