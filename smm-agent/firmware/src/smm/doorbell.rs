//! The SMI doorbell from SMM: on every serve the agent checks that the
//! ivshmem-doorbell device still has its MSI-X table armed with SMI
//! delivery (the guest can undo it at any time; Linux does at PCI
//! enumeration) and re-arms it, and when a reply is sealed it rings the
//! host-injector's eventfd through the Doorbell register. The logic is
//! `smmvmi_boot::msix`.

use smmvmi_boot::msix::{self, MsixTable};
use smmvmi_boot::pci::Bdf;
use smmvmi_mailbox::layout as mb;

use super::config::{DoorbellBars, MailboxBar};
use crate::hw::memory::Region;
use crate::hw::pci_cfg;
use crate::layout::PHYS_OFF;

/// Offset of the Doorbell register in BAR0 (QEMU docs/specs/ivshmem-spec.rst).
const DOORBELL_REG: u64 = 12;

/// True if function `bdf` decodes memory and its BAR `index` is at `pa`
/// (the OS owns PCI configuration and may move or disable any BAR; then the
/// recorded address may be RAM or another device).
pub fn bar_decoded_at(bdf: Bdf, index: u8, pa: u64) -> bool {
    let _latch = pci_cfg::AddressLatchGuard::save();
    let (bus, dev, func) = (bdf.bus, bdf.dev, bdf.func);
    let off = 0x10 + 4 * index;
    let cmd = pci_cfg::read16(bus, dev, func, 0x04);
    let lo = pci_cfg::read32(bus, dev, func, off);
    let is_64 = lo & 0x7 == 0x4;
    let hi = if is_64 {
        pci_cfg::read32(bus, dev, func, off + 4)
    } else {
        0
    };
    let bar = (u64::from(hi) << 32) | u64::from(lo & !0xf);
    cmd & 0x2 != 0 && bar == pa
}

struct Table(Region);

impl MsixTable for Table {
    fn read32(&mut self, off: u64) -> u32 {
        self.0.read_u32(off)
    }
    fn write32(&mut self, off: u64, v: u32) {
        self.0.write_u32(off, v)
    }
}

/// Checks and re-arms the doorbell; `Some(true)` if something had to be
/// restored, `None` if the device has no doorbell or its BARs moved.
pub fn arm(bar: &MailboxBar, cpu_mask: u64) -> Option<bool> {
    let d: DoorbellBars = bar.doorbell?;
    if !bar_decoded_at(bar.bdf, d.table_bar, d.table_bar_pa) {
        return None;
    }
    let len = u64::from(d.msix.entries) * msix::ENTRY_LEN;
    // SAFETY: the MSI-X table inside the BAR the firmware assigned and just
    // verified is decoded there (MMIO of the ivshmem device, mapped at
    // PHYS_OFF in SMM); accessed with volatile 32-bit loads and stores only.
    let table = unsafe {
        Region::new(
            PHYS_OFF + d.table_bar_pa + u64::from(d.msix.table_offset),
            len,
        )
    };
    let _latch = pci_cfg::AddressLatchGuard::save();
    Some(
        msix::arm(
            &mut pci_cfg::Cf8,
            bar.bdf,
            &d.msix,
            &mut Table(table),
            cpu_mask,
        )
        .rearmed,
    )
}

/// Rings the host-injector: writes `(peer << 16) | RING_VECTOR` to the
/// Doorbell register, for the peer the host named in the header (untrusted:
/// a wrong value rings the wrong peer, nothing else).
pub fn ring(mbox: &Region, bar: &MailboxBar) {
    let Some(d) = bar.doorbell else { return };
    let peer = mbox.read_u32(mb::OFF_HOST_PEER as u64);
    if peer == 0 || peer > 0xffff || !bar_decoded_at(bar.bdf, 0, d.regs_pa) {
        return;
    }
    // SAFETY: the Doorbell register in BAR0 of the ivshmem device, the BAR
    // the firmware assigned and just verified is decoded there; one
    // volatile 32-bit store.
    let regs = unsafe { Region::new(PHYS_OFF + d.regs_pa, DOORBELL_REG + 4) };
    regs.write_u32(DOORBELL_REG, (peer - 1) << 16 | u32::from(mb::RING_VECTOR));
}
