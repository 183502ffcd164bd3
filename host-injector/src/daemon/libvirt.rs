//! VMs managed by libvirt. libvirt owns the domain's QMP monitor (QEMU
//! serves one client per monitor socket, and libvirt must stay that
//! client), so the daemon never opens it: where it needs the monitor it goes
//! through libvirt with `virsh` — `qemu-monitor-command --hmp` for a monitor
//! SMI (the first SMI after a boot and the fallback), `qemu-monitor-event`
//! for QEMU's RESET and SHUTDOWN events (they stop monitor SMIs), and
//! `event --all` for the domain's lifecycle (started, stopped, destroyed,
//! redefined, undefined, migrated), which the VM's status reports.
//!
//! Why `virsh` and not the libvirt C library (`virt` crate): it needs no
//! libvirt headers at build time and no FFI, every call is bounded by a
//! timeout here, and a libvirtd restart only ends a child process, which
//! the daemon starts again. The price is a process per monitor SMI (tens of
//! milliseconds), paid only on the first SMI after a boot and on fallbacks:
//! the doorbell (an eventfd write) stays the hot path.
//!
//! What it trusts: libvirt's answers about the domain (the host's own
//! management stack). What it must never do: connect to the domain's
//! monitor socket; raise a monitor SMI while the domain is not running.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};

use super::config::{LibvirtDomain, VmConfig};
use super::qmp::Event;

/// The libvirt command-line client.
pub const VIRSH: &str = "virsh";
/// Deadline of one `virsh` call.
pub const VIRSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors talking to libvirt.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    /// `virsh` cannot be started.
    #[error(
        "cannot run {VIRSH}: {0} (install Debian's libvirt-clients; the daemon reaches libvirt-managed VMs through it)"
    )]
    Spawn(std::io::Error),
    /// `virsh` answered with an error.
    #[error("`virsh -c {uri} {args}` failed: {stderr}")]
    Virsh {
        /// Connection URI.
        uri: String,
        /// Arguments.
        args: String,
        /// What virsh said.
        stderr: String,
    },
    /// `virsh` did not finish in time.
    #[error(
        "`virsh -c {uri} {args}` did not finish within {timeout:?}: is libvirtd running and answering on that URI?"
    )]
    Timeout {
        /// Connection URI.
        uri: String,
        /// Arguments.
        args: String,
        /// Deadline.
        timeout: Duration,
    },
    /// The domain is not running.
    #[error(
        "libvirt domain {domain} is {state}, not running: no monitor to reach (start it with `virsh start {domain}`)"
    )]
    NotRunning {
        /// Domain.
        domain: String,
        /// What `virsh domstate --reason` said.
        state: String,
    },
    /// The domain has no mailbox device.
    #[error(
        "libvirt domain {domain} has no <shmem> device of model ivshmem-doorbell with a <server path=.../>: the daemon cannot serve it. Add one whose server path is the daemon's socket for this VM (`cargo xtask vm xml NAME` writes a complete domain)"
    )]
    NoShmem {
        /// Domain.
        domain: String,
    },
}

