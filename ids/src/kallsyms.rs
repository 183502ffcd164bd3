//! kallsyms found and decoded in guest memory, with no System.map.
//!
//! The tables are written by the kernel's build (`scripts/kallsyms.c`) into
//! `.rodata`; `kernel/kallsyms.c` reads them. What changed over time, and is
//! handled here:
//!
//! | kernel | addresses | table order |
//! |---|---|---|
//! | < 4.6 | `kallsyms_addresses[]`, u64 absolute | addresses, num_syms, names, markers, token_table, token_index |
//! | 4.6 .. 6.14 | `kallsyms_offsets[]` u32 + `kallsyms_relative_base` u64; x86-64 SMP per-CPU symbols absolute (offset >= 0), others `base - 1 - (s32)offset` | offsets, relative_base, num_syms, names, markers, [seqs], token_table, token_index |
//! | 6.1 | names' lengths ULEB128 (two bytes from 128) | |
//! | 6.2 | `kallsyms_seqs_of_names[]` (3 bytes big-endian per symbol) after the markers | |
//! | 6.4 | | num_syms, names, markers, token_table, token_index, offsets, relative_base, seqs |
//! | 6.15 | no absolute per-CPU symbols: `base + offset` for all | |
//! | 7.0 | place-relative: `addr = &offsets[i] + (s32)offsets[i]`, no relative_base | num_syms, names, markers, token_table, token_index, offsets, seqs |
//!
//! How they are found (any version): the token table holds the 256
//! NUL-terminated tokens, and the single-character tokens `"0"`..`"9"` sit
//! at indices 0x30..0x39 (every digit occurs in some symbol name, and a byte
//! that occurs is its own token), so `"0\0" "1\0" ... "9\0"` is searched for,
//! 0x30 strings are walked back to the table's start, and the
//! `kallsyms_token_index` right after it must list the tokens' offsets.
//! Then `kallsyms_markers` (u32, every 256th name's offset, strictly
//! increasing from 0) is found right before the token table (or before the
//! seqs table), `kallsyms_num_syms` before the names (a u32 in the range
//! the markers imply), and every candidate is checked by decoding all the
//! names against the markers. The address encoding is then chosen among the
//! candidates whose addresses are sorted and (when an anchor is given) put
//! `entry_SYSCALL_64` at the CPU's LSTAR.
//!
//! Untrusted input: every count and offset read from the guest is bounded
//! ([`MAX_SYMS`], [`KSYM_NAME_LEN`]) and every index checked; a malformed
//! table is an error, never a panic or a hang.

use std::collections::HashMap;

/// Most symbols accepted.
pub const MAX_SYMS: usize = 1 << 22;
/// Fewest symbols accepted (a kernel has tens of thousands).
pub const MIN_SYMS: usize = 64;
/// Longest expanded symbol name (the kernel's `KSYM_NAME_LEN`, 512 since 6.1).
pub const KSYM_NAME_LEN: usize = 512;
/// The token-table signature: tokens 0x30..0x39.
pub const DIGITS: &[u8] = b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00";

/// A kernel symbol.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Symbol {
    /// Address (per-CPU symbols of older kernels: their offset in the
    /// per-CPU area, as /proc/kallsyms shows them).
    pub addr: u64,
    /// The type letter (`T`, `t`, `D`, ...).
    pub kind: char,
    /// Name.
    pub name: String,
}

/// How the addresses are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Encoding {
    /// u64 absolute addresses (before 4.6, or arches without base-relative).
    Absolute,
    /// u32 offsets from `kallsyms_relative_base`; `absolute_percpu` for
    /// x86-64 SMP before 6.15.
    BaseRelative {
        /// Per-CPU symbols stored as non-negative absolute values.
        absolute_percpu: bool,
    },
    /// s32 offsets relative to their own place (7.0).
    PlaceRelative,
}

