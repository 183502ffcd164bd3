//! A Volatility 3 symbol table (ISF, "intermediate symbol format" JSON,
//! metadata format 6.2.0 of Volatility 3's `schemas/schema-6.2.0.json`)
//! built from what the guest kernel carries itself: its BTF for the types
//! and kallsyms for the symbols — no debug package, no DWARF.
//!
//! Types: every BTF type. Integers and floats become `base_types` under
//! their BTF (= DWARF) names (`long unsigned int`, `_Bool`, ...), plus the
//! `pointer` and `void` base types Volatility expects; structs and unions
//! become `user_types` with byte offsets (anonymous ones are named
//! `unnamed_<btf id>` and their members marked `anonymous`, which
//! Volatility flattens into the parent); bitfields become `bitfield`
//! descriptors over their storage unit; enums become `enums`; typedefs,
//! `const`, `volatile`, `restrict` and type tags are resolved to what they
//! name; function prototypes are `function`.
//!
//! Symbols: every kallsyms name at its *link-time* address — the runtime
//! address minus the KASLR slide (`_text` minus [`LINK_TEXT`]), because
//! Volatility's Linux automagic finds the slide itself (from `init_task`'s
//! `swapper/0` in physical memory); per-CPU offsets (below the kernel half)
//! are kept as they are. Kernel BTF has no global variables except per-CPU
//! ones, so the types of the globals Volatility's Linux plugins read
//! (`init_task`, `modules`, `tk_core`, ...) come from [`GLOBAL_TYPES`];
//! `linux_banner` carries the banner as `constant_data`, which is what
//! Volatility's banner cache matches against memory.

use std::collections::{BTreeMap, HashMap};

use base64::Engine as _;
use btf_rs::{Btf, Type};
use serde_json::{Value, json};

use crate::btf::BtfError;
use crate::kallsyms::Symbol;

/// ISF metadata format written.
pub const ISF_FORMAT: &str = "6.2.0";

/// Link-time address of `_text` on x86-64 (`__START_KERNEL_map` +
/// `CONFIG_PHYSICAL_START` 0x1000000, Debian's and the default).
pub const LINK_TEXT: u64 = 0xffff_ffff_8100_0000;

/// Types of global variables (kernel BTF does not describe them): symbol,
/// C type: `struct X`, a base type name, `function`, `*T` (pointer),
/// `[N]T` (array; `[]T`: as many as fit before the next symbol). Only
/// those the symbol table has are used.
pub const GLOBAL_TYPES: &[(&str, &str)] = &[
    ("init_task", "struct task_struct"),
    ("init_mm", "struct mm_struct"),
    ("init_files", "struct files_struct"),
    ("init_pid_ns", "struct pid_namespace"),
    ("init_net", "struct net"),
    ("init_fs", "struct fs_struct"),
    ("init_nsproxy", "struct nsproxy"),
    ("init_uts_ns", "struct uts_namespace"),
    ("modules", "struct list_head"),
    ("net_namespace_list", "struct list_head"),
    ("super_blocks", "struct list_head"),
    ("module_kset", "*struct kset"),
    ("mod_tree", "struct mod_tree_root"),
    ("module_addr_min", "long unsigned int"),
    ("module_addr_max", "long unsigned int"),
    ("vmemmap_base", "long unsigned int"),
    ("page_offset_base", "long unsigned int"),
    ("vmalloc_base", "long unsigned int"),
    ("phys_base", "long unsigned int"),
    ("max_pfn", "long unsigned int"),
    ("jiffies", "long unsigned int"),
    ("jiffies_64", "long long unsigned int"),
    ("cap_last_cap", "int"),
    ("nr_cpu_ids", "unsigned int"),
    ("prb", "*struct printk_ringbuffer"),
    ("vmcoreinfo_data", "*unsigned char"),
    ("vmcoreinfo_size", "long unsigned int"),
    ("tk_core", "struct smmvmi_tk_core"),
    ("_text", "char"),
    ("_etext", "char"),
    ("_stext", "char"),
    ("_sinittext", "char"),
    ("_einittext", "char"),
    ("__per_cpu_offset", "[]*void"),
    ("idt_table", "[256]struct gate_struct"),
    ("taint_flags", "[]struct taint_flag"),
    ("sys_call_table", "[]*function"),
    ("ia32_sys_call_table", "[]*function"),
];

