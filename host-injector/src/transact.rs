//! One request/reply round trip through the mailbox.
//!
//! [`Injector::transact`] writes the sealed request and the doorbell, raises
//! the SMI, and polls the done word until the deadline. SMIs can be merged
//! (one raised while the vCPUs are still in SMM) or, under TCG, delivered
//! late, so the SMI is raised again every [`Injector::reraise`] (20 ms by
//! default) until the agent answers; the agent ignores a doorbell it already
//! served, so a repeated SMI is harmless. The deadline is absolute: a
//! missed one is [`TransactError::Silent`], an alert, never an endless retry.

use std::time::{Duration, Instant};

use smmvmi_mailbox::client::Poll;
use smmvmi_mailbox::layout::ServeStatus;
use smmvmi_mailbox::shared::SharedMemory;
use smmvmi_mailbox::wire::FrameHeader;

use crate::mailbox_file::{Header, MailboxFile, MailboxFileError};
use crate::smi::{SmiBackend, SmiError};

/// Errors of one transaction.
#[derive(Debug, thiserror::Error)]
pub enum TransactError {
    /// Reading or writing the mailbox file failed.
    #[error(transparent)]
    Mailbox(#[from] MailboxFileError),
    /// The SMI backend failed.
    #[error(transparent)]
    Smi(#[from] SmiError),
    /// The header does not allow a host-raised SMI.
    #[error("no SMI raised ({backend}): {reason}")]
    NotReady {
        /// Backend name.
        backend: &'static str,
        /// Why, in words, and what to do.
        reason: String,
        /// Header summary (shown with `{:?}`, `--debug`).
        header: String,
    },
    /// The agent did not answer in time.
    #[error(
        "ALERT: the SMM agent did not answer doorbell {doorbell:#x} within {deadline:?} ({smis} SMIs raised); expected the done word to equal the doorbell, found {header}. A silent agent means SMIs are blocked or the agent was disabled: treat it as an alert, not something to retry forever"
    )]
    Silent {
        /// Doorbell posted.
        doorbell: u64,
        /// Deadline given.
        deadline: Duration,
        /// SMIs raised.
        smis: u32,
        /// Header at the deadline.
        header: String,
    },
    /// The agent answered, and refused the request (the status word is
    /// unauthenticated: this explains, it proves nothing).
    #[error("the agent rejected the request ({}, serve status {raw}): {hint}", serve_status_words(*status))]
    Rejected {
        /// Raw status word.
        raw: u32,
        /// Decoded, if known.
        status: Option<ServeStatus>,
        /// What to do.
        hint: &'static str,
    },
    /// The request frame has no valid header.
    #[error(
        "request frame must start with a valid frame header (seal it with smmvmi_mailbox::client), found: {0}"
    )]
    BadFrame(smmvmi_mailbox::wire::WireError),
}

/// What one round trip returned.
#[derive(Clone, Debug)]
pub struct Transaction {
    /// The status word the agent wrote (unauthenticated).
    pub status: ServeStatus,
    /// The reply frame bytes, copied out of the reply area (untrusted until
    /// opened with the IDS client).
    pub reply: Vec<u8>,
    /// TSC cycles the firmware says it spent in SMM for this request
    /// (informational, unauthenticated; 0 if the firmware does not report it).
    pub serve_cycles: u64,
    /// SMIs raised for this request.
    pub smis: u32,
    /// Time from posting to seeing the done word.
    pub elapsed: Duration,
}

/// The host end of one VM's mailbox: the file plus an SMI backend.
pub struct Injector {
    mailbox: MailboxFile,
    smi: Box<dyn SmiBackend + Send>,
    reraise: Duration,
    last_doorbell: u64,
    /// The salt of the last header that allowed an SMI.
    last_salt: Option<[u8; 16]>,
    /// Closed by a guest reset: no SMI until the header's salt differs
    /// from this one (a new boot's agent published Ready).
    reset_gate: Option<[u8; 16]>,
}

impl Injector {
    /// Default period between repeated SMIs while waiting.
    pub const DEFAULT_RERAISE: Duration = Duration::from_millis(20);

    /// An injector over `mailbox` raising SMIs with `smi`.
    pub fn new(mailbox: MailboxFile, smi: Box<dyn SmiBackend + Send>) -> Self {
        Self {
            mailbox,
            smi,
            reraise: Self::DEFAULT_RERAISE,
            last_doorbell: 0,
            last_salt: None,
            reset_gate: None,
        }
    }

    /// Sets the period between repeated SMIs.
    pub fn reraise(mut self, period: Duration) -> Self {
        self.reraise = period.max(Duration::from_millis(1));
        self
    }

    /// The mailbox file.
    pub fn mailbox(&self) -> &MailboxFile {
        &self.mailbox
    }

