use super::*;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::string::ToString;
use std::vec;
use std::vec::Vec;

/// BAR as the fake device implements it.
#[derive(Debug, Clone, Copy)]
enum FakeBar {
    None,
    Io(u32),
    Mem32(u32),
    /// Occupies two slots.
    Mem64(u64),
}

#[derive(Debug, Clone)]
struct FakeFn {
    regs: [u32; 64],
    /// Writable-bit masks of the six BAR slots.
    masks: [u32; 6],
    /// Read-only low flag bits of the six BAR slots.
    flags: [u32; 6],
}

impl FakeFn {
    fn new(vendor: u16, device: u16, header: u8, bars: &[FakeBar]) -> Self {
        let mut f = Self {
            regs: [0; 64],
            masks: [0; 6],
            flags: [0; 6],
        };
        f.regs[0] = u32::from(vendor) | (u32::from(device) << 16);
        f.regs[3] = u32::from(header) << 16;
        f.regs[1] = 0x0010_0007; // status + decoding on, as after reset by another firmware
        let mut slot = 0;
        for b in bars {
            match *b {
                FakeBar::None => slot += 1,
                FakeBar::Io(size) => {
                    f.masks[slot] = !(size - 1) & 0xFFFF_FFFC;
                    f.flags[slot] = 1;
                    slot += 1;
                }
                FakeBar::Mem32(size) => {
                    f.masks[slot] = !(size - 1) & 0xFFFF_FFF0;
                    f.flags[slot] = 0x8; // prefetchable
                    slot += 1;
                }
                FakeBar::Mem64(size) => {
                    let m = !(size - 1);
                    f.masks[slot] = (m as u32) & 0xFFFF_FFF0;
                    f.flags[slot] = 0x4 | 0x8;
                    f.masks[slot + 1] = (m >> 32) as u32;
                    slot += 2;
                }
            }
        }
        for i in 0..6 {
            f.regs[4 + i] = f.flags[i];
        }
        f
    }
}

#[derive(Default)]
struct FakeBus {
    fns: BTreeMap<Bdf, FakeFn>,
    /// Count of config writes while decoding was on during sizing.
    sized_while_decoding: usize,
}

impl PciConfig for FakeBus {
    fn read32(&mut self, bdf: Bdf, off: u8) -> u32 {
        self.fns
            .get(&bdf)
            .map_or(0xFFFF_FFFF, |f| f.regs[usize::from(off / 4)])
    }
    fn write32(&mut self, bdf: Bdf, off: u8, v: u32) {
        let Some(f) = self.fns.get_mut(&bdf) else {
            return;
        };
        let i = usize::from(off / 4);
        match i {
            0 | 2 | 3 => {}
            4..=9 => {
                if v == 0xFFFF_FFFF && f.regs[1] & 3 != 0 {
                    self.sized_while_decoding += 1;
                }
                f.regs[i] = (v & f.masks[i - 4]) | f.flags[i - 4];
            }
            _ => f.regs[i] = v,
        }
    }
}

fn q35_bus() -> FakeBus {
    let mut bus = FakeBus::default();
    // Host bridge and LPC: no BARs.
    bus.fns
        .insert(Bdf::new(0, 0), FakeFn::new(0x8086, 0x29C0, 0, &[]));
    // VGA: 16 MiB prefetchable mem, mmio 4 KiB.
    bus.fns.insert(
        Bdf::new(1, 0),
        FakeFn::new(
            0x1234,
            0x1111,
            0,
            &[
                FakeBar::Mem32(16 << 20),
                FakeBar::None,
                FakeBar::Mem32(4096),
            ],
        ),
    );
    // virtio-net: IO 32, mem 4 KiB, 64-bit 16 KiB at BAR4.
    bus.fns.insert(
        Bdf::new(2, 0),
        FakeFn::new(
            0x1af4,
            0x1000,
            0,
            &[
                FakeBar::Io(32),
                FakeBar::Mem32(4096),
                FakeBar::None,
                FakeBar::None,
                FakeBar::Mem64(16384),
            ],
        ),
    );
    // ivshmem-plain: BAR0 256 B registers, BAR2 64-bit 1 MiB shared memory.
    bus.fns.insert(
        Bdf::new(3, 0),
        FakeFn::new(
            0x1af4,
            0x1110,
            0,
            &[FakeBar::Mem32(256), FakeBar::None, FakeBar::Mem64(1 << 20)],
        ),
    );
    // Multifunction device: func 0 and 2; func 1 absent.
    bus.fns.insert(
        Bdf::new(4, 0),
        FakeFn::new(0x8086, 0x2922, 0x80, &[FakeBar::Io(16)]),
    );
    bus.fns.insert(
        Bdf::new(4, 2),
        FakeFn::new(0x8086, 0x2930, 0, &[FakeBar::Mem32(8192)]),
    );
    // A function > 0 on a single-function device must be ignored.
    bus.fns
        .insert(Bdf::new(5, 0), FakeFn::new(0x1b36, 0x0001, 0, &[]));
    bus.fns.insert(
        Bdf::new(5, 1),
        FakeFn::new(0xdead, 0xbeef, 0, &[FakeBar::Mem32(4096)]),
    );
    // A PCI bridge (type 1): skipped.
    bus.fns
        .insert(Bdf::new(6, 0), FakeFn::new(0x1b36, 0x000c, 1, &[]));
    bus
}

