//! The Linux layer: everything learned from the guest itself, generic over
//! [`GuestMemory`]. Start: CPU 0's LSTAR (`entry_SYSCALL_64`, in the
//! kernel's text) → kallsyms found after it ([`crate::kallsyms`]) → BTF
//! between `__start_BTF` and `__stop_BTF` ([`crate::btf`]) → the offsets the
//! walkers need ([`Offsets`]). A cache on disk keyed by the kernel banner
//! keeps symbols and offsets; a cached entry is reused only when the banner
//! read at its recorded distance from LSTAR is identical, and its addresses
//! slide by the KASLR difference of the two LSTARs.
//!
//! Walkers (kernel facts from `include/linux/sched.h`, `kernel/fork.c`,
//! `fs/proc/array.c`, `kernel/module/procfs.c`):
//! - processes: `init_task.tasks` (every thread-group leader but the idle
//!   task), threads through `signal->thread_head`/`thread_node` (3.14+; the
//!   only link from 6.7) or `thread_group` (before 6.7); global PIDs
//!   (`task->pid`, `task->tgid`), parent = `real_parent->tgid`, state letter
//!   as `task_state_index()` computes it, zombie = `exit_state & EXIT_ZOMBIE`,
//!   kernel thread = `flags & PF_KTHREAD`;
//! - modules: the `modules` list; address and size from `mem[MOD_TEXT]` and
//!   the sum of `mem[]` sizes (6.4+) or `core_layout` (before);
//! - per CPU: `current` = `*(GS base + current_task)` (`pcpu_hot.current_task`
//!   from 6.2), GS base from the CPU state (the kernel's is in
//!   `KERNEL_GS_BASE` while user mode runs).
//!
//! Lists are walked by the agent (WALK_LIST, [`smmvmi_mailbox::walk`]): the
//! task list with every field a listing shows, parents and credentials
//! read through their pointers, is one request and one consistent
//! snapshot; so is the module list. A second view of the tasks goes
//! through the PID allocator ([`ps_by_idr`]). Every walk is bounded
//! ([`MAX_WALK_ENTRIES`] per walk, [`MAX_TASKS`], [`MAX_MODULES`]) and a
//! repeat, a user-space pointer or a broken `next` is an error, so a
//! corrupt guest list never hangs the IDS.

use std::collections::HashSet;
use std::path::PathBuf;

use smmvmi_mailbox::walk::{Field as WalkField, MAX_WALK_ENTRIES};
use smmvmi_mailbox::wire::{AddressSpace, CpuState};

use crate::btf::{BtfError, Offsets, Types};
use crate::kallsyms::{self, Image, Kallsyms, KallsymsError};
use crate::memory::{
    GuestMemory, ListWalk, MemoryError, Read, SnapshotCache, Space, WalkEntry, WalkResult,
};

/// Where kernel text must be on x86-64 (the top 2 GiB).
pub const KERNEL_TEXT_MIN: u64 = 0xFFFF_FFFF_8000_0000;
/// Most tasks walked (processes + threads).
pub const MAX_TASKS: usize = 1 << 17;
/// Most modules walked.
pub const MAX_MODULES: usize = 4096;
/// Most bytes of BTF read (Debian's 6.1 has about 5 MiB).
pub const MAX_BTF: u64 = 64 << 20;
/// `PF_KTHREAD` (include/linux/sched.h).
pub const PF_KTHREAD: u32 = 0x0020_0000;
/// `PF_EXITING` (include/linux/sched.h): set by `exit_signals()` early in
/// `do_exit()`, before `release_task()` unlinks the task from the lists.
pub const PF_EXITING: u32 = 0x0000_0004;
/// `EXIT_ZOMBIE`.
pub const EXIT_ZOMBIE: u32 = 0x20;
/// Cache format version.
pub const CACHE_VERSION: u32 = 7;

/// Errors of the Linux layer.
#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    /// Memory failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// kallsyms failed.
    #[error(transparent)]
    Kallsyms(#[from] KallsymsError),
    /// BTF failed.
    #[error(transparent)]
    Btf(#[from] BtfError),
    /// LSTAR does not point into kernel text.
    #[error(
        "CPU {cpu}'s LSTAR must point into kernel text (>= {KERNEL_TEXT_MIN:#x}), found {found:#x}: the CPU is not running a 64-bit Linux kernel yet"
    )]
    Lstar {
        /// CPU.
        cpu: u32,
        /// Found.
        found: u64,
    },
    /// A symbol the layer needs is missing.
    #[error("kallsyms has no {0}: this kernel is built without it (or kallsyms decoded wrongly)")]
    NoSymbol(String),
    /// A list in guest memory is corrupt or too long.
    #[error(
        "{list}: {problem} (after {count} entries); the guest's list is corrupt or being changed"
    )]
    BadList {
        /// Which list.
        list: &'static str,
        /// What was wrong.
        problem: String,
        /// Entries walked.
        count: usize,
    },
}

/// What the layer knows about the running kernel.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Kernel {
    /// Cache format.
    pub version: u32,
    /// `linux_banner` (the /proc/version text).
    pub banner: String,
    /// Banner address minus LSTAR (fixed per build).
    pub banner_from_lstar: i64,
    /// LSTAR when this was learned.
    pub lstar: u64,
    /// Symbols.
    pub kallsyms: Kallsyms,
    /// Offsets from BTF.
    pub offsets: Offsets,
    /// BTF bytes read (0 when from the cache).
    #[serde(skip)]
    pub btf_bytes: usize,
    /// True when this came from the cache.
    #[serde(skip)]
    pub from_cache: bool,
    /// Lowest kernel-half address of this boot: `0xff00..` with 5-level
    /// paging (CR4.LA57), `0xffff_8000..` with 4 (pointer canonicalization
    /// follows the paging mode).
    #[serde(skip, default = "default_kernel_half")]
    pub kernel_half: u64,
}

fn default_kernel_half() -> u64 {
    kernel_half(4)
}

/// Lowest kernel-half address for `levels` paging levels.
pub fn kernel_half(levels: u8) -> u64 {
    if levels == 5 {
        0xFF00_0000_0000_0000
    } else {
        0xFFFF_8000_0000_0000
    }
}

/// Parameters of kallsyms discovery.
#[derive(Clone, Copy, Debug)]
pub struct Discovery {
    /// CPU whose kernel page tables are used.
    pub cpu: u32,
    /// Most bytes scanned after LSTAR.
    pub limit: u64,
    /// Bytes of one read op.
    pub chunk: usize,
    /// Load every symbol from the cache (`kallsyms`); without it a warm
    /// load keeps only [`CORE_SYMBOLS`] (what the walkers use), which is
    /// much faster to parse.
    pub full_symbols: bool,
}

