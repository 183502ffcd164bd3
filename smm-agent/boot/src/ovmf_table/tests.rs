use super::*;
use proptest::prelude::*;
use std::vec;
use std::vec::Vec;

const SECRET: Guid = Guid::parse("4c2eb361-7d9b-4cc3-8081-127c90d3d294");
const HASHES: Guid = Guid::parse("7255371f-3a3b-4b04-927b-1da6efa8d454");

/// An image of `size` bytes whose table block ends at `end - 32`.
fn image_with(entries: &[Entry<'_>], size: usize) -> Vec<u8> {
    let mut img = vec![0xFFu8; size];
    let foot_end = size - BYTES_AFTER_FOOTER;
    let block = 256;
    write(entries, &mut img[foot_end - block..foot_end]).unwrap();
    img
}

fn two_areas() -> ([u8; 8], [u8; 8]) {
    (
        Area {
            base: 0x5_0000,
            size: 0x1000,
        }
        .to_bytes(),
        Area {
            base: 0x5_1000,
            size: 0x400,
        }
        .to_bytes(),
    )
}

#[test]
fn built_table_reads_back_as_qemu_reads_it() {
    let (s, h) = two_areas();
    let img = image_with(
        &[
            Entry {
                guid: SECRET,
                data: &s,
            },
            Entry {
                guid: HASHES,
                data: &h,
            },
        ],
        0x10000,
    );
    // Hand-checked bytes, QEMU's way: footer GUID at end - 0x30, the total
    // length (2 entries of 8 + 18, plus the footer's 18 = 70) before it.
    let end = img.len();
    assert_eq!(&img[end - 0x30..end - 0x20], FOOTER_GUID.bytes());
    assert_eq!(u16::from_le_bytes([img[end - 0x32], img[end - 0x31]]), 70);
    // The entry nearest the footer is the last one given: HASHES.
    assert_eq!(&img[end - 0x32 - 16..end - 0x32], HASHES.bytes());
    assert_eq!(
        u16::from_le_bytes([img[end - 0x32 - 18], img[end - 0x32 - 17]]),
        26
    );
    assert_eq!(&img[end - 0x32 - 26..end - 0x32 - 18], &h);

    let t = Table::parse(&img).unwrap().unwrap();
    let got: Vec<_> = t.entries().map(|e| e.unwrap()).collect();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].guid, HASHES);
    assert_eq!(got[1].guid, SECRET);
    assert_eq!(
        t.area(&SECRET).unwrap(),
        Some(Area {
            base: 0x5_0000,
            size: 0x1000
        })
    );
    assert_eq!(
        t.area(&HASHES).unwrap(),
        Some(Area {
            base: 0x5_1000,
            size: 0x400
        })
    );
    assert_eq!(t.find(&Guid([7; 16])).unwrap(), None);
}

#[test]
fn const_build_matches_write() {
    const S: [u8; 8] = Area { base: 1, size: 2 }.to_bytes();
    const BLOCK: [u8; 64] = build(&[Entry {
        guid: SECRET,
        data: &S,
    }]);
    let mut out = [0xAAu8; 64];
    assert_eq!(
        write(
            &[Entry {
                guid: SECRET,
                data: &S
            }],
            &mut out
        ),
        Ok(44)
    );
    assert_eq!(out, BLOCK);
    assert!(BLOCK[..20].iter().all(|&b| b == 0), "zero padding before");
}

#[test]
fn empty_table_is_footer_only() {
    let img = image_with(&[], 0x10000);
    let t = Table::parse(&img).unwrap().unwrap();
    assert_eq!(t.entries().count(), 0);
    assert_eq!(t.find(&SECRET).unwrap(), None);
}

#[test]
fn no_footer_or_tiny_image_is_not_a_table() {
    assert!(Table::parse(&vec![0u8; 0x10000]).unwrap().is_none());
    assert!(Table::parse(&[0u8; 100]).unwrap().is_none());
    // The footer one byte off its place is not found (QEMU looks at one spot).
    let (s, _) = two_areas();
    let mut img = image_with(
        &[Entry {
            guid: SECRET,
            data: &s,
        }],
        0x10000,
    );
    img.push(0);
    assert!(Table::parse(&img).unwrap().is_none());
}