fn q35_windows() -> Windows {
    Windows {
        mem_hole: Some((0xB000_0000, 0xC000_0000)),
        ..Windows::default()
    }
}

#[test]
fn assigns_q35_like_bus() {
    let mut bus = q35_bus();
    let a = assign(&mut bus, &q35_windows()).unwrap();
    assert_eq!(bus.sized_while_decoding, 0);
    let iv = a.find(0x1af4, 0x1110, 2).unwrap();
    assert_eq!(iv.kind, BarKind::Mem64);
    assert_eq!(iv.size, 1 << 20);
    assert_eq!(iv.addr % (1 << 20), 0);
    let f = &bus.fns[&Bdf::new(3, 0)];
    assert_eq!(
        u64::from(f.regs[6] & !0xF) | (u64::from(f.regs[7]) << 32),
        iv.addr
    );
    assert_eq!(f.regs[1] & 7, CMD_MEM | CMD_BUS_MASTER);
    // virtio-net has both IO and MEM.
    assert_eq!(bus.fns[&Bdf::new(2, 0)].regs[1] & 7, 7);
    let io = a.find(0x1af4, 0x1000, 0).unwrap();
    assert_eq!((io.kind, io.size), (BarKind::Io, 32));
    assert!(io.addr >= 0xC000 && io.end() <= 0x1_0000);
    assert_eq!(bus.fns[&Bdf::new(2, 0)].regs[4], io.addr as u32 | 1);
    // Multifunction func 2 found, func 1 of the single-function device not.
    assert!(a.find(0x8086, 0x2930, 0).is_some());
    assert!(a.find(0xdead, 0xbeef, 0).is_none());
    // Host bridge untouched.
    assert_eq!(bus.fns[&Bdf::new(0, 0)].regs[1] & 0xFFFF, 7);
    assert_eq!(
        a.skipped().copied().collect::<Vec<_>>(),
        vec![(Bdf::new(6, 0), 1)]
    );
    // Largest first: the 16 MiB VGA BAR is at the window start.
    assert_eq!(a.find(0x1234, 0x1111, 0).unwrap().addr, 0xC000_0000);
    assert_eq!(a.bars().count(), 9);
    // Expansion ROMs disabled.
    assert!(bus.fns.values().all(|f| f.regs[12] & 1 == 0));
}

#[test]
fn hole_is_skipped() {
    let mut bus = FakeBus::default();
    bus.fns.insert(
        Bdf::new(1, 0),
        FakeFn::new(1, 2, 0, &[FakeBar::Mem32(0x1000), FakeBar::Mem32(0x1000)]),
    );
    let w = Windows {
        io: (IO_WINDOW_START, IO_WINDOW_END),
        mem: (0xC000_0000, 0xC000_4000),
        mem_hole: Some((0xC000_0000, 0xC000_1800)),
    };
    let a = assign(&mut bus, &w).unwrap();
    let addrs: Vec<u64> = a.bars().map(|b| b.addr).collect();
    assert_eq!(addrs, vec![0xC000_2000, 0xC000_3000]);
    // A third page no longer fits.
    bus.fns.insert(
        Bdf::new(2, 0),
        FakeFn::new(1, 3, 0, &[FakeBar::Mem32(0x1000)]),
    );
    assert!(matches!(
        assign(&mut bus, &w),
        Err(PciError::WindowExhausted { .. })
    ));
}

