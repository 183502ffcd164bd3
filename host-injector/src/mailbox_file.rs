//! The mailbox backing file of one VM, read and written with `pread`/`pwrite`
//! (no mapping: every read is a fresh copy, so a value the guest changes
//! under us cannot change after we checked it).
//!
//! Everything read here is untrusted (the guest OS can write any byte of the
//! mailbox at any time): [`Header`] is a snapshot to report and to decide
//! whether to wait, never proof.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use smmvmi_mailbox::client::{self, Poll};
use smmvmi_mailbox::layout::{self, AgentState, Areas, HEADER_SIZE, SESSION_SALT_LEN};

/// Errors of the mailbox file.
#[derive(Debug, thiserror::Error)]
pub enum MailboxFileError {
    /// The file cannot be opened or accessed.
    #[error(
        "mailbox file {path}: {source} (expected the VM's ivshmem backing file, e.g. .cache/vms/NAME/mailbox, readable and writable by this user)"
    )]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file has a size the layout does not support.
    #[error("mailbox file {path}: {source}")]
    Layout {
        /// The file.
        path: String,
        /// What the layout says.
        source: layout::LayoutError,
    },
    /// The request frame does not fit.
    #[error("mailbox file {path}: {source}")]
    Post {
        /// The file.
        path: String,
        /// What the client module says.
        source: client::PostError,
    },
}

/// A snapshot of the mailbox header (all fields untrusted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Magic `SMMVMIMB` present.
    pub magic_ok: bool,
    /// Layout version word.
    pub version: u32,
    /// Raw agent state word ([`Header::state`]).
    pub state_raw: u32,
    /// Feature bits.
    pub features: u64,
    /// Mailbox size the firmware found.
    pub size: u32,
    /// CPUs the agent rendezvous with.
    pub ncpus: u32,
    /// SMI sessions served.
    pub smi_count: u64,
    /// Ping request (host) and the agent's acknowledgement.
    pub ping_req: u64,
    pub ping_ack: u64,
    /// Fault code (0 = none), the CPU and RIP of the fault.
    pub fault_code: u32,
    pub fault_cpu: u32,
    pub fault_rip: u64,
    /// Request doorbell.
    pub doorbell: u64,
    /// Doorbell value the agent served last.
    pub reply_done: u64,
    /// Raw serve status word.
    pub serve_status: u32,
    /// Reply frame length claimed.
    pub reply_len: u32,
    /// Session salt.
    pub salt: [u8; SESSION_SALT_LEN],
    /// TSC cycles of the last serve.
    pub serve_cycles: u64,
    /// SMI sessions served before every CPU arrived.
    pub partial_sessions: u64,
    /// SMI sessions recovered after their leader vanished or went stale.
    pub recovered_sessions: u64,
    /// CPUs found to have left SMM without RSM.
    pub vanished_cpus: u64,
    /// Followers that gave up waiting for their session's release.
    pub follower_timeouts: u64,
    /// Sessions that served nothing: another CPU held the serve claim.
    pub serve_busy: u64,
    /// Longest time one CPU spent in SMM for one SMI, in microseconds.
    pub max_smm_us: u64,
}

impl Header {
    /// Decodes a header snapshot.
    pub fn parse(b: &[u8; HEADER_SIZE]) -> Self {
        let u32_at = |o| layout::read_u32(b, o).unwrap_or(0);
        let u64_at = |o| layout::read_u64(b, o).unwrap_or(0);
        Self {
            magic_ok: b[layout::OFF_MAGIC..layout::OFF_MAGIC + 8] == layout::MAGIC,
            version: u32_at(layout::OFF_VERSION),
            state_raw: u32_at(layout::OFF_STATE),
            features: u64_at(layout::OFF_FEATURES),
            size: u32_at(layout::OFF_SIZE),
            ncpus: u32_at(layout::OFF_NCPUS),
            smi_count: u64_at(layout::OFF_SMI_COUNT),
            ping_req: u64_at(layout::OFF_PING_REQ),
            ping_ack: u64_at(layout::OFF_PING_ACK),
            fault_code: u32_at(layout::OFF_FAULT_CODE),
            fault_cpu: u32_at(layout::OFF_FAULT_CPU),
            fault_rip: u64_at(layout::OFF_FAULT_RIP),
            doorbell: u64_at(layout::OFF_REQ_DOORBELL),
            reply_done: u64_at(layout::OFF_REPLY_DONE),
            serve_status: u32_at(layout::OFF_SERVE_STATUS),
            reply_len: u32_at(layout::OFF_REPLY_LEN),
            salt: layout::session_salt(b).unwrap_or_default(),
            serve_cycles: u64_at(layout::OFF_SERVE_CYCLES),
            partial_sessions: u64_at(layout::OFF_PARTIAL_SESSIONS),
            recovered_sessions: u64_at(layout::OFF_RECOVERED_SESSIONS),
            vanished_cpus: u64_at(layout::OFF_VANISHED_CPUS),
            follower_timeouts: u64_at(layout::OFF_FOLLOWER_TIMEOUTS),
            serve_busy: u64_at(layout::OFF_SERVE_BUSY),
            max_smm_us: u64_at(layout::OFF_MAX_SMM_US),
        }
    }

