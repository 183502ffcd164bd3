//! The published design's proxy, run inside the monitored VM: it writes
//! the mailbox (the ivshmem shared-memory BAR, reached through `/dev/mem`)
//! and raises the SMI by writing the APM control port (`/dev/port` at
//! 0xB2), as a guest process can. The SMM agent serves as it always does.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use smmvmi_mailbox::client::{Poll, copy_reply, poll_reply, post_request};
use smmvmi_mailbox::header::{SESSION_SALT_LEN, ServeStatus};
use smmvmi_mailbox::layout;
use smmvmi_mailbox::platform::{
    APM_CMD_SERVE, APM_CNT_PORT, IVSHMEM_BAR_SHMEM, IVSHMEM_DEVICE_ID, IVSHMEM_VENDOR_ID,
};
use smmvmi_mailbox::shared::{AccessError, SharedMemory};

use super::wire::Backend;

/// The mailbox BAR through `/dev/mem` (pread/pwrite at its physical address).
pub struct DevMemMailbox {
    file: File,
    base: u64,
    size: usize,
}

/// Errors of [`DevMemMailbox`].
#[derive(Debug, thiserror::Error)]
pub enum DevMemError {
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error("/dev/mem: {0}")]
    Io(#[from] std::io::Error),
}

impl DevMemMailbox {
    /// Finds the ivshmem device in sysfs and opens its shared-memory BAR.
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
            let res = std::fs::read_to_string(dev.join("resource"))
                .map_err(|e| format!("{}/resource: {e}", dev.display()))?;
            let line = res
                .lines()
                .nth(usize::from(IVSHMEM_BAR_SHMEM))
                .ok_or("ivshmem resource file has no BAR2 line")?;
            let mut w = line
                .split_whitespace()
                .map(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16));
            let (Some(Ok(start)), Some(Ok(end))) = (w.next(), w.next()) else {
                return Err(format!("ivshmem BAR2 line {line:?}: expected start and end"));
            };
            if start == 0 || end <= start {
                return Err(format!("ivshmem BAR2 not assigned: {line:?}"));
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/mem")
                .map_err(|e| format!("open /dev/mem: {e}"))?;
            return Ok(Self {
                file,
                base: start,
                size: (end - start + 1) as usize,
            });
        }
        Err("no ivshmem device (1af4:1110) in /sys/bus/pci/devices".into())
    }

    fn pread<const N: usize>(&self, off: usize) -> Result<[u8; N], DevMemError> {
        smmvmi_mailbox::shared::check_access(self.size, off, N, N)?;
        let mut b = [0u8; N];
        self.file.read_exact_at(&mut b, self.base + off as u64)?;
        Ok(b)
    }
}

impl SharedMemory for DevMemMailbox {
    type Error = DevMemError;
    fn size(&self) -> usize {
        self.size
    }
    fn load_u32(&self, off: usize) -> Result<u32, DevMemError> {
        Ok(u32::from_le_bytes(self.pread(off)?))
    }
    fn load_u64(&self, off: usize) -> Result<u64, DevMemError> {
        Ok(u64::from_le_bytes(self.pread(off)?))
    }
    fn store_u32(&self, off: usize, v: u32) -> Result<(), DevMemError> {
        smmvmi_mailbox::shared::check_access(self.size, off, 4, 4)?;
        Ok(self.file.write_all_at(&v.to_le_bytes(), self.base + off as u64)?)
    }
    fn store_u64(&self, off: usize, v: u64) -> Result<(), DevMemError> {
        smmvmi_mailbox::shared::check_access(self.size, off, 8, 8)?;
        Ok(self.file.write_all_at(&v.to_le_bytes(), self.base + off as u64)?)
    }
    fn copy_out(&self, off: usize, dst: &mut [u8]) -> Result<(), DevMemError> {
        smmvmi_mailbox::shared::check_access(self.size, off, dst.len(), 1)?;
        Ok(self.file.read_exact_at(dst, self.base + off as u64)?)
    }
    fn copy_in(&self, off: usize, src: &[u8]) -> Result<(), DevMemError> {
        smmvmi_mailbox::shared::check_access(self.size, off, src.len(), 1)?;
        Ok(self.file.write_all_at(src, self.base + off as u64)?)
    }
}

/// The proxy: the mailbox plus `/dev/port` for the APM SMI.
pub struct SeedProxy {
    mailbox: DevMemMailbox,
    port: File,
    doorbell: u64,
}

impl SeedProxy {
    /// Opens the mailbox BAR and `/dev/port`.
    pub fn open() -> Result<Self, String> {
        let port = OpenOptions::new()
            .write(true)
            .open("/dev/port")
            .map_err(|e| format!("open /dev/port: {e}"))?;
        Ok(Self {
            mailbox: DevMemMailbox::find()?,
            port,
            doorbell: host_injector::transact::fresh_doorbell(0),
        })
    }

    fn raise(&self) -> Result<(), String> {
        self.port
            .write_all_at(&[APM_CMD_SERVE], u64::from(APM_CNT_PORT))
            .map_err(|e| format!("/dev/port APM write: {e}"))
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

    fn transact(&mut self, frame: &[u8]) -> Result<(u32, u64, Vec<u8>), String> {
        self.doorbell = host_injector::transact::fresh_doorbell(self.doorbell);
        post_request(&self.mailbox, frame, self.doorbell).map_err(|e| format!("{e:?}"))?;
        self.raise()?;
        let end = Instant::now() + Duration::from_secs(10);
        let mut next_raise = Instant::now() + Duration::from_millis(10);
        loop {
            if let Poll::Done { status, reply_len } =
                poll_reply(&self.mailbox, self.doorbell).map_err(|e| e.to_string())?
            {
                if !matches!(
                    ServeStatus::from_raw(status),
                    Some(ServeStatus::Ok | ServeStatus::Unprovisioned)
                ) {
                    return Err(format!("agent refused the request: serve status {status}"));
                }
                let mut reply = vec![0u8; reply_len];
                copy_reply(&self.mailbox, &mut reply).map_err(|e| e.to_string())?;
                let cycles = self
                    .mailbox
                    .load_u64(layout::OFF_SERVE_CYCLES)
                    .map_err(|e| e.to_string())?;
                return Ok((status, cycles, reply));
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
