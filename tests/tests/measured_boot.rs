//! Measured direct boot on TCG: a hashes table placed where QEMU's
//! `sev-guest,kernel-hashes=on` puts it (the hashes area the image's
//! GUIDed table names, loaded with `-device loader`), then a matching
//! kernel, initrd and command line boot Linux and a mismatching one is
//! refused with `ExitCode::Measurement` and a message naming the blob.
//!
//! Without SEV QEMU serves a patched setup header (it leaves it as the file
//! only under SEV), so the served kernel's hash is not the file's: the
//! first run puts the file's hash in the table, is refused, and the
//! firmware's message names the hash of what it loaded; the initrd and
//! command-line hashes are always the harness's own, computed from the
//! files. Runs with no table (every other suite) are "not measured".
//!
//! Run with `cargo xtask test` (`#[ignore]`d for plain `cargo test`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use smmvmi_boot::sev::Digest;
use smmvmi_mailbox::platform::ExitCode;
use smmvmi_tests::guest_image::GuestImage;
use smmvmi_tests::sev::{self, DirectBoot};
use smmvmi_tests::vm::{Firmware, debug_device_args};

const DEADLINE: Duration = Duration::from_secs(120);
const APPEND: &str = "console=ttyS0 panic=-1";

fn firmware() -> PathBuf {
    match Firmware::from_env() {
        Ok(Firmware::Ours(p)) => p,
        other => panic!("SMMVMI_FIRMWARE must name our firmware image, got {other:?}"),
    }
}

/// How a run ended.
#[derive(Debug)]
enum End {
    /// The firmware stopped with this QEMU exit status.
    Exit(i32),
    /// Linux printed its banner on the serial console.
    Linux,
}

