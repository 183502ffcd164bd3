//! Acquisition: the layout of a memory-dump file in the formats forensic
//! tools read, and the small state file that makes a dump resumable.
//!
//! A dump is planned before a byte of RAM is read: a [`Plan`] is a list of
//! [`Piece`]s at fixed file offsets, either literal header bytes or a RAM
//! range whose bytes the agent supplies. The formats:
//!
//! - [`Format::Raw`]: the RAM ranges one after another (no headers); the
//!   RAM map and CPU states go to the `IMAGE.json` sidecar of [`crate::dump`].
//! - [`Format::Lime`]: per range a 32-byte LiME header, then the range's
//!   bytes. Header (LiME's `lime_mem_range_header`, little-endian, as
//!   LiME's `doc/README.md` and Volatility 3's `lime` layer read it): u32
//!   magic `0x4C694D45`, u32 version 1, u64 first physical address, u64
//!   *last* physical address (inclusive), 8 reserved bytes (zero).
//! - [`Format::Elf`]: an ELF64 core file (System V gABI; `ET_CORE`,
//!   `EM_X86_64`): one `PT_NOTE` holding, as kdump's `/proc/vmcore` does,
//!   one `NT_PRSTATUS` note per vCPU in CPU order (name `"CORE"`, Linux
//!   x86-64's 336-byte `struct elf_prstatus` with the registers the agent
//!   saved when the dump began in `pr_reg`, and `pr_pid` the CPU index + 1
//!   as QEMU's `dump-guest-memory` writes it: drgn takes a `pr_pid` of 0
//!   for "registers not saved")
//!   and a `VMCOREINFO` note (name `"VMCOREINFO"`, type 0, the guest
//!   kernel's own vmcoreinfo text, as the kernel's `crash_core.c` carries
//!   it), then
//!   one `PT_LOAD` per RAM range with `p_paddr` = the range's base and
//!   `p_vaddr` = 0 (physical only, as QEMU's paging-less
//!   `dump-guest-memory` writes them); data page-aligned.
//!
//! Consistency: each agent request is one snapshot (all vCPUs are in SMM
//! while it is served), but a dump takes thousands of requests and the
//! guest runs between them: the dump as a whole is *not* a snapshot of one
//! moment (it is "smeared" over the acquisition time), exactly like a dump
//! taken by LiME inside a running guest.

use std::path::{Path, PathBuf};

use smmvmi_mailbox::records::CpuState;

/// File formats of `ids dump`.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// RAM ranges back to back, plus the `IMAGE.json` sidecar.
    Raw,
    /// LiME (Volatility 3's preferred Linux format).
    Lime,
    /// ELF64 core with a VMCOREINFO note (crash, drgn).
    Elf,
}

/// LiME's header magic (`"EMiL"` in file byte order).
pub const LIME_MAGIC: u32 = 0x4C69_4D45;
/// LiME header version.
pub const LIME_VERSION: u32 = 1;
/// Bytes of one LiME range header.
pub const LIME_HEADER_LEN: u64 = 32;

/// ELF64 file header size.
const EHDR_LEN: u64 = 64;
/// ELF64 program header size.
const PHDR_LEN: u64 = 56;
/// Alignment of the first data byte in an ELF core.
const ELF_DATA_ALIGN: u64 = 4096;

/// One piece of a dump file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Piece {
    /// Literal bytes (headers), hex in the state file.
    Bytes {
        /// File offset.
        offset: u64,
        /// The bytes, as lowercase hex.
        hex: String,
    },
    /// A RAM range read through the agent.
    Ram {
        /// File offset of its first byte.
        offset: u64,
        /// Guest-physical base.
        base: u64,
        /// Length in bytes.
        len: u64,
    },
}

impl Piece {
    /// File offset.
    pub fn offset(&self) -> u64 {
        match self {
            Piece::Bytes { offset, .. } | Piece::Ram { offset, .. } => *offset,
        }
    }

    /// Length in the file.
    pub fn len(&self) -> u64 {
        match self {
            Piece::Bytes { hex, .. } => hex.len() as u64 / 2,
            Piece::Ram { len, .. } => *len,
        }
    }

    /// True for an empty piece.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where every byte of a dump file comes from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    /// The format.
    pub format: Format,
    /// Pieces in file order, without gaps (an ELF core's alignment padding
    /// is a zero [`Piece::Bytes`]).
    pub pieces: Vec<Piece>,
}

