//! The wire format: everything inside a frame, as typed little-endian
//! layouts split by concern, and the one error type of their parsers.
//!
//! - [`crate::frame`]: the sealed frame and its 32-byte header;
//! - [`crate::request`]: the request body and its 32-byte ops;
//! - [`crate::reply`]: the reply body, the per-op results and the writer
//!   the agent builds them with;
//! - [`crate::records`]: the records carried as result data (walk trace,
//!   CPU state, INFO).
//!
//! All integers are little-endian; every layout has a fixed size and no
//! padding (checked at compile time by the `zerocopy` derives); parsing
//! works on private copies and never panics or reads out of bounds. This
//! module re-exports all of it, so `wire::X` names every wire item.

pub use crate::frame::*;
pub use crate::records::*;
pub use crate::reply::*;
pub use crate::request::*;
pub use crate::walk::{Field, WalkSpec};

/// Errors of the wire module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Fewer bytes than a fixed-size structure needs.
    #[error(
        "{what} needs at least {expected} bytes, found {found}: the frame is truncated or the length field lies"
    )]
    Truncated {
        /// What was being parsed.
        what: &'static str,
        /// Bytes needed.
        expected: usize,
        /// Bytes available.
        found: usize,
    },
    /// The frame version is not [`FRAME_VERSION`].
    #[error(
        "frame version must be {FRAME_VERSION}, found {found}: both sides must speak the same mailbox crate version"
    )]
    BadVersion {
        /// Version found.
        found: u16,
    },
    /// The direction byte is unknown or not the one expected here.
    #[error(
        "frame direction must be {expected}, found {found}: a request was read as a reply or the frame is garbage"
    )]
    BadDirection {
        /// Expected direction.
        expected: u8,
        /// Raw byte found.
        found: u8,
    },
    /// A reserved field is not zero.
    #[error(
        "reserved field {what} must be zero, found {found:#x}: the sender is newer or the data is garbage"
    )]
    Reserved {
        /// Which field.
        what: &'static str,
        /// Value found.
        found: u64,
    },
    /// A length or count is inconsistent with the bytes present.
    #[error("{what} must be {expected}, found {found}: the frame is malformed")]
    BadLength {
        /// Which length.
        what: &'static str,
        /// Value expected (or limit).
        expected: usize,
        /// Value found.
        found: usize,
    },
    /// The output buffer is too small for what is being encoded.
    #[error(
        "output buffer must hold {expected} bytes, found {found}: use a larger buffer or fewer ops"
    )]
    NoSpace {
        /// Bytes needed.
        expected: usize,
        /// Bytes available.
        found: usize,
    },
}

pub(crate) fn truncated(what: &'static str, expected: usize, found: usize) -> WireError {
    WireError::Truncated {
        what,
        expected,
        found,
    }
}
