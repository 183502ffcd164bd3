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
