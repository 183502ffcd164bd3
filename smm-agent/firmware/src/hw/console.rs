//! The debug console: QEMU's `isa-debugcon` byte port (0x402).

use core::fmt::{self, Write};
use x86_64::instructions::port::Port;

/// QEMU `isa-debugcon` (`-global isa-debugcon.iobase=0x402`), a platform
/// fact shared with the harness.
use smmvmi_mailbox::platform::DEBUGCON_PORT;

struct DebugCon;

impl Write for DebugCon {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut port = Port::<u8>::new(DEBUGCON_PORT);
        for b in s.bytes() {
            // SAFETY: port 0x402 is QEMU's debug console; writing it has no
            // effect beyond logging the byte (and none at all when absent).
            unsafe { port.write(b) };
        }
        Ok(())
    }
}

/// Writes formatted text to the debug console.
pub fn print(args: fmt::Arguments) {
    let _ = DebugCon.write_fmt(args);
}

#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::hw::console::print(format_args!("smmvmi: {}\n", format_args!($($arg)*)))
    };
}
