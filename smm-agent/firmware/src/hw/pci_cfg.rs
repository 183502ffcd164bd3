//! PCI configuration space through the 0xCF8/0xCFC mechanism (bus 0..255).

use x86_64::instructions::port::Port;

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

fn address(bus: u8, dev: u8, func: u8, off: u8) -> u32 {
    0x8000_0000
        | (u32::from(bus) << 16)
        | (u32::from(dev & 0x1f) << 11)
        | (u32::from(func & 7) << 8)
        | u32::from(off & 0xfc)
}

pub fn read32(bus: u8, dev: u8, func: u8, off: u8) -> u32 {
    // SAFETY: the PCI configuration mechanism #1 ports; reading config
    // space has no side effects on q35 devices.
    unsafe {
        Port::<u32>::new(CONFIG_ADDRESS).write(address(bus, dev, func, off));
        Port::<u32>::new(CONFIG_DATA).read()
    }
}

pub fn write32(bus: u8, dev: u8, func: u8, off: u8, v: u32) {
    // SAFETY: the PCI configuration mechanism #1 ports; the firmware owns
    // the machine's configuration before Linux runs.
    unsafe {
        Port::<u32>::new(CONFIG_ADDRESS).write(address(bus, dev, func, off));
        Port::<u32>::new(CONFIG_DATA).write(v);
    }
}

pub fn read8(bus: u8, dev: u8, func: u8, off: u8) -> u8 {
    (read32(bus, dev, func, off) >> ((off & 3) * 8)) as u8
}

pub fn read16(bus: u8, dev: u8, func: u8, off: u8) -> u16 {
    (read32(bus, dev, func, off) >> ((off & 2) * 8)) as u16
}

pub fn write8(bus: u8, dev: u8, func: u8, off: u8, v: u8) {
    // SAFETY: byte-wide access to the data port selects the byte lane;
    // same mechanism as `write32`.
    unsafe {
        Port::<u32>::new(CONFIG_ADDRESS).write(address(bus, dev, func, off));
        Port::<u8>::new(CONFIG_DATA + u16::from(off & 3)).write(v);
    }
}

pub fn write16(bus: u8, dev: u8, func: u8, off: u8, v: u16) {
    // SAFETY: word-wide access to the data port; same as `write32`.
    unsafe {
        Port::<u32>::new(CONFIG_ADDRESS).write(address(bus, dev, func, off));
        Port::<u16>::new(CONFIG_DATA + u16::from(off & 2)).write(v);
    }
}

/// Saves CONFIG_ADDRESS on creation and restores it on drop: SMM code uses
/// this so that an OS interrupted between its 0xCF8 and 0xCFC accesses
/// finds its address latch as it left it.
pub struct AddressLatchGuard(u32);

impl AddressLatchGuard {
    pub fn save() -> Self {
        // SAFETY: reading CONFIG_ADDRESS has no side effects.
        Self(unsafe { Port::<u32>::new(CONFIG_ADDRESS).read() })
    }
}

impl Drop for AddressLatchGuard {
    fn drop(&mut self) {
        // SAFETY: restores the value the interrupted code had latched.
        unsafe { Port::<u32>::new(CONFIG_ADDRESS).write(self.0) };
    }
}

/// Configuration space for the BAR assignment logic in `smmvmi_boot::pci`.
pub struct Cf8;

impl smmvmi_boot::pci::PciConfig for Cf8 {
    fn read32(&mut self, bdf: smmvmi_boot::pci::Bdf, off: u8) -> u32 {
        read32(bdf.bus, bdf.dev, bdf.func, off)
    }

    fn write32(&mut self, bdf: smmvmi_boot::pci::Bdf, off: u8, v: u32) {
        write32(bdf.bus, bdf.dev, bdf.func, off, v)
    }
}
