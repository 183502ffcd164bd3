//! Rootkit checks that need no baseline: what the kernel's own layout says
//! must hold, checked in guest memory read through the agent.
//!
//! - [`check_syscalls`]: every entry of `sys_call_table` (and of
//!   `ia32_sys_call_table` and `x32_sys_call_table` where the kernel has
//!   them) points to a syscall function kallsyms names (`__x64_sys_*`,
//!   `__ia32_sys_*`, ...) in core kernel text; and every direct branch of
//!   the `x64_sys_call` dispatcher (6.1 stable with the branch-history fix,
//!   and 6.9+: those kernels dispatch through it, not through the table;
//!   arch/x86/entry/syscall_64.c) stays in core kernel text. A hook patched
//!   into the dispatcher is a branch into module memory.
//! - [`check_idt`]: on every vCPU, the IDTR the agent saved (base and
//!   limit the same on every CPU, as Linux loads one `idt_descr`), every
//!   present gate's handler inside the kernel's entry text
//!   (`__entry_text_start`..`__entry_text_end`: every IDT handler is an
//!   `asm_*` stub there, arch/x86/include/asm/idtentry.h) or, for a
//!   vector below 32 Linux installs nothing for, exactly its slot of
//!   `early_idt_handler_array` (arch/x86/kernel/head_64.S), and the syscall
//!   entry MSRs: LSTAR = `entry_SYSCALL_64`; CSTAR = `entry_SYSCALL_compat`
//!   (or `ignore_sysret`, or never written: 0 on Intel);
//!   SYSENTER_EIP = `entry_SYSENTER_compat` or 0 (arch/x86/kernel/cpu/common.c
//!   `syscall_init`).
//!
//! Every finding says what was expected, what was found and, where an
//! address lies in a module's memory, which module owns it.

use std::collections::BTreeMap;

use iced_x86::{Decoder, DecoderOptions, FlowControl};
use smmvmi_mailbox::wire::AddressSpace;

use crate::linux::{Kernel, LinuxError, Module, Task, kspace};
use crate::memory::{GuestMemory, SnapshotCache};

/// Most entries read from one syscall table (x86-64 has about 460).
pub const MAX_SYSCALLS: usize = 1024;
/// Most bytes of a dispatcher function decoded.
pub const MAX_DISPATCHER: u64 = 64 << 10;

/// One thing that is not as the kernel set it up.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Finding {
    /// The check (`syscalls`, `idt`, `msr`).
    pub check: String,
    /// What was checked (`sys_call_table[59]`, `cpu 1 IDT vector 0x80`).
    pub what: String,
    /// What the kernel's layout says it must be.
    pub expected: String,
    /// What it is: an address and where it lies.
    pub found: String,
    /// The address found.
    pub address: u64,
    /// The module whose memory holds `address`, if any.
    pub owner: Option<String>,
}

/// What a check looked at and what it found.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// The check.
    pub check: String,
    /// Items checked (table entries, gates, MSRs, branches).
    pub checked: usize,
    /// Findings (empty: clean).
    pub findings: Vec<Finding>,
}

/// Kernel text symbols by address, for naming what an address points to.
pub struct TextMap<'a> {
    by_addr: BTreeMap<u64, &'a str>,
    /// Core kernel text, `_stext`..`_etext`.
    pub text: (u64, u64),
    /// Entry text, `__entry_text_start`..`__entry_text_end` (core text if
    /// the kernel has no such symbols).
    pub entry: (u64, u64),
}

impl<'a> TextMap<'a> {
    /// From the kernel's symbols (the full table: `Discovery::full_symbols`).
    pub fn new(k: &'a Kernel) -> Result<Self, LinuxError> {
        let need = |n: &str| {
            k.kallsyms
                .addr(n)
                .ok_or_else(|| LinuxError::NoSymbol(n.into()))
        };
        let text = (need("_stext")?, need("_etext")?);
        let entry = match (
            k.kallsyms.addr("__entry_text_start"),
            k.kallsyms.addr("__entry_text_end"),
        ) {
            (Some(a), Some(b)) if a < b => (a, b),
            _ => text,
        };
        let by_addr = k
            .kallsyms
            .symbols
            .iter()
            .filter(|s| matches!(s.kind, 'T' | 't' | 'W' | 'w'))
            .map(|s| (s.addr, s.name.as_str()))
            .collect();
        Ok(Self {
            by_addr,
            text,
            entry,
        })
    }

    /// True if `a` is in core kernel text.
    pub fn in_text(&self, a: u64) -> bool {
        (self.text.0..self.text.1).contains(&a)
    }

    /// The symbol starting exactly at `a`.
    pub fn exact(&self, a: u64) -> Option<&'a str> {
        self.by_addr.get(&a).copied()
    }

    /// `name+0xoff` for an address in core text.
    pub fn describe(&self, a: u64) -> String {
        if !self.in_text(a) {
            return format!("{a:#x}");
        }
        match self.by_addr.range(..=a).next_back() {
            Some((&s, name)) if s == a => format!("{a:#x} ({name})"),
            Some((&s, name)) => format!("{a:#x} ({name}+{:#x})", a - s),
            None => format!("{a:#x}"),
        }
    }

    /// `name+0xoff` for any kernel address (text or data symbols).
    pub fn describe_any(&self, k: &Kernel, a: u64) -> String {
        let best = k
            .kallsyms
            .symbols
            .iter()
            .filter(|s| s.addr <= a)
            .max_by_key(|s| s.addr);
        match best {
            Some(s) if s.addr == a => s.name.clone(),
            Some(s) => format!("{}+{:#x}", s.name, a - s.addr),
            None => format!("{a:#x}"),
        }
    }

    /// The address of the symbol after `a` (its end, for sizing a table or
    /// a function).
    pub fn next_after(&self, k: &Kernel, a: u64) -> Option<u64> {
        k.kallsyms
            .symbols
            .iter()
            .map(|s| s.addr)
            .filter(|&x| x > a)
            .min()
    }
}

/// Where `a` lies, in words, and the owning module.
fn whereis(t: &TextMap<'_>, modules: &[Module], a: u64) -> (String, Option<String>) {
    if t.in_text(a) {
        return (format!("{} in core kernel text", t.describe(a)), None);
    }
    match modules.iter().find(|m| m.contains(a)) {
        Some(m) => (
            format!("{a:#x} in module {}'s memory", m.name),
            Some(m.name.clone()),
        ),
        None => (
            format!("{a:#x}, neither core kernel text nor a listed module's memory"),
            None,
        ),
    }
}

