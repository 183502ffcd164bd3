//! The agent's own logic ([`smmvmi_agent::serve`], the code the firmware
//! runs in SMM) run by an ordinary process over some view of guest memory:
//! the in-OS agent ([`crate::baseline::kcore`]) and the unprotected host
//! ([`crate::baseline::ramfile`]). Same ops, same bounds, same sealing; no
//! SMI and no SMM.

use std::time::{Duration, Instant};

use smmvmi_agent::{CpuSnapshot, PhysMemory};
use smmvmi_mailbox::client::post_request;
use smmvmi_mailbox::header::SESSION_SALT_LEN;
use smmvmi_testkit::agent::SimAgent;
use smmvmi_testkit::mailbox::{BufferMailbox, MailboxBuilder};
use smmvmi_testkit::memory::Machine;

use super::wire::Backend;

/// A process-local agent: a private 1 MiB mailbox and the agent state
/// behind it.
pub struct EmulatedAgent<M: PhysMemory> {
    mailbox: BufferMailbox,
    agent: SimAgent<M>,
    doorbell: u64,
}

impl<M: PhysMemory> EmulatedAgent<M> {
    /// An agent over `mem` whose RAM is `ram` (`(base, len)` ranges), with
    /// `key`, a fresh random salt and the CPU states `cpus`.
    pub fn new(mem: M, ram: Vec<(u64, u64)>, key: &[u8; 32], cpus: Vec<CpuSnapshot>) -> Self {
        let mut salt = [0u8; SESSION_SALT_LEN];
        getrandom::fill(&mut salt).expect("getrandom");
        // Legacy SMRAM (A-segment): outside every RAM range, so no read of
        // RAM is refused as SMRAM.
        let machine = Machine {
            ram,
            smram: (0xA_0000, 0x2_0000),
        };
        let agent = SimAgent::new(mem, machine, Some(key), salt).with_cpus(cpus);
        let mailbox = BufferMailbox::from_bytes(&MailboxBuilder::ready().bytes());
        agent
            .publish(&mailbox)
            .expect("a buffer mailbox takes the salt");
        Self {
            mailbox,
            agent,
            doorbell: 0,
        }
    }
}

impl<M: PhysMemory> Backend for EmulatedAgent<M> {
    fn header(&mut self) -> Result<(u32, [u8; SESSION_SALT_LEN]), String> {
        let h = self.mailbox.header();
        Ok((h.state.get(), h.session_salt))
    }

    fn transact(&mut self, frame: &[u8]) -> Result<(u32, u64, Duration, Vec<u8>), String> {
        let started = Instant::now();
        self.doorbell += 1;
        post_request(&self.mailbox, frame, self.doorbell).map_err(|e| e.to_string())?;
        self.agent.serve(&self.mailbox);
        match super::take_reply(&self.mailbox, self.doorbell)? {
            Some((status, reply)) => Ok((status, 0, started.elapsed(), reply)),
            None => Err("the agent did not answer its doorbell".into()),
        }
    }
}
