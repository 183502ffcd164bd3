//! A fake guest for tests: sparse physical memory, one kernel virtual
//! mapping shared by every CPU (what Linux's kernel half is), and CPU
//! states. Reads of unmapped virtual pages fault with `NotPresent` at level
//! 1, like the agent's walk; reads of unbacked physical memory with
//! `RefusedNotRam`. Every batch counts as one request (one "SMI").

use std::collections::BTreeMap;

use smmvmi_mailbox::wire::{AddressSpace, CpuState, Status};

use crate::memory::{
    BatchStats, Fault, GuestMemory, ListWalk, MemoryError, Read, ReadResult, Space, WalkResult,
    walk_lists_by_reads,
};

const PAGE: u64 = 4096;

/// The fake guest.
#[derive(Clone, Debug, Default)]
pub struct FakeMemory {
    virt: BTreeMap<u64, Box<[u8; PAGE as usize]>>,
    phys: BTreeMap<u64, Box<[u8; PAGE as usize]>>,
    /// CPU states, index = CPU.
    pub cpus: Vec<CpuState>,
    /// Largest read of one batch.
    pub max_read: usize,
    stats: BatchStats,
}

impl FakeMemory {
    /// An empty guest with `cpus` CPUs in 64-bit mode (4-level paging).
    pub fn new(cpus: usize) -> Self {
        let cpu = CpuState {
            cr0: 0x8000_0011,
            cr4: 0x20,
            efer: 0x500,
            msrs_valid: 1,
            ..Default::default()
        };
        Self {
            cpus: vec![cpu; cpus],
            max_read: 1 << 20,
            ..Default::default()
        }
    }

    /// Writes `data` at kernel-virtual `addr` (pages appear as needed).
    pub fn write_virt(&mut self, addr: u64, data: &[u8]) {
        write(&mut self.virt, addr, data);
    }

    /// Writes `data` at physical `addr`.
    pub fn write_phys(&mut self, addr: u64, data: &[u8]) {
        write(&mut self.phys, addr, data);
    }

    /// Writes a little-endian u64 at kernel-virtual `addr`.
    pub fn put_u64(&mut self, addr: u64, v: u64) {
        self.write_virt(addr, &v.to_le_bytes());
    }

    /// Writes a little-endian u32 at kernel-virtual `addr`.
    pub fn put_u32(&mut self, addr: u64, v: u32) {
        self.write_virt(addr, &v.to_le_bytes());
    }

    fn read_one(&self, r: &Read) -> ReadResult {
        let (map, miss) = match r.space {
            Space::Phys => (&self.phys, Status::RefusedNotRam),
            Space::Virt(_) => (&self.virt, Status::NotPresent),
        };
        if r.len > self.max_read {
            return Err(Fault {
                status: Status::TooLarge,
                level: 0,
                aux: r.addr,
            });
        }
        let mut out = Vec::with_capacity(r.len);
        let mut a = r.addr;
        while out.len() < r.len {
            let page = a & !(PAGE - 1);
            let off = (a - page) as usize;
            let n = (r.len - out.len()).min(PAGE as usize - off);
            match map.get(&page) {
                Some(p) => out.extend_from_slice(&p[off..off + n]),
                None => {
                    return Err(Fault {
                        status: miss,
                        level: 1,
                        aux: a,
                    });
                }
            }
            a = a.wrapping_add(n as u64);
        }
        Ok(out)
    }
}

fn write(map: &mut BTreeMap<u64, Box<[u8; PAGE as usize]>>, addr: u64, data: &[u8]) {
    let mut a = addr;
    let mut rest = data;
    while !rest.is_empty() {
        let page = a & !(PAGE - 1);
        let off = (a - page) as usize;
        let n = rest.len().min(PAGE as usize - off);
        let p = map
            .entry(page)
            .or_insert_with(|| Box::new([0u8; PAGE as usize]));
        p[off..off + n].copy_from_slice(&rest[..n]);
        rest = &rest[n..];
        a = a.wrapping_add(n as u64);
    }
}

impl GuestMemory for FakeMemory {
    fn read_batch(&mut self, reads: &[Read]) -> Result<Vec<ReadResult>, MemoryError> {
        self.stats.batches += 1;
        self.stats.requests += 1;
        let out: Vec<ReadResult> = reads.iter().map(|r| self.read_one(r)).collect();
        self.stats.bytes += out
            .iter()
            .map(|r| r.as_ref().map_or(0, |d| d.len() as u64))
            .sum::<u64>();
        Ok(out)
    }

    fn translate(
        &mut self,
        _space: AddressSpace,
        addr: u64,
    ) -> Result<Result<u64, Fault>, MemoryError> {
        Ok(if self.virt.contains_key(&(addr & !(PAGE - 1))) {
            Ok(addr)
        } else {
            Err(Fault {
                status: Status::NotPresent,
                level: 1,
                aux: addr,
            })
        })
    }

    fn cpu_state(&mut self, cpu: u32) -> Result<CpuState, MemoryError> {
        self.stats.requests += 1;
        self.cpus
            .get(cpu as usize)
            .copied()
            .ok_or(MemoryError::NoSuchCpu {
                cpu,
                count: self.cpus.len() as u32,
            })
    }

    /// Every CPU in one request, as the agent serves them.
    fn cpu_states(&mut self) -> Result<Vec<CpuState>, MemoryError> {
        self.stats.requests += 1;
        Ok(self.cpus.clone())
    }

