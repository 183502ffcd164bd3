//! Memory that someone else writes: the mailbox as a trait of word loads,
//! word stores and one-time copies, never a reference.
//!
//! The mailbox is shared by the guest OS, the host and the agent, and any of
//! them may write any byte at any moment. A Rust reference (`&[u8]`,
//! `&mut [u8]`) over such memory would promise the compiler that nobody
//! else changes it, which is false; so the contract's users (the agent, the
//! host-injector, the test harness) reach the mailbox only through
//! [`SharedMemory`]:
//! - naturally aligned little-endian `u32`/`u64` loads and stores, each one
//!   access (volatile in the firmware), for the header's words;
//! - [`SharedMemory::copy_out`] / [`SharedMemory::copy_in`] for frames: a
//!   frame is copied out once into private memory and checked there, never
//!   parsed in place.
//!
//! Implementations: the firmware over the ivshmem BAR (volatile accesses
//! through its `Region`), the host-injector over the backing file
//! (`pread`/`pwrite`), and the testkit over a buffer of `Cell<u8>`.
//!
//! Every access is bounds-checked by the implementation and fails with
//! [`AccessError`] (converted into the implementation's error type) instead
//! of panicking: the agent must return from every SMI whatever it is given.

/// Why an access to shared memory was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// The range does not lie inside the memory.
    #[error(
        "shared-memory access [{off:#x}, +{len:#x}) must lie inside the {size:#x}-byte mailbox: the offset comes from a wrong layout or a corrupted length"
    )]
    OutOfBounds {
        /// Offset of the access in bytes.
        off: usize,
        /// Length of the access in bytes.
        len: usize,
        /// Size of the memory in bytes.
        size: usize,
    },
    /// A word access is not naturally aligned.
    #[error(
        "shared-memory word at {off:#x} must be {align}-byte aligned (one untorn access): fix the offset"
    )]
    Misaligned {
        /// Offset of the access in bytes.
        off: usize,
        /// Required alignment in bytes (4 or 8).
        align: usize,
    },
}

/// Checks that `[off, off + len)` lies inside `size` bytes and, for words
/// (`align` 4 or 8; 1 for byte copies), that `off` is aligned. The helper
/// every implementation calls before it touches memory.
pub fn check_access(size: usize, off: usize, len: usize, align: usize) -> Result<(), AccessError> {
    if !off.is_multiple_of(align) {
        return Err(AccessError::Misaligned { off, align });
    }
    match off.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(AccessError::OutOfBounds { off, len, size }),
    }
}

/// Memory that other parties write concurrently (the mailbox). Offsets are
/// bytes from the start of the memory; all words are little-endian. No
/// method hands out a reference into the memory.
pub trait SharedMemory {
    /// What a failed access says. Must be able to carry an [`AccessError`];
    /// the firmware and the testkit use [`AccessError`] itself, the host adds
    /// I/O errors.
    type Error: From<AccessError>;

    /// Size of the memory in bytes, as its owner sized it (the BAR size, the
    /// file size), never a value read from the memory itself.
    fn size(&self) -> usize;

    /// Loads the naturally aligned little-endian `u32` at `off`, once.
    fn load_u32(&self, off: usize) -> Result<u32, Self::Error>;

    /// Loads the naturally aligned little-endian `u64` at `off`, once.
    fn load_u64(&self, off: usize) -> Result<u64, Self::Error>;

    /// Stores `v` as the naturally aligned little-endian `u32` at `off`.
    fn store_u32(&self, off: usize, v: u32) -> Result<(), Self::Error>;

    /// Stores `v` as the naturally aligned little-endian `u64` at `off`.
    fn store_u64(&self, off: usize, v: u64) -> Result<(), Self::Error>;

    /// Copies `dst.len()` bytes starting at `off` into private memory.
    fn copy_out(&self, off: usize, dst: &mut [u8]) -> Result<(), Self::Error>;

    /// Copies `src` into the memory starting at `off`.
    fn copy_in(&self, off: usize, src: &[u8]) -> Result<(), Self::Error>;
}

impl<T: SharedMemory + ?Sized> SharedMemory for &T {
    type Error = T::Error;

    fn size(&self) -> usize {
        (**self).size()
    }
    fn load_u32(&self, off: usize) -> Result<u32, Self::Error> {
        (**self).load_u32(off)
    }
    fn load_u64(&self, off: usize) -> Result<u64, Self::Error> {
        (**self).load_u64(off)
    }
    fn store_u32(&self, off: usize, v: u32) -> Result<(), Self::Error> {
        (**self).store_u32(off, v)
    }
    fn store_u64(&self, off: usize, v: u64) -> Result<(), Self::Error> {
        (**self).store_u64(off, v)
    }
    fn copy_out(&self, off: usize, dst: &mut [u8]) -> Result<(), Self::Error> {
        (**self).copy_out(off, dst)
    }
    fn copy_in(&self, off: usize, src: &[u8]) -> Result<(), Self::Error> {
        (**self).copy_in(off, src)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_checks() {
        assert_eq!(check_access(0x100, 0xf8, 8, 8), Ok(()));
        assert!(matches!(
            check_access(0x100, 0xfc, 8, 4),
            Err(AccessError::OutOfBounds { .. })
        ));
        assert!(matches!(
            check_access(0x100, 4, 8, 8),
            Err(AccessError::Misaligned { off: 4, align: 8 })
        ));
        assert!(matches!(
            check_access(0x100, usize::MAX, 2, 1),
            Err(AccessError::OutOfBounds { .. })
        ));
    }
}
