#![forbid(unsafe_code)]
//! `ids`: the IDS command line. `ids --connect VM banner` prints the guest
//! kernel's version banner read from guest memory by the SMM agent;
//! `read-virt`, `read-phys`, `translate` and `cpu-state` read memory and
//! registers; `ps`, `pstree`, `lsmod`, `kallsyms`, `cpus` and `kernel` read
//! the Linux kernel with no profile (kallsyms and BTF from guest memory),
//! from the live agent or from a dump (`--dump PATH`, written by `ids dump`);
//! `dump` acquires all RAM as raw, LiME or an ELF core (resumable), `isf`
//! writes a Volatility 3 symbol table from the guest's BTF and kallsyms, and
//! `mount` serves live physical memory as a read-only FUSE file.
//!
//! The command-line design (numbers, ranges, outputs, exit codes, errors)
//! is in the README's "Command lines" section and in [`cli`].

mod cli;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Parser, Subcommand};
use cli::errors::{CliError, Exit};
use cli::numbers::{
    RangeArg, parse_addr, parse_cpu, parse_deadline, parse_deadline_ms, parse_range, parse_size,
};
use cli::read::{Holes, Outcome, Space};
use ids::dump::DumpMemory;
use ids::kernel::{self, BannerSearch};
use ids::linux::{self, Discovery, Kernel};
use ids::memory::{GuestMemory, SnapshotCache};
use ids::{Endpoint, Session, SessionError};
use smmvmi_mailbox::wire::{AddressSpace, CpuState, Op, Pti, Status, WalkRecord};

const EXIT_CODES: &str = "\
Numbers: addresses are hex, 0x optional (ffffffff81000000, 100000 = 0x100000);
sizes are decimal, 0x hex, or K/M/G (4096, 0x1000, 4K, 64M); ranges are
ADDR+LEN, ADDR..END or ADDR LEN.

Exit codes: 0 ok, 1 other failure, 2 usage, 3 alert (check found something,
watch raised an alert), 4 refused (SMRAM, not RAM, not mapped, no such CPU),
5 agent silent (ALERT), 6 unreachable (no VM, daemon or agent), 7 partial
(some of the range was unreadable; the rest was written), 130 interrupted
(what was read is kept).";

/// Introspect a VM through its SMM agent.
#[derive(Parser)]
#[command(
    name = "ids",
    version,
    about = "Introspect a VM through its SMM agent: memory, registers, the Linux kernel",
    after_help = EXIT_CODES
)]
struct Cli {
    /// The VM: its name (`cargo xtask vm list`), its state directory, or an
    /// endpoint: `unix:PATH#VM` / `vsock:CID:PORT#VM` through the daemon
    /// (with --key or `,key=PATH`), `qmp=PATH,mailbox=PATH,key=PATH`
    /// directly.
    #[arg(
        long,
        short = 'c',
        global = true,
        help_heading = "Global options",
        env = "IDS_CONNECT",
        value_name = "VM"
    )]
    connect: Option<String>,
    /// The 32-byte key shared with the agent (daemon endpoints).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "IDS_KEY",
        value_name = "PATH"
    )]
    key: Option<PathBuf>,
    /// Read a memory dump (raw image; its sidecar is IMAGE.json) instead
    /// of a live VM (Linux commands only).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        value_name = "IMAGE"
    )]
    dump: Option<PathBuf>,
    /// Output as one JSON document.
    #[arg(long, global = true, help_heading = "Global options")]
    json: bool,
    /// Output as one JSON object per line.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        conflicts_with = "json"
    )]
    jsonl: bool,
    /// Do not use or write the kernel cache ($XDG_CACHE_HOME/smmvmi).
    #[arg(long, global = true, help_heading = "Global options")]
    no_cache: bool,
    /// Print requests (SMIs), bytes and time to stderr at the end.
    #[arg(long, global = true, help_heading = "Global options")]
    stats: bool,
    /// Deadline of one request (500ms, 10s, 1m; at least 10ms): a silent
    /// agent past it is an ALERT.
    #[arg(long, global = true, help_heading = "Global options", value_parser = parse_deadline, default_value = "10s", value_name = "DURATION")]
    deadline: Duration,
    /// The deadline in milliseconds (older spelling of --deadline).
    #[arg(long, global = true, help_heading = "Global options", value_parser = parse_deadline_ms, hide = true)]
    deadline_ms: Option<Duration>,
    /// On errors, also print the error chain as the code sees it
    /// (RUST_BACKTRACE then adds a backtrace).
    #[arg(long, global = true, help_heading = "Global options")]
    debug: bool,
    /// No progress bar and no summary on stderr.
    #[arg(long, short = 'q', global = true, help_heading = "Global options")]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

/// Options of the memory reads.
#[derive(clap::Args, Clone)]
struct ReadArgs {
    /// ADDR (hex), ADDR+LEN or ADDR..END.
    #[arg(value_parser = parse_range, value_name = "ADDR[+LEN|..END]")]
    range: RangeArg,
    /// Length (4096, 0x1000, 4K, 64M) when ADDR has no +LEN or ..END; 256
    /// bytes if neither gives one.
    #[arg(value_parser = parse_size)]
    len: Option<u64>,
    /// Write the raw bytes to FILE (`-` for stdout, which must not be a
    /// terminal) instead of a hex dump; a summary with the SHA-256 goes to
    /// stderr. Without -o the bytes go to stdout: a hex dump on a
    /// terminal, raw bytes into a pipe or file.
    #[arg(long, short = 'o', value_name = "FILE", conflicts_with = "hex")]
    output: Option<PathBuf>,
    /// A hex dump on stdout even when it is not a terminal (a pipe, a
    /// file), where the bytes would otherwise be raw.
    #[arg(long)]
    hex: bool,
    /// Unreadable stretches (unmapped pages, not RAM): zero-fill them in the
    /// raw output, skip them, or stop at the first one. Every one is
    /// reported; the hex dump marks them.
    #[arg(long, value_enum, default_value_t = Holes::Zero)]
    holes: Holes,
}

