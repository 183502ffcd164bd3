//! The designs smmvmi is measured against (`cargo xtask bench paper`),
//! named as baselines and never shipped: each one carries the same sealed
//! agent frames (AES-256-GCM, the same [`smmvmi_mailbox`] protocol and the
//! same IDS code on top), so the comparison measures only where the agent
//! runs and how a request reaches it.
//!
//! - [`seed`]: the published design. A proxy process inside the monitored
//!   VM receives sealed requests over the virtual network, writes the
//!   mailbox (the ivshmem BAR, through `/dev/mem`) and raises the SMI with
//!   an APM port write (`/dev/port`); the SMM agent serves as always.
//! - [`emulated`] over [`kcore`]: the in-OS agent it was compared against. A
//!   process in the monitored VM runs the agent's logic itself over
//!   `/proc/kcore` and answers over the same network.
//! - [`emulated`] over [`ramfile`]: the ceiling with no protection. The host
//!   runs the agent's logic over the guest's RAM file
//!   (`memory-backend-file,share=on`).
//!
//! All three speak [`wire`] over TCP; the IDS side is a
//! [`ids::transport::FrameCarrier`] ([`wire::TcpCarrier`]).

pub mod emulated;
pub mod kcore;
pub mod ramfile;
pub mod seed;
pub mod wire;

/// The design names of `target/bench/paper.json`, in report order.
pub const DESIGNS: [&str; 4] = ["proxyless", "seed-proxy", "in-os-agent", "raw-host"];

use smmvmi_mailbox::client::{Poll, copy_reply, poll_reply};
use smmvmi_mailbox::header::ServeStatus;
use smmvmi_mailbox::shared::SharedMemory;

/// The agent's answer to `doorbell` in `mailbox`, if it has answered:
/// (serve status, reply frame). A refusal (any status but Ok or
/// Unprovisioned) is an error that names the status.
pub fn take_reply<S: SharedMemory>(
    mailbox: &S,
    doorbell: u64,
) -> Result<Option<(u32, Vec<u8>)>, String>
where
    S::Error: std::fmt::Debug,
{
    let Poll::Done { status, reply_len } =
        poll_reply(mailbox, doorbell).map_err(|e| format!("{e:?}"))?
    else {
        return Ok(None);
    };
    if !matches!(
        ServeStatus::from_raw(status),
        Some(ServeStatus::Ok | ServeStatus::Unprovisioned)
    ) {
        return Err(format!("agent refused the request: serve status {status}"));
    }
    let mut reply = vec![0u8; reply_len];
    copy_reply(mailbox, &mut reply).map_err(|e| format!("{e:?}"))?;
    Ok(Some((status, reply)))
}
