//! The SMI rendezvous as a state machine, with simulated CPUs: CPUs that
//! never arrive, arrive late, vanish mid-session (leave SMM without RSM, as
//! QEMU TCG does on INIT), re-enter, or fault. Each simulated CPU has its own
//! clock, which advances one tick per wait iteration, so the wait bounds are
//! checked exactly, without timing the test.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use smmvmi_agent::rendezvous::{
    Arrival, Clock, Counters, Followed, Gathered, MAX_CPUS, Rendezvous, Role, Timeouts,
};

const T: Timeouts = Timeouts {
    gather: 100,
    follow: 1000,
};

/// One CPU's TSC: one tick per `relax` (wait iteration).
#[derive(Default)]
struct Tsc(Cell<u64>);

impl Clock for Tsc {
    fn now(&self) -> u64 {
        self.0.get()
    }
    fn relax(&self) {
        self.0.set(self.0.get() + 1);
        std::thread::yield_now();
    }
}

fn leader(a: Arrival) -> u32 {
    match a.role {
        Role::Leader { generation } => generation,
        r => panic!("expected to lead, got {r:?}"),
    }
}

fn follower(a: Arrival) -> u32 {
    match a.role {
        Role::Follower { generation } => generation,
        r => panic!("expected to follow, got {r:?}"),
    }
}

/// A whole SMI on one CPU with nobody else around.
fn lone_smi(r: &Rendezvous, cpu: u32, expected: u64) -> (Gathered, bool) {
    let g = leader(r.arrive(cpu));
    let got = r.gather(g, expected, &T, &Tsc::default());
    let served = r.claim(cpu);
    r.release(cpu, g);
    (got, served)
}

#[test]
fn every_cpu_arrives_one_serves_the_others_wait_for_the_release() {
    let r = Rendezvous::new();
    let g = leader(r.arrive(0));
    assert_eq!(follower(r.arrive(1)), g);
    assert_eq!(follower(r.arrive(2)), g);
    let clock = Tsc::default();
    let got = r.gather(g, 0b111, &T, &clock);
    assert_eq!(
        got,
        Gathered {
            present: 0b111,
            complete: true
        }
    );
    assert_eq!(clock.now(), 0, "nobody missing: no wait");
    assert!(r.claim(0));
    r.release(0, g);
    assert_eq!(r.follow(1, g, &T, &Tsc::default()), Followed::Released);
    assert_eq!(r.follow(2, g, &T, &Tsc::default()), Followed::Released);
    assert_eq!(
        r.counters(),
        Counters {
            sessions: 1,
            ..Counters::default()
        }
    );
    // The next SMI opens a new session with a new generation.
    assert_eq!(leader(r.arrive(2)), g.wrapping_add(1));
}

#[test]
fn a_cpu_that_never_arrives_is_waited_for_once_then_not_until_it_comes_back() {
    let r = Rendezvous::new();
    let clock = Tsc::default();
    let g = leader(r.arrive(0));
    let got = r.gather(g, 0b11, &T, &clock);
    assert_eq!(got.present, 0b01);
    assert!(!got.complete);
    assert_eq!(clock.now(), T.gather, "the gather is bounded");
    assert!(r.claim(0));
    r.release(0, g);

    // Second SMI: CPU 1 is known absent, so nobody waits for it.
    let clock = Tsc::default();
    let g = leader(r.arrive(0));
    let got = r.gather(g, 0b11, &T, &clock);
    assert_eq!((got.present, got.complete, clock.now()), (0b01, false, 0));
    r.release(0, g);
    assert_eq!(r.counters().partial_sessions, 2);

    // CPU 1 shows up again: from then on it is expected again.
    let g = leader(r.arrive(1));
    assert_eq!(follower(r.arrive(0)), g);
    let got = r.gather(g, 0b11, &T, &Tsc::default());
    assert!(got.complete);
    r.release(1, g);
    r.follow(0, g, &T, &Tsc::default());
    let clock = Tsc::default();
    let g = leader(r.arrive(0));
    r.gather(g, 0b11, &T, &clock);
    assert_eq!(clock.now(), T.gather, "CPU 1 is waited for again");
}

