//! What the benchmarks through the host-injector daemon share (`bench
//! injector`, `bench smi`): the daemon's per-VM counters read around a
//! batch, an IDS session through the daemon with a chosen SMI path, one
//! timed request, and the guest workload (`cpuburn`, timed by the guest's
//! own clock) run alone or while a poller sends requests.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use host_injector::daemon::client::{DaemonAddr, DaemonClient};
use host_injector::daemon::protocol::SmiPath;
use ids::transport::Transport;
use ids::{Endpoint, Session};
use serde_json::{Value, json};
use smmvmi_tests::vm::Vm;

/// Deadline of every request and daemon call of the benchmarks.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// The daemon's counters of one VM.
#[derive(Clone, Copy, Default, Debug)]
pub struct Counters {
    pub ok: u64,
    pub smis_doorbell: u64,
    pub smis_qmp: u64,
    pub smis_qmp_targeted: u64,
    pub fallbacks: u64,
    pub rings: u64,
    pub errors: u64,
}

impl Counters {
    /// The counters of `vm` as the daemon reports them now.
    pub fn read(addr: &DaemonAddr, vm: &str) -> anyhow::Result<Self> {
        let st = DaemonClient::connect(addr, DEADLINE)?.status()?;
        let v = st["vms"]
            .as_array()
            .and_then(|a| a.iter().find(|v| v["name"] == vm))
            .with_context(|| format!("VM {vm} not in the daemon's status: {st}"))?;
        let c = &v["counters"];
        let n = |k: &str| c[k].as_u64().unwrap_or(0);
        Ok(Self {
            ok: n("ok"),
            smis_doorbell: n("smis_doorbell"),
            smis_qmp: n("smis_qmp"),
            smis_qmp_targeted: n("smis_qmp_targeted"),
            fallbacks: n("doorbell_fallbacks"),
            rings: n("agent_rings"),
            errors: n("rejected") + n("silent") + n("busy") + n("qemu_gone") + n("other_errors"),
        })
    }

    /// What changed since `before`.
    pub fn since(self, before: Self) -> Self {
        Self {
            ok: self.ok - before.ok,
            smis_doorbell: self.smis_doorbell - before.smis_doorbell,
            smis_qmp: self.smis_qmp - before.smis_qmp,
            smis_qmp_targeted: self.smis_qmp_targeted - before.smis_qmp_targeted,
            fallbacks: self.fallbacks - before.fallbacks,
            rings: self.rings - before.rings,
            errors: self.errors - before.errors,
        }
    }

    pub fn add(&mut self, d: Self) {
        self.ok += d.ok;
        self.smis_doorbell += d.smis_doorbell;
        self.smis_qmp += d.smis_qmp;
        self.smis_qmp_targeted += d.smis_qmp_targeted;
        self.fallbacks += d.fallbacks;
        self.rings += d.rings;
        self.errors += d.errors;
    }

    pub fn json(&self) -> Value {
        json!({
            "ok": self.ok, "smis_doorbell": self.smis_doorbell, "smis_qmp": self.smis_qmp,
            "smis_qmp_targeted": self.smis_qmp_targeted,
            "doorbell_fallbacks": self.fallbacks, "agent_rings": self.rings, "errors": self.errors,
        })
    }
}

/// An IDS session with `vm` through the daemon at `addr`, its requests
/// restricted to `smi`.
pub fn daemon_session(vm: &Vm, addr: &DaemonAddr, smi: SmiPath) -> anyhow::Result<Session> {
    let ep = Endpoint::Daemon(ids::endpoint::DaemonEndpoint {
        addr: addr.clone(),
        vm: vm.name().to_string(),
        key: Some(vm.info().key.clone()),
    });
    let mut s = Session::connect(&ep, DEADLINE)?;
    if let Transport::Daemon(d) = s.transport() {
        d.smi_path(smi);
    }
    Ok(s)
}

/// Runs one request; its wall time in ms.
pub fn timed<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(f64, T)> {
    let t = Instant::now();
    let r = f()?;
    Ok((t.elapsed().as_secs_f64() * 1e3, r))
}