/// Builds the ISF of a kernel: `btf` raw bytes, `symbols` as kallsyms
/// decoded them (runtime addresses), `banner` the `linux_banner` text (as
/// /proc/version shows it, with its newline). Errors: BTF that does not
/// parse. Output: the ISF JSON document.
pub fn build(btf: &[u8], symbols: &[Symbol], banner: &str) -> Result<Value, BtfError> {
    let b = Btf::from_bytes(btf).map_err(|e| BtfError::Parse {
        len: btf.len(),
        why: e.to_string(),
    })?;
    let mut types: Vec<Type> = vec![Type::Void];
    while let Ok(t) = b.resolve_type_by_id(types.len() as u32) {
        types.push(t);
    }
    let mut w = Writer {
        btf: &b,
        types: &types,
        names: HashMap::new(),
    };
    w.name_all();

    let mut base_types = BTreeMap::new();
    base_types.insert(
        "pointer".to_string(),
        json!({"size": 8, "signed": false, "kind": "int", "endian": "little"}),
    );
    base_types.insert(
        "void".to_string(),
        json!({"size": 0, "signed": false, "kind": "void", "endian": "little"}),
    );
    let mut user_types = BTreeMap::new();
    let mut enums = BTreeMap::new();
    for (id, t) in types.iter().enumerate() {
        let id = id as u32;
        match t {
            Type::Int(i) => {
                let name = w.name(t);
                let kind = if i.is_bool() || name == "_Bool" {
                    "bool"
                } else if i.is_char() || name.contains("char") {
                    "char"
                } else {
                    "int"
                };
                base_types.entry(name).or_insert(json!({
                    "size": i.size(), "signed": i.is_signed(), "kind": kind, "endian": "little"
                }));
            }
            Type::Float(f) => {
                base_types.entry(w.name(t)).or_insert(json!({
                    "size": f.size(), "signed": true, "kind": "float", "endian": "little"
                }));
            }
            Type::Struct(s) | Type::Union(s) => {
                let Some(name) = w.names.get(&id).cloned() else {
                    continue;
                };
                let kind = if matches!(t, Type::Union(_)) {
                    "union"
                } else {
                    "struct"
                };
                let fields = w.fields(&s.members);
                // A duplicate name (two files' struct of one name): keep
                // the bigger definition.
                let better = user_types
                    .get(&name)
                    .is_none_or(|v: &Value| v["size"].as_u64().unwrap_or(0) < s.size() as u64);
                if better {
                    user_types.insert(
                        name,
                        json!({"kind": kind, "size": s.size(), "fields": fields}),
                    );
                }
            }
            Type::Enum(e) => {
                let consts = e.members.iter().map(|m| {
                    let v = if e.is_signed() {
                        json!(m.val() as i32)
                    } else {
                        json!(m.val())
                    };
                    (w.btf.resolve_name(m).unwrap_or_default(), v)
                });
                enum_entry(&mut enums, &w.names[&id], e.size(), e.is_signed(), consts);
            }
            Type::Enum64(e) => {
                let consts = e.members.iter().map(|m| {
                    let v = if e.is_signed() {
                        json!(m.val() as i64)
                    } else {
                        json!(m.val())
                    };
                    (w.btf.resolve_name(m).unwrap_or_default(), v)
                });
                enum_entry(&mut enums, &w.names[&id], e.size(), e.is_signed(), consts);
            }
            Type::Fwd(f) => {
                let name = w.name(t);
                if !name.is_empty() {
                    let kind = if f.is_union() { "union" } else { "struct" };
                    user_types
                        .entry(name)
                        .or_insert(json!({"kind": kind, "size": 0, "fields": {}}));
                }
            }
            _ => {}
        }
    }
    // Integer base types named in enums or descriptors that BTF spells
    // otherwise (a kernel without `long long int`, say).
    for (size, signed) in [
        (1, false),
        (1, true),
        (2, false),
        (2, true),
        (4, false),
        (4, true),
        (8, false),
        (8, true),
    ] {
        base_types
            .entry(int_name(size, signed).to_string())
            .or_insert(json!({"size": size, "signed": signed, "kind": "int", "endian": "little"}));
    }
    // tk_core is an anonymous struct in kernel/time/timekeeping.c: a
    // seqcount (4 bytes) then the timekeeper, 8-aligned.
    if let Some(tk) = user_types
        .get("timekeeper")
        .and_then(|v| v["size"].as_u64())
    {
        user_types.insert(
            "smmvmi_tk_core".into(),
            json!({"kind": "struct", "size": 8 + tk, "fields": {
                "seq": {"type": {"kind": "base", "name": "unsigned int"}, "offset": 0},
                "timekeeper": {"type": {"kind": "struct", "name": "timekeeper"}, "offset": 8},
            }}),
        );
    }

    // Symbols.
    let slide = symbols
        .iter()
        .find(|s| s.name == "_text")
        .map_or(0, |s| s.addr.wrapping_sub(LINK_TEXT));
    let var_types = w.percpu_var_types();
    let mut syms: BTreeMap<String, Value> = BTreeMap::new();
    for s in symbols {
        if syms.contains_key(&s.name) {
            continue;
        }
        let addr = if s.addr >= 0xffff_8000_0000_0000 {
            s.addr.wrapping_sub(slide)
        } else {
            s.addr
        };
        let mut v = json!({ "address": addr });
        if let Some(t) = var_types.get(&s.name) {
            v["type"] = t.clone();
        }
        syms.insert(s.name.clone(), v);
    }
    let mut addrs: Vec<u64> = syms
        .values()
        .filter_map(|v| v["address"].as_u64())
        .collect();
    addrs.sort_unstable();
    addrs.dedup();
    for (name, spec) in GLOBAL_TYPES {
        let Some(v) = syms.get_mut(*name) else {
            continue;
        };
        let at = v["address"].as_u64().unwrap_or(0);
        // Bytes up to the next symbol: the size of an unsized array.
        let room = addrs.iter().find(|&&a| a > at).map_or(0, |&a| a - at);
        if let Some(mut t) = descriptor_of(spec, room, &user_types, &base_types) {
            if *name == "taint_flags" {
                t["count"] = json!(taint_flags_count(banner));
            }
            v["type"] = t;
        }
    }
    let mut banner_bytes = banner.as_bytes().to_vec();
    banner_bytes.push(0);
    if let Some(v) = syms.get_mut("linux_banner") {
        v["type"] = json!({"kind": "array", "count": banner_bytes.len(),
            "subtype": {"kind": "base", "name": "char"}});
        v["constant_data"] = json!(base64::engine::general_purpose::STANDARD.encode(&banner_bytes));
    }
    Ok(json!({
        "metadata": {
            "format": ISF_FORMAT,
            "producer": {"name": "smmvmi-ids", "version": env!("CARGO_PKG_VERSION")},
            "linux": {"symbols": [], "types": []},
        },
        "base_types": base_types,
        "user_types": user_types,
        "enums": enums,
        "symbols": syms,
    }))
}

