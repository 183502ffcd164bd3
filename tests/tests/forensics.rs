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
//! `pmemsave` over the kernel's text and rodata, and it opens in drgn with
//! the guest's VMCOREINFO, whose page-table walk reads the same task list.
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
    let _ = std::fs::remove_dir_all(&dir);
    finish(vm);
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
