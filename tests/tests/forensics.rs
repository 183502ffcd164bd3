//! End-to-end: the bridge to existing forensics tools. `ids isf` writes a
//! Volatility 3 symbol table from the guest's own BTF and kallsyms, `ids
//! dump --format lime` acquires RAM through the agent, and Volatility 3
//! (PyPI, pinned, in the venv of tests/src/venv.rs) runs `linux.pslist`,
//! `linux.lsmod` and `linux.malware.check_syscall` on it; the answers are
//! compared with `ids ps`, `ids lsmod`, `ids check syscalls` and the
//! guest's own /proc (with processes the test starts under random names).
//! The same three plugins run on the live guest through `ids mount` (FUSE),
//! the first scanning and saving Volatility's configuration, the others
//! loading it (no scan). Both on the default kernel and on Debian's 6.12
//! LTS kernel. On the default kernel also: an ELF-core dump interrupted
//! (SIGINT) and resumed equals the uninterrupted LiME dump and QEMU's own
//! `pmemsave` over the kernel's text and rodata, it opens in drgn with the
//! guest's VMCOREINFO, whose page-table walk reads the same task list, and
//! it carries each vCPU's registers (`NT_PRSTATUS`, as `readelf -n` lists
//! them), from which drgn with the DWARF of Debian's `-dbg` vmlinux unwinds
//! each CPU's stack. And the ISF is checked against that package's DWARF
//! and System.map.
//!
//! Run with `cargo xtask test` (these are `#[ignore]`d for plain `cargo test`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{boot, config, finish, sh};
use ids::linux::{Discovery, Kernel};
use ids::memory::GuestMemory;
use smmvmi_mailbox::wire::AddressSpace;
use smmvmi_tests::guest_image::KernelDeb;
use smmvmi_tests::vm::{Vm, VmConfig};

/// Guest RAM of these tests: small, so that a dump through the agent
/// (about 7.5 MiB/s under TCG) takes about half a minute.
const MEM: &str = "256M";

fn ids_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "ids", "--bin", "ids"])
            .current_dir(smmvmi_tests::repo_root())
            .status()
            .expect("run cargo build -p ids");
        assert!(status.success(), "cargo build -p ids failed");
        let exe = std::env::current_exe().expect("test executable path");
        exe.parent()
            .and_then(Path::parent)
            .expect("target/PROFILE/deps")
            .join("ids")
    })
}

fn venv() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        smmvmi_tests::venv::ensure(&mut |m| eprintln!("{m}")).unwrap_or_else(|e| panic!("{e}"));
    });
}

/// Runs `ids --connect EP ARGS` with its own cache directory.
fn ids(vm: &Vm, cache: &Path, args: &[&str]) -> Output {
    // QEMU serves one QMP client at a time: the harness hangs up first.
    vm.release_qmp();
    Command::new(ids_bin())
        .arg("--connect")
        .arg(vm.state_dir())
        .args(args)
        .env("XDG_CACHE_HOME", cache)
        .env_remove("IDS_CONNECT")
        .output()
        .expect("run ids")
}

