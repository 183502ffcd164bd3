//! The request body (plaintext inside a request frame) and its ops.
//!
//! # Request body
//! | offset | size | field |
//! |---|---|---|
//! | 0x00 | 16 | IDS nonce, fresh per request, echoed in the reply |
//! | 0x10 | 4 | op count `k` (at most [`MAX_OPS`]) |
//! | 0x14 | 4 | reserved, zero |
//! | 0x18 | 32*k | ops, see [`Op`] |
//!
//! # Op (32 bytes, [`OpLe`])
//! | offset | size | field |
//! |---|---|---|
//! | 0x00 | 1 | kind ([`OpKind`]) |
//! | 0x01 | 1 | flags: bit 0 explicit CR3; bits 1..2 PTI choice ([`Pti`]); others zero (FIELD: bit 0 = through a pointer) |
//! | 0x02 | 2 | zero (WALK_LIST: link offset inside the container) |
//! | 0x04 | 4 | CPU index (READ_VIRT, TRANSLATE, WALK_LIST: whose CR3 and paging mode; CPU_STATE) |
//! | 0x08 | 8 | explicit CR3 (if flag bit 0; FIELD: offset added to the pointer) |
//! | 0x10 | 8 | address (virtual or physical; WALK_LIST: the list head; FIELD: offset in the container) |
//! | 0x18 | 4 | length (READ_VIRT, READ_PHYS, FIELD; WALK_LIST: most entries) |
//! | 0x1C | 4 | zero (WALK_LIST: number of FIELD ops that follow) |
//!
//! WALK_LIST and its FIELD ops are described in [`crate::walk`].

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::walk::{Field, MAX_FIELD_LEN, MAX_WALK_ENTRIES, MAX_WALK_FIELDS};
use crate::wire::{WireError, truncated};

/// Length of the IDS nonce in bytes.
pub const IDS_NONCE_LEN: usize = 16;
/// Length of the request body header in bytes.
pub const REQUEST_BODY_HEADER_LEN: usize = size_of::<RequestHeaderLe>();
/// Length of one encoded op in bytes.
pub const OP_LEN: usize = size_of::<OpLe>();
/// Most ops one request may carry.
pub const MAX_OPS: usize = 1024;

/// The request body header as it lies in the decrypted body.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RequestHeaderLe {
    /// Fresh random bytes, echoed in the reply.
    pub ids_nonce: [u8; IDS_NONCE_LEN],
    /// Number of ops that follow.
    pub op_count: U32,
    /// Zero.
    pub reserved: U32,
}

/// One op as it lies in the request body.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct OpLe {
    /// Raw [`OpKind`].
    pub kind: u8,
    /// Bit 0: explicit CR3; bits 1..2: [`Pti`] (FIELD: bit 0 = through a
    /// pointer).
    pub flags: u8,
    /// Zero (WALK_LIST: link offset).
    pub reserved0: U16,
    /// CPU index.
    pub cpu: U32,
    /// Explicit CR3 (if flag bit 0), else zero.
    pub cr3: U64,
    /// Virtual or physical address.
    pub addr: U64,
    /// Length in bytes (WALK_LIST: most entries).
    pub len: U32,
    /// Zero (WALK_LIST: FIELD ops that follow).
    pub reserved1: U32,
}

const _: () = assert!(REQUEST_BODY_HEADER_LEN == 24 && OP_LEN == 32);

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
    /// Follow a `list_head` chain, copying fields of each container
    /// ([`crate::walk`]).
    WalkList = 6,
    /// One field of the WALK_LIST op before it.
    Field = 7,
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
            6 => Self::WalkList,
            7 => Self::Field,
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
    /// Walk the circular list whose head is at `head` in `space`; the next
    /// `field_count` ops are its [`Op::Field`]s ([`crate::walk`]).
    WalkList {
        /// Address space.
        space: AddressSpace,
        /// Address of the list head (`struct list_head`).
        head: u64,
        /// Offset of the link inside each container, bytes.
        link_offset: u16,
        /// Most entries visited, 1..=[`MAX_WALK_ENTRIES`].
        max_entries: u32,
        /// FIELD ops that follow, 0..=[`MAX_WALK_FIELDS`].
        field_count: u32,
    },
    /// One field copied from each container of the walk before it.
    Field(Field),
}

