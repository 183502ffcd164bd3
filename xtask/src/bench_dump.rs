//! `cargo xtask bench dump`: a benchmark, not a test.
//!
//! Boots one VM on our firmware (default kernel) and, in the same run:
//! - `ids dump --format lime` of all RAM through the agent: wall time,
//!   MiB/s, requests;
//! - QEMU's own `pmemsave` of the same RAM ranges (64 MiB per QMP command):
//!   the unprotected ceiling, no SMM, no encryption;
//! - Volatility 3's `linux.pslist` (ISF from `ids isf`) on that dump file,
//!   and on the live guest through `ids mount` (two runs: the first open
//!   reads through the agent, the second again — each open of `mem` drops
//!   the page cache).
//!
//! - the smear: how many 4 KiB pages of the dump differ from QEMU's copy
//!   taken right after it, on the idle guest and on a busy one (a loop
//!   writing 16 MiB random files to tmpfs): memory that changed while the
//!   dump ran.
//!
//! Results go to stdout and `.cache/bench/dump.json`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use smmvmi_tests::guest_image::KernelDeb;
use smmvmi_tests::vm::{Vm, VmConfig};

use crate::FirmwareChoice;

#[derive(clap::Args)]
pub struct DumpArgs {
    /// Guest memory (QEMU -m syntax).
    #[arg(long, default_value = "512M")]
    pub mem: String,
    /// Kernel package (default: the pinned default kernel).
    #[arg(long)]
    pub kernel_deb: Option<KernelDeb>,
}

pub fn run(args: DumpArgs) -> anyhow::Result<()> {
    let root = crate::root();
    crate::step("building ids");
    let ok = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", "ids", "--bin", "ids"])
        .current_dir(&root)
        .status()?
        .success();
    anyhow::ensure!(ok, "cargo build -p ids failed");
    crate::step("Python venv (Volatility 3)");
    smmvmi_tests::venv::ensure(&mut |m| eprintln!("    {m}"))?;
    let deb = args.kernel_deb.clone().unwrap_or_default();
    let image = crate::guest_image::build(&deb)?;
    let firmware = FirmwareChoice::Ours.resolve()?;
    let mut config = VmConfig::new("bench-dump", firmware).mem(args.mem.clone());
    config.guest = Some(image);
    crate::step("booting the benchmark VM");
    let vm = Vm::up(config)?;
    let dir = vm.state_dir().join("bench-dump");
    std::fs::create_dir_all(&dir)?;
    let result = measure(&vm, &root.join("target/debug/ids"), &dir, &args);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = vm.down();
    result
}

