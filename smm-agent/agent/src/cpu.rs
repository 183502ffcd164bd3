//! CPU snapshots: decoding QEMU's AMD64 SMRAM save-state map.
//!
//! The firmware hands each CPU's save state as the 1 KiB slice
//! `SMBASE+0xFC00 .. SMBASE+0x10000`; offsets below are those of
//! `../shared/notes/q35-smm.md` (from SMBASE+0x8000) minus 0x7C00.
//! MSRs that the save state does not hold (LSTAR, KERNEL_GS_BASE, ...) are
//! read by each CPU with RDMSR inside SMM and added with [`apply_msrs`].
//! FS and GS bases come from the save state's segment bases: SMM entry
//! reloads the segment registers, so RDMSR of IA32_FS_BASE/IA32_GS_BASE in
//! SMM no longer shows the interrupted values.

pub use smmvmi_mailbox::wire::CpuState as CpuSnapshot;

/// Length of the save-state slice (`SMBASE+0xFC00 .. SMBASE+0x10000`).
pub const SAVE_STATE_LEN: usize = 0x400;
/// Offset of the slice from SMBASE.
pub const SAVE_STATE_SMBASE_OFFSET: u64 = 0xFC00;

/// IA32_LSTAR.
pub const MSR_LSTAR: u32 = 0xC000_0082;
/// IA32_STAR.
pub const MSR_STAR: u32 = 0xC000_0081;
/// IA32_CSTAR.
pub const MSR_CSTAR: u32 = 0xC000_0083;
/// IA32_KERNEL_GS_BASE.
pub const MSR_KERNEL_GS_BASE: u32 = 0xC000_0102;
/// IA32_SYSENTER_EIP.
pub const MSR_SYSENTER_EIP: u32 = 0x176;

// Offsets from SMBASE+0x8000, as in the notes.
const BASE: usize = 0x7C00;
const SEG_ES: usize = 0x7E00;
const GDTR_LIMIT: usize = 0x7E64;
const GDTR_BASE: usize = 0x7E68;
const IDTR_LIMIT: usize = 0x7E84;
const IDTR_BASE: usize = 0x7E88;
const EFER: usize = 0x7ED0;
const REVISION: usize = 0x7EFC;
const SMBASE: usize = 0x7F00;
const CR4: usize = 0x7F48;
const CR3: usize = 0x7F50;
const CR0: usize = 0x7F58;
const DR7: usize = 0x7F60;
const DR6: usize = 0x7F68;
const RFLAGS: usize = 0x7F70;
const RIP: usize = 0x7F78;
const R15: usize = 0x7F80;
const RDI: usize = 0x7FC0;
const RSI: usize = 0x7FC8;
const RBP: usize = 0x7FD0;
const RSP: usize = 0x7FD8;
const RBX: usize = 0x7FE0;
const RDX: usize = 0x7FE8;
const RCX: usize = 0x7FF0;
const RAX: usize = 0x7FF8;

fn q(s: &[u8; SAVE_STATE_LEN], off: usize) -> u64 {
    let i = off - BASE;
    let mut b = [0u8; 8];
    b.copy_from_slice(&s[i..i + 8]);
    u64::from_le_bytes(b)
}

fn d(s: &[u8; SAVE_STATE_LEN], off: usize) -> u64 {
    let i = off - BASE;
    u64::from(u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]))
}

fn w(s: &[u8; SAVE_STATE_LEN], off: usize) -> u64 {
    let i = off - BASE;
    u64::from(u16::from_le_bytes([s[i], s[i + 1]]))
}

/// Segment index in the save state's segment array.
#[derive(Clone, Copy)]
enum Seg {
    Es = 0,
    Cs = 1,
    Ss = 2,
    Ds = 3,
    Fs = 4,
    Gs = 5,
}

fn seg_selector(s: &[u8; SAVE_STATE_LEN], seg: Seg) -> u64 {
    w(s, SEG_ES + 16 * seg as usize)
}

fn seg_base(s: &[u8; SAVE_STATE_LEN], seg: Seg) -> u64 {
    q(s, SEG_ES + 16 * seg as usize + 8)
}

/// Decodes an AMD64 save state. The MSR fields other than FS/GS base stay
/// zero and `msrs_valid` is 0 until [`apply_msrs`].
pub fn decode_save_state(s: &[u8; SAVE_STATE_LEN]) -> CpuSnapshot {
    let r = |i: usize| q(s, R15 + 8 * (7 - i)); // R8 + i
    CpuSnapshot {
        rax: q(s, RAX),
        rbx: q(s, RBX),
        rcx: q(s, RCX),
        rdx: q(s, RDX),
        rsi: q(s, RSI),
        rdi: q(s, RDI),
        rbp: q(s, RBP),
        rsp: q(s, RSP),
        r8: r(0),
        r9: r(1),
        r10: r(2),
        r11: r(3),
        r12: r(4),
        r13: r(5),
        r14: r(6),
        r15: r(7),
        rip: q(s, RIP),
        rflags: q(s, RFLAGS),
        cr0: q(s, CR0),
        cr3: q(s, CR3),
        cr4: q(s, CR4),
        efer: q(s, EFER),
        dr6: q(s, DR6),
        dr7: q(s, DR7),
        gdtr_base: q(s, GDTR_BASE),
        gdtr_limit: d(s, GDTR_LIMIT),
        idtr_base: q(s, IDTR_BASE),
        idtr_limit: d(s, IDTR_LIMIT),
        cs_selector: seg_selector(s, Seg::Cs),
        ss_selector: seg_selector(s, Seg::Ss),
        ds_selector: seg_selector(s, Seg::Ds),
        es_selector: seg_selector(s, Seg::Es),
        fs_selector: seg_selector(s, Seg::Fs),
        gs_selector: seg_selector(s, Seg::Gs),
        fs_seg_base: seg_base(s, Seg::Fs),
        gs_seg_base: seg_base(s, Seg::Gs),
        smbase: d(s, SMBASE),
        smm_revision: d(s, REVISION),
        msrs_valid: 0,
        msr_lstar: 0,
        msr_star: 0,
        msr_cstar: 0,
        msr_kernel_gs_base: 0,
        msr_fs_base: seg_base(s, Seg::Fs),
        msr_gs_base: seg_base(s, Seg::Gs),
        msr_sysenter_eip: 0,
    }
}

