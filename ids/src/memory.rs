//! The guest-memory layer: one trait ([`GuestMemory`]) through which every
//! higher layer (kallsyms, BTF, the Linux walkers) reads the guest, with
//! backends for the live agent ([`Session`]), a memory dump file
//! ([`crate::dump::DumpMemory`]) and fakes ([`crate::fake::FakeMemory`]).
//!
//! Shapes and units: addresses are guest addresses in bytes (physical, or
//! virtual in an [`AddressSpace`]: a CPU's page tables, PTI half, or an
//! explicit CR3); lengths are bytes. A [`Batch`] is many reads served
//! together: on the live agent one batch is one sealed request, one SMI and
//! therefore one consistent snapshot, unless it is larger than one reply
//! holds (then it is split and [`BatchStats::requests`] says so).
//!
//! Trust: the bytes returned are the guest's and therefore untrusted; this
//! layer only guarantees that a read returned is complete or is a [`Fault`].
//!
//! [`SnapshotCache`] keeps the pages read in one snapshot so that a walker
//! reading the same page twice costs one read; it is emptied by
//! [`SnapshotCache::new_snapshot`] and never outlives the snapshot it was
//! filled in (the caller decides when a snapshot ends: one CLI command).

use std::collections::HashMap;

use smmvmi_mailbox::client::OwnedResult;
use smmvmi_mailbox::walk::{self, Field, WalkReader, WalkSpec};
use smmvmi_mailbox::wire::{AddressSpace, CpuState, Op, RESULT_HEADER_LEN, Status, WalkRecord};

use crate::session::{AgentInfo, Session, SessionError};

/// Most reads in one batch (the request frame's op limit).
pub const MAX_BATCH_OPS: usize = smmvmi_mailbox::wire::MAX_OPS;

/// Where a read goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    /// Guest-physical memory.
    Phys,
    /// Guest-virtual memory of an address space.
    Virt(AddressSpace),
}

/// A hashable form of a [`Space`].
pub type SpaceKey = (u8, u32, u64, u8);

impl Space {
    /// A hashable key (the mailbox's `AddressSpace` is not `Hash`).
    pub fn key(&self) -> SpaceKey {
        match self {
            Space::Phys => (0, 0, 0, 0),
            Space::Virt(a) => (1, a.cpu, a.cr3.unwrap_or(u64::MAX), a.pti as u8),
        }
    }
}

/// One read of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Read {
    /// Address space.
    pub space: Space,
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub len: usize,
}

impl Read {
    /// A kernel-virtual read through `cpu`'s page tables (PTI kernel half).
    pub fn kernel(cpu: u32, addr: u64, len: usize) -> Self {
        Self {
            space: Space::Virt(AddressSpace::kernel_of(cpu)),
            addr,
            len,
        }
    }
}

/// Why one read of a batch did not return all its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status:?} at {aux:#x} (paging level {level})")]
pub struct Fault {
    /// The agent's status.
    pub status: Status,
    /// Paging level where a walk stopped (1 = PTE).
    pub level: u8,
    /// Where the read stopped.
    pub aux: u64,
}

/// Counters of a backend (for benchmarks and `--verbose`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Batches asked for.
    pub batches: u64,
    /// Requests (SMIs on the live agent) made.
    pub requests: u64,
    /// Bytes returned.
    pub bytes: u64,
}

