//! Where the monitored VM is.
//!
//! - Through the host-injector daemon: `unix:PATH#VM` or `vsock:CID:PORT#VM`
//!   (the daemon's socket and the VM's name there), with the key from
//!   `,key=PATH` after the VM name or from `ids --key PATH`.
//! - Directly (a host admin's mode): `qmp=PATH,mailbox=PATH,key=PATH`, or
//!   the path of a VM state directory holding `qmp.sock`, `mailbox` and
//!   `key` (as made by `cargo xtask vm up`).

use std::path::{Path, PathBuf};
use std::str::FromStr;

use host_injector::daemon::client::DaemonAddr;

/// A directly reachable VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectEndpoint {
    /// QMP socket of the VM's QEMU.
    pub qmp: PathBuf,
    /// The ivshmem backing file.
    pub mailbox: PathBuf,
    /// The 32-byte shared key.
    pub key: PathBuf,
}

/// A VM reached through the daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonEndpoint {
    /// The daemon's socket.
    pub addr: DaemonAddr,
    /// The VM's name at the daemon.
    pub vm: String,
    /// The 32-byte shared key (the daemon never has it).
    pub key: Option<PathBuf>,
}

/// Where the VM is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// Mailbox file and QMP socket.
    Direct(DirectEndpoint),
    /// The host-injector daemon.
    Daemon(DaemonEndpoint),
}

impl Endpoint {
    /// A name for the VM: the daemon's VM name, or the directory holding a
    /// direct endpoint's mailbox (a VM state directory is named after it).
    pub fn vm_name(&self) -> String {
        match self {
            Endpoint::Daemon(d) => d.vm.clone(),
            Endpoint::Direct(d) => d
                .mailbox
                .parent()
                .and_then(|p| p.file_name())
                .map_or_else(|| "guest".into(), |n| n.to_string_lossy().into_owned()),
        }
    }
}

/// Errors parsing an endpoint.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EndpointError {
    /// Syntax error.
    #[error(
        "endpoint {found:?}: expected `unix:PATH#VM`, `vsock:CID:PORT#VM` (optionally `,key=PATH`), `qmp=PATH,mailbox=PATH,key=PATH` or a VM state directory containing qmp.sock, mailbox and key; {problem}"
    )]
    Syntax {
        /// What was given.
        found: String,
        /// What is wrong.
        problem: String,
    },
    /// A daemon endpoint without a key.
    #[error(
        "endpoint {found}: no key: the IDS seals requests itself (the daemon never holds a key); pass `--key PATH` or append `,key=PATH`"
    )]
    NoKey {
        /// The endpoint.
        found: String,
    },
}

impl Endpoint {
    /// The endpoint of a VM state directory (direct).
    pub fn from_state_dir(dir: &Path) -> Self {
        Self::Direct(DirectEndpoint {
            qmp: dir.join("qmp.sock"),
            mailbox: dir.join("mailbox"),
            key: dir.join("key"),
        })
    }

    /// The textual form (parses back to `self`).
    pub fn to_spec(&self) -> String {
        match self {
            Self::Direct(d) => format!(
                "qmp={},mailbox={},key={}",
                d.qmp.display(),
                d.mailbox.display(),
                d.key.display()
            ),
            Self::Daemon(d) => match &d.key {
                Some(k) => format!("{}#{},key={}", d.addr, d.vm, k.display()),
                None => format!("{}#{}", d.addr, d.vm),
            },
        }
    }

    /// The key file.
    pub fn key(&self) -> Result<&Path, EndpointError> {
        match self {
            Self::Direct(d) => Ok(&d.key),
            Self::Daemon(d) => d.key.as_deref().ok_or_else(|| EndpointError::NoKey {
                found: self.to_spec(),
            }),
        }
    }

