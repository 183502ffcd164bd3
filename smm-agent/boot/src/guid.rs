//! EFI GUIDs as they are stored in firmware images and tables: 16 bytes,
//! the first three fields little-endian, the last eight bytes as written
//! (UEFI spec, Appendix A "GUID and Time Formats"; QEMU stores its GUIDs the
//! same way: `qemu_uuid_bswap()` in `hw/i386/pc_sysfw_ovmf.c` and
//! `target/i386/sev.c`; sev-snp-measure uses Python's `UUID.bytes_le`).

use core::fmt;

/// A GUID in its on-disk (mixed-endian) byte order.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// Parses the canonical text form `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`
    /// (either case) into the stored byte order. Usable in `const` items;
    /// a malformed string panics at compile time there.
    ///
    /// # Panics
    /// If `s` is not 36 characters of that shape.
    pub const fn parse(s: &str) -> Guid {
        let b = s.as_bytes();
        assert!(b.len() == 36, "a GUID is 36 characters");
        assert!(b[8] == b'-' && b[13] == b'-' && b[18] == b'-' && b[23] == b'-');
        // Text order of the 16 bytes (big-endian fields).
        let mut text = [0u8; 16];
        let mut i = 0;
        let mut j = 0;
        while i < 36 {
            if b[i] == b'-' {
                i += 1;
                continue;
            }
            text[j] = (hex(b[i]) << 4) | hex(b[i + 1]);
            j += 1;
            i += 2;
        }
        // Stored order: the u32 and the two u16 fields little-endian.
        let order = [3, 2, 1, 0, 5, 4, 7, 6, 8, 9, 10, 11, 12, 13, 14, 15];
        let mut out = [0u8; 16];
        let mut k = 0;
        while k < 16 {
            out[k] = text[order[k]];
            k += 1;
        }
        Guid(out)
    }

    /// The stored bytes.
    pub const fn bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

const fn hex(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        b'A'..=b'F' => c - b'A' + 10,
        _ => panic!("a GUID has only hex digits and dashes"),
    }
}

impl fmt::Display for Guid {
    /// The canonical text form, lower case.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-",
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u16::from_le_bytes([b[4], b[5]]),
            u16::from_le_bytes([b[6], b[7]]),
            b[8],
            b[9]
        )?;
        for x in &b[10..] {
            write!(f, "{x:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    #[test]
    fn parse_stores_mixed_endian_and_prints_back() {
        // OVMF's table footer GUID, as QEMU/OVMF store it in the image.
        let g = Guid::parse("96b582de-1fb2-45f7-baea-a366c55a082d");
        assert_eq!(
            g.0,
            [
                0xde, 0x82, 0xb5, 0x96, 0xb2, 0x1f, 0xf7, 0x45, 0xba, 0xea, 0xa3, 0x66, 0xc5, 0x5a,
                0x08, 0x2d
            ]
        );
        assert_eq!(g.to_string(), "96b582de-1fb2-45f7-baea-a366c55a082d");
        assert_eq!(Guid::parse("96B582DE-1FB2-45F7-BAEA-A366C55A082D"), g);
    }
}
