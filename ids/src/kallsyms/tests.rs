//! Ground truth built here: a generator that lays out kallsyms tables the
//! way each kernel version's `scripts/kallsyms.c` does (token compression,
//! table order, alignment, address encoding, name-length encoding, seqs),
//! written from reading those sources, and the finder run against it.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    /// < 4.6: absolute u64 addresses.
    V4_5,
    /// 4.6: base-relative with absolute per-CPU symbols.
    V4_6,
    /// 6.1: + ULEB128 name lengths.
    V6_1,
    /// 6.2: + seqs_of_names after the markers.
    V6_2,
    /// 6.4: names first, addresses after the token index.
    V6_4,
    /// 6.15: no absolute per-CPU symbols.
    V6_15,
    /// 7.0: place-relative offsets, no relative base, .balign 4.
    V7_0,
}

const ALL: [Version; 7] = [
    Version::V4_5,
    Version::V4_6,
    Version::V6_1,
    Version::V6_2,
    Version::V6_4,
    Version::V6_15,
    Version::V7_0,
];

const TEXT: u64 = 0xffff_ffff_8100_0000;

struct Sym {
    addr: u64,
    kind: u8,
    name: String,
}

/// A deterministic symbol set: per-CPU symbols (small addresses when the
/// version keeps them absolute), text and data; every digit occurs; long
/// names for the two-byte lengths of 6.1+.
fn symbols(v: Version) -> Vec<Sym> {
    let mut seed = 0x1234_5678u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let parts = [
        "do_", "sys_", "irq", "_handler", "kmem_", "cache", "sched_", "tcp_", "vfs_", "read",
        "write", "init", "exit", "__", "x64_", "page", "alloc", "free", "lock", "mutex",
    ];
    let abs_percpu = matches!(
        v,
        Version::V4_6 | Version::V6_1 | Version::V6_2 | Version::V6_4
    );
    let mut out = Vec::new();
    for i in 0..24u64 {
        out.push(Sym {
            addr: if abs_percpu || v == Version::V4_5 {
                i * 0x100
            } else {
                TEXT - 0x20_0000 + i * 0x100
            },
            kind: b'A',
            name: format!("percpu_var_{i}"),
        });
    }
    let mut addr = TEXT;
    for i in 0..760u64 {
        let mut name = String::new();
        for _ in 0..(1 + rnd() % 4) {
            name.push_str(parts[(rnd() % parts.len() as u64) as usize]);
        }
        name.push_str(&format!("{}", i % 10));
        if i % 7 == 0 {
            name.push_str(&format!("_{i}"));
        }
        let kind = if i < 500 {
            b"Tt"[(i % 2) as usize]
        } else {
            b"Dd"[(i % 2) as usize]
        };
        addr += 0x10 + (rnd() % 0x400);
        out.push(Sym { addr, kind, name });
        if i == 100 {
            addr += 0x40;
            out.push(Sym {
                addr,
                kind: b'T',
                name: "entry_SYSCALL_64".into(),
            });
        }
        if i == 300 && v >= Version::V6_1 {
            // A Rust-style long name: length >= 128 even after compression.
            addr += 0x40;
            let long: String = (0..300)
                .map(|_| (b'a' + (rnd() % 26) as u8) as char)
                .collect();
            out.push(Sym {
                addr,
                kind: b'T',
                name: format!("_RNv{long}"),
            });
        }
    }
    out
}

impl PartialOrd for Version {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some((*self as u8).cmp(&(*o as u8)))
    }
}

/// The token compression of scripts/kallsyms.c: every byte that occurs is
/// its own token; the free codes, from 255 down, each take the most
/// profitable adjacent pair, replaced left to right in every symbol.
fn compress(syms: &mut [Vec<u8>]) -> Vec<Vec<u8>> {
    let mut table: Vec<Vec<u8>> = vec![Vec::new(); 256];
    for s in syms.iter() {
        for &c in s {
            table[c as usize] = vec![c];
        }
    }
    for i in (0..256usize).rev() {
        if !table[i].is_empty() {
            continue;
        }
        let mut profit = vec![0u32; 0x10000];
        for s in syms.iter() {
            for w in s.windows(2) {
                profit[w[0] as usize + ((w[1] as usize) << 8)] += 1;
            }
        }
        let (best, &p) = profit
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0)))
            .expect("non-empty");
        if p == 0 {
            break;
        }
        let pair = [(best & 0xff) as u8, (best >> 8) as u8];
        table[i] = pair.to_vec();
        for s in syms.iter_mut() {
            let mut out = Vec::with_capacity(s.len());
            let mut k = 0;
            while k < s.len() {
                if k + 1 < s.len() && s[k] == pair[0] && s[k + 1] == pair[1] {
                    out.push(i as u8);
                    k += 2;
                } else {
                    out.push(s[k]);
                    k += 1;
                }
            }
            *s = out;
        }
    }
    // Expanded tokens.
    fn exp(t: &[Vec<u8>], c: usize, depth: usize) -> Vec<u8> {
        if t[c].len() == 1 && t[c][0] as usize == c || depth > 64 {
            return t[c].clone();
        }
        t[c].iter()
            .flat_map(|&x| exp(t, x as usize, depth + 1))
            .collect()
    }
    (0..256).map(|c| exp(&table, c, 0)).collect()
}

