//! `host-injector`: the root daemon (`serve`), its status and metrics, a
//! host check (`doctor`), and a host admin's tools over one VM's mailbox
//! file (`status --mailbox`, `smi`).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use host_injector::daemon::client::{DaemonAddr, DaemonClient};
use host_injector::daemon::config::Config;
use host_injector::{Injector, MailboxFile, QmpSmi};

/// Host side of smmvmi: serve IDS clients, raise SMIs, inspect mailboxes.
#[derive(Parser)]
#[command(name = "host-injector", version, about)]
#[command(
    after_help = "Exit codes: 0 ok, 1 failure, 2 usage, 6 unreachable (no daemon, VM or agent).\nOptions go anywhere on the line."
)]
struct Cli {
    /// The daemon's socket (unix:PATH, vsock:CID:PORT, or a bare path);
    /// `serve` listens there.
    #[arg(
        long,
        global = true,
        env = "SMMVMI_INJECTOR_SOCKET",
        value_name = "ADDR",
        help_heading = "Global options"
    )]
    socket: Option<String>,
    /// JSON output (status, doctor).
    #[arg(long, global = true, help_heading = "Global options")]
    json: bool,
    /// On errors, also print the error chain as the code sees it.
    #[arg(long, global = true, help_heading = "Global options")]
    debug: bool,
    #[command(subcommand)]
    command: Command,
}

/// The default daemon socket.
const DEFAULT_SOCKET: &str = "/run/smmvmi/injector.sock";

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (root only): ivshmem server of each VM, SMI raiser,
    /// server of IDS clients. Stops on SIGTERM after in-flight requests.
    Serve {
        /// TOML configuration (see host-injector/daemon.example.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// AF_VSOCK port (overrides the file).
        #[arg(long)]
        vsock_port: Option<u32>,
        /// vhost-device-vsock unix socket; listens on `<PATH>_<port>`.
        #[arg(long)]
        vhost_vsock_uds: Vec<PathBuf>,
        /// Waiting requests per VM before "busy".
        #[arg(long)]
        queue_depth: Option<usize>,
    },
    /// The daemon's state (asks the daemon), or with --mailbox the header of
    /// one mailbox file (untrusted: as the guest or agent left it).
    Status {
        /// Read this mailbox file instead of asking the daemon.
        #[arg(long)]
        mailbox: Option<PathBuf>,
    },
    /// Prometheus text exposition (asks the daemon).
    Metrics,
    /// What this host can do: KVM, KVM_CAP_X86_SMM, SEV, vhost-vsock, QEMU
    /// version and the patched `inject-smi` command.
    Doctor {
        /// QEMU binary.
        #[arg(long, default_value = "qemu-system-x86_64")]
        qemu: String,
    },
    /// Raise one SMI over QMP (only if the agent says it is ready).
    Smi {
        /// The VM's mailbox file.
        #[arg(long)]
        mailbox: PathBuf,
        /// The VM's QMP socket.
        #[arg(long)]
        qmp: PathBuf,
    },
}

fn addr(s: &str) -> anyhow::Result<DaemonAddr> {
    if s.contains(':') {
        s.parse().map_err(anyhow::Error::msg)
    } else {
        Ok(DaemonAddr::Unix(PathBuf::from(s)))
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let r = run(&cli, &mut out).and_then(|()| Ok(out.flush()?));
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = out.flush();
            let mut shown: Vec<String> = Vec::new();
            for c in e.chain() {
                let t = c.to_string();
                if !shown.iter().any(|s| s.contains(&t)) {
                    shown.push(t);
                }
            }
            eprintln!("host-injector: error: {}", shown.join(": "));
            if cli.debug {
                eprintln!("debug: {e:?}");
            }
            std::process::ExitCode::from(exit_code(&e))
        }
    }
}

/// 6 when nothing answers (daemon, QMP, mailbox, agent), else 1.
fn exit_code(e: &anyhow::Error) -> u8 {
    use host_injector::daemon::client::ClientError;
    for c in e.chain() {
        if let Some(ClientError::Connect { .. }) = c.downcast_ref::<ClientError>() {
            return 6;
        }
        if let Some(host_injector::TransactError::NotReady { .. }) =
            c.downcast_ref::<host_injector::TransactError>()
        {
            return 6;
        }
        if c.downcast_ref::<host_injector::MailboxFileError>()
            .is_some()
            || c.downcast_ref::<host_injector::SmiError>().is_some()
        {
            return 6;
        }
    }
    1
}