/// Symbols the walkers use; a warm load without `full_symbols` keeps these.
pub const CORE_SYMBOLS: &[&str] = &[
    "_text",
    "entry_SYSCALL_64",
    "linux_banner",
    "init_task",
    "init_pid_ns",
    "modules",
    "current_task",
    "pcpu_hot",
    "__per_cpu_offset",
    "__start_BTF",
    "__stop_BTF",
];

impl Default for Discovery {
    fn default() -> Self {
        Self {
            cpu: 0,
            limit: 96 << 20,
            chunk: 64 << 10,
            full_symbols: true,
        }
    }
}

/// The kernel address space of `cpu` (PTI's kernel half).
pub(crate) fn kspace(cpu: u32) -> Space {
    Space::Virt(AddressSpace::kernel_of(cpu))
}

/// Reads `[start, end)` as an image (unmapped chunks zero), in batches.
fn read_image<M: GuestMemory>(
    m: &mut M,
    d: &Discovery,
    start: u64,
    end: u64,
    img: &mut Image,
) -> Result<(), LinuxError> {
    let per_batch = (m.max_read()? / (d.chunk + 64)).clamp(1, 256);
    let mut a = start;
    while a < end {
        let mut reads = Vec::new();
        while a < end && reads.len() < per_batch {
            let n = (d.chunk as u64).min(end - a) as usize;
            reads.push(Read::kernel(d.cpu, a, n));
            a += n as u64;
        }
        for (r, res) in reads.iter().zip(m.read_batch(&reads)?) {
            match res {
                Ok(data) => img.bytes.extend(data),
                Err(_) => img.bytes.resize(img.bytes.len() + r.len, 0),
            }
        }
    }
    Ok(())
}

/// LSTAR of `cpu`, checked.
pub fn lstar<M: GuestMemory>(m: &mut M, cpu: u32) -> Result<u64, LinuxError> {
    let st = m.cpu_state(cpu)?;
    if st.msr_lstar < KERNEL_TEXT_MIN || st.msrs_valid != 1 {
        return Err(LinuxError::Lstar {
            cpu,
            found: st.msr_lstar,
        });
    }
    Ok(st.msr_lstar)
}

/// Finds kallsyms by reading forward from LSTAR's 2 MiB-aligned start, in
/// windows, until the tables decode (with `entry_SYSCALL_64` at LSTAR).
pub fn discover_kallsyms<M: GuestMemory>(
    m: &mut M,
    d: &Discovery,
) -> Result<(Kallsyms, u64), LinuxError> {
    let lstar = lstar(m, d.cpu)?;
    let start = lstar & !0x1F_FFFF;
    let end = start.saturating_add(d.limit);
    let mut img = Image {
        base: start,
        bytes: Vec::new(),
    };
    let step = 8u64 << 20;
    let mut a = start;
    let mut last = None;
    let mut searched_to = 0usize;
    while a < end {
        let b = (a + step).min(end);
        read_image(m, d, a, b, &mut img)?;
        a = b;
        // Only try once the new window holds a token table signature.
        let from = searched_to.saturating_sub(kallsyms::DIGITS.len());
        let has_sig = img.bytes[from..]
            .windows(kallsyms::DIGITS.len())
            .any(|w| w == kallsyms::DIGITS);
        searched_to = img.bytes.len();
        if !has_sig && last.is_none() {
            continue;
        }
        match kallsyms::find(&img, Some(("entry_SYSCALL_64", lstar))) {
            Ok(k) => return Ok((k, lstar)),
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .unwrap_or(KallsymsError::NoTokenTable {
            base: start,
            len: img.bytes.len(),
        })
        .into())
}

/// Reads the kernel's BTF (`__start_BTF`..`__stop_BTF`).
pub fn read_btf<M: GuestMemory>(m: &mut M, k: &Kallsyms, cpu: u32) -> Result<Vec<u8>, LinuxError> {
    let s = k
        .addr("__start_BTF")
        .ok_or_else(|| LinuxError::NoSymbol("__start_BTF".into()))?;
    let e = k
        .addr("__stop_BTF")
        .ok_or_else(|| LinuxError::NoSymbol("__stop_BTF".into()))?;
    if e <= s || e - s > MAX_BTF {
        return Err(LinuxError::NoSymbol(format!(
            "a sane BTF range (__start_BTF {s:#x}, __stop_BTF {e:#x}, at most {MAX_BTF:#x} bytes)"
        )));
    }
    Ok(m.read_exact(kspace(cpu), s, (e - s) as usize)?)
}

/// The user cache directory of smmvmi (`$XDG_CACHE_HOME/smmvmi` or
/// `~/.cache/smmvmi`).
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(x).join("smmvmi"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("smmvmi"))
}

fn cache_file(dir: &std::path::Path, banner: &str) -> PathBuf {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    banner.hash(&mut h);
    dir.join("kernels")
        .join(format!("{:016x}.json", h.finish()))
}

fn read_cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

impl Kernel {
    /// Learns the kernel from the guest (cold) or the cache in `cache` if
    /// its banner matches.
    pub fn load<M: GuestMemory>(
        m: &mut M,
        d: &Discovery,
        cache: Option<&std::path::Path>,
    ) -> Result<Self, LinuxError> {
        let st = m.cpu_state(d.cpu)?;
        if st.msr_lstar < KERNEL_TEXT_MIN || st.msrs_valid != 1 {
            return Err(LinuxError::Lstar {
                cpu: d.cpu,
                found: st.msr_lstar,
            });
        }
        let lstar_now = st.msr_lstar;
        let half = kernel_half(st.paging_levels());
        if let Some(dir) = cache
            && let Some(mut k) = Self::from_cache(m, d, dir, lstar_now)?
        {
            k.kernel_half = half;
            return Ok(k);
        }
        let (kallsyms, lstar) = discover_kallsyms(m, d)?;
        let banner_at = kallsyms
            .addr("linux_banner")
            .ok_or_else(|| LinuxError::NoSymbol("linux_banner".into()))?;
        let banner = read_cstr(&m.read_exact(kspace(d.cpu), banner_at, 512)?);
        let btf = read_btf(m, &kallsyms, d.cpu)?;
        let types = Types::from_bytes(&btf)?;
        let offsets = Offsets::from_btf(&types)?;
        let k = Kernel {
            version: CACHE_VERSION,
            banner,
            banner_from_lstar: banner_at.wrapping_sub(lstar) as i64,
            lstar,
            kallsyms,
            offsets,
            btf_bytes: btf.len(),
            from_cache: false,
            kernel_half: half,
        };
        if let Some(dir) = cache {
            // A cache that cannot be written only costs time next run.
            let f = cache_file(dir, &k.banner);
            if let Some(p) = f.parent() {
                let _ = std::fs::create_dir_all(p);
            }
            let mut core = k.clone();
            core.kallsyms = Kallsyms::new(
                k.kallsyms
                    .symbols
                    .iter()
                    .filter(|s| CORE_SYMBOLS.contains(&s.name.as_str()))
                    .cloned()
                    .collect(),
                k.kallsyms.layout.clone(),
            );
            if let (Ok(all), Ok(text)) = (
                serde_json::to_string(&k.kallsyms.symbols),
                serde_json::to_string(&core),
            ) {
                let _ = std::fs::write(f.with_extension("symbols.json"), all);
                let _ = std::fs::write(&f, text);
            }
        }
        Ok(k)
    }

