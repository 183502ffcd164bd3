use super::*;
use std::vec;

fn d(hex: &str) -> Digest {
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    Digest(out)
}

// SHA-256 of b"kernel", b"initrd" and b"console=ttyS0\0" (sha256sum).
const K: &str = "6923dd1bc0460082c5d55a831908c24a282860b7f1cd6c2b79cf1bc8857c639c";
const I: &str = "09e6c018d2c8c4903308613dd1b72484d57eadf12ec50ddc8f52e5accce470f2";
const C: &str = "f18aae9b3c09e55bc3047ad361e2442d7c53372470b2958fb83293209a784f71";

/// sev-snp-measure 0.0.x `SevHashes(kernel, initrd, "console=ttyS0")
/// .construct_table().hex()` for files holding b"kernel" and b"initrd":
/// an independent implementation of QEMU's padded table.
const SEV_SNP_MEASURE_TABLE: &str = "06d63894224fc94cb479a793d411fd21a800d82dd09720bd944caa78e7714d36ab2a3200f18aae9b3c09e55bc3047ad361e2442d7c53372470b2958fb83293209a784f7131f7ba442f3ad74b9af141e29169781d320009e6c018d2c8c4903308613dd1b72484d57eadf12ec50ddc8f52e5accce470f23794e74dd2ab7f42b835d5b172d2045b32006923dd1bc0460082c5d55a831908c24a282860b7f1cd6c2b79cf1bc8857c639c0000000000000000";

fn table() -> [u8; PADDED_HASH_TABLE_LEN] {
    build_padded(&d(K), &d(I), &d(C))
}

#[test]
fn built_table_is_byte_for_byte_sev_snp_measures() {
    let mut hex = std::string::String::new();
    for b in table() {
        hex.push_str(&std::format!("{b:02x}"));
    }
    assert_eq!(hex, SEV_SNP_MEASURE_TABLE);
    assert_eq!(PADDED_HASH_TABLE_LEN, 176);
}

#[test]
fn matching_blobs_pass_each_check() {
    let t = HashTable::parse(&table()).unwrap().unwrap();
    assert_eq!(t.check(Blob::Kernel, &d(K)), Ok(()));
    assert_eq!(t.check(Blob::Initrd, &d(I)), Ok(()));
    assert_eq!(t.check(Blob::Cmdline, &d(C)), Ok(()));
}

#[test]
fn each_mismatching_blob_is_refused_and_named() {
    let t = HashTable::parse(&table()).unwrap().unwrap();
    for (blob, right) in [(Blob::Kernel, K), (Blob::Initrd, I), (Blob::Cmdline, C)] {
        let wrong = d(if right == K { I } else { K });
        let err = t.check(blob, &wrong).unwrap_err();
        assert_eq!(
            err,
            HashesError::Mismatch {
                blob,
                expected: d(right),
                found: wrong
            }
        );
        let msg = std::format!("{err}");
        assert!(msg.contains(&std::format!("{blob}")), "{msg}");
        assert!(
            msg.contains(right) && msg.contains("refusing to boot"),
            "{msg}"
        );
    }
}

#[test]
fn area_bigger_than_table_and_page_offsets_work() {
    // QEMU writes the table at the area base; the rest of the area is zero.
    let mut area = vec![0u8; 0x400];
    area[..PADDED_HASH_TABLE_LEN].copy_from_slice(&table());
    let t = HashTable::parse(&area).unwrap().unwrap();
    assert_eq!(t.digest(Blob::Initrd), Some(d(I)));
}

#[test]
fn no_table_is_not_measured_without_sev_and_refused_with_it() {
    let zero = [0u8; 0x400];
    assert_eq!(HashTable::parse(&zero), Ok(None));
    assert_eq!(decide(&zero, false), Ok(Measured::NotMeasured));
    assert_eq!(decide(&zero, true), Err(HashesError::SevWithoutTable));
    assert!(matches!(decide(&table(), true), Ok(Measured::Check(_))));
}

#[test]
fn missing_entry_is_refused() {
    // Header + cmdline + initrd only (length 118).
    let mut t = table();
    t[16..18].copy_from_slice(&118u16.to_le_bytes());
    let t = HashTable::parse(&t).unwrap().unwrap();
    assert_eq!(
        t.check(Blob::Kernel, &d(K)),
        Err(HashesError::Missing { blob: Blob::Kernel })
    );
    assert_eq!(t.check(Blob::Cmdline, &d(C)), Ok(()));
}

