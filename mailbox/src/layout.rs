//! Byte offsets of the mailbox header (layout version 1) and the areas that
//! follow it.
//!
//! Offsets 0x000..0x048 are the original v1 header (used by the firmware's
//! PING and the test harness) and keep their meaning. The request/reply
//! hand-shake fields live in the formerly reserved range 0x048..0x100.
//!
//! # Hand-shake (who writes what, in which order)
//! 1. Host: writes the sealed request frame at [`Areas::request`], then (after
//!    a release fence) writes a fresh non-zero value to [`OFF_REQ_DOORBELL`]
//!    (by convention the request's sequence number), then raises the SMI.
//! 2. Agent (in SMM): reads the doorbell once; if it is zero or equals the
//!    doorbell it served last (kept in SMRAM, not in the mailbox) it does
//!    nothing. Otherwise it copies the request frame into SMRAM, checks,
//!    opens and serves it, and writes, in this order: the reply frame at
//!    [`Areas::reply`], [`OFF_REPLY_LEN`], [`OFF_SERVE_STATUS`], then (after a
//!    compiler fence; x86 stores are not reordered with other stores)
//!    [`OFF_REPLY_DONE`] = the doorbell value it served.
//! 3. Host: polls [`OFF_REPLY_DONE`] until it equals its doorbell (with a
//!    deadline: silence is an alert), then copies the reply frame out and
//!    opens it. [`OFF_SERVE_STATUS`] is unauthenticated: it explains a
//!    failure, it never proves a success.
//!
//! The host must not touch the request area between the doorbell and the
//! done value; if it does, only its own request is spoiled.

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
/// u64, host: doorbell, written after the request frame.
pub const OFF_REQ_DOORBELL: usize = 0x048;
/// u64, agent: the doorbell value it served, written after the reply frame.
pub const OFF_REPLY_DONE: usize = 0x050;
/// u32, agent: outcome of the last serve ([`ServeStatus`]); unauthenticated.
pub const OFF_SERVE_STATUS: usize = 0x058;
/// u32, agent: length in bytes of the reply frame at the reply area.
pub const OFF_REPLY_LEN: usize = 0x05C;
/// 16 bytes, agent: session salt chosen at boot (RDRAND); both sides derive
/// the per-boot direction keys from the shared key and this salt.
pub const OFF_SESSION_SALT: usize = 0x060;
/// Length of the session salt.
pub const SESSION_SALT_LEN: usize = 16;
/// u64, firmware: TSC cycles spent in SMM for the last served request
/// (informational, written by the firmware after `serve` returns).
pub const OFF_SERVE_CYCLES: usize = 0x070;
/// u64, firmware: SMI sessions served before every CPU arrived (the
/// rendezvous timed out; such a batch is not one consistent snapshot).
pub const OFF_PARTIAL_SESSIONS: usize = 0x078;
/// u64, firmware: SMI sessions ended other than by their leader's release
/// (a follower found the session stale, or its leader came back to SMM
/// after leaving it without RSM) and recovered by a later SMI.
pub const OFF_RECOVERED_SESSIONS: usize = 0x080;
/// u64, firmware: times a CPU entered SMM and found that it had left SMM
/// without RSM during an earlier SMI (QEMU TCG delivers INIT in SMM).
pub const OFF_VANISHED_CPUS: usize = 0x088;
/// u64, firmware: followers that gave up waiting for their session's
/// release (its leader vanished; or served longer than the bound).
pub const OFF_FOLLOWER_TIMEOUTS: usize = 0x090;
/// u64, firmware: SMI sessions that served nothing because another CPU held
/// the serve claim (still serving, or vanished while serving and not back).
pub const OFF_SERVE_BUSY: usize = 0x098;
/// u64, firmware: the longest time one CPU spent in SMM for one SMI since
/// boot, in microseconds (published by the serving CPU, so it lags by one
/// SMI).
pub const OFF_MAX_SMM_US: usize = 0x0A0;
/// u32, host: the ivshmem peer id of the host-injector daemon plus one (0 =
/// no daemon peer). After sealing a reply the agent writes
/// `(peer << 16) | RING_VECTOR` to the device's Doorbell register (BAR0 +
/// 12), which makes QEMU signal the daemon's eventfd for that vector
/// (QEMU `docs/specs/ivshmem-spec.rst`). Untrusted: a wrong value only
/// rings the wrong peer.
pub const OFF_HOST_PEER: usize = 0x0A8;
/// u64, firmware: times the agent found its MSI-X SMI doorbell undone (MSI-X
/// or bus mastering disabled, a vector masked or reprogrammed: Linux clears
/// MSI-X enable when it enumerates PCI, and the guest can at any time) and
/// armed it again.
pub const OFF_DOORBELL_REARMS: usize = 0x0B0;
/// Size of the header; request and reply areas follow it.
pub const HEADER_SIZE: usize = 0x100;

/// Smallest mailbox this layout supports (one 4 KiB page).
pub const MIN_MAILBOX_SIZE: usize = 0x1000;
/// Largest mailbox this layout supports (the size field is a u32; areas are
/// kept well below that).
pub const MAX_MAILBOX_SIZE: usize = 64 << 20;
/// The request area never grows beyond this, whatever the mailbox size.
pub const MAX_REQUEST_AREA: usize = 64 << 10;
/// Alignment of both areas.
pub const AREA_ALIGN: usize = 64;

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
    /// The request sequence is not greater than the last accepted one.
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
            _ => return None,
        })
    }
}

