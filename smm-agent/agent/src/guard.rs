//! The only way to a readable physical address.
//!
//! An address handed in by the OS, the host or a page table is an
//! [`Alleged`] range: it cannot be read through. [`Guard::check`] turns it
//! into a [`CheckedPhys`] only if it lies entirely inside one RAM range
//! recorded at boot, does not touch SMRAM, and is no longer than the
//! guard's length bound. [`PhysMemory::read`] takes only a [`CheckedPhys`],
//! and nothing outside this module can build one.

/// Most RAM ranges a [`RamMap`] holds.
pub const MAX_RAM_RANGES: usize = 64;

/// Errors of the guard module (building the boot-time RAM map).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    /// The RAM map is full.
    #[error(
        "RAM map holds at most {MAX_RAM_RANGES} ranges, found more: merge adjacent e820 RAM entries first"
    )]
    TooManyRanges,
    /// A range is empty or wraps around the address space.
    #[error(
        "RAM range must be non-empty and end below 2^64, found base {base:#x} length {len:#x}: fix the e820 entry"
    )]
    BadRange {
        /// Base given.
        base: u64,
        /// Length given.
        len: u64,
    },
}

/// A half-open physical range `[base, end)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhysRange {
    base: u64,
    end: u64,
}

impl PhysRange {
    /// `[base, base + len)`; `None` if empty or wrapping.
    pub fn new(base: u64, len: u64) -> Option<Self> {
        let end = base.checked_add(len)?;
        (len > 0).then_some(Self { base, end })
    }

    /// An empty range (e.g. "no SMRAM" in tests).
    pub const EMPTY: Self = Self { base: 0, end: 0 };

    /// First byte.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.base
    }

    /// True if the range is empty.
    pub fn is_empty(&self) -> bool {
        self.end == self.base
    }

    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.end
    }

    fn overlaps(&self, base: u64, end: u64) -> bool {
        base < self.end && self.base < end
    }

    fn contains_range(&self, base: u64, end: u64) -> bool {
        self.base <= base && end <= self.end
    }
}

/// The guest RAM ranges recorded at boot (e820 type RAM), fixed capacity.
#[derive(Clone, Debug)]
pub struct RamMap {
    ranges: [PhysRange; MAX_RAM_RANGES],
    len: usize,
}

impl Default for RamMap {
    fn default() -> Self {
        Self::new()
    }
}

impl RamMap {
    /// An empty map (nothing is readable).
    pub const fn new() -> Self {
        Self {
            ranges: [PhysRange::EMPTY; MAX_RAM_RANGES],
            len: 0,
        }
    }

    /// Adds a RAM range.
    pub fn push(&mut self, base: u64, len: u64) -> Result<(), GuardError> {
        let r = PhysRange::new(base, len).ok_or(GuardError::BadRange { base, len })?;
        let slot = self
            .ranges
            .get_mut(self.len)
            .ok_or(GuardError::TooManyRanges)?;
        *slot = r;
        self.len += 1;
        Ok(())
    }

    /// The ranges, in insertion order.
    pub fn ranges(&self) -> &[PhysRange] {
        &self.ranges[..self.len]
    }
}

/// A physical range alleged by an untrusted party (OS, host, page table).
/// It has no way to be read; check it with a [`Guard`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Alleged {
    addr: u64,
    len: u64,
}

impl Alleged {
    /// An allegation of `len` bytes at `addr`.
    pub fn new(addr: u64, len: u64) -> Self {
        Self { addr, len }
    }
}

/// A physical range checked by a [`Guard`]: inside one RAM range, outside
/// SMRAM, length bounded. Only this module constructs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckedPhys {
    addr: u64,
    len: usize,
}

impl CheckedPhys {
    /// First byte.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes (fits `usize`, bounded by the guard).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if zero-length.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Why an allegation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The range touches SMRAM.
    Smram,
    /// The range is not entirely inside one RAM range (MMIO, hole, beyond
    /// RAM, or wrapping).
    NotRam,
    /// The range is longer than the guard allows.
    TooLarge,
}

/// Checks allegations against the boot-time RAM map and SMRAM.
#[derive(Clone, Copy, Debug)]
pub struct Guard<'a> {
    ram: &'a RamMap,
    smram: PhysRange,
    max_len: usize,
}

