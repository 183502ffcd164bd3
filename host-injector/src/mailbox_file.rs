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
use smmvmi_mailbox::header;
use smmvmi_mailbox::layout::{self, AgentState, Areas, HEADER_SIZE, SESSION_SALT_LEN};
use smmvmi_mailbox::shared::{AccessError, SharedMemory, check_access};

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
    /// An offset or length outside the mailbox (a caller's bug).
    #[error("mailbox file: {0}")]
    Access(#[from] AccessError),
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
    /// SMI sessions the SMM runtime recovered (leader vanished, or stale).
    pub recovered_sessions: u64,
    /// Times a CPU was found to have left SMM without RSM.
    pub vanished_cpus: u64,
    /// Times a follower CPU stopped waiting for its leader.
    pub follower_timeouts: u64,
    /// Sessions that served nothing: another CPU held the serve claim.
    pub serve_busy: u64,
    /// Longest time one CPU spent in SMM for one SMI, in microseconds.
    pub max_smm_us: u64,
    /// Times the agent re-armed its MSI-X SMI doorbell.
    pub doorbell_rearms: u64,
}

impl Header {
    /// Decodes a header snapshot (the contract's typed layout,
    /// [`header::Header`]).
    pub fn parse(b: &[u8; HEADER_SIZE]) -> Self {
        Self::from(&header::Header::parse(b))
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

    /// The agent state in words (`ready`, `booting`, ..., `unknown (7)`).
    pub fn state_name(&self) -> String {
        match self.state() {
            Some(AgentState::Absent) => "absent".into(),
            Some(AgentState::Booting) => "booting".into(),
            Some(AgentState::Ready) => "ready".into(),
            Some(AgentState::Unprovisioned) => "unprovisioned".into(),
            Some(AgentState::Fault) => "fault".into(),
            None => format!("unknown ({})", self.state_raw),
        }
    }

    /// Why the header does not allow a monitor SMI, in the user's words,
    /// with what to do; `None` if it allows one.
    pub fn not_ready_reason(&self) -> Option<String> {
        if self.accepts_host_smi() {
            return None;
        }
        Some(if !self.magic_ok {
            "this VM has no smmvmi agent: its mailbox holds no agent header (the VM runs \
             another firmware, or it started less than a second ago). Start it with the \
             smmvmi firmware (`cargo xtask vm up`), or point at the right VM; if this VM \
             had an agent before, the guest may have overwritten the header: treat that as \
             an alert"
                .into()
        } else if self.version != layout::VERSION {
            format!(
                "the agent speaks mailbox layout {}, this tool layout {}: use the firmware and \
                 tools of one release",
                self.version,
                layout::VERSION
            )
        } else {
            match self.state() {
                Some(AgentState::Absent | AgentState::Booting) => {
                    "the smmvmi firmware is still booting (SMM not locked, SMI broadcast not \
                     negotiated: a monitor SMI now could crash QEMU 7.2): retry in a second"
                        .into()
                }
                Some(AgentState::Fault) => format!(
                    "the agent took a fault in SMM (code {:#x} on CPU {} at RIP {:#x}): see the \
                     VM's debug console (debugcon.log); reboot the VM",
                    self.fault_code, self.fault_cpu, self.fault_rip
                ),
                _ if self.features & layout::FEATURE_SMI_BROADCAST == 0 => {
                    "the agent has not negotiated SMI broadcast, so a monitor SMI could crash \
                     QEMU 7.2: the firmware is still booting or failed (see debugcon.log)"
                        .into()
                }
                _ => format!("the agent state word is {}", self.state_name()),
            }
        })
    }

    /// One line for error messages.
    pub fn summary(&self) -> String {
        format!(
            "magic {}, version {}, state {} ({}), features {:#x}, smi_count {}, fault {:#x}, doorbell {:#x}, done {:#x}, status {}",
            if self.magic_ok { "ok" } else { "missing" },
            self.version,
            self.state_raw,
            self.state_name(),
            self.features,
            self.smi_count,
            self.fault_code,
            self.doorbell,
            self.reply_done,
            self.serve_status
        )
    }
}

impl From<&header::Header> for Header {
    fn from(h: &header::Header) -> Self {
        Self {
            magic_ok: h.magic_ok(),
            version: h.version.get(),
            state_raw: h.state.get(),
            features: h.features.get(),
            size: h.size.get(),
            ncpus: h.ncpus.get(),
            smi_count: h.smi_count.get(),
            ping_req: h.ping_req.get(),
            ping_ack: h.ping_ack.get(),
            fault_code: h.fault_code.get(),
            fault_cpu: h.fault_cpu.get(),
            fault_rip: h.fault_rip.get(),
            doorbell: h.req_doorbell.get(),
            reply_done: h.reply_done.get(),
            serve_status: h.serve_status.get(),
            reply_len: h.reply_len.get(),
            salt: h.session_salt,
            serve_cycles: h.serve_cycles.get(),
            partial_sessions: h.partial_sessions.get(),
            recovered_sessions: h.recovered_sessions.get(),
            vanished_cpus: h.vanished_cpus.get(),
            follower_timeouts: h.follower_timeouts.get(),
            serve_busy: h.serve_busy.get(),
            max_smm_us: h.max_smm_us.get(),
            doorbell_rearms: h.doorbell_rearms.get(),
        }
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
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| MailboxFileError::Io {
                path: path.display().to_string(),
                source,
            })?;
        Self::from_file(file, path)
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

