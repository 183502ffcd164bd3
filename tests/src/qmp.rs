//! The QEMU Machine Protocol client. It lives in the host-injector library
//! (which raises SMIs over it); the harness re-exports it unchanged.

pub use host_injector::qmp::{Qmp, QmpError};
