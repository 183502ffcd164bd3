//! A blocking client of the daemon (the IDS, `host-injector status`, tests).
//! Every read and write has a timeout.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use super::config::VmConfig;
use super::protocol::{
    self, DaemonError, FrameError, HeaderView, MAX_REPLY_BODY, ReplyHead, RequestHead, SmiPath,
    TransactInfo,
};
use crate::backend::Target;

/// Where the daemon listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DaemonAddr {
    /// A unix socket path.
    Unix(PathBuf),
    /// An AF_VSOCK address (from inside a VM: CID 2 is the host).
    Vsock {
        /// Context id.
        cid: u32,
        /// Port.
        port: u32,
    },
}

impl FromStr for DaemonAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(Self::Unix(PathBuf::from(p)));
        }
        if let Some(rest) = s.strip_prefix("vsock:") {
            let (cid, port) = rest
                .split_once(':')
                .ok_or_else(|| format!("expected vsock:CID:PORT, found {s:?}"))?;
            let n = |x: &str, what: &str| {
                x.parse::<u32>()
                    .map_err(|_| format!("vsock {what} must be a number, found {x:?}"))
            };
            return Ok(Self::Vsock {
                cid: n(cid, "CID")?,
                port: n(port, "port")?,
            });
        }
        Err(format!("expected unix:PATH or vsock:CID:PORT, found {s:?}"))
    }
}

impl std::fmt::Display for DaemonAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
        }
    }
}

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon cannot be reached.
    #[error(
        "cannot reach the host-injector daemon at {addr}: {source} (is it running? `host-injector serve`, or `systemctl status smmvmi-injector`)"
    )]
    Connect {
        /// Address.
        addr: String,
        /// OS error.
        source: std::io::Error,
    },
    /// The connection failed mid-way.
    #[error("host-injector daemon at {addr}: {source}")]
    Frame {
        /// Address.
        addr: String,
        /// Cause.
        source: FrameError,
    },
    /// The daemon answered with an error.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// The daemon answered something else than asked.
    #[error(
        "host-injector daemon at {addr}: expected a {expected} reply, found {found}: client and daemon versions differ"
    )]
    Unexpected {
        /// Address.
        addr: String,
        /// Expected reply.
        expected: &'static str,
        /// What came.
        found: String,
    },
}

/// One connection to the daemon.
pub struct DaemonClient {
    addr: DaemonAddr,
    stream: UnixStream,
}

impl DaemonClient {
    /// Connects; every later read or write waits at most `timeout` beyond
    /// the request's own deadline.
    pub fn connect(addr: &DaemonAddr, timeout: Duration) -> Result<Self, ClientError> {
        let err = |source| ClientError::Connect {
            addr: addr.to_string(),
            source,
        };
        let stream = match addr {
            DaemonAddr::Unix(p) => UnixStream::connect(p).map_err(err)?,
            DaemonAddr::Vsock { cid, port } => {
                use nix::sys::socket::{
                    AddressFamily, SockFlag, SockType, VsockAddr, connect, socket,
                };
                let fd: OwnedFd = socket(
                    AddressFamily::Vsock,
                    SockType::Stream,
                    SockFlag::SOCK_CLOEXEC,
                    None,
                )
                .map_err(|e| err(e.into()))?;
                connect(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    &VsockAddr::new(*cid, *port),
                )
                .map_err(|e| err(e.into()))?;
                // A connected stream socket: read/write only (see the
                // daemon's vsock listener).
                UnixStream::from(fd)
            }
        };
        stream.set_read_timeout(Some(timeout)).map_err(err)?;
        stream.set_write_timeout(Some(timeout)).map_err(err)?;
        Ok(Self {
            addr: addr.clone(),
            stream,
        })
    }

    /// Sends a raw byte string (tests of malformed frames).
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads one reply frame.
    pub fn read_reply(&mut self) -> Result<(ReplyHead, Vec<u8>), ClientError> {
        protocol::read_frame(&mut self.stream, MAX_REPLY_BODY).map_err(|source| {
            ClientError::Frame {
                addr: self.addr.to_string(),
                source,
            }
        })
    }

    /// The underlying stream (tests).
    pub fn stream(&mut self) -> &mut UnixStream {
        &mut self.stream
    }

