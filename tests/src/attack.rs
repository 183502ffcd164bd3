//! Attack simulations: the rootkit techniques the IDS's checks must find,
//! as a kernel module (`tests/attacks/smmvmi_attack.c`) built against
//! Debian's `linux-headers-RELEASE` for the guest's own kernel and loaded
//! into a running guest over the command channel. Test code only: never
//! shipped.
//!
//! `load` builds the module once per kernel release and source (cached
//! under `.cache/attacks/`), copies it into the guest (base64 through the
//! command channel: the harness has no shared folder) and `insmod`s it
//! with the attack's parameters; `unload` removes it, which undoes the
//! technique.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::vm::Vm;

/// The module's source files, embedded so the cache key is their content.
const SOURCE: &str = include_str!("../attacks/smmvmi_attack.c");
const KBUILD: &str = include_str!("../attacks/Kbuild");
/// The module's name in the guest.
pub const MODULE: &str = "smmvmi_attack";

/// One technique and its target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attack {
    /// `sys_call_table[nr]` points into the module.
    HookSyscall(u32),
    /// The `x64_sys_call` branch to syscall `nr`'s function goes to the module.
    PatchDispatch(u32),
    /// IDT gate `vector` points into the module.
    HookIdt(u8),
    /// CPU `cpu`'s LSTAR points to a trampoline in the module.
    Lstar(u32),
    /// Task `pid` is unlinked from the task list.
    HidePid(u32),
    /// The module unlinks itself from the module list and /sys/module (it
    /// cannot be removed afterwards).
    HideModule,
    /// An ftrace callback in the module on syscall NAME's function
    /// (`__x64_sys_NAME`).
    FtraceHook(String),
}

/// The kernel release (`uname -r`) of a `linux-image-RELEASE` package.
pub fn release_of_package(name: &str) -> Option<&str> {
    name.strip_prefix("linux-image-")
        .filter(|r| r.chars().next().is_some_and(|c| c.is_ascii_digit()))
}

impl Attack {
    /// Parses `KIND ARG` as `cargo xtask vm attack` takes it: `hook-syscall
    /// NR`, `patch-dispatch NR`, `hook-idt VECTOR` (0x.. or decimal),
    /// `lstar CPU`, `hide-pid PID`, `hide-module` (no ARG), `ftrace-hook
    /// SYSCALL_NAME`.
    pub fn parse(kind: &str, arg: &str) -> Result<Self, AttackError> {
        let n = || -> Result<u64, AttackError> {
            let v = arg.trim();
            let parsed = match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => v.parse(),
            };
            parsed.map_err(|_| AttackError::Usage(format!("{kind} takes a number, found {arg:?}")))
        };
        Ok(match kind {
            "hook-syscall" => Self::HookSyscall(n()? as u32),
            "patch-dispatch" => Self::PatchDispatch(n()? as u32),
            "hook-idt" => {
                let v = n()?;
                if !(32..=255).contains(&v) {
                    return Err(AttackError::Usage(format!(
                        "hook-idt takes a vector 32..=255 (an exception vector would crash the guest), found {v}"
                    )));
                }
                Self::HookIdt(v as u8)
            }
            "lstar" => Self::Lstar(n()? as u32),
            "hide-pid" => Self::HidePid(n()? as u32),
            "hide-module" => Self::HideModule,
            "ftrace-hook" => {
                let name = arg.trim().trim_start_matches("__x64_sys_");
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(AttackError::Usage(format!(
                        "ftrace-hook takes a syscall name (getdents64), found {arg:?}"
                    )));
                }
                Self::FtraceHook(name.to_string())
            }
            _ => {
                return Err(AttackError::Usage(format!(
                    "unknown attack {kind:?}: expected hook-syscall NR, patch-dispatch NR, hook-idt VECTOR, lstar CPU, hide-pid PID, hide-module or ftrace-hook SYSCALL_NAME"
                )));
            }
        })
    }

    /// The module parameters.
    pub fn params(&self) -> String {
        match *self {
            Self::HookSyscall(nr) => format!("kind=hook-syscall nr={nr}"),
            Self::PatchDispatch(nr) => format!("kind=patch-dispatch nr={nr}"),
            Self::HookIdt(v) => format!("kind=hook-idt vector={v}"),
            Self::Lstar(c) => format!("kind=lstar cpu={c}"),
            Self::HidePid(p) => format!("kind=hide-pid pid={p}"),
            Self::HideModule => "kind=hide-module".into(),
            Self::FtraceHook(ref name) => format!("kind=ftrace-hook sym=__x64_sys_{name}"),
        }
    }
}

