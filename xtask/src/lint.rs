//! `cargo xtask lint`: formatting and clippy, warnings are errors.

use std::process::Command;

use anyhow::{Context, bail};

pub fn run() -> anyhow::Result<()> {
    let root = crate::root();
    // The firmware is checked on its own: built together with the host
    // crates, feature unification would hand it `std`-enabled dependencies.
    let checks: [(&str, &[&str]); 3] = [
        ("cargo fmt --check", &["fmt", "--all", "--", "--check"]),
        (
            "cargo clippy -D warnings (host crates)",
            &[
                "clippy",
                "--workspace",
                "--exclude",
                "smmvmi-firmware",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        ),
        (
            "cargo clippy -D warnings (firmware)",
            &[
                "clippy",
                "--release",
                "--package",
                "smmvmi-firmware",
                "--",
                "-D",
                "warnings",
            ],
        ),
    ];
    let mut failed = Vec::new();
    for (label, args) in checks {
        crate::step(label);
        let status = Command::new(env!("CARGO"))
            .args(args)
            .current_dir(&root)
            .status()
            .with_context(|| format!("running {label}"))?;
        if !status.success() {
            failed.push(label);
        }
    }
    if !failed.is_empty() {
        bail!(
            "lint failed: {} (fix the reports above; `cargo fmt` fixes formatting)",
            failed.join(", ")
        );
    }
    crate::step("lint clean");
    Ok(())
}
