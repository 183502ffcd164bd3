//! The hardware side of the agent: its state kept in SMRAM, the guarded
//! physical-memory reader, the per-CPU snapshot each CPU takes of itself on
//! SMI entry, and key provisioning at boot. The logic is `smmvmi_agent`.

use core::cell::UnsafeCell;
use core::sync::atomic::Ordering;

use smmvmi_agent::cpu::{MSR_CSTAR, MSR_KERNEL_GS_BASE, MSR_LSTAR, MSR_STAR, MSR_SYSENTER_EIP};
use smmvmi_agent::{
    AgentState, CheckedPhys, CpuSnapshot, Msrs, PhysMemory, PhysRange, RamMap, ServeContext,
    Served, SevConfig,
};
use smmvmi_boot::e820::{self, E820Map};
use smmvmi_boot::fw_cfg::{self as fwc, FwCfgIo};
use smmvmi_mailbox::crypto::SHARED_KEY_LEN;
use smmvmi_mailbox::layout as mb;
use smmvmi_mailbox::records;

use super::config::config;
use crate::hw::fw_cfg::FwCfg;
use crate::hw::memory::Region;
use crate::layout::{self, PHYS_OFF};
use crate::log;

/// The fw_cfg file a test setup provisions the key with (visible to the
/// host: for tests only; SEV setups inject the key as a launch secret).
pub const KEY_FILE: &str = smmvmi_mailbox::platform::KEY_FW_CFG_FILE;

/// A cell whose contents only one CPU touches at a time: the boot CPU
/// before Linux, or the CPU serving the current SMI session (the rendezvous
/// in `smi.rs` admits one).
pub struct SmmCell<T>(UnsafeCell<T>);

// SAFETY: access is serialized by the callers of `get` (see its contract).
unsafe impl<T> Sync for SmmCell<T> {}

impl<T> SmmCell<T> {
    pub const fn new(v: T) -> Self {
        Self(UnsafeCell::new(v))
    }

    /// # Safety
    /// The caller is the only CPU using this cell until the returned
    /// reference is dropped (boot CPU before Linux, or the serving CPU of an
    /// SMI session, or a CPU touching only its own per-CPU cell).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn get(&self) -> &mut T {
        // SAFETY: exclusive use guaranteed by the caller.
        unsafe { &mut *self.0.get() }
    }
}

/// The agent's SMRAM state.
pub struct Agent {
    pub state: Option<AgentState<'static>>,
    pub ram: RamMap,
    pub smram: PhysRange,
    pub sev: SevConfig,
    /// `records::KEY_FROM_*`: where `provision` found the key.
    pub key_flags: u32,
    pub cpus: [CpuSnapshot; layout::MAX_CPUS as usize],
}

const ZERO_CPU: CpuSnapshot = {
    // SAFETY: CpuSnapshot is a struct of u64 fields only; all-zero is valid.
    unsafe { core::mem::zeroed() }
};

pub static AGENT: SmmCell<Agent> = SmmCell::new(Agent {
    state: None,
    ram: RamMap::new(),
    smram: PhysRange::EMPTY,
    sev: SevConfig {
        active: false,
        c_bit: 0,
    },
    key_flags: 0,
    cpus: [ZERO_CPU; layout::MAX_CPUS as usize],
});

/// One slot per CPU: written by that CPU on SMI entry, read by the server
/// after the rendezvous.
static SNAPSHOTS: [SmmCell<CpuSnapshot>; layout::MAX_CPUS as usize] =
    [const { SmmCell::new(ZERO_CPU) }; layout::MAX_CPUS as usize];

fn rdmsr(msr: u32) -> u64 {
    // SAFETY: only architectural MSRs present on every x86-64 CPU are read
    // (LSTAR, STAR, CSTAR, KERNEL_GS_BASE, SYSENTER_EIP), in ring 0.
    unsafe { x86_64::registers::model_specific::Msr::new(msr).read() }
}

