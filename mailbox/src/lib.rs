//! The mailbox: the one contract between the SMM agent, the host-injector and
//! the IDS.
//!
//! The mailbox is a shared memory region (on QEMU an `ivshmem-plain` BAR backed
//! by a host file) that the guest sees unencrypted. Everything in it is
//! untrusted: the guest OS and the host can both read and write every byte at
//! any time. This crate never trusts a value read from it; it only describes
//! where things are.
//!
//! Layout version 1 (all fields little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0x000 | 8 | magic `b"SMMVMIMB"` |
//! | 0x008 | 4 | layout version (1) |
//! | 0x00C | 4 | agent state ([`AgentState`]) |
//! | 0x010 | 8 | features ([`FEATURE_SMI_BROADCAST`], ...) |
//! | 0x018 | 4 | mailbox size in bytes, as the firmware found the BAR |
//! | 0x01C | 4 | number of CPUs the agent rendezvous with |
//! | 0x020 | 8 | SMI sessions served by the agent |
//! | 0x028 | 8 | ping request (written by the host) |
//! | 0x030 | 8 | ping acknowledge (the agent copies the request here) |
//! | 0x038 | 4 | fault code (0 = none) |
//! | 0x03C | 4 | CPU that faulted |
//! | 0x040 | 8 | RIP of the fault |
//! | 0x048 | 184 | reserved, zero |
//! | 0x100 | .. | request and reply areas |
#![no_std]
#![forbid(unsafe_code)]

pub mod layout;
