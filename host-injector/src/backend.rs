//! SMI backends beyond the monitor's APM write, all behind
//! [`crate::smi::SmiBackend`] with a [`Target`]:
//!
//! - [`DoorbellSmi`] (`doorbell`, the default): an eventfd write that makes
//!   QEMU fire an MSI-X vector of the `ivshmem-doorbell` device, which the
//!   agent programmed with SMI delivery mode: vector
//!   [`VECTOR_BROADCAST`] reaches every vCPU, vector [`VECTOR_CPU_BASE`] + N
//!   only the vCPU with APIC ID N. No QMP on the hot path, and no dependency
//!   on SMI broadcast negotiation (it cannot crash QEMU 7.2).
//! - [`QmpTargetedSmi`] (`qmp-targeted`): a patched QEMU's `inject-smi`
//!   command; with stock QEMU it says so and does nothing.
//! - [`KvmSmi`] (`kvm`): `KVM_SMI` on vCPU fds, for a VMM built on rust-vmm
//!   crates that embeds this library (a separate process cannot use QEMU's
//!   vCPU fds: KVM refuses callers from another mm).

use std::sync::Arc;

use kvm_ioctls::{Cap, Kvm, VcpuFd};
use serde::{Deserialize, Serialize};
use smmvmi_mailbox::layout::{VECTOR_BROADCAST, VECTOR_CPU_BASE};

use crate::ivshmem::Vectors;
use crate::qmp::Qmp;
use crate::smi::{SmiBackend, SmiError};

/// Which vCPUs an SMI should reach.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// Every vCPU (one batch is one consistent snapshot).
    #[default]
    All,
    /// The vCPU with this APIC ID only (served at once, no snapshot).
    Cpu(u32),
}

impl Target {
    /// The MSI-X vector of the doorbell device for this target.
    pub fn vector(self) -> Option<u16> {
        match self {
            Target::All => Some(VECTOR_BROADCAST),
            Target::Cpu(n) => u16::try_from(n)
                .ok()
                .and_then(|n| n.checked_add(VECTOR_CPU_BASE)),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::All => f.write_str("all"),
            Target::Cpu(n) => write!(f, "cpu {n}"),
        }
    }
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "all" {
            return Ok(Target::All);
        }
        s.strip_prefix("cpu")
            .and_then(|n| n.trim_start_matches([':', '=']).parse().ok())
            .map(Target::Cpu)
            .ok_or_else(|| format!("expected `all` or `cpuN` (APIC ID N), found {s:?}"))
    }
}

/// Errors of the doorbell backend.
#[derive(Debug, thiserror::Error)]
pub enum DoorbellError {
    /// The VM's device has fewer vectors than the target needs.
    #[error(
        "doorbell SMI for {target}: the device has {vectors} MSI-X vectors (1 broadcast + 1 per vCPU, so vCPUs 0-{}), and {target} needs {}: check the CPU index (the VM may have fewer vCPUs), or start QEMU with `ivshmem-doorbell,vectors=N` and the daemon's VM entry with the same `vectors`",
        vectors.saturating_sub(2),
        vector.map_or_else(|| "a vector past the last".to_string(), |v| format!("vector {v}"))
    )]
    NoVector {
        /// What was asked.
        target: Target,
        /// Vectors the device has.
        vectors: u16,
        /// Vector needed.
        vector: Option<u16>,
    },
    /// The eventfd write failed.
    #[error("doorbell SMI: writing the eventfd of vector {vector}: {source}")]
    Write {
        /// The vector.
        vector: u16,
        /// OS error.
        source: std::io::Error,
    },
}

/// The `doorbell` backend: writes the eventfd QEMU waits on for a vector.
/// Raising succeeds even when the guest disarmed MSI-X (QEMU then only sets
/// the pending bit): the caller must treat an unanswered doorbell SMI like
/// a silent agent and fall back.
#[derive(Clone, Debug)]
pub struct DoorbellSmi {
    vectors: Arc<Vectors>,
}

impl DoorbellSmi {
    /// Over the QEMU peer's vector eventfds.
    pub fn new(vectors: Arc<Vectors>) -> Self {
        Self { vectors }
    }

