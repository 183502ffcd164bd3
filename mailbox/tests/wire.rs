//! Round trips and fuzzing of the wire format, sealing and the client.

use proptest::prelude::*;
use smmvmi_mailbox::client::{Client, ClientError, parse_plain_reply};
use smmvmi_mailbox::crypto::{self, SessionKeys};
use smmvmi_mailbox::walk;
use smmvmi_mailbox::wire::*;

fn arb_space() -> impl Strategy<Value = AddressSpace> {
    (
        any::<u32>(),
        prop::option::of(any::<u64>()),
        prop::sample::select(vec![Pti::AsIs, Pti::Kernel, Pti::User]),
    )
        .prop_map(|(cpu, cr3, pti)| AddressSpace { cpu, cr3, pti })
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (arb_space(), any::<u64>(), any::<u32>()).prop_map(|(space, addr, len)| Op::ReadVirt {
            space,
            addr,
            len
        }),
        (any::<u64>(), any::<u32>()).prop_map(|(addr, len)| Op::ReadPhys { addr, len }),
        (arb_space(), any::<u64>()).prop_map(|(space, addr)| Op::Translate { space, addr }),
        any::<u32>().prop_map(|cpu| Op::CpuState { cpu }),
        Just(Op::Info),
        (
            arb_space(),
            any::<u64>(),
            any::<u16>(),
            1..=walk::MAX_WALK_ENTRIES,
            0..=walk::MAX_WALK_FIELDS as u32
        )
            .prop_map(|(space, head, link_offset, max_entries, field_count)| {
                Op::WalkList {
                    space,
                    head,
                    link_offset,
                    max_entries,
                    field_count,
                }
            }),
        (any::<u32>(), 1..=walk::MAX_FIELD_LEN, any::<Option<u32>>())
            .prop_map(|(offset, len, deref)| Op::Field(walk::Field { offset, len, deref })),
    ]
}

fn keys() -> SessionKeys {
    SessionKeys::derive(&[1; 32], &[2; 16])
}

/// A minimal agent built from the wire primitives: opens a request, answers
/// each op with `Ok` and 3 bytes of data, seals the reply.
fn echo_agent(request: &[u8], reply_seq: u64) -> Vec<u8> {
    let k = keys();
    let mut req = request.to_vec();
    let opened = crypto::open_in_place(&k, Direction::Request, &mut req).unwrap();
    let body = RequestBody::parse(&req[opened.body.clone()]).unwrap();
    let mut out = vec![0u8; 4096];
    let mut w = ReplyWriter::new(
        &mut out[FRAME_HEADER_LEN..4096 - TAG_LEN],
        opened.header.seq,
        &opened.tag,
        &body.ids_nonce,
        0,
    )
    .unwrap();
    for (kind, _) in body.ops() {
        w.push(kind, 3, |d| {
            d.copy_from_slice(b"abc");
            (Status::Ok, 0, 7, 3)
        });
    }
    let n = w.finish();
    let h = FrameHeader {
        direction: Direction::Reply,
        body_len: n as u32,
        seq: reply_seq,
        in_reply_to: opened.header.seq,
        flags: 0,
        client: 0,
    };
    let len = h.frame_len();
    crypto::seal_in_place(&k, &h, &mut out[..len]).unwrap();
    out.truncate(len);
    out
}

#[test]
fn client_round_trip_and_reply_replay() {
    let mut c = Client::new(keys(), 10);
    let req = c
        .seal_request_vec(&[Op::Info, Op::CpuState { cpu: 0 }], [5; 16])
        .unwrap();
    let reply = echo_agent(&req, 1);
    let results = c.open_reply_vec(&reply).unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0].data, b"abc");
    assert_eq!(
        c.open_reply_vec(&reply).unwrap_err(),
        ClientError::NoPending
    );
    // New request; the agent answers with a reply counter that went back.
    let req2 = c.seal_request_vec(&[Op::Info], [6; 16]).unwrap();
    let stale = echo_agent(&req2, 1);
    assert!(matches!(
        c.open_reply_vec(&stale),
        Err(ClientError::ReplayedReply { .. })
    ));
    let fresh = echo_agent(&req2, 2);
    c.open_reply_vec(&fresh).unwrap();
}

#[test]
fn plain_reply_is_not_accepted_as_sealed() {
    let mut c = Client::new(keys(), 1);
    let req = c.seal_request_vec(&[Op::Info], [5; 16]).unwrap();
    let mut reply = echo_agent(&req, 1);
    reply[2] = Direction::PlainReply as u8;
    assert_eq!(
        c.open_reply_vec(&reply).unwrap_err(),
        ClientError::Unauthenticated
    );
}

