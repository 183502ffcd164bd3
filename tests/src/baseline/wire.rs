//! The baselines' transport: length-prefixed messages over TCP.
//!
//! ```text
//! client: [kind u8][len u32 LE][payload]   kind 1 = header (len 0), 2 = transact (payload = sealed frame)
//! server: [code u8][len u32 LE][payload]   code 0 = header: state u32 LE, salt
//!                                          code 1 = reply: serve status u32 LE, SMM cycles u64 LE,
//!                                                   serve time µs u64 LE (request posted to reply seen), reply frame
//!                                          code 2 = error: UTF-8 text
//! ```
//! Every byte is untrusted on both sides: the IDS opens the reply with its
//! session keys, as it does for the daemon.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use host_injector::Transaction;
use ids::SessionError;
use ids::transport::{AgentHeader, FrameCarrier};
use smmvmi_mailbox::header::{SESSION_SALT_LEN, ServeStatus};

const KIND_HEADER: u8 = 1;
const KIND_TRANSACT: u8 = 2;
const CODE_HEADER: u8 = 0;
const CODE_REPLY: u8 = 1;
const CODE_ERROR: u8 = 2;
/// Largest message either side accepts (a 1 MiB mailbox's frames fit).
pub const MAX_MESSAGE: usize = 4 << 20;

/// What a baseline serves.
pub trait Backend {
    /// The agent's state word and session salt.
    fn header(&mut self) -> Result<(u32, [u8; SESSION_SALT_LEN]), String>;
    /// One sealed request: (serve status, SMM cycles, serve time from
    /// posting the request to seeing the reply, reply frame).
    fn transact(&mut self, frame: &[u8]) -> Result<(u32, u64, Duration, Vec<u8>), String>;
}

fn read_message(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head)?;
    let len = u32::from_le_bytes(head[1..].try_into().expect("4 bytes")) as usize;
    if len > MAX_MESSAGE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("message of {len} bytes, at most {MAX_MESSAGE} expected"),
        ));
    }
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload)?;
    Ok((head[0], payload))
}

fn write_message(s: &mut TcpStream, code: u8, parts: &[&[u8]]) -> std::io::Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(5 + len);
    out.push(code);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
    s.write_all(&out)
}

/// Serves clients of `listener` one after another, forever (a baseline
/// process lives as long as its benchmark).
pub fn serve(listener: &TcpListener, backend: &mut dyn Backend) -> std::io::Result<()> {
    loop {
        let (mut s, peer) = listener.accept()?;
        let _ = s.set_nodelay(true);
        eprintln!("baseline: client {peer}");
        if let Err(e) = serve_one(&mut s, backend) {
            eprintln!("baseline: client {peer}: {e}");
        }
    }
}

fn serve_one(s: &mut TcpStream, backend: &mut dyn Backend) -> std::io::Result<()> {
    loop {
        let (kind, payload) = match read_message(s) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        match kind {
            KIND_HEADER => match backend.header() {
                Ok((state, salt)) => write_message(s, CODE_HEADER, &[&state.to_le_bytes(), &salt])?,
                Err(e) => write_message(s, CODE_ERROR, &[e.as_bytes()])?,
            },
            KIND_TRANSACT => match backend.transact(&payload) {
                Ok((status, cycles, took, reply)) => write_message(
                    s,
                    CODE_REPLY,
                    &[
                        &status.to_le_bytes(),
                        &cycles.to_le_bytes(),
                        &(took.as_micros() as u64).to_le_bytes(),
                        &reply,
                    ],
                )?,
                Err(e) => write_message(s, CODE_ERROR, &[e.as_bytes()])?,
            },
            other => {
                let e =
                    format!("unknown message kind {other}: expected 1 (header) or 2 (transact)");
                write_message(s, CODE_ERROR, &[e.as_bytes()])?;
            }
        }
    }
}

/// The IDS end: carries sealed frames to a baseline at `addr` (`HOST:PORT`).
pub struct TcpCarrier {
    stream: TcpStream,
    addr: String,
}

impl TcpCarrier {
    /// Connects (TCP_NODELAY: every message is one request).
    pub fn connect(addr: &str) -> std::io::Result<Self> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            addr: addr.to_string(),
        })
    }

    fn call(
        &mut self,
        kind: u8,
        payload: &[u8],
        deadline: Duration,
    ) -> Result<(u8, Vec<u8>), SessionError> {
        let io =
            |e: std::io::Error| SessionError::Malformed(format!("baseline at {}: {e}", self.addr));
        self.stream
            .set_read_timeout(Some(deadline.max(Duration::from_millis(1))))
            .map_err(io)?;
        write_message(&mut self.stream, kind, &[payload]).map_err(io)?;
        let (code, body) = read_message(&mut self.stream).map_err(io)?;
        if code == CODE_ERROR {
            return Err(SessionError::Malformed(format!(
                "baseline at {}: {}",
                self.addr,
                String::from_utf8_lossy(&body)
            )));
        }
        Ok((code, body))
    }
}

fn malformed(what: &str, body: &[u8]) -> SessionError {
    SessionError::Malformed(format!("baseline {what}: {} bytes, unexpected", body.len()))
}

impl FrameCarrier for TcpCarrier {
    fn header(&mut self) -> Result<AgentHeader, SessionError> {
        let (code, body) = self.call(KIND_HEADER, &[], Duration::from_secs(10))?;
        if code != CODE_HEADER || body.len() != 4 + SESSION_SALT_LEN {
            return Err(malformed("header", &body));
        }
        Ok(AgentHeader {
            state_raw: u32::from_le_bytes(body[..4].try_into().expect("4 bytes")),
            salt: body[4..].try_into().expect("salt length checked"),
        })
    }

    /// The transaction's `elapsed` is the baseline's own serve time
    /// (request posted to reply seen), as the daemon reports its own.
    fn transact(&mut self, frame: &[u8], deadline: Duration) -> Result<Transaction, SessionError> {
        let (code, body) = self.call(KIND_TRANSACT, frame, deadline)?;
        if code != CODE_REPLY || body.len() < 20 {
            return Err(malformed("reply", &body));
        }
        let word =
            |r: std::ops::Range<usize>| u64::from_le_bytes(body[r].try_into().expect("8 bytes"));
        let status = u32::from_le_bytes(body[..4].try_into().expect("4 bytes"));
        Ok(Transaction {
            status: ServeStatus::from_raw(status).unwrap_or(ServeStatus::None),
            serve_cycles: word(4..12),
            elapsed: Duration::from_micros(word(12..20)),
            reply: body[20..].to_vec(),
            smis: 0,
        })
    }
}
