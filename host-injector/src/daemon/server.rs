//! The daemon's edge: listeners (unix sockets, vhost-device-vsock's
//! `<uds>_<port>` sockets, AF_VSOCK), one task per client connection, the
//! VM registry, and the SIGTERM drain.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::oneshot;

use super::config::{Config, DEFAULT_VSOCK_PORT, VmConfig};
use super::metrics::{self, VmSample};
use super::protocol::{self, DaemonError, ReplyHead, RequestHead};
use super::request::Policy;
use super::vm::{self, Job, Timing, VmHandle};

/// Errors starting the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Not root.
    #[error(
        "host-injector serve must run as root (euid 0), found euid {euid}: it creates the VMs' ivshmem sockets and shared memory for QEMU, and is meant to run as the system service (see host-injector/smmvmi-injector.service). Run it with sudo or through systemd"
    )]
    NotRoot {
        /// The effective uid.
        euid: u32,
    },
    /// A listener could not be bound.
    #[error("cannot listen on {what}: {source}")]
    Listen {
        /// Which listener.
        what: String,
        /// OS error.
        source: std::io::Error,
    },
    /// AF_VSOCK is not available.
    #[error(
        "cannot listen on AF_VSOCK port {port}: {source}. This host has no vsock transport for guests (load vhost_vsock: /dev/vhost-vsock is missing), so IDS VMs cannot reach the daemon over vsock; use vhost-device-vsock (vhost_vsock_uds) or a unix socket, or drop vsock_port"
    )]
    Vsock {
        /// The port.
        port: u32,
        /// OS error.
        source: nix::Error,
    },
    /// A VM could not start.
    #[error(transparent)]
    Vm(#[from] vm::VmStartError),
    /// Configuration.
    #[error(transparent)]
    Config(#[from] super::config::ConfigError),
    /// The runtime could not start.
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// The VMs, by name.
pub struct Daemon {
    config: Config,
    vms: RwLock<BTreeMap<String, Arc<VmHandle>>>,
    stopping: AtomicBool,
    started: std::time::SystemTime,
    timing: Timing,
}

impl Daemon {
    fn new(config: Config) -> Self {
        let timing = Timing {
            policy: Policy {
                grace: config.doorbell_grace(),
                reraise: config.reraise(),
            },
            qmp_timeout: Duration::from_secs(2),
        };
        Self {
            config,
            vms: RwLock::new(BTreeMap::new()),
            stopping: AtomicBool::new(false),
            started: std::time::SystemTime::now(),
            timing,
        }
    }

    fn add(&self, mut vm: VmConfig) -> Result<(), DaemonError> {
        let name = vm.name.clone();
        // A libvirt domain is named, not described: its definition says
        // the ivshmem socket and the vectors (one short virsh call).
        super::libvirt::resolve(&mut vm).map_err(|problem| DaemonError::Register {
            vm: name.clone(),
            problem,
        })?;
        vm.validate().map_err(|problem| DaemonError::Register {
            vm: name.clone(),
            problem,
        })?;
        if self.vms.read().expect("vms lock").contains_key(&name) {
            return Err(DaemonError::Register {
                vm: name,
                problem: "a VM of this name is registered; unregister it first".into(),
            });
        }
        let h = vm::start(vm, self.config.queue_depth, self.timing).map_err(|e| {
            DaemonError::Register {
                vm: name.clone(),
                problem: e.to_string(),
            }
        })?;
        tracing::info!(vm = %name, socket = %h.shared.config.ivshmem_socket.display(), "VM registered");
        self.vms
            .write()
            .expect("vms lock")
            .insert(name, Arc::new(h));
        Ok(())
    }

    fn get(&self, name: &str) -> Result<Arc<VmHandle>, DaemonError> {
        let vms = self.vms.read().expect("vms lock");
        vms.get(name)
            .cloned()
            .ok_or_else(|| DaemonError::UnknownVm {
                vm: name.to_string(),
                known: vms.keys().cloned().collect(),
            })
    }

    fn in_flight(&self) -> u64 {
        self.vms
            .read()
            .expect("vms lock")
            .values()
            .map(|v| v.shared.in_flight.load(Ordering::Relaxed))
            .sum()
    }

    /// Status JSON.
    pub fn status(&self) -> serde_json::Value {
        let vms: Vec<_> = self
            .vms
            .read()
            .expect("vms lock")
            .values()
            .map(|v| v.shared.status_json())
            .collect();
        serde_json::json!({
            "daemon": {
                "pid": std::process::id(),
                "version": env!("CARGO_PKG_VERSION"),
                "started_unix": self.started.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
                "socket": self.config.socket,
                "vsock_port": self.config.vsock_port,
                "stopping": self.stopping.load(Ordering::Relaxed),
                "queue_depth": self.config.queue_depth,
            },
            "vms": vms,
        })
    }

    /// Prometheus text.
    pub fn metrics(&self) -> String {
        let vms = self.vms.read().expect("vms lock");
        let rearms: Vec<u64> = vms
            .values()
            .map(|v| {
                v.shared
                    .header_view()
                    .map(|h| h.doorbell_rearms)
                    .unwrap_or(0)
            })
            .collect();
        let samples: Vec<VmSample<'_>> = vms
            .values()
            .zip(&rearms)
            .map(|(v, r)| VmSample {
                vm: &v.shared.config.name,
                metrics: &v.shared.metrics,
                rearms: *r,
                qemu_connected: v.shared.peer.borrow().is_some(),
            })
            .collect();
        metrics::render(&samples)
    }

    async fn transact(
        &self,
        vm: &str,
        target: crate::backend::Target,
        smi: protocol::SmiPath,
        deadline_ms: u64,
        frame: Vec<u8>,
    ) -> Result<(protocol::TransactInfo, Vec<u8>), DaemonError> {
        if self.stopping.load(Ordering::Relaxed) {
            return Err(DaemonError::ShuttingDown);
        }
        let h = self.get(vm)?;
        let received = Instant::now();
        let deadline_ms = deadline_ms.clamp(1, self.config.max_deadline_ms);
        let (tx, rx) = oneshot::channel();
        let job = Job {
            frame,
            target,
            smi,
            received,
            deadline: received + Duration::from_millis(deadline_ms),
            reply: tx,
        };
        h.shared.in_flight.fetch_add(1, Ordering::Relaxed);
        if h.queue.try_send(job).is_err() {
            h.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
            let e = DaemonError::Busy {
                vm: vm.to_string(),
                capacity: self.config.queue_depth,
            };
            h.shared.metrics.count_error(&e);
            return Err(e);
        }
        // The worker answers by the deadline; the margin covers the queue
        // (each queued request before us is itself bounded) — but never wait
        // unbounded: queue_depth × max deadline is the worst case.
        let bound = Duration::from_millis(self.config.max_deadline_ms)
            * (self.config.queue_depth as u32 + 1);
        match tokio::time::timeout(bound, rx).await {
            Ok(Ok(r)) => r,
            _ => Err(DaemonError::NotReady {
                vm: vm.to_string(),
                reason: "the VM's worker stopped (VM unregistered or daemon stopping)".into(),
            }),
        }
    }
}

/// Who is on the other end of a connection.
#[derive(Clone, Copy, Debug)]
enum Peer {
    /// A local unix client with these credentials.
    Unix { uid: Option<u32> },
    /// A vsock or vhost-device-vsock client (a VM).
    Guest,
}

/// Idle time after which a client connection is closed.
const IDLE: Duration = Duration::from_secs(300);
/// Time to receive a whole frame once its first byte arrived.
const FRAME_TIME: Duration = Duration::from_secs(10);

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(d: Arc<Daemon>, mut s: S, peer: Peer) {
    loop {
        let mut prefix = [0u8; 8];
        match tokio::time::timeout(IDLE, s.read_exact(&mut prefix[..1])).await {
            Ok(Ok(_)) => {}
            _ => return, // EOF, error or idle
        }
        let res = async {
            tokio::time::timeout(FRAME_TIME, s.read_exact(&mut prefix[1..]))
                .await
                .map_err(|_| DaemonError::Malformed {
                    problem: format!("frame prefix not complete within {FRAME_TIME:?}"),
                })?
                .map_err(|e| DaemonError::Malformed {
                    problem: format!("truncated frame prefix: {e}"),
                })?;
            let len = protocol::check_prefix(&prefix, protocol::MAX_REQUEST_BODY)?;
            let mut body = vec![0u8; len as usize];
            tokio::time::timeout(FRAME_TIME, s.read_exact(&mut body))
                .await
                .map_err(|_| DaemonError::Malformed {
                    problem: format!("frame body of {len} bytes not complete within {FRAME_TIME:?} (truncated frame)"),
                })?
                .map_err(|e| DaemonError::Malformed {
                    problem: format!("truncated frame body: {e}"),
                })?;
            let (head, payload): (RequestHead, &[u8]) = protocol::decode_body(&body)?;
            Ok::<_, DaemonError>((head, payload.to_vec()))
        }
        .await;
        let (head, payload) = match res {
            Ok(x) => x,
            Err(e) => {
                tracing::info!(error = %e, "client sent a malformed frame; closing");
                let _ = s
                    .write_all(&protocol::encode(&ReplyHead::Error { error: e }, b""))
                    .await;
                close_gracefully(&mut s).await;
                return;
            }
        };
        let (reply, out, close) = dispatch(&d, head, payload, peer).await;
        if s.write_all(&protocol::encode(&reply, &out)).await.is_err() {
            return;
        }
        if close {
            close_gracefully(&mut s).await;
            return;
        }
        if d.stopping.load(Ordering::Relaxed) {
            return;
        }
    }
}

/// Ends a connection after an error reply: half-close, then discard what
/// the client still sends (bounded), so that unread bytes do not turn the
/// close into a reset that could destroy the error reply in flight.
async fn close_gracefully<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    let _ = s.shutdown().await;
    let mut sink = [0u8; 4096];
    let until = tokio::time::Instant::now() + Duration::from_millis(500);
    let mut left = 1usize << 20;
    while left > 0 {
        match tokio::time::timeout_at(until, s.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
            _ => return,
        }
    }
}

async fn dispatch(
    d: &Daemon,
    head: RequestHead,
    payload: Vec<u8>,
    peer: Peer,
) -> (ReplyHead, Vec<u8>, bool) {
    let err = |error: DaemonError| {
        let close = matches!(
            error,
            DaemonError::UnknownVm { .. } | DaemonError::Forbidden { .. }
        );
        (ReplyHead::Error { error }, Vec::new(), close)
    };
    let local_owner = || {
        let me = nix::unistd::geteuid().as_raw();
        match peer {
            Peer::Unix { uid: Some(u) } if u == me || u == 0 => Ok(()),
            _ => Err(DaemonError::Forbidden {
                what: "registering or unregistering a VM".into(),
                uid: me,
            }),
        }
    };
    match head {
        RequestHead::Transact {
            vm,
            target,
            deadline_ms,
            smi,
        } => match d.transact(&vm, target, smi, deadline_ms, payload).await {
            Ok((info, reply)) => (ReplyHead::Transact { info }, reply, false),
            Err(e) => err(e),
        },
        RequestHead::Header { vm } => match d.get(&vm).and_then(|h| h.shared.header_view()) {
            Ok(header) => (ReplyHead::Header { header }, Vec::new(), false),
            Err(e) => err(e),
        },
        RequestHead::Status => (ReplyHead::Status { status: d.status() }, Vec::new(), false),
        RequestHead::Metrics => (ReplyHead::Metrics, d.metrics().into_bytes(), false),
        RequestHead::Register { vm } => {
            let name = vm.name.clone();
            match local_owner().and_then(|_| d.add(vm)) {
                Ok(()) => (ReplyHead::Registered { vm: name }, Vec::new(), false),
                Err(e) => err(e),
            }
        }
        RequestHead::Unregister { vm } => {
            if let Err(e) = local_owner() {
                return err(e);
            }
            let removed = d.vms.write().expect("vms lock").remove(&vm);
            match removed {
                Some(h) => {
                    // Dropping the handle joins the VM thread: off the runtime.
                    let _ = tokio::task::spawn_blocking(move || drop(h)).await;
                    tracing::info!(vm = %vm, "VM unregistered");
                    (ReplyHead::Unregistered { vm }, Vec::new(), false)
                }
                None => err(DaemonError::UnknownVm {
                    vm,
                    known: d.vms.read().expect("vms lock").keys().cloned().collect(),
                }),
            }
        }
    }
}

fn bind_unix(path: &Path) -> Result<UnixListener, ServeError> {
    let listen = |source| ServeError::Listen {
        what: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(listen)?;
    }
    // A socket file left by a dead daemon: remove it only if nobody answers.
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(listen(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another daemon answers on this socket; stop it first",
        )));
    }
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(listen)
}

