//! Replay protection for many IDS clients sharing one agent.
//!
//! Each client seals with its own keys (derived from the shared key, the
//! boot's salt and a random 64-bit client id) and numbers its requests with
//! a sequence that starts at the current time in nanoseconds and only grows.
//! The daemon interleaves clients, so the agent sees each client's requests
//! in order but the clients mixed.
//!
//! The agent keeps, for up to [`MAX_CLIENTS`] clients, the highest sequence
//! seen and a [`WINDOW`]-bit map of the ones just below it (the sliding
//! window of RFC 4303 §3.4.3): a request is fresh if it is above the highest,
//! or inside the window and not yet seen. The table is bounded, so a client
//! can be forgotten; to keep a forgotten client's old requests from being
//! replayed, the agent keeps a *floor*: the highest sequence of every client
//! it forgot. An unknown client is accepted only above the floor. Sequences
//! are nanosecond clock readings, so a new client starts above the floor of
//! clients forgotten before it (a client whose clock is behind is refused
//! and told to reconnect).
//!
//! Only authenticated requests change the table ([`ReplayWindow::accept`]
//! is called after the tag checked), so a forger cannot evict clients.

use thiserror::Error;

/// Clients remembered at once.
pub const MAX_CLIENTS: usize = 32;
/// Sequences below a client's highest that are still accepted once.
pub const WINDOW: u64 = 64;

/// Why a request's sequence is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum ReplayError {
    #[error("sequence {seq} of client {client:#x} was already served")]
    Replayed { client: u64, seq: u64 },
    #[error(
        "sequence {seq} of client {client:#x} is more than {WINDOW} below its highest ({highest}): too old to tell from a replay"
    )]
    TooOld { client: u64, seq: u64, highest: u64 },
    #[error(
        "client {client:#x} is new and its sequence {seq} is not above {floor}, the highest of the clients the agent forgot: reconnect (a new client starts at the current time in ns)"
    )]
    BelowFloor { client: u64, seq: u64, floor: u64 },
}

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    client: u64,
    highest: u64,
    /// Bit i set: sequence `highest - i` was served (bit 0 = highest).
    seen: u64,
    /// The floor when this client was admitted: a client the agent forgot
    /// and admits again may have had any sequence up to it served before.
    admitted_above: u64,
    last_used: u64,
    used: bool,
}

/// The per-client windows and the floor (kept in SMRAM).
#[derive(Clone, Debug)]
pub struct ReplayWindow {
    entries: [Entry; MAX_CLIENTS],
    floor: u64,
    clock: u64,
    /// The highest sequence ever accepted, raised *before* an entry is
    /// changed: if the serving CPU vanishes halfway through an update,
    /// [`ReplayWindow::forget_all`] still knows how far to raise the floor.
    max_seen: u64,
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    pub const fn new() -> Self {
        Self {
            entries: [Entry {
                client: 0,
                highest: 0,
                seen: 0,
                admitted_above: 0,
                last_used: 0,
                used: false,
            }; MAX_CLIENTS],
            floor: 0,
            clock: 0,
            max_seen: 0,
        }
    }

    /// Forgets every client and raises the floor above every sequence ever
    /// accepted: the recovery after a serve that was cut short (the CPU left
    /// SMM without RSM, or faulted) in the middle of updating this table.
    /// Clients whose next sequence is below the new floor are told to
    /// reconnect ([`ReplayError::BelowFloor`]); nothing is accepted twice.
    pub fn forget_all(&mut self) {
        self.floor = self.floor.max(self.max_seen);
        for e in &mut self.entries {
            self.floor = self.floor.max(e.highest);
            *e = Entry::default();
        }
    }

    /// The floor: the highest sequence of any client forgotten so far.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Whether `seq` of `client` would be accepted, without recording it.
    pub fn check(&self, client: u64, seq: u64) -> Result<(), ReplayError> {
        match self.entries.iter().find(|e| e.used && e.client == client) {
            Some(e) if seq <= e.admitted_above => Err(ReplayError::BelowFloor {
                client,
                seq,
                floor: e.admitted_above,
            }),
            Some(e) => check_entry(e, seq),
            None if seq <= self.floor => Err(ReplayError::BelowFloor {
                client,
                seq,
                floor: self.floor,
            }),
            None => Ok(()),
        }
    }

    /// Records `seq` of `client` as served if it is fresh (call only for an
    /// authenticated request). A new client takes a free entry or the least
    /// recently used one, whose highest sequence raises the floor.
    pub fn accept(&mut self, client: u64, seq: u64) -> Result<(), ReplayError> {
        self.check(client, seq)?;
        self.max_seen = self.max_seen.max(seq);
        self.clock += 1;
        let clock = self.clock;
        let i = match self
            .entries
            .iter()
            .position(|e| e.used && e.client == client)
        {
            Some(i) => i,
            None => {
                let i = self
                    .entries
                    .iter()
                    .position(|e| !e.used)
                    .unwrap_or_else(|| self.least_recently_used());
                let old = self.entries[i];
                if old.used {
                    // The new client must be above the floor as it will be
                    // once the evicted client is forgotten.
                    let floor = self.floor.max(old.highest);
                    if seq <= floor {
                        return Err(ReplayError::BelowFloor { client, seq, floor });
                    }
                    self.floor = floor;
                }
                self.entries[i] = Entry {
                    client,
                    highest: seq,
                    seen: 1,
                    admitted_above: self.floor,
                    last_used: clock,
                    used: true,
                };
                return Ok(());
            }
        };
        let e = &mut self.entries[i];
        if seq > e.highest {
            let shift = seq - e.highest;
            e.seen = if shift >= WINDOW { 0 } else { e.seen << shift };
            e.seen |= 1;
            e.highest = seq;
        } else {
            e.seen |= 1 << (e.highest - seq);
        }
        e.last_used = clock;
        Ok(())
    }

    fn least_recently_used(&self) -> usize {
        self.entries
            .iter()
            .enumerate()
            .min_by_key(|(_, e)| e.last_used)
            .map(|(i, _)| i)
            .unwrap_or(0)
    }
}

fn check_entry(e: &Entry, seq: u64) -> Result<(), ReplayError> {
    if seq > e.highest {
        return Ok(());
    }
    let back = e.highest - seq;
    if back >= WINDOW {
        return Err(ReplayError::TooOld {
            client: e.client,
            seq,
            highest: e.highest,
        });
    }
    if e.seen & (1 << back) != 0 {
        return Err(ReplayError::Replayed {
            client: e.client,
            seq,
        });
    }
    Ok(())
}
