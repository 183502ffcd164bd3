//! QEMU's fw_cfg device: port numbers, item keys, the file directory walk and
//! the DMA descriptor encoding.
//!
//! The firmware implements [`FwCfgIo`] over the selector/data ports (and the
//! DMA port for writes); everything here is pure logic over that trait.

use thiserror::Error;

/// Selector port (16-bit write selects an item and rewinds it).
pub const SELECTOR_PORT: u16 = 0x510;
/// Data port (8-bit reads return successive bytes of the selected item).
pub const DATA_PORT: u16 = 0x511;
/// DMA address port, high 32 bits (big-endian); writing the low half at
/// [`DMA_PORT_LOW`] starts the transfer.
pub const DMA_PORT: u16 = 0x514;
/// DMA address port, low 32 bits (big-endian); this write triggers the DMA.
pub const DMA_PORT_LOW: u16 = 0x518;

/// "QEMU" signature item.
pub const SIGNATURE: u16 = 0x00;
/// Feature bitmap item (u32 LE): [`FEATURE_TRADITIONAL`], [`FEATURE_DMA`].
pub const ID: u16 = 0x01;
/// Number of boot CPUs (u16 LE).
pub const NB_CPUS: u16 = 0x05;
/// Kernel load address chosen by QEMU (u32 LE).
pub const KERNEL_ADDR: u16 = 0x07;
/// Size of the kernel (protected-mode part) in bytes (u32 LE).
pub const KERNEL_SIZE: u16 = 0x08;
/// Initrd load address chosen by QEMU (u32 LE).
pub const INITRD_ADDR: u16 = 0x0a;
/// Initrd size in bytes (u32 LE).
pub const INITRD_SIZE: u16 = 0x0b;
/// Maximum number of CPUs (u16 LE).
pub const MAX_CPUS: u16 = 0x0f;
/// Kernel (protected-mode part) bytes.
pub const KERNEL_DATA: u16 = 0x11;
/// Initrd bytes.
pub const INITRD_DATA: u16 = 0x12;
/// Command line address chosen by QEMU (u32 LE).
pub const CMDLINE_ADDR: u16 = 0x13;
/// Command line size in bytes including the NUL (u32 LE).
pub const CMDLINE_SIZE: u16 = 0x14;
/// Command line bytes (NUL-terminated).
pub const CMDLINE_DATA: u16 = 0x15;
/// Setup (real-mode part) load address chosen by QEMU (u32 LE).
pub const SETUP_ADDR: u16 = 0x16;
/// Setup size in bytes (u32 LE).
pub const SETUP_SIZE: u16 = 0x17;
/// Setup bytes: boot sector, setup header and real-mode code.
pub const SETUP_DATA: u16 = 0x18;
/// File directory item.
pub const FILE_DIR: u16 = 0x19;

/// The bytes read from [`SIGNATURE`] on QEMU.
pub const SIGNATURE_BYTES: [u8; 4] = *b"QEMU";
/// [`ID`] bit: the traditional port interface exists.
pub const FEATURE_TRADITIONAL: u32 = 1 << 0;
/// [`ID`] bit: the DMA interface exists (needed for writes).
pub const FEATURE_DMA: u32 = 1 << 1;

/// Length of the name field of a directory entry (NUL-padded, so names are
/// at most 55 bytes long).
pub const FILE_NAME_LEN: usize = 56;
/// Size of one directory entry in bytes.
pub const DIR_ENTRY_LEN: usize = 64;
/// Largest directory count accepted; QEMU's default is far below this.
pub const MAX_DIR_ENTRIES: u32 = 4096;

/// DMA control bit: the device reports an error.
pub const DMA_CTL_ERROR: u32 = 0x01;
/// DMA control bit: read from the item into guest memory.
pub const DMA_CTL_READ: u32 = 0x02;
/// DMA control bit: skip bytes of the item.
pub const DMA_CTL_SKIP: u32 = 0x04;
/// DMA control bit: select the item in bits 31:16 first.
pub const DMA_CTL_SELECT: u32 = 0x08;
/// DMA control bit: write guest memory into the item.
pub const DMA_CTL_WRITE: u32 = 0x10;