/// `TAINT_FLAGS_COUNT` (include/linux/panic.h) of the kernel named in
/// `banner`: 18 before 5.17 (`TAINT_TEST`), 19 before 6.15 (`TAINT_FWCTL`),
/// 20 after; the array is followed by other rodata, so its symbol gap
/// does not give its length.
pub fn taint_flags_count(banner: &str) -> u32 {
    let v: Vec<u32> = banner
        .strip_prefix("Linux version ")
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit() && c != '.').next())
        .unwrap_or("")
        .split('.')
        .filter_map(|x| x.parse().ok())
        .collect();
    match (
        v.first().copied().unwrap_or(6),
        v.get(1).copied().unwrap_or(0),
    ) {
        (a, b) if (a, b) < (5, 17) => 18,
        (a, b) if (a, b) < (6, 15) => 19,
        _ => 20,
    }
}

/// The C name of an integer of `size` bytes (DWARF's spelling).
/// One enum of the ISF (the first definition of a name wins).
fn enum_entry(
    enums: &mut BTreeMap<String, Value>,
    name: &str,
    size: usize,
    signed: bool,
    consts: impl Iterator<Item = (String, Value)>,
) {
    let consts: BTreeMap<String, Value> = consts.collect();
    enums.entry(name.to_string()).or_insert(json!({
        "size": size, "base": int_name(size, signed), "constants": consts
    }));
}

