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
    /// The published design's in-guest proxy (the mailbox BAR mapped from sysfs, the APM SMI by `out 0xb2`).
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
            let cpus = cpu_states(&endpoint).map_err(anyhow::Error::msg)?;
            let key = read_key(&key)?;
            let ram = RamFile::open(&ram_file, low_mem)
                .with_context(|| format!("open {}", ram_file.display()))?;
            let ranges = ram.ram();
            let mut raw = RawHost {
                agent: EmulatedAgent::new(ram, ranges, &key, cpus),
                cpus_from: endpoint,
            };
            listen_and_serve("raw-host", &listen, &mut raw)?;
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
                // The next slot, never in the past: a slow request is not
                // followed by a burst that catches up.
                next = (next + period).max(Instant::now());
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

/// The raw-host baseline: the agent's logic over the RAM file, with the
/// CPU states (page-table roots, per-CPU bases) taken again from the real
/// agent for every client, so that a page-table root of a process that has
/// since exited is never walked.
struct RawHost {
    agent: EmulatedAgent<RamFile>,
    cpus_from: Endpoint,
}

fn cpu_states(endpoint: &Endpoint) -> Result<Vec<smmvmi_agent::CpuSnapshot>, String> {
    let mut s = Session::connect(endpoint, Session::DEFAULT_DEADLINE)
        .map_err(|e| format!("CPU states from the agent: {e}"))?;
    s.cpu_states()
        .map_err(|e| format!("CPU states from the agent: {e}"))
}

impl wire::Backend for RawHost {
    fn header(&mut self) -> Result<(u32, [u8; smmvmi_mailbox::header::SESSION_SALT_LEN]), String> {
        self.agent.header()
    }
    fn transact(&mut self, frame: &[u8]) -> Result<(u32, u64, Duration, Vec<u8>), String> {
        self.agent.transact(frame)
    }
    fn new_client(&mut self) -> Result<(), String> {
        self.agent.set_cpus(cpu_states(&self.cpus_from)?);
        Ok(())
    }
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
    Ok(session_with_stats(connect, key)?.0)
}

/// [`session`], with the baseline's per-request server times when it is one.
fn session_with_stats(
    connect: &str,
    key: &std::path::Path,
) -> anyhow::Result<(Session, Option<wire::ServerTimes>)> {
    if let Some(addr) = connect.strip_prefix("tcp:") {
        let carrier = TcpCarrier::connect(addr).with_context(|| format!("connect to {addr}"))?;
        let stats = carrier.server_times();
        let key = read_key(key)?;
        let s = Session::with_transport(
            Transport::Carrier(Box::new(carrier)),
            &key,
            Session::DEFAULT_DEADLINE,
        )?;
        return Ok((s, Some(stats)));
    }
    let endpoint: Endpoint = connect.parse().map_err(anyhow::Error::msg)?;
    Ok((
        Session::connect(&endpoint, Session::DEFAULT_DEADLINE)?,
        None,
    ))
}

