//! PCI: BAR assignment (the logic is `smmvmi_boot::pci`) and the mailbox
//! device among the results.

use smmvmi_boot::pci;
use smmvmi_boot::q35;
use smmvmi_mailbox::layout as mb;

use super::error::BootError;
use crate::hw::memory::Region;
use crate::hw::{chipset, pci_cfg};
use crate::layout::REPLY_BUF_LEN;
use crate::log;
use crate::smm::config::{DoorbellBars, MailboxBar};

/// The mailbox device: QEMU `ivshmem-plain` or `ivshmem-doorbell`
/// (1af4:1110), shared memory in BAR2, registers in BAR0.
use smmvmi_mailbox::platform::{
    IVSHMEM_BAR_REGISTERS, IVSHMEM_BAR_SHMEM as IVSHMEM_BAR, IVSHMEM_DEVICE_ID as IVSHMEM_DEVICE,
    IVSHMEM_VENDOR_ID as IVSHMEM_VENDOR,
};

/// PCI device id of `virtio-mem-pci` (vendor 0x1af4, as ivshmem).
const VIRTIO_MEM_DEVICE_ID: u16 = 0x1058;

fn mailbox_min() -> u64 {
    mb::MIN_MAILBOX_SIZE as u64
}

/// Enables MMCONFIG, assigns every BAR, and returns the mailbox BAR if
/// there is a usable ivshmem device (a missing or ill-sized one is logged:
/// the agent then serves nothing, but the machine boots).
pub fn assign() -> Result<(Option<MailboxBar>, bool), BootError> {
    // MMCONFIG first, BARs next; QEMU builds the ACPI tables (MCFG, _CRS
    // of the host bridge) from both when the table-loader is read.
    chipset::enable_mmconfig();
    let windows = pci::Windows {
        mem_hole: Some((q35::PCIEXBAR_BASE, q35::PCIEXBAR_BASE + q35::PCIEXBAR_SIZE)),
        ..pci::Windows::default()
    };
    let assigned = pci::assign(&mut pci_cfg::Cf8, &windows).map_err(BootError::Pci)?;
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
    // virtio-mem-pci (virtio 1.0 device id 0x1040 + type 24): memory the
    // agent does not track (its plugged blocks are known only through the
    // device, which the guest drives).
    let virtio_mem = assigned
        .bars()
        .any(|b| b.vendor == IVSHMEM_VENDOR && b.device == VIRTIO_MEM_DEVICE_ID);
    if virtio_mem {
        log!("virtio-mem device present: its memory is refused as not RAM (INFO says so)");
    }
    let mailbox = match assigned.find(IVSHMEM_VENDOR, IVSHMEM_DEVICE, IVSHMEM_BAR) {
        Some(b) if b.size > REPLY_BUF_LEN || b.size < mailbox_min() => {
            log!(
                "error: the ivshmem-plain BAR is {} KiB; the agent supports {} KiB to {} KiB (e.g. size=1M): no mailbox",
                b.size >> 10,
                mailbox_min() >> 10,
                REPLY_BUF_LEN >> 10
            );
            None
        }
        Some(b) => {
            announce_booting(b.addr, b.size);
            let doorbell = smmvmi_boot::msix::find(&mut pci_cfg::Cf8, b.bdf).and_then(|msix| {
                let regs = assigned.find(IVSHMEM_VENDOR, IVSHMEM_DEVICE, IVSHMEM_BAR_REGISTERS)?;
                let table = assigned.find(IVSHMEM_VENDOR, IVSHMEM_DEVICE, msix.table_bar)?;
                log!(
                    "SMI doorbell: ivshmem-doorbell MSI-X, {} vectors in BAR{} at {:#x}",
                    msix.entries,
                    msix.table_bar,
                    table.addr
                );
                Some(DoorbellBars {
                    regs_pa: regs.addr,
                    table_bar: msix.table_bar,
                    table_bar_pa: table.addr,
                    msix,
                })
            });
            log!(
                "mailbox: ivshmem BAR{IVSHMEM_BAR} at {:#x}, {} KiB",
                b.addr,
                b.size >> 10
            );
            Some(MailboxBar {
                pa: b.addr,
                len: b.size,
                bdf: b.bdf,
                doorbell,
            })
        }
        None => {
            log!("no ivshmem-plain device: the agent has no mailbox and will serve nothing");
            None
        }
    };
    Ok((mailbox, virtio_mem))
}

/// Before SMM is locked: tells the host that a firmware owns the mailbox
/// and is booting (the agent publishes "ready" on its first SMI).
fn announce_booting(pa: u64, len: u64) {
    if len < mb::HEADER_SIZE as u64 {
        return;
    }
    // SAFETY: the ivshmem BAR just assigned by the firmware, identity mapped
    // by the boot page tables; shared with the host, so volatile accesses.
    let mbox = unsafe { Region::new(pa, mb::HEADER_SIZE as u64) };
    mbox.write_volatile(mb::OFF_MAGIC as u64, &mb::MAGIC);
    mbox.write_u32(mb::OFF_VERSION as u64, mb::VERSION);
    mbox.write_u32(mb::OFF_SIZE as u64, len as u32);
    mbox.write_u32(mb::OFF_STATE as u64, mb::AgentState::Booting as u32);
}
