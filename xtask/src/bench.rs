//! `cargo xtask bench boot`: a benchmark, not a test.
//!
//! Boot-to-init time (QEMU start to the guest's ready marker on ttyS0) with
//! our firmware, SeaBIOS and OVMF on the same kernel and initramfs
//! (`-smp 2 -m 1G`, median of N boots), side by side with ratios against
//! SeaBIOS; then the host-raised SMI round trip on our firmware (write a ping
//! request, `o /b 0xb2 0x10` over QMP, poll the mailbox until acknowledged),
//! p50/p99. Results also go to `.cache/bench/boot.json`. The other benches
//! (`agent`, `ids`, `injector`, `smi`, `watch`, `dump`) live in their own
//! modules.

use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use smmvmi_tests::guest_image::{GuestImage, KernelDeb};
use smmvmi_tests::vm::{Firmware, Vm, VmConfig};

use crate::FirmwareChoice;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Boot time vs SeaBIOS and OVMF, and the SMI round trip.
    Boot(BootArgs),
    /// SMM agent: request latency, bulk READ_PHYS throughput, time in SMM.
    Agent(crate::bench_agent::AgentArgs),
    /// IDS Linux commands (banner, cold kallsyms+BTF, ps, lsmod): wall time
    /// and SMIs, against the guest's own ps and /proc/modules.
    Ids(crate::bench_ids::IdsArgs),
    /// Host-injector daemon: request latency with the doorbell, with QMP
    /// and direct; requests/s with 1 and 8 clients; guest CPU time stolen.
    Injector(crate::bench_injector::InjectorArgs),
    /// SMI designs on the patched QEMU, one run: broadcast QMP, targeted
    /// QMP (`inject-smi`), doorbell broadcast, doorbell targeted; latency
    /// and the guest's slowdown at 10 Hz polling.
    Smi(crate::bench_smi::SmiArgs),
    /// Memory dumps: `ids dump` through the agent against QEMU's pmemsave
    /// of the same RAM, and Volatility's pslist on the dump and live.
    Dump(crate::bench_dump::DumpArgs),
    /// The IDS's watch: time and SMIs per pass, a full check text, and the
    /// guest's slowdown with a pass every 1 s and every 0.1 s.
    Watch(crate::bench_watch::WatchArgs),
    /// The published comparison from an IDS VM: proxyless against the
    /// published proxy design, an in-OS agent and the unprotected host
    /// (version-string latency, ps, bulk throughput, guest slowdown at 10 Hz).
    Paper(crate::bench_paper::PaperArgs),
}

#[derive(clap::Args)]
pub struct BootArgs {
    /// Boots per firmware (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Host-raised SMIs for the round-trip figures (0 skips it).
    #[arg(long, default_value_t = 200)]
    pub smis: usize,
    /// Firmwares to compare.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [FirmwareChoice::Ours, FirmwareChoice::Seabios, FirmwareChoice::Ovmf])]
    pub firmware: Vec<FirmwareChoice>,
}

/// The host CPU's model name, as `/proc/cpuinfo` gives it ("" if unknown).
pub fn host_cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_default()
}

/// The first line of `qemu --version` ("" if it cannot be run).
pub fn qemu_version(qemu: &std::path::Path) -> String {
    std::process::Command::new(qemu)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_default()
}

pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Boot(args) => boot(args),
        Command::Agent(args) => crate::bench_agent::run(args),
        Command::Ids(args) => crate::bench_ids::run(args),
        Command::Injector(args) => crate::bench_injector::run(args),
        Command::Smi(args) => crate::bench_smi::run(args),
        Command::Watch(args) => crate::bench_watch::run(args),
        Command::Dump(args) => crate::bench_dump::run(args),
        Command::Paper(args) => crate::bench_paper::run(args),
    }
}

struct Row {
    label: &'static str,
    firmware: Option<Firmware>,
    times: Vec<f64>,
    error: Option<String>,
}