/// On SMI entry, each CPU records its interrupted state (save state + MSRs
/// that the save state lacks) in its own slot.
pub fn snapshot_self(cpu: u32, smbase: u64) {
    let Some(slot) = SNAPSHOTS.get(cpu as usize) else {
        return;
    };
    // SAFETY: the save state of this CPU, in its own TSEG tile.
    let ss = unsafe { Region::new(smbase + smmvmi_agent::cpu::SAVE_STATE_SMBASE_OFFSET, 0x400) };
    let mut raw = [0u8; smmvmi_agent::cpu::SAVE_STATE_LEN];
    ss.read(0, &mut raw);
    let mut snap = smmvmi_agent::decode_save_state(&raw);
    smmvmi_agent::apply_msrs(
        &mut snap,
        &Msrs {
            lstar: rdmsr(MSR_LSTAR),
            star: rdmsr(MSR_STAR),
            cstar: rdmsr(MSR_CSTAR),
            kernel_gs_base: rdmsr(MSR_KERNEL_GS_BASE),
            sysenter_eip: rdmsr(MSR_SYSENTER_EIP),
        },
    );
    // SAFETY: each CPU writes only its own slot, before it joins the session.
    unsafe { *slot.get() = snap };
}

/// Guest physical memory through the SMM alias at PHYS_OFF. Only ranges the
/// agent's guard checked (RAM, not SMRAM, bounded) reach it.
struct GuestMemory;

impl PhysMemory for GuestMemory {
    fn read(&self, range: CheckedPhys, buf: &mut [u8]) {
        let n = range.len().min(buf.len());
        // SAFETY: `CheckedPhys` is inside a RAM range recorded at boot and
        // outside SMRAM; the SMM page tables map all of RAM at PHYS_OFF.
        let src = unsafe { Region::new(PHYS_OFF + range.addr(), n as u64) };
        src.read(0, &mut buf[..n]);
    }
}

/// Serves the mailbox request, if any. Called by the session's server with
/// every present CPU's snapshot stored. Returns the TSC cycles spent.
pub fn serve(mailbox: &Region, held: super::smi::Held) -> Option<(Served, u64)> {
    let present_mask = held.present;
    let t0 = crate::hw::tsc::now();
    // SAFETY: this CPU serves the session; the rendezvous admits one server.
    let agent = unsafe { AGENT.get() };
    let state = agent.state.as_mut()?;
    // CPU index = APIC ID: the slots run up to the highest APIC ID present.
    let mask = config().cpu_mask;
    let ncpus = (64 - mask.leading_zeros() as usize).min(agent.cpus.len());
    for (i, dst) in agent.cpus.iter_mut().enumerate().take(ncpus) {
        *dst = if present_mask & (1 << i) != 0 {
            // SAFETY: CPU i stored its slot before joining; the rendezvous
            // (SeqCst slot store after the snapshot, SeqCst slot loads in the
            // leader's gather) orders that before this read.
            unsafe { *SNAPSHOTS[i].get() }
        } else {
            ZERO_CPU
        };
    }
    // RAM plugged after boot joins the map for this request only (a DIMM
    // removed since is forgotten at once).
    // The controller's slot selector is shared with the guest's ACPI code,
    // so it is used only while every CPU is held in SMM; other requests
    // (targeted, partial) read boot RAM only.
    let hotplugged = config()
        .memhp
        .filter(|_| held.every_cpu)
        .map(|hp| super::memhp::ram_now(&agent.ram, &hp));
    let ctx = ServeContext {
        ram: hotplugged.as_ref().unwrap_or(&agent.ram),
        smram: agent.smram,
        cpus: &agent.cpus[..ncpus],
        sev: agent.sev,
        mem_flags: config().mem_flags,
        key_flags: agent.key_flags,
        snapshot_skipped: held.snapshot_skipped,
    };
    // The mailbox BAR, verified in place by `smi::mailbox`, which the guest
    // and the host write concurrently: `serve` reaches it only through the
    // volatile `SharedMemory` accesses of `Region`.
    let served = smmvmi_agent::serve(mailbox, state, &ctx, &GuestMemory);
    Some((served, crate::hw::tsc::now().wrapping_sub(t0)))
}

/// Repairs the agent's state after a serve that was cut short (see
/// `AgentState::recover_interrupted_serve`). Called by the serving CPU.
pub fn recover_interrupted_serve() {
    // SAFETY: called by the CPU holding the serve claim (smi::serve).
    if let Some(state) = unsafe { AGENT.get() }.state.as_mut() {
        state.recover_interrupted_serve();
    }
}

/// Whether a key is provisioned (decides "ready" vs "unprovisioned").
pub fn provisioned() -> bool {
    // SAFETY: read-only peek by the serving CPU or the boot CPU.
    unsafe { AGENT.get() }
        .state
        .as_ref()
        .is_some_and(AgentState::is_provisioned)
}