#[test]
fn a_late_cpu_follows_the_serving_session_without_being_counted_in_it() {
    let r = Rendezvous::new();
    let g = leader(r.arrive(0));
    let got = r.gather(g, 0b11, &T, &Tsc::default());
    assert_eq!(got.present, 0b01);
    assert!(r.claim(0));
    // CPU 1 arrives while CPU 0 serves: it joins and waits, it does not lead.
    assert_eq!(follower(r.arrive(1)), g);
    r.release(0, g);
    assert_eq!(r.follow(1, g, &T, &Tsc::default()), Followed::Released);
    assert_eq!(r.counters().recovered_sessions, 0);
}

#[test]
fn a_follower_that_vanishes_is_not_waited_on_and_is_recognised_when_it_returns() {
    let r = Rendezvous::new();
    let g = leader(r.arrive(0));
    follower(r.arrive(1));
    // CPU 1 leaves SMM without RSM here: it never calls follow.
    assert!(r.gather(g, 0b11, &T, &Tsc::default()).complete);
    assert!(r.claim(0));
    r.release(0, g);

    // The next session does not count CPU 1's stale slot.
    let clock = Tsc::default();
    let g2 = leader(r.arrive(0));
    let got = r.gather(g2, 0b11, &T, &clock);
    assert_eq!(got.present, 0b01);
    assert_eq!(clock.now(), T.gather);
    r.release(0, g2);

    // CPU 1 enters SMM again: it finds its own slot set.
    let a = r.arrive(1);
    assert!(a.vanished);
    leader(a);
    assert_eq!(r.counters().vanished_cpus, 1);
    assert_eq!(r.counters().recovered_sessions, 0);
}

#[test]
fn a_leader_that_vanishes_before_serving_is_given_up_by_its_follower() {
    let r = Rendezvous::new();
    let g = leader(r.arrive(0));
    follower(r.arrive(1));
    // CPU 0 vanishes here.
    let clock = Tsc::default();
    assert_eq!(r.follow(1, g, &T, &clock), Followed::TimedOut);
    assert_eq!(clock.now(), T.follow, "the follower's wait is bounded");
    let c = r.counters();
    assert_eq!((c.follower_timeouts, c.recovered_sessions), (1, 1));

    // The next SMI opens a new session and serves: nothing was held.
    let (_, served) = lone_smi(&r, 1, 0b11);
    assert!(served);

    // CPU 0 comes back.
    let a = r.arrive(0);
    assert!(a.vanished);
    leader(a);
    assert_eq!(
        r.counters().recovered_sessions,
        1,
        "its session was already given up"
    );
}

#[test]
fn a_leader_that_vanishes_while_serving_blocks_serving_until_it_is_back() {
    let r = Rendezvous::new();
    let g = leader(r.arrive(0));
    follower(r.arrive(1));
    r.gather(g, 0b11, &T, &Tsc::default());
    assert!(r.claim(0));
    // CPU 0 vanishes mid-serve: its half-done work may still be in the
    // shared buffers, so no timeout may hand the claim to anyone else.
    assert_eq!(r.follow(1, g, &T, &Tsc::default()), Followed::TimedOut);
    for _ in 0..3 {
        let (_, served) = lone_smi(&r, 1, 0b10);
        assert!(!served);
    }
    assert_eq!(r.counters().serve_busy, 3);

    // CPU 0 enters SMM again (under TCG the next SMI wakes it): that proves
    // it is not serving any more, and it releases the claim itself.
    let a = r.arrive(0);
    assert!(a.vanished);
    let g = leader(a);
    r.gather(g, 0b01, &T, &Tsc::default());
    assert!(r.claim(0));
    r.release(0, g);
    let (_, served) = lone_smi(&r, 1, 0b10);
    assert!(served);
}

