# System Management Mode entry, SMBASE relocation and AP start-up code.
#
# The three templates in .rodata are copied by src/boot/tseg.rs to where the
# CPU executes them; the `*_patch_*` labels mark immediates that
# src/boot/tseg.rs fills in for each copy. The common entry and the exception
# stubs run from the firmware image (in SMM, from its copy inside TSEG).
#
# Every braced name is a const operand of the `global_asm!` in src/main.rs,
# taken from src/layout.rs: no layout fact is written here a second time.

# Low-memory relocation data (layout.rs: RELOC_DATA and the RELOC_* offsets).
.set RELOC_NEXT_SMBASE, {RELOC_DATA} + {RELOC_NEXT_SMBASE}
.set RELOC_DONE, {RELOC_DATA} + {RELOC_DONE}
.set AP_TICKET, {RELOC_DATA} + {RELOC_AP_TICKET}
.set AP_TURN, {RELOC_DATA} + {RELOC_AP_TURN}
.set TILES_BASE, {RELOC_DATA} + {RELOC_TILES_BASE}
.set CPU_MASK_LO, {RELOC_DATA} + {RELOC_CPU_MASK}
.set CPU_MASK_HI, {RELOC_DATA} + {RELOC_CPU_MASK} + 4
.set BAD_APIC_ID, {RELOC_DATA} + {RELOC_BAD_APIC_ID}

# ---------------------------------------------------------------------------
# Per-CPU SMI entry, copied to SMBASE + SMI_ENTRY_OFFSET (0x8000). Entered in a real-mode-like
# state: CS.base = SMBASE, IP = 0x8000, data segments base 0 limit 4 GiB.
.section .rodata.smm_stub, "a"
.code16
.global smm_stub_start
smm_stub_start:
    lgdtl %cs:({SMI_ENTRY_OFFSET} + smm_gdt_desc - smm_stub_start)
    movl %cr0, %eax
    andl $~(CR0_EM | CR0_TS | CR0_PG | CR0_CD | CR0_NW), %eax
    orl $(CR0_PE | CR0_MP | CR0_NE), %eax
    movl %eax, %cr0
    .byte 0x66, 0xea
.global smm_patch_entry32
smm_patch_entry32:
    .long 0
    .word {SEL_CODE32}
.code32
.global smm_stub_entry32
smm_stub_entry32:
    movw ${SEL_DATA}, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movl $(CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT), %eax
    movl %eax, %cr4
    .byte 0xb8
.global smm_patch_cr3
smm_patch_cr3:
    .long 0
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    .byte 0x0d                  # orl $imm32, %eax: EFER.LME (| NXE when supported)
.global smm_patch_efer
smm_patch_efer:
    .long 0
    wrmsr
    movl %cr0, %eax
    orl $CR0_PG, %eax
    movl %eax, %cr0
    .byte 0xea
.global smm_patch_entry64
smm_patch_entry64:
    .long 0
    .word {SEL_CODE64}
.code64
.global smm_stub_entry64
smm_stub_entry64:
    .byte 0x48, 0xbc
.global smm_patch_rsp
smm_patch_rsp:
    .quad 0
    .byte 0x48, 0xbf
.global smm_patch_percpu
smm_patch_percpu:
    .quad 0
    movabsq $smm_common_entry, %rax
    jmpq *%rax
.balign 8
smm_gdt_desc:
    .word {GDT_ENTRIES} * 8 - 1
.global smm_patch_gdt
smm_patch_gdt:
    .long 0
.global smm_stub_end
smm_stub_end:

# ---------------------------------------------------------------------------
# SMBASE relocation handler, copied to RELOC_STUB 0x38000 (default SMBASE
# 0x30000 + 0x8000). Writes the new SMBASE into the save state (0x30000 +
# SAVE_STATE_SMBASE),
# counts itself done and returns; RSM then reloads SMBASE.
.section .rodata.reloc_stub, "a"
.code16
.global reloc_stub_start
reloc_stub_start:
    movl (RELOC_NEXT_SMBASE), %eax
    movl %eax, %cs:{SAVE_STATE_SMBASE}
    lock incl (RELOC_DONE)
    rsm
.global reloc_stub_end
reloc_stub_end:

# ---------------------------------------------------------------------------
# AP start-up code, copied to 0x8000 (SIPI vector 0x08): real mode, CS=0x0800.
# Each AP takes a ticket and waits for its turn. Its CPU index is its initial
# APIC ID (CPUID.1:EBX[31:24]), so agent CPU N is APIC ID N; it relocates its
# SMBASE to TILES_BASE + (APIC ID << TILE_SHIFT) with a self-SMI (SMI broadcast is not
# negotiated yet, so an APM write interrupts only the writing CPU), records
# itself in CPU_MASK, hands the turn on and parks with interrupts off. An
# APIC ID above MAX_APIC_ID is reported in BAD_APIC_ID and not relocated.
# Linux later wakes every AP with INIT-SIPI-SIPI.
.section .rodata.ap_start, "a"
.code16
.global ap_start
ap_start:
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %ss
    movw $({RELOC_DATA} + {RELOC_AP_STACK_TOP}), %sp
    movl $1, %eax
    lock xaddl %eax, (AP_TICKET)
    movl %eax, %edi
