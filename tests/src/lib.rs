//! End-to-end harness for smmvmi: builds the guest image, starts QEMU q35
//! virtual machines with SMM enabled, and talks to them the way a test wants
//! to (`vm.run_shell_command("nproc")`, `vm.hmp("o /b 0xb2 0x10")`,
//! `vm.mailbox()`).
//!
//! What it trusts: the host's QEMU, the Debian packages it installs and the
//! files it writes under `<repo>/.cache/`. What it does not trust: anything
//! the guest prints or writes to the mailbox; those are parsed, never obeyed.
//!
//! What it must never do: leave a QEMU behind. A [`vm::Vm`] started by a test
//! owns its QEMU and kills it when dropped (and QEMU dies with the thread that
//! started it); only `cargo xtask vm up` detaches one on purpose.
//!
//! Modules: [`host`] (Debian packages and host tools), [`guest_image`] (kernel
//! and initramfs), [`cpio`] (newc writer), [`vm`] (VM lifecycle), [`qmp`]
//! (QEMU machine protocol client), [`command_channel`] (guest shell over the
//! second serial port), [`mailbox`] (host view of the mailbox file),
//! [`e820`] (parsing the guest's memory map), [`workload`] (the host-side
//! twin of the guest's `cpuburn`), [`venv`] (Volatility 3 and drgn from PyPI),
//! [`dwarf`] (struct layouts from a `-dbg` vmlinux, a System.map).

pub mod attack;
pub mod baseline;
pub mod command_channel;
pub mod cpio;
pub mod daemon;
pub mod dwarf;
pub mod e820;
pub mod guest_image;
pub mod host;
pub mod ids_vm;
pub mod libvirt;
pub mod mailbox;
pub mod paper;
pub mod qmp;
pub mod sev;
pub mod venv;
pub mod vm;
pub mod workload;

use std::path::PathBuf;

/// The repository root: `$SMMVMI_ROOT` if set, else the parent of this crate.
pub fn repo_root() -> PathBuf {
    if let Some(root) = std::env::var_os("SMMVMI_ROOT") {
        return PathBuf::from(root);
    }
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

/// `<repo>/.cache`, where downloads, guest images, VM state and benchmark
/// results live (gitignored).
pub fn cache_dir() -> PathBuf {
    repo_root().join(".cache")
}

/// Last `n` lines of a text, for error messages.
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

/// Last `n` lines of a file, or a note saying why there are none.
pub fn tail_file(path: &std::path::Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) if bytes.is_empty() => "(empty)".to_string(),
        Ok(bytes) => tail_lines(&String::from_utf8_lossy(&bytes), n),
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Parses a QEMU-style memory size (`512M`, `1G`, `5G`, `1048576`, `64K`)
/// into bytes. A bare number means MiB, as in QEMU's `-m`.
pub fn parse_mem_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let (digits, mult) = match t.chars().last()? {
        'k' | 'K' => (&t[..t.len() - 1], 1u64 << 10),
        'm' | 'M' => (&t[..t.len() - 1], 1 << 20),
        'g' | 'G' => (&t[..t.len() - 1], 1 << 30),
        't' | 'T' => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1 << 20),
    };
    digits.parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_sizes() {
        assert_eq!(parse_mem_size("512M"), Some(512 << 20));
        assert_eq!(parse_mem_size("5G"), Some(5 << 30));
        assert_eq!(parse_mem_size("1024"), Some(1 << 30));
        assert_eq!(parse_mem_size("x"), None);
        assert_eq!(parse_mem_size(""), None);
    }

    #[test]
    fn tails() {
        assert_eq!(tail_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail_lines("a", 5), "a");
    }
}
