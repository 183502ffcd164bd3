//! A mailbox in a buffer, and a builder for a mailbox in a given state.

use std::cell::Cell;
use std::path::Path;

use smmvmi_mailbox::header::{AgentState, FEATURE_SMI_BROADCAST, Header, MAGIC, VERSION};
use smmvmi_mailbox::shared::{AccessError, SharedMemory, check_access};
use smmvmi_mailbox::zerocopy::IntoBytes;

/// The default mailbox size of the tests and the harness (1 MiB, the
/// ivshmem BAR size `cargo xtask vm` gives).
pub const MAILBOX_SIZE: usize = 1 << 20;

/// A mailbox in host memory: bytes in `Cell`s, so that the "agent" and
/// the "host" of a test can both hold it by shared reference, as they hold
/// the real one, and reach it only through [`SharedMemory`].
pub struct BufferMailbox {
    bytes: Box<[Cell<u8>]>,
}

impl BufferMailbox {
    /// A zero-filled mailbox of `size` bytes.
    pub fn zeroed(size: usize) -> Self {
        Self::from_bytes(&vec![0; size])
    }

    /// A mailbox holding a copy of `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self {
            bytes: bytes.iter().copied().map(Cell::new).collect(),
        }
    }

    /// A copy of every byte (for assertions).
    pub fn to_vec(&self) -> Vec<u8> {
        self.bytes.iter().map(Cell::get).collect()
    }

    /// The header, as the contract's typed layout.
    pub fn header(&self) -> Header {
        Header::read_from(self).expect("buffer mailbox holds a header")
    }

    fn word<const N: usize>(&self, off: usize) -> [u8; N] {
        std::array::from_fn(|i| self.bytes[off + i].get())
    }
}

impl SharedMemory for BufferMailbox {
    type Error = AccessError;

    fn size(&self) -> usize {
        self.bytes.len()
    }

    fn load_u32(&self, off: usize) -> Result<u32, AccessError> {
        check_access(self.size(), off, 4, 4)?;
        Ok(u32::from_le_bytes(self.word(off)))
    }

    fn load_u64(&self, off: usize) -> Result<u64, AccessError> {
        check_access(self.size(), off, 8, 8)?;
        Ok(u64::from_le_bytes(self.word(off)))
    }

    fn store_u32(&self, off: usize, v: u32) -> Result<(), AccessError> {
        check_access(self.size(), off, 4, 4)?;
        self.copy_in(off, &v.to_le_bytes())
    }

    fn store_u64(&self, off: usize, v: u64) -> Result<(), AccessError> {
        check_access(self.size(), off, 8, 8)?;
        self.copy_in(off, &v.to_le_bytes())
    }

    fn copy_out(&self, off: usize, dst: &mut [u8]) -> Result<(), AccessError> {
        check_access(self.size(), off, dst.len(), 1)?;
        for (d, s) in dst.iter_mut().zip(&self.bytes[off..]) {
            *d = s.get();
        }
        Ok(())
    }

    fn copy_in(&self, off: usize, src: &[u8]) -> Result<(), AccessError> {
        check_access(self.size(), off, src.len(), 1)?;
        for (d, s) in self.bytes[off..].iter().zip(src) {
            d.set(*s);
        }
        Ok(())
    }
}

/// Builds the bytes of a mailbox as a firmware in some state would have
/// left them: magic, version, size, state, features.
#[derive(Clone, Debug)]
pub struct MailboxBuilder {
    size: usize,
    header: Header,
}

impl MailboxBuilder {
    /// A [`MAILBOX_SIZE`] mailbox whose agent is ready, with SMI broadcast
    /// negotiated (the state the host waits for).
    pub fn ready() -> Self {
        Self::new(MAILBOX_SIZE)
            .state(AgentState::Ready)
            .features(FEATURE_SMI_BROADCAST)
    }

    /// A `size`-byte mailbox with magic, version and size set, state
    /// [`AgentState::Absent`].
    pub fn new(size: usize) -> Self {
        let mut header = Header::zeroed();
        header.magic = MAGIC;
        header.version = VERSION.into();
        header.size = (size as u32).into();
        Self { size, header }
    }

    /// Sets the agent state word.
    pub fn state(mut self, state: AgentState) -> Self {
        self.header.state = (state as u32).into();
        self
    }

    /// Sets the feature bits.
    pub fn features(mut self, features: u64) -> Self {
        self.header.features = features.into();
        self
    }

    /// Edits any other header field.
    pub fn with(mut self, edit: impl FnOnce(&mut Header)) -> Self {
        edit(&mut self.header);
        self
    }

    /// The mailbox bytes.
    pub fn bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.size];
        b[..self.header.as_bytes().len()].copy_from_slice(self.header.as_bytes());
        b
    }

    /// The mailbox as a buffer.
    pub fn buffer(&self) -> BufferMailbox {
        BufferMailbox::from_bytes(&self.bytes())
    }

    /// Writes the mailbox to `path` (a backing file for the host side).
    pub fn write_file(&self, path: impl AsRef<Path>) -> std::io::Result<()> {
        std::fs::write(path, self.bytes())
    }
}
