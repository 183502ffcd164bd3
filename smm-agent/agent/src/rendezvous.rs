//! The SMI rendezvous: which CPU serves, who waits for whom, and how long.
//!
//! On every SMI each CPU in SMM [`Rendezvous::arrive`]s. The first one opens
//! a *session* and leads it: it [`gather`](Rendezvous::gather)s the others
//! (bounded), [`claim`](Rendezvous::claim)s the right to serve the mailbox,
//! serves, and [`release`](Rendezvous::release)s the session. The others
//! [`follow`](Rendezvous::follow): they stay in SMM until the session is
//! released (bounded), so one batch is one consistent snapshot.
//!
//! # Every SMI returns, whatever the CPUs do
//! A CPU can leave SMM without RSM: QEMU 7.2 under TCG delivers INIT to a CPU
//! in SMM (real CPUs and KVM latch it until RSM), and Linux sends INIT each
//! time it brings a CPU online. Such a CPU never runs another instruction of
//! its SMI. The design therefore has no lock that a vanished CPU could hold
//! and no unbounded wait:
//! - every wait is bounded by the waiting CPU's *own* TSC ([`Timeouts`]);
//!   TSCs of different CPUs are never compared (the guest can write them);
//! - each CPU keeps a *slot* that says "I am inside SMM for session G (as
//!   leader or follower)" and clears it when it leaves. A CPU that finds its
//!   own slot set on entry has left SMM abnormally before: it undoes what it
//!   held ([`Arrival::vanished`]) — certain proof, no timing involved;
//! - a follower that waits out [`Timeouts::follow`] marks its session stale,
//!   so the next SMI opens a new one instead of joining a dead one;
//! - a CPU that did not come to a rendezvous is marked absent and not waited
//!   for again until it is seen in SMM again.
//!
//! # At most one CPU serves, whatever the timing
//! Serving (touching the mailbox and the agent's SMRAM buffers) needs the
//! *serve claim*. It is released by its holder, or by the holder itself on
//! its next SMI entry if it vanished while serving — never by a timeout,
//! because a slow holder (a vCPU the host stopped scheduling) and a dead one
//! look the same from outside. A session that cannot take the claim serves
//! nothing ([`Counters::serve_busy`]); the host raises the SMI again. Under
//! TCG an SMI brings a vanished CPU back into SMM (it wakes from
//! wait-for-SIPI), which releases the claim; under KVM and on hardware a CPU
//! never leaves SMM without RSM.
//!
//! # Bound
//! A leader spends at most [`Timeouts::gather`] waiting plus its own serve
//! (bounded by the largest request the mailbox can hold); a follower at most
//! [`Timeouts::follow`]. The firmware chooses `follow` well above
//! `gather` + the longest serve, and publishes the longest residency it saw.
//!
//! Pure logic over atomics, tested on the host with simulated CPUs; the
//! firmware supplies the clock.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};

/// CPU indices (APIC IDs) the rendezvous tracks: 0..MAX_CPUS.
pub const MAX_CPUS: usize = 64;

/// The calling CPU's time source: TSC ticks, monotonic for the duration of
/// one SMI on that CPU (a guest may have written its TSC before the SMI;
/// only differences taken on one CPU are used, with wrapping arithmetic).
pub trait Clock {
    fn now(&self) -> u64;
    /// Called in every wait loop (`pause`: under TCG it lets another vCPU run).
    fn relax(&self) {
        core::hint::spin_loop();
    }
}

/// Wait bounds in ticks of the [`Clock`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// How long a leader waits for the expected CPUs to arrive.
    pub gather: u64,
    /// How long a follower waits for its session to be released.
    pub follow: u64,
}

/// What [`Rendezvous::arrive`] made of this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival {
    pub role: Role,
    /// This CPU had left SMM without RSM during an earlier SMI (its slot
    /// was still set): what it held then has been released now.
    pub vanished: bool,
    /// It vanished while holding the serve claim: the agent's state may be
    /// half-updated (the caller must recover it before the next serve).
    pub interrupted_serve: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Opened session `generation`: gather, claim, serve, release.
    Leader { generation: u32 },
    /// Joined session `generation` of another CPU: follow.
    Follower { generation: u32 },
    /// CPU index out of range: take no part, return at once.
    Outside,
}