    /// Fires the vector of `target`.
    pub fn ring(&self, target: Target) -> Result<(), DoorbellError> {
        let vector = target.vector();
        let no_vector = || DoorbellError::NoVector {
            target,
            vectors: self.vectors.len(),
            vector,
        };
        let v = vector.ok_or_else(no_vector)?;
        match self.vectors.fire(v) {
            None => Err(no_vector()),
            Some(r) => r.map_err(|source| DoorbellError::Write { vector: v, source }),
        }
    }
}

impl SmiBackend for DoorbellSmi {
    fn raise(&mut self) -> Result<(), SmiError> {
        Ok(self.ring(Target::All)?)
    }
    fn name(&self) -> &'static str {
        "doorbell"
    }
    fn needs_broadcast(&self) -> bool {
        false
    }
    fn raise_to(&mut self, target: Target) -> Result<(), SmiError> {
        Ok(self.ring(target)?)
    }
}

/// The QMP command of `patches-qemu/` that raises an SMI on one vCPU.
pub const INJECT_SMI_COMMAND: &str = "inject-smi";

/// The `qmp-targeted` backend. Stock QEMU has no `inject-smi`: [`Self::probe`]
/// tells, and raising fails with [`SmiError::NeedsPatchedQemu`].
pub struct QmpTargetedSmi {
    qmp: Qmp,
    available: bool,
}

impl QmpTargetedSmi {
    /// Whether this QEMU has the patched command (`query-commands`).
    pub fn probe(qmp: &mut Qmp) -> Result<bool, SmiError> {
        let cmds = qmp.execute("query-commands", None)?;
        Ok(cmds
            .as_array()
            .map(|a| a.iter().any(|c| c["name"] == INJECT_SMI_COMMAND))
            .unwrap_or(false))
    }

    /// Wraps a QMP session, probing for the command once.
    pub fn new(mut qmp: Qmp) -> Result<Self, SmiError> {
        let available = Self::probe(&mut qmp)?;
        Ok(Self { qmp, available })
    }
}

impl SmiBackend for QmpTargetedSmi {
    fn raise(&mut self) -> Result<(), SmiError> {
        self.raise_to(Target::All)
    }
    fn name(&self) -> &'static str {
        "qmp-targeted"
    }
    fn needs_broadcast(&self) -> bool {
        false
    }
    fn raise_to(&mut self, target: Target) -> Result<(), SmiError> {
        if !self.available {
            return Err(SmiError::NeedsPatchedQemu);
        }
        let args = match target {
            Target::All => serde_json::json!({}),
            Target::Cpu(n) => serde_json::json!({ "cpu-index": n }),
        };
        self.qmp.execute(INJECT_SMI_COMMAND, Some(args))?;
        Ok(())
    }
}

/// Errors of the KVM backend.
#[derive(Debug, thiserror::Error)]
pub enum KvmSmiError {
    /// /dev/kvm cannot be opened.
    #[error(
        "kvm backend: opening /dev/kvm: {0} (load kvm_intel or kvm_amd, run as root or in group kvm)"
    )]
    Open(kvm_ioctls::Error),
    /// This KVM does not emulate SMM.
    #[error(
        "kvm backend: this host's KVM has no SMM support (KVM_CAP_X86_SMM is not reported): KVM_SMI would fail. Use a kernel built with SMM emulation (CONFIG_KVM_SMM), or run QEMU under TCG with the `doorbell` or `qmp-broadcast` backend"
    )]
    NoSmm,
    /// No vCPU with this index.
    #[error("kvm backend: no vCPU {cpu} (the VMM handed {count} vCPU fds)")]
    NoVcpu {
        /// The vCPU asked for.
        cpu: u32,
        /// vCPUs known.
        count: usize,
    },
    /// The ioctl failed.
    #[error("kvm backend: KVM_SMI on vCPU {cpu}: {source}")]
    Ioctl {
        /// The vCPU.
        cpu: u32,
        /// The error.
        source: kvm_ioctls::Error,
    },
}

/// Whether this host's KVM reports `KVM_CAP_X86_SMM`.
pub fn kvm_has_smm() -> Result<bool, KvmSmiError> {
    let kvm = Kvm::new().map_err(KvmSmiError::Open)?;
    Ok(kvm.check_extension(Cap::X86Smm))
}

