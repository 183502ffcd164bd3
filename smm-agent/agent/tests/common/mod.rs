//! Fake guest memory and a page-table builder (memflow's `alloc_dtb` idea):
//! the tests build real x86-64 page tables in sparse fake RAM and keep the
//! mappings they made as ground truth.
#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

use smmvmi_agent::guard::{CheckedPhys, PhysMemory, PhysRange, RamMap};

pub const PAGE: u64 = 0x1000;
/// RAM below the MMIO hole; SMRAM is its last 16 MiB (still listed as RAM
/// here, to prove the guard refuses SMRAM by itself).
pub const LOW_RAM: (u64, u64) = (0, 0x8000_0000);
pub const SMRAM: (u64, u64) = (0x7F00_0000, 0x0100_0000);
/// RAM above 4 GiB.
pub const HIGH_RAM: (u64, u64) = (0x1_0000_0000, 0x4000_0000);
/// An MMIO address (the ivshmem BAR in our QEMU runs).
pub const MMIO: u64 = 0xFE00_0000;

pub fn ram_map() -> RamMap {
    let mut m = RamMap::new();
    m.push(LOW_RAM.0, LOW_RAM.1).unwrap();
    m.push(HIGH_RAM.0, HIGH_RAM.1).unwrap();
    m
}

pub fn smram() -> PhysRange {
    PhysRange::new(SMRAM.0, SMRAM.1).unwrap()
}

pub fn in_ram(addr: u64, len: u64) -> bool {
    let end = addr + len.max(1);
    let inside = |(b, l): (u64, u64)| b <= addr && end <= b + l;
    let in_smram = addr < SMRAM.0 + SMRAM.1 && SMRAM.0 < end;
    (inside(LOW_RAM) || inside(HIGH_RAM)) && !in_smram
}

/// Sparse fake RAM that records every read.
#[derive(Default)]
pub struct FakeMem {
    pages: HashMap<u64, Box<[u8; 4096]>>,
    pub reads: RefCell<Vec<(u64, usize)>>,
}

impl FakeMem {
    pub fn write(&mut self, pa: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let a = pa + i as u64;
            let page = self
                .pages
                .entry(a & !(PAGE - 1))
                .or_insert_with(|| Box::new([0; 4096]));
            page[(a & (PAGE - 1)) as usize] = *b;
        }
    }

    pub fn write_u64(&mut self, pa: u64, v: u64) {
        self.write(pa, &v.to_le_bytes());
    }

    pub fn byte(&self, a: u64) -> u8 {
        self.pages
            .get(&(a & !(PAGE - 1)))
            .map_or(0, |p| p[(a & (PAGE - 1)) as usize])
    }

    pub fn read_u64(&self, pa: u64) -> u64 {
        let mut b = [0u8; 8];
        for (i, x) in b.iter_mut().enumerate() {
            *x = self.byte(pa + i as u64);
        }
        u64::from_le_bytes(b)
    }

    /// Panics if any recorded read left RAM or touched SMRAM.
    pub fn assert_reads_safe(&self) {
        for &(a, l) in self.reads.borrow().iter() {
            assert!(
                in_ram(a, l as u64),
                "agent read {l} bytes at {a:#x} outside RAM or in SMRAM"
            );
        }
    }
}

impl PhysMemory for FakeMem {
    fn read(&self, range: CheckedPhys, buf: &mut [u8]) {
        self.reads.borrow_mut().push((range.addr(), range.len()));
        let n = buf.len().min(range.len());
        for (i, x) in buf[..n].iter_mut().enumerate() {
            *x = self.byte(range.addr() + i as u64);
        }
    }
}

/// Builds page tables in a [`FakeMem`].
pub struct PtBuilder {
    pub mem: FakeMem,
    pub levels: u8,
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

/// A CPU snapshot in 64-bit long mode with the given CR3 and levels.
pub fn cpu(cr3: u64, levels: u8) -> smmvmi_agent::CpuSnapshot {
    smmvmi_agent::CpuSnapshot {
        cr0: 0x8005_0033,
        cr3,
        cr4: 0x3406F0 | if levels == 5 { 1 << 12 } else { 0 },
        efer: 0xD01,
        rip: 0xFFFF_FFFF_8100_0000,
        msrs_valid: 1,
        msr_lstar: 0xFFFF_FFFF_8160_0080,
        ..Default::default()
    }
}
