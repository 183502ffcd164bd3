//! Linux x86 boot protocol (64-bit entry): setup header parsing, the load
//! layout (kernel, initrd) and the zero page (`boot_params`).
//!
//! Offsets follow `Documentation/arch/x86/boot.rst` and `zero-page.rst`.
//! The setup blob is what QEMU serves in fw_cfg `SETUP_DATA`: the boot
//! sector, the setup header at 0x1F1 and the real-mode code (unused here).

use thiserror::Error;

use crate::e820::{self, E820Map};

/// Size of the zero page.
pub const BOOT_PARAMS_LEN: usize = 4096;
/// Offset of the setup header in the setup blob and the zero page.
pub const HDR_START: usize = 0x1F1;
/// Bytes of the setup blob this module reads (through `init_size`).
pub const HDR_MIN_LEN: usize = 0x264;
/// Minimum protocol with a 64-bit entry and `xloadflags`/`pref_address`
/// usable: 2.12.
pub const MIN_PROTOCOL: u16 = 0x020C;
/// Offset of the 64-bit entry point from the kernel load address.
pub const ENTRY64_OFFSET: u64 = 0x200;
/// `type_of_loader` value for "undefined" bootloaders.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xFF;
/// loadflags: protected-mode code is loaded at 0x100000.
pub const LOADED_HIGH: u8 = 1 << 0;
/// xloadflags: the kernel has the 64-bit entry at +0x200.
pub const XLF_KERNEL_64: u16 = 1 << 0;
/// Page size used for the initrd placement.
pub const PAGE: u64 = 4096;
/// Lowest address a bzImage may be loaded at.
pub const MIN_KERNEL_ADDR: u64 = 0x10_0000;

/// Zero page / setup header field offsets.
pub mod off {
    /// `acpi_rsdp_addr` (u64).
    pub const ACPI_RSDP_ADDR: usize = 0x070;
    /// `ext_ramdisk_image` (u32, high half of the initrd address).
    pub const EXT_RAMDISK_IMAGE: usize = 0x0C0;
    /// `ext_ramdisk_size` (u32, high half of the initrd size).
    pub const EXT_RAMDISK_SIZE: usize = 0x0C4;
    /// `ext_cmd_line_ptr` (u32, high half of the command line address).
    pub const EXT_CMD_LINE_PTR: usize = 0x0C8;
    /// `e820_entries` (u8).
    pub const E820_ENTRIES: usize = 0x1E8;
    /// `setup_sects` (u8).
    pub const SETUP_SECTS: usize = 0x1F1;
    /// `boot_flag` (u16, 0xAA55).
    pub const BOOT_FLAG: usize = 0x1FE;
    /// Second byte of the jump at 0x200: the header ends at 0x202 + this.
    pub const JUMP: usize = 0x201;
    /// `header` magic "HdrS" (u32).
    pub const HEADER: usize = 0x202;
    /// `version` (u16).
    pub const VERSION: usize = 0x206;
    /// `type_of_loader` (u8).
    pub const TYPE_OF_LOADER: usize = 0x210;
    /// `loadflags` (u8).
    pub const LOADFLAGS: usize = 0x211;
    /// `ramdisk_image` (u32).
    pub const RAMDISK_IMAGE: usize = 0x218;
    /// `ramdisk_size` (u32).
    pub const RAMDISK_SIZE: usize = 0x21C;
    /// `cmd_line_ptr` (u32).
    pub const CMD_LINE_PTR: usize = 0x228;
    /// `initrd_addr_max` (u32).
    pub const INITRD_ADDR_MAX: usize = 0x22C;
    /// `kernel_alignment` (u32).
    pub const KERNEL_ALIGNMENT: usize = 0x230;
    /// `relocatable_kernel` (u8).
    pub const RELOCATABLE: usize = 0x234;
    /// `xloadflags` (u16).
    pub const XLOADFLAGS: usize = 0x236;
    /// `cmdline_size` (u32).
    pub const CMDLINE_SIZE: usize = 0x238;
    /// `setup_data` (u64).
    pub const SETUP_DATA: usize = 0x250;
    /// `pref_address` (u64).
    pub const PREF_ADDRESS: usize = 0x258;
    /// `init_size` (u32).
    pub const INIT_SIZE: usize = 0x260;
    /// `e820_table` (128 × 20 bytes).
    pub const E820_TABLE: usize = 0x2D0;
}

