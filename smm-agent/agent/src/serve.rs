//! Serving one mailbox request: copy in, open, run the ops, seal, copy out.

use core::cell::Cell;
use core::sync::atomic::{Ordering, compiler_fence};

use smmvmi_mailbox::crypto::{self, SHARED_KEY_LEN, SessionKeys};
use smmvmi_mailbox::frame::FLAG_NO_SNAPSHOT;
use smmvmi_mailbox::layout::{self, Areas, SESSION_SALT_LEN, ServeStatus};
use smmvmi_mailbox::shared::SharedMemory;
use smmvmi_mailbox::walk::{self, Field, MAX_WALK_FIELDS, WORK_BUDGET, WalkReader, WalkSpec};
use smmvmi_mailbox::wire::{
    AddressSpace, CpuState, Direction, FRAME_HEADER_LEN, FRAME_OVERHEAD, FrameHeader, InfoCpu,
    InfoHeader, Op, OpKind, REPLY_FLAG_UNAUTHENTICATED, RamRange, ReplyWriter, RequestBody,
    SEV_ACTIVE, Status, TAG_LEN, WALK_RECORD_LEN, encode_info,
};

use crate::cpu::CpuSnapshot;
use crate::guard::{Alleged, Guard, PhysMemory, PhysRange, RamMap, Refusal};
use crate::paging::{self, PagingMode, Translation, WalkError};
use crate::replay::ReplayWindow;
use zeroize::Zeroize;

/// Agent version reported by INFO (major << 16 | minor). 1.1: INFO carries
/// `mem_flags` (RAM hot-plug tracked, virtio-mem refused). 1.2: WALK_LIST
/// and FIELD ops ([`smmvmi_mailbox::walk`]). 1.3: INFO's `sev_flags` says
/// where the key came from (`records::KEY_FROM_*`).
pub const AGENT_VERSION: u32 = 1 << 16 | 3;

/// The SEV facts and the C-bit: one definition, in `smmvmi_boot::sev`,
/// shared by the firmware's page tables and this walker.
pub use smmvmi_boot::sev::{
    CPUID_C_BIT_MASK, CPUID_SEV_LEAF, CPUID_SEV_SUPPORTED, MSR_SEV_STATUS, SEV_STATUS_SEV_ENABLED,
    SevConfig,
};

/// What the firmware knows and hands to every `serve`.
#[derive(Clone, Copy, Debug)]
pub struct ServeContext<'a> {
    /// Guest RAM ranges recorded at boot.
    pub ram: &'a RamMap,
    /// SMRAM (TSEG); never read.
    pub smram: PhysRange,
    /// One snapshot per CPU, index = CPU index of the ops.
    pub cpus: &'a [CpuSnapshot],
    /// SEV facts.
    pub sev: SevConfig,
    /// What INFO says about memory outside the boot map
    /// (`records::MEM_DIMM_HOTPLUG`, `MEM_VIRTIO_MEM_REFUSED`).
    pub mem_flags: u32,
    /// Where the key came from: `records::KEY_FROM_LAUNCH_SECRET` or
    /// `KEY_FROM_FW_CFG` (0: no key), reported in INFO's `sev_flags`.
    pub key_flags: u32,
    /// This SMI was served without waiting for the other CPUs, because the
    /// request posted with this doorbell value carried `FLAG_NO_SNAPSHOT`
    /// in its frame header (read once, before authentication). Only that
    /// request is served in this SMI (a newer one waits for the next SMI),
    /// and one whose authenticated flags do not say so is refused
    /// ([`ServeStatus::SnapshotMissed`]).
    pub snapshot_skipped: Option<u64>,
}

/// The agent's own state, kept in SMRAM across SMIs.
pub struct AgentState<'b> {
    /// The shared key (SMRAM only): each IDS client's keys are derived from
    /// it on demand.
    shared: Option<[u8; SHARED_KEY_LEN]>,
    /// The keys of the client served last (most requests come from the
    /// same client: one derivation per client switch).
    keys: Option<SessionKeys>,
    salt: [u8; SESSION_SALT_LEN],
    replay: ReplayWindow,
    reply_seq: u64,
    last_doorbell: u64,
    request_buf: &'b mut [u8],
    reply_buf: &'b mut [u8],
}

