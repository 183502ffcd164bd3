//! `host-injector`: the root daemon (`serve`), its status and metrics, a
//! host check (`doctor`), and a host admin's tools over one VM's mailbox
//! file (`status --mailbox`, `smi`).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use host_injector::daemon::client::{DaemonAddr, DaemonClient};
use host_injector::daemon::config::Config;
use host_injector::{Injector, MailboxFile, QmpSmi};

/// Host side of smmvmi: serve IDS clients, raise SMIs, inspect mailboxes.
#[derive(Parser)]
#[command(name = "host-injector", version, about)]
struct Cli {
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
        /// Unix socket for clients (overrides the file).
        #[arg(long)]
        socket: Option<PathBuf>,
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
        /// Daemon address (unix:PATH or vsock:CID:PORT, or a bare path).
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Read this mailbox file instead of asking the daemon.
        #[arg(long)]
        mailbox: Option<PathBuf>,
    },
    /// Prometheus text exposition (asks the daemon).
    Metrics {
        /// Daemon address.
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: String,
    },
    /// What this host can do: KVM, KVM_CAP_X86_SMM, SEV, vhost-vsock, QEMU
    /// version and the patched `inject-smi` command.
    Doctor {
        /// JSON output.
        #[arg(long)]
        json: bool,
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            socket,
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
                Some(p) => Config::load(&p)?,
                None => Config::default(),
            };
            if let Some(s) = socket {
                c.socket = s;
            }
            if vsock_port.is_some() {
                c.vsock_port = vsock_port;
            }
            c.vhost_vsock_uds.extend(vhost_vsock_uds);
            if let Some(q) = queue_depth {
                c.queue_depth = q;
            }
            host_injector::daemon::server::serve(c)?;
        }
        Command::Status {
            socket,
            json,
            mailbox,
        } => {
            if let Some(m) = mailbox {
                let mailbox = MailboxFile::open(&m)?;
                println!("{}", mailbox.header()?.summary());
                return Ok(());
            }
            let status =
                DaemonClient::connect(&addr(&socket)?, Duration::from_secs(10))?.status()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
        }
        Command::Metrics { socket } => {
            print!(
                "{}",
                DaemonClient::connect(&addr(&socket)?, Duration::from_secs(10))?.metrics()?
            );
        }
        Command::Doctor { json, qemu } => {
            let checks = host_injector::doctor::run(&qemu);
            if json {
                println!("{}", serde_json::to_string_pretty(&checks)?);
            } else {
                for c in checks {
                    println!(
                        "{:<16} {:<4} {}",
                        c.name,
                        if c.ok { "yes" } else { "no" },
                        c.detail
                    );
                }
            }
        }
        Command::Smi { mailbox, qmp } => {
            let mailbox = MailboxFile::open(&mailbox)?;
            let smi = QmpSmi::connect(&qmp, Duration::from_secs(10))?;
            Injector::new(mailbox, Box::new(smi)).raise_smi()?;
            println!("SMI raised");
        }
    }
    Ok(())
}

fn print_status(s: &serde_json::Value) {
    let d = &s["daemon"];
    println!(
        "daemon pid {} version {} socket {}{}",
        d["pid"],
        d["version"].as_str().unwrap_or("?"),
        d["socket"].as_str().unwrap_or("?"),
        if d["stopping"] == true {
            " (stopping)"
        } else {
            ""
        }
    );
    for vm in s["vms"].as_array().into_iter().flatten() {
        let qemu = if vm["qemu"].is_null() {
            format!(
                "QEMU not connected: {}",
                vm["qemu_gone"].as_str().unwrap_or("?")
            )
        } else {
            format!("QEMU peer {}", vm["qemu"]["peer_id"])
        };
        println!("VM {}: {qemu}", vm["name"].as_str().unwrap_or("?"));
        println!("  served: {}", vm["serving"].as_str().unwrap_or("?"));
        let lv = &vm["libvirt"];
        if !lv.is_null() {
            println!(
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
            );
            if let Some(p) = lv["problem"].as_str() {
                println!("  libvirt problem: {p}");
            }
        }
        println!(
            "  qmp {}  in flight {}",
            if vm["qmp_connected"] == true {
                "connected"
            } else {
                "not connected"
            },
            vm["in_flight"]
        );
        if let Some(g) = vm["monitor_smis_stopped"].as_str() {
            println!("  monitor SMIs stopped: {g}");
        }
        if let Some(a) = vm["agent"]["summary"].as_str() {
            println!("  agent (untrusted header): {a}");
        }
        println!("  counters {}", vm["counters"]);
        if let Some(e) = vm["last_error"].as_str() {
            println!("  last error: {e}");
        }
    }
}