/// One syscall table: (symbol, the name prefixes its entries may have).
const TABLES: [(&str, &[&str]); 3] = [
    ("sys_call_table", &["__x64_sys_", "sys_ni_syscall"]),
    (
        "ia32_sys_call_table",
        &["__ia32_sys_", "__ia32_compat_sys_", "sys_ni_syscall"],
    ),
    (
        "x32_sys_call_table",
        &["__x64_sys_", "__x32_compat_sys_", "sys_ni_syscall"],
    ),
];

/// The entries of the syscall table at `at`: up to the symbol after it, or
/// the first zero (every slot below NR_syscalls holds a function,
/// sys_ni_syscall for the unused; the next symbol may lie beyond alignment
/// padding).
fn syscall_table<M: GuestMemory>(
    c: &mut SnapshotCache<M>,
    k: &Kernel,
    t: &TextMap<'_>,
    cpu: u32,
    at: u64,
) -> Result<Vec<u64>, LinuxError> {
    let r = syscall_table_read(k, t, cpu, at);
    Ok(c.read(r.space, r.addr, r.len)?
        .chunks_exact(8)
        .map(|e| u64::from_le_bytes(e.try_into().expect("8 bytes")))
        .take_while(|&a| a != 0)
        .collect())
}

/// The read of the syscall table at `at` ([`syscall_table`]'s bytes).
fn syscall_table_read(k: &Kernel, t: &TextMap<'_>, cpu: u32, at: u64) -> crate::memory::Read {
    let end = t.next_after(k, at).unwrap_or(at + 8);
    let n = (((end - at) / 8) as usize).clamp(1, MAX_SYSCALLS);
    crate::memory::Read::kernel(cpu, at, n * 8)
}

/// The code of dispatcher `d` at `at`: up to the next symbol, at most
/// `MAX_DISPATCHER` bytes.
fn dispatcher_read(k: &Kernel, t: &TextMap<'_>, cpu: u32, at: u64) -> crate::memory::Read {
    let end = t
        .next_after(k, at)
        .unwrap_or(at + 1)
        .min(at + MAX_DISPATCHER);
    crate::memory::Read::kernel(cpu, at, (end - at) as usize)
}

/// The dispatchers of kernels that no longer branch through the tables.
const DISPATCHERS: [&str; 3] = ["x64_sys_call", "ia32_sys_call", "x32_sys_call"];

/// Checks the syscall tables and dispatchers (see the module docs).
/// `modules` (from [`crate::linux::lsmod`]) name the owners of foreign
/// code. Needs the full symbol table.
pub fn check_syscalls<M: GuestMemory>(
    c: &mut SnapshotCache<M>,
    k: &Kernel,
    cpu: u32,
    modules: &[Module],
) -> Result<Report, LinuxError> {
    let t = TextMap::new(k)?;
    let mut r = Report {
        check: "syscalls".into(),
        ..Report::default()
    };
    // Every table and dispatcher in one batch.
    let reads: Vec<crate::memory::Read> = TABLES
        .iter()
        .filter_map(|(n, _)| k.kallsyms.addr(n))
        .map(|at| syscall_table_read(k, &t, cpu, at))
        .chain(
            DISPATCHERS
                .iter()
                .filter_map(|n| k.kallsyms.addr(n))
                .map(|at| dispatcher_read(k, &t, cpu, at)),
        )
        .collect();
    c.prefetch(&reads)?;
    let mut found_table = false;
    for (table, prefixes) in TABLES {
        let Some(at) = k.kallsyms.addr(table) else {
            continue;
        };
        found_table = true;
        for (nr, target) in syscall_table(c, k, &t, cpu, at)?.into_iter().enumerate() {
            r.checked += 1;
            let name = t.exact(target);
            let ok = t.in_text(target)
                && name.is_some_and(|n| prefixes.iter().any(|p| n.starts_with(p)));
            if !ok {
                let (found, owner) = whereis(&t, modules, target);
                r.findings.push(Finding {
                    check: "syscalls".into(),
                    what: format!("{table}[{nr}]"),
                    expected: format!(
                        "a syscall function ({}) in core kernel text",
                        prefixes.join(", ")
                    ),
                    found,
                    address: target,
                    owner,
                });
            }
        }
    }
    if !found_table {
        return Err(LinuxError::NoSymbol("sys_call_table".into()));
    }
    for d in DISPATCHERS {
        let Some(at) = k.kallsyms.addr(d) else {
            continue;
        };
        let rd = dispatcher_read(k, &t, cpu, at);
        let end = at + rd.len as u64;
        let code = c.read(rd.space, at, rd.len)?;
        let mut dec = Decoder::with_ip(64, &code, at, DecoderOptions::NONE);
        while dec.can_decode() {
            let ins = dec.decode();
            if !matches!(
                ins.flow_control(),
                FlowControl::Call
                    | FlowControl::UnconditionalBranch
                    | FlowControl::ConditionalBranch
            ) {
                continue;
            }
            let target = ins.near_branch_target();
            if target == 0 || (at..end).contains(&target) {
                continue;
            }
            r.checked += 1;
            if !t.in_text(target) {
                let (found, owner) = whereis(&t, modules, target);
                r.findings.push(Finding {
                    check: "syscalls".into(),
                    what: format!("{d}+{:#x} ({})", ins.ip() - at, ins.mnemonic_name()),
                    expected: "a branch to a syscall function in core kernel text".into(),
                    found,
                    address: target,
                    owner,
                });
            }
        }
    }
    Ok(r)
}

/// The mnemonic, for a finding's `what`.
trait MnemonicName {
    fn mnemonic_name(&self) -> String;
}

impl MnemonicName for iced_x86::Instruction {
    fn mnemonic_name(&self) -> String {
        format!("{:?}", self.mnemonic()).to_lowercase()
    }
}

/// IDT gate descriptor size in long mode (Intel SDM vol. 3A 6.14.1).
const GATE: usize = 16;

