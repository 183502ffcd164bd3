//! Interpreter for QEMU's ACPI linker/loader script (`etc/table-loader`).
//!
//! The script is a sequence of 128-byte little-endian commands that tell the
//! firmware to allocate memory for fw_cfg blobs (`ALLOCATE`), patch pointers
//! between them (`ADD_POINTER`), fix up checksums (`ADD_CHECKSUM`) and report
//! addresses back to QEMU (`WRITE_POINTER`). Every file, offset and size in a
//! command is validated against what was actually allocated before any byte
//! is touched; the firmware's [`LoaderEnv`] does the memory and fw_cfg access.

use core::fmt;

use thiserror::Error;

use crate::fw_cfg::{FileEntry, FwCfgError};

/// Size of one command.
pub const COMMAND_LEN: usize = 128;
/// Length of a file name field (NUL-padded).
pub const NAME_LEN: usize = 56;
/// Most allocations one script may make.
pub const MAX_ALLOCATIONS: usize = 32;
/// The fw_cfg file holding the script.
pub const LOADER_FILE: &str = "etc/table-loader";
/// The file whose allocation is the RSDP.
pub const RSDP_FILE: &str = "etc/acpi/rsdp";

/// Command: allocate and load a file.
pub const CMD_ALLOCATE: u32 = 1;
/// Command: add a file's address to a pointer field in another file.
pub const CMD_ADD_POINTER: u32 = 2;
/// Command: fix up a checksum byte.
pub const CMD_ADD_CHECKSUM: u32 = 3;
/// Command: write a file's address back into a writable fw_cfg file.
pub const CMD_WRITE_POINTER: u32 = 4;

/// Allocation zone requested by `ALLOCATE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zone {
    /// Anywhere in RAM below 4 GiB (zone 1).
    High,
    /// The legacy F segment, 0xE0000..0xFFFFF (zone 2); the RSDP asks for it.
    FSeg,
}

impl Zone {
    /// Decode the zone byte.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::High),
            2 => Some(Self::FSeg),
            _ => None,
        }
    }
}

/// A file name from a command (NUL-padded, bytes after the first NUL cleared).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FileName([u8; NAME_LEN]);

impl FileName {
    /// Build from a field, clearing everything after the first NUL.
    pub fn from_field(field: &[u8]) -> Self {
        let mut n = [0u8; NAME_LEN];
        for (d, &s) in n.iter_mut().zip(field.iter().take_while(|&&b| b != 0)) {
            *d = s;
        }
        Self(n)
    }

    /// The name's bytes up to the first NUL.
    pub fn bytes(&self) -> &[u8] {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
        self.0.get(..end).unwrap_or(&[])
    }

    /// The name as text, if it is non-empty UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        core::str::from_utf8(self.bytes())
            .ok()
            .filter(|s| !s.is_empty())
    }
}

impl fmt::Display for FileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        for &b in self.bytes() {
            if b.is_ascii_graphic() || b == b' ' {
                fmt::Write::write_char(f, char::from(b))?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        f.write_str("\"")
    }
}

