//! Wire format of sealed frames, request operations and reply results.
//!
//! All integers are little-endian; every header has a fixed size; parsing is
//! zero-copy over a byte slice and never panics or reads out of bounds.
//!
//! # Frame (request and reply alike)
//! | offset | size | field |
//! |---|---|---|
//! | 0x00 | 2 | frame version ([`FRAME_VERSION`]) |
//! | 0x02 | 1 | direction ([`Direction`]) |
//! | 0x03 | 1 | flags, zero |
//! | 0x04 | 4 | body length `n` (ciphertext, without the tag) |
//! | 0x08 | 8 | sequence: the IDS's request counter, or the agent's reply counter |
//! | 0x10 | 8 | in reply to: the request sequence a reply answers (0 in requests) |
//! | 0x18 | 8 | reserved, zero |
//! | 0x20 | n | body (AES-256-GCM ciphertext; plaintext for plain frames) |
//! | 0x20+n | 16 | GCM tag (zero for plain frames) |
//!
//! The 32-byte header is the associated data of the AEAD.
//!
//! # Request body (plaintext)
//! | offset | size | field |
//! |---|---|---|
//! | 0x00 | 16 | IDS nonce, fresh per request, echoed in the reply |
//! | 0x10 | 4 | op count `k` (at most [`MAX_OPS`]) |
//! | 0x14 | 4 | reserved, zero |
//! | 0x18 | 32*k | ops, see [`Op`] |
//!
//! # Op (32 bytes)
//! | offset | size | field |
//! |---|---|---|
//! | 0x00 | 1 | kind ([`OpKind`]) |
//! | 0x01 | 1 | flags: bit 0 explicit CR3; bits 1..2 PTI choice ([`Pti`]); others zero |
//! | 0x02 | 2 | reserved, zero |
//! | 0x04 | 4 | CPU index (READ_VIRT, TRANSLATE: whose CR3 and paging mode; CPU_STATE) |
//! | 0x08 | 8 | explicit CR3 (if flag bit 0) |
//! | 0x10 | 8 | address (virtual or physical) |
//! | 0x18 | 4 | length (READ_VIRT, READ_PHYS) |
//! | 0x1C | 4 | reserved, zero |
//!
//! # Reply body (plaintext)
//! | offset | size | field |
//! |---|---|---|
//! | 0x00 | 8 | request sequence answered |
//! | 0x08 | 16 | GCM tag of the request answered |
//! | 0x18 | 16 | IDS nonce of the request answered |
//! | 0x28 | 4 | result count |
//! | 0x2C | 4 | flags: bit 0 = unauthenticated (plain INFO of an unprovisioned agent) |
//! | 0x30 | .. | results, see [`OpResult`] |
//!
//! # Result (16-byte header + data padded to 8 bytes)
//! | offset | size | field |
//! |---|---|---|
//! | 0x00 | 1 | kind (raw, echoed from the op) |
//! | 0x01 | 1 | status ([`Status`]) |
//! | 0x02 | 1 | level (paging level for NotPresent / refused table reads, else 0) |
//! | 0x03 | 1 | reserved |
//! | 0x04 | 4 | data length `d` |
//! | 0x08 | 8 | aux: READ_*: address where the read stopped; TRANSLATE: physical address |
//! | 0x10 | d | data, then zero padding to a multiple of 8 |
//!
//! Data: READ_* raw bytes (the prefix read before a failure), TRANSLATE a
//! [`WalkRecord`], CPU_STATE a [`CpuState`], INFO an [`Info`] record.

use crate::layout::{read_u32, read_u64};

