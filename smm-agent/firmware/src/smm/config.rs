//! What SMM relies on, as one value: [`SmmConfig`], built by the boot code
//! and sealed into TSEG with the image.
//!
//! In SMM the firmware runs from a copy of its image inside TSEG, so a
//! static holds what SMM sees only if it was stored *before* the copy; a
//! store after it silently never reaches SMRAM. Here that cannot happen:
//! the one way to copy the image into TSEG is [`OpenTseg::seal`], which
//! takes the complete configuration by value and writes it into
//! [`SEALED_CONFIG`] right before copying; nothing else writes that static.
//! `OpenTseg` exists once (claimed once) and `seal` consumes it.
//!
//! Live state that SMM changes on every SMI (the rendezvous, counters) is
//! not configuration and lives in `smi::SMM`.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

use smmvmi_boot::pci::Bdf;

use crate::hw::memory::Region;
use crate::layout::IMAGE_OFF;

/// The mailbox: ivshmem BAR2 as the firmware assigned it.
#[derive(Clone, Copy, Debug)]
pub struct MailboxBar {
    /// Physical address of the BAR.
    pub pa: u64,
    /// Its size in bytes.
    pub len: u64,
    /// Where the device is, to check on every SMI that the BAR is still
    /// decoded at `pa` (the OS owns PCI configuration).
    pub bdf: Bdf,
    /// The SMI doorbell, if the device is `ivshmem-doorbell`.
    pub doorbell: Option<DoorbellBars>,
}

/// The ivshmem-doorbell registers and MSI-X table, when the mailbox device
/// has them (`ivshmem-plain` has no MSI-X): the SMI doorbell
/// (`smmvmi_boot::msix`).
#[derive(Clone, Copy, Debug)]
pub struct DoorbellBars {
    /// BAR0 (registers; the Doorbell register is at +12).
    pub regs_pa: u64,
    /// The BAR holding the MSI-X table, its index and address.
    pub table_bar: u8,
    pub table_bar_pa: u64,
    /// The capability as found at boot (QEMU's capability list is fixed).
    pub msix: smmvmi_boot::msix::MsixCap,
}

/// RAM hot-plug through QEMU's ACPI memory hot-plug controller
/// (`smmvmi_boot::memhp`), when the machine has DIMM slots.
#[derive(Clone, Copy, Debug)]
pub struct MemHotplug {
    /// DIMM slots (from the DSDT's MDNR).
    pub slots: u32,
    /// QEMU's device-memory window: DIMMs must lie inside.
    pub window: (u64, u64),
    /// Ranges no DIMM may overlap: TSEG, the 32-bit PCI hole (MMCONFIG,
    /// BARs, LAPIC, IOAPIC, ROM), the 64-bit BARs.
    pub forbidden: [(u64, u64); 3],
}

/// Everything SMM needs from boot, decided once before SMRAM is locked.
/// (TSEG's own range reaches the agent as its SMRAM guard, recorded by
/// `agent::provision`.)
#[derive(Clone, Copy, Debug)]
pub struct SmmConfig {
    /// CR3 of the SMM page tables (in TSEG).
    pub smm_cr3: u64,
    /// CPUs reported by fw_cfg (all of them relocated).
    pub ncpus: u32,
    /// CPU indices (= APIC IDs) present at boot, one bit each.
    pub cpu_mask: u64,
    /// `None`: no usable ivshmem device, the agent serves nothing.
    pub mailbox: Option<MailboxBar>,
    /// SMI features negotiated with QEMU, and FEATURE_DOORBELL when the
    /// mailbox device has one (published in the mailbox header).
    pub features: u64,
    /// RAM hot-plug, if the machine has DIMM slots.
    pub memhp: Option<MemHotplug>,
    /// What INFO says about memory outside the boot map
    /// (`records::MEM_DIMM_HOTPLUG`, `MEM_VIRTIO_MEM_REFUSED`).
    pub mem_flags: u32,
    /// TSC ticks per millisecond, measured at boot.
    pub tsc_per_ms: u64,
}

