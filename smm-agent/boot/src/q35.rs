//! q35 (MCH + ICH9) register offsets and the values the firmware writes to
//! bring up SMRAM, SMIs and MMCONFIG — one documented list of magic numbers
//! plus small pure functions computing register values.
//!
//! Facts from QEMU 7.2 `hw/pci-host/q35.c`, `hw/isa/lpc_ich9.c`, checked in
//! `shared/notes/q35-smm.md`.

/// MCH (host bridge): bus 0, device 0, function 0.
pub const MCH_DEVICE: u8 = 0;
/// MCH PCI device id.
pub const MCH_DEVICE_ID: u16 = 0x29C0;
/// LPC/ICH9 bridge: bus 0, device 0x1f, function 0.
pub const LPC_DEVICE: u8 = 0x1f;

/// MCH: PCIEXBAR (64-bit, offset 0x60), MMCONFIG base/size/enable.
pub const MCH_PCIEXBAR: u8 = 0x60;
/// MMCONFIG base the firmware programs.
pub const PCIEXBAR_BASE: u64 = 0xB000_0000;
/// MMCONFIG size: 256 buses × 1 MiB.
pub const PCIEXBAR_SIZE: u64 = 256 << 20;
/// PCIEXBAR enable bit.
pub const PCIEXBAR_EN: u64 = 1 << 0;
/// PCIEXBAR length field (bits 2:1): 00b = 256 MiB.
pub const PCIEXBAR_LENGTH_256M: u64 = 0 << 1;

/// MCH: extended TSEG size register (16-bit, offset 0x50). Writing 0xFFFF
/// makes it read back the size in MiB.
pub const MCH_EXT_TSEG_MBYTES: u8 = 0x50;
/// Value written to [`MCH_EXT_TSEG_MBYTES`] to query the size.
pub const EXT_TSEG_QUERY: u16 = 0xFFFF;
/// MCH: SMRAM control (8-bit, offset 0x9D).
pub const MCH_SMRAM: u8 = 0x9D;
/// MCH: extended SMRAM control (8-bit, offset 0x9E).
pub const MCH_ESMRAMC: u8 = 0x9E;
/// MCH: F_SMBASE (leave 0 so 0x30000 stays RAM for relocation).
pub const MCH_F_SMBASE: u8 = 0x9C;

/// SMRAM: D_OPEN — SMRAM visible outside SMM.
pub const SMRAM_D_OPEN: u8 = 0x40;
/// SMRAM: D_CLS — SMRAM data hidden even in SMM.
pub const SMRAM_D_CLS: u8 = 0x20;
/// SMRAM: D_LCK — locks SMRAM/ESMRAMC until reset.
pub const SMRAM_D_LCK: u8 = 0x10;
/// SMRAM: G_SMRAME — global SMRAM enable.
pub const SMRAM_G_SMRAME: u8 = 0x08;
/// ESMRAMC: T_EN — TSEG enable.
pub const ESMRAMC_T_EN: u8 = 0x01;
/// ESMRAMC: TSEG size field (bits 2:1).
pub const ESMRAMC_TSEG_SZ_MASK: u8 = 0x06;
/// ESMRAMC: TSEG size code 11b — size from [`MCH_EXT_TSEG_MBYTES`].
pub const ESMRAMC_TSEG_SZ_EXT: u8 = 0x06;
/// ESMRAMC reads this at reset when the machine has SMRAM (`smm=on`).
pub const ESMRAMC_RESET_WITH_SMRAM: u8 = 0x38;

/// LPC: PMBASE (32-bit, offset 0x40).
pub const LPC_PMBASE: u8 = 0x40;
/// PM I/O base the firmware programs.
pub const PMBASE: u16 = 0x600;
/// LPC: ACPI_CNTL (8-bit, offset 0x44).
pub const LPC_ACPI_CNTL: u8 = 0x44;
/// ACPI_CNTL: ACPI_EN — map the PM I/O block.
pub const ACPI_CNTL_ACPI_EN: u8 = 0x80;
/// LPC: GEN_PMCON_1 (offset 0xA0).
pub const LPC_GEN_PMCON_1: u8 = 0xA0;
/// GEN_PMCON_1: SMI_LOCK (bit 4) — GBL_SMI_EN can no longer be cleared.
pub const GEN_PMCON_1_SMI_LOCK: u8 = 1 << 4;