/// Version of the frame format.
pub const FRAME_VERSION: u16 = 1;
/// Length of a frame header.
pub const FRAME_HEADER_LEN: usize = 32;
/// Length of the GCM tag that ends every frame.
pub const TAG_LEN: usize = 16;
/// Frame overhead: header plus tag.
pub const FRAME_OVERHEAD: usize = FRAME_HEADER_LEN + TAG_LEN;
/// Length of the IDS nonce.
pub const IDS_NONCE_LEN: usize = 16;
/// Length of the request body header.
pub const REQUEST_BODY_HEADER_LEN: usize = 24;
/// Length of one encoded op.
pub const OP_LEN: usize = 32;
/// Most ops one request may carry.
pub const MAX_OPS: usize = 1024;
/// Length of the reply body header.
pub const REPLY_BODY_HEADER_LEN: usize = 48;
/// Length of a result header.
pub const RESULT_HEADER_LEN: usize = 16;
/// Reply flag: the reply is plain and unauthenticated.
pub const REPLY_FLAG_UNAUTHENTICATED: u32 = 1;
/// Most paging levels a walk has (5-level paging).
pub const MAX_LEVELS: usize = 5;

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

fn truncated(what: &'static str, expected: usize, found: usize) -> WireError {
    WireError::Truncated {
        what,
        expected,
        found,
    }
}

/// The fixed 32-byte frame header.
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
}

impl FrameHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut h = [0u8; FRAME_HEADER_LEN];
        h[0..2].copy_from_slice(&FRAME_VERSION.to_le_bytes());
        h[2] = self.direction as u8;
        h[4..8].copy_from_slice(&self.body_len.to_le_bytes());
        h[8..16].copy_from_slice(&self.seq.to_le_bytes());
        h[16..24].copy_from_slice(&self.in_reply_to.to_le_bytes());
        h
    }

    /// Parses the first 32 bytes of `bytes` as a frame header. Checks the
    /// version, the direction byte and the reserved fields; not the length.
    pub fn parse(bytes: &[u8]) -> Result<Self, WireError> {
        let h = bytes.get(..FRAME_HEADER_LEN).ok_or(truncated(
            "frame header",
            FRAME_HEADER_LEN,
            bytes.len(),
        ))?;
        let version = u16::from_le_bytes([h[0], h[1]]);
        if version != FRAME_VERSION {
            return Err(WireError::BadVersion { found: version });
        }
        let direction = Direction::from_raw(h[2]).ok_or(WireError::BadDirection {
            expected: Direction::Request as u8,
            found: h[2],
        })?;
        if h[3] != 0 {
            return Err(WireError::Reserved {
                what: "frame flags",
                found: u64::from(h[3]),
            });
        }
        let reserved = read_u64(h, 24).unwrap_or(0);
        if reserved != 0 {
            return Err(WireError::Reserved {
                what: "frame header 0x18",
                found: reserved,
            });
        }
        Ok(Self {
            direction,
            body_len: read_u32(h, 4).unwrap_or(0),
            seq: read_u64(h, 8).unwrap_or(0),
            in_reply_to: read_u64(h, 16).unwrap_or(0),
        })
    }

    /// Total frame length (header, body, tag).
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

/// Which page-table root of a PTI pair to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Pti {
    /// CR3 as saved (or as given).
    AsIs = 0,
    /// Kernel page tables: clear bit 12 of CR3 (Linux PTI keeps the kernel
    /// PGD in the even page of an 8 KiB pair; with `CONFIG_PAGE_TABLE_ISOLATION`
    /// built in the PGD is always 8 KiB aligned, so this is right whether PTI
    /// is active or not. For a kernel built without it, use `AsIs`).
    Kernel = 1,
    /// User page tables: set bit 12 of CR3.
    User = 2,
}

/// The address space an op translates through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressSpace {
    /// CPU whose CR3 (unless `cr3` is given) and paging mode are used.
    pub cpu: u32,
    /// Explicit CR3 (page-table root), with the CPU's paging mode.
    pub cr3: Option<u64>,
    /// PTI choice applied to the CR3.
    pub pti: Pti,
}

impl AddressSpace {
    /// The kernel address space of `cpu` (PTI kernel half).
    pub fn kernel_of(cpu: u32) -> Self {
        Self {
            cpu,
            cr3: None,
            pti: Pti::Kernel,
        }
    }
}

