//! The agent key never stays in guest-visible memory: the firmware copies it
//! from the SEV launch secret area (where the harness loads it, as
//! `sev-inject-launch-secret` would under SEV) into SMRAM and scrubs the
//! area and every other copy before Linux runs; fw_cfg holds no key.
//!
//! The host dumps all guest RAM below 4 GiB (QMP `pmemsave`, the non-SMM view
//! in which TSEG reads as all ones) after boot and after serving requests,
//! and searches it for the key. A positive control (the kernel banner, which
//! must be found) shows that the search itself works.
//!
//! Run with `cargo xtask test` (these are `#[ignore]`d for plain `cargo test`).

mod common;

use common::{boot, config, finish, ids_session, sh};
use ids::kernel::{self, BannerSearch};

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(haystack, needle).is_some()
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn key_is_not_in_guest_ram() {
    // Linux must not reuse the firmware's RAM image (code, data and boot
    // stack at 2-4 MiB) before the dump, or leftovers would be overwritten
    // by chance rather than scrubbed on purpose.
    let vm = boot(
        config("keysecrecy")
            .mem("512M")
            .smp(2)
            .append("memmap=4M$0x200000"),
    );
    let key = std::fs::read(&vm.info().key).expect("read the VM's key file");
    assert_eq!(key.len(), 32, "harness key length");
    let log = vm.debugcon();
    assert!(
        log.contains("key: from the SEV launch secret area"),
        "the key must come from the launch secret area; debugcon:\n{log}"
    );
    // Not through fw_cfg either: QEMU was given no fw_cfg key at all (so the
    // raw ports cannot serve one), and Linux's qemu_fw_cfg, where the guest
    // kernel has it, lists none.
    let cmdline =
        std::fs::read_to_string(vm.state_dir().join("qemu.cmdline")).expect("read qemu.cmdline");
    assert!(
        !cmdline.contains(smmvmi_mailbox::platform::KEY_FW_CFG_FILE),
        "QEMU got a fw_cfg key: {cmdline}"
    );
    let listed = sh(&vm, "ls /sys/firmware/qemu_fw_cfg/by_name/opt 2>&1; true");
    assert!(!listed.contains("smmvmi"), "fw_cfg lists {listed:?}");
    // The raw ports, as guest root without any driver: the directory walk
    // finds QEMU's own files (positive control) and no key file.
    let raw = sh(&vm, "fwcfg; echo status=$?");
    assert!(
        raw.contains("status=0") && raw.lines().any(|l| l.starts_with("etc/e820 ")),
        "raw fw_cfg directory walk failed or found no etc/e820: {raw:?}"
    );
    assert!(
        !raw.contains(smmvmi_mailbox::platform::KEY_FW_CFG_FILE),
        "the raw fw_cfg directory has the key file: {raw:?}"
    );
    // The page tables the firmware built: no SEV under TCG, so no C-bit,
    // and INFO (below) says the same.
    assert!(
        log.contains("page tables: no C-bit (SEV not active)"),
        "debugcon:\n{log}"
    );

    // Make the agent serve sealed requests first, so any copy made while
    // serving would show up too.
    let mut session = ids_session(&vm);
    let banner = kernel::find_banner(&mut session, BannerSearch::default())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        banner.text.starts_with("Linux version"),
        "{:?}",
        banner.text
    );
    let info = session.info().unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(
        info.header.sev_flags & smmvmi_mailbox::records::KEY_FROM_LAUNCH_SECRET,
        0,
        "INFO says where the key came from: {:#x}",
        info.header.sev_flags
    );
    assert_eq!(
        (
            info.header.c_bit,
            info.header.sev_flags & smmvmi_mailbox::records::SEV_ACTIVE
        ),
        (0, 0),
        "INFO: no C-bit and SEV not active under TCG"
    );
    let client = session.client_id();
    // QEMU's QMP socket serves one client at a time: hang up first.
    drop(session);

    // Dump in 64 MiB pieces: each QMP command must answer within the
    // harness's QMP deadline.
    let dump = vm.state_dir().join("ram.dump");
    let size: u64 = 512 << 20;
    let piece: u64 = 64 << 20;
    let mut ram = Vec::with_capacity(size as usize);
    for at in (0..size).step_by(piece as usize) {
        vm.qmp(
            "pmemsave",
            Some(serde_json::json!({"val": at, "size": piece, "filename": dump})),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        ram.extend(std::fs::read(&dump).expect("read the RAM dump"));
    }
    let _ = std::fs::remove_file(&dump);
    assert_eq!(ram.len() as u64, size, "pmemsave wrote the whole RAM");

    let version = sh(&vm, "cat /proc/version");
    assert!(
        contains(&ram, version.as_bytes()),
        "positive control: the kernel banner must be found in the dump"
    );
    assert!(
        !contains(&ram, &key),
        "the 32-byte agent key is in guest RAM outside SMRAM"
    );
    assert!(
        !contains(&ram, &key[..16]) && !contains(&ram, &key[16..]),
        "half of the agent key is in guest RAM outside SMRAM"
    );
    // The per-direction keys of the session that was served (HKDF of the
    // key, the session salt published in the mailbox and the client id); an
    // AES-256 key schedule starts with the key itself, so a leftover
    // schedule would be found too.
    let salt = vm.mailbox().expect("read the mailbox header").salt;
    let shared: [u8; 32] = key.as_slice().try_into().expect("32-byte key");
    for (name, derived) in ["request", "reply"]
        .iter()
        .zip(smmvmi_mailbox::crypto::direction_keys(
            &shared, &salt, client,
        ))
    {
        assert!(
            !contains(&ram, &derived),
            "the derived {name} key is in guest RAM outside SMRAM"
        );
    }
    finish(vm);
}