impl fmt::Debug for FileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Errors of the table-loader interpreter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum LoaderError {
    /// The script is not a whole number of commands.
    #[error(
        "etc/table-loader is {len} bytes, expected a multiple of {COMMAND_LEN}; the fw_cfg file is truncated"
    )]
    TruncatedScript {
        /// Script length.
        len: usize,
    },
    /// A file name that is empty or not UTF-8.
    #[error(
        "table-loader command {index} names file {name}, expected a non-empty UTF-8 name; the script is corrupt"
    )]
    BadName {
        /// Command index.
        index: usize,
        /// The name field.
        name: FileName,
    },
    /// A file that fw_cfg does not have.
    #[error(
        "table-loader command {index} names file {name}, which is not in the fw_cfg directory; QEMU and script disagree"
    )]
    UnknownFile {
        /// Command index.
        index: usize,
        /// The file.
        name: FileName,
    },
    /// fw_cfg failed while looking up a file.
    #[error("table-loader command {index}: fw_cfg lookup of {name} failed: {source}")]
    FwCfg {
        /// Command index.
        index: usize,
        /// The file.
        name: FileName,
        /// The fw_cfg error.
        source: FwCfgError,
    },
    /// Alignment that is not a power of two.
    #[error(
        "table-loader ALLOCATE of {name} asks for alignment {align:#x}, expected a power of two"
    )]
    BadAlignment {
        /// The file.
        name: FileName,
        /// Requested alignment.
        align: u32,
    },
    /// Zone byte other than 1 or 2.
    #[error("table-loader ALLOCATE of {name} asks for zone {zone}, expected 1 (high) or 2 (fseg)")]
    BadZone {
        /// The file.
        name: FileName,
        /// Zone byte.
        zone: u8,
    },
    /// The same file allocated twice.
    #[error("table-loader allocates {name} twice, expected each file once; the script is corrupt")]
    DuplicateAllocation {
        /// The file.
        name: FileName,
    },
    /// More allocations than [`MAX_ALLOCATIONS`].
    #[error(
        "table-loader allocation of {name} is one more than the {MAX_ALLOCATIONS} this firmware tracks; raise MAX_ALLOCATIONS"
    )]
    TooManyAllocations {
        /// The file.
        name: FileName,
    },
    /// The firmware could not allocate.
    #[error(
        "no room for {name} ({size} bytes, alignment {align:#x}) in the ACPI area; enlarge the area reserved for ACPI tables"
    )]
    OutOfMemory {
        /// The file.
        name: FileName,
        /// Bytes needed.
        size: u32,
        /// Alignment needed.
        align: u32,
    },
    /// The firmware returned a misaligned or wrapping allocation.
    #[error(
        "allocation for {name} at {addr:#x} ({size} bytes) is not {align:#x}-aligned or wraps; the firmware's allocator is wrong"
    )]
    BadAllocation {
        /// The file.
        name: FileName,
        /// Address returned.
        addr: u64,
        /// Size requested.
        size: u32,
        /// Alignment requested.
        align: u32,
    },
    /// A command refers to a file that was not allocated before it.
    #[error(
        "table-loader command {index} uses {name} before any ALLOCATE of it; expected ALLOCATE first"
    )]
    NotAllocated {
        /// Command index.
        index: usize,
        /// The file.
        name: FileName,
    },
    /// Pointer size other than 1, 2, 4, 8.
    #[error(
        "table-loader command {index} has pointer size {size} in {name}, expected 1, 2, 4 or 8"
    )]
    PointerSize {
        /// Command index.
        index: usize,
        /// Destination file.
        name: FileName,
        /// Size found.
        size: u8,
    },
    /// A pointer field outside its file.
    #[error(
        "table-loader command {index} patches {size} bytes at offset {offset:#x} of {name}, which has only {file_size} bytes"
    )]
    PointerOutOfRange {
        /// Command index.
        index: usize,
        /// File holding the field.
        name: FileName,
        /// Offset of the field.
        offset: u32,
        /// Size of the field.
        size: u8,
        /// Size of the file.
        file_size: u32,
    },
    /// A pointer whose original value is not an offset inside its target.
    #[error(
        "table-loader command {index} points at offset {value:#x} of {target}, which has only {target_size} bytes; expected an offset inside the target"
    )]
    TargetOutOfRange {
        /// Command index.
        index: usize,
        /// Target file.
        target: FileName,
        /// Offset found.
        value: u64,
        /// Target size.
        target_size: u32,
    },
    /// A patched pointer that does not fit its field.
    #[error(
        "table-loader command {index}: address {value:#x} does not fit the {size}-byte pointer in {name}; allocate ACPI tables lower"
    )]
    PointerOverflow {
        /// Command index.
        index: usize,
        /// File holding the field.
        name: FileName,
        /// Address that did not fit.
        value: u64,
        /// Field size.
        size: u8,
    },
    /// A checksum range outside its file.
    #[error(
        "table-loader ADD_CHECKSUM (command {index}) on {name}: checksum at {offset:#x} over [{start:#x}, +{length:#x}) exceeds the file's {file_size} bytes"
    )]
    ChecksumOutOfRange {
        /// Command index.
        index: usize,
        /// The file.
        name: FileName,
        /// Checksum byte offset.
        offset: u32,
        /// Range start.
        start: u32,
        /// Range length.
        length: u32,
        /// File size.
        file_size: u32,
    },
    /// WRITE_POINTER could not write into fw_cfg.
    #[error("table-loader WRITE_POINTER (command {index}) into {name} failed: {source}")]
    WritePointer {
        /// Command index.
        index: usize,
        /// fw_cfg file written.
        name: FileName,
        /// Why.
        source: FwCfgError,
    },
    /// No allocation of `etc/acpi/rsdp`.
    #[error(
        "table-loader never allocated \"etc/acpi/rsdp\"; expected QEMU's ACPI tables — is the machine started with -no-acpi?"
    )]
    NoRsdp,
}

