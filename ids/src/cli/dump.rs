//! `ids dump`: writes a [`Plan`] (raw, LiME or ELF core) piece by piece,
//! reading the RAM pieces through the agent with [`super::read::stream`]
//! (unreadable pages zero-filled and listed), checkpointing the resume
//! [`State`] every [`CHECKPOINT`] bytes, on Ctrl-C and on a failed request.
//! `--resume` truncates the file to the last checkpoint and goes on.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::AtomicBool;

use ids::SessionError;
use ids::acquire::{Piece, Plan, STATE_VERSION, State, from_hex, state_path};
use smmvmi_mailbox::client::OwnedResult;

use super::errors::{CliError, Exit};
use super::read::{Holes, Sink, Space};

/// Bytes written between two resume checkpoints.
pub const CHECKPOINT: u64 = 32 << 20;

/// How a dump run ended.
pub struct Ran {
    /// The state as last saved (or final).
    pub state: State,
    /// RAM bytes read in this run.
    pub read: u64,
    /// True if Ctrl-C ended it.
    pub interrupted: bool,
    /// A failed request ended it.
    pub failed: Option<SessionError>,
}

/// The file writer: a buffered file, its position, and the checkpoints.
struct Writer<'a> {
    out: BufWriter<File>,
    path: &'a Path,
    pos: u64,
    state: &'a mut State,
    last_checkpoint: u64,
}

impl Writer<'_> {
    fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.out.write_all(b)?;
        self.pos += b.len() as u64;
        if self.pos - self.last_checkpoint >= CHECKPOINT {
            self.checkpoint()?;
        }
        Ok(())
    }

    fn checkpoint(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        self.state.done = self.pos;
        self.state.save(self.path)?;
        self.last_checkpoint = self.pos;
        Ok(())
    }
}

impl Sink for Writer<'_> {
    fn data(&mut self, _addr: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.put(bytes)
    }

    fn hole(&mut self, addr: u64, len: u64, reason: &str, _: Holes) -> std::io::Result<()> {
        self.state.holes.push((addr, len, reason.to_string()));
        let zeros = [0u8; 4096];
        let mut left = len;
        while left > 0 {
            let n = left.min(4096);
            self.put(&zeros[..n as usize])?;
            left -= n;
        }
        Ok(())
    }
}

