//! The IDS side: seal requests, open replies, and the mailbox hand-shake as
//! seen from the host.
//!
//! A [`Client`] holds the session keys, the next request sequence and the
//! last reply sequence it accepted. It keeps one request in flight and
//! accepts a reply only if it (a) authenticates under the reply key, (b)
//! answers the pending request (`in_reply_to`, echoed sequence, the request's
//! GCM tag and the fresh IDS nonce), and (c) carries a reply sequence greater
//! than any reply accepted before. So a replayed, reordered or tampered reply
//! is an error, never data.
//!
//! Keys: derive [`SessionKeys`] from the shared key and the session salt the
//! agent publishes in the header ([`crate::header::Header::session_salt`]); when the salt
//! changes (the VM rebooted) build a new [`Client`]. A forged salt only makes
//! replies fail to open.
//!
//! Nonce discipline: within one session (one agent boot, see
//! [`crate::crypto`]) the IDS must never reuse a request sequence. A fresh
//! [`Client`] should start at a sequence above anything used before in the
//! session, e.g. the current time in nanoseconds since the Unix epoch, or a
//! persisted counter. The agent rejects sequences that do not grow.

use core::sync::atomic::{Ordering, compiler_fence};

use crate::crypto::{self, CryptoError, SessionKeys};
use crate::layout::{self, Areas, HEADER_SIZE, ServeStatus};
use crate::shared::{AccessError, SharedMemory};
use crate::wire::{
    self, Direction, FRAME_HEADER_LEN, FrameHeader, IDS_NONCE_LEN, Op, REPLY_FLAG_UNAUTHENTICATED,
    ReplyBody, TAG_LEN, WireError,
};

/// Errors of the client module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// Encoding or parsing failed.
    #[error("mailbox frame: {0}")]
    Wire(#[from] WireError),
    /// Sealing or opening failed.
    #[error("mailbox crypto: {0}")]
    Crypto(#[from] CryptoError),
    /// No request is in flight.
    #[error(
        "a reply arrived but no request is pending: seal a request first (or this is a replayed reply)"
    )]
    NoPending,
    /// The reply answers another request.
    #[error(
        "reply must answer request {expected}, found a reply to {found}: a stale or reordered reply; ignore it and keep waiting"
    )]
    WrongRequest {
        /// Pending request sequence.
        expected: u64,
        /// What the reply says it answers.
        found: u64,
    },
    /// The reply sequence did not grow.
    #[error("reply sequence must be greater than {last}, found {found}: an old reply was replayed")]
    ReplayedReply {
        /// Last accepted reply sequence.
        last: u64,
        /// Sequence found.
        found: u64,
    },
    /// The authenticated body does not bind the pending request.
    #[error(
        "reply must echo the pending request's {what}, found another: the reply was made for another request; treat as an attack"
    )]
    Unbound {
        /// Which binding failed.
        what: &'static str,
    },
    /// The reply is plain: the agent has no key.
    #[error(
        "reply is plain and unauthenticated (the agent is unprovisioned): provision the key; its content proves nothing"
    )]
    Unauthenticated,
    /// The request sequence space is exhausted.
    #[error("request sequence exhausted (u64): start a new session (reboot the agent)")]
    SequenceExhausted,
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    seq: u64,
    tag: [u8; TAG_LEN],
    ids_nonce: [u8; IDS_NONCE_LEN],
}

/// The IDS end of a session.
#[derive(Debug)]
pub struct Client {
    keys: SessionKeys,
    next_seq: u64,
    last_reply_seq: u64,
    pending: Option<Pending>,
}

impl Client {
    /// A client whose first request will carry sequence `first_seq`
    /// (0 is taken as 1). See the module docs for choosing it.
    pub fn new(keys: SessionKeys, first_seq: u64) -> Self {
        Self {
            keys,
            next_seq: first_seq.max(1),
            last_reply_seq: 0,
            pending: None,
        }
    }

    /// This client's id (the one its keys were derived for).
    pub fn id(&self) -> u64 {
        self.keys.client()
    }

    /// The sequence the next request will carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Sequence of the request in flight, if any.
    pub fn pending_seq(&self) -> Option<u64> {
        self.pending.map(|p| p.seq)
    }