/// The `kvm` backend: `KVM_SMI` on the VMM's own vCPU fds.
pub struct KvmSmi {
    vcpus: Vec<Arc<VcpuFd>>,
}

impl std::fmt::Debug for KvmSmi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmSmi")
            .field("vcpus", &self.vcpus.len())
            .finish()
    }
}

impl KvmSmi {
    /// Over the VMM's vCPUs (indexed by APIC ID); fails with
    /// [`KvmSmiError::NoSmm`] when KVM cannot emulate SMM.
    pub fn new(kvm: &Kvm, vcpus: Vec<Arc<VcpuFd>>) -> Result<Self, KvmSmiError> {
        if !kvm.check_extension(Cap::X86Smm) {
            return Err(KvmSmiError::NoSmm);
        }
        Ok(Self { vcpus })
    }

    fn smi(&self, cpu: u32) -> Result<(), KvmSmiError> {
        let v = self.vcpus.get(cpu as usize).ok_or(KvmSmiError::NoVcpu {
            cpu,
            count: self.vcpus.len(),
        })?;
        v.smi().map_err(|source| KvmSmiError::Ioctl { cpu, source })
    }
}

impl SmiBackend for KvmSmi {
    fn raise(&mut self) -> Result<(), SmiError> {
        self.raise_to(Target::All)
    }
    fn name(&self) -> &'static str {
        "kvm"
    }
    fn needs_broadcast(&self) -> bool {
        false
    }
    fn raise_to(&mut self, target: Target) -> Result<(), SmiError> {
        match target {
            Target::All => {
                for cpu in 0..self.vcpus.len() as u32 {
                    self.smi(cpu)?;
                }
                Ok(())
            }
            Target::Cpu(cpu) => Ok(self.smi(cpu)?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_map_to_vectors() {
        assert_eq!(Target::All.vector(), Some(0));
        assert_eq!(Target::Cpu(0).vector(), Some(1));
        assert_eq!(Target::Cpu(3).vector(), Some(4));
        assert_eq!(Target::Cpu(u32::MAX).vector(), None);
        assert_eq!("cpu2".parse::<Target>(), Ok(Target::Cpu(2)));
        assert_eq!("all".parse::<Target>(), Ok(Target::All));
        assert!("cpux".parse::<Target>().is_err());
    }

    #[test]
    fn doorbell_fires_the_right_eventfd_and_refuses_missing_vectors() {
        let v = Arc::new(Vectors::new(3).unwrap());
        let mut d = DoorbellSmi::new(v.clone());
        d.raise_to(Target::Cpu(1)).unwrap();
        assert_eq!(v.get(2).unwrap().read().unwrap(), 1);
        assert!(v.get(0).unwrap().read().is_err(), "vector 0 untouched");
        d.raise().unwrap();
        assert_eq!(v.get(0).unwrap().read().unwrap(), 1);
        let e = d.raise_to(Target::Cpu(2)).unwrap_err().to_string();
        assert!(e.contains("vectors=N"), "{e}");
    }

    /// This machine's KVM has no SMM: the backend must say so, naming the
    /// capability and what to do. (On a host whose KVM has SMM the check is
    /// the other way round.)
    #[test]
    fn kvm_backend_says_clearly_when_kvm_has_no_smm() {
        let Ok(kvm) = Kvm::new() else {
            let e = kvm_has_smm().unwrap_err().to_string();
            assert!(e.contains("/dev/kvm"), "{e}");
            return;
        };
        if kvm.check_extension(Cap::X86Smm) {
            assert!(KvmSmi::new(&kvm, Vec::new()).is_ok());
            return;
        }
        assert!(!kvm_has_smm().unwrap());
        let e = KvmSmi::new(&kvm, Vec::new()).unwrap_err();
        assert!(matches!(e, KvmSmiError::NoSmm));
        let msg = SmiError::from(e).to_string();
        assert!(msg.contains("KVM_CAP_X86_SMM"), "{msg}");
        assert!(msg.contains("doorbell"), "{msg}");
    }
}
