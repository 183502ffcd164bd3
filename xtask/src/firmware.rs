//! `cargo xtask build` (firmware part): builds the no_std firmware binary with
//! the installed stable toolchain for the host target, then flattens it into
//! the ROM image QEMU maps below 4 GiB.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Builds the firmware and returns the path of the flat ROM image.
pub fn build(root: &Path) -> Result<PathBuf> {
    build_variant(root, None)
}

/// Builds the test-only variant with `feature` enabled (e.g.
/// `fault-injection`) into `smmvmi-firmware-<feature>.bin`.
pub fn build_variant(root: &Path, feature: Option<&str>) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(root).args([
        "rustc",
        "--quiet",
        "--release",
        "--package",
        "smmvmi-firmware",
        "--bin",
        "smmvmi-firmware",
    ]);
    if let Some(feature) = feature {
        cmd.args(["--features", feature]);
    }
    let status = cmd
        .args([
            "--",
            // A fixed load address (see smm-agent/firmware/link.ld), no PIE.
            "-C",
            "relocation-model=static",
        ])
        .status()
        .with_context(|| format!("running {cargo} rustc for the firmware"))?;
    if !status.success() {
        bail!("building the firmware failed ({status}); the compiler output above says why");
    }
    let elf = root.join("target/release/smmvmi-firmware");
    let image = match feature {
        Some(f) => root.join(format!("target/release/smmvmi-firmware-{f}.bin")),
        None => root.join("target/release/smmvmi-firmware.bin"),
    };
    let status = Command::new("objcopy")
        .args(["-O", "binary"])
        .arg(&elf)
        .arg(&image)
        .status()
        .context("running objcopy (package binutils) to flatten the firmware ELF")?;
    if !status.success() {
        bail!("objcopy -O binary {} failed ({status})", elf.display());
    }
    let len = std::fs::metadata(&image)
        .with_context(|| format!("reading {}", image.display()))?
        .len();
    if len == 0 || len % (64 * 1024) != 0 {
        bail!(
            "firmware image {} is {len} bytes; QEMU needs a non-empty multiple of 64 KiB \
             (check ROM_SIZE in smm-agent/firmware/link.ld)",
            image.display()
        );
    }
    Ok(image)
}
