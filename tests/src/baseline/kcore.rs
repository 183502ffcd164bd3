//! The in-OS agent's view of memory: `/proc/kcore` (fs/proc/kcore.c), whose
//! `PT_LOAD` headers give each kernel mapping's virtual address, physical
//! address (`p_paddr`, -1 where none) and file offset. It reads kernel
//! memory as any root process of the guest can, and fills in from
//! `/proc/kallsyms` the CPU facts an agent in SMM would read from the save
//! state (page-table root, LSTAR, per-CPU base).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use object::read::ReadCache;
use object::read::elf::{FileHeader, ProgramHeader};
use smmvmi_agent::guard::CheckedPhys;
use smmvmi_agent::{CpuSnapshot, PhysMemory};

/// `__START_KERNEL_map` on x86-64 (arch/x86/include/asm/page_64_types.h).
const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;

struct Load {
    vaddr: u64,
    paddr: Option<u64>,
    offset: u64,
    size: u64,
}

/// `/proc/kcore`, opened.
pub struct Kcore {
    file: File,
    loads: Vec<Load>,
}

impl Kcore {
    /// Opens `/proc/kcore` and reads its program headers.
    pub fn open() -> Result<Self, String> {
        let file = File::open("/proc/kcore").map_err(|e| format!("open /proc/kcore: {e}"))?;
        let loads = {
            let data = ReadCache::new(&file);
            let header = object::elf::FileHeader64::<object::Endianness>::parse(&data)
                .map_err(|e| format!("/proc/kcore ELF header: {e}"))?;
            let endian = header.endian().map_err(|e| e.to_string())?;
            header
                .program_headers(endian, &data)
                .map_err(|e| format!("/proc/kcore program headers: {e}"))?
                .iter()
                .filter(|p| p.p_type(endian) == object::elf::PT_LOAD)
                .map(|p| Load {
                    vaddr: p.p_vaddr(endian),
                    paddr: Some(p.p_paddr(endian)).filter(|&a| a != u64::MAX),
                    offset: p.p_offset(endian),
                    size: p.p_filesz(endian),
                })
                .collect()
        };
        Ok(Self { file, loads })
    }

    /// Reads kernel virtual memory.
    pub fn read_virt(&self, addr: u64, buf: &mut [u8]) -> Result<(), String> {
        let load = self
            .loads
            .iter()
            .find(|l| {
                addr.checked_sub(l.vaddr)
                    .is_some_and(|o| o.saturating_add(buf.len() as u64) <= l.size)
            })
            .ok_or_else(|| format!("{addr:#x}: in no /proc/kcore segment"))?;
        self.file
            .read_exact_at(buf, load.offset + (addr - load.vaddr))
            .map_err(|e| format!("/proc/kcore at {addr:#x}: {e}"))
    }

    fn read_u64(&self, addr: u64) -> Result<u64, String> {
        let mut b = [0u8; 8];
        self.read_virt(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// The guest's RAM ranges `(base, len)` as kcore maps them.
    pub fn ram(&self) -> Vec<(u64, u64)> {
        let mut r: Vec<(u64, u64)> = self
            .loads
            .iter()
            .filter(|l| l.vaddr < START_KERNEL_MAP)
            .filter_map(|l| Some((l.paddr?, l.size)))
            .collect();
        r.sort();
        r
    }

    /// CPU states for every possible CPU, from `/proc/kallsyms` (root sees
    /// real addresses): CR3 = the physical address of `init_top_pgt`
    /// (`phys_base` applied), LSTAR = `entry_SYSCALL_64`, GS base =
    /// `__per_cpu_offset[cpu]`, 4- or 5-level paging from
    /// `__pgtable_l5_enabled`.
    pub fn cpus(&self) -> Result<Vec<CpuSnapshot>, String> {
        let text = std::fs::read_to_string("/proc/kallsyms")
            .map_err(|e| format!("read /proc/kallsyms: {e}"))?;
        let mut syms = HashMap::new();
        for line in text.lines() {
            let mut w = line.split_whitespace();
            if let (Some(a), Some(_), Some(name), None) = (w.next(), w.next(), w.next(), w.next())
                && let Ok(a) = u64::from_str_radix(a, 16)
            {
                syms.entry(name.to_string()).or_insert(a);
            }
        }
        let sym = |n: &str| {
            syms.get(n)
                .copied()
                .filter(|&a| a != 0)
                .ok_or_else(|| format!("/proc/kallsyms has no {n} (kptr_restrict? run as root)"))
        };
        let phys_base = self.read_u64(sym("phys_base")?)?;
        // __pa_symbol (arch/x86/include/asm/page_64.h): phys_base may be
        // "negative" (a kernel loaded below its link address), so wrapping.
        let cr3 = sym("init_top_pgt")?
            .wrapping_sub(START_KERNEL_MAP)
            .wrapping_add(phys_base);
        let l5 = match syms.get("__pgtable_l5_enabled") {
            Some(&a) => {
                let mut b = [0u8; 4];
                self.read_virt(a, &mut b)?;
                u32::from_le_bytes(b) != 0
            }
            None => false,
        };
        let lstar = sym("entry_SYSCALL_64")?;
        let per_cpu = sym("__per_cpu_offset")?;
        let n = std::fs::read_dir("/sys/devices/system/cpu")
            .map_err(|e| format!("/sys/devices/system/cpu: {e}"))?
            .filter_map(|e| e.ok())
            .filter(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.strip_prefix("cpu")
                    .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            })
            .count();
        (0..n as u64)
            .map(|i| {
                let gs = self.read_u64(per_cpu + 8 * i)?;
                Ok(CpuSnapshot {
                    cr0: 0x8005_0033,
                    cr3,
                    cr4: 0x3406F0 | if l5 { 1 << 12 } else { 0 },
                    efer: 0xD01,
                    rip: lstar,
                    cs_selector: 0x10,
                    gs_seg_base: gs,
                    msr_gs_base: gs,
                    msrs_valid: 1,
                    msr_lstar: lstar,
                    ..Default::default()
                })
            })
            .collect()
    }
}

impl PhysMemory for Kcore {
    fn read(&self, range: CheckedPhys, buf: &mut [u8]) {
        let n = buf.len().min(range.len());
        let addr = range.addr();
        let hit = self.loads.iter().find(|l| {
            l.vaddr < START_KERNEL_MAP
                && l.paddr.is_some_and(|p| {
                    addr.checked_sub(p)
                        .is_some_and(|o| o.saturating_add(n as u64) <= l.size)
                })
        });
        let ok = hit.is_some_and(|l| {
            let off = l.offset + (addr - l.paddr.unwrap_or(0));
            self.file.read_exact_at(&mut buf[..n], off).is_ok()
        });
        if !ok {
            buf[..n].fill(0);
        }
    }
}
