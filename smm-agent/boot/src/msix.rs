//! The SMI doorbell: MSI-X entries of the ivshmem-doorbell device programmed
//! with SMI delivery mode, so that the host raises an SMI by writing an
//! eventfd (QEMU fires the vector) without the QEMU monitor.
//!
//! Vector [`VECTOR_BROADCAST`] targets every vCPU (destination 0xFF),
//! vector [`VECTOR_CPU_BASE`] + N only the vCPU with APIC ID N. The guest
//! owns PCI configuration space and can undo any of this at any time (Linux
//! clears MSI-X enable when it enumerates PCI), so the agent checks and
//! re-arms on every serve; [`arm`] says whether it had to change anything.
//!
//! Sources: PCI Local Bus 3.0 §6.8.2 (MSI-X capability and table), Intel SDM
//! Vol. 3A §11.11 (MSI address 0xFEEx_xxxx with the destination in bits
//! 19:12; data bits 10:8 = delivery mode, 010b = SMI, vector ignored), QEMU
//! `docs/specs/ivshmem-spec.rst` (BAR0 registers, BAR1 MSI-X, BAR2 memory).

use smmvmi_mailbox::layout::{VECTOR_BROADCAST, VECTOR_CPU_BASE};

use crate::pci::{Bdf, CMD_BUS_MASTER, CMD_MEM, PciConfig, reg};

/// Capability ID of MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;
/// Config offset of the capabilities pointer (type-0 header).
pub const CAP_POINTER: u8 = 0x34;
/// Status register bit: the capability list exists.
pub const STATUS_CAP_LIST: u32 = 1 << (16 + 4);
/// Message control: MSI-X enable.
pub const CTL_ENABLE: u32 = 1 << 15;
/// Message control: function mask.
pub const CTL_FUNCTION_MASK: u32 = 1 << 14;
/// Bytes per MSI-X table entry.
pub const ENTRY_LEN: u64 = 16;
/// MSI address of the local APICs (destination in bits 19:12).
pub const MSI_ADDRESS_BASE: u32 = 0xFEE0_0000;
/// MSI data: delivery mode SMI (bits 10:8 = 010b).
pub const MSI_DATA_SMI: u32 = 0x200;
/// Destination ID meaning every APIC (xAPIC physical broadcast).
pub const DEST_BROADCAST: u8 = 0xFF;
/// Most capabilities followed in a list (a looped list ends the walk).
const MAX_CAPS: usize = 48;

/// Where a device's MSI-X capability and table are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixCap {
    /// Config offset of the capability.
    pub offset: u8,
    /// Table entries (Table Size field + 1).
    pub entries: u16,
    /// The BAR (0..=5) holding the table.
    pub table_bar: u8,
    /// Byte offset of the table in that BAR.
    pub table_offset: u32,
}

/// Finds the MSI-X capability of `bdf` by walking its capability list
/// (bounded: a list that loops or points into the header ends the walk).
pub fn find(cfg: &mut impl PciConfig, bdf: Bdf) -> Option<MsixCap> {
    if cfg.read32(bdf, reg::COMMAND) & STATUS_CAP_LIST == 0 {
        return None;
    }
    let mut ptr = (cfg.read32(bdf, CAP_POINTER) & 0xFC) as u8;
    for _ in 0..MAX_CAPS {
        if ptr < 0x40 {
            return None;
        }
        let head = cfg.read32(bdf, ptr);
        if head as u8 == CAP_ID_MSIX {
            let table = cfg.read32(bdf, ptr + 4);
            return Some(MsixCap {
                offset: ptr,
                entries: ((head >> 16) & 0x7FF) as u16 + 1,
                table_bar: (table & 7) as u8,
                table_offset: table & !7,
            });
        }
        ptr = ((head >> 8) & 0xFC) as u8;
    }
    None
}

/// The MSI-X table as memory (the firmware maps the table BAR; tests use a
/// buffer). Offsets are bytes from the start of the table.
pub trait MsixTable {
    fn read32(&mut self, off: u64) -> u32;
    fn write32(&mut self, off: u64, v: u32);
}

/// One MSI-X entry: address low, address high, data, vector control.
pub fn smi_entry(dest: u8) -> [u32; 4] {
    [MSI_ADDRESS_BASE | u32::from(dest) << 12, 0, MSI_DATA_SMI, 0]
}

