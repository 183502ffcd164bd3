//! `cargo xtask bench watch`: a benchmark, not a test.
//!
//! One VM on our firmware (default kernel), booted through a
//! host-injector daemon of the benchmark's own, and an IDS session through
//! that daemon as `ids watch` has it (the doorbell SMI path). The watch as
//! `ids watch` runs it by default (the process and module lists, every
//! baseline-free check: syscalls, IDT and MSRs, hidden modules and
//! processes, hooks; and one of `DEFAULT_TEXT_SLICES` slices of kernel text
//! and rodata against the baseline its first pass records): a pass timed
//! and counted in requests, median of N passes, with and without the text
//! slice; a full `check text` timed apart; then the guest's `cpuburn` rate
//! with no watch, with a pass every 1 s and every 0.1 s, interleaved round
//! by round in the same VM, as the slowdown against no watch. The daemon's
//! SMI counters say which path served. Results go to stdout and
//! `.cache/bench/watch.json`.

use std::time::{Duration, Instant};

use anyhow::Context;
use host_injector::daemon::protocol::SmiPath;
use ids::checks;
use ids::linux::{Discovery, Kernel};
use ids::memory::{GuestMemory, SnapshotCache};
use ids::watch::{DEFAULT_TEXT_SLICES, Watcher};
use serde_json::json;
use smmvmi_tests::daemon::DaemonProcess;
use smmvmi_tests::vm::{Vm, VmConfig};

use crate::FirmwareChoice;
use crate::bench_daemon::{Counters, Load, burn_rounds, calibrate_burn, daemon_session, quantile};

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
    let socket = crate::root().join(format!(".cache/bench/watch-{}.sock", std::process::id()));
    crate::step("starting a host-injector daemon for the benchmark");
    let daemon = DaemonProcess::spawn(&socket, &[], false)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("starting the benchmark's daemon")?;
    let mut config = VmConfig::new("bench-watch", firmware)
        .smp(2)
        .mem("1G")
        .through_daemon(&daemon.socket);
    config.guest = Some(image);
    crate::step("booting the benchmark VM through the daemon");
    let vm = Vm::up(config)?;
    let result = measure(&vm, &daemon, &args);
    let _ = vm.down();
    drop(daemon);
    let _ = std::fs::remove_file(&socket);
    result
}

fn measure(vm: &Vm, daemon: &DaemonProcess, args: &WatchArgs) -> anyhow::Result<()> {
    vm.wait_agent_ready(Duration::from_secs(30))?;
    let addr = daemon.addr();
    let mut c = SnapshotCache::new(daemon_session(vm, &addr, SmiPath::Auto)?);
    let k = Kernel::load(c.inner(), &Discovery::default(), None)?;
    // The first passes arm the doorbell (Linux cleared MSI-X enable; the
    // agent re-arms it when it serves) and record the text baseline.
    let mut w = Watcher::new().with_text(DEFAULT_TEXT_SLICES);
    let mut checks_only = Watcher::new();
    for _ in 0..2 {
        w.pass(&mut c, &k)?;
        checks_only.pass(&mut c, &k)?;
    }

    crate::step(&format!("{} watch passes", args.passes));
    let name = vm.name().to_string();
    let before_smis = Counters::read(&addr, &name)?;
    let (mut secs, mut reqs) = (Vec::new(), Vec::new());
    let (mut secs_checks, mut reqs_checks) = (Vec::new(), Vec::new());
    for _ in 0..args.passes {
        let before = c.inner().stats().requests;
        let t = Instant::now();
        w.pass(&mut c, &k)?;
        secs.push(t.elapsed().as_secs_f64());
        reqs.push((c.inner().stats().requests - before) as f64);
        let before = c.inner().stats().requests;
        let t = Instant::now();
        checks_only.pass(&mut c, &k)?;
        secs_checks.push(t.elapsed().as_secs_f64());
        reqs_checks.push((c.inner().stats().requests - before) as f64);
    }
    let smis = Counters::read(&addr, &name)?.since(before_smis);
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
        "watch benchmark (TCG, -smp 2, 1 GiB, through the daemon; {}; median of {} passes, {} cpuburn rounds)",
        k.banner
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        args.passes,
        args.rounds
    );
    println!(
        "one watch pass ({DEFAULT_TEXT_SLICES} text slices): {:.3} s, {:.0} requests; p90 {:.3} s",
        med(&secs),
        med(&reqs),
        quantile(&secs, 0.9)
    );
    println!(
        "the same without the text slice: {:.3} s, {:.0} requests; p90 {:.3} s",
        med(&secs_checks),
        med(&reqs_checks),
        quantile(&secs_checks, 0.9)
    );
    println!(
        "SMIs over those passes: {} doorbell, {} monitor (QMP), {} doorbell fallbacks",
        smis.smis_doorbell, smis.smis_qmp, smis.fallbacks
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
        "text_slices": DEFAULT_TEXT_SLICES,
        "pass": {"secs": secs, "requests": reqs, "median_s": med(&secs), "median_requests": med(&reqs)},
        "pass_without_text": {"secs": secs_checks, "requests": reqs_checks, "median_s": med(&secs_checks), "median_requests": med(&reqs_checks)},
        "smis": smis.json(),
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
