//! `cargo xtask bench smi`: a benchmark, not a test.
//!
//! Four ways of raising the SMI that serves an IDS request, compared in one
//! run on one VM (`-smp 4` by default) booted on the patched QEMU
//! (`cargo xtask qemu-patched`) through a host-injector daemon of this
//! benchmark alone:
//! - **broadcast QMP**: the daemon's monitor APM write (`smi:
//!   qmp-broadcast`); every vCPU enters SMM; a snapshot request;
//! - **targeted QMP**: the patched QEMU's `inject-smi` with `cpu-index`
//!   (`smi: qmp-targeted`); one vCPU enters SMM and serves a request marked
//!   `FLAG_NO_SNAPSHOT` (ids `Session::request_on_cpu`);
//! - **doorbell broadcast**: the ivshmem MSI-X vector that reaches every
//!   vCPU (`smi: auto`); a snapshot request;
//! - **doorbell targeted**: the vector of one vCPU; `FLAG_NO_SNAPSHOT`.
//!
//! Every request is one op, CPU_STATE of vCPU i, i rotating over the vCPUs
//! (the targeted designs raise the SMI on vCPU i). Measured:
//! - request latency (client wall time) p50/p99, in rounds whose design
//!   order rotates, so that host noise hits every design alike;
//! - the guest's `cpuburn` (timed by the guest's own clock) without polling,
//!   with each design polling at 10 Hz, and with each design polling back
//!   to back, interleaved the same way: the rate at 10 Hz over the rate
//!   without polling (paired within each round, median over rounds), and,
//!   because a 10 Hz cost of about 1 % drowns in the noise of a shared
//!   host, the guest time lost per request measured back to back and the
//!   10 Hz rate derived from it.
//!
//! Every batch is checked against the daemon's counters (which path raised
//! how many SMIs, fallbacks) and the session's request count (a targeted
//! request that fell back to a snapshot request is carried twice); a design
//! whose batches were not what they claim is marked so in the table.
//! Results: a table on stdout, `.cache/bench/smi.json` and
//! `.cache/bench/smi.md`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use host_injector::daemon::client::DaemonAddr;
use host_injector::daemon::protocol::SmiPath;
use ids::Session;
use serde_json::json;
use smmvmi_mailbox::wire::{Op, Status};
use smmvmi_tests::daemon::DaemonProcess;
use smmvmi_tests::guest_image::KernelDeb;
use smmvmi_tests::vm::{Vm, VmConfig};

use crate::FirmwareChoice;
use crate::bench_daemon::{
    Counters, burn_once, burn_while_polling, calibrate_burn, daemon_session, quantile, timed,
};

#[derive(clap::Args)]
pub struct SmiArgs {
    /// vCPUs of the benchmark VM.
    #[arg(long, default_value_t = 4)]
    pub smp: u32,
    /// One-op requests per design (split over the rounds).
    #[arg(long, default_value_t = 240)]
    pub requests: usize,
    /// Latency rounds; each runs every design once.
    #[arg(long, default_value_t = 6)]
    pub rounds: usize,
    /// Guest `cpuburn` rounds (each: no polling, then every design at
    /// `--hz` and back to back, order rotating); 0 skips.
    #[arg(long, default_value_t = 6)]
    pub burn_rounds: usize,
    /// Target length of one `cpuburn` run without polling, seconds.
    #[arg(long, default_value_t = 3.0)]
    pub burn_s: f64,
    /// Polling rate during `cpuburn`, Hz.
    #[arg(long, default_value_t = 10.0)]
    pub hz: f64,
    /// QEMU binary with patches-qemu/ (default: `cargo xtask qemu-patched`).
    #[arg(long)]
    pub qemu: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Design {
    BroadcastQmp,
    TargetedQmp,
    DoorbellBroadcast,
    DoorbellTargeted,
}

impl Design {
    const ALL: [Design; 4] = [
        Design::BroadcastQmp,
        Design::TargetedQmp,
        Design::DoorbellBroadcast,
        Design::DoorbellTargeted,
    ];

    fn label(self) -> &'static str {
        match self {
            Design::BroadcastQmp => "broadcast QMP (APM write)",
            Design::TargetedQmp => "targeted QMP (inject-smi)",
            Design::DoorbellBroadcast => "doorbell broadcast",
            Design::DoorbellTargeted => "doorbell targeted",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Design::BroadcastQmp => "broadcast_qmp",
            Design::TargetedQmp => "targeted_qmp",
            Design::DoorbellBroadcast => "doorbell_broadcast",
            Design::DoorbellTargeted => "doorbell_targeted",
        }
    }

