//! `smmvmi-paper`: the processes of `cargo xtask bench paper` (baselines,
//! never shipped). One binary, copied into both guests:
//!
//! - `seed-proxy`, `in-os-agent` (monitored VM) and `raw-host` (host) serve
//!   sealed agent frames over TCP (see `smmvmi_tests::baseline`);
//! - `client` (IDS VM) measures one design: the kernel version string read
//!   `--reads` times (the published experiment), a process listing, and a
//!   bulk physical read; it prints one JSON object;
//! - `poll` (IDS VM) reads the version string at `--hz` for `--secs`, the
//!   load whose cost to the monitored VM the benchmark measures.

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use ids::kernel::{BannerSearch, find_banner};
use ids::linux::{self, Discovery, Kernel};
use ids::memory::{GuestMemory, SnapshotCache, Space};
use ids::session::read_key;
use ids::transport::Transport;
use ids::{Endpoint, Session};
use smmvmi_mailbox::wire::{AddressSpace, Op, Status};
use smmvmi_tests::baseline::emulated::EmulatedAgent;
use smmvmi_tests::baseline::kcore::Kcore;
use smmvmi_tests::baseline::ramfile::RamFile;
use smmvmi_tests::baseline::seed::SeedProxy;
use smmvmi_tests::baseline::wire::{self, TcpCarrier};

#[derive(Parser)]
#[command(about = "smmvmi's published-comparison baselines and their client (benchmarks only)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The published design's in-guest proxy (mailbox via /dev/mem, APM SMI via /dev/port).
    SeedProxy {
        #[arg(long, default_value = "0.0.0.0:7001")]
        listen: String,
    },
    /// The in-OS agent: the agent's logic over /proc/kcore, in the guest.
    InOsAgent {
        #[arg(long, default_value = "0.0.0.0:7002")]
        listen: String,
        /// The 32-byte agent key.
        #[arg(long)]
        key: PathBuf,
    },
    /// The unprotected host: the agent's logic over the guest's RAM file.
    RawHost {
        #[arg(long)]
        listen: String,
        #[arg(long)]
        key: PathBuf,
        /// The guest's `memory-backend-file` path.
        #[arg(long)]
        ram_file: PathBuf,
        /// RAM below 4 GiB, bytes (q35: all of it up to 2 GiB).
        #[arg(long)]
        low_mem: u64,
        /// An IDS endpoint of the same VM's real agent: the CPU states
        /// (page-table root, LSTAR, per-CPU bases) are taken from it once.
        #[arg(long)]
        cpus_from: String,
    },
    /// Measures one design; prints one JSON object.
    Client {
        #[command(flatten)]
        to: Design,
        #[arg(long, default_value_t = 200)]
        reads: usize,
        #[arg(long, default_value_t = 5)]
        ps_runs: usize,
        #[arg(long, default_value_t = 64)]
        bulk_mib: usize,
    },
    /// Reads the version string at `--hz` for `--secs`; prints one JSON object.
    Poll {
        #[command(flatten)]
        to: Design,
        #[arg(long, default_value_t = 10.0)]
        hz: f64,
        /// Longest run, seconds.
        #[arg(long)]
        secs: f64,
        /// Stop as soon as this file exists.
        #[arg(long)]
        stop_file: Option<PathBuf>,
        /// Created once connected and the version string found (polling
        /// starts right after).
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
}

