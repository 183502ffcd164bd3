//! `serve` end to end on the host: IDS client -> mailbox -> agent -> mailbox -> client.

use proptest::prelude::*;
use smmvmi_agent::CpuSnapshot;
use smmvmi_agent::serve::{AgentState, ServeContext, Served, SevConfig, serve};
use smmvmi_mailbox::client::{self, Client, ClientError, Poll};
use smmvmi_mailbox::crypto::SessionKeys;
use smmvmi_mailbox::frame::FLAG_NO_SNAPSHOT;
use smmvmi_mailbox::layout::{self, Areas, ServeStatus};
use smmvmi_mailbox::shared::SharedMemory;
use smmvmi_mailbox::wire::{AddressSpace, CpuState, Info, Op, OpKind, Pti, Status, WalkRecord};
use smmvmi_testkit::memory::{MMIO, SMRAM, ram_map, smram};
use smmvmi_testkit::{BufferMailbox, MailboxBuilder, PtBuilder, cpu};

const KEY: [u8; 32] = [0x42; 32];
const SALT: [u8; 16] = [0x17; 16];
const MB: usize = 1 << 20;
const BANNER: &[u8] = b"Linux version 6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org)";
const BANNER_VA: u64 = 0xFFFF_FFFF_8200_0100;
const KERNEL_PA: u64 = 0x0200_0000;

struct World {
    mailbox: BufferMailbox,
    req_buf: Vec<u8>,
    reply_buf: Vec<u8>,
    pt: PtBuilder,
    cpus: Vec<CpuSnapshot>,
    ram: smmvmi_agent::RamMap,
    sev: SevConfig,
}

impl World {
    fn new(levels: u8, c_bit: u64) -> Self {
        let mut pt = PtBuilder::new(levels, c_bit);
        // Kernel text: a 2 MiB page; the banner crosses into a 4 KiB mapping
        // test elsewhere.
        pt.map(0xFFFF_FFFF_8200_0000, KERNEL_PA, 21);
        pt.mem.write(KERNEL_PA + 0x100, BANNER);
        // A 4 KiB page pointing into SMRAM, one into MMIO, one beyond RAM.
        pt.map(0xFFFF_C900_0000_0000, SMRAM.0, 12);
        pt.map(0xFFFF_C900_0000_1000, MMIO, 12);
        pt.map(0xFFFF_C900_0000_2000, 0x20_0000_0000, 12);
        // Two adjacent 4 KiB pages for a page-crossing read.
        pt.map(0xFFFF_C900_0001_0000, 0x0300_5000, 12);
        pt.map(0xFFFF_C900_0001_1000, 0x0300_1000, 12);
        pt.mem.write(0x0300_5FF8, b"ABCDEFGH");
        pt.mem.write(0x0300_1000, b"IJKLMNOP");
        let cr3 = pt.cr3();
        let cpus = vec![cpu(cr3, levels), cpu(cr3 | 0x1000, levels)];
        let mailbox = MailboxBuilder::new(MB).buffer();
        let areas = Areas::from_size(MB).unwrap();
        Self {
            mailbox,
            req_buf: vec![0; areas.request_capacity()],
            reply_buf: vec![0; areas.reply_capacity()],
            pt,
            cpus,
            ram: ram_map(),
            sev: SevConfig {
                active: c_bit != 0,
                c_bit: if c_bit != 0 {
                    c_bit.trailing_zeros() as u8
                } else {
                    0
                },
            },
        }
    }
}

/// Runs `f` with a live agent state over the world.
fn with_agent<R>(
    w: &mut World,
    key: Option<&[u8; 32]>,
    f: impl FnOnce(&mut Harness<'_, '_>) -> R,
) -> R {
    let mut req_buf = std::mem::take(&mut w.req_buf);
    let mut reply_buf = std::mem::take(&mut w.reply_buf);
    let state = AgentState::new(key, SALT, &mut req_buf, &mut reply_buf);
    let mut h = Harness {
        w,
        state,
        skipped: None,
    };
    let r = f(&mut h);
    drop(h);
    r
}

struct Harness<'w, 'b> {
    w: &'w mut World,
    state: AgentState<'b>,
    /// Serve as if the leader skipped the rendezvous (targeted SMI) for the
    /// request posted with this doorbell.
    skipped: Option<u64>,
}

impl Harness<'_, '_> {
    fn smi(&mut self) -> Served {
        let ctx = ServeContext {
            ram: &self.w.ram,
            smram: smram(),
            cpus: &self.w.cpus,
            sev: self.w.sev,
            mem_flags: 0,
            key_flags: 0,
            snapshot_skipped: self.skipped,
        };
        let r = serve(&self.w.mailbox, &mut self.state, &ctx, &self.w.pt.mem);
        self.w.pt.mem.assert_reads_safe();
        r
    }

