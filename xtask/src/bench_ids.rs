//! `cargo xtask bench ids`: a benchmark, not a test.
//!
//! Boots one VM on our firmware (default kernel, busybox initramfs) and
//! measures the IDS's Linux commands through the library, wall time and
//! sealed requests (one SMI each; re-raised SMIs are counted apart), median
//! of N runs:
//! - `banner` (search forward from LSTAR);
//! - the first, cold kernel load: kallsyms found and decoded + BTF read and
//!   parsed (no cache);
//! - the warm load (cache on disk, banner re-checked);
//! - `ps`, `ps --threads` and `lsmod`, each with a warm load, as the CLI
//!   runs (the warm load is INFO + CPU_STATE in one request, then the
//!   banner check; the task list is one WALK_LIST request);
//!
//! against the guest's own busybox `ps` and `cat /proc/modules`, timed in
//! the same VM in the same run (20 runs in a loop between two reads of
//! `/proc/uptime`, so per-run figures have 0.5 ms resolution). Results go
//! to stdout and `.cache/bench/ids.json`.

use std::time::{Duration, Instant};

use ids::kernel::{self, BannerSearch};
use ids::linux::{self, Discovery, Kernel};
use ids::memory::{GuestMemory, SnapshotCache};
use ids::{Endpoint, Session};
use serde_json::json;
use smmvmi_tests::guest_image::KernelDeb;
use smmvmi_tests::vm::{Vm, VmConfig};

use crate::FirmwareChoice;

#[derive(clap::Args)]
pub struct IdsArgs {
    /// Runs of each measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// vCPUs of the benchmark VM.
    #[arg(long, default_value_t = 2)]
    pub smp: u32,
    /// Kernel package (default: the pinned default kernel).
    #[arg(long)]
    pub kernel_deb: Option<KernelDeb>,
}

pub fn run(args: IdsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    let deb = args.kernel_deb.clone().unwrap_or_default();
    let image = crate::guest_image::build(&deb)?;
    let firmware = FirmwareChoice::Ours.resolve()?;
    let mut config = VmConfig::new("bench-ids", firmware).smp(args.smp).mem("1G");
    config.guest = Some(image);
    crate::step("booting the benchmark VM");
    let vm = Vm::up(config)?;
    let result = measure(&vm, &args);
    let _ = vm.down();
    result
}