const FLAG_EXPLICIT_CR3: u8 = 1;
const FLAG_FIELD_DEREF: u8 = 1;
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
            Op::WalkList { .. } => OpKind::WalkList,
            Op::Field(_) => OpKind::Field,
        }
    }

    /// Encodes the op into its 32-byte form.
    pub fn encode(&self) -> [u8; OP_LEN] {
        let (space, addr, len, cpu) = match *self {
            Op::ReadVirt { space, addr, len } => (Some(space), addr, len, space.cpu),
            Op::ReadPhys { addr, len } => (None, addr, len, 0),
            Op::Translate { space, addr } => (Some(space), addr, 0, space.cpu),
            Op::CpuState { cpu } => (None, 0, 0, cpu),
            Op::Info => (None, 0, 0, 0),
            Op::WalkList {
                space,
                head,
                max_entries,
                ..
            } => (Some(space), head, max_entries, space.cpu),
            Op::Field(f) => (None, u64::from(f.offset), f.len, 0),
        };
        let mut le = OpLe::new_zeroed();
        le.kind = self.kind() as u8;
        match *self {
            Op::WalkList {
                link_offset,
                field_count,
                ..
            } => {
                le.reserved0 = link_offset.into();
                le.reserved1 = field_count.into();
            }
            Op::Field(Field { deref: Some(d), .. }) => {
                le.flags = FLAG_FIELD_DEREF;
                le.cr3 = u64::from(d).into();
            }
            _ => {}
        }
        if let Some(s) = space {
            le.flags = (s.pti as u8) << PTI_SHIFT;
            if let Some(cr3) = s.cr3 {
                le.flags |= FLAG_EXPLICIT_CR3;
                le.cr3 = cr3.into();
            }
        }
        le.cpu = cpu.into();
        le.addr = addr.into();
        le.len = len.into();
        let mut b = [0u8; OP_LEN];
        b.copy_from_slice(le.as_bytes());
        b
    }

    /// Decodes a 32-byte op. Unknown kinds, unknown flags and non-zero
    /// reserved or unused fields are rejected (the agent answers such an op
    /// with `Status::BadRequest`).
    pub fn decode(b: &[u8; OP_LEN]) -> Result<Self, WireError> {
        let le = OpLe::read_from_bytes(b).map_err(|_| truncated("op", OP_LEN, b.len()))?;
        let kind = OpKind::from_raw(le.kind).ok_or(WireError::Reserved {
            what: "op kind (unknown)",
            found: u64::from(le.kind),
        })?;
        let flags = le.flags;
        let cpu = le.cpu.get();
        let cr3 = le.cr3.get();
        let addr = le.addr.get();
        let len = le.len.get();
        let reserved = u64::from(le.reserved0.get()) | u64::from(le.reserved1.get()) << 16;
        if reserved != 0 && kind != OpKind::WalkList {
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
            OpKind::WalkList => {
                let field_count = le.reserved1.get();
                if field_count as usize > MAX_WALK_FIELDS {
                    return Err(WireError::BadLength {
                        what: "WALK_LIST field count at most MAX_WALK_FIELDS",
                        expected: MAX_WALK_FIELDS,
                        found: field_count as usize,
                    });
                }
                if !(1..=MAX_WALK_ENTRIES).contains(&len) {
                    return Err(WireError::BadLength {
                        what: "WALK_LIST entries 1..=MAX_WALK_ENTRIES",
                        expected: MAX_WALK_ENTRIES as usize,
                        found: len as usize,
                    });
                }
                Op::WalkList {
                    space: space()?,
                    head: addr,
                    link_offset: le.reserved0.get(),
                    max_entries: len,
                    field_count,
                }
            }
            OpKind::Field => {
                if flags & !FLAG_FIELD_DEREF != 0 {
                    return Err(WireError::Reserved {
                        what: "FIELD flags",
                        found: u64::from(flags),
                    });
                }
                let deref = flags & FLAG_FIELD_DEREF != 0;
                unused(u64::from(cpu) | if deref { 0 } else { cr3 })?;
                let (Ok(offset), Ok(ptr_off)) = (u32::try_from(addr), u32::try_from(cr3)) else {
                    return Err(WireError::Reserved {
                        what: "FIELD offsets above 32 bits",
                        found: addr | cr3,
                    });
                };
                if !(1..=MAX_FIELD_LEN).contains(&len) {
                    return Err(WireError::BadLength {
                        what: "FIELD length 1..=MAX_FIELD_LEN",
                        expected: MAX_FIELD_LEN as usize,
                        found: len as usize,
                    });
                }
                Op::Field(Field {
                    offset,
                    len,
                    deref: deref.then_some(ptr_off),
                })
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
        let (head, ops) = RequestHeaderLe::read_from_prefix(body)
            .map_err(|_| truncated("request body", REQUEST_BODY_HEADER_LEN, body.len()))?;
        let count = head.op_count.get() as usize;
        if head.reserved.get() != 0 {
            return Err(WireError::Reserved {
                what: "request body 0x14",
                found: u64::from(head.reserved.get()),
            });
        }
        if count > MAX_OPS {
            return Err(WireError::BadLength {
                what: "op count at most MAX_OPS",
                expected: MAX_OPS,
                found: count,
            });
        }
        if ops.len() != count * OP_LEN {
            return Err(WireError::BadLength {
                what: "ops length = 32 * op count",
                expected: count * OP_LEN,
                found: ops.len(),
            });
        }
        Ok(Self {
            ids_nonce: head.ids_nonce,
            ops,
        })
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
    let head = RequestHeaderLe {
        ids_nonce: *ids_nonce,
        op_count: (ops.len() as u32).into(),
        reserved: 0.into(),
    };
    out[..REQUEST_BODY_HEADER_LEN].copy_from_slice(head.as_bytes());
    for (op, chunk) in ops
        .iter()
        .zip(out[REQUEST_BODY_HEADER_LEN..].chunks_exact_mut(OP_LEN))
    {
        chunk.copy_from_slice(&op.encode());
    }
    Ok(len)
}
