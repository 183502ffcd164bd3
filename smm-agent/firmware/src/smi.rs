//! What runs on every SMI: all CPUs in SMM rendezvous, the first to arrive
//! serves the mailbox, and all return with RSM. Nothing here trusts the
//! mailbox: it is read once into SMRAM and checked there.
//!
//! State lives in [`SMM`], a static of the image: in SMM the image is the
//! copy inside TSEG, so this is SMRAM that neither the OS nor the host can
//! reach. The boot code fills it in before the image is copied.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use smmvmi_mailbox::layout as mb;

use crate::exceptions::Frame;
use crate::layout::{PHYS_OFF, RELOC_DATA};
use crate::memory::Region;
use crate::pci_cfg;
use crate::tsc;

/// Per-CPU block (at the start of the CPU's TSEG tile): FXSAVE area at +0
/// (512 bytes), saved RSP at +512 (used by `smm_abort_resume`), CPU index at +520, session role at +524,
/// session generation at +528.
pub const PERCPU_INDEX: u64 = 520;
pub const PERCPU_ROLE: u64 = 524;
pub const PERCPU_GEN: u64 = 528;
/// Offset in RELOC_DATA where the first SMI after locking reports how many
/// CPUs it saw (boot self-test only; the agent stops writing it after that).
pub const SELFTEST_WORD: u64 = 0x20;

const ROLE_NONE: u32 = 0;
const ROLE_LEADER: u32 = 1;
const ROLE_FOLLOWER: u32 = 2;

/// How long the first CPU in SMM waits for the others.
const RENDEZVOUS_US: u64 = 100_000;

/// SMM-private state (SMRAM once the image is copied into TSEG).
pub struct SmmShared {
    pub smm_cr3: AtomicU64,
    pub ncpus: AtomicU32,
    /// CPU indices (= APIC IDs) present at boot, one bit each.
    pub cpu_mask: AtomicU64,
    pub tseg_base: AtomicU64,
    pub tseg_size: AtomicU64,
    /// Mailbox: physical address and size of ivshmem BAR2 (0 = none), and
    /// the PCI location it was assigned at (bus << 8 | dev << 3 | fn).
    pub mailbox_pa: AtomicU64,
    pub mailbox_len: AtomicU64,
    pub mailbox_bdf: AtomicU32,
    pub features: AtomicU64,
    pub boot_selftest: AtomicBool,
    /// TSC ticks per millisecond, measured at boot.
    pub tsc_per_ms: AtomicU64,

    /// Rendezvous lock: 0 = free, else the holder's CPU index + 1.
    lock: AtomicU32,
    session_open: AtomicBool,
    present: AtomicU32,
    present_mask: AtomicU64,
    generation: AtomicU32,
    done_generation: AtomicU32,

    sessions: AtomicU64,
    partial_sessions: AtomicU64,
    mailbox_moved: AtomicU64,
    faults: AtomicU64,
}

pub static SMM: SmmShared = SmmShared {
    smm_cr3: AtomicU64::new(0),
    ncpus: AtomicU32::new(0),
    cpu_mask: AtomicU64::new(0),
    tseg_base: AtomicU64::new(0),
    tseg_size: AtomicU64::new(0),
    mailbox_pa: AtomicU64::new(0),
    mailbox_len: AtomicU64::new(0),
    mailbox_bdf: AtomicU32::new(0),
    features: AtomicU64::new(0),
    boot_selftest: AtomicBool::new(false),
    tsc_per_ms: AtomicU64::new(0),
    lock: AtomicU32::new(0),
    session_open: AtomicBool::new(false),
    present: AtomicU32::new(0),
    present_mask: AtomicU64::new(0),
    generation: AtomicU32::new(0),
    done_generation: AtomicU32::new(0),
    sessions: AtomicU64::new(0),
    partial_sessions: AtomicU64::new(0),
    mailbox_moved: AtomicU64::new(0),
    faults: AtomicU64::new(0),
};

/// Takes the rendezvous lock for `cpu`. It is held only around a few loads
/// and stores, never across anything that can fault.
fn lock(cpu: u32) {
    while SMM
        .lock
        .compare_exchange_weak(0, cpu + 1, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
}

fn unlock() {
    SMM.lock.store(0, Ordering::Release);
}

/// Leaves the current session; the last CPU out closes it, so a CPU that
/// was slow to leave can never be counted in the next session.
fn leave(cpu: u32) {
    lock(cpu);
    let left = SMM.present.load(Ordering::Relaxed).saturating_sub(1);
    SMM.present.store(left, Ordering::Relaxed);
    if left == 0 {
        SMM.session_open.store(false, Ordering::Relaxed);
    }
    unlock();
}

/// `done` has reached `generation` (wrapping: generations count up forever).
fn reached(done: u32, generation: u32) -> bool {
    done.wrapping_sub(generation) as i32 >= 0
}

/// True when running in SMM (CR3 is the SMM page table).
pub fn in_smm() -> bool {
    let cr3: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe {
        core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack, preserves_flags))
    };
    let smm = SMM.smm_cr3.load(Ordering::Relaxed);
    smm != 0 && cr3 & !0xfff == smm
}

