//! A fault inside SMM is reported, not a triple fault: the firmware's SMM
//! IDT catches it, the agent publishes the fault in the mailbox, every CPU
//! returns from SMM, and later SMIs are still served.
//!
//! Uses the test-only firmware variant built with the `fault-injection`
//! feature (`$SMMVMI_FIRMWARE_FAULT_INJECTION`), where APM command 0xFE
//! makes the serving CPU execute `ud2` in SMM.
//!
//! Run with `cargo xtask test` (these are `#[ignore]`d for plain `cargo test`).

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{AGENT_READY, PING, boot, finish, sh};
use smmvmi_mailbox::layout::AgentState;
use smmvmi_mailbox::platform::{APM_CMD_EXECUTE_GUEST, APM_CMD_INJECT_FAULT, APM_CMD_SERVE};
use smmvmi_tests::mailbox::MailboxHeader;
use smmvmi_tests::vm::{Firmware, Vm, VmConfig, fresh_ping_value};

const FAULT_ENV: &str = "SMMVMI_FIRMWARE_FAULT_INJECTION";

/// Boots the fault-injection firmware variant and waits for its agent.
fn boot_fault_injection(test: &str) -> Vm {
    let image = std::env::var(FAULT_ENV).unwrap_or_else(|_| {
        panic!("{FAULT_ENV} is unset: run with `cargo xtask test`, which builds the fault-injection firmware")
    });
    let name = format!("t-{test}-{}", std::process::id());
    let vm = boot(VmConfig::new(name, Firmware::Ours(PathBuf::from(image))).smp(2));
    vm.wait_agent_ready(AGENT_READY)
        .unwrap_or_else(|e| panic!("{e}"));
    vm
}

/// The mailbox header once the agent reports a fault, or after [`PING`].
fn wait_for_fault(vm: &Vm) -> MailboxHeader {
    let deadline = Instant::now() + PING;
    loop {
        let h = vm.mailbox().unwrap_or_else(|e| panic!("{e}"));
        if h.state() == Some(AgentState::Fault) || Instant::now() > deadline {
            return h;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn fault_in_smm_is_reported_and_smis_keep_working() {
    let vm = boot_fault_injection("smmfault");

    // Guest root raises the faulting SMI itself.
    sh(&vm, &format!("smi {APM_CMD_INJECT_FAULT:#x}"));
    let header = wait_for_fault(&vm);
    assert_eq!(
        header.state(),
        Some(AgentState::Fault),
        "mailbox after the injected fault: {header:?}\ndebugcon:\n{}",
        vm.debugcon()
    );
    assert_eq!(
        header.fault_code,
        0x100 | 6,
        "fault code: #UD (vector 6) in SMM"
    );
    assert!(
        vm.debugcon().contains("exception 6 (#UD invalid opcode)"),
        "the fault is described on the debug console:\n{}",
        vm.debugcon()
    );

    // The guest survived and SMIs still return and are served.
    assert_eq!(sh(&vm, "echo alive"), "alive");
    let value = fresh_ping_value(header.ping_ack);
    vm.ping_with(value, PING, || {
        vm.exec(&format!("smi {APM_CMD_SERVE:#x}")).map(|_| ())
    })
    .unwrap_or_else(|e| panic!("an SMI after the fault was not served: {e}"));
    assert_eq!(sh(&vm, "cat /proc/sys/kernel/ostype"), "Linux");
    finish(vm);
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn smm_never_executes_guest_memory() {
    let vm = boot_fault_injection("smmnx");

    // APM 0xFD: the serving CPU calls into guest RAM. The SMM page tables
    // map guest memory no-execute, so the instruction fetch itself faults.
    sh(&vm, &format!("smi {APM_CMD_EXECUTE_GUEST:#x}"));
    let header = wait_for_fault(&vm);
    assert_eq!(
        header.fault_code,
        0x100 | 14,
        "expected #PF (vector 14) on the fetch from guest memory; mailbox {header:?}\ndebugcon:\n{}",
        vm.debugcon()
    );
    // Error code 0x11: present page, instruction fetch.
    assert!(
        vm.debugcon()
            .contains("exception 14 (#PF page fault) error=0x11"),
        "the fault must be an instruction fetch from a present, no-execute page:\n{}",
        vm.debugcon()
    );
    assert_eq!(sh(&vm, "echo alive"), "alive");
    finish(vm);
}