fn ids(vm: &Vm, bin: &Path, dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    vm.release_qmp();
    let o = Command::new(bin)
        .arg("--connect")
        .arg(vm.state_dir())
        .args(args)
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .output()?;
    anyhow::ensure!(
        o.status.success(),
        "ids {}: {}: {}",
        args.join(" "),
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn vol(file: &Path, symbols: &Path) -> anyhow::Result<(f64, usize)> {
    let t = Instant::now();
    let o = Command::new(smmvmi_tests::venv::bin("vol"))
        .args(["-q", "-f"])
        .arg(file)
        .arg("-s")
        .arg(symbols)
        .arg("linux.pslist")
        .output()?;
    anyhow::ensure!(
        o.status.success(),
        "vol: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let rows = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.starts_with("0x"))
        .count();
    Ok((t.elapsed().as_secs_f64(), rows))
}

/// A LiME dump through the agent, then QEMU's `pmemsave` of the same
/// ranges right after it: how long each took and how many 4 KiB pages of
/// the dump differ from QEMU's copy (the smear: pages that changed between
/// the moment the agent read them and the end of the dump).
struct Smear {
    dump_s: f64,
    pmem_s: f64,
    pages: u64,
    changed: u64,
    report: serde_json::Value,
}

fn dump_and_snapshot(
    vm: &Vm,
    bin: &Path,
    dir: &Path,
    lime: &Path,
    ram: &[(u64, u64)],
) -> anyhow::Result<Smear> {
    let out = ids(
        vm,
        bin,
        dir,
        &[
            "--json",
            "-q",
            "dump",
            "-o",
            lime.to_str().unwrap(),
            "--format",
            "lime",
        ],
    )?;
    let report: serde_json::Value = serde_json::from_str(out.trim())?;
    let dump_s = report["seconds"].as_f64().unwrap_or(0.0);
    let pm = dir.join("pmemsave.bin");
    let piece: u64 = 64 << 20;
    let mut pieces = Vec::new();
    let t = Instant::now();
    for &(base, len) in ram {
        let mut at = base;
        while at < base + len {
            let n = piece.min(base + len - at);
            let f = dir.join(format!("{}.{at:x}", pm.display()));
            vm.qmp(
                "pmemsave",
                Some(json!({"val": at, "size": n, "filename": f})),
            )?;
            pieces.push((at, n, f));
            at += n;
        }
    }
    let pmem_s = t.elapsed().as_secs_f64();
    vm.release_qmp();
    // LiME: a 32-byte header before each range.
    let data = std::fs::read(lime)?;
    let mut file_off = Vec::new();
    let mut off = 0u64;
    for &(base, len) in ram {
        file_off.push((base, len, off + 32));
        off += 32 + len;
    }
    let (mut pages, mut changed) = (0u64, 0u64);
    for (at, n, f) in pieces {
        let q = std::fs::read(&f)?;
        let _ = std::fs::remove_file(&f);
        let (base, _, fo) = file_off
            .iter()
            .copied()
            .find(|&(b, l, _)| at >= b && at < b + l)
            .expect("a piece of a range");
        let start = (fo + at - base) as usize;
        let ours = &data[start..start + n as usize];
        for (a, b) in ours.chunks(4096).zip(q.chunks(4096)) {
            pages += 1;
            changed += u64::from(a != b);
        }
    }
    Ok(Smear {
        dump_s,
        pmem_s,
        pages,
        changed,
        report,
    })
}

fn measure(vm: &Vm, bin: &Path, dir: &Path, args: &DumpArgs) -> anyhow::Result<()> {
    vm.wait_agent_ready(Duration::from_secs(30))?;
    let info: serde_json::Value = serde_json::from_str(&ids(vm, bin, dir, &["--json", "info"])?)?;
    let hex = |v: &serde_json::Value| {
        u64::from_str_radix(v.as_str().unwrap_or("0").trim_start_matches("0x"), 16)
    };
    let ram: Vec<(u64, u64)> = info["ram"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| Some((hex(&r["base"]).ok()?, hex(&r["len"]).ok()?)))
                .collect()
        })
        .unwrap_or_default();
    let total: u64 = ram.iter().map(|r| r.1).sum();

    crate::step("ids dump --format lime, then QEMU pmemsave of the same ranges (idle guest)");
    let lime = dir.join("mem.lime");
    let idle = dump_and_snapshot(vm, bin, dir, &lime, &ram)?;
    let d = &idle.report;
    let dump_s = idle.dump_s;
    let pmem_s = idle.pmem_s;

    crate::step("the same on a busy guest (a loop writing 16 MiB random files to tmpfs)");
    vm.run_shell_command(
        "(while :; do dd if=/dev/urandom of=/tmp/smear bs=1M count=16 2>/dev/null; rm -f /tmp/smear; done) </dev/null >/dev/null 2>&1 & echo $! > /tmp/smear.pid",
    )?;
    let busy_file = dir.join("busy.lime");
    let busy = dump_and_snapshot(vm, bin, dir, &busy_file, &ram);
    let _ = vm.run_shell_command("kill $(cat /tmp/smear.pid)");
    let busy = busy?;
    let _ = std::fs::remove_file(&busy_file);

    crate::step("Volatility 3 linux.pslist on the dump and on the live mount");
    let symbols = dir.join("symbols");
    ids(
        vm,
        bin,
        dir,
        &[
            "-q",
            "isf",
            "-o",
            symbols.join("guest.json").to_str().unwrap(),
        ],
    )?;
    let (vol_dump_s, rows_dump) = vol(&lime, &symbols)?;
    let mnt: PathBuf = dir.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    vm.release_qmp();
    let mut child = Command::new(bin)
        .arg("--connect")
        .arg(vm.state_dir())
        .arg("mount")
        .arg(&mnt)
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .spawn()?;
    let t = Instant::now();
    while !mnt.join("mem").exists() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let live1 = vol(&mnt.join("mem"), &symbols);
    let live2 = vol(&mnt.join("mem"), &symbols);
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let (live1_s, rows_live) = live1?;
    let (live2_s, _) = live2?;

    let mib = total as f64 / (1 << 20) as f64;
    println!();
    println!(
        "dump of {} RAM ({mib:.0} MiB in {} ranges), TCG, same run",
        args.mem,
        ram.len()
    );
    println!("{:<44} {:>9} {:>10}", "what", "seconds", "MiB/s");
    println!(
        "{:<44} {:>9.1} {:>10.1}",
        "ids dump --format lime (through the agent)",
        dump_s,
        mib / dump_s
    );
    println!(
        "{:<44} {:>9.1} {:>10.1}",
        "QEMU pmemsave (no SMM, no encryption)",
        pmem_s,
        mib / pmem_s
    );
    println!("agent requests: {}", d["requests"]);
    println!();
    println!("smear: 4 KiB pages of the dump that differ from pmemsave taken right after it");
    for (what, sm) in [("idle guest", &idle), ("busy guest (tmpfs writer)", &busy)] {
        println!(
            "{:<44} {:>9} of {} ({:.2} %), dump {:.1} s",
            what,
            sm.changed,
            sm.pages,
            100.0 * sm.changed as f64 / sm.pages.max(1) as f64,
            sm.dump_s
        );
    }
    println!();
    println!(
        "{:<44} {:>9} {:>10}",
        "vol linux.pslist", "seconds", "processes"
    );
    println!(
        "{:<44} {:>9.1} {:>10}",
        "on the LiME dump", vol_dump_s, rows_dump
    );
    println!(
        "{:<44} {:>9.1} {:>10}",
        "on the live mount (first run)", live1_s, rows_live
    );
    println!(
        "{:<44} {:>9.1} {:>10}",
        "on the live mount (second run)", live2_s, ""
    );
    let report = json!({
        "mem": args.mem, "ram_bytes": total, "ranges": ram.len(),
        "ids_dump_lime_s": dump_s, "ids_dump_requests": d["requests"],
        "pmemsave_s": pmem_s,
        "smear_pages": {"total": idle.pages, "changed_idle": idle.changed,
            "changed_busy": busy.changed, "busy_dump_s": busy.dump_s, "busy_pmemsave_s": busy.pmem_s},
        "vol_pslist_dump_s": vol_dump_s, "vol_pslist_live_s": [live1_s, live2_s],
        "pslist_rows": {"dump": rows_dump, "live": rows_live},
    });
    let out = crate::root().join(".cache/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("dump.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(())
}