impl core::fmt::Debug for AgentState<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("AgentState")
            .field("provisioned", &self.shared.is_some())
            .field("replay_floor", &self.replay.floor())
            .field("reply_seq", &self.reply_seq)
            .finish_non_exhaustive()
    }
}

impl<'b> AgentState<'b> {
    /// Builds the state at boot. `key` is the provisioned shared key (the
    /// firmware scrubs its own copy afterwards), `salt` must be fresh per
    /// boot (RDRAND), `request_buf` and `reply_buf` are SMRAM buffers (the
    /// private copies: the request area's and the reply area's sizes are
    /// enough; smaller buffers bound the frames).
    pub fn new(
        key: Option<&[u8; SHARED_KEY_LEN]>,
        salt: [u8; SESSION_SALT_LEN],
        request_buf: &'b mut [u8],
        reply_buf: &'b mut [u8],
    ) -> Self {
        Self {
            shared: key.copied(),
            keys: None,
            salt,
            replay: ReplayWindow::new(),
            reply_seq: 0,
            last_doorbell: 0,
            request_buf,
            reply_buf,
        }
    }

    /// Repairs the state after a serve that was cut short (the serving CPU
    /// left SMM without RSM, or faulted): the key cache may hold a
    /// half-written schedule and the replay table a half-updated entry.
    /// Drops the cache (keys are derived again) and forgets every client
    /// above a raised floor (see [`ReplayWindow::forget_all`]).
    pub fn recover_interrupted_serve(&mut self) {
        self.keys = None;
        self.replay.forget_all();
    }

    /// True if a key is provisioned.
    pub fn is_provisioned(&self) -> bool {
        self.shared.is_some()
    }

    /// Writes the session salt into the mailbox header (at boot; `serve`
    /// rewrites it every time).
    pub fn publish<S: SharedMemory>(&self, mailbox: &S) -> Result<(), S::Error> {
        mailbox.copy_in(layout::OFF_SESSION_SALT, &self.salt)
    }
}

impl Drop for AgentState<'_> {
    fn drop(&mut self) {
        if let Some(k) = self.shared.as_mut() {
            k.zeroize();
        }
    }
}

/// What one call of [`serve`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// No new doorbell: nothing written.
    Idle,
    /// A doorbell was answered with this status (also in the header).
    Answered(ServeStatus),
    /// The mailbox has an unsupported size or refused an access: nothing
    /// (more) written.
    Unusable,
}

/// Serves the request in `mailbox`, if the doorbell says there is a new one.
///
/// The mailbox is read in two places only: the doorbell (one load) and the
/// request frame (copied once into the SMRAM request buffer: the 32-byte
/// header first, then exactly the body and tag it announces, bounded by the
/// request area and the buffer). Everything is checked on the copy. The
/// reply is built and sealed in the SMRAM reply buffer and copied out once;
/// the done word is stored last. Never panics, never reads memory other
/// than through `mem` with guard-checked ranges, never holds a reference
/// into the mailbox.
pub fn serve<S: SharedMemory, M: PhysMemory>(
    mailbox: &S,
    state: &mut AgentState<'_>,
    ctx: &ServeContext<'_>,
    mem: &M,
) -> Served {
    let Ok(areas) = Areas::from_size(mailbox.size()) else {
        return Served::Unusable;
    };
    let Ok(doorbell) = mailbox.load_u64(layout::OFF_REQ_DOORBELL) else {
        return Served::Unusable;
    };
    if doorbell == 0 || doorbell == state.last_doorbell {
        return Served::Idle;
    }
    if ctx
        .snapshot_skipped
        .is_some_and(|peeked| peeked != doorbell)
    {
        // The rendezvous was skipped for another request than this one.
        return Served::Idle;
    }
    state.last_doorbell = doorbell;
    if state.publish(mailbox).is_err() {
        return Served::Unusable;
    }

    let (status, reply_len) = answer(mailbox, &areas, state, ctx, mem);

    let reply_len = reply_len
        .min(areas.reply_capacity())
        .min(state.reply_buf.len());
    let written = (|| {
        mailbox.copy_in(areas.reply.start, &state.reply_buf[..reply_len])?;
        mailbox.store_u32(layout::OFF_REPLY_LEN, reply_len as u32)?;
        mailbox.store_u32(layout::OFF_SERVE_STATUS, status as u32)?;
        compiler_fence(Ordering::Release);
        mailbox.store_u64(layout::OFF_REPLY_DONE, doorbell)
    })();
    match written {
        Ok(()) => Served::Answered(status),
        Err(_) => Served::Unusable,
    }
}