#[test]
fn a_leader_that_comes_back_to_its_own_open_session_recovers_it_at_once() {
    let r = Rendezvous::new();
    let g = leader(r.arrive(0));
    // CPU 0 vanishes, then takes the next SMI before anybody else.
    let a = r.arrive(0);
    assert!(a.vanished);
    assert_eq!(leader(a), g.wrapping_add(1));
    let c = r.counters();
    assert_eq!(
        (c.vanished_cpus, c.recovered_sessions, c.sessions),
        (1, 1, 2)
    );
}

#[test]
fn a_follower_of_a_dead_session_is_released_when_the_leader_returns() {
    let r = Rendezvous::new();
    let g = leader(r.arrive(0));
    follower(r.arrive(1));
    // CPU 0 vanished; it comes back (new SMI) while CPU 1 still waits.
    let a = r.arrive(0);
    assert!(a.vanished);
    assert_eq!(r.follow(1, g, &T, &Tsc::default()), Followed::Released);
    assert_eq!(r.counters().follower_timeouts, 0);
}

#[test]
fn a_fault_in_smm_releases_what_the_cpu_held() {
    let r = Rendezvous::new();
    let g = leader(r.arrive(0));
    follower(r.arrive(1));
    r.gather(g, 0b11, &T, &Tsc::default());
    assert!(r.claim(0));
    r.abort(0);
    assert_eq!(r.follow(1, g, &T, &Tsc::default()), Followed::Released);
    let a = r.arrive(0);
    assert!(!a.vanished, "a fault is handled, not a vanish");
    let g = leader(a);
    r.gather(g, 0b11, &T, &Tsc::default());
    assert!(r.claim(0));
    r.release(0, g);
    // A follower's fault: it simply leaves.
    let g = leader(r.arrive(0));
    follower(r.arrive(1));
    r.abort(1);
    assert!(!r.arrive(1).vanished);
    let _ = g;
}

#[test]
fn generations_wrap() {
    let r = Rendezvous::starting_at(u32::MAX - 1);
    let (_, served) = lone_smi(&r, 0, 1);
    assert!(served);
    let g = leader(r.arrive(0));
    assert_eq!(g, 0);
    assert_eq!(follower(r.arrive(1)), 0);
    r.release(0, g);
    assert_eq!(r.follow(1, g, &T, &Tsc::default()), Followed::Released);
    let (_, served) = lone_smi(&r, 1, 0b11);
    assert!(served);
}

#[test]
fn cpu_indices_out_of_range_take_no_part() {
    let r = Rendezvous::new();
    assert_eq!(r.arrive(MAX_CPUS as u32).role, Role::Outside);
    let (_, served) = lone_smi(&r, 63, 1 << 63);
    assert!(served);
}

