//! The simulated agent: the real agent logic (`smmvmi_agent::serve`)
//! serving any [`SharedMemory`] over fake guest RAM, with the CPUs, RAM map
//! and key a test gives it.

use smmvmi_agent::{AgentState, CpuSnapshot, PhysMemory, ServeContext, Served, SevConfig};
use smmvmi_mailbox::header::{SESSION_SALT_LEN, ServeStatus};
use smmvmi_mailbox::layout::Areas;
use smmvmi_mailbox::shared::SharedMemory;

use crate::mailbox::MAILBOX_SIZE;
use crate::memory::{FakeMem, Machine};

/// A CPU snapshot in 64-bit long mode with paging (`levels` 4 or 5), the
/// given CR3, saved in SMM (MSRs valid) with LSTAR in kernel text.
pub fn cpu(cr3: u64, levels: u8) -> CpuSnapshot {
    CpuSnapshot {
        cr0: 0x8005_0033,
        cr3,
        cr4: 0x3406F0 | if levels == 5 { 1 << 12 } else { 0 },
        efer: 0xD01,
        rip: 0xFFFF_FFFF_8100_0000,
        msrs_valid: 1,
        msr_lstar: 0xFFFF_FFFF_8160_0080,
        ..Default::default()
    }
}

/// The agent as the firmware runs it, minus the hardware: its SMRAM state
/// (key, counters, private request/reply buffers), the boot-time facts and
/// guest memory. One [`SimAgent::serve`] is one SMI.
pub struct SimAgent<M: PhysMemory = FakeMem> {
    state: AgentState<'static>,
    machine: Machine,
    /// CPU snapshots, index = CPU index of the ops.
    pub cpus: Vec<CpuSnapshot>,
    /// SEV facts.
    pub sev: SevConfig,
    /// Guest RAM.
    pub mem: M,
    /// The status of every answered doorbell, in order.
    pub served: Vec<ServeStatus>,
}

impl<M: PhysMemory> SimAgent<M> {
    /// An agent over `mem` on `machine` with `key` (`None`: unprovisioned)
    /// and session `salt`; its private buffers fit a [`MAILBOX_SIZE`]
    /// mailbox. (The buffers are leaked: SMRAM lives as long as the VM.)
    pub fn new(
        mem: M,
        machine: Machine,
        key: Option<&[u8; 32]>,
        salt: [u8; SESSION_SALT_LEN],
    ) -> Self {
        let areas = Areas::from_size(MAILBOX_SIZE).expect("default mailbox size");
        let req: &'static mut [u8] = Box::leak(vec![0; areas.request_capacity()].into());
        let rep: &'static mut [u8] = Box::leak(vec![0; areas.reply_capacity()].into());
        Self {
            state: AgentState::new(key, salt, req, rep),
            machine,
            cpus: Vec::new(),
            sev: SevConfig::default(),
            mem,
            served: Vec::new(),
        }
    }

    /// Sets the CPU snapshots.
    pub fn with_cpus(mut self, cpus: Vec<CpuSnapshot>) -> Self {
        self.cpus = cpus;
        self
    }

    /// The agent's SMRAM state.
    pub fn state(&self) -> &AgentState<'static> {
        &self.state
    }

    /// Publishes the session salt, as the firmware does at boot.
    pub fn publish<S: SharedMemory>(&self, mailbox: &S) -> Result<(), S::Error> {
        self.state.publish(mailbox)
    }

    /// One SMI: serves `mailbox` if its doorbell is new; records the status.
    pub fn serve<S: SharedMemory>(&mut self, mailbox: &S) -> Served {
        let ram = self.machine.ram_map();
        let ctx = ServeContext {
            ram: &ram,
            smram: self.machine.smram(),
            cpus: &self.cpus,
            sev: self.sev,
            mem_flags: 0,
            key_flags: 0,
            snapshot_skipped: None,
        };
        let served = smmvmi_agent::serve(mailbox, &mut self.state, &ctx, &self.mem);
        if let Served::Answered(s) = served {
            self.served.push(s);
        }
        served
    }
}

impl SimAgent<FakeMem> {
    /// [`SimAgent::serve`], then checks that every read the agent made so
    /// far stayed in RAM and out of SMRAM.
    pub fn serve_checked<S: SharedMemory>(&mut self, mailbox: &S) -> Served {
        let served = self.serve(mailbox);
        self.mem.assert_reads_within(&self.machine);
        served
    }
}
