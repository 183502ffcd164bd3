//! The daemon's wire protocol: one frame per request and per reply.
//!
//! ```text
//! frame = "SMJ1" | u32 LE body_len | body
//! body  = u32 LE head_len | head (JSON, head_len bytes) | payload (rest)
//! ```
//! The head says what the frame is ([`RequestHead`], [`ReplyHead`]); the
//! payload is opaque bytes: a sealed request frame going in, a sealed reply
//! frame coming out (AES-256-GCM between IDS and agent: the daemon never
//! holds a key and never sees plaintext), or Prometheus text. A client sends
//! one request and reads one reply at a time per connection. A malformed
//! frame (bad magic, a length over [`MAX_REQUEST_BODY`], a truncated body,
//! a head that is not JSON of a known request, an unknown VM) gets one
//! [`ReplyHead::Error`] and the connection is closed; other connections are
//! unaffected.
//!
//! Errors cross the process boundary typed ([`DaemonError`], tagged by
//! `code`): a client matches on the variant, the message is for people.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::backend::Target;

/// Frame magic (protocol version 1).
pub const MAGIC: [u8; 4] = *b"SMJ1";
/// Largest request body the daemon reads (sealed requests fit the 64 KiB
/// request area; the rest is head).
pub const MAX_REQUEST_BODY: u32 = 128 << 10;
/// Largest reply body a client reads (the reply area of the largest mailbox).
pub const MAX_REPLY_BODY: u32 = 65 << 20;
/// Largest head.
pub const MAX_HEAD: u32 = 16 << 10;

/// What a client asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum RequestHead {
    /// Carry the payload (a sealed request frame) to `vm`'s agent; the reply
    /// payload is the sealed reply frame.
    Transact {
        /// VM name.
        vm: String,
        /// Which vCPUs the SMI should reach.
        #[serde(default)]
        target: Target,
        /// Deadline of the request, from the daemon's receipt, in ms.
        deadline_ms: u64,
        /// Which SMI path the daemon may use (omitted: [`SmiPath::Auto`]).
        #[serde(default, skip_serializing_if = "SmiPath::is_auto")]
        smi: SmiPath,
    },
    /// The mailbox header as it stands (untrusted: salt, state, features),
    /// which a client needs to derive session keys.
    Header {
        /// VM name.
        vm: String,
    },
    /// The daemon's and every VM's state.
    Status,
    /// Prometheus text exposition (payload of the reply).
    Metrics,
    /// Adds a VM (local unix clients of the daemon's own user only).
    Register {
        /// The VM.
        vm: super::config::VmConfig,
    },
    /// Removes a VM (same restriction).
    Unregister {
        /// VM name.
        vm: String,
    },
}

/// Which SMI path the daemon may use for one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SmiPath {
    /// The doorbell, with monitor SMIs as the first-SMI and fallback path
    /// (the daemon's policy).
    #[default]
    Auto,
    /// Monitor SMIs only (`qmp-broadcast`), even where the doorbell works:
    /// for comparing the paths, or for an operator who distrusts the
    /// doorbell. Still gated like every monitor SMI (agent Ready with
    /// broadcast, no reset since); while the gate is closed the request
    /// waits, and past its deadline it is silent.
    QmpBroadcast,
    /// A patched QEMU's QMP `inject-smi` (`patches-qemu/`) only: to the
    /// request's target vCPU (`cpu-index` looked up from its APIC ID), or
    /// to every vCPU for target `all`. No dependency on SMI broadcast
    /// negotiation, but gated like every monitor SMI (an SMI before the
    /// firmware has set up SMM is not safe either). On a stock QEMU the
    /// request fails at once with [`DaemonError::NeedsPatchedQemu`].
    QmpTargeted,
}

impl SmiPath {
    /// True for the default.
    pub fn is_auto(&self) -> bool {
        *self == SmiPath::Auto
    }
}

