//! Stopping the machine with a distinct code when boot cannot go on.
//!
//! With `-device isa-debug-exit,iobase=0xf4,iosize=4`, writing `v` to port
//! 0xf4 makes QEMU exit with status `(v << 1) | 1`. Without the device the
//! write does nothing and the CPU halts forever with interrupts off, after the
//! reason has been printed on the debug console.

use x86_64::instructions::port::Port;

/// QEMU `isa-debug-exit` (`-device isa-debug-exit,iobase=0xf4,iosize=4`),
/// a platform fact shared with the harness.
use smmvmi_mailbox::platform::DEBUG_EXIT_PORT;

/// Why the firmware stopped: the codes the harness decodes too.
pub use smmvmi_mailbox::platform::ExitCode;

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