    /// Frame length of a request with `n_ops` ops.
    pub fn request_frame_len(n_ops: usize) -> usize {
        wire::FRAME_OVERHEAD + wire::request_body_len(n_ops)
    }

    /// Seals a request carrying `ops` into `out`; returns the frame length.
    /// `ids_nonce` must be fresh random bytes (getrandom). The request
    /// becomes the pending one (replacing any earlier pending request, whose
    /// reply will then be rejected).
    pub fn seal_request(
        &mut self,
        ops: &[Op],
        ids_nonce: [u8; IDS_NONCE_LEN],
        out: &mut [u8],
    ) -> Result<usize, ClientError> {
        self.seal_request_with(ops, ids_nonce, 0, out)
    }

    /// [`Client::seal_request`] with frame `flags` (e.g.
    /// [`crate::frame::FLAG_NO_SNAPSHOT`] for a request one CPU can serve
    /// alone, sent with a targeted SMI).
    pub fn seal_request_with(
        &mut self,
        ops: &[Op],
        ids_nonce: [u8; IDS_NONCE_LEN],
        flags: u8,
        out: &mut [u8],
    ) -> Result<usize, ClientError> {
        let seq = self.next_seq;
        let next = seq.checked_add(1).ok_or(ClientError::SequenceExhausted)?;
        let body_len = wire::request_body_len(ops.len());
        let frame_len = wire::FRAME_OVERHEAD + body_len;
        let found = out.len();
        let frame = out.get_mut(..frame_len).ok_or(WireError::NoSpace {
            expected: frame_len,
            found,
        })?;
        wire::encode_request_body(&ids_nonce, ops, &mut frame[FRAME_HEADER_LEN..])?;
        let header = FrameHeader {
            direction: Direction::Request,
            body_len: body_len as u32,
            seq,
            in_reply_to: 0,
            flags,
            client: self.keys.client(),
        };
        let tag = crypto::seal_in_place(&self.keys, &header, frame)?;
        // Consume the sequence even if the caller never sends the frame.
        self.next_seq = next;
        self.pending = Some(Pending {
            seq,
            tag,
            ids_nonce,
        });
        Ok(frame_len)
    }

    /// Opens a reply in place. `buf` may be longer than the frame (e.g. the
    /// whole reply area); the frame length comes from its header and is
    /// bounded by `buf`. On success the pending request is answered and the
    /// reply sequence recorded.
    pub fn open_reply<'a>(&mut self, buf: &'a mut [u8]) -> Result<ReplyBody<'a>, ClientError> {
        let pending = self.pending.ok_or(ClientError::NoPending)?;
        let header = FrameHeader::parse_bounded(buf, buf.len())?;
        if header.direction == Direction::PlainReply {
            return Err(ClientError::Unauthenticated);
        }
        if header.direction != Direction::Reply {
            return Err(CryptoError::WrongDirection {
                expected: Direction::Reply,
                found: header.direction,
            }
            .into());
        }
        if header.client != self.keys.client() {
            return Err(ClientError::Unbound { what: "client id" });
        }
        if header.in_reply_to != pending.seq {
            return Err(ClientError::WrongRequest {
                expected: pending.seq,
                found: header.in_reply_to,
            });
        }
        if header.seq <= self.last_reply_seq {
            return Err(ClientError::ReplayedReply {
                last: self.last_reply_seq,
                found: header.seq,
            });
        }
        let frame = &mut buf[..header.frame_len()];
        let opened = crypto::open_in_place(&self.keys, Direction::Reply, frame)?;
        let body = ReplyBody::parse(&buf[opened.body])?;
        if body.request_seq != pending.seq {
            return Err(ClientError::Unbound { what: "sequence" });
        }
        if body.request_tag != pending.tag {
            return Err(ClientError::Unbound { what: "GCM tag" });
        }
        if body.ids_nonce != pending.ids_nonce {
            return Err(ClientError::Unbound { what: "IDS nonce" });
        }
        if body.flags & REPLY_FLAG_UNAUTHENTICATED != 0 {
            return Err(ClientError::Unauthenticated);
        }
        self.last_reply_seq = header.seq;
        self.pending = None;
        Ok(body)
    }
}

