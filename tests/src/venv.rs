//! The Python tools the tests and benchmarks check the project against —
//! Volatility 3 (LiME dumps, the live mount), drgn (ELF cores with
//! VMCOREINFO) and sev-snp-measure (the SEV launch digest of `cargo xtask
//! measure`) — from PyPI, pinned, in a virtual environment under
//! `<repo>/.cache/venv` made with Debian's `python3 -m venv` (package
//! `python3-venv`, in [`crate::host::PACKAGES`]). Nothing is installed by
//! hand; a venv whose pins differ, or that was copied from another
//! checkout, is made again.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The pinned PyPI packages.
pub const PINS: &[&str] = &[
    "volatility3==2.28.2",
    "drgn==0.3.0",
    crate::sev::SEV_SNP_MEASURE,
];

/// The file in the venv that records the pins it was made with.
const MARKER: &str = "smmvmi-pins.txt";

/// Errors making the venv.
#[derive(Debug, thiserror::Error)]
pub enum VenvError {
    /// A step failed.
    #[error(
        "making the Python venv {dir}: `{command}` failed ({detail}); it needs Debian's python3-venv and PyPI (pip)"
    )]
    Step {
        /// Venv directory.
        dir: String,
        /// The command.
        command: String,
        /// Exit status or error.
        detail: String,
    },
}

/// The venv directory (`<repo>/.cache/venv`).
pub fn dir() -> PathBuf {
    crate::repo_root().join(".cache").join("venv")
}

/// A program of the venv (`vol`, `drgn`, `python`).
pub fn bin(name: &str) -> PathBuf {
    dir().join("bin").join(name)
}

/// The Python interpreter the venv is made from: Debian's, whose
/// `venv` module python3-venv provides.
fn base_python() -> PathBuf {
    let debian = PathBuf::from("/usr/bin/python3");
    if debian.exists() {
        debian
    } else {
        PathBuf::from("python3")
    }
}

/// Makes the venv with [`PINS`] unless it already has them; returns its
/// directory. Logs through `log`.
pub fn ensure(log: &mut dyn FnMut(&str)) -> Result<PathBuf, VenvError> {
    let d = dir();
    let want = PINS.join("\n");
    // A venv copied from another checkout still runs that checkout's
    // Python (pip writes absolute shebangs): made again here.
    let own = std::fs::read_to_string(bin("vol")).is_ok_and(|t| {
        t.lines()
            .next()
            .and_then(|l| l.strip_prefix("#!"))
            .is_some_and(|p| Path::new(p.trim()).starts_with(d.join("bin")))
    });
    if std::fs::read_to_string(d.join(MARKER)).is_ok_and(|t| t == want) && own {
        return Ok(d);
    }
    log(&format!(
        "making the Python venv {} with {}",
        d.display(),
        PINS.join(" ")
    ));
    let run = |cmd: &mut Command| -> Result<(), VenvError> {
        let text = format!("{cmd:?}");
        match cmd.status() {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(VenvError::Step {
                dir: d.display().to_string(),
                command: text,
                detail: s.to_string(),
            }),
            Err(e) => Err(VenvError::Step {
                dir: d.display().to_string(),
                command: text,
                detail: e.to_string(),
            }),
        }
    };
    run(Command::new(base_python())
        .args(["-m", "venv", "--clear"])
        .arg(&d))?;
    run(Command::new(bin("pip"))
        .args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
        ])
        .args(PINS))?;
    std::fs::write(d.join(MARKER), want).map_err(|e| VenvError::Step {
        dir: d.display().to_string(),
        command: format!("write {MARKER}"),
        detail: e.to_string(),
    })?;
    Ok(d)
}
