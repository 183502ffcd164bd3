//! `cargo xtask bench paper`: the published comparison, reproduced side by
//! side in one run on the same VMs (a benchmark, not a test).
//!
//! Topology: a monitored VM (our firmware, served by its own host-injector
//! daemon through the doorbell; RAM in a shared file; a user-mode network
//! card with host port forwards) and an IDS VM (SeaBIOS, `smmvmi-paper`
//! and the keys inside; vsock to the daemon through vhost-device-vsock;
//! user-mode network to the host). Every design is measured from inside the
//! IDS VM by the same client, with the same IDS code and AES-256-GCM
//! sealing (`smmvmi_tests::baseline`):
//!
//! - `proxyless`: `ids` → vsock → daemon → doorbell MSI-X SMI → SMM agent;
//! - `seed-proxy`: TCP → a proxy in the monitored VM → mailbox + APM SMI → SMM agent;
//! - `in-os-agent`: TCP → a process in the monitored VM reading /proc/kcore;
//! - `raw-host`: TCP → a host process reading the guest's RAM file.
//!
//! Figures per design: the version-string read p50/p99 over `--reads`
//! reads (the published experiment), `ps` wall time (median of
//! `--ps-runs`), a `--bulk-mib` physical read's throughput, and the
//! monitored VM's `cpuburn` slowdown while the IDS polls the version string
//! at `--hz` (guest clock, rounds interleaved, medians). Output:
//! `target/bench/paper.json` (one object per design), `paper-run.json`
//! (machine, kernel, settings) and `paper.svg`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{Value, json};
use smmvmi_tests::baseline::DESIGNS;
use smmvmi_tests::guest_image::GuestImage;
use smmvmi_tests::ids_vm;
use smmvmi_tests::paper::Topology;
use smmvmi_tests::vm::Vm;

use crate::FirmwareChoice;
use crate::bench_daemon::{burn_once, calibrate_burn};

#[derive(clap::Args)]
pub struct PaperArgs {
    /// Version-string reads per design (the published experiment).
    #[arg(long, default_value_t = 200)]
    pub reads: usize,
    /// Rounds the reads are split into (designs in rotating order).
    #[arg(long, default_value_t = 5)]
    pub latency_rounds: usize,
    /// `ps` runs per design (median reported).
    #[arg(long, default_value_t = 5)]
    pub ps_runs: usize,
    /// Bulk physical read per design, MiB.
    #[arg(long, default_value_t = 64)]
    pub bulk_mib: usize,
    /// IDS polling rate during the slowdown runs, Hz.
    #[arg(long, default_value_t = 10.0)]
    pub hz: f64,
    /// Slowdown rounds (each: one cpuburn alone and one per design).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Target length of one cpuburn run, seconds.
    #[arg(long, default_value_t = 15.0)]
    pub burn_s: f64,
}

fn sh(vm: &Vm, cmd: &str, timeout: Duration) -> anyhow::Result<String> {
    smmvmi_tests::paper::sh(vm, cmd, timeout).map_err(|e| anyhow::anyhow!("{e}"))
}