#[test]
fn truncated_image_length_reaching_before_start_is_refused() {
    let (s, _) = two_areas();
    let img = image_with(
        &[Entry {
            guid: SECRET,
            data: &s,
        }],
        0x1000,
    );
    // Keep the last page only but claim a longer table than the page holds.
    let mut img = img[img.len() - 0x1000..].to_vec();
    let end = img.len();
    img[end - 0x32..end - 0x30].copy_from_slice(&0xFFF0u16.to_le_bytes());
    assert_eq!(
        Table::parse(&img).unwrap_err(),
        TableError::BadTableLength {
            len: 0xFFF0,
            room: 0x1000 - 0x32 + 18
        }
    );
    // Shorter than its own footer.
    img[end - 0x32..end - 0x30].copy_from_slice(&17u16.to_le_bytes());
    assert!(matches!(
        Table::parse(&img),
        Err(TableError::BadTableLength { len: 17, .. })
    ));
}

#[test]
fn malformed_entry_lengths_end_the_walk_with_an_error() {
    let (s, h) = two_areas();
    let entries = [
        Entry {
            guid: SECRET,
            data: &s,
        },
        Entry {
            guid: HASHES,
            data: &h,
        },
    ];
    for bad in [0u16, 17, 60] {
        let mut img = image_with(&entries, 0x10000);
        let end = img.len();
        // The length field of the entry nearest the footer.
        let at = end - 0x32 - 18;
        img[at..at + 2].copy_from_slice(&bad.to_le_bytes());
        let t = Table::parse(&img).unwrap().unwrap();
        let got: Vec<_> = t.entries().collect();
        assert_eq!(
            got,
            vec![Err(TableError::BadEntryLength {
                index: 0,
                len: usize::from(bad),
                left: 52
            })],
            "length {bad}"
        );
        assert!(t.find(&SECRET).is_err());
    }
}

#[test]
fn short_area_entry_is_refused() {
    let img = image_with(
        &[Entry {
            guid: SECRET,
            data: &[1, 2, 3, 4],
        }],
        0x10000,
    );
    let t = Table::parse(&img).unwrap().unwrap();
    assert_eq!(
        t.area(&SECRET),
        Err(TableError::ShortArea {
            guid: SECRET,
            len: 4
        })
    );
}

#[test]
fn builder_refuses_what_does_not_fit() {
    let (s, _) = two_areas();
    let mut small = [0u8; 30];
    assert_eq!(
        write(
            &[Entry {
                guid: SECRET,
                data: &s
            }],
            &mut small
        ),
        Err(TableError::TooLarge { need: 44, have: 30 })
    );
}

proptest! {
    #[test]
    fn any_entries_round_trip(datas in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..6),
                              guids in proptest::collection::vec(any::<[u8; 16]>(), 6)) {
        let entries: Vec<Entry<'_>> = datas
            .iter()
            .zip(&guids)
            .map(|(d, g)| Entry { guid: Guid(*g), data: d })
            .collect();
        let mut img = vec![0u8; 0x2000];
        let end = img.len() - BYTES_AFTER_FOOTER;
        write(&entries, &mut img[end - 512..end]).unwrap();
        let t = Table::parse(&img).unwrap().unwrap();
        let mut got: Vec<Entry<'_>> = t.entries().map(|e| e.unwrap()).collect();
        got.reverse();
        prop_assert_eq!(got, entries);
    }

    #[test]
    fn arbitrary_bytes_never_panic(mut img in proptest::collection::vec(any::<u8>(), 4096..4400), len in any::<u16>()) {
        let end = img.len();
        img[end - 0x30..end - 0x20].copy_from_slice(FOOTER_GUID.bytes());
        img[end - 0x32..end - 0x30].copy_from_slice(&len.to_le_bytes());
        if let Ok(Some(t)) = Table::parse(&img) {
            for e in t.entries() {
                let _ = e;
            }
        }
    }
}