/// Checks every vCPU's IDT and syscall entry MSRs (see the module docs).
pub fn check_idt<M: GuestMemory>(
    c: &mut SnapshotCache<M>,
    k: &Kernel,
    modules: &[Module],
) -> Result<Report, LinuxError> {
    let t = TextMap::new(k)?;
    let mut r = Report {
        check: "idt".into(),
        ..Report::default()
    };
    let sym = |n: &str| k.kallsyms.addr(n);
    let lstar =
        sym("entry_SYSCALL_64").ok_or_else(|| LinuxError::NoSymbol("entry_SYSCALL_64".into()))?;
    let cstar: Vec<u64> = ["entry_SYSCALL_compat", "ignore_sysret"]
        .iter()
        .filter_map(|n| sym(n))
        .chain([0])
        .collect();
    let sysenter: Vec<u64> = sym("entry_SYSENTER_compat")
        .into_iter()
        .chain([0])
        .collect();
    // (start, size of one slot): EARLY_IDT_HANDLER_SIZE is 9 bytes, 13
    // with IBT's ENDBR; the array holds the 32 exception vectors.
    let early_idt = sym("early_idt_handler_array").and_then(|a| {
        let size = (t.next_after(k, a)? - a) / 32;
        (5..=32).contains(&size).then_some((a, size))
    });
    let states = c.cpu_states()?.to_vec();
    // Every IDT in one batch.
    let tables: Vec<crate::memory::Read> = states
        .iter()
        .enumerate()
        .map(|(cpu, st)| {
            let entries = ((st.idtr_limit as usize + 1) / GATE).min(256);
            crate::memory::Read::kernel(cpu as u32, st.idtr_base, entries * GATE)
        })
        .filter(|r| r.len > 0)
        .collect();
    c.prefetch(&tables)?;
    let mut first_idtr: Option<(u64, u64)> = None;
    for (cpu, st) in states.iter().enumerate() {
        let cpu = cpu as u32;
        let mut push = |what: String, expected: String, a: u64| {
            let (found, owner) = whereis(&t, modules, a);
            r.findings.push(Finding {
                check: "idt".into(),
                what,
                expected,
                found,
                address: a,
                owner,
            });
        };
        // MSRs.
        r.checked += 3;
        if st.msr_lstar != lstar {
            push(
                format!("cpu {cpu} LSTAR"),
                format!("entry_SYSCALL_64 ({lstar:#x})"),
                st.msr_lstar,
            );
        }
        if !cstar.contains(&st.msr_cstar) {
            push(
                format!("cpu {cpu} CSTAR"),
                "entry_SYSCALL_compat, ignore_sysret or 0".into(),
                st.msr_cstar,
            );
        }
        if !sysenter.contains(&st.msr_sysenter_eip) {
            push(
                format!("cpu {cpu} SYSENTER_EIP"),
                "entry_SYSENTER_compat or 0".into(),
                st.msr_sysenter_eip,
            );
        }
        // IDTR.
        let idtr = (st.idtr_base, st.idtr_limit);
        r.checked += 1;
        match first_idtr {
            None => first_idtr = Some(idtr),
            Some(f) if f != idtr => push(
                format!("cpu {cpu} IDTR"),
                format!("the IDTR of cpu 0 (base {:#x}, limit {:#x})", f.0, f.1),
                idtr.0,
            ),
            Some(_) => {}
        }
        let entries = ((idtr.1 as usize + 1) / GATE).min(256);
        if entries == 0 {
            continue;
        }
        let idt = c.read(kspace(cpu), idtr.0, entries * GATE)?;
        for (v, g) in idt.chunks_exact(GATE).enumerate() {
            let attr = g[5];
            if attr & 0x80 == 0 {
                continue; // not present
            }
            r.checked += 1;
            let target = u64::from(u16::from_le_bytes([g[0], g[1]]))
                | u64::from(u16::from_le_bytes([g[6], g[7]])) << 16
                | u64::from(u32::from_le_bytes([g[8], g[9], g[10], g[11]])) << 32;
            // Vectors below 32 Linux installs no handler for (reserved
            // ones; #MC without MCE) keep the early handler of
            // arch/x86/kernel/head_64.S: entry `v` of early_idt_handler_array,
            // in init text.
            let early = early_idt.is_some_and(|(a, size)| v < 32 && target == a + size * v as u64);
            if !(t.entry.0..t.entry.1).contains(&target) && !early {
                push(
                    format!("cpu {cpu} IDT vector {v:#x}"),
                    "a handler in the kernel's entry text (__entry_text_start..__entry_text_end)"
                        .into(),
                    target,
                );
            }
        }
    }
    Ok(r)
}

/// Most red-black tree nodes visited in `mod_tree`.
const MAX_TREE_NODES: usize = 1 << 14;

/// Modules linked where the kernel links every loaded module but missing
/// from the `modules` list (`/proc/modules`, [`crate::linux::lsmod`]): in
/// `/sys/module` (`module_kset`'s kobjects, whose `module_kobject.mod` is
/// set for loaded modules) and in `mod_tree` (the latched tree of module
/// memory that `__module_address()` searches, kernel/module/tree_lookup.c).
/// A module that unlinks itself from the list and from sysfs stays in
/// `mod_tree` unless it also unlinks its memory, which breaks the kernel's
/// own address lookups (stack traces, kprobes, BPF). Needs the
/// `ModuleViews` offsets from BTF.
pub fn check_modules<M: GuestMemory>(
    c: &mut SnapshotCache<M>,
    k: &Kernel,
    cpu: u32,
    modules: &[Module],
) -> Result<Report, LinuxError> {
    let v = k.offsets.module_views.ok_or_else(|| {
        LinuxError::NoSymbol("the module kobject and mod_tree types in BTF".into())
    })?;
    let mut r = Report {
        check: "modules".into(),
        ..Report::default()
    };
    // The views are separate requests: a module loaded or unloaded between
    // them differs for a moment. A difference is read again, from a new
    // snapshot, and reported only if it stays.
    // The given list leaves out unformed modules (as /proc/modules does):
    // one that is still loading shows up here and is cleared by the
    // confirmation, which reads the whole list.
    let (checked, first) = modules_off_list(c, k, cpu, &v, modules.iter().map(|m| m.addr))?;
    r.checked = checked;
    if first.is_empty() {
        return Ok(r);
    }
    c.new_snapshot();
    let relisted = module_list_addrs(c, k, cpu)?;
    let (_, again) = modules_off_list(c, k, cpu, &v, relisted)?;
    let name = k.offsets.module_name;
    for (m, places) in first {
        if !again.contains_key(&m) {
            continue;
        }
        let module_name = c
            .read_opt(kspace(cpu), m + name.offset, name.size.min(64) as usize)?
            .map(|b| {
                let end = b.iter().position(|&x| x == 0).unwrap_or(b.len());
                String::from_utf8_lossy(&b[..end]).into_owned()
            })
            .unwrap_or_else(|| "?".into());
        r.findings.push(Finding {
            check: "modules".into(),
            what: format!("module {module_name} (struct module at {m:#x})"),
            expected: "every loaded module on the modules list (/proc/modules)".into(),
            found: format!("only in {}", places.join(" and ")),
            address: m,
            owner: Some(module_name),
        });
    }
    Ok(r)
}

