//! Attacks on the agent, end to end. A compromised guest root writes
//! garbage, forged (wrong key), replayed and plain requests into the mailbox
//! through the ivshmem BAR and raises SMIs itself: each is rejected (serve
//! status), the VM keeps running and the next legitimate request succeeds.
//! READ_PHYS of TSEG and of MMIO is refused. The IDS rejects a reply with
//! one byte flipped and an old reply replayed.
//!
//! Run with `cargo xtask test` (these are `#[ignore]`d for plain `cargo test`).

mod common;

use std::time::{Duration, Instant};

use common::{boot, config, finish, ids_session, parse_tseg_line, sh};
use host_injector::MailboxFile;
use ids::Session;
use ids::session::SessionError;
use smmvmi_mailbox::client::{self, Client, ClientError, Poll};
use smmvmi_mailbox::crypto::SessionKeys;
use smmvmi_mailbox::layout::{self, ServeStatus};
use smmvmi_mailbox::platform::{
    APM_CMD_SERVE, IVSHMEM_BAR_SHMEM, IVSHMEM_DEVICE_ID, IVSHMEM_VENDOR_ID,
};
use smmvmi_mailbox::wire::{Op, Status};
use smmvmi_tests::vm::Vm;

const DEADLINE: Duration = Duration::from_secs(10);

/// Guest-physical address of the ivshmem BAR2 (the mailbox), as guest root
/// finds it in sysfs.
fn mailbox_bar(vm: &Vm) -> u64 {
    let out = sh(
        vm,
        &format!(
            "for d in /sys/bus/pci/devices/*; do \
               if [ \"$(cat $d/vendor)\" = {IVSHMEM_VENDOR_ID:#06x} ] && [ \"$(cat $d/device)\" = {IVSHMEM_DEVICE_ID:#06x} ]; then \
                 sed -n {}p $d/resource; fi; done",
            IVSHMEM_BAR_SHMEM + 1
        ),
    );
    let first = out.split_whitespace().next().unwrap_or("");
    let bar = u64::from_str_radix(first.trim_start_matches("0x"), 16).unwrap_or_else(|_| {
        panic!("ivshmem BAR2 in sysfs: expected `0xSTART 0xEND 0xFLAGS`, got {out:?}")
    });
    assert_ne!(bar, 0, "ivshmem BAR2 unassigned: {out:?}");
    bar
}

/// Guest root writes `data` at `bar + offset` with busybox devmem (32-bit words).
fn guest_write(vm: &Vm, bar: u64, offset: usize, data: &[u8]) {
    let mut cmds = Vec::new();
    for (i, w) in data.chunks(4).enumerate() {
        let mut b = [0u8; 4];
        b[..w.len()].copy_from_slice(w);
        let addr = bar + (offset + 4 * i) as u64;
        cmds.push(format!("devmem {addr:#x} 32 {:#x}", u32::from_le_bytes(b)));
    }
    for chunk in cmds.chunks(64) {
        sh(vm, &chunk.join(" && "));
    }
}