/// Raw op kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum OpKind {
    /// Read guest-virtual memory.
    ReadVirt = 1,
    /// Read guest-physical memory.
    ReadPhys = 2,
    /// Translate a virtual address, returning the walk trace.
    Translate = 3,
    /// A CPU's save-state registers and MSRs.
    CpuState = 4,
    /// Agent facts: version, CPUs, RAM map, paging, SEV.
    Info = 5,
}

impl OpKind {
    /// Decodes a raw kind byte.
    pub fn from_raw(raw: u8) -> Option<Self> {
        Some(match raw {
            1 => Self::ReadVirt,
            2 => Self::ReadPhys,
            3 => Self::Translate,
            4 => Self::CpuState,
            5 => Self::Info,
            _ => return None,
        })
    }
}

/// One operation of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes at virtual `addr` in `space`.
    ReadVirt {
        /// Address space.
        space: AddressSpace,
        /// Virtual address.
        addr: u64,
        /// Length in bytes.
        len: u32,
    },
    /// Read `len` bytes at guest-physical `addr`.
    ReadPhys {
        /// Physical address.
        addr: u64,
        /// Length in bytes.
        len: u32,
    },
    /// Translate virtual `addr` in `space`.
    Translate {
        /// Address space.
        space: AddressSpace,
        /// Virtual address.
        addr: u64,
    },
    /// Registers and MSRs of `cpu`.
    CpuState {
        /// CPU index.
        cpu: u32,
    },
    /// Agent facts.
    Info,
}

const FLAG_EXPLICIT_CR3: u8 = 1;
const PTI_SHIFT: u8 = 1;
const PTI_MASK: u8 = 0b11 << PTI_SHIFT;

impl Op {
    /// The op's kind.
    pub fn kind(&self) -> OpKind {
        match self {
            Op::ReadVirt { .. } => OpKind::ReadVirt,
            Op::ReadPhys { .. } => OpKind::ReadPhys,
            Op::Translate { .. } => OpKind::Translate,
            Op::CpuState { .. } => OpKind::CpuState,
            Op::Info => OpKind::Info,
        }
    }

    /// Encodes the op into its 32-byte form.
    pub fn encode(&self) -> [u8; OP_LEN] {
        let mut b = [0u8; OP_LEN];
        b[0] = self.kind() as u8;
        let (space, addr, len, cpu) = match *self {
            Op::ReadVirt { space, addr, len } => (Some(space), addr, len, space.cpu),
            Op::ReadPhys { addr, len } => (None, addr, len, 0),
            Op::Translate { space, addr } => (Some(space), addr, 0, space.cpu),
            Op::CpuState { cpu } => (None, 0, 0, cpu),
            Op::Info => (None, 0, 0, 0),
        };
        if let Some(s) = space {
            let mut flags = (s.pti as u8) << PTI_SHIFT;
            if let Some(cr3) = s.cr3 {
                flags |= FLAG_EXPLICIT_CR3;
                b[8..16].copy_from_slice(&cr3.to_le_bytes());
            }
            b[1] = flags;
        }
        b[4..8].copy_from_slice(&cpu.to_le_bytes());
        b[16..24].copy_from_slice(&addr.to_le_bytes());
        b[24..28].copy_from_slice(&len.to_le_bytes());
        b
    }

