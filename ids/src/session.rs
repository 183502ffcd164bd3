//! A session with one agent: sealed requests carried by the host-injector
//! library, replies opened and bound by `smmvmi_mailbox::client`.

use std::path::Path;
use std::time::Duration;

use host_injector::{Injector, MailboxFile, QmpSmi, Target, TransactError, Transaction};
use smmvmi_mailbox::client::{self, Client, ClientError, OwnedResult};
use smmvmi_mailbox::crypto::{SHARED_KEY_LEN, SessionKeys};
use smmvmi_mailbox::frame::FLAG_NO_SNAPSHOT;
use smmvmi_mailbox::layout::{AgentState, SESSION_SALT_LEN, ServeStatus};
use smmvmi_mailbox::wire::{
    AddressSpace, CpuState, IDS_NONCE_LEN, Info, InfoCpu, InfoHeader, Op, RamRange, Status,
};

use crate::endpoint::Endpoint;
use crate::transport::{DaemonTransport, Transport};

/// Errors of a session. Each says what was expected, what was found and
/// what to do.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The key file is unusable.
    #[error(
        "key file {path}: expected exactly {SHARED_KEY_LEN} raw bytes (the file given to the VM with -fw_cfg name={key_file}), {problem}",
        key_file = smmvmi_mailbox::platform::KEY_FW_CFG_FILE
    )]
    Key {
        /// Key file.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// The mailbox file or the injector failed.
    #[error(transparent)]
    Mailbox(#[from] host_injector::MailboxFileError),
    /// The SMI backend failed to connect.
    #[error(transparent)]
    Smi(#[from] host_injector::SmiError),
    /// The round trip failed (not ready, silent agent, rejected request).
    #[error(transparent)]
    Transact(#[from] TransactError),
    /// The endpoint lacks something (a daemon endpoint's key).
    #[error(transparent)]
    Endpoint(#[from] crate::endpoint::EndpointError),
    /// The host-injector daemon failed or refused (typed: match on
    /// `ClientError::Daemon(DaemonError::..)`).
    #[error(transparent)]
    Daemon(#[from] host_injector::daemon::client::ClientError),
    /// The reply failed authentication, binding or parsing.
    #[error("the reply was not accepted: {0}")]
    Reply(#[from] ClientError),
    /// The agent has no key.
    #[error(
        "the agent is unprovisioned (no key reached the firmware): it serves only plain INFO, whose content proves nothing. Start the VM with -fw_cfg name={},file=KEY (cargo xtask vm up does)",
        smmvmi_mailbox::platform::KEY_FW_CFG_FILE
    )]
    Unprovisioned,
    /// The session salt in the header changed after this session started.
    #[error(
        "the agent's session salt changed (the VM rebooted, or the guest rewrote the header): reconnect to derive fresh keys"
    )]
    SaltChanged,
    /// The agent answered an op with a failure status.
    #[error("{op}: {}", status_words(*status, *level, *aux))]
    Op {
        /// The op, described.
        op: String,
        /// Its status.
        status: Status,
        /// Paging level for NotPresent.
        level: u8,
        /// Where it stopped.
        aux: u64,
    },
    /// CPU_STATE (or a read through a CPU's page tables) named a CPU the VM
    /// does not have.
    #[error("CPU {cpu} does not exist: this VM has {count} CPUs ({}); `ids info` lists them", cpu_list(*count))]
    NoSuchCpu {
        /// The CPU asked for.
        cpu: u32,
        /// CPUs the agent knows.
        count: u32,
    },
    /// The reply has another shape than the request.
    #[error("malformed answer: {0}")]
    Malformed(String),
    /// A [`crate::transport::FrameCarrier`] could not carry a frame (its
    /// connection failed, or the party behind it refused).
    #[error("the frame carrier failed: {0}")]
    Carrier(String),
}

/// What an op's failure status means, in words, with what to do.
pub fn status_words(status: Status, level: u8, aux: u64) -> String {
    let level_name = match level {
        5 => "PML5 entry",
        4 => "PML4 entry",
        3 => "PDPT entry",
        2 => "page-directory entry",
        1 => "page-table entry",
        _ => "entry",
    };
    match status {
        Status::Ok => "done".into(),
        Status::NotPresent => format!(
            "not mapped at {aux:#x}: its {level_name} (level {level}) is not present. \
             `ids translate {aux:#x}` shows the walk; a long read steps over unmapped pages \
             (--holes zero|skip)"
        ),
        Status::RefusedSmram => format!(
            "refused at {aux:#x}: the address (or a page table on the way) is in SMRAM, \
             which the agent never reads for anyone"
        ),
        Status::RefusedNotRam => format!(
            "refused at {aux:#x}: the address (or a page table on the way) is not RAM \
             (device memory, a hole, or beyond RAM); `ids info` lists the RAM ranges"
        ),
        Status::TooLarge => "too large for one reply: ask for less (`ids info` says the most one read returns)".into(),
        Status::BadRequest => {
            "the agent found the request malformed (a CPU index the VM does not have, or reserved bits set): check the CPU index with `ids info`".into()
        }
        Status::Unsupported => {
            "that CPU is not in 64-bit paging mode (it is starting up or halted in real mode): use another CPU (--cpu N) or an explicit --cr3".into()
        }
        Status::NonCanonical => format!(
            "{aux:#x} is not a canonical address for the CPU's paging mode (4-level: below \
             0x0000800000000000 or from 0xffff800000000000; 5-level: below 0x0100000000000000 or \
             from 0xff00000000000000)"
        ),
        Status::WorkLimit => {
            "the request spent the agent's work budget for one SMI before this op was done: ask for the rest in another request".into()
        }
        Status::CpuNotInSmm => {
            "the CPU did not reach SMM for this request (it was slow to take the SMI): retry".into()
        }
    }
}

fn cpu_list(count: u32) -> String {
    match count {
        0 => "none".into(),
        1 => "CPU 0".into(),
        n => format!("0-{}", n - 1),
    }
}

/// An owned INFO record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentInfo {
    /// Fixed part.
    pub header: InfoHeader,
    /// RAM ranges the agent reads.
    pub ram: Vec<RamRange>,
    /// Per-CPU paging facts.
    pub cpus: Vec<InfoCpu>,
    /// False for the plain INFO of an unprovisioned agent.
    pub authenticated: bool,
}

impl AgentInfo {
    fn parse(data: &[u8], authenticated: bool) -> Result<Self, SessionError> {
        let info =
            Info::parse(data).map_err(|e| SessionError::Malformed(format!("INFO record: {e}")))?;
        Ok(Self {
            header: info.header,
            ram: info.ram_ranges().collect(),
            cpus: info.cpus().collect(),
            authenticated,
        })
    }
}

/// One agent session.
pub struct Session {
    injector: Transport,
    client: Client,
    salt: [u8; SESSION_SALT_LEN],
    deadline: Duration,
    max_read: Option<usize>,
    last: Option<Transaction>,
    info: Option<AgentInfo>,
    stats: crate::memory::BatchStats,
    requests: u64,
}

/// Reads a 32-byte key file.
pub fn read_key(path: &Path) -> Result<[u8; SHARED_KEY_LEN], SessionError> {
    let err = |problem: String| SessionError::Key {
        path: path.display().to_string(),
        problem,
    };
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read it: {e}")))?;
    bytes
        .as_slice()
        .try_into()
        .map_err(|_| err(format!("found {} bytes", bytes.len())))
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

/// The agent answered `SnapshotMissed` (through either transport).
fn snapshot_missed(e: &SessionError) -> bool {
    let raw = ServeStatus::SnapshotMissed as u32;
    match e {
        SessionError::Transact(TransactError::Rejected { raw: r, .. }) => *r == raw,
        SessionError::Daemon(host_injector::daemon::client::ClientError::Daemon(
            host_injector::daemon::protocol::DaemonError::Rejected { status, .. },
        )) => *status == raw,
        _ => false,
    }
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut n = [0u8; N];
    getrandom::fill(&mut n).expect("the OS random source must work");
    n
}

fn fresh_nonce() -> [u8; IDS_NONCE_LEN] {
    random_bytes()
}

pub(crate) fn describe(op: &Op) -> String {
    let through = |space: &AddressSpace| match space.cr3 {
        Some(cr3) => format!("page tables at CR3 {cr3:#x}"),
        None => format!("CPU {}'s page tables", space.cpu),
    };
    match *op {
        Op::ReadVirt { space, addr, len } => {
            format!(
                "reading virtual {addr:#x}+{len:#x} through {}",
                through(&space)
            )
        }
        Op::ReadPhys { addr, len } => format!("reading physical {addr:#x}+{len:#x}"),
        Op::Translate { space, addr } => {
            format!("translating {addr:#x} through {}", through(&space))
        }
        Op::CpuState { cpu } => format!("CPU {cpu}'s state"),
        Op::Info => "the agent's INFO".into(),
        Op::WalkList { head, space, .. } => {
            format!("walking the list at {head:#x} through {}", through(&space))
        }
        Op::Field(f) => format!("a field at +{:#x}", f.offset),
    }
}

impl Session {
    /// Default deadline of one request.
    pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);

    /// Connects directly to a VM: opens the mailbox file and QMP, reads the
    /// key, derives the session keys from the published salt.
    pub fn connect(endpoint: &Endpoint, deadline: Duration) -> Result<Self, SessionError> {
        let key = read_key(endpoint.key()?)?;
        let transport = match endpoint {
            Endpoint::Direct(d) => {
                let mailbox = MailboxFile::open(&d.mailbox)?;
                let smi = QmpSmi::connect(&d.qmp, Duration::from_secs(10))?;
                Transport::Direct(Injector::new(mailbox, Box::new(smi)))
            }
            Endpoint::Daemon(d) => Transport::Daemon(DaemonTransport::connect(&d.addr, &d.vm)?),
        };
        Self::with_transport(transport, &key, deadline)
    }

    /// A session over an existing injector (other SMI backends, simulations).
    pub fn with_injector(
        injector: Injector,
        key: &[u8; SHARED_KEY_LEN],
        deadline: Duration,
    ) -> Result<Self, SessionError> {
        Self::with_transport(Transport::Direct(injector), key, deadline)
    }

    /// A session over any transport (direct or through the daemon).
    pub fn with_transport(
        mut injector: Transport,
        key: &[u8; SHARED_KEY_LEN],
        deadline: Duration,
    ) -> Result<Self, SessionError> {
        let header = injector.header()?;
        let salt = header.salt;
        Ok(Self {
            injector,
            // A random client id: this session's keys are its own, so any
            // number of IDS clients can share the agent (through the daemon)
            // without ever sharing a (key, nonce) pair.
            client: Client::new(
                SessionKeys::derive_for(key, &salt, u64::from_le_bytes(random_bytes())),
                now_nanos(),
            ),
            salt,
            deadline,
            max_read: None,
            last: None,
            info: None,
            stats: Default::default(),
            requests: 0,
        })
    }

    /// This session's client id (its keys are derived for it).
    pub fn client_id(&self) -> u64 {
        self.client.id()
    }

    /// The injector (header, raw SMIs) of a direct session; `None` through
    /// the daemon.
    pub fn injector(&mut self) -> Option<&mut Injector> {
        self.injector.injector()
    }

    /// The transport (direct or daemon).
    pub fn transport(&mut self) -> &mut Transport {
        &mut self.injector
    }

    /// The last round trip (timings, SMM cycles as the firmware reports them).
    pub fn last_transaction(&self) -> Option<&Transaction> {
        self.last.as_ref()
    }

    /// Seals `ops` into a request frame (it becomes the pending request).
    pub fn seal(&mut self, ops: &[Op]) -> Result<Vec<u8>, SessionError> {
        Ok(self.client.seal_request_vec(ops, fresh_nonce())?)
    }

    /// Carries a sealed frame to the agent and returns the raw reply.
    pub fn carry(&mut self, frame: &[u8]) -> Result<Transaction, SessionError> {
        // Directly, the header is a local file read: check it first. Through
        // the daemon it is a round trip of its own, so it is asked only when
        // a request fails, to say why (a new salt: the VM rebooted).
        let direct = matches!(self.injector, Transport::Direct(_));
        if direct {
            self.check_header()?;
        }
        let t = match self.injector.transact(frame, self.deadline) {
            Ok(t) => t,
            Err(e) if !direct => {
                self.check_header()?;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        self.requests += 1;
        if t.status == ServeStatus::Unprovisioned {
            return Err(SessionError::Unprovisioned);
        }
        self.last = Some(t.clone());
        Ok(t)
    }

    /// Fails with the reason a request cannot work: the agent's session salt
    /// changed (reboot), or it has no key.
    fn check_header(&mut self) -> Result<(), SessionError> {
        let header = self.injector.header()?;
        if header.salt != self.salt {
            return Err(SessionError::SaltChanged);
        }
        if header.state() == Some(AgentState::Unprovisioned) {
            return Err(SessionError::Unprovisioned);
        }
        Ok(())
    }

    /// Opens a reply to the pending request.
    pub fn open(&mut self, reply: &[u8]) -> Result<Vec<OwnedResult>, SessionError> {
        Ok(self.client.open_reply_vec(reply)?)
    }

    /// One sealed request: results in op order (statuses not checked).
    /// Served in a snapshot: every vCPU is held in SMM while the agent
    /// serves it (broadcast SMI).
    pub fn request(&mut self, ops: &[Op]) -> Result<Vec<OwnedResult>, SessionError> {
        self.request_with(ops, None)
    }

    /// Like [`Session::request`], for ops that need only vCPU `cpu` (its
    /// CPU state, reads through its page tables): through the daemon, an SMI
    /// on that vCPU alone serves it at once, without stopping the others
    /// (the request says so inside the seal: `FLAG_NO_SNAPSHOT`). Directly
    /// (monitor SMIs reach every vCPU) it is a snapshot request.
    /// If the SMI did not reach that vCPU alone (the daemon fell back to a
    /// broadcast monitor SMI, and another vCPU served without waiting), the
    /// ops answer "CPU not in SMM": the request is then sent again as a
    /// snapshot request.
    pub fn request_on_cpu(
        &mut self,
        cpu: u32,
        ops: &[Op],
    ) -> Result<Vec<OwnedResult>, SessionError> {
        let results = self.request_with(ops, Some(cpu))?;
        if results.iter().any(|r| r.status == Status::CpuNotInSmm) {
            return self.request_with(ops, None);
        }
        Ok(results)
    }

    fn request_with(
        &mut self,
        ops: &[Op],
        targeted: Option<u32>,
    ) -> Result<Vec<OwnedResult>, SessionError> {
        match self.request_once(ops, targeted) {
            // The firmware skipped the rendezvous for a request the guest
            // made look targeted: nothing was read; send it once more.
            Err(e) if snapshot_missed(&e) => self.request_once(ops, targeted),
            // A snapshot request served while a vCPU was not in SMM (it
            // missed the rendezvous gather, a moment's state on a loaded
            // host) answers "CPU not in SMM" for the ops that need that
            // vCPU: asked once more before the caller sees it.
            Ok(r) if targeted.is_none() && r.iter().any(|x| x.status == Status::CpuNotInSmm) => {
                self.request_once(ops, targeted)
            }
            other => other,
        }
    }

    fn request_once(
        &mut self,
        ops: &[Op],
        targeted: Option<u32>,
    ) -> Result<Vec<OwnedResult>, SessionError> {
        let target = match (targeted, &mut self.injector) {
            (Some(cpu), Transport::Daemon(d)) => {
                d.target(Target::Cpu(cpu));
                Some(cpu)
            }
            _ => None,
        };
        let flags = if target.is_some() {
            FLAG_NO_SNAPSHOT
        } else {
            0
        };
        let mut frame = vec![0u8; Client::request_frame_len(ops.len())];
        let sealed = self
            .client
            .seal_request_with(ops, fresh_nonce(), flags, &mut frame)
            .map(|n| frame.truncate(n));
        let carried = sealed
            .map_err(SessionError::from)
            .and_then(|()| self.carry(&frame));
        if let (Some(_), Transport::Daemon(d)) = (target, &mut self.injector) {
            d.target(Target::All);
        }
        let t = carried?;
        let results = self.open(&t.reply)?;
        if results.len() != ops.len() {
            return Err(SessionError::Malformed(format!(
                "expected {} results, found {}",
                ops.len(),
                results.len()
            )));
        }
        for (op, r) in ops.iter().zip(&results) {
            if r.kind != op.kind() as u8 {
                return Err(SessionError::Malformed(format!(
                    "result kind {} answers op kind {}",
                    r.kind,
                    op.kind() as u8
                )));
            }
        }
        Ok(results)
    }

    /// One op whose status must be Ok.
    pub fn request_ok(&mut self, op: Op) -> Result<OwnedResult, SessionError> {
        let r = self.request(&[op])?.remove(0);
        if r.status != Status::Ok {
            return Err(SessionError::Op {
                op: describe(&op),
                status: r.status,
                level: r.level,
                aux: r.aux,
            });
        }
        Ok(r)
    }

    /// The agent's INFO, sealed; for an unprovisioned agent the plain INFO,
    /// marked unauthenticated.
    pub fn info(&mut self) -> Result<AgentInfo, SessionError> {
        let header = self.injector.header()?;
        if header.state() == Some(AgentState::Unprovisioned) {
            let mut frame = vec![0u8; Client::request_frame_len(1)];
            let n = client::encode_plain_info_request(&mut frame)
                .map_err(|e| SessionError::Malformed(e.to_string()))?;
            let t = self.injector.transact(&frame[..n], self.deadline)?;
            let body = client::parse_plain_reply(&t.reply)?;
            let r = body
                .results()
                .next()
                .ok_or_else(|| SessionError::Malformed("plain INFO without a result".into()))?;
            return AgentInfo::parse(r.data, false);
        }
        let r = self.request_ok(Op::Info)?;
        let info = AgentInfo::parse(&r.data, true)?;
        self.max_read = Some(info.header.max_read as usize);
        self.info = Some(info.clone());
        Ok(info)
    }

    /// The agent's per-boot session salt this session's keys derive from
    /// (a new one after every guest boot).
    pub fn salt(&self) -> [u8; SESSION_SALT_LEN] {
        self.salt
    }

    /// The INFO of this session's last `info()`, if any.
    pub fn info_cache(&self) -> Option<&AgentInfo> {
        self.info.as_ref()
    }

    /// Counters of the memory layer (batches, requests = SMIs, bytes).
    pub fn memory_stats(&self) -> crate::memory::BatchStats {
        let mut s = self.stats;
        s.requests = self.client_requests();
        s
    }

    pub(crate) fn stats_mut(&mut self) -> &mut crate::memory::BatchStats {
        &mut self.stats
    }

    /// Sealed requests carried so far (each one SMI).
    pub fn client_requests(&self) -> u64 {
        self.requests
    }

    /// Largest data length of one READ (from INFO, asked once).
    pub fn max_read(&mut self) -> Result<usize, SessionError> {
        if let Some(m) = self.max_read {
            return Ok(m);
        }
        let m = self.info()?.header.max_read as usize;
        if m == 0 {
            return Err(SessionError::Malformed("INFO says max_read is 0".into()));
        }
        self.max_read = Some(m);
        Ok(m)
    }

    /// CPU_STATE of `cpu`. The session's first CPU_STATE also carries
    /// INFO (one SMI where two would be asked in turn: every Linux command
    /// starts with both), served as a snapshot; later ones target `cpu`.
    pub fn cpu_state(&mut self, cpu: u32) -> Result<CpuState, SessionError> {
        let op = Op::CpuState { cpu };
        let r = if self.info.is_none()
            && self.injector.header()?.state() != Some(AgentState::Unprovisioned)
        {
            let mut rs = self.request(&[Op::Info, op])?;
            let (info, r) = (rs.remove(0), rs.remove(0));
            if info.status == Status::Ok {
                let info = AgentInfo::parse(&info.data, true)?;
                self.max_read = Some(info.header.max_read as usize);
                self.info = Some(info);
            }
            r
        } else {
            self.request_on_cpu(cpu, &[op])?.remove(0)
        };
        if r.status != Status::Ok {
            return Err(SessionError::Op {
                op: describe(&op),
                status: r.status,
                level: r.level,
                aux: r.aux,
            });
        }
        CpuState::decode(&r.data).map_err(|e| SessionError::Malformed(format!("CPU state: {e}")))
    }

    /// One READ_VIRT op of at most [`Session::max_read`] bytes, whatever its
    /// status (a NotPresent result carries the prefix read and the level).
    pub fn read_virt_once(
        &mut self,
        space: AddressSpace,
        addr: u64,
        len: u32,
    ) -> Result<OwnedResult, SessionError> {
        Ok(self
            .request(&[Op::ReadVirt { space, addr, len }])?
            .remove(0))
    }

    /// Reads `len` bytes of virtual memory, chunked by the max read size;
    /// every chunk must be complete.
    pub fn read_virt(
        &mut self,
        space: AddressSpace,
        addr: u64,
        len: usize,
    ) -> Result<Vec<u8>, SessionError> {
        self.read_chunked(addr, len, |a, n| Op::ReadVirt {
            space,
            addr: a,
            len: n,
        })
    }

    /// Reads `len` bytes of guest-physical memory, chunked.
    pub fn read_phys(&mut self, addr: u64, len: usize) -> Result<Vec<u8>, SessionError> {
        self.read_chunked(addr, len, |a, n| Op::ReadPhys { addr: a, len: n })
    }

    fn read_chunked(
        &mut self,
        addr: u64,
        len: usize,
        op: impl Fn(u64, u32) -> Op,
    ) -> Result<Vec<u8>, SessionError> {
        let max = self.max_read()?;
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let n = (len - out.len()).min(max);
            let a = addr.wrapping_add(out.len() as u64);
            let r = self.request_ok(op(a, n as u32))?;
            if r.data.len() != n {
                return Err(SessionError::Malformed(format!(
                    "{}: expected {n} bytes, found {}",
                    describe(&op(a, n as u32)),
                    r.data.len()
                )));
            }
            out.extend_from_slice(&r.data);
        }
        Ok(out)
    }
}