pub fn run(args: PaperArgs) -> anyhow::Result<()> {
    let root = crate::root();
    let firmware = FirmwareChoice::Ours.resolve()?;
    let base = crate::guest_image::build(&Default::default())?;
    // Release build: every design's client and baseline code is optimized
    // alike (the first build takes a few minutes).
    crate::step("building smmvmi-paper (release)");
    let paper = ids_vm::built_release_binary("smmvmi-tests", "smmvmi-paper")?;
    ids_vm::vhost_device_vsock()?;
    let dir = root.join(format!(".cache/bench/paper-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run_in(&args, &dir, firmware, &base, &paper);
    let _ = std::fs::remove_file(dir.join("mon-initramfs.cpio.gz"));
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn run_in(
    args: &PaperArgs,
    dir: &Path,
    firmware: smmvmi_tests::vm::Firmware,
    base: &GuestImage,
    paper: &Path,
) -> anyhow::Result<()> {
    crate::step(
        "starting the topology: daemon, monitored VM (RAM file, network, in-guest baselines), raw-host, IDS VM",
    );
    let topo = Topology::up(
        &format!("bench-paper-{}", std::process::id()),
        dir,
        firmware,
        base,
        paper,
        true,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    if !topo.pinned {
        eprintln!("    not pinned (one host CPU, or taskset failed): the VMs share every CPU");
    }
    let (mon, ids) = (topo.mon(), topo.ids());
    let t = Duration::from_secs(30);
    let key_in_ids = topo.key_in_ids();

    // The version string: `--latency-rounds` rounds, the designs in a
    // rotating order within each, so that a change of host load falls on
    // every design alike; percentiles over every sample of a design.
    let rounds = args.latency_rounds.max(1);
    let per_round = args.reads.div_ceil(rounds);
    let mut samples: BTreeMap<&str, BTreeMap<&str, Vec<f64>>> = BTreeMap::new();
    let mut round_p50: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut rodata: BTreeMap<&str, String> = BTreeMap::new();
    let mut banner = String::new();
    crate::step(&format!(
        "version string: {rounds} rounds of {per_round} reads per design, rotating order"
    ));
    for round in 0..rounds {
        for i in 0..DESIGNS.len() {
            let design = DESIGNS[(i + round) % DESIGNS.len()];
            let v = topo
                .client(design, per_round, 0, 0)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            banner = v["banner"].as_str().unwrap_or_default().to_string();
            rodata.insert(
                design,
                v["rodata_sha256"].as_str().unwrap_or_default().into(),
            );
            let d = samples.entry(design).or_default();
            for k in [
                "samples_ms",
                "transport_ms",
                "serve_ms",
                "server_ms",
                "smm_cycles",
            ] {
                d.entry(k).or_default().extend(
                    v[k].as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_f64),
                );
            }
            let mine: Vec<f64> = v["samples_ms"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_f64)
                .collect();
            let p50 = crate::bench_daemon::quantile(&mine, 0.5);
            eprintln!("    round {round} {design}: p50 {p50:.3} ms");
            round_p50.entry(design).or_default().push(p50);
        }
    }
    let first = rodata.get("proxyless").cloned().unwrap_or_default();
    anyhow::ensure!(
        rodata.values().all(|h| *h == first),
        "the designs read different kernel rodata (a design reads wrong memory): {rodata:?}"
    );

    // `ps` and the bulk read, once per design.
    let mut results = serde_json::Map::new();
    for design in DESIGNS {
        crate::step(&format!(
            "{design}: ps and a {} MiB bulk read",
            args.bulk_mib
        ));
        let v = topo
            .client(design, 0, args.ps_runs, args.bulk_mib)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let q = |k: &str, p: f64| -> Value {
            match samples[design].get(k) {
                Some(v) if !v.is_empty() => json!(crate::bench_daemon::quantile(v, p)),
                _ => Value::Null,
            }
        };
        let tsc_mhz = guest_tsc_mhz(mon);
        let smm_us = match (q("smm_cycles", 0.5).as_f64(), tsc_mhz) {
            (Some(c), Some(mhz)) if c > 0.0 => json!(c / mhz),
            _ => Value::Null,
        };
        let r = json!({
            "reads": samples[design]["samples_ms"].len(),
            "p50_ms": q("samples_ms", 0.5),
            "p99_ms": q("samples_ms", 0.99),
            "round_p50_ms": round_p50[design],
            "transport_p50_ms": q("transport_ms", 0.5),
            "serve_p50_ms": q("serve_ms", 0.5),
            "server_p50_ms": q("server_ms", 0.5),
            "smm_p50_us": smm_us,
            "ps_s": v["ps_s"],
            "tasks": v["tasks"],
            "bulk_mb_s": v["bulk_mb_s"],
            "bulk_mib": args.bulk_mib,
            "rodata_sha256": rodata[design],
        });
        eprintln!("    {r}");
        results.insert(design.to_string(), r);
    }

    crate::step(&format!(
        "slowdown: cpuburn in the monitored VM, alone and with each design polled at {} Hz",
        args.hz
    ));
    let n = calibrate_burn(mon, args.burn_s)?;
    let settings: Vec<&str> = std::iter::once("none").chain(DESIGNS).collect();
    let mut burns: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    let mut polls: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    for round in 0..args.rounds {
        for i in 0..settings.len() {
            let setting = settings[(i + round) % settings.len()];
            if setting == "none" {
                let secs = burn_once(mon, n)?;
                eprintln!("    round {round} nothing polls: cpuburn {secs:.3} s");
                burns.entry(setting).or_default().push(secs);
                continue;
            }
            sh(
                ids,
                &format!(
                    "rm -f /tmp/stop /tmp/ready /tmp/poll.json; smmvmi-paper poll --design {setting} \
                     --connect '{}' --key {key_in_ids} --hz {} --secs 600 --stop-file /tmp/stop \
                     --ready-file /tmp/ready </dev/null >/tmp/poll.json 2>/tmp/poll.err &",
                    topo.connect(setting),
                    args.hz
                ),
                t,
            )?;
            // The poller connects and finds the banner before the burn starts.
            let until = Instant::now() + Duration::from_secs(120);
            while sh(ids, "cat /tmp/ready 2>/dev/null; true", t)?.is_empty() {
                if Instant::now() > until {
                    let err = sh(ids, "cat /tmp/poll.err; true", t)?;
                    bail!("{setting}: the poller was not ready within 120 s ({err})");
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            let secs = burn_once(mon, n)?;
            sh(ids, "touch /tmp/stop", t)?;
            let until = Instant::now() + Duration::from_secs(30);
            let poll: Value = loop {
                let text = sh(ids, "cat /tmp/poll.json; true", t)?;
                if let Ok(v) = serde_json::from_str::<Value>(&text) {
                    break v;
                }
                if Instant::now() > until {
                    let err = sh(ids, "cat /tmp/poll.err; true", t)?;
                    bail!("{setting}: the poller printed nothing ({err})");
                }
                std::thread::sleep(Duration::from_millis(300));
            };
            let rate = poll["polls"].as_f64().unwrap_or(0.0) / poll["secs"].as_f64().unwrap_or(1.0);
            anyhow::ensure!(
                poll["errors"].as_u64() == Some(0),
                "{setting}: polling failed while cpuburn ran: {poll}"
            );
            eprintln!("    round {round} {setting}: cpuburn {secs:.3} s, {rate:.1} polls/s");
            burns.entry(setting).or_default().push(secs);
            polls.entry(setting).or_default().push(rate);
        }
    }
    let median = |v: &[f64]| crate::bench_daemon::quantile(v, 0.5);
    let alone = median(&burns["none"]);
    for design in DESIGNS {
        let b = median(&burns[design]);
        let r = results.get_mut(design).expect("measured above");
        r["slowdown_pct"] = json!((b / alone - 1.0) * 100.0);
        r["burn_s"] = json!(b);
        r["burn_runs_s"] = json!(burns[design]);
        r["polls_per_s"] = json!(median(&polls[design]));
    }

    let kernel = sh(mon, "uname -r", t)?;
    let qemu = crate::bench::qemu_version(&mon.info().qemu);
    let report = json!({
        "machine": machine_summary(),
        "guest_kernel": kernel,
        "banner": banner,
        "qemu": qemu,
        "accel": smmvmi_tests::vm::TCG_ACCEL,
        "monitored_vm": {"smp": mon.info().smp, "mem": mon.info().mem, "cpu": mon.info().cpu},
        "ids_vm": {"smp": ids.info().smp, "mem": ids.info().mem, "cpu": ids.info().cpu},
        "pinned": topo.pinned,
        "load_average": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "latency_rounds": rounds,
        "reads": args.reads,
        "ps_runs": args.ps_runs,
        "bulk_mib": args.bulk_mib,
        "poll_hz": args.hz,
        "burn_alone_s": alone,
        "burn_alone_runs_s": burns["none"],
        "rounds": args.rounds,
        "designs": Value::Object(results.clone()),
    });
    let out_dir = crate::root().join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    // paper.json: one object per design, keyed by design name, nothing
    // else; the run's context (machine, kernel, settings) beside it.
    std::fs::write(
        out_dir.join("paper.json"),
        serde_json::to_string_pretty(&Value::Object(results.clone()))?,
    )?;
    let mut context = report;
    context.as_object_mut().expect("object").remove("designs");
    std::fs::write(
        out_dir.join("paper-run.json"),
        serde_json::to_string_pretty(&context)?,
    )?;
    crate::bench_paper_chart::draw(&results, args.hz, &out_dir.join("paper.svg"))?;
    print_table(&results, alone, &kernel);
    // After the results are safe: a failing shutdown loses no measurement.
    topo.down().map_err(|e| anyhow::anyhow!("{e}"))?;
    eprintln!(
        "wrote {} and {}",
        out_dir.join("paper.json").display(),
        out_dir.join("paper.svg").display()
    );
    Ok(())
}

/// The monitored guest's TSC rate, MHz, as its kernel measured it
/// (`tsc: Refined TSC clocksource calibration` or `tsc: Detected`): the
/// firmware reports SMM time in TSC cycles.
fn guest_tsc_mhz(vm: &Vm) -> Option<f64> {
    let out = sh(
        vm,
        "dmesg | grep -o 'tsc: [A-Za-z ]*[0-9.]* MHz' | tail -n 1",
        Duration::from_secs(30),
    )
    .ok()?;
    out.split_whitespace()
        .rev()
        .nth(1)
        .and_then(|v| v.parse().ok())
}

/// The host: CPU model, cores, kernel (for the README's table).
fn machine_summary() -> Value {
    let cpu = crate::bench::host_cpu_model();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "host_kernel": kernel.trim(),
    })
}

fn print_table(results: &serde_json::Map<String, Value>, alone: f64, kernel: &str) {
    println!("published comparison (TCG, guest {kernel}; cpuburn alone {alone:.3} s)");
    println!(
        "| design | p50 ms | p99 ms | ps s | bulk MB/s | slowdown % |\n|---|---|---|---|---|---|"
    );
    for d in DESIGNS {
        let r = &results[d];
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {d} | {:.3} | {:.3} | {:.3} | {:.1} | {:+.2} |",
            f("p50_ms"),
            f("p99_ms"),
            f("ps_s"),
            f("bulk_mb_s"),
            f("slowdown_pct")
        );
    }
    let r = |d: &str, k: &str| results[d][k].as_f64().unwrap_or(f64::NAN);
    println!(
        "ratios: proxyless p50 / seed-proxy {:.2} (target <= 0.5), / in-os-agent {:.2} (target <= 0.33); \
         bulk proxyless / in-os-agent {:.2} (target >= 0.5); proxyless slowdown {:+.2} % (target <= 2)",
        r("proxyless", "p50_ms") / r("seed-proxy", "p50_ms"),
        r("proxyless", "p50_ms") / r("in-os-agent", "p50_ms"),
        r("proxyless", "bulk_mb_s") / r("in-os-agent", "bulk_mb_s"),
        r("proxyless", "slowdown_pct"),
    );
}