/// One design's figures. Sample arrays are in milliseconds, in request
/// order (the bench merges several invocations before taking percentiles).
#[derive(serde::Serialize)]
struct Figures {
    banner: String,
    /// SHA-256 of 64 KiB of read-only kernel data from the banner's page:
    /// every design must read the same bytes.
    rodata_sha256: String,
    reads: usize,
    /// Version-string reads, wall time in the IDS VM.
    samples_ms: Vec<f64>,
    /// Header round trips on the same connection (no request, no SMI): the
    /// transport's share.
    transport_ms: Vec<f64>,
    /// The serve time each design reports for the same reads: from posting
    /// the request into the mailbox (daemon, proxy) or the agent's buffer
    /// (in-OS agent, raw host) to seeing the reply.
    serve_ms: Vec<f64>,
    /// The time a baseline process held each request, from reading it off
    /// the socket to writing the reply (none for proxyless: the daemon does
    /// not report it).
    server_ms: Vec<f64>,
    /// The TSC cycles the firmware says it spent in SMM per read (SMM
    /// designs; 0 elsewhere).
    smm_cycles: Vec<u64>,
    /// Median `ps` wall time (kernel symbols and types loaded before, not
    /// timed), seconds.
    ps_s: Option<f64>,
    tasks: Option<usize>,
    bulk_mb_s: Option<f64>,
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
    let (mut s, stats) = session_with_stats(connect, key)?;
    // The published experiment: the kernel's version string, read again
    // and again at its known address. It is read-only data, so it needs no
    // snapshot: a design that can interrupt one vCPU alone does (proxyless,
    // through the daemon's per-vCPU vector); the others serve it as any
    // request (the seed proxy's APM SMI reaches every vCPU).
    let banner = find_banner(&mut s, BannerSearch::default())?;
    let space = AddressSpace::kernel_of(0);
    let op = Op::ReadVirt {
        space,
        addr: banner.addr,
        len: banner.text.len() as u32,
    };
    let rodata = s.read_virt(space, banner.addr & !0xFFF, 64 << 10)?;
    let mut f = Figures {
        banner: banner.text.trim_end().to_string(),
        rodata_sha256: sha256_hex(&rodata),
        reads,
        samples_ms: Vec::with_capacity(reads),
        transport_ms: Vec::with_capacity(reads),
        serve_ms: Vec::with_capacity(reads),
        server_ms: Vec::with_capacity(reads),
        smm_cycles: Vec::with_capacity(reads),
        ps_s: None,
        tasks: None,
        bulk_mb_s: None,
        bulk_mib,
    };
    for _ in 0..reads {
        let t = Instant::now();
        let r = s.request_on_cpu(0, &[op])?.remove(0);
        f.samples_ms.push(t.elapsed().as_secs_f64() * 1e3);
        if let Some(tx) = s.last_transaction() {
            f.serve_ms.push(tx.elapsed.as_secs_f64() * 1e3);
            f.smm_cycles.push(tx.serve_cycles);
        }
        if let Some(st) = &stats {
            f.server_ms.push(st.last_server().as_secs_f64() * 1e3);
        }
        if r.status != Status::Ok || r.data != banner.text.as_bytes() {
            bail!(
                "version string read returned {:?}, not the banner",
                r.status
            );
        }
    }
    // The transport alone (the profile of the figure above): a header
    // round trip carries no sealed request and raises no SMI, so it is the
    // path from the IDS VM to whatever holds the mailbox, and back.
    for _ in 0..reads {
        let t = Instant::now();
        s.transport().header()?;
        f.transport_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }

    // `ps`: the kernel's symbols and types loaded once (as `ids` caches
    // them), then the task list read `ps_runs` times; the median counts.
    let mut c = SnapshotCache::new(s);
    if ps_runs > 0 {
        let k = Kernel::load(
            c.inner(),
            &Discovery::default(),
            linux::cache_dir().as_deref(),
        )?;
        let mut ps = Vec::new();
        for _ in 0..ps_runs {
            c.new_snapshot();
            let t = Instant::now();
            f.tasks = Some(linux::ps(&mut c, &k, 0, false)?.len());
            ps.push(t.elapsed().as_secs_f64());
        }
        ps.sort_by(f64::total_cmp);
        f.ps_s = Some(percentile(&ps, 0.5));
    }

    // Bulk: guest-physical memory from 16 MiB on (kernel image and data).
    if bulk_mib > 0 {
        let len = bulk_mib << 20;
        let t = Instant::now();
        let bytes = c.inner().read_exact(Space::Phys, 16 << 20, len)?;
        let bulk_s = t.elapsed().as_secs_f64();
        anyhow::ensure!(
            bytes.len() == len,
            "bulk read returned {} bytes",
            bytes.len()
        );
        f.bulk_mb_s = Some(len as f64 / 1e6 / bulk_s);
    }
    Ok(f)
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