/// Errors of the memory layer.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The live session failed.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// A read the caller needed whole faulted.
    #[error("reading {len:#x} bytes at {addr:#x} ({space:?}): {fault}")]
    Fault {
        /// Space read.
        space: Space,
        /// Address.
        addr: u64,
        /// Length.
        len: usize,
        /// Why.
        fault: Fault,
    },
    /// The dump file is unusable.
    #[error("memory dump {path}: {problem}")]
    Dump {
        /// Dump path.
        path: String,
        /// What is wrong, and what to do.
        problem: String,
    },
    /// The backend cannot do this.
    #[error("{what} is not available from this backend ({backend})")]
    Unsupported {
        /// What was asked.
        what: &'static str,
        /// Which backend.
        backend: &'static str,
    },
    /// A list walk outside the agent's bounds.
    #[error("a list walk outside the agent's bounds: {problem}")]
    BadWalk {
        /// Which bound.
        problem: &'static str,
    },
    /// A CPU index beyond the CPUs the backend knows.
    #[error("CPU {cpu} does not exist: the guest has {count} CPUs")]
    NoSuchCpu {
        /// Asked.
        cpu: u32,
        /// Known.
        count: u32,
    },
}

/// The result of one read: its bytes, or why not.
pub type ReadResult = Result<Vec<u8>, Fault>;

/// One list walk of a [`GuestMemory::walk_lists`] batch: the circular
/// `list_head` chain at `head` in `space`, with `fields` copied from each
/// container (semantics and bounds: [`smmvmi_mailbox::walk`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListWalk {
    /// Address space (virtual).
    pub space: AddressSpace,
    /// Address of the list head.
    pub head: u64,
    /// Offset of the link inside each container, bytes.
    pub link_offset: u16,
    /// Most entries, 1..=[`walk::MAX_WALK_ENTRIES`].
    pub max_entries: u32,
    /// Fields copied from each container, at most [`walk::MAX_WALK_FIELDS`].
    pub fields: Vec<Field>,
}

/// One container a walk visited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalkEntry {
    /// The container's address.
    pub container: u64,
    /// Each field's bytes, `None` where it could not be read.
    pub fields: Vec<Option<Vec<u8>>>,
}

impl WalkEntry {
    /// Field `i` as a little-endian integer of its length (at most 8
    /// bytes), `None` if it could not be read.
    pub fn uint(&self, i: usize) -> Option<u64> {
        let b = self.fields.get(i)?.as_ref()?;
        let mut a = [0u8; 8];
        let n = b.len().min(8);
        a[..n].copy_from_slice(&b[..n]);
        Some(u64::from_le_bytes(a))
    }

    /// Field `i`'s bytes (empty if it could not be read).
    pub fn bytes(&self, i: usize) -> &[u8] {
        self.fields
            .get(i)
            .and_then(|f| f.as_deref())
            .unwrap_or_default()
    }
}

/// What one walk found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalkResult {
    /// The containers, in list order.
    pub entries: Vec<WalkEntry>,
    /// `None` if the walk came back to the head; else why it stopped
    /// (`TooLarge`: the entry limit; others: a `next` that could not be
    /// read, `aux` = entries read before it).
    pub stop: Option<Fault>,
}

impl WalkResult {
    fn parse(data: &[u8], fields: &[Field], status: Status, level: u8, count: u64) -> Self {
        let entries = walk::entries(data, fields)
            .map(|e| {
                let mut at = 0usize;
                WalkEntry {
                    container: e.container,
                    fields: fields
                        .iter()
                        .enumerate()
                        .map(|(i, f)| {
                            let b = &e.fields[at..at + f.len as usize];
                            at += f.len as usize;
                            (e.faults.checked_shr(i as u32).unwrap_or(0) & 1 == 0)
                                .then(|| b.to_vec())
                        })
                        .collect(),
                }
            })
            .collect();
        Self {
            entries,
            stop: (status != Status::Ok).then_some(Fault {
                status,
                level,
                aux: count,
            }),
        }
    }
}

/// A [`WalkReader`] over a backend's reads: one batch per read (a dump or
/// a fake: reads are local). Keeps the first backend error.
struct BatchReader<'a, M: ?Sized> {
    m: &'a mut M,
    space: AddressSpace,
    error: Option<MemoryError>,
}