/// SMI_EN register offset from PMBASE (32-bit).
pub const SMI_EN_OFFSET: u16 = 0x30;
/// SMI_STS register offset from PMBASE (32-bit).
pub const SMI_STS_OFFSET: u16 = 0x34;
/// SMI_EN: GBL_SMI_EN (bit 0).
pub const SMI_EN_GBL_SMI_EN: u32 = 1 << 0;
/// SMI_EN: APMC_EN (bit 5) — APM port writes raise SMIs.
pub const SMI_EN_APMC_EN: u32 = 1 << 5;

/// APM control port (writing raises the SMI) and status port (a data byte
/// for the handler): platform facts shared with the host and the harness.
pub use smmvmi_mailbox::platform::{APM_CNT_PORT, APM_STS_PORT};
/// APM commands QEMU consumes itself (ACPI enable/disable): no SMI.
pub const APM_RESERVED_COMMANDS: [u8; 2] = [0x02, 0x03];

/// fw_cfg file: supported SMI features (u64 LE).
pub const SMI_SUPPORTED_FEATURES: &str = "etc/smi/supported-features";
/// fw_cfg file: requested SMI features (u64 LE, written by DMA).
pub const SMI_REQUESTED_FEATURES: &str = "etc/smi/requested-features";
/// fw_cfg file: 1 once the requested features were accepted and locked.
pub const SMI_FEATURES_OK: &str = "etc/smi/features-ok";
/// SMI feature bit: broadcast (an APM write interrupts every CPU).
pub const SMI_FEATURE_BROADCAST: u64 = 1 << 0;
/// SMI feature bit: CPU hotplug.
pub const SMI_FEATURE_CPU_HOTPLUG: u64 = 1 << 1;
/// SMI feature bit: CPU hot-unplug.
pub const SMI_FEATURE_CPU_HOTUNPLUG: u64 = 1 << 2;

/// Default SMBASE at reset.
pub const DEFAULT_SMBASE: u64 = 0x3_0000;
/// SMI entry offset from SMBASE.
pub const SMI_ENTRY_OFFSET: u64 = 0x8000;
/// SMBASE field in the save state, offset from SMBASE.
pub const SAVE_STATE_SMBASE_OFFSET: u64 = 0xFF00;

/// PCIEXBAR value (64-bit) for MMCONFIG at [`PCIEXBAR_BASE`], 256 MiB, enabled.
pub const fn pciexbar_value() -> u64 {
    PCIEXBAR_BASE | PCIEXBAR_LENGTH_256M | PCIEXBAR_EN
}

/// TSEG size in bytes from the value read back from [`MCH_EXT_TSEG_MBYTES`]
/// after writing [`EXT_TSEG_QUERY`]; `None` if it reads 0 (no extended TSEG)
/// or the query value itself (register not implemented).
pub const fn ext_tseg_bytes(readback: u16) -> Option<u64> {
    if readback == 0 || readback == EXT_TSEG_QUERY {
        None
    } else {
        Some((readback as u64) << 20)
    }
}

/// True if ESMRAMC's reset value says the machine has SMRAM.
pub const fn smram_present(esmramc_at_reset: u8) -> bool {
    esmramc_at_reset == ESMRAMC_RESET_WITH_SMRAM
}

/// ESMRAMC value that closes TSEG: extended size code and T_EN set.
pub const fn esmramc_close(value: u8) -> u8 {
    (value & !ESMRAMC_TSEG_SZ_MASK) | ESMRAMC_TSEG_SZ_EXT | ESMRAMC_T_EN
}

/// ESMRAMC value with TSEG disabled (open for installing the handler).
pub const fn esmramc_open(value: u8) -> u8 {
    value & !ESMRAMC_T_EN
}

/// SMRAM value that enables SMRAM with D_OPEN/D_CLS clear and D_LCK not yet set.
pub const fn smram_enable(value: u8) -> u8 {
    (value & !(SMRAM_D_LCK | SMRAM_D_OPEN | SMRAM_D_CLS)) | SMRAM_G_SMRAME
}

