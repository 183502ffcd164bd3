//! The mailbox header (layout version 1): the first [`HEADER_SIZE`] bytes
//! of the mailbox, as one typed little-endian layout ([`Header`]). Every
//! `OFF_*` offset is derived from that type (`offset_of!`) and pinned by
//! compile-time checks to the value it has always had, so the bytes on the
//! wire cannot drift.
//!
//! Offsets 0x000..0x048 are the original v1 header (used by the firmware's
//! PING and the test harness) and keep their meaning. The request/reply
//! hand-shake fields and the counters live in the formerly reserved range
//! 0x048..0x100; the hand-shake order is in [`crate::layout`].
//!
//! Who writes what: the agent (firmware) writes everything except
//! [`OFF_PING_REQ`] and [`OFF_REQ_DOORBELL`], which the host writes. Anyone
//! (the guest OS too) can write any of it: the header explains, it never
//! proves. Read it as a whole with [`Header::read_from`] (one copy) or word
//! by word through [`SharedMemory`].

use core::mem::offset_of;

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::layout::LayoutError;
use crate::shared::SharedMemory;

/// `b"SMMVMIMB"` as stored at offset 0.
pub const MAGIC: [u8; 8] = *b"SMMVMIMB";
/// The layout version this crate describes.
pub const VERSION: u32 = 1;
/// Size of the header in bytes; the request and reply areas follow it.
pub const HEADER_SIZE: usize = 0x100;
/// Length of the session salt in bytes.
pub const SESSION_SALT_LEN: usize = 16;

/// Feature bit: the firmware negotiated SMI broadcast with QEMU, so an APM
/// write from the monitor enters SMM on every vCPU (and does not crash QEMU 7.2).
pub const FEATURE_SMI_BROADCAST: u64 = 1 << 0;
/// Feature bit: the mailbox device is `ivshmem-doorbell` and the agent arms
/// its MSI-X table with SMI delivery mode: vector [`VECTOR_BROADCAST`] SMIs
/// every vCPU, vector [`VECTOR_CPU_BASE`] + N only the vCPU with APIC ID N.
pub const FEATURE_DOORBELL: u64 = 1 << 1;

/// MSI-X vector of the ivshmem-doorbell device that raises an SMI on every
/// vCPU (destination 0xFF: one batch is one consistent snapshot).
pub const VECTOR_BROADCAST: u16 = 0;
/// MSI-X vector `VECTOR_CPU_BASE + N` raises an SMI on the vCPU with APIC ID
/// N only (served at once by that CPU, no snapshot of the others).
pub const VECTOR_CPU_BASE: u16 = 1;
/// The vector of the daemon's peer that the agent rings when a reply is
/// sealed.
pub const RING_VECTOR: u16 = 0;

