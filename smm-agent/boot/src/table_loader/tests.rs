//! Tests against a host-side table-loader generator that builds ACPI-like
//! blobs and commands the way QEMU's `bios-linker-loader` does.

use super::*;
use crate::fw_cfg::FwCfgIo;
use crate::fw_cfg::fake::FakeFwCfg;
use proptest::prelude::*;
use std::collections::HashSet;
use std::string::{String, ToString};
use std::vec;
use std::vec::Vec;

const TABLES: &str = "etc/acpi/tables";

/// Pointer the generator asked for: field in `dest` at `offset` of `size`
/// bytes must end up holding alloc(src) + src_offset.
#[derive(Debug, Clone)]
struct Ptr {
    dest: String,
    offset: usize,
    size: usize,
    src: String,
    src_offset: u64,
}

#[derive(Debug, Clone)]
struct Ck {
    file: String,
    start: usize,
    len: usize,
}

#[derive(Debug, Clone)]
struct WrPtr {
    dest: String,
    offset: usize,
    size: usize,
    src: String,
    src_offset: u64,
}

/// Host-side generator of blobs and loader commands.
#[derive(Default, Clone)]
struct Gen {
    files: Vec<(String, Vec<u8>)>,
    script: Vec<u8>,
    pointers: Vec<Ptr>,
    checksums: Vec<Ck>,
    wr_pointers: Vec<WrPtr>,
}

fn name_field(name: &str) -> [u8; NAME_LEN] {
    let mut n = [0u8; NAME_LEN];
    n[..name.len()].copy_from_slice(name.as_bytes());
    n
}

impl Gen {
    fn file_mut(&mut self, name: &str) -> &mut Vec<u8> {
        &mut self.files.iter_mut().find(|(n, _)| n == name).unwrap().1
    }

    fn add_file(&mut self, name: &str, data: Vec<u8>) {
        self.files.push((name.to_string(), data));
    }

    fn command(&mut self, cmd: u32, body: &[u8]) {
        let mut c = [0u8; COMMAND_LEN];
        c[..4].copy_from_slice(&cmd.to_le_bytes());
        c[4..4 + body.len()].copy_from_slice(body);
        self.script.extend_from_slice(&c);
    }

    fn allocate(&mut self, name: &str, align: u32, zone: u8) {
        let mut b = Vec::new();
        b.extend_from_slice(&name_field(name));
        b.extend_from_slice(&align.to_le_bytes());
        b.push(zone);
        self.command(CMD_ALLOCATE, &b);
    }

    fn add_pointer(&mut self, dest: &str, offset: usize, size: u8, src: &str, src_offset: u64) {
        let s = usize::from(size);
        if let Some(field) = self.file_mut(dest).get_mut(offset..offset + s) {
            field.copy_from_slice(&src_offset.to_le_bytes()[..s]);
        }
        let mut b = Vec::new();
        b.extend_from_slice(&name_field(dest));
        b.extend_from_slice(&name_field(src));
        b.extend_from_slice(&(offset as u32).to_le_bytes());
        b.push(size);
        self.command(CMD_ADD_POINTER, &b);
        self.pointers.push(Ptr {
            dest: dest.into(),
            offset,
            size: s,
            src: src.into(),
            src_offset,
        });
    }

    fn add_checksum(&mut self, file: &str, start: usize, len: usize, offset: usize) {
        self.file_mut(file)[offset] = 0;
        let mut b = Vec::new();
        b.extend_from_slice(&name_field(file));
        for v in [offset, start, len] {
            b.extend_from_slice(&(v as u32).to_le_bytes());
        }
        self.command(CMD_ADD_CHECKSUM, &b);
        self.checksums.push(Ck {
            file: file.into(),
            start,
            len,
        });
    }

    fn write_pointer(&mut self, dest: &str, offset: usize, size: u8, src: &str, src_offset: u32) {
        let mut b = Vec::new();
        b.extend_from_slice(&name_field(dest));
        b.extend_from_slice(&name_field(src));
        b.extend_from_slice(&(offset as u32).to_le_bytes());
        b.extend_from_slice(&src_offset.to_le_bytes());
        b.push(size);
        self.command(CMD_WRITE_POINTER, &b);
        self.wr_pointers.push(WrPtr {
            dest: dest.into(),
            offset,
            size: usize::from(size),
            src: src.into(),
            src_offset: u64::from(src_offset),
        });
    }

