//! Long reads that stream and degrade gracefully: the range is read in
//! chunks of the agent's largest reply, each chunk handed to a sink as it
//! arrives; an unreadable stretch (an unmapped page, a range that is not
//! RAM) is reported as a hole and stepped over — zero-filled or skipped, as
//! the user chose — instead of ending the read; an interrupt or a failed
//! request ends it with everything read so far kept and the place it got to.

use std::sync::atomic::{AtomicBool, Ordering};

use ids::SessionError;
use smmvmi_mailbox::client::OwnedResult;
use smmvmi_mailbox::wire::Status;

/// What to do with an unreadable stretch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Holes {
    /// Write zeros in its place (offsets in the output stay addresses).
    #[default]
    Zero,
    /// Leave it out of the raw output (the report still lists it).
    Skip,
    /// End the read at the first one.
    Stop,
}

/// Which memory a read is in.
#[derive(Clone, Debug)]
pub enum Space {
    /// Guest-physical: holes end at the next RAM range (`ram`: base, len;
    /// `smram`: base, len).
    Phys {
        /// RAM ranges from INFO.
        ram: Vec<(u64, u64)>,
        /// SMRAM.
        smram: (u64, u64),
    },
    /// Guest-virtual: a hole not present at level L spans that level's
    /// whole entry (4 KiB, 2 MiB, 1 GiB, ...).
    Virt,
}

/// A stretch that was not read.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Hole {
    /// First address.
    #[serde(serialize_with = "hex")]
    pub addr: u64,
    /// Length.
    pub len: u64,
    /// Why, in words.
    pub reason: String,
}

fn hex<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:#x}"))
}

/// Where the bytes go.
pub trait Sink {
    /// Bytes read at `addr`.
    fn data(&mut self, addr: u64, bytes: &[u8]) -> std::io::Result<()>;
    /// A hole of `len` bytes at `addr` (after the policy was applied: for
    /// `Zero` the sink writes zeros, for `Skip` nothing; a hex dump marks it).
    fn hole(&mut self, addr: u64, len: u64, reason: &str, policy: Holes) -> std::io::Result<()>;
}

/// How a read ended.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Bytes asked for.
    pub requested: u64,
    /// Bytes read from the guest.
    pub read: u64,
    /// Bytes covered (read or hole) from the start: where the read got to.
    pub covered: u64,
    /// Unreadable stretches, merged when adjacent and alike.
    pub holes: Vec<Hole>,
    /// SIGINT ended it.
    pub interrupted: bool,
    /// A hole ended it (`--holes stop`).
    pub stopped: bool,
    /// A request failed (silent agent, ...): the read ended there.
    pub failed: Option<SessionError>,
}

impl Outcome {
    /// True if everything asked for was read.
    pub fn complete(&self) -> bool {
        self.read == self.requested && self.failed.is_none() && !self.interrupted
    }
}

/// Reads `len` bytes at `addr` in chunks of at most `max` through `fetch`
/// (one op per request: `fetch(addr, len)` returns the agent's result),
/// feeding `sink`; `progress` gets the bytes covered so far; `stop` is
/// polled between chunks.
#[allow(clippy::too_many_arguments)]
pub fn stream(
    mut fetch: impl FnMut(u64, u32) -> Result<OwnedResult, SessionError>,
    space: &Space,
    addr: u64,
    len: u64,
    max: u64,
    policy: Holes,
    stop: &AtomicBool,
    sink: &mut dyn Sink,
    mut progress: impl FnMut(u64),
) -> std::io::Result<Outcome> {
    let mut o = Outcome {
        requested: len,
        ..Default::default()
    };
    let max = max.max(1);
    // A vCPU slow to take the SMI (a loaded host) makes a read through its
    // page tables answer "CPU not in SMM": the same chunk is asked again a
    // few times before the read ends there.
    let mut retries = 0u32;
    while o.covered < len {
        if stop.load(Ordering::SeqCst) {
            o.interrupted = true;
            break;
        }
        let pos = addr.wrapping_add(o.covered);
        let n = (len - o.covered).min(max);
        let r = match fetch(pos, n as u32) {
            Ok(r) => r,
            Err(e) => {
                o.failed = Some(e);
                break;
            }
        };
        let got = (r.data.len() as u64).min(n);
        if got > 0 {
            sink.data(pos, &r.data[..got as usize])?;
            o.read += got;
            o.covered += got;
        }
        match r.status {
            Status::Ok if got == n => {}
            Status::Ok => {
                o.failed = Some(SessionError::Malformed(format!(
                    "a read of {n:#x} bytes at {pos:#x} returned {got:#x} bytes and no reason"
                )));
                break;
            }
            // The agent's per-SMI work budget ran out after `got` bytes:
            // the next request goes on from there.
            Status::WorkLimit if got > 0 => {}
            Status::CpuNotInSmm if retries < MAX_RETRIES => {
                retries += 1;
                continue;
            }
            Status::NotPresent | Status::RefusedSmram | Status::RefusedNotRam => {
                let at = addr.wrapping_add(o.covered);
                let span = hole_span(space, r.status, r.level, at).min(len - o.covered);
                let reason = short_reason(r.status, r.level);
                push_hole(&mut o.holes, at, span, reason.clone());
                if policy == Holes::Stop {
                    o.stopped = true;
                    break;
                }
                sink.hole(at, span, &reason, policy)?;
                o.covered += span;
            }
            status => {
                o.failed = Some(SessionError::Op {
                    op: format!("reading {pos:#x}+{n:#x}"),
                    status,
                    level: r.level,
                    aux: r.aux,
                });
                break;
            }
        }
        retries = 0;
        progress(o.covered);
    }
    Ok(o)
}

