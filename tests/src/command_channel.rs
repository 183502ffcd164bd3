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
    #[error("command channel closed by QEMU while running `{0}` (QEMU exited?)")]
    Closed(String),
    #[error("command channel: malformed reply {0:?}")]
    Malformed(String),
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A connection to one VM's command socket.
pub struct CommandChannel {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
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
        })
    }

    /// Runs `command` with `sh` in the guest, as root; waits up to `timeout`.
    pub fn exec(&mut self, command: &str, timeout: Duration) -> Result<ExecOutput, ChannelError> {
        let id = format!(
            "{:x}-{:x}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        );
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
        let mut line = String::new();
        loop {
            line.clear();
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(ChannelError::Timeout {
                        command: command.to_string(),
                        timeout,
                    });
                }
                self.reader.get_ref().set_read_timeout(Some(left))?;
                let mut buf = Vec::new();
                match self.reader.read_until(b'\n', &mut buf) {
                    Ok(0) => return Err(ChannelError::Closed(command.to_string())),
                    Ok(_) => {
                        line.push_str(&String::from_utf8_lossy(&buf));
                        if line.ends_with('\n') {
                            break;
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        line.push_str(&String::from_utf8_lossy(&buf));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let text = line.trim_matches(|c| c == '\r' || c == '\n' || c == '\0');
            let mut words = text.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some("SMMVMI-OUT"), Some(i), None) if i == id => section = Section::Out,
                (Some("SMMVMI-ERR"), Some(i), None) if i == id => section = Section::Err,
                (Some("SMMVMI-END"), Some(i), Some(rc)) if i == id => {
                    let status = rc
                        .parse()
                        .map_err(|_| ChannelError::Malformed(text.into()))?;
                    return Ok(ExecOutput {
                        stdout: decode(&out)?,
                        stderr: decode(&err)?,
                        status,
                    });
                }
                (Some(tag), _, _) if tag.starts_with("SMMVMI-") => section = Section::None,
                _ => match section {
                    Section::Out => out.push_str(text),
                    Section::Err => err.push_str(text),
                    Section::None => {}
                },
            }
        }
    }
}

fn decode(b64: &str) -> Result<String, ChannelError> {
    let clean: String = b64.chars().filter(|c| !c.is_whitespace()).collect();
    let bytes = B64
        .decode(clean.as_bytes())
        .map_err(|_| ChannelError::Malformed(b64.into()))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}
