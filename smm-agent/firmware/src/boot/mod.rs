//! Boot: everything the firmware does once, before Linux runs. It reads
//! the machine from fw_cfg, assigns PCI resources, installs QEMU's ACPI
//! tables, installs the SMM runtime into TSEG, relocates every CPU's SMBASE
//! and seals SMRAM, then loads and enters Linux.
//!
//! This layer imports `hw/`, `layout`, and of `smm/` only what installing
//! the SMM runtime needs; `smm/` never imports `boot/`.

pub mod acpi;
pub mod linux;
pub mod tseg;
