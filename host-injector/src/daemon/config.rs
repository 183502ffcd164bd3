//! The daemon's configuration: a TOML file, overridden by command-line flags.
//!
//! ```toml
//! socket = "/run/smmvmi/injector.sock"   # unix socket for IDS clients
//! vsock_port = 7070                       # AF_VSOCK host port (optional)
//! vhost_vsock_uds = "/run/smmvmi/vm1.vsock"  # vhost-device-vsock: listens on <uds>_<port>
//! queue_depth = 64                        # waiting requests per VM
//! doorbell_grace_ms = 10                  # unanswered doorbell SMI -> QMP fallback
//!
//! [[vm]]
//! name = "vm1"
//! ivshmem_socket = "/run/smmvmi/vm1.ivshmem"  # QEMU: -chardev socket,path=...
//! qmp = "/run/smmvmi/vm1.qmp"                 # a QMP socket for the daemon alone
//! vectors = 3                                  # ivshmem-doorbell vectors=N (1 + vCPUs)
//! mailbox_size = 1048576
//! # mailbox_file = "/var/lib/smmvmi/vm1.mailbox"  # file-backed instead of a memfd
//!
//! [[vm]]                                  # a libvirt domain: named, not described
//! name = "mon1"
//! libvirt = { domain = "mon1" }           # uri = "qemu:///system" by default
//! # ivshmem_socket and vectors come from the domain's <shmem model='ivshmem-doorbell'>
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default mailbox size (1 MiB).
pub const DEFAULT_MAILBOX_SIZE: usize = 1 << 20;

/// One VM the daemon serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Name clients use (`unix:PATH#NAME`).
    pub name: String,
    /// Where the daemon listens for this VM's QEMU (ivshmem server socket).
    /// May be left out for a libvirt domain: the domain's
    /// `<shmem><server path=.../>` says it.
    #[serde(default)]
    pub ivshmem_socket: PathBuf,
    /// A QMP socket of this VM's QEMU reserved for the daemon (QEMU serves
    /// one client per QMP socket: give QEMU a second `-qmp` for people).
    pub qmp: Option<PathBuf>,
    /// MSI-X vectors of the `ivshmem-doorbell` device (1 broadcast + 1 per
    /// vCPU); must equal QEMU's `vectors=`.
    #[serde(default = "default_vectors")]
    pub vectors: u16,
    /// Mailbox size in bytes.
    #[serde(default = "default_mailbox_size")]
    pub mailbox_size: usize,
    /// A file backing the mailbox instead of a memfd: a host admin (or a
    /// test harness) can read it directly, and after a daemon restart the
    /// running VM is served again over QMP from the same file.
    #[serde(default)]
    pub mailbox_file: Option<PathBuf>,
    /// The VM is a libvirt domain: libvirt owns its QMP monitor, so the
    /// daemon never opens it and goes through libvirt instead
    /// (`virsh qemu-monitor-command` / `qemu-monitor-event`), and follows
    /// the domain's lifecycle events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt: Option<LibvirtDomain>,
}

/// A libvirt domain served by the daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LibvirtDomain {
    /// The domain's name (as `virsh list --all` shows it).
    pub domain: String,
    /// libvirt connection URI; `qemu:///system` when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
}

/// The libvirt URI used when a [`LibvirtDomain`] names none.
pub const DEFAULT_LIBVIRT_URI: &str = "qemu:///system";

impl LibvirtDomain {
    /// The connection URI.
    pub fn uri(&self) -> &str {
        self.uri.as_deref().unwrap_or(DEFAULT_LIBVIRT_URI)
    }
}

fn default_vectors() -> u16 {
    3
}

fn default_mailbox_size() -> usize {
    DEFAULT_MAILBOX_SIZE
}

/// The whole configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Unix socket for IDS clients and `host-injector status`.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// AF_VSOCK port on the host (CID any) for IDS clients in VMs.
    #[serde(default)]
    pub vsock_port: Option<u32>,
    /// vhost-device-vsock's unix socket; guest-initiated connections to port
    /// P arrive on `<uds>_<P>`: the daemon listens there for `vsock_port`
    /// (or [`DEFAULT_VSOCK_PORT`]).
    #[serde(default)]
    pub vhost_vsock_uds: Vec<PathBuf>,
    /// Waiting requests per VM before "busy".
    #[serde(default = "default_queue")]
    pub queue_depth: usize,
    /// How long a doorbell SMI may go unanswered before the QMP fallback.
    #[serde(default = "default_grace")]
    pub doorbell_grace_ms: u64,
    /// Period of repeated monitor SMIs while waiting.
    #[serde(default = "default_reraise")]
    pub reraise_ms: u64,
    /// Upper bound of a client's deadline.
    #[serde(default = "default_max_deadline")]
    pub max_deadline_ms: u64,
    /// SIGTERM: how long in-flight requests may take to finish.
    #[serde(default = "default_drain")]
    pub drain_ms: u64,
    /// VMs.
    #[serde(default)]
    pub vm: Vec<VmConfig>,
}

/// Default vsock port.
pub const DEFAULT_VSOCK_PORT: u32 = 7070;