    /// Posts `frame` with `doorbell`, raises the "SMI", returns the poll and
    /// a copy of the reply area.
    fn roundtrip(&mut self, frame: &[u8], doorbell: u64) -> (Poll, Vec<u8>) {
        client::post_request(&self.w.mailbox, frame, doorbell).unwrap();
        self.smi();
        let poll = client::poll_reply(&self.w.mailbox, doorbell).unwrap();
        let len = match poll {
            Poll::Done { reply_len, .. } => reply_len,
            Poll::Pending => 0,
        };
        let mut reply = vec![0u8; len];
        let n = client::copy_reply(&self.w.mailbox, &mut reply).unwrap();
        reply.truncate(n);
        (poll, reply)
    }
}

fn client() -> Client {
    Client::new(SessionKeys::derive(&KEY, &SALT), 1000)
}

fn kernel_read(addr: u64, len: u32) -> Op {
    Op::ReadVirt {
        space: AddressSpace::kernel_of(0),
        addr,
        len,
    }
}

#[test]
fn banner_and_every_op_round_trip() {
    for (levels, c_bit) in [(4u8, 0u64), (5, 0), (4, 1 << 47), (5, 1 << 51)] {
        let mut w = World::new(levels, c_bit);
        with_agent(&mut w, Some(&KEY), |h| {
            let mut c = client();
            let ops = [
                kernel_read(BANNER_VA, BANNER.len() as u32),
                // CPU 1 interrupted in user mode: PTI kernel choice clears bit 12.
                Op::ReadVirt {
                    space: AddressSpace::kernel_of(1),
                    addr: BANNER_VA,
                    len: 5,
                },
                Op::ReadPhys {
                    addr: KERNEL_PA + 0x100,
                    len: 5,
                },
                Op::Translate {
                    space: AddressSpace::kernel_of(0),
                    addr: BANNER_VA,
                },
                Op::CpuState { cpu: 1 },
                Op::Info,
                kernel_read(0xFFFF_C900_0001_0FF8, 16),
            ];
            let frame = c.seal_request_vec(&ops, [7; 16]).unwrap();
            let (poll, mut reply) = h.roundtrip(&frame, 1);
            assert_eq!(poll.status(), Some(ServeStatus::Ok));
            let body = c.open_reply(&mut reply).unwrap();
            let r: Vec<_> = body.results().collect();
            assert_eq!(r.len(), ops.len());
            assert!(r.iter().all(|r| r.status == Status::Ok), "{r:?}");
            assert_eq!(r[0].data, BANNER);
            assert_eq!(r[0].aux, BANNER_VA + BANNER.len() as u64);
            assert_eq!(r[1].data, &BANNER[..5]);
            assert_eq!(r[2].data, &BANNER[..5]);
            let walk = WalkRecord::decode(r[3].data).unwrap();
            assert_eq!(walk.pa, KERNEL_PA + 0x100);
            assert_eq!(r[3].aux, KERNEL_PA + 0x100);
            assert_eq!(
                (walk.levels, walk.page_shift, walk.depth),
                (levels, 21, levels - 1)
            );
            let cs = CpuState::decode(r[4].data).unwrap();
            assert_eq!(cs.msr_lstar, 0xFFFF_FFFF_8160_0080);
            assert_eq!(cs.cr3 & 0x1000, 0x1000);
            let info = Info::parse(r[5].data).unwrap();
            assert_eq!(info.header.cpu_count, 2);
            assert_eq!(info.header.smram_base, SMRAM.0);
            assert_eq!(info.header.sev_flags, u32::from(c_bit != 0));
            assert_eq!(info.ram_ranges().count(), 2);
            assert!(info.cpus().all(|c| c.paging_levels == levels));
            assert_eq!(r[6].data, b"ABCDEFGHIJKLMNOP");
        });
    }
}