fn ok(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Where `vol` takes its configuration from.
#[derive(Clone, Copy)]
enum VolConfig<'a> {
    /// Volatility's automagic (a scan of the memory for the banner and
    /// another for `swapper/0`, the KASLR slide), and the configuration
    /// they found written to this file (`--save-config`).
    Save(&'a Path),
    /// The configuration from this file (`-c`): no scan.
    Load(&'a Path),
}

/// Runs `vol -r json -f FILE -s SYMDIR PLUGIN`: the rows (the time it
/// took goes to stderr).
fn vol(file: &Path, symbols: &Path, plugin: &str, config: VolConfig) -> Vec<serde_json::Value> {
    let t = Instant::now();
    // Volatility's own cache (symbol table identifiers) per test: two
    // tests running at once corrupted a shared one ("symbol table
    // requirement was not fulfilled").
    let cache = symbols
        .parent()
        .unwrap_or(symbols)
        .join("volatility3-cache");
    std::fs::create_dir_all(&cache).expect("volatility3 cache directory");
    let mut cmd = Command::new(smmvmi_tests::venv::bin("vol"));
    cmd.args(["-q", "--offline", "-r", "json", "--cache-path"])
        .arg(&cache)
        .arg("-f")
        .arg(file)
        .arg("-s")
        .arg(symbols);
    let how = match config {
        VolConfig::Save(f) => {
            let _ = std::fs::remove_file(f);
            cmd.arg("--save-config").arg(f);
            ", --save-config"
        }
        VolConfig::Load(f) => {
            cmd.arg("-c").arg(f);
            ", -c (no scan)"
        }
    };
    let o = cmd.arg(plugin).output().expect("run vol");
    let out = ok(o, &format!("vol {plugin}"));
    eprintln!(
        "vol {plugin} on {}{how}: {:.1} s",
        file.display(),
        t.elapsed().as_secs_f64()
    );
    let start = out
        .find('[')
        .unwrap_or_else(|| panic!("no JSON from vol: {out}"));
    serde_json::from_str(&out[start..]).unwrap_or_else(|e| panic!("vol's JSON: {e}: {out}"))
}

/// The guest's processes: pid -> (comm, ppid).
fn guest_procs(vm: &Vm) -> BTreeMap<u32, (String, u32)> {
    let out = sh(vm, "cat /proc/[0-9]*/stat 2>/dev/null");
    let mut m = BTreeMap::new();
    for line in out.lines() {
        let (Some(open), Some(close)) = (line.find('('), line.rfind(')')) else {
            continue;
        };
        let Ok(pid) = line[..open].trim().parse() else {
            continue;
        };
        let ppid = line[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        m.insert(pid, (line[open + 1..close].to_string(), ppid));
    }
    m
}

/// Starts `n` sleeping processes whose comm is a random name (a script
/// named so: the kernel names the task after the script file).
fn start_named(vm: &Vm, n: usize) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let mut b = [0u8; 5];
        getrandom::fill(&mut b).expect("random");
        let name: String = format!(
            "v{}",
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        );
        let pid: u32 = sh(
            vm,
            &format!(
                "printf '#!/bin/sh\\nsleep 100000\\n' > /tmp/{name}; chmod +x /tmp/{name}; \
                 /tmp/{name} </dev/null >/dev/null 2>&1 & echo $!"
            ),
        )
        .parse()
        .expect("pid of the started process");
        out.push((name, pid));
    }
    out
}

/// A physical range of a LiME file (read through its headers).
fn lime_range(file: &Path, addr: u64, len: u64) -> Vec<u8> {
    let data = std::fs::read(file).expect("read the LiME file");
    let mut off = 0usize;
    while off + 32 <= data.len() {
        let h = &data[off..off + 32];
        assert_eq!(&h[0..4], b"EMiL", "LiME magic at {off:#x}");
        let s = u64::from_le_bytes(h[8..16].try_into().unwrap());
        let e = u64::from_le_bytes(h[16..24].try_into().unwrap());
        let body = off + 32;
        if addr >= s && addr + len <= e + 1 {
            let at = body + (addr - s) as usize;
            return data[at..at + len as usize].to_vec();
        }
        off = body + (e - s + 1) as usize;
    }
    panic!(
        "{addr:#x}+{len:#x} is in no LiME range of {}",
        file.display()
    );
}

/// The physical ranges (address, length) of the kernel's text (`_text` ..
/// `_etext`) and rodata (`__start_rodata` .. `__end_rodata`; the image is
/// physically contiguous), and the kernel. The gap between them is left
/// out: the kernel frees it after boot ("Freeing unused kernel image
/// (text/rodata gap) memory") and it is then ordinary, changing RAM.
fn kernel_text(vm: &Vm) -> (Vec<(u64, u64)>, Kernel) {
    let mut s = common::ids_session(vm);
    let k = Kernel::load(&mut s, &Discovery::default(), None).unwrap_or_else(|e| panic!("{e}"));
    let sym = |n: &str| k.kallsyms.addr(n).unwrap_or_else(|| panic!("no {n}"));
    let text = sym("_text");
    let pa = s
        .translate(AddressSpace::kernel_of(0), text)
        .unwrap()
        .unwrap_or_else(|f| panic!("translating _text: {f:?}"));
    let ranges = [("_text", "_etext"), ("__start_rodata", "__end_rodata")]
        .iter()
        .map(|(a, b)| (pa + sym(a) - text, sym(b) - sym(a)))
        .collect();
    (ranges, k)
}

struct Checked {
    dump_secs: f64,
    /// The processes started under random names: (name, pid).
    started: Vec<(String, u32)>,
    /// The ISF directory.
    symbols: PathBuf,
}

/// The pid of the guest's command-channel daemon (its children come and
/// go with every command the test sends).
fn cmdd_pid(vm: &Vm) -> u32 {
    sh(vm, "pidof smmvmi-cmdd | cut -d' ' -f1")
        .parse()
        .unwrap_or(0)
}

/// Volatility's `linux.pslist` rows (read from `source` between the
/// guest's /proc snapshots `before` and `after`) against /proc, `ids ps`
/// and the processes started under random names: every process alive
/// before and after (less the command channel's transient ones) is there
/// under the same name and parent as /proc and ids give it, and nothing
/// else is.
fn check_pslist(
    source: &str,
    rows: &[serde_json::Value],
    before: &BTreeMap<u32, (String, u32)>,
    after: &BTreeMap<u32, (String, u32)>,
    ids_ps: &[ids::linux::Task],
    started: &[(String, u32)],
    cmdd: u32,
) {
    let vol_ps: BTreeMap<u32, (String, u32)> = rows
        .iter()
        .map(|r| {
            (
                r["PID"].as_u64().unwrap() as u32,
                (
                    r["COMM"].as_str().unwrap().to_string(),
                    r["PPID"].as_u64().unwrap() as u32,
                ),
            )
        })
        .collect();
    for (name, pid) in started {
        assert_eq!(
            vol_ps.get(pid).map(|v| v.0.as_str()),
            Some(name.as_str()),
            "Volatility's pslist on {source} must show the started process {name} as pid {pid}"
        );
        assert!(
            ids_ps.iter().any(|t| t.pid == *pid && t.comm == *name),
            "ids ps shows {name} as {pid}"
        );
    }
    let mut ppid_of: BTreeMap<u32, u32> = before.iter().map(|(&p, v)| (p, v.1)).collect();
    ppid_of.extend(after.iter().map(|(&p, v)| (p, v.1)));
    ppid_of.extend(vol_ps.iter().map(|(&p, v)| (p, v.1)));
    let skip = common::transient(cmdd, &ppid_of);
    let stable: BTreeSet<u32> = before
        .keys()
        .filter(|p| after.contains_key(p) && !skip.contains(p))
        .copied()
        .collect();
    assert!(stable.len() >= 20, "stable processes: {stable:?}");
    for pid in &stable {
        let (comm, ppid) = &before[pid];
        let Some((vcomm, vppid)) = vol_ps.get(pid) else {
            panic!(
                "pid {pid} ({comm}) is missing from Volatility's pslist on {source}: {vol_ps:?}"
            );
        };
        assert!(
            comm.starts_with(vcomm.as_str()),
            "pid {pid} on {source}: /proc says {comm}, Volatility {vcomm}"
        );
        assert_eq!(ppid, vppid, "pid {pid}'s parent on {source}");
        let t = ids_ps.iter().find(|t| t.pid == *pid);
        assert_eq!(
            t.map(|t| t.comm.as_str()),
            Some(vcomm.as_str()),
            "pid {pid}: ids ps and Volatility on {source} agree on the name"
        );
    }
    let known: BTreeSet<u32> = before
        .keys()
        .chain(after.keys())
        .chain(skip.iter())
        .chain(ids_ps.iter().map(|t| &t.pid))
        .copied()
        .collect();
    let extra: Vec<&u32> = vol_ps.keys().filter(|p| !known.contains(p)).collect();
    assert!(
        extra.is_empty(),
        "Volatility on {source} lists processes nobody else saw: {extra:?}"
    );
}

/// Volatility's `linux.lsmod` rows, `ids lsmod` and /proc/modules name the
/// same modules.
fn check_lsmod(vm: &Vm, cache: &Path, source: &str, rows: &[serde_json::Value]) {
    let vol_mods: BTreeSet<String> = rows
        .iter()
        .map(|r| r["Module Name"].as_str().unwrap().to_string())
        .collect();
    let proc_mods: BTreeSet<String> = sh(vm, "cut -d' ' -f1 /proc/modules")
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect();
    let ids_mods: Vec<serde_json::Value> =
        serde_json::from_str(&ok(ids(vm, cache, &["--json", "lsmod"]), "ids lsmod")).unwrap();
    let ids_mods: BTreeSet<String> = ids_mods
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect();
    assert!(!proc_mods.is_empty(), "the guest has modules loaded");
    assert_eq!(
        vol_mods, proc_mods,
        "Volatility's lsmod on {source} and /proc/modules"
    );
    assert_eq!(ids_mods, proc_mods, "ids lsmod and /proc/modules");
}

/// Volatility's `linux.malware.check_syscall` rows: every 64-bit entry
/// resolves to a kernel symbol (no hook), syscall 0 is `read`, as `ids
/// check syscalls` finds (exit 0: clean).
fn check_syscall_rows(vm: &Vm, cache: &Path, source: &str, rows: &[serde_json::Value]) {
    let x64: Vec<&serde_json::Value> = rows
        .iter()
        .filter(|r| r["Table Name"].as_str() == Some("64bit"))
        .collect();
    assert!(
        x64.len() >= 300,
        "64-bit syscall table rows on {source}: {}",
        x64.len()
    );
    for r in &x64 {
        let sym = r["Handler Symbol"].as_str().unwrap_or("");
        assert!(
            sym.contains("sys_") || sym.contains("ni_syscall"),
            "unexpected handler in Volatility's check_syscall on {source}: {r}"
        );
    }
    let read = x64
        .iter()
        .find(|r| r["Index"].as_u64() == Some(0))
        .expect("syscall 0");
    assert_eq!(read["Handler Symbol"], "__x64_sys_read", "on {source}");
    let o = ids(vm, cache, &["check", "syscalls"]);
    ok(o, "ids check syscalls (clean)");
}

/// isf + LiME dump + the three plugins against ids and the guest.
fn volatility_checks(vm: &Vm, dir: &Path) -> Checked {
    venv();
    vm.wait_agent_ready(common::AGENT_READY)
        .unwrap_or_else(|e| panic!("{e}"));
    let cache = dir.join("cache");
    let started = start_named(vm, 2);
    let cmdd = cmdd_pid(vm);
    let symbols = dir.join("symbols");
    ok(
        ids(
            vm,
            &cache,
            &["isf", "-o", symbols.join("guest.json").to_str().unwrap()],
        ),
        "ids isf",
    );
    let before = guest_procs(vm);
    let lime = dir.join("mem.lime");
    let t = Instant::now();
    ok(
        ids(
            vm,
            &cache,
            &["dump", "-o", lime.to_str().unwrap(), "--format", "lime"],
        ),
        "ids dump --format lime",
    );
    let dump_secs = t.elapsed().as_secs_f64();
    eprintln!("ids dump --format lime of {MEM}: {dump_secs:.1} s");
    let after = guest_procs(vm);
    let ids_ps: Vec<ids::linux::Task> =
        serde_json::from_str(&ok(ids(vm, &cache, &["--json", "ps"]), "ids ps")).unwrap();

    // The first plugin finds the banner and the KASLR slide by scanning
    // the dump and saves what it found; the other two load it.
    let source = "the LiME dump";
    let config = dir.join("vol-lime-config.json");
    let rows = vol(&lime, &symbols, "linux.pslist", VolConfig::Save(&config));
    check_pslist(source, &rows, &before, &after, &ids_ps, &started, cmdd);
    let rows = vol(&lime, &symbols, "linux.lsmod", VolConfig::Load(&config));
    check_lsmod(vm, &cache, source, &rows);
    let rows = vol(
        &lime,
        &symbols,
        "linux.malware.check_syscall",
        VolConfig::Load(&config),
    );
    check_syscall_rows(vm, &cache, source, &rows);
    Checked {
        dump_secs,
        started,
        symbols,
    }
}

fn workdir(vm: &Vm) -> PathBuf {
    let d = vm.state_dir().join("forensics");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The default kernel: Volatility on a LiME dump and on the live mount, a
/// resumed dump against the whole one and `pmemsave`, and drgn on the ELF
/// core.
#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn forensics_default_kernel() {
    let vm = boot(config("forensics").mem(MEM));
    let dir = workdir(&vm);
    let c = volatility_checks(&vm, &dir);
    live_mount(&vm, &dir, &c);
    let cache = dir.join("cache");

    // Resume: interrupt an ELF-core dump, then continue it.
    let elf = dir.join("mem.elf");
    vm.release_qmp();
    let mut child = Command::new(ids_bin())
        .arg("--connect")
        .arg(vm.state_dir())
        .args(["dump", "-o", elf.to_str().unwrap(), "--format", "elf"])
        .env("XDG_CACHE_HOME", &cache)
        .spawn()
        .expect("start ids dump");
    std::thread::sleep(Duration::from_secs_f64((c.dump_secs / 3.0).max(3.0)));
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "an interrupted dump exits 130");
    let state = ids::acquire::state_path(&elf);
    let st: ids::acquire::State =
        serde_json::from_str(&std::fs::read_to_string(&state).expect("resume state")).unwrap();
    assert!(
        st.done > 0,
        "the interrupted dump kept {:#x} bytes",
        st.done
    );
    assert!(
        st.done < st.plan.total(),
        "the interrupt came before the end"
    );
    ok(
        ids(
            &vm,
            &cache,
            &[
                "dump",
                "-o",
                elf.to_str().unwrap(),
                "--format",
                "elf",
                "--resume",
            ],
        ),
        "ids dump --resume",
    );
    assert!(!state.exists(), "a completed dump leaves no state");

    // Kernel text and rodata: resumed ELF core == LiME == pmemsave.
    let (ranges, k) = kernel_text(&vm);
    let elf_bytes = std::fs::read(&elf).unwrap();
    for (i, &(pa, len)) in ranges.iter().enumerate() {
        let r = st
            .plan
            .pieces
            .iter()
            .find_map(|p| match p {
                ids::acquire::Piece::Ram {
                    offset,
                    base,
                    len: l,
                } if pa >= *base && pa + len <= base + l => Some((*offset, *base)),
                _ => None,
            })
            .expect("the kernel in one RAM range");
        let at = (r.0 + pa - r.1) as usize;
        let from_elf = &elf_bytes[at..at + len as usize];
        let from_lime = lime_range(&dir.join("mem.lime"), pa, len);
        let pmem = dir.join(format!("kernel{i}.pmemsave"));
        vm.qmp(
            "pmemsave",
            Some(serde_json::json!({"val": pa, "size": len, "filename": pmem})),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        vm.release_qmp();
        let from_qemu = std::fs::read(&pmem).unwrap();
        assert_eq!(from_qemu.len() as u64, len);
        assert!(
            from_elf == from_qemu.as_slice(),
            "the resumed ELF core's kernel range {i} ({len:#x} bytes at {pa:#x}) differs from pmemsave"
        );
        assert!(
            from_lime == from_qemu,
            "the LiME dump's kernel range {i} ({len:#x} bytes at {pa:#x}) differs from pmemsave"
        );
    }

    // The resumed ELF core: drgn reads its VMCOREINFO and walks the task
    // list through the page tables it names.
    drgn_task_list(&vm, &elf, &k);
    elf_cpu_notes(&vm, &elf, &k);
    let release = sh(&vm, "uname -r");
    isf_against_debian_dwarf(&release, &c.symbols.join("guest.json"));
    drgn_stack_traces(&elf, &release, &elf_cpu_rips(&elf));
    let _ = std::fs::remove_dir_all(&dir);
    finish(vm);
}

/// The `pr_reg` of every `NT_PRSTATUS` note of an ELF core, in order.
fn elf_prstatus_regs(elf: &Path) -> Vec<Vec<u64>> {
    use object::read::elf::{FileHeader, ProgramHeader};
    let data = std::fs::read(elf).expect("read the ELF core");
    let h = object::elf::FileHeader64::<object::Endianness>::parse(&*data).expect("ELF header");
    let e = h.endian().expect("endianness");
    let mut regs: Vec<Vec<u64>> = Vec::new();
    for ph in h.program_headers(e, &*data).expect("program headers") {
        let Some(mut notes) = ph.notes(e, &*data).expect("notes") else {
            continue;
        };
        while let Some(n) = notes.next().expect("a note") {
            if n.name() == b"CORE" && n.n_type(e) == ids::acquire::NT_PRSTATUS {
                let d = n.desc();
                assert_eq!(d.len(), ids::acquire::PRSTATUS_LEN, "elf_prstatus size");
                regs.push(
                    d[ids::acquire::PRSTATUS_REG..ids::acquire::PRSTATUS_REG + 27 * 8]
                        .chunks(8)
                        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                );
            }
        }
    }
    regs
}

/// Each CPU's RIP in the ELF core's `NT_PRSTATUS` notes.
fn elf_cpu_rips(elf: &Path) -> Vec<u64> {
    elf_prstatus_regs(elf).iter().map(|r| r[16]).collect()
}

/// drgn with the DWARF of Debian's `-dbg` vmlinux on the ELF core: for
/// every online CPU the task running there (`cpu_curr`) has a stack trace
/// unwound from the CPU's `NT_PRSTATUS` registers, its first frame at that
/// CPU's RIP and, in the kernel, named frames.
fn drgn_stack_traces(elf: &Path, release: &str, rips: &[u64]) {
    let dbg = smmvmi_tests::guest_image::debug_kernel(release, &mut |m| eprintln!("{m}"))
        .unwrap_or_else(|e| panic!("{e}"));
    let script = format!(
        r#"
import drgn
from drgn.helpers.linux.sched import cpu_curr
from drgn.helpers.linux.cpumask import for_each_online_cpu
prog = drgn.Program()
prog.set_core_dump({elf:?})
prog.load_debug_info([{vmlinux:?}])
for cpu in for_each_online_cpu(prog):
    task = cpu_curr(prog, cpu)
    trace = prog.stack_trace(task)
    names = [f.name or "?" for f in trace]
    print("CPU", cpu, hex(trace[0].pc), task.comm.string_().decode(), " ".join(names))
"#,
        elf = elf.display().to_string(),
        vmlinux = dbg.vmlinux.display().to_string(),
    );
    let t = Instant::now();
    let out = Command::new(smmvmi_tests::venv::bin("python3"))
        .args(["-c", &script])
        .output()
        .expect("run drgn");
    let text = ok(out, "drgn stack traces with the -dbg vmlinux");
    eprintln!(
        "drgn with DWARF on the ELF core ({:.1} s):\n{text}",
        t.elapsed().as_secs_f64()
    );
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("CPU ")).collect();
    assert_eq!(lines.len(), rips.len(), "a trace per CPU: {text}");
    for (cpu, rip) in rips.iter().enumerate() {
        let line = lines
            .iter()
            .find(|l| l.starts_with(&format!("CPU {cpu} ")))
            .unwrap_or_else(|| panic!("no trace for CPU {cpu}: {text}"));
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            f[2],
            format!("{rip:#x}"),
            "CPU {cpu}'s first frame is at its NT_PRSTATUS RIP"
        );
        // A CPU caught in user space has no kernel frames to name.
        assert!(
            *rip < 0x8000_0000_0000 || (f.len() >= 6 && f[4] != "?"),
            "CPU {cpu}: a trace of named kernel frames: {line}"
        );
    }
}