impl<M: GuestMemory + ?Sized> WalkReader for BatchReader<'_, M> {
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), (Status, u8)> {
        if self.error.is_some() {
            return Err((Status::Unsupported, 0));
        }
        let r = Read {
            space: Space::Virt(self.space),
            addr,
            len: buf.len(),
        };
        match self.m.read_batch(&[r]).map(|mut v| v.pop()) {
            Ok(Some(Ok(d))) if d.len() == buf.len() => {
                buf.copy_from_slice(&d);
                Ok(())
            }
            Ok(Some(Err(f))) => Err((f.status, f.level)),
            Ok(_) => Err((Status::TooLarge, 0)),
            Err(e) => {
                self.error = Some(e);
                Err((Status::Unsupported, 0))
            }
        }
    }
}

/// The agent's bounds ([`WalkSpec::check`]), checked on every backend.
fn check_walk(lw: &ListWalk) -> Result<(), MemoryError> {
    WalkSpec {
        head: lw.head,
        link_offset: lw.link_offset,
        max_entries: lw.max_entries,
        fields: &lw.fields,
    }
    .check()
    .map_err(|problem| MemoryError::BadWalk { problem })
}

/// Runs `walks` with the backend's own reads, following each pointer as
/// the agent would ([`walk::walk`]): the fallback of backends without a
/// list-walk op.
pub fn walk_lists_by_reads<M: GuestMemory + ?Sized>(
    m: &mut M,
    walks: &[ListWalk],
) -> Result<Vec<WalkResult>, MemoryError> {
    walks
        .iter()
        .map(|lw| {
            check_walk(lw)?;
            let mut out = vec![0u8; lw.max_entries as usize * walk::entry_len(&lw.fields)];
            let spec = WalkSpec {
                head: lw.head,
                link_offset: lw.link_offset,
                max_entries: lw.max_entries,
                fields: &lw.fields,
            };
            let mut r = BatchReader {
                m: &mut *m,
                space: lw.space,
                error: None,
            };
            let o = walk::walk(&mut r, &spec, &mut out);
            if let Some(e) = r.error {
                return Err(e);
            }
            Ok(WalkResult::parse(
                &out[..o.used],
                &lw.fields,
                o.status,
                o.level,
                u64::from(o.entries),
            ))
        })
        .collect()
}

/// Guest memory and CPU state, read in batches.
pub trait GuestMemory {
    /// Serves every read of `reads` in one snapshot where the backend can
    /// (one SMI on the live agent). Results are in order.
    fn read_batch(&mut self, reads: &[Read]) -> Result<Vec<ReadResult>, MemoryError>;
    /// The physical address `addr` maps to in `space`, or the fault.
    fn translate(
        &mut self,
        space: AddressSpace,
        addr: u64,
    ) -> Result<Result<u64, Fault>, MemoryError>;
    /// Registers and MSRs of `cpu`.
    fn cpu_state(&mut self, cpu: u32) -> Result<CpuState, MemoryError>;
    /// Number of CPUs.
    fn cpu_count(&mut self) -> Result<u32, MemoryError>;
    /// Registers and MSRs of every CPU (index = agent CPU index), in one
    /// snapshot where the backend can (one SMI on the live agent); the
    /// default asks [`GuestMemory::cpu_state`] CPU by CPU.
    fn cpu_states(&mut self) -> Result<Vec<CpuState>, MemoryError> {
        (0..self.cpu_count()?).map(|i| self.cpu_state(i)).collect()
    }
    /// Largest read one batch can hold (bytes).
    fn max_read(&mut self) -> Result<usize, MemoryError>;
    /// Counters so far.
    fn stats(&self) -> BatchStats;

    /// [`GuestMemory::read_batch`] for memory no other vCPU's state bears
    /// on (kernel text, read-only data): through the daemon the agent
    /// serves it from an SMI on vCPU `cpu` alone, the others running on
    /// (`FLAG_NO_SNAPSHOT`); elsewhere it is `read_batch`.
    fn read_batch_on_cpu(
        &mut self,
        cpu: u32,
        reads: &[Read],
    ) -> Result<Vec<ReadResult>, MemoryError> {
        let _ = cpu;
        self.read_batch(reads)
    }

