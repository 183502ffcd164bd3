//! The host tools the harness needs, and installing them from Debian when
//! they are missing (`apt-get install -y`, with one `apt-get update` retry).

use std::path::Path;
use std::process::Command;

/// Errors while checking or installing host packages.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(
        "could not install Debian packages {packages:?}: `{command}` failed ({detail}); \
         install them by hand (`apt-get update && apt-get install -y {}`) and retry",
        packages.join(" ")
    )]
    Install {
        packages: Vec<String>,
        command: String,
        detail: String,
    },
    #[error(
        "{path} is present but not a static binary (package `busybox` instead of `busybox-static`?); \
         run `apt-get install -y busybox-static`"
    )]
    NotStatic { path: String },
}

/// A Debian package and a file that proves it is installed.
#[derive(Clone, Copy, Debug)]
pub struct Package {
    pub name: &'static str,
    pub probe: &'static str,
}

/// Everything the harness, the guest image builder and the benchmarks use.
pub const PACKAGES: &[Package] = &[
    Package {
        name: "qemu-system-x86",
        probe: "/usr/bin/qemu-system-x86_64",
    },
    Package {
        name: "busybox-static",
        probe: "/bin/busybox",
    },
    Package {
        name: "seabios",
        probe: "/usr/share/seabios/bios-256k.bin",
    },
    Package {
        name: "ovmf",
        probe: "/usr/share/OVMF/OVMF_CODE_4M.fd",
    },
    Package {
        name: "cpio",
        probe: "/usr/bin/cpio",
    },
    Package {
        name: "lz4",
        probe: "/usr/bin/lz4",
    },
    Package {
        name: "gcc",
        probe: "/usr/bin/gcc",
    },
    Package {
        name: "libc6-dev",
        probe: "/usr/lib/x86_64-linux-gnu/libc.a",
    },
    Package {
        name: "binutils",
        probe: "/usr/bin/objcopy",
    },
    // Kbuild for the attack-simulation modules (tests/attacks/); the
    // kernel headers themselves are installed per guest kernel.
    Package {
        name: "make",
        probe: "/usr/bin/make",
    },
    // tests/tests/libvirt.rs: libvirtd (started by the test itself, no
    // systemd) and virsh, which the daemon also uses for libvirt domains.
    Package {
        name: "libvirt-daemon-system",
        probe: "/usr/sbin/libvirtd",
    },
    Package {
        name: "libvirt-clients",
        probe: "/usr/bin/virsh",
    },
    // `python3 -m venv` for the project's venv (tests/src/venv.rs):
    // Volatility 3, drgn and sev-snp-measure (Debian 12: Python 3.11).
    Package {
        name: "python3-venv",
        probe: "/usr/lib/python3.11/ensurepip/__init__.py",
    },
];

/// Installs whichever of [`PACKAGES`] are missing. Logs through `log`.
pub fn ensure_packages(log: &mut dyn FnMut(&str)) -> Result<(), HostError> {
    let missing: Vec<String> = PACKAGES
        .iter()
        .filter(|p| !Path::new(p.probe).exists())
        .map(|p| p.name.to_string())
        .collect();
    if !missing.is_empty() {
        log(&format!(
            "installing Debian packages: {}",
            missing.join(" ")
        ));
        install(&missing)?;
    }
    if !is_static_elf(Path::new("/bin/busybox")) {
        log("/bin/busybox is dynamic; installing busybox-static");
        install(&["busybox-static".to_string()])?;
        if !is_static_elf(Path::new("/bin/busybox")) {
            return Err(HostError::NotStatic {
                path: "/bin/busybox".into(),
            });
        }
    }
    Ok(())
}

/// `apt-get install -y PACKAGES`, retried once after `apt-get update`.
pub fn install(packages: &[String]) -> Result<(), HostError> {
    let attempt = || {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
    };
    if matches!(attempt(), Ok(s) if s.success()) {
        return Ok(());
    }
    run_apt(&["update"], packages)?;
    match attempt() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(HostError::Install {
            packages: packages.to_vec(),
            command: format!("apt-get install -y {}", packages.join(" ")),
            detail: s.to_string(),
        }),
        Err(e) => Err(HostError::Install {
            packages: packages.to_vec(),
            command: "apt-get install".into(),
            detail: e.to_string(),
        }),
    }
}

/// Runs `apt-get ARGS`; failure is reported against `packages`.
pub fn run_apt(args: &[&str], packages: &[String]) -> Result<(), HostError> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status();
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(HostError::Install {
            packages: packages.to_vec(),
            command: format!("apt-get {}", args.join(" ")),
            detail: s.to_string(),
        }),
        Err(e) => Err(HostError::Install {
            packages: packages.to_vec(),
            command: format!("apt-get {}", args.join(" ")),
            detail: e.to_string(),
        }),
    }
}

/// True for a 64-bit ELF executable without a program interpreter (PT_INTERP).
pub fn is_static_elf(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    static_elf_bytes(&bytes)
}

fn static_elf_bytes(b: &[u8]) -> bool {
    let u16_at = |o: usize| b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let u32_at = |o: usize| {
        b.get(o..o + 4)
            .map(|s| u32::from_le_bytes(s.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        b.get(o..o + 8)
            .map(|s| u64::from_le_bytes(s.try_into().unwrap()))
    };
    if b.get(..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..phnum as usize).all(|i| {
        let off = phoff as usize + i * phentsize as usize;
        u32_at(off).is_some_and(|ty| ty != 3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_non_elf() {
        assert!(!static_elf_bytes(b"#!/bin/sh\n"));
        assert!(!static_elf_bytes(b""));
    }

    #[test]
    fn dynamic_binary_is_not_static() {
        // /bin/sh on Debian is dynamically linked (dash).
        if Path::new("/bin/dash").exists() {
            assert!(!is_static_elf(Path::new("/bin/dash")));
        }
    }
}
