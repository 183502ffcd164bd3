//! What runs on every SMI: all CPUs in SMM rendezvous, the first to arrive
//! serves the mailbox, and all return with RSM. Nothing here trusts the
//! mailbox: it is read once into SMRAM and checked there.
//!
//! What boot decided is the sealed [`config()`]; the live state of the
//! rendezvous lives in [`SMM`], a static of the image: in SMM the image is
//! the copy inside TSEG, so this is SMRAM that neither the OS nor the host
//! can reach. Boot never stores into it.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use smmvmi_agent::rendezvous::{Clock, Rendezvous, Role, Timeouts};
use smmvmi_mailbox::frame::{Direction, FLAG_NO_SNAPSHOT};
use smmvmi_mailbox::layout as mb;

use super::config::{MailboxBar, config};
use super::doorbell;
use crate::hw::idt::Frame;
use crate::hw::memory::Region;
use crate::hw::{cpu, tsc};
use crate::layout::{
    PERCPU_INDEX, PERCPU_LEN, PHYS_OFF, RELOC_DATA, RELOC_DATA_LEN, SELFTEST_WORD, STACK_SIZE,
};

/// The ivshmem BAR that holds the shared memory.
const MAILBOX_BAR: u8 = 2;

/// How long the leader of an SMI session waits for the other CPUs.
const GATHER_MS: u64 = 100;
/// How long a follower waits for its leader to release the session. Well
/// above GATHER_MS plus the longest serve (a full 1 MiB mailbox of reads
/// and sealing: 76 ms measured under TCG, README), so only a leader that
/// vanished (left SMM without RSM) is given up.
const FOLLOW_MS: u64 = 500;

/// SMM-private live state (SMRAM once the image is copied into TSEG). Its
/// initial values are the constants below; boot stores nothing here.
pub struct SmmShared {
    /// The first session after the seal is the boot self-test: it reports
    /// the CPUs it saw in RELOC_DATA, once.
    boot_selftest: AtomicBool,
    mailbox_moved: AtomicU64,
    faults: AtomicU64,
    /// Times the doorbell's MSI-X arming was found undone and restored.
    doorbell_rearms: AtomicU64,
    /// A serve was cut short (its CPU vanished or faulted): the next claim
    /// holder repairs the agent's state before serving.
    recover_agent: AtomicBool,
    /// Longest time one CPU spent in SMM for one SMI, in TSC ticks (from
    /// the Rust entry to the return to the RSM stub).
    max_residency: AtomicU64,
}

pub static SMM: SmmShared = SmmShared {
    boot_selftest: AtomicBool::new(true),
    mailbox_moved: AtomicU64::new(0),
    faults: AtomicU64::new(0),
    doorbell_rearms: AtomicU64::new(0),
    recover_agent: AtomicBool::new(false),
    max_residency: AtomicU64::new(0),
};

/// Who serves, who waits, and for how long (host-tested state machine,
/// `smmvmi_agent::rendezvous`).
static RENDEZVOUS: Rendezvous = Rendezvous::new();

/// The calling CPU's TSC; waits `pause`, which under TCG lets the other
/// vCPUs run and take their SMI.
struct TscClock;

impl Clock for TscClock {
    fn now(&self) -> u64 {
        tsc::now()
    }
}

fn timeouts() -> Timeouts {
    let per_ms = config().tsc_per_ms.max(1);
    Timeouts {
        gather: GATHER_MS * per_ms,
        follow: FOLLOW_MS * per_ms,
    }
}

/// True when running in SMM (CR3 is the SMM page table).
pub fn in_smm() -> bool {
    let cr3 = cpu::read_cr3();
    let smm = config().smm_cr3;
    smm != 0 && cr3 & !0xfff == smm
}

fn percpu(block: u64) -> Region {
    // SAFETY: `block` is this CPU's per-CPU block in its TSEG tile, set up
    // by boot::tseg::install_and_relocate and passed in by the entry stub;
    // the first PERCPU_LEN bytes of the tile belong to this CPU alone.
    unsafe { Region::new(block, PERCPU_LEN) }
}

