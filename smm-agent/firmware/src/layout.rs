//! Every fixed address and port the firmware uses, in one place
//! (Firecracker's `arch/x86_64/layout.rs` idea).

/// QEMU `isa-debugcon` (`-global isa-debugcon.iobase=0x402`).
pub const DEBUGCON_PORT: u16 = 0x402;
/// QEMU `isa-debug-exit` (`iobase=0xf4`).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// Boot page tables built by `asm/reset.s` (identity map of 0..4 GiB).
pub const BOOT_PML4: u64 = 0x10_0000;
