//! The q35 chipset registers the firmware programs: MCH (SMRAM, TSEG,
//! MMCONFIG) and LPC (PM I/O base, SMI enables). Values come from
//! `smmvmi_boot::q35`; this module only performs the accesses.

use x86_64::instructions::port::Port;

use smmvmi_boot::q35;

use super::pci_cfg;

const MCH: (u8, u8, u8) = (0, q35::MCH_DEVICE, 0);
const LPC: (u8, u8, u8) = (0, q35::LPC_DEVICE, 0);

pub fn mch_read8(off: u8) -> u8 {
    pci_cfg::read8(MCH.0, MCH.1, MCH.2, off)
}
pub fn mch_write8(off: u8, v: u8) {
    pci_cfg::write8(MCH.0, MCH.1, MCH.2, off, v)
}
pub fn mch_device_id() -> u16 {
    pci_cfg::read16(MCH.0, MCH.1, MCH.2, 2)
}

/// TSEG size in bytes as QEMU reports it (extended TSEG register).
pub fn tseg_bytes() -> Option<u64> {
    pci_cfg::write16(
        MCH.0,
        MCH.1,
        MCH.2,
        q35::MCH_EXT_TSEG_MBYTES,
        q35::EXT_TSEG_QUERY,
    );
    q35::ext_tseg_bytes(pci_cfg::read16(
        MCH.0,
        MCH.1,
        MCH.2,
        q35::MCH_EXT_TSEG_MBYTES,
    ))
}

/// Enables MMCONFIG at `q35::PCIEXBAR_BASE` so QEMU's ACPI tables carry MCFG.
pub fn enable_mmconfig() {
    let v = q35::pciexbar_value();
    pci_cfg::write32(MCH.0, MCH.1, MCH.2, q35::MCH_PCIEXBAR + 4, (v >> 32) as u32);
    pci_cfg::write32(MCH.0, MCH.1, MCH.2, q35::MCH_PCIEXBAR, v as u32);
}

/// Maps the PM I/O block at PMBASE (PM timer, SMI_EN).
pub fn enable_pm_io() {
    pci_cfg::write32(LPC.0, LPC.1, LPC.2, q35::LPC_PMBASE, q35::pmbase_value());
    let cntl = pci_cfg::read8(LPC.0, LPC.1, LPC.2, q35::LPC_ACPI_CNTL);
    pci_cfg::write8(
        LPC.0,
        LPC.1,
        LPC.2,
        q35::LPC_ACPI_CNTL,
        cntl | q35::ACPI_CNTL_ACPI_EN,
    );
}

fn smi_en_port() -> Port<u32> {
    Port::new(q35::PMBASE + q35::SMI_EN_OFFSET)
}

pub fn smi_en() -> u32 {
    // SAFETY: SMI_EN in the PM I/O block mapped by `enable_pm_io`.
    unsafe { smi_en_port().read() }
}

/// Sets APMC_EN and GBL_SMI_EN: a write to port 0xB2 raises an SMI.
pub fn enable_apm_smi() {
    let v = q35::smi_en_enable_apm(smi_en());
    // SAFETY: SMI_EN in the PM I/O block; enabling APM SMIs is intended.
    unsafe { smi_en_port().write(v) };
}

/// GEN_PMCON_1.SMI_LOCK: GBL_SMI_EN can no longer be cleared until reset.
pub fn lock_smi_enable() {
    let v = pci_cfg::read8(LPC.0, LPC.1, LPC.2, q35::LPC_GEN_PMCON_1);
    pci_cfg::write8(
        LPC.0,
        LPC.1,
        LPC.2,
        q35::LPC_GEN_PMCON_1,
        q35::gen_pmcon_lock(v),
    );
}

/// Raises an SMI with an APM command write (to this CPU only, or to all
/// CPUs once broadcast is negotiated).
/// Resets the whole platform (chipset included) through RST_CNT; does not
/// return.
pub fn platform_reset() -> ! {
    // SAFETY: ICH9 Reset Control; a full reset is exactly what the caller
    // wants (QEMU restarts the machine; the write never returns on q35).
    unsafe { Port::<u8>::new(q35::RST_CNT_PORT).write(q35::RST_CNT_FULL_RESET) };
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

pub fn raise_apm_smi(command: u8) {
    // SAFETY: APM control port; the SMI it raises enters our own handler.
    unsafe { Port::<u8>::new(q35::APM_CNT_PORT).write(command) };
}

/// The last APM command byte written (which SMI this is, for test builds).
#[cfg(feature = "fault-injection")]
pub fn apm_command() -> u8 {
    // SAFETY: reading the APM control port returns the last command byte.
    unsafe { Port::<u8>::new(q35::APM_CNT_PORT).read() }
}

/// The CMOS real-time clock's date and time registers (seconds, minutes,
/// hours, day, month, year, century), raw. Used only as salt entropy.
pub fn rtc_bytes() -> [u8; 7] {
    let mut out = [0u8; 7];
    for (o, reg) in out
        .iter_mut()
        .zip([0x00u8, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32])
    {
        // SAFETY: CMOS index/data ports; selecting and reading a clock
        // register has no side effect (bit 7 of the index keeps NMIs as
        // they were on QEMU, which ignores it).
        *o = unsafe {
            Port::<u8>::new(0x70).write(reg);
            Port::<u8>::new(0x71).read()
        };
    }
    out
}
