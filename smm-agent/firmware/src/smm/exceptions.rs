//! CPU exceptions, wherever they happen. Before Linux, an exception is
//! reported on the debug console and stops the machine with a distinct code;
//! in SMM it is reported in the mailbox and the SMI returns (`smi.rs`). The
//! IDT itself is `hw::idt`.

use crate::hw::exit::{ExitCode, exit};
use crate::hw::idt::{self, Frame};

/// Called by `exc_common`. Before Linux it stops the machine; in SMM it
/// returns the faulting CPU's per-CPU block so the SMI can return.
// SAFETY: a unique symbol name, called only by `exc_common` (asm/smm.s)
// with the C ABI and a pointer to the frame it pushed, as declared.
#[unsafe(no_mangle)]
extern "C" fn exception_handler(frame: &Frame) -> u64 {
    if super::smi::in_smm() {
        return super::smi::on_exception(frame);
    }
    idt::describe(frame);
    exit(ExitCode::Exception)
}
