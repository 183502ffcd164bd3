//! smmvmi firmware for QEMU's q35 machine.
//!
//! Boots a Linux bzImage handed over by fw_cfg, and before Linux runs sets up
//! System Management Mode: TSEG, SMBASE relocation of every CPU, SMI broadcast,
//! SMI_LOCK and D_LCK. Every later SMI enters the agent in locked SMRAM.
//!
//! This crate is the hardware-access room: every `unsafe` block of the
//! firmware lives here, each with a SAFETY comment. The decisions (what to
//! load where, how to parse fw_cfg, what the agent answers) are in the
//! `#![forbid(unsafe_code)]` crates `smmvmi-boot`, `smmvmi-agent` and
//! `smmvmi-mailbox`, which are tested on the host.
//!
//! It trusts QEMU's fw_cfg to describe the machine (bounds are still
//! checked); it trusts nothing that the guest OS or the host writes into the
//! mailbox. It must never read SMRAM or MMIO on anyone's behalf, and every
//! SMI it takes must return.
#![no_std]
#![no_main]

mod console;
mod layout;
mod exit;

use core::arch::global_asm;

global_asm!(include_str!("asm/reset.s"), options(att_syntax));
global_asm!(include_str!("asm/mem.s"), options(att_syntax));

#[unsafe(no_mangle)]
extern "C" fn firmware_main() -> ! {
    console::print(format_args!("smmvmi: firmware {}\n", env!("CARGO_PKG_VERSION")));
    exit::exit(exit::ExitCode::Success)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    console::print(format_args!("smmvmi: PANIC: {info}\n"));
    exit::exit(exit::ExitCode::Panic)
}

/// The prebuilt `core` is compiled with unwinding tables that name this
/// symbol; with `panic = "abort"` it is never called.
#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}