/// Boots with `table` in the hashes area (none: no loader device) until the
/// firmware exits or Linux prints its banner. Returns how, and debugcon.
fn run(test: &str, boot: &DirectBoot, table: Option<&[u8]>) -> (End, String) {
    let fw = firmware();
    let (_, hashes) = sev::areas(&fw).expect("the image's GUIDed table");
    let hashes = hashes.expect("the image names a hashes area");
    let dir = smmvmi_tests::cache_dir()
        .join("vms")
        .join(format!("t-measured-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let debugcon = dir.join("debugcon.log");
    let serial = dir.join("serial.log");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-display", "none", "-no-reboot"])
        .args(["-machine", "q35,smm=on", "-m", "512M"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-bios")
        .arg(&fw)
        .args(debug_device_args(&debugcon))
        .arg("-kernel")
        .arg(&boot.kernel);
    if let Some(i) = &boot.initrd {
        cmd.arg("-initrd").arg(i);
    }
    if let Some(a) = &boot.append {
        cmd.args(["-append", a]);
    }
    if let Some(t) = table {
        let file = dir.join("hashes.bin");
        std::fs::write(&file, t).unwrap();
        cmd.arg("-device").arg(format!(
            "loader,file={},addr={:#x},force-raw=on",
            file.display(),
            hashes.base
        ));
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-system-x86_64");
    let start = Instant::now();
    let end = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break End::Exit(s.code().unwrap_or(-1));
        }
        if read(&serial).contains("Linux version") {
            let _ = child.kill();
            let _ = child.wait();
            break End::Linux;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{test}: neither a firmware stop nor Linux within {DEADLINE:?}; debugcon:\n{}",
                read(&debugcon)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = read(&debugcon);
    let _ = std::fs::remove_dir_all(&dir);
    (end, log)
}

fn read(p: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned()
}

fn expect_refused(test: &str, end: &End, log: &str, what: &str) {
    let want = ExitCode::Measurement.qemu_status();
    assert!(
        matches!(end, End::Exit(s) if *s == want),
        "{test}: expected exit status {want} (Measurement), got {end:?}; debugcon:\n{log}"
    );
    assert!(
        log.contains(&format!("the {what} loaded over fw_cfg has SHA-256"))
            && log.contains("refusing to boot"),
        "{test}: expected a refusal naming the {what}; debugcon:\n{log}"
    );
}

/// The hex digest the firmware names as "has SHA-256 X".
fn found_digest(log: &str) -> Digest {
    let at = log.find("has SHA-256 ").expect("a mismatch message") + "has SHA-256 ".len();
    let hex = &log[at..at + 64];
    let mut d = [0u8; 32];
    for (i, b) in d.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    Digest(d)
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn matching_blobs_boot_and_each_mismatch_is_refused() {
    let g = GuestImage::from_env().expect("SMMVMI_KERNEL/SMMVMI_INITRD unset");
    let boot = DirectBoot {
        kernel: g.kernel.clone(),
        initrd: Some(g.initrd.clone()),
        append: Some(APPEND.into()),
    };

    // 1. The file's kernel hash: refused (QEMU patched the header it serves
    // without SEV); the message names what was loaded.
    let t0 = Instant::now();
    let served = served_kernel("file-hash", &boot);
    eprintln!(
        "file hash refused in {:?}; served kernel hashes to {served}",
        t0.elapsed()
    );

    // 2. The served kernel's hash, the harness's own initrd and command-line
    // hashes: Linux boots.
    let good = sev::hashes_table_with(&boot, Some(served)).unwrap();
    let t0 = Instant::now();
    let (end, log) = run("match", &boot, Some(&good));
    assert!(
        matches!(end, End::Linux),
        "matching table: expected Linux to start, got {end:?}; debugcon:\n{log}"
    );
    assert!(
        log.contains("measured boot: kernel, initrd and command line match"),
        "{log}"
    );
    eprintln!("matching table booted Linux in {:?}", t0.elapsed());

    // 3. Another initrd than the table's: refused, naming the initrd. The
    // header QEMU serves without SEV depends on the initrd and command line
    // (their placement), so the table carries that run's served kernel hash.
    let dir = std::env::temp_dir().join(format!("smmvmi-measured-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let other_initrd = dir.join("initrd");
    let mut bytes = std::fs::read(&g.initrd).unwrap();
    bytes.extend_from_slice(&[0u8; 512]);
    std::fs::write(&other_initrd, bytes).unwrap();
    let swapped = DirectBoot {
        initrd: Some(other_initrd),
        ..boot.clone()
    };
    let k = served_kernel("initrd-kernel", &swapped);
    let table = sev::hashes_table_with(&boot, Some(k)).unwrap();
    let (end, log) = run("initrd", &swapped, Some(&table));
    expect_refused("initrd", &end, &log, "initrd");

    // 4. Another command line than the table's: refused, naming it.
    let swapped = DirectBoot {
        append: Some(format!("{APPEND} init=/bin/sh")),
        ..boot.clone()
    };
    let k = served_kernel("cmdline-kernel", &swapped);
    let table = sev::hashes_table_with(&boot, Some(k)).unwrap();
    let (end, log) = run("cmdline", &swapped, Some(&table));
    expect_refused("cmdline", &end, &log, "command line");
    let _ = std::fs::remove_dir_all(dir);
}

/// The hash of the kernel as QEMU serves it for `boot` without SEV: a run
/// with the file's hash in the table is refused and names it.
fn served_kernel(test: &str, boot: &DirectBoot) -> Digest {
    let (end, log) = run(test, boot, Some(&sev::hashes_table(boot).unwrap()));
    expect_refused(test, &end, &log, "kernel");
    found_digest(&log)
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn no_table_without_sev_boots_unmeasured_and_says_so() {
    let g = GuestImage::from_env().expect("SMMVMI_KERNEL/SMMVMI_INITRD unset");
    let boot = DirectBoot {
        kernel: g.kernel,
        initrd: Some(g.initrd),
        append: Some(APPEND.into()),
    };
    let (end, log) = run("none", &boot, None);
    assert!(matches!(end, End::Linux), "{end:?}; debugcon:\n{log}");
    assert!(log.contains("not measured: no SEV hashes table"), "{log}");
}