/// Where the tables were found (guest-virtual addresses) and how to read
/// them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layout {
    /// Address encoding.
    pub encoding: Encoding,
    /// True for the 6.4+ order (names first, addresses after the tokens).
    pub names_first: bool,
    /// Names' lengths are ULEB128 (6.1+).
    pub uleb_lengths: bool,
    /// `kallsyms_seqs_of_names` exists (6.2+), where.
    pub seqs_of_names: Option<u64>,
    /// `kallsyms_num_syms`.
    pub num_syms_at: u64,
    /// `kallsyms_names`.
    pub names: u64,
    /// `kallsyms_markers`.
    pub markers: u64,
    /// `kallsyms_token_table`.
    pub token_table: u64,
    /// `kallsyms_token_index`.
    pub token_index: u64,
    /// `kallsyms_offsets` or `kallsyms_addresses`.
    pub addresses: u64,
    /// `kallsyms_relative_base`'s value, if any.
    pub relative_base: Option<u64>,
}

/// Errors finding or decoding kallsyms.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KallsymsError {
    /// No token table.
    #[error(
        "no kallsyms token table (the \"0\\01\\0...9\\0\" run of single-digit tokens followed by a matching kallsyms_token_index) in {len:#x} bytes from {base:#x}: the kernel lacks CONFIG_KALLSYMS, or its .rodata lies outside the searched range (raise --limit)"
    )]
    NoTokenTable {
        /// Start of the searched image.
        base: u64,
        /// Bytes searched.
        len: usize,
    },
    /// The token table was found but no names/markers around it decode.
    #[error(
        "kallsyms token table at {token_table:#x} found, but no kallsyms_num_syms/names/markers before it decode consistently: an unknown table layout, or corrupt tables"
    )]
    NoNames {
        /// Token table address.
        token_table: u64,
    },
    /// Names decode but no address encoding fits.
    #[error(
        "kallsyms names at {names:#x} decode ({count} symbols) but no address table fits (sorted addresses{anchor}): an unknown encoding, or corrupt tables"
    )]
    NoAddresses {
        /// Names address.
        names: u64,
        /// Symbols.
        count: usize,
        /// The anchor condition.
        anchor: String,
    },
}

/// A contiguous image of guest-virtual memory (unmapped bytes zero).
#[derive(Clone, Debug, Default)]
pub struct Image {
    /// Virtual address of `bytes[0]`.
    pub base: u64,
    /// The bytes.
    pub bytes: Vec<u8>,
}

impl Image {
    fn off(&self, va: u64) -> Option<usize> {
        let o = va.checked_sub(self.base)?;
        (o < self.bytes.len() as u64).then_some(o as usize)
    }
    fn slice(&self, va: u64, len: usize) -> Option<&[u8]> {
        let o = self.off(va)?;
        self.bytes.get(o..o.checked_add(len)?)
    }
    fn u16(&self, va: u64) -> Option<u16> {
        Some(u16::from_le_bytes(self.slice(va, 2)?.try_into().ok()?))
    }
    fn u32(&self, va: u64) -> Option<u32> {
        Some(u32::from_le_bytes(self.slice(va, 4)?.try_into().ok()?))
    }
    fn u64(&self, va: u64) -> Option<u64> {
        Some(u64::from_le_bytes(self.slice(va, 8)?.try_into().ok()?))
    }
    /// Virtual address one past the last byte.
    pub fn end(&self) -> u64 {
        self.base + self.bytes.len() as u64
    }
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// The decoded table.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Kallsyms {
    /// Symbols in the kernel's table order (by address).
    pub symbols: Vec<Symbol>,
    /// Where and how.
    pub layout: Layout,
    #[serde(skip)]
    by_name: HashMap<String, usize>,
}

impl Kallsyms {
    /// Builds the name index.
    pub fn new(symbols: Vec<Symbol>, layout: Layout) -> Self {
        let mut k = Self {
            symbols,
            layout,
            by_name: HashMap::new(),
        };
        k.index();
        k
    }

    fn index(&mut self) {
        self.by_name.clear();
        for (i, s) in self.symbols.iter().enumerate() {
            self.by_name.entry(s.name.clone()).or_insert(i);
        }
    }

    /// The first symbol named `name`.
    pub fn get(&self, name: &str) -> Option<&Symbol> {
        if self.by_name.is_empty() && !self.symbols.is_empty() {
            return self.symbols.iter().find(|s| s.name == name);
        }
        self.by_name.get(name).map(|&i| &self.symbols[i])
    }