#[test]
fn info_and_cpu_state_round_trip() {
    let h = InfoHeader {
        agent_version: 0x10000,
        cpu_count: 2,
        sev_flags: SEV_ACTIVE,
        c_bit: 47,
        ram_range_count: 1,
        max_read: 4096,
        smram_base: 0x7F00_0000,
        smram_size: 0x100_0000,
        mem_flags: MEM_DIMM_HOTPLUG,
    };
    let ranges = [RamRange {
        base: 0,
        len: 0x8000_0000,
    }];
    let cpus = [
        InfoCpu {
            paging_levels: 4,
            flags: INFO_CPU_PCID,
        },
        InfoCpu {
            paging_levels: 5,
            flags: 0,
        },
    ];
    let mut buf = [0u8; 256];
    let n = encode_info(&h, ranges.iter().copied(), cpus.iter().copied(), &mut buf).unwrap();
    let info = Info::parse(&buf[..n]).unwrap();
    assert_eq!(info.header, h);
    assert_eq!(info.ram_ranges().collect::<Vec<_>>(), ranges);
    assert_eq!(info.cpus().collect::<Vec<_>>(), cpus);
    let cs = CpuState {
        rax: 1,
        msr_lstar: 0xFFFF_FFFF_8160_0080,
        msr_sysenter_eip: 9,
        ..Default::default()
    };
    let mut b = [0u8; CpuState::LEN];
    cs.encode(&mut b);
    assert_eq!(CpuState::decode(&b).unwrap(), cs);
}

proptest! {
    #[test]
    fn op_round_trip(op in arb_op()) {
        prop_assert_eq!(Op::decode(&op.encode()), Ok(op));
    }

    #[test]
    fn request_round_trip(ops in prop::collection::vec(arb_op(), 0..40), nonce in any::<[u8; 16]>(), seq in 1u64..u64::MAX) {
        let mut c = Client::new(keys(), seq);
        let frame = c.seal_request_vec(&ops, nonce).unwrap();
        let mut copy = frame.clone();
        let opened = crypto::open_in_place(&keys(), Direction::Request, &mut copy).unwrap();
        prop_assert_eq!(opened.header.seq, seq);
        let body = RequestBody::parse(&copy[opened.body]).unwrap();
        prop_assert_eq!(body.ids_nonce, nonce);
        let decoded: Vec<Op> = body.ops().map(|(_, o)| o.unwrap()).collect();
        prop_assert_eq!(decoded, ops);
    }

    #[test]
    fn request_any_flip_is_rejected(ops in prop::collection::vec(arb_op(), 1..4), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut c = Client::new(keys(), 3);
        let mut frame = c.seal_request_vec(&ops, [0; 16]).unwrap();
        let i = pos.index(frame.len());
        frame[i] ^= 1 << bit;
        prop_assert!(crypto::open_in_place(&keys(), Direction::Request, &mut frame).is_err());
    }

    #[test]
    fn reply_any_flip_is_rejected(pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut c = Client::new(keys(), 3);
        let req = c.seal_request_vec(&[Op::Info, Op::ReadPhys { addr: 0, len: 3 }], [8; 16]).unwrap();
        let mut reply = echo_agent(&req, 4);
        let i = pos.index(reply.len());
        reply[i] ^= 1 << bit;
        prop_assert!(c.open_reply_vec(&reply).is_err());
    }

    #[test]
    fn parsers_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = FrameHeader::parse(&bytes);
        let _ = FrameHeader::parse_bounded(&bytes, 300);
        let _ = RequestBody::parse(&bytes).map(|b| b.ops().count());
        if let Ok(r) = ReplyBody::parse(&bytes) {
            prop_assert_eq!(r.results().count(), r.result_count());
        }
        let _ = Info::parse(&bytes).map(|i| (i.ram_ranges().count(), i.cpus().count()));
        let _ = WalkRecord::decode(&bytes);
        let _ = CpuState::decode(&bytes);
        let _ = parse_plain_reply(&bytes);
        if bytes.len() >= OP_LEN {
            let _ = Op::decode(bytes[..OP_LEN].try_into().unwrap());
        }
        let mut m = bytes.clone();
        let _ = crypto::open_in_place(&keys(), Direction::Request, &mut m);
        let mut m = bytes.clone();
        let mut c = Client::new(keys(), 1);
        let _ = c.seal_request_vec(&[Op::Info], [0; 16]);
        let _ = c.open_reply(&mut m);
    }
}