/// Every `struct module` on the `modules` list, unformed ones included.
fn module_list_addrs<M: GuestMemory>(
    c: &mut SnapshotCache<M>,
    k: &Kernel,
    cpu: u32,
) -> Result<Vec<u64>, LinuxError> {
    use crate::memory::ListWalk;
    let head = k
        .kallsyms
        .addr("modules")
        .ok_or_else(|| LinuxError::NoSymbol("modules".into()))?;
    let walk = ListWalk {
        space: AddressSpace::kernel_of(cpu),
        head,
        link_offset: u16::try_from(k.offsets.module_list)
            .map_err(|_| LinuxError::NoSymbol("module.list below 64 KiB".into()))?,
        max_entries: crate::linux::MAX_MODULES as u32,
        fields: Vec::new(),
    };
    let res = c.inner().walk_lists(std::slice::from_ref(&walk))?.remove(0);
    Ok(res.entries.iter().map(|e| e.container).collect())
}

/// Modules in `/sys/module` or `mod_tree` whose `struct module` is not in
/// `listed`: (items checked, address → where seen).
fn modules_off_list<M: GuestMemory>(
    c: &mut SnapshotCache<M>,
    k: &Kernel,
    cpu: u32,
    v: &crate::btf::ModuleViews,
    listed: impl IntoIterator<Item = u64>,
) -> Result<(usize, BTreeMap<u64, Vec<&'static str>>), LinuxError> {
    use crate::memory::ListWalk;
    use smmvmi_mailbox::walk::Field;
    let listed: std::collections::HashSet<u64> = listed.into_iter().collect();
    let mut checked = 0usize;
    let mut elsewhere: BTreeMap<u64, Vec<&'static str>> = BTreeMap::new();
    // One batch for what needs no pointer from this snapshot: the kset
    // pointer, the tree's root, and the tree nodes of every listed module
    // (so the walk of the tree below reads from the cache unless a node
    // that no listed module holds turns up).
    let sym = |n: &str| k.kallsyms.addr(n);
    let mut first: Vec<crate::memory::Read> = [
        sym("module_kset"),
        sym("mod_tree").map(|a| a + v.mod_tree_roots),
    ]
    .into_iter()
    .flatten()
    .map(|a| crate::memory::Read::kernel(cpu, a, 8))
    .collect();
    if let Some((off, stride, n)) = v.module_mtn {
        for &m in &listed {
            for i in 0..n {
                let mtn = m + off + i * stride;
                let node = mtn + v.mtn_node;
                for a in [node + v.rb_right, node + v.rb_left, mtn + v.mtn_mod] {
                    first.push(crate::memory::Read::kernel(cpu, a, 8));
                }
            }
        }
    }
    c.prefetch(&first)?;
    // /sys/module: module_kset is a pointer to the kset.
    if let Some(sym) = k.kallsyms.addr("module_kset") {
        let kset = u64::from_le_bytes(c.read(kspace(cpu), sym, 8)?.try_into().expect("8 bytes"));
        if kset >= k.kernel_half {
            let walk = ListWalk {
                space: AddressSpace::kernel_of(cpu),
                head: kset + v.kset_list,
                link_offset: u16::try_from(v.mkobj_entry).map_err(|_| {
                    LinuxError::NoSymbol("module_kobject.kobj.entry below 64 KiB".into())
                })?,
                max_entries: smmvmi_mailbox::walk::MAX_WALK_ENTRIES,
                fields: vec![Field {
                    offset: v.mkobj_mod as u32,
                    len: 8,
                    deref: None,
                }],
            };
            let res = c.inner().walk_lists(std::slice::from_ref(&walk))?.remove(0);
            for e in &res.entries {
                checked += 1;
                if let Some(m) = e.uint(0).filter(|&m| m != 0) {
                    elsewhere
                        .entry(m)
                        .or_default()
                        .push("/sys/module (module_kset)");
                }
            }
        }
    }
    // mod_tree: breadth first over tree[0], one batch per level.
    if let Some(sym) = k.kallsyms.addr("mod_tree") {
        let root = u64::from_le_bytes(
            c.read(kspace(cpu), sym + v.mod_tree_roots, 8)?
                .try_into()
                .expect("8 bytes"),
        );
        let mut level = vec![root];
        let mut seen = std::collections::HashSet::new();
        while !level.is_empty() && seen.len() < MAX_TREE_NODES {
            let nodes: Vec<u64> = level
                .into_iter()
                .filter(|&n| n >= k.kernel_half && seen.insert(n))
                .collect();
            let reads: Vec<crate::memory::Read> = nodes
                .iter()
                .flat_map(|&n| {
                    let mtn = n.wrapping_sub(v.mtn_node);
                    [
                        crate::memory::Read::kernel(cpu, n + v.rb_right, 8),
                        crate::memory::Read::kernel(cpu, n + v.rb_left, 8),
                        crate::memory::Read::kernel(cpu, mtn + v.mtn_mod, 8),
                    ]
                })
                .collect();
            let got = c.read_many(&reads)?;
            let word = |i: usize| {
                got[i]
                    .as_ref()
                    .ok()
                    .map_or(0, |b| u64::from_le_bytes(b[..8].try_into().expect("8")))
            };
            level = Vec::new();
            for i in 0..nodes.len() {
                checked += 1;
                level.extend(
                    [word(3 * i), word(3 * i + 1)]
                        .into_iter()
                        .filter(|&x| x != 0),
                );
                let m = word(3 * i + 2);
                if m != 0 {
                    elsewhere
                        .entry(m)
                        .or_default()
                        .push("mod_tree (module memory)");
                }
            }
        }
    }
    elsewhere.retain(|m, places| {
        places.dedup();
        !listed.contains(m)
    });
    Ok((checked, elsewhere))
}

/// Tasks on no task list, by `task_struct` address: where each was seen.
type Hidden = BTreeMap<u64, (String, Task)>;

/// Tasks that have a PID (the PID allocator, `init_pid_ns.idr`), wait on
/// a CPU's CFS run queue (`runqueues`), or run on a CPU (each CPU's
/// `current`) but are on no task list (`init_task.tasks` and the thread
/// lists): a process unlinked to hide. The views are read one after
/// another, so a difference is read again from a new snapshot and
/// reported only if it stays. An exiting task (`PF_EXITING`,
/// kernel/exit.c) still runs, or waits to run, after `release_task()`
/// unlinked it: off the list legitimately, so not reported from the run
/// queues or `current`; a live task unlinked with `PF_EXITING` set to pass
/// is still found through the PID allocator, which does not skip exiting
/// tasks. Real-time and deadline queues are not read. Also user processes
/// named like a kernel thread (the name of one, or of a family such as
/// `kworker/…`).
pub fn check_processes<M: GuestMemory>(
    c: &mut SnapshotCache<M>,
    k: &Kernel,
    cpu: u32,
) -> Result<Report, LinuxError> {
    check_processes_listed(c, k, cpu, None)
}