fn int_name(size: usize, signed: bool) -> &'static str {
    match (size, signed) {
        (1, false) => "unsigned char",
        (1, true) => "signed char",
        (2, false) => "short unsigned int",
        (2, true) => "short int",
        (4, false) => "unsigned int",
        (4, true) => "int",
        (8, false) => "long unsigned int",
        _ => "long int",
    }
}

/// A descriptor from [`GLOBAL_TYPES`]'s small C forms, if its type exists.
/// `room`: bytes from the symbol to the next one (for `[]T`).
fn descriptor_of(
    spec: &str,
    room: u64,
    user: &BTreeMap<String, Value>,
    base: &BTreeMap<String, Value>,
) -> Option<Value> {
    if let Some(rest) = spec.strip_prefix('[') {
        let (n, elem) = rest.split_once(']')?;
        let elem_size = if elem.starts_with('*') {
            8
        } else if let Some(s) = elem.strip_prefix("struct ") {
            user.get(s)?["size"].as_u64()?
        } else {
            base.get(elem)?["size"].as_u64()?
        };
        let count: u64 = if n.is_empty() {
            (room / elem_size.max(1)).clamp(1, 1 << 16)
        } else {
            n.parse().ok()?
        };
        let sub = descriptor_of(elem, 0, user, base)?;
        return Some(json!({"kind": "array", "count": count, "subtype": sub}));
    }
    if let Some(rest) = spec.strip_prefix('*') {
        let sub = descriptor_of(rest, 0, user, base)?;
        return Some(json!({"kind": "pointer", "subtype": sub}));
    }
    if spec == "function" {
        return Some(json!({"kind": "function"}));
    }
    if let Some(name) = spec.strip_prefix("struct ") {
        return user
            .contains_key(name)
            .then(|| json!({"kind": "struct", "name": name}));
    }
    base.contains_key(spec)
        .then(|| json!({"kind": "base", "name": spec}))
}

struct Writer<'a> {
    btf: &'a Btf,
    types: &'a [Type],
    /// Names of structs, unions and enums by BTF id (anonymous ones get
    /// `unnamed_<id>`).
    names: HashMap<u32, String>,
}

/// Most typedef/qualifier hops followed.
const MAX_CHAIN: usize = 32;