/// MSRs a CPU reads itself (RDMSR) while in SMM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Msrs {
    /// [`MSR_LSTAR`].
    pub lstar: u64,
    /// [`MSR_STAR`].
    pub star: u64,
    /// [`MSR_CSTAR`].
    pub cstar: u64,
    /// [`MSR_KERNEL_GS_BASE`].
    pub kernel_gs_base: u64,
    /// [`MSR_SYSENTER_EIP`].
    pub sysenter_eip: u64,
}

/// Adds the MSRs a CPU read in SMM to its snapshot.
pub fn apply_msrs(snap: &mut CpuSnapshot, m: &Msrs) {
    snap.msr_lstar = m.lstar;
    snap.msr_star = m.star;
    snap.msr_cstar = m.cstar;
    snap.msr_kernel_gs_base = m.kernel_gs_base;
    snap.msr_sysenter_eip = m.sysenter_eip;
    snap.msrs_valid = 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(s: &mut [u8; SAVE_STATE_LEN], off: usize, v: &[u8]) {
        s[off - BASE..off - BASE + v.len()].copy_from_slice(v);
    }

    #[test]
    fn decodes_qemu_amd64_map() {
        let mut s = [0u8; SAVE_STATE_LEN];
        // General registers as QEMU stores them: regs[i] at 0x7ff8 - 8*i,
        // with RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15.
        for i in 0..16u64 {
            put(&mut s, 0x7FF8 - 8 * i as usize, &(0x1000 + i).to_le_bytes());
        }
        put(&mut s, 0x7F78, &0xFFFF_FFFF_8100_0000u64.to_le_bytes());
        put(&mut s, 0x7F70, &0x246u64.to_le_bytes());
        put(&mut s, 0x7F58, &0x8005_0033u64.to_le_bytes());
        put(&mut s, 0x7F50, &0x1_0A5E_0000u64.to_le_bytes());
        put(&mut s, 0x7F48, &0x0037_06F0u64.to_le_bytes());
        put(&mut s, 0x7ED0, &0xD01u64.to_le_bytes());
        put(&mut s, 0x7E64, &0x7Fu32.to_le_bytes());
        put(&mut s, 0x7E68, &0xFFFF_FE00_0000_1000u64.to_le_bytes());
        put(&mut s, 0x7E84, &0xFFFu32.to_le_bytes());
        put(&mut s, 0x7E88, &0xFFFF_FE00_0000_0000u64.to_le_bytes());
        put(&mut s, 0x7E10, &0x10u16.to_le_bytes()); // CS selector
        put(&mut s, 0x7E58, &0x7F00_1234_5000u64.to_le_bytes()); // GS base
        put(&mut s, 0x7EFC, &0x0002_0064u32.to_le_bytes());
        put(&mut s, 0x7F00, &0x7F00_0000u32.to_le_bytes());
        let c = decode_save_state(&s);
        assert_eq!(
            [c.rax, c.rcx, c.rdx, c.rbx, c.rsp, c.rbp, c.rsi, c.rdi],
            [
                0x1000, 0x1001, 0x1002, 0x1003, 0x1004, 0x1005, 0x1006, 0x1007
            ]
        );
        assert_eq!([c.r8, c.r15], [0x1008, 0x100F]);
        assert_eq!(c.rip, 0xFFFF_FFFF_8100_0000);
        assert_eq!(c.rflags, 0x246);
        assert_eq!(c.cr0, 0x8005_0033);
        assert_eq!(c.cr3, 0x1_0A5E_0000);
        assert_eq!(c.cr4, 0x0037_06F0);
        assert_eq!(c.efer, 0xD01);
        assert_eq!((c.gdtr_limit, c.gdtr_base), (0x7F, 0xFFFF_FE00_0000_1000));
        assert_eq!((c.idtr_limit, c.idtr_base), (0xFFF, 0xFFFF_FE00_0000_0000));
        assert_eq!(c.cs_selector, 0x10);
        assert_eq!(c.gs_seg_base, 0x7F00_1234_5000);
        assert_eq!(c.msr_gs_base, 0x7F00_1234_5000);
        assert_eq!(c.smm_revision, 0x0002_0064);
        assert_eq!(c.smbase, 0x7F00_0000);
        assert_eq!(c.paging_levels(), 4);
        assert_eq!(c.msrs_valid, 0);
        let mut c = c;
        apply_msrs(
            &mut c,
            &Msrs {
                lstar: 0xFFFF_FFFF_8160_0080,
                ..Msrs::default()
            },
        );
        assert_eq!((c.msrs_valid, c.msr_lstar), (1, 0xFFFF_FFFF_8160_0080));
    }
}
