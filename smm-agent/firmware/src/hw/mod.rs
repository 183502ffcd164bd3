//! The bottom layer: the hardware the firmware touches, one module per
//! device or mechanism. Nothing here decides anything; it performs the
//! accesses the layers above ask for. Every module imports only `hw/`
//! siblings, the `x86_64` crate and the pure `smmvmi_boot` crate, never
//! `layout`, `boot/`, `smm/` or `main`.
//!
//! Almost all of the firmware's `unsafe` is here; each block says why it is
//! sound (`clippy::undocumented_unsafe_blocks` is denied). The rest creates
//! [`memory::Region`]s over memory the layout above says is the caller's.

pub mod chipset;
pub mod console;
pub mod cpu;
pub mod exit;
pub mod fw_cfg;
pub mod idt;
pub mod lapic;
pub mod memory;
pub mod pci_cfg;
pub mod pmtimer;
pub mod tsc;
