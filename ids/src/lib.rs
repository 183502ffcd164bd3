#![forbid(unsafe_code)]
//! The IDS client: asks the SMM agent in a monitored VM for guest memory and
//! CPU state, and turns the answers into kernel facts (today: the kernel's
//! version banner, found without any symbol file).
//!
//! What it trusts: the 32-byte key it shares with the agent, and therefore
//! only replies that open under that key and bind its own pending request
//! (`smmvmi_mailbox::client`). Everything else (the mailbox header, the serve
//! status, the host-injector, the guest's memory contents) is data to be
//! checked or an explanation of a failure, never proof.
//!
//! What it must never do: accept an unauthenticated, replayed or stale reply
//! as data; reuse a request sequence within an agent session; wait without a
//! deadline (a silent agent is an alert); read unbounded amounts of guest
//! memory while searching it.
//!
//! Modules: [`endpoint`] (where the VM is), [`session`] (sealed requests over
//! the host-injector library or daemon, [`transport`]), [`memory`] (the
//! guest-memory trait, its batches and snapshot cache; backends:
//! [`Session`], [`dump`], [`fake`]), [`kernel`] (kernel introspection),
//! [`acquire`] (dump file formats: raw, LiME, ELF core; resume state),
//! [`isf`] (a Volatility 3 symbol table from the guest's BTF and kallsyms).

pub mod acquire;
pub mod btf;
pub mod checks;
pub mod dump;
pub mod endpoint;
pub mod fake;
pub mod isf;
pub mod kallsyms;
pub mod kernel;
pub mod linux;
pub mod memory;
pub mod session;
pub mod transport;
pub mod watch;

pub use endpoint::Endpoint;
pub use session::{Session, SessionError};