/// [`check_processes`] with the first view's task list (threads
/// included, [`crate::linux::ps_task_list`]) already read in the current
/// snapshot, as a watch pass has it.
pub fn check_processes_of<M: GuestMemory>(
    c: &mut SnapshotCache<M>,
    k: &Kernel,
    cpu: u32,
    listed: Vec<Task>,
) -> Result<Report, LinuxError> {
    check_processes_listed(c, k, cpu, Some(listed))
}

fn check_processes_listed<M: GuestMemory>(
    c: &mut SnapshotCache<M>,
    k: &Kernel,
    cpu: u32,
    listed: Option<Vec<Task>>,
) -> Result<Report, LinuxError> {
    let mut r = Report {
        check: "processes".into(),
        ..Report::default()
    };
    // The first look uses the caller's snapshot (a watch pass shares its
    // pages); the confirmation takes a new one.
    // The task list is read first, the other views after it: a task
    // released in between is gone from the PID allocator too (one lock
    // unlinks both, kernel/exit.c __unhash_process), and a task forked in
    // between shows in a later view only: the confirmation, whose list is
    // read after that fork, clears it. A task_struct freed and reused by
    // a new task between the two rounds is told apart by its PID.
    let hidden = |c: &mut SnapshotCache<M>,
                  listed: Option<Vec<Task>>|
     -> Result<(Vec<Task>, usize, Hidden), LinuxError> {
        let listed = match listed {
            Some(l) => l,
            None => crate::linux::ps_task_list(c, k, cpu, true)?,
        };
        let on_list: std::collections::HashSet<u64> = listed.iter().map(|t| t.addr).collect();
        let by_idr = crate::linux::idr_task_addrs(c, k, cpu)?;
        let views = crate::linux::cpus(c, k)?;
        let queued = match k.offsets.run_queue {
            Some(_) => crate::linux::runqueue_tasks(c, k, &views)?,
            None => Vec::new(),
        };
        let seen_elsewhere = by_idr.len() + queued.len();
        // Where each task off the list was seen; only those are read.
        let mut places: BTreeMap<u64, String> = BTreeMap::new();
        for a in by_idr.into_iter().filter(|a| !on_list.contains(a)) {
            places.insert(a, "the PID allocator (init_pid_ns.idr)".into());
        }
        let mut from_queue = std::collections::HashSet::new();
        for (q, a) in queued.into_iter().filter(|(_, a)| !on_list.contains(a)) {
            if let std::collections::btree_map::Entry::Vacant(e) = places.entry(a) {
                e.insert(format!("cpu {q}'s run queue (CFS)"));
                from_queue.insert(a);
            }
        }
        let addrs: Vec<u64> = places.keys().copied().collect();
        let off = crate::linux::describe_tasks(c, k, cpu, &addrs)?;
        let mut out = BTreeMap::new();
        for t in &off {
            // A task preempted after release_task() unlinked it, on its
            // way out, waits on a run queue.
            if from_queue.contains(&t.addr) && crate::linux::task_exiting(c, k, cpu, t.addr)? {
                continue;
            }
            out.insert(t.addr, (places[&t.addr].clone(), t.clone()));
        }
        for v in views {
            // An exiting task runs on after release_task() unlinked it.
            if v.pid != 0 && v.current != 0 && !v.exiting && !on_list.contains(&v.current) {
                let t = off
                    .iter()
                    .find(|t| t.addr == v.current)
                    .cloned()
                    .unwrap_or(Task {
                        pid: v.pid,
                        tgid: v.pid,
                        ppid: 0,
                        uid: 0,
                        gid: 0,
                        state: 'R',
                        comm: v.comm.clone(),
                        kthread: false,
                        has_mm: false,
                        start_ns: 0,
                        addr: v.current,
                    });
                out.insert(v.current, (format!("cpu {}'s current task", v.cpu), t));
            }
        }
        Ok((listed, seen_elsewhere, out))
    };
    let (mut listed, seen_elsewhere, first) = hidden(c, listed)?;
    r.checked = listed.len() + seen_elsewhere;
    // A user process named like a kernel thread (`kworker/0:1`,
    // `ksoftirqd/1`, ...): the disguise of miners and backdoors (a write to
    // /proc/PID/comm or prctl(PR_SET_NAME) is all it takes). Processes:
    // the thread-group leaders of the listing.
    listed.retain(|t| t.pid == t.tgid);
    let kthreads: std::collections::HashSet<&str> = listed
        .iter()
        .filter(|t| t.kthread)
        .map(|t| t.comm.as_str())
        .collect();
    let families: std::collections::HashSet<&str> = kthreads
        .iter()
        .filter_map(|n| n.split_once('/').map(|(f, _)| f))
        .collect();
    // A usermode helper runs under its kworker's name without PF_KTHREAD
    // until it execs, but with no user address space yet; a dying task
    // has dropped its own.
    for t in listed
        .iter()
        .filter(|t| !t.kthread && t.has_mm && !matches!(t.state, 'Z' | 'X'))
    {
        let family = t.comm.split_once('/').map(|(f, _)| f);
        if kthreads.contains(t.comm.as_str()) || family.is_some_and(|f| families.contains(f)) {
            r.findings.push(Finding {
                check: "processes".into(),
                what: format!("pid {} ({})", t.pid, t.comm),
                expected: "a user process not named like a kernel thread".into(),
                found: format!(
                    "a user process (not PF_KTHREAD, task_struct at {:#x}) named like the kernel's own threads",
                    t.addr
                ),
                address: t.addr,
                owner: None,
            });
        }
    }
    if !first.is_empty() {
        c.new_snapshot();
        let (_, _, again) = hidden(c, None)?;
        for (addr, (place, t)) in first {
            // The same task (its PID), not a new one in the freed
            // task_struct of the first.
            if again.get(&addr).is_some_and(|(_, t2)| t2.pid == t.pid) {
                r.findings.push(Finding {
                    check: "processes".into(),
                    what: format!("pid {} ({})", t.pid, t.comm),
                    expected: "every task on init_task.tasks or its thread list".into(),
                    found: format!("task_struct at {addr:#x} only in {place}"),
                    address: addr,
                    owner: None,
                });
            }
        }
    }
    Ok(r)
}