#[derive(Subcommand)]
enum Command {
    /// Print the guest kernel's version banner (the /proc/version text).
    Banner {
        /// Also print where it was found and how much was read (stderr).
        #[arg(long)]
        verbose: bool,
        /// Most bytes searched after LSTAR (4096, 0x1000, 64M).
        #[arg(long, default_value = "64M", value_parser = parse_size)]
        limit: u64,
    },
    /// Print the agent's INFO (version, CPUs, RAM map, SMRAM, limits).
    Info,
    /// Guest-virtual memory through a CPU's page tables (or --cr3): a hex
    /// dump on a terminal, raw bytes into a pipe or with -o (--hex: a hex
    /// dump anyway).
    #[command(after_help = "Example: ids -c mon1 read-virt ffffffff81000000+64M -o text.raw")]
    ReadVirt {
        #[command(flatten)]
        read: ReadArgs,
        /// CPU whose paging mode (and CR3, without --cr3) is used.
        #[arg(long, default_value = "0", value_parser = parse_cpu)]
        cpu: u32,
        /// Walk the page tables at this CR3 instead of the CPU's (hex), e.g.
        /// a process's from `ids cpus` or its mm->pgd.
        #[arg(long, value_parser = parse_addr, value_name = "CR3")]
        cr3: Option<u64>,
        /// Use the CR3 as saved (or given) instead of PTI's kernel half.
        #[arg(long, conflicts_with = "user")]
        as_is: bool,
        /// Use PTI's user half of the CR3.
        #[arg(long)]
        user: bool,
    },
    /// Guest-physical memory: a hex dump on a terminal, raw bytes into a
    /// pipe or with -o (--hex: a hex dump anyway).
    #[command(after_help = "Example: ids -c mon1 read-phys 100000 16   (0x100000, 16 bytes)")]
    ReadPhys {
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Translate a virtual address and show the page walk, level by level.
    Translate {
        /// Virtual address (hex).
        #[arg(value_parser = parse_addr)]
        addr: u64,
        /// CPU whose page tables (and paging mode) are used.
        #[arg(long, default_value = "0", value_parser = parse_cpu)]
        cpu: u32,
        /// Walk the page tables at this CR3 instead (hex).
        #[arg(long, value_parser = parse_addr, value_name = "CR3")]
        cr3: Option<u64>,
        /// Use the CR3 as saved (or given) instead of PTI's kernel half.
        #[arg(long, conflicts_with = "user")]
        as_is: bool,
        /// Use PTI's user half of the CR3.
        #[arg(long)]
        user: bool,
    },
    /// Registers and MSRs of one CPU as the agent saw them in SMM, decoded.
    CpuState {
        /// CPU index (0, 1, ...).
        #[arg(value_parser = parse_cpu, allow_negative_numbers = true)]
        cpu: u32,
        /// Do not name RIP and LSTAR with kernel symbols (which loads the
        /// kernel's kallsyms, from the cache when it can).
        #[arg(long)]
        no_symbols: bool,
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
        /// Kernel text and rodata against a baseline the first pass
        /// records, in this many slices (one per pass; 0: no text check).
        #[arg(long, default_value_t = ids::watch::DEFAULT_TEXT_SLICES)]
        text_slices: usize,
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
    /// Dumps all guest RAM (the ranges the agent reports) through the
    /// agent: raw (plus IMAGE.json with the RAM map and CPU states, for
    /// `--dump`), LiME (Volatility 3) or an ELF core with the guest's
    /// VMCOREINFO note (crash, drgn). Each request is a snapshot; the dump
    /// as a whole is not (the guest runs between requests). Ctrl-C or a
    /// failed request keeps what was written: continue with --resume.
    #[command(
        after_help = "Examples: ids -c mon1 dump -o mem.lime --format lime\n          ids -c mon1 dump -o mem.lime --format lime --resume"
    )]
    Dump {
        /// Output file.
        #[arg(
            short = 'o',
            long = "output",
            value_name = "FILE",
            required_unless_present = "image"
        )]
        output: Option<PathBuf>,
        /// Output file (older spelling of -o, raw format).
        #[arg(value_name = "IMAGE", conflicts_with = "output", hide = true)]
        image: Option<PathBuf>,
        /// File format.
        #[arg(long, value_enum, default_value = "raw")]
        format: ids::acquire::Format,
        /// Continue an interrupted dump of FILE from its last checkpoint
        /// (FILE.ids-dump.json).
        #[arg(long)]
        resume: bool,
    },
    /// Mounts the guest's physical memory read-only as DIR/mem (FUSE): a
    /// raw image whose offset X is guest-physical X, every read through the
    /// agent, zeros outside RAM; `vol -f DIR/mem` runs on the live guest.
    /// Until Ctrl-C (or `umount DIR`).
    #[command(
        after_help = "Example: ids -c mon1 mount /mnt/g & vol -f /mnt/g/mem -s symbols linux.pslist"
    )]
    Mount {
        /// An existing empty directory.
        dir: PathBuf,
    },
    /// Writes a Volatility 3 symbol table (ISF JSON) of the guest kernel,
    /// built from its own BTF (types) and kallsyms (symbols, at link-time
    /// addresses), with its banner: `vol -s DIR` then finds it.
    #[command(after_help = "Example: ids -c mon1 isf -o symbols/linux/guest.json")]
    Isf {
        /// Output file (`.json`; `.json.xz` is not written).
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: PathBuf,
    },
}

impl Cli {
    fn deadline(&self) -> Duration {
        self.deadline_ms.unwrap_or(self.deadline)
    }

