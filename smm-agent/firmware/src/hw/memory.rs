//! Raw memory, only through bounds-checked regions (rust-hypervisor-firmware's
//! `MemoryRegion` idea). Creating a [`Region`] is the one unsafe step: the
//! creator vouches that the range is mapped and is the firmware's to use.

use core::ptr;

use smmvmi_mailbox::shared::{AccessError, SharedMemory, check_access};

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

    /// Copies `len` bytes from offset `off` of this region to offset
    /// `dst_off` of `dst`.
    pub fn copy_to(&self, off: u64, dst: &Region, dst_off: u64, len: u64) {
        let src = self.ptr(off, len as usize);
        let to = dst.ptr(dst_off, len as usize);
        // SAFETY: both ranges checked by `ptr` against regions their
        // creators vouched for; `ptr::copy` allows them to overlap.
        unsafe { ptr::copy(src, to, len as usize) };
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
    /// The region as a byte slice, for firmware-owned memory that nobody
    /// else writes (the agent's SMRAM buffers). Never over shared memory:
    /// the mailbox is reached only through [`SharedMemory`].
    ///
    /// # Safety
    /// No other Rust reference to this memory may be live while the slice
    /// is, and nothing outside this CPU's control (guest, host, device)
    /// writes it.
    pub unsafe fn as_mut_slice(&self) -> &'static mut [u8] {
        // SAFETY: mapped and ours (creator's contract), exclusivity as above.
        unsafe { core::slice::from_raw_parts_mut(self.base as *mut u8, self.len as usize) }
    }
}

/// The mailbox BAR (or any region others write) as the contract's shared
/// memory: every access bounds-checked without panicking, words as single
/// volatile accesses, copies as volatile word/byte accesses. No reference
/// into the region is ever formed.
impl SharedMemory for Region {
    type Error = AccessError;

    fn size(&self) -> usize {
        self.len as usize
    }

    fn load_u32(&self, off: usize) -> Result<u32, AccessError> {
        check_access(self.size(), off, 4, 4)?;
        Ok(u32::from_le(self.read_u32(off as u64)))
    }

    fn load_u64(&self, off: usize) -> Result<u64, AccessError> {
        check_access(self.size(), off, 8, 8)?;
        Ok(u64::from_le(self.read_u64(off as u64)))
    }

    fn store_u32(&self, off: usize, v: u32) -> Result<(), AccessError> {
        check_access(self.size(), off, 4, 4)?;
        self.write_u32(off as u64, v.to_le());
        Ok(())
    }

    fn store_u64(&self, off: usize, v: u64) -> Result<(), AccessError> {
        check_access(self.size(), off, 8, 8)?;
        self.write_u64(off as u64, v.to_le());
        Ok(())
    }

    fn copy_out(&self, off: usize, dst: &mut [u8]) -> Result<(), AccessError> {
        check_access(self.size(), off, dst.len(), 1)?;
        let src = self.ptr(off as u64, dst.len());
        let mut i = 0;
        while i < dst.len() {
            let p = src.wrapping_add(i);
            if (p as usize).is_multiple_of(8) && dst.len() - i >= 8 {
                // SAFETY: `p..p + 8` lies in the range checked above and is
                // 8-byte aligned; a volatile load because others write it.
                let w = unsafe { ptr::read_volatile(p as *const u64) };
                dst[i..i + 8].copy_from_slice(&w.to_ne_bytes());
                i += 8;
            } else {
                // SAFETY: `p` lies in the range checked above.
                dst[i] = unsafe { ptr::read_volatile(p) };
                i += 1;
            }
        }
        Ok(())
    }

    fn copy_in(&self, off: usize, src: &[u8]) -> Result<(), AccessError> {
        check_access(self.size(), off, src.len(), 1)?;
        let dst = self.ptr(off as u64, src.len());
        let mut i = 0;
        while i < src.len() {
            let p = dst.wrapping_add(i);
            if (p as usize).is_multiple_of(8) && src.len() - i >= 8 {
                let mut w = [0u8; 8];
                w.copy_from_slice(&src[i..i + 8]);
                // SAFETY: `p..p + 8` lies in the range checked above and is
                // 8-byte aligned; volatile because others read it.
                unsafe { ptr::write_volatile(p as *mut u64, u64::from_ne_bytes(w)) };
                i += 8;
            } else {
                // SAFETY: `p` lies in the range checked above.
                unsafe { ptr::write_volatile(p, src[i]) };
                i += 1;
            }
        }
        Ok(())
    }
}
