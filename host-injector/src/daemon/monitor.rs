//! The daemon's way to a VM's QEMU monitor: its own QMP socket, or libvirt
//! for a domain whose monitor libvirt owns. Both forward QEMU's events
//! (RESET and SHUTDOWN stop monitor SMIs) and run HMP command lines.

use super::libvirt::{DomainMonitor, LibvirtError};
use super::qmp::AsyncQmp;
use crate::qmp::QmpError;

/// A connected monitor.
pub enum Monitor {
    /// A QMP socket reserved for the daemon.
    Qmp(AsyncQmp),
    /// libvirt's monitor, through `virsh`.
    Libvirt(DomainMonitor),
}

/// Errors of either path.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// QMP.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// libvirt.
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
}

impl Monitor {
    /// True once the monitor is gone (QEMU closed QMP; the domain stopped or
    /// libvirt's event stream ended).
    pub fn is_closed(&mut self) -> bool {
        match self {
            Monitor::Qmp(q) => q.is_closed(),
            Monitor::Libvirt(l) => l.is_closed(),
        }
    }

    /// A QMP command (through libvirt for a libvirt-managed domain); its
    /// `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        args: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, QmpError> {
        match self {
            Monitor::Qmp(q) => q.execute(command, args).await,
            Monitor::Libvirt(l) => l.qmp(command, args).await,
        }
    }

    /// A human monitor command line; its text output.
    pub async fn hmp(&mut self, command_line: &str) -> Result<String, MonitorError> {
        Ok(match self {
            Monitor::Qmp(q) => q.hmp(command_line).await?,
            Monitor::Libvirt(l) => l.hmp(command_line).await?,
        })
    }

    /// What kind of monitor this is (status).
    pub fn label(&self) -> &'static str {
        match self {
            Monitor::Qmp(_) => "qmp-socket",
            Monitor::Libvirt(_) => "libvirt",
        }
    }
}