    /// Decodes a 32-byte op. Unknown kinds, unknown flags and non-zero
    /// reserved or unused fields are rejected (the agent answers such an op
    /// with [`Status::BadRequest`]).
    pub fn decode(b: &[u8; OP_LEN]) -> Result<Self, WireError> {
        let kind = OpKind::from_raw(b[0]).ok_or(WireError::Reserved {
            what: "op kind (unknown)",
            found: u64::from(b[0]),
        })?;
        let flags = b[1];
        let cpu = read_u32(b, 4).unwrap_or(0);
        let cr3 = read_u64(b, 8).unwrap_or(0);
        let addr = read_u64(b, 16).unwrap_or(0);
        let len = read_u32(b, 24).unwrap_or(0);
        let reserved = u64::from(u16::from_le_bytes([b[2], b[3]]))
            | u64::from(read_u32(b, 28).unwrap_or(0)) << 16;
        if reserved != 0 {
            return Err(WireError::Reserved {
                what: "op reserved fields",
                found: reserved,
            });
        }
        let space = || -> Result<AddressSpace, WireError> {
            if flags & !(FLAG_EXPLICIT_CR3 | PTI_MASK) != 0 {
                return Err(WireError::Reserved {
                    what: "op flags",
                    found: u64::from(flags),
                });
            }
            let pti = match (flags & PTI_MASK) >> PTI_SHIFT {
                0 => Pti::AsIs,
                1 => Pti::Kernel,
                2 => Pti::User,
                _ => {
                    return Err(WireError::Reserved {
                        what: "op PTI choice",
                        found: u64::from(flags),
                    });
                }
            };
            let explicit = flags & FLAG_EXPLICIT_CR3 != 0;
            if !explicit && cr3 != 0 {
                return Err(WireError::Reserved {
                    what: "op CR3 without the explicit-CR3 flag",
                    found: cr3,
                });
            }
            Ok(AddressSpace {
                cpu,
                cr3: explicit.then_some(cr3),
                pti,
            })
        };
        let unused = |fields: u64| -> Result<(), WireError> {
            if fields != 0 {
                Err(WireError::Reserved {
                    what: "op field unused by this kind",
                    found: fields,
                })
            } else {
                Ok(())
            }
        };
        Ok(match kind {
            OpKind::ReadVirt => Op::ReadVirt {
                space: space()?,
                addr,
                len,
            },
            OpKind::Translate => {
                unused(u64::from(len))?;
                Op::Translate {
                    space: space()?,
                    addr,
                }
            }
            OpKind::ReadPhys => {
                unused(u64::from(flags) | cr3 | u64::from(cpu))?;
                Op::ReadPhys { addr, len }
            }
            OpKind::CpuState => {
                unused(u64::from(flags) | cr3 | addr | u64::from(len))?;
                Op::CpuState { cpu }
            }
            OpKind::Info => {
                unused(u64::from(flags) | cr3 | addr | u64::from(len) | u64::from(cpu))?;
                Op::Info
            }
        })
    }
}

/// A parsed request body (zero-copy view over the decrypted plaintext).
#[derive(Clone, Copy, Debug)]
pub struct RequestBody<'a> {
    /// The IDS nonce to echo.
    pub ids_nonce: [u8; IDS_NONCE_LEN],
    ops: &'a [u8],
}

impl<'a> RequestBody<'a> {
    /// Parses a request body; the op count must match the body length exactly.
    pub fn parse(body: &'a [u8]) -> Result<Self, WireError> {
        let head = body.get(..REQUEST_BODY_HEADER_LEN).ok_or(truncated(
            "request body",
            REQUEST_BODY_HEADER_LEN,
            body.len(),
        ))?;
        let mut ids_nonce = [0u8; IDS_NONCE_LEN];
        ids_nonce.copy_from_slice(&head[..IDS_NONCE_LEN]);
        let count = read_u32(head, 16).unwrap_or(0) as usize;
        let reserved = read_u32(head, 20).unwrap_or(0);
        if reserved != 0 {
            return Err(WireError::Reserved {
                what: "request body 0x14",
                found: u64::from(reserved),
            });
        }
        if count > MAX_OPS {
            return Err(WireError::BadLength {
                what: "op count at most MAX_OPS",
                expected: MAX_OPS,
                found: count,
            });
        }
        let ops = &body[REQUEST_BODY_HEADER_LEN..];
        if ops.len() != count * OP_LEN {
            return Err(WireError::BadLength {
                what: "ops length = 32 * op count",
                expected: count * OP_LEN,
                found: ops.len(),
            });
        }
        Ok(Self { ids_nonce, ops })
    }

    /// Number of ops.
    pub fn op_count(&self) -> usize {
        self.ops.len() / OP_LEN
    }