/// One measured run: seconds, requests, SMIs raised.
#[derive(Clone, Copy)]
struct Sample {
    secs: f64,
    requests: u64,
    smis: u64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Series {
    name: &'static str,
    samples: Vec<Sample>,
}

impl Series {
    fn med(&self) -> (f64, f64, f64) {
        let mut t: Vec<f64> = self.samples.iter().map(|s| s.secs).collect();
        let mut r: Vec<f64> = self.samples.iter().map(|s| s.requests as f64).collect();
        let mut m: Vec<f64> = self.samples.iter().map(|s| s.smis as f64).collect();
        (median(&mut t), median(&mut r), median(&mut m))
    }
}

/// Runs `f` on a fresh session and counts its requests and raised SMIs.
fn timed<T>(
    ep: &Endpoint,
    f: impl FnOnce(&mut Session) -> anyhow::Result<T>,
) -> anyhow::Result<(T, Sample)> {
    let mut s = Session::connect(ep, Duration::from_secs(10))?;
    let smi_count = |s: &mut Session| -> anyhow::Result<u64> {
        // SMIs are counted from the mailbox header (direct endpoints).
        Ok(match s.injector() {
            Some(i) => i.header()?.smi_count,
            None => 0,
        })
    };
    let smis_before = smi_count(&mut s)?;
    let t = Instant::now();
    let out = f(&mut s)?;
    let secs = t.elapsed().as_secs_f64();
    let smis = smi_count(&mut s)?.saturating_sub(smis_before);
    Ok((
        out,
        Sample {
            secs,
            requests: s.stats().requests,
            smis,
        },
    ))
}

/// Seconds per run of `cmd` in the guest, from /proc/uptime around 20 runs.
fn guest_time(vm: &Vm, cmd: &str) -> anyhow::Result<f64> {
    let out = vm.run_shell_command(&format!(
        "a=$(cut -d' ' -f1 /proc/uptime); i=0; while [ $i -lt 20 ]; do {cmd} >/dev/null; i=$((i+1)); done; \
         b=$(cut -d' ' -f1 /proc/uptime); echo $a $b"
    ))?;
    let v: Vec<f64> = out
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    anyhow::ensure!(v.len() == 2, "guest timing printed {out:?}");
    Ok((v[1] - v[0]) / 20.0)
}

fn measure(vm: &Vm, args: &IdsArgs) -> anyhow::Result<()> {
    vm.wait_agent_ready(Duration::from_secs(30))?;
    vm.release_qmp();
    let ep = Endpoint::from_state_dir(vm.state_dir());
    let cache = tempdir()?;
    let d = Discovery::default();
    // What `ids ps` and `ids lsmod` do: a warm load of the core symbols.
    let core = Discovery {
        full_symbols: false,
        ..Discovery::default()
    };
    let mut series: Vec<Series> = [
        "banner (search from LSTAR)",
        "cold load: kallsyms + BTF",
        "warm load (cache, core symbols)",
        "ps (warm load + walk)",
        "ps --threads (warm load + walk)",
        "lsmod (warm load + walk)",
    ]
    .into_iter()
    .map(|name| Series {
        name,
        samples: Vec::new(),
    })
    .collect();
    let mut facts = json!({});
    let mut tasks = 0usize;
    let mut modules = 0usize;
    for run in 0..args.runs {
        crate::step(&format!("run {} of {}", run + 1, args.runs));
        let (_, s) = timed(&ep, |s| {
            Ok(kernel::find_banner(s, BannerSearch::default())?)
        })?;
        series[0].samples.push(s);
        let (k, s) = timed(&ep, |s| Ok(Kernel::load(s, &d, None)?))?;
        series[1].samples.push(s);
        facts = json!({
            "banner": k.banner.trim_end(),
            "symbols": k.kallsyms.symbols.len(),
            "btf_bytes": k.btf_bytes,
            "layout": k.kallsyms.layout,
        });
        // Write the cache once (cold load with a cache dir), then warm loads.
        if run == 0 {
            Kernel::load(
                &mut Session::connect(&ep, Duration::from_secs(10))?,
                &d,
                Some(&cache),
            )?;
        }
        let (k, s) = timed(&ep, |s| Ok(Kernel::load(s, &core, Some(&cache))?))?;
        anyhow::ensure!(k.from_cache, "the warm load did not use the cache");
        series[2].samples.push(s);
        let (_, s) = timed(&ep, |s| {
            let k = Kernel::load(s, &core, Some(&cache))?;
            let mut c = SnapshotCache::new(s);
            Ok(linux::ps(&mut c, &k, 0, false)?.len())
        })?;
        series[3].samples.push(s);
        let (n, s) = timed(&ep, |s| {
            let k = Kernel::load(s, &core, Some(&cache))?;
            let mut c = SnapshotCache::new(s);
            Ok(linux::ps(&mut c, &k, 0, true)?.len())
        })?;
        tasks = n;
        series[4].samples.push(s);
        let (n, s) = timed(&ep, |s| {
            let k = Kernel::load(s, &core, Some(&cache))?;
            let mut c = SnapshotCache::new(s);
            Ok(linux::lsmod(&mut c, &k, 0)?.len())
        })?;
        modules = n;
        series[5].samples.push(s);
    }
    crate::step("the guest's own busybox ps and cat /proc/modules (20 runs each, per run)");
    let mut gps = Vec::new();
    let mut gmod = Vec::new();
    for _ in 0..args.runs {
        gps.push(guest_time(vm, "ps")?);
        gmod.push(guest_time(vm, "cat /proc/modules")?);
    }
    let (gps, gmod) = (median(&mut gps), median(&mut gmod));
    let _ = std::fs::remove_dir_all(&cache);

    println!();
    println!(
        "IDS benchmark (TCG, -smp {}, 1 GiB; {} tasks incl. threads, {} modules; median of {} runs)",
        args.smp, tasks, modules, args.runs
    );
    println!(
        "{:<36} {:>10} {:>9} {:>9}",
        "", "wall s", "requests", "SMIs"
    );
    let mut rows = Vec::new();
    for s in &series {
        let (t, r, m) = s.med();
        println!("{:<36} {:>10.3} {:>9.0} {:>9.0}", s.name, t, r, m);
        rows.push(json!({"name": s.name, "secs": t, "requests": r, "smis": m}));
    }
    println!("{:<36} {:>10.3}", "guest: busybox ps (in the guest)", gps);
    println!("{:<36} {:>10.3}", "guest: cat /proc/modules", gmod);
    let out = json!({
        "smp": args.smp,
        "runs": args.runs,
        "tasks": tasks,
        "modules": modules,
        "kernel": facts,
        "ids": rows,
        "guest_ps_secs": gps,
        "guest_proc_modules_secs": gmod,
    });
    let dir = crate::root().join(".cache/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("ids.json"), serde_json::to_string_pretty(&out)?)?;
    eprintln!("    results in {}", dir.join("ids.json").display());
    Ok(())
}

fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("smmvmi-bench-ids-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
