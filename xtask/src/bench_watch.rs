//! `cargo xtask bench watch`: a benchmark, not a test.
//!
//! One VM on our firmware (default kernel); the IDS's `watch` pass (the
//! process and module lists and every baseline-free check: syscalls, IDT
//! and MSRs, hidden modules and processes, hooks) timed and counted in
//! requests (SMIs), median of N passes; a full `check text` against a
//! baseline timed apart (it is not part of a watch pass: see the README);
//! then the guest's `cpuburn` rate with no watch, with a watch pass every
//! 1 s and every 0.1 s, interleaved round by round in the same VM, as the
//! slowdown against no watch. Results go to stdout and
//! `.cache/bench/watch.json`.

use std::time::{Duration, Instant};

use ids::checks;
use ids::linux::{Discovery, Kernel};
use ids::memory::{GuestMemory, SnapshotCache};
use ids::watch::Watcher;
use ids::{Endpoint, Session};
use serde_json::json;
use smmvmi_tests::vm::{Vm, VmConfig};

use crate::FirmwareChoice;
use crate::bench_daemon::{Load, burn_rounds, calibrate_burn, quantile};

#[derive(clap::Args)]
pub struct WatchArgs {
    /// Watch passes timed (the median is reported).
    #[arg(long, default_value_t = 20)]
    pub passes: usize,
    /// cpuburn rounds (each: no watch, 1 s, 0.1 s).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Target length of one cpuburn run without a watch, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub burn_s: f64,
}

pub fn run(args: WatchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.passes > 0 && args.rounds > 0,
        "--passes and --rounds must be at least 1"
    );
    let image = crate::guest_image::build(&Default::default())?;
    let firmware = FirmwareChoice::Ours.resolve()?;
    let mut config = VmConfig::new("bench-watch", firmware).smp(2).mem("1G");
    config.guest = Some(image);
    crate::step("booting the benchmark VM");
    let vm = Vm::up(config)?;
    let result = measure(&vm, &args);
    let _ = vm.down();
    result
}

fn measure(vm: &Vm, args: &WatchArgs) -> anyhow::Result<()> {
    vm.wait_agent_ready(Duration::from_secs(30))?;
    vm.release_qmp();
    let ep = Endpoint::from_state_dir(vm.state_dir());
    let connect = || Session::connect(&ep, Duration::from_secs(10));
    let mut c = SnapshotCache::new(connect()?);
    let k = Kernel::load(c.inner(), &Discovery::default(), None)?;
    let mut w = Watcher::new();
    w.pass(&mut c, &k)?;

    crate::step(&format!("{} watch passes", args.passes));
    let (mut secs, mut reqs) = (Vec::new(), Vec::new());
    for _ in 0..args.passes {
        let before = c.inner().stats().requests;
        let t = Instant::now();
        w.pass(&mut c, &k)?;
        secs.push(t.elapsed().as_secs_f64());
        reqs.push((c.inner().stats().requests - before) as f64);
    }
    crate::step("a full check text (text and rodata against a baseline)");
    let base = checks::record_baseline(&mut c, &k, 0)?;
    let modules = ids::linux::lsmod(&mut c, &k, 0)?;
    let before = c.inner().stats().requests;
    let t = Instant::now();
    let text = checks::check_text(&mut c, &k, 0, &base, &modules)?;
    let text_secs = t.elapsed().as_secs_f64();
    let text_reqs = c.inner().stats().requests - before;
    anyhow::ensure!(
        text.findings.is_empty(),
        "text changed on an idle guest: {:?}",
        text.findings
    );

    let n = calibrate_burn(vm, args.burn_s)?;
    let mut r = burn_rounds(
        vm,
        n,
        args.rounds,
        &[
            ("no watch", Load::Alone),
            ("watch every 1 s", Load::Every(Duration::from_secs(1))),
            ("watch every 0.1 s", Load::Every(Duration::from_millis(100))),
        ],
        || {
            w.pass(&mut c, &k)?;
            Ok(())
        },
    )?
    .into_iter();
    let (none, _) = r.next().expect("3 settings");
    let (s1, p1) = r.next().expect("3 settings");
    let (s01, p01) = r.next().expect("3 settings");
    let med = |v: &[f64]| quantile(v, 0.5);
    let base_s = med(&none);
    let slow = |v: &[f64]| (med(v) - base_s) / base_s * 100.0;
    println!();
    println!(
        "watch benchmark (TCG, -smp 2, 1 GiB; {}; median of {} passes, {} cpuburn rounds)",
        k.banner
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        args.passes,
        args.rounds
    );
    println!(
        "one watch pass: {:.3} s, {:.0} requests (SMIs); p90 {:.3} s",
        med(&secs),
        med(&reqs),
        quantile(&secs, 0.9)
    );
    println!(
        "a full check text ({} MiB): {:.3} s, {} requests",
        text.checked >> 20,
        text_secs,
        text_reqs
    );
    println!(
        "cpuburn: no watch {:.3} s; every 1 s {:.3} s ({:+.2} %, {:.0} passes); every 0.1 s {:.3} s ({:+.2} %, {:.0} passes)",
        base_s,
        med(&s1),
        slow(&s1),
        med(&p1),
        med(&s01),
        slow(&s01),
        med(&p01)
    );
    let out = json!({
        "banner": k.banner.trim_end(),
        "pass": {"secs": secs, "requests": reqs, "median_s": med(&secs), "median_requests": med(&reqs)},
        "check_text": {"bytes": text.checked, "secs": text_secs, "requests": text_reqs},
        "cpuburn": {
            "iterations": n, "none_s": none, "every_1s_s": s1, "every_100ms_s": s01,
            "passes_1s": p1, "passes_100ms": p01,
            "slowdown_1s_pct": slow(&s1), "slowdown_100ms_pct": slow(&s01),
            "clock": "guest /proc/uptime (10 ms resolution) around cpuburn",
        },
    });
    let dir = crate::root().join(".cache/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("watch.json"), serde_json::to_string_pretty(&out)?)?;
    eprintln!("    results in {}", dir.join("watch.json").display());
    Ok(())
}
