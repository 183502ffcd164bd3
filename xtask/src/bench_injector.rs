//! `cargo xtask bench injector`: a benchmark, not a test.
//!
//! One VM booted through a host-injector daemon of this benchmark alone
//! (its own socket under `.cache/bench/`), the agent's doorbell armed. In
//! rounds, so that host noise hits every mode alike (the order rotates from
//! round to round):
//! - one-op request latency (CPU_STATE 0, an `ids::Session` each) through
//!   the daemon with the doorbell (the default), through the daemon with
//!   monitor SMIs only (`smi: qmp-broadcast` on the request), and direct
//!   (the host-injector library on the mailbox file and QMP, no daemon);
//!   the daemon's counters are read around every batch, so that a doorbell
//!   batch that fell back to QMP (or a QMP batch that rang the doorbell)
//!   shows;
//! - requests per second through the daemon (doorbell) with 1 and with 8
//!   concurrent clients, each an independent session;
//! - guest CPU time stolen per request: the guest's `cpuburn N` timed by the
//!   guest's own clock without polling, with 10 Hz polling and with polling
//!   as fast as one client can; the slowdown divided by the requests served
//!   while it ran.
//!
//! Each latency is also split where the time goes: the client and daemon
//! (socket, header look-up, seal/open: client wall time minus the daemon's
//! posted-to-done time), SMI delivery + SMM entry/exit + noticing the done
//! word (posted-to-done minus the agent's serve time), and the agent's serve
//! time (TSC cycles the firmware reports, over the guest's TSC frequency).
//!
//! Results go to stdout as a table and to `.cache/bench/injector.json`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use host_injector::daemon::client::DaemonClient;
use host_injector::daemon::protocol::SmiPath;
use ids::{Endpoint, Session};
use serde_json::{Value, json};
use smmvmi_mailbox::wire::{Op, Status};
use smmvmi_tests::daemon::DaemonProcess;
use smmvmi_tests::guest_image::KernelDeb;
use smmvmi_tests::vm::{Vm, VmConfig};

use crate::FirmwareChoice;
use crate::bench_agent::tsc_mhz;
use crate::bench_daemon::{
    Counters, DEADLINE, Load, burn_rounds, calibrate_burn, daemon_session, quantile, timed,
};

const OP: Op = Op::CpuState { cpu: 0 };

#[derive(clap::Args)]
pub struct InjectorArgs {
    /// One-op requests per latency mode (split over the rounds).
    #[arg(long, default_value_t = 400)]
    pub requests: usize,
    /// Rounds; each runs every mode once.
    #[arg(long, default_value_t = 8)]
    pub rounds: usize,
    /// Length of each throughput window, ms (per round and client count).
    #[arg(long, default_value_t = 1000)]
    pub window_ms: u64,
    /// Concurrent clients of the multi-client throughput figure.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Guest `cpuburn` rounds (each: no polling, 10 Hz, max rate); 0 skips.
    #[arg(long, default_value_t = 5)]
    pub burn_rounds: usize,
    /// Target length of one `cpuburn` run without polling, seconds.
    #[arg(long, default_value_t = 3.0)]
    pub burn_s: f64,
    /// vCPUs of the benchmark VM.
    #[arg(long, default_value_t = 2)]
    pub smp: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Doorbell,
    Qmp,
    Direct,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Doorbell, Mode::Qmp, Mode::Direct];
    fn label(self) -> &'static str {
        match self {
            Mode::Doorbell => "daemon, doorbell",
            Mode::Qmp => "daemon, QMP only",
            Mode::Direct => "direct (library, QMP)",
        }
    }
    fn key(self) -> &'static str {
        match self {
            Mode::Doorbell => "daemon_doorbell",
            Mode::Qmp => "daemon_qmp",
            Mode::Direct => "direct_qmp",
        }
    }
}

/// Per-request samples of one mode, ms.
#[derive(Default)]
struct Samples {
    wall: Vec<f64>,
    posted_to_done: Vec<f64>,
    smm: Vec<f64>,
    smis: u64,
    failed: usize,
}

pub fn run(args: InjectorArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.requests > 0 && args.rounds > 0,
        "--requests and --rounds must be at least 1"
    );
    anyhow::ensure!(args.clients > 0, "--clients must be at least 1");
    let image = crate::guest_image::build(&KernelDeb::default())?;
    let firmware = FirmwareChoice::Ours.resolve()?;
    let socket = crate::root().join(format!(".cache/bench/injector-{}.sock", std::process::id()));
    crate::step("starting a host-injector daemon for the benchmark");
    let daemon = DaemonProcess::spawn(&socket, &[], false)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("starting the benchmark's daemon")?;
    let mut config = VmConfig::new("bench-injector", firmware)
        .smp(args.smp)
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

