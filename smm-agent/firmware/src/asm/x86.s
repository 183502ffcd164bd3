# Architectural constants shared by reset.s and smm.s (assembled first;
# see main.rs).
.set CR0_PE, 1 << 0
.set CR0_MP, 1 << 1
.set CR0_EM, 1 << 2
.set CR0_TS, 1 << 3
.set CR0_NE, 1 << 5
.set CR0_NW, 1 << 29
.set CR0_CD, 1 << 30
.set CR0_PG, 1 << 31
.set CR4_PAE, 1 << 5
.set CR4_OSFXSR, 1 << 9
.set CR4_OSXMMEXCPT, 1 << 10
.set MSR_EFER, 0xc0000080
.set EFER_LME, 1 << 8
.set MSR_APIC_BASE, 0x1b
.set APIC_BASE_BSP, 1 << 8
