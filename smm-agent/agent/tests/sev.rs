//! SEV detection and the C-bit: one definition (`SevConfig`) for the
//! firmware's page tables and the agent's walker.

use smmvmi_agent::guard::Guard;
use smmvmi_agent::paging::{PagingMode, walk};
use smmvmi_agent::serve::{CPUID_SEV_LEAF, SevConfig};
use smmvmi_testkit::PtBuilder;
use smmvmi_testkit::memory::{ram_map, smram};

fn never() -> u64 {
    panic!("SEV_STATUS must not be read when CPUID does not offer SEV (it would #GP)")
}

#[test]
fn no_sev_leaf_or_no_sev_bit_means_off_and_the_msr_is_not_read() {
    assert_eq!(
        SevConfig::detect(0x8000_0008, 0, 0, never),
        SevConfig::default()
    );
    // The leaf exists but SEV is not supported (EAX bit 1 clear): SME only.
    assert_eq!(
        SevConfig::detect(CPUID_SEV_LEAF, 1, 47, never),
        SevConfig::default()
    );
    assert_eq!(SevConfig::default().c_bit_mask(), 0);
}

#[test]
fn c_bit_position_comes_from_ebx_and_activity_from_sev_status() {
    for (ebx, bit) in [(47u32 | (1 << 6), 47u8), (51 | (5 << 6), 51)] {
        let on = SevConfig::detect(CPUID_SEV_LEAF + 1, 0b1011, ebx, || 1);
        assert_eq!(
            on,
            SevConfig {
                active: true,
                c_bit: bit
            }
        );
        assert_eq!(on.c_bit_mask(), 1 << bit);
        // Supported by the CPU but this guest is not encrypted.
        let off = SevConfig::detect(CPUID_SEV_LEAF, 0b10, ebx, || 0);
        assert!(!off.active);
        assert_eq!(off.c_bit_mask(), 0);
        assert_eq!(off.pte_bits(true), 0);
    }
}

#[test]
fn private_mappings_carry_the_c_bit_shared_ones_do_not() {
    let sev = SevConfig {
        active: true,
        c_bit: 51,
    };
    assert_eq!(sev.pte_bits(true), 1 << 51);
    assert_eq!(sev.pte_bits(false), 0);
}

/// A guest (as an SEV guest lays it out) with a private page (C-bit set in
/// its PTE) and a shared page (C-bit clear, e.g. a DMA buffer): the walker
/// finds the same physical addresses for both, at C-bit 47 and 51.
#[test]
fn walker_masks_the_c_bit_of_private_and_shared_entries() {
    for bit in [47u32, 51] {
        let sev = SevConfig::detect(CPUID_SEV_LEAF, 0b10, bit, || 1);
        let c = sev.c_bit_mask();
        let mut b = PtBuilder::new(4, c);
        let private = 0xFFFF_FFFF_8100_0000u64;
        let shared = 0xFFFF_FFFF_8100_1000u64;
        b.map(private, 0x0200_0000, 12);
        b.map(shared, 0x0200_5000, 12);
        let leaf = b.entry_addr(shared, 1);
        let v = b.mem.read_u64(leaf);
        assert_ne!(v & c, 0);
        b.mem.write_u64(leaf, v & !c);

        let ram = ram_map();
        let g = Guard::new(&ram, smram(), 1 << 20);
        let mode = PagingMode {
            levels: 4,
            c_bit_mask: sev.c_bit_mask(),
        };
        let root = smmvmi_agent::paging::cr3_root(b.cr3(), smmvmi_mailbox::wire::Pti::AsIs, c);
        let (_, r) = walk(&b.mem, &g, root, mode, private + 0x10);
        assert_eq!(r.unwrap().pa, 0x0200_0010, "private, C-bit {bit}");
        let (_, r) = walk(&b.mem, &g, root, mode, shared + 0x20);
        assert_eq!(r.unwrap().pa, 0x0200_5020, "shared, C-bit {bit}");
        // Without masking, the private page's address would carry the bit.
        let raw = PagingMode {
            levels: 4,
            c_bit_mask: 0,
        };
        let (_, r) = walk(&b.mem, &g, root, raw, private);
        assert!(r.map(|t| t.pa != 0x0200_0000).unwrap_or(true));
    }
}
