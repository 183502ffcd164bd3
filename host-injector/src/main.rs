//! `host-injector`: for now a host admin's tool over one VM's mailbox
//! (`status`, `smi`); the daemon serving IDS clients comes later.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use host_injector::{Injector, MailboxFile, QmpSmi};

/// Host side of smmvmi: inspect a VM's mailbox, raise SMIs.
#[derive(Parser)]
#[command(name = "host-injector", version, about)]
struct Cli {
    /// The VM's mailbox file (ivshmem backing file).
    #[arg(long)]
    mailbox: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the mailbox header (untrusted: as the guest or agent left it).
    Status,
    /// Raise one SMI over QMP (only if the agent says it is ready).
    Smi {
        /// The VM's QMP socket.
        #[arg(long)]
        qmp: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mailbox = MailboxFile::open(&cli.mailbox)?;
    match cli.command {
        Command::Status => println!("{}", mailbox.header()?.summary()),
        Command::Smi { qmp } => {
            let smi = QmpSmi::connect(&qmp, Duration::from_secs(10))?;
            Injector::new(mailbox, Box::new(smi)).raise_smi()?;
            println!("SMI raised");
        }
    }
    Ok(())
}
