//! Loading Linux from fw_cfg (`-kernel/-initrd/-append`) and entering it
//! through the 64-bit boot protocol. The planning (addresses, zero page) is
//! `smmvmi_boot::linux`; this module moves the bytes and jumps.

use smmvmi_boot::e820::E820Map;
use smmvmi_boot::fw_cfg::{self as fwc, FwCfgIo};
use smmvmi_boot::linux::{self, BootParamsInput, SetupHeader};

use smmvmi_boot::sev::Blob;

use super::error::BootError;
use super::measured::{self, Hasher};
use crate::hw::fw_cfg::FwCfg;
use crate::hw::memory::Region;
use crate::layout::{BOOT_PARAMS, CMDLINE, CMDLINE_MAX};
use crate::log;

/// Largest setup blob (boot sector + setup sectors) we accept.
const SETUP_MAX: usize = 0x8000;

/// What `prepare` loaded, ready for `enter`.
pub struct Prepared {
    entry64: u64,
}

/// Loads kernel, initrd and command line, checks them against the SEV
/// hashes table when there is one (`boot::measured`), and writes the zero
/// page. Usable low RAM is `[1 MiB, reserved_start)`.
pub fn prepare(
    fw: &mut FwCfg,
    e820: &E820Map,
    reserved_start: u64,
    rsdp: u64,
    sev_active: bool,
) -> Result<Prepared, BootError> {
    let measured = measured::hashes_table(sev_active)?;
    let kernel_size = u64::from(fwc::read_u32_le(fw, fwc::KERNEL_SIZE));
    let setup_size = fwc::read_u32_le(fw, fwc::SETUP_SIZE) as usize;
    if kernel_size == 0 || setup_size == 0 {
        return Err(BootError::NoKernel);
    }
    if setup_size > SETUP_MAX {
        return Err(BootError::SetupTooLarge {
            size: setup_size,
            max: SETUP_MAX,
        });
    }
    let mut setup = [0u8; SETUP_MAX];
    fw.select(fwc::SETUP_DATA);
    fw.read(&mut setup[..setup_size]);
    let setup = &setup[..setup_size];
    let hdr = SetupHeader::parse(setup).map_err(BootError::Kernel)?;
    let initrd_size = u64::from(fwc::read_u32_le(fw, fwc::INITRD_SIZE));
    let cmdline_size = u64::from(fwc::read_u32_le(fw, fwc::CMDLINE_SIZE));

    let low_ram_end = e820.lowmem_top().unwrap_or(0);
    let layout = linux::plan_layout(&hdr, low_ram_end, reserved_start, kernel_size, initrd_size)
        .map_err(BootError::KernelLayout)?;
    log!(
        "kernel {kernel_size} bytes at {:#x}, initrd {initrd_size} bytes at {:#x}, protocol {:#x}",
        layout.kernel_addr,
        layout.initrd_addr,
        hdr.version
    );

    // SAFETY: the planner put the kernel window inside usable low RAM above
    // the firmware (1 MiB and up, below the reserved top area); nothing the
    // firmware still needs lives there.
    let kernel = unsafe { Region::new(layout.kernel_addr, kernel_size) };
    fw.read_to(fwc::KERNEL_DATA, &kernel)
        .map_err(BootError::KernelRead)?;
    // QEMU hashes the setup blob followed by the kernel blob: the bzImage.
    measured::check(&measured, Blob::Kernel, || {
        let mut h = Hasher::new();
        h.bytes(setup);
        h.region(&kernel);
        h.finish()
    })?;
    if initrd_size != 0 {
        // SAFETY: as for the kernel; the planner keeps the initrd above the
        // kernel window and below the reserved area.
        let initrd = unsafe { Region::new(layout.initrd_addr, initrd_size) };
        fw.read_to(fwc::INITRD_DATA, &initrd)
            .map_err(BootError::InitrdRead)?;
        measured::check(&measured, Blob::Initrd, || {
            let mut h = Hasher::new();
            h.region(&initrd);
            h.finish()
        })?;
    } else {
        measured::check(&measured, Blob::Initrd, || Hasher::new().finish())?;
    }

    // SAFETY: CMDLINE is a fixed low-memory buffer for the command line
    // (layout.rs), unused by anything else.
    let cmdline = unsafe { Region::new(CMDLINE, CMDLINE_MAX) };
    let len = cmdline_size.min(CMDLINE_MAX - 1);
    hdr.check_cmdline(len.saturating_sub(1) as usize)
        .map_err(BootError::Kernel)?;
    cmdline.fill(0, CMDLINE_MAX, 0);
    if len > 0 {
        let mut chunk = [0u8; 256];
        fw.select(fwc::CMDLINE_DATA);
        let mut off = 0;
        while off < len {
            let n = (len - off).min(256) as usize;
            fw.read(&mut chunk[..n]);
            cmdline.write(off, &chunk[..n]);
            off += n as u64;
        }
    }
    // QEMU hashes the command line with its NUL (fw_cfg CMDLINE_SIZE
    // counts it); every byte of it was loaded above.
    measured::check(&measured, Blob::Cmdline, || {
        let mut h = Hasher::new();
        if let Some(r) = cmdline.sub(0, len) {
            h.region(&r);
        }
        h.finish()
    })?;
    if matches!(measured, smmvmi_boot::sev::Measured::Check(_)) {
        log!("measured boot: kernel, initrd and command line match the SEV hashes table");
    }

    let params = linux::build_boot_params(&BootParamsInput {
        setup,
        cmdline_addr: CMDLINE,
        initrd_addr: layout.initrd_addr,
        initrd_size,
        e820,
        rsdp,
    });
    // SAFETY: BOOT_PARAMS is the fixed zero-page location (layout.rs).
    let zero_page = unsafe { Region::new(BOOT_PARAMS, params.len() as u64) };
    zero_page.write(0, &params);
    Ok(Prepared {
        entry64: layout.entry64,
    })
}

