//! The IDS and the host-injector against the real agent logic
//! (`smmvmi_agent::serve`) running over a real mailbox file and fake guest
//! RAM with real page tables: a KASLR'd kernel image with an unmapped
//! text/rodata gap and a banner cut by a chunk boundary.

use std::path::PathBuf;
use std::time::Duration;

use host_injector::{Injector, MailboxFile, SmiBackend, SmiError, TransactError};
use ids::kernel::{self, BannerSearch, KernelError};
use ids::session::{Session, SessionError};
use smmvmi_agent::{
    AgentState, CheckedPhys, CpuSnapshot, PhysMemory, PhysRange, RamMap, ServeContext, SevConfig,
};
use smmvmi_mailbox::client::ClientError;
use smmvmi_mailbox::layout::{self, Areas, ServeStatus};
use smmvmi_mailbox::wire::{Op, Status};

const RAM: usize = 128 << 20;
const SMRAM: (u64, u64) = (0x700_0000, 0x100_0000);
const PML4: u64 = 0x10000;
const PDPT: u64 = 0x11000;
const PD: u64 = 0x12000;
const TEXT: u64 = 0xFFFF_FFFF_9A00_0000;
const TEXT_PA: u64 = 0x200_0000;
const LSTAR: u64 = TEXT + 0xA0_0080;
/// Banner at text + 14 MiB + 512 KiB - 20: after the 2 MiB gap at
/// text + 12 MiB, straddling the first 512 KiB chunk boundary.
const BANNER_VA: u64 = TEXT + (14 << 20) + (512 << 10) - 20;
const BANNER: &str = "Linux version 6.1.0-sim (sim@host) (gcc 12) #1 SMP PREEMPT_DYNAMIC\n";
const KEY: [u8; 32] = [0x42; 32];

struct Mem(Vec<u8>);

impl PhysMemory for Mem {
    fn read(&self, range: CheckedPhys, buf: &mut [u8]) {
        let a = range.addr() as usize;
        let n = buf.len().min(range.len());
        buf[..n].copy_from_slice(&self.0[a..a + n]);
    }
}

fn guest_ram() -> Mem {
    let mut m = vec![0u8; RAM];
    let mut put =
        |pa: u64, v: u64| m[pa as usize..pa as usize + 8].copy_from_slice(&v.to_le_bytes());
    put(PML4 + 8 * 511, PDPT | 3);
    put(PDPT + 8 * ((TEXT >> 30) & 511), PD | 3);
    for i in 0..16u64 {
        if i == 6 {
            continue; // text + 12 MiB .. + 14 MiB: freed gap, not present
        }
        put(
            PD + 8 * (((TEXT >> 21) & 511) + i),
            (TEXT_PA + (i << 21)) | 0x83,
        );
    }
    let pa = (TEXT_PA + (BANNER_VA - TEXT)) as usize;
    m[pa..pa + BANNER.len()].copy_from_slice(BANNER.as_bytes());
    // A decoy without the final NUL, and one in the unmapped gap.
    let decoy = (TEXT_PA + (13 << 20)) as usize;
    m[decoy..decoy + 20].copy_from_slice(b"Linux version decoy\n");
    let decoy2 = (TEXT_PA + (11 << 20)) as usize;
    m[decoy2..decoy2 + 21].copy_from_slice(b"Linux version decoy\nX");
    Mem(m)
}

fn cpu(lstar: u64) -> CpuSnapshot {
    CpuSnapshot {
        cr0: 0x8005_0033,
        cr3: PML4,
        cr4: 0x6F0,
        efer: 0xD01,
        msrs_valid: 1,
        msr_lstar: lstar,
        ..Default::default()
    }
}

struct SimAgent {
    path: PathBuf,
    state: AgentState<'static>,
    ram: RamMap,
    cpus: Vec<CpuSnapshot>,
    mem: Mem,
    served: Vec<ServeStatus>,
}

impl SmiBackend for SimAgent {
    fn raise(&mut self) -> Result<(), SmiError> {
        let mut mb = std::fs::read(&self.path).map_err(|e| SmiError::Other(e.to_string()))?;
        let ctx = ServeContext {
            ram: &self.ram,
            smram: PhysRange::new(SMRAM.0, SMRAM.1).unwrap(),
            cpus: &self.cpus,
            sev: SevConfig::default(),
        };
        if let smmvmi_agent::Served::Answered(s) =
            smmvmi_agent::serve(&mut mb, &mut self.state, &ctx, &self.mem)
        {
            self.served.push(s);
        }
        std::fs::write(&self.path, &mb).map_err(|e| SmiError::Other(e.to_string()))
    }
    fn name(&self) -> &'static str {
        "sim"
    }
}

fn sim(name: &str, lstar: u64, smp: usize) -> (Injector, PathBuf) {
    let path = std::env::temp_dir().join(format!("ids-sim-{name}-{}", std::process::id()));
    let size = 1 << 20;
    let mut mb = vec![0u8; size];
    mb[..8].copy_from_slice(&layout::MAGIC);
    layout::write_u32(&mut mb, layout::OFF_VERSION, layout::VERSION);
    layout::write_u32(&mut mb, layout::OFF_STATE, layout::AgentState::Ready as u32);
    layout::write_u64(&mut mb, layout::OFF_FEATURES, layout::FEATURE_SMI_BROADCAST);
    let areas = Areas::from_size(size).unwrap();
    let req: &'static mut [u8] = Box::leak(vec![0u8; areas.request_capacity()].into_boxed_slice());
    let rep: &'static mut [u8] = Box::leak(vec![0u8; areas.reply_capacity()].into_boxed_slice());
    let state = AgentState::new(Some(&KEY), [7; 16], req, rep);
    state.publish(&mut mb);
    std::fs::write(&path, &mb).unwrap();
    let mut ram = RamMap::new();
    ram.push(0, RAM as u64).unwrap();
    let agent = SimAgent {
        path: path.clone(),
        state,
        ram,
        cpus: vec![cpu(lstar); smp],
        mem: guest_ram(),
        served: Vec::new(),
    };
    let inj = Injector::new(MailboxFile::open(&path).unwrap(), Box::new(agent));
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
        e.to_string().contains("Replay") || e.to_string().contains("doorbell"),
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