/// The guest posts `frame` with a fresh doorbell, raises the SMI itself, and
/// the host waits for the agent's verdict (status word).
fn guest_request(vm: &Vm, bar: u64, frame: &[u8]) -> Option<ServeStatus> {
    let mb = MailboxFile::open(&vm.info().mailbox).unwrap_or_else(|e| panic!("{e}"));
    let doorbell = host_injector::transact::fresh_doorbell(mb.header().unwrap().reply_done);
    guest_write(vm, bar, mb.areas().request.start, frame);
    guest_write(vm, bar, layout::OFF_REQ_DOORBELL, &doorbell.to_le_bytes());
    let deadline = Instant::now() + DEADLINE;
    loop {
        sh(vm, &format!("smi {APM_CMD_SERVE:#x}"));
        let wait = Instant::now() + Duration::from_millis(500);
        while Instant::now() < wait {
            if let Poll::Done { status, .. } = mb.poll_reply(doorbell).unwrap() {
                return ServeStatus::from_raw(status);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not answer the guest's request within {DEADLINE:?}: {}",
            mb.header().unwrap().summary()
        );
    }
}

/// The VM runs and the legitimate IDS still gets answers.
fn still_serving(vm: &Vm, s: &mut Session, after: &str) {
    assert_eq!(sh(vm, "echo alive"), "alive", "guest dead after {after}");
    let st = s
        .cpu_state(0)
        .unwrap_or_else(|e| panic!("legitimate request failed after {after}: {e}"));
    assert_eq!(st.msrs_valid, 1, "after {after}");
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn guest_root_cannot_forge_replay_or_crash_the_agent() {
    let vm = boot(config("agent-attack"));
    let mut s = ids_session(&vm);
    let bar = mailbox_bar(&vm);
    still_serving(&vm, &mut s, "boot");

    // Garbage.
    let mut garbage = vec![0u8; 256];
    getrandom::fill(&mut garbage).unwrap();
    garbage[0] ^= 0xFF; // never a valid frame version by accident
    let st = guest_request(&vm, bar, &garbage);
    assert_eq!(st, Some(ServeStatus::BadFrame), "garbage");
    still_serving(&vm, &mut s, "garbage");

    // Forged: sealed under a key the attacker made up (with the real salt).
    let salt = MailboxFile::open(&vm.info().mailbox)
        .unwrap()
        .header()
        .unwrap()
        .salt;
    let mut fake_key = [0u8; 32];
    getrandom::fill(&mut fake_key).unwrap();
    let mut forger = Client::new(SessionKeys::derive(&fake_key, &salt), u64::MAX / 2);
    let forged = forger
        .seal_request_vec(&[Op::ReadPhys { addr: 0, len: 64 }], [1; 16])
        .unwrap();
    assert_eq!(
        guest_request(&vm, bar, &forged),
        Some(ServeStatus::BadTag),
        "forged"
    );
    still_serving(&vm, &mut s, "forged request");

    // Replayed: a genuine request the guest saw in the mailbox earlier.
    let ops = [Op::CpuState { cpu: 0 }];
    let genuine = s.seal(&ops).unwrap();
    let t = s.carry(&genuine).unwrap_or_else(|e| panic!("{e}"));
    s.open(&t.reply).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        guest_request(&vm, bar, &genuine),
        Some(ServeStatus::Replay),
        "replay"
    );
    still_serving(&vm, &mut s, "replayed request");

    // Plain (unauthenticated) request to a provisioned agent.
    let mut plain = vec![0u8; 256];
    let n = client::encode_plain_info_request(&mut plain).unwrap();
    assert_eq!(
        guest_request(&vm, bar, &plain[..n]),
        Some(ServeStatus::SealedRequired),
        "plain request"
    );
    still_serving(&vm, &mut s, "plain request");

    // A storm of guest SMIs with nothing new posted.
    sh(
        &vm,
        &format!("for i in $(seq 50); do smi {APM_CMD_SERVE:#x}; done"),
    );
    still_serving(&vm, &mut s, "50 guest SMIs");
    finish(vm);
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn tseg_and_mmio_reads_are_refused_and_bad_replies_rejected() {
    let vm = boot(config("agent-refuse"));
    let line = vm
        .wait_debugcon_line("smmvmi: tseg base=", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e}"));
    let (base, size) = parse_tseg_line(&line).unwrap_or_else(|| panic!("TSEG line {line:?}"));
    let mut s = ids_session(&vm);
    let info = s.info().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (info.header.smram_base, info.header.smram_size),
        (base, size)
    );
    let cases = [
        (base, 64, Status::RefusedSmram),
        (base + size / 2, 4096, Status::RefusedSmram),
        (base + size - 8, 8, Status::RefusedSmram),
        // Straddles into TSEG; the bytes below TSEG are firmware-reserved
        // (ACPI) here, so "not RAM" is as right an answer as "SMRAM".
        (base - 8, 16, Status::RefusedNotRam),
        (0xFEE0_0000, 16, Status::RefusedNotRam), // local APIC
        (0xFEC0_0000, 16, Status::RefusedNotRam), // IOAPIC
    ];
    for (addr, len, want) in cases {
        let r = s
            .request(&[Op::ReadPhys { addr, len }])
            .unwrap_or_else(|e| panic!("{e}"))
            .remove(0);
        assert!(
            r.status == want || (addr < base && r.status == Status::RefusedSmram),
            "READ_PHYS {addr:#x}+{len:#x}: expected {want:?}, found {:?}",
            r.status
        );
        // At most the RAM prefix before TSEG may come back, never TSEG bytes.
        let allowed = base.saturating_sub(addr).min(u64::from(len)) as usize;
        assert!(
            r.data.len() <= allowed,
            "READ_PHYS {addr:#x}+{len:#x} refused but returned {} bytes",
            r.data.len()
        );
    }
    // The ivshmem BAR itself is MMIO, not RAM.
    let bar = mailbox_bar(&vm);
    let r = s
        .request(&[Op::ReadPhys { addr: bar, len: 16 }])
        .unwrap()
        .remove(0);
    assert_eq!(r.status, Status::RefusedNotRam, "mailbox BAR");

    // One byte flipped in a genuine reply, then an old reply replayed.
    let ops = [Op::CpuState { cpu: 0 }];
    let frame = s.seal(&ops).unwrap();
    let t = s.carry(&frame).unwrap_or_else(|e| panic!("{e}"));
    let old = t.reply.clone();
    for at in [3usize, 20, 40, t.reply.len() - 1] {
        let mut flipped = t.reply.clone();
        flipped[at] ^= 0x01;
        let e = s.open(&flipped).unwrap_err();
        assert!(
            matches!(e, SessionError::Reply(_)),
            "flip at {at}: expected a reply error, got {e}"
        );
        assert!(!e.to_string().is_empty());
    }
    s.open(&t.reply)
        .unwrap_or_else(|e| panic!("genuine reply: {e}"));
    let frame = s.seal(&ops).unwrap();
    let fresh = s.carry(&frame).unwrap_or_else(|e| panic!("{e}"));
    let e = s.open(&old).unwrap_err();
    assert!(
        matches!(
            e,
            SessionError::Reply(
                ClientError::WrongRequest { .. } | ClientError::ReplayedReply { .. }
            )
        ),
        "old reply replayed: {e}"
    );
    assert!(
        e.to_string().contains("stale") || e.to_string().contains("replayed"),
        "{e}"
    );
    s.open(&fresh.reply)
        .unwrap_or_else(|e| panic!("fresh reply: {e}"));
    finish(vm);
}