    fn smi(self) -> SmiPath {
        match self {
            Design::BroadcastQmp => SmiPath::QmpBroadcast,
            Design::TargetedQmp => SmiPath::QmpTargeted,
            Design::DoorbellBroadcast | Design::DoorbellTargeted => SmiPath::Auto,
        }
    }

    fn targeted(self) -> bool {
        matches!(self, Design::TargetedQmp | Design::DoorbellTargeted)
    }

    /// Whether the daemon's counters over `requests` requests of this
    /// design show only this design's SMIs: one per request on its path,
    /// none on the others, no fallback.
    fn clean(self, c: &Counters, requests: u64) -> bool {
        let (db, qmp, inj) = (c.smis_doorbell, c.smis_qmp, c.smis_qmp_targeted);
        let only = match self {
            Design::BroadcastQmp => db == 0 && inj == 0 && qmp == requests,
            Design::TargetedQmp => db == 0 && qmp == 0 && inj == requests,
            Design::DoorbellBroadcast | Design::DoorbellTargeted => {
                qmp == 0 && inj == 0 && db == requests
            }
        };
        only && c.fallbacks == 0 && c.errors == 0 && c.ok == requests
    }
}

/// Per-design samples.
#[derive(Default)]
struct Samples {
    wall_ms: Vec<f64>,
    failed: usize,
    /// Requests carried more than once (a targeted request answered "CPU
    /// not in SMM" and sent again as a snapshot request).
    resent: usize,
    /// Per vCPU: requests resent, and requests slower than 10 ms (an SMI
    /// raised again, or a fallback), to tell a vCPU-specific problem.
    resent_by_cpu: Vec<u32>,
    slow_by_cpu: Vec<u32>,
    counters: Counters,
    clean: bool,
}

pub fn run(args: SmiArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.requests > 0 && args.rounds > 0,
        "--requests and --rounds must be at least 1"
    );
    anyhow::ensure!(
        args.smp >= 2,
        "--smp must be at least 2 (targeted vs broadcast)"
    );
    anyhow::ensure!(args.hz > 0.0, "--hz must be positive");
    let qemu = match &args.qemu {
        Some(p) => p.clone(),
        None => crate::qemu_patched::build(&crate::root(), 2, false)?,
    };
    let image = crate::guest_image::build(&KernelDeb::default())?;
    let firmware = FirmwareChoice::Ours.resolve()?;
    let socket = crate::root().join(format!(".cache/bench/smi-{}.sock", std::process::id()));
    crate::step("starting a host-injector daemon for the benchmark");
    let daemon = DaemonProcess::spawn(&socket, &[], false)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("starting the benchmark's daemon")?;
    let mut config = VmConfig::new("bench-smi", firmware)
        .smp(args.smp)
        .mem("1G")
        .qemu(&qemu)
        .through_daemon(&daemon.socket);
    config.guest = Some(image);
    crate::step(&format!(
        "booting the benchmark VM (-smp {}) on {} through the daemon",
        args.smp,
        qemu.display()
    ));
    let vm = Vm::up(config)?;
    let result = measure(&vm, &daemon.addr(), &qemu, &args);
    let _ = vm.down();
    drop(daemon);
    let _ = std::fs::remove_file(&socket);
    result
}

/// One request of `design` for vCPU `cpu`: wall ms, answered Ok, and how
/// many times it was carried.
fn request(s: &mut Session, design: Design, cpu: u32) -> anyhow::Result<(f64, bool, u64)> {
    let before = s.client_requests();
    let op = Op::CpuState { cpu };
    let (ms, r) = timed(|| {
        if design.targeted() {
            s.request_on_cpu(cpu, &[op])
        } else {
            s.request(&[op])
        }
        .with_context(|| format!("{} request for vCPU {cpu}", design.label()))
    })?;
    let ok = r.first().is_some_and(|r| r.status == Status::Ok);
    Ok((ms, ok, s.client_requests() - before))
}