/// Where the request and reply areas are, derived from the mailbox size
/// alone so that the agent, the injector and the IDS agree without trusting
/// any field of the mailbox.
///
/// The request area starts at [`HEADER_SIZE`] and takes a quarter of the
/// remaining space, rounded down to [`AREA_ALIGN`] and capped at
/// [`MAX_REQUEST_AREA`]; the reply area takes the rest (rounded down to
/// [`AREA_ALIGN`]). For the default 1 MiB mailbox: request 0x100..0x10100
/// (64 KiB), reply 0x10100..0x100100-0x100 = 0xFFF00 - 0x10000 bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Areas {
    /// Byte range of the request area.
    pub request: core::ops::Range<usize>,
    /// Byte range of the reply area.
    pub reply: core::ops::Range<usize>,
}

impl Areas {
    /// Computes the areas of a mailbox of `size` bytes.
    pub fn from_size(size: usize) -> Result<Self, LayoutError> {
        if !(MIN_MAILBOX_SIZE..=MAX_MAILBOX_SIZE).contains(&size) {
            return Err(LayoutError::BadSize { found: size });
        }
        let avail = size - HEADER_SIZE;
        let req = ((avail / 4) & !(AREA_ALIGN - 1)).min(MAX_REQUEST_AREA);
        let req_end = HEADER_SIZE + req;
        let reply_len = (size - req_end) & !(AREA_ALIGN - 1);
        Ok(Self {
            request: HEADER_SIZE..req_end,
            reply: req_end..req_end + reply_len,
        })
    }

    /// Capacity of the request area in bytes.
    pub fn request_capacity(&self) -> usize {
        self.request.len()
    }

    /// Capacity of the reply area in bytes.
    pub fn reply_capacity(&self) -> usize {
        self.reply.len()
    }
}

/// Errors of the layout module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// The mailbox size is outside what layout v1 supports.
    #[error(
        "mailbox size must be between {MIN_MAILBOX_SIZE:#x} and {MAX_MAILBOX_SIZE:#x} bytes, found {found:#x}: size the shared memory (ivshmem) accordingly"
    )]
    BadSize {
        /// The size that was given.
        found: usize,
    },
    /// The header does not start with [`MAGIC`] or has another version.
    #[error(
        "mailbox header must start with magic SMMVMIMB and layout version {VERSION}, found version {found_version}: the firmware has not initialised the mailbox or speaks another layout"
    )]
    BadHeader {
        /// Version word found (0 if the magic was wrong).
        found_version: u32,
    },
}

/// Reads a little-endian u32 at `off`; `None` if out of bounds.
pub fn read_u32(buf: &[u8], off: usize) -> Option<u32> {
    let b = buf.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Reads a little-endian u64 at `off`; `None` if out of bounds.
pub fn read_u64(buf: &[u8], off: usize) -> Option<u64> {
    let b = buf.get(off..off.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Some(u64::from_le_bytes(a))
}

/// Writes a little-endian u32 at `off`; returns false (and writes nothing)
/// if out of bounds.
pub fn write_u32(buf: &mut [u8], off: usize, v: u32) -> bool {
    match off.checked_add(4).and_then(|end| buf.get_mut(off..end)) {
        Some(b) => {
            b.copy_from_slice(&v.to_le_bytes());
            true
        }
        None => false,
    }
}

/// Writes a little-endian u64 at `off`; returns false (and writes nothing)
/// if out of bounds.
pub fn write_u64(buf: &mut [u8], off: usize, v: u64) -> bool {
    match off.checked_add(8).and_then(|end| buf.get_mut(off..end)) {
        Some(b) => {
            b.copy_from_slice(&v.to_le_bytes());
            true
        }
        None => false,
    }
}

/// Checks magic and version of a mailbox header.
pub fn check_header(mailbox: &[u8]) -> Result<(), LayoutError> {
    let magic_ok = mailbox.get(OFF_MAGIC..OFF_MAGIC + 8) == Some(&MAGIC[..]);
    let version = read_u32(mailbox, OFF_VERSION).unwrap_or(0);
    if !magic_ok {
        return Err(LayoutError::BadHeader { found_version: 0 });
    }
    if version != VERSION {
        return Err(LayoutError::BadHeader {
            found_version: version,
        });
    }
    Ok(())
}

/// Reads the session salt from a mailbox header.
pub fn session_salt(mailbox: &[u8]) -> Option<[u8; SESSION_SALT_LEN]> {
    let mut s = [0u8; SESSION_SALT_LEN];
    s.copy_from_slice(mailbox.get(OFF_SESSION_SALT..OFF_SESSION_SALT + SESSION_SALT_LEN)?);
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_mailbox_areas() {
        let a = Areas::from_size(1 << 20).unwrap();
        assert_eq!(a.request, 0x100..0x10100);
        assert_eq!(a.reply.start, 0x10100);
        assert!(a.reply.end <= 1 << 20);
        assert_eq!(a.reply_capacity() % AREA_ALIGN, 0);
    }

    #[test]
    fn areas_never_overlap_or_overflow() {
        for size in (MIN_MAILBOX_SIZE..=(4 << 20)).step_by(4093) {
            let a = Areas::from_size(size).unwrap();
            assert!(a.request.start >= HEADER_SIZE);
            assert!(a.request.end <= a.reply.start);
            assert!(a.reply.end <= size);
            assert!(a.request_capacity() >= 512, "size {size}");
            assert!(a.reply_capacity() >= 2048, "size {size}");
        }
        assert!(Areas::from_size(MIN_MAILBOX_SIZE - 1).is_err());
        assert!(Areas::from_size(MAX_MAILBOX_SIZE + 1).is_err());
    }

    const _: () = {
        assert!(OFF_SERVE_CYCLES + 8 <= HEADER_SIZE);
        assert!(OFF_SESSION_SALT + SESSION_SALT_LEN <= OFF_SERVE_CYCLES);
        assert!(OFF_FAULT_RIP + 8 == OFF_REQ_DOORBELL);
    };
}