/// Copies the request frame out of the mailbox into `req` (the SMRAM
/// buffer, already bounded by the request area): the header first, then
/// exactly what it announces. Returns the parsed header and the frame
/// length, or `None` if the frame does not fit or cannot be read.
fn copy_in_request<S: SharedMemory>(
    mailbox: &S,
    areas: &Areas,
    req: &mut [u8],
) -> Option<(FrameHeader, usize)> {
    let head = req.get_mut(..FRAME_HEADER_LEN)?;
    mailbox.copy_out(areas.request.start, head).ok()?;
    let header = FrameHeader::parse(head).ok()?;
    let frame_len = header.frame_len();
    let rest = req.get_mut(FRAME_HEADER_LEN..frame_len)?;
    mailbox
        .copy_out(areas.request.start + FRAME_HEADER_LEN, rest)
        .ok()?;
    Some((header, frame_len))
}

/// Produces the reply frame in `state.reply_buf`; returns the status and the
/// frame length (0 if there is no reply frame).
fn answer<S: SharedMemory, M: PhysMemory>(
    mailbox: &S,
    areas: &Areas,
    state: &mut AgentState<'_>,
    ctx: &ServeContext<'_>,
    mem: &M,
) -> (ServeStatus, usize) {
    let reply_cap = areas.reply_capacity().min(state.reply_buf.len());
    let Some(shared) = state.shared.as_ref() else {
        let len = plain_info(&mut state.reply_buf[..reply_cap], ctx, reply_cap);
        return (ServeStatus::Unprovisioned, len);
    };

    // Copy in: header first, then what it announces, all bounded.
    let req_cap = areas.request_capacity().min(state.request_buf.len());
    let req = &mut state.request_buf[..req_cap];
    let Some((header, frame_len)) = copy_in_request(mailbox, areas, req) else {
        return (ServeStatus::BadFrame, 0);
    };
    let frame = &mut req[..frame_len];

    match header.direction {
        Direction::Request => {}
        Direction::PlainRequest => return (ServeStatus::SealedRequired, 0),
        _ => return (ServeStatus::BadFrame, 0),
    }
    if state.replay.check(header.client, header.seq).is_err() {
        return (ServeStatus::Replay, 0);
    }
    if state.keys.as_ref().map(SessionKeys::client) != Some(header.client) {
        state.keys = Some(SessionKeys::derive_for(shared, &state.salt, header.client));
    }
    let Some(keys) = state.keys.as_ref() else {
        return (ServeStatus::BadTag, 0);
    };
    let opened = match crypto::open_in_place(keys, Direction::Request, frame) {
        Ok(o) => o,
        Err(_) => return (ServeStatus::BadTag, 0),
    };
    // Authentic and fresh: consume the sequence before anything else.
    if state.replay.accept(header.client, header.seq).is_err() {
        return (ServeStatus::Replay, 0);
    }
    if ctx.snapshot_skipped.is_some() && header.flags & FLAG_NO_SNAPSHOT == 0 {
        return (ServeStatus::SnapshotMissed, 0);
    }
    let Ok(body) = RequestBody::parse(&frame[opened.body.clone()]) else {
        return (ServeStatus::BadBody, 0);
    };

    let Some(reply_seq) = state.reply_seq.checked_add(1) else {
        return (ServeStatus::CounterExhausted, 0);
    };
    state.reply_seq = reply_seq;

    let reply = &mut state.reply_buf[..reply_cap];
    let body_cap = reply_cap.saturating_sub(FRAME_OVERHEAD);
    let Ok(mut w) = ReplyWriter::new(
        &mut reply[FRAME_HEADER_LEN..FRAME_HEADER_LEN + body_cap],
        header.seq,
        &opened.tag,
        &body.ids_nonce,
        0,
    ) else {
        return (ServeStatus::BadBody, 0);
    };
    let max_read = body_cap;
    let guard = Guard::new(ctx.ram, ctx.smram, max_read);
    let budget = Budget::new(WORK_BUDGET);
    let mut ops = body.ops();
    while let Some((kind, op)) = ops.next() {
        let pushed = match op {
            Err(_) => w.push(kind, 0, |_| (Status::BadRequest, 0, 0, 0)),
            Ok(Op::WalkList {
                space,
                head,
                link_offset,
                max_entries,
                field_count,
            }) => {
                // The walk's FIELD ops are consumed with it; each consumed
                // op gets one result of its own kind.
                let mut fields = [Field::default(); MAX_WALK_FIELDS];
                let mut consumed = [0u8; MAX_WALK_FIELDS];
                let mut taken = 0usize;
                let mut valid = true;
                for (f, k) in fields
                    .iter_mut()
                    .zip(consumed.iter_mut())
                    .take(field_count as usize)
                {
                    match ops.next() {
                        Some((raw, Ok(Op::Field(field)))) => (*f, *k) = (field, raw),
                        Some((raw, _)) => (*k, valid) = (raw, false),
                        None => {
                            valid = false;
                            break;
                        }
                    }
                    taken += 1;
                }
                let spec = WalkSpec {
                    head,
                    link_offset,
                    max_entries,
                    fields: &fields[..taken],
                };
                let st = if valid {
                    Status::Ok
                } else {
                    Status::BadRequest
                };
                run_walk(&mut w, &space, &spec, valid, ctx, &guard, mem, &budget)
                    && consumed[..taken]
                        .iter()
                        .all(|&k| w.push(k, 0, |_| (st, 0, 0, 0)))
            }
            Ok(op) => run_op(&mut w, &op, ctx, &guard, mem, reply_cap, &budget),
        };
        if !pushed {
            // Out of room even for a result header: the remaining ops get no
            // result; the IDS sees fewer results than ops.
            break;
        }
    }
    let body_len = w.finish();
    let out = FrameHeader {
        direction: Direction::Reply,
        body_len: body_len as u32,
        seq: reply_seq,
        in_reply_to: header.seq,
        flags: 0,
        client: header.client,
    };
    let frame_len = out.frame_len();
    match crypto::seal_in_place(keys, &out, &mut reply[..frame_len]) {
        Ok(_) => (ServeStatus::Ok, frame_len),
        Err(_) => (ServeStatus::BadBody, 0),
    }
}

