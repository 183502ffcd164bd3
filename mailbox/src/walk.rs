//! WALK_LIST: following a guest `struct list_head` chain inside one request,
//! so that a list whose every hop depends on the previous one (the task
//! list, the module list) costs one SMI and is one consistent snapshot.
//!
//! The walk is generic: it knows doubly linked circular lists
//! (`include/linux/types.h` `struct list_head { next, prev }`, `next` first)
//! and nothing else of Linux. The IDS says where the head is, where the
//! link lies inside the container, and which fields of each container to
//! copy, each either in place or through one pointer (`task->cred->uid`).
//!
//! # Request
//! A WALK_LIST op ([`crate::request::Op::WalkList`]) followed by exactly
//! `field_count` FIELD ops ([`crate::request::Op::Field`]), which belong to
//! it. Every op gets its own result; a FIELD's result is empty.
//!
//! # Result data: one entry per container visited, in list order
//! | offset | size | field |
//! |---|---|---|
//! | 0x00 | 8 | container address (`next` − link offset) |
//! | 0x08 | 8 | fault mask: bit `i` set if field `i` could not be read (its bytes are zero) |
//! | 0x10 | Σ len | the fields, in op order, unpadded |
//! | .. | .. | zero padding to a multiple of 8 ([`entry_len`]) |
//!
//! The result's `aux` is the number of entries. Its status is `Ok` when the
//! walk came back to the head; `TooLarge` when it stopped at the entry
//! limit or the reply's room first; otherwise the status of the `next`
//! pointer that could not be read (with its paging level), after the
//! entries read before it. A list that loops without passing the head stops
//! at the entry limit: the IDS sees the repeat.
//!
//! Bounds (each checked when the op is decoded, so an SMI's work is bounded
//! whatever the guest's pointers say): at most [`MAX_WALK_ENTRIES`]
//! entries, [`MAX_WALK_FIELDS`] fields of at most [`MAX_FIELD_LEN`] bytes.

use crate::reply::Status;

/// Most entries one WALK_LIST op visits.
pub const MAX_WALK_ENTRIES: u32 = 8192;
/// Most FIELD ops one WALK_LIST op takes.
pub const MAX_WALK_FIELDS: usize = 16;
/// Longest FIELD in bytes.
pub const MAX_FIELD_LEN: u32 = 256;
/// Bytes of an entry before its fields (container address, fault mask).
pub const WALK_ENTRY_HEADER_LEN: usize = 16;
/// The agent's work budget per request (per SMI), in units of one
/// page-table entry or one memory chunk (at most a page) read, shared by
/// every op of the request: it bounds the time in SMM whatever the guest's
/// pointers say (a full 1 MiB READ_VIRT costs about 1,300 units; a task
/// list of 1,000 tasks with scattered fields about 30,000). An op that
/// meets it ends with `Status::WorkLimit`.
pub const WORK_BUDGET: u32 = 65_536;
/// The first agent version (INFO `agent_version`, major << 16 | minor)
/// with WALK_LIST, FIELD and `Status::WorkLimit`.
pub const WALK_LIST_AGENT_VERSION: u32 = 1 << 16 | 2;

/// One field copied from each container.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Field {
    /// Offset inside the container, bytes.
    pub offset: u32,
    /// Length in bytes, 1..=[`MAX_FIELD_LEN`].
    pub len: u32,
    /// Read through a pointer: the 8-byte pointer at `offset` is read, and
    /// the field is `len` bytes at pointer + this offset.
    pub deref: Option<u32>,
}

/// What one WALK_LIST op asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalkSpec<'a> {
    /// Address of the list head (a `struct list_head`; its `next` is the
    /// first entry's link). The walk ends when a `next` returns to it.
    pub head: u64,
    /// Offset of the link (`struct list_head`) inside each container.
    pub link_offset: u16,
    /// Most entries to visit, 1..=[`MAX_WALK_ENTRIES`].
    pub max_entries: u32,
    /// The fields copied from each container.
    pub fields: &'a [Field],
}