/// The Rust side of every SMI (called by `smm_common_entry`). Returns within
/// GATHER_MS plus one serve (leader) or FOLLOW_MS (follower), whatever the
/// other CPUs do.
// SAFETY: `smm_main` is a unique symbol name, called only by
// `smm_common_entry` (asm/smm.s) with the C ABI and the per-CPU block in
// RDI, as declared.
#[unsafe(no_mangle)]
extern "C" fn smm_main(block: u64) {
    let entered = tsc::now();
    let cpu = percpu(block).read_u32(PERCPU_INDEX);
    super::agent::snapshot_self(cpu, block);
    let timeouts = timeouts();
    let arrival = RENDEZVOUS.arrive(cpu);
    if arrival.interrupted_serve {
        // This CPU vanished while serving: the agent's state may be half
        // updated. The next CPU to hold the serve claim repairs it first.
        SMM.recover_agent.store(true, Ordering::Release);
    }
    match arrival.role {
        Role::Leader { generation } => {
            // A request that needs no snapshot (sent with a targeted SMI) is
            // served at once by this CPU; anything else waits for the others.
            // The flag is read once here; the agent checks it against the
            // authenticated header (ServeContext::snapshot_skipped).
            let skip = mailbox().and_then(|(mbox, _)| no_snapshot_requested(&mbox));
            let all = config().cpu_mask;
            let expected = if skip.is_some() { 1 << cpu } else { all };
            let gathered = RENDEZVOUS.gather(generation, expected, &timeouts, &TscClock);
            if RENDEZVOUS.claim(cpu) {
                // The BAR is checked again: other CPUs ran guest code while
                // this one gathered.
                let held = Held {
                    present: gathered.present,
                    snapshot_skipped: skip,
                    every_cpu: gathered.complete && expected == all,
                };
                serve(held, mailbox());
            }
            RENDEZVOUS.release(cpu, generation);
        }
        Role::Follower { generation } => {
            RENDEZVOUS.follow(cpu, generation, &timeouts, &TscClock);
        }
        Role::Outside => {}
    }
    SMM.max_residency
        .fetch_max(tsc::now().wrapping_sub(entered), Ordering::Relaxed);
}