    fn from_cache<M: GuestMemory>(
        m: &mut M,
        d: &Discovery,
        dir: &std::path::Path,
        lstar_now: u64,
    ) -> Result<Option<Self>, LinuxError> {
        let Ok(rd) = std::fs::read_dir(dir.join("kernels")) else {
            return Ok(None);
        };
        for e in rd.flatten().take(256) {
            if e.path().to_string_lossy().ends_with(".symbols.json") {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            let Ok(mut k) = serde_json::from_str::<Kernel>(&text) else {
                continue;
            };
            if k.version != CACHE_VERSION {
                continue;
            }
            let at = lstar_now.wrapping_add(k.banner_from_lstar as u64);
            let Ok(Ok(b)) = m
                .read_batch(&[Read::kernel(d.cpu, at, k.banner.len() + 1)])
                .map(|mut v| v.remove(0))
            else {
                continue;
            };
            if b[..k.banner.len()] != *k.banner.as_bytes() || b[k.banner.len()] != 0 {
                continue;
            }
            if d.full_symbols {
                let all = std::fs::read_to_string(e.path().with_extension("symbols.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok());
                let Some(all) = all else { continue };
                k.kallsyms.symbols = all;
            }
            let delta = lstar_now.wrapping_sub(k.lstar) as i64;
            k.kallsyms.reindex();
            k.kallsyms.slide(delta, KERNEL_TEXT_MIN);
            k.lstar = lstar_now;
            k.from_cache = true;
            return Ok(Some(k));
        }
        Ok(None)
    }
}

/// One task as `ps` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Task {
    /// Global PID (thread id).
    pub pid: u32,
    /// Global thread-group id (the process's PID).
    pub tgid: u32,
    /// `real_parent->tgid` (0 for the idle task's children).
    pub ppid: u32,
    /// Real UID.
    pub uid: u32,
    /// Real GID.
    pub gid: u32,
    /// State letter (R S D T t X Z P I).
    pub state: char,
    /// `comm`.
    pub comm: String,
    /// A kernel thread (`PF_KTHREAD`).
    pub kthread: bool,
    /// Has a user address space (`mm` set): false for kernel threads, and
    /// for a usermode helper (`call_usermodehelper`, e.g. `modprobe`) until
    /// it execs, which runs without `PF_KTHREAD` under its kworker's name.
    #[serde(default, skip_serializing)]
    pub has_mm: bool,
    /// Start time, ns since boot (`start_boottime`).
    pub start_ns: u64,
    /// Address of the task_struct.
    pub addr: u64,
}

/// `task_state_index()` → letter (fs/proc/array.c `task_state_array`).
pub fn state_letter(state: u32, exit_state: u32) -> char {
    const TASK_REPORT: u32 = 0x7f;
    const TASK_IDLE: u32 = 0x402;
    const TASK_RTLOCK_WAIT: u32 = 0x1000;
    let mut s = (state | exit_state) & TASK_REPORT;
    if state == TASK_IDLE {
        s = TASK_REPORT + 1;
    }
    if state == TASK_RTLOCK_WAIT {
        s = 2;
    }
    let idx = 32 - s.leading_zeros();
    b"RSDTtXZPI"[idx.min(8) as usize] as char
}

struct Walker<'a, M> {
    c: &'a mut SnapshotCache<M>,
    sp: Space,
    kernel_half: u64,
}

impl<M: GuestMemory> Walker<'_, M> {
    fn bytes(&mut self, a: u64, n: usize) -> Result<Vec<u8>, LinuxError> {
        Ok(self.c.read(self.sp, a, n)?)
    }
    fn u64(&mut self, a: u64) -> Result<u64, LinuxError> {
        let b = self.bytes(a, 8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8")))
    }
    /// Exactly these bytes, in one batch, bypassing the page cache (small
    /// scattered reads: whole pages would cost more than they save).
    fn exact(&mut self, reads: &[Read]) -> Result<Vec<crate::memory::ReadResult>, LinuxError> {
        let mut out = Vec::with_capacity(reads.len());
        for chunk in reads.chunks(crate::memory::MAX_BATCH_OPS) {
            out.extend(self.c.inner().read_batch(chunk)?);
        }
        Ok(out)
    }
}

fn le32(b: &[u8], off: u64) -> u32 {
    let o = off as usize;
    b.get(o..o + 4)
        .map(|s| u32::from_le_bytes(s.try_into().expect("4")))
        .unwrap_or(0)
}

fn le64(b: &[u8], off: u64) -> u64 {
    let o = off as usize;
    b.get(o..o + 8)
        .map(|s| u64::from_le_bytes(s.try_into().expect("8")))
        .unwrap_or(0)
}

/// Slots of one xarray node (`XA_CHUNK_SIZE`).
const XA_CHUNK: u64 = 64;
/// Most xarray nodes visited.
const MAX_XA_NODES: usize = 1 << 16;

/// Every task through the PID IDR (`init_pid_ns.idr`), level by level so
/// that each level of the radix tree, then the `struct pid`s, then the
/// tasks are each one batch: a handful of SMIs whatever the task count.
/// Returns task addresses in PID order.
fn tasks_by_idr<M: GuestMemory>(
    w: &mut Walker<'_, M>,
    k: &Kernel,
    idr: &crate::btf::PidIdr,
) -> Result<Vec<u64>, LinuxError> {
    let ns = k
        .kallsyms
        .addr("init_pid_ns")
        .ok_or_else(|| LinuxError::NoSymbol("init_pid_ns".into()))?;
    let head = w.u64(ns + idr.ns_xa_head)?;
    let is_node = |e: u64| e & 3 == 2 && e > 4096;
    let mut leaves: Vec<u64> = Vec::new();
    let mut frontier: Vec<u64> = Vec::new();
    if is_node(head) {
        frontier.push(head - 2);
    } else if head != 0 && head & 3 == 0 {
        leaves.push(head);
    }
    let mut visited = 0usize;
    let mut depth = 0;
    while !frontier.is_empty() {
        depth += 1;
        visited += frontier.len();
        if depth > 12 || visited > MAX_XA_NODES {
            return Err(LinuxError::BadList {
                list: "init_pid_ns.idr",
                problem: format!("deeper than 12 levels or more than {MAX_XA_NODES} nodes"),
                count: visited,
            });
        }
        let len = (idr.node_slots + 8 * XA_CHUNK) as usize;
        let reads: Vec<Read> = frontier
            .iter()
            .map(|&n| Read {
                space: w.sp,
                addr: n,
                len,
            })
            .collect();
        let res = w.exact(&reads)?;
        let mut next = Vec::new();
        for (r, b) in reads.iter().zip(res) {
            let b = b.map_err(|fault| MemoryError::Fault {
                space: r.space,
                addr: r.addr,
                len: r.len,
                fault,
            })?;
            for i in 0..XA_CHUNK {
                let e = le64(&b, idr.node_slots + 8 * i);
                if e == 0 {
                    continue;
                }
                if is_node(e) {
                    if e - 2 < w.kernel_half {
                        continue;
                    }
                    next.push(e - 2);
                } else if e & 3 == 0 && e >= w.kernel_half {
                    leaves.push(e);
                }
            }
        }
        frontier = next;
    }
    if leaves.len() > MAX_TASKS {
        return Err(LinuxError::BadList {
            list: "init_pid_ns.idr",
            problem: format!("more than {MAX_TASKS} PIDs"),
            count: leaves.len(),
        });
    }
    // struct pid -> tasks[PIDTYPE_PID].first -> task.
    let reads: Vec<Read> = leaves
        .iter()
        .map(|&p| Read {
            space: w.sp,
            addr: p + idr.pid_tasks,
            len: 8,
        })
        .collect();
    let mut tasks = Vec::with_capacity(leaves.len());
    for r in w.exact(&reads)? {
        let Ok(b) = r else { continue };
        let first = le64(&b, 0);
        if first >= w.kernel_half {
            tasks.push(first - idr.task_pid_links);
        }
    }
    Ok(tasks)
}

/// The task fields a listing copies from each `task_struct`, in
/// WALK_LIST order (indices: the `TF_*` constants).
fn task_fields(o: &crate::btf::Offsets) -> Result<Vec<WalkField>, LinuxError> {
    let off = |v: u64| {
        u32::try_from(v)
            .map_err(|_| LinuxError::NoSymbol(format!("a task field offset below 4 GiB ({v:#x})")))
    };
    let at = |v: u64, len: u32| -> Result<WalkField, LinuxError> {
        Ok(WalkField {
            offset: off(v)?,
            len,
            deref: None,
        })
    };
    let through = |v: u64, to: u64, len: u32| -> Result<WalkField, LinuxError> {
        Ok(WalkField {
            offset: off(v)?,
            len,
            deref: Some(off(to)?),
        })
    };
    let mut f = vec![
        at(o.task_pid, 4)?,
        at(o.task_tgid, 4)?,
        at(o.task_comm, 16)?,
        at(o.task_state, 4)?,
        at(o.task_exit_state, 4)?,
        at(o.task_flags, 4)?,
        at(o.task_start, 8)?,
        at(o.task_real_parent, 8)?,
        through(o.task_real_parent, o.task_tgid, 4)?,
        through(o.task_cred, o.cred_uid, 4)?,
        through(o.task_cred, o.cred_gid, 4)?,
        at(o.task_mm, 8)?,
        at(o.task_signal, 8)?,
    ];
    if let Some(nr) = o.signal_nr_threads {
        f.push(through(o.task_signal, nr, 4)?);
    }
    Ok(f)
}

const TF_PID: usize = 0;
const TF_TGID: usize = 1;
const TF_COMM: usize = 2;
const TF_STATE: usize = 3;
const TF_EXIT_STATE: usize = 4;
const TF_FLAGS: usize = 5;
const TF_START: usize = 6;
const TF_PARENT: usize = 7;
const TF_PARENT_TGID: usize = 8;
const TF_UID: usize = 9;
const TF_GID: usize = 10;
const TF_MM: usize = 11;
const TF_SIGNAL: usize = 12;
const TF_NR_THREADS: usize = 13;

/// One task from a walk entry (`init` = init_task, whose children have
/// ppid 0); `None` if its own pid or tgid could not be read (a task being
/// freed).
fn task_of(e: &WalkEntry, init: u64) -> Option<Task> {
    e.uint(TF_PID)?;
    e.uint(TF_TGID)?;
    let u32f = |i| e.uint(i).map_or(u32::MAX, |v| v as u32);
    Some(Task {
        pid: u32f(TF_PID),
        tgid: u32f(TF_TGID),
        ppid: if e.uint(TF_PARENT) == Some(init) {
            0
        } else {
            u32f(TF_PARENT_TGID)
        },
        uid: u32f(TF_UID),
        gid: u32f(TF_GID),
        state: state_letter(u32f(TF_STATE), u32f(TF_EXIT_STATE)),
        comm: read_cstr(e.bytes(TF_COMM)),
        kthread: u32f(TF_FLAGS) & PF_KTHREAD != 0,
        has_mm: e.uint(TF_MM).is_some_and(|m| m != 0),
        start_ns: e.uint(TF_START).unwrap_or(0),
        addr: e.container,
    })
}

/// Every container of a walk a kernel address, none repeated (a list that
/// loops without passing its head, or points into user space, is a
/// finding, not a long list).
fn check_links(
    r: &WalkResult,
    list: &'static str,
    kernel_half: u64,
    link_offset: u64,
) -> Result<(), LinuxError> {
    let mut seen = HashSet::new();
    for (n, e) in r.entries.iter().enumerate() {
        let node = e.container.wrapping_add(link_offset);
        if node < kernel_half || !seen.insert(e.container) {
            return Err(LinuxError::BadList {
                list,
                problem: format!("entry {node:#x} is not a kernel address or repeats"),
                count: n,
            });
        }
    }
    Ok(())
}

/// The walk stopped before its head for want of room, entries or work
/// budget (not a broken pointer): the list is longer than one request.
fn too_long(r: &WalkResult) -> bool {
    use smmvmi_mailbox::wire::Status;
    r.stop
        .is_some_and(|f| matches!(f.status, Status::TooLarge | Status::WorkLimit))
}

/// A walk's entries, checked ([`check_links`]) and complete.
fn checked_entries(
    r: WalkResult,
    list: &'static str,
    kernel_half: u64,
    link_offset: u64,
) -> Result<Vec<WalkEntry>, LinuxError> {
    check_links(&r, list, kernel_half, link_offset)?;
    if let Some(f) = r.stop {
        return Err(LinuxError::BadList {
            list,
            problem: if too_long(&r) {
                format!(
                    "longer than one request holds ({} entries read, {:?})",
                    r.entries.len(),
                    f.status
                )
            } else {
                format!("a next pointer could not be read: {f}")
            },
            count: r.entries.len(),
        });
    }
    Ok(r.entries)
}

/// Lists processes (and their threads with `threads`), in PID order: the
/// task list (`init_task.tasks`) walked by the agent with every field a
/// listing shows (parent, credentials and thread count through their
/// pointers) in one request, one SMI; with `threads`, the thread lists of
/// the processes that have more than one in a second. A task list longer
/// than one walk holds is listed through the PID IDR instead
/// ([`ps_by_idr`]).
pub fn ps<M: GuestMemory>(
    c: &mut SnapshotCache<M>,
    k: &Kernel,
    cpu: u32,
    threads: bool,
) -> Result<Vec<Task>, LinuxError> {
    ps_lists(c, k, cpu, threads, true)
}

/// The tasks on the task list (and, with `threads`, the thread lists)
/// only, never through the PID IDR: one view of the hidden-process check.
pub fn ps_task_list<M: GuestMemory>(
    c: &mut SnapshotCache<M>,
    k: &Kernel,
    cpu: u32,
    threads: bool,
) -> Result<Vec<Task>, LinuxError> {
    ps_lists(c, k, cpu, threads, false)
}

fn ps_lists<M: GuestMemory>(
    c: &mut SnapshotCache<M>,
    k: &Kernel,
    cpu: u32,
    threads: bool,
    idr_fallback: bool,
) -> Result<Vec<Task>, LinuxError> {
    let o = &k.offsets;
    let idr_ok = idr_fallback && o.pid_idr.is_some();
    let init = k
        .kallsyms
        .addr("init_task")
        .ok_or_else(|| LinuxError::NoSymbol("init_task".into()))?;
    let fields = task_fields(o)?;
    let link = |v: u64| {
        u16::try_from(v)
            .map_err(|_| LinuxError::NoSymbol(format!("a list link offset below 64 KiB ({v:#x})")))
    };
    let space = AddressSpace::kernel_of(cpu);
    let walk = ListWalk {
        space,
        head: init + o.task_tasks,
        link_offset: link(o.task_tasks)?,
        max_entries: MAX_WALK_ENTRIES,
        fields: fields.clone(),
    };
    // An agent without WALK_LIST would pay a request per pointer: the PID
    // IDR's level-by-level batches are cheaper there.
    if !c.inner().walks_in_agent()? && idr_ok {
        return ps_by_idr(c, k, cpu, threads);
    }
    let r = c.inner().walk_lists(std::slice::from_ref(&walk))?.remove(0);
    // Repeats and wild pointers are findings, whatever else happened.
    check_links(&r, "init_task.tasks", k.kernel_half, o.task_tasks)?;
    if too_long(&r) && idr_ok {
        return ps_by_idr(c, k, cpu, threads);
    }
    let leaders = checked_entries(r, "init_task.tasks", k.kernel_half, o.task_tasks)?;
    let mut tasks: Vec<Task> = leaders.iter().filter_map(|e| task_of(e, init)).collect();
    if threads {
        // Only processes with more than one thread (all, if the kernel's
        // BTF does not say how many), each walk sized by its count.
        let mut walks = Vec::new();
        for e in &leaders {
            let nr = match o.signal_nr_threads {
                Some(_) => match e.uint(TF_NR_THREADS) {
                    Some(n) if n as u32 <= 1 => continue,
                    Some(n) => (n as u32).saturating_add(64).min(MAX_WALK_ENTRIES),
                    None => MAX_WALK_ENTRIES,
                },
                None => MAX_WALK_ENTRIES,
            };
            let w = if let (Some(node), Some(head)) = (o.task_thread_node, o.signal_thread_head) {
                // 6.7+: signal->thread_head lists every thread, leader included.
                let Some(sig) = e.uint(TF_SIGNAL).filter(|&s| s >= k.kernel_half) else {
                    continue;
                };
                ListWalk {
                    head: sig + head,
                    link_offset: link(node)?,
                    max_entries: nr,
                    ..walk.clone()
                }
            } else if let Some(tg) = o.task_thread_group {
                // Before 6.7: the leader's thread_group lists the others.
                ListWalk {
                    head: e.container + tg,
                    link_offset: link(tg)?,
                    max_entries: nr,
                    ..walk.clone()
                }
            } else {
                continue;
            };
            walks.push(w);
        }
        let leader_addrs: HashSet<u64> = leaders.iter().map(|e| e.container).collect();
        for (w, r) in walks.iter().zip(c.inner().walk_lists(&walks)?) {
            check_links(&r, "thread list", k.kernel_half, u64::from(w.link_offset))?;
            if too_long(&r) && idr_ok {
                // A process with more threads than one walk holds.
                return ps_by_idr(c, k, cpu, threads);
            }
            for e in checked_entries(r, "thread list", k.kernel_half, u64::from(w.link_offset))? {
                if !leader_addrs.contains(&e.container)
                    && let Some(t) = task_of(&e, init)
                {
                    tasks.push(t);
                }
            }
            if tasks.len() > MAX_TASKS {
                return Err(LinuxError::BadList {
                    list: "threads",
                    problem: format!("more than {MAX_TASKS} tasks"),
                    count: tasks.len(),
                });
            }
        }
    }
    tasks.sort_by_key(|t| (t.pid, t.addr));
    Ok(tasks)
}

/// Lists processes (and their threads with `threads`) through the PID
/// allocator (`init_pid_ns.idr`), not the task list: a second view of the
/// same tasks (a task unlinked from one is still in the other), in a
/// handful of requests whatever the task count.
pub fn ps_by_idr<M: GuestMemory>(
    c: &mut SnapshotCache<M>,
    k: &Kernel,
    cpu: u32,
    threads: bool,
) -> Result<Vec<Task>, LinuxError> {
    let all = idr_task_addrs(c, k, cpu)?;
    let mut tasks = describe_tasks(c, k, cpu, &all)?;
    if !threads {
        tasks.retain(|t| t.pid == t.tgid);
    }
    Ok(tasks)
}

/// The `task_struct` address of every task with a PID in `init_pid_ns`
/// (threads included), through the PID allocator: [`ps_by_idr`] without
/// reading the tasks themselves.
pub fn idr_task_addrs<M: GuestMemory>(
    c: &mut SnapshotCache<M>,
    k: &Kernel,
    cpu: u32,
) -> Result<Vec<u64>, LinuxError> {
    let idr = k.offsets.pid_idr.ok_or_else(|| {
        LinuxError::NoSymbol("the PID IDR types (pid_namespace.idr, xa_node) in BTF".into())
    })?;
    let mut w = Walker {
        c: &mut *c,
        sp: kspace(cpu),
        kernel_half: k.kernel_half,
    };
    tasks_by_idr(&mut w, k, &idr)
}

/// Reads each task of `all` (task structs in one batch, then parents and
/// credentials in one).
pub(crate) fn describe_tasks<M: GuestMemory>(
    c: &mut SnapshotCache<M>,
    k: &Kernel,
    cpu: u32,
    all: &[u64],
) -> Result<Vec<Task>, LinuxError> {
    let o = &k.offsets;
    let init = k
        .kallsyms
        .addr("init_task")
        .ok_or_else(|| LinuxError::NoSymbol("init_task".into()))?;
    // Only the span of the fields read, not the whole task_struct.
    let span = [
        o.task_pid + 4,
        o.task_tgid + 4,
        o.task_comm + 16,
        o.task_real_parent + 8,
        o.task_cred + 8,
        o.task_state + 4,
        o.task_exit_state + 4,
        o.task_flags + 4,
        o.task_start + 8,
        o.task_mm + 8,
    ]
    .into_iter()
    .max()
    .unwrap_or(0)
    .min(o.task_size.min(32 << 10)) as usize;
    let mut w = Walker {
        c,
        sp: kspace(cpu),
        kernel_half: k.kernel_half,
    };
    let reads: Vec<Read> = all.iter().map(|&a| Read::kernel(cpu, a, span)).collect();
    let mut raw = Vec::with_capacity(all.len());
    for (r, res) in reads.iter().zip(w.exact(&reads)?) {
        // A task freed between the IDR read and now is left out.
        if let Ok(b) = res {
            raw.push((r.addr, b));
        }
    }
    // Parents and credentials, batched.
    let mut extra = Vec::new();
    for (_, b) in &raw {
        extra.push(Read::kernel(
            cpu,
            le64(b, o.task_real_parent) + o.task_tgid,
            4,
        ));
        extra.push(Read::kernel(cpu, le64(b, o.task_cred) + o.cred_uid, 4));
        extra.push(Read::kernel(cpu, le64(b, o.task_cred) + o.cred_gid, 4));
    }
    let vals = w.exact(&extra)?;
    let v32 = |i: usize| {
        vals[i]
            .as_ref()
            .ok()
            .map(|d| u32::from_le_bytes(d[..4].try_into().expect("4")))
            .unwrap_or(u32::MAX)
    };
    let mut out = Vec::with_capacity(raw.len());
    for (i, (t, b)) in raw.iter().enumerate() {
        let comm = &b[o.task_comm as usize..(o.task_comm as usize + 16).min(b.len())];
        let pid = le32(b, o.task_pid);
        out.push(Task {
            pid,
            tgid: le32(b, o.task_tgid),
            ppid: if le64(b, o.task_real_parent) == init {
                0
            } else {
                v32(3 * i)
            },
            uid: v32(3 * i + 1),
            gid: v32(3 * i + 2),
            state: state_letter(le32(b, o.task_state), le32(b, o.task_exit_state)),
            comm: read_cstr(comm),
            kthread: le32(b, o.task_flags) & PF_KTHREAD != 0,
            has_mm: le64(b, o.task_mm) != 0,
            start_ns: le64(b, o.task_start),
            addr: *t,
        });
    }
    Ok(out)
}

/// One process of a process tree and its children (by `ppid`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TreeNode {
    /// The process.
    #[serde(flatten)]
    pub task: Task,
    /// Its children, in PID order.
    pub children: Vec<TreeNode>,
}

