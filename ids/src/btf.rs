//! Types from the kernel's own BTF (`.BTF`, between the `__start_BTF` and
//! `__stop_BTF` symbols, or `/sys/kernel/btf/vmlinux` offline), parsed with
//! the `btf-rs` crate (retis-org; maintained, pure Rust, reads raw BTF from
//! bytes, resolves names, members and type chains — all this layer needs).
//!
//! Kernel BTF describes types but has no global variables except per-CPU
//! ones: addresses come from kallsyms, layouts from here. Only what the
//! Linux layer reads is extracted ([`Offsets`]), so a cache entry is small.

use btf_rs::{Btf, Type};

/// Errors of the BTF layer.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// The bytes are not BTF.
    #[error("the kernel's .BTF section ({len} bytes) does not parse as BTF: {why}")]
    Parse {
        /// Bytes given.
        len: usize,
        /// btf-rs's reason.
        why: String,
    },
    /// A type is missing.
    #[error(
        "BTF has no struct {name}: the kernel is older or newer than this layer knows (report its banner)"
    )]
    NoStruct {
        /// Struct name.
        name: String,
    },
    /// A member is missing.
    #[error("BTF struct {name} has no member {member}")]
    NoMember {
        /// Struct name.
        name: String,
        /// Member path.
        member: String,
    },
}

/// A member's place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Field {
    /// Byte offset in the outer struct.
    pub offset: u64,
    /// Size in bytes (0 when unknown, e.g. a flexible array).
    pub size: u64,
}

/// Parsed kernel BTF.
pub struct Types {
    btf: Btf,
}

/// Most type-chain hops followed (typedef/const/volatile), against loops.
const MAX_CHAIN: usize = 32;

impl Types {
    /// Parses raw BTF.
    pub fn from_bytes(b: &[u8]) -> Result<Self, BtfError> {
        Ok(Self {
            btf: Btf::from_bytes(b).map_err(|e| BtfError::Parse {
                len: b.len(),
                why: e.to_string(),
            })?,
        })
    }

    fn strip(&self, mut t: Type) -> Type {
        for _ in 0..MAX_CHAIN {
            match &t {
                Type::Typedef(_)
                | Type::Const(_)
                | Type::Volatile(_)
                | Type::Restrict(_)
                | Type::TypeTag(_) => match self
                    .btf
                    .resolve_chained_type(t.as_btf_type().expect("chained types are BtfType"))
                {
                    Ok(n) => t = n,
                    Err(_) => return t,
                },
                _ => return t,
            }
        }
        t
    }

    fn struct_named(&self, name: &str) -> Result<btf_rs::Struct, BtfError> {
        let types = self.btf.resolve_types_by_name(name).unwrap_or_default();
        types
            .into_iter()
            .find_map(|t| match t {
                Type::Struct(s) if !s.members.is_empty() => Some(s),
                _ => None,
            })
            .ok_or_else(|| BtfError::NoStruct { name: name.into() })
    }

    fn size_of_type(&self, t: &Type) -> u64 {
        match self.strip(t.clone()) {
            Type::Int(i) => i.size() as u64,
            Type::Ptr(_) => 8,
            Type::Struct(s) | Type::Union(s) => s.size() as u64,
            Type::Enum(e) => e.size() as u64,
            Type::Enum64(e) => e.size() as u64,
            Type::Float(f) => f.size() as u64,
            Type::Array(a) => {
                let elem = self
                    .btf
                    .resolve_chained_type(&a)
                    .map(|e| self.size_of_type(&e))
                    .unwrap_or(0);
                elem * a.len() as u64
            }
            _ => 0,
        }
    }

    /// Size of struct `name`.
    pub fn size_of(&self, name: &str) -> Result<u64, BtfError> {
        Ok(self.struct_named(name)?.size() as u64)
    }