fn default_socket() -> PathBuf {
    PathBuf::from("/run/smmvmi/injector.sock")
}
fn default_queue() -> usize {
    64
}
fn default_grace() -> u64 {
    10
}
fn default_reraise() -> u64 {
    20
}
fn default_max_deadline() -> u64 {
    60_000
}
fn default_drain() -> u64 {
    10_000
}

impl Default for Config {
    fn default() -> Self {
        toml::from_str("").expect("defaults parse")
    }
}

/// Errors of the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("config {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML of this schema.
    #[error("config {path}: {source} (see host-injector/daemon.example.toml)")]
    Parse {
        /// File.
        path: String,
        /// Parser error.
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("config: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let c: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })?;
        c.validate()?;
        Ok(c)
    }

    /// Checks ranges and unique names.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.queue_depth == 0 {
            return Err(ConfigError::Invalid(
                "queue_depth must be at least 1".into(),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for vm in &self.vm {
            vm.validate().map_err(ConfigError::Invalid)?;
            if !names.insert(&vm.name) {
                return Err(ConfigError::Invalid(format!(
                    "VM name {:?} appears twice; names must be unique",
                    vm.name
                )));
            }
        }
        Ok(())
    }

    /// Durations.
    pub fn doorbell_grace(&self) -> Duration {
        Duration::from_millis(self.doorbell_grace_ms)
    }
    /// Durations.
    pub fn reraise(&self) -> Duration {
        Duration::from_millis(self.reraise_ms.max(1))
    }
}

impl VmConfig {
    /// Checks one VM entry; the message says what to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(format!(
                "VM name {:?}: expected 1-64 characters of [A-Za-z0-9._-]",
                self.name
            ));
        }
        if self.vectors == 0 || self.vectors > crate::ivshmem::MAX_VECTORS {
            return Err(format!(
                "VM {}: vectors must be 1..={} (1 broadcast + 1 per vCPU), found {}",
                self.name,
                crate::ivshmem::MAX_VECTORS,
                self.vectors
            ));
        }
        if let Some(l) = &self.libvirt {
            if l.domain.is_empty() || l.domain.chars().any(|c| c.is_control()) {
                return Err(format!(
                    "VM {}: libvirt domain name {:?}: expected the name `virsh list --all` shows",
                    self.name, l.domain
                ));
            }
            if self.qmp.is_some() {
                return Err(format!(
                    "VM {}: libvirt owns domain {}'s QMP monitor; drop `qmp` from this VM's entry (the daemon reaches the monitor through libvirt: virsh qemu-monitor-command and qemu-monitor-event)",
                    self.name, l.domain
                ));
            }
        }
        if self.ivshmem_socket.as_os_str().is_empty() && self.libvirt.is_none() {
            return Err(format!(
                "VM {}: ivshmem_socket is missing: give the path QEMU connects to (-chardev socket,path=...), or name a libvirt domain (libvirt = {{ domain = \"NAME\" }}) whose <shmem model='ivshmem-doorbell'> says it",
                self.name
            ));
        }
        smmvmi_mailbox::layout::Areas::from_size(self.mailbox_size)
            .map_err(|e| format!("VM {}: {e}", self.name))?;
        if self.ivshmem_socket.as_os_str().len() > 107 {
            return Err(format!(
                "VM {}: ivshmem_socket path longer than 107 bytes (unix socket limit)",
                self.name
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let text = r#"
            socket = "/tmp/x.sock"
            vsock_port = 7070
            [[vm]]
            name = "vm1"
            ivshmem_socket = "/tmp/vm1.ivshmem"
            qmp = "/tmp/vm1.qmp"
        "#;
        let c: Config = toml::from_str(text).unwrap();
        c.validate().unwrap();
        assert_eq!(c.vm[0].vectors, 3);
        assert_eq!(c.vm[0].mailbox_size, 1 << 20);
        assert_eq!(c.queue_depth, 64);
        let bad: Config = toml::from_str(&text.replace("vm1\"\n", "v m\"\n")).unwrap();
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("[A-Za-z0-9._-]")
        );
        assert!(toml::from_str::<Config>("sockett = 1").is_err());
        let lv: Config =
            toml::from_str("[[vm]]\nname = \"mon1\"\nlibvirt = { domain = \"mon1\" }\n").unwrap();
        lv.validate().unwrap();
        assert_eq!(lv.vm[0].libvirt.as_ref().unwrap().uri(), "qemu:///system");
        let both: Config =
            toml::from_str("[[vm]]\nname = \"a\"\nqmp = \"/q\"\nlibvirt = { domain = \"a\" }\n")
                .unwrap();
        let e = both.validate().unwrap_err().to_string();
        assert!(e.contains("libvirt owns"), "{e}");
        let none: Config = toml::from_str("[[vm]]\nname = \"a\"\n").unwrap();
        let e = none.validate().unwrap_err().to_string();
        assert!(e.contains("ivshmem_socket is missing"), "{e}");
        assert_eq!(
            Config::default().socket,
            PathBuf::from("/run/smmvmi/injector.sock")
        );
    }
}
