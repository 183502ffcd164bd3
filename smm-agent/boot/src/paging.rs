//! The page-table entries the firmware writes (its boot identity map and
//! the SMM page tables) and, under AMD SEV, which of them carry the C-bit.
//!
//! Under SEV an access through an entry with the C-bit set is encrypted
//! with the guest's key (*private*); without it the host sees the bytes as
//! they are (*shared*). The firmware's code, data, stacks and page tables
//! are private. What a device or the host must read or write is shared:
//! the fw_cfg DMA descriptor and bounce buffer, and everything that is not
//! RAM (PCI BARs, among them the ivshmem mailbox and doorbell, MMCONFIG,
//! the local APIC and IOAPIC, holes). RAM is private.
//!
//! Entries that point to a table (PML4E, PDPTE, a PDE naming a page table)
//! carry the C-bit: page tables live in private memory (the CPU walks an
//! SEV guest's tables as private whatever the bit says; OVMF sets it too).
//! CR3 stays without it: the firmware loads CR3 from 32-bit code (the reset
//! path, the SMM entry stub), where a C-bit at 47 or 51 cannot be written.
//!
//! Without SEV (every run under TCG) the mask is 0 and every entry is what
//! it was without this module. The bit itself comes from the one definition,
//! [`SevConfig`].

use thiserror::Error;

use crate::sev::SevConfig;

/// Present.
pub const PTE_PRESENT: u64 = 1 << 0;
/// Writable.
pub const PTE_WRITABLE: u64 = 1 << 1;
/// A 2 MiB page in a page directory (PS).
pub const PTE_HUGE: u64 = 1 << 7;
/// No execute (needs EFER.NXE).
pub const PTE_NO_EXECUTE: u64 = 1 << 63;
/// A 4 KiB page.
pub const PAGE_4K: u64 = 0x1000;
/// A 2 MiB page.
pub const PAGE_2M: u64 = 0x20_0000;

/// Who may read a mapping's memory as it is meant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Guest RAM: encrypted under SEV, the C-bit set.
    Private,
    /// A buffer a device or the host reads or writes, or MMIO: the C-bit
    /// clear.
    Shared,
}

/// Why a mapping could not be decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PagingError {
    /// A page holds both a shared buffer and other memory: it has to be
    /// mapped with smaller pages.
    #[error(
        "the {size:#x}-byte page at {page:#x} holds the shared buffer {shared_base:#x}+{shared_len:#x} and other memory: map it with smaller pages"
    )]
    Mixed {
        /// Page base.
        page: u64,
        /// Page size.
        size: u64,
        /// The shared buffer's base.
        shared_base: u64,
        /// The shared buffer's length.
        shared_len: u64,
    },
    /// The reset path (assembly) and [`SevConfig`] disagree on the C-bit.
    #[error(
        "the reset path built its page tables with C-bit mask {asm:#x}, SEV detection says {rust:#x} (SEV active: {active}, C-bit {c_bit}); the reset path handles C-bit positions 32 to 63 only"
    )]
    ResetPathMask {
        /// The mask the assembly used.
        asm: u64,
        /// [`SevConfig::c_bit_mask`].
        rust: u64,
        /// [`SevConfig::active`].
        active: bool,
        /// [`SevConfig::c_bit`].
        c_bit: u8,
    },
}

/// What physical memory is: the RAM ranges and the shared buffers in it,
/// each `(base, len)`. Anything else is MMIO or a hole.
#[derive(Clone, Copy, Debug)]
pub struct MemoryPlan<'a> {
    /// RAM (private under SEV).
    pub ram: &'a [(u64, u64)],
    /// Buffers that devices or the host use (shared under SEV).
    pub shared: &'a [(u64, u64)],
}

fn overlaps(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

impl MemoryPlan<'_> {
    /// The backing of the page `[page, page + size)`: shared when it lies
    /// inside a shared buffer, private when it overlaps RAM, shared
    /// otherwise (MMIO, holes).
    ///
    /// # Errors
    /// [`PagingError::Mixed`] when it overlaps a shared buffer but does not
    /// lie inside it.
    pub fn backing(&self, page: u64, size: u64) -> Result<Backing, PagingError> {
        for &(base, len) in self.shared {
            if overlaps(page, size, base, len) {
                if page >= base && page.saturating_add(size) <= base.saturating_add(len) {
                    return Ok(Backing::Shared);
                }
                return Err(PagingError::Mixed {
                    page,
                    size,
                    shared_base: base,
                    shared_len: len,
                });
            }
        }
        if self
            .ram
            .iter()
            .any(|&(base, len)| overlaps(page, size, base, len))
        {
            Ok(Backing::Private)
        } else {
            Ok(Backing::Shared)
        }
    }

    /// The 2 MiB page directory entry mapping `page` to itself (`extra`:
    /// [`PTE_NO_EXECUTE`] or 0).
    ///
    /// # Errors
    /// [`PagingError::Mixed`]: use a page table ([`Self::pte_4k`]) instead.
    pub fn pde_2m(&self, sev: &SevConfig, page: u64, extra: u64) -> Result<u64, PagingError> {
        let b = self.backing(page, PAGE_2M)?;
        Ok(leaf(sev, page, b, extra | PTE_HUGE))
    }

    /// The 4 KiB page table entry mapping `page` to itself.
    ///
    /// # Errors
    /// [`PagingError::Mixed`] when a shared buffer is not 4 KiB aligned.
    pub fn pte_4k(&self, sev: &SevConfig, page: u64, extra: u64) -> Result<u64, PagingError> {
        let b = self.backing(page, PAGE_4K)?;
        Ok(leaf(sev, page, b, extra))
    }
}

/// A leaf entry (present, writable) mapping `pa`: with the C-bit when
/// `backing` is private and SEV is active.
pub fn leaf(sev: &SevConfig, pa: u64, backing: Backing, extra: u64) -> u64 {
    pa | PTE_PRESENT | PTE_WRITABLE | extra | sev.pte_bits(backing == Backing::Private)
}

/// An entry pointing to the next-level table at `table` (page tables are
/// private memory: the C-bit is set under SEV).
pub fn table_entry(sev: &SevConfig, table: u64) -> u64 {
    table | PTE_PRESENT | PTE_WRITABLE | sev.pte_bits(true)
}

/// Checks that the reset path (which cannot run Rust and decodes CPUID
/// 0x8000001F and SEV_STATUS itself) built its tables with the mask
/// [`SevConfig`] decides: `asm_high` is the upper half of the mask it set
/// in every entry.
///
/// # Errors
/// [`PagingError::ResetPathMask`].
pub fn check_reset_path(sev: &SevConfig, asm_high: u32) -> Result<(), PagingError> {
    let asm = u64::from(asm_high) << 32;
    let rust = sev.c_bit_mask();
    if asm == rust {
        Ok(())
    } else {
        Err(PagingError::ResetPathMask {
            asm,
            rust,
            active: sev.active,
            c_bit: sev.c_bit,
        })
    }
}

#[cfg(test)]
mod tests;
