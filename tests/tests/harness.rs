//! Self-tests of the harness on QEMU: a firmware that fails must produce a
//! report that says why (decoded isa-debug-exit code, debug console tail), and
//! a guest that never comes up must hit the deadline and leave no QEMU behind.
//! These boot tiny hand-made firmware images, not ours.
//!
//! Run with `cargo xtask test` (these are `#[ignore]`d for plain `cargo test`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use smmvmi_tests::vm::{Firmware, Vm, VmConfig, VmError};

/// A 64 KiB ROM whose reset vector (at 0xFFFF0) runs `code` in real mode.
fn rom(name: &str, code: &[u8]) -> PathBuf {
    let mut image = vec![0xF4u8; 64 * 1024]; // hlt everywhere
    image[0xFFF0..0xFFF0 + code.len()].copy_from_slice(code);
    let path = std::env::temp_dir().join(format!("smmvmi-{name}-{}.rom", std::process::id()));
    std::fs::write(&path, image).expect("write test ROM");
    path
}

fn vm_name(test: &str) -> String {
    format!("t-{test}-{}", std::process::id())
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn boot_failure_reports_debug_exit_code_and_debug_console() {
    // mov dx,0x402; mov al,'X'; out dx,al; mov al,10; out dx,al; mov al,5; out 0xf4,al; hlt
    let code = [
        0xBA, 0x02, 0x04, 0xB0, b'X', 0xEE, 0xB0, 0x0A, 0xEE, 0xB0, 0x05, 0xE6, 0xF4, 0xF4,
    ];
    let fw = rom("exit5", &code);
    let config = VmConfig::new(vm_name("exit5"), Firmware::Ours(fw.clone()))
        .boot_timeout(Duration::from_secs(60));
    let err = Vm::up(config)
        .err()
        .expect("a firmware that exits cannot boot");
    let _ = std::fs::remove_file(fw);
    let VmError::BootFailed(report) = &err else {
        panic!("expected BootFailed, got {err}")
    };
    assert!(report.reason.contains("QEMU exited"), "{err}");
    assert!(
        report.qemu_status.contains("the firmware wrote 0x5"),
        "{err}"
    );
    assert_eq!(report.debugcon_tail.trim(), "X", "{err}");
    assert!(err.to_string().contains("debugcon.log"), "{err}");
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn silent_guest_hits_the_deadline_and_qemu_is_killed() {
    let fw = rom("hang", &[0xFA, 0xF4, 0xEB, 0xFD]); // cli; hlt; jmp $-1
    let name = vm_name("hang");
    let config =
        VmConfig::new(&name, Firmware::Ours(fw.clone())).boot_timeout(Duration::from_secs(3));
    let started = Instant::now();
    let err = Vm::up(config)
        .err()
        .expect("a hanging firmware cannot boot");
    let _ = std::fs::remove_file(fw);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the deadline was not honoured"
    );
    let VmError::BootFailed(report) = &err else {
        panic!("expected BootFailed, got {err}")
    };
    assert!(report.reason.contains("no ready marker within"), "{err}");
    let alive = Vm::list()
        .into_iter()
        .any(|(info, alive)| info.name == name && alive);
    assert!(!alive, "QEMU of {name} still runs after the failed boot");
}