fn refusal_status(r: Refusal) -> Status {
    match r {
        Refusal::Smram => Status::RefusedSmram,
        Refusal::NotRam => Status::RefusedNotRam,
        Refusal::TooLarge => Status::TooLarge,
    }
}

fn walk_status(e: WalkError) -> (Status, u8) {
    match e {
        WalkError::NonCanonical => (Status::NonCanonical, 0),
        WalkError::Unsupported => (Status::Unsupported, 0),
        WalkError::NotPresent { level } => (Status::NotPresent, level),
        WalkError::Refused { level, refusal } => (refusal_status(refusal), level),
    }
}

/// Resolves an address space to (root, mode), or the status to answer.
fn resolve(space: &AddressSpace, ctx: &ServeContext<'_>) -> Result<(u64, PagingMode), Status> {
    let cpu = ctx.cpus.get(space.cpu as usize).ok_or(Status::BadRequest)?;
    if cpu.msrs_valid == 0 {
        return Err(Status::CpuNotInSmm);
    }
    let levels = cpu.paging_levels();
    if levels == 0 {
        return Err(Status::Unsupported);
    }
    let mask = ctx.sev.c_bit_mask();
    let root = paging::cr3_root(space.cr3.unwrap_or(cpu.cr3), space.pti, mask);
    Ok((
        root,
        PagingMode {
            levels,
            c_bit_mask: mask,
        },
    ))
}