fn percpu(block: u64) -> Region {
    // SAFETY: `block` is this CPU's per-CPU block in its TSEG tile, set up
    // by smm::install_and_relocate and passed in by the entry stub; the
    // first 0x1000 bytes of the tile belong to this CPU alone.
    unsafe { Region::new(block, 0x1000) }
}

/// The Rust side of every SMI (called by `smm_common_entry`).
#[unsafe(no_mangle)]
extern "C" fn smm_main(block: u64) {
    let me = percpu(block);
    let cpu = me.read_u32(PERCPU_INDEX);
    crate::agent::snapshot_self(cpu, block);

    lock(cpu);
    let leader = !SMM.session_open.load(Ordering::Relaxed);
    if leader {
        SMM.session_open.store(true, Ordering::Relaxed);
        SMM.present_mask.store(0, Ordering::Relaxed);
        SMM.generation.fetch_add(1, Ordering::Relaxed);
    }
    // Release: this CPU's snapshot (stored above) happens-before the
    // server's Acquire load of the count.
    SMM.present.fetch_add(1, Ordering::Release);
    SMM.present_mask
        .fetch_or(1 << (cpu & 63), Ordering::Release);
    let generation = SMM.generation.load(Ordering::Relaxed);
    unlock();
    me.write_u32(PERCPU_GEN, generation);
    me.write_u32(
        PERCPU_ROLE,
        if leader { ROLE_LEADER } else { ROLE_FOLLOWER },
    );

    if leader {
        let ncpus = SMM.ncpus.load(Ordering::Relaxed);
        let all = tsc::wait_until(RENDEZVOUS_US, || {
            SMM.present.load(Ordering::Acquire) >= ncpus
        });
        if !all {
            SMM.partial_sessions.fetch_add(1, Ordering::Relaxed);
        }
        serve();
        leader_leave(cpu, generation);
    } else {
        while !reached(SMM.done_generation.load(Ordering::Acquire), generation) {
            core::hint::spin_loop();
        }
        leave(cpu);
    }
    me.write_u32(PERCPU_ROLE, ROLE_NONE);
}

fn leader_leave(cpu: u32, generation: u32) {
    SMM.done_generation.store(generation, Ordering::Release);
    // Followers leave as soon as they see `done_generation`. Waiting for them
    // keeps the leader from re-entering (on a pending SMI) before they are
    // out; the wait is bounded, and whoever leaves last closes the session.
    tsc::wait_until(1_000_000, || SMM.present.load(Ordering::Acquire) <= 1);
    leave(cpu);
}