/// The ivshmem BAR as the firmware assigned it, if the device still decodes
/// it there. The OS controls PCI config space and may move or disable the
/// BAR; then the recorded address may be RAM or another device, and the
/// agent must not write to it.
fn mailbox() -> Option<(Region, MailboxBar)> {
    let bar = config().mailbox?;
    let (pa, len) = (bar.pa, bar.len);
    if pa == 0 || len < mb::HEADER_SIZE as u64 {
        return None;
    }
    if !doorbell::bar_decoded_at(bar.bdf, MAILBOX_BAR, pa) {
        SMM.mailbox_moved.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    // SAFETY: [pa, pa + len) is the ivshmem BAR the firmware assigned and
    // just verified is still decoded there; PHYS_OFF maps all physical
    // memory in SMM. It is shared with the guest and the host, so it is only
    // accessed with the volatile accessors.
    Some((unsafe { Region::new(PHYS_OFF + pa, len) }, bar))
}

/// Whether the request waiting in the mailbox says it needs no snapshot
/// (`FLAG_NO_SNAPSHOT` in its frame header). Read before the frame is
/// authenticated: a guest that sets or clears the flag only changes whether
/// this SMI waits for the other CPUs; the flag is part of the authenticated
/// header, so a changed one fails the request.
/// Returns the request's doorbell value if so: the agent then serves only
/// that request in this SMI.
fn no_snapshot_requested(mbox: &Region) -> Option<u64> {
    let areas = mb::Areas::from_size(mbox.len() as usize).ok()?;
    let doorbell = mbox.read_u64(mb::OFF_REQ_DOORBELL as u64);
    let word = mbox.read_u32(areas.request.start as u64);
    let (direction, flags) = ((word >> 16) as u8, (word >> 24) as u8);
    (doorbell != 0 && direction == Direction::Request as u8 && flags & FLAG_NO_SNAPSHOT != 0)
        .then_some(doorbell)
}

/// What the session this CPU serves holds.
#[derive(Clone, Copy)]
pub struct Held {
    /// The CPUs whose snapshots are stored for this session.
    pub present: u64,
    /// The leader did not wait for the others, for the request posted with
    /// this doorbell (FLAG_NO_SNAPSHOT read once).
    pub snapshot_skipped: Option<u64>,
    /// Every CPU is in SMM for this session: no guest code runs, so shared
    /// platform registers (the memory hot-plug selector) may be used.
    pub every_cpu: bool,
}

/// Serves one SMI session (this CPU holds the serve claim): publishes the
/// agent's state and answers PING and the request.
fn serve(held: Held, mailbox: Option<(Region, MailboxBar)>) {
    #[cfg(feature = "fault-injection")]
    {
        use crate::layout::{APM_CMD_EXECUTE_GUEST, APM_CMD_INJECT_FAULT};
        let cmd = crate::hw::chipset::apm_command();
        if cmd == APM_CMD_INJECT_FAULT {
            // SAFETY: deliberately raises #UD to exercise the SMM fault path.
            unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
        }
        if cmd == APM_CMD_EXECUTE_GUEST {
            // SAFETY: deliberately jumps into guest RAM (physical 0x1000,
            // through the alias) to check that the SMM page tables map it
            // no-execute: the fetch must raise #PF before any guest byte runs.
            unsafe { core::arch::asm!("call {}", in(reg) PHYS_OFF + 0x1000, clobber_abi("C")) };
        }
    }
    if SMM.boot_selftest.swap(false, Ordering::Relaxed) {
        // SAFETY: RELOC_DATA is firmware-owned low RAM during boot; the flag
        // makes this the only write there, on the self-test SMI before Linux.
        let data = unsafe { Region::new(PHYS_OFF + RELOC_DATA, RELOC_DATA_LEN) };
        data.write_u32(SELFTEST_WORD, held.present.count_ones().max(1));
    }
    let Some((mbox, bar)) = mailbox else { return };
    if doorbell::arm(&bar, config().cpu_mask) == Some(true) {
        SMM.doorbell_rearms.fetch_add(1, Ordering::Relaxed);
    }
    publish_header(&mbox);
    let ping = mbox.read_u64(mb::OFF_PING_REQ as u64);
    mbox.write_u64(mb::OFF_PING_ACK as u64, ping);
    if SMM.recover_agent.swap(false, Ordering::Acquire) {
        super::agent::recover_interrupted_serve();
    }
    if let Some((served, cycles)) = super::agent::serve(&mbox, held)
        && served != smmvmi_agent::Served::Idle
    {
        mbox.write_u64(mb::OFF_SERVE_CYCLES as u64, cycles);
        doorbell::ring(&mbox, &bar);
    }
}

fn publish_header(mbox: &Region) {
    let counters = RENDEZVOUS.counters();
    mbox.write_volatile(mb::OFF_MAGIC as u64, &mb::MAGIC);
    mbox.write_u32(mb::OFF_VERSION as u64, mb::VERSION);
    mbox.write_u64(mb::OFF_FEATURES as u64, config().features);
    mbox.write_u32(mb::OFF_SIZE as u64, mbox.len() as u32);
    mbox.write_u32(mb::OFF_NCPUS as u64, config().ncpus);
    mbox.write_u64(mb::OFF_SMI_COUNT as u64, counters.sessions);
    mbox.write_u64(mb::OFF_PARTIAL_SESSIONS as u64, counters.partial_sessions);
    mbox.write_u64(
        mb::OFF_RECOVERED_SESSIONS as u64,
        counters.recovered_sessions,
    );
    mbox.write_u64(mb::OFF_VANISHED_CPUS as u64, counters.vanished_cpus);
    mbox.write_u64(mb::OFF_FOLLOWER_TIMEOUTS as u64, counters.follower_timeouts);
    mbox.write_u64(mb::OFF_SERVE_BUSY as u64, counters.serve_busy);
    mbox.write_u64(
        mb::OFF_DOORBELL_REARMS as u64,
        SMM.doorbell_rearms.load(Ordering::Relaxed),
    );
    mbox.write_u64(
        mb::OFF_MAX_SMM_US as u64,
        SMM.max_residency
            .load(Ordering::Relaxed)
            .saturating_mul(1000)
            / config().tsc_per_ms.max(1),
    );
    super::agent::publish(mbox);
    let state = if SMM.faults.load(Ordering::Relaxed) != 0 {
        mb::AgentState::Fault
    } else if super::agent::provisioned() {
        mb::AgentState::Ready
    } else {
        mb::AgentState::Unprovisioned
    };
    mbox.write_u32(mb::OFF_STATE as u64, state as u32);
}

/// An exception in SMM: report it, release the other CPUs, and let this
/// CPU's SMI return (the interrupted guest state is untouched). Returns the
/// per-CPU block for `smm_abort_resume`.
pub fn on_exception(frame: &Frame) -> u64 {
    // The frame is on this CPU's SMM stack, whose lowest word holds the
    // CPU's tile (per-CPU block) address (boot::tseg::install_and_relocate).
    let stack_base = (frame as *const Frame as u64) & !(STACK_SIZE - 1);
    // SAFETY: `stack_base` is the base of the SMM stack we are running on,
    // in TSEG; its first 8 bytes were written at install time.
    let block = unsafe { Region::new(stack_base, 8) }.read_u64(0);
    let cpu = percpu(block).read_u32(PERCPU_INDEX);
    crate::hw::idt::describe(frame);
    SMM.faults.fetch_add(1, Ordering::Relaxed);
    if let Some((mbox, _)) = mailbox() {
        mbox.write_u32(mb::OFF_FAULT_CODE as u64, 0x100 | frame.vector as u32);
        mbox.write_u32(mb::OFF_FAULT_CPU as u64, cpu);
        mbox.write_u64(mb::OFF_FAULT_RIP as u64, frame.rip);
        mbox.write_u32(mb::OFF_STATE as u64, mb::AgentState::Fault as u32);
    }
    // Give back what this CPU held (serve claim, session) and leave; a fault
    // in the middle of a serve leaves the agent's state to be repaired.
    if RENDEZVOUS.abort(cpu) {
        SMM.recover_agent.store(true, Ordering::Release);
    }
    block
}
