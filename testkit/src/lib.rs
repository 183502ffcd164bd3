//! The one testkit: the fakes every crate's tests build their worlds from,
//! in one copy.
//!
//! - [`memory`]: a sparse fake guest RAM that records every read the agent
//!   makes, and the default machine (RAM below and above 4 GiB, SMRAM, an
//!   MMIO address) it is checked against;
//! - [`paging`]: a page-table builder (4- and 5-level, 4 KiB / 2 MiB /
//!   1 GiB pages, SEV C-bit) that writes real x86-64 tables into fake RAM
//!   and keeps the mappings it made as ground truth (memflow's
//!   `alloc_dtb`);
//! - [`mailbox`]: a buffer that implements the contract's `SharedMemory`
//!   and a builder for a mailbox in a given agent state;
//! - [`agent`]: the simulated agent, i.e. the real agent logic
//!   (`smmvmi_agent::serve`) serving any `SharedMemory` over fake RAM.
//!
//! What it trusts: nothing; it is ground truth for tests. What it must never
//! be: a normal dependency of a product crate (dev-dependencies only).
#![forbid(unsafe_code)]

pub mod agent;
pub mod mailbox;
pub mod memory;
pub mod paging;

pub use agent::{SimAgent, cpu};
pub use mailbox::{BufferMailbox, MailboxBuilder};
pub use memory::{FakeMem, Machine};
pub use paging::PtBuilder;
