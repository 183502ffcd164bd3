//! The root daemon (`host-injector serve`): the ivshmem server of every VM
//! it serves (it creates the mailbox memory and the MSI-X eventfds), the
//! SMI raiser (doorbell first, QMP fallback), and the server of IDS clients
//! over unix sockets and vsock. It moves sealed bytes only: it never holds a
//! key and never sees plaintext.
//!
//! Layers, importing only downward: [`protocol`] and [`config`] (plain
//! data) ← [`request`] (a request's life as an I/O-free state machine) ←
//! [`vm`] (per-VM ivshmem server, QMP, worker; one thread each; the
//! monitor through its own QMP socket or, for a libvirt domain, through
//! libvirt: [`monitor`], [`libvirt`]) ←
//! [`server`] (listeners, registry, SIGTERM drain). [`client`] is the
//! blocking client the IDS and `host-injector status` use.

pub mod client;
pub mod config;
pub mod libvirt;
pub mod metrics;
pub mod monitor;
pub mod protocol;
pub mod qmp;
pub mod request;
pub mod server;
pub mod vm;