    /// The member at `path` (dot-separated, through anonymous unions and
    /// structs) of struct `name`.
    pub fn field(&self, name: &str, path: &str) -> Result<Field, BtfError> {
        let s = self.struct_named(name)?;
        let err = || BtfError::NoMember {
            name: name.into(),
            member: path.into(),
        };
        let mut cur = s;
        let mut offset = 0u64;
        let parts: Vec<&str> = path.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let (off, t) = self.find_member(&cur, part, 0).ok_or_else(err)?;
            offset += off;
            if i + 1 == parts.len() {
                return Ok(Field {
                    offset,
                    size: self.size_of_type(&t),
                });
            }
            cur = match self.strip(t) {
                Type::Struct(s) | Type::Union(s) => s,
                _ => return Err(err()),
            };
        }
        Err(err())
    }

    /// True if struct `name` has member `path`.
    pub fn has(&self, name: &str, path: &str) -> bool {
        self.field(name, path).is_ok()
    }

    /// Element type size and count of an array member.
    pub fn array(&self, name: &str, path: &str) -> Result<(u64, u64), BtfError> {
        let f = self.field(name, path)?;
        let s = self.struct_named(name)?;
        let err = || BtfError::NoMember {
            name: name.into(),
            member: path.into(),
        };
        let last = path.rsplit('.').next().unwrap_or(path);
        let _ = s;
        // Resolve again to get the type (field() keeps only sizes).
        let mut cur = self.struct_named(name)?;
        let parts: Vec<&str> = path.split('.').collect();
        let mut ty = None;
        for (i, part) in parts.iter().enumerate() {
            let (_, t) = self.find_member(&cur, part, 0).ok_or_else(err)?;
            if i + 1 == parts.len() {
                ty = Some(t);
                break;
            }
            cur = match self.strip(t) {
                Type::Struct(s) | Type::Union(s) => s,
                _ => return Err(err()),
            };
        }
        match ty.map(|t| self.strip(t)) {
            Some(Type::Array(a)) => {
                let n = a.len() as u64;
                Ok((f.size.checked_div(n).unwrap_or(0), n))
            }
            _ => Err(BtfError::NoMember {
                name: name.into(),
                member: format!("{last} (as an array)"),
            }),
        }
    }

    fn find_member(&self, s: &btf_rs::Struct, name: &str, depth: usize) -> Option<(u64, Type)> {
        if depth > 8 {
            return None;
        }
        for m in &s.members {
            let mname = self.btf.resolve_name(m).unwrap_or_default();
            let Ok(t) = self.btf.resolve_chained_type(m) else {
                continue;
            };
            let off = u64::from(m.bit_offset() / 8);
            if mname == name {
                return Some((off, t));
            }
            if mname.is_empty()
                && let Type::Struct(inner) | Type::Union(inner) = self.strip(t)
                && let Some((o, t)) = self.find_member(&inner, name, depth + 1)
            {
                return Some((off + o, t));
            }
        }
        None
    }
}

/// Every offset the Linux layer reads, from BTF (bytes).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Offsets {
    /// `sizeof(struct task_struct)`.
    pub task_size: u64,
    /// `task_struct.tasks` (list_head).
    pub task_tasks: u64,
    /// `task_struct.pid`.
    pub task_pid: u64,
    /// `task_struct.tgid`.
    pub task_tgid: u64,
    /// `task_struct.comm` (char[16]).
    pub task_comm: u64,
    /// `task_struct.real_parent`.
    pub task_real_parent: u64,
    /// `task_struct.cred` (effective credentials).
    pub task_cred: u64,
    /// `task_struct.__state` (5.14+) or `state`.
    pub task_state: u64,
    /// `task_struct.exit_state`.
    pub task_exit_state: u64,
    /// `task_struct.flags`.
    pub task_flags: u64,
    /// `task_struct.start_boottime` (5.5+) or `real_start_time`, ns.
    pub task_start: u64,
    /// `task_struct.mm`.
    pub task_mm: u64,
    /// `task_struct.signal`.
    pub task_signal: u64,
    /// `task_struct.thread_node` (with `signal_struct.thread_head`), if any.
    pub task_thread_node: Option<u64>,
    /// `signal_struct.thread_head`, if any.
    pub signal_thread_head: Option<u64>,
    /// `task_struct.thread_group` (before 6.7), if any.
    pub task_thread_group: Option<u64>,
    /// `signal_struct.nr_threads` (include/linux/sched/signal.h), if any:
    /// only processes with more than one thread have their thread list
    /// walked.
    #[serde(default)]
    pub signal_nr_threads: Option<u64>,
    /// `cred.uid`, `cred.gid`.
    pub cred_uid: u64,
    /// `cred.gid`.
    pub cred_gid: u64,
    /// `module.list`.
    pub module_list: u64,
    /// `module.name` and its length.
    pub module_name: Field,
    /// `module.state`.
    pub module_state: u64,
    /// `module.refcnt` (CONFIG_MODULE_UNLOAD), if any.
    pub module_refcnt: Option<u64>,
    /// 6.4+: `module.mem`, element size, count; `module_memory.base/size`.
    pub module_mem: Option<(u64, u64, u64, u64, u64)>,
    /// Before 6.4: `module.core_layout.base`, `.size`, `init_layout.size`.
    pub module_core_layout: Option<(u64, u64, u64)>,
    /// Where else modules are found (hidden-module checks), if BTF has the
    /// types.
    #[serde(default)]
    pub module_views: Option<ModuleViews>,
    /// ftrace and kprobe structures (hook checks), if BTF has them.
    #[serde(default)]
    pub hook_views: Option<HookViews>,
    /// The PID IDR, for a batched walk: `pid_namespace.idr.idr_rt.xa_head`,
    /// `xa_node.shift`, `xa_node.slots`, `pid.tasks`, `task_struct.pid_links`.
    pub pid_idr: Option<PidIdr>,
    /// The CFS run queues, for the hidden-process check.
    pub run_queue: Option<RunQueue>,
}