/// How [`Rendezvous::gather`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gathered {
    /// CPUs in the session (their snapshots are stored), the leader included.
    pub present: u64,
    /// Every CPU of the expected mask came (one consistent snapshot).
    pub complete: bool,
}

/// How [`Rendezvous::follow`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Followed {
    /// The leader released the session (or a newer one began).
    Released,
    /// The wait ran out; the session was marked stale.
    TimedOut,
}

/// Counters, as published in the mailbox header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Sessions opened (one per SMI that found no open session).
    pub sessions: u64,
    /// Sessions whose gather ended before every expected CPU came.
    pub partial_sessions: u64,
    /// Sessions ended other than by their leader's release: a follower
    /// found them stale, or their leader came back after vanishing.
    pub recovered_sessions: u64,
    /// CPUs found, on SMI entry, to have left SMM without RSM before.
    pub vanished_cpus: u64,
    /// Followers whose wait for the release ran out.
    pub follower_timeouts: u64,
    /// Sessions that could not serve: the serve claim was held.
    pub serve_busy: u64,
}

// Session word: generation << 32 | leader << 8 | phase.
const PHASE_CLOSED: u64 = 0;
const PHASE_OPEN: u64 = 1;
const PHASE_STALE: u64 = 2;

const fn session(generation: u32, leader: u32, phase: u64) -> u64 {
    (generation as u64) << 32 | ((leader as u64) & 0xff) << 8 | phase
}
const fn generation_of(s: u64) -> u32 {
    (s >> 32) as u32
}
const fn phase_of(s: u64) -> u64 {
    s & 0xff
}

// Slot word: 0 = not in SMM; else generation << 32 | leader bit << 1 | 1.
const SLOT_IN: u64 = 1;
const SLOT_LEADER: u64 = 2;

const fn slot(generation: u32, leader: bool) -> u64 {
    (generation as u64) << 32 | if leader { SLOT_LEADER } else { 0 } | SLOT_IN
}

/// The rendezvous state, kept in SMRAM (one static of the firmware).
pub struct Rendezvous {
    session: AtomicU64,
    /// 0 = free, else the serving CPU's index + 1.
    claim: AtomicU32,
    /// CPUs that missed the last gather: not waited for until seen again.
    absent: AtomicU64,
    slots: [AtomicU64; MAX_CPUS],
    sessions: AtomicU64,
    partial_sessions: AtomicU64,
    recovered_sessions: AtomicU64,
    vanished_cpus: AtomicU64,
    follower_timeouts: AtomicU64,
    serve_busy: AtomicU64,
}

impl Default for Rendezvous {
    fn default() -> Self {
        Self::new()
    }
}

impl Rendezvous {
    pub const fn new() -> Self {
        Self::starting_at(0)
    }

    /// A rendezvous whose first session gets `generation + 1` (generations
    /// wrap; tests start near `u32::MAX`).
    pub const fn starting_at(generation: u32) -> Self {
        Self {
            session: AtomicU64::new(session(generation, 0, PHASE_CLOSED)),
            claim: AtomicU32::new(0),
            absent: AtomicU64::new(0),
            slots: [const { AtomicU64::new(0) }; MAX_CPUS],
            sessions: AtomicU64::new(0),
            partial_sessions: AtomicU64::new(0),
            recovered_sessions: AtomicU64::new(0),
            vanished_cpus: AtomicU64::new(0),
            follower_timeouts: AtomicU64::new(0),
            serve_busy: AtomicU64::new(0),
        }
    }

    pub fn counters(&self) -> Counters {
        Counters {
            sessions: self.sessions.load(SeqCst),
            partial_sessions: self.partial_sessions.load(SeqCst),
            recovered_sessions: self.recovered_sessions.load(SeqCst),
            vanished_cpus: self.vanished_cpus.load(SeqCst),
            follower_timeouts: self.follower_timeouts.load(SeqCst),
            serve_busy: self.serve_busy.load(SeqCst),
        }
    }

