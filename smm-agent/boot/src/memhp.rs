//! RAM plugged after boot, learnt from the platform: QEMU's ACPI memory
//! hot-plug controller, read from SMM.
//!
//! The controller (QEMU `docs/specs/acpi_mem_hotplug.rst`, I/O ports
//! 0xA00..0xA17) reports each DIMM slot's address, size and state once a
//! slot is selected: write the slot number at +0, then read the address at
//! +0/+4, the size at +8/+0xC and the state at +0x14 (bit 0: enabled). QEMU
//! fills these in from its own device model; the guest OS can only select
//! slots and acknowledge events, never change what a slot reports. A range
//! is accepted only inside the device-memory window QEMU reserved for DIMMs
//! (above all boot RAM, up to fw_cfg `etc/reserved-memory-end`) and only
//! if it overlaps nothing the firmware must never read: SMRAM, the PCI
//! holes, MMCONFIG or any BAR it assigned.
//!
//! The guest's ACPI code (AML) uses the same selector. SMM cannot read the
//! selector back, so [`scan`] reads what the guest's selected slot reports
//! first and, when done, selects a slot that reports exactly the same, so
//! that a guest interrupted between its own selector write and its reads
//! sees no change.

use crate::e820::E820Map;

/// First I/O port of the controller (QEMU `ACPI_MEMORY_HOTPLUG_BASE`).
pub const MHP_BASE: u16 = 0x0A00;
/// Register offsets.
pub mod reg {
    /// Write: slot selector. Read: address, low dword.
    pub const SELECTOR: u16 = 0x00;
    pub const ADDR_LO: u16 = 0x00;
    pub const ADDR_HI: u16 = 0x04;
    pub const SIZE_LO: u16 = 0x08;
    pub const SIZE_HI: u16 = 0x0C;
    /// Read: state byte (bit 0 enabled, 1 insert event, 2 remove event).
    pub const STATUS: u16 = 0x14;
}
/// Status bit: the DIMM in the slot is enabled and may be used.
pub const STATUS_ENABLED: u8 = 1 << 0;
/// Most slots QEMU supports (`ACPI_MAX_RAM_SLOTS`); a selector beyond the
/// machine's slot count reads as an empty slot.
pub const MAX_SLOTS: u32 = 256;
/// Most DIMMs tracked at once.
pub const MAX_DIMMS: usize = 32;

/// The controller's ports (the firmware uses `in`/`out`; tests a model).
pub trait MhpIo {
    fn read32(&mut self, off: u16) -> u32;
    fn read8(&mut self, off: u16) -> u8;
    fn write32(&mut self, off: u16, v: u32);
}

/// What one slot reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    pub addr: u64,
    pub size: u64,
    pub status: u8,
}

fn read_slot(io: &mut impl MhpIo) -> Slot {
    let mut u64_at = |lo, hi| u64::from(io.read32(lo)) | u64::from(io.read32(hi)) << 32;
    let addr = u64_at(reg::ADDR_LO, reg::ADDR_HI);
    let size = u64_at(reg::SIZE_LO, reg::SIZE_HI);
    Slot {
        addr,
        size,
        status: io.read8(reg::STATUS),
    }
}

/// A plugged DIMM the agent may read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dimm {
    pub slot: u32,
    pub addr: u64,
    pub size: u64,
}

/// Why a slot's range was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejected {
    /// Outside the device-memory window (or empty / overflowing).
    OutsideWindow,
    /// Overlaps a range the firmware must never read (SMRAM, PCI hole,
    /// MMCONFIG, a BAR) or boot RAM.
    Overlaps { start: u64, len: u64 },
    /// More enabled DIMMs than [`MAX_DIMMS`].
    TooMany,
}

/// The result of a scan: the accepted DIMMs, and the first rejection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    dimms: [Option<Dimm>; MAX_DIMMS],
    pub count: usize,
    pub rejected: Option<(u32, Rejected)>,
}

impl Scan {
    pub fn dimms(&self) -> impl Iterator<Item = Dimm> + '_ {
        self.dimms.iter().flatten().copied()
    }
}

/// Where DIMMs may be: `[start, end)` from QEMU's device-memory region,
/// minus every range in `forbidden` (start, len).
#[derive(Clone, Copy, Debug)]
pub struct Policy<'a> {
    pub window: (u64, u64),
    pub forbidden: &'a [(u64, u64)],
}

fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

impl Policy<'_> {
    /// Checks one slot's range.
    pub fn check(&self, addr: u64, size: u64) -> Result<(), Rejected> {
        let end = addr.checked_add(size).ok_or(Rejected::OutsideWindow)?;
        if size == 0 || addr < self.window.0 || end > self.window.1 {
            return Err(Rejected::OutsideWindow);
        }
        match self
            .forbidden
            .iter()
            .find(|&&(s, l)| overlaps(addr, size, s, l))
        {
            Some(&(start, len)) => Err(Rejected::Overlaps { start, len }),
            None => Ok(()),
        }
    }
}

