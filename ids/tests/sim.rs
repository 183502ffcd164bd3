//! The IDS and the host-injector against the real agent logic
//! (`smmvmi_agent::serve`) running over a real mailbox file and fake guest
//! RAM with real page tables: a KASLR'd kernel image with an unmapped
//! text/rodata gap and a banner cut by a chunk boundary.

use std::path::PathBuf;
use std::time::Duration;

use host_injector::{Injector, MailboxFile, SmiBackend, SmiError, TransactError};
use ids::kernel::{self, BannerSearch, KernelError};
use ids::session::{Session, SessionError};
use smmvmi_mailbox::client::ClientError;
use smmvmi_mailbox::layout::ServeStatus;
use smmvmi_mailbox::wire::{Op, Status};
use smmvmi_testkit::{FakeMem, Machine, MailboxBuilder, PtBuilder, SimAgent, cpu};

const RAM: u64 = 128 << 20;
const SMRAM: (u64, u64) = (0x700_0000, 0x100_0000);
const TEXT: u64 = 0xFFFF_FFFF_9A00_0000;
const TEXT_PA: u64 = 0x200_0000;
const LSTAR: u64 = TEXT + 0xA0_0080;
/// Banner at text + 14 MiB + 512 KiB - 20: after the 2 MiB gap at
/// text + 12 MiB, straddling the first 512 KiB chunk boundary.
const BANNER_VA: u64 = TEXT + (14 << 20) + (512 << 10) - 20;
const BANNER: &str = "Linux version 6.1.0-sim (sim@host) (gcc 12) #1 SMP PREEMPT_DYNAMIC\n";
const KEY: [u8; 32] = [0x42; 32];

/// Guest RAM with the kernel text mapped by 2 MiB pages (one gap) and the
/// page-table root to use as CR3.
fn guest_ram() -> (FakeMem, u64) {
    let mut pt = PtBuilder::new(4, 0);
    for i in 0..16u64 {
        if i == 6 {
            continue; // text + 12 MiB .. + 14 MiB: freed gap, not present
        }
        pt.map(TEXT + (i << 21), TEXT_PA + (i << 21), 21);
    }
    let mut m = pt.mem;
    m.write(TEXT_PA + (BANNER_VA - TEXT), BANNER.as_bytes());
    // A decoy without the final NUL, and one in the unmapped gap.
    m.write(TEXT_PA + (13 << 20), b"Linux version decoy\n");
    m.write(TEXT_PA + (11 << 20), b"Linux version decoy\nX");
    (m, pt.root)
}

/// The simulated agent behind the injector: every SMI serves the mailbox
/// file through the contract's shared-memory trait.
struct FileAgent {
    mailbox: MailboxFile,
    agent: SimAgent,
}

impl SmiBackend for FileAgent {
    fn raise(&mut self) -> Result<(), SmiError> {
        self.agent.serve_checked(&self.mailbox);
        Ok(())
    }
    fn name(&self) -> &'static str {
        "sim"
    }
}

fn sim(name: &str, lstar: u64, smp: usize) -> (Injector, PathBuf) {
    let path = std::env::temp_dir().join(format!("ids-sim-{name}-{}", std::process::id()));
    MailboxBuilder::ready().write_file(&path).unwrap();
    let (mem, root) = guest_ram();
    let mut cpu0 = cpu(root, 4);
    cpu0.msr_lstar = lstar;
    let agent = SimAgent::new(mem, Machine::flat(RAM, SMRAM), Some(&KEY), [7; 16])
        .with_cpus(vec![cpu0; smp]);
    let mailbox = MailboxFile::open(&path).unwrap();
    agent.publish(&mailbox).unwrap();
    let backend = FileAgent { mailbox, agent };
    let inj = Injector::new(MailboxFile::open(&path).unwrap(), Box::new(backend));
    (inj, path)
}

fn session(name: &str) -> (Session, PathBuf) {
    let (inj, path) = sim(name, LSTAR, 2);
    (
        Session::with_injector(inj, &KEY, Duration::from_secs(5)).unwrap(),
        path,
    )
}

#[test]
fn banner_is_found_across_a_gap_and_a_chunk_boundary() {
    let (mut s, path) = session("banner");
    let b = kernel::find_banner(&mut s, BannerSearch::default()).unwrap();
    assert_eq!(b.text, BANNER);
    assert_eq!(b.addr, BANNER_VA);
    assert_eq!(b.lstar, LSTAR);
    assert!(b.bytes_read < 16 << 20, "read {:#x}", b.bytes_read);
    std::fs::remove_file(path).unwrap();
}

