//! The checks on a fake kernel: clean, then each kind of hook.

use super::*;
use crate::fake::FakeMemory;
use crate::kallsyms::Symbol;

const TEXT: u64 = 0xffff_ffff_8100_0000;
const ENTRY: u64 = 0xffff_ffff_8200_0000;
const ETEXT: u64 = 0xffff_ffff_8210_0000;
const TABLE: u64 = 0xffff_ffff_8300_0000;
const IDT: u64 = 0xffff_fe00_0000_0000;
const MODULE: u64 = 0xffff_ffff_c000_0000;
const NR: u64 = 4;
/// Init text: the early IDT handlers (9 bytes each).
const EARLY: u64 = 0xffff_ffff_8400_0000;

fn sym(addr: u64, kind: char, name: &str) -> Symbol {
    Symbol {
        addr,
        kind,
        name: name.into(),
    }
}

fn kernel() -> Kernel {
    let mut syms = vec![
        sym(TEXT, 'T', "_stext"),
        sym(TEXT + 0x100, 'T', "__x64_sys_read"),
        sym(TEXT + 0x200, 'T', "__x64_sys_write"),
        sym(TEXT + 0x300, 'T', "__x64_sys_ni_syscall"),
        sym(TEXT + 0x400, 'T', "x64_sys_call"),
        sym(TEXT + 0x500, 'T', "helper_after_dispatch"),
        sym(TEXT + 0x600, 'T', "with_a_jump_label"),
        sym(TEXT + 0x700, 'T', "after_the_jump_label"),
        sym(ENTRY, 'T', "__entry_text_start"),
        sym(ENTRY + 0x40, 'T', "entry_SYSCALL_64"),
        sym(ENTRY + 0x80, 'T', "entry_SYSCALL_compat"),
        sym(ENTRY + 0xc0, 'T', "entry_SYSENTER_compat"),
        sym(ENTRY + 0x100, 'T', "asm_exc_divide_error"),
        sym(ENTRY + 0x1000, 'T', "__entry_text_end"),
        sym(ETEXT, 'T', "_etext"),
        sym(TABLE, 'D', "sys_call_table"),
        sym(TABLE, 'D', "__start_rodata"),
        sym(TABLE + 0x1000, 'D', "__end_rodata"),
        // Two slots of padding after the table's NR entries.
        sym(TABLE + 8 * (NR + 2), 'D', "after_table"),
        sym(EARLY, 'T', "early_idt_handler_array"),
        sym(EARLY + 32 * 9, 't', "early_idt_handler_common"),
    ];
    syms.sort_by_key(|s| s.addr);
    crate::fake::kernel(syms, crate::fake::offsets(true), ENTRY + 0x40)
}

