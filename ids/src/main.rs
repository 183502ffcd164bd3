//! `ids`: the IDS command line. `ids --connect ENDPOINT banner` prints the
//! guest kernel's version banner read from guest memory by the SMM agent;
//! `ps`, `pstree`, `lsmod`, `kallsyms`, `cpus` and `kernel` read the Linux
//! kernel with no profile (kallsyms and BTF from guest memory), from the
//! live agent or from a dump (`--dump PATH`, written by `ids dump`).

use std::time::Duration;

use clap::{Parser, Subcommand};
use ids::dump::DumpMemory;
use ids::kernel::{self, BannerSearch};
use ids::linux::{self, Discovery, Kernel};
use ids::memory::{GuestMemory, SnapshotCache};
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
    #[arg(long, value_name = "ENDPOINT", required_unless_present = "dump")]
    connect: Option<Endpoint>,
    /// The 32-byte key shared with the agent (daemon endpoints).
    #[arg(long, value_name = "PATH")]
    key: Option<std::path::PathBuf>,
    /// Read a memory dump (raw image; its sidecar is IMAGE.json) instead
    /// of a live VM (Linux commands only).
    #[arg(long, value_name = "IMAGE", conflicts_with = "connect")]
    dump: Option<std::path::PathBuf>,
    /// Output as one JSON document.
    #[arg(long, global = true)]
    json: bool,
    /// Output as one JSON object per line.
    #[arg(long, global = true, conflicts_with = "json")]
    jsonl: bool,
    /// Do not use or write the kernel cache ($XDG_CACHE_HOME/smmvmi).
    #[arg(long, global = true)]
    no_cache: bool,
    /// Print requests (SMIs), bytes and time to stderr at the end.
    #[arg(long, global = true)]
    stats: bool,
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
    /// Processes (global PIDs) as the kernel's task list holds them.
    Ps {
        /// Also list every thread.
        #[arg(long)]
        threads: bool,
    },
    /// Processes as a tree (by parent).
    Pstree,
    /// Loaded modules (as /proc/modules).
    Lsmod,
    /// Kernel symbols decoded from the guest's kallsyms (PATTERN: substring).
    Kallsyms {
        /// Only names containing this.
        pattern: Option<String>,
    },
    /// What each vCPU runs: current task, CR3, user or kernel mode.
    Cpus,
    /// The kernel: banner, kallsyms layout, symbol count, BTF size.
    Kernel,
    /// The checks plus process and module diffs, pass after pass: one ECS
    /// JSON line per event on stdout (README: "ids watch"). Exit status 3
    /// if any alert was raised, 0 if none (with --count).
    Watch {
        /// Time from one pass to the next (1s, 500ms, ...).
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// Stop after this many passes (default: run until killed).
        #[arg(long)]
        count: Option<u64>,
        /// `host.name` of the events (default: the endpoint's VM name).
        #[arg(long)]
        host_name: Option<String>,
    },
    /// Rootkit checks that need no baseline (exit status 3 when something
    /// is found, 0 when clean).
    Check {
        /// Which: `syscalls` (syscall tables and the x64_sys_call
        /// dispatcher), `idt` (every vCPU's IDT and syscall entry MSRs),
        /// `modules` (loaded modules missing from the module list),
        /// `processes` (tasks missing from the task list, or named like
        /// kernel threads), `hooks` (modules' kprobes and ftrace callbacks
        /// on syscall functions), or `all`.
        #[arg(value_enum, default_value = "all")]
        what: CheckKind,
        /// The baseline directory `ids baseline` wrote (default: this
        /// boot's, under the cache); `text` needs one, `all` uses it if it
        /// exists.
        #[arg(long, value_name = "DIR")]
        baseline: Option<std::path::PathBuf>,
    },
    /// Records the kernel's text and read-only data for `check text` (this
    /// boot only: KASLR relocates them on every boot).
    Baseline {
        /// Directory to write (default: this boot's, under the cache).
        #[arg(short, long, value_name = "DIR")]
        output: Option<std::path::PathBuf>,
    },
    /// Writes a memory dump of all guest RAM plus CPU states (IMAGE and
    /// IMAGE.json) for offline analysis with --dump.
    Dump {
        /// Image path.
        image: std::path::PathBuf,
    },
}