/// Most ftrace ops and kprobes followed.
const MAX_HOOKS: usize = 4096;
/// Buckets of `kprobe_table` (`KPROBE_TABLE_SIZE`, kernel/kprobes.c).
const KPROBE_TABLE_SIZE: u64 = 64;

/// Tracing hooks on the syscall functions, owned by modules: a kprobe
/// (`kprobe_table`) on a syscall function or an entry point whose handler
/// lies in a module, and ftrace: a syscall function whose `__fentry__` site
/// is a call (the function is traced) while an `ftrace_ops` on
/// `ftrace_ops_list` has its callback in a module (the classic ftrace
/// hook, `register_ftrace_function` with `IPMODIFY`). Tracing the kernel
/// itself runs (the function tracer, tracepoints, perf) has its callbacks
/// in core text and does not alarm. Needs the `HookViews` offsets from BTF.
pub fn check_hooks<M: GuestMemory>(
    c: &mut SnapshotCache<M>,
    k: &Kernel,
    cpu: u32,
    modules: &[Module],
) -> Result<Report, LinuxError> {
    use crate::memory::Read;
    let v = k
        .offsets
        .hook_views
        .ok_or_else(|| LinuxError::NoSymbol("the ftrace_ops and kprobe types in BTF".into()))?;
    let t = TextMap::new(k)?;
    let mut r = Report {
        check: "hooks".into(),
        ..Report::default()
    };
    let word = |b: &[u8]| u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
    let owner = |a: u64| {
        modules
            .iter()
            .find(|m| m.contains(a))
            .map(|m| m.name.clone())
    };
    // The syscall table, the kprobe buckets and the ftrace list's head in
    // one batch.
    let sym = |n: &str| k.kallsyms.addr(n);
    let first: Vec<Read> = sym("sys_call_table")
        .map(|at| syscall_table_read(k, &t, cpu, at))
        .into_iter()
        .chain(
            sym("kprobe_table").map(|at| Read::kernel(cpu, at, (KPROBE_TABLE_SIZE * 8) as usize)),
        )
        .chain(sym("ftrace_ops_list").map(|at| Read::kernel(cpu, at, 8)))
        .collect();
    c.prefetch(&first)?;
    // The syscall functions.
    let mut targets: BTreeMap<u64, String> = BTreeMap::new();
    if let Some(at) = k.kallsyms.addr("sys_call_table") {
        for a in syscall_table(c, k, &t, cpu, at)? {
            if let Some(name) = t.exact(a).filter(|n| n.starts_with("__x64_sys_")) {
                targets.insert(a, name.to_string());
            }
        }
    }
    for n in ["entry_SYSCALL_64", "do_syscall_64", "x64_sys_call"] {
        if let Some(a) = k.kallsyms.addr(n) {
            targets.insert(a, n.to_string());
        }
    }
    // The functions watched, plus every probe and ops followed below.
    r.checked += targets.len();
    // kprobes: every bucket, then each hlist one batch per hop.
    if let Some(table) = k.kallsyms.addr("kprobe_table") {
        let heads = c.read(kspace(cpu), table, (KPROBE_TABLE_SIZE * 8) as usize)?;
        let mut nodes: Vec<u64> = heads
            .chunks_exact(8)
            .map(word)
            .filter(|&n| n >= k.kernel_half)
            .collect();
        let mut seen = std::collections::HashSet::new();
        while !nodes.is_empty() && seen.len() < MAX_HOOKS {
            nodes.retain(|&n| seen.insert(n));
            let reads: Vec<Read> = nodes
                .iter()
                .flat_map(|&n| {
                    let kp = n.wrapping_sub(v.kp_hlist);
                    [
                        Read::kernel(cpu, n, 8),
                        Read::kernel(cpu, kp + v.kp_addr, 8),
                        Read::kernel(cpu, kp + v.kp_pre, 8),
                    ]
                })
                .collect();
            let got = c.read_many(&reads)?;
            let w = |i: usize| got[i].as_ref().ok().map_or(0, |b| word(b));
            let mut next = Vec::new();
            for i in 0..nodes.len() {
                r.checked += 1;
                let (addr, pre) = (w(3 * i + 1), w(3 * i + 2));
                if let (Some(name), Some(o)) = (targets.get(&addr), owner(pre)) {
                    r.findings.push(Finding {
                        check: "hooks".into(),
                        what: format!("kprobe on {name}"),
                        expected: "no module's probe on a syscall function or entry point".into(),
                        found: format!("handler {pre:#x} in module {o}'s memory"),
                        address: pre,
                        owner: Some(o),
                    });
                }
                let nx = w(3 * i);
                if nx >= k.kernel_half {
                    next.push(nx);
                }
            }
            nodes = next;
        }
    }
    // ftrace: module-owned ops, then the traced syscall functions.
    let mut module_ops: Vec<(u64, String)> = Vec::new();
    if let (Some(list), Some(end)) = (
        k.kallsyms.addr("ftrace_ops_list"),
        k.kallsyms.addr("ftrace_list_end"),
    ) {
        let mut ops = word(&c.read(kspace(cpu), list, 8)?);
        let mut hops = 0;
        while ops != end && ops >= k.kernel_half && hops < MAX_HOOKS {
            hops += 1;
            r.checked += 1;
            let b = c.read_many(&[
                Read::kernel(cpu, ops + v.ops_func, 8),
                Read::kernel(cpu, ops + v.ops_next, 8),
            ])?;
            let func = b[0].as_ref().ok().map_or(0, |b| word(b));
            if let Some(o) = owner(func) {
                module_ops.push((func, o));
            }
            ops = b[1].as_ref().ok().map_or(0, |b| word(b));
        }
    }
    if !module_ops.is_empty() {
        let addrs: Vec<(u64, String)> = targets.into_iter().collect();
        let reads: Vec<Read> = addrs
            .iter()
            .map(|(a, _)| Read::kernel(cpu, *a, 16))
            .collect();
        let got = c.read_many(&reads)?;
        for ((a, name), code) in addrs.iter().zip(got) {
            let Ok(code) = code else { continue };
            let mut dec = Decoder::with_ip(64, &code, *a, DecoderOptions::NONE);
            // The __fentry__ site: the first instruction after ENDBR64.
            let mut ins = dec.decode();
            if ins.mnemonic() == iced_x86::Mnemonic::Endbr64 {
                ins = dec.decode();
            }
            if ins.flow_control() == FlowControl::Call {
                let (func, o) = &module_ops[0];
                r.findings.push(Finding {
                    check: "hooks".into(),
                    what: format!("ftrace on {name}"),
                    expected: "no module's ftrace callback on a syscall function".into(),
                    found: format!(
                        "{name} traced (its fentry site calls {:#x}) while module {o}'s callback {func:#x} is registered",
                        ins.near_branch_target()
                    ),
                    address: *func,
                    owner: Some(o.clone()),
                });
            }
        }
    }
    Ok(r)
}