impl Plan {
    /// Plans a dump of `ram` (`(base, len)` in bytes, as the agent's INFO
    /// lists them) in `format`; an ELF core also gets an `NT_PRSTATUS`
    /// note per CPU of `cpus` and `vmcoreinfo` as its VMCOREINFO note
    /// (`None`: none); the other formats ignore both.
    pub fn new(
        format: Format,
        ram: &[(u64, u64)],
        vmcoreinfo: Option<&[u8]>,
        cpus: &[CpuState],
    ) -> Self {
        let ram: Vec<(u64, u64)> = ram.iter().copied().filter(|r| r.1 > 0).collect();
        let mut pieces = Vec::new();
        let mut at = 0u64;
        let push_bytes = |pieces: &mut Vec<Piece>, at: &mut u64, b: &[u8]| {
            pieces.push(Piece::Bytes {
                offset: *at,
                hex: host_injector::daemon::protocol::hex(b),
            });
            *at += b.len() as u64;
        };
        match format {
            Format::Raw => {
                for &(base, len) in &ram {
                    pieces.push(Piece::Ram {
                        offset: at,
                        base,
                        len,
                    });
                    at += len;
                }
            }
            Format::Lime => {
                for &(base, len) in &ram {
                    push_bytes(&mut pieces, &mut at, &lime_header(base, len));
                    pieces.push(Piece::Ram {
                        offset: at,
                        base,
                        len,
                    });
                    at += len;
                }
            }
            Format::Elf => {
                let mut note: Vec<u8> = cpus
                    .iter()
                    .enumerate()
                    .flat_map(|(i, c)| prstatus_note(i, c))
                    .collect();
                note.extend(vmcoreinfo.map(vmcoreinfo_note).unwrap_or_default());
                let headers = elf_headers(&ram, &note);
                push_bytes(&mut pieces, &mut at, &headers);
                let mut off = at;
                for &(base, len) in &ram {
                    pieces.push(Piece::Ram {
                        offset: off,
                        base,
                        len,
                    });
                    off += len;
                }
            }
        }
        Plan { format, pieces }
    }

    /// Total file length.
    pub fn total(&self) -> u64 {
        self.pieces.last().map_or(0, |p| p.offset() + p.len())
    }

    /// RAM bytes to read.
    pub fn ram_bytes(&self) -> u64 {
        self.pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Ram { len, .. } => Some(*len),
                Piece::Bytes { .. } => None,
            })
            .sum()
    }
}

/// A LiME range header for `len` bytes at physical `base`.
pub fn lime_header(base: u64, len: u64) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[0..4].copy_from_slice(&LIME_MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&LIME_VERSION.to_le_bytes());
    h[8..16].copy_from_slice(&base.to_le_bytes());
    h[16..24].copy_from_slice(&(base + len - 1).to_le_bytes());
    h
}

/// An ELF note (gABI "Note Section"): namesz, descsz, type, then the
/// NUL-terminated name and the descriptor, each padded to 4 bytes.
pub fn elf_note(name: &str, kind: u32, desc: &[u8]) -> Vec<u8> {
    let pad = |n: usize| n.div_ceil(4) * 4;
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32 + 1).to_le_bytes());
    v.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    v.extend_from_slice(&kind.to_le_bytes());
    let mut n = name.as_bytes().to_vec();
    n.push(0);
    n.resize(pad(n.len()), 0);
    v.extend_from_slice(&n);
    let mut d = desc.to_vec();
    d.resize(pad(d.len()), 0);
    v.extend_from_slice(&d);
    v
}

/// The VMCOREINFO note of `text` (the kernel's `vmcoreinfo_data` bytes).
pub fn vmcoreinfo_note(text: &[u8]) -> Vec<u8> {
    elf_note("VMCOREINFO", 0, text)
}

/// `NT_PRSTATUS`: a note of a thread's (here a CPU's) registers.
pub const NT_PRSTATUS: u32 = 1;
/// Bytes of Linux x86-64's `struct elf_prstatus` (the kernel's
/// `include/linux/elfcore.h`, as `crash_save_cpu()` fills it).
pub const PRSTATUS_LEN: usize = 336;
/// Offset of `pr_reg` (a `struct user_regs_struct`) in it, after the
/// signal info, pending/held masks, pid/ppid/pgrp/sid and four times.
pub const PRSTATUS_REG: usize = 112;

