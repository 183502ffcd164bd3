//! Shared by the end-to-end suites: VM names, firmware from the environment,
//! and small guest-side helpers. The suites are `#[ignore]`d so plain
//! `cargo test` skips them; `cargo xtask test` runs them with `--ignored`
//! after building the firmware and the guest image.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use host_injector::daemon::client::{DaemonAddr, DaemonClient};
use host_injector::daemon::protocol::SmiPath;
use smmvmi_tests::daemon::DaemonProcess;
use smmvmi_tests::vm::{Firmware, QEMU_PATCHED_ENV, Vm, VmConfig, patched_qemu_from_env};

/// A config for a test VM named `t-<test>-<pid>` (the `t-` prefix lets
/// `cargo xtask test` sweep leftovers), booting `$SMMVMI_FIRMWARE`.
pub fn config(test: &str) -> VmConfig {
    let firmware = Firmware::from_env().unwrap_or_else(|e| panic!("{e}"));
    VmConfig::new(format!("t-{test}-{}", std::process::id()), firmware)
}

/// Boots `config` or fails the test with the harness's full report.
pub fn boot(config: VmConfig) -> Vm {
    Vm::up(config).unwrap_or_else(|e| panic!("{e}"))
}

/// Stops a VM at the end of a passing test and removes its state directory
/// (a failing test keeps it: the `Vm`'s drop kills QEMU, the logs stay).
pub fn finish(vm: Vm) {
    let dir = vm.state_dir().to_path_buf();
    vm.down().unwrap_or_else(|e| panic!("{e}"));
    let _ = std::fs::remove_dir_all(dir);
}

/// Runs `cmd` in the guest and returns trimmed stdout; panics otherwise.
pub fn sh(vm: &Vm, cmd: &str) -> String {
    vm.run_shell_command(cmd)
        .unwrap_or_else(|e| panic!("{e}"))
        .trim()
        .to_string()
}

/// How long the agent gets to publish its ready state after the guest booted.
pub const AGENT_READY: Duration = Duration::from_secs(30);
/// Deadline of one ping hand-shake.
pub const PING: Duration = Duration::from_secs(10);

/// Reads a 32-bit physical word from guest root with busybox `devmem`.
pub fn guest_devmem32(vm: &Vm, addr: u64) -> u32 {
    let out = sh(vm, &format!("devmem {addr:#x} 32"));
    u32::from_str_radix(out.trim_start_matches("0x").trim_start_matches("0X"), 16)
        .unwrap_or_else(|_| panic!("devmem {addr:#x}: expected a hex word, got {out:?}"))
}

/// Parses a debug console line `smmvmi: tseg base=0x... size=0x...`.
pub fn parse_tseg_line(line: &str) -> Option<(u64, u64)> {
    let field = |key: &str| -> Option<u64> {
        let rest = &line[line.find(key)? + key.len()..];
        let word = rest.split_whitespace().next()?;
        u64::from_str_radix(word.trim_start_matches("0x"), 16).ok()
    };
    Some((field("base=")?, field("size=")?))
}

/// A sealed IDS session with the VM's agent, once the agent says it is
/// provisioned (Ready); panics with the reason otherwise. The session holds
/// QEMU's only QMP connection: drop it before using `vm.qmp()`/`vm.hmp()`.
pub fn ids_session(vm: &Vm) -> ids::Session {
    let h = vm
        .wait_agent_ready(AGENT_READY)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        h.state(),
        Some(smmvmi_mailbox::layout::AgentState::Ready),
        "agent state {:?}: expected Ready (a provisioned agent serving sealed requests). \
         Unprovisioned means the firmware did not take the key from fw_cfg {}",
        h.state(),
        smmvmi_mailbox::platform::KEY_FW_CFG_FILE
    );
    vm.release_qmp();
    let ep = ids::Endpoint::from_state_dir(vm.state_dir());
    ids::Session::connect(&ep, IDS_DEADLINE).unwrap_or_else(|e| panic!("{e}"))
}

/// Deadline of one IDS request under TCG.
pub const IDS_DEADLINE: Duration = Duration::from_secs(10);

/// xAPIC interrupt command register (Intel SDM Vol. 3A 11.6.1), and the
/// delivery modes the SMM-runtime storms use: SMI, INIT (level assert),
/// start-up with vector 0x08 (the firmware's parking code at 0x8000).
pub const ICR_LOW: u64 = 0xfee0_0300;
pub const ICR_HIGH: u64 = 0xfee0_0310;
pub const ICR_SMI: u32 = 0x0200;
pub const ICR_INIT: u32 = 0x4500;
pub const ICR_SIPI: u32 = 0x4608;

