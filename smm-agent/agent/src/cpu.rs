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

use core::mem::offset_of;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

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

/// One segment register in the save state (selector, attributes, limit,
/// base: QEMU `do_smm_enter`, AMD64 map).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SegmentLe {
    /// Selector.
    pub selector: U16,
    /// Attributes (descriptor flags).
    pub attrib: U16,
    /// Limit in bytes.
    pub limit: U32,
    /// Base address.
    pub base: U64,
}

/// QEMU's AMD64 SMRAM save-state map, `SMBASE+0xFC00 .. SMBASE+0x10000`,
/// as a typed little-endian layout. Field comments give the offset from
/// SMBASE+0x8000, as in `../shared/notes/q35-smm.md`; the `reserved*`
/// fields are state the agent does not decode.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SaveStateLe {
    /// 0x7C00..0x7E00.
    pub reserved0: [u8; 0x200],
    /// 0x7E00: ES, CS, SS, DS, FS, GS ([`Seg`] order).
    pub segments: [SegmentLe; 6],
    /// 0x7E60.
    pub reserved1: [u8; 4],
    /// 0x7E64: GDTR limit.
    pub gdtr_limit: U32,
    /// 0x7E68: GDTR base.
    pub gdtr_base: U64,
    /// 0x7E70: LDTR.
    pub reserved2: [u8; 0x14],
    /// 0x7E84: IDTR limit.
    pub idtr_limit: U32,
    /// 0x7E88: IDTR base.
    pub idtr_base: U64,
    /// 0x7E90: TR and the rest.
    pub reserved3: [u8; 0x40],
    /// 0x7ED0: EFER.
    pub efer: U64,
    /// 0x7ED8.
    pub reserved4: [u8; 0x24],
    /// 0x7EFC: SMM revision id.
    pub revision: U32,
    /// 0x7F00: SMBASE.
    pub smbase: U32,
    /// 0x7F04.
    pub reserved5: [u8; 0x44],
    /// 0x7F48: CR4.
    pub cr4: U64,
    /// 0x7F50: CR3.
    pub cr3: U64,
    /// 0x7F58: CR0.
    pub cr0: U64,
    /// 0x7F60: DR7.
    pub dr7: U64,
    /// 0x7F68: DR6.
    pub dr6: U64,
    /// 0x7F70: RFLAGS.
    pub rflags: U64,
    /// 0x7F78: RIP.
    pub rip: U64,
    /// 0x7F80: R15.
    pub r15: U64,
    /// 0x7F88: R14.
    pub r14: U64,
    /// 0x7F90: R13.
    pub r13: U64,
    /// 0x7F98: R12.
    pub r12: U64,
    /// 0x7FA0: R11.
    pub r11: U64,
    /// 0x7FA8: R10.
    pub r10: U64,
    /// 0x7FB0: R9.
    pub r9: U64,
    /// 0x7FB8: R8.
    pub r8: U64,
    /// 0x7FC0: RDI.
    pub rdi: U64,
    /// 0x7FC8: RSI.
    pub rsi: U64,
    /// 0x7FD0: RBP.
    pub rbp: U64,
    /// 0x7FD8: RSP.
    pub rsp: U64,
    /// 0x7FE0: RBX.
    pub rbx: U64,
    /// 0x7FE8: RDX.
    pub rdx: U64,
    /// 0x7FF0: RCX.
    pub rcx: U64,
    /// 0x7FF8: RAX.
    pub rax: U64,
}

/// Offset of the slice from SMBASE+0x8000 (the notes' offsets minus this
/// are offsets into [`SaveStateLe`]).
const BASE: usize = 0x7C00;

