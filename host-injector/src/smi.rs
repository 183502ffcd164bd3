//! SMI backends: how the injector makes the target VM enter SMM.
//!
//! Only the stock-QEMU backend exists today ([`QmpSmi`]: HMP `o /b 0xb2 CMD`
//! through QMP, an APM control-port write from the monitor, which the q35
//! chipset turns into a broadcast SMI). The patched-QEMU and `kvm-ioctls`
//! backends of the design implement the same trait.

use std::path::Path;
use std::time::Duration;

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
        "qmp-apm"
    }
}