#[test]
fn exhausted_window_names_the_device() {
    let mut bus = FakeBus::default();
    bus.fns.insert(
        Bdf::new(3, 0),
        FakeFn::new(
            0x1af4,
            0x1110,
            0,
            &[FakeBar::None, FakeBar::None, FakeBar::Mem64(1 << 31)],
        ),
    );
    let e = assign(&mut bus, &q35_windows()).unwrap_err();
    assert_eq!(
        e,
        PciError::WindowExhausted {
            bdf: Bdf::new(3, 0),
            vendor: 0x1af4,
            device: 0x1110,
            bar: 2,
            kind: BarKind::Mem64,
            size: 1 << 31,
            start: 0xC000_0000,
            end: 0xFEC0_0000
        }
    );
    let s = e.to_string();
    assert!(
        s.contains("00:03.0") && s.contains("1af4:1110") && s.contains("BAR2"),
        "{s}"
    );
    let mut bus = FakeBus::default();
    for d in 0..5 {
        bus.fns
            .insert(Bdf::new(d, 0), FakeFn::new(1, 1, 0, &[FakeBar::Io(0x1000)]));
    }
    assert!(matches!(
        assign(&mut bus, &q35_windows()),
        Err(PciError::WindowExhausted {
            kind: BarKind::Io,
            ..
        })
    ));
}

#[test]
fn cf8_and_mmconfig_addresses() {
    let b = Bdf::new(0x1f, 3);
    assert_eq!(b.cf8_address(0x9E), 0x8000_FB9C);
    assert_eq!(b.mmconfig_offset(), (0x1f << 15) | (3 << 12));
    assert_eq!(b.to_string(), "00:1f.3");
}

fn bar_strategy() -> impl Strategy<Value = FakeBar> {
    prop_oneof![
        Just(FakeBar::None),
        (2u32..9).prop_map(|s| FakeBar::Io(1 << s)),
        (4u32..26).prop_map(|s| FakeBar::Mem32(1 << s)),
        (4u32..28).prop_map(|s| FakeBar::Mem64(1 << s)),
    ]
}

proptest! {
    #[test]
    fn assignments_are_disjoint_aligned_and_inside(
        devs in proptest::collection::vec(proptest::collection::vec(bar_strategy(), 0..4), 1..12),
        hole_start in 0u64..0x3E,
        hole_len in 0u64..8,
    ) {
        let mut bus = FakeBus::default();
        for (d, bars) in devs.iter().enumerate() {
            // Keep at most six slots.
            let mut used = 0;
            let bars: Vec<FakeBar> = bars.iter().copied().filter(|b| {
                let n = if matches!(b, FakeBar::Mem64(_)) { 2 } else { 1 };
                used += n;
                used <= 6
            }).collect();
            bus.fns.insert(Bdf::new(d as u8 + 1, 0), FakeFn::new(0x1000 + d as u16, 1, 0, &bars));
        }
        let hole = (0xC000_0000 + hole_start * 0x100_0000, 0xC000_0000 + (hole_start + hole_len) * 0x100_0000);
        let w = Windows { mem_hole: Some(hole), ..Windows::default() };
        match assign(&mut bus, &w) {
            Ok(a) => {
                let bars: Vec<BarAssignment> = a.bars().copied().collect();
                for b in &bars {
                    prop_assert_eq!(b.addr % b.size, 0, "{:?}", b);
                    let (s, e) = if b.kind == BarKind::Io { w.io } else { w.mem };
                    prop_assert!(b.addr >= s && b.end() <= e, "{:?}", b);
                    if b.kind != BarKind::Io {
                        prop_assert!(b.end() <= hole.0 || b.addr >= hole.1, "in hole {:?}", b);
                    }
                    let f = &bus.fns[&b.bdf];
                    let lo = u64::from(f.regs[4 + usize::from(b.bar)]) & if b.kind == BarKind::Io { !3 } else { !0xF };
                    let hi = if b.kind == BarKind::Mem64 { u64::from(f.regs[5 + usize::from(b.bar)]) << 32 } else { 0 };
                    prop_assert_eq!(lo | hi, b.addr);
                }
                for (i, x) in bars.iter().enumerate() {
                    for y in &bars[i + 1..] {
                        if (x.kind == BarKind::Io) == (y.kind == BarKind::Io) {
                            prop_assert!(x.end() <= y.addr || y.end() <= x.addr, "{:?} {:?}", x, y);
                        }
                    }
                }
            }
            Err(PciError::WindowExhausted { .. }) => {}
            Err(e) => prop_assert!(false, "{e}"),
        }
    }
}