fn boot(args: BootArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    let image = crate::guest_image::build(&KernelDeb::default())?;
    // Interleaved: run i boots every firmware once, so that drift in host
    // load shifts all series alike.
    let mut rows: Vec<Row> = args.firmware.iter().map(|c| Row::new(*c)).collect();
    for i in 0..args.runs {
        for row in rows.iter_mut().filter(|r| r.error.is_none()) {
            boot_once(row, &image, i, args.runs);
        }
    }

    let seabios = rows
        .iter()
        .find(|r| r.label == "seabios" && r.error.is_none())
        .map(|r| median(&r.times));
    println!();
    println!("boot to init, -smp 2 -m 1G, TCG, {} runs each", args.runs);
    println!(
        "{:<10} {:>10} {:>10} {:>10} {:>12}",
        "firmware", "median s", "min s", "max s", "vs SeaBIOS"
    );
    let mut json_rows = Vec::new();
    for r in &rows {
        match &r.error {
            Some(e) => {
                println!(
                    "{:<10} {:>10}   ({})",
                    r.label,
                    "n/a",
                    e.lines().next().unwrap_or("")
                );
                json_rows.push(json!({ "firmware": r.label, "error": e }));
            }
            None => {
                let (med, min, max) = (median(&r.times), min(&r.times), max(&r.times));
                let ratio = seabios.map(|s| med / s);
                println!(
                    "{:<10} {:>10.3} {:>10.3} {:>10.3} {:>12}",
                    r.label,
                    med,
                    min,
                    max,
                    ratio
                        .map(|x| format!("{x:.2}x"))
                        .unwrap_or_else(|| "-".into())
                );
                json_rows.push(json!({
                    "firmware": r.label, "runs_s": r.times, "median_s": med, "min_s": min,
                    "max_s": max, "ratio_vs_seabios": ratio,
                }));
            }
        }
    }

    // The SMI round trip under both TCG modes: the harness default (one
    // thread for all vCPUs) and QEMU's default (a thread per vCPU), which
    // is why the harness picks the former (see tests/src/vm.rs TCG_ACCEL).
    let mut smi_json = Vec::new();
    if args.smis > 0 && args.firmware.contains(&FirmwareChoice::Ours) {
        println!();
        for accel in [smmvmi_tests::vm::TCG_ACCEL, "tcg,thread=multi"] {
            match smi_round_trip(&image, args.smis, accel) {
                Ok(mut rtts) => {
                    rtts.sort_by(f64::total_cmp);
                    let (p50, p99) = (percentile(&rtts, 50.0), percentile(&rtts, 99.0));
                    let max = rtts.last().copied().unwrap_or(0.0);
                    println!(
                        "host SMI round trip (write ping, HMP o /b 0xb2 0x10, poll ack), -accel {accel}, {} SMIs: p50 {p50:.3} ms  p99 {p99:.3} ms  max {max:.3} ms",
                        rtts.len(),
                    );
                    smi_json.push(json!({ "accel": accel, "count": rtts.len(), "p50_ms": p50, "p99_ms": p99, "max_ms": max }));
                }
                Err(e) => {
                    println!("host SMI round trip, -accel {accel}: n/a ({e:#})");
                    smi_json.push(json!({ "accel": accel, "error": format!("{e:#}") }));
                }
            }
        }
    }

    let out_dir = smmvmi_tests::cache_dir().join("bench");
    std::fs::create_dir_all(&out_dir)?;
    let path = out_dir.join("boot.json");
    let doc = json!({
        "machine": "q35,smm=on", "accel": smmvmi_tests::vm::TCG_ACCEL, "smp": 2, "mem": "1G", "runs": args.runs,
        "kernel_release": image.kernel_release, "boot_to_init": json_rows, "smi_round_trip": smi_json,
    });
    std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
    eprintln!("results written to {}", path.display());
    Ok(())
}

impl Row {
    fn new(choice: FirmwareChoice) -> Self {
        let label = match choice {
            FirmwareChoice::Ours => "ours",
            FirmwareChoice::Seabios => "seabios",
            FirmwareChoice::Ovmf => "ovmf",
        };
        let (firmware, error) = match choice.resolve() {
            Ok(f) => (Some(f), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        };
        Row {
            label,
            firmware,
            times: Vec::new(),
            error,
        }
    }
}

fn boot_once(row: &mut Row, image: &GuestImage, i: usize, runs: usize) {
    let Some(firmware) = row.firmware.clone() else {
        return;
    };
    let label = row.label;
    let mut config = VmConfig::new(format!("bench-{label}"), firmware)
        .smp(2)
        .mem("1G");
    config.guest = Some(image.clone());
    match Vm::up(config) {
        Ok(vm) => {
            let t = vm.boot_time().unwrap_or_default().as_secs_f64();
            crate::step(&format!("{label} boot {}/{runs}: {t:.3} s", i + 1));
            row.times.push(t);
            let _ = vm.down();
        }
        Err(e) => row.error = Some(format!("{e}")),
    }
}

/// Round trips in milliseconds.
fn smi_round_trip(image: &GuestImage, count: usize, accel: &str) -> anyhow::Result<Vec<f64>> {
    let firmware = FirmwareChoice::Ours.resolve()?;
    let mut config = VmConfig::new("bench-smi", firmware)
        .smp(2)
        .mem("1G")
        .accel(accel);
    config.guest = Some(image.clone());
    let vm = Vm::up(config).context("booting the SMI benchmark VM")?;
    vm.wait_agent_ready(Duration::from_secs(10))?;
    crate::step(&format!("raising {count} SMIs from the host"));
    let mut rtts = Vec::with_capacity(count);
    for _ in 0..count {
        rtts.push(
            vm.host_smi_ping(
                smmvmi_mailbox::platform::APM_CMD_SERVE,
                Duration::from_secs(10),
            )?
            .as_secs_f64()
                * 1e3,
        );
    }
    vm.run_shell_command("true")
        .context("guest unresponsive after the SMIs")?;
    let _ = vm.down();
    Ok(rtts)
}

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return 0.0;
    }
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 100.0);
        assert_eq!(percentile(&v, 99.0), 198.0);
        assert_eq!(percentile(&[5.0], 99.0), 5.0);
    }
}