impl TreeNode {
    /// The tree as `(depth, task)` in display order (depth 0 = a root).
    pub fn lines(&self) -> Vec<(usize, &Task)> {
        let mut out = Vec::new();
        let mut stack = vec![(0usize, self)];
        while let Some((d, n)) = stack.pop() {
            out.push((d, &n.task));
            stack.extend(n.children.iter().rev().map(|c| (d + 1, c)));
        }
        out
    }
}

/// Deepest level of a [`pstree`]; deeper tasks start trees of their own
/// (a guest controls its ppid chains: the tree must stay shallow enough to
/// print, serialize and drop without deep recursion).
pub const MAX_TREE_DEPTH: usize = 256;

/// Arranges `tasks` as trees by parent (`ppid`), roots in PID order: the
/// children of the idle task (ppid 0) and every task whose parent is not in
/// `tasks` (a parent that is a thread, or hidden), so that no task is left
/// out. Each task appears once, however the ppids loop; a task deeper than
/// [`MAX_TREE_DEPTH`] starts a tree of its own. Built without recursion.
pub fn pstree(tasks: &[Task]) -> Vec<TreeNode> {
    use std::collections::{HashMap, VecDeque};
    let mut sorted: Vec<&Task> = tasks.iter().collect();
    sorted.sort_by_key(|t| (t.pid, t.addr));
    let n = sorted.len();
    let mut by_pid: HashMap<u32, usize> = HashMap::new();
    for (i, t) in sorted.iter().enumerate() {
        by_pid.entry(t.pid).or_insert(i);
    }
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut has_parent = vec![false; n];
    for (i, t) in sorted.iter().enumerate() {
        if t.ppid != 0
            && let Some(&p) = by_pid.get(&t.ppid)
            && p != i
        {
            children[p].push(i);
            has_parent[i] = true;
        }
    }
    // Breadth first from each root; tasks not reached (ppid loops, or too
    // deep) become roots in turn.
    let mut placed = vec![false; n];
    let mut depth = vec![0usize; n];
    let mut kids: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut order: Vec<usize> = Vec::with_capacity(n);
    let mut roots: Vec<usize> = Vec::new();
    let mut grow = |r: usize, placed: &mut Vec<bool>, order: &mut Vec<usize>| {
        placed[r] = true;
        depth[r] = 0;
        let mut queue = VecDeque::from([r]);
        while let Some(x) = queue.pop_front() {
            order.push(x);
            if depth[x] + 1 >= MAX_TREE_DEPTH {
                continue;
            }
            for &c in &children[x] {
                if !placed[c] {
                    placed[c] = true;
                    depth[c] = depth[x] + 1;
                    kids[x].push(c);
                    queue.push_back(c);
                }
            }
        }
    };
    for i in 0..n {
        if !has_parent[i] && !placed[i] {
            roots.push(i);
            grow(i, &mut placed, &mut order);
        }
    }
    for i in 0..n {
        if !placed[i] {
            roots.push(i);
            grow(i, &mut placed, &mut order);
        }
    }
    // Children before parents: build the nested nodes bottom up.
    let mut built: Vec<Option<TreeNode>> = vec![None; n];
    for &x in order.iter().rev() {
        let children = kids[x].iter().filter_map(|&c| built[c].take()).collect();
        built[x] = Some(TreeNode {
            task: sorted[x].clone(),
            children,
        });
    }
    roots.into_iter().filter_map(|r| built[r].take()).collect()
}

