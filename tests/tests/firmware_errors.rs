//! Bad machine configurations: the firmware must stop with a clear message
//! on the debug console and a distinct isa-debug-exit code, never hang.
//!
//! QEMU's exit status is `(code << 1) | 1` for the code the firmware writes
//! to the isa-debug-exit port (`smmvmi_mailbox::platform::ExitCode`).
//!
//! Run with `cargo xtask test` (these are `#[ignore]`d for plain `cargo test`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use smmvmi_mailbox::platform::ExitCode;
use smmvmi_tests::guest_image::GuestImage;
use smmvmi_tests::vm::{FIRMWARE_ENV, Firmware, debug_device_args};

const DEADLINE: Duration = Duration::from_secs(60);

fn firmware() -> PathBuf {
    match Firmware::from_env() {
        Ok(Firmware::Ours(path)) => path,
        other => {
            panic!("{FIRMWARE_ENV} must name our firmware image for these tests, got {other:?}")
        }
    }
}

fn guest() -> GuestImage {
    GuestImage::from_env().expect("SMMVMI_KERNEL/SMMVMI_INITRD unset: run with `cargo xtask test`")
}

/// Runs QEMU with our firmware and `args`; returns (exit status, debug console).
fn run(test: &str, args: &[&str]) -> (i32, String) {
    let dir = smmvmi_tests::cache_dir()
        .join("vms")
        .join(format!("t-fwerr-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create state dir");
    let debugcon = dir.join("debugcon.log");
    let _ = std::fs::remove_file(&debugcon);
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "none",
        ])
        .args(["-bios", &firmware().display().to_string()])
        .args(debug_device_args(&debugcon))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-system-x86_64");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for QEMU") {
            break status;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{test}: firmware did not stop within {DEADLINE:?}: a silent hang. debugcon:\n{}",
                read(&debugcon)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut log = read(&debugcon);
    if let Some(mut err) = child.stderr.take() {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut text);
        if !text.is_empty() {
            log.push_str("\n--- QEMU stderr ---\n");
            log.push_str(&text);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    (status.code().unwrap_or(-1), log)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn expect_stop(test: &str, args: &[&str], code: ExitCode, message: &str) {
    let (status, log) = run(test, args);
    let want = code.qemu_status();
    assert_eq!(
        status, want,
        "{test}: expected QEMU exit status {want} (firmware code {code:?} = {:#x}); debugcon:\n{log}",
        code as u32
    );
    assert!(
        log.contains(message),
        "{test}: expected the debug console to say {message:?}; it says:\n{log}"
    );
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn no_kernel() {
    expect_stop(
        "nokernel",
        &["-machine", "q35,smm=on", "-m", "512M"],
        ExitCode::NoKernel,
        "no kernel in fw_cfg: start QEMU with -kernel",
    );
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn not_a_bzimage() {
    let junk = std::env::temp_dir().join(format!("smmvmi-junk-{}.bin", std::process::id()));
    // Not a bzImage (no 0xAA55 boot flag, no "HdrS"): zeros with a small
    // setup-sector count at 0x1f1, so that QEMU itself accepts the file and
    // hands it to the firmware as a legacy kernel.
    let mut bytes = vec![0u8; 65536];
    bytes[0x1f1] = 4;
    std::fs::write(&junk, bytes).expect("write junk kernel");
    expect_stop(
        "junk",
        &[
            "-machine",
            "q35,smm=on",
            "-m",
            "512M",
            "-kernel",
            &junk.display().to_string(),
        ],
        ExitCode::BadKernel,
        "is not a bzImage",
    );
    let _ = std::fs::remove_file(junk);
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn no_acpi_tables() {
    let g = guest();
    expect_stop(
        "noacpi",
        &[
            "-machine",
            "q35,smm=on,acpi=off",
            "-m",
            "512M",
            "-kernel",
            &g.kernel.display().to_string(),
        ],
        ExitCode::NoAcpi,
        "no ACPI tables",
    );
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn no_smram() {
    let g = guest();
    expect_stop(
        "nosmm",
        &[
            "-machine",
            "q35,smm=off",
            "-m",
            "512M",
            "-kernel",
            &g.kernel.display().to_string(),
        ],
        ExitCode::NoSmram,
        "no SMI support",
    );
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn too_little_ram() {
    let g = guest();
    expect_stop(
        "lowmem",
        &[
            "-machine",
            "q35,smm=on",
            "-m",
            "64M",
            "-kernel",
            &g.kernel.display().to_string(),
            "-initrd",
            &g.initrd.display().to_string(),
        ],
        ExitCode::TooLittleRam,
        "too little RAM",
    );
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn tseg_too_small() {
    let g = guest();
    expect_stop(
        "smalltseg",
        &[
            "-machine",
            "q35,smm=on",
            "-global",
            "mch.extended-tseg-mbytes=8",
            "-m",
            "512M",
            "-kernel",
            &g.kernel.display().to_string(),
        ],
        ExitCode::NoSmram,
        "TSEG is 8 MiB, need at least 15 MiB",
    );
}
