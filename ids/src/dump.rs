//! A memory dump as a [`GuestMemory`] backend: a raw physical image (the
//! RAM ranges one after another) plus a small JSON sidecar with the RAM map
//! and every CPU's state, so that the whole Linux layer runs offline on
//! what the agent read at one moment.
//!
//! Sidecar (`<image>.json`): `{"version":1, "ram":[{"base":B,"len":L,
//! "offset":O}], "cpus":[[u64; CpuState::FIELDS]], "c_bit": N}` — `offset`
//! is the byte offset of the range in the image file, the CPU arrays are
//! [`CpuState`] fields in wire order, `c_bit` is the SEV C-bit position (0:
//! none). Virtual reads walk the page tables in the image (4- or 5-level
//! after CR4.LA57, 2 MiB and 1 GiB pages, PTI halves by CR3 bit 12).

use std::fs::File;
use std::io::{Read as _, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use smmvmi_mailbox::wire::{AddressSpace, CpuState, Pti, Status};

use crate::memory::{BatchStats, Fault, GuestMemory, MemoryError, Read, ReadResult, Space};

/// Sidecar format version.
pub const DUMP_VERSION: u32 = 1;
/// Largest read served at once.
pub const DUMP_MAX_READ: usize = 16 << 20;

/// One RAM range of the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DumpRange {
    /// Guest-physical base.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset in the image file.
    pub offset: u64,
}

/// The sidecar.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DumpMeta {
    /// [`DUMP_VERSION`].
    pub version: u32,
    /// RAM ranges.
    pub ram: Vec<DumpRange>,
    /// CPU states (wire order of [`CpuState`] fields).
    pub cpus: Vec<Vec<u64>>,
    /// SEV C-bit position, 0 for none.
    pub c_bit: u8,
}

/// A dump opened for reading.
pub struct DumpMemory {
    path: PathBuf,
    file: File,
    meta: DumpMeta,
    cpus: Vec<CpuState>,
    stats: BatchStats,
}

/// The sidecar path of an image.
pub fn sidecar_path(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".json");
    PathBuf::from(p)
}

/// A CPU state as the sidecar's words (wire order).
pub fn cpu_to_words(c: &CpuState) -> Vec<u64> {
    let mut b = [0u8; CpuState::LEN];
    c.encode(&mut b);
    b.chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
        .collect()
}

fn cpu_from_words(w: &[u64]) -> Option<CpuState> {
    let b: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
    CpuState::decode(&b).ok()
}