    /// Walks every list of `walks` in one snapshot where the backend can
    /// (one SMI on an agent with WALK_LIST, version 1.2+); the default
    /// follows the pointers with [`GuestMemory::read_batch`].
    fn walk_lists(&mut self, walks: &[ListWalk]) -> Result<Vec<WalkResult>, MemoryError> {
        walk_lists_by_reads(self, walks)
    }

    /// True if [`GuestMemory::walk_lists`] is served by the agent in one
    /// request (else it costs a read per pointer: callers with a batched
    /// alternative should take it).
    fn walks_in_agent(&mut self) -> Result<bool, MemoryError> {
        Ok(false)
    }

    /// Reads `len` bytes that must all be there; reads longer than
    /// [`GuestMemory::max_read`] are split into one batch of several ops.
    fn read_exact(&mut self, space: Space, addr: u64, len: usize) -> Result<Vec<u8>, MemoryError> {
        let max = self.max_read()?.max(4096);
        let mut out = Vec::with_capacity(len.min(64 << 20));
        let mut off = 0usize;
        while off < len {
            // As many chunks as one batch's budget holds.
            let mut reads = Vec::new();
            let mut budget = max;
            while off < len && budget > 0 && reads.len() < MAX_BATCH_OPS {
                let n = (len - off).min(budget.saturating_sub(RESULT_HEADER_LEN + 8));
                if n == 0 {
                    break;
                }
                reads.push(Read {
                    space,
                    addr: addr.wrapping_add(off as u64),
                    len: n,
                });
                budget = budget.saturating_sub(n + RESULT_HEADER_LEN + 8);
                off += n;
            }
            if reads.is_empty() {
                reads.push(Read {
                    space,
                    addr: addr.wrapping_add(off as u64),
                    len: (len - off).min(max),
                });
                off += reads[0].len;
            }
            for (r, res) in reads.iter().zip(self.read_batch(&reads)?) {
                out.extend(res.map_err(|fault| MemoryError::Fault {
                    space,
                    addr: r.addr,
                    len: r.len,
                    fault,
                })?);
            }
        }
        Ok(out)
    }
}

/// The live agent: a batch is one sealed request (one SMI) when it fits one
/// reply, else as few requests as hold it.
impl GuestMemory for Session {
    fn read_batch(&mut self, reads: &[Read]) -> Result<Vec<ReadResult>, MemoryError> {
        read_batch_of(self, reads, None)
    }

    fn read_batch_on_cpu(
        &mut self,
        cpu: u32,
        reads: &[Read],
    ) -> Result<Vec<ReadResult>, MemoryError> {
        read_batch_of(self, reads, Some(cpu))
    }

    fn translate(
        &mut self,
        space: AddressSpace,
        addr: u64,
    ) -> Result<Result<u64, Fault>, MemoryError> {
        let r = self.request(&[Op::Translate { space, addr }])?.remove(0);
        self.count(1, std::slice::from_ref(&r));
        if r.status != Status::Ok {
            return Ok(Err(Fault {
                status: r.status,
                level: r.level,
                aux: r.aux,
            }));
        }
        let walk = WalkRecord::decode(&r.data)
            .map_err(|e| SessionError::Malformed(format!("TRANSLATE record: {e}")))?;
        Ok(Ok(walk.pa))
    }

    fn cpu_state(&mut self, cpu: u32) -> Result<CpuState, MemoryError> {
        let s = Session::cpu_state(self, cpu)?;
        self.count(1, &[]);
        Ok(s)
    }

    fn cpu_count(&mut self) -> Result<u32, MemoryError> {
        Ok(self.cached_info()?.header.cpu_count)
    }

