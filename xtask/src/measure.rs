//! `cargo xtask measure`: the expected SEV launch digest of the firmware
//! image, and of the kernel hashes table when a kernel is given, so that a
//! guest owner can check `query-sev-launch-measure` before injecting the
//! key (`smmvmi_tests::sev` says what is hashed and where each fact comes
//! from). The independent check is sev-snp-measure
//! (`tests/tests/sev_measure.rs`).

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use smmvmi_tests::sev::{self, DirectBoot};

#[derive(Parser)]
pub struct Args {
    /// Firmware image (default: build ours, target/release/smmvmi-firmware.bin).
    #[arg(long)]
    firmware: Option<PathBuf>,
    /// bzImage for a measured direct boot (QEMU `-kernel` with
    /// `sev-guest,kernel-hashes=on`).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// initrd (`-initrd`); needs --kernel.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line (`-append`), exactly as given to QEMU; needs --kernel.
    #[arg(long, requires = "kernel")]
    append: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    let image = match args.firmware {
        Some(p) => p,
        None => crate::firmware::build(&crate::root())?,
    };
    let (secret, hashes) = sev::areas(&image)?;
    let show = |a: Option<smmvmi_boot::ovmf_table::Area>| match a {
        Some(a) => format!("{:#x}+{:#x}", a.base, a.size),
        None => "none".into(),
    };
    eprintln!("    image {}", image.display());
    eprintln!(
        "    SEV secret area {}, hashes area {}",
        show(secret),
        show(hashes)
    );
    let boot = args.kernel.map(|kernel| DirectBoot {
        kernel,
        initrd: args.initrd,
        append: args.append,
    });
    let digest = sev::launch_digest(&image, boot.as_ref())?;
    eprintln!(
        "    SEV launch digest: SHA-256 of the flash image{}",
        if boot.is_some() {
            " then the padded kernel hashes table"
        } else {
            ""
        }
    );
    println!("{digest}");
    Ok(())
}
