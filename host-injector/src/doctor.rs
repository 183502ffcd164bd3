//! `host-injector doctor`: what this host can do for smmvmi, each check with
//! what was found and what follows.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::Serialize;

use crate::backend::{INJECT_SMI_COMMAND, kvm_has_smm};

/// One finding.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// Whether it is available.
    pub ok: bool,
    /// What was found and what follows.
    pub detail: String,
}

/// Runs every check (bounded: QEMU gets 10 s).
pub fn run(qemu: &str) -> Vec<Check> {
    let mut out = Vec::new();
    let kvm = kvm_has_smm();
    out.push(Check {
        name: "kvm",
        ok: kvm.is_ok(),
        detail: match &kvm {
            Ok(_) => "/dev/kvm opens".into(),
            Err(e) => e.to_string(),
        },
    });
    out.push(match kvm {
        Ok(true) => Check {
            name: "kvm_cap_x86_smm",
            ok: true,
            detail: "KVM emulates SMM: QEMU can run the firmware under KVM; the kvm backend works for VMMs embedding the injector".into(),
        },
        Ok(false) => Check {
            name: "kvm_cap_x86_smm",
            ok: false,
            detail: "KVM reports no KVM_CAP_X86_SMM: VMs must run under TCG (accel=tcg); the kvm backend cannot be used".into(),
        },
        Err(_) => Check {
            name: "kvm_cap_x86_smm",
            ok: false,
            detail: "unknown (no /dev/kvm)".into(),
        },
    });
    let sev = std::fs::read_to_string("/sys/module/kvm_amd/parameters/sev");
    out.push(Check {
        name: "sev",
        ok: matches!(sev.as_deref().map(str::trim), Ok("Y" | "1")),
        detail: match sev {
            Ok(v) => format!("kvm_amd sev={}", v.trim()),
            Err(_) => "kvm_amd not loaded (/sys/module/kvm_amd/parameters/sev missing): no SEV guests on this host".into(),
        },
    });
    let missing = sev_missing();
    out.push(Check {
        name: "sev_guest",
        ok: missing.is_empty(),
        detail: if missing.is_empty() {
            "an SEV guest with SMM can run here (cargo xtask vm up --sev)".into()
        } else {
            format!(
                "no SEV guest with the SMM agent on this host: missing {}",
                missing.join("; ")
            )
        },
    });
    let vsock = std::path::Path::new("/dev/vhost-vsock").exists();
    out.push(Check {
        name: "vhost_vsock",
        ok: vsock,
        detail: if vsock {
            "/dev/vhost-vsock present: IDS VMs can reach the daemon's vsock port".into()
        } else {
            "/dev/vhost-vsock missing (modprobe vhost_vsock): use vhost-device-vsock's unix sockets or a unix socket instead".into()
        },
    });
    let version = Command::new(qemu).arg("--version").output();
    out.push(match version {
        Ok(o) if o.status.success() => Check {
            name: "qemu",
            ok: true,
            detail: String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string(),
        },
        Ok(o) => Check {
            name: "qemu",
            ok: false,
            detail: format!(
                "{qemu} --version failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
        },
        Err(e) => Check {
            name: "qemu",
            ok: false,
            detail: format!("{qemu}: {e} (apt-get install qemu-system-x86)"),
        },
    });
    out.push(match qemu_has_command(qemu, INJECT_SMI_COMMAND) {
        Ok(true) => Check {
            name: "qemu_inject_smi",
            ok: true,
            detail: format!("QEMU has `{INJECT_SMI_COMMAND}`: the qmp-targeted backend works"),
        },
        Ok(false) => Check {
            name: "qemu_inject_smi",
            ok: false,
            detail: format!("stock QEMU: no `{INJECT_SMI_COMMAND}` (build patches-qemu/ for qmp-targeted; the doorbell backend targets vCPUs without it)"),
        },
        Err(e) => Check {
            name: "qemu_inject_smi",
            ok: false,
            detail: format!("could not ask QEMU: {e}"),
        },
    });
    out
}

/// Starts `qemu -M none` with QMP on stdio and asks `query-commands`.
fn qemu_has_command(qemu: &str, command: &str) -> Result<bool, String> {
    let mut child = Command::new(qemu)
        .args([
            "-M",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-qmp",
            "stdio",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("\"return\": [") || line.contains("\"return\":[") {
                let _ = tx.send(line);
                return;
            }
        }
    });
    let _ =
        stdin.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-commands\"}\n");
    let r = rx.recv_timeout(Duration::from_secs(10));
    let _ = stdin.write_all(b"{\"execute\":\"quit\"}\n");
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
    let line = r.map_err(|_| "no query-commands answer within 10 s".to_string())?;
    Ok(line.contains(&format!("\"{command}\"")))
}

/// What this host lacks to run an SEV guest with the smmvmi firmware, one
/// sentence per missing piece (empty: nothing missing). Reads `/dev/kvm`
/// (KVM_CAP_X86_SMM), `/dev/sev` and `/sys/module/kvm_amd/parameters/sev`.
pub fn sev_missing() -> Vec<String> {
    let sev_param = std::fs::read_to_string("/sys/module/kvm_amd/parameters/sev").ok();
    sev_missing_from(
        kvm_has_smm().map_err(|e| e.to_string()),
        std::path::Path::new("/dev/sev").exists(),
        sev_param.as_deref(),
    )
}

/// [`sev_missing`] from the facts: `kvm_smm` is KVM_CAP_X86_SMM (or why
/// /dev/kvm failed), `dev_sev` whether `/dev/sev` exists (the PSP driver,
/// `ccp`), `kvm_amd_sev` the kvm_amd `sev` parameter (None: kvm_amd not
/// loaded). SEV guests need KVM: QEMU's TCG has no SEV.
pub fn sev_missing_from(
    kvm_smm: Result<bool, String>,
    dev_sev: bool,
    kvm_amd_sev: Option<&str>,
) -> Vec<String> {
    let mut out = Vec::new();
    match kvm_smm {
        Ok(true) => {}
        Ok(false) => out.push(
            "KVM SMM (KVM_CAP_X86_SMM = 0: the agent lives in SMM, and SEV needs KVM; TCG cannot run SEV)"
                .to_string(),
        ),
        Err(e) => out.push(format!("KVM ({e})")),
    }
    if !dev_sev {
        out.push(
            "/dev/sev (the AMD PSP driver, ccp; an AMD EPYC host with SEV enabled in the BIOS)"
                .into(),
        );
    }
    match kvm_amd_sev.map(str::trim) {
        Some("Y" | "1") => {}
        Some(v) => out.push(format!(
            "kvm_amd sev=1 (it is {v}: modprobe kvm_amd sev=1)"
        )),
        None => out.push("kvm_amd with sev=1 (kvm_amd is not loaded: not an AMD host, or modprobe kvm_amd sev=1)".into()),
    }
    out
}

#[cfg(test)]
mod sev_tests {
    use super::sev_missing_from;

    #[test]
    fn names_each_missing_piece() {
        assert!(sev_missing_from(Ok(true), true, Some("Y\n")).is_empty());
        let m = sev_missing_from(Ok(false), false, None);
        assert_eq!(m.len(), 3, "{m:?}");
        assert!(m[0].contains("KVM SMM") && m[1].contains("/dev/sev") && m[2].contains("kvm_amd"));
        let m = sev_missing_from(Err("no /dev/kvm".into()), true, Some("N"));
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(m[1].contains("it is N"));
    }
}