    fn cpu_states(&mut self) -> Result<Vec<CpuState>, MemoryError> {
        let n = self.cached_info()?.header.cpu_count;
        let mut out = Vec::with_capacity(n as usize);
        let ops: Vec<Op> = (0..n).map(|cpu| Op::CpuState { cpu }).collect();
        for chunk in ops.chunks(MAX_BATCH_OPS) {
            let results = self.request(chunk)?;
            self.count(1, &[]);
            for (op, r) in chunk.iter().zip(results) {
                if r.status != Status::Ok {
                    return Err(SessionError::Op {
                        op: crate::session::describe(op),
                        status: r.status,
                        level: r.level,
                        aux: r.aux,
                    }
                    .into());
                }
                out.push(
                    CpuState::decode(&r.data)
                        .map_err(|e| SessionError::Malformed(format!("CPU state: {e}")))?,
                );
            }
        }
        Ok(out)
    }

    fn max_read(&mut self) -> Result<usize, MemoryError> {
        Ok(Session::max_read(self)?)
    }

    fn stats(&self) -> BatchStats {
        self.memory_stats()
    }

    fn walks_in_agent(&mut self) -> Result<bool, MemoryError> {
        Ok(self.cached_info()?.header.agent_version >= walk::WALK_LIST_AGENT_VERSION)
    }

    fn walk_lists(&mut self, walks: &[ListWalk]) -> Result<Vec<WalkResult>, MemoryError> {
        if !self.walks_in_agent()? {
            return walk_lists_by_reads(self, walks);
        }
        for w in walks {
            check_walk(w)?;
        }
        let mut out: Vec<Option<WalkResult>> = vec![None; walks.len()];
        // As many walks per request as the op limit allows; a walk the
        // reply had no room for is asked again, alone.
        let mut pending: Vec<usize> = (0..walks.len()).collect();
        let mut alone = false;
        while !pending.is_empty() {
            let mut ops = Vec::new();
            let mut asked = Vec::new();
            for &i in &pending {
                let w = &walks[i];
                if !ops.is_empty() && (alone || ops.len() + 1 + w.fields.len() > MAX_BATCH_OPS) {
                    break;
                }
                ops.push(Op::WalkList {
                    space: w.space,
                    head: w.head,
                    link_offset: w.link_offset,
                    max_entries: w.max_entries,
                    field_count: w.fields.len() as u32,
                });
                ops.extend(w.fields.iter().map(|f| Op::Field(*f)));
                asked.push(i);
            }
            let results = self.request(&ops)?;
            self.count(1, &results);
            let mut at = 0usize;
            let mut again = Vec::new();
            for &i in &asked {
                let w = &walks[i];
                let r = results.get(at);
                at += 1 + w.fields.len();
                // Cut short by what it shared the request with (the reply's
                // room or the work budget): asked again, alone.
                let shared_cut = |r: &OwnedResult| {
                    !alone
                        && (r.status == Status::WorkLimit
                            || (r.status == Status::TooLarge && r.aux < u64::from(w.max_entries)))
                };
                match r {
                    Some(r) if !shared_cut(r) => {
                        if r.kind != smmvmi_mailbox::wire::OpKind::WalkList as u8
                            || r.data.len() as u64
                                != r.aux.saturating_mul(walk::entry_len(&w.fields) as u64)
                        {
                            return Err(SessionError::Malformed(format!(
                                "WALK_LIST result: kind {}, {} bytes for {} entries",
                                r.kind,
                                r.data.len(),
                                r.aux
                            ))
                            .into());
                        }
                        out[i] = Some(WalkResult::parse(
                            &r.data, &w.fields, r.status, r.level, r.aux,
                        ))
                    }
                    _ => again.push(i),
                }
            }
            pending.retain(|i| !asked.contains(i));
            // Walks cut short by the reply's room go again, one per request.
            alone = !again.is_empty();
            again.extend(pending);
            pending = again;
        }
        Ok(out
            .into_iter()
            .map(|r| r.expect("every walk answered"))
            .collect())
    }
}

