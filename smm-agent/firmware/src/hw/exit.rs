//! Stopping the machine with a distinct code when boot cannot go on.
//!
//! With `-device isa-debug-exit,iobase=0xf4,iosize=4`, writing `v` to port
//! 0xf4 makes QEMU exit with status `(v << 1) | 1`. Without the device the
//! write does nothing and the CPU halts forever with interrupts off, after the
//! reason has been printed on the debug console.

use x86_64::instructions::port::Port;

/// QEMU `isa-debug-exit` (`-device isa-debug-exit,iobase=0xf4,iosize=4`).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// Why the firmware stopped. QEMU's exit status is `(code << 1) | 1`.
#[derive(Clone, Copy, Debug)]
#[repr(u32)]
pub enum ExitCode {
    /// No kernel was given (`-kernel` missing).
    NoKernel = 0x10,
    /// The kernel is not a 64-bit bzImage this firmware can boot.
    BadKernel = 0x11,
    /// QEMU supplied no ACPI tables (`etc/table-loader` missing or malformed).
    NoAcpi = 0x12,
    /// The machine has no SMRAM (`-machine smm=off`) or no SMI support.
    NoSmram = 0x13,
    /// Not enough RAM below 4 GiB for TSEG, the tables, kernel and initrd.
    TooLittleRam = 0x14,
    /// fw_cfg is missing or does not speak the interface we need.
    FwCfg = 0x15,
    /// PCI resources could not be assigned.
    Pci = 0x16,
    /// SMM bring-up failed (relocation, lock, self-test).
    SmmSetup = 0x17,
    /// A CPU exception in the firmware before Linux.
    Exception = 0x1e,
    /// A Rust panic in the firmware.
    Panic = 0x1f,
}

/// Stops the machine with `code`.
pub fn exit(code: ExitCode) -> ! {
    let mut port = Port::<u32>::new(DEBUG_EXIT_PORT);
    // SAFETY: port 0xf4 is the isa-debug-exit device; writing it ends the
    // VM, which is what we want. Without the device the write is ignored.
    unsafe { port.write(code as u32) };
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}