/// Errors of Linux boot preparation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum LinuxError {
    /// The setup blob is too short to hold a setup header.
    #[error(
        "kernel setup blob is {len} bytes, expected at least {HDR_MIN_LEN}; pass a bzImage with -kernel"
    )]
    TooShort {
        /// Blob length.
        len: usize,
    },
    /// Boot flag or "HdrS" magic missing.
    #[error(
        "kernel is not a bzImage: boot flag {boot_flag:#06x} (expected 0xaa55), header magic {magic:#010x} (expected \"HdrS\"); pass a bzImage with -kernel"
    )]
    NotBzImage {
        /// Value at 0x1FE.
        boot_flag: u16,
        /// Value at 0x202.
        magic: u32,
    },
    /// Boot protocol older than 2.12.
    #[error(
        "kernel boot protocol {major}.{minor:02} is too old, expected 2.12 or newer for the 64-bit entry; use a newer kernel"
    )]
    TooOld {
        /// Major version.
        major: u8,
        /// Minor version.
        minor: u8,
    },
    /// A zImage (LOADED_HIGH clear).
    #[error(
        "kernel does not set LOADED_HIGH (loadflags {loadflags:#04x}): a zImage, not a bzImage; rebuild as bzImage"
    )]
    NotLoadedHigh {
        /// loadflags found.
        loadflags: u8,
    },
    /// No 64-bit entry point.
    #[error(
        "kernel has no 64-bit entry point (xloadflags {xloadflags:#06x}, expected bit 0 XLF_KERNEL_64); use an x86_64 kernel"
    )]
    No64BitEntry {
        /// xloadflags found.
        xloadflags: u16,
    },
    /// Not enough RAM below 4 GiB for kernel and initrd.
    #[error(
        "too little RAM: need {need_mib} MiB below 4 GiB for the kernel and initrd, have {have_mib} MiB usable; start the VM with more memory (-m)"
    )]
    TooLittleRam {
        /// MiB needed (rounded up).
        need_mib: u64,
        /// MiB available (rounded down).
        have_mib: u64,
    },
    /// Command line longer than the kernel accepts.
    #[error(
        "kernel command line is {len} bytes, the kernel accepts at most {max}; shorten -append"
    )]
    CmdlineTooLong {
        /// Length without the NUL.
        len: usize,
        /// Kernel's `cmdline_size`.
        max: u32,
    },
}

fn le_u8(b: &[u8], at: usize) -> u8 {
    b.get(at).copied().unwrap_or(0)
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([le_u8(b, at), le_u8(b, at + 1)])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from(le_u16(b, at)) | (u32::from(le_u16(b, at + 2)) << 16)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from(le_u32(b, at)) | (u64::from(le_u32(b, at + 4)) << 32)
}

/// The setup header fields this firmware needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetupHeader {
    /// Number of 512-byte setup sectors after the boot sector (0 means 4).
    pub setup_sects: u8,
    /// Boot protocol version (major << 8 | minor).
    pub version: u16,
    /// loadflags.
    pub loadflags: u8,
    /// Highest address the initrd's last byte may occupy.
    pub initrd_addr_max: u32,
    /// Required alignment of the load address (a power of two).
    pub kernel_alignment: u32,
    /// Whether the kernel may be loaded at any aligned address.
    pub relocatable: bool,
    /// xloadflags.
    pub xloadflags: u16,
    /// Longest command line without the NUL.
    pub cmdline_size: u32,
    /// Preferred load address.
    pub pref_address: u64,
    /// Bytes of memory the kernel needs from its load address while decompressing.
    pub init_size: u32,
}