/// `struct user_regs_struct` of x86-64 (27 u64 in this order) from a CPU
/// state: `orig_rax` is -1 (no system call known), the FS/GS bases are
/// the MSRs when the agent read them, else the segment caches.
pub fn user_regs(c: &CpuState) -> [u64; 27] {
    let (fs_base, gs_base) = if c.msrs_valid != 0 {
        (c.msr_fs_base, c.msr_gs_base)
    } else {
        (c.fs_seg_base, c.gs_seg_base)
    };
    [
        c.r15,
        c.r14,
        c.r13,
        c.r12,
        c.rbp,
        c.rbx,
        c.r11,
        c.r10,
        c.r9,
        c.r8,
        c.rax,
        c.rcx,
        c.rdx,
        c.rsi,
        c.rdi,
        u64::MAX,
        c.rip,
        c.cs_selector,
        c.rflags,
        c.rsp,
        c.ss_selector,
        fs_base,
        gs_base,
        c.ds_selector,
        c.es_selector,
        c.fs_selector,
        c.gs_selector,
    ]
}

/// Offset of `pr_pid` in `struct elf_prstatus`.
const PRSTATUS_PID: usize = 32;

/// The `NT_PRSTATUS` note of CPU `index` (`pr_pid` = index + 1, `pr_reg`
/// its registers, the rest zero).
pub fn prstatus_note(index: usize, c: &CpuState) -> Vec<u8> {
    let mut d = vec![0u8; PRSTATUS_LEN];
    let pid = u32::try_from(index + 1).unwrap_or(u32::MAX);
    d[PRSTATUS_PID..PRSTATUS_PID + 4].copy_from_slice(&pid.to_le_bytes());
    for (i, r) in user_regs(c).iter().enumerate() {
        let at = PRSTATUS_REG + 8 * i;
        d[at..at + 8].copy_from_slice(&r.to_le_bytes());
    }
    elf_note("CORE", NT_PRSTATUS, &d)
}

/// ELF header, program headers, the notes and the padding up to the first
/// data byte (page-aligned).
fn elf_headers(ram: &[(u64, u64)], note: &[u8]) -> Vec<u8> {
    let phnum = ram.len() as u64 + u64::from(!note.is_empty());
    let note_off = EHDR_LEN + PHDR_LEN * phnum;
    let data_off = (note_off + note.len() as u64).div_ceil(ELF_DATA_ALIGN) * ELF_DATA_ALIGN;
    let mut h = Vec::with_capacity(data_off as usize);
    // e_ident: ELFMAG, ELFCLASS64, ELFDATA2LSB, EV_CURRENT, ELFOSABI_NONE.
    h.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    h.extend_from_slice(&[0; 8]);
    h.extend_from_slice(&4u16.to_le_bytes()); // e_type ET_CORE
    h.extend_from_slice(&62u16.to_le_bytes()); // e_machine EM_X86_64
    h.extend_from_slice(&1u32.to_le_bytes()); // e_version
    h.extend_from_slice(&0u64.to_le_bytes()); // e_entry
    h.extend_from_slice(&EHDR_LEN.to_le_bytes()); // e_phoff
    h.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    h.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    h.extend_from_slice(&(EHDR_LEN as u16).to_le_bytes()); // e_ehsize
    h.extend_from_slice(&(PHDR_LEN as u16).to_le_bytes()); // e_phentsize
    h.extend_from_slice(&(phnum as u16).to_le_bytes()); // e_phnum
    h.extend_from_slice(&0u16.to_le_bytes()); // e_shentsize
    h.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    h.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    let phdr = |h: &mut Vec<u8>, kind: u32, flags: u32, off: u64, paddr: u64, len: u64, align| {
        h.extend_from_slice(&kind.to_le_bytes());
        h.extend_from_slice(&flags.to_le_bytes());
        h.extend_from_slice(&off.to_le_bytes());
        h.extend_from_slice(&0u64.to_le_bytes()); // p_vaddr
        h.extend_from_slice(&paddr.to_le_bytes());
        h.extend_from_slice(&len.to_le_bytes()); // p_filesz
        h.extend_from_slice(&len.to_le_bytes()); // p_memsz
        h.extend_from_slice(&u64::to_le_bytes(align));
    };
    if !note.is_empty() {
        phdr(&mut h, 4, 0, note_off, 0, note.len() as u64, 4); // PT_NOTE
    }
    let mut off = data_off;
    for &(base, len) in ram {
        phdr(&mut h, 1, 7, off, base, len, 0); // PT_LOAD, RWX
        off += len;
    }
    h.extend_from_slice(note);
    h.resize(data_off as usize, 0);
    h
}