/// Offsets of the CFS run queue (kernel/sched/sched.h,
/// include/linux/sched.h): each CPU's `runqueues` (a per-CPU `struct rq`)
/// holds `cfs.tasks_timeline`, a red-black tree of the runnable
/// `sched_entity`s (the running one is not in it); with group scheduling
/// an entity is a group whose own `cfs_rq` (`my_q`) holds more.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunQueue {
    /// `rq.cfs.tasks_timeline` (an `rb_root_cached`: `rb_root.rb_node` first).
    pub rq_timeline: u64,
    /// `cfs_rq.tasks_timeline`.
    pub cfs_timeline: u64,
    /// `sched_entity.run_node`.
    pub se_run_node: u64,
    /// `task_struct.se`.
    pub task_se: u64,
    /// `sched_entity.my_q` (only with CONFIG_FAIR_GROUP_SCHED).
    pub se_my_q: Option<u64>,
    /// `rb_node.rb_right`.
    pub rb_right: u64,
    /// `rb_node.rb_left`.
    pub rb_left: u64,
}

/// Offsets of the other places a module is linked (include/linux/kobject.h,
/// include/linux/module.h, include/linux/rbtree_latch.h,
/// kernel/module/internal.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModuleViews {
    /// `kset.list` (the kobjects of `module_kset`, /sys/module).
    pub kset_list: u64,
    /// `module_kobject.kobj.entry`: the link on `kset.list`.
    pub mkobj_entry: u64,
    /// `module_kobject.mod` (NULL for built-in modules with parameters).
    pub mkobj_mod: u64,
    /// `mod_tree_root.root.tree` (`rb_root[2]` of the latch tree).
    pub mod_tree_roots: u64,
    /// `mod_tree_node.mod`.
    pub mtn_mod: u64,
    /// `mod_tree_node.node.node` (`rb_node[2]`; `[0]` is on `tree[0]`).
    pub mtn_node: u64,
    /// `rb_node.rb_right`, `rb_node.rb_left`.
    pub rb_right: u64,
    /// `rb_node.rb_left`.
    pub rb_left: u64,
    /// Where a `struct module` holds its `mod_tree_node`s, as (offset of the
    /// first, stride, count): `mem[t].mtn` for each memory type (6.4+,
    /// kernel/module/tree_lookup.c), else `core_layout.mtn` and
    /// `init_layout.mtn`. Lets a check read a listed module's tree nodes
    /// without walking the tree to them.
    pub module_mtn: Option<(u64, u64, u64)>,
}

/// Offsets of the tracing hooks (include/linux/ftrace.h,
/// include/linux/kprobes.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HookViews {
    /// `ftrace_ops.func` (the callback).
    pub ops_func: u64,
    /// `ftrace_ops.next` (`ftrace_ops_list` ends at `ftrace_list_end`).
    pub ops_next: u64,
    /// `kprobe.hlist` (`kprobe_table` buckets are hlists of it).
    pub kp_hlist: u64,
    /// `kprobe.addr` (the probed instruction).
    pub kp_addr: u64,
    /// `kprobe.pre_handler`.
    pub kp_pre: u64,
}

