//! Kernel introspection without a symbol file.
//!
//! The guest kernel's `linux_banner` (the `/proc/version` text) is found
//! like this, with KASLR on and only a stub System.map: CPU_STATE of CPU 0
//! gives LSTAR, the address of `entry_SYSCALL_64` in the kernel's text; the
//! banner lives in `.rodata`, which the kernel links after `.text`. So the
//! search reads the kernel image forward from LSTAR's page, through CPU 0's
//! kernel page tables (PTI's kernel half), in chunks of the agent's max read
//! size, for `"Linux version "` followed by printable text ending in `"\n"`
//! and a NUL. Unmapped stretches (the freed text/rodata gap) are skipped
//! using the level at which the walk stopped. The search is bounded
//! ([`BannerSearch::limit`]).
//!
//! Since Linux 6.1 the image holds two banners: a `__weak` placeholder from
//! `init/version.o`, compiled before the build number is known (`"... # SMP
//! ..."`, an empty number after `#`), which nothing references, and the real
//! `linux_banner` from `init/version-timestamp.o` (`"#1 SMP"`), linked later.
//! The search therefore goes on past a candidate without a build number and
//! returns the first one with `#<digits>`; at the bound it falls back to the
//! first candidate found (older kernels have only one).

use smmvmi_mailbox::wire::{AddressSpace, Status};

use crate::session::{Session, SessionError};

/// Where kernel text must be on x86-64 (the top 2 GiB).
pub const KERNEL_TEXT_MIN: u64 = 0xFFFF_FFFF_8000_0000;
/// The banner prefix.
pub const BANNER_PREFIX: &[u8] = b"Linux version ";
/// Longest banner accepted (the kernel's is well under this).
pub const MAX_BANNER: usize = 512;

/// Errors of kernel introspection.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The session failed.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// LSTAR does not point into kernel text.
    #[error(
        "CPU 0's LSTAR must point into kernel text (>= {KERNEL_TEXT_MIN:#x}), found {found:#x} (msrs_valid={valid}): the CPU is not running a 64-bit Linux kernel yet, or the firmware did not read the MSRs in SMM"
    )]
    Lstar {
        /// LSTAR found.
        found: u64,
        /// The msrs_valid field.
        valid: u64,
    },
    /// Nothing found within the bound.
    #[error(
        "no `Linux version ...\\n` banner within {limit:#x} bytes after LSTAR {lstar:#x} ({read:#x} bytes read, {skipped:#x} unmapped): not a Linux kernel, or its image is laid out differently; raise --limit"
    )]
    NotFound {
        /// LSTAR.
        lstar: u64,
        /// Bytes searched at most.
        limit: u64,
        /// Bytes read.
        read: u64,
        /// Bytes skipped as unmapped.
        skipped: u64,
    },
}

/// A banner and where it was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Banner {
    /// Virtual address of the first byte.
    pub addr: u64,
    /// The text, including the final newline.
    pub text: String,
    /// LSTAR the search started from.
    pub lstar: u64,
    /// Bytes read by the search.
    pub bytes_read: u64,
    /// Requests made by the search.
    pub requests: u32,
    /// Other candidates seen before it (address, text), e.g. the weak
    /// placeholder banner of 6.1+ kernels.
    pub others: Vec<(u64, String)>,
}

/// Parameters of the banner search.
#[derive(Clone, Copy, Debug)]
pub struct BannerSearch {
    /// CPU whose kernel address space is read.
    pub cpu: u32,
    /// Most bytes of address space searched after LSTAR's page.
    pub limit: u64,
    /// Chunk size cap (the agent's max read applies too).
    pub chunk: usize,
}

impl Default for BannerSearch {
    fn default() -> Self {
        Self {
            cpu: 0,
            limit: 64 << 20,
            chunk: 512 << 10,
        }
    }
}

