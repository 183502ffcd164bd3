//! How a session's sealed frames reach the agent: directly (the mailbox file
//! and QMP of a local VM, for a host admin) or through the host-injector
//! daemon (`unix:PATH#VM`, `vsock:CID:PORT#VM`). Either way the transport
//! moves sealed bytes and reports the untrusted header fields the session
//! needs (salt, state); the key stays in the session.

use std::time::Duration;

use host_injector::daemon::client::{ClientError, DaemonAddr, DaemonClient};
use host_injector::daemon::protocol::{SmiPath, unhex};
use host_injector::{Injector, Target, Transaction};
use smmvmi_mailbox::layout::{AgentState, SESSION_SALT_LEN, ServeStatus};

use crate::session::SessionError;

/// The header fields a session uses (untrusted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentHeader {
    /// Session salt.
    pub salt: [u8; SESSION_SALT_LEN],
    /// Raw agent state word.
    pub state_raw: u32,
}

impl AgentHeader {
    /// The agent state, if known.
    pub fn state(&self) -> Option<AgentState> {
        AgentState::from_raw(self.state_raw)
    }
}

/// Through the daemon.
pub struct DaemonTransport {
    client: DaemonClient,
    addr: DaemonAddr,
    vm: String,
    target: Target,
    smi: SmiPath,
}

impl DaemonTransport {
    /// Connects to the daemon at `addr` for VM `vm`.
    pub fn connect(addr: &DaemonAddr, vm: &str) -> Result<Self, ClientError> {
        Ok(Self {
            client: DaemonClient::connect(addr, Duration::from_secs(10))?,
            addr: addr.clone(),
            vm: vm.to_string(),
            target: Target::All,
            smi: SmiPath::Auto,
        })
    }

    /// Sets the SMI target of later requests.
    pub fn target(&mut self, target: Target) {
        self.target = target;
    }

    /// Sets the SMI path the daemon may use for later requests (default:
    /// the doorbell with monitor SMIs as fallback).
    pub fn smi_path(&mut self, smi: SmiPath) {
        self.smi = smi;
    }

    /// The daemon's address.
    pub fn addr(&self) -> &DaemonAddr {
        &self.addr
    }
}

/// Any other carrier of sealed frames to an agent (a remote proxy, an
/// agent run elsewhere, a simulation): it moves opaque bytes and reports the
/// untrusted header; the session keeps the key and checks every reply.
pub trait FrameCarrier: Send {
    /// A fresh (untrusted) header snapshot: the agent's salt and state.
    fn header(&mut self) -> Result<AgentHeader, SessionError>;
    /// Carries one sealed request frame and returns the raw reply.
    fn transact(&mut self, frame: &[u8], deadline: Duration) -> Result<Transaction, SessionError>;
}

/// A session's transport.
pub enum Transport {
    /// The host-injector library on a local mailbox file.
    Direct(Injector),
    /// The host-injector daemon.
    Daemon(DaemonTransport),
    /// Another [`FrameCarrier`].
    Carrier(Box<dyn FrameCarrier>),
}

impl Transport {
    /// A fresh (untrusted) header snapshot.
    pub fn header(&mut self) -> Result<AgentHeader, SessionError> {
        match self {
            Transport::Direct(i) => {
                let h = i.header()?;
                Ok(AgentHeader {
                    salt: h.salt,
                    state_raw: h.state_raw,
                })
            }
            Transport::Daemon(d) => {
                let h = d.client.header(&d.vm)?;
                let salt = unhex(&h.salt)
                    .and_then(|v| <[u8; SESSION_SALT_LEN]>::try_from(v).ok())
                    .ok_or_else(|| {
                        SessionError::Malformed(format!(
                            "the daemon sent salt {:?}, expected {SESSION_SALT_LEN} bytes of hex",
                            h.salt
                        ))
                    })?;
                Ok(AgentHeader {
                    salt,
                    state_raw: h.state,
                })
            }
            Transport::Carrier(c) => c.header(),
        }
    }

    /// Carries one frame and returns the raw reply.
    pub fn transact(
        &mut self,
        frame: &[u8],
        deadline: Duration,
    ) -> Result<Transaction, SessionError> {
        match self {
            Transport::Direct(i) => Ok(i.transact(frame, deadline)?),
            Transport::Daemon(d) => {
                let (info, reply) = d
                    .client
                    .transact_via(&d.vm, d.target, d.smi, deadline, frame)?;
                Ok(Transaction {
                    status: ServeStatus::from_raw(info.status).unwrap_or(ServeStatus::None),
                    reply,
                    serve_cycles: info.serve_cycles,
                    smis: info.smis_doorbell + info.smis_qmp,
                    elapsed: Duration::from_micros(info.elapsed_us),
                })
            }
            Transport::Carrier(c) => c.transact(frame, deadline),
        }
    }

    /// The direct injector, if this is the direct transport.
    pub fn injector(&mut self) -> Option<&mut Injector> {
        match self {
            Transport::Direct(i) => Some(i),
            Transport::Daemon(_) | Transport::Carrier(_) => None,
        }
    }
}
