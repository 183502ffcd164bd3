use super::*;
use crate::sev::CPUID_SEV_LEAF;

/// The SEV state a CPU with the C-bit at `bit` reports, active or not.
fn sev(bit: u32, active: bool) -> SevConfig {
    SevConfig::detect(CPUID_SEV_LEAF, 0b10, bit, || u64::from(active))
}

// As the firmware lays out a 2 GiB guest: RAM below 2 GiB, the fw_cfg DMA
// page and bounce buffer in low memory, the ivshmem mailbox BAR and the
// local APIC in the 32-bit hole.
const RAM: &[(u64, u64)] = &[(0, 0x8000_0000), (0x1_0000_0000, 0x4000_0000)];
const BOUNCE: (u64, u64) = (0x6_0000, 0x1_1000);
const MAILBOX_BAR: u64 = 0xC000_0000;
const LAPIC: u64 = 0xFEE0_0000;

fn plan() -> MemoryPlan<'static> {
    MemoryPlan {
        ram: RAM,
        shared: core::slice::from_ref(&BOUNCE),
    }
}

#[test]
fn ram_is_private_with_the_c_bit_at_47_and_51() {
    for bit in [47u32, 51] {
        let s = sev(bit, true);
        let c = 1u64 << bit;
        for page in [0x20_0000u64, 0x7FE0_0000, 0x1_0000_0000, 0x1_3FE0_0000] {
            let e = plan().pde_2m(&s, page, 0).unwrap();
            assert_eq!(
                e,
                page | c | PTE_HUGE | PTE_WRITABLE | PTE_PRESENT,
                "{page:#x}"
            );
        }
        // 4 KiB RAM pages next to the bounce buffer.
        for page in [0u64, 0x5_F000, 0x7_1000, 0x1F_F000] {
            let e = plan().pte_4k(&s, page, PTE_NO_EXECUTE).unwrap();
            assert_eq!(e, page | c | PTE_NO_EXECUTE | 0x3, "{page:#x}");
        }
    }
}

#[test]
fn dma_buffer_and_mmio_are_shared_without_the_c_bit() {
    for bit in [47u32, 51] {
        let s = sev(bit, true);
        let c = 1u64 << bit;
        for page in (BOUNCE.0..BOUNCE.0 + BOUNCE.1).step_by(PAGE_4K as usize) {
            let e = plan().pte_4k(&s, page, 0).unwrap();
            assert_eq!(e & c, 0, "bounce page {page:#x}, C-bit {bit}");
            assert_eq!(e, page | 0x3);
        }
        for page in [
            MAILBOX_BAR,
            LAPIC & !(PAGE_2M - 1),
            0x8000_0000,
            0xFFE0_0000,
        ] {
            let e = plan().pde_2m(&s, page, PTE_NO_EXECUTE).unwrap();
            assert_eq!(e, page | PTE_NO_EXECUTE | PTE_HUGE | 0x3, "{page:#x}");
        }
        // Above the highest RAM (a 64-bit BAR, unplugged space): shared.
        assert_eq!(plan().backing(0x1_4000_0000, PAGE_2M), Ok(Backing::Shared));
    }
}

#[test]
fn tables_are_private_and_cr3_material_is_unchanged() {
    let s = sev(51, true);
    assert_eq!(table_entry(&s, 0x10_1000), 0x10_1000 | 1 << 51 | 0x3);
    assert_eq!(
        table_entry(&sev(47, true), 0x10_1000),
        0x10_1000 | 1 << 47 | 0x3
    );
    assert_eq!(table_entry(&SevConfig::default(), 0x10_1000), 0x10_1003);
}

#[test]
fn without_sev_no_entry_has_a_c_bit() {
    // No SEV leaf at all (TCG), and SEV supported but not active.
    for s in [SevConfig::default(), sev(47, false), sev(51, false)] {
        assert_eq!(plan().pde_2m(&s, 0x20_0000, 0).unwrap(), 0x20_0083);
        assert_eq!(plan().pte_4k(&s, 0x1000, 0).unwrap(), 0x1003);
        assert_eq!(plan().pte_4k(&s, BOUNCE.0, 0).unwrap(), BOUNCE.0 | 0x3);
        assert_eq!(
            plan().pde_2m(&s, MAILBOX_BAR, 0).unwrap(),
            MAILBOX_BAR | 0x83
        );
        assert_eq!(table_entry(&s, 0x10_2000), 0x10_2003);
    }
}

#[test]
fn a_2m_page_holding_the_bounce_buffer_and_ram_must_be_split() {
    let s = sev(47, true);
    assert_eq!(
        plan().pde_2m(&s, 0, 0),
        Err(PagingError::Mixed {
            page: 0,
            size: PAGE_2M,
            shared_base: BOUNCE.0,
            shared_len: BOUNCE.1
        })
    );
    // A shared buffer that is not 4 KiB aligned is refused even at 4 KiB.
    let odd = [(0x6_0800u64, 0x1000u64)];
    let p = MemoryPlan {
        ram: RAM,
        shared: &odd,
    };
    assert!(matches!(
        p.pte_4k(&s, 0x6_0000, 0),
        Err(PagingError::Mixed { .. })
    ));
    let msg = std::format!("{}", plan().pde_2m(&s, 0, 0).unwrap_err());
    assert!(msg.contains("smaller pages"), "{msg}");
}

#[test]
fn a_page_partly_ram_is_private() {
    // The last 2 MiB page of a RAM range that ends mid-page.
    let ram = [(0u64, 0x7FF0_0000u64)];
    let p = MemoryPlan {
        ram: &ram,
        shared: &[],
    };
    assert_eq!(p.backing(0x7FE0_0000, PAGE_2M), Ok(Backing::Private));
    assert_eq!(p.backing(0x8000_0000, PAGE_2M), Ok(Backing::Shared));
}

#[test]
fn the_reset_path_mask_must_agree_with_detection() {
    assert_eq!(check_reset_path(&SevConfig::default(), 0), Ok(()));
    assert_eq!(check_reset_path(&sev(51, false), 0), Ok(()));
    assert_eq!(check_reset_path(&sev(51, true), 1 << (51 - 32)), Ok(()));
    assert_eq!(check_reset_path(&sev(47, true), 1 << (47 - 32)), Ok(()));
    let err = check_reset_path(&sev(47, true), 0).unwrap_err();
    assert_eq!(
        err,
        PagingError::ResetPathMask {
            asm: 0,
            rust: 1 << 47,
            active: true,
            c_bit: 47
        }
    );
    // A C-bit the reset path cannot express (below 32) is refused, not ignored.
    assert!(check_reset_path(&sev(31, true), 0).is_err());
    assert!(std::format!("{err}").contains("C-bit 47"));
}
