//! One VM served by the daemon: its ivshmem server (QEMU connects, gets the
//! mailbox memory and the vector eventfds), its QMP session (events and the
//! monitor-SMI fallback) and its worker, which carries one request at a time
//! through the mailbox ([`super::request`] decides, this module does the
//! I/O). Each VM runs on its own thread with its own single-threaded tokio
//! runtime, so that the short sleeps while polling the done word delay
//! nobody else.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use smmvmi_mailbox::SharedMemory as _;
use smmvmi_mailbox::layout::{self, ServeStatus};
use smmvmi_mailbox::wire::FrameHeader;
use tokio::io::unix::AsyncFd;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot, watch};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::config::VmConfig;
use super::libvirt::{self, DomainMonitor, DomainStatus, SharedStatus};
use super::metrics::VmMetrics;
use super::monitor::Monitor;
use super::protocol::{DaemonError, HeaderView, SmiPath, TransactInfo, hex};
use super::qmp::{AsyncQmp, Event};
use super::request::{Facts, Path, Policy, Request, Step};
use crate::backend::{DoorbellError, DoorbellSmi, INJECT_SMI_COMMAND, Target};
use crate::ivshmem::{self, DAEMON_PEER, SharedMemory, Vectors};
use crate::mailbox_file::{Header, MailboxFile};
use crate::qmp::QmpError;
use crate::smi::APM_COMMAND;
use crate::transact::{fresh_doorbell, rejection_hint};

/// A request waiting for the VM's mailbox.
pub struct Job {
    /// The sealed request frame.
    pub frame: Vec<u8>,
    /// SMI target.
    pub target: Target,
    /// SMI paths allowed.
    pub smi: SmiPath,
    /// When the daemon received it.
    pub received: Instant,
    /// Absolute deadline.
    pub deadline: Instant,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Result<(TransactInfo, Vec<u8>), DaemonError>>,
}

/// The QEMU instance connected to the ivshmem socket.
#[derive(Debug)]
pub struct QemuPeer {
    /// Its ivshmem peer id.
    pub id: u16,
    /// Its vectors' eventfds (writing one fires that MSI-X vector).
    pub vectors: Arc<Vectors>,
    /// When it connected.
    pub since: SystemTime,
}

/// What status and metrics read about a VM.
pub struct VmShared {
    /// The configuration.
    pub config: VmConfig,
    /// The mailbox memory.
    pub shm: SharedMemory,
    /// Current QEMU peer.
    pub peer: watch::Sender<Option<Arc<QemuPeer>>>,
    /// Counters.
    pub metrics: VmMetrics,
    /// Human-readable state.
    pub notes: Mutex<Notes>,
    /// QMP connected.
    pub qmp_connected: AtomicBool,
    /// Jobs accepted and not yet answered.
    pub in_flight: AtomicU64,
    /// When the daemon started serving it.
    pub started: SystemTime,
    /// A libvirt domain's lifecycle as the daemon follows it.
    pub libvirt: Option<SharedStatus>,
}

/// Free-text state for `status`.
#[derive(Clone, Debug, Default)]
pub struct Notes {
    /// Why monitor SMIs are stopped, if they are.
    pub gate: Option<String>,
    /// Last time QEMU disconnected, and what it means.
    pub qemu_gone: Option<String>,
    /// The last error worth an operator's eye.
    pub last_error: Option<String>,
}

impl VmShared {
    /// A header snapshot (untrusted).
    pub fn header(&self) -> Result<Header, DaemonError> {
        self.mailbox()?.header().map_err(|e| self.mb_err(e))
    }

    fn mailbox(&self) -> Result<MailboxFile, DaemonError> {
        self.shm.mailbox().map_err(|e| DaemonError::Mailbox {
            vm: self.config.name.clone(),
            problem: e.to_string(),
        })
    }

    fn mb_err(&self, e: impl std::fmt::Display) -> DaemonError {
        DaemonError::Mailbox {
            vm: self.config.name.clone(),
            problem: e.to_string(),
        }
    }

    /// The header fields a client needs.
    pub fn header_view(&self) -> Result<HeaderView, DaemonError> {
        let h = self.header()?;
        let mb = self.mailbox()?;
        Ok(HeaderView {
            magic_ok: h.magic_ok,
            version: h.version,
            state: h.state_raw,
            features: h.features,
            salt: hex(&h.salt),
            smi_count: h.smi_count,
            doorbell_rearms: mb.load_u64(layout::OFF_DOORBELL_REARMS).unwrap_or(0),
            summary: h.summary(),
        })
    }

