//! QEMU's fw_cfg device: port-selected items, bulk reads and writes by DMA.
//! Used only before Linux runs (boot-mode identity mapping: a buffer's
//! address is its physical address).

use x86_64::instructions::port::Port;

use smmvmi_boot::fw_cfg::{
    DATA_PORT, DMA_CTL_READ, DMA_PORT, DMA_PORT_LOW, DmaAccess, FwCfgError, FwCfgIo, SELECTOR_PORT,
};

use super::memory::Region;
use super::pmtimer;

/// The fw_cfg device. `dma` says whether the DMA interface is present
/// (QEMU >= 2.9); without it reads fall back to the data port and writes fail.
pub struct FwCfg {
    pub dma: bool,
}

impl FwCfg {
    /// Runs one DMA descriptor and waits for it (5 s at most).
    pub fn dma_transfer(&mut self, key: u16, desc: DmaAccess) -> Result<(), FwCfgError> {
        #[repr(C, align(16))]
        struct Desc([u8; 16]);
        let mut d = Desc(desc.to_be_bytes());
        let addr = &raw mut d as u64;
        // SAFETY: the descriptor lives on the boot stack, identity mapped, so
        // its virtual address is the physical address the device reads and
        // writes; it outlives the transfer because we wait for completion
        // below. The buffer it names was checked by the caller in the same way.
        unsafe {
            Port::<u32>::new(DMA_PORT).write(((addr >> 32) as u32).to_be());
            Port::<u32>::new(DMA_PORT_LOW).write((addr as u32).to_be());
        }
        let ctl = &raw const d.0;
        let mut result = Ok(false);
        let done = pmtimer::wait_until(5_000_000, || {
            // SAFETY: reads our own descriptor, which the device updates.
            let c = unsafe { core::ptr::read_volatile(ctl as *const [u8; 4]) };
            result = DmaAccess::completion(key, u32::from_be_bytes(c));
            !matches!(result, Ok(false))
        });
        match result {
            Ok(true) if done => Ok(()),
            Err(e) => Err(e),
            _ => Err(FwCfgError::DmaFailed {
                key,
                control: u32::MAX,
            }),
        }
    }
}

impl FwCfgIo for FwCfg {
    fn select(&mut self, key: u16) {
        // SAFETY: fw_cfg selector port; selecting an item has no other effect.
        unsafe { Port::<u16>::new(SELECTOR_PORT).write(key) };
    }

    fn read(&mut self, buf: &mut [u8]) {
        if self.dma && buf.len() > 64 {
            let desc = DmaAccess {
                control: DMA_CTL_READ,
                length: buf.len() as u32,
                address: buf.as_mut_ptr() as u64,
            };
            // Continues from the current position of the selected item.
            if self.dma_transfer(0, desc).is_ok() {
                return;
            }
            buf.fill(0);
            return;
        }
        let mut port = Port::<u8>::new(DATA_PORT);
        for b in buf.iter_mut() {
            // SAFETY: fw_cfg data port; each read advances the item.
            *b = unsafe { port.read() };
        }
    }

    fn write(&mut self, key: u16, data: &[u8]) -> Result<(), FwCfgError> {
        if !self.dma {
            return Err(FwCfgError::DmaUnsupported { key });
        }
        let desc = DmaAccess::select_write(key, data.len() as u32, data.as_ptr() as u64);
        self.dma_transfer(key, desc)
    }
}

impl FwCfg {
    /// Reads the whole item `key` (of `len` bytes) into physical memory at
    /// `dst`, which must be RAM the firmware owns (checked by the caller's
    /// layout plan).
    pub fn read_to(&mut self, key: u16, dst: &Region) -> Result<(), FwCfgError> {
        if self.dma {
            let desc = DmaAccess::select_read(key, dst.len() as u32, dst.base());
            return self.dma_transfer(key, desc);
        }
        self.select(key);
        let mut chunk = [0u8; 512];
        let mut off = 0;
        while off < dst.len() {
            let n = (dst.len() - off).min(chunk.len() as u64) as usize;
            self.read(&mut chunk[..n]);
            dst.write(off, &chunk[..n]);
            off += n as u64;
        }
        Ok(())
    }
}
