//! Every fixed address, size, offset, port and command number the firmware
//! uses, in one place (Firecracker's `arch/x86_64/layout.rs` idea).
//!
//! The assembly in `src/asm/*.s` never repeats one of these as a literal: it
//! receives them as `const` operands of `global_asm!` (see `main.rs`) and
//! names them `{LIKE_THIS}`. A layout fact changed here changes everywhere.
//!
//! This module is the second layer: it imports `smmvmi_boot::q35` (chipset
//! facts) and, for compile-time cross-checks only, `hw`. The addresses of devices
//! (debug console and exit ports, PCI configuration ports, fw_cfg, the
//! local APIC) belong to their drivers in `hw/`, the layer below.

use smmvmi_boot::q35;

// ---------------------------------------------------------------------------
// APM commands (written to `q35::APM_CNT_PORT`, each raises an SMI)

/// APM command bytes: platform facts shared with the host and the harness
/// (`smmvmi_mailbox::platform`): the firmware's own SMIs (relocation, the
/// self-test), and the test-only fault-injection commands.
pub use smmvmi_mailbox::platform::APM_CMD_FIRMWARE;
#[cfg(feature = "fault-injection")]
pub use smmvmi_mailbox::platform::{APM_CMD_EXECUTE_GUEST, APM_CMD_INJECT_FAULT};
const _: () = assert!(
    APM_CMD_FIRMWARE != q35::APM_RESERVED_COMMANDS[0]
        && APM_CMD_FIRMWARE != q35::APM_RESERVED_COMMANDS[1]
);

// ---------------------------------------------------------------------------
// Segment selectors of the firmware's GDTs (the boot GDT in `asm/reset.s`
// and the SMM GDT that `boot::tseg` writes into TSEG have the same shape,
// and Linux's 64-bit boot protocol wants exactly these code/data selectors).

pub const SEL_CODE32: u16 = 0x08;
pub const SEL_CODE64: u16 = 0x10;
const _: () = assert!(SEL_CODE64 == crate::hw::idt::CODE64_SELECTOR);
pub const SEL_DATA: u16 = 0x18;
/// Number of descriptors in each GDT (null, code32, code64, data).
pub const GDT_ENTRIES: u64 = 4;

// ---------------------------------------------------------------------------
// Low memory (below 1 MiB and just above it)

/// Linux zero page (boot_params) and command line.
pub const BOOT_PARAMS: u64 = 0x7000;
pub const CMDLINE: u64 = 0x2_0000;
pub const CMDLINE_MAX: u64 = 0x1_0000;
/// Real-mode start code for the application processors (SIPI vector 0x08).
/// Below 64 KiB, which Linux never hands out, because parked APs keep
/// executing there until Linux starts them.
pub const AP_TRAMPOLINE: u64 = 0x8000;
/// Data shared by the relocation stub and the APs (the `RELOC_*` offsets
/// below), and the self-test word. One page, below 64 KiB as well.
pub const RELOC_DATA: u64 = 0x9000;
pub const RELOC_DATA_LEN: u64 = 0x1000;
/// SMBASE relocation handler at the default SMBASE 0x30000 + 0x8000.
pub const RELOC_STUB: u64 = q35::DEFAULT_SMBASE + q35::SMI_ENTRY_OFFSET;

/// Offsets in [`RELOC_DATA`]: the SMBASE the next relocating CPU takes (u32).
pub const RELOC_NEXT_SMBASE: u64 = 0;
/// Count of relocations done (u32, incremented by the relocation stub).
pub const RELOC_DONE: u64 = 4;
/// AP ticket dispenser and the ticket whose turn it is (u32 each).
pub const RELOC_AP_TICKET: u64 = 8;
pub const RELOC_AP_TURN: u64 = 12;
/// Physical base of the SMBASE tiles (u32).
pub const RELOC_TILES_BASE: u64 = 16;
/// Mask of APIC IDs the APs relocated (u64, as two u32 halves).
pub const RELOC_CPU_MASK: u64 = 24;
/// APIC ID of an AP above [`MAX_APIC_ID`] (u32; 0 = none).
pub const RELOC_BAD_APIC_ID: u64 = 32;
/// Where the first SMI after locking reports how many CPUs it saw (boot
/// self-test only). Shares its word with [`RELOC_BAD_APIC_ID`]: relocation
/// is over, and the word cleared, before the self-test runs.
pub const SELFTEST_WORD: u64 = 0x20;
/// Top of the real-mode stack the APs share (one at a time) in RELOC_DATA.
pub const RELOC_AP_STACK_TOP: u64 = 0xff0;