/// The `q` quantile (0..=1) of unsorted samples.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    crate::bench_agent::percentile(&s, q)
}

/// One `cpuburn n` in the guest, timed by the guest's own clock (seconds).
pub fn burn_once(vm: &Vm, n: u64) -> anyhow::Result<f64> {
    let out = vm
        .exec_timeout(
            &format!(
                "read a x </proc/uptime; cpuburn {n} >/dev/null; read b x </proc/uptime; echo $a $b"
            ),
            Duration::from_secs(300),
        )
        .context("cpuburn in the guest")?;
    anyhow::ensure!(out.status == 0, "cpuburn failed: {}", out.stderr);
    let v: Vec<f64> = out
        .stdout
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    anyhow::ensure!(v.len() == 2, "unexpected output {:?}", out.stdout);
    Ok(v[1] - v[0])
}

/// The `cpuburn` iteration count that runs about `secs` without polling.
pub fn calibrate_burn(vm: &Vm, secs: f64) -> anyhow::Result<u64> {
    crate::step("calibrating cpuburn");
    let probe = 2_000_000u64;
    let t = burn_once(vm, probe)?.max(0.05);
    Ok(((probe as f64) * secs / t).round() as u64)
}

/// `cpuburn n` while `poll` runs in a loop on another thread, once per
/// `period` (`None`: back to back). Returns the guest-clock seconds of
/// `cpuburn` and the polls that completed while it ran.
pub fn burn_while_polling(
    vm: &Vm,
    n: u64,
    period: Option<Duration>,
    mut poll: impl FnMut() -> anyhow::Result<()> + Send,
) -> anyhow::Result<(f64, u64)> {
    let stop = AtomicBool::new(false);
    let served = AtomicU64::new(0);
    std::thread::scope(|sc| {
        let poller = sc.spawn(|| -> anyhow::Result<()> {
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                poll()?;
                served.fetch_add(1, Ordering::Relaxed);
                if let Some(p) = period {
                    next += p;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < next {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
            Ok(())
        });
        // Polls counted from the start of cpuburn to its end (give the
        // poller a moment to reach its rate first).
        std::thread::sleep(Duration::from_millis(200));
        let before = served.load(Ordering::Relaxed);
        let r = burn_once(vm, n);
        let count = served.load(Ordering::Relaxed) - before;
        stop.store(true, Ordering::Relaxed);
        poller.join().expect("poller panicked")?;
        Ok((r?, count))
    })
}

/// How the guest is loaded while `cpuburn` runs.
#[derive(Clone, Copy, Debug)]
pub enum Load {
    /// Nothing polls.
    Alone,
    /// One poll per period.
    Every(Duration),
    /// Polls back to back.
    BackToBack,
}

/// `cpuburn n` under each of `settings`, interleaved round by round (the
/// order rotates, so no setting always runs first). Per setting: the
/// guest-clock seconds of each round and the polls that completed in it.
pub fn burn_rounds(
    vm: &Vm,
    n: u64,
    rounds: usize,
    settings: &[(&str, Load)],
    mut poll: impl FnMut() -> anyhow::Result<()> + Send,
) -> anyhow::Result<Vec<(Vec<f64>, Vec<f64>)>> {
    let mut out = vec![(Vec::new(), Vec::new()); settings.len()];
    for round in 0..rounds {
        for k in 0..settings.len() {
            let which = (round + k) % settings.len();
            let (label, load) = settings[which];
            crate::step(&format!(
                "cpuburn {n} round {}/{rounds}: {label}",
                round + 1
            ));
            let (secs, polls) = match load {
                Load::Alone => (burn_once(vm, n)?, 0),
                Load::Every(p) => burn_while_polling(vm, n, Some(p), &mut poll)?,
                Load::BackToBack => burn_while_polling(vm, n, None, &mut poll)?,
            };
            out[which].0.push(secs);
            out[which].1.push(polls as f64);
        }
    }
    Ok(out)
}
