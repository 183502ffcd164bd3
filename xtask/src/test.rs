//! `cargo xtask test`: the whole suite. Installs what is missing, builds the
//! firmware and the guest image, runs the unit tests and the linters
//! (fmt, clippy -D warnings), then the end-to-end
//! tests on QEMU (the `#[ignore]`d integration tests of `smmvmi-tests`; the
//! patched-QEMU cases — tests/tests/qemu_patched.rs, and the
//! `*_on_patched_qemu_*` cases of linux.rs and daemon.rs — on the QEMU built
//! by `cargo xtask qemu-patched`, found through `$SMMVMI_QEMU_PATCHED`), with
//! two at a time (two host cores, TCG). Exits non-zero on any failure.

use std::process::Command;
use std::time::Instant;

use anyhow::bail;
use smmvmi_tests::guest_image::{self, KernelDeb};
use smmvmi_tests::vm::{FIRMWARE_ENV, Firmware, QEMU_PATCHED_ENV};

use crate::FirmwareChoice;

/// VM names of the end-to-end tests start with this (see tests/tests/common).
const TEST_VM_PREFIX: &str = "t-";

#[derive(clap::Args)]
pub struct Args {
    /// Firmware the end-to-end tests boot (seabios checks the harness only:
    /// SMM tests fail there by design).
    #[arg(long, value_enum, default_value_t)]
    pub firmware: FirmwareChoice,
    /// Kernel package name (apt-get download) or path to a local .deb.
    #[arg(long, value_name = "NAME|PATH", default_value = guest_image::DEFAULT_KERNEL_DEB)]
    pub kernel_deb: KernelDeb,
    /// Skip the unit tests.
    #[arg(long)]
    pub no_unit: bool,
    /// Skip the end-to-end tests.
    #[arg(long)]
    pub no_e2e: bool,
    /// Skip `cargo fmt --check` and clippy (`cargo xtask lint`).
    #[arg(long)]
    pub no_lint: bool,
    /// Only end-to-end tests whose name contains this.
    #[arg(long)]
    pub filter: Option<String>,
    /// Do not build the patched QEMU (`cargo xtask qemu-patched`); the
    /// patched-QEMU tests then skip themselves (and say so).
    #[arg(long)]
    pub no_qemu_patched: bool,
    /// Parallel end-to-end tests.
    #[arg(long, default_value_t = 2)]
    pub test_threads: u32,
}

struct Stage {
    name: String,
    ok: bool,
    secs: f64,
    note: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let root = crate::root();
    let mut stages: Vec<Stage> = Vec::new();
    let mut record = |name: &str, ok: bool, t: Instant, note: String| {
        stages.push(Stage {
            name: name.into(),
            ok,
            secs: t.elapsed().as_secs_f64(),
            note,
        });
    };

    crate::step("host packages");
    let t = Instant::now();
    smmvmi_tests::host::ensure_packages(&mut |m| eprintln!("    {m}"))?;
    record("host packages", true, t, String::new());

    let t = Instant::now();
    let image = crate::guest_image::build(&args.kernel_deb)?;
    record("guest image", true, t, image.kernel_release.clone());

    crate::step(&format!("firmware ({:?})", args.firmware));
    let t = Instant::now();
    let firmware = match args.firmware.resolve() {
        Ok(fw) => {
            record("firmware", true, t, fw_note(&fw));
            Some(fw)
        }
        Err(e) => {
            eprintln!("    firmware build failed: {e:#}");
            record("firmware", false, t, format!("{e:#}"));
            None
        }
    };

    // The test-only firmware variant whose APM command 0xFE faults in SMM
    // (tests/tests/smm_fault.rs).
    let mut fault_fw = None;
    if firmware.is_some() && args.firmware == FirmwareChoice::Ours {
        crate::step("fault-injection firmware variant");
        let t = Instant::now();
        match crate::firmware::build_variant(&root, Some("fault-injection")) {
            Ok(p) => {
                record("fault fw", true, t, p.display().to_string());
                fault_fw = Some(p);
            }
            Err(e) => {
                eprintln!("    fault-injection firmware build failed: {e:#}");
                record("fault fw", false, t, format!("{e:#}"));
            }
        }
    }

    // The QEMU with patches-qemu/ (cached; about 5 minutes when cold), for
    // the patched-QEMU tests only (they pick it from $SMMVMI_QEMU_PATCHED):
    // every other test runs the stock QEMU.
    let mut patched_qemu = None;
    if !args.no_e2e && !args.no_qemu_patched {
        let t = Instant::now();
        match crate::qemu_patched::build(&root, 2, false) {
            Ok(p) => {
                record("qemu-patched", true, t, p.display().to_string());
                patched_qemu = Some(p);
            }
            Err(e) => {
                eprintln!("    patched QEMU build failed: {e:#}");
                record("qemu-patched", false, t, format!("{e:#}"));
            }
        }
    }

    // The attack-simulation module for both test kernels (installs their
    // linux-headers; cached), before the tests that load it run in parallel.
    if !args.no_e2e {
        crate::step("attack-simulation modules (tests/attacks/)");
        let t = Instant::now();
        let mut releases = vec![image.kernel_release.clone()];
        if let Ok(smmvmi_tests::guest_image::KernelDeb::Package(p)) =
            smmvmi_tests::guest_image::resolve_lts_612()
            && let Some(r) = smmvmi_tests::attack::release_of_package(&p)
        {
            releases.push(r.to_string());
        }
        let built: Result<Vec<_>, _> = releases
            .iter()
            .map(|r| smmvmi_tests::attack::build(r))
            .collect();
        match built {
            Ok(_) => record("attack modules", true, t, releases.join(", ")),
            Err(e) => {
                eprintln!("    attack module build failed: {e}");
                record("attack modules", false, t, e.to_string());
            }
        }
    }