fn measure(
    vm: &Vm,
    addr: &DaemonAddr,
    qemu: &std::path::Path,
    args: &SmiArgs,
) -> anyhow::Result<()> {
    vm.wait_agent_ready(Duration::from_secs(60))?;
    let name = vm.name().to_string();
    let mut sessions: Vec<Session> = Design::ALL
        .iter()
        .map(|d| daemon_session(vm, addr, d.smi()))
        .collect::<anyhow::Result<_>>()?;
    // Warm-up: the first SMI after boot goes over QMP (Linux cleared MSI-X
    // enable; the agent re-arms the doorbell when it serves).
    crate::step("warm-up: 5 requests per design and vCPU (the agent arms the doorbell)");
    for (d, s) in Design::ALL.iter().zip(sessions.iter_mut()) {
        for cpu in 0..args.smp {
            for _ in 0..5 {
                request(s, *d, cpu)?;
            }
        }
    }

    let per_round = args.requests.div_ceil(args.rounds);
    let mut samples: Vec<Samples> = Design::ALL
        .iter()
        .map(|_| Samples {
            resent_by_cpu: vec![0; args.smp as usize],
            slow_by_cpu: vec![0; args.smp as usize],
            ..Samples::default()
        })
        .collect();
    let mut next_cpu = 0u32;
    for round in 0..args.rounds {
        crate::step(&format!(
            "latency round {}/{}: {per_round} requests per design",
            round + 1,
            args.rounds
        ));
        for k in 0..Design::ALL.len() {
            let i = (round + k) % Design::ALL.len();
            let design = Design::ALL[i];
            let before = Counters::read(addr, &name)?;
            let smp = &mut samples[i];
            for _ in 0..per_round {
                let cpu = next_cpu % args.smp;
                next_cpu = next_cpu.wrapping_add(1);
                let (ms, ok, carried) = request(&mut sessions[i], design, cpu)?;
                smp.wall_ms.push(ms);
                smp.failed += usize::from(!ok);
                smp.resent += usize::from(carried != 1);
                smp.resent_by_cpu[cpu as usize] += u32::from(carried != 1);
                smp.slow_by_cpu[cpu as usize] += u32::from(ms > 10.0);
            }
            smp.counters.add(Counters::read(addr, &name)?.since(before));
        }
    }
    for (d, s) in Design::ALL.iter().zip(samples.iter_mut()) {
        s.clean = s.resent == 0 && d.clean(&s.counters, s.wall_ms.len() as u64);
    }

    let burn = if args.burn_rounds > 0 {
        Some(burn(vm, addr, &mut sessions, args)?)
    } else {
        None
    };

    report(vm, qemu, args, per_round, &samples, burn.as_ref())
}

/// `cpuburn` runs of one design with polling: guest seconds and polls
/// served during each run, one entry per round.
#[derive(Default)]
struct Polled {
    secs: Vec<f64>,
    polls: Vec<f64>,
}

/// `cpuburn` without polling and with each design polling at `--hz` and
/// back to back (max rate), all in every round.
struct Burn {
    iterations: u64,
    none_s: Vec<f64>,
    /// Per design.
    hz: Vec<Polled>,
    max: Vec<Polled>,
    counters: Vec<Counters>,
}

impl Burn {
    /// Median over rounds of (time without polling / time with polling),
    /// each round's runs paired, so that drift in host load cancels.
    fn rate(&self, polled: &Polled) -> f64 {
        let r: Vec<f64> = self
            .none_s
            .iter()
            .zip(&polled.secs)
            .map(|(n, p)| n / p)
            .collect();
        crate::bench::median(&r)
    }

    /// Spread of the paired ratios (min, max).
    fn rate_range(&self, polled: &Polled) -> (f64, f64) {
        let r: Vec<f64> = self
            .none_s
            .iter()
            .zip(&polled.secs)
            .map(|(n, p)| n / p)
            .collect();
        (quantile(&r, 0.0), quantile(&r, 1.0))
    }

    /// Guest time lost per request, ms: from the max-rate runs, median over
    /// rounds of (time with - time without) / requests served.
    fn ms_per_request(&self, i: usize) -> f64 {
        let r: Vec<f64> = self
            .none_s
            .iter()
            .zip(self.max[i].secs.iter().zip(&self.max[i].polls))
            .filter(|(_, (_, n))| **n > 0.0)
            .map(|(none, (t, n))| (t - none) * 1e3 / n)
            .collect();
        crate::bench::median(&r)
    }
}