    fn endpoint(&self) -> anyhow::Result<Endpoint> {
        let Some(spec) = &self.connect else {
            return Err(CliError::usage(
                "no VM given",
                "name it with --connect VM (anywhere on the line, or $IDS_CONNECT): a VM name from `cargo xtask vm list`, its state directory, or an endpoint such as unix:PATH#VM",
            )
            .into());
        };
        let ep: Endpoint = spec.parse()?;
        Ok(ep.with_key(self.key.clone()))
    }
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

/// Prints rows as a table, JSON or JSON lines.
fn emit<T: serde::Serialize>(
    cli: &Cli,
    out: &mut dyn Write,
    rows: &[T],
    header: &str,
    line: impl Fn(&T) -> String,
) -> anyhow::Result<()> {
    if cli.json {
        writeln!(out, "{}", serde_json::to_string_pretty(rows)?)?;
    } else if cli.jsonl {
        for r in rows {
            writeln!(out, "{}", serde_json::to_string(r)?)?;
        }
    } else {
        writeln!(out, "{header}")?;
        for r in rows {
            writeln!(out, "{}", line(r))?;
        }
    }
    Ok(())
}

/// A spinner on stderr for a step that can take seconds (only when stderr
/// is a terminal and not --quiet).
fn spinner(cli: &Cli, msg: &str) -> indicatif::ProgressBar {
    if cli.quiet || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

fn open_memory(cli: &Cli) -> anyhow::Result<Box<dyn GuestMemory>> {
    if let Some(d) = &cli.dump {
        return Ok(Box::new(DumpMemory::open(d)?));
    }
    Ok(Box::new(Session::connect(
        &cli.endpoint()?,
        cli.deadline(),
    )?))
}

fn run_linux(cli: &Cli, out: &mut dyn Write) -> anyhow::Result<Exit> {
    let mut exit = Exit::Ok;
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
                | Command::Isf { .. }
        ),
        ..Discovery::default()
    };
    let pb = spinner(
        cli,
        "loading the kernel's symbols and types (a few seconds the first time, cached after)",
    );
    let k = Kernel::load(mem.inner(), &d, cache.as_deref());
    pb.finish_and_clear();
    let k = k?;
    let loaded = started.elapsed();
    let load_requests = mem.inner().stats().requests;
    match &cli.command {
        Command::Ps { threads } => {
            let tasks = linux::ps(&mut mem, &k, 0, *threads)?;
            emit(
                cli,
                out,
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
        Command::Isf { output } => {
            let cached = cache
                .as_deref()
                .map(|d| ids::isf::cache_path(d, &k.banner))
                .filter(|p| p.exists());
            let text = match cached {
                Some(p) => std::fs::read(&p)?,
                None => {
                    let pb = spinner(cli, "reading the kernel's BTF");
                    let btf = linux::read_btf(mem.inner(), &k.kallsyms, 0);
                    pb.finish_and_clear();
                    let isf = ids::isf::build(&btf?, &k.kallsyms.symbols, &k.banner)?;
                    let text = serde_json::to_vec(&isf)?;
                    if let Some(p) = cache.as_deref().map(|d| ids::isf::cache_path(d, &k.banner)) {
                        // A cache that cannot be written only costs time.
                        let _ = p.parent().map(std::fs::create_dir_all);
                        let _ = std::fs::write(&p, &text);
                    }
                    text
                }
            };
            if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(output, &text)?;
            if !cli.quiet {
                eprintln!(
                    "ids: wrote {} ({} bytes) for {}",
                    output.display(),
                    text.len(),
                    k.banner.trim_end()
                );
            }
        }
        Command::Pstree => {
            let tasks = linux::ps(&mut mem, &k, 0, false)?;
            let roots = linux::pstree(&tasks);
            if cli.json {
                writeln!(out, "{}", serde_json::to_string_pretty(&roots)?)?;
            } else if cli.jsonl {
                for r in &roots {
                    writeln!(out, "{}", serde_json::to_string(r)?)?;
                }
            } else {
                for (depth, t) in roots.iter().flat_map(|r| r.lines()) {
                    writeln!(out, "{}{}({})", "  ".repeat(depth), t.comm, t.pid)?;
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
            writeln!(
                out,
                "baseline of {} bytes written to {}",
                bytes,
                dir.display()
            )?;
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
                writeln!(out, "{}", serde_json::to_string_pretty(&reports)?)?;
            } else if cli.jsonl {
                for f in &findings {
                    writeln!(out, "{}", serde_json::to_string(f)?)?;
                }
            } else {
                for r in &reports {
                    writeln!(
                        out,
                        "{}: {} checked, {}",
                        r.check,
                        r.checked,
                        if r.findings.is_empty() {
                            "clean".to_string()
                        } else {
                            format!("{} FOUND", r.findings.len())
                        }
                    )?;
                    for f in &r.findings {
                        writeln!(
                            out,
                            "  {}: expected {}; found {}",
                            f.what, f.expected, f.found
                        )?;
                    }
                }
            }
            if !findings.is_empty() {
                exit = Exit::Findings;
            }
        }
        Command::Lsmod => {
            let mods = linux::lsmod(&mut mem, &k, 0)?;
            emit(
                cli,
                out,
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
                emit(cli, out, &syms, "", |_| String::new())?;
            } else {
                let mut text = String::with_capacity(syms.len() * 48);
                for s in syms {
                    text.push_str(&format!("{:016x} {} {}\n", s.addr, s.kind, s.name));
                }
                out.write_all(text.as_bytes())?;
            }
        }
        Command::Cpus => {
            let v = linux::cpus(&mut mem, &k)?;
            emit(
                cli,
                out,
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
                writeln!(out, "{}", serde_json::to_string(&v)?)?;
            } else {
                writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
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
    Ok(exit)
}

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                Exit::Usage.into()
            } else {
                Exit::Ok.into()
            };
        }
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let result = run(&cli, &mut out).and_then(|exit| {
        out.flush()?;
        Ok(exit)
    });
    match result {
        Ok(exit) => exit.into(),
        // A reader that closed the pipe (`| head`) wants no more: done.
        Err(e) if broken_pipe(&e) => Exit::Ok.into(),
        Err(e) => {
            let _ = out.flush();
            if (cli.json || cli.jsonl) && !cli.debug {
                eprintln!("{}", cli::errors::report_json(&e));
            } else {
                eprint!("{}", cli::errors::report(&e, cli.debug));
            }
            cli::errors::exit_of(&e).into()
        }
    }
}

fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn is_linux(c: &Command) -> bool {
    matches!(
        c,
        Command::Ps { .. }
            | Command::Pstree
            | Command::Lsmod
            | Command::Kallsyms { .. }
            | Command::Cpus
            | Command::Kernel
            | Command::Check { .. }
            | Command::Baseline { .. }
            | Command::Isf { .. }
    )
}

fn pti(as_is: bool, user: bool) -> Pti {
    if as_is {
        Pti::AsIs
    } else if user {
        Pti::User
    } else {
        Pti::Kernel
    }
}

fn run(cli: &Cli, out: &mut dyn Write) -> anyhow::Result<Exit> {
    if is_linux(&cli.command) {
        if cli.dump.is_none() {
            cli.endpoint()?;
        }
        return run_linux(cli, out);
    }
    if cli.dump.is_some() {
        return Err(CliError::usage(
            "--dump works with the Linux commands only (ps, pstree, lsmod, kallsyms, cpus, kernel, check)",
            "for this command, --connect to the live VM",
        )
        .into());
    }
    let endpoint = cli.endpoint()?;
    if let Command::Watch {
        interval,
        count,
        host_name,
        text_slices,
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
            text_slices: *text_slices,
        };
        let deadline = cli.deadline();
        let alerted = ids::watch::run(
            || Session::connect(&endpoint, deadline),
            &opts,
            |e| {
                let line = e.to_ecs(&host, std::time::SystemTime::now());
                let written = writeln!(out, "{line}").and_then(|()| out.flush());
                // A reader that closed the pipe wants no more events.
                if written.is_err_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) {
                    std::process::exit(Exit::Ok as i32);
                }
            },
        );
        return Ok(if alerted { Exit::Findings } else { Exit::Ok });
    }
    let mut s = Session::connect(&endpoint, cli.deadline())?;
    if let Command::Mount { dir } = &cli.command {
        return mount_cmd(cli, s, dir, &stop_on_interrupt());
    }
    match &cli.command {
        Command::Banner { verbose, limit } => {
            let pb = spinner(cli, "searching the kernel image for its banner");
            let b = kernel::find_banner(
                &mut s,
                BannerSearch {
                    limit: *limit,
                    ..Default::default()
                },
            );
            pb.finish_and_clear();
            let b = b?;
            if cli.json || cli.jsonl {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({
                        "banner": b.text.trim_end(),
                        "addr": format!("{:#x}", b.addr),
                        "lstar": format!("{:#x}", b.lstar),
                        "requests": b.requests,
                        "bytes_read": b.bytes_read,
                    })
                )?;
            } else {
                write!(out, "{}", b.text)?;
            }
            if *verbose {
                eprintln!(
                    "banner at {:#x} (LSTAR {:#x}); {} requests, {:#x} bytes read",
                    b.addr, b.lstar, b.requests, b.bytes_read
                );
                for (addr, text) in &b.others {
                    eprint!("  skipped candidate at {addr:#x}: {text}");
                }
            }
            Ok(Exit::Ok)
        }
        Command::Info => info(cli, out, &mut s),
        Command::ReadVirt {
            read,
            cpu,
            cr3,
            as_is,
            user,
        } => {
            let space = AddressSpace {
                cpu: *cpu,
                cr3: *cr3,
                pti: pti(*as_is, *user),
            };
            read_cmd(cli, out, &mut s, read, Some(space))
        }
        Command::ReadPhys { read } => read_cmd(cli, out, &mut s, read, None),
        Command::Translate {
            addr,
            cpu,
            cr3,
            as_is,
            user,
        } => {
            let space = AddressSpace {
                cpu: *cpu,
                cr3: *cr3,
                pti: pti(*as_is, *user),
            };
            translate(cli, out, &mut s, space, *addr)
        }
        Command::CpuState { cpu, no_symbols } => cpu_state(cli, out, &mut s, *cpu, *no_symbols),
        Command::Dump {
            output,
            image,
            format,
            resume,
        } => {
            let path = output
                .as_ref()
                .or(image.as_ref())
                .expect("clap requires one");
            dump_cmd(cli, out, &mut s, path, *format, *resume)
        }
        _ => unreachable!("Linux commands and mount return above"),
    }
}

