//! The ivshmem server protocol (QEMU `docs/specs/ivshmem-spec.rst`), server
//! side: the daemon creates the mailbox memory and the interrupt eventfds and
//! hands them to QEMU's `ivshmem-doorbell` device over a unix socket.
//!
//! Each message is one little-endian `i64`, optionally with one file
//! descriptor (SCM_RIGHTS). On connect the server sends: the protocol version
//! (0); the new peer's id; `-1` with the shared-memory fd; for every other
//! peer its id with one eventfd per vector; the new peer's own id with one
//! eventfd per vector. QEMU waits on its own vectors' eventfds: writing 1 to
//! one fires that MSI-X vector in the guest (the agent programs the vectors
//! with SMI delivery mode). The daemon is itself a peer ([`DAEMON_PEER`])
//! whose vector [`RING_VECTOR`] eventfd QEMU signals when the guest writes
//! `(peer << 16) | vector` to the device's Doorbell register.
//!
//! What it trusts: nothing QEMU sends (QEMU sends nothing; a byte from it is
//! a protocol error). What it must never do: block on a peer (the messages
//! are a few hundred bytes in a fresh socket buffer; a full buffer is an
//! error, not a wait).

use std::fs::File;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use smmvmi_mailbox::SharedMemory as _;
use smmvmi_mailbox::layout::{self, RING_VECTOR};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::mailbox_file::{MailboxFile, MailboxFileError};

/// Protocol version this server speaks.
pub const PROTOCOL_VERSION: i64 = 0;
/// The daemon's own peer id (QEMU peers get ids from 1 up).
pub const DAEMON_PEER: u16 = 0;
/// Largest peer id QEMU accepts (`IVSHMEM_MAX_PEERS`).
pub const MAX_PEER_ID: u16 = u16::MAX;
/// Most MSI-X vectors the daemon hands a QEMU peer (1 broadcast + 1 per
/// vCPU up to APIC ID 63, as the agent supports).
pub const MAX_VECTORS: u16 = 65;

/// Errors of the ivshmem server side.
#[derive(Debug, thiserror::Error)]
pub enum IvshmemError {
    /// The shared memory could not be created or sized.
    #[error(
        "ivshmem shared memory {name}: {source} (expected a memfd or a writable file of {size} bytes)"
    )]
    Memory {
        /// memfd name or file path.
        name: String,
        /// Requested size.
        size: usize,
        /// OS error.
        source: std::io::Error,
    },
    /// The size does not suit the mailbox layout.
    #[error("ivshmem shared memory: {0}")]
    Mailbox(#[from] MailboxFileError),
    /// An eventfd could not be created.
    #[error("creating an eventfd for ivshmem vector {vector}: {source} (check RLIMIT_NOFILE)")]
    EventFd {
        /// The vector.
        vector: u16,
        /// OS error.
        source: std::io::Error,
    },
    /// Vector count out of range.
    #[error(
        "ivshmem vectors must be between 1 and {MAX_VECTORS} (1 broadcast + 1 per vCPU), found {found}: give QEMU the same `vectors=N` as the daemon's VM entry"
    )]
    Vectors {
        /// What was configured.
        found: u16,
    },
    /// Sending a message to QEMU failed.
    #[error(
        "sending ivshmem message {value} to QEMU: {source} (QEMU closed the socket during the handshake, or its socket buffer is full)"
    )]
    Send {
        /// The message value.
        value: i64,
        /// OS error.
        source: nix::Error,
    },
}

/// The shared memory behind the mailbox: a memfd (default) or a file.
#[derive(Debug)]
pub struct SharedMemory {
    file: File,
    name: PathBuf,
    size: usize,
}

impl SharedMemory {
    /// A zeroed memfd of `size` bytes named `name` (visible in
    /// /proc/PID/fd as `memfd:NAME`).
    pub fn memfd(name: &str, size: usize) -> Result<Self, IvshmemError> {
        let err = |source: std::io::Error| IvshmemError::Memory {
            name: format!("memfd:{name}"),
            size,
            source,
        };
        let fd: OwnedFd = nix::sys::memfd::memfd_create(
            format!("smmvmi-{name}").as_str(),
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )
        .map_err(|e| err(e.into()))?;
        let file = File::from(fd);
        file.set_len(size as u64).map_err(err)?;
        let shm = Self {
            file,
            name: PathBuf::from(format!("memfd:smmvmi-{name}")),
            size,
        };
        shm.mailbox()?; // checks the size against the layout
        Ok(shm)
    }