/// What `ids check` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum CheckKind {
    Syscalls,
    Idt,
    Modules,
    Processes,
    Hooks,
    Text,
    All,
}

/// Exit status of `ids check` when it found something.
const EXIT_FINDINGS: i32 = 3;

/// Prints rows as a table, JSON or JSON lines.
fn emit<T: serde::Serialize>(
    cli: &Cli,
    rows: &[T],
    header: &str,
    line: impl Fn(&T) -> String,
) -> anyhow::Result<()> {
    if cli.json {
        println!("{}", serde_json::to_string_pretty(rows)?);
    } else if cli.jsonl {
        for r in rows {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        println!("{header}");
        for r in rows {
            println!("{}", line(r));
        }
    }
    Ok(())
}

fn open_memory(cli: &Cli) -> anyhow::Result<Box<dyn GuestMemory>> {
    if let Some(d) = &cli.dump {
        return Ok(Box::new(DumpMemory::open(d)?));
    }
    let ep = cli
        .connect
        .as_ref()
        .expect("clap requires --connect or --dump");
    Ok(Box::new(Session::connect(
        ep,
        Duration::from_millis(cli.deadline_ms),
    )?))
}

fn run_linux(cli: &Cli) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut mem = SnapshotCache::new(open_memory(cli)?);
    let cache = if cli.no_cache {
        None
    } else {
        linux::cache_dir()
    };
    let d = Discovery {
        full_symbols: matches!(
            cli.command,
            Command::Kallsyms { .. }
                | Command::Kernel
                | Command::Check { .. }
                | Command::Baseline { .. }
        ),
        ..Discovery::default()
    };
    let k = Kernel::load(mem.inner(), &d, cache.as_deref())?;
    let loaded = started.elapsed();
    let load_requests = mem.inner().stats().requests;
    match &cli.command {
        Command::Ps { threads } => {
            let tasks = linux::ps(&mut mem, &k, 0, *threads)?;
            emit(
                cli,
                &tasks,
                &format!(
                    "{:>7} {:>7} {:>7} {:>6} {:>6} {} {:<16} {:>12}  KTHREAD",
                    "PID", "TGID", "PPID", "UID", "GID", "S", "COMMAND", "START(s)"
                ),
                |t| {
                    format!(
                        "{:>7} {:>7} {:>7} {:>6} {:>6} {} {:<16} {:>12.3}  {}",
                        t.pid,
                        t.tgid,
                        t.ppid,
                        t.uid,
                        t.gid,
                        t.state,
                        t.comm,
                        t.start_ns as f64 / 1e9,
                        if t.kthread { "yes" } else { "" }
                    )
                },
            )?;
        }
        Command::Pstree => {
            let tasks = linux::ps(&mut mem, &k, 0, false)?;
            let roots = linux::pstree(&tasks);
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&roots)?);
            } else if cli.jsonl {
                for r in &roots {
                    println!("{}", serde_json::to_string(r)?);
                }
            } else {
                for (depth, t) in roots.iter().flat_map(|r| r.lines()) {
                    println!("{}{}({})", "  ".repeat(depth), t.comm, t.pid);
                }
            }
        }
        Command::Baseline { output } => {
            let dir = output
                .clone()
                .or_else(|| ids::checks::TextBaseline::default_dir(&k))
                .ok_or_else(|| anyhow::anyhow!("no cache directory: give -o DIR"))?;
            let b = ids::checks::record_baseline(&mut mem, &k, 0)?;
            b.save(&dir)?;
            let bytes: usize = b.ranges.iter().map(|r| r.2.len()).sum();
            println!("baseline of {} bytes written to {}", bytes, dir.display());
        }
        Command::Check { what, baseline } => {
            let modules = linux::lsmod(&mut mem, &k, 0)?;
            let mut reports = Vec::new();
            if matches!(what, CheckKind::Syscalls | CheckKind::All) {
                reports.push(ids::checks::check_syscalls(&mut mem, &k, 0, &modules)?);
            }
            if matches!(what, CheckKind::Idt | CheckKind::All) {
                reports.push(ids::checks::check_idt(&mut mem, &k, &modules)?);
            }
            if matches!(what, CheckKind::Modules | CheckKind::All) {
                reports.push(ids::checks::check_modules(&mut mem, &k, 0, &modules)?);
            }
            if matches!(what, CheckKind::Processes | CheckKind::All) {
                reports.push(ids::checks::check_processes(&mut mem, &k, 0)?);
            }
            if matches!(what, CheckKind::Hooks | CheckKind::All) {
                reports.push(ids::checks::check_hooks(&mut mem, &k, 0, &modules)?);
            }
            if matches!(what, CheckKind::Text | CheckKind::All) {
                let dir = baseline
                    .clone()
                    .or_else(|| ids::checks::TextBaseline::default_dir(&k));
                match dir.map(|d| ids::checks::TextBaseline::load(&d)) {
                    Some(Ok(base)) => {
                        reports.push(ids::checks::check_text(&mut mem, &k, 0, &base, &modules)?)
                    }
                    Some(Err(e)) if *what == CheckKind::Text => anyhow::bail!(
                        "no usable baseline for this boot ({e}): record one with `ids baseline`"
                    ),
                    _ if *what == CheckKind::Text => {
                        anyhow::bail!("no baseline: record one with `ids baseline`")
                    }
                    _ => {}
                }
            }
            let findings: Vec<&ids::checks::Finding> =
                reports.iter().flat_map(|r| &r.findings).collect();
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            } else if cli.jsonl {
                for f in &findings {
                    println!("{}", serde_json::to_string(f)?);
                }
            } else {
                for r in &reports {
                    println!(
                        "{}: {} checked, {}",
                        r.check,
                        r.checked,
                        if r.findings.is_empty() {
                            "clean".to_string()
                        } else {
                            format!("{} FOUND", r.findings.len())
                        }
                    );
                    for f in &r.findings {
                        println!("  {}: expected {}; found {}", f.what, f.expected, f.found);
                    }
                }
            }
            if !findings.is_empty() {
                std::process::exit(EXIT_FINDINGS);
            }
        }
        Command::Lsmod => {
            let mods = linux::lsmod(&mut mem, &k, 0)?;
            emit(
                cli,
                &mods,
                &format!(
                    "{:<24} {:>8} {:>4} {:<10} {:>18}",
                    "MODULE", "SIZE", "REFS", "STATE", "BASE"
                ),
                |m| {
                    format!(
                        "{:<24} {:>8} {:>4} {:<10} {:#018x}",
                        m.name, m.size, m.refcount, m.state, m.base
                    )
                },
            )?;
        }
        Command::Kallsyms { pattern } => {
            let syms: Vec<&ids::kallsyms::Symbol> = k
                .kallsyms
                .symbols
                .iter()
                .filter(|s| pattern.as_ref().is_none_or(|p| s.name.contains(p.as_str())))
                .collect();
            if cli.json || cli.jsonl {
                emit(cli, &syms, "", |_| String::new())?;
            } else {
                let mut out = String::with_capacity(syms.len() * 48);
                for s in syms {
                    out.push_str(&format!("{:016x} {} {}\n", s.addr, s.kind, s.name));
                }
                print!("{out}");
            }
        }
        Command::Cpus => {
            let v = linux::cpus(&mut mem, &k)?;
            emit(
                cli,
                &v,
                &format!(
                    "{:>3} {:>18} {:>18} {:<6} {:>7} COMMAND",
                    "CPU", "CR3", "RIP", "MODE", "PID"
                ),
                |c| {
                    format!(
                        "{:>3} {:#018x} {:#018x} {:<6} {:>7} {}",
                        c.cpu,
                        c.cr3,
                        c.rip,
                        if c.user { "user" } else { "kernel" },
                        c.pid,
                        c.comm
                    )
                },
            )?;
        }
        Command::Kernel => {
            let v = serde_json::json!({
                "banner": k.banner.trim_end(),
                "lstar": format!("{:#x}", k.lstar),
                "symbols": k.kallsyms.symbols.len(),
                "layout": k.kallsyms.layout,
                "btf_bytes": k.btf_bytes,
                "from_cache": k.from_cache,
                "offsets": k.offsets,
            });
            if cli.json || cli.jsonl {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
        }
        _ => unreachable!("not a Linux command"),
    }
    if cli.stats {
        let st = mem.inner().stats();
        eprintln!(
            "stats: kernel load {:.3} s, {} requests ({}); command {} requests; total {} requests, {} bytes, {:.3} s",
            loaded.as_secs_f64(),
            load_requests,
            if k.from_cache { "cache" } else { "cold" },
            st.requests - load_requests,
            st.requests,
            st.bytes,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
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
    if matches!(
        cli.command,
        Command::Ps { .. }
            | Command::Pstree
            | Command::Lsmod
            | Command::Kallsyms { .. }
            | Command::Cpus
            | Command::Kernel
            | Command::Check { .. }
            | Command::Baseline { .. }
    ) {
        return run_linux(&cli);
    }
    let Some(ep) = cli.connect.clone() else {
        anyhow::bail!("this command needs a live VM: give --connect ENDPOINT");
    };
    let endpoint = ep.with_key(cli.key.clone());
    if let Command::Watch {
        interval,
        count,
        host_name,
    } = &cli.command
    {
        let host = host_name.clone().unwrap_or_else(|| endpoint.vm_name());
        let opts = ids::watch::WatchOptions {
            interval: *interval,
            count: *count,
            cache: if cli.no_cache {
                None
            } else {
                linux::cache_dir()
            },
        };
        let deadline = Duration::from_millis(cli.deadline_ms);
        let alerted = ids::watch::run(
            || Session::connect(&endpoint, deadline),
            &opts,
            |e| {
                use std::io::Write;
                let line = e.to_ecs(&host, std::time::SystemTime::now());
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            },
        );
        std::process::exit(if alerted { EXIT_FINDINGS } else { 0 });
    }
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
            if h.mem_flags & smmvmi_mailbox::records::MEM_DIMM_HOTPLUG != 0 {
                println!("memory: DIMMs plugged after boot are tracked (listed below)");
            }
            if h.mem_flags & smmvmi_mailbox::records::MEM_VIRTIO_MEM_REFUSED != 0 {
                println!(
                    "memory: a virtio-mem device is present; its memory is NOT read (refused as not RAM): \
                     its plugged blocks are known only through the device, which the guest drives"
                );
            }
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
        Command::Dump { image } => {
            let info = s.info()?;
            let n = info.header.cpu_count;
            let cpus = (0..n)
                .map(|c| s.cpu_state(c))
                .collect::<Result<Vec<_>, _>>()?;
            let ram: Vec<(u64, u64)> = info.ram.iter().map(|r| (r.base, r.len)).collect();
            let meta =
                DumpMemory::write(&image, &ram, &cpus, info.header.c_bit as u8, |a, len| {
                    Ok(s.read_phys(a, len)?)
                })?;
            eprintln!(
                "dumped {} bytes in {} ranges and {} CPUs to {}",
                meta.ram.iter().map(|r| r.len).sum::<u64>(),
                meta.ram.len(),
                meta.cpus.len(),
                image.display()
            );
        }
        _ => unreachable!("Linux commands return above"),
    }
    Ok(())
}
