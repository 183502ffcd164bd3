//! `smmvmi-boot` is the host-testable logic of the smmvmi firmware: reading
//! QEMU's fw_cfg device, interpreting the ACPI `etc/table-loader` script,
//! building the e820 map, assigning PCI BARs on bus 0, planning the Linux
//! 64-bit boot (setup header, load addresses, zero page), the q35
//! SMRAM/SMI register values, the GUIDed table at the end of the flash
//! image ([`ovmf_table`]) and the SEV kernel-hashes check ([`sev`]).
//!
//! What it trusts: only what the firmware binary hands it through the small
//! traits in each module ([`fw_cfg::FwCfgIo`], [`table_loader::LoaderEnv`],
//! [`pci::PciConfig`]). Values coming from QEMU (fw_cfg directory, table-loader
//! commands, e820 file, setup header, PCI BAR masks) are assumed to be
//! well-formed-ish but every length, offset and address derived from them is
//! bounds-checked before use.
//!
//! What it must never do: touch hardware or memory directly (no `unsafe`, all
//! access goes through the traits), allocate, or panic on any input — all
//! arithmetic on input-derived values is checked and input-controlled indexing
//! uses `get()`. Failures are returned as one error enum per module whose
//! message says what was expected, what was found and what to do.

#![no_std]
#![forbid(unsafe_code)]

#[cfg(test)]
extern crate std;

pub mod e820;
pub mod fw_cfg;
pub mod guid;
pub mod linux;
pub mod memhp;
pub mod msix;
pub mod ovmf_table;
pub mod paging;
pub mod pci;
pub mod q35;
pub mod sev;
pub mod table_loader;