    /// The address of `name`.
    pub fn addr(&self, name: &str) -> Option<u64> {
        self.get(name).map(|s| s.addr)
    }

    /// Rebuilds the index after deserializing.
    pub fn reindex(&mut self) {
        self.index();
    }

    /// Adds `delta` to every address that is not a per-CPU offset (KASLR
    /// slide between the boot the cache was made in and this one).
    pub fn slide(&mut self, delta: i64, kernel_min: u64) {
        if delta == 0 {
            return;
        }
        for s in &mut self.symbols {
            if s.addr >= kernel_min {
                s.addr = s.addr.wrapping_add(delta as u64);
            }
        }
        let l = &mut self.layout;
        for a in [
            &mut l.num_syms_at,
            &mut l.names,
            &mut l.markers,
            &mut l.token_table,
            &mut l.token_index,
            &mut l.addresses,
        ] {
            *a = a.wrapping_add(delta as u64);
        }
        if let Some(s) = &mut l.seqs_of_names {
            *s = s.wrapping_add(delta as u64);
        }
        if let Some(b) = &mut l.relative_base {
            *b = b.wrapping_add(delta as u64);
        }
    }
}

/// The token table: 256 expanded tokens.
#[derive(Clone, Debug)]
struct Tokens {
    at: u64,
    index_at: u64,
    end: u64,
    tokens: Vec<Vec<u8>>,
}

/// Finds every token table in `img`.
fn find_token_tables(img: &Image) -> Vec<Tokens> {
    let mut out = Vec::new();
    let mut from = 0usize;
    while let Some(p) = memchr_find(&img.bytes[from..], DIGITS) {
        let pos = from + p;
        from = pos + 1;
        if let Some(t) = token_table_at_digits(img, pos)
            && !out.iter().any(|o: &Tokens| o.at == t.at)
        {
            out.push(t);
        }
    }
    out
}

fn memchr_find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let first = needle[0];
    let mut i = 0;
    while i + needle.len() <= hay.len() {
        let p = hay[i..].iter().position(|&b| b == first)?;
        let at = i + p;
        if hay.get(at..at + needle.len()) == Some(needle) {
            return Some(at);
        }
        i = at + 1;
    }
    None
}

/// `pos` is the offset of token 0x30 in the image: walk back 0x30 tokens.
fn token_table_at_digits(img: &Image, pos: usize) -> Option<Tokens> {
    let b = &img.bytes;
    let mut start = pos;
    for _ in 0..0x30 {
        // b[start-1] is the NUL ending the previous token.
        if start == 0 || b[start - 1] != 0 {
            return None;
        }
        let end = start - 1;
        let mut s = end;
        let mut n = 0;
        while s > 0 && b[s - 1] != 0 {
            s -= 1;
            n += 1;
            if n > KSYM_NAME_LEN {
                return None;
            }
        }
        start = s;
    }
    let at = img.base + start as u64;
    // Token table starts aligned (ALGN: 4 or 8).
    if !at.is_multiple_of(4) {
        return None;
    }
    let mut tokens = Vec::with_capacity(256);
    let mut offs = Vec::with_capacity(256);
    let mut o = start;
    for _ in 0..256 {
        let len = b
            .get(o..)?
            .iter()
            .take(KSYM_NAME_LEN + 1)
            .position(|&c| c == 0)?;
        offs.push(o - start);
        tokens.push(b[o..o + len].to_vec());
        o += len + 1;
    }
    let end = img.base + o as u64;
    for a in [2u64, 4, 8] {
        let ti = align_up(end, a);
        if ti - end > 7 {
            continue;
        }
        let ok = (0..256).all(|i| img.u16(ti + 2 * i as u64) == Some(offs[i] as u16));
        if ok {
            return Some(Tokens {
                at,
                index_at: ti,
                end,
                tokens,
            });
        }
    }
    None
}

/// Names, parsed: offsets of each entry, end, and the compressed bytes.
struct Names {
    at: u64,
    count: usize,
    uleb: bool,
    /// (offset in names, compressed bytes range) per symbol.
    entries: Vec<(usize, usize, usize)>,
    end: u64,
}