    /// Append an ACPI table to the tables blob; returns its offset.
    fn table(&mut self, sig: &[u8; 4], len: usize, fill: u8) -> usize {
        let blob = self.file_mut(TABLES);
        let at = blob.len();
        let mut t = vec![fill; len];
        t[..4].copy_from_slice(sig);
        t[4..8].copy_from_slice(&(len as u32).to_le_bytes());
        blob.extend_from_slice(&t);
        at
    }

    /// Build RSDP/RSDT/XSDT/FADT/FACS/DSDT plus `extra` tables, with the
    /// commands QEMU emits, and a vmgenid-like WRITE_POINTER.
    fn acpi(extra: &[(usize, u8)], dsdt_len: usize, with_write_pointer: bool) -> Self {
        let mut g = Gen::default();
        g.add_file(TABLES, Vec::new());
        g.add_file(RSDP_FILE, Vec::new());
        g.allocate(TABLES, 64, 1);
        let facs = g.table(b"FACS", 64, 0);
        let dsdt = g.table(b"DSDT", dsdt_len.max(36), 0x5b);
        g.add_checksum(TABLES, dsdt, dsdt_len.max(36), dsdt + 9);
        let fadt = g.table(b"FACP", 276, 0);
        g.add_pointer(TABLES, fadt + 36, 4, TABLES, facs as u64);
        g.add_pointer(TABLES, fadt + 40, 4, TABLES, dsdt as u64);
        g.add_pointer(TABLES, fadt + 140, 8, TABLES, dsdt as u64);
        g.add_checksum(TABLES, fadt, 276, fadt + 9);
        let mut entries = vec![fadt];
        for (i, &(len, fill)) in extra.iter().enumerate() {
            let sig = [b'T', b'B', b'L', b'0' + (i as u8 % 10)];
            let at = g.table(&sig, len.max(36), fill);
            g.add_checksum(TABLES, at, len.max(36), at + 9);
            entries.push(at);
        }
        let rsdt_len = 36 + 4 * entries.len();
        let rsdt = g.table(b"RSDT", rsdt_len, 0);
        for (i, &e) in entries.iter().enumerate() {
            g.add_pointer(TABLES, rsdt + 36 + 4 * i, 4, TABLES, e as u64);
        }
        g.add_checksum(TABLES, rsdt, rsdt_len, rsdt + 9);
        let xsdt_len = 36 + 8 * entries.len();
        let xsdt = g.table(b"XSDT", xsdt_len, 0);
        for (i, &e) in entries.iter().enumerate() {
            g.add_pointer(TABLES, xsdt + 36 + 8 * i, 8, TABLES, e as u64);
        }
        g.add_checksum(TABLES, xsdt, xsdt_len, xsdt + 9);
        // RSDP (ACPI 2.0, 36 bytes) in the F segment zone.
        let mut rsdp = vec![0u8; 36];
        rsdp[..8].copy_from_slice(b"RSD PTR ");
        rsdp[15] = 2;
        rsdp[20..24].copy_from_slice(&36u32.to_le_bytes());
        *g.file_mut(RSDP_FILE) = rsdp;
        g.allocate(RSDP_FILE, 16, 2);
        g.add_pointer(RSDP_FILE, 16, 4, TABLES, rsdt as u64);
        g.add_pointer(RSDP_FILE, 24, 8, TABLES, xsdt as u64);
        g.add_checksum(RSDP_FILE, 0, 20, 8);
        g.add_checksum(RSDP_FILE, 0, 36, 32);
        if with_write_pointer {
            g.add_file("etc/vmgenid_guid", vec![0x42; 4096]);
            g.add_file("etc/vmgenid_addr", vec![0; 8]);
            g.allocate("etc/vmgenid_guid", 4096, 1);
            g.write_pointer("etc/vmgenid_addr", 0, 8, "etc/vmgenid_guid", 40);
        }
        g
    }

    fn fw_cfg(&self) -> FakeFwCfg {
        let mut f = FakeFwCfg::new();
        for (n, d) in &self.files {
            f.add_file(n, d.clone());
        }
        f
    }
}

/// Firmware side: fw_cfg plus a flat memory window with a bump allocator.
struct Env {
    fw: FakeFwCfg,
    base: u64,
    mem: Vec<u8>,
    next: u64,
    zones: Vec<Zone>,
}

