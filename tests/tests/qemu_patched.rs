//! The QEMU built with `patches-qemu/` (`cargo xtask qemu-patched`):
//! QMP `inject-smi`, INIT/SIPI held while a CPU is in SMM under TCG, and no
//! crash on a monitor APM SMI without negotiated broadcast.
//!
//! These run only when `$SMMVMI_QEMU_PATCHED` names the built binary
//! (`cargo xtask test` builds it and sets it); without it each test says so
//! and returns. Everything else in the suite keeps running the stock QEMU,
//! except the patched-QEMU cases of linux.rs (banner, ps, lsmod, CPUs) and
//! daemon.rs (8 concurrent clients), which go through the daemon's
//! `qmp-targeted` path.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{
    AGENT_READY, PING, boot, config, finish, hotplug_storm, ids_session, init_storm, patched_qemu,
    sh,
};
use serde_json::json;
use smmvmi_tests::mailbox::MailboxHeader;
use smmvmi_tests::qmp::QmpError;
use smmvmi_tests::vm::{Firmware, Vm, VmConfig, VmError, fresh_ping_value};

fn patched_config(test: &str, qemu: PathBuf) -> VmConfig {
    config(test).qemu(qemu)
}

/// Runs `inject-smi` with `args` and waits for the agent to acknowledge a
/// fresh ping value; returns the header before and after.
fn inject_and_ping(vm: &Vm, args: Option<serde_json::Value>) -> (MailboxHeader, MailboxHeader) {
    let before = vm.mailbox().unwrap_or_else(|e| panic!("{e}"));
    let value = fresh_ping_value(before.ping_ack);
    // Raised again every 2 s while unanswered, as the daemon re-raises a
    // targeted SMI: one fresh-clone CI run saw a single `inject-smi` on
    // vCPU 1 go unserved for 10 s (cause not found; 5 runs after it
    // passed at the first raise). A re-raise is reported on stderr.
    let mut raised = 0;
    let mut last = None;
    for _ in 0..5 {
        raised += 1;
        match vm.ping_with(value, PING / 5, || {
            vm.qmp("inject-smi", args.clone()).map(|_| ())
        }) {
            Ok(_) => {
                last = None;
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    if let Some(e) = last {
        panic!("inject-smi {args:?}, raised {raised} times: {e}");
    }
    if raised > 1 {
        eprintln!("inject-smi {args:?}: answered after {raised} raises");
    }
    let after = vm.mailbox().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        after.smi_count > before.smi_count,
        "inject-smi {args:?}: SMI count did not grow: {} -> {}",
        before.smi_count,
        after.smi_count
    );
    (before, after)
}

/// The QMP error class and description of a refused `inject-smi`.
fn refused(vm: &Vm, args: serde_json::Value) -> (String, String) {
    match vm.qmp("inject-smi", Some(args.clone())) {
        Err(VmError::Qmp {
            source: QmpError::Command { class, desc, .. },
            ..
        }) => (class, desc),
        other => panic!("inject-smi {args}: expected a QMP error, got {other:?}"),
    }
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn inject_smi_reaches_the_agent_and_refuses_bad_indexes() {
    let Some(qemu) = patched_qemu("inject_smi") else {
        return;
    };
    let vm = boot(patched_config("qp-inject", qemu));
    vm.wait_agent_ready(AGENT_READY)
        .unwrap_or_else(|e| panic!("{e}"));
    // Every vCPU (the agent's normal broadcast snapshot).
    inject_and_ping(&vm, None);
    // One vCPU each: the agent serves after its bounded rendezvous.
    for cpu in [0, 1] {
        inject_and_ping(&vm, Some(json!({ "cpu-index": cpu })));
    }
    for bad in [2, 7, -1, i64::from(i32::MAX) + 1] {
        let (class, desc) = refused(&vm, json!({ "cpu-index": bad }));
        assert_eq!(class, "GenericError", "cpu-index {bad}: {desc}");
        assert_eq!(
            desc,
            format!("CPU index {bad} does not exist"),
            "cpu-index {bad}"
        );
    }
    let (class, desc) = refused(&vm, json!({ "cpu-index": "one" }));
    assert_eq!(class, "GenericError", "{desc}");
    assert!(
        desc.contains("cpu-index"),
        "type error names the member: {desc}"
    );
    assert_eq!(sh(&vm, "echo ok"), "ok", "guest must keep running");
    finish(vm);
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn inject_smi_is_refused_without_smm() {
    let Some(qemu) = patched_qemu("inject_smi_no_smm") else {
        return;
    };
    // SeaBIOS with SMM off: the harness's `-machine q35,smm=on` is
    // overridden by a later `-machine smm=off`.
    let vm = boot(
        VmConfig::new(
            format!("t-qp-nosmm-{}", std::process::id()),
            Firmware::SeaBios,
        )
        .qemu(qemu)
        .extra_arg("-machine")
        .extra_arg("smm=off"),
    );
    let (class, desc) = refused(&vm, json!({}));
    assert_eq!(class, "GenericError");
    assert_eq!(
        desc,
        "System Management Mode is not enabled for this machine"
    );
    finish(vm);
}

/// After the storm: the agent answers, no CPU vanished from SMM, none is
/// left in SMM, the guest lives.
fn check_no_cpu_vanished(vm: &Vm, mut s: ids::Session, what: &str) -> MailboxHeader {
    for i in 0..10 {
        s.cpu_state(0)
            .unwrap_or_else(|e| panic!("{what}: request {i} after the storm: {e}"));
    }
    drop(s);
    let h = vm.mailbox().unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "{what} (patched QEMU): sessions {} partial {} recovered {} vanished {} follower timeouts {} max residency {} us",
        h.smi_count,
        h.partial_sessions,
        h.recovered_sessions,
        h.vanished_cpus,
        h.follower_timeouts,
        h.max_smm_us
    );
    assert_eq!(
        h.vanished_cpus, 0,
        "{what}: a CPU left SMM without RSM on the patched QEMU (INIT must be held until RSM): {h:?}"
    );
    std::thread::sleep(Duration::from_millis(700));
    let regs = vm
        .hmp("info registers -a")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        regs.matches("SMM=1").count(),
        0,
        "{what}: vCPU left in SMM:\n{regs}"
    );
    assert_eq!(sh(vm, "echo alive"), "alive", "{what}: guest silent");
    h
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn cpu_hotplug_under_polling_loses_no_cpu_on_patched_qemu() {
    let Some(qemu) = patched_qemu("hotplug") else {
        return;
    };
    let vm = boot(patched_config("qp-hotplug", qemu).smp(2));
    let mut s = ids_session(&vm);
    hotplug_storm(&vm, &mut s, 200);
    let log = sh(&vm, "cat /tmp/hotplug.log");
    assert!(log.is_empty(), "onlining CPU 1 failed at least once: {log}");
    check_no_cpu_vanished(&vm, s, "hotplug");
    finish(vm);
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn guest_root_init_in_smm_is_held_on_patched_qemu() {
    let Some(qemu) = patched_qemu("init") else {
        return;
    };
    let vm = boot(
        patched_config("qp-init", qemu)
            .smp(3)
            .append("maxcpus=1 iomem=relaxed"),
    );
    let mut s = ids_session(&vm);
    init_storm(&vm, &mut s, 2, 50);
    check_no_cpu_vanished(&vm, s, "INIT attack");
    finish(vm);
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn seabios_survives_a_monitor_apm_smi_on_patched_qemu() {
    let Some(qemu) = patched_qemu("seabios_apm") else {
        return;
    };
    let vm = boot(
        VmConfig::new(
            format!("t-qp-seabios-{}", std::process::id()),
            Firmware::SeaBios,
        )
        .qemu(qemu),
    );
    for _ in 0..5 {
        vm.hmp("o /b 0xb2 0x10")
            .unwrap_or_else(|e| panic!("monitor APM write: {e}"));
    }
    assert_eq!(
        sh(&vm, "echo alive"),
        "alive",
        "the guest must keep running after monitor APM SMIs (QEMU 7.2 segfaults here)"
    );
    let status = vm
        .qmp("query-status", None)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status["status"], "running", "{status}");
    finish(vm);
}