    /// Status as JSON.
    pub fn status_json(&self) -> serde_json::Value {
        let peer = self.peer.borrow().clone();
        let notes = self.notes.lock().expect("notes lock").clone();
        let header = self.header_view().ok();
        serde_json::json!({
            "name": self.config.name,
            "ivshmem_socket": self.config.ivshmem_socket,
            "qmp_socket": self.config.qmp,
            "mailbox": self.shm.name(),
            "mailbox_size": self.shm.size(),
            "vectors": self.config.vectors,
            "qemu": peer.as_ref().map(|p| serde_json::json!({
                "peer_id": p.id,
                "connected_unix": unix(p.since),
            })),
            "qemu_gone": notes.qemu_gone,
            "serving": match (&peer, self.config.mailbox_file.is_some(), self.qmp_connected.load(Ordering::Relaxed)) {
                (Some(_), _, _) => "ivshmem peer: doorbell SMIs, monitor SMIs as fallback",
                (None, true, true) => "QMP only: QEMU predates this daemon (file-backed mailbox)",
                (None, false, true) => "no: QEMU runs but holds a previous daemon's memfd; restart the VM",
                (None, _, false) => "no: QEMU not connected",
            },
            "qmp_connected": self.qmp_connected.load(Ordering::Relaxed),
            "monitor": if self.config.libvirt.is_some() { "libvirt" } else { "qmp-socket" },
            "libvirt": self.libvirt.as_ref().map(|l| l.lock().expect("libvirt status lock").clone()),
            "monitor_smis_stopped": notes.gate,
            "last_error": notes.last_error,
            "in_flight": self.in_flight.load(Ordering::Relaxed),
            "agent": header,
            "counters": self.metrics.json(),
        })
    }