    /// On SMI entry, after this CPU stored its snapshot: recovers from this
    /// CPU's own earlier abnormal exit, then opens a session (leader) or
    /// joins the open one (follower). Never waits.
    pub fn arrive(&self, cpu: u32) -> Arrival {
        let Some(my_slot) = self.slots.get(cpu as usize) else {
            return Arrival {
                role: Role::Outside,
                vanished: false,
                interrupted_serve: false,
            };
        };
        let (vanished, interrupted_serve) = self.undo(cpu, my_slot.load(SeqCst));
        if vanished {
            self.vanished_cpus.fetch_add(1, SeqCst);
        }
        self.absent.fetch_and(!(1u64 << cpu), SeqCst);
        loop {
            let s = self.session.load(SeqCst);
            if phase_of(s) == PHASE_OPEN {
                // Join: publish the slot (after the snapshot: SeqCst), then
                // check the session is still the one joined. A leader that
                // scanned slots before this store simply does not count us.
                my_slot.store(slot(generation_of(s), false), SeqCst);
                if self.session.load(SeqCst) == s {
                    return Arrival {
                        role: Role::Follower {
                            generation: generation_of(s),
                        },
                        vanished,
                        interrupted_serve,
                    };
                }
                my_slot.store(0, SeqCst);
                continue;
            }
            let generation = generation_of(s).wrapping_add(1);
            let open = session(generation, cpu, PHASE_OPEN);
            // The slot first: a CPU that scans slots for `generation` can
            // only see it once the session exists, and then it is set.
            my_slot.store(slot(generation, true), SeqCst);
            if self
                .session
                .compare_exchange(s, open, SeqCst, SeqCst)
                .is_ok()
            {
                self.sessions.fetch_add(1, SeqCst);
                return Arrival {
                    role: Role::Leader { generation },
                    vanished,
                    interrupted_serve,
                };
            }
            my_slot.store(0, SeqCst);
        }
    }

    /// CPUs whose slot says they are in session `generation`. A slot marked
    /// as leader counts only for the session's own leader: a CPU that
    /// stored its leader slot and vanished before its compare-and-swap
    /// (INIT inside `arrive`) would otherwise be counted in a later session
    /// of that generation with a snapshot from an earlier SMI.
    fn present(&self, generation: u32, upto: u64) -> u64 {
        let s = self.session.load(SeqCst);
        let leader = (generation_of(s) == generation).then_some(((s >> 8) & 0xff) as usize);
        let n = (64 - upto.leading_zeros()) as usize;
        self.slots
            .iter()
            .take(n)
            .enumerate()
            .filter(|(i, s)| {
                let v = s.load(SeqCst);
                v & SLOT_IN != 0
                    && generation_of(v) == generation
                    && (v & SLOT_LEADER == 0 || leader == Some(*i))
            })
            .fold(0, |m, (i, _)| m | 1 << i)
    }

    /// Leader: waits until every CPU of `expected` that is not marked absent
    /// is in the session, or `timeouts.gather` ticks pass. CPUs still
    /// missing are marked absent (not waited for next time).
    pub fn gather(
        &self,
        generation: u32,
        expected: u64,
        timeouts: &Timeouts,
        clock: &impl Clock,
    ) -> Gathered {
        let wait_for = expected & !self.absent.load(SeqCst);
        let start = clock.now();
        let mut present = self.present(generation, expected);
        while present & wait_for != wait_for && clock.now().wrapping_sub(start) < timeouts.gather {
            clock.relax();
            present = self.present(generation, expected);
        }
        let missing = expected & !present;
        // Added, never overwritten: a targeted session expects one CPU and
        // must not make the others "seen". A bit is cleared only when its
        // CPU arrives.
        self.absent.fetch_or(missing, SeqCst);
        let complete = missing == 0;
        if !complete {
            self.partial_sessions.fetch_add(1, SeqCst);
        }
        Gathered { present, complete }
    }

    /// Leader: takes the right to serve. `false`: another CPU holds it (it is
    /// serving, slow, or vanished while serving and not back yet).
    pub fn claim(&self, cpu: u32) -> bool {
        let ok = self
            .claim
            .compare_exchange(0, cpu + 1, SeqCst, SeqCst)
            .is_ok();
        if !ok {
            self.serve_busy.fetch_add(1, SeqCst);
        }
        ok
    }