impl SmmConfig {
    /// What an unsealed image holds: `smm_cr3 == 0` says "not in SMM".
    const UNSEALED: SmmConfig = SmmConfig {
        smm_cr3: 0,
        ncpus: 0,
        cpu_mask: 0,
        mailbox: None,
        features: 0,
        memhp: None,
        mem_flags: 0,
        tsc_per_ms: 0,
    };
}

/// The configuration cell: written once by [`OpenTseg::seal`], read only.
struct SealedCell(UnsafeCell<SmmConfig>);

// SAFETY: the only write is in `OpenTseg::seal`, on the boot CPU while no
// other CPU runs firmware code (APs are parked in low memory, no SMI is
// served before the image is in TSEG); afterwards the cell is only read.
unsafe impl Sync for SealedCell {}

/// The sealed configuration. In SMM this is the TSEG copy, which nothing
/// outside SMM can reach.
static SEALED_CONFIG: SealedCell = SealedCell(UnsafeCell::new(SmmConfig::UNSEALED));

/// The configuration SMM runs with (all zero, `smm_cr3 == 0`, before the
/// seal).
pub fn config() -> SmmConfig {
    // SAFETY: a plain read; the single write (in `seal`) never runs
    // concurrently with a read (see `SealedCell`), and the value is copied
    // out, so no reference outlives a later write.
    unsafe { *SEALED_CONFIG.0.get() }
}

// SAFETY: linker symbols of `link.ld` (start and end of the image and its
// bss); only their addresses are taken, never their contents as `u8`.
unsafe extern "C" {
    static __fw_start: u8;
    static __fw_end: u8;
}

/// TSEG while it is open (T_EN clear): the boot code installs the SMM
/// runtime into it, then seals it. There is at most one.
pub struct OpenTseg {
    base: u64,
    size: u64,
}

/// TSEG holding the image and its sealed configuration: what is left is to
/// close and lock it (`boot::tseg::lock`).
pub struct SealedTseg {
    base: u64,
    size: u64,
}

static CLAIMED: AtomicBool = AtomicBool::new(false);

impl OpenTseg {
    /// Claims TSEG at `[base, base + size)`; `None` if it was claimed before.
    ///
    /// # Safety
    /// The range is TSEG, still open (T_EN clear at reset), in RAM below
    /// 4 GiB, identity mapped by the boot page tables, and used by nothing
    /// else before Linux.
    pub unsafe fn claim(base: u64, size: u64) -> Option<OpenTseg> {
        (!CLAIMED.swap(true, Ordering::Relaxed)).then_some(OpenTseg { base, size })
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    /// TSEG's bytes, to install into.
    pub fn region(&self) -> Region {
        // SAFETY: open TSEG, the claimer's contract (`claim`).
        unsafe { Region::new(self.base, self.size) }
    }

    /// Stores `config` into [`SEALED_CONFIG`], then copies the firmware
    /// image (code, data, bss, with that configuration and the agent's
    /// state) into TSEG at `IMAGE_OFF`. The only way to that copy.
    pub fn seal(self, config: SmmConfig) -> SealedTseg {
        // SAFETY: the one write to the cell; boot CPU, no reader runs
        // concurrently (see `SealedCell`), and `self` is consumed: there is
        // one `OpenTseg`, so this runs once.
        unsafe { *SEALED_CONFIG.0.get() = config };
        core::sync::atomic::compiler_fence(Ordering::SeqCst);
        let start = (&raw const __fw_start) as u64;
        let len = (&raw const __fw_end) as u64 - start;
        // SAFETY: [start, start + len) is the running image itself (code,
        // data, bss), mapped and readable; we copy it as bytes.
        let image = unsafe { core::slice::from_raw_parts(start as *const u8, len as usize) };
        self.region().write(IMAGE_OFF, image);
        SealedTseg {
            base: self.base,
            size: self.size,
        }
    }
}

impl SealedTseg {
    /// TSEG's bytes, to check from outside SMM that it is closed.
    pub fn region(&self) -> Region {
        // SAFETY: the TSEG claimed by `OpenTseg::claim` (its contract); once
        // closed it reads as all ones from outside SMM, and is not written.
        unsafe { Region::new(self.base, self.size) }
    }
}