fn run_op<M: PhysMemory>(
    w: &mut ReplyWriter<'_>,
    op: &Op,
    ctx: &ServeContext<'_>,
    guard: &Guard<'_>,
    mem: &M,
    reply_cap: usize,
    budget: &Budget,
) -> bool {
    let kind = op.kind() as u8;
    match *op {
        Op::ReadPhys { addr, len } => {
            let len = len as usize;
            if len > w.data_room() {
                return w.push(kind, 0, |_| (Status::TooLarge, 0, addr, 0));
            }
            w.push(kind, len, |buf| {
                let (st, level, done) = read_phys(mem, guard, addr, buf, budget);
                (st, level, addr.wrapping_add(done as u64), done)
            })
        }
        Op::ReadVirt { space, addr, len } => {
            let len = len as usize;
            if len > w.data_room() {
                return w.push(kind, 0, |_| (Status::TooLarge, 0, addr, 0));
            }
            let (root, mode) = match resolve(&space, ctx) {
                Ok(v) => v,
                Err(st) => return w.push(kind, 0, |_| (st, 0, addr, 0)),
            };
            w.push(kind, len, |buf| {
                let (st, level, done) =
                    VirtReader::new(mem, guard, root, mode, budget).read_prefix(addr, buf);
                (st, level, addr.wrapping_add(done as u64), done)
            })
        }
        Op::Translate { space, addr } => {
            let (root, mode) = match resolve(&space, ctx) {
                Ok(v) => v,
                Err(st) => return w.push(kind, 0, |_| (st, 0, 0, 0)),
            };
            if !budget.take(u32::from(mode.levels)) {
                return w.push(kind, 0, |_| (Status::WorkLimit, 0, 0, 0));
            }
            let (rec, res) = paging::walk(mem, guard, root, mode, addr);
            let (st, level, pa) = match res {
                Ok(t) => (Status::Ok, 0, t.pa),
                Err(e) => {
                    let (st, level) = walk_status(e);
                    (st, level, 0)
                }
            };
            push_fixed(w, kind, st, level, pa, |out: &mut [u8; WALK_RECORD_LEN]| {
                rec.encode(out)
            })
        }
        Op::CpuState { cpu } => match ctx.cpus.get(cpu as usize) {
            None => w.push(kind, 0, |_| (Status::BadRequest, 0, 0, 0)),
            Some(c) if c.msrs_valid == 0 => w.push(kind, 0, |_| (Status::CpuNotInSmm, 0, 0, 0)),
            Some(c) => push_fixed(
                w,
                kind,
                Status::Ok,
                0,
                0,
                |out: &mut [u8; CpuState::LEN]| c.encode(out),
            ),
        },
        // A FIELD not consumed by the WALK_LIST before it; a WALK_LIST never
        // reaches here (the loop in `answer` runs it with its fields).
        Op::Field(_) | Op::WalkList { .. } => w.push(kind, 0, |_| (Status::BadRequest, 0, 0, 0)),
        Op::Info => {
            let need = smmvmi_mailbox::wire::info_len(ctx.ram.ranges().len(), ctx.cpus.len());
            if need > w.data_room() {
                return w.push(kind, 0, |_| (Status::TooLarge, 0, 0, 0));
            }
            w.push(kind, need, |buf| match write_info(buf, ctx, reply_cap) {
                Some(n) => (Status::Ok, 0, 0, n),
                None => (Status::TooLarge, 0, 0, 0),
            })
        }
    }
}

/// Pushes a fixed-size record, or TooLarge if it does not fit.
fn push_fixed<const N: usize>(
    w: &mut ReplyWriter<'_>,
    kind: u8,
    st: Status,
    level: u8,
    aux: u64,
    encode: impl FnOnce(&mut [u8; N]),
) -> bool {
    if N > w.data_room() {
        return w.push(kind, 0, |_| (Status::TooLarge, level, aux, 0));
    }
    w.push(kind, N, |buf| {
        match buf
            .get_mut(..N)
            .and_then(|b| <&mut [u8; N]>::try_from(b).ok())
        {
            Some(out) => {
                encode(out);
                (st, level, aux, N)
            }
            None => (Status::TooLarge, level, aux, 0),
        }
    })
}

const PAGE: u64 = 0x1000;

/// Reads physical memory page by page; returns (status, level, bytes done).
fn read_phys<M: PhysMemory>(
    mem: &M,
    guard: &Guard<'_>,
    addr: u64,
    buf: &mut [u8],
    budget: &Budget,
) -> (Status, u8, usize) {
    let mut done = 0usize;
    while done < buf.len() {
        if !budget.take(1) {
            return (Status::WorkLimit, 0, done);
        }
        let Some(pa) = addr.checked_add(done as u64) else {
            return (Status::RefusedNotRam, 0, done);
        };
        let chunk = ((PAGE - (pa & (PAGE - 1))) as usize).min(buf.len() - done);
        match guard.check(Alleged::new(pa, chunk as u64)) {
            Ok(c) => mem.read(c, &mut buf[done..done + chunk]),
            Err(r) => return (refusal_status(r), 0, done),
        }
        done += chunk;
    }
    (Status::Ok, 0, done)
}

