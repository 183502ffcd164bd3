//! PCI bus-0 enumeration and BAR assignment.
//!
//! Every function on bus 0 with a type-0 header gets its BARs sized (write
//! all ones, read back, restore) and assigned: I/O BARs from
//! [`IO_WINDOW_START`]..[`IO_WINDOW_END`], memory BARs (32- and 64-bit) from
//! the window the firmware passes, avoiding the MMCONFIG hole it names.
//! BARs are placed largest first so every one is naturally aligned without
//! padding. Decoding is off while sizing; afterwards I/O, memory and bus
//! mastering are enabled and the expansion ROM stays disabled.

use core::fmt;

use thiserror::Error;

/// Start of the I/O window for I/O BARs.
pub const IO_WINDOW_START: u64 = 0xC000;
/// End (exclusive) of the I/O window.
pub const IO_WINDOW_END: u64 = 0x1_0000;
/// Memory window the q35 firmware uses for 32-bit BARs.
pub const MEM_WINDOW: (u64, u64) = (0xC000_0000, 0xFEC0_0000);
/// Memory BARs are placed on at least page granularity.
pub const MEM_MIN_ALIGN: u64 = 0x1000;
/// Most BARs tracked.
pub const MAX_BARS: usize = 64;
/// Most functions with unsupported headers remembered.
pub const MAX_SKIPPED: usize = 16;

/// Config offsets.
pub mod reg {
    /// Vendor id (low 16) and device id (high 16).
    pub const ID: u8 = 0x00;
    /// Command (low 16) and status (high 16).
    pub const COMMAND: u8 = 0x04;
    /// Class code and revision.
    pub const CLASS: u8 = 0x08;
    /// Cache line, latency, header type (bits 23:16), BIST.
    pub const HEADER: u8 = 0x0C;
    /// First BAR.
    pub const BAR0: u8 = 0x10;
    /// Expansion ROM BAR (type 0).
    pub const ROM: u8 = 0x30;
}

/// Command register: I/O space decoding.
pub const CMD_IO: u32 = 1 << 0;
/// Command register: memory space decoding.
pub const CMD_MEM: u32 = 1 << 1;
/// Command register: bus mastering.
pub const CMD_BUS_MASTER: u32 = 1 << 2;

/// Bus/device/function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bdf {
    /// Bus.
    pub bus: u8,
    /// Device, 0..32.
    pub dev: u8,
    /// Function, 0..8.
    pub func: u8,
}

impl Bdf {
    /// A bus-0 function.
    pub const fn new(dev: u8, func: u8) -> Self {
        Self {
            bus: 0,
            dev: dev & 0x1f,
            func: func & 0x7,
        }
    }

    /// The 0xCF8 address for config register `off` (dword aligned).
    pub const fn cf8_address(&self, off: u8) -> u32 {
        0x8000_0000
            | ((self.bus as u32) << 16)
            | (((self.dev & 0x1f) as u32) << 11)
            | (((self.func & 0x7) as u32) << 8)
            | (off as u32 & 0xFC)
    }

    /// Offset of this function's config space in MMCONFIG.
    pub const fn mmconfig_offset(&self) -> u64 {
        ((self.bus as u64) << 20)
            | (((self.dev & 0x1f) as u64) << 15)
            | (((self.func & 7) as u64) << 12)
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.dev, self.func)
    }
}

/// Config space access, implemented by the firmware (0xCF8/0xCFC or MMCONFIG).
pub trait PciConfig {
    /// Read the dword at `off` (dword aligned).
    fn read32(&mut self, bdf: Bdf, off: u8) -> u32;
    /// Write the dword at `off` (dword aligned).
    fn write32(&mut self, bdf: Bdf, off: u8, v: u32);
}

/// Kind of BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// I/O space.
    Io,
    /// 32-bit memory.
    Mem32,
    /// 64-bit memory (occupies this and the next BAR slot).
    Mem64,
}

impl fmt::Display for BarKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Io => "I/O",
            Self::Mem32 => "32-bit memory",
            Self::Mem64 => "64-bit memory",
        })
    }
}

/// One assigned BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarAssignment {
    /// Function.
    pub bdf: Bdf,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// BAR index 0..6 (the low half for 64-bit BARs).
    pub bar: u8,
    /// Kind.
    pub kind: BarKind,
    /// Assigned address.
    pub addr: u64,
    /// Size in bytes (a power of two).
    pub size: u64,
}

impl BarAssignment {
    /// Exclusive end.
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// Windows to assign from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    /// I/O window `[start, end)`.
    pub io: (u64, u64),
    /// Memory window `[start, end)`.
    pub mem: (u64, u64),
    /// A range inside `mem` that must stay free (MMCONFIG), if any.
    pub mem_hole: Option<(u64, u64)>,
}