/// The ivshmem BAR as the firmware assigned it, if the device still decodes
/// it there. The OS controls PCI config space and may move or disable the
/// BAR; then the recorded address may be RAM or another device, and the
/// agent must not write to it.
fn mailbox() -> Option<Region> {
    let pa = SMM.mailbox_pa.load(Ordering::Relaxed);
    let len = SMM.mailbox_len.load(Ordering::Relaxed);
    if pa == 0 || len < mb::HEADER_SIZE as u64 {
        return None;
    }
    let bdf = SMM.mailbox_bdf.load(Ordering::Relaxed);
    let (bus, dev, func) = ((bdf >> 8) as u8, ((bdf >> 3) & 0x1f) as u8, (bdf & 7) as u8);
    let in_place = {
        let _latch = pci_cfg::AddressLatchGuard::save();
        let cmd = pci_cfg::read16(bus, dev, func, 0x04);
        let lo = pci_cfg::read32(bus, dev, func, 0x18);
        let hi = pci_cfg::read32(bus, dev, func, 0x1c);
        let bar = (u64::from(hi) << 32) | u64::from(lo & !0xf);
        cmd & 0x2 != 0 && bar == pa
    };
    if !in_place {
        SMM.mailbox_moved.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    // SAFETY: [pa, pa + len) is the ivshmem BAR the firmware assigned and
    // just verified is still decoded there; PHYS_OFF maps all physical
    // memory in SMM. It is shared with the guest and the host, so it is only
    // accessed with the volatile accessors.
    Some(unsafe { Region::new(PHYS_OFF + pa, len) })
}

/// Before SMM is locked: tells the host that a firmware owns the mailbox
/// and is booting (the agent publishes "ready" on its first SMI).
pub fn announce_booting(pa: u64, len: u64) {
    if len < mb::HEADER_SIZE as u64 {
        return;
    }
    // SAFETY: the ivshmem BAR just assigned by the firmware, identity mapped
    // by the boot page tables; shared with the host, so volatile accesses.
    let mbox = unsafe { Region::new(pa, mb::HEADER_SIZE as u64) };
    mbox.write_volatile(mb::OFF_MAGIC as u64, &mb::MAGIC);
    mbox.write_u32(mb::OFF_VERSION as u64, mb::VERSION);
    mbox.write_u32(mb::OFF_SIZE as u64, len as u32);
    mbox.write_u32(mb::OFF_STATE as u64, mb::AgentState::Booting as u32);
}

#[cfg(feature = "fault-injection")]
use smmvmi_mailbox::platform::{APM_CMD_EXECUTE_GUEST, APM_CMD_INJECT_FAULT, APM_CNT_PORT};

/// Serves one SMI session: publishes the agent's state and answers PING.
fn serve() {
    #[cfg(feature = "fault-injection")]
    {
        // SAFETY: reading the APM control port returns the last command byte.
        let cmd = unsafe { x86_64::instructions::port::Port::<u8>::new(APM_CNT_PORT).read() };
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
    let sessions = SMM.sessions.fetch_add(1, Ordering::Relaxed) + 1;
    let present = SMM.present.load(Ordering::Acquire);
    if SMM.boot_selftest.swap(false, Ordering::Relaxed) {
        // SAFETY: RELOC_DATA is firmware-owned low RAM during boot; the flag
        // makes this the only write there, on the self-test SMI before Linux.
        let data = unsafe { Region::new(PHYS_OFF + RELOC_DATA, 0x1000) };
        data.write_u32(SELFTEST_WORD, present.max(1));
    }
    let Some(mbox) = mailbox() else { return };
    publish_header(&mbox, sessions);
    let ping = mbox.read_u64(mb::OFF_PING_REQ as u64);
    mbox.write_u64(mb::OFF_PING_ACK as u64, ping);
    let mask = SMM.present_mask.load(Ordering::Acquire);
    if let Some((served, cycles)) = crate::agent::serve(&mbox, mask)
        && served != smmvmi_agent::Served::Idle
    {
        mbox.write_u64(mb::OFF_SERVE_CYCLES as u64, cycles);
    }
}

fn publish_header(mbox: &Region, sessions: u64) {
    mbox.write_volatile(mb::OFF_MAGIC as u64, &mb::MAGIC);
    mbox.write_u32(mb::OFF_VERSION as u64, mb::VERSION);
    mbox.write_u64(
        mb::OFF_FEATURES as u64,
        SMM.features.load(Ordering::Relaxed),
    );
    mbox.write_u32(mb::OFF_SIZE as u64, mbox.len() as u32);
    mbox.write_u32(mb::OFF_NCPUS as u64, SMM.ncpus.load(Ordering::Relaxed));
    mbox.write_u64(mb::OFF_SMI_COUNT as u64, sessions);
    mbox.write_u64(
        mb::OFF_PARTIAL_SESSIONS as u64,
        SMM.partial_sessions.load(Ordering::Relaxed),
    );
    crate::agent::publish(mbox);
    let state = if SMM.faults.load(Ordering::Relaxed) != 0 {
        mb::AgentState::Fault
    } else if crate::agent::provisioned() {
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
    // CPU's tile (per-CPU block) address (smm::install_and_relocate).
    let stack_base = (frame as *const Frame as u64) & !(crate::smm::STACK_SIZE - 1);
    // SAFETY: `stack_base` is the base of the SMM stack we are running on,
    // in TSEG; its first 8 bytes were written at install time.
    let block = unsafe { Region::new(stack_base, 8) }.read_u64(0);
    let me = percpu(block);
    let cpu = me.read_u32(PERCPU_INDEX);
    crate::exceptions::describe(frame);
    SMM.faults.fetch_add(1, Ordering::Relaxed);
    if let Some(mbox) = mailbox() {
        mbox.write_u32(mb::OFF_FAULT_CODE as u64, 0x100 | frame.vector as u32);
        mbox.write_u32(mb::OFF_FAULT_CPU as u64, cpu);
        mbox.write_u64(mb::OFF_FAULT_RIP as u64, frame.rip);
        mbox.write_u32(mb::OFF_STATE as u64, mb::AgentState::Fault as u32);
    }
    // Nothing that can fault runs under the rendezvous lock, but if this
    // CPU did hold it, release it (and only then: another CPU may hold it).
    let _ = SMM
        .lock
        .compare_exchange(cpu + 1, 0, Ordering::Release, Ordering::Relaxed);
    match me.read_u32(PERCPU_ROLE) {
        ROLE_LEADER => leader_leave(cpu, me.read_u32(PERCPU_GEN)),
        ROLE_FOLLOWER => leave(cpu),
        _ => {}
    }
    me.write_u32(PERCPU_ROLE, ROLE_NONE);
    block
}
