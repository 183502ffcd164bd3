//! The guest's e820 memory map, parsed from the kernel log lines
//! `BIOS-e820: [mem 0x...-0x...] TYPE` that `dmesg` prints.

/// One e820 entry; `end` is inclusive, as Linux prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub start: u64,
    pub end: u64,
    pub kind: String,
}

impl E820Entry {
    /// True if `[base, base+size)` lies inside this entry.
    pub fn contains_range(&self, base: u64, size: u64) -> bool {
        size > 0 && base >= self.start && base.saturating_add(size - 1) <= self.end
    }
}

/// Parses every `BIOS-e820:` line of a kernel log.
pub fn parse_dmesg(log: &str) -> Vec<E820Entry> {
    log.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<E820Entry> {
    let rest = &line[line.find("BIOS-e820: [mem ")? + "BIOS-e820: [mem ".len()..];
    let (range, kind) = rest.split_once(']')?;
    let (start, end) = range.split_once('-')?;
    let hex = |s: &str| u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok();
    Some(E820Entry {
        start: hex(start)?,
        end: hex(end)?,
        kind: kind.trim().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_lines() {
        let log = "[    0.000000] BIOS-provided physical RAM map:\n\
                   [    0.000000] BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable\n\
                   [    0.000000] BIOS-e820: [mem 0x000000007f000000-0x000000007fffffff] reserved\n\
                   [    0.000000] NX (Execute Disable) protection: active\n";
        let map = parse_dmesg(log);
        assert_eq!(map.len(), 2);
        assert_eq!(
            map[1],
            E820Entry {
                start: 0x7f00_0000,
                end: 0x7fff_ffff,
                kind: "reserved".into()
            }
        );
        assert!(map[1].contains_range(0x7f00_0000, 0x100_0000));
        assert!(!map[1].contains_range(0x7f00_0000, 0x100_0001));
        assert!(!map[1].contains_range(0x7f00_0000, 0));
    }
}