impl<'a> Guard<'a> {
    /// A guard allowing reads of at most `max_len` bytes inside `ram`,
    /// never touching `smram`.
    pub fn new(ram: &'a RamMap, smram: PhysRange, max_len: usize) -> Self {
        Self {
            ram,
            smram,
            max_len,
        }
    }

    /// Checks an allegation. SMRAM is refused first (even if the RAM map
    /// wrongly lists it as RAM).
    pub fn check(&self, a: Alleged) -> Result<CheckedPhys, Refusal> {
        let len = usize::try_from(a.len).map_err(|_| Refusal::TooLarge)?;
        if len > self.max_len {
            return Err(Refusal::TooLarge);
        }
        let end = a.addr.checked_add(a.len).ok_or(Refusal::NotRam)?;
        // A zero-length allegation is checked as if it were one byte, so
        // no address outside RAM is ever blessed.
        let check_end = end.max(a.addr.saturating_add(1));
        if self.smram.overlaps(a.addr, check_end) {
            return Err(Refusal::Smram);
        }
        if self
            .ram
            .ranges()
            .iter()
            .any(|r| r.contains_range(a.addr, check_end))
        {
            Ok(CheckedPhys { addr: a.addr, len })
        } else {
            Err(Refusal::NotRam)
        }
    }
}

/// Guest physical memory as the firmware reaches it from SMM.
pub trait PhysMemory {
    /// Copies `range.len()` bytes at `range.addr()` into `buf`.
    /// The agent always passes `buf.len() == range.len()`; an implementation
    /// copies `min(buf.len(), range.len())` bytes and must not fault on a
    /// checked range.
    fn read(&self, range: CheckedPhys, buf: &mut [u8]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> RamMap {
        let mut m = RamMap::new();
        m.push(0, 0xA0000).unwrap();
        m.push(0x100000, 0x7F00_0000).unwrap();
        m
    }

    #[test]
    fn refuses_smram_before_ram() {
        let m = map();
        let smram = PhysRange::new(0x7E00_0000, 0x100_0000).unwrap();
        let g = Guard::new(&m, smram, 1 << 20);
        assert_eq!(g.check(Alleged::new(0x7E00_0000, 8)), Err(Refusal::Smram));
        assert_eq!(g.check(Alleged::new(0x7DFF_FFF8, 16)), Err(Refusal::Smram));
        assert_eq!(g.check(Alleged::new(0x7EFF_FFFF, 0)), Err(Refusal::Smram));
        assert!(g.check(Alleged::new(0x7DFF_FFF8, 8)).is_ok());
    }

    #[test]
    fn refuses_holes_mmio_and_wrap() {
        let m = map();
        let g = Guard::new(&m, PhysRange::EMPTY, 1 << 20);
        assert_eq!(g.check(Alleged::new(0xA0000, 1)), Err(Refusal::NotRam));
        assert_eq!(g.check(Alleged::new(0x9FFFF, 2)), Err(Refusal::NotRam));
        assert_eq!(g.check(Alleged::new(0xFE00_0000, 8)), Err(Refusal::NotRam));
        assert_eq!(g.check(Alleged::new(u64::MAX, 8)), Err(Refusal::NotRam));
        assert_eq!(g.check(Alleged::new(0x8000_0000, 0)), Err(Refusal::NotRam));
        assert_eq!(
            g.check(Alleged::new(0x1000, 1 << 21)),
            Err(Refusal::TooLarge)
        );
        assert_eq!(
            g.check(Alleged::new(0x1000, u64::MAX)),
            Err(Refusal::TooLarge)
        );
        let c = g.check(Alleged::new(0x9F000, 0x1000)).unwrap();
        assert_eq!((c.addr(), c.len()), (0x9F000, 0x1000));
    }

    #[test]
    fn ram_map_bounds() {
        let mut m = RamMap::new();
        assert!(m.push(5, 0).is_err());
        assert!(m.push(u64::MAX, 2).is_err());
        for i in 0..MAX_RAM_RANGES as u64 {
            m.push(i << 20, 4096).unwrap();
        }
        assert_eq!(m.push(1 << 40, 1), Err(GuardError::TooManyRanges));
    }
}