/// Runs one WALK_LIST (`valid` false: its FIELD ops were missing or
/// malformed, so it is refused). Leaves room for the FIELD results that
/// follow it. Returns false if not even its result header fits.
#[allow(clippy::too_many_arguments)]
fn run_walk<M: PhysMemory>(
    w: &mut ReplyWriter<'_>,
    space: &AddressSpace,
    spec: &WalkSpec<'_>,
    valid: bool,
    ctx: &ServeContext<'_>,
    guard: &Guard<'_>,
    mem: &M,
    budget: &Budget,
) -> bool {
    let kind = OpKind::WalkList as u8;
    if !valid {
        return w.push(kind, 0, |_| (Status::BadRequest, 0, 0, 0));
    }
    let (root, mode) = match resolve(space, ctx) {
        Ok(v) => v,
        Err(st) => return w.push(kind, 0, |_| (st, 0, 0, 0)),
    };
    let mut reader = VirtReader::new(mem, guard, root, mode, budget);
    let most = (spec.max_entries as usize)
        .saturating_mul(walk::entry_len(spec.fields))
        .min(
            w.data_room()
                .saturating_sub(spec.fields.len() * smmvmi_mailbox::wire::RESULT_HEADER_LEN),
        );
    // The walk writes every byte of its entries: no zero-fill of the offer.
    w.push_written(kind, most, |buf| {
        let o = walk::walk(&mut reader, spec, buf);
        (o.status, o.level, u64::from(o.entries), o.used)
    })
}

/// The work a request may still do in SMM ([`WORK_BUDGET`] units: one
/// page-table entry or one memory chunk read each), shared by its ops.
struct Budget(Cell<u32>);

impl Budget {
    fn new(units: u32) -> Self {
        Self(Cell::new(units))
    }

    /// Spends `n` units; false (and nothing spent) if fewer are left.
    fn take(&self, n: u32) -> bool {
        match self.0.get().checked_sub(n) {
            Some(left) => {
                self.0.set(left);
                true
            }
            None => false,
        }
    }
}

/// Entries of [`VirtReader`]'s translation cache.
const TLB_ENTRIES: usize = 16;

/// Reads guest-virtual memory through one address space, page by page,
/// remembering the last translations (a read inside a large page, or a
/// list walk returning to the same pages, walks the tables once). Lives
/// for one op: the tables are guest memory and may change between SMIs.
struct VirtReader<'a, 'g, M> {
    mem: &'a M,
    guard: &'a Guard<'g>,
    root: u64,
    mode: PagingMode,
    budget: &'a Budget,
    /// (virtual page base, page size, physical page base); size 0 = empty.
    tlb: [(u64, u64, u64); TLB_ENTRIES],
    victim: usize,
}

impl<'a, 'g, M: PhysMemory> VirtReader<'a, 'g, M> {
    fn new(
        mem: &'a M,
        guard: &'a Guard<'g>,
        root: u64,
        mode: PagingMode,
        budget: &'a Budget,
    ) -> Self {
        Self {
            mem,
            guard,
            root,
            mode,
            budget,
            tlb: [(0, 0, 0); TLB_ENTRIES],
            victim: 0,
        }
    }

    fn translate(&mut self, va: u64) -> Result<u64, (Status, u8)> {
        if let Some(&(vbase, _, pbase)) = self
            .tlb
            .iter()
            .find(|(vbase, size, _)| va.wrapping_sub(*vbase) < *size)
        {
            return Ok(pbase + (va - vbase));
        }
        if !self.budget.take(u32::from(self.mode.levels)) {
            return Err((Status::WorkLimit, 0));
        }
        match paging::walk(self.mem, self.guard, self.root, self.mode, va).1 {
            Ok(Translation { pa, page_shift }) => {
                let size = 1u64 << page_shift;
                self.tlb[self.victim] = (va & !(size - 1), size, pa & !(size - 1));
                self.victim = (self.victim + 1) % TLB_ENTRIES;
                Ok(pa)
            }
            Err(e) => Err(walk_status(e)),
        }
    }