/// The ELF core's registers: one `NT_PRSTATUS` note per vCPU, which
/// binutils' `readelf -n` lists, each `pr_reg` a CPU caught in the kernel
/// half with the kernel's CS or in user space with the user's, with a
/// stack pointer.
fn elf_cpu_notes(vm: &Vm, elf: &Path, k: &Kernel) {
    let cpus = common::ids_session(vm)
        .info()
        .expect("INFO")
        .header
        .cpu_count as usize;
    vm.release_qmp();
    let regs = elf_prstatus_regs(elf);
    assert_eq!(regs.len(), cpus, "one NT_PRSTATUS per vCPU");
    let o = Command::new("readelf")
        .arg("-n")
        .arg(elf)
        .output()
        .expect("run readelf");
    let text = ok(o, "readelf -n");
    assert_eq!(
        text.matches("NT_PRSTATUS").count(),
        cpus,
        "readelf lists a prstatus per vCPU: {text}"
    );
    assert!(text.contains("VMCOREINFO"), "{text}");
    let sym = |n: &str| k.kallsyms.addr(n).unwrap_or_else(|| panic!("no {n}"));
    let text_range = sym("_text")..sym("_etext");
    let mut in_text = 0;
    for (cpu, r) in regs.iter().enumerate() {
        let (rip, cs, rsp) = (r[16], r[17], r[19]);
        eprintln!("ELF core, CPU {cpu}: rip {rip:#x} cs {cs:#x} rsp {rsp:#x}");
        assert!(rsp != 0, "CPU {cpu}: rsp");
        // In the kernel half (kernel text, or rarely a module or the
        // entry trampoline) with the kernel's CS, or in user space with
        // the user's.
        let kernel = rip >= 0xffff_8000_0000_0000;
        assert!(
            (kernel && cs == 0x10) || (rip < 0x8000_0000_0000 && cs == 0x33),
            "CPU {cpu}: rip {rip:#x} with cs {cs:#x}"
        );
        in_text += usize::from(text_range.contains(&rip));
    }
    eprintln!("ELF core: {in_text} of {cpus} CPUs in kernel text");
}