    /// The agent state, if the word is a known one.
    pub fn state(&self) -> Option<AgentState> {
        AgentState::from_raw(self.state_raw)
    }

    /// True when the header says raising an SMI from the QEMU monitor is
    /// safe: magic and version right, state Ready or Unprovisioned, and the
    /// SMI-broadcast feature bit set.
    pub fn accepts_host_smi(&self) -> bool {
        self.magic_ok
            && self.version == layout::VERSION
            && matches!(
                self.state(),
                Some(AgentState::Ready | AgentState::Unprovisioned)
            )
            && self.features & layout::FEATURE_SMI_BROADCAST != 0
    }

    /// One line for error messages.
    pub fn summary(&self) -> String {
        format!(
            "magic {}, version {}, state {} ({:?}), features {:#x}, smi_count {}, fault {:#x}, doorbell {:#x}, done {:#x}, status {}",
            if self.magic_ok { "ok" } else { "missing" },
            self.version,
            self.state_raw,
            self.state(),
            self.features,
            self.smi_count,
            self.fault_code,
            self.doorbell,
            self.reply_done,
            self.serve_status
        )
    }
}

/// The mailbox backing file, kept open.
#[derive(Debug)]
pub struct MailboxFile {
    path: PathBuf,
    file: File,
    size: usize,
    areas: Areas,
}

impl MailboxFile {
    /// Opens the file read-write; its size must be a valid mailbox size.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, MailboxFileError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| MailboxFileError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io)?;
        let size = file.metadata().map_err(io)?.len() as usize;
        let areas = Areas::from_size(size).map_err(|source| MailboxFileError::Layout {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self {
            path,
            file,
            size,
            areas,
        })
    }

