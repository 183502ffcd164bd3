//! Raw memory, only through bounds-checked regions (rust-hypervisor-firmware's
//! `MemoryRegion` idea). Creating a [`Region`] is the one unsafe step: the
//! creator vouches that the range is mapped and is the firmware's to use.

use core::ptr;

/// A range of mapped memory the firmware may read and write.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    base: u64,
    len: u64,
}

impl Region {
    /// # Safety
    /// `[base, base + len)` must be mapped (virtual = the address the CPU
    /// uses) and must be memory the firmware owns at this point of boot or
    /// SMM: no Rust object lives there, and any concurrent writer (another
    /// CPU, the guest through shared memory) is tolerated by the callers,
    /// which use the volatile accessors for such memory.
    pub const unsafe fn new(base: u64, len: u64) -> Self {
        Self { base, len }
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// The sub-range `[off, off + len)`, if it lies inside this region.
    pub fn sub(&self, off: u64, len: u64) -> Option<Region> {
        let end = off.checked_add(len)?;
        (end <= self.len).then_some(Region {
            base: self.base + off,
            len,
        })
    }

    fn ptr(&self, off: u64, len: usize) -> *mut u8 {
        let end = off.checked_add(len as u64);
        assert!(
            end.is_some_and(|e| e <= self.len),
            "access [{off:#x}, +{len:#x}) outside region {:#x}+{:#x}",
            self.base,
            self.len
        );
        (self.base + off) as *mut u8
    }

    /// Copies `buf.len()` bytes from offset `off`.
    pub fn read(&self, off: u64, buf: &mut [u8]) {
        let src = self.ptr(off, buf.len());
        // SAFETY: `ptr` checked the range lies inside the region, which the
        // creator guaranteed is mapped and ours; `buf` is a distinct Rust
        // buffer, so the ranges do not overlap.
        unsafe { ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
    }

    /// Copies `data` to offset `off`.
    pub fn write(&self, off: u64, data: &[u8]) {
        let dst = self.ptr(off, data.len());
        // SAFETY: as in `read`; the destination is firmware-owned memory
        // that no Rust reference points into.
        unsafe { ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
    }

    /// Fills `[off, off + len)` with `byte`.
    pub fn fill(&self, off: u64, len: u64, byte: u8) {
        let dst = self.ptr(off, len as usize);
        // SAFETY: range checked by `ptr`; firmware-owned memory.
        unsafe { ptr::write_bytes(dst, byte, len as usize) };
    }

    /// Reads a naturally aligned u32 once (memory others may write).
    pub fn read_u32(&self, off: u64) -> u32 {
        assert!(off.is_multiple_of(4), "unaligned u32 read at {off:#x}");
        let p = self.ptr(off, 4) as *const u32;
        // SAFETY: in range, aligned, mapped; volatile because another agent
        // (guest, host, another CPU) may write it at any time.
        unsafe { ptr::read_volatile(p) }
    }

    /// Reads a naturally aligned u64 once (memory others may write).
    pub fn read_u64(&self, off: u64) -> u64 {
        assert!(off.is_multiple_of(8), "unaligned u64 read at {off:#x}");
        let p = self.ptr(off, 8) as *const u64;
        // SAFETY: as in `read_u32`.
        unsafe { ptr::read_volatile(p) }
    }

    /// Writes a naturally aligned u32 once.
    pub fn write_u32(&self, off: u64, v: u32) {
        assert!(off.is_multiple_of(4), "unaligned u32 write at {off:#x}");
        let p = self.ptr(off, 4) as *mut u32;
        // SAFETY: in range, aligned, mapped, firmware-owned or shared
        // memory where a racing writer is expected.
        unsafe { ptr::write_volatile(p, v) };
    }

    /// Writes a naturally aligned u64 once.
    pub fn write_u64(&self, off: u64, v: u64) {
        assert!(off.is_multiple_of(8), "unaligned u64 write at {off:#x}");
        let p = self.ptr(off, 8) as *mut u64;
        // SAFETY: as in `write_u32`.
        unsafe { ptr::write_volatile(p, v) };
    }

    /// Copies into memory that others may read at the same time.
    pub fn write_volatile(&self, off: u64, data: &[u8]) {
        let dst = self.ptr(off, data.len());
        for (i, b) in data.iter().enumerate() {
            // SAFETY: `dst + i` lies in the range checked by `ptr`.
            unsafe { ptr::write_volatile(dst.add(i), *b) };
        }
    }
}

impl Region {
    /// The region as a byte slice.
    ///
    /// # Safety
    /// No other Rust reference to this memory may be live while the slice
    /// is, and for memory that others write concurrently (the mailbox) the
    /// user must read every byte it relies on once and copy before checking.
    pub unsafe fn as_mut_slice(&self) -> &'static mut [u8] {
        // SAFETY: mapped and ours (creator's contract), exclusivity as above.
        unsafe { core::slice::from_raw_parts_mut(self.base as *mut u8, self.len as usize) }
    }
}