/// Errors of the fw_cfg layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FwCfgError {
    /// Writing needs the DMA interface.
    #[error(
        "fw_cfg write to item {key:#06x} needs the DMA interface, but this fw_cfg has none; use a QEMU with fw_cfg DMA (2.9+)"
    )]
    DmaUnsupported {
        /// Item the write was meant for.
        key: u16,
    },
    /// The device set the error bit of a DMA descriptor.
    #[error(
        "fw_cfg DMA on item {key:#06x} ended with the error bit set (control {control:#010x}); expected control 0 — the item may be read-only or too small"
    )]
    DmaFailed {
        /// Item of the transfer.
        key: u16,
        /// Control word as left by the device.
        control: u32,
    },
    /// A file name longer than fits in a directory entry.
    #[error(
        "fw_cfg file name of {len} bytes is too long: names hold at most 55 bytes; shorten the name"
    )]
    NameTooLong {
        /// Length of the name asked for.
        len: usize,
    },
    /// The directory count is implausible.
    #[error(
        "fw_cfg file directory claims {count} entries, expected at most {MAX_DIR_ENTRIES}; the fw_cfg device is not QEMU's"
    )]
    DirectoryTooLarge {
        /// Count read from the directory.
        count: u32,
    },
    /// A buffer is too small for an item.
    #[error(
        "fw_cfg item {key:#06x} has {size} bytes but the buffer holds {capacity}; pass a buffer of at least {size} bytes"
    )]
    BufferTooSmall {
        /// Item being read.
        key: u16,
        /// Item size.
        size: u32,
        /// Buffer size.
        capacity: usize,
    },
    /// The signature item does not read "QEMU".
    #[error(
        "fw_cfg signature reads {found:02x?}, expected \"QEMU\"; this machine has no QEMU fw_cfg device"
    )]
    NoSignature {
        /// Bytes found.
        found: [u8; 4],
    },
}

/// Access to the fw_cfg device, implemented by the firmware.
pub trait FwCfgIo {
    /// Select `key` and rewind it to offset 0.
    fn select(&mut self, key: u16);
    /// Read `buf.len()` bytes from the current position of the selected item
    /// (bytes past the end of the item read as 0, as on QEMU).
    fn read(&mut self, buf: &mut [u8]);
    /// Select `key` and write `data` at its start using the DMA interface.
    ///
    /// The default has no DMA and reports [`FwCfgError::DmaUnsupported`].
    fn write(&mut self, key: u16, data: &[u8]) -> Result<(), FwCfgError> {
        let _ = data;
        Err(FwCfgError::DmaUnsupported { key })
    }
}

/// A named fw_cfg file found in the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileEntry {
    /// Item key to select the file.
    pub select: u16,
    /// Size of the file in bytes.
    pub size: u32,
}

/// Read the signature item and check it reads "QEMU".
pub fn check_signature(io: &mut impl FwCfgIo) -> Result<(), FwCfgError> {
    let mut sig = [0u8; 4];
    io.select(SIGNATURE);
    io.read(&mut sig);
    if sig == SIGNATURE_BYTES {
        Ok(())
    } else {
        Err(FwCfgError::NoSignature { found: sig })
    }
}

/// True if the signature item reads "QEMU".
pub fn signature_ok(io: &mut impl FwCfgIo) -> bool {
    check_signature(io).is_ok()
}

/// Select `key` and read a little-endian u16 from its start.
pub fn read_u16_le(io: &mut impl FwCfgIo, key: u16) -> u16 {
    let mut b = [0u8; 2];
    io.select(key);
    io.read(&mut b);
    u16::from_le_bytes(b)
}