/// Writes the per-boot session salt into the mailbox header.
pub fn publish(mailbox: &Region) {
    // SAFETY: boot CPU before Linux, or the serving CPU.
    if let Some(state) = unsafe { AGENT.get() }.state.as_ref() {
        // The mailbox BAR, through volatile accesses (see `serve`); a failed
        // store leaves the old salt, and requests then fail to open.
        let _ = state.publish(mailbox);
    }
}

/// A fresh salt per boot. The salt is public (published in the mailbox);
/// what matters is that it never repeats for the same key, because the
/// agent's reply counter restarts at every boot. RDRAND is the source that
/// the host cannot steer; without it (QEMU's default `qemu64` model has
/// none) the salt mixes the TSC, the PM timer and the CMOS clock: unique per
/// boot in practice, but a host that controls the TSC and the clock could
/// repeat it. The firmware says so on the debug console.
fn boot_salt() -> [u8; mb::SESSION_SALT_LEN] {
    let mut salt = [0u8; mb::SESSION_SALT_LEN];
    let has_rdrand = core::arch::x86_64::__cpuid(1).ecx & (1 << 30) != 0;
    let mut rdrand_ok = has_rdrand;
    let rtc = crate::hw::chipset::rtc_bytes();
    let mut rtc_word = [0u8; 8];
    rtc_word[..7].copy_from_slice(&rtc);
    for (i, chunk) in salt.chunks_mut(8).enumerate() {
        let mut v = 0u64;
        if has_rdrand {
            let mut got = false;
            for _ in 0..32 {
                // SAFETY: RDRAND is present (CPUID.1:ECX[30]).
                if unsafe { core::arch::x86_64::_rdrand64_step(&mut v) } == 1 {
                    got = true;
                    break;
                }
            }
            rdrand_ok &= got;
        }
        v ^= crate::hw::tsc::now().rotate_left(17 + 8 * i as u32);
        crate::hw::pmtimer::delay_us(3);
        v ^= crate::hw::tsc::now();
        v ^= u64::from_le_bytes(rtc_word).rotate_left(29 * i as u32);
        chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
    }
    if !rdrand_ok {
        log!(
            "warning: {} RDRAND: the session salt comes from the TSC and the clock, which the host can steer; give the VM a CPU model with RDRAND (e.g. -cpu max) outside tests",
            if has_rdrand { "failing" } else { "no" }
        );
    }
    salt
}

/// At boot, SMRAM still open: records the RAM map and SMRAM range, reads
/// the key from fw_cfg into SMRAM state, and scrubs the boot copy of it.
pub fn provision(fw: &mut FwCfg, handoff: &E820Map, tseg_base: u64, tseg_size: u64) {
    // SAFETY: boot CPU, before Linux and before the image is sealed.
    let agent = unsafe { AGENT.get() };
    for e in handoff.iter().filter(|e| e.kind == e820::RAM) {
        if let Err(err) = agent.ram.push(e.addr, e.len) {
            log!(
                "agent RAM map: {err}; range {:#x}+{:#x} not readable",
                e.addr,
                e.len
            );
        }
    }
    agent.smram = PhysRange::new(tseg_base, tseg_size).unwrap_or(PhysRange::EMPTY);
    agent.sev = crate::hw::cpu::sev_config();

    let mut key = [0u8; SHARED_KEY_LEN];
    agent.key_flags = if key_from_launch_secret(&mut key) {
        records::KEY_FROM_LAUNCH_SECRET
    } else if key_from_fw_cfg(fw, &mut key) {
        records::KEY_FROM_FW_CFG
    } else {
        0
    };
    let have_key = agent.key_flags != 0;
    let tseg = tseg_base;
    // SAFETY: the SMRAM request/reply buffers (layout.rs), used only by
    // the agent in SMM from now on; TSEG is open and identity mapped, and
    // the same identity mapping exists in SMM.
    let (request, reply) = unsafe {
        (
            Region::new(tseg + layout::REQUEST_BUF_OFF, layout::REQUEST_BUF_LEN).as_mut_slice(),
            Region::new(tseg + layout::REPLY_BUF_OFF, layout::REPLY_BUF_LEN).as_mut_slice(),
        )
    };
    agent.state = Some(AgentState::new(
        have_key.then_some(&key),
        boot_salt(),
        request,
        reply,
    ));
    scrub(&mut key);
}

