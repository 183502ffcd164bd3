//! The mailbox: the one contract between the SMM agent, the host-injector and
//! the IDS.
//!
//! The mailbox is a shared memory region (on QEMU an `ivshmem-plain` BAR backed
//! by a host file) that the guest sees unencrypted. Everything in it is
//! untrusted: the guest OS and the host can both read and write every byte at
//! any time. This crate never trusts a value read from it: every parser is
//! bounds-checked and total (no input makes it panic or read out of bounds),
//! and every frame that matters is AES-256-GCM sealed end to end between the
//! IDS and the agent ([`crypto`]), binding each reply to the request it
//! answers ([`client`]).
//!
//! What it trusts: the 32-byte shared key handed to [`crypto::SessionKeys`].
//! What it must never do: allocate in anything the agent uses (the `std`
//! feature only adds host conveniences), reuse a (key, nonce) pair, or hand
//! out a reply that is not authenticated and bound to the pending request.
//!
//! Layout version 1 (all fields little-endian; the typed layout is
//! [`header::Header`]):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0x000 | 8 | magic `b"SMMVMIMB"` |
//! | 0x008 | 4 | layout version (1) |
//! | 0x00C | 4 | agent state ([`header::AgentState`]) |
//! | 0x010 | 8 | features ([`header::FEATURE_SMI_BROADCAST`], ...) |
//! | 0x018 | 4 | mailbox size in bytes, as the firmware found the BAR |
//! | 0x01C | 4 | number of CPUs the agent rendezvous with |
//! | 0x020 | 8 | SMI sessions served by the agent |
//! | 0x028 | 8 | ping request (written by the host) |
//! | 0x030 | 8 | ping acknowledge (the agent copies the request here) |
//! | 0x038 | 4 | fault code (0 = none) |
//! | 0x03C | 4 | CPU that faulted |
//! | 0x040 | 8 | RIP of the fault |
//! | 0x048 | 8 | request doorbell (host, written after the request frame) |
//! | 0x050 | 8 | reply done: the doorbell served (agent, written last) |
//! | 0x058 | 4 | serve status ([`header::ServeStatus`], unauthenticated) |
//! | 0x05C | 4 | reply frame length |
//! | 0x060 | 16 | session salt (agent, random per boot; key derivation) |
//! | 0x070 | 8 | TSC cycles of the last serve (firmware, informational) |
//! | 0x078 | 8 | SMI sessions served before every CPU arrived |
//! | 0x080 | 8 | SMI sessions recovered (leader vanished, or stale) |
//! | 0x088 | 8 | times a CPU left SMM without RSM |
//! | 0x090 | 8 | times a follower stopped waiting for its leader |
//! | 0x098 | 104 | reserved, zero |
//! | 0x100 | .. | request area, then reply area ([`layout::Areas`]) |
//!
//! Modules by concern: [`shared`] (the mailbox is memory someone else
//! writes: a trait, never a reference), [`header`] and [`layout`] (the
//! header, the areas, the hand-shake), [`frame`], [`request`], [`reply`] and
//! [`records`] (the wire format, re-exported together as [`wire`]),
//! [`crypto`] and [`client`] (sealing, and the IDS end), [`platform`] (the
//! machine constants every party shares).
//!
//! The byte layouts are `zerocopy` derives (`FromBytes`, `IntoBytes`,
//! `Unaligned`, ...): the derives check at compile time that a layout has
//! no padding and alignment 1. Their expansion contains `unsafe impl`s;
//! rustc does not apply `forbid(unsafe_code)` to code expanded from another
//! crate's macro, so this crate stays `forbid(unsafe_code)` for everything
//! written here (a hand-written `unsafe` block still fails the build), and
//! the soundness of the generated impls is zerocopy's.
#![no_std]
#![forbid(unsafe_code)]

#[cfg(any(test, feature = "std"))]
extern crate std;

pub mod client;
pub mod crypto;
pub mod frame;
pub mod header;
pub mod layout;
pub mod platform;
pub mod records;
pub mod reply;
pub mod request;
pub mod shared;
pub mod walk;
pub mod wire;

pub use shared::{AccessError, SharedMemory};
/// The `zerocopy` the layouts derive, for users of their traits.
pub use zerocopy;