/// True if the request was answered by the agent (with any status); false
/// if it went unanswered (the ALERT error: the agent was silent).
pub fn answered(
    r: Result<smmvmi_mailbox::wire::CpuState, ids::session::SessionError>,
) -> Result<bool, ids::session::SessionError> {
    use ids::session::SessionError;
    match r {
        Ok(_) | Err(SessionError::Op { .. }) => Ok(true),
        Err(SessionError::Transact(e)) if e.to_string().contains("ALERT") => Ok(false),
        Err(e) => Err(e),
    }
}

/// Linux CPU hotplug storm: the guest takes vCPU 1 offline and online
/// `cycles` times (Linux sends INIT each time it brings a CPU up) while the
/// IDS keeps asking for vCPU 1's state. Returns (answered, unanswered)
/// requests during the storm; fails if it does not end within 600 s or CPU 1
/// stays offline.
pub fn hotplug_storm(vm: &Vm, s: &mut ids::Session, cycles: u32) -> (u32, u32) {
    sh(
        vm,
        &format!(
            "(for i in $(seq {cycles}); do echo 0 > /sys/devices/system/cpu/cpu1/online; \
             echo 1 > /sys/devices/system/cpu/cpu1/online; done; echo done > /tmp/hotplug) \
             > /tmp/hotplug.log 2>&1 &"
        ),
    );
    let start = std::time::Instant::now();
    let (mut ok, mut silent) = (0u32, 0u32);
    loop {
        match answered(s.cpu_state(1)) {
            Ok(true) => ok += 1,
            Ok(false) => silent += 1,
            Err(e) => panic!("request {}: {e}", ok + silent),
        }
        if (ok + silent) % 10 == 0 && sh(vm, "cat /tmp/hotplug 2>/dev/null || true") == "done" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "the hotplug loop did not finish in 600 s ({ok} answered, {silent} silent); guest log: {}",
            sh(vm, "tail -5 /tmp/hotplug.log")
        );
    }
    eprintln!(
        "hotplug: {cycles} cycles in {:.1} s; {ok} requests answered, {silent} unanswered during the loop",
        start.elapsed().as_secs_f64()
    );
    assert_eq!(sh(vm, "cat /sys/devices/system/cpu/cpu1/online"), "1");
    (ok, silent)
}

/// Guest root makes each application processor in turn leave SMM
/// abnormally: an SMI IPI, then INIT (every other two rounds INIT + SIPI)
/// through the local APIC, `rounds` times, while the IDS keeps asking. The
/// VM must be booted with `maxcpus=1 iomem=relaxed` and `aps` APs. Fails if
/// three requests in a row go unanswered after a round.
pub fn init_storm(vm: &Vm, s: &mut ids::Session, aps: u32, rounds: u32) {
    for round in 0..rounds {
        let ap = 1 + round % aps;
        let sipi = if round % 4 >= 2 {
            format!("; devmem {ICR_LOW:#x} 32 {ICR_SIPI:#x}")
        } else {
            String::new()
        };
        sh(
            vm,
            &format!(
                "devmem {ICR_HIGH:#x} 32 {:#x}; devmem {ICR_LOW:#x} 32 {ICR_SMI:#x}; \
                 devmem {ICR_LOW:#x} 32 {ICR_INIT:#x}{sipi}",
                ap << 24
            ),
        );
        // An answer may be late while a session is recovered, but the agent
        // must never go silent for good.
        let answered_now = (0..3)
            .any(|_| answered(s.cpu_state(0)).unwrap_or_else(|e| panic!("round {round}: {e}")));
        assert!(
            answered_now,
            "round {round}: three requests in a row went unanswered"
        );
    }
}

/// The QEMU built with patches-qemu/ (`$SMMVMI_QEMU_PATCHED`, which
/// `cargo xtask test` sets); `None` after printing why `test` is skipped.
pub fn patched_qemu(test: &str) -> Option<PathBuf> {
    let p = patched_qemu_from_env();
    if p.is_none() {
        eprintln!(
            "{test}: skipped: ${QEMU_PATCHED_ENV} does not name a built binary \
             (run `cargo xtask test`, or `cargo xtask qemu-patched` and set it)"
        );
    }
    p
}

/// A host-injector daemon of one test alone (its own socket under
/// `.cache/injector-tests/`, so killing it touches nobody else).
pub fn test_daemon(test: &str, extra: &[&str]) -> DaemonProcess {
    DaemonProcess::spawn(&daemon_socket_path(test), extra, false).unwrap_or_else(|e| panic!("{e}"))
}