/// Select `key` and read a little-endian u32 from its start.
pub fn read_u32_le(io: &mut impl FwCfgIo, key: u16) -> u32 {
    let mut b = [0u8; 4];
    io.select(key);
    io.read(&mut b);
    u32::from_le_bytes(b)
}

/// Select `key` and read a little-endian u64 from its start.
pub fn read_u64_le(io: &mut impl FwCfgIo, key: u16) -> u64 {
    let mut b = [0u8; 8];
    io.select(key);
    io.read(&mut b);
    u64::from_le_bytes(b)
}

/// True if the [`ID`] item advertises the DMA interface.
pub fn dma_supported(io: &mut impl FwCfgIo) -> bool {
    read_u32_le(io, ID) & FEATURE_DMA != 0
}

/// Compare a NUL-padded directory name with `name`.
fn name_matches(field: &[u8; FILE_NAME_LEN], name: &[u8]) -> bool {
    let end = field.iter().position(|&b| b == 0).unwrap_or(FILE_NAME_LEN);
    field.get(..end) == Some(name)
}

/// Walk the file directory for `name`, without allocating.
///
/// Returns `Ok(None)` if no file has that name.
pub fn find_file(io: &mut impl FwCfgIo, name: &str) -> Result<Option<FileEntry>, FwCfgError> {
    let name = name.as_bytes();
    if name.len() >= FILE_NAME_LEN {
        return Err(FwCfgError::NameTooLong { len: name.len() });
    }
    let mut count = [0u8; 4];
    io.select(FILE_DIR);
    io.read(&mut count);
    let count = u32::from_be_bytes(count);
    if count > MAX_DIR_ENTRIES {
        return Err(FwCfgError::DirectoryTooLarge { count });
    }
    for _ in 0..count {
        let mut head = [0u8; 8];
        let mut field = [0u8; FILE_NAME_LEN];
        io.read(&mut head);
        io.read(&mut field);
        if name_matches(&field, name) {
            let [s0, s1, s2, s3, k0, k1, _, _] = head;
            return Ok(Some(FileEntry {
                select: u16::from_be_bytes([k0, k1]),
                size: u32::from_be_bytes([s0, s1, s2, s3]),
            }));
        }
    }
    Ok(None)
}

/// Read the whole item `key` of `size` bytes into the start of `buf`;
/// returns the filled prefix.
pub fn read_item<'b>(
    io: &mut impl FwCfgIo,
    key: u16,
    size: u32,
    buf: &'b mut [u8],
) -> Result<&'b mut [u8], FwCfgError> {
    let capacity = buf.len();
    let dst = usize::try_from(size)
        .ok()
        .and_then(|n| buf.get_mut(..n))
        .ok_or(FwCfgError::BufferTooSmall {
            key,
            size,
            capacity,
        })?;
    io.select(key);
    io.read(dst);
    Ok(dst)
}

/// Find `name` and read it as a little-endian u64 (files shorter than 8
/// bytes are zero-extended). `Ok(None)` if there is no such file.
pub fn read_file_u64(io: &mut impl FwCfgIo, name: &str) -> Result<Option<u64>, FwCfgError> {
    let Some(f) = find_file(io, name)? else {
        return Ok(None);
    };
    let mut b = [0u8; 8];
    let n = usize::try_from(f.size).unwrap_or(usize::MAX).min(8);
    io.select(f.select);
    if let Some(dst) = b.get_mut(..n) {
        io.read(dst);
    }
    Ok(Some(u64::from_le_bytes(b)))
}

/// A fw_cfg DMA descriptor, as the device reads it from guest memory
/// (all fields big-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaAccess {
    /// Control bits (`DMA_CTL_*`) and, with [`DMA_CTL_SELECT`], the key in bits 31:16.
    pub control: u32,
    /// Number of bytes to transfer.
    pub length: u32,
    /// Guest-physical address of the data.
    pub address: u64,
}