/// Times one chunk is asked again after "CPU not in SMM".
const MAX_RETRIES: u32 = 3;

fn short_reason(status: Status, level: u8) -> String {
    match status {
        Status::NotPresent => format!(
            "not mapped ({} not present)",
            super::render::level_name(level)
        ),
        Status::RefusedSmram => "refused: SMRAM".into(),
        _ => "refused: not RAM".into(),
    }
}

fn push_hole(holes: &mut Vec<Hole>, addr: u64, len: u64, reason: String) {
    if let Some(last) = holes.last_mut()
        && last.addr.wrapping_add(last.len) == addr
        && last.reason == reason
    {
        last.len += len;
        return;
    }
    holes.push(Hole { addr, len, reason });
}

/// How far an unreadable stretch starting at `at` reaches.
fn hole_span(space: &Space, status: Status, level: u8, at: u64) -> u64 {
    let to_boundary = |size: u64| size - (at & (size - 1));
    match space {
        Space::Virt => {
            let size = if status == Status::NotPresent && (1..=5).contains(&level) {
                4096u64 << (9 * (u32::from(level) - 1))
            } else {
                4096
            };
            to_boundary(size)
        }
        Space::Phys { ram, smram } => {
            // To the end of SMRAM, or to the next RAM range above `at`.
            if at >= smram.0 && at < smram.0.wrapping_add(smram.1) {
                return smram.0 + smram.1 - at;
            }
            if ram.iter().any(|&(b, l)| at >= b && at - b < l) {
                return to_boundary(4096);
            }
            ram.iter()
                .map(|&(b, _)| b)
                .filter(|&b| b > at)
                .min()
                .map_or(u64::MAX, |b| b - at)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest where pages are readable unless listed; a NotPresent at
    /// level 1 for each unmapped page.
    struct Guest {
        unmapped: Vec<u64>,
        requests: u32,
    }

    impl Guest {
        fn fetch(&mut self, addr: u64, len: u32) -> Result<OwnedResult, SessionError> {
            self.requests += 1;
            let mut data = Vec::new();
            let mut a = addr;
            while a < addr + u64::from(len) {
                if self.unmapped.contains(&(a & !0xfff)) {
                    return Ok(OwnedResult {
                        kind: 1,
                        status: Status::NotPresent,
                        level: 1,
                        aux: a,
                        data,
                    });
                }
                data.push((a % 251) as u8);
                a += 1;
            }
            Ok(OwnedResult {
                kind: 1,
                status: Status::Ok,
                level: 0,
                aux: a,
                data,
            })
        }
    }

    #[derive(Default)]
    struct Collect {
        bytes: Vec<u8>,
        holes: Vec<(u64, u64)>,
    }

    impl Sink for Collect {
        fn data(&mut self, _: u64, b: &[u8]) -> std::io::Result<()> {
            self.bytes.extend_from_slice(b);
            Ok(())
        }
        fn hole(&mut self, a: u64, l: u64, _: &str, p: Holes) -> std::io::Result<()> {
            self.holes.push((a, l));
            if p == Holes::Zero {
                self.bytes.extend(std::iter::repeat_n(0, l as usize));
            }
            Ok(())
        }
    }

    fn run(unmapped: Vec<u64>, policy: Holes, len: u64) -> (Outcome, Collect) {
        let mut g = Guest {
            unmapped,
            requests: 0,
        };
        let mut c = Collect::default();
        let stop = AtomicBool::new(false);
        let o = stream(
            |a, n| g.fetch(a, n),
            &Space::Virt,
            0x10_0000,
            len,
            0x3000,
            policy,
            &stop,
            &mut c,
            |_| {},
        )
        .unwrap();
        (o, c)
    }

    #[test]
    fn unmapped_pages_are_holes_not_the_end() {
        let (o, c) = run(vec![0x10_2000, 0x10_3000], Holes::Zero, 0x6000);
        assert_eq!(o.read, 0x4000);
        assert_eq!(o.covered, 0x6000);
        assert_eq!(o.holes.len(), 1, "adjacent holes merge: {:?}", o.holes);
        assert_eq!((o.holes[0].addr, o.holes[0].len), (0x10_2000, 0x2000));
        assert!(o.holes[0].reason.contains("PTE not present"));
        assert_eq!(c.bytes.len(), 0x6000);
        assert!(c.bytes[0x2000..0x4000].iter().all(|&b| b == 0));
        assert_eq!(c.bytes[0x4000], (0x10_4000u64 % 251) as u8);
        let (o, c) = run(vec![0x10_2000], Holes::Skip, 0x6000);
        assert_eq!(c.bytes.len(), 0x5000);
        assert!(!o.complete());
        let (o, c) = run(vec![0x10_2000], Holes::Stop, 0x6000);
        assert!(o.stopped);
        assert_eq!(c.bytes.len(), 0x2000, "the bytes before the hole are kept");
    }

    #[test]
    fn interrupt_keeps_what_was_read() {
        let mut g = Guest {
            unmapped: vec![],
            requests: 0,
        };
        let stop = AtomicBool::new(false);
        let mut c = Collect::default();
        let o = stream(
            |a, n| {
                if g.requests == 2 {
                    stop.store(true, Ordering::SeqCst);
                }
                g.fetch(a, n)
            },
            &Space::Virt,
            0,
            0x10000,
            0x1000,
            Holes::Zero,
            &stop,
            &mut c,
            |_| {},
        )
        .unwrap();
        assert!(o.interrupted);
        assert_eq!(o.covered, 0x3000);
        assert_eq!(c.bytes.len(), 0x3000);
    }

    #[test]
    fn a_cpu_slow_to_enter_smm_is_asked_again() {
        let mut calls = 0;
        let stop = AtomicBool::new(false);
        let mut c = Collect::default();
        let o = stream(
            |a, n| {
                calls += 1;
                if calls == 2 {
                    return Ok(OwnedResult {
                        kind: 1,
                        status: Status::CpuNotInSmm,
                        level: 0,
                        aux: a,
                        data: vec![],
                    });
                }
                Ok(OwnedResult {
                    kind: 1,
                    status: Status::Ok,
                    level: 0,
                    aux: a,
                    data: vec![7; n as usize],
                })
            },
            &Space::Virt,
            0,
            0x3000,
            0x1000,
            Holes::Zero,
            &stop,
            &mut c,
            |_| {},
        )
        .unwrap();
        assert!(o.complete(), "{o:?}");
        assert_eq!(calls, 4);
        assert_eq!(c.bytes.len(), 0x3000);
    }

    #[test]
    fn physical_holes_reach_the_next_ram_range() {
        let space = Space::Phys {
            ram: vec![(0, 0xa0000), (0x10_0000, 0x3ef0_0000)],
            smram: (0x3f00_0000, 0x100_0000),
        };
        assert_eq!(
            hole_span(&space, Status::RefusedNotRam, 0, 0xa0000),
            0x10_0000 - 0xa0000
        );
        assert_eq!(
            hole_span(&space, Status::RefusedSmram, 0, 0x3f00_0000),
            0x100_0000
        );
        assert_eq!(
            hole_span(&Space::Virt, Status::NotPresent, 2, 0x20_1000),
            0x20_0000 - 0x1000
        );
    }
}
