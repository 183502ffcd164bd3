//! The sealed frame: a 32-byte header, the body, a 16-byte GCM tag.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0x00 | 2 | frame version ([`FRAME_VERSION`]) |
//! | 0x02 | 1 | direction ([`Direction`]) |
//! | 0x03 | 1 | flags ([`FLAG_NO_SNAPSHOT`]; other bits zero) |
//! | 0x04 | 4 | body length `n` (ciphertext, without the tag) |
//! | 0x08 | 8 | sequence: the IDS's request counter, or the agent's reply counter |
//! | 0x10 | 8 | in reply to: the request sequence a reply answers (0 in requests) |
//! | 0x18 | 8 | client: the IDS client's id (its keys are derived for it; a reply echoes it) |
//! | 0x20 | n | body (AES-256-GCM ciphertext; plaintext for plain frames) |
//! | 0x20+n | 16 | GCM tag (zero for plain frames) |
//!
//! The 32-byte header ([`FrameHeaderLe`]) is the associated data of the AEAD.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::wire::{WireError, truncated};

/// Request flag: the request needs no snapshot of the other CPUs (a
/// targeted SMI): the CPU that takes the SMI serves it at once, without
/// waiting for the others. Authenticated with the header like every field
/// (the agent acts on it before opening the frame; a flipped flag fails the
/// tag, so it changes no answer).
pub const FLAG_NO_SNAPSHOT: u8 = 1 << 0;
/// Flag bits defined so far; a frame with any other bit is refused.
pub const FLAGS_KNOWN: u8 = FLAG_NO_SNAPSHOT;

/// Version of the frame format.
pub const FRAME_VERSION: u16 = 1;
/// Length of a frame header in bytes.
pub const FRAME_HEADER_LEN: usize = size_of::<FrameHeaderLe>();
/// Length of the GCM tag that ends every frame, in bytes.
pub const TAG_LEN: usize = 16;
/// Frame overhead in bytes: header plus tag.
pub const FRAME_OVERHEAD: usize = FRAME_HEADER_LEN + TAG_LEN;

/// The frame header as it lies in the mailbox.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct FrameHeaderLe {
    /// [`FRAME_VERSION`].
    pub version: U16,
    /// Raw [`Direction`].
    pub direction: u8,
    /// [`FLAG_NO_SNAPSHOT`] or zero.
    pub flags: u8,
    /// Body length in bytes, without the tag.
    pub body_len: U32,
    /// Sequence number.
    pub seq: U64,
    /// The request sequence a reply answers; 0 in requests.
    pub in_reply_to: U64,
    /// The IDS client's id.
    pub client: U64,
}

const _: () = assert!(FRAME_HEADER_LEN == 32);

/// Who sent a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Direction {
    /// IDS to agent, sealed.
    Request = 1,
    /// Agent to IDS, sealed.
    Reply = 2,
    /// Host to an unprovisioned agent, plain (asks for INFO only).
    PlainRequest = 3,
    /// Unprovisioned agent to host, plain INFO; proves nothing.
    PlainReply = 4,
}

impl Direction {
    /// Decodes a raw direction byte.
    pub fn from_raw(raw: u8) -> Option<Self> {
        Some(match raw {
            1 => Self::Request,
            2 => Self::Reply,
            3 => Self::PlainRequest,
            4 => Self::PlainReply,
            _ => return None,
        })
    }
}

/// The fixed 32-byte frame header, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Sender and kind of frame.
    pub direction: Direction,
    /// Length of the body in bytes (without the tag).
    pub body_len: u32,
    /// Sequence number (request counter or reply counter).
    pub seq: u64,
    /// For replies: the request sequence answered. Zero in requests.
    pub in_reply_to: u64,
    /// [`FLAG_NO_SNAPSHOT`] or zero.
    pub flags: u8,
    /// The IDS client whose keys seal the frame (requests), or whose
    /// request it answers (replies). Plain frames: zero.
    pub client: u64,
}

impl FrameHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let le = FrameHeaderLe {
            version: FRAME_VERSION.into(),
            direction: self.direction as u8,
            flags: self.flags,
            body_len: self.body_len.into(),
            seq: self.seq.into(),
            in_reply_to: self.in_reply_to.into(),
            client: self.client.into(),
        };
        let mut h = [0u8; FRAME_HEADER_LEN];
        h.copy_from_slice(le.as_bytes());
        h
    }

    /// Parses the first 32 bytes of `bytes` as a frame header. Checks the
    /// version, the direction byte and the flags; not the length.
    pub fn parse(bytes: &[u8]) -> Result<Self, WireError> {
        let (h, _) = FrameHeaderLe::read_from_prefix(bytes)
            .map_err(|_| truncated("frame header", FRAME_HEADER_LEN, bytes.len()))?;
        if h.version.get() != FRAME_VERSION {
            return Err(WireError::BadVersion {
                found: h.version.get(),
            });
        }
        let direction = Direction::from_raw(h.direction).ok_or(WireError::BadDirection {
            expected: Direction::Request as u8,
            found: h.direction,
        })?;
        if h.flags & !FLAGS_KNOWN != 0 {
            return Err(WireError::Reserved {
                what: "frame flags",
                found: u64::from(h.flags),
            });
        }
        Ok(Self {
            direction,
            body_len: h.body_len.get(),
            seq: h.seq.get(),
            in_reply_to: h.in_reply_to.get(),
            flags: h.flags,
            client: h.client.get(),
        })
    }

    /// Total frame length in bytes (header, body, tag).
    pub fn frame_len(&self) -> usize {
        FRAME_OVERHEAD + self.body_len as usize
    }

    /// Parses a header and checks that the whole frame fits in `bytes`
    /// (which may be longer) and in `limit` bytes.
    pub fn parse_bounded(bytes: &[u8], limit: usize) -> Result<Self, WireError> {
        let h = Self::parse(bytes)?;
        let need = h.frame_len();
        let have = bytes.len().min(limit);
        if need > have {
            return Err(WireError::BadLength {
                what: "frame length at most the area capacity",
                expected: have,
                found: need,
            });
        }
        Ok(h)
    }
}