/// The kernel's text and read-only data at one moment, to compare later
/// ([`check_text`]). Valid for one boot: KASLR relocates every absolute
/// address in them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TextBaseline {
    /// The kernel banner.
    pub banner: String,
    /// LSTAR when recorded (the boot's KASLR slide).
    pub lstar: u64,
    /// The ranges recorded: (name, start, bytes).
    pub ranges: Vec<(String, u64, Vec<u8>)>,
}

impl TextBaseline {
    /// Writes the baseline into directory `dir`: `baseline.json` (banner,
    /// LSTAR, ranges) and one raw file per range (`text.bin`, `rodata.bin`).
    pub fn save(&self, dir: &std::path::Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let index: Vec<(String, u64, usize)> = self
            .ranges
            .iter()
            .map(|(n, a, b)| (n.clone(), *a, b.len()))
            .collect();
        for (n, _, b) in &self.ranges {
            std::fs::write(dir.join(format!("{n}.bin")), b)?;
        }
        let meta = serde_json::json!({"banner": self.banner, "lstar": self.lstar, "ranges": index});
        std::fs::write(dir.join("baseline.json"), meta.to_string())
    }

    /// Reads a baseline [`TextBaseline::save`] wrote.
    pub fn load(dir: &std::path::Path) -> std::io::Result<Self> {
        let bad = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("baseline.json"))?)
                .map_err(|e| bad(e.to_string()))?;
        let index: Vec<(String, u64, usize)> =
            serde_json::from_value(meta["ranges"].clone()).map_err(|e| bad(e.to_string()))?;
        let mut ranges = Vec::new();
        for (n, a, len) in index {
            let b = std::fs::read(dir.join(format!("{n}.bin")))?;
            if b.len() != len {
                return Err(bad(format!(
                    "{n}.bin holds {} bytes, expected {len}",
                    b.len()
                )));
            }
            ranges.push((n, a, b));
        }
        Ok(Self {
            banner: meta["banner"].as_str().unwrap_or_default().to_string(),
            lstar: meta["lstar"].as_u64().unwrap_or(0),
            ranges,
        })
    }

    /// The default directory of a boot's baseline: under the user cache,
    /// keyed by banner and KASLR offset.
    pub fn default_dir(k: &Kernel) -> Option<std::path::PathBuf> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (&k.banner, k.lstar).hash(&mut h);
        crate::linux::cache_dir().map(|d| d.join("baselines").join(format!("{:016x}", h.finish())))
    }
}

/// The ranges a baseline covers: core text and read-only data (which
/// holds the syscall tables and `__ro_after_init` data).
fn text_ranges(k: &Kernel) -> Result<Vec<(String, u64, u64)>, LinuxError> {
    let need = |n: &str| {
        k.kallsyms
            .addr(n)
            .ok_or_else(|| LinuxError::NoSymbol(n.into()))
    };
    Ok(vec![
        ("text".into(), need("_stext")?, need("_etext")?),
        (
            "rodata".into(),
            need("__start_rodata")?,
            need("__end_rodata")?,
        ),
    ])
}

/// Reads the kernel's text and read-only data (`ids baseline`): about
/// 20-30 MiB, a few seconds through the agent.
pub fn record_baseline<M: GuestMemory>(
    c: &mut SnapshotCache<M>,
    k: &Kernel,
    cpu: u32,
) -> Result<TextBaseline, LinuxError> {
    let mut ranges = Vec::new();
    for (name, a, b) in text_ranges(k)? {
        let bytes = read_zeroed(c, cpu, a, b)?;
        ranges.push((name, a, bytes));
    }
    Ok(TextBaseline {
        banner: k.banner.clone(),
        lstar: k.lstar,
        ranges,
    })
}

/// `[a, b)` with unmapped pages as zeros (kernel text can have holes
/// between sections), in batches the backend splits.
fn read_zeroed<M: GuestMemory>(
    c: &mut SnapshotCache<M>,
    cpu: u32,
    a: u64,
    b: u64,
) -> Result<Vec<u8>, LinuxError> {
    let chunk = c.inner().max_read()?.clamp(4096, 1 << 20) as u64 & !0xfff;
    let mut out = Vec::with_capacity((b - a) as usize);
    let mut reads = Vec::new();
    let mut x = a;
    while x < b {
        let n = chunk.min(b - x);
        reads.push(crate::memory::Read::kernel(cpu, x, n as usize));
        x += n;
    }
    for r in reads.chunks(16) {
        // Text and rodata need no snapshot of the other vCPUs.
        for (rd, res) in r.iter().zip(c.inner().read_batch_on_cpu(cpu, r)?) {
            match res {
                Ok(d) => out.extend(d),
                Err(_) => out.resize(out.len() + rd.len, 0),
            }
        }
    }
    Ok(out)
}

/// Kernel text and read-only data now against `base` (same boot). Every
/// changed instruction is accepted only if it is what the kernel's own
/// patching writes — a NOP, or a jump or call into core kernel text (jump
/// labels, static calls: arch/x86/kernel/jump_label.c, static_call.c), a
/// call at a function's fentry site to anything but a module (ftrace and
/// its trampolines, arch/x86/kernel/ftrace.c; a module's ftrace callback
/// is [`check_hooks`]'s finding) — or an `int3` the kernel's text poking
/// leaves for a moment; anything else, and any change in read-only data,
/// is a finding named by symbol, with the module a new branch leads into.
pub fn check_text<M: GuestMemory>(
    c: &mut SnapshotCache<M>,
    k: &Kernel,
    cpu: u32,
    base: &TextBaseline,
    modules: &[Module],
) -> Result<Report, LinuxError> {
    check_text_slice(c, k, cpu, base, modules, 0, 1)
}

/// [`check_text`] over slice `slice` of `of` equal, page-aligned parts of
/// each range (what `watch` checks per pass: a full cover every `of`
/// passes).
pub fn check_text_slice<M: GuestMemory>(
    c: &mut SnapshotCache<M>,
    k: &Kernel,
    cpu: u32,
    base: &TextBaseline,
    modules: &[Module],
    slice: usize,
    of: usize,
) -> Result<Report, LinuxError> {
    let first = text_slice_once(c, k, cpu, base, modules, slice, of)?;
    if first.findings.is_empty() {
        return Ok(first);
    }
    // A site the kernel is patching right now (a jump label flipped, the
    // function tracer turned on) may be read mid-way: a change is read
    // again, from a new snapshot, and reported only if it stays.
    c.new_snapshot();
    let mut again = text_slice_once(c, k, cpu, base, modules, slice, of)?;
    let stayed: std::collections::HashSet<(String, u64)> = first
        .findings
        .iter()
        .map(|f| (f.what.clone(), f.address))
        .collect();
    again
        .findings
        .retain(|f| stayed.contains(&(f.what.clone(), f.address)));
    Ok(again)
}

