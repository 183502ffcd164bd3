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
        // Whole lines only: QEMU writes a message and its newline at once,
        // so once a byte is there (buffered, or readable on the socket) the
        // line is read to its end, with the usual deadline.
        while !self.reader.buffer().is_empty() || self.readable()? {
            let msg = self.read_message()?;
            if let Some(name) = msg.get("event") {
                self.events
                    .push(name.as_str().unwrap_or_default().to_string());
            }
        }
        Ok(std::mem::take(&mut self.events))
    }

    /// True if the socket has bytes to read now (or was closed).
    fn readable(&self) -> Result<bool, QmpError> {
        use std::os::fd::AsFd;
        let mut fds = [nix::poll::PollFd::new(
            self.reader.get_ref().as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let n = nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO)
            .map_err(|e| QmpError::Io(e.into()))?;
        Ok(n > 0)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// Events QEMU sends between commands are kept, and commands still get
    /// their own replies.
    #[test]
    fn events_between_commands_are_kept() {
        let path = std::env::temp_dir().join(format!("hi-qmp-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let (sent_tx, sent_rx) = std::sync::mpsc::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let mut line = String::new();
            w.write_all(b"{\"QMP\": {}}\n").unwrap();
            r.read_line(&mut line).unwrap();
            w.write_all(b"{\"return\": {}}\n").unwrap();
            w.write_all(b"{\"event\": \"RESET\", \"data\": {\"guest\": true}}\n")
                .unwrap();
            sent_tx.send(()).unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            w.write_all(b"{\"event\": \"SHUTDOWN\"}\n{\"return\": \"ok\"}\n")
                .unwrap();
            // Open until the client is done (a closed socket is QEMU gone).
            done_rx.recv().unwrap();
        });
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        sent_rx.recv().unwrap();
        // The event is on the socket, unread: taking events reads it.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(q.take_events().unwrap(), ["RESET"]);
        assert!(q.take_events().unwrap().is_empty());
        assert_eq!(q.execute("query-status", None).unwrap(), "ok");
        assert_eq!(q.take_events().unwrap(), ["SHUTDOWN"]);
        done_tx.send(()).unwrap();
        server.join().unwrap();
        assert!(matches!(q.take_events(), Err(QmpError::Closed)));
        std::fs::remove_file(&path).unwrap();
    }
}
