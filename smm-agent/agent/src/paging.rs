//! x86-64 page walk (4- and 5-level, 4 KiB / 2 MiB / 1 GiB pages) through
//! the guard, returning its trace.
//!
//! Every table entry is read through [`Guard::check`], so a page table that
//! points into SMRAM or MMIO is refused, not read. The walk has at most five
//! steps (no loops however the tables are linked). Only the present bit and
//! the page-size bit (levels 2 and 3) are interpreted; NX, protection keys,
//! accessed/dirty and reserved bits are ignored. With SEV active the C-bit
//! is masked out of CR3 and of every entry.

use smmvmi_mailbox::wire::{MAX_LEVELS, Pti, WalkRecord};

use crate::guard::{Alleged, Guard, PhysMemory, Refusal};

/// Physical address bits 12..51 of a table entry or CR3.
pub const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;
/// Physical address bits of a 2 MiB page entry.
pub const ADDR_MASK_2M: u64 = 0x000F_FFFF_FFE0_0000;
/// Physical address bits of a 1 GiB page entry.
pub const ADDR_MASK_1G: u64 = 0x000F_FFFF_C000_0000;
/// Present bit.
pub const PRESENT: u64 = 1;
/// Page-size bit (large page at levels 2 and 3).
pub const PAGE_SIZE: u64 = 1 << 7;
/// Linux PTI: the user PGD is the odd page of the 8 KiB PGD pair.
pub const PTI_USER_PGTABLE_BIT: u64 = 1 << 12;

/// How to walk: levels and the SEV C-bit mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagingMode {
    /// 4 or 5.
    pub levels: u8,
    /// Bits to clear from CR3 and every entry (the SEV C-bit), 0 without SEV.
    pub c_bit_mask: u64,
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Physical address.
    pub pa: u64,
    /// log2 of the page size (12, 21, 30).
    pub page_shift: u8,
}

/// Why a walk stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// The address is not canonical for the mode.
    NonCanonical,
    /// The mode is not 4- or 5-level paging.
    Unsupported,
    /// The entry at `level` is not present.
    NotPresent {
        /// Level (5..1).
        level: u8,
    },
    /// The table at `level` (or, at level 0, the final page) was refused.
    Refused {
        /// Level of the table whose entry could not be read, 0 for the page.
        level: u8,
        /// Why.
        refusal: Refusal,
    },
}

/// The page-table root for `cr3`: address bits only (PCID bits 0..11 and
/// bit 63 dropped), C-bit cleared, PTI choice applied.
pub fn cr3_root(cr3: u64, pti: Pti, c_bit_mask: u64) -> u64 {
    let root = cr3 & ADDR_MASK & !c_bit_mask;
    match pti {
        Pti::AsIs => root,
        Pti::Kernel => root & !PTI_USER_PGTABLE_BIT,
        Pti::User => root | PTI_USER_PGTABLE_BIT,
    }
}

/// True if `va` is canonical with `levels` paging levels.
pub fn is_canonical(va: u64, levels: u8) -> bool {
    let bits = if levels == 5 { 57 } else { 48 };
    let shift = 64 - bits;
    (((va << shift) as i64) >> shift) as u64 == va
}

/// Walks the tables rooted at `root` (already from [`cr3_root`]) for `va`.
/// Returns the trace in any case.
pub fn walk<M: PhysMemory>(
    mem: &M,
    guard: &Guard<'_>,
    root: u64,
    mode: PagingMode,
    va: u64,
) -> (WalkRecord, Result<Translation, WalkError>) {
    let mut rec = WalkRecord {
        va,
        levels: mode.levels,
        ..WalkRecord::default()
    };
    if mode.levels != 4 && mode.levels != 5 {
        return (rec, Err(WalkError::Unsupported));
    }
    if !is_canonical(va, mode.levels) {
        return (rec, Err(WalkError::NonCanonical));
    }
    let mut table = root & ADDR_MASK & !mode.c_bit_mask;
    let mut level = mode.levels;
    // At most five iterations: `level` strictly decreases to 1.
    for slot in 0..MAX_LEVELS {
        let shift = 12 + 9 * u32::from(level - 1);
        let index = (va >> shift) & 0x1FF;
        let entry_addr = table | (index * 8);
        let entry = match read_entry(mem, guard, entry_addr) {
            Ok(e) => e,
            Err(refusal) => return (rec, Err(WalkError::Refused { level, refusal })),
        };
        rec.entries[slot] = (entry_addr, entry);
        rec.depth = slot as u8 + 1;
        if entry & PRESENT == 0 {
            return (rec, Err(WalkError::NotPresent { level }));
        }
        let large = entry & PAGE_SIZE != 0 && (level == 2 || level == 3);
        if level == 1 || large {
            let (mask, page_shift) = match level {
                3 => (ADDR_MASK_1G, 30u8),
                2 => (ADDR_MASK_2M, 21u8),
                _ => (ADDR_MASK, 12u8),
            };
            let base = entry & mask & !mode.c_bit_mask;
            let pa = base | (va & ((1u64 << page_shift) - 1));
            rec.pa = pa;
            rec.page_shift = page_shift;
            return (rec, Ok(Translation { pa, page_shift }));
        }
        table = entry & ADDR_MASK & !mode.c_bit_mask;
        level -= 1;
    }
    // Unreachable in practice (level reaches 1 within MAX_LEVELS steps);
    // answered, not panicked.
    (rec, Err(WalkError::Unsupported))
}

fn read_entry<M: PhysMemory>(mem: &M, guard: &Guard<'_>, addr: u64) -> Result<u64, Refusal> {
    let checked = guard.check(Alleged::new(addr, 8))?;
    let mut b = [0u8; 8];
    mem.read(checked, &mut b);
    Ok(u64::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical() {
        assert!(is_canonical(0x0000_7FFF_FFFF_FFFF, 4));
        assert!(!is_canonical(0x0000_8000_0000_0000, 4));
        assert!(is_canonical(0xFFFF_8000_0000_0000, 4));
        assert!(is_canonical(0x0000_8000_0000_0000, 5));
        assert!(is_canonical(0xFF00_0000_0000_0000, 5));
        assert!(!is_canonical(0xFE00_0000_0000_0000, 5));
    }

    #[test]
    fn cr3_masking() {
        let cr3 = 0x8000_0000_1234_5000 | 0x7 | (1 << 12) | (1 << 47);
        assert_eq!(cr3_root(cr3, Pti::AsIs, 0), 0x0000_8000_1234_5000 | 1 << 12);
        assert_eq!(cr3_root(cr3, Pti::Kernel, 1 << 47), 0x1234_4000);
        assert_eq!(cr3_root(0x1234_4000, Pti::User, 0), 0x1234_5000);
    }
}
