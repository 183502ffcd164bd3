//! Security end-to-end tests: what a compromised guest root can and cannot
//! do to SMRAM. TSEG must be reserved in the guest's e820 map, read as all
//! ones from the OS, and stay closed when root rewrites the MCH SMRAM/ESMRAMC
//! registers through sysfs.
//!
//! Run with `cargo xtask test` (these are `#[ignore]`d for plain `cargo test`).

mod common;

use std::time::Duration;

use common::{boot, config, finish, guest_devmem32, parse_tseg_line, sh};
use smmvmi_tests::e820;

const MCH_CONFIG: &str = "/sys/bus/pci/devices/0000:00:00.0/config";
const SMRAM: u64 = 0x9D;
const ESMRAMC: u64 = 0x9E;
const D_OPEN: u8 = 0x40;
const D_LCK: u8 = 0x10;
const T_EN: u8 = 0x01;

fn read_config_byte(vm: &smmvmi_tests::vm::Vm, offset: u64) -> u8 {
    let out = sh(
        vm,
        &format!("dd if={MCH_CONFIG} bs=1 skip={offset} count=1 2>/dev/null | od -An -tx1"),
    );
    u8::from_str_radix(out.trim(), 16)
        .unwrap_or_else(|_| panic!("MCH config {offset:#x}: expected a hex byte, got {out:?}"))
}

fn write_config_byte(vm: &smmvmi_tests::vm::Vm, offset: u64, value: u8) {
    // busybox printf takes octal escapes; dd writes one byte at the offset.
    let out = vm
        .exec(&format!(
            "printf '\\{value:03o}' | dd of={MCH_CONFIG} bs=1 seek={offset} count=1 conv=notrunc"
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        out.status, 0,
        "guest root could not write MCH config {offset:#x}: {out:?}"
    );
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn tseg_is_reserved_unreadable_and_stays_locked() {
    // `nopat`: busybox devmem maps uncached, and with PAT on Linux refuses
    // mappings that conflict with a write-back direct map of a neighbouring
    // RAM page (EAGAIN). SMRAM protection is chipset-level, independent of PAT.
    let vm = boot(config("tseg").append("nopat"));
    let line = vm
        .wait_debugcon_line("smmvmi: tseg base=", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e}"));
    let (base, size) = parse_tseg_line(&line)
        .unwrap_or_else(|| panic!("cannot parse TSEG line {line:?}: expected base=0x.. size=0x.."));
    assert!(
        size >= 1 << 20,
        "TSEG size {size:#x}: expected at least 1 MiB"
    );

    let map = e820::parse_dmesg(&sh(&vm, "dmesg"));
    assert!(
        map.iter()
            .any(|e| e.kind == "reserved" && e.contains_range(base, size)),
        "TSEG [{base:#x}, {:#x}) is not inside a reserved e820 entry; guest map: {map:#?}",
        base + size
    );
    assert!(
        !map.iter()
            .any(|e| e.kind == "usable" && e.start < base + size && e.end >= base),
        "TSEG overlaps usable RAM in the guest's e820: {map:#?}"
    );

    for addr in [base, base + size / 2, base + size - 4] {
        assert_eq!(
            guest_devmem32(&vm, addr),
            0xFFFF_FFFF,
            "TSEG word at {addr:#x} readable from the OS"
        );
    }

    let smram = read_config_byte(&vm, SMRAM);
    let esmramc = read_config_byte(&vm, ESMRAMC);
    assert_ne!(
        smram & D_LCK,
        0,
        "SMRAM register {smram:#x}: D_LCK must be set before Linux runs"
    );
    assert_ne!(esmramc & T_EN, 0, "ESMRAMC {esmramc:#x}: T_EN must be set");

    // Guest root tries to reopen SMRAM: set D_OPEN, clear T_EN.
    write_config_byte(&vm, SMRAM, smram | D_OPEN);
    write_config_byte(&vm, ESMRAMC, esmramc & !T_EN);
    let smram_after = read_config_byte(&vm, SMRAM);
    assert_eq!(
        smram_after & D_OPEN,
        0,
        "D_OPEN took effect after D_LCK: SMRAM {smram_after:#x}"
    );
    assert_ne!(
        read_config_byte(&vm, ESMRAMC) & T_EN,
        0,
        "T_EN cleared after D_LCK"
    );
    for addr in [base, base + size - 4] {
        assert_eq!(
            guest_devmem32(&vm, addr),
            0xFFFF_FFFF,
            "TSEG word at {addr:#x} readable after guest root rewrote SMRAM/ESMRAMC"
        );
    }
    assert_eq!(sh(&vm, "echo ok"), "ok");
    finish(vm);
}

#[test]
fn tseg_line_parsing() {
    assert_eq!(
        parse_tseg_line("smmvmi: tseg base=0x3f000000 size=0x1000000"),
        Some((0x3f00_0000, 0x100_0000))
    );
    assert_eq!(parse_tseg_line("smmvmi: tseg base=zz size=0x1"), None);
}