/// The design a client measures and how to reach it.
#[derive(clap::Args)]
struct Design {
    /// `proxyless`, `seed-proxy`, `in-os-agent` or `raw-host`.
    #[arg(long)]
    design: String,
    /// An IDS endpoint (proxyless) or `tcp:HOST:PORT` (baselines).
    #[arg(long)]
    connect: String,
    /// The 32-byte agent key.
    #[arg(long)]
    key: PathBuf,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::SeedProxy { listen } => {
            let mut proxy = SeedProxy::open().map_err(anyhow::Error::msg)?;
            listen_and_serve("seed-proxy", &listen, &mut proxy)?;
        }
        Cmd::InOsAgent { listen, key } => {
            let key = read_key(&key)?;
            let kcore = Kcore::open().map_err(anyhow::Error::msg)?;
            let (ram, cpus) = (kcore.ram(), kcore.cpus().map_err(anyhow::Error::msg)?);
            let mut agent = EmulatedAgent::new(kcore, ram, &key, cpus);
            listen_and_serve("in-os-agent", &listen, &mut agent)?;
        }
        Cmd::RawHost {
            listen,
            key,
            ram_file,
            low_mem,
            cpus_from,
        } => {
            let endpoint: Endpoint = cpus_from.parse().map_err(anyhow::Error::msg)?;
            let cpus = Session::connect(&endpoint, Session::DEFAULT_DEADLINE)?.cpu_states()?;
            let key = read_key(&key)?;
            let ram = RamFile::open(&ram_file, low_mem)
                .with_context(|| format!("open {}", ram_file.display()))?;
            let ranges = ram.ram();
            let mut agent = EmulatedAgent::new(ram, ranges, &key, cpus);
            listen_and_serve("raw-host", &listen, &mut agent)?;
        }
        Cmd::Client {
            to:
                Design {
                    design,
                    connect,
                    key,
                },
            reads,
            ps_runs,
            bulk_mib,
        } => {
            let r = measure(&connect, &key, reads, ps_runs, bulk_mib)?;
            let mut v = serde_json::to_value(r)?;
            v["design"] = design.into();
            println!("{v}");
        }
        Cmd::Poll {
            to:
                Design {
                    design,
                    connect,
                    key,
                },
            hz,
            secs,
            stop_file,
            ready_file,
        } => {
            let mut s = session(&connect, &key)?;
            let banner = find_banner(&mut s, BannerSearch::default())?;
            if let Some(f) = &ready_file {
                std::fs::write(f, b"ready\n").with_context(|| format!("write {}", f.display()))?;
            }
            let space = AddressSpace::kernel_of(0);
            let period = Duration::from_secs_f64(1.0 / hz);
            let started = Instant::now();
            let (mut polls, mut errors) = (0u64, 0u64);
            let mut next = started;
            let stopped = || stop_file.as_ref().is_some_and(|f| f.exists());
            let op = Op::ReadVirt {
                space,
                addr: banner.addr,
                len: banner.text.len() as u32,
            };
            while started.elapsed().as_secs_f64() < secs && !stopped() {
                match s.request_on_cpu(0, &[op]).map(|mut r| r.remove(0)) {
                    Ok(r) if r.status == Status::Ok => polls += 1,
                    _ => errors += 1,
                }
                next += period;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            println!(
                "{}",
                serde_json::json!({"design": design, "polls": polls, "errors": errors,
                    "secs": started.elapsed().as_secs_f64()})
            );
        }
    }
    Ok(())
}

/// Serves `backend` on `listen` (`HOST:PORT`) until killed.
fn listen_and_serve(
    name: &str,
    listen: &str,
    backend: &mut dyn wire::Backend,
) -> anyhow::Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("listen on {listen}"))?;
    eprintln!("{name}: listening on {listen}");
    Ok(wire::serve(&l, backend)?)
}

/// A session to `connect`: an IDS endpoint, or `tcp:HOST:PORT` for a baseline.
fn session(connect: &str, key: &std::path::Path) -> anyhow::Result<Session> {
    if let Some(addr) = connect.strip_prefix("tcp:") {
        let carrier = TcpCarrier::connect(addr).with_context(|| format!("connect to {addr}"))?;
        let key = read_key(key)?;
        return Ok(Session::with_transport(
            Transport::Carrier(Box::new(carrier)),
            &key,
            Session::DEFAULT_DEADLINE,
        )?);
    }
    let endpoint: Endpoint = connect.parse().map_err(anyhow::Error::msg)?;
    Ok(Session::connect(&endpoint, Session::DEFAULT_DEADLINE)?)
}

