//! The IDT shared by boot and SMM: 32 exception stubs (`asm/smm.s`) that
//! call `exception_handler` (`smm::exceptions`) with the [`Frame`] they
//! pushed, and the description of a frame on the debug console.

use super::cpu;
use super::memory::Region;
use crate::log;

/// The 64-bit code selector of the firmware's GDTs (`layout::SEL_CODE64`,
/// checked there).
pub const CODE64_SELECTOR: u16 = 0x10;

// SAFETY: labels in `asm/smm.s`: the IDT and its descriptor (only their
// addresses are taken) and the table of 32 stub addresses, which the
// assembly defines as 32 quads, matching the declared type.
unsafe extern "C" {
    static firmware_idt: u8;
    static firmware_idt_desc: u8;
    static exception_stubs: [u64; 32];
}

/// Register state pushed by `exc_common` (src/asm/smm.s) and the CPU.
#[repr(C)]
pub struct Frame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// Fills the IDT with the 32 exception stubs and loads it.
pub fn init() {
    // SAFETY: `firmware_idt` is a 512-byte .bss array reserved for the IDT
    // in src/asm/smm.s; nothing else refers to it.
    let idt = unsafe { Region::new((&raw const firmware_idt) as u64, 32 * 16) };
    // SAFETY: `exception_stubs` is a read-only table of 32 addresses
    // defined in src/asm/smm.s.
    let stubs: &[u64; 32] = unsafe { &exception_stubs };
    for (i, &handler) in stubs.iter().enumerate() {
        let low = (handler & 0xffff)
            | (u64::from(CODE64_SELECTOR) << 16)
            | (0x8e << 40) // present, DPL 0, interrupt gate
            | ((handler >> 16) & 0xffff) << 48;
        let high = handler >> 32;
        idt.write_u64(i as u64 * 16, low);
        idt.write_u64(i as u64 * 16 + 8, high);
    }
    // SAFETY: the descriptor names the IDT just filled; its handlers are
    // valid for the life of the firmware (boot and SMM map the image alike).
    unsafe {
        core::arch::asm!("lidt [{}]", in(reg) &raw const firmware_idt_desc, options(readonly, nostack, preserves_flags));
    }
}

const NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor segment overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved 15",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization",
    "#CP control protection",
    "reserved 22",
    "reserved 23",
    "reserved 24",
    "reserved 25",
    "reserved 26",
    "reserved 27",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security",
    "reserved 31",
];

pub fn describe(frame: &Frame) {
    let cr2 = cpu::read_cr2();
    let name = NAMES.get(frame.vector as usize).copied().unwrap_or("?");
    log!(
        "exception {} ({name}) error={:#x} rip={:#x} rsp={:#x} cr2={cr2:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x}",
        frame.vector,
        frame.error,
        frame.rip,
        frame.rsp,
        frame.rax,
        frame.rbx,
        frame.rcx,
        frame.rdx,
        frame.rsi,
        frame.rdi
    );
}
