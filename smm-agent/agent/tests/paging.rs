//! The walker against page tables built in fake memory.

use proptest::prelude::*;
use smmvmi_agent::guard::{Guard, Refusal};
use smmvmi_agent::paging::{PagingMode, WalkError, walk};
use smmvmi_testkit::PtBuilder;
use smmvmi_testkit::memory::{HIGH_RAM, MMIO, SMRAM, ram_map, smram};

const C_BIT: u64 = 1 << 47;

fn run(b: &PtBuilder, va: u64) -> (smmvmi_mailbox::wire::WalkRecord, Result<u64, WalkError>) {
    let ram = ram_map();
    let g = Guard::new(&ram, smram(), 1 << 20);
    let mode = PagingMode {
        levels: b.levels,
        c_bit_mask: b.c_bit,
    };
    let root = smmvmi_agent::paging::cr3_root(b.cr3(), smmvmi_mailbox::wire::Pti::AsIs, b.c_bit);
    let (rec, r) = walk(&b.mem, &g, root, mode, va);
    b.mem.assert_reads_safe();
    (rec, r.map(|t| t.pa))
}

#[test]
fn every_mode_and_page_size() {
    for levels in [4u8, 5] {
        for c_bit in [0, C_BIT, 1 << 51] {
            let mut b = PtBuilder::new(levels, c_bit);
            let k4 = 0xFFFF_FFFF_8100_0000u64;
            b.map(k4, 0x0200_0000, 12);
            b.map(0xFFFF_8880_0000_0000, 0x4000_0000, 30);
            b.map(0x0000_7F00_0020_0000, 0x0060_0000, 21);
            let high = if levels == 5 {
                0x00FF_0000_0000_1000
            } else {
                0x0000_7FFF_FFFF_F000
            };
            b.map(high, 0x1_0000_3000, 12);
            for (va, depth_expected, shift) in [
                (k4 + 0x123, levels, 12),
                (0xFFFF_8880_1234_5678, levels - 2, 30),
                (0x0000_7F00_003F_FFFF, levels - 1, 21),
                (high + 0xFFF, levels, 12),
            ] {
                let (rec, r) = run(&b, va);
                assert_eq!(
                    r,
                    Ok(b.expect(va).unwrap()),
                    "va {va:#x} levels {levels} cbit {c_bit:#x}"
                );
                assert_eq!(rec.depth, depth_expected);
                assert_eq!(rec.page_shift, shift);
                assert_eq!(rec.levels, levels);
                assert_eq!(rec.pa & c_bit, 0, "C-bit must be masked");
                // The trace names each entry and its value.
                for &(ea, ev) in rec.trace() {
                    assert_eq!(b.mem.read_u64(ea), ev);
                    assert_eq!(ea & c_bit, 0);
                }
            }
        }
    }
}

#[test]
fn not_present_at_each_level() {
    for levels in [4u8, 5] {
        let mut b = PtBuilder::new(levels, 0);
        let va = 0xFFFF_FFFF_8100_0000u64;
        b.map(va, 0x0200_0000, 12);
        // Clear the entry at each level in turn (on a fresh copy each time).
        for level in 1..=levels {
            let mut b2 = PtBuilder::new(levels, 0);
            b2.map(va, 0x0200_0000, 12);
            let ea = b2.entry_addr(va, level);
            let e = b2.mem.read_u64(ea);
            b2.mem.write_u64(ea, e & !1);
            let (rec, r) = run(&b2, va);
            assert_eq!(r, Err(WalkError::NotPresent { level }));
            assert_eq!(
                rec.depth,
                levels - level + 1,
                "trace stops where the walk stopped"
            );
            assert_eq!(rec.trace().last().unwrap().0, ea);
        }
        // Unmapped neighbour in the same table.
        let (_, r) = run(&b, va + 0x1000);
        assert_eq!(r, Err(WalkError::NotPresent { level: 1 }));
    }
}

#[test]
fn malformed_tables_are_refused_not_read() {
    for levels in [4u8, 5] {
        let va = 0xFFFF_FFFF_8100_0000u64;
        for level in 2..=levels {
            for (target, refusal) in [
                (SMRAM.0 + 0x1000, Refusal::Smram),
                (0x9_0000_0000, Refusal::NotRam),
                (MMIO, Refusal::NotRam),
            ] {
                let mut b = PtBuilder::new(levels, 0);
                b.map(va, 0x0200_0000, 12);
                // The entry at `level` points its next table at `target`.
                let ea = b.entry_addr(va, level);
                b.mem.write_u64(ea, target | 0x63);
                let (_, r) = run(&b, va);
                assert_eq!(
                    r,
                    Err(WalkError::Refused {
                        level: level - 1,
                        refusal
                    })
                );
            }
        }
        // CR3 itself in SMRAM.
        let mut b = PtBuilder::new(levels, 0);
        b.root = SMRAM.0;
        let (rec, r) = run(&b, va);
        assert_eq!(
            r,
            Err(WalkError::Refused {
                level: levels,
                refusal: Refusal::Smram
            })
        );
        assert_eq!(rec.depth, 0);
    }
}

