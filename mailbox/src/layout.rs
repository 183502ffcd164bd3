//! The mailbox as a whole (layout version 1): the header
//! ([`crate::header`], whose names are re-exported here), then the request
//! area, then the reply area, both derived from the mailbox size alone
//! ([`Areas`]); and the hand-shake over them.
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

// The header's names, where they have always been: `layout::OFF_*`.
pub use crate::header::{
    AgentState, FEATURE_DOORBELL, FEATURE_SMI_BROADCAST, HEADER_SIZE, Header, MAGIC,
    OFF_DOORBELL_REARMS, OFF_FAULT_CODE, OFF_FAULT_CPU, OFF_FAULT_RIP, OFF_FEATURES,
    OFF_FOLLOWER_TIMEOUTS, OFF_HOST_PEER, OFF_MAGIC, OFF_MAX_SMM_US, OFF_NCPUS,
    OFF_PARTIAL_SESSIONS, OFF_PING_ACK, OFF_PING_REQ, OFF_RECOVERED_SESSIONS, OFF_REPLY_DONE,
    OFF_REPLY_LEN, OFF_REQ_DOORBELL, OFF_SERVE_BUSY, OFF_SERVE_CYCLES, OFF_SERVE_STATUS,
    OFF_SESSION_SALT, OFF_SIZE, OFF_SMI_COUNT, OFF_STATE, OFF_VANISHED_CPUS, OFF_VERSION,
    RING_VECTOR, SESSION_SALT_LEN, ServeStatus, VECTOR_BROADCAST, VECTOR_CPU_BASE, VERSION,
};

/// Smallest mailbox this layout supports (one 4 KiB page).
pub const MIN_MAILBOX_SIZE: usize = 0x1000;
/// Largest mailbox this layout supports (the size field is a u32; areas are
/// kept well below that).
pub const MAX_MAILBOX_SIZE: usize = 64 << 20;
/// The request area never grows beyond this, whatever the mailbox size.
pub const MAX_REQUEST_AREA: usize = 64 << 10;
/// Alignment of both areas.
pub const AREA_ALIGN: usize = 64;

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
}