    fn cpu_count(&mut self) -> Result<u32, MemoryError> {
        Ok(self.cpus.len() as u32)
    }

    fn max_read(&mut self) -> Result<usize, MemoryError> {
        Ok(self.max_read)
    }

    fn stats(&self) -> BatchStats {
        self.stats
    }

    fn walks_in_agent(&mut self) -> Result<bool, MemoryError> {
        Ok(true)
    }

    /// Like the agent: every walk of the batch in one request.
    fn walk_lists(&mut self, walks: &[ListWalk]) -> Result<Vec<WalkResult>, MemoryError> {
        let before = self.stats;
        let out = walk_lists_by_reads(self, walks)?;
        self.stats.batches = before.batches + 1;
        self.stats.requests = before.requests + 1;
        Ok(out)
    }
}

/// Offsets of a fake kernel's structures (task, cred, signal, module),
/// with threads on `signal->thread_head` (6.7+) or on `thread_group`.
pub fn offsets(thread_node: bool) -> crate::btf::Offsets {
    crate::btf::Offsets {
        task_size: 0x600,
        task_tasks: 0x100,
        task_pid: 0x120,
        task_tgid: 0x124,
        task_comm: 0x200,
        task_real_parent: 0x140,
        task_cred: 0x148,
        task_state: 0x18,
        task_exit_state: 0x150,
        task_flags: 0x2c,
        task_start: 0x160,
        task_mm: 0x168,
        task_signal: 0x170,
        task_thread_node: thread_node.then_some(0x180),
        signal_thread_head: thread_node.then_some(0x10),
        task_thread_group: (!thread_node).then_some(0x190),
        signal_nr_threads: Some(0x4),
        cred_uid: 4,
        cred_gid: 8,
        module_list: 8,
        module_name: crate::btf::Field {
            offset: 0x18,
            size: 56,
        },
        module_state: 0,
        module_refcnt: Some(0x60),
        module_mem: Some((0x100, 0x40, 7, 0, 8)),
        module_core_layout: None,
        module_views: None,
        hook_views: None,
        pid_idr: None,
        run_queue: None,
    }
}

/// A fake kernel with these symbols and offsets (banner "Linux version
/// test", 4-level paging, no BTF), for the Linux layer and the checks.
pub fn kernel(
    symbols: Vec<crate::kallsyms::Symbol>,
    offsets: crate::btf::Offsets,
    lstar: u64,
) -> crate::linux::Kernel {
    use crate::kallsyms::{Encoding, Kallsyms, Layout};
    let layout = Layout {
        encoding: Encoding::PlaceRelative,
        names_first: true,
        uleb_lengths: true,
        seqs_of_names: None,
        num_syms_at: 0,
        names: 0,
        markers: 0,
        token_table: 0,
        token_index: 0,
        addresses: 0,
        relative_base: None,
    };
    crate::linux::Kernel {
        version: crate::linux::CACHE_VERSION,
        banner: "Linux version test\n".into(),
        banner_from_lstar: 0,
        lstar,
        kallsyms: Kallsyms::new(symbols, layout),
        offsets,
        btf_bytes: 0,
        from_cache: false,
        kernel_half: crate::linux::kernel_half(4),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::SnapshotCache;

    #[test]
    fn reads_cross_pages_and_fault_where_unmapped() {
        let mut m = FakeMemory::new(1);
        m.write_virt(0xffff_8000_0000_0ffe, &[1, 2, 3, 4]);
        let r = m
            .read_batch(&[
                Read::kernel(0, 0xffff_8000_0000_0ffe, 4),
                Read::kernel(0, 0xffff_8000_0000_3000, 4),
            ])
            .unwrap();
        assert_eq!(r[0].as_ref().unwrap(), &[1, 2, 3, 4]);
        assert_eq!(r[1].as_ref().unwrap_err().status, Status::NotPresent);
        assert_eq!(m.stats().requests, 1, "one batch, one request");
    }

    #[test]
    fn cache_fetches_each_page_once_per_snapshot() {
        let mut m = FakeMemory::new(1);
        m.write_virt(0x1000, &[7u8; 8192]);
        let mut c = SnapshotCache::new(m);
        let sp = Space::Virt(AddressSpace::kernel_of(0));
        assert_eq!(c.read(sp, 0x1ff0, 32).unwrap(), vec![7u8; 32]);
        let before = c.inner().stats().requests;
        c.read(sp, 0x1000, 16).unwrap();
        c.read(sp, 0x2100, 16).unwrap();
        assert_eq!(c.inner().stats().requests, before, "served from the cache");
        c.inner().write_virt(0x1000, &[9]);
        assert_eq!(c.read(sp, 0x1000, 1).unwrap(), vec![7], "same snapshot");
        c.new_snapshot();
        assert_eq!(c.read(sp, 0x1000, 1).unwrap(), vec![9], "new snapshot");
        assert!(c.read(sp, 0x9000, 1).is_err());
    }

    #[test]
    fn read_exact_splits_long_reads() {
        let mut m = FakeMemory::new(1);
        m.max_read = 4096;
        let data: Vec<u8> = (0..20000u32).map(|i| i as u8).collect();
        m.write_virt(0x10000, &data);
        let sp = Space::Virt(AddressSpace::kernel_of(0));
        assert_eq!(m.read_exact(sp, 0x10000, data.len()).unwrap(), data);
    }
}