// The map is QEMU's: pin every decoded field to the notes' offset.
const _: () = {
    assert!(size_of::<SaveStateLe>() == SAVE_STATE_LEN);
    assert!(BASE + offset_of!(SaveStateLe, segments) == 0x7E00);
    assert!(BASE + offset_of!(SaveStateLe, gdtr_limit) == 0x7E64);
    assert!(BASE + offset_of!(SaveStateLe, gdtr_base) == 0x7E68);
    assert!(BASE + offset_of!(SaveStateLe, idtr_limit) == 0x7E84);
    assert!(BASE + offset_of!(SaveStateLe, idtr_base) == 0x7E88);
    assert!(BASE + offset_of!(SaveStateLe, efer) == 0x7ED0);
    assert!(BASE + offset_of!(SaveStateLe, revision) == 0x7EFC);
    assert!(BASE + offset_of!(SaveStateLe, smbase) == 0x7F00);
    assert!(BASE + offset_of!(SaveStateLe, cr4) == 0x7F48);
    assert!(BASE + offset_of!(SaveStateLe, cr3) == 0x7F50);
    assert!(BASE + offset_of!(SaveStateLe, cr0) == 0x7F58);
    assert!(BASE + offset_of!(SaveStateLe, dr7) == 0x7F60);
    assert!(BASE + offset_of!(SaveStateLe, dr6) == 0x7F68);
    assert!(BASE + offset_of!(SaveStateLe, rflags) == 0x7F70);
    assert!(BASE + offset_of!(SaveStateLe, rip) == 0x7F78);
    assert!(BASE + offset_of!(SaveStateLe, r15) == 0x7F80);
    assert!(BASE + offset_of!(SaveStateLe, r8) == 0x7FB8);
    assert!(BASE + offset_of!(SaveStateLe, rdi) == 0x7FC0);
    assert!(BASE + offset_of!(SaveStateLe, rsp) == 0x7FD8);
    assert!(BASE + offset_of!(SaveStateLe, rax) == 0x7FF8);
};

/// Segment index in the save state's segment array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seg {
    /// ES.
    Es = 0,
    /// CS.
    Cs = 1,
    /// SS.
    Ss = 2,
    /// DS.
    Ds = 3,
    /// FS.
    Fs = 4,
    /// GS.
    Gs = 5,
}

/// Decodes an AMD64 save state. The MSR fields other than FS/GS base stay
/// zero and `msrs_valid` is 0 until [`apply_msrs`].
pub fn decode_save_state(raw: &[u8; SAVE_STATE_LEN]) -> CpuSnapshot {
    let s = SaveStateLe::read_from_bytes(raw).unwrap_or_else(|_| SaveStateLe::new_zeroed());
    let seg = |seg: Seg| s.segments[seg as usize];
    let sel = |g: Seg| u64::from(seg(g).selector.get());
    CpuSnapshot {
        rax: s.rax.get(),
        rbx: s.rbx.get(),
        rcx: s.rcx.get(),
        rdx: s.rdx.get(),
        rsi: s.rsi.get(),
        rdi: s.rdi.get(),
        rbp: s.rbp.get(),
        rsp: s.rsp.get(),
        r8: s.r8.get(),
        r9: s.r9.get(),
        r10: s.r10.get(),
        r11: s.r11.get(),
        r12: s.r12.get(),
        r13: s.r13.get(),
        r14: s.r14.get(),
        r15: s.r15.get(),
        rip: s.rip.get(),
        rflags: s.rflags.get(),
        cr0: s.cr0.get(),
        cr3: s.cr3.get(),
        cr4: s.cr4.get(),
        efer: s.efer.get(),
        dr6: s.dr6.get(),
        dr7: s.dr7.get(),
        gdtr_base: s.gdtr_base.get(),
        gdtr_limit: u64::from(s.gdtr_limit.get()),
        idtr_base: s.idtr_base.get(),
        idtr_limit: u64::from(s.idtr_limit.get()),
        cs_selector: sel(Seg::Cs),
        ss_selector: sel(Seg::Ss),
        ds_selector: sel(Seg::Ds),
        es_selector: sel(Seg::Es),
        fs_selector: sel(Seg::Fs),
        gs_selector: sel(Seg::Gs),
        fs_seg_base: seg(Seg::Fs).base.get(),
        gs_seg_base: seg(Seg::Gs).base.get(),
        smbase: u64::from(s.smbase.get()),
        smm_revision: u64::from(s.revision.get()),
        msrs_valid: 0,
        msr_lstar: 0,
        msr_star: 0,
        msr_cstar: 0,
        msr_kernel_gs_base: 0,
        msr_fs_base: seg(Seg::Fs).base.get(),
        msr_gs_base: seg(Seg::Gs).base.get(),
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