/// The encoders produce exactly the bytes of the index-arithmetic encoders
/// they replaced (golden values recorded from the previous implementation).
#[test]
fn encodings_are_byte_identical_to_layout_v1() {
    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    let h = FrameHeader {
        direction: Direction::Reply,
        body_len: 0x1234,
        seq: 0x0102030405060708,
        in_reply_to: 0x1112131415161718,
        flags: 0,
        client: 0,
    };
    assert_eq!(
        hex(&h.encode()),
        "0100020034120000080706050403020118171615141312110000000000000000",
        "frame"
    );
    let op = Op::ReadVirt {
        space: AddressSpace {
            cpu: 3,
            cr3: Some(0xabc000),
            pti: Pti::User,
        },
        addr: 0xffff_8000_1234_5678,
        len: 0x400,
    };
    assert_eq!(
        hex(&op.encode()),
        "010500000300000000c0ab0000000000785634120080ffff0004000000000000",
        "op"
    );
    let walk = Op::WalkList {
        space: AddressSpace::kernel_of(1),
        head: 0xffff_ffff_82a1_b2c0,
        link_offset: 0x998,
        max_entries: 0x2000,
        field_count: 13,
    };
    assert_eq!(
        hex(&walk.encode()),
        "06029809010000000000000000000000c0b2a182ffffffff002000000d000000",
        "WALK_LIST: link offset at 0x02, field count at 0x1c"
    );
    let field = Op::Field(walk::Field {
        offset: 0x7d8,
        len: 4,
        deref: Some(0x18),
    });
    assert_eq!(
        hex(&field.encode()),
        "07010000000000001800000000000000d8070000000000000400000000000000",
        "FIELD through a pointer: pointer offset at 0x08"
    );
    let mut body = [0u8; 24 + 64];
    let n = encode_request_body(&[9; 16], &[op, Op::Info], &mut body).unwrap();
    assert_eq!(
        hex(&body[..n]),
        "090909090909090909090909090909090200000000000000010500000300000000c0ab0000000000785634120080ffff00040000000000000500000000000000000000000000000000000000000000000000000000000000",
        "req"
    );
    let mut out = [0u8; 128];
    let mut w = ReplyWriter::new(&mut out, 77, &[1; 16], &[2; 16], 0).unwrap();
    w.push(2, 5, |d| {
        d[..5].copy_from_slice(b"hello");
        (Status::NotPresent, 3, 0xdead, 5)
    });
    let n = w.finish();
    assert_eq!(
        hex(&out[..n]),
        "4d00000000000000010101010101010101010101010101010202020202020202020202020202020201000000000000000201030005000000adde00000000000068656c6c6f000000",
        "reply"
    );
    let mut wr = WalkRecord {
        va: 1,
        pa: 2,
        levels: 5,
        depth: 2,
        page_shift: 21,
        ..Default::default()
    };
    wr.entries[0] = (0x10, 0x20);
    wr.entries[4] = (0x30, 0x40);
    let mut b = [0u8; WALK_RECORD_LEN];
    wr.encode(&mut b);
    assert_eq!(
        hex(&b),
        "0100000000000000020000000000000005021500000000001000000000000000200000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000030000000000000004000000000000000",
        "walk"
    );
    let cs = CpuState {
        rax: 1,
        msr_sysenter_eip: 0x55,
        cr3: 0x77,
        ..Default::default()
    };
    let mut b = [0u8; CpuState::LEN];
    cs.encode(&mut b);
    assert_eq!(
        hex(&b),
        "0100000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000770000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000005500000000000000",
        "cpu"
    );
    let ih = InfoHeader {
        agent_version: 0x10000,
        cpu_count: 9,
        sev_flags: 1,
        c_bit: 47,
        ram_range_count: 9,
        max_read: 0x1000,
        smram_base: 0x7f000000,
        smram_size: 0x1000000,
        mem_flags: 0,
    };
    let mut b = [0u8; 128];
    let n = encode_info(
        &ih,
        [RamRange {
            base: 0x1000,
            len: 0x2000,
        }]
        .into_iter(),
        [
            InfoCpu {
                paging_levels: 5,
                flags: 1,
            },
            InfoCpu {
                paging_levels: 4,
                flags: 0,
            },
        ]
        .into_iter(),
        &mut b,
    )
    .unwrap();
    assert_eq!(
        hex(&b[..n]),
        "0000010002000000010000002f00000001000000001000000000007f00000000000000010000000000000000000000000010000000000000002000000000000005010000000000000400000000000000",
        "info"
    );
}
