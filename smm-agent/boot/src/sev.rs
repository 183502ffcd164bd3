//! AMD SEV boot facts the firmware detects, publishes and checks: whether
//! SEV is active and where the C-bit is ([`SevConfig`], the one definition
//! the firmware's page tables ([`crate::paging`]) and the agent's walker
//! share), the GUIDs of the areas it names in its image's GUIDed table
//! ([`crate::ovmf_table`]), and QEMU's table of kernel, initrd and
//! command-line hashes for measured direct boot.
//!
//! Sources: QEMU `target/i386/sev.c` (`SEV_SECRET_GUID`,
//! `SEV_HASH_TABLE_RV_GUID`, `sev_hash_table_header_guid`,
//! `sev_kernel_entry_guid` and friends, `SevHashTable`,
//! `PaddedSevHashTable`, `sev_add_kernel_loader_hashes`); OVMF
//! `OvmfPkg/ResetVector/Ia16/ResetVectorVtf0.asm` (the table entries) and
//! `OvmfPkg/Library/BlobVerifierLib/BlobVerifierSevHashes.c` (the check);
//! sev-snp-measure `sevsnpmeasure/sev_hashes.py` (the same table, built
//! independently).
//!
//! What QEMU hashes (SHA-256), and what the firmware must hash to agree:
//! - kernel: the setup blob followed by the kernel blob, i.e. the bzImage
//!   file as given (`-kernel`); under SEV QEMU leaves the setup header
//!   unpatched so that fw_cfg serves exactly the file. Without SEV QEMU
//!   patches the header it serves, so the served bytes hash differently;
//! - initrd: the initrd file (an empty one without `-initrd`);
//! - command line: the `-append` string with its terminating NUL (just the
//!   NUL without `-append`).

use core::fmt;

use thiserror::Error;

use crate::guid::Guid;

/// Entry naming the SEV launch secret area `{base u32, size u32}` (QEMU
/// `SEV_SECRET_GUID`: where `sev-inject-launch-secret` writes without `gpa`).
pub const SECRET_AREA_GUID: Guid = Guid::parse("4c2eb361-7d9b-4cc3-8081-127c90d3d294");
/// Entry naming the kernel hashes area `{base u32, size u32}` (QEMU
/// `SEV_HASH_TABLE_RV_GUID`: where `kernel-hashes=on` puts the table).
pub const HASHES_AREA_GUID: Guid = Guid::parse("7255371f-3a3b-4b04-927b-1da6efa8d454");

/// The hashes table's header GUID.
pub const HASH_TABLE_GUID: Guid = Guid::parse("9438d606-4f22-4cc9-b479-a793d411fd21");
/// Entry GUID of the kernel hash.
pub const KERNEL_HASH_GUID: Guid = Guid::parse("4de79437-abd2-427f-b835-d5b172d2045b");
/// Entry GUID of the initrd hash.
pub const INITRD_HASH_GUID: Guid = Guid::parse("44baf731-3a2f-4bd7-9af1-41e29169781d");
/// Entry GUID of the command-line hash.
pub const CMDLINE_HASH_GUID: Guid = Guid::parse("97d02dd8-bd20-4c94-aa78-e7714d36ab2a");

/// SEV facts the firmware found at boot (CPUID 0x8000001F, SEV_STATUS MSR).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SevConfig {
    /// Memory encryption is active for this guest.
    pub active: bool,
    /// Position of the C-bit in page-table entries (CPUID 0x8000001F EBX[5:0]).
    pub c_bit: u8,
}

/// CPUID leaf with the SEV facts (AMD APM vol. 3, "Function 8000_001Fh").
pub const CPUID_SEV_LEAF: u32 = 0x8000_001f;
/// CPUID 0x8000001F EAX bit 1: SEV supported.
pub const CPUID_SEV_SUPPORTED: u32 = 1 << 1;
/// CPUID 0x8000001F EBX[5:0]: C-bit position in page-table entries.
pub const CPUID_C_BIT_MASK: u32 = 0x3f;
/// SEV_STATUS MSR (AMD APM vol. 2, 15.34.10); readable only where CPUID says
/// SEV is supported.
pub const MSR_SEV_STATUS: u32 = 0xc001_0131;
/// SEV_STATUS bit 0: SEV is active for this guest.
pub const SEV_STATUS_SEV_ENABLED: u64 = 1 << 0;