/// Binds an AF_VSOCK listener on `port` (any CID).
fn bind_vsock(port: u32) -> Result<std::os::unix::net::UnixListener, ServeError> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, VsockAddr, bind, listen, socket,
    };
    let v = |source| ServeError::Vsock { port, source };
    let fd: OwnedFd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(v)?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &VsockAddr::new(libc::VMADDR_CID_ANY, port),
    )
    .map_err(v)?;
    listen(&fd, Backlog::new(64).expect("64 is a valid backlog")).map_err(v)?;
    // A listening stream socket: accept(2), read(2) and write(2) are all the
    // daemon uses, and they do not depend on the address family, so the
    // std/tokio unix-socket types carry it (addresses are never asked for).
    Ok(std::os::unix::net::UnixListener::from(fd))
}

/// Runs the daemon until SIGTERM/SIGINT; returns after the drain.
pub fn serve(config: Config) -> Result<(), ServeError> {
    let euid = nix::unistd::geteuid();
    if !euid.is_root() {
        return Err(ServeError::NotRoot {
            euid: euid.as_raw(),
        });
    }
    config.validate()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    rt.block_on(run(config))
}

async fn run(config: Config) -> Result<(), ServeError> {
    let d = Arc::new(Daemon::new(config.clone()));
    for vm in config.vm.clone() {
        let name = vm.name.clone();
        d.add(vm).map_err(|e| ServeError::Listen {
            what: format!("VM {name}"),
            source: std::io::Error::other(e.to_string()),
        })?;
    }
    let mut listeners: Vec<(UnixListener, Peer, String)> = vec![(
        bind_unix(&config.socket)?,
        Peer::Unix { uid: None },
        config.socket.display().to_string(),
    )];
    let port = config.vsock_port.unwrap_or(DEFAULT_VSOCK_PORT);
    for uds in &config.vhost_vsock_uds {
        let p = PathBuf::from(format!("{}_{port}", uds.display()));
        listeners.push((bind_unix(&p)?, Peer::Guest, p.display().to_string()));
    }
    if let Some(port) = config.vsock_port {
        let l = bind_vsock(port)?;
        if !Path::new("/dev/vhost-vsock").exists() {
            tracing::warn!(
                port,
                "listening on AF_VSOCK, but /dev/vhost-vsock is missing: no guest can reach this port (modprobe vhost_vsock, or use vhost-device-vsock via vhost_vsock_uds)"
            );
        }
        listeners.push((
            UnixListener::from_std(l).map_err(|source| ServeError::Listen {
                what: format!("vsock port {port}"),
                source,
            })?,
            Peer::Guest,
            format!("vsock:*:{port}"),
        ));
    }
    let mut accept_tasks = Vec::new();
    for (l, kind, what) in listeners {
        tracing::info!(listen = %what, "listening");
        let d = d.clone();
        accept_tasks.push(tokio::spawn(async move {
            loop {
                match l.accept().await {
                    Ok((s, _)) => {
                        let peer = match kind {
                            Peer::Unix { .. } => Peer::Unix {
                                uid: s.peer_cred().ok().map(|c| c.uid()),
                            },
                            Peer::Guest => Peer::Guest,
                        };
                        tokio::spawn(handle(d.clone(), s, peer));
                    }
                    Err(e) => {
                        tracing::warn!(listen = %what, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }));
    }
    notify_systemd_ready();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(ServeError::Runtime)?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(ServeError::Runtime)?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: finishing in-flight requests"),
        _ = int.recv() => tracing::info!("SIGINT: finishing in-flight requests"),
    }
    d.stopping.store(true, Ordering::Relaxed);
    for t in &accept_tasks {
        t.abort();
    }
    let _ = std::fs::remove_file(&config.socket);
    let drain_until = Instant::now() + Duration::from_millis(config.drain_ms);
    while d.in_flight() > 0 && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let left = d.in_flight();
    if left > 0 {
        tracing::warn!(left, "drain time over; exiting with requests in flight");
    }
    // Give connection tasks a moment to write the last replies.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let vms: Vec<_> = std::mem::take(&mut *d.vms.write().expect("vms lock"))
        .into_values()
        .collect();
    let _ = tokio::task::spawn_blocking(move || drop(vms)).await;
    tracing::info!("stopped");
    Ok(())
}

/// Tells systemd (Type=notify) that the daemon is ready, if it runs under
/// systemd; a no-op otherwise.
fn notify_systemd_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = PathBuf::from(path);
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    if let Err(e) = sock.send_to(b"READY=1", &path) {
        tracing::warn!(error = %e, "sd_notify READY=1 failed");
    }
}