/// drgn on the ELF core: the VMCOREINFO note makes it a Linux kernel core,
/// drgn's kallsyms reader (whose tables VMCOREINFO locates) finds
/// `init_task` where ids does, and the task list walked from it through
/// drgn's own page-table walk (`swapper_pg_dir` from VMCOREINFO) holds the
/// guest's processes. drgn has no types without DWARF: the list offsets
/// are the ones ids took from BTF.
fn drgn_task_list(vm: &Vm, elf: &Path, k: &Kernel) {
    venv();
    let o = &k.offsets;
    let script = format!(
        r#"
import drgn
from drgn.helpers.linux.kallsyms import load_vmlinux_kallsyms
prog = drgn.Program()
prog.set_core_dump({elf:?})
assert prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL, prog.flags
prog.register_symbol_finder("kallsyms", load_vmlinux_kallsyms(prog), enable_index=0)
init_task = prog.symbol("init_task").address
print("INIT_TASK", hex(init_task))
head = init_task + {tasks}
pos = int.from_bytes(prog.read(head, 8), "little")
n = 0
while pos != head and n < 100000:
    t = pos - {tasks}
    pid = int.from_bytes(prog.read(t + {pid}, 4), "little")
    comm = prog.read(t + {comm}, 16).split(b"\0")[0].decode()
    print("TASK", pid, comm)
    pos = int.from_bytes(prog.read(pos, 8), "little")
    n += 1
"#,
        elf = elf.display().to_string(),
        tasks = o.task_tasks,
        pid = o.task_pid,
        comm = o.task_comm,
    );
    let out = Command::new(smmvmi_tests::venv::bin("python3"))
        .args(["-c", &script])
        .output()
        .expect("run drgn");
    let text = ok(out, "drgn on the ELF core");
    let drgn: BTreeMap<u32, String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("TASK "))
        .filter_map(|l| {
            let (p, c) = l.split_once(' ')?;
            Some((p.parse().ok()?, c.to_string()))
        })
        .collect();
    assert!(
        text.contains(&format!(
            "INIT_TASK {:#x}",
            k.kallsyms.addr("init_task").unwrap()
        )),
        "drgn's kallsyms (through VMCOREINFO) put init_task where ids does: {text}"
    );
    let procs = guest_procs(vm);
    assert!(drgn.len() >= 20, "drgn's task list: {text}");
    let init = drgn.get(&1).expect("pid 1 in drgn's task list");
    assert_eq!(Some(init), procs.get(&1).map(|p| &p.0), "pid 1's name");
    let shared = drgn
        .iter()
        .filter(|(p, c)| procs.get(p).is_some_and(|g| g.0.starts_with(c.as_str())))
        .count();
    assert!(
        shared * 10 >= procs.len() * 9,
        "drgn and /proc share {shared} of {} processes",
        procs.len()
    );
}