/// Facts about one served request. All agent-written values are untrusted
/// (the sealed reply is the proof).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactInfo {
    /// Serve status word the agent wrote.
    pub status: u32,
    /// Backend whose SMI the agent answered after ("doorbell",
    /// "qmp-broadcast", "qmp-targeted").
    pub backend: String,
    /// Doorbell SMIs raised for this request.
    pub smis_doorbell: u32,
    /// Monitor SMIs raised for this request (APM port writes, or
    /// `inject-smi` for [`SmiPath::QmpTargeted`]: see `backend`).
    pub smis_qmp: u32,
    /// Time in the queue before the request reached the mailbox, µs.
    pub queued_us: u64,
    /// Time from posting to the done word, µs.
    pub elapsed_us: u64,
    /// TSC cycles the firmware says it spent serving.
    pub serve_cycles: u64,
    /// The mailbox doorbell value used.
    pub doorbell: u64,
    /// Whether the agent rang the daemon back (versus the daemon polling).
    pub rang: bool,
}

/// The untrusted header fields a client needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderView {
    /// Magic and layout version right.
    pub magic_ok: bool,
    /// Layout version word.
    pub version: u32,
    /// Raw agent state.
    pub state: u32,
    /// Feature bits.
    pub features: u64,
    /// Session salt (hex).
    pub salt: String,
    /// SMIs served.
    pub smi_count: u64,
    /// Doorbell re-arms the agent counted.
    pub doorbell_rearms: u64,
    /// One-line summary.
    pub summary: String,
}

/// The daemon's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum ReplyHead {
    /// Payload: the sealed reply frame.
    Transact {
        /// What happened.
        info: TransactInfo,
    },
    /// The header snapshot.
    Header {
        /// Its fields.
        header: HeaderView,
    },
    /// The status (JSON value, documented by `host-injector status --json`).
    Status {
        /// Daemon and VMs.
        status: serde_json::Value,
    },
    /// Payload: Prometheus text.
    Metrics,
    /// The VM was added.
    Registered {
        /// Its name.
        vm: String,
    },
    /// The VM was removed.
    Unregistered {
        /// Its name.
        vm: String,
    },
    /// The request failed.
    Error {
        /// Why.
        error: DaemonError,
    },
}

/// A failure the daemon reports to a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "code", rename_all = "kebab-case")]
pub enum DaemonError {
    /// The frame is not a protocol frame.
    #[error(
        "the daemon could not read the request: {problem}; expected frames \"SMJ1\" | u32 LE length | u32 LE head length | JSON head | payload. The connection is closed"
    )]
    Malformed {
        /// What was wrong.
        problem: String,
    },
    /// The frame is longer than allowed.
    #[error(
        "request of {found} bytes exceeds the daemon's limit of {max} bytes (sealed requests fit the 64 KiB request area); the connection is closed"
    )]
    TooLarge {
        /// Announced length.
        found: u64,
        /// Limit.
        max: u64,
    },
    /// No such VM.
    #[error(
        "no VM named {vm:?} is registered with the daemon (registered: {known:?}); check the endpoint's #VM part or `host-injector status`"
    )]
    UnknownVm {
        /// Name asked.
        vm: String,
        /// Names known.
        known: Vec<String>,
    },
    /// The VM's queue is full.
    #[error(
        "VM {vm}: busy: {capacity} requests already wait for its agent; retry later or raise queue_depth"
    )]
    Busy {
        /// VM.
        vm: String,
        /// Queue capacity.
        capacity: usize,
    },
    /// The agent did not answer in time: an alert.
    #[error(
        "ALERT: VM {vm}: the agent did not answer within {deadline_ms} ms ({smis_doorbell} doorbell and {smis_qmp} monitor SMIs raised; mailbox: {header}). The mailbox was reset for the next request. A silent agent means SMIs are blocked or the agent was disabled: treat it as an alert"
    )]
    Silent {
        /// VM.
        vm: String,
        /// Deadline.
        deadline_ms: u64,
        /// Doorbell SMIs raised.
        smis_doorbell: u32,
        /// Monitor SMIs raised.
        smis_qmp: u32,
        /// Header summary at the deadline.
        header: String,
    },
    /// No way to raise an SMI now (agent not ready, guest rebooting).
    #[error("VM {vm}: no SMI can be raised now: {reason}")]
    NotReady {
        /// VM.
        vm: String,
        /// Why.
        reason: String,
    },
    /// QEMU is not connected.
    #[error("VM {vm}: QEMU is not connected to the daemon: {reason}")]
    QemuGone {
        /// VM.
        vm: String,
        /// Since when and what to do.
        reason: String,
    },
    /// The agent answered with a failure status (unauthenticated).
    #[error("VM {vm}: the agent rejected the request: serve status {status} ({hint})")]
    Rejected {
        /// VM.
        vm: String,
        /// Raw status.
        status: u32,
        /// What it usually means.
        hint: String,
    },
    /// The target vCPU has no vector.
    #[error("VM {vm}: {problem}")]
    BadTarget {
        /// VM.
        vm: String,
        /// What is wrong.
        problem: String,
    },
    /// [`SmiPath::QmpTargeted`] asked of a QEMU without `inject-smi`.
    #[error(
        "VM {vm}: smi path qmp-targeted needs the QMP command `inject-smi`, which this QEMU lacks (stock QEMU): build QEMU with patches-qemu/ (`cargo xtask qemu-patched`; `host-injector doctor` tells), or leave the smi path at its default (the doorbell targets vCPUs on stock QEMU)"
    )]
    NeedsPatchedQemu {
        /// VM.
        vm: String,
    },
    /// The request does not fit the mailbox.
    #[error("VM {vm}: the request does not fit the mailbox: {problem}")]
    RequestTooBig {
        /// VM.
        vm: String,
        /// What the mailbox says.
        problem: String,
    },
    /// The daemon is stopping.
    #[error("the daemon is shutting down (SIGTERM): no new requests; reconnect when it is back")]
    ShuttingDown,
    /// Not allowed from this connection.
    #[error(
        "{what} is allowed only to local unix clients running as the daemon's user (uid {uid}); this connection is not"
    )]
    Forbidden {
        /// The operation.
        what: String,
        /// The daemon's uid.
        uid: u32,
    },
    /// Registration refused.
    #[error("cannot register VM {vm}: {problem}")]
    Register {
        /// VM.
        vm: String,
        /// Why.
        problem: String,
    },
    /// The mailbox memory failed (host I/O).
    #[error("VM {vm}: mailbox I/O failed on the host: {problem}")]
    Mailbox {
        /// VM.
        vm: String,
        /// OS error text.
        problem: String,
    },
}