impl WalkSpec<'_> {
    /// Checks the bounds the agent enforces (the decoder refuses ops out of
    /// them): 1..=[`MAX_WALK_ENTRIES`] entries, at most [`MAX_WALK_FIELDS`]
    /// fields of 1..=[`MAX_FIELD_LEN`] bytes. Backends that walk with their
    /// own reads check the same.
    pub fn check(&self) -> Result<(), &'static str> {
        if !(1..=MAX_WALK_ENTRIES).contains(&self.max_entries) {
            return Err("max_entries must be 1..=MAX_WALK_ENTRIES");
        }
        if self.fields.len() > MAX_WALK_FIELDS {
            return Err("at most MAX_WALK_FIELDS fields");
        }
        if self
            .fields
            .iter()
            .any(|f| !(1..=MAX_FIELD_LEN).contains(&f.len))
        {
            return Err("field lengths must be 1..=MAX_FIELD_LEN");
        }
        Ok(())
    }
}

/// Bytes of one entry of a walk with `fields` (header, fields, padding).
pub fn entry_len(fields: &[Field]) -> usize {
    let sum: usize = fields.iter().map(|f| f.len as usize).sum();
    (WALK_ENTRY_HEADER_LEN + sum).div_ceil(8) * 8
}

/// How a walk ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalkOutcome {
    /// `Ok`, `TooLarge`, or why a `next` could not be read.
    pub status: Status,
    /// Paging level of a failed `next` read, else 0.
    pub level: u8,
    /// Entries written.
    pub entries: u32,
    /// Bytes of `out` used (`entries` × [`entry_len`]).
    pub used: usize,
}

/// Reads guest memory for a walk (the agent reads through the page tables
/// of the op's address space; an IDS backend through its own reads).
pub trait WalkReader {
    /// Fills `buf` from `addr`, or says why not (status, paging level).
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), (Status, u8)>;
}