/// The device-memory window QEMU reserves for DIMMs: from the end of the
/// highest boot RAM range above 4 GiB (or 4 GiB), aligned up to 1 GiB as
/// QEMU places it (`hw/i386/pc.c`, `pc_memory_init`), to `reserved_end`
/// (fw_cfg `etc/reserved-memory-end`). `None` if empty.
pub fn device_memory_window(boot: &E820Map, reserved_end: u64) -> Option<(u64, u64)> {
    const GIB: u64 = 1 << 30;
    let start = boot
        .highest_ram_end()
        .max(4 * GIB)
        .checked_next_multiple_of(GIB)?;
    (start < reserved_end).then_some((start, reserved_end))
}

/// The number of DIMM slots, from the `MDNR` name QEMU declares in the
/// DSDT it generates when memory hot-plug is on (`hw/acpi/memory_hotplug.c`,
/// `build_memory_hotplug_aml`: `Name (MDNR, n)`). `tables` is the ACPI
/// tables blob the table-loader installed; 0 if the name is absent (no
/// hot-plug). AML integers (ACPI 6.5 §20.2.3): ZeroOp, OneOp, BytePrefix,
/// WordPrefix, DWordPrefix. Bounded by [`MAX_SLOTS`].
pub fn slot_count(tables: &[u8]) -> u32 {
    const NAME_OP: u8 = 0x08;
    let pat = [NAME_OP, b'M', b'D', b'N', b'R'];
    let Some(at) = tables.windows(pat.len()).position(|w| w == pat) else {
        return 0;
    };
    let rest = &tables[at + pat.len()..];
    let le = |n: usize| {
        rest.get(1..1 + n)
            .map(|b| b.iter().rev().fold(0u32, |v, &x| v << 8 | u32::from(x)))
    };
    let n = match rest.first() {
        Some(0x00) => Some(0),
        Some(0x01) => Some(1),
        Some(0x0A) => le(1),
        Some(0x0B) => le(2),
        Some(0x0C) => le(4),
        _ => None,
    };
    n.unwrap_or(0).min(MAX_SLOTS)
}