/// The header as it lies in the mailbox (all integers little-endian, no
/// padding, alignment 1).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Header {
    /// 0x000: [`MAGIC`].
    pub magic: [u8; 8],
    /// 0x008: layout version ([`VERSION`]).
    pub version: U32,
    /// 0x00C: agent state ([`AgentState`]).
    pub state: U32,
    /// 0x010: feature bits ([`FEATURE_SMI_BROADCAST`], ...).
    pub features: U64,
    /// 0x018: mailbox size in bytes, as the firmware found the BAR.
    pub size: U32,
    /// 0x01C: number of CPUs the agent rendezvous with.
    pub ncpus: U32,
    /// 0x020: SMI sessions served by the agent.
    pub smi_count: U64,
    /// 0x028: ping request (written by the host).
    pub ping_req: U64,
    /// 0x030: ping acknowledge (the agent copies the request here).
    pub ping_ack: U64,
    /// 0x038: fault code (0 = none; 0x100 | vector for an exception in SMM).
    pub fault_code: U32,
    /// 0x03C: CPU that faulted.
    pub fault_cpu: U32,
    /// 0x040: RIP of the fault.
    pub fault_rip: U64,
    /// 0x048: request doorbell (host, written after the request frame).
    pub req_doorbell: U64,
    /// 0x050: reply done: the doorbell served (agent, written last).
    pub reply_done: U64,
    /// 0x058: serve status ([`ServeStatus`], unauthenticated).
    pub serve_status: U32,
    /// 0x05C: reply frame length in bytes.
    pub reply_len: U32,
    /// 0x060: session salt (agent, random per boot; key derivation).
    pub session_salt: [u8; SESSION_SALT_LEN],
    /// 0x070: TSC cycles spent in SMM for the last served request
    /// (firmware, informational).
    pub serve_cycles: U64,
    /// 0x078: SMI sessions served before every CPU arrived (the rendezvous
    /// timed out; such a batch is not one consistent snapshot).
    pub partial_sessions: U64,
    /// 0x080: SMI sessions whose leader vanished or that went stale and were
    /// recovered by the SMM runtime.
    pub recovered_sessions: U64,
    /// 0x088: times a CPU was found to have left SMM without RSM.
    pub vanished_cpus: U64,
    /// 0x090: times a follower CPU stopped waiting for its leader.
    pub follower_timeouts: U64,
    /// 0x098: SMI sessions that served nothing because another CPU held the
    /// serve claim (still serving, or vanished while serving and not back).
    pub serve_busy: U64,
    /// 0x0A0: the longest time one CPU spent in SMM for one SMI since boot,
    /// in microseconds (published by the serving CPU: lags by one SMI).
    pub max_smm_us: U64,
    /// 0x0A8: host: the ivshmem peer id of the host-injector daemon plus one
    /// (0 = no daemon peer). After sealing a reply the agent writes `(peer
    /// << 16) | RING_VECTOR` to the device's Doorbell register (BAR0 + 12),
    /// which makes QEMU signal the daemon's eventfd for that vector (QEMU
    /// `docs/specs/ivshmem-spec.rst`). Untrusted: a wrong value only rings
    /// the wrong peer.
    pub host_peer: U32,
    /// 0x0AC: reserved, zero.
    pub reserved0: U32,
    /// 0x0B0: times the agent found its MSI-X SMI doorbell undone (MSI-X or
    /// bus mastering disabled, a vector masked or reprogrammed: Linux clears
    /// MSI-X enable when it enumerates PCI, and the guest can at any time)
    /// and armed it again.
    pub doorbell_rearms: U64,
    /// 0x0B8..0x100: reserved, zero.
    pub reserved: [u8; HEADER_SIZE - 0x0B8],
}