/// What the firmware provides to the interpreter.
pub trait LoaderEnv {
    /// Look up a fw_cfg file (as [`crate::fw_cfg::find_file`] does).
    fn find_file(&mut self, name: &str) -> Result<Option<FileEntry>, FwCfgError>;
    /// Reserve `size` bytes aligned to `align` (a power of two) in `zone`;
    /// `None` if there is no room.
    fn allocate(&mut self, size: u32, align: u32, zone: Zone) -> Option<u64>;
    /// Copy the whole fw_cfg file to `addr` (the allocation made for it).
    fn load_file(&mut self, file: FileEntry, addr: u64);
    /// Read guest memory at `addr` (always inside an allocation).
    fn read_mem(&mut self, addr: u64, buf: &mut [u8]);
    /// Write guest memory at `addr` (always inside an allocation).
    fn write_mem(&mut self, addr: u64, data: &[u8]);
    /// Write `data` at `offset` of a writable fw_cfg file (DMA write);
    /// [`FwCfgError::DmaUnsupported`] if the machine cannot.
    fn write_file(&mut self, file: FileEntry, offset: u32, data: &[u8]) -> Result<(), FwCfgError>;
}

/// One allocation made by the script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    /// The file loaded there.
    pub name: FileName,
    /// Its fw_cfg entry.
    pub file: FileEntry,
    /// Address of the copy.
    pub addr: u64,
    /// Zone asked for.
    pub zone: Zone,
}

impl Allocation {
    /// Exclusive end address.
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(u64::from(self.file.size))
    }
}

/// Result of running a script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    allocations: [Option<Allocation>; MAX_ALLOCATIONS],
    count: usize,
}

impl Default for Loaded {
    fn default() -> Self {
        Self::new()
    }
}

impl Loaded {
    /// No allocations yet.
    pub const fn new() -> Self {
        Self {
            allocations: [None; MAX_ALLOCATIONS],
            count: 0,
        }
    }

    /// Allocations in script order.
    pub fn allocations(&self) -> impl Iterator<Item = &Allocation> {
        self.allocations.iter().take(self.count).flatten()
    }

    /// The allocation of `name`, if any.
    pub fn get(&self, name: &[u8]) -> Option<&Allocation> {
        self.allocations().find(|a| a.name.bytes() == name)
    }

    /// Address of the RSDP (the allocation of `etc/acpi/rsdp`).
    pub fn rsdp(&self) -> Result<u64, LoaderError> {
        self.get(RSDP_FILE.as_bytes())
            .map(|a| a.addr)
            .ok_or(LoaderError::NoRsdp)
    }

    /// `[lowest start, highest end)` over all allocations, for the e820.
    pub fn extent(&self) -> Option<(u64, u64)> {
        let lo = self.allocations().map(|a| a.addr).min()?;
        let hi = self.allocations().map(Allocation::end).max()?;
        Some((lo, hi))
    }

    fn push(&mut self, a: Allocation) -> Result<(), LoaderError> {
        let slot = self
            .allocations
            .get_mut(self.count)
            .ok_or(LoaderError::TooManyAllocations { name: a.name })?;
        *slot = Some(a);
        self.count += 1;
        Ok(())
    }

    fn find(&self, index: usize, name: FileName) -> Result<Allocation, LoaderError> {
        self.get(name.bytes())
            .copied()
            .ok_or(LoaderError::NotAllocated { index, name })
    }
}

/// Run a whole script (the contents of `etc/table-loader`) and return the
/// allocations; fails if the RSDP was never allocated.
pub fn run(env: &mut impl LoaderEnv, script: &[u8]) -> Result<Loaded, LoaderError> {
    if !script.len().is_multiple_of(COMMAND_LEN) {
        return Err(LoaderError::TruncatedScript { len: script.len() });
    }
    let mut loaded = Loaded::new();
    for (index, chunk) in script.chunks_exact(COMMAND_LEN).enumerate() {
        let mut cmd = [0u8; COMMAND_LEN];
        cmd.copy_from_slice(chunk);
        execute(env, &mut loaded, index, &cmd)?;
    }
    loaded.rsdp()?;
    Ok(loaded)
}