/// One module as /proc/modules shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Module {
    /// Name.
    pub name: String,
    /// Size in bytes (as /proc/modules).
    pub size: u64,
    /// Reference count (-1 without CONFIG_MODULE_UNLOAD).
    pub refcount: i64,
    /// Live, Loading or Unloading.
    pub state: String,
    /// Base address (text).
    pub base: u64,
    /// Address of `struct module`.
    pub addr: u64,
    /// Every memory region of the module, `(base, size)` in bytes (6.4+:
    /// each `mem[]` type; before: core and init layouts): what the
    /// checks name a hook's owner by.
    #[serde(default)]
    pub regions: Vec<(u64, u64)>,
}

impl Module {
    /// True if `addr` lies in one of the module's regions.
    pub fn contains(&self, addr: u64) -> bool {
        self.regions.iter().any(|&(b, n)| addr.wrapping_sub(b) < n)
    }
}

/// Lists modules in list order (as /proc/modules).
pub fn lsmod<M: GuestMemory>(
    c: &mut SnapshotCache<M>,
    k: &Kernel,
    cpu: u32,
) -> Result<Vec<Module>, LinuxError> {
    let o = &k.offsets;
    let head = k
        .kallsyms
        .addr("modules")
        .ok_or_else(|| LinuxError::NoSymbol("modules".into()))?;
    // Fields: name, state, refcnt, then one (base, size) region per field:
    // 6.4+ every `mem[i]` (`module_memory { base; size; }`), before that
    // the core and init layouts (`module_layout { base; size; }`).
    let at = |v: u64, len: u64| -> Result<WalkField, LinuxError> {
        Ok(WalkField {
            offset: u32::try_from(v).map_err(|_| {
                LinuxError::NoSymbol(format!("a module field offset below 4 GiB ({v:#x})"))
            })?,
            len: len.clamp(1, u64::from(smmvmi_mailbox::walk::MAX_FIELD_LEN)) as u32,
            deref: None,
        })
    };
    let mut fields = vec![
        at(o.module_name.offset, o.module_name.size)?,
        at(o.module_state, 4)?,
        at(o.module_refcnt.unwrap_or(o.module_state), 4)?,
    ];
    // (offset of base, distance from base to the 4-byte size)
    let mut regions: Vec<(u64, u64)> = Vec::new();
    if let Some((m, e, n, bo, so)) = o.module_mem {
        for i in 0..n.min(smmvmi_mailbox::walk::MAX_WALK_FIELDS as u64 - 3) {
            regions.push((m + i * e + bo, so.wrapping_sub(bo)));
        }
    } else if let Some((bo, so, io)) = o.module_core_layout {
        regions.push((bo, so.wrapping_sub(bo)));
        // init_layout.base lies as far before its size as core's does.
        regions.push((io.wrapping_sub(so.wrapping_sub(bo)), so.wrapping_sub(bo)));
    }
    for &(base_at, to_size) in &regions {
        if !(8..=248).contains(&to_size) {
            return Err(LinuxError::NoSymbol(format!(
                "a module memory layout with its size after its base (found {to_size:#x} bytes apart)"
            )));
        }
        fields.push(at(base_at, to_size + 4)?);
    }
    let link = u16::try_from(o.module_list)
        .map_err(|_| LinuxError::NoSymbol("module.list below 64 KiB".into()))?;
    let walk = ListWalk {
        space: AddressSpace::kernel_of(cpu),
        head,
        link_offset: link,
        max_entries: MAX_MODULES as u32,
        fields,
    };
    let r = c.inner().walk_lists(std::slice::from_ref(&walk))?.remove(0);
    let mut out = Vec::new();
    for e in checked_entries(r, "modules", k.kernel_half, o.module_list)? {
        let state = e.uint(1).unwrap_or(u64::MAX);
        if state == 3 {
            continue; // MODULE_STATE_UNFORMED: /proc/modules skips it.
        }
        let regions: Vec<(u64, u64)> = regions
            .iter()
            .enumerate()
            .map(|(i, &(_, to_size))| {
                let b = e.bytes(3 + i);
                let le = |at: usize, n: usize| {
                    let mut a = [0u8; 8];
                    if let Some(s) = b.get(at..at + n) {
                        a[..n].copy_from_slice(s);
                    }
                    u64::from_le_bytes(a)
                };
                (le(0, 8), le(to_size as usize, 4))
            })
            .collect();
        let base = regions.first().map_or(0, |r| r.0);
        let size: u64 = regions.iter().map(|r| r.1).sum();
        let regions: Vec<(u64, u64)> = regions.into_iter().filter(|r| r.1 > 0).collect();
        out.push(Module {
            name: read_cstr(e.bytes(0)),
            size,
            refcount: match (o.module_refcnt, e.uint(2)) {
                (Some(_), Some(r)) => i64::from(r as u32 as i32) - 1,
                _ => -1,
            },
            state: match state {
                0 => "Live",
                1 => "Loading",
                2 => "Unloading",
                _ => "?",
            }
            .into(),
            base,
            addr: e.container,
            regions,
        });
    }
    Ok(out)
}