/// Parses `count` names at `at`, checking each 256th against `markers`
/// (when given) and stopping at `limit`.
fn parse_names(
    img: &Image,
    at: u64,
    count: usize,
    uleb: bool,
    markers: Option<u64>,
    limit: u64,
) -> Option<Names> {
    let start = img.off(at)?;
    let lim = img.off(limit.min(img.end()).saturating_sub(1))? + 1;
    let b = &img.bytes[..lim];
    let mut o = start;
    let mut entries = Vec::with_capacity(count);
    for i in 0..count {
        if i % 256 == 0
            && let Some(m) = markers
            && img.u32(m + 4 * (i / 256) as u64)? as usize != o - start
        {
            return None;
        }
        let l0 = *b.get(o)? as usize;
        let (len, hdr) = if uleb && l0 & 0x80 != 0 {
            let l1 = *b.get(o + 1)? as usize;
            if l1 & 0x80 != 0 {
                return None;
            }
            ((l0 & 0x7f) | (l1 << 7), 2)
        } else {
            (l0, 1)
        };
        if len == 0 || len > KSYM_NAME_LEN {
            return None;
        }
        let data = o + hdr;
        if data + len > b.len() {
            return None;
        }
        entries.push((o - start, data, len));
        o = data + len;
    }
    Some(Names {
        at,
        count,
        uleb,
        entries,
        end: img.base + o as u64,
    })
}

/// Markers ending right before `x` (exclusive): walks back over strictly
/// decreasing u32 to the 0 that is `markers[0]`. Returns (start, count).
fn markers_ending_at(img: &Image, x: u64) -> Option<(u64, usize)> {
    let mut p = x.checked_sub(4)?;
    let mut prev = img.u32(p)?;
    let mut count = 1usize;
    while prev != 0 {
        let q = p.checked_sub(4)?;
        let v = img.u32(q)?;
        if v >= prev {
            return None;
        }
        prev = v;
        p = q;
        count += 1;
        if count > MAX_SYMS / 256 + 1 {
            return None;
        }
    }
    Some((p, count))
}

/// A consistent (num_syms, names, markers) triple.
struct Core {
    num_syms_at: u64,
    names: Names,
    markers: u64,
    markers_count: usize,
}

/// Finds num_syms+names for markers at `m` (count `mc`), names ending at
/// most 7 bytes before `m`.
fn core_for_markers(img: &Image, m: u64, mc: usize) -> Option<Core> {
    let last = img.u32(m + 4 * (mc as u64 - 1))? as u64;
    let lo_n = 256 * (mc - 1) + 1;
    let hi_n = 256 * mc;
    // Names start before m - last - 2*(symbols after the last marker).
    let rest_min = 2 * (lo_n - 256 * (mc - 1)) as u64;
    let rest_max = ((hi_n - 256 * (mc - 1)) * (KSYM_NAME_LEN + 2)) as u64;
    let hi = m.checked_sub(last + rest_min)?;
    let lo = m.saturating_sub(last + rest_max + 16).max(img.base);
    let mut s = hi & !3;
    while s >= lo {
        for nsa in [s.wrapping_sub(4), s.wrapping_sub(8)] {
            let Some(n) = img.u32(nsa) else { continue };
            let n = n as usize;
            if !(lo_n..=hi_n).contains(&n) || n < MIN_SYMS.min(lo_n) {
                continue;
            }
            // Bytes between num_syms and names are alignment padding.
            if nsa + 4 != s && img.u32(nsa + 4) != Some(0) {
                continue;
            }
            for uleb in [true, false] {
                if let Some(names) = parse_names(img, s, n, uleb, Some(m), m + 1)
                    && names.end <= m
                    && m - names.end < 8
                {
                    return Some(Core {
                        num_syms_at: nsa,
                        names,
                        markers: m,
                        markers_count: mc,
                    });
                }
            }
        }
        if s < 4 {
            break;
        }
        s -= 4;
    }
    None
}