impl Default for Windows {
    fn default() -> Self {
        Self {
            io: (IO_WINDOW_START, IO_WINDOW_END),
            mem: MEM_WINDOW,
            mem_hole: None,
        }
    }
}

/// Errors of BAR assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PciError {
    /// A window has no room left for a BAR.
    #[error(
        "PCI {kind} window [{start:#x}, {end:#x}) is exhausted: {bdf} ({vendor:04x}:{device:04x}) BAR{bar} needs {size:#x} bytes; remove devices or shrink their BARs (e.g. the ivshmem size)"
    )]
    WindowExhausted {
        /// Function.
        bdf: Bdf,
        /// Vendor id.
        vendor: u16,
        /// Device id.
        device: u16,
        /// BAR index.
        bar: u8,
        /// BAR kind.
        kind: BarKind,
        /// Size needed.
        size: u64,
        /// Window start.
        start: u64,
        /// Window end.
        end: u64,
    },
    /// More BARs than [`MAX_BARS`].
    #[error(
        "PCI {bdf} has BARs beyond the {MAX_BARS} this firmware tracks; remove devices or raise MAX_BARS"
    )]
    TooManyBars {
        /// Function whose BAR did not fit.
        bdf: Bdf,
    },
}

/// Result of enumeration and assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assigned {
    bars: [Option<BarAssignment>; MAX_BARS],
    count: usize,
    skipped: [Option<(Bdf, u8)>; MAX_SKIPPED],
    skipped_count: usize,
}

impl Assigned {
    const fn new() -> Self {
        Self {
            bars: [None; MAX_BARS],
            count: 0,
            skipped: [None; MAX_SKIPPED],
            skipped_count: 0,
        }
    }

    /// All assigned BARs, largest first within each kind's allocation order.
    pub fn bars(&self) -> impl Iterator<Item = &BarAssignment> {
        self.bars.iter().take(self.count).flatten()
    }

    /// The BAR `bar` of the first function with `vendor:device`
    /// (e.g. `find(0x1af4, 0x1110, 2)` for the ivshmem-plain shared memory).
    pub fn find(&self, vendor: u16, device: u16, bar: u8) -> Option<&BarAssignment> {
        self.bars()
            .find(|b| b.vendor == vendor && b.device == device && b.bar == bar)
    }

    /// Functions whose header type is not 0 (bridges, CardBus) with that
    /// header type: present but left unconfigured.
    pub fn skipped(&self) -> impl Iterator<Item = &(Bdf, u8)> {
        self.skipped.iter().take(self.skipped_count).flatten()
    }

    fn push(&mut self, b: BarAssignment) -> Result<(), PciError> {
        let slot = self
            .bars
            .get_mut(self.count)
            .ok_or(PciError::TooManyBars { bdf: b.bdf })?;
        *slot = Some(b);
        self.count += 1;
        Ok(())
    }
}

fn align_up(v: u64, a: u64) -> Option<u64> {
    let mask = a.checked_sub(1)?;
    v.checked_add(mask).map(|x| x & !mask)
}

/// Size the BARs of one type-0 function and append them (unassigned, addr 0)
/// to `out`. Decoding must be off.
fn size_bars(
    cfg: &mut impl PciConfig,
    bdf: Bdf,
    vendor: u16,
    device: u16,
    out: &mut Assigned,
) -> Result<(), PciError> {
    let mut i = 0u8;
    while i < 6 {
        let off = reg::BAR0 + 4 * i;
        let orig = cfg.read32(bdf, off);
        cfg.write32(bdf, off, 0xFFFF_FFFF);
        let mask = cfg.read32(bdf, off);
        cfg.write32(bdf, off, orig);
        let this = i;
        i += 1;
        if mask == 0 || mask == 0xFFFF_FFFF && orig == 0xFFFF_FFFF {
            continue;
        }
        let (kind, size) = if mask & 1 == 1 {
            let mut m = mask & 0xFFFF_FFFC;
            if m & 0xFFFF_0000 == 0 {
                // 16-bit I/O decoders read 0 in the upper half.
                m |= 0xFFFF_0000;
            }
            (BarKind::Io, u64::from((!m).wrapping_add(1)))
        } else if mask & 0x6 == 0x4 && i < 6 {
            let hoff = reg::BAR0 + 4 * i;
            let horig = cfg.read32(bdf, hoff);
            cfg.write32(bdf, hoff, 0xFFFF_FFFF);
            let hmask = cfg.read32(bdf, hoff);
            cfg.write32(bdf, hoff, horig);
            i += 1;
            let m = (u64::from(hmask) << 32) | u64::from(mask & 0xFFFF_FFF0);
            (BarKind::Mem64, (!m).wrapping_add(1))
        } else {
            let m = mask & 0xFFFF_FFF0;
            (BarKind::Mem32, u64::from((!m).wrapping_add(1)))
        };
        if size == 0 || !size.is_power_of_two() {
            continue;
        }
        out.push(BarAssignment {
            bdf,
            vendor,
            device,
            bar: this,
            kind,
            addr: 0,
            size,
        })?;
    }
    Ok(())
}