    /// A fresh header snapshot.
    pub fn header(&self) -> Result<Header, MailboxFileError> {
        self.mailbox.header()
    }

    /// Fails unless the header allows this backend to raise an SMI.
    /// After a guest reset (QMP `RESET`/`SHUTDOWN`, for backends that see
    /// them) it fails until the new boot's agent publishes Ready with a new
    /// salt: the mailbox still says Ready from the old boot while QEMU has
    /// forgotten the SMI broadcast, and a monitor SMI then can crash QEMU
    /// 7.2 (see the daemon's reset gate, which does the same).
    pub fn check_ready(&mut self) -> Result<Header, TransactError> {
        if self.smi.needs_broadcast() && self.smi.reset_seen()? {
            self.reset_gate = Some(self.last_salt.unwrap_or_default());
        }
        let h = self.mailbox.header()?;
        if self.smi.needs_broadcast() && !h.accepts_host_smi() {
            return Err(TransactError::NotReady {
                backend: self.smi.name(),
                reason: h.not_ready_reason().unwrap_or_default(),
                header: h.summary(),
            });
        }
        if let Some(old) = self.reset_gate {
            if h.salt == old {
                return Err(TransactError::NotReady {
                    backend: self.smi.name(),
                    reason: "the guest was reset: waiting for the new boot's agent to publish Ready (a monitor SMI before the firmware negotiates SMI broadcast can crash QEMU)".into(),
                    header: h.summary(),
                });
            }
            self.reset_gate = None;
        }
        self.last_salt = Some(h.salt);
        Ok(h)
    }

    /// Waits up to `timeout` for the agent to allow host SMIs.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Header, TransactError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.check_ready() {
                Ok(h) => return Ok(h),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(TransactError::NotReady { .. }) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Raises one SMI, after checking the header allows it.
    pub fn raise_smi(&mut self) -> Result<(), TransactError> {
        self.check_ready()?;
        self.smi.raise()?;
        Ok(())
    }

    /// One round trip: posts `request_frame`, raises SMIs every `reraise`
    /// until the agent answers or `deadline` (from now) passes, and returns
    /// the reply bytes. The doorbell is the frame's sequence number (fresh
    /// and growing for sealed requests), or a fresh value for plain frames.
    /// A status other than Ok / Unprovisioned is [`TransactError::Rejected`].
    pub fn transact(
        &mut self,
        request_frame: &[u8],
        deadline: Duration,
    ) -> Result<Transaction, TransactError> {
        let header = FrameHeader::parse(request_frame).map_err(TransactError::BadFrame)?;
        let doorbell = if header.seq != 0 && header.seq != self.last_doorbell {
            header.seq
        } else {
            fresh_doorbell(self.last_doorbell.max(self.mailbox.header()?.reply_done))
        };
        self.transact_with_doorbell(request_frame, doorbell, deadline)
    }

