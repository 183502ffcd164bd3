//! SMI backends: how the injector makes the target VM enter SMM.
//!
//! [`QmpSmi`] (`qmp-broadcast`): HMP `o /b 0xb2 CMD` through QMP, an APM
//! control-port write from the monitor, which the q35 chipset turns into a
//! broadcast SMI. The other backends of the design (`doorbell`,
//! `qmp-targeted`, `kvm`) live in [`crate::backend`] and implement the same
//! trait.

use std::path::Path;
use std::time::Duration;

pub use crate::backend::Target;
use crate::qmp::{Qmp, QmpError};

use smmvmi_mailbox::platform::{APM_CMD_SERVE, APM_CNT_PORT};

/// The APM command byte the firmware's SMI handler treats as "serve the
/// mailbox" ([`APM_CMD_SERVE`]).
pub const APM_COMMAND: u8 = APM_CMD_SERVE;

/// Errors of SMI backends.
#[derive(Debug, thiserror::Error)]
pub enum SmiError {
    /// QMP failed.
    #[error("raising an SMI over QMP: {0}")]
    Qmp(#[from] QmpError),
    /// The monitor printed something for a port write (it prints nothing
    /// when the write succeeds).
    #[error(
        "raising an SMI: the monitor answered {0:?} to the port write, expected no output: check the QEMU version and machine type (q35 with smm=on)"
    )]
    Monitor(String),
    /// A backend-specific failure.
    #[error("raising an SMI: {0}")]
    Other(String),
    /// The backend cannot aim at one vCPU.
    #[error(
        "raising an SMI on vCPU {cpu} with {backend}: this backend raises only broadcast SMIs; ask for target `all`, or use the `doorbell` backend (per-vCPU MSI-X vectors) or `qmp-targeted` (patched QEMU)"
    )]
    Untargeted {
        /// Backend name.
        backend: &'static str,
        /// The vCPU asked for.
        cpu: u32,
    },
    /// Doorbell vector missing or the eventfd write failed.
    #[error(transparent)]
    Doorbell(#[from] crate::backend::DoorbellError),
    /// The QEMU command for targeted SMIs is missing.
    #[error(
        "the qmp-targeted backend needs the QMP command `inject-smi`, which stock QEMU lacks: build QEMU with patches-qemu/ (`host-injector doctor` says whether this QEMU has it), or use the `doorbell` backend"
    )]
    NeedsPatchedQemu,
    /// KVM cannot raise SMIs on this host.
    #[error(transparent)]
    Kvm(#[from] crate::backend::KvmSmiError),
}

/// Something that can make the VM enter SMM. The caller (the injector)
/// decides *when* it is safe; a backend only raises.
pub trait SmiBackend {
    /// Raises one SMI (broadcast or targeted, as the backend can).
    fn raise(&mut self) -> Result<(), SmiError>;
    /// Short name for logs and errors.
    fn name(&self) -> &'static str;
    /// True if raising an SMI before the agent published a ready state with
    /// SMI broadcast could crash the VM (QEMU 7.2's monitor port write does).
    fn needs_broadcast(&self) -> bool {
        true
    }
    /// True if the guest was reset or shut down since the last call (QMP
    /// `RESET`/`SHUTDOWN`): QEMU then forgets the SMI broadcast the firmware
    /// negotiated while the mailbox still says Ready, and a monitor SMI in
    /// that window can crash QEMU 7.2. Backends that cannot tell say false.
    fn reset_seen(&mut self) -> Result<bool, SmiError> {
        Ok(false)
    }
    /// Raises one SMI aimed at `target`. Backends that can only broadcast
    /// raise a broadcast for [`Target::All`] and refuse one vCPU.
    fn raise_to(&mut self, target: Target) -> Result<(), SmiError> {
        match target {
            Target::All => self.raise(),
            Target::Cpu(cpu) => Err(SmiError::Untargeted {
                backend: self.name(),
                cpu,
            }),
        }
    }
}

/// Stock QEMU: `human-monitor-command` `o /b 0xb2 CMD` over QMP.
pub struct QmpSmi {
    qmp: Qmp,
    command_line: String,
}

impl QmpSmi {
    /// Connects to the VM's QMP socket.
    pub fn connect(qmp_socket: &Path, timeout: Duration) -> Result<Self, SmiError> {
        Ok(Self::with(Qmp::connect(qmp_socket, timeout)?))
    }

    /// Wraps an existing QMP session.
    pub fn with(qmp: Qmp) -> Self {
        Self {
            qmp,
            command_line: format!("o /b {APM_CNT_PORT:#x} {APM_COMMAND:#x}"),
        }
    }
}

impl SmiBackend for QmpSmi {
    fn raise(&mut self) -> Result<(), SmiError> {
        let out = self.qmp.hmp(&self.command_line)?;
        if out.trim().is_empty() {
            Ok(())
        } else {
            Err(SmiError::Monitor(out))
        }
    }

    fn name(&self) -> &'static str {
        "qmp-broadcast"
    }

    fn reset_seen(&mut self) -> Result<bool, SmiError> {
        Ok(self
            .qmp
            .take_events()?
            .iter()
            .any(|e| e == "RESET" || e == "SHUTDOWN"))
    }
}