fn gate(target: u64) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[0..2].copy_from_slice(&(target as u16).to_le_bytes());
    g[2..4].copy_from_slice(&0x10u16.to_le_bytes());
    g[5] = 0x8e;
    g[6..8].copy_from_slice(&((target >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((target >> 32) as u32).to_le_bytes());
    g
}

/// A clean guest: the table points at syscall functions, the dispatcher
/// calls them, every CPU's IDT gates point into entry text.
fn guest() -> FakeMemory {
    let mut m = FakeMemory::new(2);
    let targets = [TEXT + 0x100, TEXT + 0x200, TEXT + 0x300, TEXT + 0x300];
    for (i, t) in targets.iter().enumerate() {
        m.put_u64(TABLE + 8 * i as u64, *t);
    }
    // x64_sys_call: call __x64_sys_read; call __x64_sys_write; ret.
    let at = TEXT + 0x400;
    let mut code = Vec::new();
    for target in [TEXT + 0x100, TEXT + 0x200] {
        let ip = at + code.len() as u64 + 5;
        code.push(0xe8);
        code.extend_from_slice(&((target.wrapping_sub(ip)) as i32).to_le_bytes());
    }
    code.push(0xc3);
    code.resize(0x100, 0xcc);
    m.write_virt(at, &code);
    for v in 0..256u64 {
        let g = if v == 7 {
            [0u8; 16]
        } else {
            gate(ENTRY + 0x100)
        };
        m.write_virt(IDT + 16 * v, &g);
    }
    for c in &mut m.cpus {
        c.idtr_base = IDT;
        c.idtr_limit = 0xfff;
        c.msr_lstar = ENTRY + 0x40;
        c.msr_cstar = ENTRY + 0x80;
        c.msr_sysenter_eip = ENTRY + 0xc0;
    }
    m
}

fn rootkit() -> Vec<Module> {
    vec![Module {
        name: "rootkit".into(),
        size: 0x2000,
        refcount: 0,
        state: "Live".into(),
        base: MODULE,
        addr: MODULE + 0x3000,
        regions: vec![(MODULE, 0x2000)],
    }]
}

#[test]
fn a_clean_kernel_has_no_findings() {
    let k = kernel();
    let mut c = SnapshotCache::new(guest());
    let r = check_syscalls(&mut c, &k, 0, &[]).unwrap();
    assert!(r.findings.is_empty(), "{:#?}", r.findings);
    assert_eq!(
        r.checked,
        NR as usize + 2,
        "4 entries and 2 dispatcher calls"
    );
    assert_eq!(
        c.inner().stats().requests,
        1,
        "the tables and the dispatcher in one request"
    );
    let r = check_idt(&mut c, &k, &[]).unwrap();
    assert!(r.findings.is_empty(), "{:#?}", r.findings);
    assert_eq!(r.checked, 2 * (3 + 1 + 255));
}

#[test]
fn a_hooked_table_entry_names_its_module() {
    let k = kernel();
    let mut m = guest();
    m.put_u64(TABLE + 8, MODULE + 0x10);
    // Another entry swapped for a kernel function that is no syscall.
    m.put_u64(TABLE + 16, TEXT + 0x500);
    let mut c = SnapshotCache::new(m);
    let r = check_syscalls(&mut c, &k, 0, &rootkit()).unwrap();
    assert_eq!(r.findings.len(), 2, "{:#?}", r.findings);
    assert_eq!(r.findings[0].what, "sys_call_table[1]");
    assert_eq!(r.findings[0].owner.as_deref(), Some("rootkit"));
    assert!(r.findings[0].found.contains("module rootkit"));
    assert_eq!(r.findings[1].what, "sys_call_table[2]");
    assert!(r.findings[1].found.contains("helper_after_dispatch"));
}

#[test]
fn a_patched_dispatcher_is_found() {
    let k = kernel();
    let mut m = guest();
    // The second call now goes to the module.
    let at = TEXT + 0x400 + 5;
    m.write_virt(at, &[0xe8]);
    m.write_virt(
        at + 1,
        &((MODULE + 0x40).wrapping_sub(at + 5) as i32).to_le_bytes(),
    );
    let mut c = SnapshotCache::new(m);
    let r = check_syscalls(&mut c, &k, 0, &rootkit()).unwrap();
    assert_eq!(r.findings.len(), 1, "{:#?}", r.findings);
    assert_eq!(r.findings[0].what, "x64_sys_call+0x5 (call)");
    assert_eq!(r.findings[0].owner.as_deref(), Some("rootkit"));
}

#[test]
fn idt_gates_and_entry_msrs_are_checked_per_cpu() {
    let k = kernel();
    let mut m = guest();
    m.write_virt(IDT + 16 * 0x80, &gate(MODULE + 0x80));
    m.cpus[1].msr_lstar = MODULE + 0x100;
    m.cpus[1].msr_sysenter_eip = TEXT + 0x100;
    let mut c = SnapshotCache::new(m);
    let r = check_idt(&mut c, &k, &rootkit()).unwrap();
    let whats: Vec<&str> = r.findings.iter().map(|f| f.what.as_str()).collect();
    assert_eq!(
        whats,
        [
            "cpu 0 IDT vector 0x80",
            "cpu 1 LSTAR",
            "cpu 1 SYSENTER_EIP",
            "cpu 1 IDT vector 0x80"
        ]
    );
    assert_eq!(r.findings[1].owner.as_deref(), Some("rootkit"));
    assert_eq!(
        c.inner().stats().requests,
        2,
        "every CPU's state in one request, every IDT in one more"
    );
    check_idt(&mut c, &k, &rootkit()).unwrap();
    assert_eq!(c.inner().stats().requests, 2, "then from the snapshot");
}

#[test]
fn an_early_handler_is_accepted_only_in_its_own_slot() {
    let k = kernel();
    let mut m = guest();
    m.write_virt(IDT + 16 * 21, &gate(EARLY + 9 * 20));
    let mut c = SnapshotCache::new(m);
    let r = check_idt(&mut c, &k, &[]).unwrap();
    let whats: Vec<&str> = r.findings.iter().map(|f| f.what.as_str()).collect();
    assert_eq!(whats, ["cpu 0 IDT vector 0x15", "cpu 1 IDT vector 0x15"]);
}

#[test]
fn a_cpu_with_its_own_idt_is_found() {
    let k = kernel();
    let mut m = guest();
    m.cpus[1].idtr_base = IDT + 0x10_0000;
    m.cpus[1].idtr_limit = 0;
    let mut c = SnapshotCache::new(m);
    let r = check_idt(&mut c, &k, &[]).unwrap();
    assert_eq!(r.findings.len(), 1, "{:#?}", r.findings);
    assert_eq!(r.findings[0].what, "cpu 1 IDTR");
}

/// A jump label's NOP5 turned into a jump: done, it passes; read between
/// text_poke_bp()'s steps (an int3, then the new tail, then the first
/// byte), it passes too; a jump into a module's memory is found, named,
/// and confirmed from a second snapshot.
#[test]
fn text_patching_in_progress_passes_and_a_module_jump_is_found() {
    let k = kernel();
    let site = TEXT + 0x600;
    let jmp = |target: u64| {
        let mut b = vec![0xe9];
        b.extend_from_slice(&(target.wrapping_sub(site + 5) as i32).to_le_bytes());
        b
    };
    let mut m = guest();
    // Text and rodata mapped whole, as in a kernel (a read of an unmapped
    // page fails whole and reads as zeros).
    for (a, b) in [(TEXT, ETEXT), (TABLE, TABLE + 0x1000)] {
        for p in (a..b).step_by(4096) {
            if m.read_batch(&[crate::memory::Read::kernel(0, p, 1)])
                .unwrap()[0]
                .is_err()
            {
                m.write_virt(p, &[0u8; 4096]);
            }
        }
    }
    m.write_virt(site, &[0x0f, 0x1f, 0x44, 0x00, 0x00, 0xc3]);
    let mut c = SnapshotCache::new(m);
    let base = record_baseline(&mut c, &k, 0).unwrap();
    let check = |c: &mut SnapshotCache<FakeMemory>| {
        c.new_snapshot();
        check_text(c, &k, 0, &base, &rootkit()).unwrap().findings
    };
    let done = jmp(TEXT + 0x100);
    let mut mid = done.clone();
    mid[0] = 0xcc;
    for bytes in [mid, done] {
        c.inner().write_virt(site, &bytes);
        assert_eq!(check(&mut c), [], "{bytes:x?}");
    }
    c.inner().write_virt(site, &jmp(MODULE + 0x40));
    let before = c.inner().stats().requests;
    let f = check(&mut c);
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(f[0].what, "text 0xffffffff81000600 (with_a_jump_label)");
    assert_eq!(f[0].owner.as_deref(), Some("rootkit"));
    let first_read = c.inner().stats().requests - before;
    assert!(first_read >= 2, "read twice: {first_read} requests");
}
