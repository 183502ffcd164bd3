//! Struct and union layouts from a vmlinux's DWARF (read with `gimli` and
//! `object`), and a System.map: the usual source of truth that the ISF
//! `ids isf` builds from the guest's BTF and kallsyms is checked against
//! (tests/tests/forensics.rs).
//!
//! Members of anonymous structs and unions are lifted into their parent
//! with their offsets added, as Volatility 3 does with an ISF's
//! `anonymous` fields, so a layout here is what a plugin sees.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use gimli::{AttributeValue, EndianSlice, LittleEndian, Unit, UnitOffset};
use object::{Object, ObjectSection};

type R<'a> = EndianSlice<'a, LittleEndian>;

/// Errors reading the debug files.
#[derive(Debug, thiserror::Error)]
pub enum DwarfError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not an ELF file `object` can parse.
    #[error("{path} is not an ELF file with DWARF: {detail}")]
    Elf {
        /// The file.
        path: String,
        /// What `object` said.
        detail: String,
    },
    /// Malformed DWARF.
    #[error("{path}: DWARF: {source}")]
    Dwarf {
        /// The file.
        path: String,
        /// What `gimli` said.
        source: gimli::Error,
    },
}

/// One member as a plugin sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Member {
    /// Byte offset in the outermost named aggregate.
    pub offset: u64,
    /// Size in bytes of the member's type (`None`: no size, e.g. a
    /// function type or an array of unknown length).
    pub size: Option<u64>,
    /// A bitfield (its offset is that of its storage unit in an ISF and of
    /// the byte it starts in here: compared apart).
    pub bitfield: bool,
}

/// A struct or union: its size and its members by name (anonymous
/// aggregates flattened).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Layout {
    /// `struct` or `union`.
    pub kind: &'static str,
    /// Size in bytes.
    pub size: u64,
    /// Members by name.
    pub members: BTreeMap<String, Member>,
}

/// The aggregate types of a vmlinux's DWARF.
#[derive(Debug, Default)]
pub struct Types {
    /// Every named struct and union, each name with all the distinct
    /// layouts DWARF gives it (a name can be defined differently in two
    /// compilation units).
    pub layouts: BTreeMap<String, BTreeSet<Layout>>,
    /// Names only ever declared (`struct maple_pnode;`: pointed to, never
    /// defined).
    pub declared_only: BTreeSet<String>,
    /// Global variables whose type is an anonymous struct or union
    /// (`static struct { ... } tk_core;`), by variable name.
    pub variables: BTreeMap<String, BTreeSet<Layout>>,
}

/// A vmlinux file, read once.
pub struct Vmlinux {
    path: String,
    data: Vec<u8>,
}

impl Vmlinux {
    /// Reads the file.
    pub fn open(path: &Path) -> Result<Self, DwarfError> {
        let shown = path.display().to_string();
        let data = std::fs::read(path).map_err(|source| DwarfError::Io {
            path: shown.clone(),
            source,
        })?;
        Ok(Self { path: shown, data })
    }

    fn elf(&self) -> Result<object::File<'_>, DwarfError> {
        object::File::parse(&*self.data).map_err(|e| DwarfError::Elf {
            path: self.path.clone(),
            detail: e.to_string(),
        })
    }

    /// `len` bytes of the loaded image at the link-time address `addr`
    /// (from the section that holds it).
    pub fn bytes_at(&self, addr: u64, len: u64) -> Result<Vec<u8>, DwarfError> {
        for s in self.elf()?.sections() {
            if let Ok(Some(b)) = s.data_range(addr, len) {
                return Ok(b.to_vec());
            }
        }
        Err(DwarfError::Elf {
            path: self.path.clone(),
            detail: format!("no section holds {addr:#x}+{len:#x}"),
        })
    }

    /// The aggregate types of the file's DWARF.
    pub fn types(&self) -> Result<Types, DwarfError> {
        types(&self.path, &self.elf()?)
    }
}