/// Encodes a plain INFO request (for an unprovisioned agent) into `out`;
/// returns its length.
pub fn encode_plain_info_request(out: &mut [u8]) -> Result<usize, WireError> {
    let body_len = wire::request_body_len(1);
    let len = wire::FRAME_OVERHEAD + body_len;
    let found = out.len();
    let frame = out.get_mut(..len).ok_or(WireError::NoSpace {
        expected: len,
        found,
    })?;
    frame.fill(0);
    wire::encode_request_body(
        &[0; IDS_NONCE_LEN],
        &[Op::Info],
        &mut frame[FRAME_HEADER_LEN..],
    )?;
    frame[..FRAME_HEADER_LEN].copy_from_slice(
        &FrameHeader {
            direction: Direction::PlainRequest,
            body_len: body_len as u32,
            seq: 0,
            in_reply_to: 0,
            flags: 0,
            client: 0,
        }
        .encode(),
    );
    Ok(len)
}

/// Parses a plain (unauthenticated) reply of an unprovisioned agent. Its
/// content proves nothing; use it for diagnostics only.
pub fn parse_plain_reply(buf: &[u8]) -> Result<ReplyBody<'_>, ClientError> {
    let header = FrameHeader::parse_bounded(buf, buf.len())?;
    if header.direction != Direction::PlainReply {
        return Err(CryptoError::WrongDirection {
            expected: Direction::PlainReply,
            found: header.direction,
        }
        .into());
    }
    let body = &buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + header.body_len as usize];
    Ok(ReplyBody::parse(body)?)
}

/// Host side of the hand-shake, step 1: copies `frame` into the request
/// area of `mailbox` and then stores the doorbell (must be non-zero and
/// differ from the previous one; the request sequence is the natural
/// choice). The caller raises the SMI afterwards. x86 does not reorder the
/// doorbell store before the frame's stores; the release fence keeps the
/// compiler from doing so.
pub fn post_request<S: SharedMemory>(
    mailbox: &S,
    frame: &[u8],
    doorbell: u64,
) -> Result<(), PostError<S::Error>> {
    let areas =
        check_post(mailbox.size(), frame.len(), doorbell).map_err(PostError::with_access)?;
    mailbox
        .copy_in(areas.request.start, frame)
        .map_err(PostError::Access)?;
    compiler_fence(Ordering::Release);
    mailbox
        .store_u64(layout::OFF_REQ_DOORBELL, doorbell)
        .map_err(PostError::Access)
}

/// Checks, without touching the mailbox, that a frame of `frame_len` bytes
/// with `doorbell` can be posted to a mailbox of `size` bytes; returns its
/// areas.
pub fn check_post(size: usize, frame_len: usize, doorbell: u64) -> Result<Areas, PostError> {
    let areas = Areas::from_size(size).map_err(PostError::Layout)?;
    if frame_len > areas.request_capacity() {
        return Err(PostError::TooLarge {
            capacity: areas.request_capacity(),
            found: frame_len,
        });
    }
    if doorbell == 0 {
        return Err(PostError::ZeroDoorbell);
    }
    Ok(areas)
}

/// What the host sees when it polls for the reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Poll {
    /// The agent has not finished this doorbell yet.
    Pending,
    /// The agent finished: its (unauthenticated) status word and the reply
    /// frame length it claims (bounded by the reply area).
    Done {
        /// Raw serve status ([`ServeStatus::from_raw`]).
        status: u32,
        /// Claimed reply frame length in bytes, clamped to the reply area.
        reply_len: usize,
    },
}

impl Poll {
    /// The status word, decoded.
    pub fn status(&self) -> Option<ServeStatus> {
        match self {
            Poll::Pending => None,
            Poll::Done { status, .. } => ServeStatus::from_raw(*status),
        }
    }
}

/// Host side, step 3: checks whether the agent served `doorbell`. Loads the
/// done word first and the status and length after it (the agent stores
/// them before the done word). A mailbox of unsupported size never
/// completes.
pub fn poll_reply<S: SharedMemory>(mailbox: &S, doorbell: u64) -> Result<Poll, S::Error> {
    let Ok(areas) = Areas::from_size(mailbox.size()) else {
        return Ok(Poll::Pending);
    };
    if mailbox.load_u64(layout::OFF_REPLY_DONE)? != doorbell {
        return Ok(Poll::Pending);
    }
    compiler_fence(Ordering::Acquire);
    let status = mailbox.load_u32(layout::OFF_SERVE_STATUS)?;
    let reply_len = mailbox.load_u32(layout::OFF_REPLY_LEN)? as usize;
    Ok(Poll::Done {
        status,
        reply_len: reply_len.min(areas.reply_capacity()),
    })
}

