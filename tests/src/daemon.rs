//! The host-injector daemon for VMs of the harness: started on demand (one
//! per user, socket under `.cache/injector/`), or spawned by a test that
//! kills and restarts it.
//!
//! VMs booted through the daemon keep a file-backed mailbox (the daemon's
//! `mailbox_file`, at the VM state dir's `mailbox`): suites that read the
//! mailbox file directly keep working, and a restarted daemon serves a
//! running VM again over QMP from the same file. QEMU gets a second QMP
//! socket (`qmp-daemon.sock`) for the daemon, so the harness keeps its own.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use host_injector::daemon::client::{DaemonAddr, DaemonClient};

/// Errors starting or reaching the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Building the binary failed.
    #[error("building host-injector failed: {0} (run `cargo build -p host-injector` to see why)")]
    Build(String),
    /// Spawning failed.
    #[error("starting {binary}: {source}")]
    Spawn {
        /// The binary.
        binary: String,
        /// OS error.
        source: std::io::Error,
    },
    /// It did not answer in time.
    #[error("the daemon did not answer on {socket} within {timeout:?}; see {log}")]
    NotAnswering {
        /// Socket.
        socket: String,
        /// Wait.
        timeout: Duration,
        /// Its log.
        log: String,
    },
    /// Registration failed.
    #[error(transparent)]
    Client(#[from] host_injector::daemon::client::ClientError),
}

/// The per-user daemon socket of this checkout.
pub fn default_socket() -> PathBuf {
    crate::repo_root().join(".cache/injector/injector.sock")
}

/// The host-injector binary, built if needed (debug profile).
pub fn binary() -> Result<PathBuf, DaemonError> {
    let root = crate::repo_root();
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "-q",
            "-p",
            "host-injector",
            "--bin",
            "host-injector",
        ])
        .current_dir(&root)
        .status()
        .map_err(|e| DaemonError::Build(e.to_string()))?;
    if !status.success() {
        return Err(DaemonError::Build(status.to_string()));
    }
    Ok(root.join("target/debug/host-injector"))
}

/// True if a daemon answers on `socket`.
pub fn answers(socket: &Path) -> bool {
    DaemonClient::connect(
        &DaemonAddr::Unix(socket.to_path_buf()),
        Duration::from_secs(2),
    )
    .and_then(|mut c| c.status())
    .is_ok()
}

/// A daemon process this process started.
pub struct DaemonProcess {
    /// Its client socket.
    pub socket: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    child: Option<Child>,
}

impl DaemonProcess {
    /// Spawns `host-injector serve --socket SOCKET` (plus `extra` args), with
    /// its log next to the socket; waits until it answers (bounded).
    /// `detached`: own session, outlives this process.
    pub fn spawn(socket: &Path, extra: &[&str], detached: bool) -> Result<Self, DaemonError> {
        let bin = binary()?;
        let dir = socket.parent().unwrap_or(Path::new("/tmp"));
        let _ = std::fs::create_dir_all(dir);
        let log = dir.join(format!(
            "{}.log",
            socket
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("daemon")
        ));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|source| DaemonError::Spawn {
                binary: log.display().to_string(),
                source,
            })?;
        let err = out.try_clone().map_err(|source| DaemonError::Spawn {
            binary: log.display().to_string(),
            source,
        })?;
        let mut cmd = Command::new(&bin);
        cmd.arg("serve")
            .arg("--socket")
            .arg(socket)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if detached {
            crate::vm::new_session(&mut cmd);
        }
        let child = cmd.spawn().map_err(|source| DaemonError::Spawn {
            binary: bin.display().to_string(),
            source,
        })?;
        let mut p = Self {
            socket: socket.to_path_buf(),
            log,
            child: Some(child),
        };
        let timeout = Duration::from_secs(20);
        let until = Instant::now() + timeout;
        while !answers(socket) {
            if Instant::now() > until || !p.is_running() {
                return Err(DaemonError::NotAnswering {
                    socket: socket.display().to_string(),
                    timeout,
                    log: p.log.display().to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if detached {
            p.child = None;
        }
        Ok(p)
    }

    /// The daemon's pid, if this process started it.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// True while it runs.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => answers(&self.socket),
        }
    }

    /// Sends `signal` and waits (bounded) for the exit; returns its status.
    pub fn signal_and_wait(
        &mut self,
        signal: i32,
        timeout: Duration,
    ) -> Option<std::process::ExitStatus> {
        let c = self.child.as_mut()?;
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(c.id() as i32, signal) };
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if let Ok(Some(st)) = c.try_wait() {
                self.child = None;
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// The client address.
    pub fn addr(&self) -> DaemonAddr {
        DaemonAddr::Unix(self.socket.clone())
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The per-user daemon: reuses one that answers, else starts one detached.
pub fn ensure_default() -> Result<PathBuf, DaemonError> {
    let socket = default_socket();
    if !answers(&socket) {
        // IDS VMs of this checkout reach it over vhost-device-vsock.
        let uds = crate::ids_vm::daemon_vsock_uds();
        let uds = uds.to_string_lossy();
        DaemonProcess::spawn(&socket, &["--vhost-vsock-uds", &uds], true)?;
    }
    Ok(socket)
}