impl Env {
    fn new(fw: FakeFwCfg, base: u64, size: usize) -> Self {
        Self {
            fw,
            base,
            mem: vec![0xEE; size],
            next: base,
            zones: Vec::new(),
        }
    }

    fn slice(&self, addr: u64, len: usize) -> &[u8] {
        let off = (addr - self.base) as usize;
        &self.mem[off..off + len]
    }
}

impl LoaderEnv for Env {
    fn find_file(&mut self, name: &str) -> Result<Option<FileEntry>, FwCfgError> {
        crate::fw_cfg::find_file(&mut self.fw, name)
    }
    fn allocate(&mut self, size: u32, align: u32, zone: Zone) -> Option<u64> {
        let addr = self.next.next_multiple_of(u64::from(align));
        let end = addr + u64::from(size);
        if end > self.base + self.mem.len() as u64 {
            return None;
        }
        self.next = end;
        self.zones.push(zone);
        Some(addr)
    }
    fn load_file(&mut self, file: FileEntry, addr: u64) {
        let mut buf = vec![0u8; file.size as usize];
        self.fw.select(file.select);
        self.fw.read(&mut buf);
        self.write_mem(addr, &buf);
    }
    fn read_mem(&mut self, addr: u64, buf: &mut [u8]) {
        let src = self.slice(addr, buf.len()).to_vec();
        buf.copy_from_slice(&src);
    }
    fn write_mem(&mut self, addr: u64, data: &[u8]) {
        let off = (addr - self.base) as usize;
        self.mem[off..off + data.len()].copy_from_slice(data);
    }
    fn write_file(&mut self, file: FileEntry, offset: u32, data: &[u8]) -> Result<(), FwCfgError> {
        // Whole-item DMA write of the patched contents.
        let mut item = self.fw.get(file.select).cloned().unwrap_or_default();
        let o = offset as usize;
        item[o..o + data.len()].copy_from_slice(data);
        self.fw.write(file.select, &item)
    }
}

/// Check every checksum, pointer and untouched byte against the generator.
fn verify(g: &Gen, env: &Env, loaded: &Loaded) -> Result<(), TestCaseError> {
    let addr = |name: &str| loaded.get(name.as_bytes()).unwrap().addr;
    for c in &g.checksums {
        let sum = env
            .slice(addr(&c.file) + c.start as u64, c.len)
            .iter()
            .fold(0u8, |s, &b| s.wrapping_add(b));
        prop_assert_eq!(sum, 0, "checksum of {} at {:#x}", c.file, c.start);
    }
    for p in &g.pointers {
        let mut raw = [0u8; 8];
        raw[..p.size].copy_from_slice(env.slice(addr(&p.dest) + p.offset as u64, p.size));
        prop_assert_eq!(
            u64::from_le_bytes(raw),
            addr(&p.src) + p.src_offset,
            "{:?}",
            p
        );
    }
    for w in &g.wr_pointers {
        let key = crate::fw_cfg::find_file(&mut env.fw_clone(), &w.dest)
            .unwrap()
            .unwrap()
            .select;
        let item = env.fw.get(key).unwrap();
        let mut raw = [0u8; 8];
        raw[..w.size].copy_from_slice(&item[w.offset..w.offset + w.size]);
        prop_assert_eq!(u64::from_le_bytes(raw), addr(&w.src) + w.src_offset);
    }
    // Bytes no command touched are the file's original bytes.
    let mut patched: HashSet<(String, usize)> = HashSet::new();
    for p in &g.pointers {
        for i in p.offset..p.offset + p.size {
            patched.insert((p.dest.clone(), i));
        }
    }
    for c in g.script.chunks(COMMAND_LEN) {
        if u32::from_le_bytes(c[0..4].try_into().unwrap()) == CMD_ADD_CHECKSUM {
            let name = core::str::from_utf8(FileName::from_field(&c[4..60]).bytes())
                .unwrap()
                .to_string();
            patched.insert((
                name,
                u32::from_le_bytes(c[60..64].try_into().unwrap()) as usize,
            ));
        }
    }
    for a in loaded.allocations() {
        let name = core::str::from_utf8(a.name.bytes()).unwrap().to_string();
        let orig = &g.files.iter().find(|(n, _)| *n == name).unwrap().1;
        let got = env.slice(a.addr, orig.len());
        for (i, (&o, &m)) in orig.iter().zip(got).enumerate() {
            if o != m {
                prop_assert!(
                    patched.contains(&(name.clone(), i)),
                    "{} byte {:#x} changed",
                    name,
                    i
                );
            }
        }
    }
    let rsdp = loaded.rsdp().unwrap();
    prop_assert_eq!(env.slice(rsdp, 8), b"RSD PTR ");
    Ok(())
}

