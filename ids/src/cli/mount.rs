//! `ids mount DIR`: the guest's physical memory as one read-only file,
//! `DIR/mem` (FUSE, through the `fuser` crate's pure-Rust mount, which as
//! root needs no fusermount), so that tools that read a raw memory image —
//! `vol -f DIR/mem` — run unchanged against the live guest.
//!
//! `DIR/mem` is as long as the highest RAM address the agent reports; a
//! byte at file offset X is guest-physical X. Every read goes through the
//! agent (one sealed request per chunk of at most the agent's largest
//! read); bytes outside RAM, and RAM the agent refuses, read as zeros.
//! Each read is one snapshot; the file as a whole is not. The kernel's page
//! cache keeps what one open of the file read (a tool's second scan costs
//! nothing) and drops it at the next open, so each run sees fresh memory.
//! The file is mode 0400, owned by the caller: guest memory holds secrets.

use std::ffi::OsStr;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    FileAttr, FileType, Filesystem, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, Request,
};
use ids::Session;
use smmvmi_mailbox::wire::{Op, Status};

/// Inode of the mount's root directory.
const ROOT: u64 = 1;
/// Inode of `mem`.
const MEM: u64 = 2;
/// How long the kernel may cache attributes.
const TTL: Duration = Duration::from_secs(1);

/// Counters of a mount.
#[derive(Clone, Copy, Debug, Default)]
pub struct MountStats {
    /// FUSE reads served.
    pub reads: u64,
    /// Agent requests (SMIs) made.
    pub requests: u64,
    /// Bytes read from RAM.
    pub bytes: u64,
    /// Reads that failed (silent agent, transport).
    pub failed: u64,
}

/// The file system: one session, the RAM map, the file size.
pub struct MemFs {
    s: Session,
    ram: Vec<(u64, u64)>,
    size: u64,
    max: u64,
    uid: u32,
    gid: u32,
    stats: std::sync::Arc<std::sync::Mutex<MountStats>>,
}

impl MemFs {
    /// A file system over `s` with the agent's `ram` ranges (base, len);
    /// `max` is the agent's largest read; `uid`/`gid` own the files.
    pub fn new(
        s: Session,
        ram: Vec<(u64, u64)>,
        max: u64,
        uid: u32,
        gid: u32,
        stats: std::sync::Arc<std::sync::Mutex<MountStats>>,
    ) -> Self {
        let size = ram.iter().map(|r| r.0 + r.1).max().unwrap_or(0);
        Self {
            s,
            ram,
            size,
            max: max.max(4096),
            uid,
            gid,
            stats,
        }
    }

    /// The file's size (the end of the highest RAM range).
    pub fn size(&self) -> u64 {
        self.size
    }

    fn attr(&self, ino: u64) -> FileAttr {
        let t = UNIX_EPOCH;
        let (kind, perm, size, nlink) = if ino == ROOT {
            (FileType::Directory, 0o500, 0, 2)
        } else {
            (FileType::RegularFile, 0o400, self.size, 1)
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// Reads `[offset, offset + n)` of the file: RAM through the agent,
    /// zeros elsewhere. Errors only when a request fails.
    fn read_at(&mut self, offset: u64, n: u64) -> Result<Vec<u8>, ids::SessionError> {
        let mut out = vec![0u8; n as usize];
        let end = offset + n;
        for &(base, len) in &self.ram.clone() {
            let (lo, hi) = (offset.max(base), end.min(base + len));
            let mut a = lo;
            while a < hi {
                let want = (hi - a).min(self.max);
                let r = self
                    .s
                    .request(&[Op::ReadPhys {
                        addr: a,
                        len: want as u32,
                    }])?
                    .remove(0);
                let mut st = self.stats.lock().expect("stats");
                st.requests += 1;
                let got = (r.data.len() as u64).min(want);
                let at = (a - offset) as usize;
                out[at..at + got as usize].copy_from_slice(&r.data[..got as usize]);
                st.bytes += got;
                // A refused or short read leaves zeros; the next chunk
                // goes on after what was read (or a page further).
                a += match r.status {
                    Status::Ok if got == want => want,
                    _ if got > 0 => got,
                    _ => (4096 - (a & 0xfff)).min(hi - a),
                };
            }
        }
        Ok(out)
    }
}

impl Filesystem for MemFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        if parent == ROOT && name == "mem" {
            reply.entry(&TTL, &self.attr(MEM), 0);
        } else {
            reply.error(libc_enoent());
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match ino {
            ROOT | MEM => reply.attr(&TTL, &self.attr(ino)),
            _ => reply.error(libc_enoent()),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyData,
    ) {
        if ino != MEM || offset < 0 {
            reply.error(libc_enoent());
            return;
        }
        let offset = offset as u64;
        let n = u64::from(size).min(self.size.saturating_sub(offset));
        self.stats.lock().expect("stats").reads += 1;
        match self.read_at(offset, n) {
            Ok(b) => reply.data(&b),
            Err(e) => {
                self.stats.lock().expect("stats").failed += 1;
                eprintln!("ids mount: reading {offset:#x}+{n:#x}: {e}");
                reply.error(5); // EIO
            }
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            reply.error(libc_enoent());
            return;
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (MEM, FileType::RegularFile, "mem"),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as i64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// ENOENT (asm-generic/errno-base.h).
fn libc_enoent() -> i32 {
    2
}