impl DumpMemory {
    /// Opens `image` and its sidecar.
    pub fn open(image: &Path) -> Result<Self, MemoryError> {
        let err = |problem: String| MemoryError::Dump {
            path: image.display().to_string(),
            problem,
        };
        let side = sidecar_path(image);
        let text = std::fs::read_to_string(&side).map_err(|e| {
            err(format!(
                "cannot read the sidecar {}: {e} (written by `ids dump`)",
                side.display()
            ))
        })?;
        let meta: DumpMeta = serde_json::from_str(&text).map_err(|e| {
            err(format!(
                "sidecar {} is not a dump sidecar: {e}",
                side.display()
            ))
        })?;
        if meta.version != DUMP_VERSION {
            return Err(err(format!(
                "sidecar version {} (expected {DUMP_VERSION})",
                meta.version
            )));
        }
        let cpus = meta
            .cpus
            .iter()
            .map(|w| cpu_from_words(w))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                err(format!(
                    "a CPU record does not hold {} words",
                    CpuState::FIELDS
                ))
            })?;
        let file = File::open(image).map_err(|e| err(format!("cannot open the image: {e}")))?;
        Ok(Self {
            path: image.to_owned(),
            file,
            meta,
            cpus,
            stats: BatchStats::default(),
        })
    }

    /// Writes a dump: `read(base, len)` supplies each range's bytes in chunks.
    pub fn write(
        image: &Path,
        ram: &[(u64, u64)],
        cpus: &[CpuState],
        c_bit: u8,
        mut read: impl FnMut(u64, usize) -> Result<Vec<u8>, MemoryError>,
    ) -> Result<DumpMeta, MemoryError> {
        let err = |problem: String| MemoryError::Dump {
            path: image.display().to_string(),
            problem,
        };
        let mut f = File::create(image).map_err(|e| err(format!("cannot create it: {e}")))?;
        let mut ranges = Vec::new();
        let mut offset = 0u64;
        for &(base, len) in ram {
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(8 << 20) as usize;
                let data = read(base + done, n)?;
                f.write_all(&data)
                    .map_err(|e| err(format!("writing: {e}")))?;
                done += n as u64;
            }
            ranges.push(DumpRange { base, len, offset });
            offset += len;
        }
        let meta = DumpMeta {
            version: DUMP_VERSION,
            ram: ranges,
            cpus: cpus.iter().map(cpu_to_words).collect(),
            c_bit,
        };
        std::fs::write(
            sidecar_path(image),
            serde_json::to_string_pretty(&meta).expect("serializable"),
        )
        .map_err(|e| err(format!("writing the sidecar: {e}")))?;
        Ok(meta)
    }

    fn phys(&mut self, addr: u64, len: usize) -> ReadResult {
        let miss = Fault {
            status: Status::RefusedNotRam,
            level: 0,
            aux: addr,
        };
        let r = self
            .meta
            .ram
            .iter()
            .find(|r| addr >= r.base && addr.saturating_add(len as u64) <= r.base + r.len)
            .copied()
            .ok_or(miss)?;
        let mut buf = vec![0u8; len];
        self.file
            .seek(SeekFrom::Start(r.offset + (addr - r.base)))
            .and_then(|_| self.file.read_exact(&mut buf))
            .map_err(|_| miss)?;
        Ok(buf)
    }

    fn u64_at(&mut self, addr: u64, level: u8) -> Result<u64, Fault> {
        let b = self.phys(addr, 8).map_err(|f| Fault { level, ..f })?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    /// Walks `space` for `va`: the physical address.
    pub fn walk(&mut self, space: AddressSpace, va: u64) -> Result<u64, Fault> {
        let cpu = *self.cpus.get(space.cpu as usize).ok_or(Fault {
            status: Status::BadRequest,
            level: 0,
            aux: va,
        })?;
        let levels = cpu.paging_levels();
        if levels == 0 {
            return Err(Fault {
                status: Status::Unsupported,
                level: 0,
                aux: va,
            });
        }
        let bits = if levels == 5 { 57 } else { 48 };
        let shift = 64 - bits;
        if (((va << shift) as i64) >> shift) as u64 != va {
            return Err(Fault {
                status: Status::NonCanonical,
                level: 0,
                aux: va,
            });
        }
        let c_mask = if self.meta.c_bit == 0 {
            0
        } else {
            1u64 << self.meta.c_bit
        };
        let addr_mask = 0x000F_FFFF_FFFF_F000u64 & !c_mask;
        let mut table = space.cr3.unwrap_or(cpu.cr3) & addr_mask;
        table = match space.pti {
            Pti::AsIs => table,
            Pti::Kernel => table & !0x1000,
            Pti::User => table | 0x1000,
        };
        for level in (1..=levels).rev() {
            let idx = (va >> (12 + 9 * (u32::from(level) - 1))) & 0x1FF;
            let e = self.u64_at(table + idx * 8, level)?;
            if e & 1 == 0 {
                return Err(Fault {
                    status: Status::NotPresent,
                    level,
                    aux: va,
                });
            }
            let span_bits = 12 + 9 * (u32::from(level) - 1);
            if level == 1 || ((level == 2 || level == 3) && e & 0x80 != 0) {
                let base = e & addr_mask & !((1u64 << span_bits) - 1);
                return Ok(base | (va & ((1u64 << span_bits) - 1)));
            }
            table = e & addr_mask;
        }
        unreachable!("level 1 always returns")
    }

    fn virt(&mut self, space: AddressSpace, addr: u64, len: usize) -> ReadResult {
        let mut out = Vec::with_capacity(len);
        let mut a = addr;
        while out.len() < len {
            let pa = self.walk(space, a)?;
            let n = (len - out.len()).min(4096 - (a & 0xFFF) as usize);
            out.extend(self.phys(pa, n)?);
            a = a.wrapping_add(n as u64);
        }
        Ok(out)
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl GuestMemory for DumpMemory {
    fn read_batch(&mut self, reads: &[Read]) -> Result<Vec<ReadResult>, MemoryError> {
        self.stats.batches += 1;
        let mut out = Vec::with_capacity(reads.len());
        for r in reads {
            let res = if r.len > DUMP_MAX_READ {
                Err(Fault {
                    status: Status::TooLarge,
                    level: 0,
                    aux: r.addr,
                })
            } else {
                match r.space {
                    Space::Phys => self.phys(r.addr, r.len),
                    Space::Virt(s) => self.virt(s, r.addr, r.len),
                }
            };
            self.stats.bytes += res.as_ref().map_or(0, |d| d.len() as u64);
            out.push(res);
        }
        Ok(out)
    }

    fn translate(
        &mut self,
        space: AddressSpace,
        addr: u64,
    ) -> Result<Result<u64, Fault>, MemoryError> {
        Ok(self.walk(space, addr))
    }

    fn cpu_state(&mut self, cpu: u32) -> Result<CpuState, MemoryError> {
        self.cpus
            .get(cpu as usize)
            .copied()
            .ok_or(MemoryError::NoSuchCpu {
                cpu,
                count: self.cpus.len() as u32,
            })
    }

    fn cpu_count(&mut self) -> Result<u32, MemoryError> {
        Ok(self.cpus.len() as u32)
    }

    fn max_read(&mut self) -> Result<usize, MemoryError> {
        Ok(DUMP_MAX_READ)
    }

    fn stats(&self) -> BatchStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds 4-level tables in a 2 MiB image: a 4 KiB page, a 2 MiB page.
    #[test]
    fn walks_tables_in_the_image() {
        let dir = std::env::temp_dir().join(format!("ids-dump-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("mem.raw");
        let mut ram = vec![0u8; 8 << 20];
        let put = |ram: &mut Vec<u8>, at: u64, v: u64| {
            ram[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes())
        };
        let va: u64 = 0xffff_ffff_8120_3456;
        // PML4 8 KiB aligned: PTI's kernel half is CR3 with bit 12 clear.
        let (pml4, pdpt, pd, pt) = (0x10000u64, 0x12000, 0x13000, 0x14000);
        put(&mut ram, pml4 + ((va >> 39) & 0x1ff) * 8, pdpt | 3);
        put(&mut ram, pdpt + ((va >> 30) & 0x1ff) * 8, pd | 3);
        put(&mut ram, pd + ((va >> 21) & 0x1ff) * 8, pt | 3);
        put(&mut ram, pt + ((va >> 12) & 0x1ff) * 8, 0x15000 | 3);
        ram[0x15456..0x1545b].copy_from_slice(b"hello");
        // A 2 MiB page at va2 -> 0x400000.
        let va2: u64 = 0xffff_ffff_8140_0000;
        put(&mut ram, pd + ((va2 >> 21) & 0x1ff) * 8, 0x40_0000 | 0x83);
        ram[0x40_0010..0x40_0013].copy_from_slice(b"big");
        let cpu = CpuState {
            cr0: 0x8000_0011,
            cr3: pml4,
            cr4: 0x20,
            efer: 0x500,
            msrs_valid: 1,
            ..Default::default()
        };
        DumpMemory::write(&image, &[(0, ram.len() as u64)], &[cpu], 0, |a, n| {
            Ok(ram[a as usize..a as usize + n].to_vec())
        })
        .unwrap();
        let mut d = DumpMemory::open(&image).unwrap();
        let sp = Space::Virt(AddressSpace::kernel_of(0));
        assert_eq!(d.read_exact(sp, va, 5).unwrap(), b"hello");
        assert_eq!(d.read_exact(sp, va2 + 0x10, 3).unwrap(), b"big");
        let f = d.read_batch(&[Read::kernel(0, va + 0x1000, 1)]).unwrap();
        assert_eq!(f[0].as_ref().unwrap_err().status, Status::NotPresent);
        assert_eq!(d.cpu_state(0).unwrap().cr3, pml4);
        std::fs::remove_dir_all(&dir).ok();
    }
}