/// Debian's 6.12 LTS kernel: Volatility on a LiME dump and on the live
/// mount (`SMMVMI_KERNEL_612_DEB` pins the package, as in linux.rs).
#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn forensics_6_12_kernel() {
    let deb = std::env::var("SMMVMI_KERNEL_612_DEB")
        .ok()
        .map(|v| v.parse::<KernelDeb>().unwrap_or_else(|e| panic!("{e}")))
        .unwrap_or_else(|| {
            smmvmi_tests::guest_image::resolve_lts_612().unwrap_or_else(|e| panic!("{e}"))
        });
    let cfg: VmConfig = config("forensics-612").kernel_deb(deb).mem(MEM);
    let vm = boot(cfg);
    let dir = workdir(&vm);
    let c = volatility_checks(&vm, &dir);
    live_mount(&vm, &dir, &c);
    let _ = std::fs::remove_dir_all(&dir);
    finish(vm);
}

/// `ids mount`: Volatility's pslist, lsmod and check_syscall on the live
/// guest's DIR/mem agree with /proc, `ids ps`, `ids lsmod` and `ids check
/// syscalls` (the processes started before, and one started after the
/// mount, included). The first run scans (banner, KASLR slide) and saves
/// its configuration; the others load it and scan nothing. A process
/// started after the first run is in the second pslist: each open of the
/// file reads fresh memory. SIGINT unmounts. The `ids` commands run while
/// nothing is mounted (one agent client at a time in direct mode).
fn live_mount(vm: &Vm, dir: &Path, c: &Checked) {
    let cache = dir.join("cache");
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mut started = c.started.clone();
    started.extend(start_named(vm, 1));
    let cmdd = cmdd_pid(vm);
    vm.release_qmp();
    let mut child = Command::new(ids_bin())
        .arg("--connect")
        .arg(vm.state_dir())
        .arg("mount")
        .arg(&mnt)
        .env("XDG_CACHE_HOME", &cache)
        .spawn()
        .expect("start ids mount");
    let mem = mnt.join("mem");
    let t = Instant::now();
    while !mem.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no {} after 30 s",
            mem.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let later = start_named(vm, 1);
    let config = dir.join("vol-live-config.json");
    let before = guest_procs(vm);
    let first = vol(&mem, &c.symbols, "linux.pslist", VolConfig::Save(&config));
    let after_first = guest_procs(vm);
    let after = start_named(vm, 1);
    let second = vol(&mem, &c.symbols, "linux.pslist", VolConfig::Load(&config));
    let lsmod = vol(&mem, &c.symbols, "linux.lsmod", VolConfig::Load(&config));
    let syscalls = vol(
        &mem,
        &c.symbols,
        "linux.malware.check_syscall",
        VolConfig::Load(&config),
    );
    let after_all = guest_procs(vm);
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "ids mount ended with {status}");
    assert!(!mem.exists(), "SIGINT unmounts {}", mnt.display());

    let ids_ps: Vec<ids::linux::Task> =
        serde_json::from_str(&ok(ids(vm, &cache, &["--json", "ps"]), "ids ps")).unwrap();
    started.extend(later);
    check_pslist(
        "the live mount",
        &first,
        &before,
        &after_first,
        &ids_ps,
        &started,
        cmdd,
    );
    started.extend(after);
    check_pslist(
        "the live mount (second run, saved configuration)",
        &second,
        &after_first,
        &after_all,
        &ids_ps,
        &started,
        cmdd,
    );
    check_lsmod(vm, &cache, "the live mount", &lsmod);
    check_syscall_rows(vm, &cache, "the live mount", &syscalls);
}

