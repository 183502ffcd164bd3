//! QEMU's ACPI tables, installed by running its `etc/table-loader` script
//! (interpreted by `smmvmi_boot::table_loader`) into a reserved area just
//! below TSEG.

use smmvmi_boot::fw_cfg::{self as fwc, FileEntry, FwCfgError, FwCfgIo};
use smmvmi_boot::table_loader::{self, Loaded, LoaderEnv, LoaderError, Zone};

use super::error::BootError;
use crate::hw::fw_cfg::FwCfg;
use crate::hw::memory::Region;
use crate::layout::ACPI_AREA_LEN as AREA_LEN;

struct Env<'a> {
    fw: &'a mut FwCfg,
    area: Region,
    next: u64,
}

impl Env<'_> {
    fn offset(&self, addr: u64, len: usize) -> u64 {
        let off = addr.wrapping_sub(self.area.base());
        assert!(
            off.checked_add(len as u64)
                .is_some_and(|e| e <= self.area.len()),
            "table-loader access outside the ACPI area"
        );
        off
    }
}

impl LoaderEnv for Env<'_> {
    fn find_file(&mut self, name: &str) -> Result<Option<FileEntry>, FwCfgError> {
        fwc::find_file(self.fw, name)
    }

    fn allocate(&mut self, size: u32, align: u32, _zone: Zone) -> Option<u64> {
        // Both zones go to the same area: Linux finds the RSDP through
        // boot_params.acpi_rsdp_addr, not by scanning the F segment.
        let align = u64::from(align.max(16));
        let start = self.next.checked_add(align - 1)? & !(align - 1);
        let end = start.checked_add(u64::from(size))?;
        (end <= self.area.len()).then(|| {
            self.next = end;
            self.area.base() + start
        })
    }

    fn load_file(&mut self, file: FileEntry, addr: u64) {
        let off = self.offset(addr, file.size as usize);
        let dst = self
            .area
            .sub(off, u64::from(file.size))
            .expect("checked by offset()");
        if let Err(e) = self.fw.read_to(file.select, &dst) {
            crate::log!("warning: loading fw_cfg item {:#x}: {e}", file.select);
        }
    }

    fn read_mem(&mut self, addr: u64, buf: &mut [u8]) {
        let off = self.offset(addr, buf.len());
        self.area.read(off, buf);
    }

    fn write_mem(&mut self, addr: u64, data: &[u8]) {
        let off = self.offset(addr, data.len());
        self.area.write(off, data);
    }

    fn write_file(&mut self, file: FileEntry, offset: u32, data: &[u8]) -> Result<(), FwCfgError> {
        self.fw.write_at(file.select, offset, data)
    }
}

/// Installs QEMU's ACPI tables at `[base, base + AREA_LEN)`; returns the
/// RSDP's address.
pub fn install(fw: &mut FwCfg, base: u64) -> Result<u64, BootError> {
    run_loader(fw, base)
        .map_err(BootError::Acpi)?
        .ok_or(BootError::NoAcpiTables)?
        .rsdp()
        .map_err(BootError::Acpi)
}

/// Runs the table-loader script into `[base, base + AREA_LEN)`; returns the
/// allocations (RSDP among them), or `None` when QEMU offers no tables.
fn run_loader(fw: &mut FwCfg, base: u64) -> Result<Option<Loaded>, LoaderError> {
    let script = match fwc::find_file(fw, "etc/table-loader") {
        Ok(Some(f)) => f,
        Ok(None) => return Ok(None),
        Err(source) => {
            return Err(LoaderError::FwCfg {
                index: 0,
                name: table_loader::FileName::from_field(b"etc/table-loader"),
                source,
            });
        }
    };
    // SAFETY: [base, base + AREA_LEN) is RAM just below TSEG that the
    // firmware reserves for ACPI in the e820 it hands to Linux; nothing
    // else uses it.
    let area = unsafe { Region::new(base, AREA_LEN) };
    area.fill(0, AREA_LEN, 0);
    let mut buf = [0u8; 128 * 64];
    let len = (script.size as usize).min(buf.len());
    fw.select(script.select);
    fw.read(&mut buf[..len]);
    let mut env = Env { fw, area, next: 0 };
    table_loader::run(&mut env, &buf[..len]).map(Some)
}
