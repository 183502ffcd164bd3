//! A page-table builder over [`FakeMem`]: real x86-64 tables, with the
//! mappings kept as ground truth.

use std::collections::BTreeMap;

use crate::memory::{FakeMem, PAGE};

/// Builds page tables in a [`FakeMem`].
pub struct PtBuilder {
    /// The fake RAM the tables (and any test data) live in.
    pub mem: FakeMem,
    /// Paging levels: 4 or 5.
    pub levels: u8,
    /// Physical address of the top-level table.
    pub root: u64,
    /// C-bit set in every entry the builder writes (and in `cr3()`).
    pub c_bit: u64,
    next_table: u64,
    /// Ground truth: virtual page base -> (page shift, physical base).
    pub maps: BTreeMap<u64, (u8, u64)>,
}

/// Page tables come from this RAM region.
pub const TABLE_POOL: u64 = 0x0100_0000;

impl PtBuilder {
    /// Empty tables for `levels`-level paging; `c_bit` (a mask, 0 without
    /// SEV) is set in every entry written.
    pub fn new(levels: u8, c_bit: u64) -> Self {
        let mut b = Self {
            mem: FakeMem::default(),
            levels,
            root: 0,
            c_bit,
            next_table: TABLE_POOL,
            maps: BTreeMap::new(),
        };
        b.root = b.alloc_table();
        b
    }

    /// Allocates a zeroed table page from [`TABLE_POOL`].
    pub fn alloc_table(&mut self) -> u64 {
        let t = self.next_table;
        self.next_table += PAGE;
        // Materialise a zero page so it exists.
        self.mem.write_u64(t, 0);
        t
    }

    /// CR3 value (with the C-bit, as a SEV guest would have it).
    pub fn cr3(&self) -> u64 {
        self.root | self.c_bit
    }

    /// Index of `va` in a table at `level` (1 = page table).
    pub fn index(va: u64, level: u8) -> u64 {
        (va >> (12 + 9 * (u32::from(level) - 1))) & 0x1FF
    }

    /// Address of the entry for `va` at `level`, creating tables above it.
    pub fn entry_addr(&mut self, va: u64, level: u8) -> u64 {
        let mut table = self.root;
        let mut l = self.levels;
        while l > level {
            let ea = table + 8 * Self::index(va, l);
            let e = self.mem.read_u64(ea);
            table = if e & 1 == 0 {
                let t = self.alloc_table();
                self.mem.write_u64(ea, t | self.c_bit | 0x63);
                t
            } else {
                e & 0x000F_FFFF_FFFF_F000 & !self.c_bit
            };
            l -= 1;
        }
        table + 8 * Self::index(va, level)
    }

    /// Maps the page of size `1 << shift` containing `va` to `pa` (aligned).
    /// Adds NX and accessed/dirty bits, which the walker must ignore.
    pub fn map(&mut self, va: u64, pa: u64, shift: u8) {
        let level = match shift {
            12 => 1,
            21 => 2,
            30 => 3,
            _ => panic!("bad page shift"),
        };
        let size = 1u64 << shift;
        let (va, pa) = (va & !(size - 1), pa & !(size - 1));
        let ea = self.entry_addr(va, level);
        let ps = if level > 1 { 1 << 7 } else { 0 };
        self.mem
            .write_u64(ea, pa | self.c_bit | ps | (1 << 63) | 0x63);
        self.maps.insert(va, (shift, pa));
    }

    /// Ground truth translation.
    pub fn expect(&self, va: u64) -> Option<u64> {
        let (&base, &(shift, pa)) = self.maps.range(..=va).next_back()?;
        (va - base < (1u64 << shift)).then(|| pa + (va - base))
    }
}