#[test]
fn per_op_refusals() {
    let mut w = World::new(4, 0);
    with_agent(&mut w, Some(&KEY), |h| {
        let mut c = client();
        let ops = [
            kernel_read(0xFFFF_C900_0000_0000, 8), // page in SMRAM
            kernel_read(0xFFFF_C900_0000_1000, 8), // page in MMIO
            kernel_read(0xFFFF_C900_0000_2000, 8), // page beyond RAM
            kernel_read(0xFFFF_C900_0000_3000, 8), // not mapped
            kernel_read(0x0000_8000_0000_0000, 8), // non-canonical
            Op::ReadPhys {
                addr: SMRAM.0 + 0x10,
                len: 8,
            }, // TSEG
            Op::ReadPhys { addr: MMIO, len: 8 },
            Op::ReadPhys {
                addr: SMRAM.0 - 4,
                len: 8,
            }, // straddles into SMRAM
            Op::ReadPhys {
                addr: 0,
                len: u32::MAX,
            }, // too large
            Op::CpuState { cpu: 9 },   // no such CPU
            kernel_read(BANNER_VA, 0), // empty read is fine
            Op::ReadVirt {
                space: AddressSpace {
                    cpu: 0,
                    cr3: Some(SMRAM.0),
                    pti: Pti::AsIs,
                },
                addr: BANNER_VA,
                len: 8,
            },
        ];
        let frame = c.seal_request_vec(&ops, [1; 16]).unwrap();
        let (_, mut reply) = h.roundtrip(&frame, 5);
        let body = c.open_reply(&mut reply).unwrap();
        let r: Vec<_> = body
            .results()
            .map(|r| (r.status, r.level, r.data.len()))
            .collect();
        assert_eq!(
            r,
            vec![
                (Status::RefusedSmram, 0, 0),
                (Status::RefusedNotRam, 0, 0),
                (Status::RefusedNotRam, 0, 0),
                (Status::NotPresent, 1, 0),
                (Status::NonCanonical, 0, 0),
                (Status::RefusedSmram, 0, 0),
                (Status::RefusedNotRam, 0, 0),
                (Status::RefusedSmram, 0, 4), // the 4 bytes before SMRAM
                (Status::TooLarge, 0, 0),
                (Status::BadRequest, 0, 0),
                (Status::Ok, 0, 0),
                (Status::RefusedSmram, 4, 0),
            ]
        );
    });
}

#[test]
fn partial_read_returns_prefix() {
    let mut w = World::new(4, 0);
    w.pt.mem.write(0x0300_1FF0, b"0123456789abcdef");
    with_agent(&mut w, Some(&KEY), |h| {
        let mut c = client();
        // Second page (0x...11000 -> 0x03001000) mapped, third not.
        let frame = c
            .seal_request_vec(&[kernel_read(0xFFFF_C900_0001_1FF0, 32)], [2; 16])
            .unwrap();
        let (_, mut reply) = h.roundtrip(&frame, 9);
        let body = c.open_reply(&mut reply).unwrap();
        let r = body.results().next().unwrap();
        assert_eq!(r.status, Status::NotPresent);
        assert_eq!(r.data, b"0123456789abcdef");
        assert_eq!(r.aux, 0xFFFF_C900_0001_2000);
    });
}

#[test]
fn replayed_and_tampered_requests_are_rejected() {
    let mut w = World::new(4, 0);
    with_agent(&mut w, Some(&KEY), |h| {
        let mut c = client();
        let first = c.seal_request_vec(&[Op::Info], [3; 16]).unwrap();
        let (poll, mut reply) = h.roundtrip(&first, 1);
        assert_eq!(poll.status(), Some(ServeStatus::Ok));
        c.open_reply(&mut reply).unwrap();
        // Same request again, new doorbell: replay.
        let (poll, _) = h.roundtrip(&first, 2);
        assert_eq!(poll.status(), Some(ServeStatus::Replay));
        // Same doorbell again: the agent stays idle.
        assert_eq!(h.smi(), Served::Idle);
        // A fresh request with one byte flipped anywhere is rejected.
        let good = c.seal_request_vec(&[Op::Info], [4; 16]).unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            let (poll, _) = h.roundtrip(&bad, 100 + i as u64);
            assert_ne!(poll.status(), Some(ServeStatus::Ok), "flip at {i} accepted");
        }
        // The untouched request still works afterwards.
        let (poll, mut reply) = h.roundtrip(&good, 99_999);
        assert_eq!(poll.status(), Some(ServeStatus::Ok));
        c.open_reply(&mut reply).unwrap();
    });
}