impl DmaAccess {
    /// Size of the descriptor in guest memory.
    pub const LEN: usize = 16;

    /// Descriptor that selects `key` and writes `length` bytes from `address` into it.
    pub const fn select_write(key: u16, length: u32, address: u64) -> Self {
        Self {
            control: ((key as u32) << 16) | DMA_CTL_SELECT | DMA_CTL_WRITE,
            length,
            address,
        }
    }

    /// Descriptor that selects `key` and reads `length` bytes of it to `address`.
    pub const fn select_read(key: u16, length: u32, address: u64) -> Self {
        Self {
            control: ((key as u32) << 16) | DMA_CTL_SELECT | DMA_CTL_READ,
            length,
            address,
        }
    }

    /// Descriptor that selects `key` and skips `length` bytes of it.
    pub const fn select_skip(key: u16, length: u32) -> Self {
        Self {
            control: ((key as u32) << 16) | DMA_CTL_SELECT | DMA_CTL_SKIP,
            length,
            address: 0,
        }
    }

    /// Encode in the device's big-endian layout.
    pub fn to_be_bytes(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        let (c, rest) = out.split_at_mut(4);
        let (l, a) = rest.split_at_mut(4);
        c.copy_from_slice(&self.control.to_be_bytes());
        l.copy_from_slice(&self.length.to_be_bytes());
        a.copy_from_slice(&self.address.to_be_bytes());
        out
    }

    /// Decode from the device's big-endian layout.
    pub fn from_be_bytes(b: [u8; 16]) -> Self {
        let [
            c0,
            c1,
            c2,
            c3,
            l0,
            l1,
            l2,
            l3,
            a0,
            a1,
            a2,
            a3,
            a4,
            a5,
            a6,
            a7,
        ] = b;
        Self {
            control: u32::from_be_bytes([c0, c1, c2, c3]),
            length: u32::from_be_bytes([l0, l1, l2, l3]),
            address: u64::from_be_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
        }
    }

    /// Interpret the control word the device left after a transfer: `Ok` once
    /// it reads 0, [`FwCfgError::DmaFailed`] if the error bit is set, and
    /// `Ok(false)` meaning "still busy".
    pub fn completion(key: u16, control_after: u32) -> Result<bool, FwCfgError> {
        if control_after & DMA_CTL_ERROR != 0 {
            Err(FwCfgError::DmaFailed {
                key,
                control: control_after,
            })
        } else {
            Ok(control_after == 0)
        }
    }
}