struct Out {
    base: u64,
    bytes: Vec<u8>,
}

impl Out {
    fn here(&self) -> u64 {
        self.base + self.bytes.len() as u64
    }
    fn label(&mut self, align: u64) -> u64 {
        while !self.here().is_multiple_of(align) {
            self.bytes.push(0);
        }
        self.here()
    }
    fn long(&mut self, v: u32) {
        self.bytes.extend_from_slice(&v.to_le_bytes());
    }
    fn quad(&mut self, v: u64) {
        self.bytes.extend_from_slice(&v.to_le_bytes());
    }
}

/// Lays out the tables of `v` for `syms` at `at`, with junk around them.
fn generate(v: Version, syms: &[Sym], at: u64) -> Image {
    let algn = if v == Version::V7_0 { 4 } else { 8 };
    let uleb = v >= Version::V6_1;
    let seqs = v >= Version::V6_2;
    let abs_percpu = matches!(
        v,
        Version::V4_6 | Version::V6_1 | Version::V6_2 | Version::V6_4
    );
    let mut compressed: Vec<Vec<u8>> = syms
        .iter()
        .map(|s| {
            let mut b = vec![s.kind];
            b.extend_from_slice(s.name.as_bytes());
            b
        })
        .collect();
    let tokens = compress(&mut compressed);
    let n = syms.len();
    let mut o = Out {
        base: at,
        bytes: Vec::new(),
    };
    // Junk before: pointers and small ints, as .rodata has.
    for i in 0..300u64 {
        o.quad(TEXT + i * 0x1234);
        o.long(i as u32);
        o.long(0);
    }
    let rel_base = syms
        .iter()
        .find(|s| !(abs_percpu && s.kind == b'A'))
        .map(|s| s.addr)
        .unwrap_or(0);
    let offset_of = |s: &Sym| -> u32 {
        if abs_percpu && s.kind == b'A' {
            s.addr as u32
        } else if abs_percpu {
            (rel_base as i64 - s.addr as i64 - 1) as i32 as u32
        } else {
            (s.addr - rel_base) as u32
        }
    };
    let emit_addresses = |o: &mut Out| {
        if v == Version::V4_5 {
            o.label(algn);
            for s in syms {
                o.quad(s.addr);
            }
        } else if v == Version::V7_0 {
            o.label(algn);
            for s in syms {
                let place = o.here();
                o.long(s.addr.wrapping_sub(place) as i64 as i32 as u32);
            }
        } else {
            o.label(algn);
            for s in syms {
                o.long(offset_of(s));
            }
            o.label(algn);
            o.quad(rel_base);
        }
    };
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| {
        syms[a]
            .name
            .cmp(&syms[b].name)
            .then(syms[a].addr.cmp(&syms[b].addr))
            .then(a.cmp(&b))
    });
    let emit_seqs = |o: &mut Out| {
        o.label(algn);
        for &i in &order {
            o.bytes
                .extend_from_slice(&[(i >> 16) as u8, (i >> 8) as u8, i as u8]);
        }
    };
    let names_first = v >= Version::V6_4;
    if !names_first {
        emit_addresses(&mut o);
    }
    o.label(algn);
    o.long(n as u32);
    o.label(algn);
    let names_at = o.here();
    let mut markers = Vec::new();
    for (i, c) in compressed.iter().enumerate() {
        if i % 256 == 0 {
            markers.push((o.here() - names_at) as u32);
        }
        if uleb && c.len() > 0x7f {
            o.bytes.push((c.len() as u8 & 0x7f) | 0x80);
            o.bytes.push((c.len() >> 7) as u8);
        } else {
            assert!(c.len() < 256);
            o.bytes.push(c.len() as u8);
        }
        o.bytes.extend_from_slice(c);
    }
    o.label(algn);
    for m in markers {
        o.long(m);
    }
    if seqs && !names_first {
        emit_seqs(&mut o);
    }
    o.label(algn);
    let mut idx = Vec::new();
    let t0 = o.here();
    for t in &tokens {
        idx.push((o.here() - t0) as u16);
        o.bytes.extend_from_slice(t);
        o.bytes.push(0);
    }
    o.label(algn);
    for i in idx {
        o.bytes.extend_from_slice(&i.to_le_bytes());
    }
    if names_first {
        emit_addresses(&mut o);
        emit_seqs(&mut o);
    }
    // Junk after.
    o.label(8);
    for i in 0..200u64 {
        o.quad(TEXT + i * 0x777);
    }
    Image {
        base: o.base,
        bytes: o.bytes,
    }
}