    /// The ops, each decoded (an undecodable op yields its raw kind and the
    /// error, so it can be answered with `BadRequest`).
    pub fn ops(&self) -> impl Iterator<Item = (u8, Result<Op, WireError>)> + 'a {
        self.ops.chunks_exact(OP_LEN).map(|c| {
            let mut a = [0u8; OP_LEN];
            a.copy_from_slice(c);
            (a[0], Op::decode(&a))
        })
    }
}

/// Length of a request body carrying `n` ops.
pub fn request_body_len(n: usize) -> usize {
    REQUEST_BODY_HEADER_LEN + n * OP_LEN
}

/// Encodes a request body (plaintext) into `out`; returns its length.
pub fn encode_request_body(
    ids_nonce: &[u8; IDS_NONCE_LEN],
    ops: &[Op],
    out: &mut [u8],
) -> Result<usize, WireError> {
    if ops.len() > MAX_OPS {
        return Err(WireError::BadLength {
            what: "op count at most MAX_OPS",
            expected: MAX_OPS,
            found: ops.len(),
        });
    }
    let len = request_body_len(ops.len());
    let out_len = out.len();
    let out = out.get_mut(..len).ok_or(WireError::NoSpace {
        expected: len,
        found: out_len,
    })?;
    out.fill(0);
    out[..IDS_NONCE_LEN].copy_from_slice(ids_nonce);
    out[16..20].copy_from_slice(&(ops.len() as u32).to_le_bytes());
    for (op, chunk) in ops
        .iter()
        .zip(out[REQUEST_BODY_HEADER_LEN..].chunks_exact_mut(OP_LEN))
    {
        chunk.copy_from_slice(&op.encode());
    }
    Ok(len)
}

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
        let head = body.get(..REPLY_BODY_HEADER_LEN).ok_or(truncated(
            "reply body",
            REPLY_BODY_HEADER_LEN,
            body.len(),
        ))?;
        let mut request_tag = [0u8; TAG_LEN];
        request_tag.copy_from_slice(&head[8..24]);
        let mut ids_nonce = [0u8; IDS_NONCE_LEN];
        ids_nonce.copy_from_slice(&head[24..40]);
        let count = read_u32(head, 40).unwrap_or(0) as usize;
        let flags = read_u32(head, 44).unwrap_or(0);
        if flags & !REPLY_FLAG_UNAUTHENTICATED != 0 {
            return Err(WireError::Reserved {
                what: "reply flags",
                found: u64::from(flags),
            });
        }
        let this = Self {
            request_seq: read_u64(head, 0).unwrap_or(0),
            request_tag,
            ids_nonce,
            flags,
            count,
            results: &body[REPLY_BODY_HEADER_LEN..],
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
    let h =
        b.get(..RESULT_HEADER_LEN)
            .ok_or(truncated("result header", RESULT_HEADER_LEN, b.len()))?;
    let status = Status::from_raw(h[1]).ok_or(WireError::Reserved {
        what: "result status (unknown)",
        found: u64::from(h[1]),
    })?;
    let data_len = read_u32(h, 4).unwrap_or(0) as usize;
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
            kind: h[0],
            status,
            level: h[2],
            aux: read_u64(h, 8).unwrap_or(0),
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
        head.fill(0);
        head[0..8].copy_from_slice(&request_seq.to_le_bytes());
        head[8..24].copy_from_slice(request_tag);
        head[24..40].copy_from_slice(ids_nonce);
        head[44..48].copy_from_slice(&flags.to_le_bytes());
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
        if self.is_full() {
            return false;
        }
        let room = max_data.min(self.data_room());
        let start = self.len;
        let data_start = start + RESULT_HEADER_LEN;
        let data = &mut self.buf[data_start..data_start + room];
        data.fill(0);
        let (status, level, aux, used) = fill(data);
        let used = used.min(room);
        let padded = used.div_ceil(8) * 8;
        // Zero the padding (and anything `fill` wrote past `used`).
        // `padded <= data_room()` because the room is a multiple of 8.
        self.buf[data_start + used..data_start + room.max(padded)].fill(0);
        let h = &mut self.buf[start..data_start];
        h.fill(0);
        h[0] = kind;
        h[1] = status as u8;
        h[2] = level;
        h[4..8].copy_from_slice(&(used as u32).to_le_bytes());
        h[8..16].copy_from_slice(&aux.to_le_bytes());
        self.len = data_start + padded;
        self.count += 1;
        true
    }

    /// Finishes the body; returns its length.
    pub fn finish(self) -> usize {
        self.buf[40..44].copy_from_slice(&self.count.to_le_bytes());
        self.len
    }
}

