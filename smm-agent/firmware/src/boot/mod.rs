//! Boot: everything the firmware does once, before Linux runs. It reads
//! the machine from fw_cfg, assigns PCI resources, installs QEMU's ACPI
//! tables, installs the SMM runtime into TSEG, relocates every CPU's SMBASE
//! and seals SMRAM, then loads and enters Linux. Every step returns
//! `Result<_, BootError>` ([`error`]); `main` stops the machine on the first
//! error, with the message and exit code the error defines.
//!
//! This layer imports `hw/`, `layout`, and of `smm/` only what installing
//! the SMM runtime needs (`smm::config`: the configuration type and the one
//! sealing step); `smm/` never imports `boot/`.

pub mod acpi;
pub mod e820;
pub mod error;
pub mod linux;
pub mod measured;
pub mod memhp;
pub mod paging;
pub mod pci;
pub mod platform;
pub mod tseg;