fn types(path: &str, elf: &object::File<'_>) -> Result<Types, DwarfError> {
    let load = |id: gimli::SectionId| -> Result<Cow<'_, [u8]>, gimli::Error> {
        Ok(elf
            .section_by_name(id.name())
            .and_then(|s| s.uncompressed_data().ok())
            .unwrap_or(Cow::Borrowed(&[])))
    };
    let sections = gimli::DwarfSections::load(load).map_err(|source| DwarfError::Dwarf {
        path: path.to_string(),
        source,
    })?;
    let dwarf = sections.borrow(|s| EndianSlice::new(s, LittleEndian));
    let err = |source| DwarfError::Dwarf {
        path: path.to_string(),
        source,
    };
    let mut out = Types::default();
    let mut declared = BTreeSet::new();
    let mut seen: BTreeSet<(String, u64, Option<u64>)> = BTreeSet::new();
    let mut units = dwarf.units();
    while let Some(header) = units.next().map_err(err)? {
        let unit = dwarf.unit(header).map_err(err)?;
        let mut entries = unit.entries();
        while let Some((_, e)) = entries.next_dfs().map_err(err)? {
            let kind = match e.tag() {
                gimli::DW_TAG_structure_type => "struct",
                gimli::DW_TAG_union_type => "union",
                gimli::DW_TAG_variable => {
                    variable(&dwarf, &unit, e, &mut out.variables).map_err(err)?;
                    continue;
                }
                _ => continue,
            };
            let Some(name) = name_of(&dwarf, &unit, e).map_err(err)? else {
                continue;
            };
            if e.attr_value(gimli::DW_AT_declaration)
                .map_err(err)?
                .is_some()
            {
                declared.insert(name);
                continue;
            }
            let Some(size) = udata(e, gimli::DW_AT_byte_size).map_err(err)? else {
                continue;
            };
            // Every unit that includes a header defines its structs again:
            // one definition (name, size, line) is read once. Two
            // different ones alike in all three would hide the second,
            // which can only add a mismatch, never hide one.
            let line = udata(e, gimli::DW_AT_decl_line).map_err(err)?;
            if !seen.insert((name.clone(), size, line)) {
                continue;
            }
            let mut members = BTreeMap::new();
            collect_members(&dwarf, &unit, e.offset(), 0, &mut members).map_err(err)?;
            out.layouts.entry(name).or_default().insert(Layout {
                kind,
                size,
                members,
            });
        }
    }
    out.declared_only = declared
        .into_iter()
        .filter(|n| !out.layouts.contains_key(n))
        .collect();
    Ok(out)
}

/// Records a named variable whose type is an anonymous struct or union.
fn variable(
    dwarf: &gimli::Dwarf<R<'_>>,
    unit: &Unit<R<'_>>,
    e: &gimli::DebuggingInformationEntry<R<'_>>,
    out: &mut BTreeMap<String, BTreeSet<Layout>>,
) -> Result<(), gimli::Error> {
    let (Some(name), Some(t)) = (name_of(dwarf, unit, e)?, type_ref(e)?) else {
        return Ok(());
    };
    let t = strip(unit, t)?;
    let te = unit.entry(t)?;
    let kind = match te.tag() {
        gimli::DW_TAG_structure_type => "struct",
        gimli::DW_TAG_union_type => "union",
        _ => return Ok(()),
    };
    if te.attr_value(gimli::DW_AT_name)?.is_some() {
        return Ok(());
    }
    let Some(size) = udata(&te, gimli::DW_AT_byte_size)? else {
        return Ok(());
    };
    let mut members = BTreeMap::new();
    collect_members(dwarf, unit, t, 0, &mut members)?;
    out.entry(name).or_default().insert(Layout {
        kind,
        size,
        members,
    });
    Ok(())
}

fn name_of(
    dwarf: &gimli::Dwarf<R<'_>>,
    unit: &Unit<R<'_>>,
    e: &gimli::DebuggingInformationEntry<R<'_>>,
) -> Result<Option<String>, gimli::Error> {
    match e.attr_value(gimli::DW_AT_name)? {
        Some(v) => Ok(Some(
            dwarf.attr_string(unit, v)?.to_string_lossy().into_owned(),
        )),
        None => Ok(None),
    }
}

fn udata(
    e: &gimli::DebuggingInformationEntry<R<'_>>,
    at: gimli::DwAt,
) -> Result<Option<u64>, gimli::Error> {
    Ok(e.attr(at)?.and_then(|a| a.udata_value()))
}

/// The members of the aggregate at `at`, anonymous ones lifted, offsets
/// plus `base`.
fn collect_members(
    dwarf: &gimli::Dwarf<R<'_>>,
    unit: &Unit<R<'_>>,
    at: UnitOffset,
    base: u64,
    out: &mut BTreeMap<String, Member>,
) -> Result<(), gimli::Error> {
    each_child(unit, at, gimli::DW_TAG_member, |e| {
        let bit_size = udata(e, gimli::DW_AT_bit_size)?;
        let offset = match udata(e, gimli::DW_AT_data_member_location)? {
            Some(o) => o,
            None => udata(e, gimli::DW_AT_data_bit_offset)?.map_or(0, |b| b / 8),
        };
        let ty = type_ref(e)?;
        match name_of(dwarf, unit, e)? {
            Some(name) => {
                let size = match ty {
                    Some(t) => size_of(unit, t, 0)?,
                    None => None,
                };
                out.entry(name).or_insert(Member {
                    offset: base + offset,
                    size,
                    bitfield: bit_size.is_some(),
                });
            }
            None => {
                if let Some(t) = ty {
                    let t = strip(unit, t)?;
                    let tag = unit.entry(t)?.tag();
                    if tag == gimli::DW_TAG_structure_type || tag == gimli::DW_TAG_union_type {
                        collect_members(dwarf, unit, t, base + offset, out)?;
                    }
                }
            }
        }
        Ok(())
    })
}