/// Enumerate bus 0, size every BAR, assign addresses from `windows`, program
/// the BARs and enable decoding and bus mastering.
pub fn assign(cfg: &mut impl PciConfig, windows: &Windows) -> Result<Assigned, PciError> {
    let mut out = Assigned::new();
    for dev in 0..32u8 {
        let mut funcs = 1u8;
        let mut func = 0u8;
        while func < funcs {
            let bdf = Bdf::new(dev, func);
            func += 1;
            let id = cfg.read32(bdf, reg::ID);
            let vendor = (id & 0xFFFF) as u16;
            if vendor == 0xFFFF || vendor == 0 {
                continue;
            }
            let device = (id >> 16) as u16;
            let header = ((cfg.read32(bdf, reg::HEADER) >> 16) & 0xFF) as u8;
            if bdf.func == 0 && header & 0x80 != 0 {
                funcs = 8;
            }
            if header & 0x7F != 0 {
                if let Some(s) = out.skipped.get_mut(out.skipped_count) {
                    *s = Some((bdf, header & 0x7F));
                    out.skipped_count += 1;
                }
                continue;
            }
            let cmd = cfg.read32(bdf, reg::COMMAND);
            cfg.write32(bdf, reg::COMMAND, cmd & !(CMD_IO | CMD_MEM) & 0xFFFF);
            let before = out.count;
            size_bars(cfg, bdf, vendor, device, &mut out)?;
            cfg.write32(bdf, reg::ROM, 0);
            if out.count == before {
                // Nothing to assign (host bridge, LPC): leave decoding as it was.
                cfg.write32(bdf, reg::COMMAND, cmd & 0xFFFF);
            }
        }
    }
    // Largest first (stable insertion sort on the fixed array).
    let n = out.count.min(MAX_BARS);
    for i in 1..n {
        let mut j = i;
        while j > 0 {
            let size = |k: usize| out.bars.get(k).copied().flatten().map_or(0, |b| b.size);
            if size(j - 1) >= size(j) {
                break;
            }
            out.bars.swap(j - 1, j);
            j -= 1;
        }
    }
    let mut io_next = windows.io.0;
    let mut mem_next = windows.mem.0;
    for slot in out.bars.iter_mut().take(n) {
        let Some(b) = slot.as_mut() else { continue };
        let (next, window, align) = match b.kind {
            BarKind::Io => (&mut io_next, windows.io, b.size.max(4)),
            BarKind::Mem32 | BarKind::Mem64 => {
                (&mut mem_next, windows.mem, b.size.max(MEM_MIN_ALIGN))
            }
        };
        let exhausted = PciError::WindowExhausted {
            bdf: b.bdf,
            vendor: b.vendor,
            device: b.device,
            bar: b.bar,
            kind: b.kind,
            size: b.size,
            start: window.0,
            end: window.1,
        };
        let mut addr = align_up(*next, align).ok_or(exhausted)?;
        if b.kind != BarKind::Io
            && let Some((hs, he)) = windows.mem_hole
            && addr < he
            && addr.saturating_add(b.size) > hs
        {
            addr = align_up(he, align).ok_or(exhausted)?;
        }
        let end = addr.checked_add(b.size).ok_or(exhausted)?;
        if end > window.1 {
            return Err(exhausted);
        }
        *next = end;
        b.addr = addr;
    }
    // Program BARs, then enable decoding.
    for b in out.bars() {
        let off = reg::BAR0 + 4 * b.bar;
        cfg.write32(b.bdf, off, (b.addr & 0xFFFF_FFFF) as u32);
        if b.kind == BarKind::Mem64 {
            cfg.write32(b.bdf, off + 4, (b.addr >> 32) as u32);
        }
    }
    for dev in 0..32u8 {
        for func in 0..8u8 {
            let bdf = Bdf::new(dev, func);
            let mut enable = 0;
            for b in out.bars().filter(|b| b.bdf == bdf) {
                enable |= match b.kind {
                    BarKind::Io => CMD_IO,
                    BarKind::Mem32 | BarKind::Mem64 => CMD_MEM,
                };
            }
            if enable != 0 {
                let cmd = cfg.read32(bdf, reg::COMMAND) & 0xFFFF;
                cfg.write32(bdf, reg::COMMAND, cmd | enable | CMD_BUS_MASTER);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