/// Copies the first `out.len()` bytes of the reply area (at most its
/// capacity) out of the mailbox, once; returns how many were copied. Open
/// the copy, never the mailbox: the guest can change it at any time.
pub fn copy_reply<S: SharedMemory>(mailbox: &S, out: &mut [u8]) -> Result<usize, S::Error> {
    let areas = Areas::from_size(mailbox.size()).map_err(|_| AccessError::OutOfBounds {
        off: HEADER_SIZE,
        len: out.len(),
        size: mailbox.size(),
    })?;
    let n = out.len().min(areas.reply_capacity());
    mailbox.copy_out(areas.reply.start, &mut out[..n])?;
    Ok(n)
}

/// Errors of [`post_request`]; `E` is the mailbox's access error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PostError<E = core::convert::Infallible> {
    /// The mailbox has an unsupported size.
    #[error("mailbox layout: {0}")]
    Layout(layout::LayoutError),
    /// The frame does not fit the request area.
    #[error(
        "request frame must fit the request area of {capacity} bytes, found {found}: send fewer ops per request"
    )]
    TooLarge {
        /// Request area capacity in bytes.
        capacity: usize,
        /// Frame length in bytes.
        found: usize,
    },
    /// The doorbell value 0 means "nothing posted".
    #[error("doorbell must be non-zero, found 0: use the request sequence")]
    ZeroDoorbell,
    /// Writing the mailbox failed.
    #[error("mailbox access: {0}")]
    Access(E),
}

impl PostError {
    /// The same contract error for a mailbox with access errors `E`.
    pub fn with_access<E>(self) -> PostError<E> {
        match self {
            PostError::Layout(e) => PostError::Layout(e),
            PostError::TooLarge { capacity, found } => PostError::TooLarge { capacity, found },
            PostError::ZeroDoorbell => PostError::ZeroDoorbell,
            PostError::Access(never) => match never {},
        }
    }
}

impl<E> PostError<E> {
    /// Splits an access failure (`Err(E)`) from a contract error (`Ok`).
    pub fn into_contract(self) -> Result<PostError, E> {
        match self {
            PostError::Layout(e) => Ok(PostError::Layout(e)),
            PostError::TooLarge { capacity, found } => Ok(PostError::TooLarge { capacity, found }),
            PostError::ZeroDoorbell => Ok(PostError::ZeroDoorbell),
            PostError::Access(e) => Err(e),
        }
    }
}

#[cfg(feature = "std")]
mod host {
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use crate::wire::{OpResult, Status};

    /// An owned result (host convenience).
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct OwnedResult {
        /// Raw kind byte.
        pub kind: u8,
        /// Status.
        pub status: Status,
        /// Paging level where a walk stopped.
        pub level: u8,
        /// See [`OpResult::aux`].
        pub aux: u64,
        /// Data.
        pub data: Vec<u8>,
    }

    impl From<OpResult<'_>> for OwnedResult {
        fn from(r: OpResult<'_>) -> Self {
            Self {
                kind: r.kind,
                status: r.status,
                level: r.level,
                aux: r.aux,
                data: r.data.to_vec(),
            }
        }
    }

    impl Client {
        /// [`Client::seal_request`] into a new Vec.
        pub fn seal_request_vec(
            &mut self,
            ops: &[Op],
            ids_nonce: [u8; IDS_NONCE_LEN],
        ) -> Result<Vec<u8>, ClientError> {
            let mut v = std::vec![0u8; Self::request_frame_len(ops.len())];
            let n = self.seal_request(ops, ids_nonce, &mut v)?;
            v.truncate(n);
            Ok(v)
        }

        /// [`Client::open_reply`] on a copy; returns owned results.
        pub fn open_reply_vec(&mut self, reply: &[u8]) -> Result<Vec<OwnedResult>, ClientError> {
            let mut buf = reply.to_vec();
            let body = self.open_reply(&mut buf)?;
            Ok(body.results().map(OwnedResult::from).collect())
        }
    }
}

#[cfg(feature = "std")]
pub use host::OwnedResult;
