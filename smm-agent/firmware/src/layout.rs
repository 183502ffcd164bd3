//! Every fixed address and port the firmware uses, in one place
//! (Firecracker's `arch/x86_64/layout.rs` idea).

/// QEMU `isa-debugcon` and `isa-debug-exit` ports: platform facts shared
/// with the host and the harness (`smmvmi_mailbox::platform`).
pub use smmvmi_mailbox::platform::{DEBUG_EXIT_PORT, DEBUGCON_PORT};

// Boot page tables (built by `asm/reset.s`): 0x100000..0x106000, an identity
// map of 0..4 GiB with 2 MiB pages. Kept in assembly; listed here for the
// record of what low memory holds.

/// Link address of the firmware image (`link.ld`), and the 2 MiB window it
/// and its bss occupy. In SMM this window maps the image's copy in TSEG.
pub const FW_BASE: u64 = 0x20_0000;
pub const FW_WINDOW: u64 = 0x20_0000;

/// All physical memory is also mapped here in SMM (the agent reads guest
/// memory only through this alias, never through the identity map).
pub const PHYS_OFF: u64 = 0xffff_8000_0000_0000;

/// Linux zero page (boot_params) and command line.
pub const BOOT_PARAMS: u64 = 0x7000;
pub const CMDLINE: u64 = 0x2_0000;
pub const CMDLINE_MAX: u64 = 0x1_0000;
/// Real-mode start code for the application processors (SIPI vector 0x08).
/// Below 64 KiB, which Linux never hands out, because parked APs keep
/// executing there until Linux starts them.
pub const AP_TRAMPOLINE: u64 = 0x8000;
/// Data shared by the relocation stub and the APs (src/asm/smm.s
/// RELOC_DATA), and the self-test word. Below 64 KiB as well.
pub const RELOC_DATA: u64 = 0x9000;
/// SMBASE relocation handler at the default SMBASE 0x30000 + 0x8000.
pub const RELOC_STUB: u64 = 0x3_8000;