/// Offset of [`Header::magic`] (8 bytes).
pub const OFF_MAGIC: usize = offset_of!(Header, magic);
/// Offset of [`Header::version`] (u32).
pub const OFF_VERSION: usize = offset_of!(Header, version);
/// Offset of [`Header::state`] (u32).
pub const OFF_STATE: usize = offset_of!(Header, state);
/// Offset of [`Header::features`] (u64).
pub const OFF_FEATURES: usize = offset_of!(Header, features);
/// Offset of [`Header::size`] (u32).
pub const OFF_SIZE: usize = offset_of!(Header, size);
/// Offset of [`Header::ncpus`] (u32).
pub const OFF_NCPUS: usize = offset_of!(Header, ncpus);
/// Offset of [`Header::smi_count`] (u64).
pub const OFF_SMI_COUNT: usize = offset_of!(Header, smi_count);
/// Offset of [`Header::ping_req`] (u64, host).
pub const OFF_PING_REQ: usize = offset_of!(Header, ping_req);
/// Offset of [`Header::ping_ack`] (u64).
pub const OFF_PING_ACK: usize = offset_of!(Header, ping_ack);
/// Offset of [`Header::fault_code`] (u32).
pub const OFF_FAULT_CODE: usize = offset_of!(Header, fault_code);
/// Offset of [`Header::fault_cpu`] (u32).
pub const OFF_FAULT_CPU: usize = offset_of!(Header, fault_cpu);
/// Offset of [`Header::fault_rip`] (u64).
pub const OFF_FAULT_RIP: usize = offset_of!(Header, fault_rip);
/// Offset of [`Header::req_doorbell`] (u64, host: written after the request frame).
pub const OFF_REQ_DOORBELL: usize = offset_of!(Header, req_doorbell);
/// Offset of [`Header::reply_done`] (u64, agent: written after the reply frame).
pub const OFF_REPLY_DONE: usize = offset_of!(Header, reply_done);
/// Offset of [`Header::serve_status`] (u32, agent; unauthenticated).
pub const OFF_SERVE_STATUS: usize = offset_of!(Header, serve_status);
/// Offset of [`Header::reply_len`] (u32, agent).
pub const OFF_REPLY_LEN: usize = offset_of!(Header, reply_len);
/// Offset of [`Header::session_salt`] ([`SESSION_SALT_LEN`] bytes, agent):
/// both sides derive the per-boot direction keys from the shared key and it.
pub const OFF_SESSION_SALT: usize = offset_of!(Header, session_salt);
/// Offset of [`Header::serve_cycles`] (u64, firmware).
pub const OFF_SERVE_CYCLES: usize = offset_of!(Header, serve_cycles);
/// Offset of [`Header::partial_sessions`] (u64, firmware).
pub const OFF_PARTIAL_SESSIONS: usize = offset_of!(Header, partial_sessions);
/// Offset of [`Header::recovered_sessions`] (u64, firmware).
pub const OFF_RECOVERED_SESSIONS: usize = offset_of!(Header, recovered_sessions);
/// Offset of [`Header::vanished_cpus`] (u64, firmware).
pub const OFF_VANISHED_CPUS: usize = offset_of!(Header, vanished_cpus);
/// Offset of [`Header::follower_timeouts`] (u64, firmware).
pub const OFF_FOLLOWER_TIMEOUTS: usize = offset_of!(Header, follower_timeouts);
/// Offset of [`Header::serve_busy`] (u64, firmware).
pub const OFF_SERVE_BUSY: usize = offset_of!(Header, serve_busy);
/// Offset of [`Header::max_smm_us`] (u64, firmware).
pub const OFF_MAX_SMM_US: usize = offset_of!(Header, max_smm_us);
/// Offset of [`Header::host_peer`] (u32, host).
pub const OFF_HOST_PEER: usize = offset_of!(Header, host_peer);
/// Offset of [`Header::doorbell_rearms`] (u64, firmware).
pub const OFF_DOORBELL_REARMS: usize = offset_of!(Header, doorbell_rearms);

// The wire format is fixed: these are the offsets the firmware, the host
// and every deployed IDS use. A field moved by an edit fails the build.
const _: () = {
    assert!(size_of::<Header>() == HEADER_SIZE);
    assert!(OFF_MAGIC == 0x000);
    assert!(OFF_VERSION == 0x008);
    assert!(OFF_STATE == 0x00C);
    assert!(OFF_FEATURES == 0x010);
    assert!(OFF_SIZE == 0x018);
    assert!(OFF_NCPUS == 0x01C);
    assert!(OFF_SMI_COUNT == 0x020);
    assert!(OFF_PING_REQ == 0x028);
    assert!(OFF_PING_ACK == 0x030);
    assert!(OFF_FAULT_CODE == 0x038);
    assert!(OFF_FAULT_CPU == 0x03C);
    assert!(OFF_FAULT_RIP == 0x040);
    assert!(OFF_REQ_DOORBELL == 0x048);
    assert!(OFF_REPLY_DONE == 0x050);
    assert!(OFF_SERVE_STATUS == 0x058);
    assert!(OFF_REPLY_LEN == 0x05C);
    assert!(OFF_SESSION_SALT == 0x060);
    assert!(OFF_SERVE_CYCLES == 0x070);
    assert!(OFF_PARTIAL_SESSIONS == 0x078);
    assert!(OFF_RECOVERED_SESSIONS == 0x080);
    assert!(OFF_VANISHED_CPUS == 0x088);
    assert!(OFF_FOLLOWER_TIMEOUTS == 0x090);
    assert!(OFF_SERVE_BUSY == 0x098);
    assert!(OFF_MAX_SMM_US == 0x0A0);
    assert!(OFF_HOST_PEER == 0x0A8);
    assert!(OFF_DOORBELL_REARMS == 0x0B0);
};

