//! Is this a q35 with SMRAM and SMI support, and where does TSEG go? Checks
//! the chipset, maps the PM I/O block and enables APM SMIs.

use smmvmi_boot::q35;

use super::error::BootError;
use crate::hw::chipset;
use crate::layout::MIN_TSEG;

/// Checks for q35 with SMRAM and SMI support; maps the PM I/O block (PM
/// timer, SMI_EN) and lets an APM write raise an SMI.
pub fn check_and_enable_smi() -> Result<(), BootError> {
    let id = chipset::mch_device_id();
    if id != q35::MCH_DEVICE_ID {
        return Err(BootError::NotQ35 { found: id });
    }
    // SMRAM already locked at the reset vector: this is not a platform reset
    // but an INIT of the boot CPU alone (guest root can send one; so did an
    // application processor that INIT took out of SMM before this firmware
    // parked such CPUs, which produced "ESMRAMC reads 0x3f" on reboots under
    // SMIs). The chipset keeps D_LCK until a platform reset, so ask for one:
    // the reboot the guest wanted then happens with SMRAM set up afresh.
    if q35::smram_locked(chipset::mch_read8(q35::MCH_SMRAM)) {
        crate::log!(
            "SMRAM is locked at the reset vector (an INIT of the boot CPU, not a platform reset): resetting the platform"
        );
        chipset::platform_reset();
    }
    let esmramc = chipset::mch_read8(q35::MCH_ESMRAMC);
    if !q35::smram_present(esmramc) {
        return Err(BootError::NoSmram { esmramc });
    }
    chipset::enable_pm_io();
    if chipset::smi_en() & q35::SMI_EN_APMC_EN != 0 {
        return Err(BootError::NoSmiSupport);
    }
    chipset::enable_apm_smi();
    Ok(())
}

/// TSEG's base and size: the size QEMU reports, at the top of RAM below
/// 4 GiB (`lowmem`).
pub fn tseg_range(lowmem: u64) -> Result<(u64, u64), BootError> {
    let size = chipset::tseg_bytes().ok_or(BootError::NoExtendedTseg)?;
    if size < MIN_TSEG {
        return Err(BootError::TsegTooSmall {
            size,
            need: MIN_TSEG,
        });
    }
    let base = q35::tseg_base(lowmem, size).ok_or(BootError::TsegDoesNotFit {
        lowmem,
        tseg_size: size,
    })?;
    Ok((base, size))
}