impl Env {
    fn fw_clone(&self) -> FakeFwCfg {
        let mut f = FakeFwCfg::new();
        f.items = self.fw.items.clone();
        f.files = self.fw.files.clone();
        f
    }
}

fn run_gen(g: &Gen, base: u64) -> (Env, Result<Loaded, LoaderError>) {
    let mut env = Env::new(g.fw_cfg(), base, 1 << 20);
    let r = run(&mut env, &g.script);
    (env, r)
}

#[test]
fn qemu_like_tables_are_linked() {
    let g = Gen::acpi(&[(120, 0x11), (60, 0xff)], 4000, true);
    let (env, r) = run_gen(&g, 0x7EE0_0000);
    let loaded = r.unwrap();
    verify(&g, &env, &loaded).unwrap();
    assert_eq!(loaded.allocations().count(), 3);
    assert_eq!(env.zones, vec![Zone::High, Zone::FSeg, Zone::High]);
    let (lo, hi) = loaded.extent().unwrap();
    assert_eq!(lo, 0x7EE0_0000);
    assert_eq!(hi, loaded.get(b"etc/vmgenid_guid").unwrap().end());
    assert_eq!(loaded.rsdp().unwrap() % 16, 0);
    // RSDT entry 0 is the FADT, whose DSDT pointer leads to "DSDT".
    let rsdp = loaded.rsdp().unwrap();
    let rsdt = u32::from_le_bytes(env.slice(rsdp + 16, 4).try_into().unwrap()) as u64;
    assert_eq!(env.slice(rsdt, 4), b"RSDT");
    let fadt = u32::from_le_bytes(env.slice(rsdt + 36, 4).try_into().unwrap()) as u64;
    assert_eq!(env.slice(fadt, 4), b"FACP");
    let xdsdt = u64::from_le_bytes(env.slice(fadt + 140, 8).try_into().unwrap());
    assert_eq!(env.slice(xdsdt, 4), b"DSDT");
}

#[test]
fn no_rsdp_is_an_error() {
    let mut g = Gen::default();
    g.add_file(TABLES, vec![0; 64]);
    g.allocate(TABLES, 64, 1);
    assert_eq!(run_gen(&g, 0x10_0000).1, Err(LoaderError::NoRsdp));
    assert_eq!(
        run_gen(&Gen::default(), 0x10_0000).1,
        Err(LoaderError::NoRsdp)
    );
}

#[test]
fn truncated_script() {
    let g = Gen::acpi(&[], 36, false);
    let mut env = Env::new(g.fw_cfg(), 0x10_0000, 1 << 20);
    assert_eq!(
        run(&mut env, &g.script[..200]),
        Err(LoaderError::TruncatedScript { len: 200 })
    );
}

fn err_of(g: &Gen) -> LoaderError {
    run_gen(g, 0x10_0000).1.unwrap_err()
}

fn fname(s: &str) -> FileName {
    FileName::from_field(s.as_bytes())
}

#[test]
fn unknown_file() {
    let mut g = Gen::default();
    g.allocate("etc/acpi/nope", 64, 1);
    assert_eq!(
        err_of(&g),
        LoaderError::UnknownFile {
            index: 0,
            name: fname("etc/acpi/nope")
        }
    );
    let mut g = Gen::default();
    g.allocate("", 64, 1);
    assert!(matches!(err_of(&g), LoaderError::BadName { index: 0, .. }));
    let mut g = Gen::default();
    g.command(CMD_ALLOCATE, &[0xff, 0xfe, 0]);
    assert!(matches!(err_of(&g), LoaderError::BadName { .. }));
}

#[test]
fn pointer_before_allocation() {
    let mut g = Gen::default();
    g.add_file("a", vec![0; 16]);
    g.add_file("b", vec![0; 16]);
    g.allocate("a", 16, 1);
    g.add_pointer("a", 0, 4, "b", 0);
    assert_eq!(
        err_of(&g),
        LoaderError::NotAllocated {
            index: 1,
            name: fname("b")
        }
    );
    let mut g = Gen::default();
    g.add_file("a", vec![0; 16]);
    g.add_checksum("a", 0, 16, 0);
    assert_eq!(
        err_of(&g),
        LoaderError::NotAllocated {
            index: 0,
            name: fname("a")
        }
    );
}

