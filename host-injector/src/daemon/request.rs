//! The life of one request in a VM's mailbox, as an I/O-free state machine:
//! post → raise → wait → done / silent. The per-VM worker feeds it facts
//! (the time, the done word it read, which SMI paths are usable) and carries
//! out the [`Step`] it returns; tests drive it with made-up facts.
//!
//! Policy: the doorbell first (an eventfd write; no QMP on the hot path);
//! if a doorbell SMI stays unanswered for `grace` (the guest disarmed MSI-X,
//! or this is the first SMI after a boot and Linux has cleared MSI-X enable)
//! the machine falls back to monitor SMIs, re-raised every `reraise`, and
//! counts the fallback apart. Monitor SMIs are raised only while the worker
//! says they are safe (agent Ready with broadcast, and no RESET/SHUTDOWN
//! since). The deadline is absolute: past it the request is silent, an
//! alert, never retried.

use std::time::{Duration, Instant};

/// Which SMI path to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Eventfd write of the MSI-X vector.
    Doorbell,
    /// Monitor APM write (broadcast).
    Qmp,
}

impl Path {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Path::Doorbell => "doorbell",
            Path::Qmp => "qmp-broadcast",
        }
    }
}

/// What the worker knows right now.
#[derive(Clone, Copy, Debug)]
pub struct Facts {
    /// Now.
    pub now: Instant,
    /// The done word as just read from the mailbox.
    pub done_word: u64,
    /// A doorbell SMI can be raised (QEMU peer connected, agent advertises
    /// the doorbell feature).
    pub doorbell: bool,
    /// A monitor SMI is safe (QMP connected, agent Ready with broadcast, no
    /// reset since).
    pub qmp: bool,
}

/// What the worker must do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Raise an SMI on this path, then ask again.
    Raise(Path),
    /// Wait (for the ring eventfd, a QMP event, or the time) until this
    /// instant at the latest, then ask again.
    Wait(Instant),
    /// The agent answered.
    Done,
    /// The deadline passed.
    Silent,
}

/// Timing policy.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Unanswered doorbell SMI → fallback after this long.
    pub grace: Duration,
    /// Period of repeated monitor SMIs.
    pub reraise: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Posted,
    Doorbell { since: Instant },
    Qmp { next: Instant },
    Done,
    Silent,
}

/// One request from posting to its end.
#[derive(Clone, Debug)]
pub struct Request {
    doorbell: u64,
    deadline: Instant,
    policy: Policy,
    phase: Phase,
    /// Doorbell SMIs raised.
    pub smis_doorbell: u32,
    /// Monitor SMIs raised.
    pub smis_qmp: u32,
    /// Doorbell SMIs that went unanswered for the grace period.
    pub doorbell_unanswered: u32,
    /// The path of the last SMI raised.
    pub last_path: Option<Path>,
}

impl Request {
    /// A request whose frame was posted with `doorbell`, due by `deadline`.
    pub fn posted(doorbell: u64, deadline: Instant, policy: Policy) -> Self {
        Self {
            doorbell,
            deadline,
            policy,
            phase: Phase::Posted,
            smis_doorbell: 0,
            smis_qmp: 0,
            doorbell_unanswered: 0,
            last_path: None,
        }
    }

    /// The doorbell value posted.
    pub fn doorbell(&self) -> u64 {
        self.doorbell
    }

    /// True once done or silent.
    pub fn finished(&self) -> bool {
        matches!(self.phase, Phase::Done | Phase::Silent)
    }

    /// The next step given `f`. Call [`Request::raised`] after carrying out
    /// a [`Step::Raise`].
    pub fn step(&mut self, f: Facts) -> Step {
        match self.phase {
            Phase::Done => return Step::Done,
            Phase::Silent => return Step::Silent,
            _ => {}
        }
        if f.done_word == self.doorbell {
            self.phase = Phase::Done;
            return Step::Done;
        }
        if f.now >= self.deadline {
            self.phase = Phase::Silent;
            return Step::Silent;
        }
        match self.phase {
            Phase::Posted => {
                if f.doorbell {
                    Step::Raise(Path::Doorbell)
                } else if f.qmp {
                    Step::Raise(Path::Qmp)
                } else {
                    // Nothing can raise an SMI yet (rebooting guest, QMP
                    // reconnecting): wait for that to change.
                    Step::Wait(self.cap(f.now + self.policy.reraise))
                }
            }
            Phase::Doorbell { since } => {
                let due = since + self.policy.grace;
                if f.now < due {
                    return Step::Wait(self.cap(due));
                }
                if f.qmp {
                    Step::Raise(Path::Qmp)
                } else if f.doorbell {
                    // No fallback possible: ring again.
                    Step::Raise(Path::Doorbell)
                } else {
                    Step::Wait(self.cap(f.now + self.policy.reraise))
                }
            }
            Phase::Qmp { next } => {
                if f.now < next {
                    return Step::Wait(self.cap(next));
                }
                if f.qmp {
                    Step::Raise(Path::Qmp)
                } else if f.doorbell {
                    Step::Raise(Path::Doorbell)
                } else {
                    Step::Wait(self.cap(f.now + self.policy.reraise))
                }
            }
            Phase::Done | Phase::Silent => unreachable!("handled above"),
        }
    }

    /// Records that an SMI was raised on `path` at `now`.
    pub fn raised(&mut self, path: Path, now: Instant) {
        if let Phase::Doorbell { .. } = self.phase {
            self.doorbell_unanswered += 1;
        }
        self.last_path = Some(path);
        self.phase = match path {
            Path::Doorbell => {
                self.smis_doorbell += 1;
                Phase::Doorbell { since: now }
            }
            Path::Qmp => {
                self.smis_qmp += 1;
                Phase::Qmp {
                    next: now + self.policy.reraise,
                }
            }
        };
    }