#[test]
fn banner_search_is_bounded_and_checks_lstar() {
    let (mut s, path) = session("bounded");
    let e = kernel::find_banner(
        &mut s,
        BannerSearch {
            limit: 2 << 20,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, KernelError::NotFound { .. }), "{e}");
    std::fs::remove_file(path).unwrap();
    let (inj, path) = sim("lstar", 0x40_0000, 1);
    let mut s = Session::with_injector(inj, &KEY, Duration::from_secs(5)).unwrap();
    let e = kernel::find_banner(&mut s, BannerSearch::default()).unwrap_err();
    assert!(
        e.to_string().contains("LSTAR must point into kernel text"),
        "{e}"
    );
    std::fs::remove_file(path).unwrap();
}

#[test]
fn reads_info_cpu_state_and_refusals() {
    let (mut s, path) = session("ops");
    let info = s.info().unwrap();
    assert!(info.authenticated);
    assert_eq!(info.header.cpu_count, 2);
    assert_eq!(info.header.smram_base, SMRAM.0);
    let st = s.cpu_state(1).unwrap();
    assert_eq!(st.msr_lstar, LSTAR);
    let e = s.cpu_state(2).unwrap_err();
    assert!(
        matches!(
            e,
            SessionError::Op {
                status: Status::BadRequest,
                ..
            }
        ),
        "{e}"
    );
    let phys = s
        .read_phys(TEXT_PA + (BANNER_VA - TEXT), BANNER.len())
        .unwrap();
    assert_eq!(phys, BANNER.as_bytes());
    let big = s.read_phys(0, 3 << 20).unwrap();
    assert_eq!(big.len(), 3 << 20);
    for addr in [SMRAM.0, SMRAM.0 + 0x8000, 0xFEE0_0000] {
        let e = s.read_phys(addr, 16).unwrap_err();
        assert!(
            matches!(
                e,
                SessionError::Op {
                    status: Status::RefusedSmram | Status::RefusedNotRam,
                    ..
                }
            ),
            "{addr:#x}: {e}"
        );
    }
    std::fs::remove_file(path).unwrap();
}

#[test]
fn tampered_and_replayed_replies_and_wrong_keys_are_rejected() {
    let (mut s, path) = session("attacks");
    let ops = [Op::CpuState { cpu: 0 }];
    // A byte flipped anywhere in the sealed reply.
    let frame = s.seal(&ops).unwrap();
    let t = s.carry(&frame).unwrap();
    let old = t.reply.clone();
    let mut flipped = t.reply.clone();
    flipped[40] ^= 1;
    let e = s.open(&flipped).unwrap_err();
    assert!(
        matches!(e, SessionError::Reply(ClientError::Crypto(_))),
        "{e}"
    );
    // The genuine reply still opens (the failed attempt did not consume it).
    s.open(&t.reply).unwrap();
    // The old reply offered for the next request.
    let frame = s.seal(&ops).unwrap();
    let _fresh = s.carry(&frame).unwrap();
    let e = s.open(&old).unwrap_err();
    assert!(
        matches!(e, SessionError::Reply(ClientError::WrongRequest { .. })),
        "{e}"
    );
    // Replaying an old request frame: the agent refuses it.
    let e = s.carry(&frame).unwrap_err();
    assert!(
        e.to_string().contains("replay") || e.to_string().contains("doorbell"),
        "{e}"
    );
    // A session with the wrong key: the agent says BadTag.
    let (inj, path2) = sim("wrongkey", LSTAR, 1);
    let mut bad = Session::with_injector(inj, &[0x43; 32], Duration::from_secs(5)).unwrap();
    let e = bad.request(&ops).unwrap_err();
    assert!(
        matches!(
            e,
            SessionError::Transact(TransactError::Rejected {
                status: Some(ServeStatus::BadTag),
                ..
            })
        ),
        "{e}"
    );
    // And the legitimate session goes on.
    assert_eq!(s.cpu_state(0).unwrap().msr_lstar, LSTAR);
    std::fs::remove_file(path).unwrap();
    std::fs::remove_file(path2).unwrap();
}