/// A flag set by SIGINT or SIGTERM (`ids mount` unmounts then).
fn stop_on_interrupt() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    stop
}

/// `ids mount`: serves DIR/mem until `stop` (or until DIR is unmounted).
fn mount_cmd(
    cli: &Cli,
    mut s: Session,
    dir: &std::path::Path,
    stop: &AtomicBool,
) -> anyhow::Result<Exit> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(dir).map_err(|e| {
        CliError::usage(
            format!("cannot mount on {}: {e}", dir.display()),
            "give an existing empty directory",
        )
    })?;
    let info = s.info()?;
    let ram: Vec<(u64, u64)> = info.ram.iter().map(|r| (r.base, r.len)).collect();
    let max = s.max_read()? as u64;
    let stats = Arc::new(std::sync::Mutex::new(cli::mount::MountStats::default()));
    // The session moves into the file system's thread.
    let fs = cli::mount::MemFs::new(s, ram, max, meta.uid(), meta.gid(), stats.clone());
    let size = fs.size();
    let opts = [
        fuser::MountOption::RO,
        fuser::MountOption::FSName("smmvmi".into()),
        fuser::MountOption::Subtype("ids".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    let bg = fuser::spawn_mount2(fs, dir, &opts).map_err(|e| {
        CliError::new(
            Exit::Failure,
            format!(
                "mounting FUSE on {}: {e} (needs /dev/fuse and root, or fusermount3)",
                dir.display()
            ),
        )
    })?;
    if !cli.quiet {
        eprintln!(
            "ids: guest memory ({size:#x} bytes) at {}; Ctrl-C or `umount {}` to end",
            dir.join("mem").display(),
            dir.display()
        );
    }
    let mut mounted = true;
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
        if bg.guard.is_finished() {
            mounted = false;
            break;
        }
    }
    if mounted {
        drop(bg);
    }
    let st = *stats.lock().expect("stats");
    if !cli.quiet {
        eprintln!(
            "ids: unmounted {}: {} reads, {} requests, {} bytes of RAM read{}",
            dir.display(),
            st.reads,
            st.requests,
            st.bytes,
            if st.failed > 0 {
                format!(", {} failed", st.failed)
            } else {
                String::new()
            }
        );
    }
    Ok(Exit::Ok)
}