/// The files of Volatility 3 the checked plugins run: the plugins, the
/// Linux symbol-table class and object extensions they call, the module
/// utilities of lsmod and the Linux automagic (banner, KASLR, DTB).
const VOLATILITY_SOURCES: &[&str] = &[
    "framework/plugins/linux/pslist.py",
    "framework/plugins/linux/lsmod.py",
    "framework/plugins/linux/malware/check_syscall.py",
    "framework/symbols/linux/__init__.py",
    "framework/symbols/linux/extensions/__init__.py",
    "framework/symbols/linux/utilities/__init__.py",
    "framework/symbols/linux/utilities/modules.py",
    "framework/automagic/linux.py",
];

/// The names Volatility's code for these plugins uses: identifiers that
/// follow a `.` (attribute access: `task.real_parent`) or open a string
/// (`"task_struct"`, `has_member("__state")`, `get_symbol("init_task")`).
fn volatility_names() -> BTreeSet<String> {
    let lib = smmvmi_tests::venv::dir().join("lib");
    let site = std::fs::read_dir(&lib)
        .expect("the venv's lib/")
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages").join("volatility3"))
        .find(|p| p.is_dir())
        .expect("volatility3 in the venv");
    let mut names = BTreeSet::new();
    for f in VOLATILITY_SOURCES {
        let text = std::fs::read_to_string(site.join(f))
            .unwrap_or_else(|e| panic!("{}: {e}", site.join(f).display()));
        let b = text.as_bytes();
        let mut i = 0;
        while i < b.len() {
            let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
            if word(b[i]) && (i == 0 || !word(b[i - 1])) {
                let start = i;
                while i < b.len() && word(b[i]) {
                    i += 1;
                }
                if start > 0 && matches!(b[start - 1], b'.' | b'"' | b'\'') {
                    names.insert(text[start..i].to_string());
                }
            } else {
                i += 1;
            }
        }
    }
    names
}

/// Size in bytes of an ISF type descriptor.
fn isf_size(isf: &serde_json::Value, d: &serde_json::Value) -> Option<u64> {
    let name = d["name"].as_str().unwrap_or("");
    match d["kind"].as_str()? {
        "base" => isf["base_types"][name]["size"].as_u64(),
        "pointer" => isf["base_types"]["pointer"]["size"].as_u64().or(Some(8)),
        "struct" | "union" | "class" => isf["user_types"][name]["size"].as_u64(),
        "enum" => isf["enums"][name]["size"].as_u64(),
        "array" => Some(d["count"].as_u64()? * isf_size(isf, &d["subtype"])?),
        "bitfield" => isf_size(isf, &d["type"]),
        _ => None,
    }
}

/// The user type (struct or union) a descriptor leads to through
/// pointers and arrays.
fn isf_target(d: &serde_json::Value) -> Option<&str> {
    match d["kind"].as_str()? {
        "struct" | "union" | "class" => d["name"].as_str(),
        "pointer" | "array" => isf_target(&d["subtype"]),
        _ => None,
    }
}