fn le32(cmd: &[u8; COMMAND_LEN], at: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(s) = cmd.get(at..at.saturating_add(4)) {
        b.copy_from_slice(s);
    }
    u32::from_le_bytes(b)
}

fn byte(cmd: &[u8; COMMAND_LEN], at: usize) -> u8 {
    cmd.get(at).copied().unwrap_or(0)
}

fn name_at(cmd: &[u8; COMMAND_LEN], at: usize) -> FileName {
    FileName::from_field(cmd.get(at..at.saturating_add(NAME_LEN)).unwrap_or(&[]))
}

/// Check that `[offset, offset+size)` lies inside a file of `file_size` bytes.
fn fits(offset: u32, size: u32, file_size: u32) -> bool {
    offset.checked_add(size).is_some_and(|end| end <= file_size)
}

/// Execute one command (index is for error messages). Unknown commands,
/// including 0, are ignored as QEMU's interface requires.
pub fn execute(
    env: &mut impl LoaderEnv,
    loaded: &mut Loaded,
    index: usize,
    cmd: &[u8; COMMAND_LEN],
) -> Result<(), LoaderError> {
    match le32(cmd, 0) {
        CMD_ALLOCATE => allocate(env, loaded, index, cmd),
        CMD_ADD_POINTER => add_pointer(env, loaded, index, cmd),
        CMD_ADD_CHECKSUM => add_checksum(env, loaded, index, cmd),
        CMD_WRITE_POINTER => write_pointer(env, loaded, index, cmd),
        _ => Ok(()),
    }
}

fn lookup(
    env: &mut impl LoaderEnv,
    index: usize,
    name: FileName,
) -> Result<FileEntry, LoaderError> {
    let text = name.as_str().ok_or(LoaderError::BadName { index, name })?;
    env.find_file(text)
        .map_err(|source| LoaderError::FwCfg {
            index,
            name,
            source,
        })?
        .ok_or(LoaderError::UnknownFile { index, name })
}

fn allocate(
    env: &mut impl LoaderEnv,
    loaded: &mut Loaded,
    index: usize,
    cmd: &[u8; COMMAND_LEN],
) -> Result<(), LoaderError> {
    let name = name_at(cmd, 4);
    let align = le32(cmd, 60);
    let zone_byte = byte(cmd, 64);
    let file = lookup(env, index, name)?;
    // QEMU never sends 0; treat it as byte alignment rather than failing.
    let align = align.max(1);
    if !align.is_power_of_two() {
        return Err(LoaderError::BadAlignment { name, align });
    }
    let zone = Zone::from_byte(zone_byte).ok_or(LoaderError::BadZone {
        name,
        zone: zone_byte,
    })?;
    if loaded.get(name.bytes()).is_some() {
        return Err(LoaderError::DuplicateAllocation { name });
    }
    if loaded.count >= MAX_ALLOCATIONS {
        return Err(LoaderError::TooManyAllocations { name });
    }
    let size = file.size;
    let addr = env
        .allocate(size, align, zone)
        .ok_or(LoaderError::OutOfMemory { name, size, align })?;
    if !addr.is_multiple_of(u64::from(align)) || addr.checked_add(u64::from(size)).is_none() {
        return Err(LoaderError::BadAllocation {
            name,
            addr,
            size,
            align,
        });
    }
    env.load_file(file, addr);
    loaded.push(Allocation {
        name,
        file,
        addr,
        zone,
    })
}

fn pointer_size(index: usize, name: FileName, size: u8) -> Result<usize, LoaderError> {
    match size {
        1 | 2 | 4 | 8 => Ok(usize::from(size)),
        _ => Err(LoaderError::PointerSize { index, name, size }),
    }
}

/// True if `value` fits in `size` bytes.
fn fits_width(value: u64, size: usize) -> bool {
    size >= 8 || value >> (size * 8) == 0
}

