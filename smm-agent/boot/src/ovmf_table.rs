//! The GUIDed table at the end of an OVMF-style flash image: how QEMU (and
//! tools such as sev-snp-measure) learn where the firmware wants the SEV
//! launch secret and the kernel hashes table.
//!
//! Layout (QEMU `hw/i386/pc_sysfw_ovmf.c`, `pc_system_parse_ovmf_flash` and
//! `pc_system_ovmf_table_find`; OVMF `OvmfPkg/ResetVector/Ia16/ResetVectorVtf0.asm`):
//!
//! ```text
//!  ... | entry data | u16 entry length | entry GUID | ... | u16 table length | footer GUID | 32 bytes | end of image
//!                                                                                        ^ end - 0x20
//! ```
//! - the footer GUID [`FOOTER_GUID`] sits [`BYTES_AFTER_FOOTER`] (32) bytes
//!   before the end of the image, i.e. at `end - 0x30`;
//! - the u16 (little-endian) just before it is the length of the whole
//!   table, entries plus the footer's own 18 bytes;
//! - entries are walked backwards from the footer: each ends with its GUID
//!   (16 bytes), preceded by its u16 length (data + 18), preceded by its
//!   data. QEMU gives up on an entry shorter than 18 bytes or longer than
//!   what is left of the table; so does [`Table::entries`].
//!
//! GUIDs are stored mixed-endian ([`Guid`]). The builder ([`build`]) is a
//! `const fn` so the firmware can place the table in its image at compile
//! time; the parser is what the tests, `cargo xtask measure` and the harness
//! use to read an image the way QEMU does.

use thiserror::Error;

use crate::guid::Guid;

/// The table footer GUID (QEMU `OVMF_TABLE_FOOTER_GUID`, OVMF `gOvmfTableFooterGuid`).
pub const FOOTER_GUID: Guid = Guid::parse("96b582de-1fb2-45f7-baea-a366c55a082d");
/// Bytes between the end of the footer GUID and the end of the image
/// (QEMU `bytes_after_table_footer`): OVMF keeps its reset vector there.
pub const BYTES_AFTER_FOOTER: usize = 32;
/// Size of an entry's (or the footer's) trailer: u16 length + GUID.
pub const ENTRY_HEADER_LEN: usize = 18;
/// The footer's offset from the end of the image (0x30).
pub const FOOTER_GUID_FROM_END: usize = BYTES_AFTER_FOOTER + 16;

/// Why a table could not be built or read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TableError {
    /// The table's length field is impossible.
    #[error(
        "GUIDed table length {len} is invalid: expected {ENTRY_HEADER_LEN} (footer only) to {room} (the image before the footer); the image's table is corrupt, rebuild it"
    )]
    BadTableLength {
        /// Length field found (bytes, footer included).
        len: usize,
        /// Largest length that fits in the image.
        room: usize,
    },
    /// An entry's length field is shorter than its own trailer or longer
    /// than what is left of the table.
    #[error(
        "GUIDed table entry {index} (counted from the footer) has length {len}, expected {ENTRY_HEADER_LEN} to {left}; the image's table is corrupt, rebuild it"
    )]
    BadEntryLength {
        /// Entry index, 0 = nearest the footer.
        index: usize,
        /// Length field found.
        len: usize,
        /// Bytes of the table left for it.
        left: usize,
    },
    /// The entries do not fit in the buffer the builder was given.
    #[error("GUIDed table needs {need} bytes, the buffer has {have}")]
    TooLarge {
        /// Bytes needed (entries and footer).
        need: usize,
        /// Buffer size.
        have: usize,
    },
    /// An entry's data is longer than a u16 length can say.
    #[error("GUIDed table entry {index} has {len} bytes of data, at most {} fit", u16::MAX as usize - ENTRY_HEADER_LEN)]
    EntryTooLong {
        /// Entry index in the builder's list.
        index: usize,
        /// Data length.
        len: usize,
    },
    /// An area entry holds fewer than 8 bytes.
    #[error("area entry {guid} holds {len} bytes, expected at least 8 (base u32, size u32)")]
    ShortArea {
        /// The entry's GUID.
        guid: Guid,
        /// Its data length.
        len: usize,
    },
}

