//! QEMU's fw_cfg device: port-selected items, bulk reads and writes by DMA.
//! Used only before Linux runs.
//!
//! The device reads and writes guest memory only in the fw_cfg DMA area
//! (`layout::FW_CFG_DMA_AREA`): the descriptor, then a bounce buffer that
//! every transfer goes through in chunks, copied to or from firmware memory
//! by the CPU. Under AMD SEV that area is the RAM the boot page tables map
//! shared (`boot::paging`), since QEMU can neither read nor write encrypted
//! memory; without SEV the same path runs, so every boot exercises it.

use core::sync::atomic::{Ordering, compiler_fence};

use x86_64::instructions::port::Port;

use smmvmi_boot::fw_cfg::{
    DATA_PORT, DMA_CTL_READ, DMA_CTL_WRITE, DMA_PORT, DMA_PORT_LOW, DmaAccess, FwCfgError, FwCfgIo,
    SELECTOR_PORT,
};

use super::memory::Region;
use super::pmtimer;
use crate::layout::{FW_CFG_BOUNCE, FW_CFG_BOUNCE_LEN, FW_CFG_DMA_DESC};

/// The fw_cfg device. `dma` says whether the DMA interface is present
/// (QEMU >= 2.9); without it reads fall back to the data port and writes fail.
pub struct FwCfg {
    pub dma: bool,
}

/// The DMA descriptor and the bounce buffer.
fn dma_area() -> (Region, Region) {
    // SAFETY: the fw_cfg DMA area (layout.rs): low RAM reserved for this
    // device before Linux, identity mapped by the boot page tables (shared
    // under SEV); only `FwCfg`, used by the boot CPU alone, touches it.
    unsafe {
        (
            Region::new(FW_CFG_DMA_DESC, DmaAccess::LEN as u64),
            Region::new(FW_CFG_BOUNCE, FW_CFG_BOUNCE_LEN),
        )
    }
}

impl FwCfg {
    /// Runs one DMA descriptor (its data in the bounce buffer) and waits for
    /// it (5 s at most).
    fn dma_run(&mut self, key: u16, control: u32, length: u32) -> Result<(), FwCfgError> {
        let (desc, _) = dma_area();
        let d = DmaAccess {
            control,
            length,
            address: FW_CFG_BOUNCE,
        };
        desc.write_volatile(0, &d.to_be_bytes());
        // The port writes below are `nomem` asm: keep the descriptor and the
        // bounce buffer's contents before them.
        compiler_fence(Ordering::SeqCst);
        // SAFETY: the fw_cfg DMA address ports; the descriptor they name is
        // in the DMA area, which the device may read and write, and we wait
        // for completion below before touching it or the bounce buffer.
        unsafe {
            Port::<u32>::new(DMA_PORT).write(((FW_CFG_DMA_DESC >> 32) as u32).to_be());
            Port::<u32>::new(DMA_PORT_LOW).write((FW_CFG_DMA_DESC as u32).to_be());
        }
        let mut result = Ok(false);
        let done = pmtimer::wait_until(5_000_000, || {
            // The control word, big-endian, as the device updates it.
            result = DmaAccess::completion(key, u32::from_be(desc.read_u32(0)));
            !matches!(result, Ok(false))
        });
        // What the device wrote into the bounce buffer is read after this.
        compiler_fence(Ordering::SeqCst);
        match result {
            Ok(true) if done => Ok(()),
            Err(e) => Err(e),
            _ => Err(FwCfgError::DmaFailed {
                key,
                control: u32::MAX,
            }),
        }
    }

    /// Reads `len` bytes by DMA in bounce-sized chunks, handing each to
    /// `sink(offset, chunk)`; `select` makes the first chunk select `key`
    /// (else the transfer continues in the selected item).
    fn dma_read(
        &mut self,
        key: u16,
        select: bool,
        len: u64,
        mut sink: impl FnMut(u64, &Region),
    ) -> Result<(), FwCfgError> {
        let (_, bounce) = dma_area();
        let mut off = 0;
        while off < len {
            let n = (len - off).min(FW_CFG_BOUNCE_LEN);
            let control = if select && off == 0 {
                DmaAccess::select_read(key, 0, 0).control
            } else {
                DMA_CTL_READ
            };
            self.dma_run(key, control, n as u32)?;
            sink(off, &bounce.sub(0, n).expect("n <= bounce length"));
            off += n;
        }
        Ok(())
    }

    /// Writes `data` into `key` by DMA through the bounce buffer (which is
    /// zeroed again afterwards); `select` makes the first chunk select `key`.
    fn dma_write(&mut self, key: u16, select: bool, data: &[u8]) -> Result<(), FwCfgError> {
        let (_, bounce) = dma_area();
        let mut result = Ok(());
        for (i, chunk) in data.chunks(FW_CFG_BOUNCE_LEN as usize).enumerate() {
            bounce.write(0, chunk);
            let control = if select && i == 0 {
                DmaAccess::select_write(key, 0, 0).control
            } else {
                DMA_CTL_WRITE
            };
            result = self.dma_run(key, control, chunk.len() as u32);
            bounce.fill(0, chunk.len() as u64, 0);
            if result.is_err() {
                break;
            }
        }
        result
    }

    /// Writes `data` into item `key` at `offset` (DMA only).
    pub fn write_at(&mut self, key: u16, offset: u32, data: &[u8]) -> Result<(), FwCfgError> {
        if !self.dma {
            return Err(FwCfgError::DmaUnsupported { key });
        }
        self.dma_run(key, DmaAccess::select_skip(key, 0).control, offset)?;
        self.dma_write(key, false, data)
    }
}

impl FwCfgIo for FwCfg {
    fn select(&mut self, key: u16) {
        // SAFETY: fw_cfg selector port; selecting an item has no other effect.
        unsafe { Port::<u16>::new(SELECTOR_PORT).write(key) };
    }

    fn read(&mut self, buf: &mut [u8]) {
        if self.dma && buf.len() > 64 {
            let len = buf.len() as u64;
            // Continues from the current position of the selected item.
            let r = self.dma_read(0, false, len, |off, chunk| {
                let n = chunk.len() as usize;
                let at = off as usize;
                chunk.read(0, &mut buf[at..at + n]);
                chunk.fill(0, n as u64, 0);
            });
            if r.is_err() {
                buf.fill(0);
            }
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
        self.dma_write(key, true, data)
    }
}

impl FwCfg {
    /// Reads the whole item `key` (of `len` bytes) into physical memory at
    /// `dst`, which must be RAM the firmware owns (checked by the caller's
    /// layout plan).
    pub fn read_to(&mut self, key: u16, dst: &Region) -> Result<(), FwCfgError> {
        if self.dma {
            return self.dma_read(key, true, dst.len(), |off, chunk| {
                chunk.copy_to(0, dst, off, chunk.len());
            });
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
