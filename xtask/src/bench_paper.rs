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
//! `target/bench/paper.json` and `target/bench/paper.svg`.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use serde_json::{Value, json};
use smmvmi_tests::baseline::DESIGNS;
use smmvmi_tests::daemon::DaemonProcess;
use smmvmi_tests::guest_image::GuestImage;
use smmvmi_tests::ids_vm::{self, IdsVm, IdsVmConfig, KEYS_DIR};
use smmvmi_tests::vm::{Vm, VmConfig};

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
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Target length of one cpuburn run, seconds.
    #[arg(long, default_value_t = 8.0)]
    pub burn_s: f64,
}

/// Guest RAM of the monitored VM (all below 4 GiB on q35).
const MON_MEM: &str = "1G";
const MON_MEM_BYTES: u64 = 1 << 30;
const SEED_PORT: u16 = 7001;
const IN_OS_PORT: u16 = 7002;

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sh(vm: &Vm, cmd: &str, timeout: Duration) -> anyhow::Result<String> {
    let out = vm.exec_timeout(cmd, timeout)?;
    anyhow::ensure!(
        out.status == 0,
        "`{cmd}` in {} exited {}: {}",
        vm.name(),
        out.status,
        out.stderr.trim()
    );
    Ok(out.stdout.trim().to_string())
}