/// `ids dump`: plans the file (reading the guest's vmcoreinfo for an ELF
/// core), then writes it through [`cli::dump::run`].
fn dump_cmd(
    cli: &Cli,
    out: &mut dyn Write,
    s: &mut Session,
    path: &std::path::Path,
    format: ids::acquire::Format,
    resume: bool,
) -> anyhow::Result<Exit> {
    use ids::acquire::{Format, Plan, State};
    let started = std::time::Instant::now();
    let info = s.info()?;
    let ram: Vec<(u64, u64)> = info.ram.iter().map(|r| (r.base, r.len)).collect();
    let cpus = (0..info.header.cpu_count)
        .map(|c| s.cpu_state(c))
        .collect::<Result<Vec<_>, _>>()?;
    let state = if resume {
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        Some(State::load_for_resume(path, format, &ram, len)?)
    } else {
        None
    };
    let plan = match (&state, format) {
        (Some(st), _) => st.plan.clone(),
        (None, Format::Elf) => {
            let pb = spinner(cli, "reading the guest kernel's vmcoreinfo");
            let cache = if cli.no_cache {
                None
            } else {
                linux::cache_dir()
            };
            let note = Kernel::load(s, &Discovery::default(), cache.as_deref())
                .and_then(|k| ids::acquire::read_vmcoreinfo(s, &k, 0));
            pb.finish_and_clear();
            match note {
                Ok(n) => Plan::new(format, &ram, Some(&n), &cpus),
                Err(e) => {
                    eprintln!(
                        "ids: warning: no VMCOREINFO note ({e}); the ELF core has the RAM only"
                    );
                    Plan::new(format, &ram, None, &cpus)
                }
            }
        }
        (None, _) => Plan::new(format, &ram, None, &cpus),
    };
    let total = plan.total();
    let max = s.max_read()? as u64;
    let space = Space::Phys {
        ram: ram.clone(),
        smram: (info.header.smram_base, info.header.smram_size),
    };
    let stop = interrupt_flag();
    let pb = cli::output::progress(total, "dumping RAM", !cli.quiet);
    if let Some(st) = &state {
        pb.set_position(st.done);
    }
    let requests_before = s.client_requests();
    let ran = cli::dump::run(
        path,
        plan,
        state,
        &space,
        max,
        &stop,
        |a, n| Ok(s.request(&[Op::ReadPhys { addr: a, len: n }])?.remove(0)),
        &|pos| pb.set_position(pos),
    )?;
    pb.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let requests = s.client_requests() - requests_before;
    let st = &ran.state;
    let holes: u64 = st.holes.iter().map(|h| h.1).sum();
    if ran.interrupted || ran.failed.is_some() {
        eprintln!(
            "ids: {}: {:#x} of {total:#x} bytes written and kept (resume state {}); continue with `ids dump -o {} --format {} --resume`",
            if ran.interrupted {
                "interrupted"
            } else {
                "the dump stopped"
            },
            st.done,
            ids::acquire::state_path(path).display(),
            path.display(),
            format!("{format:?}").to_lowercase()
        );
        if let Some(e) = ran.failed {
            return Err(e.into());
        }
        return Ok(Exit::Interrupted);
    }
    if format == Format::Raw {
        let meta = ids::dump::DumpMeta {
            version: ids::dump::DUMP_VERSION,
            ram: st
                .plan
                .pieces
                .iter()
                .filter_map(|p| match p {
                    ids::acquire::Piece::Ram { offset, base, len } => Some(ids::dump::DumpRange {
                        base: *base,
                        len: *len,
                        offset: *offset,
                    }),
                    ids::acquire::Piece::Bytes { .. } => None,
                })
                .collect(),
            cpus: cpus.iter().map(ids::dump::cpu_to_words).collect(),
            c_bit: info.header.c_bit as u8,
        };
        std::fs::write(
            ids::dump::sidecar_path(path),
            serde_json::to_string_pretty(&meta)?,
        )?;
    }
    let mib_s = ran.read as f64 / (1 << 20) as f64 / secs.max(1e-9);
    if cli.json || cli.jsonl {
        writeln!(
            out,
            "{}",
            serde_json::json!({
                "file": path.display().to_string(),
                "format": format,
                "bytes": total,
                "ram_bytes": st.plan.ram_bytes(),
                "read": ran.read,
                "holes": st.holes.iter().map(|h| serde_json::json!({
                    "addr": format!("{:#x}", h.0), "len": h.1, "reason": h.2})).collect::<Vec<_>>(),
                "requests": requests,
                "seconds": secs,
                "mib_per_s": mib_s,
                "resumed": st.resumed,
            })
        )?;
    } else if !cli.quiet {
        eprintln!(
            "ids: dumped {:#x} bytes of RAM in {} ranges ({format:?}, {total:#x} bytes) to {} in {secs:.1} s ({mib_s:.1} MiB/s, {requests} requests{}{})",
            st.plan.ram_bytes(),
            st.plan
                .pieces
                .iter()
                .filter(|p| matches!(p, ids::acquire::Piece::Ram { .. }))
                .count(),
            path.display(),
            if st.resumed > 0 {
                format!(", resumed {} times", st.resumed)
            } else {
                String::new()
            },
            if holes > 0 {
                format!(", {holes:#x} bytes unreadable and zero-filled")
            } else {
                String::new()
            },
        );
    }
    Ok(if holes > 0 { Exit::Partial } else { Exit::Ok })
}