    /// A file-backed mailbox (a host admin or a test harness reads it
    /// directly); created (with its directory) if missing, sized to `size`,
    /// contents kept.
    pub fn file(path: &Path, size: usize) -> Result<Self, IvshmemError> {
        let err = |source: std::io::Error| IvshmemError::Memory {
            name: path.display().to_string(),
            size,
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(err)?;
        file.set_len(size as u64).map_err(err)?;
        let shm = Self {
            file,
            name: path.to_path_buf(),
            size,
        };
        shm.mailbox()?;
        Ok(shm)
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// What errors and status call it.
    pub fn name(&self) -> &Path {
        &self.name
    }

    /// The mailbox over this memory (pread/pwrite on a duplicate fd).
    pub fn mailbox(&self) -> Result<MailboxFile, IvshmemError> {
        let dup = self
            .file
            .try_clone()
            .map_err(|source| IvshmemError::Memory {
                name: self.name.display().to_string(),
                size: self.size,
                source,
            })?;
        Ok(MailboxFile::from_file(dup, &self.name)?)
    }

    /// Zeroes the header, so that nothing from a previous boot (state Ready,
    /// SMI broadcast, doorbell feature) survives into a new QEMU: a monitor
    /// SMI before the new firmware negotiates broadcast crashes QEMU 7.2.
    pub fn clear_header(&self) -> Result<(), IvshmemError> {
        Ok(self.mailbox()?.copy_in(0, &[0u8; layout::HEADER_SIZE])?)
    }
}

impl AsFd for SharedMemory {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// One eventfd per MSI-X vector of one peer.
#[derive(Debug)]
pub struct Vectors {
    fds: Vec<EventFd>,
}

impl Vectors {
    /// `n` fresh non-blocking eventfds.
    pub fn new(n: u16) -> Result<Self, IvshmemError> {
        if n == 0 || n > MAX_VECTORS {
            return Err(IvshmemError::Vectors { found: n });
        }
        let fds = (0..n)
            .map(|vector| {
                EventFd::new(EFD_NONBLOCK)
                    .map_err(|source| IvshmemError::EventFd { vector, source })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { fds })
    }

    /// Number of vectors.
    pub fn len(&self) -> u16 {
        self.fds.len() as u16
    }

    /// Always false (at least one vector).
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// The eventfd of `vector`.
    pub fn get(&self, vector: u16) -> Option<&EventFd> {
        self.fds.get(vector as usize)
    }

    /// Makes the owner of these vectors see an interrupt on `vector`.
    pub fn fire(&self, vector: u16) -> Option<std::io::Result<()>> {
        self.get(vector).map(|e| e.write(1))
    }
}

/// Sends one protocol message, with `fd` attached when given.
pub fn send_message(
    sock: BorrowedFd<'_>,
    value: i64,
    fd: Option<BorrowedFd<'_>>,
) -> Result<(), IvshmemError> {
    let bytes = value.to_le_bytes();
    let iov = [IoSlice::new(&bytes)];
    let raw = fd.map(|f| [f.as_raw_fd()]);
    let cmsgs: Vec<ControlMessage<'_>> = match &raw {
        Some(r) => vec![ControlMessage::ScmRights(r)],
        None => Vec::new(),
    };
    let sent = sendmsg::<()>(
        sock.as_raw_fd(),
        &iov,
        &cmsgs,
        MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
        None,
    )
    .map_err(|source| IvshmemError::Send { value, source })?;
    if sent != bytes.len() {
        return Err(IvshmemError::Send {
            value,
            source: nix::Error::EMSGSIZE,
        });
    }
    Ok(())
}

/// The whole greeting of a newly connected QEMU peer `peer`: version, its
/// id, the shared memory, the daemon peer's ring eventfd (vector
/// [`RING_VECTOR`]), and its own vector eventfds.
pub fn greet(
    sock: BorrowedFd<'_>,
    peer: u16,
    shm: &SharedMemory,
    daemon_ring: &EventFd,
    own: &Vectors,
) -> Result<(), IvshmemError> {
    send_message(sock, PROTOCOL_VERSION, None)?;
    send_message(sock, i64::from(peer), None)?;
    send_message(sock, -1, Some(shm.as_fd()))?;
    // The daemon peer's eventfds, in vector order: only up to RING_VECTOR
    // (QEMU refuses more eventfds than it has vectors).
    debug_assert_eq!(RING_VECTOR, 0);
    // SAFETY: the raw fd belongs to `daemon_ring`, which outlives this
    // borrow (it is borrowed for the duration of the call).
    let ring = unsafe { BorrowedFd::borrow_raw(daemon_ring.as_raw_fd()) };
    send_message(sock, i64::from(DAEMON_PEER), Some(ring))?;
    for v in 0..own.len() {
        let e = own.get(v).expect("v < len");
        // SAFETY: as above, the eventfd is owned by `own`, borrowed here.
        let fd = unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) };
        send_message(sock, i64::from(peer), Some(fd))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{ControlMessageOwned, recvmsg};
    use std::io::IoSliceMut;
    use std::os::fd::FromRawFd;
    use std::os::unix::net::UnixStream;

    fn recv(sock: &UnixStream) -> (i64, Option<OwnedFd>) {
        let mut b = [0u8; 8];
        let mut iov = [IoSliceMut::new(&mut b)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )
        .unwrap();
        assert_eq!(msg.bytes, 8);
        let mut fd = None;
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(fds) = c {
                // SAFETY: the kernel just installed this fd for us; we own it.
                fd = Some(unsafe { OwnedFd::from_raw_fd(fds[0]) });
            }
        }
        (i64::from_le_bytes(b), fd)
    }

    #[test]
    fn greeting_follows_the_spec_and_fds_work() {
        let (a, b) = UnixStream::pair().unwrap();
        let shm = SharedMemory::memfd("test", 1 << 20).unwrap();
        let ring = EventFd::new(EFD_NONBLOCK).unwrap();
        let own = Vectors::new(3).unwrap();
        greet(a.as_fd(), 7, &shm, &ring, &own).unwrap();
        let (version, none) = recv(&b);
        assert_eq!((version, none.is_none()), (0, true));
        let (id, none) = recv(&b);
        assert_eq!((id, none.is_none()), (7, true));
        let (m, shmfd) = recv(&b);
        assert_eq!(m, -1);
        let f = File::from(shmfd.unwrap());
        assert_eq!(f.metadata().unwrap().len(), 1 << 20);
        // Memory written through the received fd is the daemon's mailbox.
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"SMMVMIMB", 0).unwrap();
        let mut magic = [0u8; 8];
        shm.mailbox().unwrap().copy_out(0, &mut magic).unwrap();
        assert_eq!(&magic, b"SMMVMIMB");
        shm.clear_header().unwrap();
        shm.mailbox().unwrap().copy_out(0, &mut magic).unwrap();
        assert_eq!(magic, [0; 8]);
        // Daemon peer's ring eventfd: a write through the received copy is
        // seen by the daemon.
        let (p, ringfd) = recv(&b);
        assert_eq!(p, i64::from(DAEMON_PEER));
        let received = File::from(ringfd.unwrap());
        use std::io::Write;
        (&received).write_all(&1u64.to_le_bytes()).unwrap();
        assert_eq!(ring.read().unwrap(), 1);
        // Own vectors, in order: firing vector 2 is seen on the third fd.
        let mut own_fds = Vec::new();
        for _ in 0..3 {
            let (p, fd) = recv(&b);
            assert_eq!(p, 7);
            own_fds.push(File::from(fd.unwrap()));
        }
        own.fire(2).unwrap().unwrap();
        use std::io::Read;
        let mut v = [0u8; 8];
        (&own_fds[2]).read_exact(&mut v).unwrap();
        assert_eq!(u64::from_le_bytes(v), 1);
        assert!(own.fire(3).is_none());
    }

    #[test]
    fn vector_counts_are_checked() {
        assert!(
            Vectors::new(0)
                .unwrap_err()
                .to_string()
                .contains("vectors=N")
        );
        assert!(Vectors::new(MAX_VECTORS + 1).is_err());
        let e = SharedMemory::memfd("small", 100).unwrap_err().to_string();
        assert!(e.contains("mailbox size must be between"), "{e}");
    }
}