#[test]
fn client_rejects_replayed_reordered_and_tampered_replies() {
    let mut w = World::new(4, 0);
    with_agent(&mut w, Some(&KEY), |h| {
        let mut c = client();
        let f1 = c
            .seal_request_vec(&[kernel_read(BANNER_VA, 8)], [1; 16])
            .unwrap();
        let (_, reply1) = h.roundtrip(&f1, 1);
        // Before opening reply 1, the IDS moves on to request 2: reply 1 is stale.
        let f2 = c
            .seal_request_vec(&[kernel_read(BANNER_VA, 8)], [2; 16])
            .unwrap();
        assert!(matches!(
            c.open_reply(&mut reply1.clone()),
            Err(ClientError::WrongRequest { .. })
        ));
        let (_, reply2) = h.roundtrip(&f2, 2);
        // Every single-byte flip of reply 2 is rejected.
        let n = smmvmi_mailbox::wire::FrameHeader::parse(&reply2)
            .unwrap()
            .frame_len();
        for i in 0..n {
            let mut bad = reply2.clone();
            bad[i] ^= 0x80;
            assert!(c.open_reply(&mut bad).is_err(), "flip at {i} accepted");
        }
        c.open_reply(&mut reply2.clone()).unwrap();
        // Replaying reply 2 (no request pending) and replaying it for a new
        // request are both rejected.
        assert_eq!(
            c.open_reply(&mut reply2.clone()).unwrap_err(),
            ClientError::NoPending
        );
        let _f3 = c.seal_request_vec(&[Op::Info], [3; 16]).unwrap();
        assert!(c.open_reply(&mut reply2.clone()).is_err());
        // Reply 1 forged to claim it answers request 3: its sequence is old.
        let mut forged = reply1.clone();
        forged[16..24].copy_from_slice(&c.pending_seq().unwrap().to_le_bytes());
        assert!(matches!(
            c.open_reply(&mut forged),
            Err(ClientError::ReplayedReply { .. })
        ));
        // ... and with a fresh-looking sequence it fails authentication.
        forged[8..16].copy_from_slice(&1_000_000u64.to_le_bytes());
        assert!(matches!(
            c.open_reply(&mut forged),
            Err(ClientError::Crypto(_))
        ));
    });
}

#[test]
fn unprovisioned_agent_answers_plain_info_only() {
    let mut w = World::new(5, 0);
    with_agent(&mut w, None, |h| {
        let mut buf = [0u8; 128];
        let n = client::encode_plain_info_request(&mut buf).unwrap();
        let (poll, reply) = h.roundtrip(&buf[..n], 1);
        assert_eq!(poll.status(), Some(ServeStatus::Unprovisioned));
        let body = client::parse_plain_reply(&reply).unwrap();
        assert_eq!(
            body.flags & smmvmi_mailbox::wire::REPLY_FLAG_UNAUTHENTICATED,
            1
        );
        let r = body.results().next().unwrap();
        assert_eq!(r.kind, OpKind::Info as u8);
        let info = Info::parse(r.data).unwrap();
        assert_eq!(info.header.cpu_count, 2);
        assert!(info.cpus().all(|c| c.paging_levels == 5));
        // A sealed-looking request gets the same plain INFO, never data.
        let mut c = client();
        let f = c
            .seal_request_vec(&[kernel_read(BANNER_VA, 8)], [0; 16])
            .unwrap();
        let (poll, mut reply) = h.roundtrip(&f, 2);
        assert_eq!(poll.status(), Some(ServeStatus::Unprovisioned));
        assert_eq!(
            c.open_reply(&mut reply).unwrap_err(),
            ClientError::Unauthenticated
        );
    });
    // A provisioned agent refuses plain requests.
    let mut w = World::new(4, 0);
    with_agent(&mut w, Some(&KEY), |h| {
        let mut buf = [0u8; 128];
        let n = client::encode_plain_info_request(&mut buf).unwrap();
        let (poll, _) = h.roundtrip(&buf[..n], 1);
        assert_eq!(poll.status(), Some(ServeStatus::SealedRequired));
    });
}