/// The key from the SEV launch secret area (`layout::SEV_SECRET_BASE`,
/// named in the image's GUIDed table): a secret table
/// (`smmvmi_boot::sev::find_secret`) with the agent-key entry. Under SEV
/// the guest owner injects it with `sev-inject-launch-secret` after checking
/// the launch measurement; test setups load it with `-device loader`. The
/// whole area is zeroed afterwards, found or not, so no copy outlives boot.
fn key_from_launch_secret(key: &mut [u8; SHARED_KEY_LEN]) -> bool {
    use smmvmi_boot::sev::{AGENT_KEY_SECRET_GUID, find_secret};
    // SAFETY: the secret area is low RAM reserved for it (layout.rs);
    // nothing else uses it before Linux.
    let area = unsafe { Region::new(layout::SEV_SECRET_BASE, layout::SEV_SECRET_SIZE) };
    let mut copy = [0u8; layout::SEV_SECRET_SIZE as usize];
    area.read(0, &mut copy);
    let found = match find_secret(&copy, &AGENT_KEY_SECRET_GUID) {
        Ok(Some(k)) if k.len() == SHARED_KEY_LEN => {
            key.copy_from_slice(k);
            log!(
                "key: from the SEV launch secret area at {:#x}; area scrubbed",
                layout::SEV_SECRET_BASE
            );
            true
        }
        Ok(Some(k)) => {
            log!(
                "error: the launch secret's agent key is {} bytes, expected {SHARED_KEY_LEN}; ignored",
                k.len()
            );
            false
        }
        Ok(None) => false,
        Err(e) => {
            log!("error: {e}; no key from the launch secret");
            false
        }
    };
    area.write_volatile(0, &[0u8; layout::SEV_SECRET_SIZE as usize]);
    scrub(&mut copy);
    found
}

/// The key from fw_cfg `opt/smmvmi/key`: test setups only, and said so,
/// because fw_cfg stays readable by the guest (ports 0x510/0x511, Linux's
/// `qemu_fw_cfg`) for the VM's whole life.
fn key_from_fw_cfg(fw: &mut FwCfg, key: &mut [u8; SHARED_KEY_LEN]) -> bool {
    match fwc::find_file(fw, KEY_FILE) {
        Ok(Some(f)) if f.size as usize == SHARED_KEY_LEN => {
            fw.select(f.select);
            fw.read(key);
            log!(
                "key: from fw_cfg {KEY_FILE} (INSECURE, test setups only: a guest can read fw_cfg for the VM's whole life; use the SEV launch secret)"
            );
            true
        }
        Ok(Some(f)) => {
            log!(
                "error: fw_cfg {KEY_FILE} is {} bytes, expected {SHARED_KEY_LEN}: the agent stays unprovisioned (INFO only)",
                f.size
            );
            false
        }
        Ok(None) => {
            log!(
                "no key in the SEV launch secret area nor in fw_cfg {KEY_FILE}: the agent is unprovisioned and serves INFO only"
            );
            false
        }
        Err(e) => {
            log!("error: looking up {KEY_FILE}: {e}; the agent stays unprovisioned");
            false
        }
    }
}

/// Zeroes secret bytes so the compiler cannot drop the writes.
pub fn scrub(bytes: &mut [u8]) {
    for b in bytes.iter_mut() {
        // SAFETY: `b` is a valid, exclusive reference.
        unsafe { core::ptr::write_volatile(b, 0) };
    }
    core::sync::atomic::compiler_fence(Ordering::SeqCst);
}

/// After the image was copied into SMRAM: drops the boot copy of the agent
/// state (derived keys) from the RAM image that Linux will reuse.
pub fn scrub_boot_copy() {
    // SAFETY: boot CPU; this is the RAM copy of the static (SMM uses its own
    // copy inside TSEG).
    let agent = unsafe { AGENT.get() };
    drop(agent.state.take());
    let p = &raw mut agent.state;
    // SAFETY: `p` is the `state` field, now `None` (nothing to drop). The
    // bytes are wiped (the key schedule lived there before `take` moved it
    // out and left stale bytes behind), then a valid `None` is written back
    // without reading or dropping the wiped value.
    unsafe {
        core::ptr::write_bytes(
            p as *mut u8,
            0,
            core::mem::size_of::<Option<AgentState<'static>>>(),
        );
        core::ptr::write(p, None);
    }
}
