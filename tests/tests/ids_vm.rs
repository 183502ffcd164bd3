//! The IDS in its own VM (issue 10): a second QEMU VM runs the `ids` CLI
//! and reaches the host-injector daemon over virtio-vsock through
//! vhost-device-vsock (this host has no /dev/vhost-vsock). Inside it,
//! `ids banner`, `ids ps` and a short `ids watch` must agree with what the
//! monitored guest says of itself.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{boot, config, finish, sh, test_daemon};
use smmvmi_tests::ids_vm::{IdsVm, IdsVmConfig};
use smmvmi_tests::vm::Vm;

const IDS_TIMEOUT: Duration = Duration::from_secs(120);

fn random_name() -> String {
    let mut b = [0u8; 5];
    getrandom::fill(&mut b).expect("random");
    format!(
        "v{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}

/// Starts a sleeping process whose comm is `name` (a script so named).
fn start_named(vm: &Vm, name: &str) -> u32 {
    sh(
        vm,
        &format!(
            "printf '#!/bin/sh\\nsleep 100000\\n' > /tmp/{name}; chmod +x /tmp/{name}; \
             /tmp/{name} </dev/null >/dev/null 2>&1 & echo $!"
        ),
    )
    .parse()
    .expect("pid of the started process")
}

fn guest_pids(vm: &Vm) -> BTreeSet<u32> {
    sh(vm, "cd /proc && echo [0-9]*")
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Runs `ids` in the IDS VM; returns (status, stdout, stderr).
fn ids(vm: &Vm, args: &str) -> (i32, String, String) {
    let out = vm
        .exec_timeout(&format!("ids {args}"), IDS_TIMEOUT)
        .unwrap_or_else(|e| panic!("ids {args}: {e}"));
    (out.status, out.stdout, out.stderr)
}

#[test]
#[ignore = "boots two QEMU VMs: run with `cargo xtask test`"]
fn ids_in_its_own_vm_reads_the_monitored_vm_over_vsock() {
    let uds = smmvmi_tests::repo_root().join(format!(
        ".cache/injector-tests/idsvm-{}.vsock",
        std::process::id()
    ));
    let daemon = test_daemon(
        "idsvm",
        &["--vhost-vsock-uds", uds.to_str().expect("utf-8 path")],
    );
    let mon = boot(config("idsvm-mon").through_daemon(&daemon.socket));
    mon.wait_agent_ready(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    let early = random_name();
    let early_pid = start_named(&mon, &early);

    let started = Instant::now();
    let idsvm = IdsVm::up(IdsVmConfig::new(
        format!("t-idsvm-ids-{}", std::process::id()),
        vec![mon.info().clone()],
        uds.clone(),
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("IDS VM up in {:?}", started.elapsed());
    let ep = IdsVm::endpoint_of(mon.name());
    let vm = idsvm.vm();

    // The version string, as the monitored guest prints it.
    let (rc, out, err) = ids(vm, &format!("--connect '{ep}' banner"));
    assert_eq!(rc, 0, "ids banner in the IDS VM failed: {err}");
    let version = sh(&mon, "cat /proc/version");
    assert!(
        out.contains(version.trim()),
        "ids banner over vsock says {out:?}; the guest's /proc/version is {version:?}"
    );

    // The process list against the guest's /proc.
    let before = guest_pids(&mon);
    let (rc, out, err) = ids(vm, &format!("--connect '{ep}' --json ps"));
    assert_eq!(rc, 0, "ids ps in the IDS VM failed: {err}");
    let after = guest_pids(&mon);
    let tasks: Vec<serde_json::Value> =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ids ps --json: {e}: {out}"));
    let seen: BTreeSet<u32> = tasks
        .iter()
        .filter_map(|t| t["pid"].as_u64().map(|p| p as u32))
        .collect();
    let stable: BTreeSet<u32> = before.intersection(&after).copied().collect();
    let missing: Vec<u32> = stable.difference(&seen).copied().collect();
    assert!(
        missing.is_empty(),
        "pids in the guest's /proc before and after `ids ps` but not listed by the IDS VM: {missing:?}"
    );
    assert!(
        tasks
            .iter()
            .any(|t| t["pid"] == early_pid && t["comm"] == early.as_str()),
        "ids ps over vsock does not list {early} (pid {early_pid})"
    );
    eprintln!(
        "ids ps in the IDS VM: {} tasks, /proc had {}",
        seen.len(),
        stable.len()
    );

    // A short watch: its baseline, then a process started while it runs.
    sh(
        vm,
        &format!(
            "(ids --connect '{ep}' watch --interval 2s --count 6 --text-slices 8 \
             >/tmp/watch.jsonl 2>/tmp/watch.err; echo $? >/tmp/watch.rc) </dev/null >/dev/null 2>&1 &"
        ),
    );
    let until = Instant::now() + IDS_TIMEOUT;
    while !sh(vm, "cat /tmp/watch.jsonl 2>/dev/null; true").contains("\"baseline\"") {
        assert!(
            Instant::now() < until,
            "no baseline event from ids watch in the IDS VM: {}",
            sh(vm, "cat /tmp/watch.err; true")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let late = random_name();
    let late_pid = start_named(&mon, &late);
    while sh(vm, "cat /tmp/watch.rc 2>/dev/null; true").is_empty() {
        assert!(Instant::now() < until, "ids watch --count 6 did not end");
        std::thread::sleep(Duration::from_millis(500));
    }
    let rc = sh(vm, "cat /tmp/watch.rc");
    let events: Vec<serde_json::Value> = sh(vm, "cat /tmp/watch.jsonl")
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(
        rc,
        "0",
        "ids watch exit status; stderr: {}",
        sh(vm, "cat /tmp/watch.err; true")
    );
    assert!(
        events
            .iter()
            .any(|e| e["event"]["action"] == "process-started"
                && e["process"]["name"] == late.as_str()
                && e["process"]["pid"] == late_pid),
        "ids watch in the IDS VM did not report {late} (pid {late_pid}): {events:?}"
    );
    assert!(
        !events.iter().any(|e| e["event"]["action"] == "hook-found"),
        "a clean guest, yet: {events:?}"
    );

    drop(idsvm);
    finish(mon);
    let _ = std::fs::remove_file(format!("{}_7070", uds.display()));
}

/// The published comparison's designs (`cargo xtask bench paper`), each
/// measured from the IDS VM, read the same guest: the version string the
/// guest prints and about as many tasks as its /proc holds. A baseline
/// that read the wrong memory (a bad page-table root, a wrong RAM-file
/// offset, a stale mailbox) fails here, not in a benchmark table.
#[test]
#[ignore = "boots two QEMU VMs: run with `cargo xtask test`"]
fn every_published_design_reads_the_guest_from_the_ids_vm() {
    use smmvmi_tests::baseline::DESIGNS;
    use smmvmi_tests::paper::Topology;

    let firmware = smmvmi_tests::vm::Firmware::from_env().unwrap_or_else(|e| panic!("{e}"));
    let base = smmvmi_tests::guest_image::GuestImage::from_env()
        .expect("SMMVMI_KERNEL and SMMVMI_INITRD (run with `cargo xtask test`)");
    let paper = smmvmi_tests::ids_vm::built_binary("smmvmi-tests", "smmvmi-paper")
        .unwrap_or_else(|e| panic!("{e}"));
    let pid = std::process::id();
    let dir = smmvmi_tests::repo_root().join(format!(".cache/ids-vm/t-paper-{pid}"));
    let topo = Topology::up(&format!("t-paper-{pid}"), &dir, firmware, &base, &paper)
        .unwrap_or_else(|e| panic!("{e}"));
    let version = sh(topo.mon(), "cat /proc/version");
    let procs = guest_pids(topo.mon()).len() as i64;
    for design in DESIGNS {
        let v = topo
            .client(design, 5, 1, 2)
            .unwrap_or_else(|e| panic!("{e}"));
        eprintln!("{v}");
        assert_eq!(
            v["banner"].as_str().map(str::trim),
            Some(version.trim()),
            "{design}: the version string it read is not the guest's /proc/version"
        );
        let tasks = v["tasks"].as_i64().unwrap_or(0);
        assert!(
            (tasks - procs).abs() <= 4,
            "{design}: ps listed {tasks} tasks, the guest's /proc has {procs}"
        );
        assert!(
            v["bulk_mb_s"].as_f64().is_some_and(|r| r > 0.0),
            "{design}: no bulk figure: {v}"
        );
    }
    topo.down().unwrap_or_else(|e| panic!("{e}"));
    let _ = std::fs::remove_dir_all(dir);
}