#[test]
fn batch_larger_than_reply_is_bounded() {
    let mut w = World::new(4, 0);
    with_agent(&mut w, Some(&KEY), |h| {
        let mut c = client();
        let areas = Areas::from_size(MB).unwrap();
        let max = smmvmi_agent::serve::max_read_for(areas.reply_capacity()) as u32;
        // One maximal read fits; two do not: the second gets TooLarge.
        let ops = [
            Op::ReadPhys {
                addr: 0x10_0000,
                len: max,
            },
            Op::ReadPhys {
                addr: 0x10_0000,
                len: 8,
            },
        ];
        let f = c.seal_request_vec(&ops, [5; 16]).unwrap();
        let (poll, mut reply) = h.roundtrip(&f, 1);
        assert_eq!(poll.status(), Some(ServeStatus::Ok));
        let body = c.open_reply(&mut reply).unwrap();
        let r: Vec<_> = body.results().map(|r| (r.status, r.data.len())).collect();
        assert_eq!(r[0], (Status::Ok, max as usize));
        assert_eq!(r.len(), 1, "no room left even for a result header");
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary request-area bytes and doorbells: `serve` never panics,
    /// never reads outside RAM (checked by the fake memory), and never
    /// claims a reply longer than the reply area.
    #[test]
    fn serve_survives_garbage(
        provisioned in any::<bool>(),
        bytes in prop::collection::vec(any::<u8>(), 0..4096),
        header_junk in prop::collection::vec(any::<u8>(), 0x100),
        doorbell in 1u64..,
    ) {
        let w = &mut World::new(4, 0);
        w.mailbox.copy_in(0, &header_junk).unwrap();
        let start = Areas::from_size(MB).unwrap().request.start;
        w.mailbox.copy_in(start, &bytes).unwrap();
        w.mailbox.store_u64(layout::OFF_REQ_DOORBELL, doorbell).unwrap();
        let key = provisioned.then_some(KEY);
        with_agent(w, key.as_ref(), |h| {
            let served = h.smi();
            prop_assert!(matches!(served, Served::Answered(_)));
            let len = h.w.mailbox.load_u32(layout::OFF_REPLY_LEN).unwrap() as usize;
            prop_assert!(len <= Areas::from_size(MB).unwrap().reply_capacity());
            Ok(())
        })?;
    }

    /// A valid sealed header with a garbage body and arbitrary op fields:
    /// the agent either rejects the frame or answers every op it can, and
    /// every memory read stays in RAM.
    #[test]
    fn serve_survives_authentic_garbage_ops(
        ops in prop::collection::vec(
            (1u8..=5, 0u8..8, 0u32..3, any::<u64>(), any::<u64>(), any::<u32>()),
            1..16,
        ),
    ) {
        let mut w = World::new(5, 1 << 47);
        with_agent(&mut w, Some(&KEY), |h| {
            let mut c = client();
            let ops: Vec<Op> = ops
                .iter()
                .filter_map(|&(kind, flags, cpu, cr3, addr, len)| {
                    let mut raw = [0u8; 32];
                    raw[0] = kind;
                    raw[1] = flags & 0b111;
                    raw[4..8].copy_from_slice(&cpu.to_le_bytes());
                    if flags & 1 != 0 { raw[8..16].copy_from_slice(&cr3.to_le_bytes()); }
                    raw[16..24].copy_from_slice(&addr.to_le_bytes());
                    raw[24..28].copy_from_slice(&(len % 0x3000).to_le_bytes());
                    Op::decode(&raw).ok()
                })
                .collect();
            let f = c.seal_request_vec(&ops, [9; 16]).unwrap();
            let (poll, mut reply) = h.roundtrip(&f, 1);
            prop_assert_eq!(poll.status(), Some(ServeStatus::Ok));
            let body = c.open_reply(&mut reply).unwrap();
            prop_assert_eq!(body.result_count(), ops.len());
            Ok(())
        })?;
    }
}

#[test]
fn agent_state_is_small() {
    // The firmware keeps it in SMRAM; it must not be a large stack object.
    let n = std::mem::size_of::<AgentState<'static>>();
    assert!(n < 8192, "AgentState is {n} bytes");
}

#[test]
fn cpu_absent_from_the_session_is_reported_not_guessed() {
    let mut w = World::new(4, 0);
    // CPU 1 did not reach SMM for this batch: the firmware hands a zeroed
    // snapshot (no MSRs read), which must not be walked as if it were real.
    w.cpus[1] = CpuSnapshot::default();
    with_agent(&mut w, Some(&KEY), |h| {
        let mut c = client();
        let ops = [
            Op::ReadVirt {
                space: AddressSpace::kernel_of(1),
                addr: BANNER_VA,
                len: 8,
            },
            Op::CpuState { cpu: 1 },
            kernel_read(BANNER_VA, 8),
        ];
        let frame = c.seal_request_vec(&ops, [2; 16]).unwrap();
        let (_, mut reply) = h.roundtrip(&frame, 9);
        let body = c.open_reply(&mut reply).unwrap();
        let r: Vec<_> = body.results().map(|r| (r.status, r.data.len())).collect();
        assert_eq!(
            r,
            vec![
                (Status::CpuNotInSmm, 0),
                (Status::CpuNotInSmm, 0),
                (Status::Ok, 8)
            ]
        );
    });
}

/// Many IDS clients share one agent (through the daemon): each has its own
/// keys (derived for its id), interleaved requests are all served, a reply
/// opens only for the client it answers, and a replay of any client's
/// request is refused.
#[test]
fn interleaved_clients_each_get_their_own_replies() {
    let mut w = World::new(4, 0);
    with_agent(&mut w, Some(&KEY), |h| {
        let mut clients: Vec<Client> = (0..8u64)
            .map(|i| Client::new(SessionKeys::derive_for(&KEY, &SALT, 0xC0FFEE + i), 5000 + i))
            .collect();
        let mut doorbell = 1;
        let mut sent = Vec::new();
        for round in 0..20u8 {
            for (i, c) in clients.iter_mut().enumerate() {
                let frame = c.seal_request_vec(&[Op::Info], [round; 16]).unwrap();
                let (poll, mut reply) = h.roundtrip(&frame, doorbell);
                doorbell += 1;
                assert_eq!(
                    poll.status(),
                    Some(ServeStatus::Ok),
                    "client {i} round {round}"
                );
                c.open_reply(&mut reply).unwrap();
                sent.push(frame);
            }
        }
        // A reply sealed for client 0 does not open for client 1.
        let frame = clients[0].seal_request_vec(&[Op::Info], [9; 16]).unwrap();
        let (_, mut reply) = h.roundtrip(&frame, doorbell);
        doorbell += 1;
        clients[1].seal_request_vec(&[Op::Info], [9; 16]).unwrap();
        assert!(clients[1].open_reply(&mut reply).is_err());
        // Every request sent is refused when replayed.
        for frame in sent.iter().step_by(7) {
            let (poll, _) = h.roundtrip(frame, doorbell);
            doorbell += 1;
            assert_eq!(poll.status(), Some(ServeStatus::Replay));
        }
    });
}

/// A request served without the rendezvous must say so in its
/// authenticated flags; otherwise the agent refuses it (the guest changed the
/// flag the firmware read before authentication) and the client sends it
/// again (review finding).
#[test]
fn a_snapshot_request_served_without_one_is_refused() {
    let mut w = World::new(4, 0);
    with_agent(&mut w, Some(&KEY), |h| {
        let mut c = client();
        h.skipped = Some(1);
        let frame = c.seal_request_vec(&[Op::Info], [1; 16]).unwrap();
        let (poll, _) = h.roundtrip(&frame, 1);
        assert_eq!(poll.status(), Some(ServeStatus::SnapshotMissed));
        // With the flag sealed in, the same kind of SMI serves it.
        let mut out = vec![0u8; Client::request_frame_len(1)];
        let n = c
            .seal_request_with(&[Op::Info], [2; 16], FLAG_NO_SNAPSHOT, &mut out)
            .unwrap();
        h.skipped = Some(2);
        let (poll, mut reply) = h.roundtrip(&out[..n], 2);
        assert_eq!(poll.status(), Some(ServeStatus::Ok));
        c.open_reply(&mut reply).unwrap();
        // A skip decided for another request serves nothing in this SMI.
        h.skipped = Some(77);
        let n = c
            .seal_request_with(&[Op::Info], [4; 16], FLAG_NO_SNAPSHOT, &mut out)
            .unwrap();
        client::post_request(&h.w.mailbox, &out[..n], 4).unwrap();
        assert_eq!(h.smi(), Served::Idle);
        // And a broadcast SMI serves a flagged request too.
        h.skipped = None;
        let n = c
            .seal_request_with(&[Op::Info], [3; 16], FLAG_NO_SNAPSHOT, &mut out)
            .unwrap();
        let (poll, _) = h.roundtrip(&out[..n], 3);
        assert_eq!(poll.status(), Some(ServeStatus::Ok));
    });
}

/// A list of three containers in one 4 KiB page (head at +0, containers at
/// +0x100, +0x200, +0x300, link at +0x10, id at +0x20, a pointer at +0x30).
const LIST_VA: u64 = 0xFFFF_C900_0002_0000;
const LIST_PA: u64 = 0x0300_8000;

fn build_list(w: &mut World, ptr: [u64; 3], last_next: u64) {
    w.pt.map(LIST_VA, LIST_PA, 12);
    let put = |w: &mut World, off: u64, v: u64| w.pt.mem.write(LIST_PA + off, &v.to_le_bytes());
    put(w, 0, LIST_VA + 0x110);
    for i in 0..3u64 {
        let c = 0x100 * (i + 1);
        let next = if i == 2 {
            last_next
        } else {
            LIST_VA + c + 0x110
        };
        put(w, c + 0x10, next);
        put(w, c + 0x20, 40 + i);
        put(w, c + 0x30, ptr[i as usize]);
    }
}

fn walk_ops(max_entries: u32) -> Vec<Op> {
    use smmvmi_mailbox::walk::Field;
    vec![
        Op::WalkList {
            space: AddressSpace::kernel_of(0),
            head: LIST_VA,
            link_offset: 0x10,
            max_entries,
            field_count: 2,
        },
        Op::Field(Field {
            offset: 0x20,
            len: 8,
            deref: None,
        }),
        // Through the pointer at +0x30: 4 bytes at pointer + 4.
        Op::Field(Field {
            offset: 0x30,
            len: 4,
            deref: Some(4),
        }),
    ]
}

#[test]
fn walk_list_follows_the_chain_and_guards_every_pointer() {
    use smmvmi_mailbox::walk::{self, Field};
    let mut w = World::new(4, 0);
    // Container 2's pointer leads into SMRAM; the others into the banner.
    build_list(
        &mut w,
        [BANNER_VA, 0xFFFF_C900_0000_0000, BANNER_VA + 8],
        LIST_VA,
    );
    let fields: Vec<Field> = walk_ops(1)[1..]
        .iter()
        .map(|o| match o {
            Op::Field(f) => *f,
            _ => unreachable!(),
        })
        .collect();
    with_agent(&mut w, Some(&KEY), |h| {
        let mut c = client();
        let ops = walk_ops(100);
        let frame = c.seal_request_vec(&ops, [1; 16]).unwrap();
        let (poll, mut reply) = h.roundtrip(&frame, 1);
        assert_eq!(poll.status(), Some(ServeStatus::Ok));
        let body = c.open_reply(&mut reply).unwrap();
        let r: Vec<_> = body.results().collect();
        assert_eq!(r.len(), 3, "one result per op, FIELDs included");
        assert_eq!((r[0].status, r[0].aux), (Status::Ok, 3));
        assert!(
            r[1..]
                .iter()
                .all(|f| f.status == Status::Ok && f.data.is_empty())
        );
        let es: Vec<_> = walk::entries(r[0].data, &fields).collect();
        assert_eq!(es.len(), 3);
        for (i, e) in es.iter().enumerate() {
            assert_eq!(e.container, LIST_VA + 0x100 * (i as u64 + 1));
            assert_eq!(e.fields[0], 40 + i as u8);
        }
        // "Linux version ...": bytes 4..8 and 12..16 of the banner.
        assert_eq!(&es[0].fields[8..12], &BANNER[4..8]);
        assert_eq!((es[1].faults, &es[1].fields[8..12]), (0b10, &[0u8; 4][..]));
        assert_eq!(&es[2].fields[8..12], &BANNER[12..16]);

        // The entry limit stops the walk, and says so.
        let frame = c.seal_request_vec(&walk_ops(2), [2; 16]).unwrap();
        let (_, mut reply) = h.roundtrip(&frame, 2);
        let body = c.open_reply(&mut reply).unwrap();
        let r: Vec<_> = body.results().collect();
        assert_eq!((r[0].status, r[0].aux), (Status::TooLarge, 2));
    });

    // A `next` into SMRAM ends the walk with the refusal, after what was read.
    let mut w = World::new(4, 0);
    build_list(&mut w, [BANNER_VA; 3], 0xFFFF_C900_0000_0000 + 0x10);
    with_agent(&mut w, Some(&KEY), |h| {
        let mut c = client();
        let frame = c.seal_request_vec(&walk_ops(100), [3; 16]).unwrap();
        let (_, mut reply) = h.roundtrip(&frame, 1);
        let body = c.open_reply(&mut reply).unwrap();
        let r: Vec<_> = body.results().collect();
        // Three entries, then the container "in SMRAM" whose fields fault,
        // then its next is refused.
        assert_eq!((r[0].status, r[0].aux), (Status::RefusedSmram, 4));
        let es: Vec<_> = walk::entries(r[0].data, &fields).collect();
        assert_eq!(es[3].faults, 0b11);
    });
}

#[test]
fn walk_list_without_its_fields_and_orphan_fields_are_refused() {
    let mut w = World::new(4, 0);
    build_list(&mut w, [BANNER_VA; 3], LIST_VA);
    with_agent(&mut w, Some(&KEY), |h| {
        let mut c = client();
        let mut ops = walk_ops(100);
        // The second FIELD replaced by a READ: the walk and what it consumed
        // are refused; the op after them still runs.
        ops[2] = kernel_read(BANNER_VA, 5);
        ops.push(ops[1]);
        ops.push(kernel_read(BANNER_VA, 5));
        let frame = c.seal_request_vec(&ops, [4; 16]).unwrap();
        let (_, mut reply) = h.roundtrip(&frame, 1);
        let body = c.open_reply(&mut reply).unwrap();
        let st: Vec<_> = body.results().map(|r| r.status).collect();
        assert_eq!(
            st,
            [
                Status::BadRequest,
                Status::BadRequest,
                Status::BadRequest,
                Status::BadRequest,
                Status::Ok
            ]
        );
    });
}

#[test]
fn walk_list_consumes_only_the_ops_there_are_and_answers_each_once() {
    let mut w = World::new(4, 0);
    build_list(&mut w, [BANNER_VA; 3], LIST_VA);
    with_agent(&mut w, Some(&KEY), |h| {
        let mut c = client();
        // Claims 16 FIELDs, has 1.
        let mut ops = walk_ops(10);
        if let Op::WalkList { field_count, .. } = &mut ops[0] {
            *field_count = 16;
        }
        ops.truncate(2);
        let frame = c.seal_request_vec(&ops, [5; 16]).unwrap();
        let (_, mut reply) = h.roundtrip(&frame, 1);
        let body = c.open_reply(&mut reply).unwrap();
        let r: Vec<_> = body.results().map(|r| (r.kind, r.status)).collect();
        assert_eq!(
            r,
            [
                (OpKind::WalkList as u8, Status::BadRequest),
                (OpKind::Field as u8, Status::BadRequest)
            ]
        );
    });
}

/// A list whose last entry links back to its first (it never returns to
/// the head), with `fields`.
fn looping_list(w: &mut World, fields: &[smmvmi_mailbox::walk::Field], max: u32) -> Vec<Op> {
    build_list(w, [BANNER_VA; 3], LIST_VA + 0x110);
    let mut ops = vec![Op::WalkList {
        space: AddressSpace::kernel_of(0),
        head: LIST_VA,
        link_offset: 0x10,
        max_entries: max,
        field_count: fields.len() as u32,
    }];
    ops.extend(fields.iter().map(|f| Op::Field(*f)));
    ops
}

#[test]
fn a_walk_cut_by_the_reply_room_still_answers_its_fields() {
    use smmvmi_mailbox::walk::{Field, MAX_FIELD_LEN, MAX_WALK_ENTRIES, MAX_WALK_FIELDS};
    let mut w = World::new(4, 0);
    let big = Field {
        offset: 0,
        len: MAX_FIELD_LEN,
        deref: None,
    };
    let ops = looping_list(&mut w, &[big; MAX_WALK_FIELDS], MAX_WALK_ENTRIES);
    with_agent(&mut w, Some(&KEY), |h| {
        let mut c = client();
        let frame = c.seal_request_vec(&ops, [6; 16]).unwrap();
        let (poll, mut reply) = h.roundtrip(&frame, 1);
        assert_eq!(poll.status(), Some(ServeStatus::Ok));
        let body = c.open_reply(&mut reply).unwrap();
        let r: Vec<_> = body.results().collect();
        assert_eq!(r.len(), ops.len(), "one result per op");
        assert_eq!(r[0].status, Status::TooLarge);
        assert!(r[0].aux > 10 && r[0].aux < u64::from(MAX_WALK_ENTRIES));
    });
}

#[test]
fn a_walk_that_thrashes_the_tlb_stops_at_the_work_budget() {
    use smmvmi_mailbox::walk::{Field, MAX_WALK_ENTRIES, MAX_WALK_FIELDS, WORK_BUDGET};
    let mut w = World::new(5, 0);
    // 16 pointers per container, each to its own 4 KiB page: with 16
    // fields through pointers plus the list page the 16-entry TLB misses
    // on every read.
    let fields: Vec<Field> = (0..MAX_WALK_FIELDS as u32)
        .map(|i| Field {
            offset: 0x40 + 8 * i,
            len: 1,
            deref: Some(0),
        })
        .collect();
    let ops = looping_list(&mut w, &fields, MAX_WALK_ENTRIES);
    for i in 0..MAX_WALK_FIELDS as u64 {
        let va = 0xFFFF_C900_0100_0000 + 0x1000 * i;
        w.pt.map(va, 0x0310_0000 + 0x1000 * i, 12);
        for c in 1..=3u64 {
            w.pt.mem
                .write(LIST_PA + 0x100 * c + 0x40 + 8 * i, &va.to_le_bytes());
        }
    }
    with_agent(&mut w, Some(&KEY), |h| {
        let mut c = client();
        let frame = c.seal_request_vec(&ops, [7; 16]).unwrap();
        let (_, mut reply) = h.roundtrip(&frame, 1);
        let body = c.open_reply(&mut reply).unwrap();
        let r: Vec<_> = body.results().collect();
        assert_eq!(r.len(), ops.len());
        assert_eq!(r[0].status, Status::WorkLimit);
        // Each entry costs at least 16 table walks of 5 reads.
        let most = u64::from(WORK_BUDGET) / (16 * 5);
        assert!(r[0].aux > 10 && r[0].aux <= most, "{} entries", r[0].aux);
        let reads = h.w.pt.mem.reads.borrow().len();
        assert!(
            reads <= 2 * WORK_BUDGET as usize,
            "{reads} physical reads for a budget of {WORK_BUDGET}"
        );
    });
}
