//! Many IDS clients sharing one agent: each request is served at most once,
//! reordering within the window is accepted, and a client the agent forgot
//! cannot have its old requests replayed.

use std::collections::HashSet;

use proptest::prelude::*;
use smmvmi_agent::replay::{MAX_CLIENTS, ReplayError, ReplayWindow, WINDOW};

#[test]
fn interleaved_clients_are_all_served_once() {
    let mut w = ReplayWindow::new();
    let clients: Vec<u64> = (1..=8).map(|c| c * 0x1111_2222_3333).collect();
    // 8 clients x 1000 requests, interleaved round-robin, each sequence
    // starting at a different "time".
    for round in 0..1000u64 {
        for (i, &c) in clients.iter().enumerate() {
            let seq = 1_000_000 * (i as u64 + 1) + round;
            w.accept(c, seq).unwrap();
        }
    }
    for (i, &c) in clients.iter().enumerate() {
        let seq = 1_000_000 * (i as u64 + 1) + 999;
        assert_eq!(
            w.accept(c, seq),
            Err(ReplayError::Replayed { client: c, seq })
        );
    }
}

#[test]
fn reordering_inside_the_window_is_accepted_once() {
    let mut w = ReplayWindow::new();
    w.accept(7, 100).unwrap();
    w.accept(7, 110).unwrap();
    w.accept(7, 105).unwrap();
    assert_eq!(
        w.accept(7, 105),
        Err(ReplayError::Replayed {
            client: 7,
            seq: 105
        })
    );
    w.accept(7, 110 - WINDOW + 1).unwrap();
    assert_eq!(
        w.accept(7, 110 - WINDOW),
        Err(ReplayError::TooOld {
            client: 7,
            seq: 110 - WINDOW,
            highest: 110
        })
    );
}

#[test]
fn a_forgotten_client_cannot_be_replayed() {
    let mut w = ReplayWindow::new();
    // Client 1 serves seq 500, then MAX_CLIENTS newer clients push it out.
    w.accept(1, 500).unwrap();
    for c in 2..=(MAX_CLIENTS as u64 + 1) {
        w.accept(c, 1000 + c).unwrap();
    }
    assert!(w.floor() >= 500);
    assert!(matches!(
        w.accept(1, 500),
        Err(ReplayError::BelowFloor { .. })
    ));
    // A client that reconnects later starts at a later time: accepted.
    w.accept(1, 10_000).unwrap();
}

#[test]
fn check_does_not_record() {
    let mut w = ReplayWindow::new();
    w.check(3, 9).unwrap();
    w.check(3, 9).unwrap();
    w.accept(3, 9).unwrap();
    assert!(w.check(3, 9).is_err());
}

proptest! {
    /// Against a model that remembers everything: whatever the order and the
    /// number of clients (more than the table holds), nothing is ever
    /// accepted twice.
    #[test]
    fn never_accepts_twice(ops in prop::collection::vec((0u64..40, 0u64..200), 1..600)) {
        let mut w = ReplayWindow::new();
        let mut accepted: HashSet<(u64, u64)> = HashSet::new();
        for (client, seq) in ops {
            let seq = seq + 1;
            match w.accept(client, seq) {
                Ok(()) => {
                    prop_assert!(accepted.insert((client, seq)), "accepted twice: {client} {seq}");
                }
                Err(ReplayError::Replayed { .. }) => {
                    prop_assert!(accepted.contains(&(client, seq)));
                }
                Err(_) => {}
            }
        }
    }
}

/// After a serve cut short mid-update, nothing served before is accepted
/// again; clients reconnect above the new floor (review finding).
#[test]
fn forget_all_after_an_interrupted_serve_never_reopens_a_sequence() {
    let mut w = ReplayWindow::new();
    for seq in 90..=100 {
        w.accept(7, seq).unwrap();
    }
    w.accept(8, 50).unwrap();
    w.forget_all();
    assert!(w.floor() >= 100);
    for seq in 90..=100 {
        assert!(
            w.accept(7, seq).is_err(),
            "client 7 seq {seq} accepted twice"
        );
    }
    assert!(w.accept(8, 50).is_err());
    w.accept(7, 101).unwrap();
    w.accept(8, 200).unwrap();
}

/// A new client that would be below the floor once it evicts another is
/// refused before anything is evicted (review finding).
#[test]
fn eviction_checks_the_new_client_against_the_raised_floor() {
    let mut w = ReplayWindow::new();
    for c in 0..MAX_CLIENTS as u64 {
        w.accept(c, 1000 + c).unwrap();
    }
    // Client 999 at seq 500: the LRU victim (client 0, highest 1000) would
    // raise the floor to 1000.
    assert!(matches!(
        w.accept(999, 500),
        Err(ReplayError::BelowFloor { .. })
    ));
    // Nothing was evicted: client 0 continues.
    w.accept(0, 1001).unwrap();
}
