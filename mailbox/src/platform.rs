//! Platform constants: every number that the firmware, the host-injector,
//! the IDS, xtask and the test harness must agree on about the machine,
//! in one place (Firecracker's `arch/x86_64/layout.rs` idea). Each item
//! names where the fact comes from.
//!
//! Addresses and sizes private to the firmware (its RAM layout, TSEG tiles)
//! stay in the firmware's own `layout`; this module holds only what crosses
//! a crate or process boundary.

// ---- SMIs: the APM ports of the q35 ICH9 LPC bridge ------------------------

/// APM control port: writing a command byte raises an SMI (ICH9 `APM_CNT`,
/// QEMU `hw/isa/apm.c`). The host raises one with HMP `o /b 0xb2 CMD`.
pub const APM_CNT_PORT: u16 = 0xb2;
/// APM status port: a data byte for the SMI handler (ICH9 `APM_STS`).
pub const APM_STS_PORT: u16 = 0xb3;

/// APM command "serve the mailbox": what the host, the guest's `smi` tool
/// and the tests write. Any command other than the ones below (and QEMU's
/// own 0x02/0x03) works the same; 0x10 is the project's convention.
pub const APM_CMD_SERVE: u8 = 0x10;
/// APM command the firmware raises itself at boot (SMBASE relocation and the
/// self-test SMI after locking SMRAM; `smm-agent/firmware/src/smm.rs`).
pub const APM_CMD_FIRMWARE: u8 = 0xa5;
/// APM command that makes a firmware built with the `fault-injection`
/// feature raise #UD in SMM (tests of the SMM fault path only).
pub const APM_CMD_INJECT_FAULT: u8 = 0xfe;
/// APM command that makes a `fault-injection` firmware call into guest RAM
/// from SMM (the fetch must fault: guest memory is mapped no-execute).
pub const APM_CMD_EXECUTE_GUEST: u8 = 0xfd;

// ---- The key -----------------------------------------------------------------

/// fw_cfg file the test setups provision the 32-byte shared key with
/// (`-fw_cfg name=opt/smmvmi/key,file=KEY`). Visible to the host and the
/// guest: for tests only; SEV setups inject the key as a launch secret.
pub const KEY_FW_CFG_FILE: &str = "opt/smmvmi/key";

// ---- The mailbox device: QEMU ivshmem ------------------------------------------

/// PCI vendor id of QEMU's ivshmem devices (Red Hat, Inc.; QEMU
/// `include/hw/pci/pci.h` `PCI_VENDOR_ID_IVSHMEM`).
pub const IVSHMEM_VENDOR_ID: u16 = 0x1af4;
/// PCI device id of `ivshmem-plain` and `ivshmem-doorbell`
/// (`PCI_DEVICE_ID_IVSHMEM`).
pub const IVSHMEM_DEVICE_ID: u16 = 0x1110;
/// BAR of the ivshmem registers (interrupt mask/status, IV position, doorbell).
pub const IVSHMEM_BAR_REGISTERS: u8 = 0;
/// BAR of the ivshmem MSI-X table (`ivshmem-doorbell` only).
pub const IVSHMEM_BAR_MSIX: u8 = 1;
/// BAR of the shared memory: the mailbox (64-bit, prefetchable).
pub const IVSHMEM_BAR_SHMEM: u8 = 2;

// ---- Debug devices -------------------------------------------------------------

/// QEMU `isa-debugcon` port the firmware logs to
/// (`-global isa-debugcon.iobase=0x402`).
pub const DEBUGCON_PORT: u16 = 0x402;
/// QEMU `isa-debug-exit` port (`-device isa-debug-exit,iobase=0xf4,iosize=4`):
/// writing `v` ends QEMU with exit status `(v << 1) | 1`.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Width of the `isa-debug-exit` port in bytes (`iosize=4`).
pub const DEBUG_EXIT_IOSIZE: u8 = 4;

/// Why the firmware stopped the machine: the value it writes to
/// [`DEBUG_EXIT_PORT`]. QEMU's exit status is [`ExitCode::qemu_status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ExitCode {
    /// No kernel was given (`-kernel` missing).
    NoKernel = 0x10,
    /// The kernel is not a 64-bit bzImage this firmware can boot.
    BadKernel = 0x11,
    /// QEMU supplied no ACPI tables (`etc/table-loader` missing or malformed).
    NoAcpi = 0x12,
    /// The machine has no SMRAM (`-machine smm=off`) or no SMI support.
    NoSmram = 0x13,
    /// Not enough RAM below 4 GiB for TSEG, the tables, kernel and initrd.
    TooLittleRam = 0x14,
    /// fw_cfg is missing or does not speak the interface we need.
    FwCfg = 0x15,
    /// PCI resources could not be assigned.
    Pci = 0x16,
    /// SMM bring-up failed (relocation, lock, self-test).
    SmmSetup = 0x17,
    /// The kernel, initrd or command line loaded over fw_cfg does not match
    /// the SEV hashes table (measured direct boot), the table is malformed,
    /// or SEV is active without one; or the SEV page tables cannot be built
    /// (the reset path's C-bit disagrees with SEV detection).
    Measurement = 0x18,
    /// A CPU exception in the firmware before Linux.
    Exception = 0x1e,
    /// A Rust panic in the firmware.
    Panic = 0x1f,
}

impl ExitCode {
    /// Every code, for decoding.
    pub const ALL: [ExitCode; 11] = [
        Self::NoKernel,
        Self::BadKernel,
        Self::NoAcpi,
        Self::NoSmram,
        Self::TooLittleRam,
        Self::FwCfg,
        Self::Pci,
        Self::SmmSetup,
        Self::Measurement,
        Self::Exception,
        Self::Panic,
    ];

    /// The exit status QEMU reports when the firmware writes this code to
    /// `isa-debug-exit`: `(code << 1) | 1`.
    pub const fn qemu_status(self) -> i32 {
        ((self as i32) << 1) | 1
    }

    /// The code behind a QEMU exit status, if it is one of ours.
    pub fn from_qemu_status(status: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.qemu_status() == status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_round_trip() {
        assert_eq!(ExitCode::NoKernel.qemu_status(), 0x21);
        assert_eq!(ExitCode::from_qemu_status(0x3f), Some(ExitCode::Panic));
        assert_eq!(ExitCode::from_qemu_status(1), None);
        for c in ExitCode::ALL {
            assert_eq!(ExitCode::from_qemu_status(c.qemu_status()), Some(c));
        }
    }
}
