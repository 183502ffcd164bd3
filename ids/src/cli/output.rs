//! Where read bytes go: a hex dump (default), raw bytes to a file or a pipe
//! (`-o FILE`, `-o -`), JSON lines; and the progress bar, drawn on stderr
//! only when stderr is a terminal.

use std::io::{self, Write};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};

use super::read::{Holes, Sink};
use super::render::HexDump;

/// Raw bytes; holes become zeros (`--holes zero`) or nothing (`skip`).
pub struct RawSink<W: Write> {
    out: W,
    /// Bytes written.
    pub written: u64,
    hash: Sha256,
}

impl<W: Write> RawSink<W> {
    /// Raw output to `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            hash: Sha256::new(),
        }
    }

    /// Flushes and returns the SHA-256 of what was written.
    pub fn finish(mut self) -> io::Result<String> {
        self.out.flush()?;
        Ok(self
            .hash
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect())
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.hash.update(b);
        self.written += b.len() as u64;
        Ok(())
    }
}

impl<W: Write> Sink for RawSink<W> {
    fn data(&mut self, _addr: u64, bytes: &[u8]) -> io::Result<()> {
        self.put(bytes)
    }

    fn hole(&mut self, _addr: u64, len: u64, _reason: &str, policy: Holes) -> io::Result<()> {
        if policy == Holes::Zero {
            let zeros = [0u8; 4096];
            let mut left = len;
            while left > 0 {
                let n = left.min(4096) as usize;
                self.put(&zeros[..n])?;
                left -= n as u64;
            }
        }
        Ok(())
    }
}

/// A hex dump; a hole is a marked line whatever the policy.
pub struct HexSink<W: Write>(pub Option<HexDump<W>>);

impl<W: Write> Sink for HexSink<W> {
    fn data(&mut self, _addr: u64, bytes: &[u8]) -> io::Result<()> {
        self.0.as_mut().expect("open dump").write(bytes)
    }

    fn hole(&mut self, _addr: u64, len: u64, reason: &str, _: Holes) -> io::Result<()> {
        self.0.as_mut().expect("open dump").gap(len, reason)
    }
}

/// One JSON object per chunk (`{"addr","len","hex"}`) or hole
/// (`{"addr","len","hole"}`).
pub struct JsonlSink<W: Write>(pub W);

impl<W: Write> Sink for JsonlSink<W> {
    fn data(&mut self, addr: u64, bytes: &[u8]) -> io::Result<()> {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        writeln!(
            self.0,
            "{}",
            serde_json::json!({"addr": format!("{addr:#x}"), "len": bytes.len(), "hex": hex})
        )
    }

    fn hole(&mut self, addr: u64, len: u64, reason: &str, _: Holes) -> io::Result<()> {
        writeln!(
            self.0,
            "{}",
            serde_json::json!({"addr": format!("{addr:#x}"), "len": len, "hole": reason})
        )
    }
}

/// Collects the bytes as hex for one JSON document.
#[derive(Default)]
pub struct JsonSink {
    /// The bytes read, as hex (holes as zeros or left out, by policy).
    pub hex: String,
}

impl Sink for JsonSink {
    fn data(&mut self, _addr: u64, bytes: &[u8]) -> io::Result<()> {
        for b in bytes {
            self.hex.push_str(&format!("{b:02x}"));
        }
        Ok(())
    }

    fn hole(&mut self, _addr: u64, len: u64, _reason: &str, policy: Holes) -> io::Result<()> {
        if policy == Holes::Zero {
            self.hex.push_str(&"00".repeat(len as usize));
        }
        Ok(())
    }
}

/// A progress bar of `total` bytes on stderr, drawn only when stderr is a
/// terminal and `show` is true; hidden (a no-op) otherwise.
pub fn progress(total: u64, what: &str, show: bool) -> ProgressBar {
    use std::io::IsTerminal;
    if !show || !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_sink_zero_fills_and_hashes() {
        let mut s = RawSink::new(Vec::new());
        s.data(0, b"ab").unwrap();
        s.hole(2, 3, "x", Holes::Zero).unwrap();
        s.hole(5, 3, "x", Holes::Skip).unwrap();
        assert_eq!(s.written, 5);
        let h = s.finish().unwrap();
        // sha256 of "ab\0\0\0"
        let mut d = Sha256::new();
        d.update(b"ab\0\0\0");
        let want: String = d.finalize().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(h, want);
    }
}
