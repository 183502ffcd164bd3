//! Human renderings: a streaming hex dump (repeated lines collapsed into `*`
//! as `hexdump -C` and `xxd -a` do), a decoded CPU state, a page walk.

use std::io::{self, Write};

use serde_json::{Value, json};
use smmvmi_mailbox::wire::CpuState;

/// A hex dump written as the bytes arrive. Lines start at the first address
/// and hold 16 bytes; a line equal to the one before it is shown as one `*`
/// until the bytes change; a gap (an unreadable range) is a line of its own.
pub struct HexDump<W: Write> {
    out: W,
    /// Address of the next byte.
    addr: u64,
    /// Bytes of the line being filled and its address.
    line: Vec<u8>,
    line_addr: u64,
    /// The last full line printed or collapsed.
    last: Option<[u8; 16]>,
    /// Address and bytes of the last collapsed line, if the run is open.
    starred: Option<(u64, [u8; 16])>,
}

impl<W: Write> HexDump<W> {
    /// A dump starting at `addr`.
    pub fn new(out: W, addr: u64) -> Self {
        Self {
            out,
            addr,
            line: Vec::with_capacity(16),
            line_addr: addr,
            last: None,
            starred: None,
        }
    }

    /// Appends bytes at the current address.
    pub fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            if self.line.is_empty() {
                self.line_addr = self.addr;
            }
            let n = (16 - self.line.len()).min(data.len());
            self.line.extend_from_slice(&data[..n]);
            self.addr = self.addr.wrapping_add(n as u64);
            data = &data[n..];
            if self.line.len() == 16 {
                let full: [u8; 16] = self.line[..].try_into().expect("16 bytes");
                self.line.clear();
                if self.last == Some(full) {
                    if self.starred.is_none() {
                        writeln!(self.out, "*")?;
                    }
                    self.starred = Some((self.line_addr, full));
                } else {
                    self.starred = None;
                    print_line(&mut self.out, self.line_addr, &full)?;
                    self.last = Some(full);
                }
            }
        }
        Ok(())
    }

    /// A range that could not be read: ends the current line and prints
    /// what happened; the dump goes on after it.
    pub fn gap(&mut self, len: u64, why: &str) -> io::Result<()> {
        self.flush_partial()?;
        writeln!(
            self.out,
            "{:016x}  -- {len:#x} bytes not read ({:#x}..{:#x}): {why} --",
            self.addr,
            self.addr,
            self.addr.wrapping_add(len)
        )?;
        self.addr = self.addr.wrapping_add(len);
        self.last = None;
        Ok(())
    }

    fn flush_partial(&mut self) -> io::Result<()> {
        if let Some((a, l)) = self.starred.take() {
            // The run's last line, so the dump shows where it ended.
            print_line(&mut self.out, a, &l)?;
        }
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            print_line(&mut self.out, self.line_addr, &line)?;
            self.last = None;
        }
        Ok(())
    }

    /// Ends the dump.
    pub fn finish(mut self) -> io::Result<W> {
        self.flush_partial()?;
        self.out.flush()?;
        Ok(self.out)
    }
}

fn print_line(out: &mut (impl Write + ?Sized), addr: u64, line: &[u8]) -> io::Result<()> {
    let mut hex = String::with_capacity(49);
    for (i, b) in line.iter().enumerate() {
        if i == 8 {
            hex.push(' ');
        }
        hex.push_str(&format!("{b:02x} "));
    }
    let ascii: String = line
        .iter()
        .map(|&b| {
            if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '.'
            }
        })
        .collect();
    writeln!(out, "{addr:016x}  {hex:<49} |{ascii}|")
}