    /// Sets the key of a daemon endpoint that has none.
    pub fn with_key(mut self, key: Option<PathBuf>) -> Self {
        if let (Self::Daemon(d), Some(k)) = (&mut self, key)
            && d.key.is_none()
        {
            d.key = Some(k);
        }
        self
    }
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Self, EndpointError> {
        let err = |problem: String| EndpointError::Syntax {
            found: s.to_string(),
            problem,
        };
        if s.starts_with("unix:") || s.starts_with("vsock:") {
            let (addr, rest) = s.rsplit_once('#').ok_or_else(|| {
                err("a daemon endpoint needs `#VM` (the VM's name at the daemon)".into())
            })?;
            let (vm, key) = match rest.split_once(",key=") {
                Some((vm, key)) if !key.is_empty() => (vm, Some(PathBuf::from(key))),
                Some(_) => return Err(err("key= has an empty path".into())),
                None => (rest, None),
            };
            if vm.is_empty() {
                return Err(err("the VM name after # is empty".into()));
            }
            let addr: DaemonAddr = addr.parse().map_err(err)?;
            return Ok(Self::Daemon(DaemonEndpoint {
                addr,
                vm: vm.to_string(),
                key,
            }));
        }
        if !s.contains('=') {
            let dir = Path::new(s);
            if !dir.is_dir() {
                return Err(err("it is neither key=value pairs nor a directory".into()));
            }
            return Ok(Self::from_state_dir(dir));
        }
        let (mut qmp, mut mailbox, mut key) = (None, None, None);
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| err(format!("{part:?} is not key=value")))?;
            if v.is_empty() {
                return Err(err(format!("{k} has an empty path")));
            }
            let slot = match k {
                "qmp" => &mut qmp,
                "mailbox" => &mut mailbox,
                "key" => &mut key,
                other => return Err(err(format!("unknown key {other:?}"))),
            };
            if slot.replace(PathBuf::from(v)).is_some() {
                return Err(err(format!("{k} given twice")));
            }
        }
        Ok(Self::Direct(DirectEndpoint {
            qmp: qmp.ok_or_else(|| err("qmp= is missing".into()))?,
            mailbox: mailbox.ok_or_else(|| err("mailbox= is missing".into()))?,
            key: key.ok_or_else(|| err("key= is missing".into()))?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_and_dirs() {
        let e: Endpoint = "qmp=/a/q,mailbox=/a/m,key=/a/k".parse().unwrap();
        let Endpoint::Direct(d) = &e else {
            panic!("direct")
        };
        assert_eq!(d.qmp, Path::new("/a/q"));
        assert_eq!(d.mailbox, Path::new("/a/m"));
        assert_eq!(d.key, Path::new("/a/k"));
        assert_eq!(e.to_spec().parse::<Endpoint>().unwrap(), e);
        let d: Endpoint = std::env::temp_dir().to_str().unwrap().parse().unwrap();
        assert_eq!(d, Endpoint::from_state_dir(&std::env::temp_dir()));
        for bad in [
            "qmp=/q,mailbox=/m",
            "qmp=/q,mailbox=/m,key=/k,key=/k",
            "qmp=/q,mailbox=/m,key=",
            "qmp=/q,mb=/m,key=/k",
            "/nonexistent/dir",
        ] {
            let e = bad.parse::<Endpoint>().unwrap_err().to_string();
            assert!(e.contains("expected `unix:PATH#VM`"), "{bad}: {e}");
        }
    }

    #[test]
    fn parses_daemon_endpoints() {
        let e: Endpoint = "unix:/run/smmvmi/injector.sock#vm1".parse().unwrap();
        assert_eq!(
            e,
            Endpoint::Daemon(DaemonEndpoint {
                addr: DaemonAddr::Unix("/run/smmvmi/injector.sock".into()),
                vm: "vm1".into(),
                key: None,
            })
        );
        assert!(e.key().unwrap_err().to_string().contains("--key PATH"));
        let e = e.with_key(Some("/k".into()));
        assert_eq!(e.key().unwrap(), Path::new("/k"));
        assert_eq!(e.to_spec().parse::<Endpoint>().unwrap(), e);
        let v: Endpoint = "vsock:2:7070#vm-2,key=/k".parse().unwrap();
        let Endpoint::Daemon(d) = &v else {
            panic!("daemon")
        };
        assert_eq!(d.addr, DaemonAddr::Vsock { cid: 2, port: 7070 });
        assert_eq!(
            (d.vm.as_str(), d.key.as_deref()),
            ("vm-2", Some(Path::new("/k")))
        );
        for bad in [
            "unix:/a",
            "unix:/a#",
            "vsock:2#vm",
            "unix:#vm",
            "unix:/a#vm,key=",
        ] {
            let e = bad.parse::<Endpoint>().unwrap_err().to_string();
            assert!(e.contains("expected `unix:PATH#VM`"), "{bad}: {e}");
        }
    }
}
