//! The reply body (plaintext inside a reply frame) and its per-op results.
//!
//! # Reply body ([`ReplyHeaderLe`], then results)
//! | offset | size | field |
//! |---|---|---|
//! | 0x00 | 8 | request sequence answered |
//! | 0x08 | 16 | GCM tag of the request answered |
//! | 0x18 | 16 | IDS nonce of the request answered |
//! | 0x28 | 4 | result count |
//! | 0x2C | 4 | flags: bit 0 = unauthenticated (plain INFO of an unprovisioned agent) |
//! | 0x30 | .. | results, see [`OpResult`] |
//!
//! # Result ([`ResultHeaderLe`], then data padded to 8 bytes)
//! | offset | size | field |
//! |---|---|---|
//! | 0x00 | 1 | kind (raw, echoed from the op) |
//! | 0x01 | 1 | status ([`Status`]) |
//! | 0x02 | 1 | level (paging level for NotPresent / refused table reads, else 0) |
//! | 0x03 | 1 | reserved |
//! | 0x04 | 4 | data length `d` |
//! | 0x08 | 8 | aux: READ_*: address where the read stopped; TRANSLATE: physical address; WALK_LIST: entries |
//! | 0x10 | d | data, then zero padding to a multiple of 8 |
//!
//! Data: READ_* raw bytes (the prefix read before a failure), TRANSLATE a
//! `WalkRecord`, CPU_STATE a `CpuState`, INFO an `Info` record
//! ([`crate::records`]), WALK_LIST its entries ([`crate::walk`]), FIELD
//! nothing.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::frame::TAG_LEN;
use crate::request::IDS_NONCE_LEN;
use crate::wire::{WireError, truncated};

/// Length of the reply body header in bytes.
pub const REPLY_BODY_HEADER_LEN: usize = size_of::<ReplyHeaderLe>();
/// Length of a result header in bytes.
pub const RESULT_HEADER_LEN: usize = size_of::<ResultHeaderLe>();
/// Reply flag: the reply is plain and unauthenticated.
pub const REPLY_FLAG_UNAUTHENTICATED: u32 = 1;

/// The reply body header as it lies in the decrypted body.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ReplyHeaderLe {
    /// Request sequence answered.
    pub request_seq: U64,
    /// GCM tag of the request answered.
    pub request_tag: [u8; TAG_LEN],
    /// IDS nonce of the request answered.
    pub ids_nonce: [u8; IDS_NONCE_LEN],
    /// Number of results that follow.
    pub result_count: U32,
    /// [`REPLY_FLAG_UNAUTHENTICATED`]; other bits zero.
    pub flags: U32,
}

/// A result header as it lies in the reply body.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ResultHeaderLe {
    /// Raw kind of the op answered.
    pub kind: u8,
    /// Raw [`Status`].
    pub status: u8,
    /// Paging level where a walk stopped, else 0.
    pub level: u8,
    /// Zero.
    pub reserved: u8,
    /// Data length in bytes (before padding).
    pub data_len: U32,
    /// See [`OpResult::aux`].
    pub aux: U64,
}

const _: () = assert!(REPLY_BODY_HEADER_LEN == 48 && RESULT_HEADER_LEN == 16);

/// Per-op status in a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Done; data complete.
    Ok = 0,
    /// A page-table entry was not present; `level` says which (5..1, 1 = PTE).
    NotPresent = 1,
    /// The address (or a page table on the way) lies in SMRAM.
    RefusedSmram = 2,
    /// The address (or a page table on the way) is not RAM (MMIO, hole, beyond RAM).
    RefusedNotRam = 3,
    /// The length does not fit the reply capacity.
    TooLarge = 4,
    /// The op is malformed (unknown kind, reserved bits, bad CPU index).
    BadRequest = 5,
    /// The op is valid but cannot be served here (CPU not in long mode, ...).
    Unsupported = 6,
    /// The virtual address is not canonical for the paging mode.
    NonCanonical = 7,
    /// The named CPU did not reach SMM for this batch (the rendezvous timed
    /// out), so its registers are unknown: retry the request.
    CpuNotInSmm = 8,
    /// The request spent the agent's work budget (page-table and memory
    /// reads per SMI, [`crate::walk::WORK_BUDGET`]) before this op was
    /// done: what was read is returned; ask for the rest in another request.
    WorkLimit = 9,
}