fn burn(
    vm: &Vm,
    addr: &DaemonAddr,
    sessions: &mut [Session],
    args: &SmiArgs,
) -> anyhow::Result<Burn> {
    let name = vm.name().to_string();
    let n = calibrate_burn(vm, args.burn_s)?;
    let period = Duration::from_secs_f64(1.0 / args.hz);
    let designs = Design::ALL.len();
    let mut b = Burn {
        iterations: n,
        none_s: Vec::new(),
        hz: Design::ALL.iter().map(|_| Polled::default()).collect(),
        max: Design::ALL.iter().map(|_| Polled::default()).collect(),
        counters: Design::ALL.iter().map(|_| Counters::default()).collect(),
    };
    // Per round: no polling, then each design at --hz and at max rate; the
    // order rotates from round to round.
    let configs = 1 + 2 * designs;
    for round in 0..args.burn_rounds {
        for k in 0..configs {
            let which = (round * 3 + k) % configs;
            let Some(c) = which.checked_sub(1) else {
                crate::step(&format!(
                    "cpuburn {n} round {}/{}: no polling",
                    round + 1,
                    args.burn_rounds
                ));
                b.none_s.push(burn_once(vm, n)?);
                continue;
            };
            let (i, fast) = (c % designs, c >= designs);
            let design = Design::ALL[i];
            crate::step(&format!(
                "cpuburn {n} round {}/{}: {} {}",
                round + 1,
                args.burn_rounds,
                design.label(),
                if fast {
                    "back to back".to_string()
                } else {
                    format!("at {} Hz", args.hz)
                }
            ));
            let before = Counters::read(addr, &name)?;
            let s = &mut sessions[i];
            let mut cpu = 0u32;
            let (secs, polls) = burn_while_polling(vm, n, (!fast).then_some(period), || {
                let c = cpu % args.smp;
                cpu = cpu.wrapping_add(1);
                request(s, design, c).map(|_| ())
            })?;
            b.counters[i].add(Counters::read(addr, &name)?.since(before));
            let p = if fast { &mut b.max[i] } else { &mut b.hz[i] };
            p.secs.push(secs);
            p.polls.push(polls as f64);
        }
    }
    Ok(b)
}