/// Scans every slot (up to `slots`, at most [`MAX_SLOTS`]) and returns the
/// enabled DIMMs that `policy` accepts. Leaves the selector on a slot that
/// reports what the guest's selected slot reported before.
pub fn scan(io: &mut impl MhpIo, slots: u32, policy: &Policy) -> Scan {
    let guest_view = read_slot(io);
    let mut out = Scan::default();
    let mut restore = None;
    for slot in 0..slots.min(MAX_SLOTS) {
        io.write32(reg::SELECTOR, slot);
        let s = read_slot(io);
        if restore.is_none() && s == guest_view {
            restore = Some(slot);
        }
        if s.status & STATUS_ENABLED == 0 {
            continue;
        }
        match policy.check(s.addr, s.size) {
            Ok(()) if out.count < MAX_DIMMS => {
                out.dimms[out.count] = Some(Dimm {
                    slot,
                    addr: s.addr,
                    size: s.size,
                });
                out.count += 1;
            }
            Ok(()) => {
                out.rejected.get_or_insert((slot, Rejected::TooMany));
            }
            Err(r) => {
                out.rejected.get_or_insert((slot, r));
            }
        }
    }
    // A guest selector beyond the slot count reads as an empty slot; any
    // empty slot reads the same.
    io.write32(reg::SELECTOR, restore.unwrap_or(slots.min(MAX_SLOTS)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e820::{E820Entry, RAM};
    use std::vec;
    use std::vec::Vec;

    /// QEMU's controller: `slots` slots, a selector, per-slot state.
    struct Controller {
        slots: Vec<Slot>,
        selector: u32,
        selector_writes: u32,
    }

    impl Controller {
        fn new(n: usize) -> Self {
            Self {
                slots: vec![Slot::default(); n],
                selector: 0,
                selector_writes: 0,
            }
        }
        fn plug(&mut self, slot: usize, addr: u64, size: u64) {
            self.slots[slot] = Slot {
                addr,
                size,
                status: STATUS_ENABLED,
            };
        }
        fn current(&self) -> Slot {
            self.slots
                .get(self.selector as usize)
                .copied()
                .unwrap_or_default()
        }
    }

    impl MhpIo for Controller {
        fn read32(&mut self, off: u16) -> u32 {
            let s = self.current();
            match off {
                reg::ADDR_LO => s.addr as u32,
                reg::ADDR_HI => (s.addr >> 32) as u32,
                reg::SIZE_LO => s.size as u32,
                reg::SIZE_HI => (s.size >> 32) as u32,
                _ => 0,
            }
        }
        fn read8(&mut self, off: u16) -> u8 {
            if off == reg::STATUS {
                self.current().status
            } else {
                0
            }
        }
        fn write32(&mut self, off: u16, v: u32) {
            if off == reg::SELECTOR {
                self.selector = v;
                self.selector_writes += 1;
            }
        }
    }

    const G: u64 = 1 << 30;
    const SMRAM: (u64, u64) = (0x3F00_0000, 0x100_0000);
    const PCI_HOLE: (u64, u64) = (0x8000_0000, 0x8000_0000);
    const WINDOW: (u64, u64) = (4 * G, 12 * G);

    fn policy(forbidden: &[(u64, u64)]) -> Policy<'_> {
        Policy {
            window: WINDOW,
            forbidden,
        }
    }

    #[test]
    fn finds_plugged_dimms_and_forgets_removed_ones() {
        let mut c = Controller::new(4);
        c.plug(0, 4 * G, G);
        c.plug(2, 6 * G, 2 * G);
        let f = [SMRAM, PCI_HOLE];
        let s = scan(&mut c, 4, &policy(&f));
        assert_eq!(
            s.dimms().collect::<Vec<_>>(),
            vec![
                Dimm {
                    slot: 0,
                    addr: 4 * G,
                    size: G
                },
                Dimm {
                    slot: 2,
                    addr: 6 * G,
                    size: 2 * G
                }
            ]
        );
        assert_eq!(s.rejected, None);
        c.slots[0] = Slot::default();
        let s = scan(&mut c, 4, &policy(&f));
        assert_eq!(s.dimms().map(|d| d.slot).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn ranges_outside_the_window_or_over_forbidden_memory_are_refused() {
        let bar = (5 * G, 0x1000);
        let f = [SMRAM, PCI_HOLE, bar];
        let p = policy(&f);
        for (addr, size, want) in [
            (SMRAM.0, 0x1000, Rejected::OutsideWindow),
            (0xFEC0_0000, G, Rejected::OutsideWindow),
            (11 * G, 2 * G, Rejected::OutsideWindow),
            (u64::MAX - 0xfff, 0x2000, Rejected::OutsideWindow),
            (4 * G, 0, Rejected::OutsideWindow),
            (
                5 * G - 0x1000,
                0x2000,
                Rejected::Overlaps {
                    start: bar.0,
                    len: bar.1,
                },
            ),
        ] {
            assert_eq!(p.check(addr, size), Err(want), "{addr:#x}+{size:#x}");
            let mut c = Controller::new(1);
            c.plug(0, addr, size);
            let s = scan(&mut c, 1, &p);
            assert_eq!(s.count, 0);
            assert_eq!(s.rejected, Some((0, want)));
        }
    }

    #[test]
    fn the_guests_selection_is_left_as_it_found_it() {
        let mut c = Controller::new(8);
        c.plug(3, 4 * G, G);
        c.plug(5, 5 * G, G);
        for guest_selected in [5u32, 3, 0, 7, 200] {
            c.selector = guest_selected;
            let before = c.current();
            scan(&mut c, 8, &policy(&[]));
            assert_eq!(c.current(), before, "guest had selected {guest_selected}");
        }
    }

    #[test]
    fn a_disabled_slot_is_not_ram_and_at_most_max_dimms_are_kept() {
        let mut c = Controller::new(MAX_DIMMS + 2);
        for i in 0..MAX_DIMMS + 2 {
            c.plug(i, 4 * G + i as u64 * 0x800_0000, 0x800_0000);
        }
        c.slots[0].status = 0;
        let s = scan(&mut c, (MAX_DIMMS + 2) as u32, &policy(&[]));
        assert_eq!(s.count, MAX_DIMMS);
        assert_eq!(s.rejected, Some((MAX_DIMMS as u32 + 1, Rejected::TooMany)));
        assert!(s.dimms().all(|d| d.slot != 0));
    }

    #[test]
    fn slot_count_comes_from_the_dsdt() {
        let dsdt = |tail: &[u8]| {
            let mut b = b"DSDT....junk\x08MDNX\x0a\x07".to_vec();
            b.extend_from_slice(&[0x08, b'M', b'D', b'N', b'R']);
            b.extend_from_slice(tail);
            b.extend_from_slice(b"more");
            b
        };
        assert_eq!(slot_count(&dsdt(&[0x0A, 2])), 2);
        assert_eq!(slot_count(&dsdt(&[0x0B, 0x00, 0x01])), 256);
        assert_eq!(slot_count(&dsdt(&[0x0C, 0xff, 0xff, 0, 0])), MAX_SLOTS);
        assert_eq!(slot_count(&dsdt(&[0x01])), 1);
        assert_eq!(
            slot_count(&[0x08, b'M', b'D', b'N', b'R', 0x0B, 1]),
            0,
            "truncated"
        );
        assert_eq!(slot_count(b"no hotplug here"), 0);
    }

    #[test]
    fn the_device_memory_window_starts_above_boot_ram() {
        let map = |ranges: &[(u64, u64)]| {
            let bytes: Vec<u8> = ranges
                .iter()
                .flat_map(|&(addr, len)| {
                    E820Entry {
                        addr,
                        len,
                        kind: RAM,
                    }
                    .to_bytes()
                })
                .collect();
            E820Map::parse(&bytes).unwrap()
        };
        let m = map(&[(0, 0x8000_0000)]);
        assert_eq!(device_memory_window(&m, 8 * G), Some((4 * G, 8 * G)));
        let m = map(&[(0, 0x8000_0000), (4 * G, 0x4000_1000)]);
        assert_eq!(device_memory_window(&m, 8 * G), Some((6 * G, 8 * G)));
        assert_eq!(device_memory_window(&m, 6 * G), None);
    }
}
