//! `ids`: the IDS command line. `ids --connect ENDPOINT banner` prints the
//! guest kernel's version banner read from guest memory by the SMM agent.

use std::time::Duration;

use clap::{Parser, Subcommand};
use ids::kernel::{self, BannerSearch};
use ids::{Endpoint, Session};
use smmvmi_mailbox::wire::{AddressSpace, Pti};

/// Introspect a VM through its SMM agent.
#[derive(Parser)]
#[command(name = "ids", version, about)]
struct Cli {
    /// Through the daemon: `unix:PATH#VM` or `vsock:CID:PORT#VM` (with
    /// --key, or `,key=PATH` appended). Directly: `qmp=PATH,mailbox=PATH,key=PATH`,
    /// or a VM state directory holding qmp.sock, mailbox and key
    /// (`cargo xtask vm up` prints the endpoint).
    #[arg(long, value_name = "ENDPOINT")]
    connect: Endpoint,
    /// The 32-byte key shared with the agent (daemon endpoints).
    #[arg(long, value_name = "PATH")]
    key: Option<std::path::PathBuf>,
    /// Deadline of one request in milliseconds (a silent agent is an alert).
    #[arg(long, default_value_t = 10_000)]
    deadline_ms: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the guest kernel's version banner (the /proc/version text).
    Banner {
        /// Also print where it was found and how much was read (stderr).
        #[arg(long)]
        verbose: bool,
        /// Most bytes searched after LSTAR.
        #[arg(long, default_value_t = 64 << 20)]
        limit: u64,
    },
    /// Print the agent's INFO (version, CPUs, RAM map, SMRAM, limits).
    Info,
    /// Hex dump of guest-virtual memory (kernel address space of a CPU).
    ReadVirt {
        /// Address (0x.. or decimal).
        #[arg(value_parser = parse_u64)]
        addr: u64,
        /// Length in bytes.
        #[arg(value_parser = parse_u64)]
        len: u64,
        /// CPU whose page tables are used.
        #[arg(long, default_value_t = 0)]
        cpu: u32,
        /// Use CR3 as saved instead of PTI's kernel half.
        #[arg(long)]
        as_is: bool,
    },
    /// Hex dump of guest-physical memory.
    ReadPhys {
        /// Address.
        #[arg(value_parser = parse_u64)]
        addr: u64,
        /// Length in bytes.
        #[arg(value_parser = parse_u64)]
        len: u64,
    },
    /// Registers and MSRs of one CPU as the agent saw them in SMM.
    CpuState {
        /// CPU index.
        cpu: u32,
    },
}

fn parse_u64(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16),
        None => s.replace('_', "").parse(),
    };
    r.map_err(|e| format!("expected a number (0x.. or decimal), found {s:?}: {e}"))
}

/// Most bytes the dump commands read (a CLI guard, not a protocol limit).
const MAX_DUMP: u64 = 64 << 20;

fn hexdump(base: u64, data: &[u8]) {
    for (i, line) in data.chunks(16).enumerate() {
        let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
        let ascii: String = line
            .iter()
            .map(|&b| {
                if (0x20..0x7f).contains(&b) {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        println!(
            "{:016x}  {:<47}  |{ascii}|",
            base + 16 * i as u64,
            hex.join(" ")
        );
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let endpoint = cli.connect.with_key(cli.key);
    let mut s = Session::connect(&endpoint, Duration::from_millis(cli.deadline_ms))?;
    match cli.command {
        Command::Banner { verbose, limit } => {
            let b = kernel::find_banner(
                &mut s,
                BannerSearch {
                    limit,
                    ..Default::default()
                },
            )?;
            print!("{}", b.text);
            if verbose {
                eprintln!(
                    "banner at {:#x} (LSTAR {:#x}); {} requests, {:#x} bytes read",
                    b.addr, b.lstar, b.requests, b.bytes_read
                );
                for (addr, text) in &b.others {
                    eprint!("  skipped candidate at {addr:#x}: {text}");
                }
            }
        }
        Command::Info => {
            let info = s.info()?;
            if !info.authenticated {
                println!("WARNING: plain INFO of an unprovisioned agent; it proves nothing");
            }
            let h = &info.header;
            println!(
                "agent version {}.{}",
                h.agent_version >> 16,
                h.agent_version & 0xffff
            );
            println!("cpus {}", h.cpu_count);
            println!("max read {:#x} bytes", h.max_read);
            println!("smram base {:#x} size {:#x}", h.smram_base, h.smram_size);
            println!("sev flags {:#x} c-bit {}", h.sev_flags, h.c_bit);
            for r in &info.ram {
                println!("ram {:#014x}..{:#014x}", r.base, r.base + r.len);
            }
            for (i, c) in info.cpus.iter().enumerate() {
                println!(
                    "cpu {i}: paging levels {} flags {:#x}",
                    c.paging_levels, c.flags
                );
            }
        }
        Command::ReadVirt {
            addr,
            len,
            cpu,
            as_is,
        } => {
            anyhow::ensure!(
                len <= MAX_DUMP,
                "LEN must be at most {MAX_DUMP:#x}, found {len:#x}"
            );
            let space = AddressSpace {
                cpu,
                cr3: None,
                pti: if as_is { Pti::AsIs } else { Pti::Kernel },
            };
            hexdump(addr, &s.read_virt(space, addr, len as usize)?);
        }
        Command::ReadPhys { addr, len } => {
            anyhow::ensure!(
                len <= MAX_DUMP,
                "LEN must be at most {MAX_DUMP:#x}, found {len:#x}"
            );
            hexdump(addr, &s.read_phys(addr, len as usize)?);
        }
        Command::CpuState { cpu } => {
            let st = s.cpu_state(cpu)?;
            println!("{st:#x?}");
            println!("paging levels {}", st.paging_levels());
        }
    }
    Ok(())
}
