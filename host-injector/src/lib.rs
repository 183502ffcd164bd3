//! The host-injector: the host-side half of the proxyless data path. It owns
//! the VM's mailbox file (the `ivshmem-plain` backing file), copies sealed
//! request frames into it, raises the SMI that makes the agent serve them,
//! waits for the completion word with a deadline, and hands back the sealed
//! reply bytes. This crate is the library that the IDS (direct mode, for a
//! host admin) and, later, the daemon use.
//!
//! What it trusts: nothing it reads from the mailbox. Every agent-written
//! field (state, features, status, reply length, session salt) was equally
//! writable by the guest OS; it is bounds-checked, reported and used only to
//! decide *whether to wait or to raise an SMI*, never as proof of anything.
//! Proof comes from opening the sealed reply with the IDS's key
//! (`smmvmi_mailbox::client`), which this crate never holds.
//!
//! What it must never do: raise an SMI from the QEMU monitor before the agent
//! has published a ready state with SMI broadcast negotiated (QEMU 7.2
//! crashes otherwise); wait for the agent forever (a missed deadline is an
//! error: a silent agent is an alert); map or read guest RAM (only the
//! mailbox file).
//!
//! Modules: [`mailbox_file`] (the backing file), [`qmp`] (QEMU machine
//! protocol client), [`smi`] and [`backend`] (SMI backends: doorbell,
//! qmp-broadcast, qmp-targeted, kvm), [`transact`] (one request/reply round
//! trip), [`ivshmem`] (the ivshmem server protocol), [`daemon`] (the root
//! daemon and its client), [`doctor`] (what this host can do).

pub mod backend;
pub mod daemon;
pub mod doctor;
pub mod ivshmem;
pub mod mailbox_file;
pub mod qmp;
pub mod smi;
pub mod transact;

pub use backend::Target;
pub use mailbox_file::{Header, MailboxFile, MailboxFileError};
pub use smi::{QmpSmi, SmiBackend, SmiError};
pub use transact::{Injector, TransactError, Transaction};