/// Offsets of the PID IDR walk (include/linux/xarray.h, include/linux/pid.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PidIdr {
    /// `pid_namespace.idr.idr_rt.xa_head`.
    pub ns_xa_head: u64,
    /// `pid_namespace.idr.idr_base`.
    pub ns_idr_base: u64,
    /// `xa_node.shift` (u8).
    pub node_shift: u64,
    /// `xa_node.slots` (64 pointers).
    pub node_slots: u64,
    /// `pid.tasks` (hlist_head[PIDTYPE_MAX]; `[0]` is PIDTYPE_PID).
    pub pid_tasks: u64,
    /// `task_struct.pid_links` (hlist_node[]; `[0]` for PIDTYPE_PID).
    pub task_pid_links: u64,
}

impl Offsets {
    /// Reads every offset from `t`.
    pub fn from_btf(t: &Types) -> Result<Self, BtfError> {
        let f = |s: &str, m: &str| t.field(s, m).map(|x| x.offset);
        let opt = |s: &str, m: &str| t.field(s, m).ok().map(|x| x.offset);
        let either = |s: &str, a: &str, b: &str| f(s, a).or_else(|_| f(s, b));
        let module_mem = match (t.array("module", "mem"), t.field("module", "mem")) {
            (Ok((elem, n)), Ok(mem)) => Some((
                mem.offset,
                elem,
                n,
                f("module_memory", "base")?,
                f("module_memory", "size")?,
            )),
            _ => None,
        };
        let module_core_layout = match (
            f("module", "core_layout"),
            f("module_layout", "base"),
            f("module_layout", "size"),
            f("module", "init_layout"),
        ) {
            (Ok(c), Ok(b), Ok(sz), Ok(i)) => Some((c + b, c + sz, i + sz)),
            _ => None,
        };
        Ok(Self {
            task_size: t.size_of("task_struct")?,
            task_tasks: f("task_struct", "tasks")?,
            task_pid: f("task_struct", "pid")?,
            task_tgid: f("task_struct", "tgid")?,
            task_comm: f("task_struct", "comm")?,
            task_real_parent: f("task_struct", "real_parent")?,
            task_cred: f("task_struct", "cred")?,
            task_state: either("task_struct", "__state", "state")?,
            task_exit_state: f("task_struct", "exit_state")?,
            task_flags: f("task_struct", "flags")?,
            task_start: either("task_struct", "start_boottime", "real_start_time")?,
            task_mm: f("task_struct", "mm")?,
            task_signal: f("task_struct", "signal")?,
            task_thread_node: opt("task_struct", "thread_node"),
            signal_thread_head: opt("signal_struct", "thread_head"),
            task_thread_group: opt("task_struct", "thread_group"),
            signal_nr_threads: opt("signal_struct", "nr_threads"),
            cred_uid: f("cred", "uid")?,
            cred_gid: f("cred", "gid")?,
            module_list: f("module", "list")?,
            module_name: t.field("module", "name")?,
            module_state: f("module", "state")?,
            module_refcnt: opt("module", "refcnt"),
            module_mem,
            module_core_layout,
            hook_views: (|| {
                Some(HookViews {
                    ops_func: f("ftrace_ops", "func").ok()?,
                    ops_next: f("ftrace_ops", "next").ok()?,
                    kp_hlist: f("kprobe", "hlist").ok()?,
                    kp_addr: f("kprobe", "addr").ok()?,
                    kp_pre: f("kprobe", "pre_handler").ok()?,
                })
            })(),
            module_views: (|| {
                let module_mtn = match (module_mem, f("module_memory", "mtn")) {
                    (Some((mem, elem, n, _, _)), Ok(mtn)) => Some((mem + mtn, elem, n)),
                    _ => match (
                        f("module", "core_layout.mtn"),
                        f("module", "init_layout.mtn"),
                    ) {
                        (Ok(c), Ok(i)) if i > c => Some((c, i - c, 2)),
                        _ => None,
                    },
                };
                Some(ModuleViews {
                    kset_list: f("kset", "list").ok()?,
                    mkobj_entry: f("module_kobject", "kobj.entry").ok()?,
                    mkobj_mod: f("module_kobject", "mod").ok()?,
                    mod_tree_roots: f("mod_tree_root", "root.tree").ok()?,
                    mtn_mod: f("mod_tree_node", "mod").ok()?,
                    mtn_node: f("mod_tree_node", "node.node").ok()?,
                    rb_right: f("rb_node", "rb_right").ok()?,
                    rb_left: f("rb_node", "rb_left").ok()?,
                    module_mtn,
                })
            })(),
            pid_idr: (|| {
                Some(PidIdr {
                    ns_xa_head: f("pid_namespace", "idr.idr_rt.xa_head").ok()?,
                    ns_idr_base: f("pid_namespace", "idr.idr_base").ok()?,
                    node_shift: f("xa_node", "shift").ok()?,
                    node_slots: f("xa_node", "slots").ok()?,
                    pid_tasks: f("pid", "tasks").ok()?,
                    task_pid_links: f("task_struct", "pid_links").ok()?,
                })
            })(),
            run_queue: (|| {
                Some(RunQueue {
                    rq_timeline: f("rq", "cfs.tasks_timeline").ok()?,
                    cfs_timeline: f("cfs_rq", "tasks_timeline").ok()?,
                    se_run_node: f("sched_entity", "run_node").ok()?,
                    task_se: f("task_struct", "se").ok()?,
                    se_my_q: opt("sched_entity", "my_q"),
                    rb_right: f("rb_node", "rb_right").ok()?,
                    rb_left: f("rb_node", "rb_left").ok()?,
                })
            })(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Raw BTF built by hand (include/uapi/linux/btf.h): a header, types
    /// from id 1, a string section.
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
    }

    impl Builder {
        fn new() -> Self {
            Self {
                types: Vec::new(),
                strings: vec![0],
            }
        }
        fn s(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let at = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            at
        }
        fn u32s(&mut self, v: &[u32]) {
            for x in v {
                self.types.extend_from_slice(&x.to_le_bytes());
            }
        }
        fn ty(&mut self, name: &str, kind: u32, vlen: u32, size_or_type: u32) {
            let n = self.s(name);
            self.u32s(&[n, (kind << 24) | vlen, size_or_type]);
        }
        fn member(&mut self, name: &str, ty: u32, bit_off: u32) {
            let n = self.s(name);
            self.u32s(&[n, ty, bit_off]);
        }
        fn finish(self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&0xeb9fu16.to_le_bytes());
            out.push(1); // version
            out.push(0); // flags
            for v in [
                24u32,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    fn sample() -> Vec<u8> {
        let mut b = Builder::new();
        b.ty("int", 1, 0, 4); // 1
        b.u32s(&[32]);
        b.ty("char", 1, 0, 1); // 2
        b.u32s(&[8]);
        b.ty("", 3, 0, 0); // 3: char[16]
        b.u32s(&[2, 1, 16]);
        b.ty("list_head", 4, 2, 16); // 4
        b.member("next", 5, 0);
        b.member("prev", 5, 64);
        b.ty("", 2, 0, 4); // 5: struct list_head *
        b.ty("", 5, 2, 4); // 6: anonymous union
        b.member("a", 1, 0);
        b.member("b", 8, 0);
        b.ty("task_struct", 4, 4, 64); // 7
        b.member("pid", 8, 0);
        b.member("tasks", 4, 64);
        b.member("comm", 3, 192);
        b.member("", 6, 320);
        b.ty("pid_t", 8, 0, 1); // 8: typedef int
        b.finish()
    }

    #[test]
    fn members_through_typedefs_nesting_and_anonymous_unions() {
        let t = Types::from_bytes(&sample()).unwrap();
        assert_eq!(t.size_of("task_struct").unwrap(), 64);
        assert_eq!(
            t.field("task_struct", "pid").unwrap(),
            Field { offset: 0, size: 4 }
        );
        assert_eq!(
            t.field("task_struct", "tasks").unwrap(),
            Field {
                offset: 8,
                size: 16
            }
        );
        assert_eq!(t.field("task_struct", "tasks.prev").unwrap().offset, 16);
        assert_eq!(
            t.field("task_struct", "comm").unwrap(),
            Field {
                offset: 24,
                size: 16
            }
        );
        assert_eq!(
            t.field("task_struct", "b").unwrap(),
            Field {
                offset: 40,
                size: 4
            }
        );
        assert_eq!(t.array("task_struct", "comm").unwrap(), (1, 16));
        assert!(matches!(
            t.field("task_struct", "nope"),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            t.size_of("module"),
            Err(BtfError::NoStruct { .. })
        ));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(Types::from_bytes(&[0u8; 10]).is_err());
        let mut b = sample();
        b.truncate(40);
        assert!(Types::from_bytes(&b).is_err());
    }
}