/// Many CPUs (threads) take SMIs at once; some vanish at random points
/// (return without finishing, as on INIT in SMM). Whatever happens: no two
/// CPUs ever serve at once, every wait ends within its bound, and once
/// every CPU has come back, serving works again.
#[test]
fn concurrent_smis_with_vanishing_cpus_keep_the_invariants() {
    const CPUS: u32 = 4;
    const SMIS: u32 = 300;
    let expected = (1u64 << CPUS) - 1;
    let r = Arc::new(Rendezvous::new());
    let serving = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let vanishes = Arc::new(AtomicU32::new(0));
    let timeouts = Timeouts {
        gather: 50,
        follow: 400,
    };
    let threads: Vec<_> = (0..CPUS)
        .map(|cpu| {
            let (r, serving, served, vanishes) =
                (r.clone(), serving.clone(), served.clone(), vanishes.clone());
            std::thread::spawn(move || {
                // A small xorshift per CPU: where (if at all) this SMI vanishes.
                let mut x = 0x9e37_79b9_u32.wrapping_mul(cpu + 1);
                let mut vanished_serving = false;
                for _ in 0..SMIS {
                    if std::mem::take(&mut vanished_serving) {
                        // Back in SMM: it is certainly not serving any more
                        // (it still holds the claim until `arrive`).
                        serving.store(false, Ordering::SeqCst);
                    }
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    let vanish_at = if x.is_multiple_of(7) { x / 7 % 3 } else { 3 };
                    if vanish_at < 3 {
                        vanishes.fetch_add(1, Ordering::Relaxed);
                    }
                    let clock = Tsc::default();
                    match r.arrive(cpu).role {
                        Role::Leader { generation } => {
                            if vanish_at == 0 {
                                continue;
                            }
                            r.gather(generation, expected, &timeouts, &clock);
                            assert!(clock.now() <= timeouts.gather);
                            if r.claim(cpu) {
                                assert!(!serving.swap(true, Ordering::SeqCst), "two CPUs serve");
                                for _ in 0..20 {
                                    std::thread::yield_now();
                                }
                                if vanish_at == 1 {
                                    // Vanishes mid-serve: the flag stays set
                                    // until it comes back, as its buffers would.
                                    vanished_serving = true;
                                    continue;
                                }
                                served.fetch_add(1, Ordering::Relaxed);
                                serving.store(false, Ordering::SeqCst);
                            }
                            r.release(cpu, generation);
                        }
                        Role::Follower { generation } => {
                            if vanish_at < 3 {
                                continue;
                            }
                            r.follow(cpu, generation, &timeouts, &clock);
                            assert!(clock.now() <= timeouts.follow);
                        }
                        Role::Outside => unreachable!(),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a simulated CPU panicked");
    }
    assert!(vanishes.load(Ordering::Relaxed) > 0);
    // Every CPU takes one more SMI (those that vanished come back), then a
    // lone SMI must be able to serve.
    serving.store(false, Ordering::SeqCst);
    for cpu in 0..CPUS {
        let a = r.arrive(cpu);
        match a.role {
            Role::Leader { generation } => r.release(cpu, generation),
            Role::Follower { generation } => {
                r.follow(cpu, generation, &timeouts, &Tsc::default());
            }
            Role::Outside => unreachable!(),
        }
    }
    let (_, ok) = lone_smi(&r, 0, expected);
    assert!(ok, "serving must work again once every CPU came back");
    let c = r.counters();
    assert!(c.sessions > 0 && served.load(Ordering::Relaxed) > 0);
    eprintln!("{c:?}, served {}", served.load(Ordering::Relaxed));
}

/// A targeted session (expecting only its leader) must not make the
/// rendezvous forget that another CPU is absent (review finding).
#[test]
fn a_targeted_session_does_not_forget_which_cpus_are_absent() {
    let r = Rendezvous::new();
    let g = leader(r.arrive(0));
    r.gather(g, 0b11, &T, &Tsc::default()); // CPU 1 never comes: absent
    assert!(r.claim(0));
    r.release(0, g);
    let g = leader(r.arrive(0));
    r.gather(g, 0b01, &T, &Tsc::default()); // targeted
    assert!(r.claim(0));
    r.release(0, g);
    let clock = Tsc::default();
    let g = leader(r.arrive(0));
    r.gather(g, 0b11, &T, &clock); // broadcast: CPU 1 still unseen
    r.release(0, g);
    assert_eq!(
        clock.now(),
        0,
        "CPU 1 was waited for again without being seen"
    );
}

/// A CPU that vanished while holding the serve claim says so when it comes
/// back, so the agent can repair its state before the next serve.
#[test]
fn a_vanished_serve_is_reported_on_return() {
    let r = Rendezvous::new();
    let g = leader(r.arrive(0));
    r.gather(g, 0b01, &T, &Tsc::default());
    assert!(r.claim(0));
    let a = r.arrive(0);
    assert!(a.vanished && a.interrupted_serve);
    r.release(0, leader(a));
    leader(r.arrive(1));
    assert!(r.claim(1));
    assert!(
        r.abort(1),
        "a fault while serving is an interrupted serve too"
    );
}
