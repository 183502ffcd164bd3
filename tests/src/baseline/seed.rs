//! The published design's proxy, run inside the monitored VM: it writes
//! the mailbox (the ivshmem shared-memory BAR, mapped from sysfs)
//! and raises the SMI by writing the APM control port 0xB2 (`ioperm`, then
//! `out`; Debian's cloud kernel has no `/dev/port`), as a guest root
//! process can. The SMM agent serves as it always does.

use std::fs::OpenOptions;
use std::time::{Duration, Instant};

use smmvmi_mailbox::client::post_request;
use smmvmi_mailbox::header::SESSION_SALT_LEN;
use smmvmi_mailbox::layout;
use smmvmi_mailbox::platform::{
    APM_CMD_SERVE, APM_CNT_PORT, IVSHMEM_BAR_SHMEM, IVSHMEM_DEVICE_ID, IVSHMEM_VENDOR_ID,
};
use smmvmi_mailbox::shared::{AccessError, SharedMemory};

use super::wire::Backend;

/// The mailbox BAR, mapped from its sysfs `resource2` file (as guest root
/// can: `/dev/mem` reads of the BAR fail with EFAULT on Debian's kernel).
pub struct BarMailbox {
    map: memmap2::MmapRaw,
    size: usize,
}

impl BarMailbox {
    /// Finds the ivshmem device in sysfs and maps its shared-memory BAR.
    pub fn find() -> Result<Self, String> {
        let dir = std::fs::read_dir("/sys/bus/pci/devices")
            .map_err(|e| format!("/sys/bus/pci/devices: {e}"))?;
        for dev in dir.filter_map(|e| e.ok()).map(|e| e.path()) {
            let id = |f: &str| {
                std::fs::read_to_string(dev.join(f))
                    .ok()
                    .and_then(|s| u16::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
            };
            if id("vendor") != Some(IVSHMEM_VENDOR_ID) || id("device") != Some(IVSHMEM_DEVICE_ID) {
                continue;
            }
            let path = dev.join(format!("resource{IVSHMEM_BAR_SHMEM}"));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| format!("open {}: {e}", path.display()))?;
            let map = memmap2::MmapRaw::map_raw(&file)
                .map_err(|e| format!("mmap {}: {e}", path.display()))?;
            let size = map.len();
            return Ok(Self { map, size });
        }
        Err("no ivshmem device (1af4:1110) in /sys/bus/pci/devices".into())
    }

    fn ptr(&self, off: usize, len: usize, align: usize) -> Result<*mut u8, AccessError> {
        smmvmi_mailbox::shared::check_access(self.size, off, len, align)?;
        // In bounds: checked just above against the mapping's length.
        Ok(self.map.as_mut_ptr().wrapping_add(off))
    }
}

impl SharedMemory for BarMailbox {
    type Error = AccessError;
    fn size(&self) -> usize {
        self.size
    }
    fn load_u32(&self, off: usize) -> Result<u32, AccessError> {
        let p = self.ptr(off, 4, 4)?.cast::<u32>();
        // SAFETY: `p` is 4-byte aligned and inside the live mapping
        // (checked); the agent writes the BAR concurrently, hence volatile.
        Ok(u32::from_le(unsafe { p.read_volatile() }))
    }
    fn load_u64(&self, off: usize) -> Result<u64, AccessError> {
        let p = self.ptr(off, 8, 8)?.cast::<u64>();
        // SAFETY: as in `load_u32`, 8-byte aligned.
        Ok(u64::from_le(unsafe { p.read_volatile() }))
    }
    fn store_u32(&self, off: usize, v: u32) -> Result<(), AccessError> {
        let p = self.ptr(off, 4, 4)?.cast::<u32>();
        // SAFETY: aligned, inside the live writable mapping (checked).
        unsafe { p.write_volatile(v.to_le()) };
        Ok(())
    }
    fn store_u64(&self, off: usize, v: u64) -> Result<(), AccessError> {
        let p = self.ptr(off, 8, 8)?.cast::<u64>();
        // SAFETY: aligned, inside the live writable mapping (checked).
        unsafe { p.write_volatile(v.to_le()) };
        Ok(())
    }
    fn copy_out(&self, off: usize, dst: &mut [u8]) -> Result<(), AccessError> {
        let p = self.ptr(off, dst.len(), 1)?;
        // Eight bytes per volatile load where aligned, then the tail.
        let mut i = 0;
        while i < dst.len() {
            let q = p.wrapping_add(i);
            if (q as usize).is_multiple_of(8) && dst.len() - i >= 8 {
                // SAFETY: `q` is 8-byte aligned and `q..q + 8` lies inside
                // the checked range of the live mapping.
                let v = unsafe { q.cast::<u64>().read_volatile() };
                dst[i..i + 8].copy_from_slice(&v.to_ne_bytes());
                i += 8;
            } else {
                // SAFETY: `q` is inside the checked range of the mapping.
                dst[i] = unsafe { q.read_volatile() };
                i += 1;
            }
        }
        Ok(())
    }
    fn copy_in(&self, off: usize, src: &[u8]) -> Result<(), AccessError> {
        let p = self.ptr(off, src.len(), 1)?;
        for (i, s) in src.iter().enumerate() {
            // SAFETY: `p + i` is inside the checked range of the mapping.
            unsafe { p.add(i).write_volatile(*s) };
        }
        Ok(())
    }
}

