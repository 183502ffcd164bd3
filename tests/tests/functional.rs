//! Functional end-to-end tests: the guest boots on our firmware with the
//! CPUs and memory it was given, and SMIs from inside the guest and from the
//! host reach the SMM handler while the guest keeps running.
//!
//! Run with `cargo xtask test` (these are `#[ignore]`d for plain `cargo test`).

mod common;

use std::time::{Duration, Instant};

use common::{AGENT_READY, PING, boot, config, finish, sh};
use smmvmi_mailbox::platform::APM_CMD_SERVE;
use smmvmi_tests::vm::{Vm, fresh_ping_value};
use smmvmi_tests::{parse_mem_size, workload};

/// Boots with `smp` vCPUs and `mem` RAM and checks the guest sees both.
fn boot_and_check(test: &str, smp: u32, mem: &str) {
    let vm = boot(config(test).smp(smp).mem(mem));
    check_cpus_and_mem(&vm, smp, mem);
    finish(vm);
}

fn check_cpus_and_mem(vm: &Vm, smp: u32, mem: &str) {
    assert_eq!(
        sh(vm, "nproc"),
        smp.to_string(),
        "guest nproc with -smp {smp}"
    );
    let online = sh(vm, "cat /sys/devices/system/cpu/online");
    let expected_online = if smp == 1 {
        "0".to_string()
    } else {
        format!("0-{}", smp - 1)
    };
    assert_eq!(online, expected_online, "online CPUs with -smp {smp}");

    let meminfo = sh(vm, "grep MemTotal /proc/meminfo");
    let kib: u64 = meminfo
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("unexpected /proc/meminfo line {meminfo:?}"));
    let configured = parse_mem_size(mem).expect("valid size");
    let seen = kib * 1024;
    assert!(
        seen > configured / 100 * 85 && seen <= configured,
        "-m {mem}: guest MemTotal {kib} kB is not within 85%..100% of {configured} bytes"
    );
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn boot_smp1() {
    boot_and_check("smp1", 1, "1G");
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn boot_smp2() {
    boot_and_check("smp2", 2, "1G");
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn boot_smp4() {
    boot_and_check("smp4", 4, "1G");
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn boot_mem_512m() {
    boot_and_check("mem512m", 2, "512M");
}

/// 5 GiB puts RAM above 4 GiB, across the PCI hole: the e820 map must show
/// usable RAM above 4 GiB and the guest must count it.
#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn boot_mem_5g() {
    let vm = boot(config("mem5g").smp(2).mem("5G"));
    let map = smmvmi_tests::e820::parse_dmesg(&sh(&vm, "dmesg"));
    assert!(
        map.iter().any(|e| e.kind == "usable" && e.end >= 1 << 32),
        "-m 5G: expected usable RAM above 4 GiB in the e820 map, found {map:#?}"
    );
    check_cpus_and_mem(&vm, 2, "5G");
    finish(vm);
}

fn wait_ready(vm: &Vm) {
    vm.wait_agent_ready(AGENT_READY)
        .unwrap_or_else(|e| panic!("{e}"));
}

/// `smi 0x10` in the guest (APM port write from user space) reaches the handler.
#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn smi_from_guest_reaches_handler() {
    let vm = boot(config("smi-guest"));
    wait_ready(&vm);
    let before = vm.mailbox().unwrap();
    let value = fresh_ping_value(before.ping_ack);
    vm.ping_with(value, PING, || {
        vm.run_shell_command(&format!("smi {APM_CMD_SERVE:#x}"))
            .map(|_| ())
    })
    .unwrap_or_else(|e| panic!("guest-raised SMI: {e}"));
    let after = vm.mailbox().unwrap();
    assert!(
        after.smi_count > before.smi_count,
        "SMI count did not grow: {} -> {}",
        before.smi_count,
        after.smi_count
    );
    assert_eq!(
        sh(&vm, "echo ok"),
        "ok",
        "guest must keep running after the SMI"
    );
    finish(vm);
}

/// QMP `human-monitor-command` "o /b 0xb2 0x10" reaches the handler.
#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn smi_from_host_reaches_handler() {
    let vm = boot(config("smi-host"));
    wait_ready(&vm);
    let before = vm.mailbox().unwrap();
    for _ in 0..3 {
        vm.host_smi_ping(APM_CMD_SERVE, PING)
            .unwrap_or_else(|e| panic!("host-raised SMI: {e}"));
    }
    let after = vm.mailbox().unwrap();
    assert!(
        after.smi_count >= before.smi_count + 3,
        "SMI count: {} -> {} after 3 acknowledged pings",
        before.smi_count,
        after.smi_count
    );
    assert_eq!(
        sh(&vm, "echo ok"),
        "ok",
        "guest must keep running after host SMIs"
    );
    finish(vm);
}