/// An ISF user type as Volatility sees it (anonymous members lifted), and
/// each member's descriptor.
fn isf_layout(
    isf: &serde_json::Value,
    name: &str,
) -> Option<(
    smmvmi_tests::dwarf::Layout,
    BTreeMap<String, serde_json::Value>,
)> {
    fn walk(
        isf: &serde_json::Value,
        fields: &serde_json::Map<String, serde_json::Value>,
        base: u64,
        out: &mut BTreeMap<String, smmvmi_tests::dwarf::Member>,
        types: &mut BTreeMap<String, serde_json::Value>,
    ) {
        for (n, f) in fields {
            let offset = base + f["offset"].as_u64().unwrap_or(0);
            if f["anonymous"].as_bool() == Some(true) {
                let sub = f["type"]["name"].as_str().unwrap_or("");
                if let Some(fs) = isf["user_types"][sub]["fields"].as_object() {
                    walk(isf, fs, offset, out, types);
                }
                continue;
            }
            out.entry(n.clone()).or_insert(smmvmi_tests::dwarf::Member {
                offset,
                size: isf_size(isf, &f["type"]),
                bitfield: f["type"]["kind"] == "bitfield",
            });
            types.entry(n.clone()).or_insert(f["type"].clone());
        }
    }
    let t = isf["user_types"].get(name)?;
    let mut members = BTreeMap::new();
    let mut types = BTreeMap::new();
    walk(isf, t["fields"].as_object()?, 0, &mut members, &mut types);
    let kind = if t["kind"] == "union" {
        "union"
    } else {
        "struct"
    };
    Some((
        smmvmi_tests::dwarf::Layout {
            kind,
            size: t["size"].as_u64()?,
            members,
        },
        types,
    ))
}

/// An ISF member against DWARF's: the same offset and size; a bitfield's
/// ISF offset is its storage unit, which holds the byte DWARF names.
fn same_member(isf: &smmvmi_tests::dwarf::Member, dw: &smmvmi_tests::dwarf::Member) -> bool {
    if isf.bitfield || dw.bitfield {
        isf.bitfield == dw.bitfield
            && dw.offset >= isf.offset
            && dw.offset < isf.offset + isf.size.unwrap_or(8).max(1)
    } else {
        isf.offset == dw.offset && isf.size == dw.size
    }
}

/// The differences between an ISF layout and the closest of DWARF's for
/// that name, over `only` members (all when `None`); empty if one matches.
fn layout_diff(
    isf: &smmvmi_tests::dwarf::Layout,
    dwarf: &BTreeSet<smmvmi_tests::dwarf::Layout>,
    only: Option<&BTreeSet<String>>,
) -> Vec<String> {
    let diff = |d: &smmvmi_tests::dwarf::Layout| -> Vec<String> {
        let mut out = Vec::new();
        if d.size != isf.size || d.kind != isf.kind {
            out.push(format!(
                "{} of {} bytes in the ISF, {} of {} in DWARF",
                isf.kind, isf.size, d.kind, d.size
            ));
        }
        for (n, m) in &isf.members {
            if only.is_some_and(|o| !o.contains(n)) {
                continue;
            }
            match d.members.get(n) {
                Some(dm) if same_member(m, dm) => {}
                Some(dm) => out.push(format!("{n}: ISF {m:?}, DWARF {dm:?}")),
                None => out.push(format!("{n}: in the ISF, not in DWARF")),
            }
        }
        if only.is_none() {
            for n in d.members.keys() {
                if !isf.members.contains_key(n) {
                    out.push(format!("{n}: in DWARF, not in the ISF"));
                }
            }
        }
        out
    };
    dwarf
        .iter()
        .map(diff)
        .min_by_key(Vec::len)
        .unwrap_or_else(|| vec!["no such type in DWARF".into()])
}

/// The first ten lines of a list, each on a line of its own.
fn first_ten(lines: &[String]) -> String {
    lines.iter().take(10).map(|l| format!("\n  {l}")).collect()
}

