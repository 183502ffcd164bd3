//! Byte offsets of the mailbox header (layout version 1).

/// `b"SMMVMIMB"` as stored at offset 0.
pub const MAGIC: [u8; 8] = *b"SMMVMIMB";
/// The layout version this crate describes.
pub const VERSION: u32 = 1;

pub const OFF_MAGIC: usize = 0x000;
pub const OFF_VERSION: usize = 0x008;
pub const OFF_STATE: usize = 0x00C;
pub const OFF_FEATURES: usize = 0x010;
pub const OFF_SIZE: usize = 0x018;
pub const OFF_NCPUS: usize = 0x01C;
pub const OFF_SMI_COUNT: usize = 0x020;
pub const OFF_PING_REQ: usize = 0x028;
pub const OFF_PING_ACK: usize = 0x030;
pub const OFF_FAULT_CODE: usize = 0x038;
pub const OFF_FAULT_CPU: usize = 0x03C;
pub const OFF_FAULT_RIP: usize = 0x040;
/// Size of the header; request and reply areas follow it.
pub const HEADER_SIZE: usize = 0x100;

/// Feature bit: the firmware negotiated SMI broadcast with QEMU, so an APM
/// write from the monitor enters SMM on every vCPU (and does not crash QEMU 7.2).
pub const FEATURE_SMI_BROADCAST: u64 = 1 << 0;

/// What the agent says about itself in the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum AgentState {
    /// Zeroed by the host: no firmware has touched the mailbox yet.
    Absent = 0,
    /// The firmware found the mailbox but SMM is not locked yet.
    Booting = 1,
    /// SMRAM is locked, SMI broadcast negotiated, the agent serves requests.
    Ready = 2,
    /// Ready, but no key was provisioned: only INFO is served.
    Unprovisioned = 3,
    /// The agent took an exception in SMM; see the fault fields.
    Fault = 4,
}

impl AgentState {
    /// Decodes a raw state word; unknown values are `None`.
    pub fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => Self::Absent,
            1 => Self::Booting,
            2 => Self::Ready,
            3 => Self::Unprovisioned,
            4 => Self::Fault,
            _ => return None,
        })
    }
}
