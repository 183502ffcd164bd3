//! `cargo xtask`: the one entry point for building, testing, benchmarking and
//! demonstrating smmvmi (one file per task, in the style of Hubris and propolis).
//!
//! Every task installs what it needs (Debian packages, the guest kernel
//! package) when it is missing, so a fresh Debian 12 machine needs nothing
//! but Rust. Progress goes to stderr; machine-readable results to stdout.

mod bench;
mod bench_agent;
mod bench_daemon;
mod bench_dump;
mod bench_ids;
mod bench_injector;
mod bench_paper;
mod bench_paper_chart;
mod bench_smi;
mod bench_watch;
mod build;
mod demo;
mod firmware;
mod guest_image;
mod lint;
mod measure;
mod qemu_patched;
mod test;
mod vm;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use smmvmi_tests::vm::Firmware;

/// Build, test, benchmark and demo smmvmi.
#[derive(Parser)]
#[command(name = "cargo xtask", version, about)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the firmware image and the guest image (kernel + initramfs).
    Build(build::Args),
    /// Build (or find cached) the guest kernel and initramfs; print them as JSON.
    GuestImage(guest_image::Args),
    /// Start, use, stop and list VMs.
    #[command(subcommand)]
    Vm(vm::Command),
    /// Run the whole suite: unit tests, then end-to-end tests on QEMU.
    Test(test::Args),
    /// Benchmarks (not tests): boot time vs SeaBIOS/OVMF, SMI round trip.
    #[command(subcommand)]
    Bench(bench::Command),
    /// Boot a monitored VM and show the SMM agent answering SMIs from the host.
    Demo(demo::Args),
    /// cargo fmt --check and clippy -D warnings over the workspace.
    Lint,
    /// Print the expected SEV launch digest of the firmware image (and kernel hashes).
    Measure(measure::Args),
    /// Build (or find cached) QEMU 7.2 from Debian's source with patches-qemu/; print its path.
    QemuPatched(qemu_patched::Args),
}

/// Which firmware a VM boots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum FirmwareChoice {
    /// The smmvmi firmware (built by `cargo xtask build`).
    #[default]
    Ours,
    /// Debian's SeaBIOS (no SMM agent; harness checks and baselines).
    Seabios,
    /// Debian's OVMF (baseline for benchmarks).
    Ovmf,
}

impl FirmwareChoice {
    /// Builds our firmware when needed and returns the harness's view of it.
    pub fn resolve(self) -> anyhow::Result<Firmware> {
        Ok(match self {
            Self::Ours => Firmware::Ours(firmware::build(&root())?),
            Self::Seabios => Firmware::SeaBios,
            Self::Ovmf => Firmware::Ovmf,
        })
    }
}

/// The repository root.
pub fn root() -> PathBuf {
    smmvmi_tests::repo_root()
}

/// Progress line on stderr.
pub fn step(msg: &str) {
    eprintln!("==> {msg}");
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Build(args) => build::run(args),
        Task::GuestImage(args) => guest_image::run(args),
        Task::Vm(cmd) => vm::run(cmd),
        Task::Test(args) => test::run(args),
        Task::Bench(cmd) => bench::run(cmd),
        Task::Demo(args) => demo::run(args),
        Task::Lint => lint::run(),
        Task::Measure(args) => measure::run(args),
        Task::QemuPatched(args) => qemu_patched::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