/// SEV launch secret area (4 KiB): named in the image's GUIDed table
/// ([`OVMF_TABLE`]) so that QEMU's `sev-inject-launch-secret` (without
/// `gpa`) writes there. Low RAM that nothing else uses before Linux: above
/// the default SMBASE area (0x30000..0x50000), below the EBDA.
pub const SEV_SECRET_BASE: u64 = 0x5_0000;
pub const SEV_SECRET_SIZE: u64 = 0x1000;
/// SEV kernel hashes area: QEMU (`sev-guest,kernel-hashes=on`) writes its
/// table of kernel, initrd and command-line hashes here before the launch
/// measurement; `boot::measured` checks what it loads against it. 1 KiB,
/// as OVMF's `PcdQemuHashTableSize`; QEMU needs at least 176 bytes.
pub const SEV_HASHES_BASE: u64 = SEV_SECRET_BASE + SEV_SECRET_SIZE;
pub const SEV_HASHES_SIZE: u64 = 0x400;
const _: () = assert!(
    SEV_SECRET_BASE >= q35::DEFAULT_SMBASE + 0x2_0000
        && SEV_SECRET_BASE >= CMDLINE + CMDLINE_MAX
        && SEV_HASHES_BASE + SEV_HASHES_SIZE <= 0x9_F000
        && SEV_HASHES_SIZE as usize >= smmvmi_boot::sev::PADDED_HASH_TABLE_LEN
);

/// The GUIDed table block at the end of the flash image (`link.ld` section
/// `.ovmf_table`): it ends 32 bytes before the image end, where QEMU
/// (`hw/i386/pc_sysfw_ovmf.c`) looks for the footer, and starts at
/// `OVMF_TABLE_END - OVMF_TABLE_BLOCK` = 0xFFFFFF80, the address `link.ld`
/// gives the section.
pub const OVMF_TABLE_END: u64 = 0x1_0000_0000 - smmvmi_boot::ovmf_table::BYTES_AFTER_FOOTER as u64;
pub const OVMF_TABLE_BLOCK: usize = 0x60;
const _: () = assert!(OVMF_TABLE_END - OVMF_TABLE_BLOCK as u64 == 0xFFFF_FF80);

/// Boot page tables (built by `asm/reset.s`): an identity map of 0..4 GiB
/// with 2 MiB pages: PML4, PDPT, then four page directories; `boot::paging`
/// then maps the first 2 MiB with 4 KiB pages through the page table at
/// [`BOOT_PT_LOW`] (the fw_cfg DMA area there is shared under SEV, the rest
/// private).
pub const BOOT_PML4: u64 = 0x10_0000;
pub const BOOT_PDPT: u64 = BOOT_PML4 + 0x1000;
pub const BOOT_PD: u64 = BOOT_PML4 + 0x2000;
pub const BOOT_PT_LOW: u64 = BOOT_PML4 + 0x6000;
pub const BOOT_PT_PAGES: u64 = 7;

/// The fw_cfg DMA area: one page for the DMA descriptor, then the bounce
/// buffer every DMA transfer goes through (the device reads and writes
/// only here; `hw::fw_cfg` copies to and from firmware memory). Under SEV
/// it is the only RAM the boot page tables map shared (without the C-bit),
/// because QEMU cannot read or write encrypted memory. Low RAM that nothing
/// else uses before Linux, 4 KiB aligned, inside the first 2 MiB.
pub const FW_CFG_DMA_AREA: u64 = 0x6_0000;
pub const FW_CFG_DMA_DESC: u64 = FW_CFG_DMA_AREA;
pub const FW_CFG_BOUNCE: u64 = FW_CFG_DMA_AREA + 0x1000;
pub const FW_CFG_BOUNCE_LEN: u64 = 0x1_0000;
pub const FW_CFG_DMA_AREA_LEN: u64 = FW_CFG_BOUNCE + FW_CFG_BOUNCE_LEN - FW_CFG_DMA_AREA;
const _: () = assert!(
    FW_CFG_DMA_AREA >= SEV_HASHES_BASE + SEV_HASHES_SIZE
        && FW_CFG_DMA_AREA + FW_CFG_DMA_AREA_LEN <= 0x9_F000
        && FW_CFG_DMA_AREA.is_multiple_of(0x1000)
        && FW_CFG_DMA_AREA_LEN.is_multiple_of(0x1000)
);

