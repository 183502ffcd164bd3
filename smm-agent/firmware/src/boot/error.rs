//! Why boot cannot go on: one enum, its messages (`Display`) and its exit
//! codes ([`BootError::exit_code`]) in this one place. Every message says
//! what was expected, what was found and what to do; the end-to-end tests
//! (`tests/tests/firmware_errors.rs`) check messages and codes.

use smmvmi_boot::e820::E820Error;
use smmvmi_boot::fw_cfg::FwCfgError;
use smmvmi_boot::linux::LinuxError;
use smmvmi_boot::paging::PagingError;
use smmvmi_boot::pci::PciError;
use smmvmi_boot::q35;
use smmvmi_boot::sev::HashesError;
use smmvmi_boot::table_loader::LoaderError;
use thiserror::Error;

use crate::hw::exit::{ExitCode, exit};
use crate::layout::{MAX_APIC_ID, MAX_CPUS, MAX_MAPPED_GIB};
use crate::log;

#[derive(Debug, Error)]
pub enum BootError {
    // --- fw_cfg and the memory map
    #[error("{0}")]
    FwCfg(FwCfgError),
    #[error("fw_cfg has no etc/e820 file: QEMU too old?")]
    NoE820File,
    #[error("etc/e820: {0}")]
    E820Read(FwCfgError),
    #[error("etc/e820: {0}")]
    E820Parse(E820Error),
    #[error("etc/e820 has no RAM above 1 MiB below 4 GiB")]
    NoLowRam,
    #[error("e820: {0}")]
    Handoff(E820Error),

    /// The page tables cannot be built as SEV needs them.
    #[error("SEV page tables: {0}")]
    Paging(PagingError),

    // --- chipset
    #[error(
        "host bridge device id {found:#06x}, expected q35 MCH {:#06x}: run with -machine q35",
        q35::MCH_DEVICE_ID
    )]
    NotQ35 { found: u16 },
    #[error(
        "ESMRAMC reads {esmramc:#04x}, expected {:#04x}: the machine has no SMRAM; run with -machine q35,smm=on",
        q35::ESMRAMC_RESET_WITH_SMRAM
    )]
    NoSmram { esmramc: u8 },
    #[error("SMI_EN.APMC_EN is set at reset: this QEMU has no SMI support (smm=off?)")]
    NoSmiSupport,
    #[error(
        "the MCH reports no extended TSEG; use QEMU >= 2.10 with -global mch.extended-tseg-mbytes=16"
    )]
    NoExtendedTseg,
    #[error(
        "TSEG is {} MiB, need at least {} MiB: add -global mch.extended-tseg-mbytes=16",
        .size >> 20,
        .need.div_ceil(1 << 20)
    )]
    TsegTooSmall { size: u64, need: u64 },
    #[error(
        "RAM below 4 GiB ends at {lowmem:#x}, too little for a {} MiB TSEG",
        .tseg_size >> 20
    )]
    TsegDoesNotFit { lowmem: u64, tseg_size: u64 },

    // --- PCI and ACPI
    #[error("{0}")]
    Pci(PciError),
    #[error(
        "QEMU provides no ACPI tables (no fw_cfg etc/table-loader): drop -no-acpi / acpi=off; Linux needs them to see every CPU"
    )]
    NoAcpiTables,
    #[error("{0}")]
    Acpi(LoaderError),

    // --- SMM bring-up (logged as "SMM setup failed: ...")
    #[error("fw_cfg reports {ncpus} CPUs; this firmware supports 1 to {MAX_CPUS}")]
    CpuCount { ncpus: u32 },
    #[error("RAM ends at {phys_end:#x}; the SMM page tables map at most {MAX_MAPPED_GIB} GiB")]
    TooMuchRam { phys_end: u64 },
    #[error(
        "the boot CPU has APIC ID {apic_id}; this firmware supports APIC IDs 0 to {MAX_APIC_ID}"
    )]
    BspApicId { apic_id: u32 },
    #[error(
        "the boot CPU took no SMI within 1 s of an APM write; is SMM enabled (-machine smm=on)?"
    )]
    BspNoSmi,
    #[error(
        "fw_cfg reports {ncpus} CPUs but only {arrived} of {want} application processors checked in within 10 s",
        want = .ncpus - 1
    )]
    ApsMissing { ncpus: u32, arrived: u32 },
    #[error(
        "an application processor has APIC ID {apic_id}; this firmware supports APIC IDs 0 to {MAX_APIC_ID}"
    )]
    ApApicId { apic_id: u32 },
    #[error(
        "fw_cfg reports {ncpus} CPUs but {} distinct APIC IDs relocated (mask {mask:#x})",
        .mask.count_ones()
    )]
    ApicIdsRelocated { ncpus: u32, mask: u64 },
    #[error(
        "QEMU offers no SMI feature negotiation (etc/smi/* fw_cfg files); use q35 with QEMU >= 2.9"
    )]
    NoSmiNegotiation,
    #[error(
        "QEMU does not offer SMI broadcast (supported features {supported:#x}); the host-injector needs it"
    )]
    NoSmiBroadcast { supported: u64 },
    #[error("writing {file}: {0}", file = q35::SMI_REQUESTED_FEATURES)]
    SmiFeaturesWrite(FwCfgError),
    #[error(
        "QEMU refused SMI features {want:#x} ({} reads {ok})",
        q35::SMI_FEATURES_OK
    )]
    SmiFeaturesRefused { want: u64, ok: u8 },
    #[error(
        "SMRAM did not lock (SMRAM={smram:#04x}, ESMRAMC={esmramc:#04x}, TSEG reads {probe:#x}, expected all ones)"
    )]
    SmramNotLocked { smram: u8, esmramc: u8, probe: u32 },
    #[error("the self-test SMI was not served within 2 s")]
    SelfTest,

    // --- Linux
    #[error("no kernel in fw_cfg: start QEMU with -kernel <bzImage> (and -initrd, -append)")]
    NoKernel,
    #[error("setup blob is {size} bytes, expected at most {max}: not a bzImage?")]
    SetupTooLarge { size: usize, max: usize },
    /// The kernel's setup header or command line is not what we can boot.
    #[error("{0}")]
    Kernel(LinuxError),
    /// Kernel and initrd do not fit below the reserved area.
    #[error("{0}")]
    KernelLayout(LinuxError),
    #[error("reading the kernel: {0}")]
    KernelRead(FwCfgError),
    #[error("reading the initrd: {0}")]
    InitrdRead(FwCfgError),
    /// Measured direct boot: a blob does not match the SEV hashes table,
    /// the table is malformed, or SEV is on without one.
    #[error("measured boot: {0}")]
    Measurement(HashesError),
}