#[test]
fn non_canonical_is_refused_without_reading() {
    let b = PtBuilder::new(4, 0);
    let (_, r) = run(&b, 0x0000_8000_0000_0000);
    assert_eq!(r, Err(WalkError::NonCanonical));
    assert!(b.mem.reads.borrow().is_empty());
    let b = PtBuilder::new(5, 0);
    let (_, r) = run(&b, 0xFE00_0000_0000_0000);
    assert_eq!(r, Err(WalkError::NonCanonical));
}

#[test]
fn self_referencing_tables_terminate() {
    // Every entry of the root points back at the root: a loop in the tables.
    for levels in [4u8, 5] {
        let mut b = PtBuilder::new(levels, 0);
        for i in 0..512 {
            let root = b.root;
            b.mem.write_u64(root + 8 * i, root | 0x63);
        }
        let (rec, r) = run(&b, 0x1234_5000);
        // Level 1 entry is the root again, read as a 4 KiB page mapping.
        assert_eq!(rec.depth, levels);
        assert_eq!(r, Ok(b.root));
        assert_eq!(b.mem.reads.borrow().len(), levels as usize);
    }
}

fn canonical(levels: u8, raw: u64) -> u64 {
    let bits = if levels == 5 { 57 } else { 48 };
    (((raw << (64 - bits)) as i64) >> (64 - bits)) as u64
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random mappings in distinct 1 GiB regions, random queries: the walker
    /// agrees with the ground truth the builder recorded.
    #[test]
    fn walker_matches_ground_truth(
        levels in prop::sample::select(vec![4u8, 5]),
        use_cbit in any::<bool>(),
        regions in prop::collection::btree_set(0u64..(1 << 17), 1..12),
        sizes in prop::collection::vec(prop::sample::select(vec![12u8, 21, 30]), 12),
        offsets in prop::collection::vec(any::<u32>(), 12),
        queries in prop::collection::vec((0usize..12, any::<u32>()), 1..24),
    ) {
        let c_bit = if use_cbit { C_BIT } else { 0 };
        let mut b = PtBuilder::new(levels, c_bit);
        let regions: Vec<u64> = regions.into_iter().collect();
        let bases: Vec<u64> = regions
            .iter()
            .map(|r| canonical(levels, r << (if levels == 5 { 39 } else { 30 })))
            .collect();
        for (i, &base) in bases.iter().enumerate() {
            let shift = sizes[i];
            let va = base + (u64::from(offsets[i]) % (1 << 30));
            // Physical frames: anywhere in high RAM, aligned (not read by a walk).
            let pa = HIGH_RAM.0 + ((u64::from(offsets[i]) << 12) % HIGH_RAM.1);
            let pa = pa & !((1u64 << shift) - 1);
            b.map(va, pa.max(HIGH_RAM.0), shift);
        }
        for &(ri, off) in &queries {
            let base = bases[ri % bases.len()];
            let va = base + (u64::from(off) % (1 << 30));
            let (rec, r) = run(&b, va);
            match b.expect(va) {
                Some(pa) => prop_assert_eq!(r, Ok(pa)),
                None => prop_assert!(matches!(r, Err(WalkError::NotPresent { .. })), "{:?}", r),
            }
            prop_assert!(rec.depth as usize <= levels as usize);
        }
    }

    /// Arbitrary bytes as page tables: the walk never panics, never reads
    /// outside RAM, and stops within the level count.
    #[test]
    fn garbage_tables_never_escape(
        levels in prop::sample::select(vec![4u8, 5]),
        entries in prop::collection::vec(any::<u64>(), 512),
        va in any::<u64>(),
        cr3 in any::<u64>(),
    ) {
        let mut b = PtBuilder::new(levels, 0);
        for (i, e) in entries.iter().enumerate() {
            let root = b.root;
            b.mem.write_u64(root + 8 * i as u64, *e);
        }
        let (rec, _) = run(&b, va);
        prop_assert!(rec.depth <= levels);
        b.root = cr3 & 0x000F_FFFF_FFFF_F000;
        let (rec, _) = run(&b, va);
        prop_assert!(rec.depth <= levels);
    }
}