/// Decoded TRANSLATE data: the page walk and its trace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalkRecord {
    /// Virtual address translated.
    pub va: u64,
    /// Physical address (valid if the status is Ok).
    pub pa: u64,
    /// Paging levels of the mode walked (4 or 5).
    pub levels: u8,
    /// Entries read (valid prefix of `entries`).
    pub depth: u8,
    /// log2 of the page size mapped (12, 21, 30), 0 if the walk failed.
    pub page_shift: u8,
    /// (physical address of the entry, entry value) per level, top first.
    pub entries: [(u64, u64); MAX_LEVELS],
}

/// Encoded size of a [`WalkRecord`].
pub const WALK_RECORD_LEN: usize = 24 + 16 * MAX_LEVELS;

impl WalkRecord {
    /// Encodes the record.
    pub fn encode(&self, out: &mut [u8; WALK_RECORD_LEN]) {
        out.fill(0);
        out[0..8].copy_from_slice(&self.va.to_le_bytes());
        out[8..16].copy_from_slice(&self.pa.to_le_bytes());
        out[16] = self.levels;
        out[17] = self.depth;
        out[18] = self.page_shift;
        for (i, (a, v)) in self.entries.iter().enumerate() {
            out[24 + 16 * i..32 + 16 * i].copy_from_slice(&a.to_le_bytes());
            out[32 + 16 * i..40 + 16 * i].copy_from_slice(&v.to_le_bytes());
        }
    }

    /// Decodes a record.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        if b.len() != WALK_RECORD_LEN {
            return Err(WireError::BadLength {
                what: "walk record length",
                expected: WALK_RECORD_LEN,
                found: b.len(),
            });
        }
        let mut r = WalkRecord {
            va: read_u64(b, 0).unwrap_or(0),
            pa: read_u64(b, 8).unwrap_or(0),
            levels: b[16],
            depth: b[17],
            page_shift: b[18],
            ..Default::default()
        };
        if usize::from(r.depth) > MAX_LEVELS {
            return Err(WireError::BadLength {
                what: "walk depth at most 5",
                expected: MAX_LEVELS,
                found: usize::from(r.depth),
            });
        }
        for (i, e) in r.entries.iter_mut().enumerate() {
            *e = (
                read_u64(b, 24 + 16 * i).unwrap_or(0),
                read_u64(b, 32 + 16 * i).unwrap_or(0),
            );
        }
        Ok(r)
    }

    /// The entries actually read.
    pub fn trace(&self) -> &[(u64, u64)] {
        &self.entries[..usize::from(self.depth).min(MAX_LEVELS)]
    }
}