/// What one vCPU runs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CpuView {
    /// Agent CPU index.
    pub cpu: u32,
    /// CR3 as saved.
    pub cr3: u64,
    /// RIP as saved.
    pub rip: u64,
    /// True if the CPU was in user mode (CPL 3).
    pub user: bool,
    /// The kernel's GS base for this CPU (per-CPU area offset).
    pub gs_base: u64,
    /// `current` task_struct.
    pub current: u64,
    /// Its PID and comm.
    pub pid: u32,
    /// comm.
    pub comm: String,
    /// The task is exiting (`PF_EXITING` or an `exit_state`): an exiting
    /// task still runs on its CPU after `release_task()` has taken it off
    /// `init_task.tasks` (kernel/exit.c), until its last `schedule()`.
    pub exiting: bool,
}

/// `current` of every CPU, through each CPU's kernel GS base.
pub fn cpus<M: GuestMemory>(
    c: &mut SnapshotCache<M>,
    k: &Kernel,
) -> Result<Vec<CpuView>, LinuxError> {
    let cur_sym = k
        .kallsyms
        .addr("current_task")
        .or_else(|| k.kallsyms.addr("pcpu_hot"))
        .ok_or_else(|| LinuxError::NoSymbol("current_task or pcpu_hot".into()))?;
    let states: Vec<CpuState> = c.cpu_states()?.iter().take(64).copied().collect();
    // The kernel's GS base: MSR_GS_BASE in the kernel, MSR_KERNEL_GS_BASE
    // (swapped by SWAPGS) in user mode.
    let gs: Vec<(bool, u64)> = states
        .iter()
        .map(|st| {
            let user = st.cs_selector & 3 == 3;
            (
                user,
                if user {
                    st.msr_kernel_gs_base
                } else {
                    st.msr_gs_base
                },
            )
        })
        .collect();
    // Every CPU's `current` in one batch, then every task in one more.
    let at = |i: usize| gs[i].1.wrapping_add(cur_sym);
    let reads: Vec<Read> = (0..gs.len())
        .map(|i| Read::kernel(i as u32, at(i), 8))
        .collect();
    c.prefetch(&reads)?;
    let mut currents: Vec<u64> = Vec::with_capacity(gs.len());
    for i in 0..gs.len() {
        let b = c.read_opt(kspace(i as u32), at(i), 8)?;
        currents.push(b.map_or(0, |b| le64(&b, 0)));
    }
    let o = &k.offsets;
    let len = (o.task_comm + 16)
        .max(o.task_flags + 4)
        .max(o.task_exit_state + 4) as usize;
    let reads: Vec<Read> = currents
        .iter()
        .enumerate()
        .filter(|&(_, &cur)| cur >= k.kernel_half)
        .map(|(i, &cur)| Read::kernel(i as u32, cur, len))
        .collect();
    c.prefetch(&reads)?;
    let mut out = Vec::new();
    for (i, st) in states.iter().enumerate() {
        let (user, gs) = gs[i];
        let sp = kspace(i as u32);
        let current = currents[i];
        let task = if current >= k.kernel_half {
            c.read_opt(sp, current, len)?
        } else {
            None
        };
        let (pid, comm, exiting) = match task {
            Some(b) => (
                le32(&b, o.task_pid),
                read_cstr(&b[o.task_comm as usize..]),
                le32(&b, o.task_flags) & PF_EXITING != 0 || le32(&b, o.task_exit_state) != 0,
            ),
            None => (0, String::new(), false),
        };
        out.push(CpuView {
            cpu: i as u32,
            cr3: st.cr3,
            rip: st.rip,
            user,
            gs_base: gs,
            current,
            pid,
            comm,
            exiting,
        });
    }
    Ok(out)
}