/// One entry: a GUID and the bytes it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    /// What the entry is.
    pub guid: Guid,
    /// Its data (for the SEV areas: [`Area::to_bytes`]).
    pub data: &'a [u8],
}

/// A guest-physical area named by an entry: `{ base: u32, size: u32 }`
/// little-endian, as QEMU's `struct sev_secret_area` and
/// `SevHashTableDescriptor` read it (`target/i386/sev.c`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Area {
    /// Guest-physical base address.
    pub base: u32,
    /// Size in bytes.
    pub size: u32,
}

impl Area {
    /// The entry data (8 bytes).
    pub const fn to_bytes(&self) -> [u8; 8] {
        let b = self.base.to_le_bytes();
        let s = self.size.to_le_bytes();
        [b[0], b[1], b[2], b[3], s[0], s[1], s[2], s[3]]
    }

    /// Reads an area entry's data (extra bytes after the first 8 are
    /// ignored, as QEMU does).
    ///
    /// # Errors
    /// [`TableError::ShortArea`] if fewer than 8 bytes.
    pub fn from_entry(guid: Guid, data: &[u8]) -> Result<Area, TableError> {
        match data {
            [b0, b1, b2, b3, s0, s1, s2, s3, ..] => Ok(Area {
                base: u32::from_le_bytes([*b0, *b1, *b2, *b3]),
                size: u32::from_le_bytes([*s0, *s1, *s2, *s3]),
            }),
            _ => Err(TableError::ShortArea {
                guid,
                len: data.len(),
            }),
        }
    }
}