impl SevConfig {
    /// Decodes the CPU's SEV facts: `max_ext_leaf` is CPUID 0x80000000 EAX,
    /// `leaf_eax`/`leaf_ebx` CPUID 0x8000001F (ignored below that leaf),
    /// and `sev_status` reads the SEV_STATUS MSR; it is called only when
    /// CPUID says SEV is supported (elsewhere the MSR read faults). The one
    /// definition the firmware's page tables and the agent's walker share.
    pub fn detect(
        max_ext_leaf: u32,
        leaf_eax: u32,
        leaf_ebx: u32,
        sev_status: impl FnOnce() -> u64,
    ) -> SevConfig {
        if max_ext_leaf < CPUID_SEV_LEAF || leaf_eax & CPUID_SEV_SUPPORTED == 0 {
            return SevConfig::default();
        }
        SevConfig {
            active: sev_status() & SEV_STATUS_SEV_ENABLED != 0,
            c_bit: (leaf_ebx & CPUID_C_BIT_MASK) as u8,
        }
    }

    /// The C-bit to set in a page-table entry that maps `private` memory
    /// (encrypted with the guest's key), and to leave clear for shared
    /// memory (device BARs, DMA bounce buffers, the mailbox): `c_bit_mask()`
    /// or 0.
    pub fn pte_bits(&self, private: bool) -> u64 {
        if private { self.c_bit_mask() } else { 0 }
    }

    /// The mask to clear from CR3 and entries (0 without SEV).
    pub fn c_bit_mask(&self) -> u64 {
        if self.active && (1..64).contains(&self.c_bit) {
            1u64 << self.c_bit
        } else {
            0
        }
    }
}

/// SHA-256 digest length.
pub const HASH_LEN: usize = 32;
/// Header (GUID + u16 length) of the table and of each entry.
pub const HASH_HEADER_LEN: usize = 18;
/// One hash entry: header + SHA-256 (QEMU `SevHashTableEntry`, 50 bytes).
pub const HASH_ENTRY_LEN: usize = HASH_HEADER_LEN + HASH_LEN;
/// QEMU's table: header + cmdline, initrd, kernel entries (168 bytes).
pub const HASH_TABLE_LEN: usize = HASH_HEADER_LEN + 3 * HASH_ENTRY_LEN;
/// What QEMU writes and measures: the table padded to 16 bytes (176).
pub const PADDED_HASH_TABLE_LEN: usize = HASH_TABLE_LEN.next_multiple_of(16);

/// A SHA-256 digest; `Display` prints it in hex.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Digest(pub [u8; HASH_LEN]);

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What a hash covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blob {
    /// The bzImage (setup + kernel as fw_cfg serves them).
    Kernel,
    /// The initrd.
    Initrd,
    /// The command line with its NUL.
    Cmdline,
}

impl Blob {
    /// The entry GUID of this blob's hash.
    pub const fn guid(self) -> Guid {
        match self {
            Blob::Kernel => KERNEL_HASH_GUID,
            Blob::Initrd => INITRD_HASH_GUID,
            Blob::Cmdline => CMDLINE_HASH_GUID,
        }
    }

    fn index(self) -> usize {
        match self {
            Blob::Kernel => 0,
            Blob::Initrd => 1,
            Blob::Cmdline => 2,
        }
    }
}

impl fmt::Display for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Blob::Kernel => "kernel",
            Blob::Initrd => "initrd",
            Blob::Cmdline => "command line",
        })
    }
}