impl SetupHeader {
    /// Parse and validate the setup header of a bzImage's setup blob.
    pub fn parse(setup: &[u8]) -> Result<Self, LinuxError> {
        if setup.len() < HDR_MIN_LEN {
            return Err(LinuxError::TooShort { len: setup.len() });
        }
        let boot_flag = le_u16(setup, off::BOOT_FLAG);
        let magic = le_u32(setup, off::HEADER);
        if boot_flag != 0xAA55 || magic != u32::from_le_bytes(*b"HdrS") {
            return Err(LinuxError::NotBzImage { boot_flag, magic });
        }
        let version = le_u16(setup, off::VERSION);
        if version < MIN_PROTOCOL {
            let [minor, major] = version.to_le_bytes();
            return Err(LinuxError::TooOld { major, minor });
        }
        let loadflags = le_u8(setup, off::LOADFLAGS);
        if loadflags & LOADED_HIGH == 0 {
            return Err(LinuxError::NotLoadedHigh { loadflags });
        }
        let xloadflags = le_u16(setup, off::XLOADFLAGS);
        if xloadflags & XLF_KERNEL_64 == 0 {
            return Err(LinuxError::No64BitEntry { xloadflags });
        }
        let kernel_alignment = le_u32(setup, off::KERNEL_ALIGNMENT);
        Ok(Self {
            setup_sects: le_u8(setup, off::SETUP_SECTS),
            version,
            loadflags,
            initrd_addr_max: le_u32(setup, off::INITRD_ADDR_MAX),
            // A zero or non-power-of-two alignment is treated as 2 MiB, the x86_64 default.
            kernel_alignment: if kernel_alignment.is_power_of_two() {
                kernel_alignment
            } else {
                0x20_0000
            },
            relocatable: le_u8(setup, off::RELOCATABLE) != 0,
            xloadflags,
            cmdline_size: le_u32(setup, off::CMDLINE_SIZE),
            pref_address: le_u64(setup, off::PREF_ADDRESS),
            init_size: le_u32(setup, off::INIT_SIZE),
        })
    }

    /// Size of the real-mode part (boot sector + setup sectors) in bytes.
    pub fn setup_size(&self) -> u64 {
        let sects = if self.setup_sects == 0 {
            4
        } else {
            self.setup_sects
        };
        (u64::from(sects) + 1) * 512
    }

    /// Check a command line length (without the NUL) against `cmdline_size`.
    pub fn check_cmdline(&self, len: usize) -> Result<(), LinuxError> {
        if u64::try_from(len).is_ok_and(|l| l <= u64::from(self.cmdline_size)) {
            Ok(())
        } else {
            Err(LinuxError::CmdlineTooLong {
                len,
                max: self.cmdline_size,
            })
        }
    }
}

/// Where the firmware puts the kernel and initrd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Load address of the protected-mode kernel.
    pub kernel_addr: u64,
    /// End of the kernel's working window (load address + max(init_size, size)).
    pub kernel_end: u64,
    /// 64-bit entry point (load address + 0x200).
    pub entry64: u64,
    /// Initrd address (0 if there is no initrd).
    pub initrd_addr: u64,
}

fn align_up(v: u64, a: u64) -> Option<u64> {
    let mask = a.checked_sub(1)?;
    v.checked_add(mask).map(|x| x & !mask)
}

fn mib_up(v: u64) -> u64 {
    v.div_ceil(1 << 20)
}

/// Plan the kernel and initrd addresses.
///
/// `low_ram_end` is the end of contiguous RAM from 1 MiB (e.g.
/// [`E820Map::lowmem_top`] after the legacy hole is reserved);
/// `reserved_start` is the start of the firmware's reserved area at the top of
/// low RAM (ACPI tables, TSEG). Usable memory is `[1 MiB, min of both)`.
pub fn plan_layout(
    hdr: &SetupHeader,
    low_ram_end: u64,
    reserved_start: u64,
    kernel_size: u64,
    initrd_size: u64,
) -> Result<Layout, LinuxError> {
    let top = low_ram_end.min(reserved_start).min(e820::FOUR_GIB);
    let align = u64::from(hdr.kernel_alignment);
    let window = u64::from(hdr.init_size).max(kernel_size);
    let initrd_pages = align_up(initrd_size, PAGE).unwrap_or(u64::MAX);
    let too_little = |kernel_end: u64| LinuxError::TooLittleRam {
        need_mib: mib_up(kernel_end.saturating_add(initrd_pages)),
        have_mib: top >> 20,
    };
    let pref = if hdr.pref_address == 0 {
        MIN_KERNEL_ADDR
    } else {
        hdr.pref_address
    };
    let pref = if hdr.relocatable {
        align_up(pref.max(MIN_KERNEL_ADDR), align).unwrap_or(u64::MAX)
    } else {
        pref
    };
    let fits = |addr: u64| {
        addr.checked_add(window)
            .filter(|&end| end.saturating_add(initrd_pages) <= top)
    };
    let (kernel_addr, kernel_end) = match fits(pref) {
        Some(end) => (pref, end),
        None if hdr.relocatable => {
            // Lowest aligned address at or above 1 MiB.
            let low = align_up(MIN_KERNEL_ADDR, align).unwrap_or(u64::MAX);
            let end = fits(low).ok_or(too_little(low.saturating_add(window)))?;
            (low, end)
        }
        None => return Err(too_little(pref.saturating_add(window))),
    };
    let initrd_addr = if initrd_size == 0 {
        0
    } else {
        let limit = top.min(u64::from(hdr.initrd_addr_max).saturating_add(1));
        limit
            .checked_sub(initrd_size)
            .map(|a| a & !(PAGE - 1))
            .filter(|&a| a >= kernel_end)
            .ok_or(too_little(kernel_end))?
    };
    Ok(Layout {
        kernel_addr,
        kernel_end,
        entry64: kernel_addr.saturating_add(ENTRY64_OFFSET),
        initrd_addr,
    })
}