    /// [`Injector::transact`] with an explicit doorbell (tests use it to
    /// replay one).
    pub fn transact_with_doorbell(
        &mut self,
        request_frame: &[u8],
        doorbell: u64,
        deadline: Duration,
    ) -> Result<Transaction, TransactError> {
        self.check_ready()?;
        let start = Instant::now();
        let end = start + deadline;
        self.mailbox.post_request(request_frame, doorbell)?;
        self.last_doorbell = doorbell;
        self.smi.raise()?;
        let mut smis = 1u32;
        let mut next_raise = Instant::now() + self.reraise;
        let mut spins = 0u32;
        loop {
            if let Poll::Done { status, reply_len } = self.mailbox.poll_reply(doorbell)? {
                let elapsed = start.elapsed();
                let decoded = ServeStatus::from_raw(status);
                return match decoded {
                    Some(s @ (ServeStatus::Ok | ServeStatus::Unprovisioned)) => Ok(Transaction {
                        status: s,
                        reply: self.mailbox.read_reply(reply_len)?,
                        serve_cycles: self
                            .mailbox
                            .load_u64(smmvmi_mailbox::layout::OFF_SERVE_CYCLES)?,
                        smis,
                        elapsed,
                    }),
                    other => Err(TransactError::Rejected {
                        raw: status,
                        status: other,
                        hint: rejection_hint(other),
                    }),
                };
            }
            let now = Instant::now();
            if now >= end {
                return Err(TransactError::Silent {
                    doorbell,
                    deadline,
                    smis,
                    header: self.mailbox.header()?.summary(),
                });
            }
            if now >= next_raise {
                // Re-check: a VM that stopped being ready must not get a
                // monitor SMI (and the guest can only make us refuse).
                self.raise_smi()?;
                smis += 1;
                next_raise = now + self.reraise;
            }
            // Spin briefly (replies under 1 ms are common), then sleep.
            spins = spins.saturating_add(1);
            if spins < 200 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
}

/// A serve status in a few words (for error messages).
pub fn serve_status_words(status: Option<ServeStatus>) -> &'static str {
    match status {
        Some(ServeStatus::None) => "no status",
        Some(ServeStatus::Ok) => "ok",
        Some(ServeStatus::Unprovisioned) => "unprovisioned",
        Some(ServeStatus::BadFrame) => "bad frame",
        Some(ServeStatus::Replay) => "replay",
        Some(ServeStatus::BadTag) => "failed authentication",
        Some(ServeStatus::BadBody) => "bad body",
        Some(ServeStatus::CounterExhausted) => "counter exhausted",
        Some(ServeStatus::SealedRequired) => "sealed request required",
        Some(ServeStatus::SnapshotMissed) => "snapshot missed",
        _ => "unknown status",
    }
}

/// What a serve status usually means and what to do (for error messages).
pub fn rejection_hint(status: Option<ServeStatus>) -> &'static str {
    match status {
        Some(ServeStatus::BadTag) => {
            "the request failed authentication: the IDS key differs from the agent's (check the key file) or the session salt changed (the VM rebooted: reconnect)"
        }
        Some(ServeStatus::Replay) => {
            "the agent served this request's sequence already, or it is below the agent's floor (the agent forgot this client): reconnect with a fresh client (sequence starts at the current time in ns)"
        }
        Some(ServeStatus::SnapshotMissed) => {
            "the SMI was served without a snapshot the request needed (its flags changed while the agent read them): send the request again"
        }
        Some(ServeStatus::SealedRequired) => {
            "the agent is provisioned and accepts only sealed requests: pass the key"
        }
        Some(ServeStatus::BadFrame | ServeStatus::BadBody) => {
            "the frame is malformed: IDS and agent must use the same mailbox crate version"
        }
        Some(ServeStatus::CounterExhausted) => {
            "the agent's reply counter is exhausted: reboot the VM"
        }
        _ => {
            "unknown status: firmware and host speak different layouts, or the guest wrote the status word"
        }
    }
}

/// A doorbell value that is non-zero and differs from `previous`.
pub fn fresh_doorbell(previous: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    if nanos == previous || nanos == 0 {
        previous.wrapping_add(1).max(1)
    } else {
        nanos
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smmvmi_mailbox::header;
    use smmvmi_mailbox::layout::{self, AgentState};
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use zerocopy::IntoBytes;

    /// A monitor-SMI backend that reports a reset when told to.
    struct Fake {
        reset: Arc<AtomicBool>,
        raised: Arc<AtomicU32>,
    }

    impl SmiBackend for Fake {
        fn raise(&mut self) -> Result<(), SmiError> {
            self.raised.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn name(&self) -> &'static str {
            "fake-monitor"
        }
        fn reset_seen(&mut self) -> Result<bool, SmiError> {
            Ok(self.reset.swap(false, Ordering::SeqCst))
        }
    }

    fn write_header(file: &std::fs::File, state: AgentState, salt: u8) {
        let mut h = header::Header::zeroed();
        h.magic = layout::MAGIC;
        h.version = layout::VERSION.into();
        h.state = (state as u32).into();
        h.features = layout::FEATURE_SMI_BROADCAST.into();
        h.size = (1u32 << 20).into();
        h.session_salt = [salt; layout::SESSION_SALT_LEN];
        file.write_all_at(h.as_bytes(), 0).unwrap();
    }

    /// After a guest reset the mailbox still says Ready (the old boot's
    /// salt): no monitor SMI until the new boot's agent says Ready with a
    /// new salt.
    #[test]
    fn a_reset_closes_monitor_smis_until_the_new_boot_is_ready() {
        let p = std::env::temp_dir().join(format!("hi-gate-{}", std::process::id()));
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        write_header(&f, AgentState::Ready, 1);
        let reset = Arc::new(AtomicBool::new(false));
        let raised = Arc::new(AtomicU32::new(0));
        let mut inj = Injector::new(
            MailboxFile::open(&p).unwrap(),
            Box::new(Fake {
                reset: reset.clone(),
                raised: raised.clone(),
            }),
        );
        inj.raise_smi().unwrap();
        reset.store(true, Ordering::SeqCst);
        let e = inj.raise_smi().unwrap_err().to_string();
        assert!(e.contains("the guest was reset"), "{e}");
        write_header(&f, AgentState::Booting, 2);
        assert!(inj.raise_smi().is_err(), "booting");
        write_header(&f, AgentState::Ready, 2);
        inj.raise_smi().unwrap();
        assert_eq!(raised.load(Ordering::SeqCst), 2, "only while open");
        std::fs::remove_file(p).unwrap();
    }
}