/// Link address of the firmware image (`link.ld`), and the 2 MiB window it
/// and its bss occupy. In SMM this window maps the image's copy in TSEG.
pub const FW_BASE: u64 = 0x20_0000;
pub const FW_WINDOW: u64 = 0x20_0000;
const _: () = assert!(BOOT_PML4 + BOOT_PT_PAGES * 0x1000 <= FW_BASE);

// ---------------------------------------------------------------------------
// SMM

/// All physical memory is also mapped here in SMM (the agent reads guest
/// memory only through this alias, never through the identity map).
pub const PHYS_OFF: u64 = 0xffff_8000_0000_0000;

/// Size of the area reserved for ACPI tables just below TSEG.
pub const ACPI_AREA_LEN: u64 = 0x10_0000;

/// Where a CPU starts executing in SMM, relative to its SMBASE.
pub const SMI_ENTRY_OFFSET: u64 = q35::SMI_ENTRY_OFFSET;
/// The SMBASE field of the save state, relative to SMBASE.
pub const SAVE_STATE_SMBASE: u64 = q35::SAVE_STATE_SMBASE_OFFSET;

/// TSEG layout (offsets from the TSEG base):
///
/// | offset | what |
/// |---|---|
/// | 0x000000 | GDT for SMM ([`SEL_CODE32`], [`SEL_CODE64`], [`SEL_DATA`]) |
/// | 0x010000 | SMM page tables: identity map of RAM and the 32-bit MMIO hole, the firmware window at `FW_BASE` redirected to the TSEG copy, and an alias of all physical memory at `PHYS_OFF` |
/// | 0x200000 | copy of the firmware image (code, data, bss), 2 MiB |
/// | 0x400000 | one 64 KiB tile per CPU (tile = SMBASE): per-CPU block at +0, entry stub at +0x8000, save state at +0xFE00 |
/// | 0x800000 | one 64 KiB SMM stack per CPU; its lowest 8 bytes hold the CPU's tile address |
/// | 0xC00000 | the agent's SMRAM copies of the request (64 KiB) and of the reply (2 MiB) |
pub const GDT_OFF: u64 = 0;
pub const PT_OFF: u64 = 0x1_0000;
pub const IMAGE_OFF: u64 = 0x20_0000;
pub const TILES_OFF: u64 = 0x40_0000;
/// A CPU's tile is `TILES_OFF + (APIC ID << TILE_SHIFT)`.
pub const TILE_SHIFT: u32 = 16;
pub const TILE_SIZE: u64 = 1 << TILE_SHIFT;
/// CPU index = APIC ID, one tile, stack and bit of a u64 mask each.
pub const MAX_CPUS: u32 = 64;
pub const MAX_APIC_ID: u32 = MAX_CPUS - 1;
pub const STACKS_OFF: u64 = 0x80_0000;
pub const STACK_SIZE: u64 = 0x1_0000;
pub const REQUEST_BUF_OFF: u64 = 0xC0_0000;
pub const REQUEST_BUF_LEN: u64 = 0x1_0000;
pub const REPLY_BUF_OFF: u64 = 0xC1_0000;
pub const REPLY_BUF_LEN: u64 = 0x20_0000;
/// The smallest TSEG this layout fits in.
pub const MIN_TSEG: u64 = REPLY_BUF_OFF + REPLY_BUF_LEN;
/// The SMM page tables map at most this much physical memory.
pub const MAX_MAPPED_GIB: u64 = 256;
const _: () = assert!(
    IMAGE_OFF >= PT_OFF
        && TILES_OFF >= IMAGE_OFF + FW_WINDOW
        && STACKS_OFF >= TILES_OFF + MAX_CPUS as u64 * TILE_SIZE
        && REQUEST_BUF_OFF >= STACKS_OFF + MAX_CPUS as u64 * STACK_SIZE
        && REPLY_BUF_OFF >= REQUEST_BUF_OFF + REQUEST_BUF_LEN
        && (MAX_APIC_ID as u64) < 64
);

/// Per-CPU block, at the start of the CPU's tile: the interrupted FXSAVE
/// area, the saved RSP (used by `smm_abort_resume`) and the CPU index. The
/// rendezvous keeps its per-CPU state in SMRAM statics
/// (`smmvmi_agent::rendezvous`).
pub const PERCPU_FXSAVE: u64 = 0;
pub const PERCPU_SAVED_RSP: u64 = 512;
pub const PERCPU_INDEX: u64 = 520;
/// The per-CPU block's size: it must stay clear of the entry stub.
pub const PERCPU_LEN: u64 = 0x1000;
const _: () = assert!(PERCPU_LEN <= SMI_ENTRY_OFFSET && PERCPU_INDEX + 4 <= PERCPU_LEN);