/// What goes into the zero page besides the setup header.
#[derive(Debug, Clone, Copy)]
pub struct BootParamsInput<'a> {
    /// The setup blob (fw_cfg `SETUP_DATA`).
    pub setup: &'a [u8],
    /// Address of the NUL-terminated command line.
    pub cmdline_addr: u64,
    /// Initrd address (0 if none).
    pub initrd_addr: u64,
    /// Initrd size (0 if none).
    pub initrd_size: u64,
    /// The e820 map to hand over (at most 128 entries are used).
    pub e820: &'a E820Map,
    /// RSDP address (0 if none).
    pub rsdp: u64,
}

fn put(page: &mut [u8; BOOT_PARAMS_LEN], at: usize, bytes: &[u8]) {
    if let Some(dst) = page.get_mut(at..at.saturating_add(bytes.len())) {
        dst.copy_from_slice(bytes);
    }
}

fn lo32(v: u64) -> [u8; 4] {
    // Truncation is the point: the low half goes in the legacy field.
    ((v & 0xFFFF_FFFF) as u32).to_le_bytes()
}

fn hi32(v: u64) -> [u8; 4] {
    ((v >> 32) as u32).to_le_bytes()
}

/// Build the zero page: the setup header copied from the setup blob
/// (0x1F1 up to 0x202 + the jump byte at 0x201), then the loader fields.
/// `setup_data` is cleared: QEMU may point it at data the firmware did not load.
pub fn build_boot_params(input: &BootParamsInput<'_>) -> [u8; BOOT_PARAMS_LEN] {
    let mut page = [0u8; BOOT_PARAMS_LEN];
    let hdr_end = off::HEADER
        .saturating_add(usize::from(le_u8(input.setup, off::JUMP)))
        .min(input.setup.len())
        .min(BOOT_PARAMS_LEN);
    if let (Some(dst), Some(src)) = (
        page.get_mut(HDR_START..hdr_end),
        input.setup.get(HDR_START..hdr_end),
    ) {
        dst.copy_from_slice(src);
    }
    put(&mut page, off::TYPE_OF_LOADER, &[LOADER_TYPE_UNDEFINED]);
    put(&mut page, off::CMD_LINE_PTR, &lo32(input.cmdline_addr));
    put(&mut page, off::EXT_CMD_LINE_PTR, &hi32(input.cmdline_addr));
    put(&mut page, off::RAMDISK_IMAGE, &lo32(input.initrd_addr));
    put(&mut page, off::EXT_RAMDISK_IMAGE, &hi32(input.initrd_addr));
    put(&mut page, off::RAMDISK_SIZE, &lo32(input.initrd_size));
    put(&mut page, off::EXT_RAMDISK_SIZE, &hi32(input.initrd_size));
    put(&mut page, off::SETUP_DATA, &0u64.to_le_bytes());
    put(&mut page, off::ACPI_RSDP_ADDR, &input.rsdp.to_le_bytes());
    let table_end = off::E820_TABLE + e820::CAPACITY * e820::ENTRY_LEN;
    let n = page
        .get_mut(off::E820_TABLE..table_end)
        .map_or(0, |t| input.e820.encode(t));
    put(
        &mut page,
        off::E820_ENTRIES,
        &[u8::try_from(n).unwrap_or(u8::MAX)],
    );
    page
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::string::ToString;
    use std::vec;
    use std::vec::Vec;

    /// A setup blob like Debian's 6.1 kernel: protocol 2.15, 64-bit,
    /// relocatable, pref_address 16 MiB, init_size ~ 40 MiB.
    fn setup_blob() -> Vec<u8> {
        let mut s = vec![0u8; 0x4000];
        s[off::SETUP_SECTS] = 0x1f;
        s[off::BOOT_FLAG..off::BOOT_FLAG + 2].copy_from_slice(&0xAA55u16.to_le_bytes());
        s[0x200] = 0xEB;
        s[off::JUMP] = 0x6A; // header ends at 0x26C
        s[off::HEADER..off::HEADER + 4].copy_from_slice(b"HdrS");
        s[off::VERSION..off::VERSION + 2].copy_from_slice(&0x020Fu16.to_le_bytes());
        s[off::LOADFLAGS] = LOADED_HIGH;
        s[off::INITRD_ADDR_MAX..off::INITRD_ADDR_MAX + 4]
            .copy_from_slice(&0x7FFF_FFFFu32.to_le_bytes());
        s[off::KERNEL_ALIGNMENT..off::KERNEL_ALIGNMENT + 4]
            .copy_from_slice(&0x20_0000u32.to_le_bytes());
        s[off::RELOCATABLE] = 1;
        s[off::XLOADFLAGS..off::XLOADFLAGS + 2].copy_from_slice(&0x7Fu16.to_le_bytes());
        s[off::CMDLINE_SIZE..off::CMDLINE_SIZE + 4].copy_from_slice(&2047u32.to_le_bytes());
        s[off::SETUP_DATA..off::SETUP_DATA + 8].copy_from_slice(&0x1234_5000u64.to_le_bytes());
        s[off::PREF_ADDRESS..off::PREF_ADDRESS + 8].copy_from_slice(&0x100_0000u64.to_le_bytes());
        s[off::INIT_SIZE..off::INIT_SIZE + 4].copy_from_slice(&0x280_0000u32.to_le_bytes());
        // QEMU writes its own loader fields into the blob; they must be overwritten.
        s[off::TYPE_OF_LOADER] = 0xB0;
        s[off::CMD_LINE_PTR..off::CMD_LINE_PTR + 4].copy_from_slice(&0x2_0000u32.to_le_bytes());
        // Bytes past the header (real-mode code) must not be copied.
        s[0x26C] = 0xCC;
        s
    }

    #[test]
    fn parses_debian_like_header() {
        let h = SetupHeader::parse(&setup_blob()).unwrap();
        assert_eq!(h.version, 0x020F);
        assert_eq!(h.setup_sects, 0x1f);
        assert_eq!(h.setup_size(), 0x20 * 512);
        assert_eq!(h.kernel_alignment, 0x20_0000);
        assert!(h.relocatable);
        assert_eq!(h.cmdline_size, 2047);
        assert_eq!(h.pref_address, 0x100_0000);
        assert_eq!(h.init_size, 0x280_0000);
        assert_eq!(h.initrd_addr_max, 0x7FFF_FFFF);
        assert!(h.check_cmdline(2047).is_ok());
        assert_eq!(
            h.check_cmdline(2048),
            Err(LinuxError::CmdlineTooLong {
                len: 2048,
                max: 2047
            })
        );
        let mut s = setup_blob();
        s[off::SETUP_SECTS] = 0;
        assert_eq!(SetupHeader::parse(&s).unwrap().setup_size(), 5 * 512);
    }

    #[test]
    fn rejects_bad_kernels() {
        assert_eq!(
            SetupHeader::parse(&[0; 100]),
            Err(LinuxError::TooShort { len: 100 })
        );
        let mut s = setup_blob();
        s[off::HEADER] = b'X';
        assert!(matches!(
            SetupHeader::parse(&s),
            Err(LinuxError::NotBzImage { .. })
        ));
        let mut s = setup_blob();
        s[off::BOOT_FLAG] = 0;
        assert!(matches!(
            SetupHeader::parse(&s),
            Err(LinuxError::NotBzImage {
                boot_flag: 0xAA00,
                ..
            })
        ));
        let mut s = setup_blob();
        s[off::VERSION] = 0x0B;
        let e = SetupHeader::parse(&s).unwrap_err();
        assert_eq!(
            e,
            LinuxError::TooOld {
                major: 2,
                minor: 11
            }
        );
        assert!(e.to_string().contains("2.11"), "{e}");
        let mut s = setup_blob();
        s[off::LOADFLAGS] = 0;
        assert_eq!(
            SetupHeader::parse(&s),
            Err(LinuxError::NotLoadedHigh { loadflags: 0 })
        );
        let mut s = setup_blob();
        s[off::XLOADFLAGS] = 0x7E;
        assert_eq!(
            SetupHeader::parse(&s),
            Err(LinuxError::No64BitEntry { xloadflags: 0x7E })
        );
        let mut s = setup_blob();
        s[off::KERNEL_ALIGNMENT..off::KERNEL_ALIGNMENT + 4].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(SetupHeader::parse(&s).unwrap().kernel_alignment, 0x20_0000);
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn layout_512m() {
        let h = SetupHeader::parse(&setup_blob()).unwrap();
        // 512 MiB guest, 16 MiB TSEG + 1 MiB ACPI at the top.
        let reserved = 512 * MIB - 17 * MIB;
        let l = plan_layout(&h, reserved, reserved, 8 * MIB, 30 * MIB + 123).unwrap();
        assert_eq!(l.kernel_addr, 0x100_0000);
        assert_eq!(l.entry64, 0x100_0200);
        assert_eq!(l.kernel_end, 0x100_0000 + 0x280_0000);
        assert_eq!(l.initrd_addr % PAGE, 0);
        assert!(l.initrd_addr + 30 * MIB + 123 <= reserved);
        assert!(l.initrd_addr + 30 * MIB + 123 + PAGE > reserved);
        // No initrd.
        assert_eq!(
            plan_layout(&h, reserved, reserved, 8 * MIB, 0)
                .unwrap()
                .initrd_addr,
            0
        );
    }

    #[test]
    fn initrd_respects_initrd_addr_max() {
        let h = SetupHeader::parse(&setup_blob()).unwrap();
        let l = plan_layout(&h, 3 * 1024 * MIB, 3 * 1024 * MIB, 8 * MIB, 10 * MIB).unwrap();
        assert_eq!(l.initrd_addr, 0x8000_0000 - 10 * MIB);
    }

    #[test]
    fn too_little_ram() {
        let h = SetupHeader::parse(&setup_blob()).unwrap();
        let e = plan_layout(&h, 60 * MIB, 64 * MIB, 8 * MIB, 30 * MIB).unwrap_err();
        // Kernel at 2 MiB (relocated low): 2 + 40 + 30 = 72 MiB.
        assert_eq!(
            e,
            LinuxError::TooLittleRam {
                need_mib: 72,
                have_mib: 60
            }
        );
        assert!(e.to_string().contains("need 72 MiB"), "{e}");
        // Fits only if relocated below pref_address.
        let l = plan_layout(&h, 75 * MIB, 75 * MIB, 8 * MIB, 30 * MIB).unwrap();
        assert_eq!(l.kernel_addr, 2 * MIB);
        // Non-relocatable kernels cannot move.
        let mut s = setup_blob();
        s[off::RELOCATABLE] = 0;
        let h = SetupHeader::parse(&s).unwrap();
        assert_eq!(
            plan_layout(&h, 75 * MIB, 75 * MIB, 8 * MIB, 30 * MIB),
            Err(LinuxError::TooLittleRam {
                need_mib: 86,
                have_mib: 75
            })
        );
    }

    #[test]
    fn boot_params_fields() {
        let setup = setup_blob();
        let mut map = E820Map::new();
        map.insert(0, 0x8000_0000, e820::RAM).unwrap();
        map.insert(0x1_0000_0000, 0x4000_0000, e820::RAM).unwrap();
        map.add_legacy_holes().unwrap();
        let bp = build_boot_params(&BootParamsInput {
            setup: &setup,
            cmdline_addr: 0x2_0000,
            initrd_addr: 0x7000_0000,
            initrd_size: 0x123_4567,
            e820: &map,
            rsdp: 0x7EF0_0040,
        });
        assert!(bp[..off::ACPI_RSDP_ADDR].iter().all(|&b| b == 0));
        assert_eq!(bp[off::SETUP_SECTS], 0x1f);
        assert_eq!(&bp[off::HEADER..off::HEADER + 4], b"HdrS");
        assert_eq!(bp[off::TYPE_OF_LOADER], 0xFF);
        assert_eq!(le_u32(&bp, off::CMD_LINE_PTR), 0x2_0000);
        assert_eq!(le_u32(&bp, off::EXT_CMD_LINE_PTR), 0);
        assert_eq!(le_u32(&bp, off::RAMDISK_IMAGE), 0x7000_0000);
        assert_eq!(le_u32(&bp, off::RAMDISK_SIZE), 0x123_4567);
        assert_eq!(le_u64(&bp, off::SETUP_DATA), 0);
        assert_eq!(le_u64(&bp, off::ACPI_RSDP_ADDR), 0x7EF0_0040);
        assert_eq!(le_u64(&bp, off::PREF_ADDRESS), 0x100_0000);
        assert_eq!(le_u32(&bp, off::INIT_SIZE), 0x280_0000);
        assert_eq!(bp[0x26C], 0, "real-mode code copied");
        assert_eq!(bp[off::E820_ENTRIES], 4);
        let third = &bp[off::E820_TABLE + 60..off::E820_TABLE + 80];
        assert_eq!(le_u64(third, 0), 0x1_0000_0000);
        assert_eq!(le_u64(third, 8), 0x4000_0000);
        assert_eq!(le_u32(third, 16), 1);
    }

    #[test]
    fn boot_params_high_addresses() {
        let setup = setup_blob();
        let bp = build_boot_params(&BootParamsInput {
            setup: &setup,
            cmdline_addr: 0x1_2345_6000,
            initrd_addr: 0x2_0000_1000,
            initrd_size: 0x1_0000_0000,
            e820: &E820Map::new(),
            rsdp: 0,
        });
        assert_eq!(le_u32(&bp, off::CMD_LINE_PTR), 0x2345_6000);
        assert_eq!(le_u32(&bp, off::EXT_CMD_LINE_PTR), 1);
        assert_eq!(le_u32(&bp, off::RAMDISK_IMAGE), 0x1000);
        assert_eq!(le_u32(&bp, off::EXT_RAMDISK_IMAGE), 2);
        assert_eq!(le_u32(&bp, off::RAMDISK_SIZE), 0);
        assert_eq!(le_u32(&bp, off::EXT_RAMDISK_SIZE), 1);
        assert_eq!(bp[off::E820_ENTRIES], 0);
    }

    proptest! {
        #[test]
        fn parse_and_build_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..0x600)) {
            let _ = SetupHeader::parse(&bytes);
            let map = E820Map::new();
            let _ = build_boot_params(&BootParamsInput {
                setup: &bytes, cmdline_addr: 0, initrd_addr: 0, initrd_size: 0, e820: &map, rsdp: 0,
            });
        }

        #[test]
        fn layout_invariants(
            ram_mib in 16u64..4096,
            reserved_mib in 0u64..64,
            kernel in 1u64..(64 * MIB),
            init in 0u32..0x800_0000,
            initrd in 0u64..(512 * MIB),
            align_shift in 12u32..24,
            pref_mib in 0u64..64,
            relocatable: bool,
            initrd_max in 0x100_0000u32..=u32::MAX,
        ) {
            let h = SetupHeader {
                setup_sects: 4, version: 0x20F, loadflags: 1, initrd_addr_max: initrd_max,
                kernel_alignment: 1 << align_shift, relocatable, xloadflags: 1,
                cmdline_size: 2047, pref_address: pref_mib * MIB, init_size: init,
            };
            let top = (ram_mib * MIB).min(e820::FOUR_GIB);
            let res = top.saturating_sub(reserved_mib * MIB);
            if let Ok(l) = plan_layout(&h, top, res, kernel, initrd) {
                prop_assert!(l.kernel_addr >= MIN_KERNEL_ADDR);
                if relocatable { prop_assert_eq!(l.kernel_addr % u64::from(h.kernel_alignment), 0); }
                prop_assert_eq!(l.kernel_end, l.kernel_addr + kernel.max(u64::from(init)));
                prop_assert!(l.kernel_end <= res);
                prop_assert_eq!(l.entry64, l.kernel_addr + 0x200);
                if initrd > 0 {
                    prop_assert_eq!(l.initrd_addr % PAGE, 0);
                    prop_assert!(l.initrd_addr >= l.kernel_end);
                    prop_assert!(l.initrd_addr + initrd <= res);
                    prop_assert!(l.initrd_addr + initrd - 1 <= u64::from(initrd_max));
                }
            }
        }
    }
}