fn info(cli: &Cli, out: &mut dyn Write, s: &mut Session) -> anyhow::Result<Exit> {
    let info = s.info()?;
    let h = &info.header;
    let virtio = h.mem_flags & smmvmi_mailbox::records::MEM_VIRTIO_MEM_REFUSED != 0;
    if cli.json || cli.jsonl {
        let v = serde_json::json!({
            "authenticated": info.authenticated,
            "agent_version": format!("{}.{}", h.agent_version >> 16, h.agent_version & 0xffff),
            "cpus": h.cpu_count,
            "max_read": h.max_read,
            "smram": {"base": format!("{:#x}", h.smram_base), "size": format!("{:#x}", h.smram_size)},
            "sev_flags": h.sev_flags,
            "c_bit": h.c_bit,
            "dimm_hotplug": h.mem_flags & smmvmi_mailbox::records::MEM_DIMM_HOTPLUG != 0,
            "virtio_mem_refused": virtio,
            "ram": info.ram.iter().map(|r| serde_json::json!({
                "base": format!("{:#x}", r.base), "len": format!("{:#x}", r.len)
            })).collect::<Vec<_>>(),
            "cpu": info.cpus.iter().enumerate().map(|(i, c)| serde_json::json!({
                "cpu": i, "paging_levels": c.paging_levels, "flags": c.flags
            })).collect::<Vec<_>>(),
        });
        writeln!(out, "{v}")?;
        return Ok(Exit::Ok);
    }
    if !info.authenticated {
        writeln!(
            out,
            "WARNING: plain INFO of an unprovisioned agent; it proves nothing"
        )?;
    }
    writeln!(
        out,
        "agent version {}.{}",
        h.agent_version >> 16,
        h.agent_version & 0xffff
    )?;
    writeln!(out, "cpus {}", h.cpu_count)?;
    writeln!(out, "max read {:#x} bytes", h.max_read)?;
    writeln!(
        out,
        "smram base {:#x} size {:#x}",
        h.smram_base, h.smram_size
    )?;
    writeln!(out, "sev flags {:#x} c-bit {}", h.sev_flags, h.c_bit)?;
    if h.mem_flags & smmvmi_mailbox::records::MEM_DIMM_HOTPLUG != 0 {
        writeln!(
            out,
            "memory: DIMMs plugged after boot are tracked (listed below)"
        )?;
    }
    if virtio {
        writeln!(
            out,
            "memory: a virtio-mem device is present; its memory is NOT read (refused as not RAM): \
             its plugged blocks are known only through the device, which the guest drives"
        )?;
    }
    for r in &info.ram {
        writeln!(out, "ram {:#014x}..{:#014x}", r.base, r.base + r.len)?;
    }
    for (i, c) in info.cpus.iter().enumerate() {
        writeln!(
            out,
            "cpu {i}: paging levels {} flags {:#x}",
            c.paging_levels, c.flags
        )?;
    }
    Ok(Exit::Ok)
}

/// A flag set by the first SIGINT (the command then ends after the request
/// in flight and keeps what it has); a second SIGINT ends the process at
/// once.
fn interrupt_flag() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(Exit::Interrupted as i32);
        }
    });
    stop
}

/// Most bytes one read command asks for (a guard against a typo such as
/// a missing `+`; `ids dump` takes all of RAM).
const MAX_READ_CMD: u64 = 64 << 30;