    fn pread(&self, offset: usize, buf: &mut [u8]) -> Result<(), MailboxFileError> {
        self.file
            .read_exact_at(buf, offset as u64)
            .map_err(|e| self.io(e))
    }

    fn pwrite(&self, offset: usize, data: &[u8]) -> Result<(), MailboxFileError> {
        self.file
            .write_all_at(data, offset as u64)
            .map_err(|e| self.io(e))
    }

    /// A fresh header snapshot (one `pread` of the whole header).
    pub fn header(&self) -> Result<Header, MailboxFileError> {
        Ok(Header::from(&header::Header::read_from(self)?))
    }

    /// Hand-shake step 1: the frame into the request area, then the
    /// doorbell (two `pwrite`s in this order; the kernel's page cache is the
    /// shared memory, so the guest sees them in program order on x86).
    pub fn post_request(&self, frame: &[u8], doorbell: u64) -> Result<(), MailboxFileError> {
        client::post_request(self, frame, doorbell).map_err(|e| match e.into_contract() {
            Ok(source) => MailboxFileError::Post {
                path: self.path.display().to_string(),
                source,
            },
            Err(access) => access,
        })
    }

    /// Hand-shake step 3: has the agent served `doorbell`?
    pub fn poll_reply(&self, doorbell: u64) -> Result<Poll, MailboxFileError> {
        client::poll_reply(self, doorbell)
    }

    /// Copies `len` bytes (clamped to the reply area) out of the reply area.
    pub fn read_reply(&self, len: usize) -> Result<Vec<u8>, MailboxFileError> {
        let mut v = vec![0u8; len.min(self.areas.reply_capacity())];
        client::copy_reply(self, &mut v)?;
        Ok(v)
    }
}

/// The backing file as the contract's shared memory: every access is a
/// fresh `pread`/`pwrite` at a bounds-checked offset (no mapping, so
/// nothing read can change after it was copied). `pwrite`s reach the page
/// cache, which is the memory QEMU maps, in program order.
impl SharedMemory for MailboxFile {
    type Error = MailboxFileError;

    fn size(&self) -> usize {
        self.size
    }

    fn load_u32(&self, off: usize) -> Result<u32, MailboxFileError> {
        check_access(self.size, off, 4, 4)?;
        let mut b = [0u8; 4];
        self.pread(off, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn load_u64(&self, off: usize) -> Result<u64, MailboxFileError> {
        check_access(self.size, off, 8, 8)?;
        let mut b = [0u8; 8];
        self.pread(off, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn store_u32(&self, off: usize, v: u32) -> Result<(), MailboxFileError> {
        check_access(self.size, off, 4, 4)?;
        self.pwrite(off, &v.to_le_bytes())
    }

    fn store_u64(&self, off: usize, v: u64) -> Result<(), MailboxFileError> {
        check_access(self.size, off, 8, 8)?;
        self.pwrite(off, &v.to_le_bytes())
    }

    fn copy_out(&self, off: usize, dst: &mut [u8]) -> Result<(), MailboxFileError> {
        check_access(self.size, off, dst.len(), 1)?;
        self.pread(off, dst)
    }

    fn copy_in(&self, off: usize, src: &[u8]) -> Result<(), MailboxFileError> {
        check_access(self.size, off, src.len(), 1)?;
        self.pwrite(off, src)
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
        let raw = std::fs::read(&p).unwrap();
        assert_eq!(&raw[mb.areas().request.start..][..100], &[7u8; 100]);
        assert_eq!(
            raw[layout::OFF_REQ_DOORBELL..][..8],
            42u64.to_le_bytes(),
            "the doorbell is where the contract says"
        );
        assert_eq!(mb.poll_reply(42).unwrap(), Poll::Pending);
        // Agent side, simulated through the same shared-memory trait.
        mb.store_u32(layout::OFF_SERVE_STATUS, 1).unwrap();
        mb.store_u32(layout::OFF_REPLY_LEN, u32::MAX).unwrap();
        mb.store_u64(layout::OFF_REPLY_DONE, 42).unwrap();
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
        let e = mb.load_u64(1 << 20).unwrap_err().to_string();
        assert!(e.contains("must lie inside"), "{e}");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn header_gate() {
        let mut h = header::Header::zeroed();
        let parse = |h: &header::Header| Header::from(h);
        assert!(!parse(&h).accepts_host_smi());
        h.magic = layout::MAGIC;
        h.version = layout::VERSION.into();
        h.state = (AgentState::Ready as u32).into();
        assert!(!parse(&h).accepts_host_smi(), "no broadcast bit");
        h.features = layout::FEATURE_SMI_BROADCAST.into();
        assert!(parse(&h).accepts_host_smi());
        h.state = (AgentState::Booting as u32).into();
        assert!(!parse(&h).accepts_host_smi());
    }
}