fn two_files() -> Gen {
    let mut g = Gen::default();
    g.add_file("a", vec![0; 16]);
    g.add_file("b", vec![0; 16]);
    g.allocate("a", 16, 1);
    g.allocate("b", 16, 1);
    g
}

#[test]
fn pointer_out_of_range() {
    let mut g = two_files();
    g.add_pointer("a", 12, 8, "b", 0);
    // The generator wrote past the end; trim the file back to 16 bytes.
    g.file_mut("a").truncate(16);
    assert_eq!(
        err_of(&g),
        LoaderError::PointerOutOfRange {
            index: 2,
            name: fname("a"),
            offset: 12,
            size: 8,
            file_size: 16
        }
    );
    // An offset near u32::MAX must not wrap.
    let mut g = two_files();
    let mut b = Vec::new();
    b.extend_from_slice(&name_field("a"));
    b.extend_from_slice(&name_field("b"));
    b.extend_from_slice(&u32::MAX.to_le_bytes());
    b.push(4);
    g.command(CMD_ADD_POINTER, &b);
    assert!(matches!(err_of(&g), LoaderError::PointerOutOfRange { .. }));
}

#[test]
fn pointer_size_and_target() {
    let mut g = two_files();
    g.add_pointer("a", 0, 3, "b", 0);
    assert_eq!(
        err_of(&g),
        LoaderError::PointerSize {
            index: 2,
            name: fname("a"),
            size: 3
        }
    );
    let mut g = two_files();
    g.add_pointer("a", 0, 4, "b", 16);
    assert_eq!(
        err_of(&g),
        LoaderError::TargetOutOfRange {
            index: 2,
            target: fname("b"),
            value: 16,
            target_size: 16
        }
    );
}

#[test]
fn pointer_overflow_above_4g() {
    let g = Gen::acpi(&[], 36, false);
    let (_, r) = run_gen(&g, 0x1_0000_0000);
    assert!(matches!(
        r,
        Err(LoaderError::PointerOverflow { size: 4, .. })
    ));
    let mut g = two_files();
    g.add_pointer("a", 0, 1, "b", 1);
    assert!(matches!(
        err_of(&g),
        LoaderError::PointerOverflow { size: 1, .. }
    ));
}

#[test]
fn checksum_out_of_range() {
    for (start, len, off) in [(0, 17, 0), (8, 9, 0), (0, 16, 16), (u32::MAX, 2, 0)] {
        let mut g = two_files();
        let mut b = Vec::new();
        b.extend_from_slice(&name_field("a"));
        for v in [off, start, len] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        g.command(CMD_ADD_CHECKSUM, &b);
        assert_eq!(
            err_of(&g),
            LoaderError::ChecksumOutOfRange {
                index: 2,
                name: fname("a"),
                offset: off,
                start,
                length: len,
                file_size: 16
            }
        );
    }
}

#[test]
fn allocation_errors() {
    let mut g = Gen::default();
    g.add_file("a", vec![0; 16]);
    g.allocate("a", 24, 1);
    assert_eq!(
        err_of(&g),
        LoaderError::BadAlignment {
            name: fname("a"),
            align: 24
        }
    );
    let mut g = Gen::default();
    g.add_file("a", vec![0; 16]);
    g.allocate("a", 16, 3);
    assert_eq!(
        err_of(&g),
        LoaderError::BadZone {
            name: fname("a"),
            zone: 3
        }
    );
    let mut g = Gen::default();
    g.add_file("a", vec![0; 16]);
    g.allocate("a", 16, 1);
    g.allocate("a", 16, 1);
    assert_eq!(
        err_of(&g),
        LoaderError::DuplicateAllocation { name: fname("a") }
    );
    let mut g = Gen::default();
    g.add_file("big", vec![0; 2 << 20]);
    g.allocate("big", 16, 1);
    assert_eq!(
        err_of(&g),
        LoaderError::OutOfMemory {
            name: fname("big"),
            size: 2 << 20,
            align: 16
        }
    );
    let mut g = Gen::default();
    for i in 0..=MAX_ALLOCATIONS {
        let n = std::format!("f{i}");
        g.add_file(&n, vec![0; 8]);
        g.allocate(&n, 8, 1);
    }
    assert_eq!(
        err_of(&g),
        LoaderError::TooManyAllocations { name: fname("f32") }
    );
}