fn report(
    vm: &Vm,
    qemu: &std::path::Path,
    args: &SmiArgs,
    per_round: usize,
    samples: &[Samples],
    burn: Option<&Burn>,
) -> anyhow::Result<()> {
    let med = crate::bench::median;
    let qemu_version = crate::bench::qemu_version(qemu);
    let host_cpu = crate::bench::host_cpu_model();
    let host_cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let base = burn.map(|b| med(&b.none_s));

    let mut md = String::new();
    let title = format!(
        "SMI designs, one run: -smp {}, {} (`{}`), {}, host {} x \"{}\"; one-op CPU_STATE requests, {} per design",
        args.smp,
        smmvmi_tests::vm::TCG_ACCEL,
        qemu_version,
        "patched QEMU",
        host_cores,
        host_cpu,
        per_round * args.rounds
    );
    println!();
    println!("{title}");
    md.push_str(&format!("{title}\n\n"));
    let head = format!(
        "{:<28} {:>8} {:>8} {:>8} {:>20} {:>12} {:>14}  {}",
        "design",
        "p50 ms",
        "p99 ms",
        "vs QMP",
        format!("rate {} Hz [range]", args.hz),
        "guest ms/req",
        format!("=> rate {} Hz", args.hz),
        "batches"
    );
    println!("{head}");
    md.push_str(&format!(
        "| design | p50 ms | p99 ms | p50 vs broadcast QMP | cpuburn rate at {hz} Hz polling vs none, measured (min–max of rounds) | guest time lost per request, ms (back-to-back polling) | cpuburn rate at {hz} Hz derived from it | batches |\n|---|---|---|---|---|---|---|---|\n",
        hz = args.hz
    ));
    let qmp50 = quantile(&samples[0].wall_ms, 0.5);
    let mut json_designs = serde_json::Map::new();
    for (i, d) in Design::ALL.iter().enumerate() {
        let s = &samples[i];
        let (p50, p99) = (quantile(&s.wall_ms, 0.5), quantile(&s.wall_ms, 0.99));
        let rate = burn.map(|b| b.rate(&b.hz[i]));
        let range = burn.map(|b| b.rate_range(&b.hz[i]));
        let ms_req = burn.map(|b| b.ms_per_request(i));
        // Each request stops the guest for ms_req: at hz requests a second
        // the guest keeps 1 - hz * ms_req / 1000 of its rate.
        let derived = ms_req.map(|m| 1.0 - args.hz * m / 1e3);
        let c = &s.counters;
        let extra = (c.smis_doorbell + c.smis_qmp + c.smis_qmp_targeted)
            .saturating_sub(s.wall_ms.len() as u64);
        let verdict = if s.clean {
            "clean".to_string()
        } else {
            format!(
                "{extra} extra SMIs ({} fallbacks), {} resent",
                c.fallbacks, s.resent
            )
        };
        let na = || "n/a".to_string();
        let rate_s = rate
            .zip(range)
            .map_or_else(na, |(r, (lo, hi))| format!("{r:.3} [{lo:.2}-{hi:.2}]"));
        let ms_s = ms_req.map_or_else(na, |m| format!("{m:.3}"));
        let derived_s = derived.map_or_else(na, |r| format!("{r:.4}"));
        println!(
            "{:<28} {:>8.3} {:>8.3} {:>8.2} {:>20} {:>12} {:>14}  {}",
            d.label(),
            p50,
            p99,
            p50 / qmp50,
            rate_s,
            ms_s,
            derived_s,
            verdict
        );
        md.push_str(&format!(
            "| {} | {p50:.3} | {p99:.3} | {:.2} | {rate_s} | {ms_s} | {derived_s} | {verdict} |\n",
            d.label(),
            p50 / qmp50
        ));
        json_designs.insert(
            d.key().into(),
            json!({
                "smi_path": d.smi(), "targeted": d.targeted(),
                "requests": s.wall_ms.len(), "failed": s.failed, "resent_as_snapshot": s.resent,
                "resent_by_cpu": s.resent_by_cpu, "over_10ms_by_cpu": s.slow_by_cpu,
                "latency_ms": {
                    "p50": p50, "p99": p99,
                    "min": quantile(&s.wall_ms, 0.0), "max": quantile(&s.wall_ms, 1.0),
                },
                "p50_vs_broadcast_qmp": p50 / qmp50,
                "daemon_counters": s.counters.json(),
                "clean": s.clean,
                "cpuburn": burn.map(|b| json!({
                    "hz": {
                        "runs_s": b.hz[i].secs, "polls": b.hz[i].polls,
                        "rate_vs_no_polling_paired_median": rate,
                        "rate_vs_no_polling_range": range,
                    },
                    "back_to_back": {
                        "runs_s": b.max[i].secs, "polls": b.max[i].polls,
                        "guest_ms_lost_per_request": ms_req,
                    },
                    "rate_at_hz_derived": derived,
                    "daemon_counters": b.counters[i].json(),
                })),
            }),
        );
    }
    let failed: usize = samples.iter().map(|s| s.failed).sum();
    if let (Some(b), Some(base)) = (burn, base) {
        let line = format!(
            "cpuburn {} iterations, {} rounds, guest clock, median without polling {base:.3} s (runs {:.2}-{:.2} s). rate = time without polling / time with polling, paired within a round, median over rounds; the derived rate is 1 - {} Hz x guest time lost per request, that loss measured with back-to-back polling (which amplifies it above the noise of a shared host)",
            b.iterations,
            args.burn_rounds,
            quantile(&b.none_s, 0.0),
            quantile(&b.none_s, 1.0),
            args.hz
        );
        println!("{line}");
        md.push_str(&format!("\n{line}\n"));
    }
    let note = "batches (latency rounds): clean = the daemon counted exactly one SMI per request on the design's path, none on the others, no fallback, and no targeted request was resent as a snapshot request; otherwise the extra SMIs (a doorbell SMI unanswered within the daemon's grace falls back to a broadcast monitor SMI, an unanswered inject-smi is raised again) and the targeted requests resent as snapshot requests (another vCPU served the fallback). TCG, single-threaded (every vCPU on one host thread, scheduled round-robin): an SMI on any vCPU delays the others too, and a targeted SMI waits until its vCPU is scheduled. These are not KVM figures.";
    println!("{note}");
    md.push_str(&format!("\n{note}\n"));
    if failed > 0 {
        println!("WARNING: {failed} requests were answered with a status other than Ok");
    }

    let out = json!({
        "smp": args.smp, "accel": smmvmi_tests::vm::TCG_ACCEL, "qemu": qemu, "qemu_version": qemu_version,
        "host_cpu": host_cpu, "host_cores": host_cores, "op": "CPU_STATE i, i rotating over the vCPUs",
        "rounds": args.rounds, "requests_per_design": per_round * args.rounds,
        "polling_hz": args.hz,
        "designs": json_designs,
        "cpuburn": burn.map(|b| json!({
            "iterations": b.iterations, "none_runs_s": b.none_s, "none_median_s": base,
            "rounds": args.burn_rounds,
            "clock": "guest /proc/uptime (10 ms resolution) around cpuburn",
        })),
        "failed": failed,
        "vm": vm.name(),
    });
    let dir = crate::root().join(".cache/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("smi.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out)? + "\n")?;
    std::fs::write(dir.join("smi.md"), md)?;
    crate::step(&format!("results in {} and smi.md", path.display()));
    Ok(())
}