/// True if the banner's version field has a build number (`#1 SMP ...`).
pub fn has_build_number(banner: &str) -> bool {
    banner
        .split(" #")
        .skip(1)
        .any(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
}

/// Looks for a complete banner in `buf`; returns (offset, text) of the
/// first. A prefix too close to the end to decide is left for the next window.
pub fn scan_banner(buf: &[u8]) -> Option<(usize, String)> {
    scan_banners(buf).into_iter().next()
}

/// All complete banners in `buf`, in order.
pub fn scan_banners(buf: &[u8]) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(pos) = find(&buf[from..], BANNER_PREFIX).map(|p| p + from) {
        from = pos + 1;
        let rest = &buf[pos..];
        let Some(nl) = rest.iter().take(MAX_BANNER).position(|&b| b == b'\n') else {
            continue;
        };
        let text = &rest[..nl];
        let printable = text.iter().all(|b| (0x20..0x7f).contains(b));
        if printable && text.len() > BANNER_PREFIX.len() && rest.get(nl + 1) == Some(&0) {
            out.push((pos, String::from_utf8_lossy(&rest[..=nl]).into_owned()));
        }
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Bytes one entry at `level` maps (1 = PTE).
fn level_span(level: u8) -> u64 {
    match level {
        2 => 1 << 21,
        3 => 1 << 30,
        4 => 1 << 39,
        5 => 1 << 48,
        _ => 1 << 12,
    }
}

/// Finds the kernel banner (see the module docs).
pub fn find_banner(s: &mut Session, search: BannerSearch) -> Result<Banner, KernelError> {
    let cpu = s.cpu_state(search.cpu)?;
    let lstar = cpu.msr_lstar;
    if lstar < KERNEL_TEXT_MIN || cpu.msrs_valid != 1 {
        return Err(KernelError::Lstar {
            found: lstar,
            valid: cpu.msrs_valid,
        });
    }
    let chunk = s.max_read()?.min(search.chunk).max(MAX_BANNER * 2) as u64;
    let space = AddressSpace::kernel_of(search.cpu);
    let start = lstar & !0xFFF;
    let end = start.saturating_add(search.limit);
    let mut addr = start;
    let mut window: Vec<u8> = Vec::new();
    let mut window_addr = start;
    let (mut read, mut skipped, mut requests) = (0u64, 0u64, 1u32);
    let mut candidates: Vec<(u64, String)> = Vec::new();
    while addr < end {
        let n = chunk.min(end - addr) as u32;
        let r = s.read_virt_once(space, addr, n)?;
        requests += 1;
        read += r.data.len() as u64;
        if window.is_empty() {
            window_addr = addr;
        }
        window.extend_from_slice(&r.data);
        for (off, text) in scan_banners(&window) {
            let at = window_addr + off as u64;
            if candidates.iter().any(|(a, _)| *a == at) {
                continue;
            }
            if has_build_number(&text) {
                return Ok(Banner {
                    addr: at,
                    text,
                    lstar,
                    bytes_read: read,
                    requests,
                    others: candidates,
                });
            }
            candidates.push((at, text));
        }
        match r.status {
            Status::Ok => {
                addr += n as u64;
                // Keep a tail long enough for a banner cut by the chunk end.
                let keep = window.len().min(MAX_BANNER + BANNER_PREFIX.len());
                window.drain(..window.len() - keep);
                window_addr = addr - keep as u64;
            }
            Status::NotPresent
            | Status::RefusedNotRam
            | Status::RefusedSmram
            | Status::NonCanonical => {
                // `aux` is where the read stopped; skip what the missing
                // entry would have mapped.
                let stop = r.aux.clamp(addr, addr + n as u64);
                let span = if r.status == Status::NotPresent {
                    level_span(r.level)
                } else {
                    1 << 12
                };
                let next = (stop | (span - 1)).saturating_add(1);
                skipped += next - stop;
                addr = next;
                window.clear();
                if r.status == Status::NonCanonical {
                    break;
                }
            }
            other => {
                return Err(SessionError::Op {
                    op: format!("READ_VIRT {addr:#x}+{n:#x} (banner search)"),
                    status: other,
                    level: r.level,
                    aux: r.aux,
                }
                .into());
            }
        }
    }
    if !candidates.is_empty() {
        let (addr, text) = candidates.remove(0);
        return Ok(Banner {
            addr,
            text,
            lstar,
            bytes_read: read,
            requests,
            others: candidates,
        });
    }
    Err(KernelError::NotFound {
        lstar,
        limit: search.limit,
        read,
        skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_finds_only_complete_printable_banners() {
        let mut b = vec![0u8; 64];
        b.extend_from_slice(b"Linux version \x01bad\n\0");
        b.extend_from_slice(b"Linux version 6.1.0 (x@y) #1 SMP\n\0");
        let (off, text) = scan_banner(&b).unwrap();
        assert_eq!(off, 64 + 20);
        assert_eq!(text, "Linux version 6.1.0 (x@y) #1 SMP\n");
        assert_eq!(scan_banner(b"Linux version 6.1 no newline"), None);
        assert_eq!(scan_banner(b"Linux version 6.1\nX"), None, "needs NUL");
        assert_eq!(scan_banner(b"%s version %s (\n\0"), None);
    }

    #[test]
    fn build_numbers() {
        assert!(has_build_number("Linux version 6.1 (a@b) (gcc) #1 SMP x\n"));
        assert!(!has_build_number("Linux version 6.1 (a@b) (gcc) # SMP x\n"));
        assert!(!has_build_number("Linux version 6.1\n"));
    }

    #[test]
    fn spans() {
        assert_eq!(level_span(1), 4096);
        assert_eq!(level_span(2), 2 << 20);
        assert_eq!(level_span(3), 1 << 30);
    }
}