impl Status {
    /// Decodes a raw status byte.
    pub fn from_raw(raw: u8) -> Option<Self> {
        Some(match raw {
            0 => Self::Ok,
            1 => Self::NotPresent,
            2 => Self::RefusedSmram,
            3 => Self::RefusedNotRam,
            4 => Self::TooLarge,
            5 => Self::BadRequest,
            6 => Self::Unsupported,
            7 => Self::NonCanonical,
            8 => Self::CpuNotInSmm,
            9 => Self::WorkLimit,
            _ => return None,
        })
    }
}

/// One result of a reply (zero-copy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpResult<'a> {
    /// Raw kind byte of the op answered.
    pub kind: u8,
    /// Status.
    pub status: Status,
    /// Paging level where a walk stopped (0 if not applicable).
    pub level: u8,
    /// READ_*: address where the read stopped; TRANSLATE: physical address.
    pub aux: u64,
    /// Data (see the module docs per kind).
    pub data: &'a [u8],
}

/// Padded size of a result with `data_len` bytes of data.
pub fn result_len(data_len: usize) -> usize {
    RESULT_HEADER_LEN + data_len.div_ceil(8) * 8
}

/// A parsed reply body (zero-copy).
#[derive(Clone, Copy, Debug)]
pub struct ReplyBody<'a> {
    /// Request sequence answered.
    pub request_seq: u64,
    /// GCM tag of the request answered.
    pub request_tag: [u8; TAG_LEN],
    /// IDS nonce of the request answered.
    pub ids_nonce: [u8; IDS_NONCE_LEN],
    /// Flags ([`REPLY_FLAG_UNAUTHENTICATED`]).
    pub flags: u32,
    count: usize,
    results: &'a [u8],
}

impl<'a> ReplyBody<'a> {
    /// Parses a reply body, validating every result header up front.
    pub fn parse(body: &'a [u8]) -> Result<Self, WireError> {
        let (head, results) = ReplyHeaderLe::read_from_prefix(body)
            .map_err(|_| truncated("reply body", REPLY_BODY_HEADER_LEN, body.len()))?;
        let count = head.result_count.get() as usize;
        let flags = head.flags.get();
        if flags & !REPLY_FLAG_UNAUTHENTICATED != 0 {
            return Err(WireError::Reserved {
                what: "reply flags",
                found: u64::from(flags),
            });
        }
        let this = Self {
            request_seq: head.request_seq.get(),
            request_tag: head.request_tag,
            ids_nonce: head.ids_nonce,
            flags,
            count,
            results,
        };
        // Validate all results now so iteration cannot fail.
        let mut n = 0usize;
        let mut rest = this.results;
        while !rest.is_empty() {
            let (_, used) = parse_result(rest)?;
            rest = &rest[used..];
            n += 1;
        }
        if n != count {
            return Err(WireError::BadLength {
                what: "result count",
                expected: count,
                found: n,
            });
        }
        Ok(this)
    }

    /// Number of results.
    pub fn result_count(&self) -> usize {
        self.count
    }

    /// The results, in op order.
    pub fn results(&self) -> impl Iterator<Item = OpResult<'a>> + 'a {
        let mut rest = self.results;
        core::iter::from_fn(move || {
            let (r, used) = parse_result(rest).ok()?;
            rest = &rest[used..];
            Some(r)
        })
    }
}

fn parse_result(b: &[u8]) -> Result<(OpResult<'_>, usize), WireError> {
    let (h, _) = ResultHeaderLe::read_from_prefix(b)
        .map_err(|_| truncated("result header", RESULT_HEADER_LEN, b.len()))?;
    let status = Status::from_raw(h.status).ok_or(WireError::Reserved {
        what: "result status (unknown)",
        found: u64::from(h.status),
    })?;
    let data_len = h.data_len.get() as usize;
    let used = RESULT_HEADER_LEN
        .checked_add(data_len.div_ceil(8) * 8)
        .filter(|&u| u <= b.len())
        .ok_or(truncated(
            "result data",
            RESULT_HEADER_LEN + data_len,
            b.len(),
        ))?;
    Ok((
        OpResult {
            kind: h.kind,
            status,
            level: h.level,
            aux: h.aux.get(),
            data: &b[RESULT_HEADER_LEN..RESULT_HEADER_LEN + data_len],
        },
        used,
    ))
}