/// SMRAM value that locks it (D_LCK), keeping G_SMRAME and D_OPEN clear.
pub const fn smram_lock(value: u8) -> u8 {
    (smram_enable(value)) | SMRAM_D_LCK
}

/// ICH9 Reset Control register (I/O port 0xCF9): writing
/// [`RST_CNT_FULL_RESET`] resets the whole platform, chipset included
/// (QEMU `hw/isa/lpc_ich9.c`, `ich9_rst_cnt_write`).
pub const RST_CNT_PORT: u16 = 0xCF9;
/// RST_CNT: system reset (bit 1) + reset CPU (bit 2).
pub const RST_CNT_FULL_RESET: u8 = 0x06;

/// True if the SMRAM register reads locked.
pub const fn smram_locked(value: u8) -> bool {
    value & SMRAM_D_LCK != 0
}

/// SMI_EN value that enables APM SMIs globally.
pub const fn smi_en_enable_apm(value: u32) -> u32 {
    value | SMI_EN_APMC_EN | SMI_EN_GBL_SMI_EN
}

/// GEN_PMCON_1 value with SMI_LOCK set.
pub const fn gen_pmcon_lock(value: u8) -> u8 {
    value | GEN_PMCON_1_SMI_LOCK
}

/// PMBASE register value (bit 0 is the I/O space indicator).
pub const fn pmbase_value() -> u32 {
    PMBASE as u32 | 1
}

/// TSEG base given the top of RAM below 4 GiB and the TSEG size;
/// `None` if TSEG would not fit or the result is not 1 MiB aligned.
pub const fn tseg_base(lowmem_end: u64, tseg_bytes: u64) -> Option<u64> {
    match lowmem_end.checked_sub(tseg_bytes) {
        Some(b) if b.is_multiple_of(1 << 20) && b >= (1 << 20) => Some(b),
        _ => None,
    }
}

/// SMBASE for CPU `index` when CPUs get slots `stride` bytes apart above
/// `first` (the save state occupies SMBASE+0xFE00..SMBASE+0x10000 and the
/// entry stub starts at SMBASE+0x8000, so the stride must keep both apart;
/// EDK2 uses 0x2000). `None` on overflow or at/above 4 GiB.
pub const fn smbase_for_cpu(first: u64, index: u32, stride: u64) -> Option<u64> {
    match (index as u64).checked_mul(stride) {
        Some(off) => match first.checked_add(off) {
            Some(b) if b < (1 << 32) => Some(b),
            _ => None,
        },
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observed_values() {
        // The notes observed SMRAM=0x1A, ESMRAMC=0x3F after close + lock.
        assert_eq!(esmramc_close(ESMRAMC_RESET_WITH_SMRAM), 0x3F);
        assert_eq!(smram_lock(0x02), 0x1A);
        assert_eq!(smram_enable(0x02), 0x0A);
        assert_eq!(smram_enable(0x4A), 0x0A);
        assert!(smram_locked(0x1A));
        assert!(!smram_locked(0x0A));
        assert_eq!(esmramc_open(0x3F), 0x3E);
        assert!(smram_present(0x38));
        assert!(!smram_present(0x00));
    }

    #[test]
    fn register_values() {
        assert_eq!(pciexbar_value(), 0xB000_0001);
        assert_eq!(ext_tseg_bytes(16), Some(16 << 20));
        assert_eq!(ext_tseg_bytes(0), None);
        assert_eq!(ext_tseg_bytes(0xFFFF), None);
        assert_eq!(smi_en_enable_apm(0), 0x21);
        assert_eq!(gen_pmcon_lock(0x01), 0x11);
        assert_eq!(pmbase_value(), 0x601);
        assert_eq!(tseg_base(0x8000_0000, 16 << 20), Some(0x7F00_0000));
        assert_eq!(tseg_base(16 << 20, 16 << 20), None);
        assert_eq!(tseg_base(0x8000_0000 + 4096, 16 << 20), None);
        assert_eq!(smbase_for_cpu(0x7F00_0000, 3, 0x2000), Some(0x7F00_6000));
        assert_eq!(smbase_for_cpu(0xFFFF_F000, 1, 0x2000), None);
        assert_eq!(smbase_for_cpu(0, u32::MAX, u64::MAX), None);
    }
}
