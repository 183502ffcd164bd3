//! The fixed records carried as result data: the TRANSLATE walk trace
//! ([`WalkRecord`]), CPU_STATE ([`CpuState`]) and INFO ([`Info`]), each
//! with its little-endian layout type (`*Le`).
//!
//! # Walk record (104 bytes, [`WalkRecordLe`])
//! | offset | size | field |
//! |---|---|---|
//! | 0x00 | 8 | virtual address |
//! | 0x08 | 8 | physical address (valid if the status is Ok) |
//! | 0x10 | 1 | paging levels (4 or 5) |
//! | 0x11 | 1 | depth: entries read |
//! | 0x12 | 1 | page shift (12, 21, 30; 0 if the walk failed) |
//! | 0x13 | 5 | zero |
//! | 0x18 | 16*5 | (entry address, entry value) per level, top first |
//!
//! # CPU state ([`CpuStateLe`])
//! Consecutive u64 values in the field order of [`CpuState`].
//!
//! # INFO
//! | offset | size | field |
//! |---|---|---|
//! | 0x00 | 40 | [`InfoHeaderLe`] |
//! | 0x28 | 16*r | RAM ranges ([`RamRangeLe`]) |
//! | .. | 8*c | CPUs ([`InfoCpuLe`]) |

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::wire::{WireError, truncated};

/// Most paging levels a walk has (5-level paging).
pub const MAX_LEVELS: usize = 5;

/// A walk record as it lies in the result data.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct WalkRecordLe {
    /// Virtual address translated.
    pub va: U64,
    /// Physical address.
    pub pa: U64,
    /// Paging levels of the mode walked.
    pub levels: u8,
    /// Entries read.
    pub depth: u8,
    /// log2 of the page size mapped, 0 if the walk failed.
    pub page_shift: u8,
    /// Zero.
    pub reserved: [u8; 5],
    /// (entry address, entry value) per level, top first.
    pub entries: [[U64; 2]; MAX_LEVELS],
}

/// Encoded size of a [`WalkRecord`] in bytes.
pub const WALK_RECORD_LEN: usize = size_of::<WalkRecordLe>();

const _: () = assert!(WALK_RECORD_LEN == 24 + 16 * MAX_LEVELS);

/// Decoded TRANSLATE data: the page walk and its trace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalkRecord {
    /// Virtual address translated.
    pub va: u64,
    /// Physical address (valid if the status is Ok).
    pub pa: u64,
    /// Paging levels of the mode walked (4 or 5).
    pub levels: u8,
    /// Entries read (valid prefix of `entries`).
    pub depth: u8,
    /// log2 of the page size mapped (12, 21, 30), 0 if the walk failed.
    pub page_shift: u8,
    /// (physical address of the entry, entry value) per level, top first.
    pub entries: [(u64, u64); MAX_LEVELS],
}

impl WalkRecord {
    /// Encodes the record.
    pub fn encode(&self, out: &mut [u8; WALK_RECORD_LEN]) {
        let le = WalkRecordLe {
            va: self.va.into(),
            pa: self.pa.into(),
            levels: self.levels,
            depth: self.depth,
            page_shift: self.page_shift,
            reserved: [0; 5],
            entries: self.entries.map(|(a, v)| [a.into(), v.into()]),
        };
        out.copy_from_slice(le.as_bytes());
    }

    /// Decodes a record.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        if b.len() != WALK_RECORD_LEN {
            return Err(WireError::BadLength {
                what: "walk record length",
                expected: WALK_RECORD_LEN,
                found: b.len(),
            });
        }
        let le = WalkRecordLe::read_from_bytes(b)
            .map_err(|_| truncated("walk record", WALK_RECORD_LEN, b.len()))?;
        let r = WalkRecord {
            va: le.va.get(),
            pa: le.pa.get(),
            levels: le.levels,
            depth: le.depth,
            page_shift: le.page_shift,
            entries: le.entries.map(|[a, v]| (a.get(), v.get())),
        };
        if usize::from(r.depth) > MAX_LEVELS {
            return Err(WireError::BadLength {
                what: "walk depth at most 5",
                expected: MAX_LEVELS,
                found: usize::from(r.depth),
            });
        }
        Ok(r)
    }

    /// The entries actually read.
    pub fn trace(&self) -> &[(u64, u64)] {
        &self.entries[..usize::from(self.depth).min(MAX_LEVELS)]
    }
}