/// Calls `f` on each child of the entry at `at` that is tagged `tag`.
fn each_child(
    unit: &Unit<R<'_>>,
    at: UnitOffset,
    tag: gimli::DwTag,
    mut f: impl FnMut(&gimli::DebuggingInformationEntry<R<'_>>) -> Result<(), gimli::Error>,
) -> Result<(), gimli::Error> {
    let mut tree = unit.entries_tree(Some(at))?;
    let root = tree.root()?;
    let mut children = root.children();
    while let Some(child) = children.next()? {
        if child.entry().tag() == tag {
            f(child.entry())?;
        }
    }
    Ok(())
}

fn type_ref(
    e: &gimli::DebuggingInformationEntry<R<'_>>,
) -> Result<Option<UnitOffset>, gimli::Error> {
    Ok(match e.attr_value(gimli::DW_AT_type)? {
        Some(AttributeValue::UnitRef(o)) => Some(o),
        _ => None,
    })
}

/// Follows typedefs and qualifiers.
fn strip(unit: &Unit<R<'_>>, mut t: UnitOffset) -> Result<UnitOffset, gimli::Error> {
    for _ in 0..64 {
        let e = unit.entry(t)?;
        match e.tag() {
            gimli::DW_TAG_typedef
            | gimli::DW_TAG_const_type
            | gimli::DW_TAG_volatile_type
            | gimli::DW_TAG_restrict_type
            | gimli::DW_TAG_atomic_type => match type_ref(&e)? {
                Some(n) => t = n,
                None => return Ok(t),
            },
            _ => return Ok(t),
        }
    }
    Ok(t)
}

/// Size in bytes of the type at `t`.
fn size_of(unit: &Unit<R<'_>>, t: UnitOffset, depth: u32) -> Result<Option<u64>, gimli::Error> {
    if depth > 64 {
        return Ok(None);
    }
    let t = strip(unit, t)?;
    let e = unit.entry(t)?;
    if let Some(n) = udata(&e, gimli::DW_AT_byte_size)? {
        return Ok(Some(n));
    }
    match e.tag() {
        gimli::DW_TAG_pointer_type => Ok(Some(8)),
        gimli::DW_TAG_array_type => {
            let Some(elem) = type_ref(&e)? else {
                return Ok(None);
            };
            let Some(mut size) = size_of(unit, elem, depth + 1)? else {
                return Ok(None);
            };
            each_child(unit, t, gimli::DW_TAG_subrange_type, |s| {
                let count = match udata(s, gimli::DW_AT_count)? {
                    Some(c) => c,
                    None => match udata(s, gimli::DW_AT_upper_bound)? {
                        Some(u) => u + 1,
                        // A flexible array member: no elements.
                        None => 0,
                    },
                };
                size *= count;
                Ok(())
            })?;
            Ok(Some(size))
        }
        _ => Ok(None),
    }
}

/// A System.map: every name with all the addresses it has (static
/// functions of the same name in several files have several).
pub fn system_map(path: &Path) -> Result<BTreeMap<String, BTreeSet<u64>>, DwarfError> {
    let text = std::fs::read_to_string(path).map_err(|source| DwarfError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let mut out: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(addr), Some(_kind), Some(name)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if let Ok(a) = u64::from_str_radix(addr, 16) {
            out.entry(name.to_string()).or_default().insert(a);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_map_keeps_every_address_of_a_name() {
        let dir = std::env::temp_dir().join(format!("smmvmi-sysmap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("System.map");
        std::fs::write(
            &f,
            "ffffffff81000000 T _text\nffffffff81001000 t dup\nffffffff81002000 t dup\nbad line\n",
        )
        .unwrap();
        let m = system_map(&f).unwrap();
        assert_eq!(m["_text"], BTreeSet::from([0xffff_ffff_8100_0000]));
        assert_eq!(m["dup"].len(), 2);
        assert_eq!(m.len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