/// Errors of the frame codec.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// I/O failed or the peer closed.
    #[error("daemon connection: {0}")]
    Io(#[from] std::io::Error),
    /// The frame violates the protocol.
    #[error(transparent)]
    Protocol(#[from] DaemonError),
}

/// Encodes one frame.
pub fn encode<H: Serialize>(head: &H, payload: &[u8]) -> Vec<u8> {
    let head = serde_json::to_vec(head).expect("heads serialize");
    let body_len = 4 + head.len() + payload.len();
    let mut out = Vec::with_capacity(8 + body_len);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&(head.len() as u32).to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(payload);
    out
}

/// Checks the 8-byte prefix; returns the body length.
pub fn check_prefix(prefix: &[u8; 8], max: u32) -> Result<u32, DaemonError> {
    if prefix[..4] != MAGIC {
        return Err(DaemonError::Malformed {
            problem: format!("bad magic {:02x?}", &prefix[..4]),
        });
    }
    let len = u32::from_le_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]);
    if len > max {
        return Err(DaemonError::TooLarge {
            found: len.into(),
            max: max.into(),
        });
    }
    if len < 4 {
        return Err(DaemonError::Malformed {
            problem: format!("body of {len} bytes cannot hold the head length"),
        });
    }
    Ok(len)
}

/// Splits a body into a parsed head and the payload.
pub fn decode_body<H: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<(H, &[u8]), DaemonError> {
    let head_len = u32::from_le_bytes(body[..4].try_into().expect("4 bytes")) as usize;
    if head_len > MAX_HEAD as usize || 4 + head_len > body.len() {
        return Err(DaemonError::Malformed {
            problem: format!(
                "head length {head_len} exceeds the body ({} bytes) or {MAX_HEAD}",
                body.len()
            ),
        });
    }
    let head =
        serde_json::from_slice(&body[4..4 + head_len]).map_err(|e| DaemonError::Malformed {
            problem: format!("head is not a known message: {e}"),
        })?;
    Ok((head, &body[4 + head_len..]))
}

