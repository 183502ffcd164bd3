//! Guest RAM as the host sees it with `memory-backend-file,share=on`: the
//! unprotected ceiling. QEMU's q35 places RAM below 4 GiB at file offset =
//! physical address (up to the low-memory size) and the rest at
//! `low_mem + (addr - 4 GiB)` (hw/i386/pc.c, `pc_memory_init`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use smmvmi_agent::PhysMemory;
use smmvmi_agent::guard::CheckedPhys;

const FOUR_GIB: u64 = 1 << 32;

/// A guest RAM file.
pub struct RamFile {
    file: File,
    /// RAM below 4 GiB in bytes.
    low_mem: u64,
    size: u64,
}

impl RamFile {
    /// Opens `path` read-only; `low_mem` is the RAM QEMU put below 4 GiB
    /// (the whole RAM for `-m` up to 2 GiB on q35).
    pub fn open(path: &Path, low_mem: u64) -> std::io::Result<Self> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            file,
            low_mem: low_mem.min(size),
            size,
        })
    }

    /// The guest's RAM ranges `(base, len)` (legacy VGA hole left out).
    pub fn ram(&self) -> Vec<(u64, u64)> {
        let mut r = vec![(0, 0xA_0000), (0x10_0000, self.low_mem - 0x10_0000)];
        if self.size > self.low_mem {
            r.push((FOUR_GIB, self.size - self.low_mem));
        }
        r
    }

    fn offset(&self, addr: u64) -> u64 {
        if addr >= FOUR_GIB {
            self.low_mem + (addr - FOUR_GIB)
        } else {
            addr
        }
    }
}

impl PhysMemory for RamFile {
    fn read(&self, range: CheckedPhys, buf: &mut [u8]) {
        let n = buf.len().min(range.len());
        if self
            .file
            .read_exact_at(&mut buf[..n], self.offset(range.addr()))
            .is_err()
        {
            buf[..n].fill(0);
        }
    }
}