/// Decodes lowercase hex (the state file's header bytes).
pub use host_injector::daemon::protocol::unhex as from_hex;

/// State file format version.
pub const STATE_VERSION: u32 = 1;

/// The resume state of a dump in progress (`FILE.ids-dump.json`), written
/// at every checkpoint and removed when the dump completes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct State {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// The plan (the RAM map and headers the dump was started with).
    pub plan: Plan,
    /// Bytes of the file known written and flushed: everything before this
    /// offset is final; resuming truncates the file here and goes on.
    pub done: u64,
    /// Unreadable stretches zero-filled so far: (physical address, length,
    /// reason).
    pub holes: Vec<(u64, u64, String)>,
    /// Unix time the dump started (seconds).
    pub started: u64,
    /// Times the dump was resumed.
    pub resumed: u32,
}

/// The state file of a dump file.
pub fn state_path(file: &Path) -> PathBuf {
    let mut p = file.as_os_str().to_owned();
    p.push(".ids-dump.json");
    PathBuf::from(p)
}

/// Errors of resuming.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResumeError {
    /// No state file.
    #[error(
        "no resume state {0} (written while a dump runs, removed when it completes): start the dump again without --resume"
    )]
    NoState(String),
    /// The state file does not parse or has another version.
    #[error("the resume state {path} is unusable: {why}; remove it and the dump, and start again")]
    Bad {
        /// State path.
        path: String,
        /// Why.
        why: String,
    },
    /// The dump differs from what the state describes.
    #[error(
        "cannot resume: {what} (the state was written by `ids dump` with {then}, asked now: {now}); start again without --resume"
    )]
    Mismatch {
        /// What differs.
        what: &'static str,
        /// In the state.
        then: String,
        /// Now.
        now: String,
    },
    /// The dump file is shorter than the state says.
    #[error(
        "the dump file holds {have} bytes but the resume state says {done} were written: the file was changed; start again"
    )]
    Short {
        /// File length.
        have: u64,
        /// Recorded.
        done: u64,
    },
}

impl State {
    /// Loads the state of `file` and checks it against what is asked now:
    /// the same format and the same RAM ranges; `file_len` must reach the
    /// recorded checkpoint.
    pub fn load_for_resume(
        file: &Path,
        format: Format,
        ram: &[(u64, u64)],
        file_len: u64,
    ) -> Result<Self, ResumeError> {
        let p = state_path(file);
        let text = std::fs::read_to_string(&p)
            .map_err(|_| ResumeError::NoState(p.display().to_string()))?;
        let st: State = serde_json::from_str(&text).map_err(|e| ResumeError::Bad {
            path: p.display().to_string(),
            why: e.to_string(),
        })?;
        if st.version != STATE_VERSION {
            return Err(ResumeError::Bad {
                path: p.display().to_string(),
                why: format!("version {} (expected {STATE_VERSION})", st.version),
            });
        }
        if st.plan.format != format {
            return Err(ResumeError::Mismatch {
                what: "another format",
                then: format!("{:?}", st.plan.format),
                now: format!("{format:?}"),
            });
        }
        let then: Vec<(u64, u64)> = st
            .plan
            .pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Ram { base, len, .. } => Some((*base, *len)),
                Piece::Bytes { .. } => None,
            })
            .collect();
        let now: Vec<(u64, u64)> = ram.iter().copied().filter(|r| r.1 > 0).collect();
        if then != now {
            return Err(ResumeError::Mismatch {
                what: "the guest's RAM map changed",
                then: format!("{then:x?}"),
                now: format!("{now:x?}"),
            });
        }
        if file_len < st.done {
            return Err(ResumeError::Short {
                have: file_len,
                done: st.done,
            });
        }
        Ok(st)
    }

    /// Writes the state next to `file` (through a temporary file and a
    /// rename, so a crash leaves the old state or the new one).
    pub fn save(&self, file: &Path) -> std::io::Result<()> {
        let p = state_path(file);
        let mut tmp = p.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).expect("serializable"))?;
        std::fs::rename(&tmp, &p)
    }
}