fn op_of(r: &Read, len: usize) -> Op {
    match r.space {
        Space::Phys => Op::ReadPhys {
            addr: r.addr,
            len: len as u32,
        },
        Space::Virt(space) => Op::ReadVirt {
            space,
            addr: r.addr,
            len: len as u32,
        },
    }
}

fn result_of(r: OwnedResult, len: usize) -> ReadResult {
    if r.status == Status::Ok && r.data.len() == len {
        Ok(r.data)
    } else {
        Err(Fault {
            status: if r.status == Status::Ok {
                Status::TooLarge
            } else {
                r.status
            },
            level: r.level,
            aux: r.aux,
        })
    }
}

/// A read longer than one reply: consecutive single-op requests.
fn read_long(s: &mut Session, r: Read, max: usize) -> Result<ReadResult, MemoryError> {
    let mut data = Vec::with_capacity(r.len.min(64 << 20));
    while data.len() < r.len {
        let n = (r.len - data.len()).min(max);
        let piece = Read {
            addr: r.addr.wrapping_add(data.len() as u64),
            len: n,
            ..r
        };
        let res = s.request(&[op_of(&piece, n)])?;
        s.count(1, &res);
        match result_of(res.into_iter().next().expect("one result"), n) {
            Ok(d) => data.extend(d),
            Err(f) => return Ok(Err(f)),
        }
    }
    Ok(Ok(data))
}

/// Extra state the session keeps for the memory layer.
impl Session {
    fn count(&mut self, requests: u64, results: &[OwnedResult]) {
        let st = self.stats_mut();
        st.requests += requests;
        st.bytes += results.iter().map(|r| r.data.len() as u64).sum::<u64>();
    }

    fn count_batch(&mut self) {
        self.stats_mut().batches += 1;
    }

    fn cached_info(&mut self) -> Result<AgentInfo, SessionError> {
        if let Some(i) = self.info_cache() {
            return Ok(i.clone());
        }
        let i = self.info()?;
        Ok(i)
    }
}

/// Pages read in one snapshot, keyed by (space, page address). Reads through
/// it are split into 4 KiB pages; missing pages of a batch are fetched in one
/// batch of the inner backend.
pub struct SnapshotCache<M> {
    inner: M,
    pages: HashMap<(SpaceKey, u64), ReadResult>,
    cpus: Option<Vec<CpuState>>,
    generation: u64,
    /// Most pages kept (a bound on memory, whatever the guest makes us read).
    pub max_pages: usize,
}

/// Page size of the cache.
pub const PAGE: u64 = 4096;

impl<M: GuestMemory> SnapshotCache<M> {
    /// A cache over `inner`, empty.
    pub fn new(inner: M) -> Self {
        Self {
            inner,
            pages: HashMap::new(),
            cpus: None,
            generation: 0,
            max_pages: 64 * 1024,
        }
    }

    /// Ends the snapshot: forgets every page.
    pub fn new_snapshot(&mut self) {
        self.pages.clear();
        self.cpus = None;
        self.generation += 1;
    }

    /// Snapshots begun so far.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Every CPU's registers and MSRs, fetched once per snapshot
    /// ([`GuestMemory::cpu_states`]: one request on the live agent).
    pub fn cpu_states(&mut self) -> Result<&[CpuState], MemoryError> {
        if self.cpus.is_none() {
            self.cpus = Some(self.inner.cpu_states()?);
        }
        Ok(self.cpus.as_deref().expect("set above"))
    }

    /// The backend.
    pub fn inner(&mut self) -> &mut M {
        &mut self.inner
    }

    /// Cached pages.
    pub fn cached_pages(&self) -> usize {
        self.pages.len()
    }