    /// Wraps an already open mailbox (a memfd the daemon created, or a file
    /// it opened); `name` is what errors call it. Its size must be a valid
    /// mailbox size.
    pub fn from_file(file: File, name: impl Into<PathBuf>) -> Result<Self, MailboxFileError> {
        let path = name.into();
        let size = file
            .metadata()
            .map_err(|source| MailboxFileError::Io {
                path: path.display().to_string(),
                source,
            })?
            .len() as usize;
        let areas = Areas::from_size(size).map_err(|source| MailboxFileError::Layout {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self {
            path,
            file,
            size,
            areas,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Mailbox size in bytes (the file size).
    pub fn size(&self) -> usize {
        self.size
    }

    /// Request and reply areas (derived from the size alone).
    pub fn areas(&self) -> &Areas {
        &self.areas
    }

    fn io(&self, source: std::io::Error) -> MailboxFileError {
        MailboxFileError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<(), MailboxFileError> {
        self.file
            .read_exact_at(buf, offset as u64)
            .map_err(|e| self.io(e))
    }

    /// Writes `data` at `offset`.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<(), MailboxFileError> {
        self.file
            .write_all_at(data, offset as u64)
            .map_err(|e| self.io(e))
    }

    /// Reads a little-endian u64.
    pub fn read_u64(&self, offset: usize) -> Result<u64, MailboxFileError> {
        let mut b = [0u8; 8];
        self.read_at(offset, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Writes a little-endian u64.
    pub fn write_u64(&self, offset: usize, v: u64) -> Result<(), MailboxFileError> {
        self.write_at(offset, &v.to_le_bytes())
    }

    /// A fresh header snapshot.
    pub fn header(&self) -> Result<Header, MailboxFileError> {
        let mut b = [0u8; HEADER_SIZE];
        self.read_at(0, &mut b)?;
        Ok(Header::parse(&b))
    }

    /// Hand-shake step 1: the frame into the request area, then the
    /// doorbell (two `pwrite`s in this order; the kernel's page cache is the
    /// shared memory, so the guest sees them in program order on x86).
    pub fn post_request(&self, frame: &[u8], doorbell: u64) -> Result<(), MailboxFileError> {
        // Validate with the contract's own checks on a small stand-in.
        if frame.len() > self.areas.request_capacity() || doorbell == 0 {
            let mut fake = vec![0u8; self.size];
            let err = client::post_request(&mut fake, frame, doorbell)
                .err()
                .unwrap_or(client::PostError::ZeroDoorbell);
            return Err(MailboxFileError::Post {
                path: self.path.display().to_string(),
                source: err,
            });
        }
        self.write_at(self.areas.request.start, frame)?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.write_u64(layout::OFF_REQ_DOORBELL, doorbell)
    }

    /// Hand-shake step 3: has the agent served `doorbell`? Reads the done
    /// word first and the status and length after it (the agent writes them
    /// before the done word).
    pub fn poll_reply(&self, doorbell: u64) -> Result<Poll, MailboxFileError> {
        if self.read_u64(layout::OFF_REPLY_DONE)? != doorbell {
            return Ok(Poll::Pending);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let mut b = [0u8; 8];
        self.read_at(layout::OFF_SERVE_STATUS, &mut b)?;
        let status = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let reply_len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize;
        Ok(Poll::Done {
            status,
            reply_len: reply_len.min(self.areas.reply_capacity()),
        })
    }

    /// Copies `len` bytes (clamped to the reply area) out of the reply area.
    pub fn read_reply(&self, len: usize) -> Result<Vec<u8>, MailboxFileError> {
        let len = len.min(self.areas.reply_capacity());
        let mut v = vec![0u8; len];
        self.read_at(self.areas.reply.start, &mut v)?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, size: u64) -> PathBuf {
        let p = std::env::temp_dir().join(format!("hi-mb-{name}-{}", std::process::id()));
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        p
    }

    #[test]
    fn rejects_bad_sizes_with_a_clear_error() {
        let p = temp("small", 100);
        let e = MailboxFile::open(&p).unwrap_err().to_string();
        assert!(e.contains("mailbox size must be between"), "{e}");
        std::fs::remove_file(p).unwrap();
        let e = MailboxFile::open("/nonexistent/mb")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ivshmem backing file"), "{e}");
    }

    #[test]
    fn post_and_poll_follow_the_contract() {
        let p = temp("post", 1 << 20);
        let mb = MailboxFile::open(&p).unwrap();
        mb.post_request(&[7u8; 100], 42).unwrap();
        let mut raw = std::fs::read(&p).unwrap();
        assert_eq!(&raw[mb.areas().request.start..][..100], &[7u8; 100]);
        assert_eq!(layout::read_u64(&raw, layout::OFF_REQ_DOORBELL), Some(42));
        assert_eq!(mb.poll_reply(42).unwrap(), Poll::Pending);
        // Agent side, simulated with the contract's writers.
        layout::write_u32(&mut raw, layout::OFF_SERVE_STATUS, 1);
        layout::write_u32(&mut raw, layout::OFF_REPLY_LEN, u32::MAX);
        layout::write_u64(&mut raw, layout::OFF_REPLY_DONE, 42);
        std::fs::write(&p, &raw).unwrap();
        assert_eq!(
            mb.poll_reply(42).unwrap(),
            Poll::Done {
                status: 1,
                reply_len: mb.areas().reply_capacity()
            },
            "a lying length is clamped to the reply area"
        );
        assert!(mb.post_request(&[0u8; 8], 0).is_err());
        let too_big = vec![0u8; mb.areas().request_capacity() + 1];
        let e = mb.post_request(&too_big, 5).unwrap_err().to_string();
        assert!(e.contains("request frame must fit"), "{e}");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn header_gate() {
        let mut b = [0u8; HEADER_SIZE];
        assert!(!Header::parse(&b).accepts_host_smi());
        b[..8].copy_from_slice(&layout::MAGIC);
        layout::write_u32(&mut b, layout::OFF_VERSION, layout::VERSION);
        layout::write_u32(&mut b, layout::OFF_STATE, AgentState::Ready as u32);
        assert!(!Header::parse(&b).accepts_host_smi(), "no broadcast bit");
        layout::write_u64(&mut b, layout::OFF_FEATURES, layout::FEATURE_SMI_BROADCAST);
        assert!(Header::parse(&b).accepts_host_smi());
        layout::write_u32(&mut b, layout::OFF_STATE, AgentState::Booting as u32);
        assert!(!Header::parse(&b).accepts_host_smi());
    }
}