/// A fake fw_cfg device for host tests.
#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use std::string::String;
    use std::vec::Vec;

    /// Items keyed by selector, plus named files in the directory.
    #[derive(Default)]
    pub struct FakeFwCfg {
        pub items: Vec<(u16, Vec<u8>)>,
        pub files: Vec<(String, u16)>,
        pub selected: u16,
        pub pos: usize,
        pub dma: bool,
        pub writes: Vec<(u16, Vec<u8>)>,
    }

    impl FakeFwCfg {
        pub fn new() -> Self {
            let mut f = Self {
                dma: true,
                ..Self::default()
            };
            f.set(SIGNATURE, b"QEMU".to_vec());
            f.set(ID, 3u32.to_le_bytes().to_vec());
            f
        }

        pub fn set(&mut self, key: u16, data: Vec<u8>) {
            self.items.retain(|(k, _)| *k != key);
            self.items.push((key, data));
        }

        pub fn get(&self, key: u16) -> Option<&Vec<u8>> {
            self.items.iter().find(|(k, _)| *k == key).map(|(_, d)| d)
        }

        /// Add a named file; returns its key.
        pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> u16 {
            let key = 0x20 + self.files.len() as u16;
            self.files.push((name.into(), key));
            self.set(key, data);
            self.rebuild_dir();
            key
        }

        fn rebuild_dir(&mut self) {
            let mut dir = Vec::new();
            dir.extend_from_slice(&(self.files.len() as u32).to_be_bytes());
            for (name, key) in self.files.clone() {
                let size = self.get(key).map_or(0, |d| d.len()) as u32;
                dir.extend_from_slice(&size.to_be_bytes());
                dir.extend_from_slice(&key.to_be_bytes());
                dir.extend_from_slice(&[0, 0]);
                let mut n = [0u8; FILE_NAME_LEN];
                n[..name.len()].copy_from_slice(name.as_bytes());
                dir.extend_from_slice(&n);
            }
            self.set(FILE_DIR, dir);
        }
    }

    impl FwCfgIo for FakeFwCfg {
        fn select(&mut self, key: u16) {
            self.selected = key;
            self.pos = 0;
        }
        fn read(&mut self, buf: &mut [u8]) {
            let key = self.selected;
            let pos = self.pos;
            let data = self.get(key).cloned().unwrap_or_default();
            for (i, b) in buf.iter_mut().enumerate() {
                *b = data.get(pos + i).copied().unwrap_or(0);
            }
            self.pos += buf.len();
        }
        fn write(&mut self, key: u16, data: &[u8]) -> Result<(), FwCfgError> {
            if !self.dma {
                return Err(FwCfgError::DmaUnsupported { key });
            }
            self.writes.push((key, data.to_vec()));
            let mut item = self.get(key).cloned().unwrap_or_default();
            if item.len() < data.len() {
                return Err(FwCfgError::DmaFailed { key, control: 1 });
            }
            item[..data.len()].copy_from_slice(data);
            self.set(key, item);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeFwCfg;
    use super::*;
    use proptest::prelude::*;
    use std::format;
    use std::string::String;
    use std::vec;

    #[test]
    fn signature_and_features() {
        let mut f = FakeFwCfg::new();
        assert!(signature_ok(&mut f));
        assert!(dma_supported(&mut f));
        f.set(SIGNATURE, b"SEAB".to_vec());
        assert!(!signature_ok(&mut f));
        assert_eq!(
            check_signature(&mut f),
            Err(FwCfgError::NoSignature { found: *b"SEAB" })
        );
        f.set(ID, 1u32.to_le_bytes().to_vec());
        assert!(!dma_supported(&mut f));
    }

    #[test]
    fn reads_integers() {
        let mut f = FakeFwCfg::new();
        f.set(NB_CPUS, vec![4, 0]);
        f.set(KERNEL_SIZE, 0x1234_5678u32.to_le_bytes().to_vec());
        assert_eq!(read_u16_le(&mut f, NB_CPUS), 4);
        assert_eq!(read_u32_le(&mut f, KERNEL_SIZE), 0x1234_5678);
        // A missing item reads zeros.
        assert_eq!(read_u64_le(&mut f, 0x7777), 0);
    }

    #[test]
    fn finds_files() {
        let mut f = FakeFwCfg::new();
        f.add_file("etc/e820", vec![1; 40]);
        let k = f.add_file("etc/table-loader", vec![2; 256]);
        f.add_file("etc/table-loader-extra", vec![3; 3]);
        assert_eq!(
            find_file(&mut f, "etc/table-loader"),
            Ok(Some(FileEntry {
                select: k,
                size: 256
            }))
        );
        assert_eq!(find_file(&mut f, "etc/table"), Ok(None));
        assert_eq!(find_file(&mut f, "etc/nope"), Ok(None));
        assert_eq!(find_file(&mut f, ""), Ok(None));
        let long: String = "x".repeat(56);
        assert_eq!(
            find_file(&mut f, &long),
            Err(FwCfgError::NameTooLong { len: 56 })
        );
        let max: String = "y".repeat(55);
        let k = f.add_file(&max, vec![9]);
        assert_eq!(
            find_file(&mut f, &max),
            Ok(Some(FileEntry { select: k, size: 1 }))
        );
    }

    #[test]
    fn rejects_huge_directory() {
        let mut f = FakeFwCfg::new();
        f.set(FILE_DIR, u32::MAX.to_be_bytes().to_vec());
        assert_eq!(
            find_file(&mut f, "a"),
            Err(FwCfgError::DirectoryTooLarge { count: u32::MAX })
        );
    }

    #[test]
    fn reads_items_and_u64_files() {
        let mut f = FakeFwCfg::new();
        f.add_file("etc/smi/supported-features", 1u64.to_le_bytes().to_vec());
        f.add_file("short", vec![0x34, 0x12]);
        assert_eq!(
            read_file_u64(&mut f, "etc/smi/supported-features"),
            Ok(Some(1))
        );
        assert_eq!(read_file_u64(&mut f, "short"), Ok(Some(0x1234)));
        assert_eq!(read_file_u64(&mut f, "missing"), Ok(None));
        f.set(CMDLINE_DATA, b"console=ttyS0\0".to_vec());
        let mut buf = [0u8; 32];
        let got = read_item(&mut f, CMDLINE_DATA, 14, &mut buf).unwrap();
        assert_eq!(got, b"console=ttyS0\0");
        let mut small = [0u8; 4];
        assert_eq!(
            read_item(&mut f, CMDLINE_DATA, 14, &mut small).unwrap_err(),
            FwCfgError::BufferTooSmall {
                key: CMDLINE_DATA,
                size: 14,
                capacity: 4
            }
        );
    }

    #[test]
    fn default_write_is_unsupported() {
        struct NoDma;
        impl FwCfgIo for NoDma {
            fn select(&mut self, _: u16) {}
            fn read(&mut self, buf: &mut [u8]) {
                buf.fill(0);
            }
        }
        assert_eq!(
            NoDma.write(0x22, &[1]),
            Err(FwCfgError::DmaUnsupported { key: 0x22 })
        );
    }

    #[test]
    fn dma_descriptor_layout() {
        let d = DmaAccess::select_write(0x0123, 8, 0x1122_3344_5566_7788);
        assert_eq!(d.control, 0x0123_0018);
        assert_eq!(
            d.to_be_bytes(),
            [
                0x01, 0x23, 0x00, 0x18, 0, 0, 0, 8, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88
            ]
        );
        assert_eq!(DmaAccess::select_read(0x19, 4, 0).control, 0x0019_000a);
        assert_eq!(DmaAccess::select_skip(0x19, 4).control, 0x0019_000c);
        assert_eq!(DmaAccess::completion(1, 0), Ok(true));
        assert_eq!(DmaAccess::completion(1, DMA_CTL_WRITE), Ok(false));
        assert!(DmaAccess::completion(1, DMA_CTL_ERROR).is_err());
        let msg = format!("{}", DmaAccess::completion(7, 1).unwrap_err());
        assert!(msg.contains("0x0007"), "{msg}");
    }

    proptest! {
        #[test]
        fn dma_roundtrip(control: u32, length: u32, address: u64) {
            let d = DmaAccess { control, length, address };
            prop_assert_eq!(DmaAccess::from_be_bytes(d.to_be_bytes()), d);
        }

        #[test]
        fn find_file_never_panics(dir in proptest::collection::vec(any::<u8>(), 0..400), name in "[a-z/]{0,60}") {
            let mut f = FakeFwCfg::new();
            f.set(FILE_DIR, dir);
            let _ = find_file(&mut f, &name);
        }

        #[test]
        fn finds_every_added_file(names in proptest::collection::btree_set("[a-z/.-]{1,55}", 1..20)) {
            let mut f = FakeFwCfg::new();
            let keys: std::vec::Vec<u16> = names.iter().enumerate()
                .map(|(i, n)| f.add_file(n, vec![0; i])).collect();
            for ((i, n), k) in names.iter().enumerate().zip(keys) {
                prop_assert_eq!(find_file(&mut f, n), Ok(Some(FileEntry { select: k, size: i as u32 })));
            }
        }
    }
}