#[test]
fn write_pointer_errors() {
    let g = Gen::acpi(&[], 36, true);
    let mut fw = g.fw_cfg();
    fw.dma = false;
    let mut env = Env::new(fw, 0x10_0000, 1 << 20);
    let err = run(&mut env, &g.script).unwrap_err();
    assert!(matches!(
        err,
        LoaderError::WritePointer {
            source: FwCfgError::DmaUnsupported { .. },
            ..
        }
    ));
    let msg = err.to_string();
    assert!(
        msg.contains("etc/vmgenid_addr") && msg.contains("DMA"),
        "{msg}"
    );

    let mut g = two_files();
    g.add_file("w", vec![0; 4]);
    g.write_pointer("w", 0, 8, "b", 0);
    assert!(matches!(
        err_of(&g),
        LoaderError::PointerOutOfRange {
            offset: 0,
            size: 8,
            file_size: 4,
            ..
        }
    ));
    let mut g = two_files();
    g.add_file("w", vec![0; 8]);
    g.write_pointer("w", 0, 8, "b", 16);
    assert!(matches!(
        err_of(&g),
        LoaderError::TargetOutOfRange { value: 16, .. }
    ));
    let mut g = two_files();
    g.write_pointer("nope", 0, 8, "b", 0);
    assert!(matches!(err_of(&g), LoaderError::UnknownFile { .. }));
}

#[test]
fn unknown_and_zero_commands_are_ignored() {
    let mut g = Gen::acpi(&[], 36, false);
    let mut script = vec![0u8; COMMAND_LEN];
    script[0] = 0x7f;
    script.extend_from_slice(&[0u8; COMMAND_LEN]);
    script.extend_from_slice(&g.script);
    g.script = script;
    let (env, r) = run_gen(&g, 0x10_0000);
    verify(&g, &env, &r.unwrap()).unwrap();
}

#[test]
fn error_messages_name_the_file() {
    let e = LoaderError::UnknownFile {
        index: 3,
        name: FileName::from_field(b"etc/acpi/t\x01"),
    };
    let s = e.to_string();
    assert!(
        s.contains("\"etc/acpi/t\\x01\"") && s.contains("command 3"),
        "{s}"
    );
}

fn kind_strategy() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0u32), Just(1), Just(2), Just(3), Just(4), Just(9)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn generated_tables_link(
        extra in proptest::collection::vec((0usize..300, any::<u8>()), 0..8),
        dsdt_len in 36usize..9000,
        base_page in 0x100u64..0xF0000,
        wp: bool,
    ) {
        let g = Gen::acpi(&extra, dsdt_len, wp);
        let (env, r) = run_gen(&g, base_page * 4096);
        let loaded = r.unwrap();
        verify(&g, &env, &loaded)?;
    }

    #[test]
    fn random_scripts_never_panic(
        cmds in proptest::collection::vec(
            (kind_strategy(), 0usize..3, 0usize..3, any::<u32>(), 0u32..64, any::<u32>(), any::<u8>()),
            0..24),
    ) {
        let names = ["etc/acpi/tables", "etc/acpi/rsdp", "missing"];
        let mut g = Gen::default();
        g.add_file(names[0], vec![7; 200]);
        g.add_file(names[1], vec![1; 36]);
        for (kind, a, b, x, y, z, s) in cmds {
            let mut body = Vec::new();
            body.extend_from_slice(&name_field(names[a]));
            match kind {
                1 => { body.extend_from_slice(&(1u32 << (x % 16)).to_le_bytes()); body.push(s % 4); }
                3 => { for v in [y, y % 50, z % 300] { body.extend_from_slice(&v.to_le_bytes()); } }
                _ => {
                    body.extend_from_slice(&name_field(names[b]));
                    body.extend_from_slice(&(x % 256).to_le_bytes());
                    if kind == 4 { body.extend_from_slice(&y.to_le_bytes()); }
                    body.push(s % 10);
                }
            }
            g.command(kind, &body);
        }
        let _ = run_gen(&g, 0xFFFF_0000);
    }
}