fn read_u64<R: WalkReader>(r: &mut R, addr: u64) -> Result<u64, (Status, u8)> {
    let mut b = [0u8; 8];
    r.read(addr, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Walks the list of `spec` with `r`, writing entries into `out` (every
/// byte of the entries written; the rest of `out` untouched). Makes at most
/// 1 + `max_entries` × (1 + 2 × fields) reads; `out` bounds the entries
/// too. A spec that fails [`WalkSpec::check`] is answered `BadRequest`.
pub fn walk<R: WalkReader>(r: &mut R, spec: &WalkSpec<'_>, out: &mut [u8]) -> WalkOutcome {
    if spec.check().is_err() {
        return WalkOutcome {
            status: Status::BadRequest,
            level: 0,
            entries: 0,
            used: 0,
        };
    }
    let elen = entry_len(spec.fields);
    let mut entries = 0u32;
    let stop = |status: Status, level: u8, entries: u32| WalkOutcome {
        status,
        level,
        entries,
        used: entries as usize * elen,
    };
    let mut next = match read_u64(r, spec.head) {
        Ok(n) => n,
        Err((st, level)) => return stop(st, level, 0),
    };
    loop {
        if next == spec.head {
            return stop(Status::Ok, 0, entries);
        }
        let at = entries as usize * elen;
        if entries >= spec.max_entries || at + elen > out.len() {
            return stop(Status::TooLarge, 0, entries);
        }
        let container = next.wrapping_sub(u64::from(spec.link_offset));
        let rec = &mut out[at..at + elen];
        rec.fill(0);
        rec[..8].copy_from_slice(&container.to_le_bytes());
        let mut faults = 0u64;
        let mut pos = WALK_ENTRY_HEADER_LEN;
        for (i, f) in spec.fields.iter().enumerate() {
            let len = f.len as usize;
            let dst = &mut rec[pos..pos + len];
            let at = container.wrapping_add(u64::from(f.offset));
            let res = match f.deref {
                None => r.read(at, dst),
                Some(d) => read_u64(r, at).and_then(|p| r.read(p.wrapping_add(u64::from(d)), dst)),
            };
            match res {
                Ok(()) => {}
                // The request's budget is spent: this entry is not whole.
                Err((Status::WorkLimit, _)) => return stop(Status::WorkLimit, 0, entries),
                Err(_) => {
                    dst.fill(0);
                    faults |= 1 << i;
                }
            }
            pos += len;
        }
        rec[8..16].copy_from_slice(&faults.to_le_bytes());
        entries += 1;
        next = match read_u64(r, next) {
            Ok(n) => n,
            Err((st, level)) => return stop(st, level, entries),
        };
    }
}

/// One entry of a walk result, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    /// The container's address.
    pub container: u64,
    /// Bit `i`: field `i` could not be read.
    pub faults: u64,
    /// The fields' bytes, in order, unpadded.
    pub fields: &'a [u8],
}

/// The entries of a walk result's data, for a walk with `fields`. Data whose
/// length is not a whole number of entries yields the whole ones only.
pub fn entries<'a>(data: &'a [u8], fields: &[Field]) -> impl Iterator<Item = Entry<'a>> + 'a {
    let elen = entry_len(fields);
    let sum: usize = fields.iter().map(|f| f.len as usize).sum();
    data.chunks_exact(elen).map(move |e| Entry {
        container: u64::from_le_bytes(e[..8].try_into().unwrap_or([0; 8])),
        faults: u64::from_le_bytes(e[8..16].try_into().unwrap_or([0; 8])),
        fields: &e[WALK_ENTRY_HEADER_LEN..WALK_ENTRY_HEADER_LEN + sum],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;
    use std::vec::Vec;

    /// Memory as a byte array at base 0x1000; reads outside fault.
    struct Mem(Vec<u8>);
    const BASE: u64 = 0x1000;
    impl WalkReader for Mem {
        fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), (Status, u8)> {
            let off = addr.checked_sub(BASE).ok_or((Status::NotPresent, 1))? as usize;
            let src = self
                .0
                .get(off..off + buf.len())
                .ok_or((Status::NotPresent, 1))?;
            buf.copy_from_slice(src);
            Ok(())
        }
    }

    fn put(m: &mut [u8], addr: u64, v: u64) {
        let o = (addr - BASE) as usize;
        m[o..o + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// A head at BASE and `n` containers of 0x100 bytes at BASE + 0x100 *
    /// (i + 1), link at +0x10, id at +0x20, pointer at +0x30 to a 4-byte
    /// value at BASE + 0x8000 + 8 * i.
    fn list(n: u64) -> Mem {
        let mut m = vec![0u8; 0x10000];
        let link = |i: u64| BASE + 0x100 * (i + 1) + 0x10;
        put(&mut m, BASE, if n == 0 { BASE } else { link(0) });
        for i in 0..n {
            let c = BASE + 0x100 * (i + 1);
            put(&mut m, link(i), if i + 1 == n { BASE } else { link(i + 1) });
            put(&mut m, c + 0x20, 100 + i);
            put(&mut m, c + 0x30, BASE + 0x8000 + 8 * i);
            put(&mut m, BASE + 0x8000 + 8 * i + 4, 7000 + i);
        }
        Mem(m)
    }

    const FIELDS: [Field; 2] = [
        Field {
            offset: 0x20,
            len: 4,
            deref: None,
        },
        Field {
            offset: 0x30,
            len: 4,
            deref: Some(4),
        },
    ];

    fn spec(max: u32) -> WalkSpec<'static> {
        WalkSpec {
            head: BASE,
            link_offset: 0x10,
            max_entries: max,
            fields: &FIELDS,
        }
    }

    fn u32s(e: &Entry<'_>) -> (u32, u32) {
        (
            u32::from_le_bytes(e.fields[..4].try_into().unwrap()),
            u32::from_le_bytes(e.fields[4..8].try_into().unwrap()),
        )
    }

    #[test]
    fn walks_to_the_head_with_fields_in_place_and_through_pointers() {
        let mut m = list(5);
        let mut out = vec![0u8; 4096];
        let o = walk(&mut m, &spec(100), &mut out);
        assert_eq!((o.status, o.entries), (Status::Ok, 5));
        assert_eq!(o.used, 5 * entry_len(&FIELDS));
        let es: Vec<_> = entries(&out[..o.used], &FIELDS).collect();
        for (i, e) in es.iter().enumerate() {
            let i = i as u64;
            assert_eq!(e.container, BASE + 0x100 * (i + 1));
            assert_eq!(e.faults, 0);
            assert_eq!(u32s(e), (100 + i as u32, 7000 + i as u32));
        }
    }

    #[test]
    fn an_empty_list_has_no_entries() {
        let mut m = list(0);
        let mut out = vec![0u8; 64];
        let o = walk(&mut m, &spec(10), &mut out);
        assert_eq!((o.status, o.entries, o.used), (Status::Ok, 0, 0));
    }

    #[test]
    fn a_bad_field_pointer_is_a_fault_bit_not_the_end() {
        let mut m = list(3);
        put(&mut m.0, BASE + 0x200 + 0x30, 0xdead_0000);
        let mut out = vec![0u8; 4096];
        let o = walk(&mut m, &spec(100), &mut out);
        assert_eq!((o.status, o.entries), (Status::Ok, 3));
        let es: Vec<_> = entries(&out[..o.used], &FIELDS).collect();
        assert_eq!(es[1].faults, 0b10);
        assert_eq!(u32s(&es[1]), (101, 0));
        assert_eq!(es[2].faults, 0);
    }

    #[test]
    fn a_broken_next_stops_with_its_status_after_the_entries_before() {
        let mut m = list(4);
        put(&mut m.0, BASE + 0x200 + 0x10, 0x9999_0000);
        let mut out = vec![0u8; 4096];
        let o = walk(&mut m, &spec(100), &mut out);
        // Entries 0 and 1, then 0x9999_0000 - 0x10 as a container whose
        // fields fault, then its `next` faults.
        assert_eq!(o.status, Status::NotPresent);
        assert_eq!(o.entries, 3);
        let es: Vec<_> = entries(&out[..o.used], &FIELDS).collect();
        assert_eq!(es[2].container, 0x9999_0000 - 0x10);
        assert_eq!(es[2].faults, 0b11);
    }

    #[test]
    fn a_loop_that_misses_the_head_stops_at_the_entry_limit() {
        let mut m = list(4);
        // Last entry points back at the second.
        put(&mut m.0, BASE + 0x400 + 0x10, BASE + 0x200 + 0x10);
        let mut out = vec![0u8; 1 << 16];
        let o = walk(&mut m, &spec(50), &mut out);
        assert_eq!((o.status, o.entries), (Status::TooLarge, 50));
    }

    #[test]
    fn the_output_room_bounds_the_entries() {
        let mut m = list(10);
        let elen = entry_len(&FIELDS);
        let mut out = vec![0u8; 3 * elen + elen / 2];
        let o = walk(&mut m, &spec(100), &mut out);
        assert_eq!(
            (o.status, o.entries, o.used),
            (Status::TooLarge, 3, 3 * elen)
        );
    }

    #[test]
    fn an_unreadable_head_has_no_entries() {
        let mut m = list(2);
        let mut out = vec![0u8; 4096];
        let s = WalkSpec {
            head: 0x10,
            ..spec(10)
        };
        let o = walk(&mut m, &s, &mut out);
        assert_eq!((o.status, o.level, o.entries), (Status::NotPresent, 1, 0));
    }

    /// A reader that spends a budget of reads, like the agent's.
    struct Metered(Mem, u32);
    impl WalkReader for Metered {
        fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), (Status, u8)> {
            if self.1 == 0 {
                return Err((Status::WorkLimit, 0));
            }
            self.1 -= 1;
            self.0.read(addr, buf)
        }
    }

    #[test]
    fn the_work_limit_ends_the_walk_before_a_partial_entry() {
        // 1 head read, then 4 per entry (a field, a pointer, the value it
        // points to, the next): 10 reads make 2 whole entries and part of
        // a third, which is not returned.
        let mut m = Metered(list(10), 10);
        let mut out = vec![0u8; 4096];
        let o = walk(&mut m, &spec(100), &mut out);
        assert_eq!(o.status, Status::WorkLimit);
        assert_eq!(o.entries, 2);
        assert_eq!(o.used, 2 * entry_len(&FIELDS));
    }

    #[test]
    fn specs_out_of_bounds_are_refused_without_reading() {
        let mut m = list(3);
        let mut out = vec![0u8; 4096];
        for bad in [
            spec(0),
            spec(MAX_WALK_ENTRIES + 1),
            WalkSpec {
                fields: &[Field {
                    offset: 0,
                    len: 0,
                    deref: None,
                }],
                ..spec(5)
            },
        ] {
            assert!(bad.check().is_err());
            let o = walk(&mut m, &bad, &mut out);
            assert_eq!((o.status, o.entries), (Status::BadRequest, 0));
        }
        assert!(spec(5).check().is_ok());
    }

    #[test]
    fn entry_len_is_padded_to_eight() {
        assert_eq!(entry_len(&[]), 16);
        assert_eq!(entry_len(&FIELDS), 24);
        let f = Field {
            offset: 0,
            len: 3,
            deref: None,
        };
        assert_eq!(entry_len(&[f]), 24);
    }
}