fn read_cmd(
    cli: &Cli,
    out: &mut dyn Write,
    s: &mut Session,
    args: &ReadArgs,
    virt: Option<AddressSpace>,
) -> anyhow::Result<Exit> {
    let addr = args.range.addr;
    let len = match (args.range.len, args.len) {
        (Some(_), Some(_)) => {
            return Err(CliError::usage(
                "the length is given twice (in the range and as LEN)",
                "write ADDR+LEN, ADDR..END or ADDR LEN",
            )
            .into());
        }
        (Some(l), None) | (None, Some(l)) => l,
        (None, None) => 256,
    };
    if len == 0 || len > MAX_READ_CMD {
        return Err(CliError::usage(
            format!("a length of {len:#x} bytes: expected 1 byte to 64G"),
            "write ADDR+LEN (4096, 0x1000, 4K, 64M) or ADDR..END",
        )
        .into());
    }
    let stdout_tty = std::io::stdout().is_terminal();
    // Raw bytes to stdout: asked for (`-o -`), or the default into a pipe
    // or file (a hex dump there only with --hex; --json and --jsonl keep
    // their own text).
    let to_stdout_raw = args.output.as_deref() == Some(std::path::Path::new("-"))
        || (args.output.is_none() && !args.hex && !stdout_tty && !cli.json && !cli.jsonl);
    if to_stdout_raw && stdout_tty {
        return Err(CliError::usage(
            "-o - writes raw bytes to stdout, which is a terminal",
            "redirect it (`-o - > FILE`, `-o - | sha256sum`) or give a file: -o FILE",
        )
        .into());
    }
    if let Some(space) = &virt {
        check_cpu(s, space.cpu)?;
    }
    let max = s.max_read()? as u64;
    let space = match virt {
        Some(_) => Space::Virt,
        None => {
            let info = s.info()?;
            Space::Phys {
                ram: info.ram.iter().map(|r| (r.base, r.len)).collect(),
                smram: (info.header.smram_base, info.header.smram_size),
            }
        }
    };
    let stop = interrupt_flag();
    let show_bar = !cli.quiet && len >= (1 << 20) && (args.output.is_some() || !stdout_tty);
    let pb = cli::output::progress(len, "reading", show_bar);
    let mut fetch = |a: u64, n: u32| -> Result<_, SessionError> {
        let op = match virt {
            Some(space) => Op::ReadVirt {
                space,
                addr: a,
                len: n,
            },
            None => Op::ReadPhys { addr: a, len: n },
        };
        Ok(s.request(&[op])?.remove(0))
    };
    let tick = |c: u64| pb.set_position(c);
    let what = if virt.is_some() {
        "virtual"
    } else {
        "physical"
    };
    let (o, file_summary): (Outcome, Option<(String, u64, String)>) = match &args.output {
        _ if to_stdout_raw => {
            let mut sink = cli::output::RawSink::new(&mut *out);
            let o = cli::read::stream(
                &mut fetch, &space, addr, len, max, args.holes, &stop, &mut sink, tick,
            )?;
            let written = sink.written;
            let sha = sink.finish()?;
            (o, Some(("stdout".into(), written, sha)))
        }
        Some(path) => {
            let f = std::fs::File::create(path).map_err(|e| {
                CliError::new(
                    Exit::Failure,
                    format!("cannot create {}: {e}", path.display()),
                )
            })?;
            let mut sink = cli::output::RawSink::new(std::io::BufWriter::new(f));
            let o = cli::read::stream(
                &mut fetch, &space, addr, len, max, args.holes, &stop, &mut sink, tick,
            )?;
            let written = sink.written;
            let sha = sink.finish()?;
            (o, Some((path.display().to_string(), written, sha)))
        }
        None if cli.json => {
            let mut sink = cli::output::JsonSink::default();
            let o = cli::read::stream(
                &mut fetch, &space, addr, len, max, args.holes, &stop, &mut sink, tick,
            )?;
            writeln!(
                out,
                "{}",
                serde_json::json!({
                    "space": what,
                    "addr": format!("{addr:#x}"),
                    "len": len,
                    "read": o.read,
                    "covered": o.covered,
                    "complete": o.complete(),
                    "interrupted": o.interrupted,
                    "holes": o.holes,
                    "hex": sink.hex,
                })
            )?;
            (o, None)
        }
        None if cli.jsonl => {
            let mut sink = cli::output::JsonlSink(&mut *out);
            let o = cli::read::stream(
                &mut fetch, &space, addr, len, max, args.holes, &stop, &mut sink, tick,
            )?;
            (o, None)
        }
        None => {
            let mut sink = cli::output::HexSink(Some(cli::render::HexDump::new(&mut *out, addr)));
            let o = cli::read::stream(
                &mut fetch, &space, addr, len, max, args.holes, &stop, &mut sink, tick,
            )?;
            sink.0.take().expect("dump").finish()?;
            (o, None)
        }
    };
    pb.finish_and_clear();
    out.flush()?;
    finish_read(cli, out, what, addr, len, o, file_summary)
}

fn finish_read(
    cli: &Cli,
    out: &mut dyn Write,
    what: &str,
    addr: u64,
    len: u64,
    mut o: Outcome,
    file: Option<(String, u64, String)>,
) -> anyhow::Result<Exit> {
    let end = addr.wrapping_add(o.covered);
    let in_holes: u64 = o.holes.iter().map(|h| h.len).sum();
    if let Some((path, written, sha)) = &file {
        if cli.json || cli.jsonl {
            writeln!(
                out,
                "{}",
                serde_json::json!({
                    "space": what,
                    "file": path,
                    "addr": format!("{addr:#x}"),
                    "len": len,
                    "read": o.read,
                    "written": written,
                    "covered": o.covered,
                    "complete": o.complete(),
                    "interrupted": o.interrupted,
                    "holes": o.holes,
                    "sha256": sha,
                })
            )?;
        } else if !cli.quiet {
            eprintln!(
                "ids: {path}: {written:#x} bytes of {what} {addr:#x}..{end:#x} ({:#x} read{}), sha256 {sha}",
                o.read,
                if in_holes > 0 {
                    format!(", {in_holes:#x} unreadable")
                } else {
                    String::new()
                }
            );
        }
    }
    if !cli.quiet && o.read > 0 && !o.holes.is_empty() && (!cli.json || file.is_some()) {
        for h in o.holes.iter().take(20) {
            eprintln!(
                "ids: not read: {:#x}..{:#x} ({:#x} bytes): {}",
                h.addr,
                h.addr.wrapping_add(h.len),
                h.len,
                h.reason
            );
        }
        if o.holes.len() > 20 {
            eprintln!("ids: ... and {} more unreadable ranges", o.holes.len() - 20);
        }
    }
    if o.interrupted {
        eprintln!(
            "ids: interrupted at {end:#x}: {:#x} of {len:#x} bytes covered ({what} {addr:#x}..{end:#x}); what was read is kept",
            o.covered
        );
        return Ok(Exit::Interrupted);
    }
    if let Some(e) = o.failed.take() {
        if o.covered > 0 {
            eprintln!(
                "ids: the read stopped at {end:#x}: {:#x} of {len:#x} bytes covered and kept",
                o.covered
            );
        }
        return Err(e.into());
    }
    if o.read == 0 && !o.holes.is_empty() {
        let h = &o.holes[0];
        return Err(CliError {
            exit: Exit::Refused,
            message: format!(
                "nothing readable in {what} {addr:#x}..{:#x}: {}",
                addr.wrapping_add(len),
                h.reason
            ),
            hint: Some(if what == "virtual" {
                format!("`ids translate {addr:#x}` shows the page walk; check the address and the CPU or --cr3")
            } else {
                "`ids info` lists the RAM ranges the agent reads".into()
            }),
        }
        .into());
    }
    if o.stopped || !o.holes.is_empty() {
        if o.stopped {
            eprintln!(
                "ids: stopped at the first unreadable byte, {end:#x} (--holes stop): {:#x} of {len:#x} bytes kept",
                o.read
            );
        }
        return Ok(Exit::Partial);
    }
    Ok(Exit::Ok)
}

