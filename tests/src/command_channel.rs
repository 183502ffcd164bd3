//! The host end of the guest command channel: QEMU's second serial port
//! (ttyS1 in the guest) exposed as a unix socket, served in the guest by
//! `smmvmi-cmdd` (tests/guest/cmdd.sh).
//!
//! Framing (one request at a time, every reply tagged with the request id,
//! payloads base64 so no byte of output can be mistaken for a frame):
//! ```text
//! host:  SMMVMI-EXEC <id> <base64 script>\n
//! guest: SMMVMI-OUT <id>\n <base64 stdout> SMMVMI-ERR <id>\n <base64 stderr> SMMVMI-END <id> <rc>\n
//! ```
//! Lines with another id (a reply to an earlier, abandoned request) are skipped.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

/// What a guest command produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: String,
    pub stderr: String,
    /// The shell's exit status (0..=255).
    pub status: i32,
}

/// Errors on the command channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("command socket {path}: {source} (is the VM running? `cargo xtask vm list`)")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("command channel: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "guest did not finish `{command}` within {timeout:?} (expected a SMMVMI-END line on ttyS1; \
         the command may hang, or the guest's command server died: see serial.log)"
    )]
    Timeout { command: String, timeout: Duration },
    #[error("command channel closed by QEMU (QEMU exited?)")]
    Closed,
    #[error(
        "the guest's command server did not answer a ping on ttyS1 within {timeout:?} \
         (expected SMMVMI-PONG; is /init running smmvmi-cmdd? see serial.log)"
    )]
    NoServer { timeout: Duration },
    #[error("command channel: malformed reply {0:?}")]
    Malformed(String),
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A connection to one VM's command socket.
pub struct CommandChannel {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    partial: Vec<u8>,
}

impl CommandChannel {
    pub fn connect(path: &Path) -> Result<Self, ChannelError> {
        let stream = UnixStream::connect(path).map_err(|source| ChannelError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        let writer = stream.try_clone()?;
        Ok(Self {
            reader: BufReader::new(stream),
            writer,
            partial: Vec::new(),
        })
    }

    /// Connects and waits (up to `timeout`) until the guest's command
    /// server answers a ping, so no request is lost to a UART being reset.
    pub fn connect_synced(path: &Path, timeout: Duration) -> Result<Self, ChannelError> {
        let mut channel = Self::connect(path)?;
        let deadline = Instant::now() + timeout;
        loop {
            let id = next_id();
            channel
                .writer
                .write_all(format!("SMMVMI-PING {id}\n").as_bytes())?;
            let round = (Instant::now() + Duration::from_millis(500)).min(deadline);
            while let Some(line) = channel.read_line_until(round)? {
                if line.split_whitespace().eq(["SMMVMI-PONG", id.as_str()]) {
                    return Ok(channel);
                }
            }
            if Instant::now() >= deadline {
                return Err(ChannelError::NoServer { timeout });
            }
        }
    }

    /// Runs `command` with `sh` in the guest, as root; waits up to `timeout`.
    pub fn exec(&mut self, command: &str, timeout: Duration) -> Result<ExecOutput, ChannelError> {
        let id = next_id();
        let request = format!("SMMVMI-EXEC {id} {}\n", B64.encode(command));
        self.writer.write_all(request.as_bytes())?;

        let deadline = Instant::now() + timeout;
        let (mut out, mut err) = (String::new(), String::new());
        #[derive(PartialEq)]
        enum Section {
            None,
            Out,
            Err,
        }
        let mut section = Section::None;
        loop {
            let Some(text) = self.read_line_until(deadline)? else {
                return Err(ChannelError::Timeout {
                    command: command.to_string(),
                    timeout,
                });
            };
            let mut words = text.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some("SMMVMI-OUT"), Some(i), None) if i == id => section = Section::Out,
                (Some("SMMVMI-ERR"), Some(i), None) if i == id => section = Section::Err,
                (Some("SMMVMI-END"), Some(i), Some(rc)) if i == id => {
                    let status = rc
                        .parse()
                        .map_err(|_| ChannelError::Malformed(text.clone()))?;
                    return Ok(ExecOutput {
                        stdout: decode(&out)?,
                        stderr: decode(&err)?,
                        status,
                    });
                }
                (Some(tag), _, _) if tag.starts_with("SMMVMI-") => section = Section::None,
                _ => match section {
                    Section::Out => out.push_str(&text),
                    Section::Err => err.push_str(&text),
                    Section::None => {}
                },
            }
        }
    }

    /// One line without its terminator, or `None` at the deadline.
    fn read_line_until(&mut self, deadline: Instant) -> Result<Option<String>, ChannelError> {
        let mut line = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // Keep a partial line for the next call.
                self.partial.extend_from_slice(&line);
                return Ok(None);
            }
            self.reader.get_ref().set_read_timeout(Some(left))?;
            match self.reader.read_until(b'\n', &mut line) {
                Ok(0) => return Err(ChannelError::Closed),
                Ok(_) if line.ends_with(b"\n") => {
                    let mut full = std::mem::take(&mut self.partial);
                    full.extend_from_slice(&line);
                    let text = String::from_utf8_lossy(&full);
                    return Ok(Some(
                        text.trim_matches(|c| c == '\r' || c == '\n' || c == '\0')
                            .to_string(),
                    ));
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn next_id() -> String {
    format!(
        "{:x}-{:x}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

fn decode(b64: &str) -> Result<String, ChannelError> {
    let clean: String = b64.chars().filter(|c| !c.is_whitespace()).collect();
    let bytes = B64
        .decode(clean.as_bytes())
        .map_err(|_| ChannelError::Malformed(b64.into()))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}
