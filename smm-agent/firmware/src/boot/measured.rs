//! Measured direct boot: the GUIDed table this image publishes (where QEMU
//! finds the SEV launch secret and kernel hashes areas) and the check of the
//! kernel, initrd and command line loaded over fw_cfg against QEMU's hashes
//! table (what OVMF's `BlobVerifierLibSevHashes` does for SEV direct boot).
//!
//! The table's format and the hashes' meaning are `smmvmi_boot::ovmf_table`
//! and `smmvmi_boot::sev`; this module places the table, reads the area and
//! hashes the bytes where they were loaded.

use smmvmi_boot::ovmf_table::{self, Area, Entry};
use smmvmi_boot::sev::{self, Blob, Digest, Measured};
use smmvmi_sha2::{Digest as _, Sha256};

use super::error::BootError;
use crate::hw::memory::Region;
use crate::layout::{
    OVMF_TABLE_BLOCK, SEV_HASHES_BASE, SEV_HASHES_SIZE, SEV_SECRET_BASE, SEV_SECRET_SIZE,
};
use crate::log;

const SECRET_AREA: [u8; 8] = Area {
    base: SEV_SECRET_BASE as u32,
    size: SEV_SECRET_SIZE as u32,
}
.to_bytes();
const HASHES_AREA: [u8; 8] = Area {
    base: SEV_HASHES_BASE as u32,
    size: SEV_HASHES_SIZE as u32,
}
.to_bytes();

/// The GUIDed table, placed by `link.ld` so that it ends 32 bytes before
/// the end of the image. Never read by the firmware at run time: it is for
/// QEMU (`sev-inject-launch-secret`, `kernel-hashes=on`) and for tools that
/// compute the launch digest (`cargo xtask measure`, sev-snp-measure).
// SAFETY: `.ovmf_table` is a section of its own in `link.ld`, placed at
// 0xFFFFFF80 and asserted there to be exactly OVMF_TABLE_BLOCK (0x60) bytes,
// so this static is all it holds and overlaps no code or data; it is
// immutable and never read at run time (`#[used]` keeps it).
#[unsafe(link_section = ".ovmf_table")]
#[used]
static OVMF_TABLE: [u8; OVMF_TABLE_BLOCK] = ovmf_table::build(&[
    Entry {
        guid: sev::SECRET_AREA_GUID,
        data: &SECRET_AREA,
    },
    Entry {
        guid: sev::HASHES_AREA_GUID,
        data: &HASHES_AREA,
    },
]);

/// Reads the hashes area and decides: check against a table, or boot
/// unmeasured (no table, no SEV). Logs which.
pub fn hashes_table(sev_active: bool) -> Result<Measured, BootError> {
    let mut area = [0u8; SEV_HASHES_SIZE as usize];
    // SAFETY: the hashes area is low RAM reserved for it (layout.rs);
    // nothing else writes there before Linux.
    unsafe { Region::new(SEV_HASHES_BASE, SEV_HASHES_SIZE) }.read(0, &mut area);
    let m = sev::decide(&area, sev_active).map_err(BootError::Measurement)?;
    match m {
        Measured::Check(_) => log!(
            "SEV hashes table at {SEV_HASHES_BASE:#x}: checking kernel, initrd and command line"
        ),
        Measured::NotMeasured => log!(
            "not measured: no SEV hashes table at {SEV_HASHES_BASE:#x} (SEV off); kernel, initrd and command line are not checked"
        ),
    }
    Ok(m)
}

/// Incremental SHA-256 over bytes in memory.
pub struct Hasher(Sha256);

impl Hasher {
    pub fn new() -> Self {
        Hasher(Sha256::new())
    }

    /// Hashes `bytes`.
    pub fn bytes(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// Hashes `region`, 4 KiB at a time.
    pub fn region(&mut self, region: &Region) {
        let mut buf = [0u8; 4096];
        let mut off = 0;
        while off < region.len() {
            let n = (region.len() - off).min(buf.len() as u64) as usize;
            region.read(off, &mut buf[..n]);
            self.0.update(&buf[..n]);
            off += n as u64;
        }
    }

    pub fn finish(self) -> Digest {
        Digest(self.0.finalize().into())
    }
}

/// Checks one blob's digest against the table (when there is one).
pub fn check(m: &Measured, blob: Blob, digest: impl FnOnce() -> Digest) -> Result<(), BootError> {
    match m {
        Measured::Check(t) => t.check(blob, &digest()).map_err(BootError::Measurement),
        Measured::NotMeasured => Ok(()),
    }
}