/// The proxy: the mailbox plus the APM control port for the SMI.
pub struct SeedProxy {
    mailbox: BarMailbox,
    doorbell: u64,
}

impl SeedProxy {
    /// Opens the mailbox BAR and gets access to the APM control port.
    pub fn open() -> Result<Self, String> {
        // SAFETY: ioperm(2) only changes this process's I/O permission
        // bitmap (for the one APM control port); it touches no memory.
        if unsafe { libc::ioperm(u64::from(APM_CNT_PORT), 1, 1) } != 0 {
            return Err(format!(
                "ioperm({APM_CNT_PORT:#x}): {} (run as root)",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Self {
            mailbox: BarMailbox::find()?,
            doorbell: host_injector::transact::fresh_doorbell(0),
        })
    }

    fn raise(&self) -> Result<(), String> {
        let mut port = x86_64::instructions::port::PortWriteOnly::<u8>::new(APM_CNT_PORT);
        // SAFETY: `open` got this process access to the APM control port
        // (ICH9 APM_CNT); writing it raises an SMI and has no other effect
        // on this process's memory.
        unsafe { port.write(APM_CMD_SERVE) };
        Ok(())
    }
}

impl Backend for SeedProxy {
    fn header(&mut self) -> Result<(u32, [u8; SESSION_SALT_LEN]), String> {
        let state = self
            .mailbox
            .load_u32(layout::OFF_STATE)
            .map_err(|e| e.to_string())?;
        let mut salt = [0u8; SESSION_SALT_LEN];
        self.mailbox
            .copy_out(layout::OFF_SESSION_SALT, &mut salt)
            .map_err(|e| e.to_string())?;
        Ok((state, salt))
    }

    fn transact(&mut self, frame: &[u8]) -> Result<(u32, u64, Duration, Vec<u8>), String> {
        let started = Instant::now();
        self.doorbell = host_injector::transact::fresh_doorbell(self.doorbell);
        post_request(&self.mailbox, frame, self.doorbell).map_err(|e| format!("{e:?}"))?;
        self.raise()?;
        let end = Instant::now() + Duration::from_secs(10);
        let mut next_raise = Instant::now() + Duration::from_millis(10);
        loop {
            if let Some((status, reply)) = super::take_reply(&self.mailbox, self.doorbell)? {
                let cycles = self
                    .mailbox
                    .load_u64(layout::OFF_SERVE_CYCLES)
                    .map_err(|e| e.to_string())?;
                return Ok((status, cycles, started.elapsed(), reply));
            }
            let now = Instant::now();
            if now >= end {
                return Err("the agent did not answer within 10 s".into());
            }
            if now >= next_raise {
                self.raise()?;
                next_raise = now + Duration::from_millis(10);
            }
            std::thread::yield_now();
        }
    }
}
