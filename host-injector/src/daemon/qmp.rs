//! An asynchronous QMP client for the daemon: one command at a time, and
//! every event forwarded to the VM worker (RESET and SHUTDOWN close the
//! monitor-SMI gate). Every wait has a deadline.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};

use crate::qmp::{QmpError, command_result};

/// A QMP event's name (e.g. "RESET", "SHUTDOWN").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event(pub String);

/// A connected QMP session.
pub struct AsyncQmp {
    writer: OwnedWriteHalf,
    replies: mpsc::Receiver<Value>,
    timeout: Duration,
    _reader: tokio::task::JoinHandle<()>,
    closed: oneshot::Receiver<()>,
}

impl AsyncQmp {
    /// Connects, negotiates capabilities; events go to `events` (the
    /// channel closes when the connection does).
    pub async fn connect(
        path: &Path,
        timeout: Duration,
        events: mpsc::UnboundedSender<Event>,
    ) -> Result<Self, QmpError> {
        let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout(timeout))?
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (r, writer) = stream.into_split();
        let (reply_tx, replies) = mpsc::channel(4);
        let (closed_tx, closed) = oneshot::channel();
        let reader = tokio::spawn(read_loop(r, reply_tx, events, closed_tx));
        let mut q = Self {
            writer,
            replies,
            timeout,
            _reader: reader,
            closed,
        };
        // The greeting arrives as the first "reply".
        let greeting = q.next_reply().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::BadReply(greeting.to_string()));
        }
        q.execute("qmp_capabilities", None).await?;
        Ok(q)
    }

    /// True once QEMU closed the connection.
    pub fn is_closed(&mut self) -> bool {
        !matches!(
            self.closed.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        )
    }

    async fn next_reply(&mut self) -> Result<Value, QmpError> {
        match tokio::time::timeout(self.timeout, self.replies.recv()).await {
            Err(_) => Err(QmpError::Timeout(self.timeout)),
            Ok(None) => Err(QmpError::Closed),
            Ok(Some(v)) => Ok(v),
        }
    }

    /// Runs a command, returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        tokio::time::timeout(self.timeout, self.writer.write_all(line.as_bytes()))
            .await
            .map_err(|_| QmpError::Timeout(self.timeout))??;
        let reply = self.next_reply().await?;
        command_result(command, &reply)
    }

    /// A human monitor command line; its text output.
    pub async fn hmp(&mut self, command_line: &str) -> Result<String, QmpError> {
        let ret = self
            .execute(
                "human-monitor-command",
                Some(json!({ "command-line": command_line })),
            )
            .await?;
        Ok(ret.as_str().unwrap_or_default().to_string())
    }
}

async fn read_loop(
    r: OwnedReadHalf,
    replies: mpsc::Sender<Value>,
    events: mpsc::UnboundedSender<Event>,
    closed: oneshot::Sender<()>,
) {
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(v) = serde_json::from_str::<Value>(line.trim()) else {
            tracing::warn!(line = %line.trim(), "QMP: not JSON, ignored");
            continue;
        };
        if let Some(name) = v.get("event").and_then(Value::as_str) {
            let _ = events.send(Event(name.to_string()));
            continue;
        }
        if replies.send(v).await.is_err() {
            break;
        }
    }
    let _ = closed.send(());
}