/// One design's figures.
#[derive(serde::Serialize)]
struct Figures {
    banner: String,
    reads: usize,
    p50_ms: f64,
    p99_ms: f64,
    /// p50 of a header round trip (no request, no SMI): the transport's share.
    transport_p50_ms: f64,
    /// p50 of the serve time the design reports for the same reads: from
    /// posting the request into the mailbox (daemon, proxy) or the
    /// agent's buffer (in-OS agent, raw host) to seeing the reply.
    serve_p50_ms: f64,
    ps_s: f64,
    tasks: usize,
    bulk_mb_s: f64,
    bulk_mib: usize,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn measure(
    connect: &str,
    key: &std::path::Path,
    reads: usize,
    ps_runs: usize,
    bulk_mib: usize,
) -> anyhow::Result<Figures> {
    let mut s = session(connect, key)?;
    // The published experiment: the kernel's version string, read again
    // and again at its known address. It is read-only data, so it needs no
    // snapshot: a design that can interrupt one vCPU alone does (proxyless,
    // through the daemon's per-vCPU vector); the others serve it as any
    // request.
    let banner = find_banner(&mut s, BannerSearch::default())?;
    let space = AddressSpace::kernel_of(0);
    let op = Op::ReadVirt {
        space,
        addr: banner.addr,
        len: banner.text.len() as u32,
    };
    let mut ms = Vec::with_capacity(reads);
    let mut serve = Vec::with_capacity(reads);
    for _ in 0..reads {
        let t = Instant::now();
        let r = s.request_on_cpu(0, &[op])?.remove(0);
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        if let Some(tx) = s.last_transaction() {
            serve.push(tx.elapsed.as_secs_f64() * 1e3);
        }
        if r.status != Status::Ok || r.data != banner.text.as_bytes() {
            bail!(
                "version string read returned {:?}, not the banner",
                r.status
            );
        }
    }
    ms.sort_by(f64::total_cmp);
    serve.sort_by(f64::total_cmp);
    // The transport alone (the profile of the figure above): a header
    // round trip carries no sealed request and raises no SMI, so it is the
    // path from the IDS VM to whatever holds the mailbox, and back.
    let mut rtt = Vec::with_capacity(reads);
    for _ in 0..reads {
        let t = Instant::now();
        s.transport().header()?;
        rtt.push(t.elapsed().as_secs_f64() * 1e3);
    }
    rtt.sort_by(f64::total_cmp);

    // `ps`: the kernel's symbols and types loaded once (as `ids` caches
    // them), then the task list read `ps_runs` times; the median counts.
    let mut c = SnapshotCache::new(s);
    let k = Kernel::load(
        c.inner(),
        &Discovery::default(),
        linux::cache_dir().as_deref(),
    )?;
    let mut ps = Vec::new();
    let mut tasks = 0;
    for _ in 0..ps_runs.max(1) {
        c.new_snapshot();
        let t = Instant::now();
        tasks = linux::ps(&mut c, &k, 0, false)?.len();
        ps.push(t.elapsed().as_secs_f64());
    }
    ps.sort_by(f64::total_cmp);

    // Bulk: guest-physical memory from 16 MiB on (kernel image and data).
    let len = bulk_mib << 20;
    let t = Instant::now();
    let bytes = c.inner().read_exact(Space::Phys, 16 << 20, len)?;
    let bulk_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        bytes.len() == len,
        "bulk read returned {} bytes",
        bytes.len()
    );

    Ok(Figures {
        banner: banner.text.trim_end().to_string(),
        reads,
        p50_ms: percentile(&ms, 0.5),
        p99_ms: percentile(&ms, 0.99),
        transport_p50_ms: percentile(&rtt, 0.5),
        serve_p50_ms: percentile(&serve, 0.5),
        ps_s: percentile(&ps, 0.5),
        tasks,
        bulk_mb_s: len as f64 / 1e6 / bulk_s,
        bulk_mib,
    })
}
