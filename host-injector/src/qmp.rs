//! A small client for the QEMU Machine Protocol over a unix socket:
//! greeting, `qmp_capabilities`, then `execute` commands one at a time.
//! Asynchronous events are kept by name for [`Qmp::take_events`]. Every
//! read has a deadline.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Errors talking QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {path}: {source} (is the VM running? `cargo xtask vm list`)")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("QMP: {0} (QEMU may have exited; see qemu.log in the VM state dir)")]
    Io(#[from] std::io::Error),
    #[error("QMP: no reply within {0:?}")]
    Timeout(Duration),
    #[error("QMP: connection closed by QEMU while waiting for a reply (QEMU exited or crashed)")]
    Closed,
    #[error("QMP: expected a JSON object, found {0:?}")]
    BadReply(String),
    #[error("QMP command `{command}` failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

/// A connected, capabilities-negotiated QMP session.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    timeout: Duration,
    /// Names of the events read since the last [`Qmp::take_events`].
    events: Vec<String>,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        let writer = stream.try_clone()?;
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
            timeout,
            events: Vec::new(),
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::BadReply(greeting.to_string()));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Runs `command` with optional `arguments`, returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let reply = self.read_message_until(deadline)?;
            if let Some(name) = reply.get("event") {
                self.events
                    .push(name.as_str().unwrap_or_default().to_string());
                continue;
            }
            return command_result(command, &reply);
        }
    }

    /// Runs a human monitor (HMP) command line, returns its text output.
    pub fn hmp(&mut self, command_line: &str) -> Result<String, QmpError> {
        let ret = self.execute(
            "human-monitor-command",
            Some(json!({ "command-line": command_line })),
        )?;
        Ok(ret.as_str().unwrap_or_default().to_string())
    }

    /// The names of the events QEMU sent since the last call (`RESET`,
    /// `SHUTDOWN`, ...), those already on the socket included: it reads
    /// what is pending without waiting.
    pub fn take_events(&mut self) -> Result<Vec<String>, QmpError> {
        let stream = self.reader.get_ref();
        stream.set_nonblocking(true)?;
        let mut pending = Vec::new();
        let read = loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => break Err(QmpError::Closed),
                Ok(_) => pending.push(line),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) => break Err(e.into()),
            }
        };
        self.reader.get_ref().set_nonblocking(false)?;
        read?;
        // A partial line left by the non-blocking read is completed now.
        for mut line in pending {
            if !line.ends_with('\n') {
                self.reader.get_ref().set_read_timeout(Some(self.timeout))?;
                self.reader.read_line(&mut line)?;
            }
            if let Ok(v) = serde_json::from_str::<Value>(line.trim())
                && let Some(name) = v.get("event")
            {
                self.events
                    .push(name.as_str().unwrap_or_default().to_string());
            }
        }
        Ok(std::mem::take(&mut self.events))
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let deadline = Instant::now() + self.timeout;
        self.read_message_until(deadline)
    }

    fn read_message_until(&mut self, deadline: Instant) -> Result<Value, QmpError> {
        let mut line = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout(self.timeout));
            }
            self.reader.get_ref().set_read_timeout(Some(left))?;
            match self.reader.read_line(&mut line) {
                Ok(0) => return Err(QmpError::Closed),
                Ok(_) if line.ends_with('\n') => {
                    return serde_json::from_str(line.trim())
                        .map_err(|_| QmpError::BadReply(line.trim().to_string()));
                }
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// What a QMP reply to `command` says: its `return` value, or the typed
/// error QEMU gave (shared by the blocking and the daemon's async client).
pub fn command_result(command: &str, reply: &Value) -> Result<Value, QmpError> {
    if let Some(ret) = reply.get("return") {
        return Ok(ret.clone());
    }
    if let Some(err) = reply.get("error") {
        return Err(QmpError::Command {
            command: command.to_string(),
            class: err["class"].as_str().unwrap_or("?").to_string(),
            desc: err["desc"].as_str().unwrap_or("?").to_string(),
        });
    }
    Err(QmpError::BadReply(reply.to_string()))
}