/// The ISF from `ids isf` (the guest's BTF and kallsyms) against the usual
/// source of truth, Debian's `linux-image-RELEASE-dbg` of the guest's
/// kernel: its vmlinux is the guest's build (same `linux_banner`); every
/// struct and union Volatility's pslist, lsmod and check_syscall reach
/// (named in their code, or the type of a member they use, through
/// pointers and arrays) has the size DWARF gives it, and every member those
/// plugins use has DWARF's offset and size; every symbol they use is at
/// its System.map address. Over all named types and all symbols the
/// mismatches are counted and printed, and must be none.
fn isf_against_debian_dwarf(release: &str, isf_file: &Path) {
    let t = Instant::now();
    let dbg = smmvmi_tests::guest_image::debug_kernel(release, &mut |m| eprintln!("{m}"))
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "linux-image-{release}-dbg: {} ({:.1} s to have it)",
        dbg.deb.display(),
        t.elapsed().as_secs_f64()
    );
    let isf: serde_json::Value =
        serde_json::from_slice(&std::fs::read(isf_file).expect("read the ISF")).expect("ISF JSON");
    let map = smmvmi_tests::dwarf::system_map(&dbg.system_map).unwrap_or_else(|e| panic!("{e}"));

    // The same build: the guest's banner is the vmlinux's.
    use base64::Engine as _;
    let banner = base64::engine::general_purpose::STANDARD
        .decode(
            isf["symbols"]["linux_banner"]["constant_data"]
                .as_str()
                .expect("linux_banner's constant_data in the ISF"),
        )
        .expect("base64");
    let at = *map["linux_banner"]
        .first()
        .expect("linux_banner in System.map");
    let vmlinux =
        smmvmi_tests::dwarf::Vmlinux::open(&dbg.vmlinux).unwrap_or_else(|e| panic!("{e}"));
    let theirs = vmlinux
        .bytes_at(at, banner.len() as u64)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        String::from_utf8_lossy(&theirs),
        String::from_utf8_lossy(&banner),
        "the -dbg vmlinux is not the guest's build"
    );

    let t = Instant::now();
    let types = vmlinux.types().unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "DWARF of {}: {} named structs and unions in {:.1} s",
        dbg.vmlinux.display(),
        types.layouts.len(),
        t.elapsed().as_secs_f64()
    );
    // DWARF's layouts by the ISF's names: a type ids named itself (the
    // anonymous struct of a global, `smmvmi_tk_core`) is the one of the
    // variable whose ISF type it is.
    let syms = isf["symbols"].as_object().expect("ISF symbols");
    let mut dwarf = types.layouts.clone();
    for (s, v) in syms {
        if let Some(t) = v["type"]["name"].as_str()
            && !dwarf.contains_key(t)
            && let Some(l) = types.variables.get(s)
        {
            dwarf.insert(t.to_string(), l.clone());
        }
    }
    // A type the kernel only declares: BTF has it as a forward
    // declaration, the ISF as an empty struct.
    let declared_only = |isf_layout: &smmvmi_tests::dwarf::Layout, name: &str| {
        types.declared_only.contains(name) && isf_layout.size == 0 && isf_layout.members.is_empty()
    };

    // What the plugins use: the types their code names and the types of
    // the symbols it names, then, type by type, the members it names and
    // the types those lead to.
    let names = volatility_names();
    let used_syms: BTreeSet<&String> = syms.keys().filter(|s| names.contains(*s)).collect();
    let mut todo: Vec<String> = names
        .iter()
        .filter(|n| isf["user_types"].get(n.as_str()).is_some())
        .cloned()
        .collect();
    todo.extend(
        used_syms
            .iter()
            .filter_map(|s| isf_target(&syms[s.as_str()]["type"]))
            .map(String::from),
    );
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    while let Some(ty) = todo.pop() {
        if used.contains_key(&ty) {
            continue;
        }
        let Some((layout, types)) = isf_layout(&isf, &ty) else {
            continue;
        };
        let members: BTreeSet<String> = layout
            .members
            .keys()
            .filter(|m| names.contains(*m))
            .cloned()
            .collect();
        for m in &members {
            if let Some(t) = isf_target(&types[m]) {
                todo.push(t.to_string());
            }
        }
        used.insert(ty, members);
    }
    for must in ["task_struct", "list_head", "mm_struct", "module", "cred"] {
        assert!(
            used.contains_key(must),
            "the plugins' types include {must}: {:?}",
            used.keys()
        );
    }
    let mut bad = Vec::new();
    let mut checked_members = 0;
    for (ty, members) in &used {
        if ty.starts_with("unnamed_") {
            continue;
        }
        let (layout, _) = isf_layout(&isf, ty).unwrap();
        let Some(d) = dwarf.get(ty) else {
            if !declared_only(&layout, ty) {
                bad.push(format!("{ty}: not in DWARF"));
            }
            continue;
        };
        checked_members += members.len();
        for line in layout_diff(&layout, d, Some(members)) {
            bad.push(format!("{ty}: {line}"));
        }
    }
    eprintln!(
        "ISF vs DWARF, what pslist, lsmod and check_syscall use: {} types, {checked_members} members, {} mismatches",
        used.len(),
        bad.len()
    );
    assert!(
        bad.is_empty(),
        "the ISF differs from DWARF where the plugins look:\n{}",
        bad.join("\n")
    );

    // Symbols the plugins use: at their System.map address.
    let addr = |s: &str| syms[s]["address"].as_u64();
    let mut bad_syms = Vec::new();
    for s in &used_syms {
        match (addr(s), map.get(s.as_str())) {
            (Some(a), Some(m)) if m.contains(&a) => {}
            (a, m) => bad_syms.push(format!("{s}: ISF {a:x?}, System.map {m:x?}")),
        }
    }
    eprintln!(
        "ISF vs System.map, symbols the plugins use: {} checked, {} mismatches",
        used_syms.len(),
        bad_syms.len()
    );
    assert!(
        used_syms.len() >= 5 && bad_syms.is_empty(),
        "symbols the plugins use ({:?}): {bad_syms:?}",
        used_syms
    );

    // Broadly: every named type and every symbol.
    let mut type_mismatch = Vec::new();
    let (mut compared, mut not_in_dwarf) = (0, 0);
    for name in isf["user_types"].as_object().unwrap().keys() {
        let Some((layout, _)) = isf_layout(&isf, name) else {
            continue;
        };
        let Some(d) = dwarf.get(name) else {
            if !name.starts_with("unnamed_") && !declared_only(&layout, name) {
                not_in_dwarf += 1;
            }
            continue;
        };
        compared += 1;
        let diff = layout_diff(&layout, d, None);
        if !diff.is_empty() {
            type_mismatch.push(format!("{name}: {}", diff.join("; ")));
        }
    }
    let (mut same, mut differ, mut absent) = (0, Vec::new(), 0);
    for (s, v) in syms {
        let Some(a) = v["address"].as_u64() else {
            continue;
        };
        match map.get(s) {
            Some(m) if m.contains(&a) => same += 1,
            Some(m) => differ.push(format!("{s}: ISF {a:#x}, System.map {m:x?}")),
            None => absent += 1,
        }
    }
    eprintln!(
        "ISF vs DWARF, all named types: {compared} compared, {} mismatches, {not_in_dwarf} not in DWARF{}",
        type_mismatch.len(),
        first_ten(&type_mismatch)
    );
    eprintln!(
        "ISF vs System.map, all symbols: {same} equal, {} at another address, {absent} not in System.map{}",
        differ.len(),
        first_ten(&differ)
    );
    assert!(compared >= 1000 && same >= 10_000, "too little compared");
    assert!(
        type_mismatch.is_empty() && differ.is_empty(),
        "{} types and {} symbols differ (listed above)",
        type_mismatch.len(),
        differ.len()
    );
}