/// The (vector, destination) pairs the doorbell uses for the CPUs in
/// `cpu_mask` (bit N = APIC ID N), limited to the table's `entries`.
pub fn vectors(cpu_mask: u64, entries: u16) -> impl Iterator<Item = (u16, u8)> {
    let broadcast = core::iter::once((VECTOR_BROADCAST, DEST_BROADCAST));
    let cpus = (0..64u16)
        .filter(move |id| cpu_mask & (1 << id) != 0)
        .map(|id| (VECTOR_CPU_BASE + id, id as u8));
    broadcast.chain(cpus).filter(move |(v, _)| *v < entries)
}

/// What [`arm`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Armed {
    /// Something was undone and has been set again.
    pub rearmed: bool,
    /// Vectors armed (broadcast + per CPU, as the table allows).
    pub vectors: u16,
}

/// Checks the doorbell arming of `bdf` and restores whatever is undone: bus
/// mastering (QEMU drops MSI writes without it), MSI-X enable with the
/// function mask clear, and each entry of [`vectors`]. The caller has
/// verified that `table` is where the device decodes its table BAR.
pub fn arm(
    cfg: &mut impl PciConfig,
    bdf: Bdf,
    cap: &MsixCap,
    table: &mut impl MsixTable,
    cpu_mask: u64,
) -> Armed {
    let mut rearmed = false;
    let cmd = cfg.read32(bdf, reg::COMMAND);
    if cmd & CMD_BUS_MASTER == 0 {
        // Keep the status half zero: its bits are write-one-to-clear.
        cfg.write32(bdf, reg::COMMAND, (cmd & 0xFFFF) | CMD_BUS_MASTER | CMD_MEM);
        rearmed = true;
    }
    let mut vectors_armed = 0;
    for (vector, dest) in vectors(cpu_mask, cap.entries) {
        let base = u64::from(vector) * ENTRY_LEN;
        let want = smi_entry(dest);
        for (i, w) in want.iter().enumerate() {
            let off = base + 4 * i as u64;
            if table.read32(off) != *w {
                table.write32(off, *w);
                rearmed = true;
            }
        }
        vectors_armed += 1;
    }
    let head = cfg.read32(bdf, cap.offset);
    let ctl = head >> 16;
    if ctl & CTL_ENABLE == 0 || ctl & CTL_FUNCTION_MASK != 0 {
        let ctl = (ctl | CTL_ENABLE) & !CTL_FUNCTION_MASK;
        cfg.write32(bdf, cap.offset, (head & 0xFFFF) | ctl << 16);
        rearmed = true;
    }
    Armed {
        rearmed,
        vectors: vectors_armed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;
    use std::vec::Vec;

    /// One function's config space (256 bytes) with a capability chain.
    struct Fake {
        cfg: [u32; 64],
        writes: Vec<(u8, u32)>,
    }

    impl PciConfig for Fake {
        fn read32(&mut self, _: Bdf, off: u8) -> u32 {
            self.cfg[usize::from(off / 4)]
        }
        fn write32(&mut self, _: Bdf, off: u8, v: u32) {
            self.writes.push((off, v));
            // Message control: only enable and function mask are writable.
            self.cfg[usize::from(off / 4)] = v;
        }
    }

    struct Table(Vec<u32>);

    impl MsixTable for Table {
        fn read32(&mut self, off: u64) -> u32 {
            self.0[(off / 4) as usize]
        }
        fn write32(&mut self, off: u64, v: u32) {
            self.0[(off / 4) as usize] = v;
        }
    }

    /// Like QEMU's ivshmem-doorbell: a vendor capability at 0x40 (none in
    /// QEMU, here to test the walk), MSI-X at 0x48 with `n` entries in BAR1.
    fn ivshmem(n: u16) -> Fake {
        let mut cfg = [0u32; 64];
        cfg[0] = 0x1110_1af4;
        cfg[1] = STATUS_CAP_LIST | CMD_MEM;
        cfg[(CAP_POINTER / 4) as usize] = 0x40;
        cfg[0x40 / 4] = 0x0008_4809; // vendor cap (id 9, length 8), next 0x48
        cfg[0x48 / 4] = u32::from(n - 1) << 16 | CAP_ID_MSIX as u32; // next 0
        cfg[0x4c / 4] = 1; // table in BAR1 at offset 0
        cfg[0x50 / 4] = 0x800 | 1; // PBA
        Fake {
            cfg,
            writes: Vec::new(),
        }
    }

    #[test]
    fn finds_the_capability_through_the_list() {
        let cap = find(&mut ivshmem(3), Bdf::new(3, 0)).unwrap();
        assert_eq!(
            cap,
            MsixCap {
                offset: 0x48,
                entries: 3,
                table_bar: 1,
                table_offset: 0
            }
        );
    }

    #[test]
    fn a_looped_or_bogus_list_ends_the_walk() {
        let mut f = ivshmem(3);
        f.cfg[0x40 / 4] = 0x4009; // next points to itself
        assert_eq!(find(&mut f, Bdf::new(3, 0)), None);
        let mut f = ivshmem(3);
        f.cfg[(CAP_POINTER / 4) as usize] = 0x10; // into the header
        assert_eq!(find(&mut f, Bdf::new(3, 0)), None);
        let mut f = ivshmem(3);
        f.cfg[1] = 0; // no capability list
        assert_eq!(find(&mut f, Bdf::new(3, 0)), None);
    }

    #[test]
    fn arms_broadcast_and_one_vector_per_cpu_then_only_checks() {
        let mut f = ivshmem(1 + 4);
        let cap = find(&mut f, Bdf::new(3, 0)).unwrap();
        let mut t = Table(vec![0; 5 * 4]);
        // APIC IDs 0, 1, 3 (sparse).
        let a = arm(&mut f, Bdf::new(3, 0), &cap, &mut t, 0b1011);
        assert_eq!(
            a,
            Armed {
                rearmed: true,
                vectors: 4
            }
        );
        assert_eq!(&t.0[0..4], &[0xFEEF_F000, 0, 0x200, 0]);
        assert_eq!(&t.0[4..8], &[0xFEE0_0000, 0, 0x200, 0], "vector 1 = APIC 0");
        assert_eq!(
            &t.0[8..12],
            &[0xFEE0_1000, 0, 0x200, 0],
            "vector 2 = APIC 1"
        );
        assert_eq!(
            &t.0[16..20],
            &[0xFEE0_3000, 0, 0x200, 0],
            "vector 4 = APIC 3"
        );
        assert_eq!(&t.0[12..16], &[0; 4], "vector 3 = APIC 2 absent: untouched");
        let ctl = f.cfg[0x48 / 4] >> 16;
        assert_ne!(ctl & CTL_ENABLE, 0);
        assert_eq!(ctl & CTL_FUNCTION_MASK, 0);
        assert_ne!(f.cfg[1] & CMD_BUS_MASTER, 0);

        f.writes.clear();
        let again = arm(&mut f, Bdf::new(3, 0), &cap, &mut t, 0b1011);
        assert!(!again.rearmed);
        assert!(f.writes.is_empty(), "an intact arming is only read");
    }

    #[test]
    fn whatever_the_guest_undoes_is_rearmed() {
        let bdf = Bdf::new(3, 0);
        type Undo = fn(&mut Fake, &mut Table);
        let undo: [(&str, Undo); 5] = [
            ("MSI-X disabled (Linux PCI enumeration)", |f, _| {
                f.cfg[0x48 / 4] &= !(CTL_ENABLE << 16)
            }),
            ("function masked", |f, _| {
                f.cfg[0x48 / 4] |= CTL_FUNCTION_MASK << 16
            }),
            ("bus mastering off", |f, _| f.cfg[1] &= !CMD_BUS_MASTER),
            ("vector masked", |_, t| t.0[3] = 1),
            ("vector reprogrammed as a fixed interrupt", |_, t| {
                t.0[0] = 0xFEE0_0000;
                t.0[2] = 0x41;
            }),
        ];
        for (what, f_undo) in undo {
            let mut f = ivshmem(3);
            let cap = find(&mut f, bdf).unwrap();
            let mut t = Table(vec![0; 3 * 4]);
            arm(&mut f, bdf, &cap, &mut t, 0b11);
            f_undo(&mut f, &mut t);
            assert!(arm(&mut f, bdf, &cap, &mut t, 0b11).rearmed, "{what}");
            assert!(!arm(&mut f, bdf, &cap, &mut t, 0b11).rearmed, "{what}");
            assert_eq!(&t.0[0..4], &smi_entry(DEST_BROADCAST), "{what}");
        }
    }

    #[test]
    fn a_small_table_arms_only_the_vectors_it_has() {
        let mut f = ivshmem(1);
        let cap = find(&mut f, Bdf::new(3, 0)).unwrap();
        let mut t = Table(vec![0; 4]);
        let a = arm(&mut f, Bdf::new(3, 0), &cap, &mut t, u64::MAX);
        assert_eq!(a.vectors, 1, "broadcast only");
    }
}