/// Candidate cores for a token table: markers right before it, or before a
/// seqs table of 3 or 4 bytes per symbol (6.2/6.3).
fn find_cores(img: &Image, t: &Tokens) -> Vec<(Core, Option<u64>)> {
    let mut out = Vec::new();
    for pad in [0u64, 4] {
        let Some(x) = t.at.checked_sub(pad) else {
            continue;
        };
        if pad > 0 && img.u32(x) != Some(0) {
            continue;
        }
        if let Some((m, mc)) = markers_ending_at(img, x)
            && let Some(c) = core_for_markers(img, m, mc)
        {
            out.push((c, None));
        }
    }
    if !out.is_empty() {
        return out;
    }
    // 6.2/6.3: num_syms is preceded by kallsyms_relative_base (a kernel
    // address) or the last absolute address; names follow at 8 alignment.
    let lo = t.at.saturating_sub(64 << 20).max(img.base);
    let mut p = align_up(lo + 8, 8);
    while p + 8 <= t.at {
        let ok = img.u64(p - 8).is_some_and(|v| v >> 47 == 0x1ffff)
            && img.u32(p + 4) == Some(0)
            && img
                .u32(p)
                .is_some_and(|n| (MIN_SYMS..=MAX_SYMS).contains(&(n as usize)));
        if ok {
            let n = img.u32(p).unwrap_or(0) as usize;
            for uleb in [true, false] {
                let Some(names) = parse_names(img, p + 8, n, uleb, None, t.at) else {
                    continue;
                };
                let m = align_up(names.end, 8);
                let mc = n.div_ceil(256);
                let markers_ok = names
                    .entries
                    .iter()
                    .step_by(256)
                    .enumerate()
                    .all(|(k, e)| img.u32(m + 4 * k as u64) == Some(e.0 as u32));
                if !markers_ok {
                    continue;
                }
                let seqs = align_up(m + 4 * mc as u64, 8);
                for w in [3u64, 4] {
                    if align_up(seqs + w * n as u64, 8) == t.at {
                        out.push((
                            Core {
                                num_syms_at: p,
                                names,
                                markers: m,
                                markers_count: mc,
                            },
                            Some(seqs),
                        ));
                        break;
                    }
                }
                break;
            }
            if !out.is_empty() {
                return out;
            }
        }
        p += 8;
    }
    out
}

fn expand(tokens: &Tokens, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    for &c in data {
        out.extend_from_slice(&tokens.tokens[c as usize]);
        if out.len() > KSYM_NAME_LEN {
            break;
        }
    }
    out
}

/// Address tables to try for a core.
fn address_candidates(
    img: &Image,
    t: &Tokens,
    core: &Core,
) -> Vec<(Encoding, u64, Vec<u64>, Option<u64>)> {
    let n = core.names.count;
    let mut out = Vec::new();
    let rel = |o: u64, base: u64, abs_percpu: bool| -> Option<Vec<u64>> {
        (0..n)
            .map(|i| {
                let v = img.u32(o + 4 * i as u64)?;
                Some(if abs_percpu {
                    if (v as i32) >= 0 {
                        v as u64
                    } else {
                        base.wrapping_sub(1).wrapping_sub(v as i32 as i64 as u64)
                    }
                } else {
                    base.wrapping_add(v as u64)
                })
            })
            .collect()
    };
    let abs_percpu_mode = |o: u64| -> bool {
        let neg = (0..n)
            .filter(|&i| img.u32(o + 4 * i as u64).is_some_and(|v| (v as i32) < 0))
            .count();
        neg * 2 > n
    };
    let p = core.num_syms_at;
    if core.names.at > p && t.at > core.markers {
        // Before 6.4: addresses precede num_syms.
        if let Some(base) = img.u64(p.wrapping_sub(8)) {
            let o = (p - 8).wrapping_sub(align_up(4 * n as u64, 8));
            let apm = abs_percpu_mode(o);
            if let Some(v) = rel(o, base, apm) {
                out.push((
                    Encoding::BaseRelative {
                        absolute_percpu: apm,
                    },
                    o,
                    v,
                    Some(base),
                ));
            }
        }
        let a = p.wrapping_sub(8 * n as u64);
        if let Some(v) = (0..n).map(|i| img.u64(a + 8 * i as u64)).collect() {
            out.push((Encoding::Absolute, a, v, None));
        }
    }
    // 6.4+: addresses after the token index (which ends 4-aligned).
    let ti_end = t.index_at + 512;
    let kernel_addr = |v: u64| v >> 47 == 0x1ffff;
    for a in [8u64, 4] {
        let o = align_up(ti_end, a);
        for ra in [8u64, 4] {
            let r = align_up(o + 4 * n as u64, ra);
            if let Some(base) = img.u64(r).filter(|&b| kernel_addr(b)) {
                let apm = abs_percpu_mode(o);
                if let Some(v) = rel(o, base, apm) {
                    out.push((
                        Encoding::BaseRelative {
                            absolute_percpu: apm,
                        },
                        o,
                        v,
                        Some(base),
                    ));
                }
            }
        }
    }
    for a in [8u64, 4] {
        let o = align_up(ti_end, a);
        if let Some(v) = (0..n)
            .map(|i| img.u64(o + 8 * i as u64))
            .collect::<Option<Vec<u64>>>()
            .filter(|v| v.iter().filter(|&&x| kernel_addr(x)).count() * 2 > n)
        {
            out.push((Encoding::Absolute, o, v, None));
        }
    }
    // 7.0: place-relative, `.balign 4`, right after the token index.
    if let Some(v) = (0..n)
        .map(|i| {
            let at = ti_end + 4 * i as u64;
            img.u32(at).map(|x| at.wrapping_add(x as i32 as i64 as u64))
        })
        .collect()
    {
        out.push((Encoding::PlaceRelative, ti_end, v, None));
    }
    out
}