/// Names of the set bits of `value`, from a table of (bit, name).
pub fn flags(value: u64, table: &[(u32, &'static str)]) -> Vec<&'static str> {
    table
        .iter()
        .filter(|(bit, _)| value & (1u64 << bit) != 0)
        .map(|&(_, n)| n)
        .collect()
}

/// CR0 bits (Intel SDM Vol. 3A 2.5).
pub const CR0: &[(u32, &str)] = &[
    (0, "PE"),
    (1, "MP"),
    (2, "EM"),
    (3, "TS"),
    (4, "ET"),
    (5, "NE"),
    (16, "WP"),
    (18, "AM"),
    (29, "NW"),
    (30, "CD"),
    (31, "PG"),
];
/// CR4 bits.
pub const CR4: &[(u32, &str)] = &[
    (0, "VME"),
    (1, "PVI"),
    (2, "TSD"),
    (3, "DE"),
    (4, "PSE"),
    (5, "PAE"),
    (6, "MCE"),
    (7, "PGE"),
    (8, "PCE"),
    (9, "OSFXSR"),
    (10, "OSXMMEXCPT"),
    (11, "UMIP"),
    (12, "LA57"),
    (13, "VMXE"),
    (14, "SMXE"),
    (16, "FSGSBASE"),
    (17, "PCIDE"),
    (18, "OSXSAVE"),
    (20, "SMEP"),
    (21, "SMAP"),
    (22, "PKE"),
    (23, "CET"),
    (24, "PKS"),
];
/// EFER bits (AMD APM Vol. 2 3.1.7).
pub const EFER: &[(u32, &str)] = &[
    (0, "SCE"),
    (8, "LME"),
    (10, "LMA"),
    (11, "NXE"),
    (12, "SVME"),
    (13, "LMSLE"),
    (14, "FFXSR"),
    (15, "TCE"),
];
/// RFLAGS bits.
pub const RFLAGS: &[(u32, &str)] = &[
    (0, "CF"),
    (2, "PF"),
    (4, "AF"),
    (6, "ZF"),
    (7, "SF"),
    (8, "TF"),
    (9, "IF"),
    (10, "DF"),
    (11, "OF"),
    (14, "NT"),
    (16, "RF"),
    (17, "VM"),
    (18, "AC"),
    (19, "VIF"),
    (20, "VIP"),
    (21, "ID"),
];

/// What a CPU was running: its privilege level from CS's RPL.
pub fn mode(st: &CpuState) -> &'static str {
    if st.cr0 & 1 == 0 {
        "real mode"
    } else if st.cs_selector & 3 == 0 {
        "kernel"
    } else {
        "user"
    }
}

/// The paging mode in words.
pub fn paging(st: &CpuState) -> String {
    match st.paging_levels() {
        0 => "no 64-bit paging".into(),
        n => format!("{n}-level"),
    }
}

/// Looks up the symbol at or below an address (`name+0xoff`).
pub type Symbolizer<'a> = &'a dyn Fn(u64) -> Option<String>;

/// The decoded CPU state as text.
pub fn cpu_state_text(
    out: &mut (impl Write + ?Sized),
    cpu: u32,
    st: &CpuState,
    sym: Option<Symbolizer<'_>>,
) -> io::Result<()> {
    let s = |a: u64| -> String {
        sym.and_then(|f| f(a))
            .map(|n| format!("  <{n}>"))
            .unwrap_or_default()
    };
    writeln!(
        out,
        "CPU {cpu}: {} mode (CS {:#06x}, ring {}), {} paging",
        mode(st),
        st.cs_selector,
        st.cs_selector & 3,
        paging(st)
    )?;
    writeln!(out, "  RIP    {:#018x}{}", st.rip, s(st.rip))?;
    writeln!(
        out,
        "  RFLAGS {:#018x}  {}",
        st.rflags,
        flags(st.rflags, RFLAGS).join(" ")
    )?;
    let gprs = [
        ("RAX", st.rax),
        ("RBX", st.rbx),
        ("RCX", st.rcx),
        ("RDX", st.rdx),
        ("RSI", st.rsi),
        ("RDI", st.rdi),
        ("RBP", st.rbp),
        ("RSP", st.rsp),
        ("R8", st.r8),
        ("R9", st.r9),
        ("R10", st.r10),
        ("R11", st.r11),
        ("R12", st.r12),
        ("R13", st.r13),
        ("R14", st.r14),
        ("R15", st.r15),
    ];
    for pair in gprs.chunks(2) {
        writeln!(
            out,
            "  {:<6} {:#018x}   {:<6} {:#018x}",
            pair[0].0, pair[0].1, pair[1].0, pair[1].1
        )?;
    }
    writeln!(
        out,
        "  CR0    {:#018x}  {}",
        st.cr0,
        flags(st.cr0, CR0).join(" ")
    )?;
    writeln!(
        out,
        "  CR3    {:#018x}  (page-table root {:#x}, PCID {})",
        st.cr3,
        st.cr3 & 0x000f_ffff_ffff_f000,
        st.cr3 & 0xfff
    )?;
    writeln!(
        out,
        "  CR4    {:#018x}  {}",
        st.cr4,
        flags(st.cr4, CR4).join(" ")
    )?;
    writeln!(
        out,
        "  EFER   {:#018x}  {}",
        st.efer,
        flags(st.efer, EFER).join(" ")
    )?;
    writeln!(out, "  DR6    {:#018x}   DR7    {:#018x}", st.dr6, st.dr7)?;
    writeln!(
        out,
        "  GDTR   {:#018x} limit {:#x}   IDTR {:#018x} limit {:#x}",
        st.gdtr_base, st.gdtr_limit, st.idtr_base, st.idtr_limit
    )?;
    writeln!(
        out,
        "  CS {:#06x} SS {:#06x} DS {:#06x} ES {:#06x} FS {:#06x} GS {:#06x}",
        st.cs_selector,
        st.ss_selector,
        st.ds_selector,
        st.es_selector,
        st.fs_selector,
        st.gs_selector
    )?;
    writeln!(
        out,
        "  FS base {:#018x}   GS base {:#018x}",
        st.fs_seg_base, st.gs_seg_base
    )?;
    if st.msrs_valid == 1 {
        writeln!(
            out,
            "  LSTAR          {:#018x}{}",
            st.msr_lstar,
            s(st.msr_lstar)
        )?;
        writeln!(out, "  STAR           {:#018x}", st.msr_star)?;
        writeln!(out, "  CSTAR          {:#018x}", st.msr_cstar)?;
        writeln!(out, "  KERNEL_GS_BASE {:#018x}", st.msr_kernel_gs_base)?;
        writeln!(
            out,
            "  FS_BASE        {:#018x}   GS_BASE {:#018x}",
            st.msr_fs_base, st.msr_gs_base
        )?;
        writeln!(
            out,
            "  SYSENTER_EIP   {:#018x}{}",
            st.msr_sysenter_eip,
            s(st.msr_sysenter_eip)
        )?;
    } else {
        writeln!(out, "  MSRs: not read (the CPU did not record them in SMM)")?;
    }
    writeln!(
        out,
        "  SMBASE {:#x}, SMM revision {:#x}",
        st.smbase, st.smm_revision
    )?;
    Ok(())
}

/// The decoded CPU state as JSON (numbers as hex strings, flag names as
/// lists, `mode` user or kernel, symbols when known).
pub fn cpu_state_json(cpu: u32, st: &CpuState, sym: Option<Symbolizer<'_>>) -> Value {
    let h = |v: u64| format!("{v:#x}");
    let reg =
        |v: u64, table: &[(u32, &'static str)]| json!({"value": h(v), "flags": flags(v, table)});
    let s = |a: u64| sym.and_then(|f| f(a));
    json!({
        "cpu": cpu,
        "mode": mode(st),
        "ring": st.cs_selector & 3,
        "paging_levels": st.paging_levels(),
        "rip": h(st.rip),
        "rip_symbol": s(st.rip),
        "rflags": reg(st.rflags, RFLAGS),
        "gprs": {
            "rax": h(st.rax), "rbx": h(st.rbx), "rcx": h(st.rcx), "rdx": h(st.rdx),
            "rsi": h(st.rsi), "rdi": h(st.rdi), "rbp": h(st.rbp), "rsp": h(st.rsp),
            "r8": h(st.r8), "r9": h(st.r9), "r10": h(st.r10), "r11": h(st.r11),
            "r12": h(st.r12), "r13": h(st.r13), "r14": h(st.r14), "r15": h(st.r15),
        },
        "cr0": reg(st.cr0, CR0),
        "cr3": h(st.cr3),
        "cr4": reg(st.cr4, CR4),
        "efer": reg(st.efer, EFER),
        "dr6": h(st.dr6), "dr7": h(st.dr7),
        "gdtr": {"base": h(st.gdtr_base), "limit": h(st.gdtr_limit)},
        "idtr": {"base": h(st.idtr_base), "limit": h(st.idtr_limit)},
        "selectors": {
            "cs": h(st.cs_selector), "ss": h(st.ss_selector), "ds": h(st.ds_selector),
            "es": h(st.es_selector), "fs": h(st.fs_selector), "gs": h(st.gs_selector),
        },
        "fs_base": h(st.fs_seg_base),
        "gs_base": h(st.gs_seg_base),
        "msrs_valid": st.msrs_valid == 1,
        "msrs": {
            "lstar": h(st.msr_lstar), "lstar_symbol": s(st.msr_lstar),
            "star": h(st.msr_star), "cstar": h(st.msr_cstar),
            "kernel_gs_base": h(st.msr_kernel_gs_base),
            "fs_base": h(st.msr_fs_base), "gs_base": h(st.msr_gs_base),
            "sysenter_eip": h(st.msr_sysenter_eip),
        },
        "smbase": h(st.smbase),
        "smm_revision": h(st.smm_revision),
    })
}

/// Names of the paging levels, by level number (5..1).
pub fn level_name(level: u8) -> &'static str {
    match level {
        5 => "PML5E",
        4 => "PML4E",
        3 => "PDPTE",
        2 => "PDE",
        1 => "PTE",
        _ => "entry",
    }
}

/// Flags of a page-table entry.
pub fn pte_flags(e: u64) -> String {
    let mut v = Vec::new();
    v.push(if e & 1 != 0 { "P" } else { "not-present" });
    if e & 1 != 0 {
        v.push(if e & 2 != 0 { "RW" } else { "RO" });
        v.push(if e & 4 != 0 { "US" } else { "S" });
        if e & (1 << 5) != 0 {
            v.push("A");
        }
        if e & (1 << 6) != 0 {
            v.push("D");
        }
        if e & (1 << 7) != 0 {
            v.push("PS");
        }
        if e & (1 << 8) != 0 {
            v.push("G");
        }
        if e & (1 << 63) != 0 {
            v.push("NX");
        }
    }
    v.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dump(addr: u64, parts: &[Result<&[u8], u64>]) -> String {
        let mut d = HexDump::new(Vec::new(), addr);
        for p in parts {
            match p {
                Ok(b) => d.write(b).unwrap(),
                Err(n) => d.gap(*n, "not mapped").unwrap(),
            }
        }
        String::from_utf8(d.finish().unwrap()).unwrap()
    }

    #[test]
    fn hexdump_lines_and_collapse() {
        let text = dump(0x1000, &[Ok(b"Linux version 6.1 and more")]);
        assert_eq!(
            text,
            "0000000000001000  4c 69 6e 75 78 20 76 65  72 73 69 6f 6e 20 36 2e  |Linux version 6.|\n\
             0000000000001010  31 20 61 6e 64 20 6d 6f  72 65                    |1 and more|\n"
        );
        // 64 zero bytes: first line, a star, then the last line (where it ended).
        let zeros = [0u8; 64];
        let text = dump(0, &[Ok(&zeros[..10]), Ok(&zeros[10..])]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("0000000000000000  00 00"));
        assert_eq!(lines[1], "*");
        assert!(lines[2].starts_with("0000000000000030  00 00"));
    }

    #[test]
    fn hexdump_gap() {
        let text = dump(0x10, &[Ok(&[1, 2, 3]), Err(0x1000 - 0x13), Ok(&[4])]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("0000000000000010  01 02 03"));
        assert!(lines[1].contains("0xfed bytes not read (0x13..0x1000): not mapped"));
        assert!(lines[2].starts_with("0000000000001000  04"));
    }

    #[test]
    fn decodes_control_registers() {
        assert_eq!(
            flags(0x8005_0033, CR0),
            ["PE", "MP", "ET", "NE", "WP", "AM", "PG"]
        );
        assert_eq!(flags(0xd01, EFER), ["SCE", "LME", "LMA", "NXE"]);
        assert_eq!(flags(1 << 12, CR4), ["LA57"]);
        let st = CpuState {
            cs_selector: 0x33,
            cr0: 0x8005_0033,
            efer: 0xd01,
            ..Default::default()
        };
        assert_eq!(mode(&st), "user");
        let j = cpu_state_json(1, &st, None);
        assert_eq!(j["mode"], "user");
        assert_eq!(j["efer"]["flags"][2], "LMA");
        let mut t = Vec::new();
        cpu_state_text(&mut t, 1, &st, Some(&|_| Some("f+0x1".into()))).unwrap();
        let t = String::from_utf8(t).unwrap();
        assert!(t.contains("CPU 1: user mode"), "{t}");
        assert!(t.contains("<f+0x1>"), "{t}");
        assert!(
            t.contains("EFER   0x0000000000000d01  SCE LME LMA NXE"),
            "{t}"
        );
    }
}