macro_rules! cpu_state {
    ($($(#[$m:meta])* $f:ident,)*) => {
        /// A CPU's state as the agent saw it in SMM: the save-state registers
        /// plus the MSRs the CPU read itself. Encoded as consecutive u64 LE
        /// values in field order.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct CpuState { $($(#[$m])* pub $f: u64,)* }

        impl CpuState {
            /// Number of u64 fields.
            pub const FIELDS: usize = [$(stringify!($f)),*].len();
            /// Encoded length in bytes.
            pub const LEN: usize = Self::FIELDS * 8;

            /// Encodes into exactly [`Self::LEN`] bytes.
            pub fn encode(&self, out: &mut [u8; Self::LEN]) {
                let vals = [$(self.$f),*];
                for (c, v) in out.chunks_exact_mut(8).zip(vals) {
                    c.copy_from_slice(&v.to_le_bytes());
                }
            }

            /// Decodes from exactly [`Self::LEN`] bytes.
            pub fn decode(b: &[u8]) -> Result<Self, WireError> {
                if b.len() != Self::LEN {
                    return Err(WireError::BadLength {
                        what: "CPU state length",
                        expected: Self::LEN,
                        found: b.len(),
                    });
                }
                let mut i = 0usize;
                let mut next = || {
                    let v = read_u64(b, i * 8).unwrap_or(0);
                    i += 1;
                    v
                };
                Ok(Self { $($f: next(),)* })
            }
        }
    };
}

cpu_state! {
    rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp,
    r8, r9, r10, r11, r12, r13, r14, r15,
    rip, rflags,
    cr0, cr3, cr4, efer, dr6, dr7,
    gdtr_base, gdtr_limit, idtr_base, idtr_limit,
    cs_selector, ss_selector, ds_selector, es_selector, fs_selector, gs_selector,
    /// FS base from the save state's segment descriptor cache.
    fs_seg_base,
    /// GS base from the save state's segment descriptor cache.
    gs_seg_base,
    /// SMBASE of this CPU.
    smbase,
    /// SMM revision id.
    smm_revision,
    /// 1 if the MSR fields below were read by the CPU itself in SMM.
    msrs_valid,
    msr_lstar, msr_star, msr_cstar, msr_kernel_gs_base, msr_fs_base, msr_gs_base,
    msr_sysenter_eip,
}

impl CpuState {
    /// Paging levels this CPU uses: 4 or 5 in long mode with paging, 0 otherwise.
    pub fn paging_levels(&self) -> u8 {
        let long_mode = self.efer & (1 << 10) != 0 && self.cr0 & (1 << 31) != 0;
        if !long_mode {
            0
        } else if self.cr4 & (1 << 12) != 0 {
            5
        } else {
            4
        }
    }

    /// CR4.PCIDE.
    pub fn pcid(&self) -> bool {
        self.cr4 & (1 << 17) != 0
    }
}

/// SEV flag in [`Info::sev_flags`]: memory encryption is active.
pub const SEV_ACTIVE: u32 = 1;

/// One RAM range in [`Info`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RamRange {
    /// First byte.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Fixed part of the INFO record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InfoHeader {
    /// Agent version (major << 16 | minor).
    pub agent_version: u32,
    /// CPUs the agent holds snapshots for.
    pub cpu_count: u32,
    /// [`SEV_ACTIVE`], ...
    pub sev_flags: u32,
    /// Position of the SEV C-bit (0 if none).
    pub c_bit: u32,
    /// RAM ranges that follow.
    pub ram_range_count: u32,
    /// Largest data length one READ can return with this mailbox.
    pub max_read: u32,
    /// SMRAM (TSEG) base.
    pub smram_base: u64,
    /// SMRAM size.
    pub smram_size: u64,
}

/// Fixed INFO header length.
pub const INFO_HEADER_LEN: usize = 40;
/// Bytes per CPU entry in INFO.
pub const INFO_CPU_LEN: usize = 8;
/// INFO CPU flag: PCID enabled.
pub const INFO_CPU_PCID: u8 = 1;

/// Per-CPU entry of INFO.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InfoCpu {
    /// Paging levels (0 = not in long mode with paging, 4, 5).
    pub paging_levels: u8,
    /// [`INFO_CPU_PCID`].
    pub flags: u8,
}

/// INFO record (zero-copy over the result data).
#[derive(Clone, Copy, Debug)]
pub struct Info<'a> {
    /// Fixed part.
    pub header: InfoHeader,
    ranges: &'a [u8],
    cpus: &'a [u8],
}

/// Length of an INFO record with `ranges` RAM ranges and `cpus` CPUs.
pub fn info_len(ranges: usize, cpus: usize) -> usize {
    INFO_HEADER_LEN + 16 * ranges + INFO_CPU_LEN * cpus
}

