//! Fake guest RAM and the machine it belongs to.

use std::cell::RefCell;
use std::collections::HashMap;

use smmvmi_agent::guard::{CheckedPhys, PhysMemory, PhysRange, RamMap};

/// Page size in bytes.
pub const PAGE: u64 = 0x1000;
/// RAM below the MMIO hole `(base, len)`; SMRAM is its last 16 MiB (still
/// listed as RAM here, to prove the guard refuses SMRAM by itself).
pub const LOW_RAM: (u64, u64) = (0, 0x8000_0000);
/// SMRAM (TSEG) `(base, len)` of the default machine.
pub const SMRAM: (u64, u64) = (0x7F00_0000, 0x0100_0000);
/// RAM above 4 GiB `(base, len)`.
pub const HIGH_RAM: (u64, u64) = (0x1_0000_0000, 0x4000_0000);
/// An MMIO address (the ivshmem BAR in our QEMU runs).
pub const MMIO: u64 = 0xFE00_0000;

/// A machine's memory map: RAM ranges and SMRAM, as `(base, len)` pairs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    /// RAM ranges (SMRAM may lie inside one of them).
    pub ram: Vec<(u64, u64)>,
    /// SMRAM range.
    pub smram: (u64, u64),
}

impl Default for Machine {
    /// [`LOW_RAM`] and [`HIGH_RAM`], with [`SMRAM`] at the top of low RAM.
    fn default() -> Self {
        Self {
            ram: vec![LOW_RAM, HIGH_RAM],
            smram: SMRAM,
        }
    }
}

impl Machine {
    /// One RAM range `[0, ram_len)` with SMRAM at `smram`.
    pub fn flat(ram_len: u64, smram: (u64, u64)) -> Self {
        Self {
            ram: vec![(0, ram_len)],
            smram,
        }
    }

    /// The agent's RAM map of this machine.
    pub fn ram_map(&self) -> RamMap {
        let mut m = RamMap::new();
        for &(base, len) in &self.ram {
            m.push(base, len).expect("testkit machine RAM range");
        }
        m
    }

    /// The agent's SMRAM range of this machine.
    pub fn smram(&self) -> PhysRange {
        PhysRange::new(self.smram.0, self.smram.1).expect("testkit machine SMRAM range")
    }

    /// True if `[addr, addr + len)` is readable RAM: inside one RAM range
    /// and not touching SMRAM.
    pub fn in_ram(&self, addr: u64, len: u64) -> bool {
        let end = addr + len.max(1);
        let inside = |&(b, l): &(u64, u64)| b <= addr && end <= b + l;
        let (sb, sl) = self.smram;
        let in_smram = addr < sb + sl && sb < end;
        self.ram.iter().any(inside) && !in_smram
    }
}

/// The default machine's RAM map.
pub fn ram_map() -> RamMap {
    Machine::default().ram_map()
}

/// The default machine's SMRAM.
pub fn smram() -> PhysRange {
    Machine::default().smram()
}

/// True if `[addr, addr + len)` is readable RAM of the default machine.
pub fn in_ram(addr: u64, len: u64) -> bool {
    Machine::default().in_ram(addr, len)
}

/// Sparse fake RAM (zero where never written) that records every read made
/// through [`PhysMemory`].
#[derive(Default)]
pub struct FakeMem {
    pages: HashMap<u64, Box<[u8; PAGE as usize]>>,
    /// Every `(address, length)` read through [`PhysMemory::read`].
    pub reads: RefCell<Vec<(u64, usize)>>,
}

impl FakeMem {
    /// Writes `data` at physical address `pa`.
    pub fn write(&mut self, pa: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let a = pa + i as u64;
            let page = self
                .pages
                .entry(a & !(PAGE - 1))
                .or_insert_with(|| Box::new([0; PAGE as usize]));
            page[(a & (PAGE - 1)) as usize] = *b;
        }
    }

    /// Writes a little-endian u64 at `pa`.
    pub fn write_u64(&mut self, pa: u64, v: u64) {
        self.write(pa, &v.to_le_bytes());
    }

    /// The byte at `a`.
    pub fn byte(&self, a: u64) -> u8 {
        self.pages
            .get(&(a & !(PAGE - 1)))
            .map_or(0, |p| p[(a & (PAGE - 1)) as usize])
    }

    /// The little-endian u64 at `pa`.
    pub fn read_u64(&self, pa: u64) -> u64 {
        let mut b = [0u8; 8];
        for (i, x) in b.iter_mut().enumerate() {
            *x = self.byte(pa + i as u64);
        }
        u64::from_le_bytes(b)
    }

    /// Panics if any recorded read left RAM or touched SMRAM of `machine`.
    pub fn assert_reads_within(&self, machine: &Machine) {
        for &(a, l) in self.reads.borrow().iter() {
            assert!(
                machine.in_ram(a, l as u64),
                "agent read {l} bytes at {a:#x} outside RAM or in SMRAM"
            );
        }
    }

    /// [`FakeMem::assert_reads_within`] the default machine.
    pub fn assert_reads_safe(&self) {
        self.assert_reads_within(&Machine::default());
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
