//! `cargo xtask lint`: formatting and clippy, warnings are errors.

use std::process::Command;

use anyhow::{Context, bail};

pub fn run() -> anyhow::Result<()> {
    let root = crate::root();
    let checks: [(&str, &[&str]); 2] = [
        ("cargo fmt --check", &["fmt", "--all", "--", "--check"]),
        (
            "cargo clippy -D warnings",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
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