/// Encodes an INFO record into `out`; returns the length or `NoSpace`.
pub fn encode_info(
    header: &InfoHeader,
    ranges: impl ExactSizeIterator<Item = RamRange>,
    cpus: impl ExactSizeIterator<Item = InfoCpu>,
    out: &mut [u8],
) -> Result<usize, WireError> {
    let len = info_len(ranges.len(), cpus.len());
    let found = out.len();
    let out = out.get_mut(..len).ok_or(WireError::NoSpace {
        expected: len,
        found,
    })?;
    out.fill(0);
    let h = header;
    out[0..4].copy_from_slice(&h.agent_version.to_le_bytes());
    out[4..8].copy_from_slice(&(cpus.len() as u32).to_le_bytes());
    out[8..12].copy_from_slice(&h.sev_flags.to_le_bytes());
    out[12..16].copy_from_slice(&h.c_bit.to_le_bytes());
    out[16..20].copy_from_slice(&(ranges.len() as u32).to_le_bytes());
    out[20..24].copy_from_slice(&h.max_read.to_le_bytes());
    out[24..32].copy_from_slice(&h.smram_base.to_le_bytes());
    out[32..40].copy_from_slice(&h.smram_size.to_le_bytes());
    let mut off = INFO_HEADER_LEN;
    for r in ranges {
        out[off..off + 8].copy_from_slice(&r.base.to_le_bytes());
        out[off + 8..off + 16].copy_from_slice(&r.len.to_le_bytes());
        off += 16;
    }
    for c in cpus {
        out[off] = c.paging_levels;
        out[off + 1] = c.flags;
        off += INFO_CPU_LEN;
    }
    Ok(len)
}

impl<'a> Info<'a> {
    /// Parses an INFO record.
    pub fn parse(b: &'a [u8]) -> Result<Self, WireError> {
        let h =
            b.get(..INFO_HEADER_LEN)
                .ok_or(truncated("INFO record", INFO_HEADER_LEN, b.len()))?;
        let header = InfoHeader {
            agent_version: read_u32(h, 0).unwrap_or(0),
            cpu_count: read_u32(h, 4).unwrap_or(0),
            sev_flags: read_u32(h, 8).unwrap_or(0),
            c_bit: read_u32(h, 12).unwrap_or(0),
            ram_range_count: read_u32(h, 16).unwrap_or(0),
            max_read: read_u32(h, 20).unwrap_or(0),
            smram_base: read_u64(h, 24).unwrap_or(0),
            smram_size: read_u64(h, 32).unwrap_or(0),
        };
        let nr = header.ram_range_count as usize;
        let nc = header.cpu_count as usize;
        let need = nr
            .checked_mul(16)
            .and_then(|r| nc.checked_mul(INFO_CPU_LEN)?.checked_add(r))
            .and_then(|v| v.checked_add(INFO_HEADER_LEN));
        if need != Some(b.len()) {
            return Err(WireError::BadLength {
                what: "INFO length",
                expected: need.unwrap_or(usize::MAX),
                found: b.len(),
            });
        }
        let ranges = &b[INFO_HEADER_LEN..INFO_HEADER_LEN + 16 * nr];
        let cpus = &b[INFO_HEADER_LEN + 16 * nr..];
        Ok(Self {
            header,
            ranges,
            cpus,
        })
    }

    /// RAM ranges.
    pub fn ram_ranges(&self) -> impl Iterator<Item = RamRange> + 'a {
        self.ranges.chunks_exact(16).map(|c| RamRange {
            base: read_u64(c, 0).unwrap_or(0),
            len: read_u64(c, 8).unwrap_or(0),
        })
    }

    /// Per-CPU paging facts.
    pub fn cpus(&self) -> impl Iterator<Item = InfoCpu> + 'a {
        self.cpus.chunks_exact(INFO_CPU_LEN).map(|c| InfoCpu {
            paging_levels: c[0],
            flags: c[1],
        })
    }
}