    fn call(
        &mut self,
        head: &RequestHead,
        payload: &[u8],
        extra: Duration,
    ) -> Result<(ReplyHead, Vec<u8>), ClientError> {
        let frame_err = |addr: &DaemonAddr, source| ClientError::Frame {
            addr: addr.to_string(),
            source,
        };
        protocol::write_frame(&mut self.stream, head, payload)
            .map_err(|e| frame_err(&self.addr, e))?;
        let old = self.stream.read_timeout().ok().flatten();
        if let Some(t) = old {
            let _ = self.stream.set_read_timeout(Some(t + extra));
        }
        let r = protocol::read_frame(&mut self.stream, MAX_REPLY_BODY)
            .map_err(|e| frame_err(&self.addr, e));
        let _ = self.stream.set_read_timeout(old);
        let (h, p) = r?;
        if let ReplyHead::Error { error } = h {
            return Err(ClientError::Daemon(error));
        }
        Ok((h, p))
    }

    fn unexpected(&self, expected: &'static str, found: &ReplyHead) -> ClientError {
        ClientError::Unexpected {
            addr: self.addr.to_string(),
            expected,
            found: format!("{found:?}"),
        }
    }

    /// Carries a sealed request frame to `vm`'s agent.
    pub fn transact(
        &mut self,
        vm: &str,
        target: Target,
        deadline: Duration,
        frame: &[u8],
    ) -> Result<(TransactInfo, Vec<u8>), ClientError> {
        self.transact_via(vm, target, SmiPath::Auto, deadline, frame)
    }

    /// [`DaemonClient::transact`] restricted to the SMI path `smi`.
    pub fn transact_via(
        &mut self,
        vm: &str,
        target: Target,
        smi: SmiPath,
        deadline: Duration,
        frame: &[u8],
    ) -> Result<(TransactInfo, Vec<u8>), ClientError> {
        let head = RequestHead::Transact {
            vm: vm.to_string(),
            target,
            deadline_ms: deadline.as_millis() as u64,
            smi,
        };
        match self.call(&head, frame, deadline)? {
            (ReplyHead::Transact { info }, reply) => Ok((info, reply)),
            (other, _) => Err(self.unexpected("transact", &other)),
        }
    }

    /// The VM's mailbox header (untrusted).
    pub fn header(&mut self, vm: &str) -> Result<HeaderView, ClientError> {
        match self.call(
            &RequestHead::Header { vm: vm.to_string() },
            b"",
            Duration::ZERO,
        )? {
            (ReplyHead::Header { header }, _) => Ok(header),
            (other, _) => Err(self.unexpected("header", &other)),
        }
    }

    /// The daemon's status.
    pub fn status(&mut self) -> Result<serde_json::Value, ClientError> {
        match self.call(&RequestHead::Status, b"", Duration::ZERO)? {
            (ReplyHead::Status { status }, _) => Ok(status),
            (other, _) => Err(self.unexpected("status", &other)),
        }
    }

    /// Prometheus text.
    pub fn metrics(&mut self) -> Result<String, ClientError> {
        match self.call(&RequestHead::Metrics, b"", Duration::ZERO)? {
            (ReplyHead::Metrics, text) => Ok(String::from_utf8_lossy(&text).into_owned()),
            (other, _) => Err(self.unexpected("metrics", &other)),
        }
    }

    /// Registers a VM.
    pub fn register(&mut self, vm: VmConfig) -> Result<(), ClientError> {
        match self.call(&RequestHead::Register { vm }, b"", Duration::from_secs(5))? {
            (ReplyHead::Registered { .. }, _) => Ok(()),
            (other, _) => Err(self.unexpected("registered", &other)),
        }
    }

    /// Unregisters a VM.
    pub fn unregister(&mut self, vm: &str) -> Result<(), ClientError> {
        match self.call(
            &RequestHead::Unregister { vm: vm.to_string() },
            b"",
            Duration::from_secs(5),
        )? {
            (ReplyHead::Unregistered { .. }, _) => Ok(()),
            (other, _) => Err(self.unexpected("unregistered", &other)),
        }
    }
}

/// Reads whatever the daemon sends until EOF (tests: "was it closed?").
pub fn read_to_end(s: &mut UnixStream) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    s.read_to_end(&mut v)?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!("unix:/a/b".parse(), Ok(DaemonAddr::Unix("/a/b".into())));
        assert_eq!(
            "vsock:2:7070".parse(),
            Ok(DaemonAddr::Vsock { cid: 2, port: 7070 })
        );
        assert!("vsock:2".parse::<DaemonAddr>().is_err());
        assert!("tcp:1".parse::<DaemonAddr>().is_err());
        assert_eq!(
            DaemonAddr::Vsock { cid: 2, port: 1 }.to_string(),
            "vsock:2:1"
        );
    }
}