/// One request; its wall time in ms and whether its op answered Ok.
fn one(s: &mut Session) -> anyhow::Result<(f64, bool)> {
    let (ms, r) = timed(|| Ok(s.request(&[OP])?))?;
    Ok((ms, r.first().is_some_and(|r| r.status == Status::Ok)))
}

fn measure(vm: &Vm, daemon: &DaemonProcess, args: &InjectorArgs) -> anyhow::Result<()> {
    vm.wait_agent_ready(Duration::from_secs(30))?;
    let addr = daemon.addr();
    let name = vm.name().to_string();
    let mhz = tsc_mhz(&vm.run_shell_command("dmesg").unwrap_or_default());
    let cycles_ms = |c: u64| mhz.map(|m| c as f64 / m / 1e3);

    let mut sessions = [
        daemon_session(vm, &addr, SmiPath::Auto)?,
        daemon_session(vm, &addr, SmiPath::QmpBroadcast)?,
        Session::connect(&Endpoint::from_state_dir(vm.state_dir()), DEADLINE)
            .context("direct session (mailbox file + the harness's QMP socket)")?,
    ];
    // Warm-up: the first SMI after boot goes over QMP (Linux cleared MSI-X
    // enable; the agent re-arms the doorbell when it serves).
    crate::step("warm-up: 20 requests per mode (the agent arms the doorbell)");
    for s in sessions.iter_mut() {
        for _ in 0..20 {
            one(s)?;
        }
    }
    let mut clients: Vec<Session> = (0..args.clients)
        .map(|_| daemon_session(vm, &addr, SmiPath::Auto))
        .collect::<anyhow::Result<_>>()?;
    for c in clients.iter_mut() {
        one(c)?;
    }
    let start_counters = Counters::read(&addr, &name)?;

    let per_round = args.requests.div_ceil(args.rounds);
    let mut samples: Vec<Samples> = Mode::ALL.iter().map(|_| Samples::default()).collect();
    let mut counters: Vec<Counters> = Mode::ALL.iter().map(|_| Counters::default()).collect();
    let (mut t1, mut tn): (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
    let mut tput_counters = Counters::default();
    let window = Duration::from_millis(args.window_ms);
    for round in 0..args.rounds {
        crate::step(&format!(
            "round {}/{}: {per_round} requests per mode, throughput with 1 and {} clients",
            round + 1,
            args.rounds,
            args.clients
        ));
        for k in 0..Mode::ALL.len() {
            let m = (round + k) % Mode::ALL.len();
            let mode = Mode::ALL[m];
            let before = Counters::read(&addr, &name)?;
            let s = &mut sessions[m];
            let smp = &mut samples[m];
            for _ in 0..per_round {
                let (ms, ok) = one(s).context(mode.label())?;
                let tx = s.last_transaction().context("no transaction recorded")?;
                smp.wall.push(ms);
                smp.posted_to_done.push(tx.elapsed.as_secs_f64() * 1e3);
                if let Some(x) = cycles_ms(tx.serve_cycles) {
                    smp.smm.push(x);
                }
                smp.smis += u64::from(tx.smis);
                smp.failed += usize::from(!ok);
            }
            counters[m].add(Counters::read(&addr, &name)?.since(before));
        }
        let before = Counters::read(&addr, &name)?;
        t1.push(throughput(&mut clients[..1], window)?);
        tn.push(throughput(&mut clients[..], window)?);
        tput_counters.add(Counters::read(&addr, &name)?.since(before));
    }

    let burn = if args.burn_rounds > 0 {
        Some(stolen(vm, &mut clients[0], args)?)
    } else {
        None
    };
    let total_counters = Counters::read(&addr, &name)?.since(start_counters);
    let rearms = DaemonClient::connect(&addr, DEADLINE)?
        .header(&name)
        .map(|h| h.doorbell_rearms)
        .unwrap_or(0);

    // The table.
    let p = quantile;
    println!();
    println!(
        "injector benchmark (TCG, -smp {}, one-op CPU_STATE 0; {} rounds, {} requests per mode)",
        args.smp,
        args.rounds,
        per_round * args.rounds
    );
    println!(
        "{:<24} {:>9} {:>9} {:>13} {:>13} {:>11} {:>16}",
        "path", "p50 ms", "p99 ms", "client+daemon", "SMI+entry+poll", "agent SMM", "SMIs (db/qmp)"
    );
    let mut json_modes = serde_json::Map::new();
    for (m, mode) in Mode::ALL.iter().enumerate() {
        let s = &samples[m];
        let (w50, w99) = (p(&s.wall, 0.5), p(&s.wall, 0.99));
        let d50 = p(&s.posted_to_done, 0.5);
        let smm50 = (!s.smm.is_empty()).then(|| p(&s.smm, 0.5));
        let c = counters[m];
        let smis = if *mode == Mode::Direct {
            format!("{} (QMP)", s.smis)
        } else {
            format!("{}/{}", c.smis_doorbell, c.smis_qmp)
        };
        println!(
            "{:<24} {:>9.3} {:>9.3} {:>10.3} ms {:>10.3} ms {:>11} {:>16}",
            mode.label(),
            w50,
            w99,
            w50 - d50,
            d50 - smm50.unwrap_or(0.0),
            smm50
                .map(|x| format!("{x:.3} ms"))
                .unwrap_or_else(|| "n/a".into()),
            smis
        );
        json_modes.insert(
            mode.key().into(),
            json!({
                "requests": s.wall.len(), "failed": s.failed,
                "latency_ms": { "p50": w50, "p99": w99, "min": p(&s.wall, 0.0), "max": p(&s.wall, 1.0) },
                "posted_to_done_ms": { "p50": d50, "p99": p(&s.posted_to_done, 0.99) },
                "agent_smm_ms": { "p50": smm50, "p99": (!s.smm.is_empty()).then(|| p(&s.smm, 0.99)) },
                "smis_per_request": s.smis as f64 / s.wall.len() as f64,
                "daemon_counters": if *mode == Mode::Direct { Value::Null } else { c.json() },
            }),
        );
    }
    let ratio = p(&samples[0].wall, 0.5) / p(&samples[1].wall, 0.5);
    let ratio_daemon = p(&samples[0].posted_to_done, 0.5) / p(&samples[1].posted_to_done, 0.5);
    println!(
        "doorbell p50 / QMP p50 through the daemon: {ratio:.2} (target <= 0.50: {}); posted-to-done only: {ratio_daemon:.2}",
        if ratio <= 0.5 { "met" } else { "missed" }
    );
    let dbc = counters[0];
    let qc = counters[1];
    let doorbell_clean = dbc.smis_qmp == 0 && dbc.fallbacks == 0 && dbc.smis_doorbell > 0;
    let qmp_clean = qc.smis_doorbell == 0 && qc.smis_qmp > 0;
    println!(
        "daemon counters, doorbell batches: {} doorbell SMIs, {} QMP SMIs, {} fallbacks, {} ring-backs for {} requests ({}); QMP batches: {} QMP SMIs, {} doorbell SMIs ({})",
        dbc.smis_doorbell,
        dbc.smis_qmp,
        dbc.fallbacks,
        dbc.rings,
        dbc.ok,
        if doorbell_clean { "clean" } else { "NOT clean" },
        qc.smis_qmp,
        qc.smis_doorbell,
        if qmp_clean { "clean" } else { "NOT clean" }
    );
    let (t1m, tnm) = (crate::bench::median(&t1), crate::bench::median(&tn));
    println!(
        "requests/s through the daemon (doorbell), median of {} windows of {} ms: 1 client {:.0}, {} clients {:.0} (SMIs in those windows: {} doorbell, {} QMP, {} fallbacks)",
        args.rounds,
        args.window_ms,
        t1m,
        args.clients,
        tnm,
        tput_counters.smis_doorbell,
        tput_counters.smis_qmp,
        tput_counters.fallbacks
    );
    if let Some(b) = &burn {
        println!(
            "guest cpuburn {} iterations ({} rounds), guest clock, median: none {:.3} s; 10 Hz {:.3} s ({:+.2} %, {:.0} req) -> {:.3} ms per request; max rate {:.3} s ({:+.2} %, {:.0} req/s) -> {:.3} ms per request",
            b["iterations"],
            args.burn_rounds,
            b["none_s"].as_f64().unwrap_or(0.0),
            b["hz10"]["median_s"].as_f64().unwrap_or(0.0),
            b["hz10"]["slowdown_pct"].as_f64().unwrap_or(0.0),
            b["hz10"]["requests_median"].as_f64().unwrap_or(0.0),
            b["hz10"]["stolen_ms_per_request"].as_f64().unwrap_or(0.0),
            b["max"]["median_s"].as_f64().unwrap_or(0.0),
            b["max"]["slowdown_pct"].as_f64().unwrap_or(0.0),
            b["max"]["requests_per_s"].as_f64().unwrap_or(0.0),
            b["max"]["stolen_ms_per_request"].as_f64().unwrap_or(0.0),
        );
    }
    println!(
        "agent re-arms of the doorbell: {rearms}; all counters over the benchmark: {}; guest TSC {}",
        total_counters.json(),
        mhz.map(|m| format!("{m} MHz"))
            .unwrap_or_else(|| "unknown (no SMM times)".into())
    );
    let failed: usize = samples.iter().map(|s| s.failed).sum();
    if failed > 0 {
        println!("WARNING: {failed} requests were answered with a status other than Ok");
    }

    let out = json!({
        "smp": args.smp, "accel": smmvmi_tests::vm::TCG_ACCEL, "op": "CPU_STATE 0",
        "rounds": args.rounds, "requests_per_mode": per_round * args.rounds,
        "latency": json_modes,
        "doorbell_over_qmp_p50": ratio, "doorbell_over_qmp_posted_to_done_p50": ratio_daemon,
        "target_met": ratio <= 0.5,
        "doorbell_batches_clean": doorbell_clean, "qmp_batches_clean": qmp_clean,
        "throughput": {
            "window_ms": args.window_ms,
            "one_client_rps": { "median": t1m, "windows": t1 },
            "clients": args.clients,
            "n_clients_rps": { "median": tnm, "windows": tn },
            "daemon_counters": tput_counters.json(),
        },
        "stolen": burn,
        "doorbell_rearms": rearms,
        "daemon_counters_total": total_counters.json(),
        "tsc_mhz": mhz,
    });
    let dir = crate::root().join(".cache/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("injector.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out)? + "\n")?;
    crate::step(&format!("results in {}", path.display()));
    Ok(())
}

