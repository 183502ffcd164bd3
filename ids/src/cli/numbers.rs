//! How the command line reads numbers. One rule, so no number is ever read
//! in a base the user did not mean:
//!
//! - **addresses are always hexadecimal**, `0x` optional: `ffffffff81000000`
//!   as /proc/kallsyms prints it, `100000` as /proc/iomem prints it, and
//!   `0x100000` all mean what they say; `_` and `` ` `` may separate digit
//!   groups (`ffffffff`81000000`, as WinDbg prints it);
//! - **sizes and lengths** are decimal (`4096`), hexadecimal with `0x`
//!   (`0x1000`), or carry a binary suffix `K`, `M`, `G` (`KiB`, `MiB`,
//!   `GiB` too; 1K = 1024); a size with hex letters and no `0x` is refused
//!   rather than guessed;
//! - **ranges** are `ADDR+LEN` or `ADDR..END` (END exclusive), or an
//!   address followed by a separate LEN;
//! - **CPU indexes** are decimal, 0 or more;
//! - **durations** are `500ms`, `10s`, `1m` (humantime).

use std::time::Duration;

/// Parses an address: hex digits, `0x` optional.
pub fn parse_addr(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    let clean: String = digits.chars().filter(|c| !matches!(c, '_' | '`')).collect();
    if clean.is_empty() || !clean.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "{s:?} is not an address: addresses are hexadecimal, with or without 0x \
             (ffffffff81000000, 0x100000, 100000 = 0x100000)"
        ));
    }
    u64::from_str_radix(&clean, 16).map_err(|_| {
        format!(
            "{s:?} does not fit in 64 bits: an address has at most 16 hex digits, found {}",
            clean.len()
        )
    })
}

/// Parses a size: decimal, `0x` hex, or a `K`/`M`/`G` suffix (binary).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let usage = "sizes are decimal (4096), hex with 0x (0x1000) or with K/M/G (4K, 64M, 1G)";
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        let clean = hex.replace('_', "");
        return u64::from_str_radix(&clean, 16)
            .map_err(|_| format!("{s:?} is not a size: {usage}"));
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '_'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let num = num.replace('_', "");
    if num.is_empty() || (!suffix.is_empty() && t.chars().all(|c| c.is_ascii_hexdigit())) {
        if !t.is_empty() && t.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!(
                "{s:?} is not a size: it has hex digits but no 0x; write 0x{t} if you mean hex ({usage})"
            ));
        }
        return Err(format!("{s:?} is not a size: {usage}"));
    }
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ if suffix.chars().all(|c| c.is_ascii_hexdigit()) => {
            return Err(format!(
                "{s:?} is not a size: it has hex digits but no 0x; write 0x{t} if you mean hex ({usage})"
            ));
        }
        _ => return Err(format!("{s:?} is not a size: {usage}")),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is too large for a size"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large for a size"))
}

/// An address range, or an address whose length comes separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeArg {
    /// First address.
    pub addr: u64,
    /// Length, if the argument gave one (`+LEN` or `..END`).
    pub len: Option<u64>,
}

/// Parses `ADDR`, `ADDR+LEN` or `ADDR..END` (END exclusive).
pub fn parse_range(s: &str) -> Result<RangeArg, String> {
    if let Some((a, e)) = s.split_once("..") {
        let addr = parse_addr(a)?;
        let end = parse_addr(e)?;
        if end <= addr {
            return Err(format!(
                "{s:?}: the end of ADDR..END must be above the start (END is exclusive), found {end:#x} <= {addr:#x}"
            ));
        }
        return Ok(RangeArg {
            addr,
            len: Some(end - addr),
        });
    }
    if let Some((a, l)) = s.split_once('+') {
        return Ok(RangeArg {
            addr: parse_addr(a)?,
            len: Some(parse_size(l)?),
        });
    }
    Ok(RangeArg {
        addr: parse_addr(s)?,
        len: None,
    })
}

/// Parses a CPU index (decimal).
pub fn parse_cpu(s: &str) -> Result<u32, String> {
    s.trim().parse().map_err(|_| {
        format!("{s:?} is not a CPU index: CPUs are numbered 0, 1, 2, ... (`ids info` lists them)")
    })
}

/// Parses a request deadline: `10s`, `500ms`, `1m`; at least 10 ms.
pub fn parse_deadline(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        format!("{s:?} is not a duration ({e}): write it with a unit, such as 500ms, 10s or 1m")
    })?;
    check_deadline(d)
}

/// Parses `--deadline-ms N` (milliseconds, decimal).
pub fn parse_deadline_ms(s: &str) -> Result<Duration, String> {
    let ms: u64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of milliseconds"))?;
    check_deadline(Duration::from_millis(ms))
}

/// A deadline below 10 ms would report a healthy agent as silent.
pub const MIN_DEADLINE: Duration = Duration::from_millis(10);

fn check_deadline(d: Duration) -> Result<Duration, String> {
    if d < MIN_DEADLINE {
        return Err(format!(
            "a deadline of {} would call a healthy agent silent (one request takes about 1 ms, \
             up to 100 ms when a vCPU is slow to enter SMM): give at least 10ms; the default is 10s",
            humantime::format_duration(d)
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_hex_with_or_without_0x() {
        assert_eq!(parse_addr("100000"), Ok(0x100000));
        assert_eq!(parse_addr("0x100000"), Ok(0x100000));
        assert_eq!(parse_addr("0X10"), Ok(0x10));
        assert_eq!(parse_addr("ffffffff81000000"), Ok(0xffff_ffff_8100_0000));
        assert_eq!(parse_addr("ffffffff`81000000"), Ok(0xffff_ffff_8100_0000));
        assert_eq!(parse_addr("ffff_ffff_8100_0000"), Ok(0xffff_ffff_8100_0000));
        for bad in [
            "",
            "0x",
            "-1",
            "12g",
            "1ffffffff81000000",
            "entry_SYSCALL_64",
        ] {
            let e = parse_addr(bad).unwrap_err();
            assert!(e.contains("address") || e.contains("64 bits"), "{bad}: {e}");
        }
    }

    #[test]
    fn sizes_are_decimal_hex_or_suffixed() {
        assert_eq!(parse_size("16"), Ok(16));
        assert_eq!(parse_size("100000"), Ok(100_000));
        assert_eq!(parse_size("0x1000"), Ok(0x1000));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("ff").unwrap_err().contains("0xff"));
        assert!(parse_size("10q").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn ranges() {
        assert_eq!(
            parse_range("100000+4K"),
            Ok(RangeArg {
                addr: 0x100000,
                len: Some(4096)
            })
        );
        assert_eq!(
            parse_range("0x1000..0x2000"),
            Ok(RangeArg {
                addr: 0x1000,
                len: Some(0x1000)
            })
        );
        assert_eq!(
            parse_range("ffffffff81000000"),
            Ok(RangeArg {
                addr: 0xffff_ffff_8100_0000,
                len: None
            })
        );
        assert!(parse_range("2000..1000").unwrap_err().contains("above"));
    }

    #[test]
    fn cpus_and_deadlines() {
        assert_eq!(parse_cpu("1"), Ok(1));
        assert!(parse_cpu("-1").unwrap_err().contains("ids info"));
        assert_eq!(parse_deadline("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_deadline("10s"), Ok(Duration::from_secs(10)));
        assert!(parse_deadline("0s").unwrap_err().contains("at least 10ms"));
        assert!(
            parse_deadline_ms("0")
                .unwrap_err()
                .contains("at least 10ms")
        );
        assert_eq!(parse_deadline_ms("250"), Ok(Duration::from_millis(250)));
    }
}