/// Starts or resumes the dump `plan` into `path`: `fetch` reads one chunk
/// of at most `max` bytes of guest-physical memory; `space` bounds the
/// holes; `progress` gets the file position.
#[allow(clippy::too_many_arguments)]
pub fn run(
    path: &Path,
    plan: Plan,
    resume: Option<State>,
    space: &Space,
    max: u64,
    stop: &AtomicBool,
    mut fetch: impl FnMut(u64, u32) -> Result<OwnedResult, SessionError>,
    progress: &dyn Fn(u64),
) -> anyhow::Result<Ran> {
    let io = |what: &str, e: std::io::Error| {
        CliError::new(Exit::Failure, format!("{what} {}: {e}", path.display()))
    };
    let (file, mut state) = match resume {
        Some(mut st) => {
            let mut f = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| io("cannot open", e))?;
            f.set_len(st.done).map_err(|e| io("cannot truncate", e))?;
            f.seek(SeekFrom::Start(st.done))
                .map_err(|e| io("cannot seek in", e))?;
            st.resumed += 1;
            (f, st)
        }
        None => {
            if state_path(path).exists() {
                return Err(CliError::usage(
                    format!(
                        "{} is a dump in progress (its resume state {} exists)",
                        path.display(),
                        state_path(path).display()
                    ),
                    "continue it with --resume, or remove both files to start again",
                )
                .into());
            }
            let f = File::create(path).map_err(|e| io("cannot create", e))?;
            let st = State {
                version: STATE_VERSION,
                plan,
                done: 0,
                holes: Vec::new(),
                started: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                resumed: 0,
            };
            (f, st)
        }
    };
    let pieces = state.plan.pieces.clone();
    let start = state.done;
    state
        .save(path)
        .map_err(|e| io("cannot write the state of", e))?;
    let mut w = Writer {
        out: BufWriter::with_capacity(4 << 20, file),
        path,
        pos: start,
        state: &mut state,
        last_checkpoint: start,
    };
    let mut read = 0u64;
    let mut interrupted = false;
    let mut failed = None;
    for p in &pieces {
        let end = p.offset() + p.len();
        if end <= w.pos {
            continue;
        }
        let skip = w.pos - p.offset();
        match p {
            Piece::Bytes { hex, .. } => {
                let b = from_hex(hex).ok_or_else(|| {
                    CliError::new(Exit::Failure, "the resume state's header bytes are not hex")
                })?;
                w.put(&b[skip as usize..]).map_err(|e| io("writing", e))?;
                progress(w.pos);
            }
            Piece::Ram { base, len, .. } => {
                let o = super::read::stream(
                    &mut fetch,
                    space,
                    base + skip,
                    len - skip,
                    max,
                    Holes::Zero,
                    stop,
                    &mut w,
                    |c| progress(p.offset() + skip + c),
                )
                .map_err(|e| io("writing", e))?;
                read += o.read;
                if o.interrupted {
                    interrupted = true;
                    break;
                }
                if let Some(e) = o.failed {
                    failed = Some(e);
                    break;
                }
            }
        }
    }
    w.checkpoint().map_err(|e| io("writing", e))?;
    let complete = !interrupted && failed.is_none();
    w.out.get_ref().sync_all().map_err(|e| io("syncing", e))?;
    drop(w);
    if complete {
        let _ = std::fs::remove_file(state_path(path));
    }
    Ok(Ran {
        state,
        read,
        interrupted,
        failed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ids::acquire::Format;
    use smmvmi_mailbox::wire::Status;
    use std::sync::atomic::Ordering;

    fn guest(a: u64, n: u32) -> OwnedResult {
        OwnedResult {
            kind: 1,
            status: Status::Ok,
            level: 0,
            aux: a,
            data: (a..a + u64::from(n)).map(|x| (x * 7 % 251) as u8).collect(),
        }
    }

    fn space(ram: &[(u64, u64)]) -> Space {
        Space::Phys {
            ram: ram.to_vec(),
            smram: (0x7f00_0000, 0x10_0000),
        }
    }

    /// An interrupted dump resumed from its state equals one done at once,
    /// whatever the file held past the checkpoint.
    #[test]
    fn resumed_dump_equals_a_whole_one() {
        let dir = std::env::temp_dir().join(format!("ids-dumpcli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ram = [(0u64, 0x9_f000u64), (0x10_0000, 0x480_0000)];
        let sp = space(&ram);
        let whole = dir.join("whole.lime");
        let plan = Plan::new(Format::Lime, &ram, None, &[]);
        let never = AtomicBool::new(false);
        let r = run(
            &whole,
            plan.clone(),
            None,
            &sp,
            0x10_0000,
            &never,
            |a, n| Ok(guest(a, n)),
            &|_| {},
        )
        .unwrap();
        assert!(!r.interrupted && r.failed.is_none());
        assert!(
            !state_path(&whole).exists(),
            "a complete dump leaves no state"
        );

        let part = dir.join("part.lime");
        let stop = AtomicBool::new(false);
        let mut calls = 0;
        let r = run(
            &part,
            plan.clone(),
            None,
            &sp,
            0x10_0000,
            &stop,
            |a, n| {
                calls += 1;
                if calls == 40 {
                    stop.store(true, Ordering::SeqCst);
                }
                Ok(guest(a, n))
            },
            &|_| {},
        )
        .unwrap();
        assert!(r.interrupted);
        // A second run refuses to start over a dump in progress.
        assert!(
            run(
                &part,
                plan.clone(),
                None,
                &sp,
                0x10_0000,
                &never,
                |a, n| Ok(guest(a, n)),
                &|_| {}
            )
            .is_err()
        );
        // Garbage past the checkpoint (a crash after it) is cut off.
        let mut f = OpenOptions::new().append(true).open(&part).unwrap();
        f.write_all(&[0xAA; 4096]).unwrap();
        let len = std::fs::metadata(&part).unwrap().len();
        let st = State::load_for_resume(&part, Format::Lime, &ram, len).unwrap();
        assert!(st.done > 0);
        let r = run(
            &part,
            plan,
            Some(st),
            &sp,
            0x10_0000,
            &never,
            |a, n| Ok(guest(a, n)),
            &|_| {},
        )
        .unwrap();
        assert_eq!(r.state.resumed, 1);
        assert_eq!(
            std::fs::read(&part).unwrap(),
            std::fs::read(&whole).unwrap()
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