/// Requests per second of `clients` each looping for `window`, at once.
fn throughput(clients: &mut [Session], window: Duration) -> anyhow::Result<f64> {
    let done = AtomicU64::new(0);
    let start = Instant::now();
    let until = start + window;
    std::thread::scope(|sc| {
        let hs: Vec<_> = clients
            .iter_mut()
            .map(|s| {
                let done = &done;
                sc.spawn(move || -> anyhow::Result<()> {
                    while Instant::now() < until {
                        one(s)?;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        hs.into_iter()
            .try_for_each(|h| h.join().expect("client thread panicked"))
    })?;
    Ok(done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

/// `cpuburn` with no polling, with 10 Hz polling and with polling as fast as
/// one client goes, interleaved; the slowdown per request served meanwhile.
fn stolen(vm: &Vm, client: &mut Session, args: &InjectorArgs) -> anyhow::Result<Value> {
    let n = calibrate_burn(vm, args.burn_s)?;
    let mut r = burn_rounds(
        vm,
        n,
        args.burn_rounds,
        &[
            ("no polling", Load::Alone),
            ("10 Hz polling", Load::Every(Duration::from_millis(100))),
            ("max-rate polling", Load::BackToBack),
        ],
        || one(client).map(|_| ()),
    )?
    .into_iter();
    let (none, _) = r.next().expect("3 settings");
    let (hz10, n10) = r.next().expect("3 settings");
    let (max, nmax) = r.next().expect("3 settings");
    let med = crate::bench::median;
    let base = med(&none);
    let row = |times: &[f64], reqs: &[f64]| {
        let (t, r) = (med(times), med(reqs));
        json!({
            "runs_s": times, "requests": reqs, "median_s": t, "requests_median": r,
            "slowdown_pct": (t - base) / base * 100.0,
            "requests_per_s": r / t,
            "stolen_ms_per_request": if r > 0.0 { Some((t - base) * 1e3 / r) } else { None },
        })
    };
    Ok(json!({
        "iterations": n, "none_runs_s": none, "none_s": base,
        "hz10": row(&hz10, &n10), "max": row(&max, &nmax),
        "clock": "guest /proc/uptime (10 ms resolution) around cpuburn",
    }))
}