/// Builds a reply body in a caller-provided buffer, one result at a time,
/// without allocating (the agent's side).
pub struct ReplyWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
    count: u32,
}

impl<'a> ReplyWriter<'a> {
    /// Starts a reply body in `buf`. Fails if `buf` cannot hold the body header.
    pub fn new(
        buf: &'a mut [u8],
        request_seq: u64,
        request_tag: &[u8; TAG_LEN],
        ids_nonce: &[u8; IDS_NONCE_LEN],
        flags: u32,
    ) -> Result<Self, WireError> {
        let found = buf.len();
        let head = buf
            .get_mut(..REPLY_BODY_HEADER_LEN)
            .ok_or(WireError::NoSpace {
                expected: REPLY_BODY_HEADER_LEN,
                found,
            })?;
        let le = ReplyHeaderLe {
            request_seq: request_seq.into(),
            request_tag: *request_tag,
            ids_nonce: *ids_nonce,
            result_count: 0.into(),
            flags: flags.into(),
        };
        head.copy_from_slice(le.as_bytes());
        Ok(Self {
            buf,
            len: REPLY_BODY_HEADER_LEN,
            count: 0,
        })
    }

    /// Most data bytes the next result can carry.
    pub fn data_room(&self) -> usize {
        (self.buf.len() - self.len).saturating_sub(RESULT_HEADER_LEN) & !7
    }

    /// True if even an empty result no longer fits.
    pub fn is_full(&self) -> bool {
        self.buf.len() - self.len < RESULT_HEADER_LEN
    }

    /// Appends a result. `fill` gets a zeroed data slice of
    /// `min(max_data, data_room())` bytes and returns (status, level, aux,
    /// bytes used). Returns false if not even the header fits.
    pub fn push(
        &mut self,
        kind: u8,
        max_data: usize,
        fill: impl FnOnce(&mut [u8]) -> (Status, u8, u64, usize),
    ) -> bool {
        self.push_result(kind, max_data, true, fill)
    }

    /// Like [`ReplyWriter::push`] for a `fill` that writes every byte it
    /// reports as used: the offered slice is not zeroed first (a large
    /// offer costs nothing), only the padding after `used` is.
    pub fn push_written(
        &mut self,
        kind: u8,
        max_data: usize,
        fill: impl FnOnce(&mut [u8]) -> (Status, u8, u64, usize),
    ) -> bool {
        self.push_result(kind, max_data, false, fill)
    }

    /// Appends a result; `zero_offer`: zero the offered slice before
    /// `fill` and everything of it after `used` (else only the padding).
    fn push_result(
        &mut self,
        kind: u8,
        max_data: usize,
        zero_offer: bool,
        fill: impl FnOnce(&mut [u8]) -> (Status, u8, u64, usize),
    ) -> bool {
        if self.is_full() {
            return false;
        }
        let room = max_data.min(self.data_room());
        let start = self.len;
        let data_start = start + RESULT_HEADER_LEN;
        let data = &mut self.buf[data_start..data_start + room];
        if zero_offer {
            data.fill(0);
        }
        let (status, level, aux, used) = fill(data);
        let used = used.min(room);
        let padded = used.div_ceil(8) * 8;
        // Zero the padding (and, for a zeroed offer, anything `fill` wrote
        // past `used`). `padded <= data_room()`: the room is a multiple of 8.
        let end = if zero_offer { room.max(padded) } else { padded };
        self.buf[data_start + used..data_start + end].fill(0);
        let h = ResultHeaderLe {
            kind,
            status: status as u8,
            level,
            reserved: 0,
            data_len: (used as u32).into(),
            aux: aux.into(),
        };
        self.buf[start..data_start].copy_from_slice(h.as_bytes());
        self.len = data_start + padded;
        self.count += 1;
        true
    }

    /// Finishes the body; returns its length.
    pub fn finish(self) -> usize {
        let count = core::mem::offset_of!(ReplyHeaderLe, result_count);
        self.buf[count..count + 4].copy_from_slice(&self.count.to_le_bytes());
        self.len
    }
}
