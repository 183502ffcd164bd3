# Reset path: 16-bit real mode at the reset vector -> 32-bit protected mode
# (executing from ROM) -> 64-bit long mode in the RAM copy of the image.
#
# Boot page tables (identity map of the low 4 GiB with 2 MiB pages): a PML4,
# a PDPT and four page directories at BOOT_PML4 (src/layout.rs). Every
# braced name is a const operand of the `global_asm!` in src/main.rs.
#
# Under AMD SEV every entry carries the C-bit (all memory private, as OVMF's
# reset vector does): without paging every access is private, so the image
# copied into RAM here is encrypted and must be read through private
# mappings once paging is on. The Rust side (`boot::paging`) then clears
# the bit where memory is shared (fw_cfg DMA buffer, MMIO), decided by
# `smmvmi_boot::paging`, after checking that the mask used here is the one
# `smmvmi_boot::sev::SevConfig` decodes (`boot_c_mask_high`).

.set BOOT_PML4, {BOOT_PML4}
.set BOOT_PDPT, {BOOT_PDPT}
.set BOOT_PD,   {BOOT_PD}
.set CPUID_SEV_LEAF, {CPUID_SEV_LEAF}
.set CPUID_SEV_SUPPORTED, {CPUID_SEV_SUPPORTED}
.set CPUID_C_BIT_MASK, {CPUID_C_BIT_MASK}
.set MSR_SEV_STATUS, {MSR_SEV_STATUS}
.set SEV_STATUS_SEV_ENABLED, {SEV_STATUS_SEV_ENABLED}


.section .reset16, "ax"
.code16
reset16:
    cli
    cld
    # Only the bootstrap processor boots. An application processor gets here
    # only after an INIT it took in SMM (QEMU TCG delivers INIT to a CPU in
    # SMM; the next SMI wakes it from wait-for-SIPI and RSM resumes it at
    # the reset vector): it parks, and a later SIPI still starts it.
    movl $MSR_APIC_BASE, %ecx
    rdmsr
    testl $APIC_BASE_BSP, %eax
    jz ap_park16
    # CS.base is 0xffff0000 at reset: address the descriptor relative to it.
    lgdtl %cs:(boot_gdt_desc - 0xffff0000)
    movl %cr0, %eax
    andl $~(CR0_CD | CR0_NW | CR0_EM | CR0_TS), %eax
    orl $(CR0_PE | CR0_MP | CR0_NE), %eax
    movl %eax, %cr0
    ljmpl ${SEL_CODE32}, $start32

ap_park16:
    hlt
    jmp ap_park16

.code32
start32:
    movw ${SEL_DATA}, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs

    # Copy the image from ROM to its link address in RAM.
    movl $__fw_load, %esi
    movl $__fw_start, %edi
    movl $__fw_image_end, %ecx
    subl $__fw_start, %ecx
    rep movsb

    # Zero .bss.
    xorl %eax, %eax
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl $__bss_start, %ecx
    rep stosb

    # The SEV C-bit, as the upper half of a page-table entry, into %ebp
    # (0 without SEV). SEV_STATUS is read only when CPUID 0x8000001F says
    # SEV is supported (elsewhere RDMSR raises #GP); the bit counts only
    # when SEV_STATUS says SEV is active for this guest. A position below
    # 32 is left out here; Rust then refuses the boot (boot::paging).
    xorl %ebp, %ebp
    movl $0x80000000, %eax
    cpuid
    cmpl $CPUID_SEV_LEAF, %eax
    jb 4f
    movl $CPUID_SEV_LEAF, %eax
    cpuid
    testl $CPUID_SEV_SUPPORTED, %eax
    jz 4f
    movl %ebx, %esi
    movl $MSR_SEV_STATUS, %ecx
    rdmsr
    testl $SEV_STATUS_SEV_ENABLED, %eax
    jz 4f
    movl %esi, %ecx
    andl $CPUID_C_BIT_MASK, %ecx
    subl $32, %ecx
    jb 4f
    movl $1, %ebp
    shll %cl, %ebp
4:  movl %ebp, boot_c_mask_high

    # Boot page tables: clear them, then fill.
    xorl %eax, %eax
    movl $BOOT_PML4, %edi
    movl $({BOOT_PT_PAGES} * 4096 / 4), %ecx
    rep stosl
    movl $(BOOT_PDPT | 0x3), BOOT_PML4
    movl %ebp, BOOT_PML4 + 4
    movl $0, %ecx
1:  movl %ecx, %eax
    shll $12, %eax
    addl $(BOOT_PD | 0x3), %eax
    movl %eax, BOOT_PDPT(, %ecx, 8)
    movl %ebp, BOOT_PDPT + 4(, %ecx, 8)
    incl %ecx
    cmpl $4, %ecx
    jne 1b
    # 2048 PD entries, each a 2 MiB page (PS | RW | P); the high dword is
    # the C-bit (or 0).
    movl $0, %ecx
2:  movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    movl %eax, BOOT_PD(, %ecx, 8)
    movl %ebp, BOOT_PD + 4(, %ecx, 8)
    incl %ecx
    cmpl $2048, %ecx
    jne 2b

    movl %cr4, %eax
    orl $(CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT), %eax
    movl %eax, %cr4
    movl $BOOT_PML4, %eax
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl %cr0, %eax
    orl $CR0_PG, %eax
    movl %eax, %cr0
    ljmpl ${SEL_CODE64}, $start64

.balign 16
boot_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff    # 0x08: 32-bit code
    .quad 0x00af9a000000ffff    # 0x10: 64-bit code (Linux __BOOT_CS)
    .quad 0x00cf92000000ffff    # 0x18: data (Linux __BOOT_DS)
boot_gdt_end:
boot_gdt_desc:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt

.section .resetvec, "ax"
.code16
.global reset_vector
reset_vector:
    jmp reset16
    .balign 16, 0xf4

.section .text.start64, "ax"
.code64
.global start64
start64:
    movl ${SEL_DATA}, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movabsq $boot_stack_top, %rsp
    xorl %ebp, %ebp
    call firmware_main
3:  cli
    hlt
    jmp 3b

# The upper half of the C-bit mask the reset path put in every entry
# (checked against SevConfig by boot::paging).
.section .bss.boot_c_mask, "aw", @nobits
.balign 4
.global boot_c_mask_high
boot_c_mask_high:
    .skip 4

.section .bss.boot_stack, "aw", @nobits
.balign 4096
.global boot_stack
boot_stack:
    .skip 128 * 1024
.global boot_stack_top
boot_stack_top:
