//! Shared by the end-to-end suites: VM names, firmware from the environment,
//! and small guest-side helpers. The suites are `#[ignore]`d so plain
//! `cargo test` skips them; `cargo xtask test` runs them with `--ignored`
//! after building the firmware and the guest image.
#![allow(dead_code)]

use std::time::Duration;

use smmvmi_tests::vm::{Firmware, Vm, VmConfig};

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