impl Writer<'_> {
    fn name(&self, t: &Type) -> String {
        t.as_btf_type()
            .and_then(|b| self.btf.resolve_name(b).ok())
            .unwrap_or_default()
    }

    fn name_all(&mut self) {
        for (id, t) in self.types.iter().enumerate() {
            if matches!(
                t,
                Type::Struct(_) | Type::Union(_) | Type::Enum(_) | Type::Enum64(_)
            ) {
                let n = self.name(t);
                let n = if n.is_empty() {
                    format!("unnamed_{id}")
                } else {
                    n
                };
                self.names.insert(id as u32, n);
            }
        }
    }

    fn target(&self, t: &Type) -> u32 {
        t.as_btf_type().and_then(|b| b.get_type_id()).unwrap_or(0)
    }

    /// Strips typedefs and qualifiers: the id of what `id` names.
    fn strip(&self, mut id: u32) -> u32 {
        for _ in 0..MAX_CHAIN {
            match self.types.get(id as usize) {
                Some(
                    t @ (Type::Typedef(_)
                    | Type::Const(_)
                    | Type::Volatile(_)
                    | Type::Restrict(_)
                    | Type::TypeTag(_)),
                ) => id = self.target(t),
                _ => return id,
            }
        }
        0
    }

    /// The type descriptor of `id`.
    fn desc(&self, id: u32, depth: usize) -> Value {
        let id = self.strip(id);
        let void = json!({"kind": "base", "name": "void"});
        if depth > MAX_CHAIN {
            return void;
        }
        match self.types.get(id as usize) {
            Some(t @ (Type::Int(_) | Type::Float(_))) => {
                json!({"kind": "base", "name": self.name(t)})
            }
            Some(t @ Type::Ptr(_)) => {
                json!({"kind": "pointer", "subtype": self.desc(self.target(t), depth + 1)})
            }
            Some(t @ Type::Array(a)) => json!({
                "kind": "array", "count": a.len(), "subtype": self.desc(self.target(t), depth + 1)
            }),
            Some(Type::Struct(_)) => json!({"kind": "struct", "name": self.names[&id]}),
            Some(Type::Union(_)) => json!({"kind": "union", "name": self.names[&id]}),
            Some(Type::Enum(_) | Type::Enum64(_)) => {
                json!({"kind": "enum", "name": self.names[&id]})
            }
            Some(t @ Type::Fwd(f)) => json!({
                "kind": if f.is_union() { "union" } else { "struct" }, "name": self.name(t)
            }),
            Some(Type::FuncProto(_) | Type::Func(_)) => json!({"kind": "function"}),
            _ => void,
        }
    }

    /// Size in bytes of an integer or enum (bitfield storage), 0 otherwise.
    fn scalar_size(&self, id: u32) -> usize {
        match self.types.get(self.strip(id) as usize) {
            Some(Type::Int(i)) => i.size(),
            Some(Type::Enum(e)) => e.size(),
            Some(Type::Enum64(e)) => e.size(),
            _ => 0,
        }
    }

    fn fields(&self, members: &[btf_rs::Member]) -> BTreeMap<String, Value> {
        let mut out = BTreeMap::new();
        for (i, m) in members.iter().enumerate() {
            let ty = m.get_type_id_or_void();
            let bit = u64::from(m.bit_offset());
            let name = self.btf.resolve_name(m).unwrap_or_default();
            let stripped = self.strip(ty);
            let anon_aggregate = name.is_empty()
                && matches!(
                    self.types.get(stripped as usize),
                    Some(Type::Struct(_) | Type::Union(_))
                );
            let (name, anonymous) = if name.is_empty() {
                (format!("unnamed_field_{i}"), anon_aggregate)
            } else {
                (name, false)
            };
            let v = match m.bitfield_size().filter(|&n| n > 0) {
                Some(bits) => {
                    let size = self.scalar_size(ty).max(1) as u64;
                    let unit = size * 8;
                    let mut offset = (bit / unit) * size;
                    if bit - offset * 8 + u64::from(bits) > unit {
                        // Straddles its natural unit: count from the byte.
                        offset = bit / 8;
                    }
                    json!({"offset": offset, "type": {
                        "kind": "bitfield",
                        "bit_position": bit - offset * 8,
                        "bit_length": bits,
                        "type": self.desc(ty, 0),
                    }})
                }
                None => json!({"offset": bit / 8, "type": self.desc(ty, 0)}),
            };
            let mut v = v;
            if anonymous {
                v["anonymous"] = json!(true);
            }
            out.insert(name, v);
        }
        out
    }

    /// Types of the variables BTF does describe (per-CPU ones).
    fn percpu_var_types(&self) -> HashMap<String, Value> {
        let mut m = HashMap::new();
        for t in self.types {
            if let Type::Var(v) = t {
                let name = self.btf.resolve_name(v).unwrap_or_default();
                m.insert(name, self.desc(self.target(t), 0));
            }
        }
        m
    }
}