    // Volatility 3 and drgn (pinned, from PyPI) for tests/tests/forensics.rs.
    if !args.no_e2e {
        crate::step("Python venv (Volatility 3, drgn)");
        let t = Instant::now();
        match smmvmi_tests::venv::ensure(&mut |m| eprintln!("    {m}")) {
            Ok(d) => record("venv", true, t, d.display().to_string()),
            Err(e) => {
                eprintln!("    {e}");
                record("venv", false, t, e.to_string());
            }
        }
    }

    // vhost-device-vsock (crates.io, pinned) for the IDS VM's vsock device
    // (tests/tests/ids_vm.rs): this host has no /dev/vhost-vsock.
    if !args.no_e2e {
        crate::step("vhost-device-vsock (the IDS VM's vsock device)");
        let t = Instant::now();
        match smmvmi_tests::ids_vm::vhost_device_vsock() {
            Ok(p) => record("vhost-device-vsock", true, t, p.display().to_string()),
            Err(e) => {
                eprintln!("    {e}");
                record("vhost-device-vsock", false, t, e.to_string());
            }
        }
    }

    if !args.no_unit {
        crate::step("unit tests (cargo test --workspace)");
        let t = Instant::now();
        // The end-to-end suites (tests/tests/*.rs) are left out here: they
        // run in the end-to-end stage below, and listing them as "ignored,
        // run with cargo xtask test" while it runs would only confuse.
        let ok = cargo(
            &root,
            &[
                "test",
                "--workspace",
                "--exclude",
                "smmvmi-firmware",
                "--exclude",
                "smmvmi-tests",
            ],
            &[],
        )? && cargo(&root, &["test", "-p", "smmvmi-tests", "--lib"], &[])?;
        record("unit tests", ok, t, String::new());
    }

    if !args.no_lint {
        let t = Instant::now();
        match crate::lint::run() {
            Ok(()) => record("lint", true, t, String::new()),
            Err(e) => record("lint", false, t, format!("{e:#}")),
        }
    }

    if !args.no_e2e {
        let t = Instant::now();
        match &firmware {
            None => record("end-to-end", false, t, "not run: no firmware image".into()),
            Some(fw) => {
                crate::step(&format!(
                    "end-to-end tests on QEMU ({}, {} at a time)",
                    fw.label(),
                    args.test_threads
                ));
                let fw_value = match fw {
                    Firmware::Ours(p) => p.display().to_string(),
                    other => other.label().to_string(),
                };
                let mut env = vec![
                    (FIRMWARE_ENV, fw_value),
                    ("SMMVMI_KERNEL", image.kernel.display().to_string()),
                    ("SMMVMI_INITRD", image.initrd.display().to_string()),
                ];
                if let Some(p) = &patched_qemu {
                    env.push((QEMU_PATCHED_ENV, p.display().to_string()));
                }
                if let Some(p) = &fault_fw {
                    env.push(("SMMVMI_FIRMWARE_FAULT_INJECTION", p.display().to_string()));
                }
                // Every test binary of tests/tests/ (functional, security,
                // harness, firmware_errors, ...): the e2e tests are the
                // `#[ignore]`d ones.
                let mut cargo_args: Vec<String> = [
                    "test",
                    "--no-fail-fast",
                    "--package",
                    "smmvmi-tests",
                    "--tests",
                    "--",
                    "--ignored",
                ]
                .map(String::from)
                .to_vec();
                cargo_args.push(format!("--test-threads={}", args.test_threads));
                if let Some(f) = &args.filter {
                    cargo_args.push(f.clone());
                }
                let refs: Vec<&str> = cargo_args.iter().map(String::as_str).collect();
                let ok = cargo(&root, &refs, &env)?;
                let stale = smmvmi_tests::vm::kill_stale(TEST_VM_PREFIX);
                let note = if stale.is_empty() {
                    String::new()
                } else {
                    format!("killed leftover VMs: {}", stale.join(" "))
                };
                record("end-to-end", ok && stale.is_empty(), t, note);
            }
        }
    }

    eprintln!();
    eprintln!(
        "==== summary ({:.0} s) ====",
        started.elapsed().as_secs_f64()
    );
    for s in &stages {
        eprintln!(
            "  {:<14} {:<4} {:>6.1} s  {}",
            s.name,
            if s.ok { "ok" } else { "FAIL" },
            s.secs,
            s.note.lines().next().unwrap_or("")
        );
    }
    let failed: Vec<&str> = stages
        .iter()
        .filter(|s| !s.ok)
        .map(|s| s.name.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("test suite failed: {}", failed.join(", "));
    }
    eprintln!("all passed");
    Ok(())
}

fn fw_note(fw: &Firmware) -> String {
    match fw {
        Firmware::Ours(p) => p.display().to_string(),
        other => other.label().to_string(),
    }
}

/// Runs cargo with `args` in `root`; true on success.
fn cargo(root: &std::path::Path, args: &[&str], env: &[(&str, String)]) -> anyhow::Result<bool> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(args).current_dir(root);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let status = cmd
        .status()
        .map_err(|e| anyhow::anyhow!("running cargo {}: {e}", args.join(" ")))?;
    Ok(status.success())
}