/// Errors of the attack helpers.
#[derive(Debug, thiserror::Error)]
pub enum AttackError {
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// The headers could not be installed.
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
    /// Building the module failed.
    #[error("building the attack module for {release} failed: {detail}")]
    Build {
        /// Kernel release.
        release: String,
        /// Compiler output.
        detail: String,
    },
    /// The guest refused or failed.
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
    /// The guest ran the command but it failed.
    #[error("{what} in the guest failed (exit {status}): {stderr}")]
    Guest {
        /// What was run.
        what: String,
        /// Exit status.
        status: i32,
        /// Its stderr.
        stderr: String,
    },
    /// Local I/O.
    #[error("{path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AttackError + '_ {
    move |source| AttackError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Builds (or finds cached) the module for kernel `release` (`uname -r`,
/// e.g. `6.1.0-57-cloud-amd64`); installs `linux-headers-RELEASE` first if
/// needed.
pub fn build(release: &str) -> Result<PathBuf, AttackError> {
    use std::hash::{Hash, Hasher};
    // One apt-get and one Kbuild at a time (tests run in parallel).
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    let headers = PathBuf::from(format!("/usr/src/linux-headers-{release}"));
    if !headers.join("Makefile").exists() {
        crate::host::install(&[format!("linux-headers-{release}")])?;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (SOURCE, KBUILD, release).hash(&mut h);
    let dir = crate::cache_dir()
        .join("attacks")
        .join(format!("{release}-{:016x}", h.finish()));
    let ko = dir.join(format!("{MODULE}.ko"));
    if ko.exists() {
        return Ok(ko);
    }
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    std::fs::write(dir.join("smmvmi_attack.c"), SOURCE).map_err(io(&dir))?;
    std::fs::write(dir.join("Kbuild"), KBUILD).map_err(io(&dir))?;
    let out = Command::new("make")
        .arg("-C")
        .arg(&headers)
        .arg(format!("M={}", dir.display()))
        .arg("modules")
        .output()
        .map_err(io(&headers))?;
    if !out.status.success() || !ko.exists() {
        return Err(AttackError::Build {
            release: release.into(),
            detail: crate::tail_lines(&String::from_utf8_lossy(&out.stderr), 15),
        });
    }
    // Debug info is most of the file and useless in the guest.
    let _ = Command::new("strip").arg("--strip-debug").arg(&ko).status();
    Ok(ko)
}

fn guest(vm: &Vm, what: &str, script: &str) -> Result<String, AttackError> {
    let out = vm.exec(script)?;
    if out.status != 0 {
        return Err(AttackError::Guest {
            what: what.into(),
            status: out.status,
            stderr: out.stderr.trim().to_string(),
        });
    }
    Ok(out.stdout)
}

/// Loads `attack` into the running guest (building the module for its
/// kernel first). One attack at a time: a loaded one is removed first.
pub fn load(vm: &Vm, attack: &Attack) -> Result<(), AttackError> {
    let release = guest(vm, "uname -r", "uname -r")?.trim().to_string();
    let ko = build(&release)?;
    let bytes = std::fs::read(&ko).map_err(io(&ko))?;
    let b64 = base64_lines(&bytes);
    let _ = unload(vm);
    guest(
        vm,
        &format!("insmod {MODULE}.ko {}", attack.params()),
        &format!(
            "base64 -d > /tmp/{MODULE}.ko <<'SMMVMI_EOF'\n{b64}SMMVMI_EOF\ninsmod /tmp/{MODULE}.ko {}",
            attack.params()
        ),
    )?;
    Ok(())
}

/// Removes the attack module (undoing its technique), if loaded.
pub fn unload(vm: &Vm) -> Result<(), AttackError> {
    guest(vm, &format!("rmmod {MODULE}"), &format!("rmmod {MODULE}"))?;
    Ok(())
}

/// Standard base64 in lines of 76 characters, each ending in a newline
/// (what busybox `base64 -d` reads).
fn base64_lines(data: &[u8]) -> String {
    use base64::Engine;
    let flat = base64::engine::general_purpose::STANDARD.encode(data);
    let mut out = String::with_capacity(flat.len() + flat.len() / 76 + 1);
    for line in flat.as_bytes().chunks(76) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        assert_eq!(base64_lines(b"foobar"), "Zm9vYmFy\n");
        assert_eq!(base64_lines(b"fooba"), "Zm9vYmE=\n");
        assert_eq!(base64_lines(b"foob"), "Zm9vYg==\n");
        assert_eq!(base64_lines(&[0u8; 58]).lines().count(), 2);
        assert!(base64_lines(&[7u8; 600]).lines().all(|l| l.len() <= 76));
    }

    #[test]
    fn attacks_parse_and_refuse_exception_vectors() {
        assert_eq!(
            Attack::parse("hook-idt", "0x80").unwrap(),
            Attack::HookIdt(0x80)
        );
        assert!(Attack::parse("hook-idt", "14").is_err());
        assert_eq!(
            Attack::parse("lstar", "1").unwrap().params(),
            "kind=lstar cpu=1"
        );
        assert!(Attack::parse("hide-everything", "1").is_err());
    }
}