trait MemberType {
    fn get_type_id_or_void(&self) -> u32;
}

impl MemberType for btf_rs::Member {
    fn get_type_id_or_void(&self) -> u32 {
        use btf_rs::BtfType as _;
        self.get_type_id().unwrap_or(0)
    }
}

/// Revision of what [`build`] writes (part of the cache key: bump it when
/// the output changes).
pub const ISF_REVISION: u32 = 3;

/// The cache file of a kernel's ISF: `DIR/isf/<hash of the banner and
/// [`ISF_REVISION`]>.json` (the banner carries the build: version, compiler,
/// build number and date).
pub fn cache_path(dir: &std::path::Path, banner: &str) -> std::path::PathBuf {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    banner.hash(&mut h);
    ISF_REVISION.hash(&mut h);
    dir.join("isf").join(format!("{:016x}.json", h.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small BTF blob: int, long unsigned int, struct list_head { *next,
    /// *prev }, struct task_struct { int pid; struct list_head tasks;
    /// unsigned int flags:3, :5; union { int a; } }, enum e { A = 1 },
    /// typedef u32 -> unsigned int.
    fn blob() -> Vec<u8> {
        let mut strs = vec![0u8];
        let mut s = |t: &str| {
            let off = strs.len() as u32;
            strs.extend_from_slice(t.as_bytes());
            strs.push(0);
            off
        };
        let (
            n_int,
            n_ulong,
            n_lh,
            n_next,
            n_prev,
            n_task,
            n_pid,
            n_tasks,
            n_flags,
            n_e,
            n_a,
            n_u32,
            n_uint,
        ) = (
            s("int"),
            s("long unsigned int"),
            s("list_head"),
            s("next"),
            s("prev"),
            s("task_struct"),
            s("pid"),
            s("tasks"),
            s("flags"),
            s("e"),
            s("A"),
            s("u32"),
            s("unsigned int"),
        );
        let mut ty: Vec<u8> = Vec::new();
        let put = |ty: &mut Vec<u8>, w: &[u32]| {
            for x in w {
                ty.extend_from_slice(&x.to_le_bytes())
            }
        };
        let info = |kind: u32, vlen: u32, kflag: u32| (kflag << 31) | (kind << 24) | vlen;
        // 1: int (signed, 32 bits)
        put(&mut ty, &[n_int, info(1, 0, 0), 4, (1 << 24) | 32]);
        // 2: long unsigned int
        put(&mut ty, &[n_ulong, info(1, 0, 0), 8, 64]);
        // 3: struct list_head
        put(&mut ty, &[n_lh, info(4, 2, 0), 16]);
        put(&mut ty, &[n_next, 4, 0]);
        put(&mut ty, &[n_prev, 4, 64]);
        // 4: ptr -> 3
        put(&mut ty, &[0, info(2, 0, 0), 3]);
        // 5: unsigned int
        put(&mut ty, &[n_uint, info(1, 0, 0), 4, 32]);
        // 6: typedef u32 -> 5
        put(&mut ty, &[n_u32, info(8, 0, 0), 5]);
        // 7: anonymous union { int a; }
        put(&mut ty, &[0, info(5, 1, 0), 4]);
        put(&mut ty, &[n_a, 1, 0]);
        // 8: struct task_struct (kind_flag: bitfields)
        put(&mut ty, &[n_task, info(4, 4, 1), 32]);
        put(&mut ty, &[n_pid, 1, 0]);
        put(&mut ty, &[n_tasks, 3, 64]);
        put(&mut ty, &[n_flags, 6, (3 << 24) | (192 + 5)]);
        put(&mut ty, &[0, 7, 224]);
        // 9: enum e { A = 1 }
        put(&mut ty, &[n_e, info(6, 1, 0), 4]);
        put(&mut ty, &[n_a, 1]);
        let _ = n_e;
        let mut b = Vec::new();
        b.extend_from_slice(&0xeb9fu16.to_le_bytes());
        b.push(1);
        b.push(0);
        b.extend_from_slice(&24u32.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&(ty.len() as u32).to_le_bytes());
        b.extend_from_slice(&(ty.len() as u32).to_le_bytes());
        b.extend_from_slice(&(strs.len() as u32).to_le_bytes());
        b.extend_from_slice(&ty);
        b.extend_from_slice(&strs);
        b
    }

    #[test]
    fn types_and_unrelocated_symbols() {
        let slide = 0x1e00_0000u64;
        let sym = |name: &str, addr: u64| Symbol {
            addr,
            kind: 'D',
            name: name.into(),
        };
        let syms = [
            sym("_text", LINK_TEXT + slide),
            sym("init_task", 0xffff_ffff_8260_0000 + slide),
            sym("linux_banner", 0xffff_ffff_8220_0000 + slide),
            sym("current_task", 0x2_1000),
            sym("sys_call_table", 0xffff_ffff_8220_1000 + slide),
            sym("after_the_table", 0xffff_ffff_8220_1040 + slide),
        ];
        let isf = build(&blob(), &syms, "Linux version 6.1.0 (x)\n").unwrap();
        let ts = &isf["user_types"]["task_struct"];
        assert_eq!(ts["size"], 32);
        assert_eq!(ts["fields"]["pid"]["offset"], 0);
        assert_eq!(ts["fields"]["tasks"]["offset"], 8);
        assert_eq!(ts["fields"]["tasks"]["type"]["name"], "list_head");
        // flags: bits 197..200 -> unit at byte 24, bit 5, through the typedef.
        let f = &ts["fields"]["flags"];
        assert_eq!(f["offset"], 24);
        assert_eq!(f["type"]["kind"], "bitfield");
        assert_eq!(f["type"]["bit_position"], 5);
        assert_eq!(f["type"]["bit_length"], 3);
        assert_eq!(f["type"]["type"]["name"], "unsigned int");
        let anon = &ts["fields"]["unnamed_field_3"];
        assert_eq!(anon["anonymous"], true);
        assert_eq!(anon["offset"], 28);
        assert_eq!(anon["type"]["kind"], "union");
        let lh = &isf["user_types"]["list_head"]["fields"]["next"]["type"];
        assert_eq!(lh["kind"], "pointer");
        assert_eq!(lh["subtype"]["name"], "list_head");
        assert_eq!(isf["enums"]["e"]["constants"]["A"], 1);
        assert_eq!(isf["base_types"]["long unsigned int"]["size"], 8);
        assert_eq!(isf["base_types"]["pointer"]["size"], 8);
        // Link-time addresses; per-CPU offsets untouched; typed globals.
        assert_eq!(isf["symbols"]["_text"]["address"], LINK_TEXT);
        assert_eq!(
            isf["symbols"]["init_task"]["address"],
            0xffff_ffff_8260_0000u64
        );
        assert_eq!(isf["symbols"]["init_task"]["type"]["name"], "task_struct");
        assert_eq!(isf["symbols"]["current_task"]["address"], 0x2_1000);
        // An unsized array is as long as the gap to the next symbol.
        let t = &isf["symbols"]["sys_call_table"]["type"];
        assert_eq!(
            (t["kind"].as_str(), t["count"].as_u64()),
            (Some("array"), Some(8))
        );
        assert_eq!(t["subtype"]["kind"], "pointer");
        let data = isf["symbols"]["linux_banner"]["constant_data"]
            .as_str()
            .unwrap();
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(data)
                .unwrap(),
            b"Linux version 6.1.0 (x)\n\0"
        );
        assert_eq!(isf["metadata"]["format"], ISF_FORMAT);
        assert_eq!(
            taint_flags_count("Linux version 6.1.0-57-cloud-amd64 (x)"),
            19
        );
        assert_eq!(taint_flags_count("Linux version 6.15.2 (x)"), 20);
        assert_eq!(taint_flags_count("Linux version 5.10.0 (x)"), 18);
    }
}