/// Fails with the CPUs that exist when `cpu` is not one of them (asked of
/// INFO first: through the daemon a request for a missing vCPU would be
/// refused before the agent could say so).
fn check_cpu(s: &mut Session, cpu: u32) -> anyhow::Result<()> {
    let count = s.info()?.header.cpu_count;
    if cpu >= count {
        return Err(SessionError::NoSuchCpu { cpu, count }.into());
    }
    Ok(())
}

fn translate(
    cli: &Cli,
    out: &mut dyn Write,
    s: &mut Session,
    space: AddressSpace,
    addr: u64,
) -> anyhow::Result<Exit> {
    check_cpu(s, space.cpu)?;
    let r = s
        .request_on_cpu(space.cpu, &[Op::Translate { space, addr }])?
        .remove(0);
    if r.status == Status::BadRequest
        && let Ok(info) = s.info()
        && space.cpu >= info.header.cpu_count
    {
        return Err(SessionError::NoSuchCpu {
            cpu: space.cpu,
            count: info.header.cpu_count,
        }
        .into());
    }
    let rec = WalkRecord::decode(&r.data).ok();
    let rec = match (r.status, rec) {
        (
            Status::Ok | Status::NotPresent | Status::RefusedNotRam | Status::RefusedSmram,
            Some(rec),
        ) => rec,
        (status, _) => {
            return Err(SessionError::Op {
                op: format!("translating {addr:#x}"),
                status,
                level: r.level,
                aux: addr,
            }
            .into());
        }
    };
    let levels: Vec<serde_json::Value> = (0..rec.depth.min(5) as usize)
        .map(|i| {
            let level = rec.levels.saturating_sub(i as u8);
            let (ea, ev) = rec.entries[i];
            serde_json::json!({
                "level": level,
                "name": cli::render::level_name(level),
                "index": (addr >> (12 + 9 * (u32::from(level.max(1)) - 1))) & 0x1ff,
                "entry_addr": format!("{ea:#x}"),
                "entry": format!("{ev:#x}"),
                "flags": cli::render::pte_flags(ev),
            })
        })
        .collect();
    let ok = r.status == Status::Ok;
    let why = (!ok).then(|| {
        let w = ids::session::status_words(r.status, r.level, addr);
        w.split(". ").next().unwrap_or(&w).to_string()
    });
    if cli.json || cli.jsonl {
        writeln!(
            out,
            "{}",
            serde_json::json!({
                "va": format!("{addr:#x}"),
                "pa": ok.then(|| format!("{:#x}", rec.pa)),
                "page_size": ok.then(|| 1u64 << rec.page_shift),
                "paging_levels": rec.levels,
                "cpu": space.cpu,
                "cr3": space.cr3.map(|c| format!("{c:#x}")),
                "walk": levels,
                "error": why,
            })
        )?;
    } else {
        writeln!(
            out,
            "{addr:#x} through {}, {}-level paging:",
            match space.cr3 {
                Some(c) => format!("CR3 {c:#x}"),
                None => format!("CPU {}'s CR3", space.cpu),
            },
            rec.levels
        )?;
        for l in &levels {
            writeln!(
                out,
                "  {:<5} [{:>3}] at {:>14} = {:>18}  {}",
                l["name"].as_str().unwrap_or(""),
                l["index"],
                l["entry_addr"].as_str().unwrap_or(""),
                l["entry"].as_str().unwrap_or(""),
                l["flags"].as_str().unwrap_or("")
            )?;
        }
        match &why {
            None => writeln!(
                out,
                "  -> physical {:#x} ({} page)",
                rec.pa,
                match rec.page_shift {
                    12 => "4 KiB".to_string(),
                    21 => "2 MiB".into(),
                    30 => "1 GiB".into(),
                    n => format!("2^{n} byte"),
                }
            )?,
            Some(w) => writeln!(out, "  -> {w}")?,
        }
    }
    Ok(if ok { Exit::Ok } else { Exit::Refused })
}

fn cpu_state(
    cli: &Cli,
    out: &mut dyn Write,
    s: &mut Session,
    cpu: u32,
    no_symbols: bool,
) -> anyhow::Result<Exit> {
    check_cpu(s, cpu)?;
    let st: CpuState = s.cpu_state(cpu)?;
    let mut symbols: Vec<(u64, String)> = Vec::new();
    if !no_symbols && st.msrs_valid == 1 {
        let pb = spinner(
            cli,
            "loading kernel symbols (a few seconds the first time, cached after)",
        );
        let cache = if cli.no_cache {
            None
        } else {
            linux::cache_dir()
        };
        let d = Discovery {
            cpu,
            full_symbols: true,
            ..Discovery::default()
        };
        match Kernel::load(s, &d, cache.as_deref()) {
            Ok(k) => {
                symbols = k
                    .kallsyms
                    .symbols
                    .iter()
                    .filter(|s| matches!(s.kind, 'T' | 't' | 'W' | 'w'))
                    .map(|s| (s.addr, s.name.clone()))
                    .collect();
                symbols.sort();
            }
            Err(e) => {
                if !cli.quiet {
                    eprintln!("ids: no symbols ({e}); --no-symbols skips them");
                }
            }
        }
        pb.finish_and_clear();
    }
    let lookup = |a: u64| -> Option<String> {
        let i = symbols.partition_point(|(sa, _)| *sa <= a).checked_sub(1)?;
        let (sa, name) = &symbols[i];
        let off = a - sa;
        (off < (1 << 20)).then(|| {
            if off == 0 {
                name.clone()
            } else {
                format!("{name}+{off:#x}")
            }
        })
    };
    let sym: Option<cli::render::Symbolizer<'_>> =
        (!symbols.is_empty()).then_some(&lookup as &dyn Fn(u64) -> Option<String>);
    if cli.json || cli.jsonl {
        writeln!(out, "{}", cli::render::cpu_state_json(cpu, &st, sym))?;
    } else {
        cli::render::cpu_state_text(out, cpu, &st, sym)?;
    }
    Ok(Exit::Ok)
}