/// Why the hashes table was refused, or a blob did not match it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum HashesError {
    /// The table's own length field is impossible.
    #[error(
        "SEV hashes table length {len} is invalid: expected {HASH_HEADER_LEN} to {area} (the area size); the host put a malformed table there"
    )]
    BadLength {
        /// Length field found.
        len: usize,
        /// Area size.
        area: usize,
    },
    /// An entry's length is impossible or a hash entry is not 50 bytes.
    #[error(
        "SEV hashes table entry {guid} at offset {offset} has length {len}, expected {HASH_ENTRY_LEN} for a hash ({HASH_HEADER_LEN}..={left} otherwise); the host put a malformed table there"
    )]
    BadEntry {
        /// Entry GUID.
        guid: Guid,
        /// Offset of the entry in the table.
        offset: usize,
        /// Length field found.
        len: usize,
        /// Bytes of the table left at that offset.
        left: usize,
    },
    /// The same hash appears twice.
    #[error("SEV hashes table has two {blob} hashes; the host put a malformed table there")]
    Duplicate {
        /// Which blob.
        blob: Blob,
    },
    /// The table has no hash for a blob the firmware loads.
    #[error(
        "SEV hashes table has no {blob} hash: the launch measurement does not cover it; refusing to boot"
    )]
    Missing {
        /// Which blob.
        blob: Blob,
    },
    /// The blob loaded over fw_cfg is not the one the measurement covers.
    #[error(
        "the {blob} loaded over fw_cfg has SHA-256 {found}, the measured SEV hashes table says {expected}: the host changed it after the launch measurement; refusing to boot"
    )]
    Mismatch {
        /// Which blob.
        blob: Blob,
        /// The table's hash.
        expected: Digest,
        /// The loaded blob's hash.
        found: Digest,
    },
    /// SEV is active but the hashes area holds no table.
    #[error(
        "SEV is active but the hashes area holds no table: start QEMU with sev-guest,kernel-hashes=on so the launch measurement covers the kernel, initrd and command line"
    )]
    SevWithoutTable,
}

/// A parsed hashes table: the three digests it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HashTable {
    digests: [Option<Digest>; 3],
}

impl HashTable {
    /// Parses the hashes area's bytes. `Ok(None)` when it does not start
    /// with [`HASH_TABLE_GUID`] (no table: QEMU ran without
    /// `kernel-hashes=on`, or without SEV). Entries with other GUIDs are
    /// skipped, as OVMF does.
    ///
    /// # Errors
    /// [`HashesError::BadLength`], [`HashesError::BadEntry`],
    /// [`HashesError::Duplicate`].
    pub fn parse(area: &[u8]) -> Result<Option<HashTable>, HashesError> {
        if area.get(..16) != Some(&HASH_TABLE_GUID.0[..]) || area.len() < HASH_HEADER_LEN {
            return Ok(None);
        }
        let len = usize::from(u16::from_le_bytes([area[16], area[17]]));
        if !(HASH_HEADER_LEN..=area.len()).contains(&len) {
            return Err(HashesError::BadLength {
                len,
                area: area.len(),
            });
        }
        let table = &area[..len];
        let mut digests = [None; 3];
        let mut off = HASH_HEADER_LEN;
        while off < len {
            let left = len - off;
            let mut g = [0u8; 16];
            let Some(head) = table.get(off..off + HASH_HEADER_LEN) else {
                return Err(HashesError::BadEntry {
                    guid: Guid(g),
                    offset: off,
                    len: left,
                    left,
                });
            };
            g.copy_from_slice(&head[..16]);
            let guid = Guid(g);
            let elen = usize::from(u16::from_le_bytes([head[16], head[17]]));
            let blob = [Blob::Kernel, Blob::Initrd, Blob::Cmdline]
                .into_iter()
                .find(|b| b.guid() == guid);
            let ok = match blob {
                Some(_) => elen == HASH_ENTRY_LEN && elen <= left,
                None => (HASH_HEADER_LEN..=left).contains(&elen),
            };
            if !ok {
                return Err(HashesError::BadEntry {
                    guid,
                    offset: off,
                    len: elen,
                    left,
                });
            }
            if let Some(blob) = blob {
                let slot = &mut digests[blob.index()];
                if slot.is_some() {
                    return Err(HashesError::Duplicate { blob });
                }
                let mut d = [0u8; HASH_LEN];
                d.copy_from_slice(&table[off + HASH_HEADER_LEN..off + HASH_ENTRY_LEN]);
                *slot = Some(Digest(d));
            }
            off += elen;
        }
        Ok(Some(HashTable { digests }))
    }

