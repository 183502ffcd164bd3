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
    let _ = std::fs::remove_file(dir.join("guest-ram"));
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
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (mon, ids) = (topo.mon(), topo.ids());
    let t = Duration::from_secs(30);
    let key_in_ids = topo.key_in_ids();

    let mut results = serde_json::Map::new();
    for design in DESIGNS {
        crate::step(&format!("{design}: version string, ps, bulk read"));
        let v = topo
            .client(design, args.reads, args.ps_runs, args.bulk_mib)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        eprintln!("    {v}");
        results.insert(design.to_string(), v);
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
    let report = json!({
        "machine": machine_summary(),
        "guest_kernel": kernel,
        "qemu": "TCG (thread=single), -smp 2, 1 GiB per VM",
        "reads": args.reads,
        "ps_runs": args.ps_runs,
        "bulk_mib": args.bulk_mib,
        "poll_hz": args.hz,
        "burn_alone_s": alone,
        "burn_alone_runs_s": burns["none"],
        "rounds": args.rounds,
        "designs": Value::Object(results.clone()),
    });
    topo.down().map_err(|e| anyhow::anyhow!("{e}"))?;

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
    crate::bench_paper_chart::draw(&results, &out_dir.join("paper.svg"))?;
    print_table(&results, alone, &kernel);
    eprintln!(
        "wrote {} and {}",
        out_dir.join("paper.json").display(),
        out_dir.join("paper.svg").display()
    );
    Ok(())
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
