//! End-to-end: the IDS reads the guest kernel through the SMM agent and the
//! answers match the guest's own ground truth (`/proc/version`,
//! `/proc/kallsyms` read as root), with 4- and 5-level paging, with PTI, and
//! on every CPU.
//!
//! Run with `cargo xtask test` (these are `#[ignore]`d for plain `cargo test`).

mod common;

use common::{boot, config, finish, ids_session, sh};
use ids::Session;
use ids::kernel::{self, BannerSearch};
use ids::session::SessionError;
use smmvmi_mailbox::wire::Status;
use smmvmi_tests::vm::Vm;

fn banner(s: &mut Session) -> String {
    kernel::find_banner(s, BannerSearch::default())
        .unwrap_or_else(|e| panic!("{e}"))
        .text
}

fn kallsyms(vm: &Vm, name: &str) -> u64 {
    let line = sh(vm, &format!("grep ' {name}$' /proc/kallsyms"));
    let addr = line.split_whitespace().next().unwrap_or("");
    let v = u64::from_str_radix(addr, 16)
        .unwrap_or_else(|_| panic!("kallsyms line {line:?}: expected `ADDR T {name}`"));
    assert_ne!(v, 0, "kallsyms hides addresses (kptr_restrict): {line:?}");
    v
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn banner_and_lstar_match_the_guest() {
    let vm = boot(config("agent-banner"));
    let mut s = ids_session(&vm);
    let truth = sh(&vm, "cat /proc/version");
    assert_eq!(banner(&mut s).trim_end(), truth);

    let lstar = s.cpu_state(0).unwrap_or_else(|e| panic!("{e}")).msr_lstar;
    let entry = kallsyms(&vm, "entry_SYSCALL_64");
    assert_eq!(
        lstar, entry,
        "CPU_STATE LSTAR {lstar:#x} != entry_SYSCALL_64 {entry:#x} from /proc/kallsyms"
    );

    let info = s.info().unwrap_or_else(|e| panic!("{e}"));
    assert!(info.authenticated);
    assert_eq!(info.header.cpu_count, 2);
    assert!(info.cpus.iter().all(|c| c.paging_levels == 4), "{info:?}");
    finish(vm);
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn five_level_paging() {
    let vm = boot(config("agent-la57").cpu("max,+la57"));
    let flags = sh(&vm, "grep -m1 '^flags' /proc/cpuinfo");
    assert!(
        flags.split_whitespace().any(|f| f == "la57"),
        "guest CPU lacks la57: {flags}"
    );
    let mut s = ids_session(&vm);
    let cpu = s.cpu_state(0).unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(
        cpu.cr4 & (1 << 12),
        0,
        "CR4.LA57 clear (cr4 {:#x}): the kernel does not run 5-level paging",
        cpu.cr4
    );
    assert_eq!(cpu.paging_levels(), 5);
    assert_eq!(banner(&mut s).trim_end(), sh(&vm, "cat /proc/version"));
    assert_eq!(cpu.msr_lstar, kallsyms(&vm, "entry_SYSCALL_64"));
    finish(vm);
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn pti_and_four_cpus() {
    let vm = boot(config("agent-pti").append("pti=on").smp(4));
    // The meltdown sysfs file says "Not affected" on an AMD-vendor CPU even
    // when pti=on forces isolation; the kernel's own word is dmesg and the
    // `pti` CPU flag.
    let dmesg = sh(&vm, "dmesg | grep -i 'page tables isolation' || true");
    let flags = sh(&vm, "grep -m1 '^flags' /proc/cpuinfo");
    assert!(
        dmesg.contains("enabled") && flags.split_whitespace().any(|f| f == "pti"),
        "expected PTI active with pti=on; dmesg: {dmesg:?}; flags: {flags}"
    );
    let mut s = ids_session(&vm);
    assert_eq!(banner(&mut s).trim_end(), sh(&vm, "cat /proc/version"));
    let entry = kallsyms(&vm, "entry_SYSCALL_64");
    for cpu in 0..4 {
        let st = s
            .cpu_state(cpu)
            .unwrap_or_else(|e| panic!("cpu {cpu}: {e}"));
        assert_eq!(st.msr_lstar, entry, "cpu {cpu} LSTAR");
        assert_eq!(st.msrs_valid, 1, "cpu {cpu}");
        assert_eq!(st.paging_levels(), 4, "cpu {cpu}");
        assert_ne!(st.cr3, 0, "cpu {cpu}");
        // The kernel half of each CPU's address space reads the banner.
        let b = kernel::find_banner(
            &mut s,
            BannerSearch {
                cpu,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("cpu {cpu}: {e}"));
        assert!(b.text.starts_with("Linux version "), "cpu {cpu}");
    }
    let e = s.cpu_state(4).unwrap_err();
    assert!(
        matches!(
            e,
            SessionError::Op {
                status: Status::BadRequest,
                ..
            }
        ),
        "CPU 4 of 4: {e}"
    );
    finish(vm);
}
