//! The baselines' transport: length-prefixed messages over TCP.
//!
//! ```text
//! client: [kind u8][len u32 LE][payload]   kind 1 = header (len 0), 2 = transact (payload = sealed frame)
//! server: [code u8][len u32 LE][payload]   code 0 = header: state u32 LE, salt
//!                                          code 1 = reply: serve status u32 LE, SMM cycles u64 LE,
//!                                                   serve time µs u64 LE (request posted to reply seen),
//!                                                   server time µs u64 LE (request read to reply written), reply frame
//!                                          code 2 = error: UTF-8 text
//! ```
//! Every byte is untrusted on both sides: the IDS opens the reply with its
//! session keys, as it does for the daemon.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

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
    /// A client connected (a backend may refresh what it caches).
    fn new_client(&mut self) -> Result<(), String> {
        Ok(())
    }
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
        if let Err(e) = backend.new_client() {
            eprintln!("baseline: client {peer}: {e}");
            let _ = write_message(&mut s, CODE_ERROR, &[e.as_bytes()]);
            continue;
        }
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
        let got = Instant::now();
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
                        &(got.elapsed().as_micros() as u64).to_le_bytes(),
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

/// The last server time a [`TcpCarrier`] saw (shared with its creator,
/// since the session owns the carrier).
#[derive(Clone, Default)]
pub struct ServerTimes(Arc<AtomicU64>);

impl ServerTimes {
    /// The time the baseline held the last request (read to reply written).
    pub fn last_server(&self) -> Duration {
        Duration::from_micros(self.0.load(Ordering::Relaxed))
    }
}

/// The IDS end: carries sealed frames to a baseline at `addr` (`HOST:PORT`).
/// After any I/O error the connection is out of step with the server (a
/// late reply would answer the next request), so every later call fails.
pub struct TcpCarrier {
    stream: TcpStream,
    addr: String,
    broken: Option<String>,
    times: ServerTimes,
}

impl TcpCarrier {
    /// Connects (TCP_NODELAY: every message is one request).
    pub fn connect(addr: &str) -> std::io::Result<Self> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(Self {
            stream,
            addr: addr.to_string(),
            broken: None,
            times: ServerTimes::default(),
        })
    }

    /// A handle on the server times this carrier records.
    pub fn server_times(&self) -> ServerTimes {
        self.times.clone()
    }

    fn call(
        &mut self,
        kind: u8,
        payload: &[u8],
        deadline: Duration,
    ) -> Result<(u8, Vec<u8>), SessionError> {
        if let Some(why) = &self.broken {
            return Err(SessionError::Carrier(format!(
                "baseline at {}: the connection failed earlier ({why}); connect again",
                self.addr
            )));
        }
        let exchange = |c: &mut Self| -> std::io::Result<(u8, Vec<u8>)> {
            c.stream
                .set_read_timeout(Some(deadline.max(Duration::from_millis(1))))?;
            write_message(&mut c.stream, kind, &[payload])?;
            read_message(&mut c.stream)
        };
        let (code, body) = exchange(self).map_err(|e| {
            use std::io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
            let why = match e.kind() {
                UnexpectedEof | ConnectionReset | BrokenPipe => {
                    "it closed the connection (is the baseline process running? see its log)"
                        .to_string()
                }
                _ => e.to_string(),
            };
            self.broken = Some(why.clone());
            SessionError::Carrier(format!("baseline at {}: {why}", self.addr))
        })?;
        if code == CODE_ERROR {
            return Err(SessionError::Carrier(format!(
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
        if code != CODE_REPLY || body.len() < 28 {
            return Err(malformed("reply", &body));
        }
        let word =
            |r: std::ops::Range<usize>| u64::from_le_bytes(body[r].try_into().expect("8 bytes"));
        let status = u32::from_le_bytes(body[..4].try_into().expect("4 bytes"));
        self.times.0.store(word(20..28), Ordering::Relaxed);
        Ok(Transaction {
            status: ServeStatus::from_raw(status).unwrap_or(ServeStatus::None),
            serve_cycles: word(4..12),
            elapsed: Duration::from_micros(word(12..20)),
            reply: body[28..].to_vec(),
            smis: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers a frame with its bytes reversed; refuses an empty one.
    struct Mirror;
    impl Backend for Mirror {
        fn header(&mut self) -> Result<(u32, [u8; SESSION_SALT_LEN]), String> {
            Ok((7, [0xAB; SESSION_SALT_LEN]))
        }
        fn transact(&mut self, frame: &[u8]) -> Result<(u32, u64, Duration, Vec<u8>), String> {
            if frame.is_empty() {
                return Err("empty frame".into());
            }
            std::thread::sleep(Duration::from_millis(2));
            let reply = frame.iter().rev().copied().collect();
            Ok((
                ServeStatus::Ok as u32,
                1234,
                Duration::from_micros(567),
                reply,
            ))
        }
    }

    fn server() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || serve(&l, &mut Mirror));
        addr
    }

    #[test]
    fn a_frame_and_its_timings_cross_the_wire_intact() {
        let mut c = TcpCarrier::connect(&server()).unwrap();
        let h = c.header().unwrap();
        assert_eq!((h.state_raw, h.salt), (7, [0xAB; SESSION_SALT_LEN]));
        let t = c.transact(b"abc\x00\xff", Duration::from_secs(5)).unwrap();
        assert_eq!(t.reply, b"\xff\x00cba");
        assert_eq!(t.status, ServeStatus::Ok);
        assert_eq!(t.serve_cycles, 1234);
        assert_eq!(t.elapsed, Duration::from_micros(567));
        assert!(c.server_times().last_server() >= Duration::from_millis(2));
    }

    #[test]
    fn a_refusal_is_a_carrier_error_and_the_connection_stays_usable() {
        let mut c = TcpCarrier::connect(&server()).unwrap();
        let e = c.transact(b"", Duration::from_secs(5)).unwrap_err();
        assert!(
            matches!(&e, SessionError::Carrier(m) if m.contains("empty frame")),
            "{e}"
        );
        assert_eq!(
            c.transact(b"x", Duration::from_secs(5)).unwrap().reply,
            b"x"
        );
    }

    #[test]
    fn after_a_lost_connection_every_call_fails_and_says_why() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        // A server that accepts and hangs up at once.
        std::thread::spawn(move || drop(l.accept()));
        let mut c = TcpCarrier::connect(&addr).unwrap();
        let e = c.header().unwrap_err();
        assert!(
            matches!(&e, SessionError::Carrier(m) if m.contains("closed the connection")),
            "{e}"
        );
        let again = c.transact(b"x", Duration::from_secs(1)).unwrap_err();
        assert!(
            matches!(&again, SessionError::Carrier(m) if m.contains("failed earlier")),
            "{again}"
        );
    }
}