macro_rules! cpu_state {
    ($($(#[$m:meta])* $f:ident,)*) => {
        /// A CPU's state as the agent saw it in SMM: the save-state registers
        /// plus the MSRs the CPU read itself. Encoded as [`CpuStateLe`].
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct CpuState { $($(#[$m])* pub $f: u64,)* }

        /// A [`CpuState`] as it lies in the result data: consecutive u64
        /// little-endian values in field order.
        #[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
        #[repr(C)]
        pub struct CpuStateLe { $($(#[$m])* pub $f: U64,)* }

        impl CpuState {
            /// Number of u64 fields.
            pub const FIELDS: usize = [$(stringify!($f)),*].len();
            /// Encoded length in bytes.
            pub const LEN: usize = size_of::<CpuStateLe>();

            /// Encodes into exactly [`Self::LEN`] bytes.
            pub fn encode(&self, out: &mut [u8; Self::LEN]) {
                let le = CpuStateLe { $($f: self.$f.into(),)* };
                out.copy_from_slice(le.as_bytes());
            }

            /// Decodes from exactly [`Self::LEN`] bytes.
            pub fn decode(b: &[u8]) -> Result<Self, WireError> {
                if b.len() != Self::LEN {
                    return Err(WireError::BadLength {
                        what: "CPU state length",
                        expected: Self::LEN,
                        found: b.len(),
                    });
                }
                let le = CpuStateLe::read_from_bytes(b)
                    .map_err(|_| truncated("CPU state", Self::LEN, b.len()))?;
                Ok(Self { $($f: le.$f.get(),)* })
            }
        }
    };
}

cpu_state! {
    rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp,
    r8, r9, r10, r11, r12, r13, r14, r15,
    rip, rflags,
    cr0, cr3, cr4, efer, dr6, dr7,
    gdtr_base, gdtr_limit, idtr_base, idtr_limit,
    cs_selector, ss_selector, ds_selector, es_selector, fs_selector, gs_selector,
    /// FS base from the save state's segment descriptor cache.
    fs_seg_base,
    /// GS base from the save state's segment descriptor cache.
    gs_seg_base,
    /// SMBASE of this CPU.
    smbase,
    /// SMM revision id.
    smm_revision,
    /// 1 if the MSR fields below were read by the CPU itself in SMM.
    msrs_valid,
    msr_lstar, msr_star, msr_cstar, msr_kernel_gs_base, msr_fs_base, msr_gs_base,
    msr_sysenter_eip,
}

impl CpuState {
    /// Paging levels this CPU uses: 4 or 5 in long mode with paging, 0 otherwise.
    pub fn paging_levels(&self) -> u8 {
        let long_mode = self.efer & (1 << 10) != 0 && self.cr0 & (1 << 31) != 0;
        if !long_mode {
            0
        } else if self.cr4 & (1 << 12) != 0 {
            5
        } else {
            4
        }
    }

    /// CR4.PCIDE.
    pub fn pcid(&self) -> bool {
        self.cr4 & (1 << 17) != 0
    }
}

/// SEV flag in [`Info::sev_flags`]: memory encryption is active.
pub const SEV_ACTIVE: u32 = 1;
/// Flag in [`Info::sev_flags`]: the agent's key came from the SEV launch
/// secret area (injected after the launch measurement, or loaded there by a
/// test harness). Agents before 1.3 set neither key flag.
pub const KEY_FROM_LAUNCH_SECRET: u32 = 1 << 8;
/// Flag in [`Info::sev_flags`]: the agent's key came from fw_cfg
/// `opt/smmvmi/key`, which the guest can read for the VM's whole life
/// (test setups only).
pub const KEY_FROM_FW_CFG: u32 = 1 << 9;

/// Memory flag in [`InfoHeader::mem_flags`]: the agent tracks DIMMs plugged
/// after boot (QEMU's ACPI memory hot-plug controller); the RAM ranges
/// include the ones plugged now.
pub const MEM_DIMM_HOTPLUG: u32 = 1 << 0;
/// Memory flag: the machine has a `virtio-mem` device. Its memory is not in
/// the RAM ranges and reads of it are refused as not RAM: the plugged blocks
/// are known only through the device, which the guest drives.
pub const MEM_VIRTIO_MEM_REFUSED: u32 = 1 << 1;

/// One RAM range in [`Info`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RamRange {
    /// First byte.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Fixed part of the INFO record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InfoHeader {
    /// Agent version (major << 16 | minor).
    pub agent_version: u32,
    /// CPUs the agent holds snapshots for.
    pub cpu_count: u32,
    /// [`SEV_ACTIVE`], ...
    pub sev_flags: u32,
    /// Position of the SEV C-bit (0 if none).
    pub c_bit: u32,
    /// RAM ranges that follow.
    pub ram_range_count: u32,
    /// Largest data length one READ can return with this mailbox.
    pub max_read: u32,
    /// SMRAM (TSEG) base.
    pub smram_base: u64,
    /// SMRAM size.
    pub smram_size: u64,
    /// [`MEM_DIMM_HOTPLUG`], [`MEM_VIRTIO_MEM_REFUSED`].
    pub mem_flags: u32,
}

/// The fixed part of INFO as it lies in the result data.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct InfoHeaderLe {
    /// See [`InfoHeader::agent_version`].
    pub agent_version: U32,
    /// Number of [`InfoCpuLe`] entries.
    pub cpu_count: U32,
    /// See [`InfoHeader::sev_flags`].
    pub sev_flags: U32,
    /// See [`InfoHeader::c_bit`].
    pub c_bit: U32,
    /// Number of [`RamRangeLe`] entries.
    pub ram_range_count: U32,
    /// See [`InfoHeader::max_read`].
    pub max_read: U32,
    /// SMRAM (TSEG) base address.
    pub smram_base: U64,
    /// SMRAM size in bytes.
    pub smram_size: U64,
    /// See [`InfoHeader::mem_flags`].
    pub mem_flags: U32,
    /// Zero.
    pub reserved: U32,
}

/// A RAM range of INFO as it lies in the result data.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RamRangeLe {
    /// First byte.
    pub base: U64,
    /// Length in bytes.
    pub len: U64,
}

/// A CPU entry of INFO as it lies in the result data.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct InfoCpuLe {
    /// Paging levels (0, 4, 5).
    pub paging_levels: u8,
    /// [`INFO_CPU_PCID`].
    pub flags: u8,
    /// Zero.
    pub reserved: [u8; 6],
}

/// Fixed INFO header length in bytes.
pub const INFO_HEADER_LEN: usize = size_of::<InfoHeaderLe>();
/// Bytes per RAM range in INFO.
pub const INFO_RANGE_LEN: usize = size_of::<RamRangeLe>();
/// Bytes per CPU entry in INFO.
pub const INFO_CPU_LEN: usize = size_of::<InfoCpuLe>();

const _: () = assert!(INFO_HEADER_LEN == 48 && INFO_RANGE_LEN == 16 && INFO_CPU_LEN == 8);
/// INFO CPU flag: PCID enabled.
pub const INFO_CPU_PCID: u8 = 1;

/// Per-CPU entry of INFO.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InfoCpu {
    /// Paging levels (0 = not in long mode with paging, 4, 5).
    pub paging_levels: u8,
    /// [`INFO_CPU_PCID`].
    pub flags: u8,
}

/// INFO record (zero-copy over the result data).
#[derive(Clone, Copy, Debug)]
pub struct Info<'a> {
    /// Fixed part.
    pub header: InfoHeader,
    ranges: &'a [u8],
    cpus: &'a [u8],
}

/// Length of an INFO record with `ranges` RAM ranges and `cpus` CPUs.
pub fn info_len(ranges: usize, cpus: usize) -> usize {
    INFO_HEADER_LEN + INFO_RANGE_LEN * ranges + INFO_CPU_LEN * cpus
}

/// Encodes an INFO record into `out`; returns the length or `NoSpace`.
pub fn encode_info(
    header: &InfoHeader,
    ranges: impl ExactSizeIterator<Item = RamRange>,
    cpus: impl ExactSizeIterator<Item = InfoCpu>,
    out: &mut [u8],
) -> Result<usize, WireError> {
    let len = info_len(ranges.len(), cpus.len());
    let found = out.len();
    let out = out.get_mut(..len).ok_or(WireError::NoSpace {
        expected: len,
        found,
    })?;
    let h = InfoHeaderLe {
        agent_version: header.agent_version.into(),
        cpu_count: (cpus.len() as u32).into(),
        sev_flags: header.sev_flags.into(),
        c_bit: header.c_bit.into(),
        ram_range_count: (ranges.len() as u32).into(),
        max_read: header.max_read.into(),
        smram_base: header.smram_base.into(),
        smram_size: header.smram_size.into(),
        mem_flags: header.mem_flags.into(),
        reserved: 0.into(),
    };
    let (head, rest) = out.split_at_mut(INFO_HEADER_LEN);
    head.copy_from_slice(h.as_bytes());
    let (range_bytes, cpu_bytes) = rest.split_at_mut(INFO_RANGE_LEN * ranges.len());
    for (r, dst) in ranges.zip(range_bytes.chunks_exact_mut(INFO_RANGE_LEN)) {
        let le = RamRangeLe {
            base: r.base.into(),
            len: r.len.into(),
        };
        dst.copy_from_slice(le.as_bytes());
    }
    for (c, dst) in cpus.zip(cpu_bytes.chunks_exact_mut(INFO_CPU_LEN)) {
        let le = InfoCpuLe {
            paging_levels: c.paging_levels,
            flags: c.flags,
            reserved: [0; 6],
        };
        dst.copy_from_slice(le.as_bytes());
    }
    Ok(len)
}

impl<'a> Info<'a> {
    /// Parses an INFO record.
    pub fn parse(b: &'a [u8]) -> Result<Self, WireError> {
        let (h, _) = InfoHeaderLe::read_from_prefix(b)
            .map_err(|_| truncated("INFO record", INFO_HEADER_LEN, b.len()))?;
        let header = InfoHeader {
            agent_version: h.agent_version.get(),
            cpu_count: h.cpu_count.get(),
            sev_flags: h.sev_flags.get(),
            c_bit: h.c_bit.get(),
            ram_range_count: h.ram_range_count.get(),
            max_read: h.max_read.get(),
            smram_base: h.smram_base.get(),
            smram_size: h.smram_size.get(),
            mem_flags: h.mem_flags.get(),
        };
        let nr = header.ram_range_count as usize;
        let nc = header.cpu_count as usize;
        let need = nr
            .checked_mul(INFO_RANGE_LEN)
            .and_then(|r| nc.checked_mul(INFO_CPU_LEN)?.checked_add(r))
            .and_then(|v| v.checked_add(INFO_HEADER_LEN));
        if need != Some(b.len()) {
            return Err(WireError::BadLength {
                what: "INFO length",
                expected: need.unwrap_or(usize::MAX),
                found: b.len(),
            });
        }
        let (ranges, cpus) = b[INFO_HEADER_LEN..].split_at(INFO_RANGE_LEN * nr);
        Ok(Self {
            header,
            ranges,
            cpus,
        })
    }

    /// RAM ranges.
    pub fn ram_ranges(&self) -> impl Iterator<Item = RamRange> + 'a {
        self.ranges
            .chunks_exact(INFO_RANGE_LEN)
            .filter_map(|c| RamRangeLe::read_from_bytes(c).ok())
            .map(|r| RamRange {
                base: r.base.get(),
                len: r.len.get(),
            })
    }

    /// Per-CPU paging facts.
    pub fn cpus(&self) -> impl Iterator<Item = InfoCpu> + 'a {
        self.cpus
            .chunks_exact(INFO_CPU_LEN)
            .filter_map(|c| InfoCpuLe::read_from_bytes(c).ok())
            .map(|c| InfoCpu {
                paging_levels: c.paging_levels,
                flags: c.flags,
            })
    }
}