1:  pause
    cmpl (AP_TURN), %edi
    jne 1b
    movl $1, %eax
    cpuid
    shrl $24, %ebx
    cmpl ${MAX_APIC_ID}, %ebx
    ja 4f
    movl %ebx, %ecx
    movl $1, %eax
    cmpl $32, %ecx
    jae 5f
    shll %cl, %eax
    lock orl %eax, (CPU_MASK_LO)
    jmp 6f
5:  subl $32, %ecx
    shll %cl, %eax
    lock orl %eax, (CPU_MASK_HI)
6:  shll ${TILE_SHIFT}, %ebx
    addl (TILES_BASE), %ebx
    movl %ebx, (RELOC_NEXT_SMBASE)
    movl (RELOC_DONE), %ecx
    movb ${APM_CMD_FIRMWARE}, %al
    outb %al, ${APM_CNT_PORT}
2:  pause
    cmpl (RELOC_DONE), %ecx
    je 2b
    jmp 7f
4:  movl %ebx, (BAD_APIC_ID)
7:  lock incl (AP_TURN)
3:  cli
    hlt
    jmp 3b
.global ap_start_end
ap_start_end:

# ---------------------------------------------------------------------------
# Common 64-bit SMI entry. In: RSP = top of this CPU's SMM stack (16-byte
# aligned), RDI = this CPU's per-CPU block (its first 512 bytes hold the
# interrupted FPU/SSE state). Runs smm_main(percpu) and returns with RSM.
.section .text.smm, "ax"
.code64
.global smm_common_entry
smm_common_entry:
    fxsave64 {PERCPU_FXSAVE}(%rdi)
    fninit
    ldmxcsr smm_mxcsr(%rip)
    lidtq firmware_idt_desc(%rip)
    movq %rsp, {PERCPU_SAVED_RSP}(%rdi)
    pushq %rdi
    pushq %rdi
    call smm_main
.global smm_return
smm_return:
    popq %rdi
    popq %rdi
    fxrstor64 {PERCPU_FXSAVE}(%rdi)
    rsm

# Resumes the SMI return path after an exception in SMM.
# In: RDI = the per-CPU block of the faulting CPU.
.global smm_abort_resume
smm_abort_resume:
    movq {PERCPU_SAVED_RSP}(%rdi), %rsp
    subq $16, %rsp
    jmp smm_return

.section .rodata.smm_mxcsr, "a"
.balign 4
smm_mxcsr:
    .long 0x1f80

# ---------------------------------------------------------------------------
# Exception stubs (vectors 0-31), shared by boot and SMM. Each pushes a dummy
# error code where the CPU pushes none, then the vector, saves the general
# registers and calls exception_handler(frame) (src/smm/exceptions.rs).
.section .text.exceptions, "ax"
.code64
.macro EXC_NOERR n
exc_\n:
    pushq $0
    pushq $\n
    jmp exc_common
.endm
.macro EXC_ERR n
exc_\n:
    pushq $\n
    jmp exc_common
.endm
EXC_NOERR 0
EXC_NOERR 1
EXC_NOERR 2
EXC_NOERR 3
EXC_NOERR 4
EXC_NOERR 5
EXC_NOERR 6
EXC_NOERR 7
EXC_ERR 8
EXC_NOERR 9
EXC_ERR 10
EXC_ERR 11
EXC_ERR 12
EXC_ERR 13
EXC_ERR 14
EXC_NOERR 15
EXC_NOERR 16
EXC_ERR 17
EXC_NOERR 18
EXC_NOERR 19
EXC_NOERR 20
EXC_ERR 21
EXC_NOERR 22
EXC_NOERR 23
EXC_NOERR 24
EXC_NOERR 25
EXC_NOERR 26
EXC_NOERR 27
EXC_NOERR 28
EXC_ERR 29
EXC_ERR 30
EXC_NOERR 31

exc_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    andq $~0xf, %rsp
    call exception_handler
    # exception_handler returns only in SMM, with the per-CPU block in RAX.
    movq %rax, %rdi
    jmp smm_abort_resume

.section .rodata.exc_table, "a"
.balign 8
.global exception_stubs
exception_stubs:
.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exc_\n
.endr

# The IDT shared by boot and SMM (filled by src/hw/idt.rs), and its
# descriptor; both live in the image, so in SMM they are the TSEG copy's.
.section .bss.idt, "aw", @nobits
.balign 16
.global firmware_idt
firmware_idt:
    .skip 32 * 16

.section .data.idt_desc, "aw"
.balign 16
.global firmware_idt_desc
firmware_idt_desc:
    .word 32 * 16 - 1
    .quad firmware_idt