    /// The table's digest for `blob`.
    pub fn digest(&self, blob: Blob) -> Option<Digest> {
        self.digests[blob.index()]
    }

    /// Checks a loaded blob's SHA-256 against the table.
    ///
    /// # Errors
    /// [`HashesError::Missing`] without an entry for `blob`,
    /// [`HashesError::Mismatch`] when the digests differ.
    pub fn check(&self, blob: Blob, found: &Digest) -> Result<(), HashesError> {
        match self.digest(blob) {
            None => Err(HashesError::Missing { blob }),
            Some(expected) if expected == *found => Ok(()),
            Some(expected) => Err(HashesError::Mismatch {
                blob,
                expected,
                found: *found,
            }),
        }
    }
}

/// What the firmware does with the hashes area before loading Linux.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Measured {
    /// A table: every blob must match it.
    Check(HashTable),
    /// No table and no SEV: the boot is not measured (a test setup); the
    /// firmware says so and boots.
    NotMeasured,
}

/// The policy: a table is checked; no table is tolerated only without SEV
/// (OVMF's `BlobVerifierLibSevHashes` refuses a boot without one).
///
/// # Errors
/// A malformed table ([`HashTable::parse`]), or
/// [`HashesError::SevWithoutTable`] when `sev_active` and no table.
pub fn decide(area: &[u8], sev_active: bool) -> Result<Measured, HashesError> {
    match HashTable::parse(area)? {
        Some(t) => Ok(Measured::Check(t)),
        None if sev_active => Err(HashesError::SevWithoutTable),
        None => Ok(Measured::NotMeasured),
    }
}

/// Builds the padded table exactly as QEMU's `sev_add_kernel_loader_hashes`
/// writes and measures it (header, then cmdline, initrd and kernel entries,
/// zero padding to 16 bytes): what `cargo xtask measure` hashes and what
/// the tests load into the hashes area.
pub fn build_padded(
    kernel: &Digest,
    initrd: &Digest,
    cmdline: &Digest,
) -> [u8; PADDED_HASH_TABLE_LEN] {
    let mut out = [0u8; PADDED_HASH_TABLE_LEN];
    out[..16].copy_from_slice(HASH_TABLE_GUID.bytes());
    out[16..18].copy_from_slice(&(HASH_TABLE_LEN as u16).to_le_bytes());
    let mut off = HASH_HEADER_LEN;
    for (guid, d) in [
        (CMDLINE_HASH_GUID, cmdline),
        (INITRD_HASH_GUID, initrd),
        (KERNEL_HASH_GUID, kernel),
    ] {
        out[off..off + 16].copy_from_slice(guid.bytes());
        out[off + 16..off + 18].copy_from_slice(&(HASH_ENTRY_LEN as u16).to_le_bytes());
        out[off + 18..off + HASH_ENTRY_LEN].copy_from_slice(&d.0);
        off += HASH_ENTRY_LEN;
    }
    out
}

#[cfg(test)]
mod tests;

/// The secret table's header GUID: what a guest owner's launch secret
/// starts with (Linux `EFI_SECRET_TABLE_HEADER_GUID`,
/// `drivers/virt/coco/efi_secret/efi_secret.c`; OVMF passes the same table
/// to the OS). Layout: `{ guid, u32 len }` (len = whole table), then
/// entries `{ guid, u32 len, data }` (len includes the 20-byte header).
pub const SECRET_TABLE_GUID: Guid = Guid::parse("1e74f542-71dd-4d66-963e-ef4287ff173b");
/// The entry of the secret table that holds the agent's 32-byte key
/// (smmvmi's own GUID).
pub const AGENT_KEY_SECRET_GUID: Guid = Guid::parse("6d46d6e9-28e7-4d95-b98e-8c9ddacf3096");
/// Header of the secret table and of each of its entries: GUID + u32.
pub const SECRET_HEADER_LEN: usize = 20;