fn command(d: &LibvirtDomain, args: &[&str]) -> Command {
    let mut c = Command::new(VIRSH);
    c.arg("-q")
        .arg("-c")
        .arg(d.uri())
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

/// Runs `virsh -c URI ARGS` with a deadline; its stdout.
pub async fn virsh(
    d: &LibvirtDomain,
    args: &[&str],
    timeout: Duration,
) -> Result<String, LibvirtError> {
    let out = command(d, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output();
    let out = tokio::time::timeout(timeout, out)
        .await
        .map_err(|_| LibvirtError::Timeout {
            uri: d.uri().to_string(),
            args: args.join(" "),
            timeout,
        })?
        .map_err(LibvirtError::Spawn)?;
    if !out.status.success() {
        return Err(LibvirtError::Virsh {
            uri: d.uri().to_string(),
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The same, blocking (registration runs outside the VM's runtime).
pub fn virsh_blocking(
    d: &LibvirtDomain,
    args: &[&str],
    timeout: Duration,
) -> Result<String, LibvirtError> {
    let mut child = std::process::Command::new(VIRSH)
        .arg("-q")
        .arg("-c")
        .arg(d.uri())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(LibvirtError::Spawn)?;
    // virsh's answers here are a few lines: they fit the pipe buffers, so
    // polling for the exit before reading cannot deadlock.
    let until = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().map_err(LibvirtError::Spawn)? {
            break st;
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            return Err(LibvirtError::Timeout {
                uri: d.uri().to_string(),
                args: args.join(" "),
                timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    use std::io::Read;
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    if !status.success() {
        return Err(LibvirtError::Virsh {
            uri: d.uri().to_string(),
            args: args.join(" "),
            stderr: err.trim().to_string(),
        });
    }
    Ok(out)
}

/// The mailbox device of a domain definition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShmemDevice {
    /// `<server path=.../>`: the daemon's ivshmem socket for this VM.
    pub server: PathBuf,
    /// `<msi vectors=.../>`.
    pub vectors: Option<u16>,
}

const SHMEM_XPATH: &str = "//devices/shmem[model/@type='ivshmem-doorbell']";

/// The domain's `ivshmem-doorbell` `<shmem>` device, from its persistent
/// definition (`virsh dumpxml --inactive --xpath`, libvirt ≥ 8.9).
pub fn shmem_device(d: &LibvirtDomain) -> Result<ShmemDevice, LibvirtError> {
    let q = |what: &str| {
        virsh_blocking(
            d,
            &[
                "dumpxml",
                "--inactive",
                &d.domain,
                "--xpath",
                &format!("{SHMEM_XPATH}/{what}"),
            ],
            VIRSH_TIMEOUT,
        )
    };
    let server = xpath_attribute(&q("server/@path")?, "path").ok_or(LibvirtError::NoShmem {
        domain: d.domain.clone(),
    })?;
    let vectors = xpath_attribute(&q("msi/@vectors")?, "vectors").and_then(|v| v.parse().ok());
    Ok(ShmemDevice {
        server: PathBuf::from(server),
        vectors,
    })
}

/// The value of the first `name="value"` virsh prints for an attribute
/// XPath (XML-escaped, as libvirt writes it).
pub fn xpath_attribute(output: &str, name: &str) -> Option<String> {
    let start = output.find(&format!("{name}=\""))? + name.len() + 2;
    let rest = &output[start..];
    let end = rest.find('"')?;
    Some(
        rest[..end]
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&"),
    )
}

/// Fills a libvirt VM's `ivshmem_socket` and `vectors` from its domain
/// definition when the configuration leaves the socket out. A VM entry
/// that gives the socket needs no libvirtd at registration (the daemon
/// starts before libvirtd, whose autostarted domains need the daemon's
/// socket): its definition is checked against it once the daemon follows
/// the domain, and a mismatch is reported in the VM's status.
pub fn resolve(vm: &mut VmConfig) -> Result<(), String> {
    let Some(d) = vm.libvirt.clone() else {
        return Ok(());
    };
    if !vm.ivshmem_socket.as_os_str().is_empty() {
        return Ok(());
    }
    let dev = shmem_device(&d).map_err(|e| {
        format!(
            "{e}; to register it before libvirtd runs, give ivshmem_socket and vectors in its entry"
        )
    })?;
    vm.ivshmem_socket = dev.server;
    if let Some(v) = dev.vectors {
        vm.vectors = v;
    }
    Ok(())
}

/// Whether the domain's definition still sends QEMU to `ours`: `None` if
/// so, else what an operator must fix.
async fn definition_problem(
    d: &LibvirtDomain,
    ours: &Path,
    now: u64,
    what: &str,
) -> Option<String> {
    let d2 = d.clone();
    match tokio::task::spawn_blocking(move || shmem_device(&d2)).await {
        Ok(Ok(dev)) if dev.server == ours => None,
        Ok(Ok(dev)) => Some(format!(
            "{what} at unix time {now}: its <shmem> server path is {}, not this daemon's {}; the next start will not reach this daemon. Unregister and register the VM again, or restore the path",
            dev.server.display(),
            ours.display()
        )),
        Ok(Err(e)) => Some(format!("{what} at unix time {now}: {e}")),
        Err(e) => Some(format!(
            "{what} at unix time {now}: checking it failed: {e}"
        )),
    }
}

/// What the daemon knows of a domain's lifecycle (for `status`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct DomainStatus {
    /// The domain.
    pub domain: String,
    /// The connection URI.
    pub uri: String,
    /// Last known state (`virsh domstate --reason`, then lifecycle events).
    pub state: String,
    /// QEMU runs (started, paused or running).
    pub running: bool,
    /// Whether the daemon is subscribed to the domain's events now.
    pub events_connected: bool,
    /// The last lifecycle event and when (unix seconds).
    pub last_event: Option<String>,
    /// Unix time of `last_event`.
    pub last_event_unix: u64,
    /// Something an operator must act on (redefined, undefined, migrated).
    pub problem: Option<String>,
}

/// Shared between the lifecycle follower, the monitor and `status`.
pub type SharedStatus = Arc<Mutex<DomainStatus>>;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One line of `virsh event --loop`: `event 'NAME' for domain 'DOM': DETAIL`.
fn parse_lifecycle(line: &str) -> Option<(String, String)> {
    let rest = line.trim().strip_prefix("event '")?;
    let (name, rest) = rest.split_once('\'')?;
    let detail = rest.split_once("': ").map(|(_, d)| d.trim()).unwrap_or("");
    Some((name.to_string(), detail.to_string()))
}

/// One line of `virsh qemu-monitor-event --loop`:
/// `event NAME at SECONDS.MICROS for domain 'DOM': DATA`.
pub fn parse_monitor_event(line: &str) -> Option<String> {
    let rest = line.trim().strip_prefix("event ")?;
    let name = rest.split_whitespace().next()?;
    Some(name.to_string())
}

/// Applies one lifecycle event to the status; `ours` is the daemon's
/// ivshmem socket for this VM (a redefinition is checked against it).
async fn apply_lifecycle(
    d: &LibvirtDomain,
    ours: &Path,
    status: &SharedStatus,
    kind: &str,
    detail: &str,
) {
    let mut first = detail.split_whitespace();
    let state = first.next().unwrap_or("");
    let reason = first.next().unwrap_or("");
    let mut problem_update: Option<Option<String>> = None;
    let now = unix_now();
    if kind == "lifecycle" {
        match state {
            "Started" | "Resumed" | "Suspended" => problem_update = Some(None),
            "Stopped" if reason == "Migrated" => {
                problem_update = Some(Some(format!(
                    "migrated away from this host at unix time {now}: this daemon cannot serve it any more; the destination host's daemon must (register the domain there before migrating)"
                )))
            }
            "Undefined" => {
                problem_update = Some(Some(format!(
                    "undefined in libvirt at unix time {now}: define it again, or unregister this VM from the daemon"
                )))
            }
            "Defined" => {
                problem_update = Some(definition_problem(d, ours, now, "redefined").await);
            }
            _ => {}
        }
    }
    let mut s = status.lock().expect("libvirt status lock");
    if kind == "lifecycle" {
        match state {
            "Started" | "Resumed" => {
                s.running = true;
                s.state = "running".into();
            }
            "Suspended" => {
                s.running = true;
                s.state = "paused".into();
            }
            "Stopped" => {
                s.running = false;
                s.state = format!("shut off ({})", reason.to_lowercase());
            }
            "Undefined" => {
                s.running = false;
                s.state = "undefined".into();
            }
            _ => {}
        }
    }
    s.last_event = Some(format!("{kind} {detail}").trim().to_string());
    s.last_event_unix = now;
    if let Some(p) = problem_update {
        // A start after a redefinition keeps the redefinition finding; only
        // a new definition settles it.
        let keep = state != "Defined"
            && p.is_none()
            && s.problem
                .as_deref()
                .is_some_and(|x| x.starts_with("redefined") || x.starts_with("definition checked"));
        if !keep {
            s.problem = p;
        }
    }
}

/// Reads `virsh domstate --reason` into the status.
async fn refresh_state(d: &LibvirtDomain, status: &SharedStatus) {
    let r = virsh(d, &["domstate", "--reason", &d.domain], VIRSH_TIMEOUT).await;
    let mut s = status.lock().expect("libvirt status lock");
    match r {
        Ok(out) => {
            let state = out.trim().to_string();
            s.running = state.starts_with("running")
                || state.starts_with("paused")
                || state.starts_with("in shutdown")
                || state.starts_with("pmsuspended");
            s.state = state;
        }
        Err(e) => {
            s.running = false;
            s.state = format!("unknown: {e}");
        }
    }
}

/// Follows the domain's lifecycle events for as long as the VM is
/// registered: one `virsh event --loop --all` at a time, started again
/// (after re-reading the state) whenever it ends — a libvirtd restart ends
/// it.
pub async fn follow_lifecycle(d: LibvirtDomain, ours: PathBuf, status: SharedStatus) {
    loop {
        refresh_state(&d, &status).await;
        let child = command(&d, &["event", "--domain", &d.domain, "--loop", "--all"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn();
        match child {
            Ok(mut child) => {
                let out = child.stdout.take().expect("piped");
                // Events that happened between domstate and the subscription
                // are covered by reading the state once more right after it.
                let mut lines = BufReader::new(out).lines();
                let started = Instant::now();
                let mut subscribed = false;
                loop {
                    let next =
                        tokio::time::timeout(Duration::from_millis(300), lines.next_line()).await;
                    match next {
                        Err(_) => {
                            if !subscribed {
                                subscribed = true;
                                status.lock().expect("lock").events_connected = true;
                                refresh_state(&d, &status).await;
                                // Registered before libvirtd ran, or
                                // redefined while nobody listened.
                                let p =
                                    definition_problem(&d, &ours, unix_now(), "definition checked")
                                        .await;
                                let mut s = status.lock().expect("lock");
                                if p.is_some()
                                    || s.problem.as_deref().is_some_and(|x| {
                                        x.starts_with("definition checked")
                                            || x.starts_with("redefined")
                                    })
                                {
                                    s.problem = p;
                                }
                            }
                        }
                        Ok(Ok(Some(line))) => {
                            if let Some((kind, detail)) = parse_lifecycle(&line) {
                                tracing::info!(domain = %d.domain, event = %kind, detail = %detail, "libvirt event");
                                apply_lifecycle(&d, &ours, &status, &kind, &detail).await;
                            }
                        }
                        Ok(_) => break,
                    }
                }
                let _ = child.kill().await;
                status.lock().expect("lock").events_connected = false;
                tracing::warn!(domain = %d.domain, after = ?started.elapsed(), "libvirt event stream ended (libvirtd restarted or stopped?); subscribing again");
            }
            Err(e) => {
                tracing::error!(domain = %d.domain, error = %e, "cannot run virsh event");
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The domain's monitor, reached through libvirt.
pub struct DomainMonitor {
    domain: LibvirtDomain,
    timeout: Duration,
    status: SharedStatus,
    closed: oneshot::Receiver<()>,
    _events: tokio::task::JoinHandle<()>,
}

impl DomainMonitor {
    /// Checks that the domain runs and subscribes to its QEMU events
    /// (`virsh qemu-monitor-event --loop`); events go to `events`.
    pub async fn connect(
        domain: LibvirtDomain,
        timeout: Duration,
        events: mpsc::UnboundedSender<Event>,
        status: SharedStatus,
    ) -> Result<Self, LibvirtError> {
        refresh_state(&domain, &status).await;
        {
            let s = status.lock().expect("lock");
            if !s.running {
                return Err(LibvirtError::NotRunning {
                    domain: domain.domain.clone(),
                    state: s.state.clone(),
                });
            }
        }
        let mut child: Child = command(
            &domain,
            &["qemu-monitor-event", "--domain", &domain.domain, "--loop"],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(LibvirtError::Spawn)?;
        let out = child.stdout.take().expect("piped");
        let (closed_tx, closed) = oneshot::channel();
        let name = domain.domain.clone();
        let task = tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(ev) = parse_monitor_event(&line) {
                    tracing::debug!(domain = %name, event = %ev, "QEMU event through libvirt");
                    let _ = events.send(Event(ev));
                }
            }
            let _ = child.kill().await;
            let _ = closed_tx.send(());
        });
        Ok(Self {
            domain,
            timeout,
            status,
            closed,
            _events: task,
        })
    }

    /// True once the event subscription ended or the domain stopped.
    pub fn is_closed(&mut self) -> bool {
        !matches!(
            self.closed.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ) || !self.status.lock().expect("lock").running
    }

    /// A QMP command through libvirt (`virsh qemu-monitor-command` in its
    /// JSON mode): its `return` value, or QEMU's error as
    /// [`QmpError::Command`].
    pub async fn qmp(
        &mut self,
        command: &str,
        args: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, crate::qmp::QmpError> {
        use crate::qmp::QmpError;
        let mut req = serde_json::json!({ "execute": command });
        if let Some(a) = args {
            req["arguments"] = a;
        }
        let text = req.to_string();
        let out = virsh(
            &self.domain,
            &["qemu-monitor-command", &self.domain.domain, &text],
            self.timeout,
        )
        .await
        .map_err(|e| QmpError::BadReply(format!("through libvirt: {e}")))?;
        let v: serde_json::Value = serde_json::from_str(out.trim())
            .map_err(|_| QmpError::BadReply(out.trim().to_string()))?;
        if let Some(e) = v.get("error") {
            return Err(QmpError::Command {
                command: command.to_string(),
                class: e["class"].as_str().unwrap_or("?").to_string(),
                desc: e["desc"].as_str().unwrap_or("?").to_string(),
            });
        }
        Ok(v.get("return").cloned().unwrap_or(serde_json::Value::Null))
    }

    /// A human monitor command line through libvirt; its text output.
    pub async fn hmp(&mut self, command_line: &str) -> Result<String, LibvirtError> {
        virsh(
            &self.domain,
            &[
                "qemu-monitor-command",
                &self.domain.domain,
                "--hmp",
                command_line,
            ],
            self.timeout,
        )
        .await
    }
}

impl Drop for DomainMonitor {
    fn drop(&mut self) {
        self._events.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_virsh_output() {
        assert_eq!(
            xpath_attribute(" path=\"/run/a&amp;b.sock\"\n", "path").as_deref(),
            Some("/run/a&b.sock")
        );
        assert_eq!(xpath_attribute("", "path"), None);
        assert_eq!(
            parse_monitor_event(
                "event RESET at 1701359000.123456 for domain 'mon1': {\"guest\":true}"
            )
            .as_deref(),
            Some("RESET")
        );
        assert_eq!(
            parse_lifecycle("event 'lifecycle' for domain 'mon 1': Stopped Destroyed"),
            Some(("lifecycle".into(), "Stopped Destroyed".into()))
        );
        assert_eq!(
            parse_lifecycle("event 'reboot' for domain 'mon1'"),
            Some(("reboot".into(), String::new()))
        );
        assert_eq!(parse_lifecycle("events received: 3"), None);
    }

    #[test]
    fn a_vm_entry_with_its_socket_registers_without_libvirtd() {
        let mut vm: VmConfig = toml::from_str(
            "name = \"mon1\"\nivshmem_socket = \"/run/smmvmi/mon1.ivshmem\"\nvectors = 5\n\
             libvirt = { domain = \"mon1\", uri = \"qemu:///system?socket=/nonexistent\" }\n",
        )
        .unwrap();
        resolve(&mut vm).unwrap();
        assert_eq!(vm.vectors, 5);
        vm.ivshmem_socket = PathBuf::new();
        let e = resolve(&mut vm).unwrap_err();
        assert!(e.contains("give ivshmem_socket and vectors"), "{e}");
    }

    #[tokio::test]
    async fn lifecycle_events_set_state_and_problems() {
        let d = LibvirtDomain {
            domain: "mon1".into(),
            uri: None,
        };
        let st: SharedStatus = Arc::default();
        let ours = Path::new("/run/smmvmi/mon1.ivshmem");
        apply_lifecycle(&d, ours, &st, "lifecycle", "Started Booted").await;
        assert!(st.lock().unwrap().running);
        apply_lifecycle(&d, ours, &st, "lifecycle", "Stopped Migrated").await;
        let s = st.lock().unwrap().clone();
        assert!(!s.running);
        assert_eq!(s.state, "shut off (migrated)");
        assert!(s.problem.unwrap().contains("migrated away"));
        apply_lifecycle(&d, ours, &st, "lifecycle", "Started Booted").await;
        assert!(st.lock().unwrap().problem.is_none(), "back: no problem");
        apply_lifecycle(&d, ours, &st, "lifecycle", "Stopped Destroyed").await;
        assert_eq!(st.lock().unwrap().state, "shut off (destroyed)");
        apply_lifecycle(&d, ours, &st, "lifecycle", "Undefined Removed").await;
        let s = st.lock().unwrap().clone();
        assert_eq!(s.state, "undefined");
        assert!(s.problem.unwrap().contains("undefined in libvirt"));
    }
}