    /// Leader: gives the serve claim back (if this CPU holds it) and closes
    /// the session (if it is still this CPU's), then leaves.
    pub fn release(&self, cpu: u32, generation: u32) {
        let _ = self.claim.compare_exchange(cpu + 1, 0, SeqCst, SeqCst);
        let open = session(generation, cpu, PHASE_OPEN);
        let closed = session(generation, cpu, PHASE_CLOSED);
        let _ = self.session.compare_exchange(open, closed, SeqCst, SeqCst);
        self.leave(cpu);
    }

    /// Follower: waits until session `generation` is no longer open, or
    /// `timeouts.follow` ticks pass (then marks it stale), then leaves.
    pub fn follow(
        &self,
        cpu: u32,
        generation: u32,
        timeouts: &Timeouts,
        clock: &impl Clock,
    ) -> Followed {
        let start = clock.now();
        let outcome = loop {
            let s = self.session.load(SeqCst);
            if generation_of(s) != generation || phase_of(s) != PHASE_OPEN {
                break Followed::Released;
            }
            if clock.now().wrapping_sub(start) >= timeouts.follow {
                let stale = (s & !0xff) | PHASE_STALE;
                if self
                    .session
                    .compare_exchange(s, stale, SeqCst, SeqCst)
                    .is_ok()
                {
                    self.recovered_sessions.fetch_add(1, SeqCst);
                }
                self.follower_timeouts.fetch_add(1, SeqCst);
                break Followed::TimedOut;
            }
            clock.relax();
        };
        self.leave(cpu);
        outcome
    }

    /// After an exception in SMM: the faulting CPU gives up whatever it
    /// held (claim, session) and leaves. Returns true if it held the serve
    /// claim (the agent's state may be half-updated: recover it).
    pub fn abort(&self, cpu: u32) -> bool {
        let Some(my_slot) = self.slots.get(cpu as usize) else {
            return false;
        };
        let (_, had_claim) = self.undo(cpu, my_slot.load(SeqCst));
        my_slot.store(0, SeqCst);
        had_claim
    }

    fn leave(&self, cpu: u32) {
        if let Some(s) = self.slots.get(cpu as usize) {
            s.store(0, SeqCst);
        }
    }

    /// Releases what `cpu` held according to its slot value `was`: whether
    /// it held anything (the slot was set), and whether that included the
    /// serve claim.
    fn undo(&self, cpu: u32, was: u64) -> (bool, bool) {
        if was & SLOT_IN == 0 {
            return (false, false);
        }
        // The slot proves this CPU is not serving now (it is here, at entry
        // or in the fault path), so its claim can be released.
        let had_claim = self
            .claim
            .compare_exchange(cpu + 1, 0, SeqCst, SeqCst)
            .is_ok();
        if was & SLOT_LEADER != 0 {
            let generation = generation_of(was);
            let open = session(generation, cpu, PHASE_OPEN);
            if self
                .session
                .compare_exchange(open, session(generation, cpu, PHASE_STALE), SeqCst, SeqCst)
                .is_ok()
            {
                self.recovered_sessions.fetch_add(1, SeqCst);
            }
        }
        self.slots[cpu as usize].store(0, SeqCst);
        (true, had_claim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Ticks(core::cell::Cell<u64>);

    impl Clock for Ticks {
        fn now(&self) -> u64 {
            self.0.get()
        }
        fn relax(&self) {
            self.0.set(self.0.get() + 1);
        }
    }

    /// CPU 1 stored its leader slot for the next generation and vanished
    /// (INIT) before its compare-and-swap; CPU 0 then opens that generation.
    /// CPU 1 must not be counted, with a snapshot of an earlier SMI.
    #[test]
    fn a_cpu_that_vanished_inside_arrive_is_not_counted_later() {
        let r = Rendezvous::new();
        let g = generation_of(r.session.load(SeqCst));
        r.slots[1].store(slot(g.wrapping_add(1), true), SeqCst);
        let Role::Leader { generation } = r.arrive(0).role else {
            panic!("CPU 0 must lead");
        };
        assert_eq!(generation, g.wrapping_add(1));
        let t = Timeouts {
            gather: 10,
            follow: 100,
        };
        let got = r.gather(generation, 0b11, &t, &Ticks(core::cell::Cell::new(0)));
        assert_eq!(got.present, 0b01);
        assert!(!got.complete);
    }
}
