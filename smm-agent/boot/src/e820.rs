//! The e820 memory map: parsing QEMU's `etc/e820` fw_cfg file, carving out
//! reserved ranges (legacy holes, TSEG, ACPI tables, firmware), and encoding
//! the map for Linux's zero page.
//!
//! The map is a fixed-capacity array kept sorted by address, with no two
//! entries overlapping and adjacent entries of the same type merged.

use thiserror::Error;

/// Usable RAM.
pub const RAM: u32 = 1;
/// Reserved (not usable by the OS).
pub const RESERVED: u32 = 2;
/// ACPI tables, reclaimable after parsing.
pub const ACPI: u32 = 3;
/// ACPI non-volatile storage.
pub const NVS: u32 = 4;

/// Maximum number of entries (also the size of boot_params' e820 table).
pub const CAPACITY: usize = 128;
/// Size of one encoded entry (QEMU `etc/e820` and boot_params alike).
pub const ENTRY_LEN: usize = 20;

/// Start of the legacy hole (EBDA, VGA, option ROMs, BIOS).
pub const LEGACY_HOLE_START: u64 = 0x9_F000;
/// End of the legacy hole: 1 MiB.
pub const LEGACY_HOLE_END: u64 = 0x10_0000;
/// 4 GiB.
pub const FOUR_GIB: u64 = 1 << 32;

/// Errors of the e820 map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum E820Error {
    /// The fw_cfg file is not a whole number of entries.
    #[error(
        "etc/e820 is {len} bytes, expected a multiple of {ENTRY_LEN}; the fw_cfg file is corrupt"
    )]
    BadLength {
        /// File length.
        len: usize,
    },
    /// The map would need more entries than it can hold.
    #[error("e820 map needs more than {CAPACITY} entries; reserve fewer, larger ranges")]
    Full,
    /// A range that wraps past the top of the address space.
    #[error(
        "e820 range at {addr:#x} of {len:#x} bytes wraps past 2^64; expected addr + len <= 2^64"
    )]
    Overflow {
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
    },
    /// `reserve` was asked to mark a range as RAM.
    #[error("reserve() needs a non-RAM type, found type {kind}; use insert() to add RAM")]
    NotReserved {
        /// Type passed in.
        kind: u32,
    },
}

/// One e820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes (never 0 inside a map).
    pub len: u64,
    /// Type: [`RAM`], [`RESERVED`], [`ACPI`], [`NVS`] or other.
    pub kind: u32,
}

impl E820Entry {
    /// Exclusive end address (saturating; entries in a map never wrap).
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.len)
    }

    /// Encode as 20 little-endian bytes {addr u64, len u64, type u32}.
    pub fn to_bytes(&self) -> [u8; ENTRY_LEN] {
        let mut out = [0u8; ENTRY_LEN];
        let (a, rest) = out.split_at_mut(8);
        let (l, t) = rest.split_at_mut(8);
        a.copy_from_slice(&self.addr.to_le_bytes());
        l.copy_from_slice(&self.len.to_le_bytes());
        t.copy_from_slice(&self.kind.to_le_bytes());
        out
    }

    /// Decode 20 little-endian bytes.
    pub fn from_bytes(b: [u8; ENTRY_LEN]) -> Self {
        let [
            a0,
            a1,
            a2,
            a3,
            a4,
            a5,
            a6,
            a7,
            l0,
            l1,
            l2,
            l3,
            l4,
            l5,
            l6,
            l7,
            t0,
            t1,
            t2,
            t3,
        ] = b;
        Self {
            addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
            len: u64::from_le_bytes([l0, l1, l2, l3, l4, l5, l6, l7]),
            kind: u32::from_le_bytes([t0, t1, t2, t3]),
        }
    }
}

/// A sorted, non-overlapping e820 map of at most [`CAPACITY`] entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct E820Map {
    entries: [E820Entry; CAPACITY],
    len: usize,
}

impl Default for E820Map {
    fn default() -> Self {
        Self::new()
    }
}

impl E820Map {
    /// An empty map.
    pub const fn new() -> Self {
        Self {
            entries: [E820Entry {
                addr: 0,
                len: 0,
                kind: 0,
            }; CAPACITY],
            len: 0,
        }
    }

    /// Parse the contents of QEMU's `etc/e820` file. Entries are overlaid in
    /// file order (a later entry wins where two overlap); empty entries are
    /// dropped.
    pub fn parse(bytes: &[u8]) -> Result<Self, E820Error> {
        if !bytes.len().is_multiple_of(ENTRY_LEN) {
            return Err(E820Error::BadLength { len: bytes.len() });
        }
        let mut map = Self::new();
        for chunk in bytes.chunks_exact(ENTRY_LEN) {
            let mut b = [0u8; ENTRY_LEN];
            b.copy_from_slice(chunk);
            let e = E820Entry::from_bytes(b);
            map.insert(e.addr, e.len, e.kind)?;
        }
        Ok(map)
    }

    /// The entries, sorted by address.
    pub fn entries(&self) -> &[E820Entry] {
        self.entries.get(..self.len).unwrap_or(&[])
    }