/// True if the task at `addr` is exiting (`PF_EXITING` or an
/// `exit_state`); false if it cannot be read (a fault).
pub(crate) fn task_exiting<M: GuestMemory>(
    c: &mut SnapshotCache<M>,
    k: &Kernel,
    cpu: u32,
    addr: u64,
) -> Result<bool, LinuxError> {
    let o = &k.offsets;
    let mut word = |off: u64| -> Result<u32, LinuxError> {
        Ok(c.read_opt(kspace(cpu), addr + off, 4)?
            .map_or(0, |b| le32(&b, 0)))
    };
    Ok(word(o.task_flags)? & PF_EXITING != 0 || word(o.task_exit_state)? != 0)
}

/// Most run-queue entities visited over all CPUs.
const MAX_RUNQUEUE_NODES: usize = 1 << 14;

/// The runnable tasks on every CPU's CFS run queue, as (CPU, `task_struct`
/// address): `runqueues` through each CPU's kernel GS base (from `cpus`),
/// its `cfs.tasks_timeline` tree walked one batch per level, group
/// entities (`my_q`) followed into their own queue. The running task is
/// not on its queue (it is the CPU's `current`). Needs
/// [`crate::btf::RunQueue`].
pub fn runqueue_tasks<M: GuestMemory>(
    c: &mut SnapshotCache<M>,
    k: &Kernel,
    cpus: &[CpuView],
) -> Result<Vec<(u32, u64)>, LinuxError> {
    let rq = k
        .offsets
        .run_queue
        .ok_or_else(|| LinuxError::NoSymbol("the run queue types (rq, cfs_rq) in BTF".into()))?;
    let runqueues = k
        .kallsyms
        .addr("runqueues")
        .ok_or_else(|| LinuxError::NoSymbol("runqueues".into()))?;
    let word = |r: &crate::memory::ReadResult| r.as_ref().ok().map_or(0, |b| le64(b, 0));
    let canonical = |a: u64| a >= k.kernel_half;
    // (CPU, address of an rb_root's rb_node pointer).
    let roots: Vec<(u32, u64)> = cpus
        .iter()
        .filter(|v| canonical(v.gs_base))
        .map(|v| (v.cpu, v.gs_base.wrapping_add(runqueues) + rq.rq_timeline))
        .collect();
    let got = c.read_many(
        &roots
            .iter()
            .map(|&(cpu, a)| Read::kernel(cpu, a, 8))
            .collect::<Vec<_>>(),
    )?;
    let mut level: Vec<(u32, u64)> = roots
        .iter()
        .zip(&got)
        .map(|(&(cpu, _), r)| (cpu, word(r)))
        .filter(|&(_, n)| canonical(n))
        .collect();
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    while !level.is_empty() && seen.len() < MAX_RUNQUEUE_NODES {
        level.retain(|&(_, n)| seen.insert(n));
        let reads: Vec<Read> = level
            .iter()
            .flat_map(|&(cpu, n)| {
                let se = n.wrapping_sub(rq.se_run_node);
                [
                    Read::kernel(cpu, n + rq.rb_right, 8),
                    Read::kernel(cpu, n + rq.rb_left, 8),
                    Read::kernel(cpu, se + rq.se_my_q.unwrap_or(0), 8),
                ]
            })
            .collect();
        let got = c.read_many(&reads)?;
        let mut next = Vec::new();
        let mut group_roots = Vec::new();
        for (i, &(cpu, n)) in level.iter().enumerate() {
            for child in [word(&got[3 * i]), word(&got[3 * i + 1])] {
                if canonical(child) {
                    next.push((cpu, child));
                }
            }
            let my_q = if rq.se_my_q.is_some() {
                word(&got[3 * i + 2])
            } else {
                0
            };
            if canonical(my_q) {
                group_roots.push((cpu, my_q + rq.cfs_timeline));
            } else {
                let se = n.wrapping_sub(rq.se_run_node);
                out.push((cpu, se.wrapping_sub(rq.task_se)));
            }
        }
        if !group_roots.is_empty() {
            let got = c.read_many(
                &group_roots
                    .iter()
                    .map(|&(cpu, a)| Read::kernel(cpu, a, 8))
                    .collect::<Vec<_>>(),
            )?;
            next.extend(
                group_roots
                    .iter()
                    .zip(&got)
                    .map(|(&(cpu, _), r)| (cpu, word(r)))
                    .filter(|&(_, n)| canonical(n)),
            );
        }
        level = next;
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
