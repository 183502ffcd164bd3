//! Sealing and opening frames: AES-256-GCM with one key per direction.
//!
//! Keys: `HKDF-SHA256(salt = session salt, ikm = shared key)` expanded with
//! the labels [`LABEL_REQUEST`] and [`LABEL_REPLY`], each followed by the
//! IDS client's 64-bit id (little-endian): every client has its own pair of
//! keys, so clients that share the agent (through the daemon) never share a
//! (key, nonce) pair whatever sequences they pick. The session salt is
//! chosen by the agent at every boot and published in the mailbox header, so
//! the agent's reply counter (which restarts at boot, SMRAM is not
//! persistent) never meets the same key twice. The salt is public and may be
//! forged by the host; a forged salt only makes frames fail to open.
//!
//! Nonces (96 bits): `direction (1 byte) | 3 zero bytes | sequence (u64 LE)`.
//! The IDS's request counter and the agent's reply counter only grow, so a
//! (key, nonce) pair is never used twice as long as the IDS never reuses a
//! request sequence within a session (see [`crate::client`]).
//!
//! Associated data: the 32-byte frame header (version, direction, flags, body
//! length, sequence, in-reply-to), so none of it can be changed undetected.

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Key, Nonce, Tag};
use core::ops::Range;
use zeroize::Zeroize;

use crate::layout::SESSION_SALT_LEN;
use crate::wire::{Direction, FRAME_HEADER_LEN, FrameHeader, TAG_LEN, WireError};

/// Length of the shared key.
pub const SHARED_KEY_LEN: usize = 32;
/// HKDF label of the IDS-to-agent key.
pub const LABEL_REQUEST: &[u8] = b"smmvmi mailbox v1 request ids->agent";
/// HKDF label of the agent-to-IDS key.
pub const LABEL_REPLY: &[u8] = b"smmvmi mailbox v1 reply agent->ids";

/// Errors of the crypto module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// The frame could not be parsed.
    #[error("sealed frame is malformed: {0}")]
    Wire(#[from] WireError),
    /// The frame direction is not the one this side opens.
    #[error(
        "frame direction must be {expected:?}, found {found:?}: a frame was sent the wrong way or replayed across directions"
    )]
    WrongDirection {
        /// Expected.
        expected: Direction,
        /// Found.
        found: Direction,
    },
    /// Authentication failed.
    #[error(
        "frame failed authentication (GCM tag mismatch): it was tampered with, sealed with another key or session salt, or truncated"
    )]
    BadTag,
    /// The frame buffer does not match the header's length.
    #[error(
        "frame buffer must be exactly {expected} bytes (header + body + tag), found {found}: pass exactly one frame"
    )]
    Length {
        /// Expected.
        expected: usize,
        /// Found.
        found: usize,
    },
}

/// The two direction keys of one client's session.
pub struct SessionKeys {
    request: Aes256Gcm,
    reply: Aes256Gcm,
    client: u64,
}

impl core::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("SessionKeys(..)")
    }
}

impl SessionKeys {
    /// Derives both direction keys of client 0 (tests and single-client
    /// tools; an IDS that may share the agent uses [`SessionKeys::derive_for`]
    /// with a random id).
    pub fn derive(shared: &[u8; SHARED_KEY_LEN], salt: &[u8; SESSION_SALT_LEN]) -> Self {
        Self::derive_for(shared, salt, 0)
    }

    /// Derives both direction keys of `client` from the shared key and the
    /// session salt.
    pub fn derive_for(
        shared: &[u8; SHARED_KEY_LEN],
        salt: &[u8; SESSION_SALT_LEN],
        client: u64,
    ) -> Self {
        let mut keys = direction_keys(shared, salt, client);
        let [request, reply] = &keys;
        let out = Self {
            request: Aes256Gcm::new(&Key::<Aes256Gcm>::from(*request)),
            reply: Aes256Gcm::new(&Key::<Aes256Gcm>::from(*reply)),
            client,
        };
        keys.zeroize();
        out
    }

    /// The client these keys belong to.
    pub fn client(&self) -> u64 {
        self.client
    }

    fn key(&self, dir: Direction) -> &Aes256Gcm {
        match dir {
            Direction::Request | Direction::PlainRequest => &self.request,
            Direction::Reply | Direction::PlainReply => &self.reply,
        }
    }
}

/// The raw request and reply keys of `client`'s session:
/// HKDF-SHA256(salt = session salt, ikm = shared key), info = the direction's
/// label followed by the client id (u64 LE). The caller zeroizes them; tests
/// use them to check that no copy is left in guest memory.
pub fn direction_keys(
    shared: &[u8; SHARED_KEY_LEN],
    salt: &[u8; SESSION_SALT_LEN],
    client: u64,
) -> [[u8; 32]; 2] {
    let hk = hkdf::Hkdf::<smmvmi_sha2::Sha256>::new(Some(salt), shared);
    let mut keys = [[0u8; 32]; 2];
    let id = client.to_le_bytes();
    // 32 bytes is far below HKDF-SHA256's 255*32 limit.
    let _ = hk.expand_multi_info(&[LABEL_REQUEST, &id], &mut keys[0]);
    let _ = hk.expand_multi_info(&[LABEL_REPLY, &id], &mut keys[1]);
    keys
}

