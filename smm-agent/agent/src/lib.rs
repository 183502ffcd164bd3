//! The SMM agent's logic: guarded physical reads, the page walker, CPU
//! snapshots and the mailbox request dispatcher, as a `no_std` library that
//! the firmware links and the host tests.
//!
//! What it trusts: the firmware's boot-time facts handed in a
//! [`ServeContext`] (RAM map from e820, SMRAM range, CPU snapshots taken from
//! the save state, SEV configuration) and the shared key in [`AgentState`].
//! Nothing else: the mailbox, the guest's page tables and every address in a
//! request are allegations. Memory is reached only through the firmware's
//! [`PhysMemory`] implementation, which accepts only [`guard::CheckedPhys`]
//! ranges (inside RAM, outside SMRAM, bounded length).
//!
//! What it must never do: read SMRAM or MMIO on anyone's behalf, panic or
//! loop on any input (every SMI returns), allocate, keep large arrays on the
//! stack (the request and reply copies live in SMRAM buffers the firmware
//! provides), or read a mailbox byte twice where the two reads must agree
//! (the request is copied into SMRAM once and checked there).
//!
//! Firmware integration, per SMI (on the CPU chosen to serve, after every
//! CPU stored its snapshot):
//! 1. fill `CpuSnapshot`s with [`cpu::decode_save_state`] and
//!    [`cpu::apply_msrs`];
//! 2. call [`serve`] with the mailbox BAR as a
//!    [`SharedMemory`](smmvmi_mailbox::shared::SharedMemory) of the size the
//!    firmware sized it (not the header's size field): volatile loads,
//!    stores and copies, never a reference into memory the guest and the
//!    host write;
//! 3. optionally write the TSC delta to `layout::OFF_SERVE_CYCLES`.
#![no_std]
#![forbid(unsafe_code)]

#[cfg(test)]
extern crate std;

pub mod cpu;
pub mod guard;
pub mod paging;
pub mod rendezvous;
pub mod replay;
pub mod serve;

pub use cpu::{CpuSnapshot, Msrs, apply_msrs, decode_save_state};
pub use guard::{Alleged, CheckedPhys, Guard, PhysMemory, PhysRange, RamMap, Refusal};
pub use serve::{AgentState, ServeContext, Served, SevConfig, serve};