impl BootError {
    /// The isa-debug-exit code that tells a test (or an operator) which
    /// class of problem stopped the machine.
    pub fn exit_code(&self) -> ExitCode {
        use BootError::*;
        match self {
            FwCfg(_) | NoE820File | E820Read(_) | E820Parse(_) | KernelRead(_) | InitrdRead(_) => {
                ExitCode::FwCfg
            }
            NoLowRam | Handoff(_) | TsegDoesNotFit { .. } | KernelLayout(_) => {
                ExitCode::TooLittleRam
            }
            NotQ35 { .. }
            | NoSmram { .. }
            | NoSmiSupport
            | NoExtendedTseg
            | TsegTooSmall { .. } => ExitCode::NoSmram,
            Pci(_) => ExitCode::Pci,
            NoAcpiTables | Acpi(_) => ExitCode::NoAcpi,
            CpuCount { .. }
            | TooMuchRam { .. }
            | BspApicId { .. }
            | BspNoSmi
            | ApsMissing { .. }
            | ApApicId { .. }
            | ApicIdsRelocated { .. }
            | NoSmiNegotiation
            | NoSmiBroadcast { .. }
            | SmiFeaturesWrite(_)
            | SmiFeaturesRefused { .. }
            | SmramNotLocked { .. }
            | SelfTest => ExitCode::SmmSetup,
            NoKernel => ExitCode::NoKernel,
            SetupTooLarge { .. } | Kernel(_) => ExitCode::BadKernel,
            // SEV: measured boot refused, or page tables SEV cannot use.
            Measurement(_) | Paging(_) => ExitCode::Measurement,
        }
    }

    /// Says why on the debug console and stops the machine with the code.
    pub fn stop(&self) -> ! {
        match self.exit_code() {
            ExitCode::SmmSetup => log!("SMM setup failed: {self}"),
            _ => log!("error: {self}"),
        }
        exit(self.exit_code())
    }
}
