//! RAM plugged after boot (a pc-dimm through QEMU's ACPI memory hot-plug)
//! is readable by the agent once the platform reports it, and forgotten
//! once the DIMM is removed; the agent learns it from the platform, never
//! from the guest OS.
//!
//! Run with `cargo xtask test` (these are `#[ignore]`d for plain `cargo test`).

mod common;

use std::time::{Duration, Instant};

use common::{boot, config, finish, ids_session, sh};
use ids::session::SessionError;
use serde_json::json;
use smmvmi_mailbox::records::{MEM_DIMM_HOTPLUG, MEM_VIRTIO_MEM_REFUSED};
use smmvmi_mailbox::wire::Status;
use smmvmi_tests::vm::Vm;

const GIB: u64 = 1 << 30;

/// QEMU's own view of 32 bytes of guest physical memory (`xp`), as bytes.
fn qemu_xp(vm: &Vm, addr: u64) -> Vec<u8> {
    let out = vm
        .hmp(&format!("xp /4xg {addr:#x}"))
        .unwrap_or_else(|e| panic!("{e}"));
    out.split_whitespace()
        .filter(|w| w.starts_with("0x") && !w.ends_with(':'))
        .flat_map(|w| {
            u64::from_str_radix(w.trim_start_matches("0x"), 16)
                .unwrap_or_else(|_| panic!("xp output {out:?}"))
                .to_le_bytes()
        })
        .collect()
}

fn wait_guest(vm: &Vm, what: &str, cmd: &str, want: impl Fn(&str) -> bool) -> String {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let out = sh(vm, cmd);
        if want(&out) {
            return out;
        }
        assert!(Instant::now() < end, "{what}: guest said {out:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn ram_ranges(vm: &Vm) -> Vec<(u64, u64)> {
    let mut s = ids_session(vm);
    let info = s.info().unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(
        info.header.mem_flags & MEM_DIMM_HOTPLUG,
        0,
        "INFO must say that DIMMs are tracked"
    );
    info.ram.iter().map(|r| (r.base, r.len)).collect()
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn a_hotplugged_dimm_is_read_through_the_agent_and_forgotten_when_removed() {
    let vm = boot(
        config("memhp")
            .mem("1G,slots=2,maxmem=4G")
            .append("memhp_default_state=online_movable"),
    );
    let before = ram_ranges(&vm);
    assert!(before.iter().all(|&(b, l)| b + l <= 4 * GIB), "{before:x?}");

    vm.qmp(
        "object-add",
        Some(json!({"qom-type": "memory-backend-ram", "id": "m1", "size": GIB})),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    vm.qmp(
        "device_add",
        Some(json!({"driver": "pc-dimm", "id": "d1", "memdev": "m1"})),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let devices = vm
        .qmp("query-memory-devices", None)
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = devices[0]["data"]["addr"]
        .as_u64()
        .unwrap_or_else(|| panic!("query-memory-devices: {devices}"));
    let iomem = format!("{addr:x}-{:x} : System RAM", addr + GIB - 1);
    wait_guest(&vm, "the guest onlines the DIMM", "cat /proc/iomem", |o| {
        o.contains(&iomem)
    });

    // The agent now lists the DIMM and reads it as QEMU does.
    vm.release_qmp();
    let after = ram_ranges(&vm);
    assert!(
        after.contains(&(addr, GIB)),
        "INFO after plugging {GIB:#x} bytes at {addr:#x}: {after:x?}"
    );
    let probe = addr + 0x1000;
    let mut s = ids_session(&vm);
    let via_agent = s.read_phys(probe, 32).unwrap_or_else(|e| panic!("{e}"));
    drop(s);
    assert_eq!(
        via_agent,
        qemu_xp(&vm, probe),
        "READ_PHYS {probe:#x} vs QEMU xp"
    );

    // Removal: the guest offlines the (movable) memory and QEMU drops the
    // DIMM; the agent refuses the range again.
    vm.qmp("device_del", Some(json!({"id": "d1"})))
        .unwrap_or_else(|e| panic!("{e}"));
    let end = Instant::now() + Duration::from_secs(60);
    while vm
        .qmp("query-memory-devices", None)
        .unwrap_or_else(|e| panic!("{e}"))
        .as_array()
        .is_some_and(|a| !a.is_empty())
    {
        assert!(Instant::now() < end, "QEMU kept the DIMM after device_del");
        std::thread::sleep(Duration::from_millis(200));
    }
    vm.release_qmp();
    let mut s = ids_session(&vm);
    match s.read_phys(probe, 32) {
        Err(SessionError::Op { status, .. }) => assert_eq!(status, Status::RefusedNotRam),
        other => panic!("READ_PHYS of a removed DIMM: expected RefusedNotRam, got {other:?}"),
    }
    drop(s);
    assert_eq!(ram_ranges(&vm), before);
    finish(vm);
}

/// virtio-mem memory is refused, and INFO says why (its plugged blocks are
/// known only through the device the guest drives).
#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn virtio_mem_is_refused_with_a_reason() {
    let vm = boot(
        config("virtiomem")
            .mem("1G,maxmem=4G")
            .extra_arg("-object")
            .extra_arg("memory-backend-ram,id=vmem0,size=1G")
            .extra_arg("-device")
            .extra_arg("virtio-mem-pci,id=vm0,memdev=vmem0,requested-size=512M"),
    );
    let devices = vm
        .qmp("query-memory-devices", None)
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = devices[0]["data"]["memaddr"]
        .as_u64()
        .unwrap_or_else(|| panic!("query-memory-devices: {devices}"));
    vm.release_qmp();
    let mut s = ids_session(&vm);
    let info = s.info().unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(
        info.header.mem_flags & MEM_VIRTIO_MEM_REFUSED,
        0,
        "INFO must say virtio-mem memory is refused: {:?}",
        info.header
    );
    assert!(
        info.ram
            .iter()
            .all(|r| r.base + r.len <= addr || r.base >= addr + GIB)
    );
    match s.read_phys(addr + 0x1000, 32) {
        Err(SessionError::Op { status, .. }) => assert_eq!(status, Status::RefusedNotRam),
        other => panic!("READ_PHYS of virtio-mem memory: expected RefusedNotRam, got {other:?}"),
    }
    drop(s);
    finish(vm);
}
