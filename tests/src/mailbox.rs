//! The host's view of a VM's mailbox file (the `ivshmem-plain` backing file).
//! Offsets come from `smmvmi_mailbox::header`; every value read here was
//! written by an untrusted party and is only reported, never acted upon.
//! The file is reached only through the contract's `SharedMemory` trait, as
//! the host-injector implements it (fresh `pread`/`pwrite`s).

use std::fs::File;
use std::path::{Path, PathBuf};

use smmvmi_mailbox::shared::SharedMemory;

/// A snapshot of the mailbox header: the host-injector's type, so that the
/// tests read the header exactly as the product does.
pub use host_injector::mailbox_file::Header as MailboxHeader;

/// The mailbox backing file of one VM.
#[derive(Clone, Debug)]
pub struct MailboxFile {
    path: PathBuf,
}

fn to_io(e: host_injector::MailboxFileError) -> std::io::Error {
    std::io::Error::other(e)
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

    /// The file as the contract's shared memory (opened afresh: the VM's
    /// state directory may have been recreated since).
    pub fn open(&self) -> std::io::Result<host_injector::MailboxFile> {
        host_injector::MailboxFile::open(&self.path).map_err(to_io)
    }

    /// Reads the header.
    pub fn header(&self) -> std::io::Result<MailboxHeader> {
        self.open()?.header().map_err(to_io)
    }

    /// Writes a little-endian u64 at `offset` (e.g. [`smmvmi_mailbox::header::OFF_PING_REQ`]).
    pub fn write_u64(&self, offset: usize, value: u64) -> std::io::Result<()> {
        self.open()?.store_u64(offset, value).map_err(to_io)
    }

    /// Reads a little-endian u64 at `offset`.
    pub fn read_u64(&self, offset: usize) -> std::io::Result<u64> {
        self.open()?.load_u64(offset).map_err(to_io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smmvmi_mailbox::header::{self, AgentState};
    use smmvmi_mailbox::zerocopy::IntoBytes;

    #[test]
    fn header_round_trip() {
        let mut h = header::Header::zeroed();
        h.magic = header::MAGIC;
        h.version = header::VERSION.into();
        h.state = (AgentState::Ready as u32).into();
        h.features = header::FEATURE_SMI_BROADCAST.into();
        h.ping_ack = 0xabcd.into();
        let mut b = [0u8; header::HEADER_SIZE];
        b.copy_from_slice(h.as_bytes());
        let h = MailboxHeader::parse(&b);
        assert!(h.magic_ok && h.accepts_host_smi());
        assert_eq!(h.ping_ack, 0xabcd);
        assert_eq!(h.state(), Some(AgentState::Ready));
        assert!(!MailboxHeader::parse(&[0u8; header::HEADER_SIZE]).accepts_host_smi());
    }

    #[test]
    fn file_read_write() {
        let p = std::env::temp_dir().join(format!("smmvmi-mb-{}", std::process::id()));
        let mb = MailboxFile::new(&p);
        mb.create_zeroed().unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), MailboxFile::SIZE);
        mb.write_u64(header::OFF_PING_REQ, 42).unwrap();
        assert_eq!(mb.header().unwrap().ping_req, 42);
        assert_eq!(mb.read_u64(header::OFF_PING_REQ).unwrap(), 42);
        std::fs::remove_file(p).unwrap();
    }
}
