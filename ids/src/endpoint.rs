//! Where the monitored VM is. For now the endpoint names the VM directly
//! (a host admin's mode): `qmp=PATH,mailbox=PATH,key=PATH`, or the path of a
//! VM state directory holding `qmp.sock`, `mailbox` and `key` (as made by
//! `cargo xtask vm up`). The daemon's socket comes with the daemon.

use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A directly reachable VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// QMP socket of the VM's QEMU.
    pub qmp: PathBuf,
    /// The ivshmem backing file.
    pub mailbox: PathBuf,
    /// The 32-byte shared key.
    pub key: PathBuf,
}

/// Errors parsing an endpoint.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EndpointError {
    /// Syntax error.
    #[error(
        "endpoint {found:?}: expected `qmp=PATH,mailbox=PATH,key=PATH` or a VM state directory containing qmp.sock, mailbox and key; {problem}"
    )]
    Syntax {
        /// What was given.
        found: String,
        /// What is wrong.
        problem: String,
    },
}

impl Endpoint {
    /// The endpoint of a VM state directory.
    pub fn from_state_dir(dir: &Path) -> Self {
        Self {
            qmp: dir.join("qmp.sock"),
            mailbox: dir.join("mailbox"),
            key: dir.join("key"),
        }
    }

    /// The `qmp=..,mailbox=..,key=..` form.
    pub fn to_spec(&self) -> String {
        format!(
            "qmp={},mailbox={},key={}",
            self.qmp.display(),
            self.mailbox.display(),
            self.key.display()
        )
    }
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Self, EndpointError> {
        let err = |problem: String| EndpointError::Syntax {
            found: s.to_string(),
            problem,
        };
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
        Ok(Self {
            qmp: qmp.ok_or_else(|| err("qmp= is missing".into()))?,
            mailbox: mailbox.ok_or_else(|| err("mailbox= is missing".into()))?,
            key: key.ok_or_else(|| err("key= is missing".into()))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_and_dirs() {
        let e: Endpoint = "qmp=/a/q,mailbox=/a/m,key=/a/k".parse().unwrap();
        assert_eq!(e.qmp, Path::new("/a/q"));
        assert_eq!(e.mailbox, Path::new("/a/m"));
        assert_eq!(e.key, Path::new("/a/k"));
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
            assert!(e.contains("expected `qmp=PATH"), "{bad}: {e}");
        }
    }
}
