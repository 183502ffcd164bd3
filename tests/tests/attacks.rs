//! End-to-end: real rootkit techniques loaded into the guest as a kernel
//! module built against Debian's headers for the guest's own kernel
//! (`tests/attacks/smmvmi_attack.c`), each found by its check with the
//! module named as the owner, and gone again once the module is removed —
//! on the default kernel and on Debian's 6.12 LTS cloud kernel. A clean
//! guest has no finding before, between and after.
//!
//! Run with `cargo xtask test` (these are `#[ignore]`d for plain `cargo test`).

mod common;

use common::{boot, config, finish, ids_session, sh};
use ids::checks::{self, Report};
use ids::linux::{self, Discovery, Kernel};
use ids::memory::SnapshotCache;
use smmvmi_tests::attack::{self, Attack, MODULE};
use smmvmi_tests::guest_image::KernelDeb;
use smmvmi_tests::vm::VmConfig;

/// getpid: called by nothing the test guest runs between two checks.
const NR_GETPID: u32 = 39;

fn check_all(s: &mut ids::Session, k: &Kernel) -> (Report, Report) {
    let mut c = SnapshotCache::new(s);
    let modules = linux::lsmod(&mut c, k, 0).unwrap_or_else(|e| panic!("{e}"));
    let sys = checks::check_syscalls(&mut c, k, 0, &modules).unwrap_or_else(|e| panic!("{e}"));
    let idt = checks::check_idt(&mut c, k, &modules).unwrap_or_else(|e| panic!("{e}"));
    (sys, idt)
}

fn assert_clean(s: &mut ids::Session, k: &Kernel, when: &str) {
    let (sys, idt) = check_all(s, k);
    assert!(
        sys.findings.is_empty() && idt.findings.is_empty(),
        "{when}: a clean guest has findings: {:#?} {:#?}",
        sys.findings,
        idt.findings
    );
    assert!(
        sys.checked >= 400,
        "{when}: only {} syscall items",
        sys.checked
    );
    assert!(idt.checked >= 200, "{when}: only {} IDT items", idt.checked);
}

fn run(cfg: VmConfig) {
    let vm = boot(cfg);
    let cpus: u32 = sh(&vm, "nproc").parse().expect("nproc");
    let mut s = ids_session(&vm);
    let k = Kernel::load(&mut s, &Discovery::default(), None).unwrap_or_else(|e| panic!("{e}"));
    assert_clean(&mut s, &k, "before any attack");
    let mut cases = vec![
        (
            Attack::HookSyscall(NR_GETPID),
            vec![format!("sys_call_table[{NR_GETPID}]")],
        ),
        (
            Attack::HookIdt(0x80),
            (0..cpus)
                .map(|c| format!("cpu {c} IDT vector 0x80"))
                .collect(),
        ),
        (
            Attack::Lstar(cpus - 1),
            vec![format!("cpu {} LSTAR", cpus - 1)],
        ),
    ];
    if k.kallsyms.addr("x64_sys_call").is_some() {
        cases.push((
            Attack::PatchDispatch(NR_GETPID),
            vec!["x64_sys_call+".into()],
        ));
    }
    for (attack, expected) in cases {
        attack::load(&vm, attack).unwrap_or_else(|e| panic!("{attack:?}: {e}"));
        // The guest still runs its syscalls through the hook.
        assert_eq!(sh(&vm, "echo alive"), "alive");
        let (sys, idt) = check_all(&mut s, &k);
        let found: Vec<_> = sys.findings.iter().chain(&idt.findings).collect();
        let whats: Vec<&str> = found.iter().map(|f| f.what.as_str()).collect();
        assert_eq!(
            found.len(),
            expected.len(),
            "{attack:?}: expected {expected:?}, found {whats:?}"
        );
        for (f, e) in found.iter().zip(&expected) {
            assert!(
                f.what.starts_with(e.as_str()),
                "{attack:?}: {f:?}, expected {e}"
            );
            assert_eq!(
                f.owner.as_deref(),
                Some(MODULE),
                "{attack:?}: the hook's owner must be named: {f:?}"
            );
        }
        eprintln!("{attack:?}: found {whats:?}, owner {MODULE}");
        attack::unload(&vm).unwrap_or_else(|e| panic!("{attack:?}: {e}"));
        assert_clean(&mut s, &k, &format!("after removing {attack:?}"));
    }
    finish(vm);
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn attacks_found_on_the_default_kernel() {
    run(config("attacks-default"));
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn attacks_found_on_the_6_12_kernel() {
    let deb = std::env::var("SMMVMI_KERNEL_612_DEB")
        .ok()
        .map(|v| v.parse::<KernelDeb>().expect("kernel deb"))
        .unwrap_or_else(|| {
            smmvmi_tests::guest_image::resolve_lts_612().unwrap_or_else(|e| panic!("{e}"))
        });
    run(config("attacks-612").kernel_deb(deb));
}