/// What the guest kernel's vmcoreinfo is, read through kallsyms: the
/// pointer `vmcoreinfo_data` and the length `vmcoreinfo_size` (kernel
/// `kernel/crash_core.c`, 6.1; `kernel/vmcore_info.c` from 6.9).
pub const VMCOREINFO_SYMBOLS: (&str, &str) = ("vmcoreinfo_data", "vmcoreinfo_size");

/// Largest vmcoreinfo accepted (the kernel allocates one page,
/// `VMCOREINFO_BYTES`).
pub const VMCOREINFO_MAX: u64 = 4096;

/// Reads the guest kernel's vmcoreinfo text (`KEY=VALUE` lines) through
/// `k`'s symbols in `cpu`'s kernel address space: the `vmcoreinfo_data`
/// pointer and the `vmcoreinfo_size` count. Errors: a missing symbol (a
/// kernel without `CONFIG_CRASH_CORE`/`VMCORE_INFO`), a NULL pointer, a
/// size of 0 or above [`VMCOREINFO_MAX`], or an unreadable page.
pub fn read_vmcoreinfo<M: crate::memory::GuestMemory + ?Sized>(
    m: &mut M,
    k: &crate::linux::Kernel,
    cpu: u32,
) -> Result<Vec<u8>, crate::linux::LinuxError> {
    use crate::linux::LinuxError;
    let sym = |name: &str| {
        k.kallsyms
            .addr(name)
            .ok_or_else(|| LinuxError::NoSymbol(name.into()))
    };
    let (data_at, size_at) = (sym(VMCOREINFO_SYMBOLS.0)?, sym(VMCOREINFO_SYMBOLS.1)?);
    let space = crate::memory::Space::Virt(smmvmi_mailbox::wire::AddressSpace::kernel_of(cpu));
    let word = |m: &mut M, at: u64| -> Result<u64, LinuxError> {
        let b = m.read_exact(space, at, 8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let ptr = word(m, data_at)?;
    let size = word(m, size_at)?;
    if ptr == 0 || size == 0 || size > VMCOREINFO_MAX {
        return Err(LinuxError::NoSymbol(format!(
            "a usable vmcoreinfo (vmcoreinfo_data {ptr:#x}, vmcoreinfo_size {size:#x}; expected a pointer and 1..={VMCOREINFO_MAX} bytes)"
        )));
    }
    Ok(m.read_exact(space, ptr, size as usize)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lime_headers_are_inclusive_and_little_endian() {
        let h = lime_header(0x10_0000, 0x1000);
        assert_eq!(&h[0..4], b"EMiL");
        assert_eq!(u32::from_le_bytes(h[4..8].try_into().unwrap()), 1);
        assert_eq!(u64::from_le_bytes(h[8..16].try_into().unwrap()), 0x10_0000);
        assert_eq!(u64::from_le_bytes(h[16..24].try_into().unwrap()), 0x10_0fff);
        let p = Plan::new(
            Format::Lime,
            &[(0, 0x9f000), (0x10_0000, 0x1000), (0x5000, 0)],
            None,
            &[CpuState::default()],
        );
        assert_eq!(p.pieces.len(), 4, "empty ranges are left out");
        assert_eq!(p.total(), 32 + 0x9f000 + 32 + 0x1000);
        assert_eq!(
            p.pieces[3],
            Piece::Ram {
                offset: 64 + 0x9f000,
                base: 0x10_0000,
                len: 0x1000
            }
        );
    }

    #[test]
    fn elf_core_has_a_note_and_a_load_per_range() {
        let info = b"OSRELEASE=6.1.0\nPAGESIZE=4096\n";
        let ram = [(0u64, 0x9f000u64), (0x10_0000, 0x3000)];
        let cpus = [
            CpuState {
                rip: 0xffff_ffff_8100_1234,
                rsp: 0xffff_c900_0000_3f00,
                r15: 15,
                cs_selector: 0x10,
                ..CpuState::default()
            },
            CpuState {
                rip: 0x40_1000,
                cs_selector: 0x33,
                fs_seg_base: 0x7f00_0000_0000,
                ..CpuState::default()
            },
        ];
        let p = Plan::new(Format::Elf, &ram, Some(info), &cpus);
        let Piece::Bytes { hex, offset: 0 } = &p.pieces[0] else {
            panic!("headers first")
        };
        let h = from_hex(hex).unwrap();
        assert_eq!(h.len() % 4096, 0);
        assert_eq!(&h[..4], b"\x7fELF");
        let u16_at = |o: usize| u16::from_le_bytes(h[o..o + 2].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap());
        assert_eq!((u16_at(16), u16_at(18), u16_at(56)), (4, 62, 3));
        // PT_NOTE: an NT_PRSTATUS per CPU in order, then VMCOREINFO.
        assert_eq!(u32_at(64), 4);
        let (mut noff, nlen) = (u64_at(64 + 8) as usize, u64_at(64 + 32) as usize);
        let start = noff;
        for (i, c) in cpus.iter().enumerate() {
            assert_eq!(u32_at(noff), 5, "\"CORE\" and its NUL");
            assert_eq!(u32_at(noff + 4) as usize, PRSTATUS_LEN);
            assert_eq!(u32_at(noff + 8), NT_PRSTATUS);
            assert_eq!(&h[noff + 12..noff + 17], b"CORE\0");
            let reg = |i: usize| u64_at(noff + 20 + PRSTATUS_REG + 8 * i);
            assert_eq!(reg(0), c.r15, "pr_reg starts with r15");
            assert_eq!(reg(15), u64::MAX, "orig_rax");
            assert_eq!((reg(16), reg(17), reg(19)), (c.rip, c.cs_selector, c.rsp));
            assert_eq!(reg(21), c.fs_seg_base, "fs_base without the MSRs");
            assert_eq!(u32_at(noff + 20 + 32) as usize, i + 1, "pr_pid");
            noff += 20 + PRSTATUS_LEN;
        }
        assert_eq!(u32_at(noff), 11, "namesz counts the NUL");
        assert_eq!(u32_at(noff + 4) as usize, info.len());
        assert_eq!(&h[noff + 12..noff + 22], b"VMCOREINFO");
        assert_eq!(&h[noff + 24..noff + 24 + info.len()], info);
        assert_eq!(
            nlen,
            noff - start + 24 + info.len().div_ceil(4) * 4,
            "p_filesz covers every note"
        );
        // PT_LOADs: file offsets match the plan's pieces.
        for (i, (base, len)) in ram.iter().enumerate() {
            let ph = 64 + 56 * (i + 1);
            assert_eq!(u32_at(ph), 1);
            assert_eq!(u64_at(ph + 24), *base, "p_paddr");
            assert_eq!(u64_at(ph + 32), *len, "p_filesz");
            assert_eq!(p.pieces[i + 1].offset(), u64_at(ph + 8), "p_offset");
        }
        assert_eq!(p.total(), h.len() as u64 + 0x9f000 + 0x3000);
        assert_eq!(p.ram_bytes(), 0xa2000);
    }

    #[test]
    fn raw_is_ranges_back_to_back_and_hex_round_trips() {
        let p = Plan::new(Format::Raw, &[(0, 0x1000), (0x10_0000, 0x2000)], None, &[]);
        assert_eq!(p.total(), 0x3000);
        assert_eq!(p.pieces[1].offset(), 0x1000);
        assert_eq!(from_hex("00ff7f").unwrap(), vec![0, 0xff, 0x7f]);
        assert_eq!(from_hex("0"), None);
    }

    #[test]
    fn resume_refuses_another_format_or_ram_map() {
        let dir = std::env::temp_dir().join(format!("ids-acq-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("mem.lime");
        let ram = [(0u64, 0x1000u64)];
        assert!(matches!(
            State::load_for_resume(&f, Format::Lime, &ram, 0),
            Err(ResumeError::NoState(_))
        ));
        let st = State {
            version: STATE_VERSION,
            plan: Plan::new(Format::Lime, &ram, None, &[]),
            done: 0x800,
            holes: vec![],
            started: 0,
            resumed: 0,
        };
        st.save(&f).unwrap();
        assert_eq!(
            State::load_for_resume(&f, Format::Lime, &ram, 0x900).unwrap(),
            st
        );
        assert!(matches!(
            State::load_for_resume(&f, Format::Elf, &ram, 0x900),
            Err(ResumeError::Mismatch { .. })
        ));
        assert!(matches!(
            State::load_for_resume(&f, Format::Lime, &[(0, 0x2000)], 0x900),
            Err(ResumeError::Mismatch { .. })
        ));
        assert!(matches!(
            State::load_for_resume(&f, Format::Lime, &ram, 0x10),
            Err(ResumeError::Short { .. })
        ));
        std::fs::remove_dir_all(&dir).ok();
    }
}