impl Header {
    /// An all-zero header (what a fresh, zero-filled mailbox holds).
    pub fn zeroed() -> Self {
        <Self as FromZeros>::new_zeroed()
    }

    /// Decodes a header snapshot from its bytes.
    pub fn parse(bytes: &[u8; HEADER_SIZE]) -> Self {
        Self::read_from_bytes(bytes).unwrap_or_else(|_| Self::zeroed())
    }

    /// Copies the header out of `mem` once (a snapshot: each field may have
    /// changed since, and every field is untrusted).
    pub fn read_from<S: SharedMemory>(mem: &S) -> Result<Self, S::Error> {
        let mut b = [0u8; HEADER_SIZE];
        mem.copy_out(0, &mut b)?;
        Ok(Self::parse(&b))
    }

    /// True if the magic is [`MAGIC`].
    pub fn magic_ok(&self) -> bool {
        self.magic == MAGIC
    }

    /// Checks magic and version.
    pub fn check(&self) -> Result<(), LayoutError> {
        if !self.magic_ok() {
            return Err(LayoutError::BadHeader { found_version: 0 });
        }
        match self.version.get() {
            VERSION => Ok(()),
            found_version => Err(LayoutError::BadHeader { found_version }),
        }
    }

    /// The agent state, if the word is a known one.
    pub fn agent_state(&self) -> Option<AgentState> {
        AgentState::from_raw(self.state.get())
    }
}

/// What the agent says about itself in the header ([`OFF_STATE`]).
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

/// Outcome of the last `serve`, written by the agent at [`OFF_SERVE_STATUS`].
/// Unauthenticated: anyone can write this word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ServeStatus {
    /// Nothing served yet.
    None = 0,
    /// A sealed reply is in the reply area.
    Ok = 1,
    /// No key is provisioned: a plain, unauthenticated INFO reply is in the
    /// reply area.
    Unprovisioned = 2,
    /// The request frame header is malformed (version, direction, reserved
    /// fields) or its length does not fit the request area.
    BadFrame = 3,
    /// The request was served already (this client's sequence window says
    /// so), or its sequence is below the agent's floor (reconnect).
    Replay = 4,
    /// The request failed authentication (tag, key or header tampered).
    BadTag = 5,
    /// The request was authentic but its body is malformed.
    BadBody = 6,
    /// The reply counter is exhausted; the key must be rotated (reboot).
    CounterExhausted = 7,
    /// A plain request reached a provisioned agent; only sealed requests are
    /// served once a key is present.
    SealedRequired = 8,
    /// The request needs a snapshot of every CPU but this SMI was served
    /// without one (the flag the agent read before authenticating the
    /// request differed from the authenticated one: the guest changed it
    /// in between). Nothing was read; send the request again.
    SnapshotMissed = 9,
}

impl ServeStatus {
    /// Decodes a raw status word; unknown values are `None`.
    pub fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => Self::None,
            1 => Self::Ok,
            2 => Self::Unprovisioned,
            3 => Self::BadFrame,
            4 => Self::Replay,
            5 => Self::BadTag,
            6 => Self::BadBody,
            7 => Self::CounterExhausted,
            8 => Self::SealedRequired,
            9 => Self::SnapshotMissed,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_bytes_are_the_documented_ones() {
        let mut h = Header::zeroed();
        h.magic = MAGIC;
        h.version = VERSION.into();
        h.req_doorbell = 0x1122_3344_5566_7788.into();
        h.follower_timeouts = 9.into();
        let b = h.as_bytes();
        assert_eq!(&b[..8], b"SMMVMIMB");
        assert_eq!(&b[8..12], &[1, 0, 0, 0]);
        assert_eq!(&b[0x48..0x50], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&b[0x90..0x98], &9u64.to_le_bytes());
        let mut arr = [0u8; HEADER_SIZE];
        arr.copy_from_slice(b);
        let back = Header::parse(&arr);
        assert!(back.check().is_ok());
        assert_eq!(back.req_doorbell.get(), 0x1122_3344_5566_7788);
        assert_eq!(
            Header::zeroed().check(),
            Err(LayoutError::BadHeader { found_version: 0 })
        );
    }
}