#[allow(clippy::too_many_arguments)]
fn text_slice_once<M: GuestMemory>(
    c: &mut SnapshotCache<M>,
    k: &Kernel,
    cpu: u32,
    base: &TextBaseline,
    modules: &[Module],
    slice: usize,
    of: usize,
) -> Result<Report, LinuxError> {
    if base.banner != k.banner || base.lstar != k.lstar {
        return Err(LinuxError::NoSymbol(
            "a baseline of this boot (banner and KASLR offset differ): record one with `ids baseline`"
                .into(),
        ));
    }
    let t = TextMap::new(k)?;
    let mut r = Report {
        check: "text".into(),
        ..Report::default()
    };
    let of = of.max(1);
    for (name, start, old) in &base.ranges {
        let part = old.len().div_ceil(of).div_ceil(4096) * 4096;
        let lo = (slice % of * part).min(old.len());
        let hi = (lo + part).min(old.len());
        // The slice as it is now, in a window of the recorded bytes (one
        // page either side: context for decoding across the slice's edges).
        let (wlo, whi) = (lo.saturating_sub(4096), (hi + 4096).min(old.len()));
        let was = &old[wlo..whi];
        let mut now = was.to_vec();
        now[lo - wlo..hi - wlo].copy_from_slice(&read_zeroed(
            c,
            cpu,
            start + lo as u64,
            start + hi as u64,
        )?);
        let wstart = start + wlo as u64;
        r.checked += hi - lo;
        // Changed byte runs (merged when closer than an instruction), as
        // offsets in the window.
        let mut i = lo - wlo;
        while i < hi - wlo {
            if was[i] == now[i] {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < now.len()
                && (was[j] != now[j]
                    || was[j..(j + 8).min(now.len())] != now[j..(j + 8).min(now.len())])
            {
                j += 1;
            }
            let (a, b) = (wstart + i as u64, wstart + j as u64);
            if name == "text" {
                text_change(&t, modules, wstart, was, &now, a, b, &mut r);
            } else {
                let (found, owner) = whereis_data(&t, modules, &now, wstart, a);
                r.findings.push(Finding {
                    check: "text".into(),
                    what: format!("rodata {a:#x}..{b:#x} ({})", t.describe_any(k, a)),
                    expected: "read-only data as recorded".into(),
                    found,
                    address: a,
                    owner,
                });
            }
            i = j;
        }
    }
    Ok(r)
}

/// A pointer-sized value written into read-only data, and where it points.
fn whereis_data(
    t: &TextMap<'_>,
    modules: &[Module],
    now: &[u8],
    start: u64,
    a: u64,
) -> (String, Option<String>) {
    let at = ((a - start) & !7) as usize;
    let v = now
        .get(at..at + 8)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8")));
    let (w, owner) = whereis(t, modules, v);
    (format!("changed; the word there now is {w}"), owner)
}

/// Classifies one changed run `[a, b)` of text.
#[allow(clippy::too_many_arguments)]
fn text_change(
    t: &TextMap<'_>,
    modules: &[Module],
    start: u64,
    old: &[u8],
    now: &[u8],
    a: u64,
    b: u64,
    r: &mut Report,
) {
    // Decode from the symbol the change is in (instruction boundaries).
    let sym = t.by_addr.range(..=a).next_back().map_or(a, |(&s, _)| s);
    let from = sym.max(start).max(a.saturating_sub(4096));
    let off = (from - start) as usize;
    let end = ((b - start) as usize + 16).min(now.len());
    let mut dec = Decoder::with_ip(64, &now[off..end], from, DecoderOptions::NONE);
    let mut bad: Option<(iced_x86::Instruction, u64)> = None;
    while dec.can_decode() {
        let ins = dec.decode();
        let (s, e) = (ins.ip(), ins.next_ip());
        if e <= a {
            continue;
        }
        if s >= b {
            break;
        }
        // Only instructions whose own bytes changed.
        let (is, ie) = ((s - start) as usize, ((e - start) as usize).min(now.len()));
        if old.get(is..ie) == now.get(is..ie) {
            continue;
        }
        let target = ins.near_branch_target();
        // ftrace's fentry site: the first instruction of a function, or the
        // one after its ENDBR64; ftrace calls a trampoline there that it
        // allocates outside core text (no module owns it).
        let fentry = t.exact(s).is_some() || (s >= 4 && t.exact(s - 4).is_some());
        let in_module = modules.iter().any(|m| m.contains(target));
        let legit = match ins.flow_control() {
            FlowControl::Next => ins.mnemonic() == iced_x86::Mnemonic::Nop,
            FlowControl::Call if fentry => !in_module,
            FlowControl::Call | FlowControl::UnconditionalBranch => t.in_text(target),
            FlowControl::Interrupt => ins.mnemonic() == iced_x86::Mnemonic::Int3,
            _ => false,
        };
        if !legit {
            bad = Some((ins, target));
            break;
        }
        // text_poke_bp() (arch/x86/kernel/alternative.c) writes an int3
        // first, then the rest of the new instruction, then its first
        // byte: a snapshot between the steps holds an int3 followed by
        // part of the new bytes, which do not decode as what will run.
        // Skip the rest of the site (5 bytes: a call, a jmp32 or a NOP5).
        if ins.mnemonic() == iced_x86::Mnemonic::Int3 {
            let resume = s + 5;
            if dec.set_position((resume - from) as usize).is_err() {
                break;
            }
            dec.set_ip(resume);
        }
    }
    if let Some((ins, target)) = bad {
        let (found, owner) = if target != 0 {
            whereis(t, modules, target)
        } else {
            (format!("{:?}", ins.mnemonic()).to_lowercase(), None)
        };
        r.findings.push(Finding {
            check: "text".into(),
            what: format!("text {}", t.describe(ins.ip())),
            expected: "kernel text as recorded, or the kernel's own patching (NOP, a jump or call into core text)".into(),
            found: format!("{} to {found}", format!("{:?}", ins.mnemonic()).to_lowercase()),
            address: if target != 0 { target } else { ins.ip() },
            owner,
        });
    }
}

#[cfg(test)]
mod tests;