/// The 96-bit nonce of a frame.
pub fn nonce(dir: Direction, seq: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[0] = dir as u8;
    n[4..].copy_from_slice(&seq.to_le_bytes());
    n
}

/// Seals a frame in place. `frame` must be exactly header + body + tag; the
/// header is written from `header` (whose `body_len` must match), the body
/// holds the plaintext and is encrypted in place, the tag is written at the
/// end. Returns the tag.
pub fn seal_in_place(
    keys: &SessionKeys,
    header: &FrameHeader,
    frame: &mut [u8],
) -> Result<[u8; TAG_LEN], CryptoError> {
    let expected = header.frame_len();
    if frame.len() != expected {
        return Err(CryptoError::Length {
            expected,
            found: frame.len(),
        });
    }
    let hdr = header.encode();
    frame[..FRAME_HEADER_LEN].copy_from_slice(&hdr);
    let (body, tag_out) = frame[FRAME_HEADER_LEN..].split_at_mut(header.body_len as usize);
    let n = Nonce::<aes_gcm::aead::consts::U12>::from(nonce(header.direction, header.seq));
    let tag = keys
        .key(header.direction)
        .encrypt_inout_detached(&n, &hdr, body.into())
        .map_err(|_| CryptoError::Length {
            expected: u32::MAX as usize,
            found: body.len(),
        })?;
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(&tag);
    tag_out.copy_from_slice(&t);
    Ok(t)
}

/// An opened frame: its header, where the plaintext body is, and its tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    /// The authenticated header.
    pub header: FrameHeader,
    /// Byte range of the (now plaintext) body within the frame.
    pub body: Range<usize>,
    /// The frame's GCM tag (the reply binds it).
    pub tag: [u8; TAG_LEN],
}

/// Opens a frame in place: checks the header, the direction and the length,
/// then authenticates and decrypts the body in place. On failure the body
/// may hold garbage; never use it.
pub fn open_in_place(
    keys: &SessionKeys,
    expected: Direction,
    frame: &mut [u8],
) -> Result<Opened, CryptoError> {
    let header = FrameHeader::parse(frame)?;
    if header.direction != expected {
        return Err(CryptoError::WrongDirection {
            expected,
            found: header.direction,
        });
    }
    let len = header.frame_len();
    if frame.len() != len {
        return Err(CryptoError::Length {
            expected: len,
            found: frame.len(),
        });
    }
    let mut hdr = [0u8; FRAME_HEADER_LEN];
    hdr.copy_from_slice(&frame[..FRAME_HEADER_LEN]);
    let body_end = FRAME_HEADER_LEN + header.body_len as usize;
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(&frame[body_end..]);
    let tag = Tag::<aes_gcm::aead::consts::U16>::from(t);
    let n = Nonce::<aes_gcm::aead::consts::U12>::from(nonce(header.direction, header.seq));
    keys.key(expected)
        .decrypt_inout_detached(
            &n,
            &hdr,
            (&mut frame[FRAME_HEADER_LEN..body_end]).into(),
            &tag,
        )
        .map_err(|_| CryptoError::BadTag)?;
    Ok(Opened {
        header,
        body: FRAME_HEADER_LEN..body_end,
        tag: t,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> SessionKeys {
        SessionKeys::derive(&[7u8; 32], &[9u8; 16])
    }

    fn frame(body: &[u8], seq: u64) -> (FrameHeader, [u8; 128]) {
        let h = FrameHeader {
            direction: Direction::Request,
            body_len: body.len() as u32,
            seq,
            in_reply_to: 0,
            flags: 0,
            client: 0,
        };
        let mut f = [0u8; 128];
        f[FRAME_HEADER_LEN..FRAME_HEADER_LEN + body.len()].copy_from_slice(body);
        (h, f)
    }

    #[test]
    fn seal_open_round_trip() {
        let k = keys();
        let (h, mut f) = frame(b"hello agent", 5);
        let n = h.frame_len();
        seal_in_place(&k, &h, &mut f[..n]).unwrap();
        assert_ne!(&f[32..43], b"hello agent");
        let o = open_in_place(&k, Direction::Request, &mut f[..n]).unwrap();
        assert_eq!(&f[o.body], b"hello agent");
        assert_eq!(o.header, h);
    }

    #[test]
    fn directions_use_different_keys() {
        let k = keys();
        let (mut h, mut f) = frame(b"x", 1);
        h.direction = Direction::Reply;
        let n = h.frame_len();
        seal_in_place(&k, &h, &mut f[..n]).unwrap();
        // Relabel as a request: header is AAD and the key differs.
        f[2] = Direction::Request as u8;
        assert_eq!(
            open_in_place(&k, Direction::Request, &mut f[..n]),
            Err(CryptoError::BadTag)
        );
    }

    #[test]
    fn other_salt_fails() {
        let (h, mut f) = frame(b"abc", 1);
        let n = h.frame_len();
        seal_in_place(&keys(), &h, &mut f[..n]).unwrap();
        let other = SessionKeys::derive(&[7u8; 32], &[8u8; 16]);
        assert_eq!(
            open_in_place(&other, Direction::Request, &mut f[..n]),
            Err(CryptoError::BadTag)
        );
    }

    #[test]
    fn nonce_layout() {
        let n = nonce(Direction::Reply, 0x0102030405060708);
        assert_eq!(n, [2, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1]);
    }
}