/// Finds and decodes kallsyms in `img`. `anchor` = (name, address) that the
/// decoded table must agree with (e.g. `entry_SYSCALL_64` at LSTAR).
pub fn find(img: &Image, anchor: Option<(&str, u64)>) -> Result<Kallsyms, KallsymsError> {
    let tables = find_token_tables(img);
    if tables.is_empty() {
        return Err(KallsymsError::NoTokenTable {
            base: img.base,
            len: img.bytes.len(),
        });
    }
    let mut last_err = None;
    for t in &tables {
        let cores = find_cores(img, t);
        if cores.is_empty() {
            last_err = Some(KallsymsError::NoNames { token_table: t.at });
            continue;
        }
        for (core, seqs) in cores {
            let names: Vec<Vec<u8>> = core
                .names
                .entries
                .iter()
                .map(|&(_, d, l)| expand(t, &img.bytes[d..d + l]))
                .collect();
            let anchor_idx = anchor.and_then(|(a, _)| {
                names
                    .iter()
                    .position(|n| n.len() > 1 && &n[1..] == a.as_bytes())
            });
            for (encoding, addresses, addrs, base) in address_candidates(img, t, &core) {
                let sorted = addrs.windows(2).all(|w| w[0] <= w[1]);
                if !sorted {
                    continue;
                }
                if let Some((_, want)) = anchor {
                    match anchor_idx {
                        Some(i) if addrs[i] == want => {}
                        _ => continue,
                    }
                }
                let symbols = names
                    .iter()
                    .zip(&addrs)
                    .map(|(n, &addr)| Symbol {
                        addr,
                        kind: n.first().map_or('?', |&c| c as char),
                        name: String::from_utf8_lossy(n.get(1..).unwrap_or(&[])).into_owned(),
                    })
                    .collect();
                let layout = Layout {
                    encoding,
                    names_first: addresses > t.at,
                    uleb_lengths: core.names.uleb,
                    seqs_of_names: seqs,
                    num_syms_at: core.num_syms_at,
                    names: core.names.at,
                    markers: core.markers,
                    token_table: t.at,
                    token_index: t.index_at,
                    addresses,
                    relative_base: base,
                };
                let _ = (core.markers_count, t.end);
                return Ok(Kallsyms::new(symbols, layout));
            }
            last_err = Some(KallsymsError::NoAddresses {
                names: core.names.at,
                count: core.names.count,
                anchor: anchor
                    .map(|(n, a)| format!(", {n} at {a:#x}"))
                    .unwrap_or_default(),
            });
        }
    }
    Err(last_err.unwrap_or(KallsymsError::NoTokenTable {
        base: img.base,
        len: img.bytes.len(),
    }))
}

#[cfg(test)]
mod tests;