    /// Fills `buf` from `addr`; returns (status, level, bytes done).
    fn read_prefix(&mut self, addr: u64, buf: &mut [u8]) -> (Status, u8, usize) {
        let mut done = 0usize;
        while done < buf.len() {
            let Some(va) = addr.checked_add(done as u64) else {
                return (Status::NonCanonical, 0, done);
            };
            let pa = match self.translate(va) {
                Ok(pa) => pa,
                Err((st, level)) => return (st, level, done),
            };
            let chunk = ((PAGE - (va & (PAGE - 1))) as usize).min(buf.len() - done);
            if !self.budget.take(1) {
                return (Status::WorkLimit, 0, done);
            }
            match self.guard.check(Alleged::new(pa, chunk as u64)) {
                Ok(c) => self.mem.read(c, &mut buf[done..done + chunk]),
                Err(r) => return (refusal_status(r), 0, done),
            }
            done += chunk;
        }
        (Status::Ok, 0, done)
    }
}

impl<M: PhysMemory> WalkReader for VirtReader<'_, '_, M> {
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), (Status, u8)> {
        match self.read_prefix(addr, buf) {
            (Status::Ok, _, _) => Ok(()),
            (st, level, _) => Err((st, level)),
        }
    }
}

fn write_info(buf: &mut [u8], ctx: &ServeContext<'_>, reply_cap: usize) -> Option<usize> {
    let header = InfoHeader {
        agent_version: AGENT_VERSION,
        cpu_count: ctx.cpus.len() as u32,
        sev_flags: if ctx.sev.active { SEV_ACTIVE } else { 0 } | ctx.key_flags,
        mem_flags: ctx.mem_flags,
        c_bit: u32::from(ctx.sev.c_bit),
        ram_range_count: ctx.ram.ranges().len() as u32,
        max_read: max_read_for(reply_cap) as u32,
        smram_base: ctx.smram.base(),
        smram_size: ctx.smram.len(),
    };
    let ranges = ctx.ram.ranges().iter().map(|r| RamRange {
        base: r.base(),
        len: r.len(),
    });
    let cpus = ctx.cpus.iter().map(|c| InfoCpu {
        paging_levels: c.paging_levels(),
        flags: if c.pcid() {
            smmvmi_mailbox::wire::INFO_CPU_PCID
        } else {
            0
        },
    });
    encode_info(&header, ranges, cpus, buf).ok()
}

/// Largest READ data a single-op request can get back with a reply buffer
/// of `reply_cap` bytes.
pub fn max_read_for(reply_cap: usize) -> usize {
    reply_cap.saturating_sub(
        FRAME_OVERHEAD
            + smmvmi_mailbox::wire::REPLY_BODY_HEADER_LEN
            + smmvmi_mailbox::wire::RESULT_HEADER_LEN,
    ) & !7
}

/// The plain INFO reply of an unprovisioned agent (unauthenticated, marked
/// so in the frame direction and the body flags).
fn plain_info(reply: &mut [u8], ctx: &ServeContext<'_>, reply_cap: usize) -> usize {
    let body_cap = reply.len().saturating_sub(FRAME_OVERHEAD);
    let Some(body) = reply.get_mut(FRAME_HEADER_LEN..FRAME_HEADER_LEN + body_cap) else {
        return 0;
    };
    let Ok(mut w) = ReplyWriter::new(body, 0, &[0; TAG_LEN], &[0; 16], REPLY_FLAG_UNAUTHENTICATED)
    else {
        return 0;
    };
    let need = smmvmi_mailbox::wire::info_len(ctx.ram.ranges().len(), ctx.cpus.len());
    w.push(OpKind::Info as u8, need, |buf| {
        match write_info(buf, ctx, reply_cap) {
            Some(n) => (Status::Ok, 0, 0, n),
            None => (Status::TooLarge, 0, 0, 0),
        }
    });
    let body_len = w.finish();
    let h = FrameHeader {
        direction: Direction::PlainReply,
        body_len: body_len as u32,
        seq: 0,
        in_reply_to: 0,
        flags: 0,
        client: 0,
    };
    let len = h.frame_len();
    reply[..FRAME_HEADER_LEN].copy_from_slice(&h.encode());
    reply[FRAME_HEADER_LEN + body_len..len].fill(0);
    len
}