/// Why the secret area was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SecretError {
    /// The table's length field is impossible.
    #[error(
        "SEV secret table length {len} is invalid: expected {SECRET_HEADER_LEN} to {area} (the area size); inject a well-formed secret table"
    )]
    BadLength {
        /// Length field found.
        len: usize,
        /// Area size.
        area: usize,
    },
    /// An entry's length is impossible.
    #[error(
        "SEV secret table entry at offset {offset} has length {len}, expected {SECRET_HEADER_LEN} to {left}; inject a well-formed secret table"
    )]
    BadEntry {
        /// Offset of the entry.
        offset: usize,
        /// Length field found.
        len: usize,
        /// Bytes of the table left there.
        left: usize,
    },
    /// The builder's buffer is too small.
    #[error("SEV secret table needs {need} bytes, the buffer has {have}")]
    TooLarge {
        /// Bytes needed.
        need: usize,
        /// Buffer size.
        have: usize,
    },
}

/// Finds the data of entry `guid` in a secret area. `Ok(None)` when the
/// area holds no secret table (nothing injected) or no such entry.
///
/// # Errors
/// [`SecretError::BadLength`], [`SecretError::BadEntry`].
pub fn find_secret<'a>(area: &'a [u8], guid: &Guid) -> Result<Option<&'a [u8]>, SecretError> {
    if area.len() < SECRET_HEADER_LEN || area[..16] != SECRET_TABLE_GUID.0 {
        return Ok(None);
    }
    let len = u32::from_le_bytes([area[16], area[17], area[18], area[19]]) as usize;
    if !(SECRET_HEADER_LEN..=area.len()).contains(&len) {
        return Err(SecretError::BadLength {
            len,
            area: area.len(),
        });
    }
    let mut off = SECRET_HEADER_LEN;
    while off < len {
        let left = len - off;
        let Some(h) = area
            .get(off..off + SECRET_HEADER_LEN)
            .filter(|_| left >= SECRET_HEADER_LEN)
        else {
            return Err(SecretError::BadEntry {
                offset: off,
                len: left,
                left,
            });
        };
        let elen = u32::from_le_bytes([h[16], h[17], h[18], h[19]]) as usize;
        if !(SECRET_HEADER_LEN..=left).contains(&elen) {
            return Err(SecretError::BadEntry {
                offset: off,
                len: elen,
                left,
            });
        }
        if h[..16] == guid.0 {
            return Ok(Some(&area[off + SECRET_HEADER_LEN..off + elen]));
        }
        off += elen;
    }
    Ok(None)
}

/// Writes a secret table with `entries` at the start of `out` (the rest
/// zeroed); returns its length. What a guest owner packages for
/// `sev-inject-launch-secret`, and what the test harness loads.
///
/// # Errors
/// [`SecretError::TooLarge`].
pub fn write_secret_table(entries: &[(Guid, &[u8])], out: &mut [u8]) -> Result<usize, SecretError> {
    let need = SECRET_HEADER_LEN
        + entries
            .iter()
            .map(|(_, d)| SECRET_HEADER_LEN + d.len())
            .sum::<usize>();
    if need > out.len() || need > u32::MAX as usize {
        return Err(SecretError::TooLarge {
            need,
            have: out.len(),
        });
    }
    out.fill(0);
    out[..16].copy_from_slice(SECRET_TABLE_GUID.bytes());
    out[16..20].copy_from_slice(&(need as u32).to_le_bytes());
    let mut off = SECRET_HEADER_LEN;
    for (g, d) in entries {
        out[off..off + 16].copy_from_slice(g.bytes());
        out[off + 16..off + 20]
            .copy_from_slice(&((SECRET_HEADER_LEN + d.len()) as u32).to_le_bytes());
        out[off + 20..off + 20 + d.len()].copy_from_slice(d);
        off += SECRET_HEADER_LEN + d.len();
    }
    Ok(need)
}