    /// Loads every page that `reads` touch and are not cached, in one batch.
    pub fn prefetch(&mut self, reads: &[Read]) -> Result<(), MemoryError> {
        let mut want: Vec<Read> = Vec::new();
        for r in reads {
            if r.len == 0 {
                continue;
            }
            let first = r.addr & !(PAGE - 1);
            let last = r.addr.saturating_add(r.len as u64 - 1) & !(PAGE - 1);
            let mut p = first;
            loop {
                if !self.pages.contains_key(&(r.space.key(), p))
                    && !want.iter().any(|w| w.space == r.space && w.addr == p)
                {
                    want.push(Read {
                        space: r.space,
                        addr: p,
                        len: PAGE as usize,
                    });
                }
                if p >= last {
                    break;
                }
                p += PAGE;
            }
        }
        if want.is_empty() {
            return Ok(());
        }
        if self.pages.len() + want.len() > self.max_pages {
            self.pages.clear();
        }
        for chunk in want.chunks(MAX_BATCH_OPS.min(200)) {
            let res = self.inner.read_batch(chunk)?;
            for (w, r) in chunk.iter().zip(res) {
                self.pages.insert((w.space.key(), w.addr), r);
            }
        }
        Ok(())
    }

    /// Serves many reads, fetching what is missing in one batch first.
    pub fn read_many(&mut self, reads: &[Read]) -> Result<Vec<ReadResult>, MemoryError> {
        self.prefetch(reads)?;
        Ok(reads.iter().map(|r| self.served_from_pages(r)).collect())
    }

    /// One read that must be complete.
    pub fn read(&mut self, space: Space, addr: u64, len: usize) -> Result<Vec<u8>, MemoryError> {
        let r = Read { space, addr, len };
        self.prefetch(&[r])?;
        self.served_from_pages(&r)
            .map_err(|fault| MemoryError::Fault {
                space,
                addr,
                len,
                fault,
            })
    }

    /// [`SnapshotCache::read`], with a guest fault as `None`: the session's
    /// own failures (a rejected reply, an outage) stay errors, so a caller
    /// that tolerates unmapped memory does not also swallow tampering.
    pub fn read_opt(
        &mut self,
        space: Space,
        addr: u64,
        len: usize,
    ) -> Result<Option<Vec<u8>>, MemoryError> {
        let r = Read { space, addr, len };
        self.prefetch(&[r])?;
        Ok(self.served_from_pages(&r).ok())
    }

    fn served_from_pages(&self, r: &Read) -> ReadResult {
        let mut out = Vec::with_capacity(r.len);
        let mut a = r.addr;
        while out.len() < r.len {
            let page = a & !(PAGE - 1);
            let off = (a - page) as usize;
            let n = (r.len - out.len()).min(PAGE as usize - off);
            match self.pages.get(&(r.space.key(), page)) {
                Some(Ok(d)) => out.extend_from_slice(&d[off..off + n]),
                Some(Err(f)) => return Err(*f),
                None => {
                    return Err(Fault {
                        status: Status::NotPresent,
                        level: 0,
                        aux: a,
                    });
                }
            }
            a += n as u64;
        }
        Ok(out)
    }
}

