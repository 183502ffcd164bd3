//! The CPU's own registers: control registers, CPUID facts the firmware
//! needs, and MSRs.

/// CR3 (the current page-table root).
pub fn read_cr3() -> u64 {
    let cr3: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe {
        core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack, preserves_flags))
    };
    cr3
}

/// Reloads CR3 with its own value: flushes the TLB after the page tables
/// it points to changed.
pub fn reload_cr3() {
    let cr3 = read_cr3();
    // SAFETY: the same root, whose tables the caller just edited so that
    // the firmware's own code, data and stack keep their mappings.
    unsafe { core::arch::asm!("mov cr3, {}", in(reg) cr3, options(nostack, preserves_flags)) };
}

/// Writes back and evicts the cache lines of `[base, base + len)` (through
/// the current mapping): needed before an SEV guest changes a page's C-bit,
/// so no line cached under one key is later read under the other.
pub fn clflush_range(base: u64, len: u64) {
    for line in (base & !63..base + len).step_by(64) {
        // SAFETY: CLFLUSH only writes back and evicts a line; the caller
        // passes memory mapped by the current page tables (a fault would
        // stop the machine through the firmware's IDT). Every x86-64 CPU
        // has CLFLUSH (SSE2).
        unsafe {
            core::arch::asm!("clflush [{}]", in(reg) line, options(nostack, preserves_flags))
        };
    }
}

/// CR2 (the address of the last page fault).
pub fn read_cr2() -> u64 {
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe {
        core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags))
    };
    cr2
}

/// Raises #UD. The IDT (`hw::idt`) takes it: before Linux the machine
/// stops with a report; in SMM the fault path reports it and the SMI
/// returns. Used to turn a panic in SMM into that path.
pub fn raise_invalid_opcode() -> ! {
    // SAFETY: `ud2` only raises #UD, handled by the firmware's own IDT,
    // which never returns here.
    unsafe { core::arch::asm!("ud2", options(nomem, nostack, noreturn)) }
}

/// Whether the CPU has the NX bit (CPUID 0x80000001:EDX[20]).
pub fn has_nx() -> bool {
    core::arch::x86_64::__cpuid(0x8000_0000).eax >= 0x8000_0001
        && core::arch::x86_64::__cpuid(0x8000_0001).edx & (1 << 20) != 0
}

/// This CPU's initial APIC ID (CPUID.1:EBX[31:24]).
pub fn initial_apic_id() -> u32 {
    core::arch::x86_64::__cpuid(1).ebx >> 24
}

/// This CPU's SEV facts (CPUID 0x8000001F, the SEV_STATUS MSR), decoded by
/// the one definition the agent's walker uses
/// ([`smmvmi_boot::sev::SevConfig::detect`]). The MSR is read only when
/// CPUID says SEV is supported.
pub fn sev_config() -> smmvmi_boot::sev::SevConfig {
    use smmvmi_boot::sev::{CPUID_SEV_LEAF, MSR_SEV_STATUS, SevConfig};
    let max_ext = core::arch::x86_64::__cpuid(0x8000_0000).eax;
    let (eax, ebx) = if max_ext >= CPUID_SEV_LEAF {
        let leaf = core::arch::x86_64::__cpuid(CPUID_SEV_LEAF);
        (leaf.eax, leaf.ebx)
    } else {
        (0, 0)
    };
    SevConfig::detect(max_ext, eax, ebx, || {
        // SAFETY: `detect` calls this only when CPUID 0x8000001F says SEV
        // is supported, where SEV_STATUS exists (AMD APM vol. 2, 15.34.10);
        // reading it has no side effects. Ring 0.
        unsafe { x86_64::registers::model_specific::Msr::new(MSR_SEV_STATUS).read() }
    })
}