fn run(cli: &Cli, out: &mut dyn Write) -> anyhow::Result<()> {
    let socket = cli.socket.clone().unwrap_or_else(|| DEFAULT_SOCKET.into());
    match &cli.command {
        Command::Serve {
            config,
            vsock_port,
            vhost_vsock_uds,
            queue_depth,
        } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("SMMVMI_LOG")
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .with_writer(std::io::stderr)
                .init();
            let mut c = match config {
                Some(p) => Config::load(p)?,
                None => Config::default(),
            };
            if let Some(s) = &cli.socket {
                c.socket = PathBuf::from(s.strip_prefix("unix:").unwrap_or(s));
            }
            if vsock_port.is_some() {
                c.vsock_port = *vsock_port;
            }
            c.vhost_vsock_uds.extend(vhost_vsock_uds.iter().cloned());
            if let Some(q) = queue_depth {
                c.queue_depth = *q;
            }
            host_injector::daemon::server::serve(c)?;
        }
        Command::Status { mailbox } => {
            if let Some(m) = mailbox {
                let mailbox = MailboxFile::open(m)?;
                let h = mailbox.header()?;
                writeln!(out, "{}", h.summary())?;
                if let Some(why) = h.not_ready_reason() {
                    writeln!(out, "no monitor SMI now: {why}")?;
                }
                return Ok(());
            }
            let status =
                DaemonClient::connect(&addr(&socket)?, Duration::from_secs(10))?.status()?;
            if cli.json {
                writeln!(out, "{}", serde_json::to_string_pretty(&status)?)?;
            } else {
                print_status(out, &status)?;
            }
        }
        Command::Metrics => {
            write!(
                out,
                "{}",
                DaemonClient::connect(&addr(&socket)?, Duration::from_secs(10))?.metrics()?
            )?;
        }
        Command::Doctor { qemu } => {
            let checks = host_injector::doctor::run(qemu);
            if cli.json {
                writeln!(out, "{}", serde_json::to_string_pretty(&checks)?)?;
            } else {
                for c in checks {
                    writeln!(
                        out,
                        "{:<16} {:<4} {}",
                        c.name,
                        if c.ok { "yes" } else { "no" },
                        c.detail
                    )?;
                }
            }
        }
        Command::Smi { mailbox, qmp } => {
            let mailbox = MailboxFile::open(mailbox)?;
            let smi = QmpSmi::connect(qmp, Duration::from_secs(10))?;
            Injector::new(mailbox, Box::new(smi)).raise_smi()?;
            writeln!(out, "SMI raised")?;
        }
    }
    Ok(())
}

fn print_status(out: &mut dyn Write, s: &serde_json::Value) -> std::io::Result<()> {
    let d = &s["daemon"];
    writeln!(
        out,
        "daemon pid {} version {} socket {}{}",
        d["pid"],
        d["version"].as_str().unwrap_or("?"),
        d["socket"].as_str().unwrap_or("?"),
        if d["stopping"] == true {
            " (stopping)"
        } else {
            ""
        }
    )?;
    for vm in s["vms"].as_array().into_iter().flatten() {
        let qemu = if vm["qemu"].is_null() {
            format!(
                "QEMU not connected: {}",
                vm["qemu_gone"].as_str().unwrap_or("?")
            )
        } else {
            format!("QEMU peer {}", vm["qemu"]["peer_id"])
        };
        writeln!(out, "VM {}: {qemu}", vm["name"].as_str().unwrap_or("?"))?;
        writeln!(out, "  served: {}", vm["serving"].as_str().unwrap_or("?"))?;
        let lv = &vm["libvirt"];
        if !lv.is_null() {
            writeln!(
                out,
                "  libvirt domain {} ({}): {}; events {}{}",
                lv["domain"].as_str().unwrap_or("?"),
                lv["uri"].as_str().unwrap_or("?"),
                lv["state"].as_str().unwrap_or("?"),
                if lv["events_connected"] == true {
                    "followed"
                } else {
                    "NOT followed (libvirtd down?)"
                },
                lv["last_event"]
                    .as_str()
                    .map(|e| format!("; last event: {e}"))
                    .unwrap_or_default()
            )?;
            if let Some(p) = lv["problem"].as_str() {
                writeln!(out, "  libvirt problem: {p}")?;
            }
        }
        writeln!(
            out,
            "  qmp {}  in flight {}",
            if vm["qmp_connected"] == true {
                "connected"
            } else {
                "not connected"
            },
            vm["in_flight"]
        )?;
        if let Some(g) = vm["monitor_smis_stopped"].as_str() {
            writeln!(out, "  monitor SMIs stopped: {g}")?;
        }
        if let Some(a) = vm["agent"]["summary"].as_str() {
            writeln!(out, "  agent (untrusted header): {a}")?;
        }
        writeln!(out, "  counters {}", vm["counters"])?;
        if let Some(e) = vm["last_error"].as_str() {
            writeln!(out, "  last error: {e}")?;
        }
    }
    Ok(())
}