    /// Iterate over the entries in address order.
    pub fn iter(&self) -> impl Iterator<Item = &E820Entry> {
        self.entries().iter()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the map has no entries.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Set `[addr, addr+len)` to `kind`, replacing whatever was there
    /// (splitting entries as needed). On error the map is unchanged.
    pub fn insert(&mut self, addr: u64, len: u64, kind: u32) -> Result<(), E820Error> {
        let end = addr
            .checked_add(len)
            .ok_or(E820Error::Overflow { addr, len })?;
        if len == 0 {
            return Ok(());
        }
        let new = E820Entry { addr, len, kind };
        let mut out = Self::new();
        let mut placed = false;
        for e in self.entries() {
            if e.addr < addr {
                // Part before the new range.
                let head_end = e.end().min(addr);
                out.push(E820Entry {
                    addr: e.addr,
                    len: head_end - e.addr,
                    kind: e.kind,
                })?;
            }
            if !placed && e.end() > addr {
                out.push(new)?;
                placed = true;
            }
            if e.end() > end {
                // Part after the new range.
                let tail_start = e.addr.max(end);
                if !placed {
                    out.push(new)?;
                    placed = true;
                }
                out.push(E820Entry {
                    addr: tail_start,
                    len: e.end() - tail_start,
                    kind: e.kind,
                })?;
            }
        }
        if !placed {
            out.push(new)?;
        }
        *self = out;
        Ok(())
    }

    /// Mark `[addr, addr+len)` as `kind` (must not be [`RAM`]), carving it
    /// out of any RAM (or other) entries it overlaps.
    pub fn reserve(&mut self, addr: u64, len: u64, kind: u32) -> Result<(), E820Error> {
        if kind == RAM {
            return Err(E820Error::NotReserved { kind });
        }
        self.insert(addr, len, kind)
    }

    /// Reserve the legacy hole `[0x9F000, 0x100000)` (EBDA, VGA, ROMs, BIOS),
    /// leaving `[0, 0x9F000)` as it was.
    pub fn add_legacy_holes(&mut self) -> Result<(), E820Error> {
        self.reserve(
            LEGACY_HOLE_START,
            LEGACY_HOLE_END - LEGACY_HOLE_START,
            RESERVED,
        )
    }

    /// End of the RAM entry that contains 1 MiB and ends at or below 4 GiB:
    /// the top of the contiguous low RAM the kernel and initrd can use.
    pub fn lowmem_top(&self) -> Option<u64> {
        self.iter()
            .find(|e| {
                e.kind == RAM
                    && e.addr <= LEGACY_HOLE_END
                    && e.end() > LEGACY_HOLE_END
                    && e.end() <= FOUR_GIB
            })
            .map(E820Entry::end)
    }

    /// End of the highest RAM entry, or 0 if there is none.
    pub fn highest_ram_end(&self) -> u64 {
        self.iter()
            .filter(|e| e.kind == RAM)
            .map(E820Entry::end)
            .max()
            .unwrap_or(0)
    }

    /// Total bytes of RAM entries.
    pub fn ram_bytes(&self) -> u64 {
        self.iter()
            .filter(|e| e.kind == RAM)
            .fold(0u64, |acc, e| acc.saturating_add(e.len))
    }

    /// Encode the entries into `out` (20 bytes each, as in boot_params'
    /// `e820_table`); returns how many entries were written (limited by
    /// `out.len() / 20`).
    pub fn encode(&self, out: &mut [u8]) -> usize {
        let mut n = 0;
        for (e, dst) in self.iter().zip(out.chunks_exact_mut(ENTRY_LEN)) {
            dst.copy_from_slice(&e.to_bytes());
            n += 1;
        }
        n
    }

    /// Append, merging with the previous entry when adjacent and of the same type.
    fn push(&mut self, e: E820Entry) -> Result<(), E820Error> {
        if e.len == 0 {
            return Ok(());
        }
        if let Some(last) = self
            .len
            .checked_sub(1)
            .and_then(|i| self.entries.get_mut(i))
            && last.kind == e.kind
            && last.end() == e.addr
        {
            last.len = last.len.saturating_add(e.len);
            return Ok(());
        }
        let slot = self.entries.get_mut(self.len).ok_or(E820Error::Full)?;
        *slot = e;
        self.len += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::vec::Vec;

    fn qemu_file(entries: &[(u64, u64, u32)]) -> Vec<u8> {
        entries
            .iter()
            .flat_map(|&(addr, len, kind)| E820Entry { addr, len, kind }.to_bytes())
            .collect()
    }

    fn e(addr: u64, len: u64, kind: u32) -> E820Entry {
        E820Entry { addr, len, kind }
    }

    #[test]
    fn parses_qemu_layout_and_carves() {
        // 5 GiB guest on q35: 2 GiB below 4 GiB, 3 GiB above.
        let f = qemu_file(&[(0, 0x8000_0000, RAM), (FOUR_GIB, 0xC000_0000, RAM)]);
        let mut m = E820Map::parse(&f).unwrap();
        assert_eq!(m.len(), 2);
        m.add_legacy_holes().unwrap();
        let tseg = 0x8000_0000 - 16 * 1024 * 1024;
        m.reserve(tseg, 16 << 20, RESERVED).unwrap();
        m.reserve(tseg - 0x10_0000, 0x10_0000, ACPI).unwrap();
        assert_eq!(
            m.entries(),
            &[
                e(0, 0x9F000, RAM),
                e(0x9F000, 0x61000, RESERVED),
                e(0x10_0000, tseg - 0x10_0000 - 0x10_0000, RAM),
                e(tseg - 0x10_0000, 0x10_0000, ACPI),
                e(tseg, 16 << 20, RESERVED),
                e(FOUR_GIB, 0xC000_0000, RAM),
            ]
        );
        assert_eq!(m.lowmem_top(), Some(tseg - 0x10_0000));
        assert_eq!(m.highest_ram_end(), FOUR_GIB + 0xC000_0000);
        let mut out = [0u8; 20 * CAPACITY];
        assert_eq!(m.encode(&mut out), 6);
        assert_eq!(
            &out[40..60],
            &e(0x10_0000, tseg - 0x20_0000, RAM).to_bytes()
        );
        let mut small = [0u8; 45];
        assert_eq!(m.encode(&mut small), 2);
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(
            E820Map::parse(&[0; 21]),
            Err(E820Error::BadLength { len: 21 })
        );
        let mut m = E820Map::new();
        assert_eq!(
            m.insert(u64::MAX, 2, RAM),
            Err(E820Error::Overflow {
                addr: u64::MAX,
                len: 2
            })
        );
        assert_eq!(
            m.reserve(0, 1, RAM),
            Err(E820Error::NotReserved { kind: RAM })
        );
        m.insert(0, 0, RAM).unwrap();
        assert!(m.is_empty());
        assert_eq!(m.lowmem_top(), None);
        assert_eq!(m.highest_ram_end(), 0);
    }

    #[test]
    fn full_map_is_an_error_and_unchanged() {
        let mut m = E820Map::new();
        m.insert(0, 1 << 40, RAM).unwrap();
        for i in 0..63u64 {
            m.reserve(0x10_0000 + i * 0x2000, 0x1000, RESERVED).unwrap();
        }
        assert_eq!(m.len(), 127);
        let before = m.clone();
        assert_eq!(
            m.reserve(0x9000_0000, 0x1000, RESERVED),
            Err(E820Error::Full)
        );
        assert_eq!(m, before);
        // Touching the last RAM entry's start does not need a split.
        m.reserve(0x10_0000 + 63 * 0x2000 - 0x1000, 0x1000, RESERVED)
            .unwrap();
    }

    #[test]
    fn lowmem_top_skips_ram_above_4g() {
        let mut m = E820Map::new();
        m.insert(0, 0x5_0000_0000, RAM).unwrap();
        assert_eq!(m.lowmem_top(), None);
        m.reserve(0xC000_0000, 0x4000_0000, RESERVED).unwrap();
        assert_eq!(m.lowmem_top(), Some(0xC000_0000));
    }

    fn check_invariants(m: &E820Map) -> Result<(), TestCaseError> {
        for w in m.entries().windows(2) {
            prop_assert!(w[0].end() <= w[1].addr, "overlap or unsorted: {:?}", w);
            prop_assert!(
                !(w[0].end() == w[1].addr && w[0].kind == w[1].kind),
                "unmerged {:?}",
                w
            );
        }
        for x in m.iter() {
            prop_assert!(x.len > 0);
        }
        Ok(())
    }

    /// Reference model: type of every 4 KiB page in a small address space.
    fn model_kind(ops: &[(u64, u64, u32)], page: u64) -> Option<u32> {
        ops.iter()
            .rev()
            .find(|&&(a, l, _)| page >= a && page < a + l)
            .map(|&(_, _, k)| k)
    }

    proptest! {
        #[test]
        fn overlay_matches_model(ops in proptest::collection::vec((0u64..64, 0u64..16, 1u32..5), 1..30)) {
            let ops: Vec<(u64, u64, u32)> = ops.iter().map(|&(a, l, k)| (a * 0x1000, l * 0x1000, k)).collect();
            let mut m = E820Map::new();
            for &(a, l, k) in &ops {
                m.insert(a, l, k).unwrap();
                check_invariants(&m)?;
            }
            for p in 0..80u64 {
                let addr = p * 0x1000;
                let got = m.iter().find(|x| addr >= x.addr && addr < x.end()).map(|x| x.kind);
                prop_assert_eq!(got, model_kind(&ops, addr));
            }
            let mut buf = [0u8; 20 * CAPACITY];
            let n = m.encode(&mut buf);
            let back = E820Map::parse(&buf[..n * 20]).unwrap();
            prop_assert_eq!(back, m);
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(m) = E820Map::parse(&bytes) {
                check_invariants(&m)?;
                let _ = m.lowmem_top();
            }
        }
    }
}
