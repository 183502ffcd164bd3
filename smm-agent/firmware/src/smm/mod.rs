//! The SMM runtime: what runs on every SMI once TSEG is locked. The entry
//! stubs (`asm/smm.s`) call [`smi`]'s `smm_main`; the first CPU in serves
//! the mailbox through [`agent`]; an exception in SMM is reported and the
//! SMI still returns ([`exceptions`], over the IDT of `hw::idt`). All it knows of boot is the one
//! sealed [`config::SmmConfig`].
//!
//! This layer imports `hw/` and `layout`, never `boot/` or `main`: the boot
//! code installs it, not the other way round.

pub mod agent;
pub mod config;
pub mod doorbell;
pub mod exceptions;
pub mod memhp;
pub mod smi;
