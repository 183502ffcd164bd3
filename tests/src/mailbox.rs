//! The host's view of a VM's mailbox file (the `ivshmem-plain` backing file).
//! Offsets come from `smmvmi_mailbox::layout`; every value read here was
//! written by an untrusted party and is only reported, never acted upon.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use smmvmi_mailbox::layout;

/// A snapshot of the mailbox header: the host-injector's type, so that the
/// tests read the header exactly as the product does.
pub use host_injector::mailbox_file::Header as MailboxHeader;

/// The mailbox backing file of one VM.
#[derive(Clone, Debug)]
pub struct MailboxFile {
    path: PathBuf,
}

impl MailboxFile {
    /// Size the harness gives the mailbox (the ivshmem BAR size).
    pub const SIZE: u64 = 1 << 20;

    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates (or truncates) the file, zero-filled, [`Self::SIZE`] bytes.
    pub fn create_zeroed(&self) -> std::io::Result<()> {
        let f = File::create(&self.path)?;
        f.set_len(Self::SIZE)
    }

    /// Reads the header.
    pub fn header(&self) -> std::io::Result<MailboxHeader> {
        let mut b = [0u8; layout::HEADER_SIZE];
        File::open(&self.path)?.read_exact_at(&mut b, 0)?;
        Ok(MailboxHeader::parse(&b))
    }

    /// Writes a little-endian u64 at `offset` (e.g. [`layout::OFF_PING_REQ`]).
    pub fn write_u64(&self, offset: usize, value: u64) -> std::io::Result<()> {
        let f = std::fs::OpenOptions::new().write(true).open(&self.path)?;
        f.write_all_at(&value.to_le_bytes(), offset as u64)
    }

    /// Reads a little-endian u64 at `offset`.
    pub fn read_u64(&self, offset: usize) -> std::io::Result<u64> {
        let mut b = [0u8; 8];
        File::open(&self.path)?.read_exact_at(&mut b, offset as u64)?;
        Ok(u64::from_le_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smmvmi_mailbox::layout::AgentState;

    #[test]
    fn header_round_trip() {
        let mut b = [0u8; layout::HEADER_SIZE];
        b[..8].copy_from_slice(&layout::MAGIC);
        b[layout::OFF_VERSION..][..4].copy_from_slice(&layout::VERSION.to_le_bytes());
        b[layout::OFF_STATE..][..4].copy_from_slice(&2u32.to_le_bytes());
        b[layout::OFF_FEATURES..][..8].copy_from_slice(&1u64.to_le_bytes());
        b[layout::OFF_PING_ACK..][..8].copy_from_slice(&0xabcdu64.to_le_bytes());
        let h = MailboxHeader::parse(&b);
        assert!(h.magic_ok && h.accepts_host_smi());
        assert_eq!(h.ping_ack, 0xabcd);
        assert_eq!(h.state(), Some(AgentState::Ready));
        assert!(!MailboxHeader::parse(&[0u8; layout::HEADER_SIZE]).accepts_host_smi());
    }

    #[test]
    fn file_read_write() {
        let p = std::env::temp_dir().join(format!("smmvmi-mb-{}", std::process::id()));
        let mb = MailboxFile::new(&p);
        mb.create_zeroed().unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), MailboxFile::SIZE);
        mb.write_u64(layout::OFF_PING_REQ, 42).unwrap();
        assert_eq!(mb.header().unwrap().ping_req, 42);
        assert_eq!(mb.read_u64(layout::OFF_PING_REQ).unwrap(), 42);
        std::fs::remove_file(p).unwrap();
    }
}