/// Jumps to the kernel's 64-bit entry with RSI = &boot_params. The boot GDT
/// (selectors 0x10 code, 0x18 data, as the protocol asks) and the identity
/// mapping of the low 4 GiB are still in place; interrupts are off.
pub fn enter(p: Prepared) -> ! {
    log!("entering Linux at {:#x}", p.entry64);
    scrub_dead_stack();
    // SAFETY: the kernel and zero page were loaded by `prepare`; the boot
    // protocol's entry conditions hold (see above). Control never returns.
    unsafe {
        core::arch::asm!(
            "cli",
            "xor ebp, ebp",
            "jmp {entry}",
            entry = in(reg) p.entry64,
            in("rsi") BOOT_PARAMS,
            options(noreturn)
        )
    }
}

// SAFETY: the bottom label of the boot stack in `asm/reset.s`; only its
// address is taken.
unsafe extern "C" {
    static boot_stack: u8;
}

/// Wipes the part of the boot stack below the current frame: key material
/// from provisioning (HKDF state, key schedules) lived in frames that have
/// returned, and the boot stack is RAM that Linux will reuse.
fn scrub_dead_stack() {
    let bottom = (&raw const boot_stack) as u64;
    let rsp: u64;
    // SAFETY: reads RSP only.
    unsafe {
        core::arch::asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack, preserves_flags))
    };
    // Keep a red-zone-sized margin below the live frame.
    let end = rsp.saturating_sub(256);
    if end > bottom {
        // SAFETY: [bottom, end) is the unused part of this CPU's boot stack
        // (below every live frame and the red zone); `rep stosb` writes only
        // there.
        unsafe {
            core::arch::asm!(
                "rep stosb",
                inout("rdi") bottom => _,
                inout("rcx") end - bottom => _,
                in("al") 0u8,
                options(nostack, preserves_flags)
            )
        };
    }
}