/// Reads one frame (blocking; the stream's timeouts bound it).
pub fn read_frame<H: for<'de> Deserialize<'de>>(
    r: &mut impl Read,
    max: u32,
) -> Result<(H, Vec<u8>), FrameError> {
    let mut prefix = [0u8; 8];
    r.read_exact(&mut prefix)?;
    let len = check_prefix(&prefix, max)?;
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    let (head, payload) = decode_body(&body)?;
    Ok((head, payload.to_vec()))
}

/// Writes one frame.
pub fn write_frame<H: Serialize>(
    w: &mut impl Write,
    head: &H,
    payload: &[u8],
) -> Result<(), FrameError> {
    w.write_all(&encode(head, payload))?;
    w.flush()?;
    Ok(())
}

/// Hex of bytes (salts).
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Bytes of hex; `None` if malformed.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let head = RequestHead::Transact {
            vm: "a".into(),
            target: Target::Cpu(1),
            deadline_ms: 5,
            smi: SmiPath::Auto,
        };
        let f = encode(&head, b"sealed");
        // The default path is not serialized: older daemons (which deny
        // unknown fields) still accept the frames of newer clients.
        assert!(!String::from_utf8_lossy(&f).contains("smi"));
        let (h, p): (RequestHead, _) = read_frame(&mut &f[..], MAX_REQUEST_BODY).unwrap();
        assert_eq!((h, p.as_slice()), (head, &b"sealed"[..]));
        let qmp = RequestHead::Transact {
            vm: "a".into(),
            target: Target::All,
            deadline_ms: 5,
            smi: SmiPath::QmpBroadcast,
        };
        let f = encode(&qmp, b"");
        assert!(String::from_utf8_lossy(&f).contains("\"smi\":\"qmp-broadcast\""));
        let (h, _): (RequestHead, _) = read_frame(&mut &f[..], MAX_REQUEST_BODY).unwrap();
        assert_eq!(h, qmp);
        let targeted = RequestHead::Transact {
            vm: "a".into(),
            target: Target::Cpu(2),
            deadline_ms: 5,
            smi: SmiPath::QmpTargeted,
        };
        let f = encode(&targeted, b"");
        assert!(String::from_utf8_lossy(&f).contains("\"smi\":\"qmp-targeted\""));
        let (h, _): (RequestHead, _) = read_frame(&mut &f[..], MAX_REQUEST_BODY).unwrap();
        assert_eq!(h, targeted);
        let err = ReplyHead::Error {
            error: DaemonError::Busy {
                vm: "a".into(),
                capacity: 3,
            },
        };
        let f = encode(&err, b"");
        let (h, _): (ReplyHead, _) = read_frame(&mut &f[..], MAX_REPLY_BODY).unwrap();
        assert_eq!(h, err);
    }

    #[test]
    fn malformed_frames_are_typed() {
        let mut f = encode(&RequestHead::Status, b"");
        f[0] = b'X';
        let e = read_frame::<RequestHead>(&mut &f[..], MAX_REQUEST_BODY).unwrap_err();
        assert!(
            matches!(e, FrameError::Protocol(DaemonError::Malformed { .. })),
            "{e}"
        );
        let mut big = MAGIC.to_vec();
        big.extend_from_slice(&u32::MAX.to_le_bytes());
        let e = read_frame::<RequestHead>(&mut &big[..], MAX_REQUEST_BODY).unwrap_err();
        assert!(
            matches!(e, FrameError::Protocol(DaemonError::TooLarge { .. })),
            "{e}"
        );
        let f = encode(&serde_json::json!({"op": "nope"}), b"");
        let e = read_frame::<RequestHead>(&mut &f[..], MAX_REQUEST_BODY).unwrap_err();
        assert!(e.to_string().contains("not a known message"), "{e}");
        let f = encode(&RequestHead::Status, b"");
        let e = read_frame::<RequestHead>(&mut &f[..f.len() - 1], MAX_REQUEST_BODY).unwrap_err();
        assert!(matches!(e, FrameError::Io(_)), "truncated: {e}");
        assert_eq!(unhex(&hex(&[1, 0xab])), Some(vec![1, 0xab]));
    }
}