    fn note(&self, f: impl FnOnce(&mut Notes)) {
        f(&mut self.notes.lock().expect("notes lock"));
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Timing knobs shared by all VMs.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Request policy.
    pub policy: Policy,
    /// QMP command timeout.
    pub qmp_timeout: Duration,
}

/// A running VM: its queue and shared state; dropping it stops its thread.
pub struct VmHandle {
    /// Shared state.
    pub shared: Arc<VmShared>,
    /// The bounded queue.
    pub queue: mpsc::Sender<Job>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Errors starting a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmStartError {
    /// Shared memory or eventfds.
    #[error("VM {vm}: {source}")]
    Ivshmem {
        /// VM.
        vm: String,
        /// Cause.
        source: ivshmem::IvshmemError,
    },
    /// The ivshmem socket cannot be bound.
    #[error(
        "VM {vm}: cannot listen on ivshmem socket {path}: {source} (another daemon serving it? remove a stale socket, check the directory exists)"
    )]
    Bind {
        /// VM.
        vm: String,
        /// Socket.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
    /// The VM thread could not start.
    #[error("VM {vm}: starting its thread: {source}")]
    Thread {
        /// VM.
        vm: String,
        /// OS error.
        source: std::io::Error,
    },
}

/// Starts serving a VM: binds its ivshmem socket, starts its thread.
pub fn start(
    config: VmConfig,
    queue_depth: usize,
    timing: Timing,
) -> Result<VmHandle, VmStartError> {
    let vm = config.name.clone();
    let iv = |source| VmStartError::Ivshmem {
        vm: vm.clone(),
        source,
    };
    let shm = match &config.mailbox_file {
        Some(p) => SharedMemory::file(p, config.mailbox_size),
        None => SharedMemory::memfd(&config.name, config.mailbox_size),
    }
    .map_err(iv)?;
    let ring = EventFd::new(EFD_NONBLOCK).map_err(|source| {
        iv(ivshmem::IvshmemError::EventFd {
            vector: layout::RING_VECTOR,
            source,
        })
    })?;
    let _ = std::fs::remove_file(&config.ivshmem_socket);
    if let Some(dir) = config.ivshmem_socket.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let std_listener =
        std::os::unix::net::UnixListener::bind(&config.ivshmem_socket).map_err(|source| {
            VmStartError::Bind {
                vm: vm.clone(),
                path: config.ivshmem_socket.display().to_string(),
                source,
            }
        })?;
    std_listener
        .set_nonblocking(true)
        .map_err(|source| VmStartError::Bind {
            vm: vm.clone(),
            path: config.ivshmem_socket.display().to_string(),
            source,
        })?;
    let (peer, _) = watch::channel(None);
    let config_libvirt = config.libvirt.clone();
    let shared = Arc::new(VmShared {
        config,
        shm,
        peer,
        metrics: VmMetrics::default(),
        notes: Mutex::new(Notes {
            qemu_gone: Some("QEMU has not connected since the daemon started".into()),
            ..Notes::default()
        }),
        qmp_connected: AtomicBool::new(false),
        in_flight: AtomicU64::new(0),
        started: SystemTime::now(),
        libvirt: config_libvirt.as_ref().map(|d| {
            Arc::new(Mutex::new(DomainStatus {
                domain: d.domain.clone(),
                uri: d.uri().to_string(),
                state: "unknown (not asked yet)".into(),
                ..DomainStatus::default()
            }))
        }),
    });
    let (queue, jobs) = mpsc::channel(queue_depth);
    let (stop_tx, stop_rx) = oneshot::channel();
    let s2 = shared.clone();
    let thread = std::thread::Builder::new()
        .name(format!("vm-{vm}"))
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime builds");
            rt.block_on(async move {
                let listener = UnixListener::from_std(std_listener).expect("inside a runtime");
                let acceptor = tokio::spawn(accept_qemu(
                    s2.clone(),
                    listener,
                    ring.try_clone().expect("dup eventfd"),
                ));
                let follower = match (&s2.config.libvirt, &s2.libvirt) {
                    (Some(d), Some(st)) => Some(tokio::spawn(libvirt::follow_lifecycle(
                        d.clone(),
                        s2.config.ivshmem_socket.clone(),
                        st.clone(),
                    ))),
                    _ => None,
                };
                let worker = Worker::new(s2, ring, timing);
                tokio::select! {
                    _ = worker.run(jobs) => {}
                    _ = stop_rx => {}
                }
                acceptor.abort();
                if let Some(f) = follower {
                    f.abort();
                }
            });
        })
        .map_err(|source| VmStartError::Thread { vm, source })?;
    Ok(VmHandle {
        shared,
        queue,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

/// Accepts QEMU connections on the ivshmem socket: each gets a fresh peer
/// id, the (header-cleared) mailbox memory and fresh vector eventfds. The
/// newest connection is the VM's QEMU.
async fn accept_qemu(shared: Arc<VmShared>, listener: UnixListener, ring: EventFd) {
    let name = shared.config.name.clone();
    let mut next_id: u16 = DAEMON_PEER + 1;
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::error!(vm = %name, error = %e, "ivshmem accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let id = next_id;
        next_id = if next_id == ivshmem::MAX_PEER_ID {
            DAEMON_PEER + 1
        } else {
            next_id + 1
        };
        let vectors = match Vectors::new(shared.config.vectors) {
            Ok(v) => Arc::new(v),
            Err(e) => {
                tracing::error!(vm = %name, error = %e, "no eventfds for QEMU");
                continue;
            }
        };
        // A new QEMU is a new boot: nothing of the old header may survive
        // (state Ready + broadcast would open the monitor-SMI gate early).
        if let Err(e) = shared.shm.clear_header() {
            tracing::error!(vm = %name, error = %e, "clearing the mailbox header");
        }
        use std::os::fd::AsFd;
        if let Err(e) = ivshmem::greet(stream.as_fd(), id, &shared.shm, &ring, &vectors) {
            tracing::error!(vm = %name, error = %e, "ivshmem handshake failed");
            continue;
        }
        tracing::info!(vm = %name, peer = id, vectors = vectors.len(), "QEMU connected to the ivshmem socket");
        shared.note(|n| n.qemu_gone = None);
        shared.peer.send_replace(Some(Arc::new(QemuPeer {
            id,
            vectors,
            since: SystemTime::now(),
        })));
        shared.metrics.qemu_connects.fetch_add(1, Ordering::Relaxed);
        let s2 = shared.clone();
        tokio::spawn(async move {
            // QEMU never sends anything: readable means EOF (QEMU exited or
            // was killed) or a protocol violation; either ends the peer.
            let mut buf = [0u8; 64];
            let why = loop {
                if stream.readable().await.is_err() {
                    break "socket error".to_string();
                }
                match stream.try_read(&mut buf) {
                    Ok(0) => break "QEMU closed the ivshmem socket (exited or killed)".into(),
                    Ok(n) => break format!("QEMU sent {n} unexpected bytes (protocol violation)"),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => break e.to_string(),
                }
            };
            let current = s2.peer.borrow().as_ref().map(|p| p.id);
            if current == Some(id) {
                tracing::warn!(vm = %s2.config.name, peer = id, reason = %why, "QEMU disconnected");
                let again = match &s2.config.libvirt {
                    Some(d) => format!(
                        "the domain is started again (virsh -c {} start {})",
                        d.uri(),
                        d.domain
                    ),
                    None => format!(
                        "QEMU is started again with -chardev socket,path={},id=ivs -device ivshmem-doorbell,chardev=ivs,vectors={}",
                        s2.config.ivshmem_socket.display(),
                        s2.config.vectors
                    ),
                };
                s2.note(|n| {
                    n.qemu_gone = Some(format!(
                        "{why} at unix time {}; requests fail until {again}",
                        unix(SystemTime::now()),
                    ))
                });
                s2.peer.send_replace(None);
            }
        });
    }
}

/// The next QEMU event, or never when there is no monitor.
async fn next_event(rx: &mut Option<mpsc::UnboundedReceiver<Event>>) -> Option<Event> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Why monitor SMIs are stopped.
#[derive(Clone, Debug)]
enum Gate {
    /// Safe when the header says Ready with broadcast.
    Open,
    /// Stopped by a QMP event until the agent publishes Ready with a salt
    /// other than the one it had (a new boot's agent).
    Closed { salt: [u8; 16] },
}

struct Worker {
    shared: Arc<VmShared>,
    ring: AsyncFd<EventFd>,
    timing: Timing,
    qmp: Option<Monitor>,
    qmp_events: Option<mpsc::UnboundedReceiver<Event>>,
    qmp_next_try: Instant,
    gate: Gate,
    last_doorbell: u64,
    name: String,
    ever_peer: bool,
    /// Whether this QMP session's QEMU has `inject-smi` (asked once per
    /// connection, when a qmp-targeted request first needs it).
    inject_smi: Option<bool>,
    /// APIC ID → QEMU `cpu-index` of this QMP session's QEMU (looked up
    /// again when an APIC ID is missing: CPU hot-plug).
    cpu_index: HashMap<u32, i64>,
}

enum Abort {
    Gone(String),
}

impl Worker {
    fn new(shared: Arc<VmShared>, ring: EventFd, timing: Timing) -> Self {
        let name = shared.config.name.clone();
        Self {
            // SAFETY: EventFd owns its fd, closes it only when dropped (which
            // the AsyncFd's drop does after deregistering), and as_raw_fd
            // always returns that same fd.
            ring: unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
                .map_err(|e| e.to_string())
                .expect("an eventfd registers with the reactor"),
            shared,
            timing,
            qmp: None,
            qmp_events: None,
            qmp_next_try: Instant::now(),
            gate: Gate::Open,
            last_doorbell: 0,
            name,
            ever_peer: false,
            inject_smi: None,
            cpu_index: HashMap::new(),
        }
    }

    async fn run(mut self, mut jobs: mpsc::Receiver<Job>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                job = jobs.recv() => {
                    let Some(job) = job else { return };
                    self.serve(job).await;
                }
                _ = tick.tick() => {
                    self.maintain_qmp().await;
                    self.drain_events();
                }
                // QEMU's events as they come: a RESET must close the gate
                // while the mailbox still shows the old boot's salt (the new
                // boot's firmware publishes its own within a fraction of a
                // second; closing on that one would keep monitor SMIs
                // stopped for the whole boot).
                ev = next_event(&mut self.qmp_events) => {
                    match ev {
                        Some(ev) => self.apply_event(ev),
                        None => self.qmp_events = None,
                    }
                }
            }
        }
    }

    /// Connects QMP when missing (at most every second), drops a closed one.
    async fn maintain_qmp(&mut self) {
        if let Some(q) = &mut self.qmp
            && q.is_closed()
        {
            tracing::info!(vm = %self.name, monitor = q.label(), "monitor gone (QEMU closed QMP, or the libvirt domain stopped)");
            self.qmp = None;
            self.drain_events();
            self.qmp_events = None;
            self.shared.qmp_connected.store(false, Ordering::Relaxed);
        }
        if self.qmp.is_some() || Instant::now() < self.qmp_next_try {
            return;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let connected =
            if let (Some(d), Some(st)) = (&self.shared.config.libvirt, &self.shared.libvirt) {
                // The lifecycle follower knows whether the domain runs: no
                // virsh call per second for a domain that is shut off.
                let known_stopped = {
                    let s = st.lock().expect("libvirt status lock");
                    s.events_connected && !s.running
                };
                if known_stopped {
                    return;
                }
                self.qmp_next_try = Instant::now() + Duration::from_secs(1);
                DomainMonitor::connect(d.clone(), libvirt::VIRSH_TIMEOUT, tx, st.clone())
                    .await
                    .map(Monitor::Libvirt)
                    .map_err(|e| e.to_string())
            } else {
                let Some(path) = self.shared.config.qmp.clone() else {
                    return;
                };
                self.qmp_next_try = Instant::now() + Duration::from_secs(1);
                AsyncQmp::connect(&path, self.timing.qmp_timeout, tx)
                    .await
                    .map(Monitor::Qmp)
                    .map_err(|e| e.to_string())
            };
        match connected {
            Ok(q) => {
                tracing::info!(vm = %self.name, monitor = q.label(), "monitor connected");
                self.qmp = Some(q);
                self.qmp_events = Some(rx);
                self.inject_smi = None;
                self.cpu_index.clear();
                self.shared.qmp_connected.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::debug!(vm = %self.name, error = %e, "monitor not connectable yet");
            }
        }
    }

    /// Applies queued QMP events: RESET / SHUTDOWN stop monitor SMIs.
    fn drain_events(&mut self) {
        let Some(rx) = &mut self.qmp_events else {
            return;
        };
        let mut events = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            events.push(ev);
        }
        for ev in events {
            self.apply_event(ev);
        }
    }

    /// RESET / SHUTDOWN stop monitor SMIs until a new boot's agent is Ready.
    fn apply_event(&mut self, Event(name): Event) {
        if name == "RESET" || name == "SHUTDOWN" {
            let salt = self.shared.header().map(|h| h.salt).unwrap_or_default();
            let why = format!(
                "QMP event {name}: monitor SMIs stopped until the new boot's agent publishes Ready (QEMU 7.2 crashes on a monitor SMI before the firmware negotiates SMI broadcast)"
            );
            tracing::info!(vm = %self.name, event = %name, "monitor SMIs stopped");
            self.shared.note(|n| n.gate = Some(why));
            self.shared.metrics.resets.fetch_add(1, Ordering::Relaxed);
            self.gate = Gate::Closed { salt };
        }
    }

    /// Whether a monitor SMI is safe now, given a fresh header.
    fn qmp_usable(&mut self, h: &Header) -> bool {
        if self.qmp.is_none() || !h.accepts_host_smi() {
            return false;
        }
        if let Gate::Closed { salt, .. } = &self.gate {
            if h.salt == *salt {
                return false;
            }
            tracing::info!(vm = %self.name, "agent Ready after reset: monitor SMIs allowed again");
            self.gate = Gate::Open;
            self.shared.note(|n| n.gate = None);
        }
        true
    }

    /// The arguments of `inject-smi` for `target` (smi path qmp-targeted):
    /// `Ok(None)` while QMP is not connected; an error when this QEMU has
    /// no `inject-smi` or no vCPU with that APIC ID.
    async fn inject_args(
        &mut self,
        target: Target,
    ) -> Result<Option<serde_json::Value>, DaemonError> {
        let r = self.inject_args_qmp(target).await;
        match r {
            Ok(v) => Ok(v),
            Err(Ok(e)) => Err(e),
            Err(Err(e)) => {
                tracing::warn!(vm = %self.name, error = %e, "QMP failed looking up inject-smi; reconnecting");
                self.qmp = None;
                self.shared.qmp_connected.store(false, Ordering::Relaxed);
                Ok(None)
            }
        }
    }

    async fn inject_args_qmp(
        &mut self,
        target: Target,
    ) -> Result<Option<serde_json::Value>, Result<DaemonError, QmpError>> {
        let Some(q) = self.qmp.as_mut() else {
            return Ok(None);
        };
        if self.inject_smi.is_none() {
            let cmds = q.execute("query-commands", None).await.map_err(Err)?;
            let has = cmds
                .as_array()
                .is_some_and(|a| a.iter().any(|c| c["name"] == INJECT_SMI_COMMAND));
            self.inject_smi = Some(has);
        }
        if self.inject_smi == Some(false) {
            return Err(Ok(DaemonError::NeedsPatchedQemu {
                vm: self.name.clone(),
            }));
        }
        let apic = match target {
            Target::All => return Ok(Some(serde_json::json!({}))),
            Target::Cpu(n) => n,
        };
        if !self.cpu_index.contains_key(&apic) {
            // `inject-smi` takes QEMU's cpu-index; a target names an APIC
            // ID. Equal on a default topology, not in general.
            self.cpu_index.clear();
            let cpus = q.execute("query-cpus-fast", None).await.map_err(Err)?;
            for c in cpus.as_array().into_iter().flatten() {
                let (Some(index), Some(path)) = (c["cpu-index"].as_i64(), c["qom-path"].as_str())
                else {
                    continue;
                };
                let id = q
                    .execute(
                        "qom-get",
                        Some(serde_json::json!({ "path": path, "property": "apic-id" })),
                    )
                    .await
                    .map_err(Err)?;
                if let Some(id) = id.as_u64().and_then(|i| u32::try_from(i).ok()) {
                    self.cpu_index.insert(id, index);
                }
            }
        }
        match self.cpu_index.get(&apic) {
            Some(i) => Ok(Some(serde_json::json!({ "cpu-index": i }))),
            None => {
                let mut known: Vec<u32> = self.cpu_index.keys().copied().collect();
                known.sort_unstable();
                Err(Ok(DaemonError::BadTarget {
                    vm: self.name.clone(),
                    problem: format!(
                        "inject-smi for {target}: QEMU has no vCPU with APIC ID {apic} (its vCPUs' APIC IDs: {known:?})"
                    ),
                }))
            }
        }
    }

    fn err_gone(&self) -> DaemonError {
        let notes = self.shared.notes.lock().expect("notes").clone();
        if let (Some(d), Some(st)) = (&self.shared.config.libvirt, &self.shared.libvirt) {
            let s = st.lock().expect("libvirt status lock").clone();
            if let Some(problem) = s.problem {
                return DaemonError::QemuGone {
                    vm: self.name.clone(),
                    reason: format!("libvirt domain {}: {problem}", d.domain),
                };
            }
            if !s.running {
                return DaemonError::QemuGone {
                    vm: self.name.clone(),
                    reason: format!(
                        "libvirt domain {} is {}; requests are served again once it runs (virsh -c {} start {})",
                        d.domain,
                        s.state,
                        d.uri(),
                        d.domain
                    ),
                };
            }
        }
        if !self.ever_peer && self.qmp.is_some() && self.shared.config.mailbox_file.is_none() {
            return DaemonError::QemuGone {
                vm: self.name.clone(),
                reason: "the daemon restarted while this VM's QEMU kept running: QEMU still holds the previous daemon's mailbox memfd and eventfds, which did not survive the restart. Restart the VM (QEMU connects to the ivshmem socket when it starts), or configure mailbox_file so that a restarted daemon serves the running VM over QMP".into(),
            };
        }
        DaemonError::QemuGone {
            vm: self.name.clone(),
            reason: notes
                .qemu_gone
                .unwrap_or_else(|| "QEMU is not connected".into()),
        }
    }

    async fn serve(&mut self, job: Job) {
        let received = job.received;
        let result = self.carry(&job).await;
        let m = &self.shared.metrics;
        match &result {
            Ok(_) => m.observe(received.elapsed()),
            Err(e) => m.count_error(e),
        }
        if let Err(e) = &result {
            self.shared.note(|n| n.last_error = Some(e.to_string()));
        }
        let _ = job.reply.send(result);
        self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    async fn carry(&mut self, job: &Job) -> Result<(TransactInfo, Vec<u8>), DaemonError> {
        self.maintain_qmp().await;
        self.drain_events();
        let mut peer = self.shared.peer.subscribe();
        let current = peer.borrow_and_update().clone();
        if current.is_some() {
            self.ever_peer = true;
        }
        // Served over QMP only: a file-backed mailbox whose QEMU predates
        // this daemon (restart), and QMP is up.
        let adopted = current.is_none()
            && !self.ever_peer
            && self.shared.config.mailbox_file.is_some()
            && self.qmp.is_some();
        if current.is_none() && !adopted {
            return Err(self.err_gone());
        }
        let mb = self.shared.mailbox()?;
        let header = mb.header().map_err(|e| self.shared.mb_err(e))?;
        let frame_seq = FrameHeader::parse(&job.frame).map(|h| h.seq).unwrap_or(0);
        let doorbell = if frame_seq != 0
            && frame_seq != self.last_doorbell
            && frame_seq != header.reply_done
        {
            frame_seq
        } else {
            fresh_doorbell(self.last_doorbell.max(header.reply_done))
        };
        let targeted_qmp = job.smi == SmiPath::QmpTargeted;
        if !targeted_qmp
            && let Some(p) = &current
            && job.target.vector().is_none_or(|v| v >= p.vectors.len())
        {
            return Err(DaemonError::BadTarget {
                vm: self.name.clone(),
                problem: DoorbellError::NoVector {
                    target: job.target,
                    vectors: p.vectors.len(),
                    vector: job.target.vector(),
                }
                .to_string(),
            });
        }
        // Refused before anything is posted: a stock QEMU, an unknown APIC ID.
        let mut inject = if targeted_qmp {
            self.inject_args(job.target).await?
        } else {
            None
        };
        mb.store_u32(layout::OFF_HOST_PEER, u32::from(DAEMON_PEER) + 1)
            .map_err(|e| self.shared.mb_err(e))?;
        mb.post_request(&job.frame, doorbell).map_err(|e| match e {
            crate::MailboxFileError::Post { source, .. } => DaemonError::RequestTooBig {
                vm: self.name.clone(),
                problem: source.to_string(),
            },
            other => self.shared.mb_err(other),
        })?;
        self.last_doorbell = doorbell;
        // Rings of earlier requests that arrived after their done word was
        // seen (the agent stores the done word, then rings): count them.
        while let Ok(n) = self.ring.get_ref().read() {
            self.shared.metrics.rings.fetch_add(n, Ordering::Relaxed);
        }
        let posted = Instant::now();
        let mut req = Request::posted(doorbell, job.deadline, self.timing.policy);
        let mut rang = false;
        let doorbell_smi = current
            .as_ref()
            .map(|p| DoorbellSmi::new(p.vectors.clone()));
        loop {
            let h = mb.header().map_err(|e| self.shared.mb_err(e))?;
            let facts = Facts {
                now: Instant::now(),
                done_word: h.reply_done,
                doorbell: job.smi == SmiPath::Auto
                    && doorbell_smi.is_some()
                    && h.magic_ok
                    && h.features & layout::FEATURE_DOORBELL != 0,
                qmp: self.qmp_usable(&h),
            };
            match req.step(facts) {
                Step::Done => break,
                Step::Silent => {
                    // Reset the doorbell: a late SMI must not serve a request
                    // whose client has been told it failed.
                    let _ = mb.store_u64(layout::OFF_REQ_DOORBELL, 0);
                    self.count_smis(&req, job.smi);
                    // No SMI could be raised at all (no agent header, the
                    // firmware still booting, a fault): say why instead of
                    // calling an agent silent that was never asked.
                    if req.smis_doorbell == 0
                        && req.smis_qmp == 0
                        && let Some(reason) = h.not_ready_reason()
                    {
                        return Err(DaemonError::NotReady {
                            vm: self.name.clone(),
                            reason,
                        });
                    }
                    return Err(DaemonError::Silent {
                        vm: self.name.clone(),
                        deadline_ms: job
                            .deadline
                            .saturating_duration_since(job.received)
                            .as_millis() as u64,
                        smis_doorbell: req.smis_doorbell,
                        smis_qmp: req.smis_qmp,
                        header: h.summary(),
                    });
                }
                Step::Raise(Path::Doorbell) => {
                    let d = doorbell_smi
                        .as_ref()
                        .expect("doorbell usable implies a peer");
                    if let Err(e) = d.ring(job.target) {
                        tracing::warn!(vm = %self.name, error = %e, "doorbell SMI failed");
                    }
                    req.raised(Path::Doorbell, Instant::now());
                }
                Step::Raise(Path::Qmp) if targeted_qmp => {
                    if inject.is_none() {
                        // QMP was not connected when the request was posted.
                        match self.inject_args(job.target).await {
                            Ok(a) => inject = a,
                            Err(e) => {
                                let _ = mb.store_u64(layout::OFF_REQ_DOORBELL, 0);
                                self.count_smis(&req, job.smi);
                                return Err(e);
                            }
                        }
                    }
                    let tried = match (inject.clone(), self.qmp.as_mut()) {
                        (Some(args), Some(q)) => {
                            match q.execute(INJECT_SMI_COMMAND, Some(args)).await {
                                Ok(_) => true,
                                Err(e @ QmpError::Command { .. }) => {
                                    // E.g. the vCPU was unplugged since the
                                    // look-up: look up again next time, after
                                    // the re-raise period (counted as raised,
                                    // so that retries are paced).
                                    tracing::warn!(vm = %self.name, error = %e, "inject-smi refused");
                                    self.cpu_index.clear();
                                    inject = None;
                                    true
                                }
                                Err(e) => {
                                    tracing::warn!(vm = %self.name, error = %e, "inject-smi failed; reconnecting QMP");
                                    self.qmp = None;
                                    self.shared.qmp_connected.store(false, Ordering::Relaxed);
                                    inject = None;
                                    false
                                }
                            }
                        }
                        // QMP went away during the look-up: nothing raised;
                        // the next step waits for QMP.
                        _ => false,
                    };
                    if tried {
                        req.raised(Path::Qmp, Instant::now());
                    }
                }
                Step::Raise(Path::Qmp) => {
                    let q = self.qmp.as_mut().expect("qmp usable implies connected");
                    match q.hmp(&format!("o /b 0xb2 {APM_COMMAND:#x}")).await {
                        Ok(out) if out.trim().is_empty() => {}
                        Ok(out) => {
                            tracing::warn!(vm = %self.name, output = %out.trim(), "monitor answered the SMI port write")
                        }
                        Err(e) => {
                            tracing::warn!(vm = %self.name, error = %e, "monitor SMI failed; reconnecting QMP");
                            self.qmp = None;
                            self.shared.qmp_connected.store(false, Ordering::Relaxed);
                        }
                    }
                    req.raised(Path::Qmp, Instant::now());
                }
                Step::Wait(until) => {
                    if let Err(Abort::Gone(why)) = self
                        .wait(
                            &mut peer,
                            current.as_ref().map(|p| p.id),
                            adopted,
                            until,
                            &mut rang,
                        )
                        .await
                    {
                        self.count_smis(&req, job.smi);
                        let _ = mb.store_u64(layout::OFF_REQ_DOORBELL, 0);
                        tracing::warn!(vm = %self.name, reason = %why, "request aborted: QEMU gone");
                        return Err(self.err_gone());
                    }
                }
            }
        }
        self.count_smis(&req, job.smi);
        let elapsed = posted.elapsed();
        let mut sb = [0u8; 8];
        mb.copy_out(layout::OFF_SERVE_STATUS, &mut sb)
            .map_err(|e| self.shared.mb_err(e))?;
        let status = u32::from_le_bytes([sb[0], sb[1], sb[2], sb[3]]);
        let reply_len = u32::from_le_bytes([sb[4], sb[5], sb[6], sb[7]]) as usize;
        match ServeStatus::from_raw(status) {
            Some(ServeStatus::Ok | ServeStatus::Unprovisioned) => {}
            other => {
                return Err(DaemonError::Rejected {
                    vm: self.name.clone(),
                    status,
                    hint: rejection_hint(other).to_string(),
                });
            }
        }
        let reply = mb
            .read_reply(reply_len)
            .map_err(|e| self.shared.mb_err(e))?;
        if !rang && let Ok(n) = self.ring.get_ref().read() {
            // The ring that follows the done word, if it is already there.
            self.shared.metrics.rings.fetch_add(n, Ordering::Relaxed);
            rang = true;
        } else if rang {
            self.shared.metrics.rings.fetch_add(1, Ordering::Relaxed);
        }
        Ok((
            TransactInfo {
                status,
                backend: match req.last_path {
                    Some(Path::Qmp) if targeted_qmp => "qmp-targeted",
                    Some(p) => p.label(),
                    None => "none",
                }
                .to_string(),
                smis_doorbell: req.smis_doorbell,
                smis_qmp: req.smis_qmp,
                queued_us: posted.saturating_duration_since(job.received).as_micros() as u64,
                elapsed_us: elapsed.as_micros() as u64,
                serve_cycles: mb.load_u64(layout::OFF_SERVE_CYCLES).unwrap_or(0),
                doorbell,
                rang,
            },
            reply,
        ))
    }

    fn count_smis(&self, req: &Request, smi: SmiPath) {
        let m = &self.shared.metrics;
        m.smis_doorbell
            .fetch_add(req.smis_doorbell.into(), Ordering::Relaxed);
        let monitor = if smi == SmiPath::QmpTargeted {
            &m.smis_qmp_targeted
        } else {
            &m.smis_qmp
        };
        monitor.fetch_add(req.smis_qmp.into(), Ordering::Relaxed);
        m.doorbell_fallbacks
            .fetch_add(req.doorbell_unanswered.into(), Ordering::Relaxed);
    }

    /// Waits until `until` at the latest, returning early on a ring, a QMP
    /// event, or QEMU going away: it wakes on the agent's ring-back, else
    /// after at most 1 ms to poll the done word again.
    async fn wait(
        &mut self,
        peer: &mut watch::Receiver<Option<Arc<QemuPeer>>>,
        peer_id: Option<u16>,
        adopted: bool,
        until: Instant,
        rang: &mut bool,
    ) -> Result<(), Abort> {
        // Compare the value itself (`changed()` below consumes the change
        // notification, so `has_changed()` would miss it next time).
        let now_id = peer.borrow_and_update().as_ref().map(|p| p.id);
        if now_id != peer_id {
            return Err(Abort::Gone("QEMU peer changed".into()));
        }
        if adopted && self.qmp.as_mut().is_none_or(|q| q.is_closed()) {
            return Err(Abort::Gone("QMP closed".into()));
        }
        self.drain_events();
        if self.ring.get_ref().read().is_ok() {
            *rang = true;
            return Ok(());
        }
        let now = Instant::now();
        if now >= until {
            return Ok(());
        }
        // Wait for the agent's ring-back (it rings after storing the done
        // word, whichever way the SMI came), polling the done word at the
        // timer's 1 ms granularity in case it never rings (a guest that
        // moved BAR0, an older firmware).
        let step = (until - now).min(Duration::from_millis(1));
        tokio::select! {
            r = self.ring.readable() => {
                if let Ok(mut g) = r {
                    if g.get_inner().read().is_ok() {
                        *rang = true;
                    }
                    g.clear_ready();
                }
            }
            _ = tokio::time::sleep(step) => {}
            _ = peer.changed() => {}
        }
        Ok(())
    }
}