/// The socket of [`test_daemon`]`(test)`.
pub fn daemon_socket_path(test: &str) -> PathBuf {
    smmvmi_tests::repo_root().join(format!(
        ".cache/injector-tests/{test}-{}.sock",
        std::process::id()
    ))
}

/// A sealed IDS session with `vm`'s agent through the daemon at `addr`,
/// its requests restricted to the SMI path `smi`.
pub fn daemon_ids_session(vm: &Vm, addr: &DaemonAddr, smi: SmiPath) -> ids::Session {
    vm.wait_agent_ready(AGENT_READY)
        .unwrap_or_else(|e| panic!("{e}"));
    let ep = ids::Endpoint::Daemon(ids::endpoint::DaemonEndpoint {
        addr: addr.clone(),
        vm: vm.name().to_string(),
        key: Some(vm.info().key.clone()),
    });
    let mut s = ids::Session::connect(&ep, IDS_DEADLINE).unwrap_or_else(|e| panic!("{e}"));
    if let ids::transport::Transport::Daemon(d) = s.transport() {
        d.smi_path(smi);
    }
    s
}

/// The daemon's counters of VM `vm` (`status`).
pub fn daemon_counters(addr: &DaemonAddr, vm: &str) -> serde_json::Value {
    let st = DaemonClient::connect(addr, IDS_DEADLINE)
        .and_then(|mut c| c.status())
        .unwrap_or_else(|e| panic!("{e}"));
    st["vms"]
        .as_array()
        .and_then(|a| a.iter().find(|v| v["name"] == vm))
        .map(|v| v["counters"].clone())
        .unwrap_or_else(|| panic!("VM {vm} not in the daemon's status: {st}"))
}

/// Asserts that every SMI the daemon raised for `vm` was a patched QEMU's
/// `inject-smi` (smi path qmp-targeted), at least `min` of them.
pub fn assert_only_inject_smi(addr: &DaemonAddr, vm: &str, min: u64) {
    let c = daemon_counters(addr, vm);
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    assert!(
        n("smis_qmp_targeted") >= min && n("smis_doorbell") == 0 && n("smis_qmp") == 0,
        "expected only inject-smi SMIs (at least {min}): daemon counters {c}"
    );
}

/// Pids of the command channel's transient work: the shell running a
/// request and its children (they come and go between two views).
pub fn transient(
    cmdd: u32,
    ppid_of: &std::collections::BTreeMap<u32, u32>,
) -> std::collections::BTreeSet<u32> {
    let mut out = std::collections::BTreeSet::new();
    let mut grew = true;
    while grew {
        grew = false;
        for (&pid, &ppid) in ppid_of {
            if (ppid == cmdd || out.contains(&ppid)) && out.insert(pid) {
                grew = true;
            }
        }
    }
    out
}

/// The pids the IDS and the guest each see, both without the command
/// channel's transient tasks (`cmdd` is its daemon's pid); `mine` and
/// `truth` are (pid, ppid). Returns (IDS pids, guest pids, left out).
pub fn settled_pids(
    mine: impl IntoIterator<Item = (u32, u32)>,
    truth: impl IntoIterator<Item = (u32, u32)>,
    cmdd: u32,
) -> (
    std::collections::BTreeSet<u32>,
    std::collections::BTreeSet<u32>,
    std::collections::BTreeSet<u32>,
) {
    let mine: Vec<(u32, u32)> = mine.into_iter().collect();
    let truth: Vec<(u32, u32)> = truth.into_iter().collect();
    let mut ppid_of: std::collections::BTreeMap<u32, u32> = truth.iter().copied().collect();
    ppid_of.extend(mine.iter().copied());
    let skip = transient(cmdd, &ppid_of);
    let keep = |v: &[(u32, u32)]| {
        v.iter()
            .map(|&(p, _)| p)
            .filter(|p| !skip.contains(p))
            .collect()
    };
    (keep(&mine), keep(&truth), skip)
}

/// True if `/proc`'s comm of a task is the task's `comm` as the IDS reads
/// it: /proc appends a workqueue worker's current queue (`kworker/0:0-rcu_gp`,
/// fs/proc/array.c proc_task_name) and, since 6.1, shows a kernel thread's
/// full name where `comm` keeps the first 15 bytes.
pub fn same_comm(proc_comm: &str, t: &ids::linux::Task) -> bool {
    proc_comm == t.comm
        || (t.kthread
            && (proc_comm.starts_with(&format!("{}-", t.comm))
                || proc_comm.starts_with(&format!("{}+", t.comm))
                || (t.comm.len() == 15 && proc_comm.starts_with(&t.comm))))
}