fn add_pointer(
    env: &mut impl LoaderEnv,
    loaded: &mut Loaded,
    index: usize,
    cmd: &[u8; COMMAND_LEN],
) -> Result<(), LoaderError> {
    let dest_name = name_at(cmd, 4);
    let src_name = name_at(cmd, 60);
    let offset = le32(cmd, 116);
    let size_byte = byte(cmd, 120);
    let dest = loaded.find(index, dest_name)?;
    let src = loaded.find(index, src_name)?;
    let size = pointer_size(index, dest_name, size_byte)?;
    if !fits(offset, u32::from(size_byte), dest.file.size) {
        return Err(LoaderError::PointerOutOfRange {
            index,
            name: dest_name,
            offset,
            size: size_byte,
            file_size: dest.file.size,
        });
    }
    let field_addr = dest.addr.saturating_add(u64::from(offset));
    let mut raw = [0u8; 8];
    let field = raw.get_mut(..size).unwrap_or(&mut []);
    env.read_mem(field_addr, field);
    let original = u64::from_le_bytes(raw);
    if original >= u64::from(src.file.size) {
        return Err(LoaderError::TargetOutOfRange {
            index,
            target: src_name,
            value: original,
            target_size: src.file.size,
        });
    }
    let value = src.addr.saturating_add(original);
    if !fits_width(value, size) {
        return Err(LoaderError::PointerOverflow {
            index,
            name: dest_name,
            value,
            size: size_byte,
        });
    }
    let bytes = value.to_le_bytes();
    env.write_mem(field_addr, bytes.get(..size).unwrap_or(&[]));
    Ok(())
}

fn add_checksum(
    env: &mut impl LoaderEnv,
    loaded: &mut Loaded,
    index: usize,
    cmd: &[u8; COMMAND_LEN],
) -> Result<(), LoaderError> {
    let name = name_at(cmd, 4);
    let offset = le32(cmd, 60);
    let start = le32(cmd, 64);
    let length = le32(cmd, 68);
    let file = loaded.find(index, name)?;
    let file_size = file.file.size;
    if !fits(offset, 1, file_size) || !fits(start, length, file_size) {
        return Err(LoaderError::ChecksumOutOfRange {
            index,
            name,
            offset,
            start,
            length,
            file_size,
        });
    }
    let mut sum = 0u8;
    let mut buf = [0u8; 64];
    let mut pos = 0u32;
    while pos < length {
        let n = (length - pos).min(64);
        let chunk = buf.get_mut(..n as usize).unwrap_or(&mut []);
        env.read_mem(
            file.addr.saturating_add(u64::from(start) + u64::from(pos)),
            chunk,
        );
        sum = chunk.iter().fold(sum, |s, &b| s.wrapping_add(b));
        pos += n;
    }
    let at = file.addr.saturating_add(u64::from(offset));
    let mut cur = [0u8; 1];
    env.read_mem(at, &mut cur);
    let [c] = cur;
    env.write_mem(at, &[c.wrapping_sub(sum)]);
    Ok(())
}

fn write_pointer(
    env: &mut impl LoaderEnv,
    loaded: &mut Loaded,
    index: usize,
    cmd: &[u8; COMMAND_LEN],
) -> Result<(), LoaderError> {
    let dest_name = name_at(cmd, 4);
    let src_name = name_at(cmd, 60);
    let dst_offset = le32(cmd, 116);
    let src_offset = le32(cmd, 120);
    let size_byte = byte(cmd, 124);
    let size = pointer_size(index, dest_name, size_byte)?;
    let dest = lookup(env, index, dest_name)?;
    let src = loaded.find(index, src_name)?;
    if !fits(dst_offset, u32::from(size_byte), dest.size) {
        return Err(LoaderError::PointerOutOfRange {
            index,
            name: dest_name,
            offset: dst_offset,
            size: size_byte,
            file_size: dest.size,
        });
    }
    if src_offset >= src.file.size {
        return Err(LoaderError::TargetOutOfRange {
            index,
            target: src_name,
            value: u64::from(src_offset),
            target_size: src.file.size,
        });
    }
    let value = src.addr.saturating_add(u64::from(src_offset));
    if !fits_width(value, size) {
        return Err(LoaderError::PointerOverflow {
            index,
            name: dest_name,
            value,
            size: size_byte,
        });
    }
    let bytes = value.to_le_bytes();
    env.write_file(dest, dst_offset, bytes.get(..size).unwrap_or(&[]))
        .map_err(|source| LoaderError::WritePointer {
            index,
            name: dest_name,
            source,
        })
}

#[cfg(test)]
mod tests;