/// 1,000 host-raised SMIs while the guest computes: no crash, and every run
/// of the workload (integer and SSE arithmetic) prints the host's answer.
///
/// The workload runs in the background in the guest and is restarted when it
/// finishes, so the SMIs overlap it whatever the relative speeds on a loaded
/// host; between batches of SMIs the host checks whether the current run has
/// finished and compares its result.
#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn thousand_host_smis_during_cpu_workload() {
    const SMIS: usize = 1000;
    const BATCH: usize = 50;
    const ITERATIONS: u64 = 50_000_000;
    let vm = boot(config("smi-burn").smp(2));
    wait_ready(&vm);
    let expected = workload::cpuburn_output(ITERATIONS);
    let before = vm.mailbox().unwrap();
    let start_run = |k: usize| {
        sh(
            &vm,
            &format!(
                "(cpuburn {ITERATIONS} >/tmp/burn.{k}.tmp 2>&1; mv /tmp/burn.{k}.tmp /tmp/burn.{k}) \
                 </dev/null >/dev/null 2>&1 &"
            ),
        );
    };
    let finished = |k: usize| -> Option<String> {
        let out = sh(&vm, &format!("cat /tmp/burn.{k} 2>/dev/null || true"));
        (!out.is_empty()).then_some(out)
    };
    let check = |k: usize, out: &str| {
        assert_eq!(
            out, expected,
            "cpuburn run {k} ({ITERATIONS} iterations): guest result differs from the host's: \
             CPU state was corrupted by an SMI"
        );
    };

    let started = Instant::now();
    let (mut run, mut runs_checked, mut overlapped, mut raised) = (0usize, 0usize, 0usize, 0usize);
    start_run(run);
    while raised < SMIS {
        for _ in 0..BATCH {
            vm.host_smi_ping(APM_CMD_SERVE, PING)
                .unwrap_or_else(|e| panic!("SMI {raised}: {e}"));
            raised += 1;
        }
        match finished(run) {
            None => overlapped += BATCH,
            Some(out) => {
                check(run, &out);
                runs_checked += 1;
                run += 1;
                start_run(run);
            }
        }
    }
    let smi_secs = started.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(300);
    let last = loop {
        if let Some(out) = finished(run) {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "cpuburn run {run} did not finish within 300 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    check(run, &last);
    runs_checked += 1;
    eprintln!(
        "{raised} SMIs in {smi_secs:.2} s; {overlapped} of them in batches that a running \
         cpuburn spanned; {runs_checked} cpuburn runs, all correct"
    );
    assert!(
        overlapped >= SMIS / 2,
        "only {overlapped} of {raised} SMIs overlapped a running workload"
    );
    let after = vm.mailbox().unwrap();
    assert!(
        after.smi_count >= before.smi_count + raised as u64,
        "SMI count {} -> {} after {raised} acknowledged pings",
        before.smi_count,
        after.smi_count
    );
    assert_eq!(sh(&vm, "echo ok"), "ok");
    finish(vm);
}