/// Bytes the table with `entries` takes (entries and footer).
pub const fn table_len(entries: &[Entry<'_>]) -> usize {
    let mut n = ENTRY_HEADER_LEN;
    let mut i = 0;
    while i < entries.len() {
        n += entries[i].data.len() + ENTRY_HEADER_LEN;
        i += 1;
    }
    n
}

/// Writes the table right-aligned into `out`: `out` ends with the footer
/// GUID, so place it to end at `image end - BYTES_AFTER_FOOTER`. Bytes of
/// `out` before the table are zeroed. `entries[0]` lies farthest from the
/// footer. Returns the table length.
///
/// # Errors
/// [`TableError::TooLarge`] if the table does not fit `out` or its length a
/// u16; [`TableError::EntryTooLong`] for an entry over 65517 bytes.
pub const fn write(entries: &[Entry<'_>], out: &mut [u8]) -> Result<usize, TableError> {
    let need = table_len(entries);
    if need > out.len() || need > u16::MAX as usize {
        return Err(TableError::TooLarge {
            need,
            have: out.len(),
        });
    }
    let mut i = 0;
    while i < out.len() {
        out[i] = 0;
        i += 1;
    }
    let mut pos = out.len() - need;
    let mut e = 0;
    while e < entries.len() {
        let data = entries[e].data;
        if data.len() > u16::MAX as usize - ENTRY_HEADER_LEN {
            return Err(TableError::EntryTooLong {
                index: e,
                len: data.len(),
            });
        }
        let mut k = 0;
        while k < data.len() {
            out[pos] = data[k];
            pos += 1;
            k += 1;
        }
        pos = put_trailer(
            out,
            pos,
            (data.len() + ENTRY_HEADER_LEN) as u16,
            &entries[e].guid,
        );
        e += 1;
    }
    put_trailer(out, pos, need as u16, &FOOTER_GUID);
    Ok(need)
}

const fn put_trailer(out: &mut [u8], mut pos: usize, len: u16, guid: &Guid) -> usize {
    let l = len.to_le_bytes();
    out[pos] = l[0];
    out[pos + 1] = l[1];
    pos += 2;
    let mut k = 0;
    while k < 16 {
        out[pos] = guid.0[k];
        pos += 1;
        k += 1;
    }
    pos
}

/// [`write`] for `const` items: an `N`-byte block ending with the footer.
///
/// # Panics
/// At compile time when used in a `const`/`static`, if the table does not
/// fit `N` bytes.
pub const fn build<const N: usize>(entries: &[Entry<'_>]) -> [u8; N] {
    let mut out = [0u8; N];
    match write(entries, &mut out) {
        Ok(_) => out,
        Err(_) => panic!("the GUIDed table does not fit its block"),
    }
}

/// The table of an image: the entries, as QEMU copies them out.
#[derive(Clone, Copy, Debug)]
pub struct Table<'a> {
    /// The entries area (footer excluded); its end is the foot of the table.
    entries: &'a [u8],
}

impl<'a> Table<'a> {
    /// Finds the table of a whole flash image. `Ok(None)` when the image
    /// has no footer GUID at `end - 0x30` (not OVMF-like: QEMU silently
    /// finds nothing) or is smaller than a page (QEMU skips those too).
    ///
    /// # Errors
    /// [`TableError::BadTableLength`] for a footer whose length is below 18
    /// or reaches before the image start.
    pub fn parse(image: &'a [u8]) -> Result<Option<Table<'a>>, TableError> {
        if image.len() < 4096 {
            return Ok(None);
        }
        let foot = image.len() - FOOTER_GUID_FROM_END;
        if image.get(foot..foot + 16) != Some(&FOOTER_GUID.0[..]) {
            return Ok(None);
        }
        let len_at = foot - 2;
        let len = usize::from(u16::from_le_bytes([image[len_at], image[len_at + 1]]));
        let room = len_at + ENTRY_HEADER_LEN;
        if len < ENTRY_HEADER_LEN || len > room {
            return Err(TableError::BadTableLength { len, room });
        }
        let body = len - ENTRY_HEADER_LEN;
        Ok(Some(Table {
            entries: &image[len_at - body..len_at],
        }))
    }

    /// The entries, nearest the footer first. A malformed length ends the
    /// walk with one `Err`.
    pub fn entries(&self) -> Entries<'a> {
        Entries {
            rest: self.entries,
            index: 0,
            done: false,
        }
    }

    /// The data of the first entry with `guid`, as
    /// `pc_system_ovmf_table_find` returns it.
    ///
    /// # Errors
    /// A malformed entry met before `guid` was found.
    pub fn find(&self, guid: &Guid) -> Result<Option<&'a [u8]>, TableError> {
        for e in self.entries() {
            let e = e?;
            if e.guid == *guid {
                return Ok(Some(e.data));
            }
        }
        Ok(None)
    }

    /// The area entry `guid` ([`Area`]), if present.
    ///
    /// # Errors
    /// A malformed table, or an entry shorter than 8 bytes.
    pub fn area(&self, guid: &Guid) -> Result<Option<Area>, TableError> {
        match self.find(guid)? {
            Some(data) => Area::from_entry(*guid, data).map(Some),
            None => Ok(None),
        }
    }
}

/// Iterator over a [`Table`]'s entries (backwards from the footer).
#[derive(Clone, Debug)]
pub struct Entries<'a> {
    rest: &'a [u8],
    index: usize,
    done: bool,
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<Entry<'a>, TableError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.rest.len() < ENTRY_HEADER_LEN {
            return None;
        }
        let n = self.rest.len();
        let mut guid = [0u8; 16];
        guid.copy_from_slice(&self.rest[n - 16..]);
        let len = usize::from(u16::from_le_bytes([self.rest[n - 18], self.rest[n - 17]]));
        if len < ENTRY_HEADER_LEN || len > n {
            self.done = true;
            return Some(Err(TableError::BadEntryLength {
                index: self.index,
                len,
                left: n,
            }));
        }
        let data = &self.rest[n - len..n - ENTRY_HEADER_LEN];
        self.rest = &self.rest[..n - len];
        self.index += 1;
        Some(Ok(Entry {
            guid: Guid(guid),
            data,
        }))
    }
}

#[cfg(test)]
mod tests;
