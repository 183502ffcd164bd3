//! The memory map: QEMU's `etc/e820`, and the map handed to Linux with the
//! firmware's own areas carved out.

use smmvmi_boot::e820::{self, E820Map};
use smmvmi_boot::fw_cfg as fwc;

use super::error::BootError;
use crate::hw::fw_cfg::FwCfg;

/// Reads and parses `etc/e820`.
pub fn read(fw: &mut FwCfg) -> Result<E820Map, BootError> {
    let file = fwc::find_file(fw, "etc/e820")
        .map_err(BootError::FwCfg)?
        .ok_or(BootError::NoE820File)?;
    let mut buf = [0u8; e820::CAPACITY * e820::ENTRY_LEN];
    let bytes =
        fwc::read_item(fw, file.select, file.size, &mut buf).map_err(BootError::E820Read)?;
    E820Map::parse(bytes).map_err(BootError::E820Parse)
}

/// The map for Linux: `e820` with `reserve` (address, length, type) carved
/// out and the legacy holes added.
pub fn handoff(e820: &E820Map, reserve: &[(u64, u64, u32)]) -> Result<E820Map, BootError> {
    let mut handoff = e820.clone();
    reserve
        .iter()
        .try_for_each(|&(addr, len, kind)| handoff.reserve(addr, len, kind))
        .and_then(|()| handoff.add_legacy_holes())
        .map_err(BootError::Handoff)?;
    Ok(handoff)
}