fn check(v: Version) {
    let syms = symbols(v);
    let img = generate(v, &syms, 0xffff_ffff_8200_0000);
    let entry = syms
        .iter()
        .find(|s| s.name == "entry_SYSCALL_64")
        .expect("entry")
        .addr;
    let k = find(&img, Some(("entry_SYSCALL_64", entry))).unwrap_or_else(|e| panic!("{v:?}: {e}"));
    assert_eq!(k.symbols.len(), syms.len(), "{v:?}");
    for (got, want) in k.symbols.iter().zip(&syms) {
        assert_eq!(
            (got.addr, got.kind as u8, got.name.as_str()),
            (want.addr, want.kind, want.name.as_str()),
            "{v:?}"
        );
    }
    let l = &k.layout;
    let enc = match v {
        Version::V4_5 => Encoding::Absolute,
        Version::V6_15 => Encoding::BaseRelative {
            absolute_percpu: false,
        },
        Version::V7_0 => Encoding::PlaceRelative,
        _ => Encoding::BaseRelative {
            absolute_percpu: true,
        },
    };
    assert_eq!(l.encoding, enc, "{v:?}");
    assert_eq!(l.names_first, v >= Version::V6_4, "{v:?}");
    if v >= Version::V6_1 {
        assert!(l.uleb_lengths, "{v:?}");
    }
    if v == Version::V6_2 {
        assert!(l.seqs_of_names.is_some());
    }
    assert_eq!(k.addr("entry_SYSCALL_64"), Some(entry));
}

#[test]
fn every_encoding_decodes() {
    for v in ALL {
        check(v);
    }
}

#[test]
fn without_anchor_sorted_addresses_decide() {
    for v in [Version::V4_6, Version::V6_2, Version::V6_15] {
        let syms = symbols(v);
        let img = generate(v, &syms, 0xffff_ffff_8200_0000);
        let k = find(&img, None).unwrap_or_else(|e| panic!("{v:?}: {e}"));
        assert_eq!(k.symbols.len(), syms.len());
        assert_eq!(k.symbols[30].addr, syms[30].addr, "{v:?}");
    }
}

#[test]
fn a_wrong_anchor_is_refused() {
    let syms = symbols(Version::V6_1);
    let img = generate(Version::V6_1, &syms, 0xffff_ffff_8200_0000);
    let e = find(&img, Some(("entry_SYSCALL_64", 0x1234))).unwrap_err();
    assert!(matches!(e, KallsymsError::NoAddresses { .. }), "{e}");
}

#[test]
fn corrupt_tables_end_in_errors() {
    let syms = symbols(Version::V6_4);
    let img = generate(Version::V6_4, &syms, 0xffff_ffff_8200_0000);
    // No token table at all.
    let junk = Image {
        base: 0x1000,
        bytes: vec![0x41; 100_000],
    };
    assert!(matches!(
        find(&junk, None),
        Err(KallsymsError::NoTokenTable { .. })
    ));
    // Every single-byte corruption of a sample of positions: never a panic.
    let mut seed = 99u64;
    for _ in 0..300 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let pos = (seed >> 33) as usize % img.bytes.len();
        let mut bad = img.clone();
        bad.bytes[pos] ^= 0xa5;
        let _ = find(&bad, None);
    }
    // Truncated anywhere: an error or a table, never a panic.
    for cut in (0..img.bytes.len()).step_by(img.bytes.len() / 50) {
        let t = Image {
            base: img.base,
            bytes: img.bytes[..cut].to_vec(),
        };
        let _ = find(&t, None);
    }
    // A marker changed: names no longer agree, so no table is returned
    // with that core.
    let k = find(&img, None).unwrap();
    let m = k.layout.markers + 4;
    let off = (m - img.base) as usize;
    let mut bad = img.clone();
    bad.bytes[off] ^= 1;
    assert!(find(&bad, None).is_err());
}