pub fn run(args: PaperArgs) -> anyhow::Result<()> {
    let root = crate::root();
    let firmware = FirmwareChoice::Ours.resolve()?;
    let base = crate::guest_image::build(&Default::default())?;
    let paper = ids_vm::built_binary("smmvmi-tests", "smmvmi-paper")?;
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
    let pid = std::process::id();
    crate::step("starting a host-injector daemon (with a vhost-device-vsock listener)");
    let uds = dir.join("vsock.sock");
    let daemon = DaemonProcess::spawn(
        &dir.join("injector.sock"),
        &["--vhost-vsock-uds", &uds.to_string_lossy()],
        false,
    )?;

    crate::step("booting the monitored VM (our firmware; RAM in a shared file; network)");
    let (seed_host, in_os_host) = (free_port()?, free_port()?);
    let overlay = dir.join("mon-initramfs.cpio.gz");
    ids_vm::overlay_initrd(&base.initrd, &[paper], &[], &overlay)?;
    let ram_file = dir.join("guest-ram");
    let mut cfg = VmConfig::new(format!("bench-paper-mon-{pid}"), firmware)
        .mem(MON_MEM)
        .through_daemon(&daemon.socket);
    cfg.guest = Some(GuestImage {
        initrd: overlay,
        ..base.clone()
    });
    for a in [
        "-object".to_string(),
        format!(
            "memory-backend-file,id=ram0,size={MON_MEM},mem-path={},share=on",
            ram_file.display()
        ),
        "-machine".into(),
        "memory-backend=ram0".into(),
        "-netdev".into(),
        format!(
            "user,id=net0,hostfwd=tcp:127.0.0.1:{seed_host}-:{SEED_PORT},hostfwd=tcp:127.0.0.1:{in_os_host}-:{IN_OS_PORT}"
        ),
        "-device".into(),
        "virtio-net-pci,netdev=net0".into(),
    ] {
        cfg = cfg.extra_arg(a);
    }
    let mon = Vm::up(cfg).context("booting the monitored VM")?;
    mon.wait_agent_ready(Duration::from_secs(30))?;
    ids_vm::bring_up_network(&mon)?;
    let t = Duration::from_secs(30);
    // The baselines in the monitored VM. The in-OS agent holds the key in
    // guest memory: that is the design's weakness, not the harness's.
    let key = std::fs::read(&mon.info().key)?;
    let key_b64 = base64::engine::general_purpose::STANDARD.encode(&key);
    sh(
        &mon,
        &format!(
            "echo {key_b64} | base64 -d >/tmp/agent.key; \
             smmvmi-paper seed-proxy --listen 0.0.0.0:{SEED_PORT} </dev/null >/tmp/seed.log 2>&1 & \
             smmvmi-paper in-os-agent --listen 0.0.0.0:{IN_OS_PORT} --key /tmp/agent.key </dev/null >/tmp/in-os.log 2>&1 &"
        ),
        t,
    )?;

    crate::step("starting the raw-host baseline (the agent's logic over the RAM file)");
    let raw_port = free_port()?;
    let raw_log = std::fs::File::create(dir.join("raw-host.log"))?;
    let _raw = KillOnDrop(
        Command::new(paper)
            .args(["raw-host", "--listen"])
            .arg(format!("0.0.0.0:{raw_port}"))
            .arg("--key")
            .arg(&mon.info().key)
            .arg("--ram-file")
            .arg(&ram_file)
            .arg("--low-mem")
            .arg(MON_MEM_BYTES.to_string())
            .arg("--cpus-from")
            .arg(mon.info().endpoint())
            .stdin(Stdio::null())
            .stdout(raw_log.try_clone()?)
            .stderr(raw_log)
            .spawn()
            .context("starting smmvmi-paper raw-host")?,
    );

    crate::step("booting the IDS VM (vsock to the daemon, network to the host)");
    let mut ids_cfg = IdsVmConfig::new(
        format!("bench-paper-ids-{pid}"),
        vec![mon.info().clone()],
        uds.clone(),
    );
    ids_cfg.binaries = vec![paper.to_path_buf()];
    ids_cfg.network = true;
    let idsvm = IdsVm::up(ids_cfg).context("booting the IDS VM")?;
    let ids = idsvm.vm();
    let key_in_ids = format!("{KEYS_DIR}/{}.key", mon.name());
    let connect = |design: &str| -> String {
        match design {
            "proxyless" => IdsVm::endpoint_of(mon.name()),
            "seed-proxy" => format!("tcp:10.0.2.2:{seed_host}"),
            "in-os-agent" => format!("tcp:10.0.2.2:{in_os_host}"),
            _ => format!("tcp:10.0.2.2:{raw_port}"),
        }
    };

    let mut results = serde_json::Map::new();
    for design in DESIGNS {
        crate::step(&format!("{design}: version string, ps, bulk read"));
        let out = sh(
            ids,
            &format!(
                "smmvmi-paper client --design {design} --connect '{}' --key {key_in_ids} \
                 --reads {} --ps-runs {} --bulk-mib {}",
                connect(design),
                args.reads,
                args.ps_runs,
                args.bulk_mib
            ),
            Duration::from_secs(900),
        )
        .with_context(|| {
            let logs = sh(&mon, "tail -n 5 /tmp/seed.log /tmp/in-os.log; true", t)
                .unwrap_or_default();
            format!(
                "measuring {design}; the monitored VM's baseline logs:\n{logs}\n(raw-host: {})",
                dir.join("raw-host.log").display()
            )
        })?;
        let v: Value = serde_json::from_str(out.lines().last().unwrap_or(""))
            .with_context(|| format!("{design}: client printed {out:?}"))?;
        eprintln!("    {v}");
        results.insert(design.to_string(), v);
    }

    crate::step(&format!(
        "slowdown: cpuburn in the monitored VM, alone and with each design polled at {} Hz",
        args.hz
    ));
    let n = calibrate_burn(&mon, args.burn_s)?;
    let settings: Vec<&str> = std::iter::once("none").chain(DESIGNS).collect();
    let mut burns: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    let mut polls: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    for round in 0..args.rounds {
        for i in 0..settings.len() {
            let setting = settings[(i + round) % settings.len()];
            if setting == "none" {
                burns.entry(setting).or_default().push(burn_once(&mon, n)?);
                continue;
            }
            sh(
                ids,
                &format!(
                    "rm -f /tmp/stop /tmp/poll.json; smmvmi-paper poll --design {setting} \
                     --connect '{}' --key {key_in_ids} --hz {} --secs 600 --stop-file /tmp/stop \
                     </dev/null >/tmp/poll.json 2>/tmp/poll.err &",
                    connect(setting),
                    args.hz
                ),
                t,
            )?;
            // The poller connects and finds the banner before the burn starts.
            std::thread::sleep(Duration::from_secs(3));
            let secs = burn_once(&mon, n)?;
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
        r["polls_per_s"] = json!(median(&polls[design]));
    }

    let kernel = sh(&mon, "uname -r", t)?;
    let report = json!({
        "machine": machine_summary(),
        "guest_kernel": kernel,
        "qemu": "TCG (thread=single), -smp 2, 1 GiB per VM",
        "reads": args.reads,
        "ps_runs": args.ps_runs,
        "bulk_mib": args.bulk_mib,
        "poll_hz": args.hz,
        "burn_alone_s": alone,
        "rounds": args.rounds,
        "designs": Value::Object(results.clone()),
    });
    drop(idsvm);
    mon.down()?;

    let out_dir = crate::root().join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    // paper.json: one object per design, keyed by design name (the
    // issue's shape), plus the run's context under "_run".
    let mut file = results.clone();
    let mut context = report.clone();
    context.as_object_mut().expect("object").remove("designs");
    file.insert("_run".into(), context);
    std::fs::write(
        out_dir.join("paper.json"),
        serde_json::to_string_pretty(&Value::Object(file))?,
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
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_default();
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