#[test]
fn malformed_tables_are_refused() {
    // Length beyond the area.
    let mut t = table();
    t[16..18].copy_from_slice(&500u16.to_le_bytes());
    assert_eq!(
        HashTable::parse(&t),
        Err(HashesError::BadLength {
            len: 500,
            area: 176
        })
    );
    // Truncated: the length cuts the last entry in half.
    let mut t = table();
    t[16..18].copy_from_slice(&150u16.to_le_bytes());
    assert!(matches!(
        HashTable::parse(&t),
        Err(HashesError::BadEntry {
            guid: KERNEL_HASH_GUID,
            offset: 118,
            ..
        })
    ));
    // A hash entry whose length is not 50.
    let mut t = table();
    t[18 + 16..18 + 18].copy_from_slice(&49u16.to_le_bytes());
    assert!(matches!(
        HashTable::parse(&t),
        Err(HashesError::BadEntry {
            guid: CMDLINE_HASH_GUID,
            len: 49,
            ..
        })
    ));
    // An unknown entry of length 0 would loop forever: refused.
    let mut t = table();
    t[18..34].copy_from_slice(&[9; 16]);
    t[34..36].copy_from_slice(&0u16.to_le_bytes());
    assert!(matches!(
        HashTable::parse(&t),
        Err(HashesError::BadEntry { len: 0, .. })
    ));
    // The kernel hash twice.
    let mut t = table();
    t[18..34].copy_from_slice(KERNEL_HASH_GUID.bytes());
    assert_eq!(
        HashTable::parse(&t),
        Err(HashesError::Duplicate { blob: Blob::Kernel })
    );
}

#[test]
fn unknown_entries_are_skipped() {
    let mut t = table();
    t[18..34].copy_from_slice(&[9; 16]);
    let t = HashTable::parse(&t).unwrap().unwrap();
    assert_eq!(t.digest(Blob::Cmdline), None);
    assert_eq!(t.digest(Blob::Kernel), Some(d(K)));
}

#[test]
fn secret_table_round_trip_and_lookup() {
    let key = [0x5Au8; 32];
    let other = [1u8, 2, 3];
    let mut area = [0xEEu8; 0x1000];
    let n = write_secret_table(
        &[(Guid([7; 16]), &other), (AGENT_KEY_SECRET_GUID, &key)],
        &mut area,
    )
    .unwrap();
    assert_eq!(n, 20 + 23 + 52);
    assert_eq!(&area[..16], SECRET_TABLE_GUID.bytes());
    assert_eq!(
        find_secret(&area, &AGENT_KEY_SECRET_GUID),
        Ok(Some(&key[..]))
    );
    assert_eq!(find_secret(&area, &Guid([7; 16])), Ok(Some(&other[..])));
    assert_eq!(find_secret(&area, &Guid([8; 16])), Ok(None));
    // Nothing injected: an all-zero area.
    assert_eq!(
        find_secret(&[0u8; 0x1000], &AGENT_KEY_SECRET_GUID),
        Ok(None)
    );
}

#[test]
fn malformed_secret_tables_are_refused() {
    let key = [0x5Au8; 32];
    let mut area = [0u8; 0x100];
    write_secret_table(&[(AGENT_KEY_SECRET_GUID, &key)], &mut area).unwrap();
    let mut bad = area;
    bad[16..20].copy_from_slice(&0x1000u32.to_le_bytes());
    assert_eq!(
        find_secret(&bad, &AGENT_KEY_SECRET_GUID),
        Err(SecretError::BadLength {
            len: 0x1000,
            area: 0x100
        })
    );
    let mut bad = area;
    bad[36..40].copy_from_slice(&0u32.to_le_bytes());
    assert_eq!(
        find_secret(&bad, &AGENT_KEY_SECRET_GUID),
        Err(SecretError::BadEntry {
            offset: 20,
            len: 0,
            left: 52
        })
    );
    let mut small = [0u8; 40];
    assert_eq!(
        write_secret_table(&[(AGENT_KEY_SECRET_GUID, &key)], &mut small),
        Err(SecretError::TooLarge { need: 72, have: 40 })
    );
}