    fn cap(&self, t: Instant) -> Instant {
        t.min(self.deadline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        grace: Duration::from_millis(50),
        reraise: Duration::from_millis(20),
    };

    fn facts(now: Instant, done: u64, doorbell: bool, qmp: bool) -> Facts {
        Facts {
            now,
            done_word: done,
            doorbell,
            qmp,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn doorbell_answered_is_done_without_qmp() {
        let t0 = Instant::now();
        let mut r = Request::posted(7, t0 + ms(1000), POLICY);
        assert_eq!(
            r.step(facts(t0, 0, true, true)),
            Step::Raise(Path::Doorbell)
        );
        r.raised(Path::Doorbell, t0);
        assert_eq!(
            r.step(facts(t0 + ms(1), 0, true, true)),
            Step::Wait(t0 + ms(50))
        );
        assert_eq!(r.step(facts(t0 + ms(2), 7, true, true)), Step::Done);
        assert_eq!(
            (r.smis_doorbell, r.smis_qmp, r.doorbell_unanswered),
            (1, 0, 0)
        );
        assert!(r.finished());
        assert_eq!(
            r.step(facts(t0 + ms(3), 0, true, true)),
            Step::Done,
            "stays done"
        );
    }

    #[test]
    fn unanswered_doorbell_falls_back_to_qmp_and_is_counted() {
        let t0 = Instant::now();
        let mut r = Request::posted(7, t0 + ms(1000), POLICY);
        assert_eq!(
            r.step(facts(t0, 0, true, true)),
            Step::Raise(Path::Doorbell)
        );
        r.raised(Path::Doorbell, t0);
        let t = t0 + ms(50);
        assert_eq!(r.step(facts(t, 0, true, true)), Step::Raise(Path::Qmp));
        r.raised(Path::Qmp, t);
        assert_eq!(r.doorbell_unanswered, 1);
        assert_eq!(
            r.step(facts(t + ms(5), 0, true, true)),
            Step::Wait(t + ms(20))
        );
        assert_eq!(
            r.step(facts(t + ms(20), 0, true, true)),
            Step::Raise(Path::Qmp)
        );
        r.raised(Path::Qmp, t + ms(20));
        assert_eq!(r.step(facts(t + ms(21), 7, true, true)), Step::Done);
        assert_eq!((r.smis_doorbell, r.smis_qmp), (1, 2));
        assert_eq!(r.last_path, Some(Path::Qmp));
    }

    #[test]
    fn qmp_only_when_no_doorbell_and_silent_at_the_deadline() {
        let t0 = Instant::now();
        let mut r = Request::posted(9, t0 + ms(45), POLICY);
        assert_eq!(r.step(facts(t0, 0, false, true)), Step::Raise(Path::Qmp));
        r.raised(Path::Qmp, t0);
        let mut now = t0;
        let mut raised = 1;
        loop {
            match r.step(facts(now, 8, false, true)) {
                Step::Raise(p) => {
                    assert_eq!(p, Path::Qmp);
                    r.raised(p, now);
                    raised += 1;
                }
                Step::Wait(t) => {
                    assert!(t <= t0 + ms(45), "waits never pass the deadline");
                    now = t;
                }
                Step::Silent => break,
                Step::Done => panic!("done word 8 is not doorbell 9"),
            }
        }
        assert_eq!(raised, 3, "at 0, 20 and 40 ms");
        assert_eq!(r.smis_qmp, 3);
        assert_eq!(
            r.step(facts(now, 9, true, true)),
            Step::Silent,
            "stays silent"
        );
    }

    #[test]
    fn nothing_usable_waits_without_raising_until_a_path_opens() {
        // A rebooting guest: QMP gated, no doorbell feature yet.
        let t0 = Instant::now();
        let mut r = Request::posted(3, t0 + ms(100), POLICY);
        assert_eq!(r.step(facts(t0, 0, false, false)), Step::Wait(t0 + ms(20)));
        assert_eq!(
            r.step(facts(t0 + ms(20), 0, false, false)),
            Step::Wait(t0 + ms(40))
        );
        assert_eq!(
            r.step(facts(t0 + ms(30), 0, false, true)),
            Step::Raise(Path::Qmp)
        );
        r.raised(Path::Qmp, t0 + ms(30));
        // The gate closes again (RESET): no monitor SMI, even when due.
        assert_eq!(
            r.step(facts(t0 + ms(50), 0, false, false)),
            Step::Wait(t0 + ms(70))
        );
        assert_eq!(r.step(facts(t0 + ms(100), 0, false, false)), Step::Silent);
        assert_eq!(r.smis_qmp, 1);
    }

    #[test]
    fn doorbell_without_fallback_rings_again_after_grace() {
        let t0 = Instant::now();
        let mut r = Request::posted(3, t0 + ms(500), POLICY);
        assert_eq!(
            r.step(facts(t0, 0, true, false)),
            Step::Raise(Path::Doorbell)
        );
        r.raised(Path::Doorbell, t0);
        assert_eq!(
            r.step(facts(t0 + ms(50), 0, true, false)),
            Step::Raise(Path::Doorbell)
        );
        r.raised(Path::Doorbell, t0 + ms(50));
        assert_eq!((r.smis_doorbell, r.doorbell_unanswered), (2, 1));
    }

    #[test]
    fn an_answer_already_there_needs_no_smi() {
        let t0 = Instant::now();
        let mut r = Request::posted(5, t0 + ms(10), POLICY);
        assert_eq!(r.step(facts(t0, 5, true, true)), Step::Done);
        assert_eq!(r.smis_doorbell + r.smis_qmp, 0);
    }
}