/// [`GuestMemory::read_batch`] on the live agent: greedy batches by the
/// reply budget and the op limit; with `on_cpu`, requests that need no
/// snapshot (an SMI on that vCPU alone through the daemon).
fn read_batch_of(
    s: &mut Session,
    reads: &[Read],
    on_cpu: Option<u32>,
) -> Result<Vec<ReadResult>, MemoryError> {
    let max = Session::max_read(s)?;
    let mut out = Vec::with_capacity(reads.len());
    let mut start = 0;
    while start < reads.len() {
        // Greedy split by the reply budget and the op limit; a read longer
        // than one reply is cut into pieces that are joined again.
        let mut ops: Vec<Op> = Vec::new();
        let mut owners: Vec<usize> = Vec::new();
        let mut budget = max + RESULT_HEADER_LEN;
        let mut i = start;
        let mut partial: Option<(usize, usize)> = None;
        while i < reads.len() && ops.len() < MAX_BATCH_OPS {
            let r = reads[i];
            let cost = RESULT_HEADER_LEN + r.len.div_ceil(8) * 8;
            if cost > budget {
                if ops.is_empty() {
                    // One read larger than a reply: its first piece now.
                    partial = Some((i, max));
                }
                break;
            }
            budget -= cost;
            ops.push(op_of(&r, r.len));
            owners.push(i);
            i += 1;
        }
        if let Some((idx, _)) = partial {
            out.push(read_long(s, reads[idx], max)?);
            start = idx + 1;
            continue;
        }
        let results = match on_cpu {
            Some(cpu) => s.request_on_cpu(cpu, &ops)?,
            None => s.request(&ops)?,
        };
        s.count(1, &results);
        for (op_i, res) in results.into_iter().enumerate() {
            out.push(result_of(res, reads[owners[op_i]].len));
        }
        start = i;
    }
    s.count_batch();
    Ok(out)
}

/// A borrowed backend is a backend (a cache over a session the caller keeps).
impl<T: GuestMemory + ?Sized> GuestMemory for &mut T {
    fn read_batch(&mut self, reads: &[Read]) -> Result<Vec<ReadResult>, MemoryError> {
        (**self).read_batch(reads)
    }
    fn read_batch_on_cpu(
        &mut self,
        cpu: u32,
        reads: &[Read],
    ) -> Result<Vec<ReadResult>, MemoryError> {
        (**self).read_batch_on_cpu(cpu, reads)
    }
    fn translate(
        &mut self,
        space: AddressSpace,
        addr: u64,
    ) -> Result<Result<u64, Fault>, MemoryError> {
        (**self).translate(space, addr)
    }
    fn cpu_state(&mut self, cpu: u32) -> Result<CpuState, MemoryError> {
        (**self).cpu_state(cpu)
    }
    fn cpu_count(&mut self) -> Result<u32, MemoryError> {
        (**self).cpu_count()
    }
    fn cpu_states(&mut self) -> Result<Vec<CpuState>, MemoryError> {
        (**self).cpu_states()
    }
    fn max_read(&mut self) -> Result<usize, MemoryError> {
        (**self).max_read()
    }
    fn stats(&self) -> BatchStats {
        (**self).stats()
    }
    fn walk_lists(&mut self, walks: &[ListWalk]) -> Result<Vec<WalkResult>, MemoryError> {
        (**self).walk_lists(walks)
    }
    fn walks_in_agent(&mut self) -> Result<bool, MemoryError> {
        (**self).walks_in_agent()
    }
}

/// A boxed backend is a backend (the CLI picks one at run time).
impl<T: GuestMemory + ?Sized> GuestMemory for Box<T> {
    fn read_batch(&mut self, reads: &[Read]) -> Result<Vec<ReadResult>, MemoryError> {
        (**self).read_batch(reads)
    }
    fn translate(
        &mut self,
        space: AddressSpace,
        addr: u64,
    ) -> Result<Result<u64, Fault>, MemoryError> {
        (**self).translate(space, addr)
    }
    fn cpu_state(&mut self, cpu: u32) -> Result<CpuState, MemoryError> {
        (**self).cpu_state(cpu)
    }
    fn cpu_count(&mut self) -> Result<u32, MemoryError> {
        (**self).cpu_count()
    }
    fn max_read(&mut self) -> Result<usize, MemoryError> {
        (**self).max_read()
    }
    fn stats(&self) -> BatchStats {
        (**self).stats()
    }
    fn walk_lists(&mut self, walks: &[ListWalk]) -> Result<Vec<WalkResult>, MemoryError> {
        (**self).walk_lists(walks)
    }
    fn walks_in_agent(&mut self) -> Result<bool, MemoryError> {
        (**self).walks_in_agent()
    }
}
