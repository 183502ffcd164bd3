//! Exit codes and error reports in the user's words.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done |
//! | 1 | failed for another reason (I/O, a malformed reply, ...) |
//! | 2 | usage: the command line is wrong (nothing was asked of the agent) |
//! | 3 | alert: `ids check` found something, `ids watch` raised an alert |
//! | 4 | refused: the agent refused or could not read what was asked (SMRAM, not RAM, not mapped, no such CPU) |
//! | 5 | agent silent: ALERT, no answer within the deadline |
//! | 6 | unreachable: no VM, daemon or smmvmi agent at the endpoint |
//! | 7 | partial: some of the range was unreadable (reported; the rest was written) |
//! | 130 | interrupted (SIGINT); what was read before is kept |

use std::process::ExitCode;

use host_injector::TransactError;
use host_injector::daemon::client::ClientError as DaemonClientError;
use host_injector::daemon::protocol::DaemonError;
use ids::SessionError;
use ids::endpoint::EndpointError;
use smmvmi_mailbox::wire::Status;

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Done.
    Ok = 0,
    /// Anything else.
    Failure = 1,
    /// Wrong command line.
    Usage = 2,
    /// `ids check` found something; `ids watch` raised an alert.
    Findings = 3,
    /// The agent refused the request.
    Refused = 4,
    /// ALERT: the agent did not answer in time.
    Silent = 5,
    /// Nothing to talk to at the endpoint.
    Unreachable = 6,
    /// Some bytes unreadable.
    Partial = 7,
    /// SIGINT.
    Interrupted = 130,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

/// A failure of the command line itself, with its exit code and advice.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    /// Exit code.
    pub exit: Exit,
    /// What happened.
    pub message: String,
    /// What to do.
    pub hint: Option<String>,
}

impl CliError {
    /// A usage error (exit 2).
    pub fn usage(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            exit: Exit::Usage,
            message: message.into(),
            hint: Some(hint.into()),
        }
    }

    /// An error with an exit code.
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        Self {
            exit,
            message: message.into(),
            hint: None,
        }
    }
}

/// The exit code for an error (the first recognised error in its chain).
pub fn exit_of(e: &anyhow::Error) -> Exit {
    for cause in e.chain() {
        if let Some(c) = cause.downcast_ref::<CliError>() {
            return c.exit;
        }
        if let Some(s) = cause.downcast_ref::<SessionError>() {
            return session_exit(s);
        }
        if let Some(t) = cause.downcast_ref::<TransactError>() {
            return transact_exit(t);
        }
        if let Some(d) = cause.downcast_ref::<DaemonClientError>() {
            return daemon_exit(d);
        }
        // Layers above the session (the Linux walkers) may wrap its errors
        // transparently; a silent agent still says ALERT.
        if cause.to_string().starts_with("ALERT") {
            return Exit::Silent;
        }
        if let Some(e) = cause.downcast_ref::<EndpointError>() {
            return match e {
                EndpointError::NoSuchVm { .. } => Exit::Unreachable,
                _ => Exit::Usage,
            };
        }
    }
    Exit::Failure
}

fn session_exit(e: &SessionError) -> Exit {
    match e {
        SessionError::Op { status, .. } => match status {
            Status::CpuNotInSmm | Status::TooLarge | Status::WorkLimit => Exit::Failure,
            _ => Exit::Refused,
        },
        SessionError::NoSuchCpu { .. } => Exit::Refused,
        SessionError::Transact(t) => transact_exit(t),
        SessionError::Daemon(d) => daemon_exit(d),
        SessionError::Smi(_) | SessionError::Mailbox(_) => Exit::Unreachable,
        SessionError::Endpoint(_) => Exit::Usage,
        SessionError::Key { .. } => Exit::Usage,
        _ => Exit::Failure,
    }
}

fn transact_exit(e: &TransactError) -> Exit {
    match e {
        TransactError::Silent { .. } => Exit::Silent,
        TransactError::NotReady { .. } | TransactError::Smi(_) | TransactError::Mailbox(_) => {
            Exit::Unreachable
        }
        _ => Exit::Failure,
    }
}

fn daemon_exit(e: &DaemonClientError) -> Exit {
    match e {
        DaemonClientError::Connect { .. } => Exit::Unreachable,
        DaemonClientError::Daemon(d) => match d {
            DaemonError::Silent { .. } => Exit::Silent,
            DaemonError::UnknownVm { .. }
            | DaemonError::NotReady { .. }
            | DaemonError::QemuGone { .. } => Exit::Unreachable,
            _ => Exit::Failure,
        },
        _ => Exit::Failure,
    }
}

impl Exit {
    /// The code's name in JSON error reports.
    pub fn name(self) -> &'static str {
        match self {
            Exit::Ok => "ok",
            Exit::Failure => "failure",
            Exit::Usage => "usage",
            Exit::Findings => "alert",
            Exit::Refused => "refused",
            Exit::Silent => "agent-silent",
            Exit::Unreachable => "unreachable",
            Exit::Partial => "partial",
            Exit::Interrupted => "interrupted",
        }
    }
}

/// The error report as one JSON line (with --json/--jsonl): `{"error":
/// {"message", "hint", "exit_code", "kind"}}`.
pub fn report_json(e: &anyhow::Error) -> String {
    let text = report(e, false);
    let mut lines = text.lines();
    let message = lines
        .next()
        .unwrap_or_default()
        .trim_start_matches("ids: error: ")
        .to_string();
    let hint = lines
        .find_map(|l| l.trim_start().strip_prefix("what to do: "))
        .map(String::from);
    let exit = exit_of(e);
    serde_json::json!({
        "error": {
            "message": message,
            "hint": hint,
            "exit_code": exit as u8,
            "kind": exit.name(),
        }
    })
    .to_string()
}

/// The error report: the message chain with repeats removed (a cause whose
/// text the message already contains is left out), then the hint. Never a
/// backtrace; `--debug` adds the full chain as the code sees it.
pub fn report(e: &anyhow::Error, debug: bool) -> String {
    let mut out = String::from("ids: error: ");
    let mut shown: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || shown.iter().any(|s| s.contains(&text)) {
            continue;
        }
        shown.push(text);
    }
    out.push_str(&shown.join(": "));
    out.push('\n');
    let hint = e
        .chain()
        .find_map(|c| c.downcast_ref::<CliError>().and_then(|c| c.hint.clone()))
        .or_else(|| {
            (!says_what_to_do(e))
                .then(|| default_hint(exit_of(e)).map(String::from))
                .flatten()
        });
    if let Some(h) = hint
        && !out.contains(&h)
    {
        out.push_str(&format!("  what to do: {h}\n"));
    }
    if debug {
        out.push_str(&format!("debug: {e:?}\n"));
    }
    out
}

/// Errors whose message already carries the advice (why no SMI can be
/// raised names what to do).
fn says_what_to_do(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<TransactError>(),
            Some(TransactError::NotReady { .. })
        ) || matches!(
            c.downcast_ref::<DaemonError>(),
            Some(DaemonError::NotReady { .. })
        ) || matches!(
            c.downcast_ref::<DaemonClientError>(),
            Some(DaemonClientError::Daemon(DaemonError::NotReady { .. }))
        ) || matches!(
            c.downcast_ref::<SessionError>(),
            Some(
                SessionError::Transact(TransactError::NotReady { .. })
                    | SessionError::Daemon(DaemonClientError::Daemon(DaemonError::NotReady { .. }))
            )
        )
    })
}

fn default_hint(exit: Exit) -> Option<&'static str> {
    match exit {
        Exit::Silent => Some(
            "the agent did not answer: treat it as an alert (SMIs blocked, agent disabled, or the VM is paused); `host-injector status` shows the daemon's view",
        ),
        Exit::Unreachable => Some(
            "check the endpoint: `cargo xtask vm list` shows the VMs and their endpoints; --connect takes a VM name, a state directory or an endpoint",
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_dropped_and_hints_added() {
        let inner = anyhow::anyhow!("disk full");
        let e = inner.context("writing out.raw: disk full");
        let r = report(&e, false);
        assert_eq!(r, "ids: error: writing out.raw: disk full\n");
        let e = anyhow::Error::new(CliError::usage("bad range", "write ADDR+LEN"));
        assert_eq!(exit_of(&e), Exit::Usage);
        assert!(report(&e, false).contains("what to do: write ADDR+LEN"));
        let e = anyhow::Error::new(SessionError::NoSuchCpu { cpu: 2, count: 2 });
        assert_eq!(exit_of(&e), Exit::Refused);
        let r = report(&e, false);
        assert!(
            r.contains("CPU 2 does not exist: this VM has 2 CPUs (0-1)"),
            "{r}"
        );
        let e = anyhow::Error::new(SessionError::Op {
            op: "reading physical 0x3f000000+0x10".into(),
            status: Status::RefusedSmram,
            level: 0,
            aux: 0x3f00_0000,
        });
        let r = report(&e, false);
        assert!(!r.contains("RefusedSmram") && r.contains("in SMRAM"), "{r}");
        assert!(!report(&e, false).contains("debug:"));
        assert!(report(&e, true).contains("debug:"));
        let j: serde_json::Value = serde_json::from_str(&report_json(&e)).unwrap();
        assert_eq!(j["error"]["exit_code"], 4);
        assert_eq!(j["error"]["kind"], "refused");
        assert!(j["error"]["message"].as_str().unwrap().contains("in SMRAM"));
    }

    #[test]
    fn silent_and_unreachable_agents() {
        let silent = SessionError::Transact(TransactError::Silent {
            doorbell: 1,
            deadline: std::time::Duration::from_millis(500),
            smis: 25,
            header: "magic ok".into(),
        });
        let e = anyhow::Error::new(silent);
        assert_eq!(exit_of(&e), Exit::Silent);
        assert!(report(&e, false).contains("treat it as an alert"));
        let e = anyhow::Error::new(SessionError::Daemon(DaemonClientError::Daemon(
            DaemonError::Silent {
                vm: "vm1".into(),
                deadline_ms: 500,
                smis_doorbell: 1,
                smis_qmp: 0,
                header: String::new(),
            },
        )));
        assert_eq!(exit_of(&e), Exit::Silent);
        let e = anyhow::Error::new(SessionError::Transact(TransactError::NotReady {
            backend: "qmp-broadcast",
            reason: "this VM has no smmvmi agent".into(),
            header: "magic missing".into(),
        }));
        assert_eq!(exit_of(&e), Exit::Unreachable);
        let r = report(&e, false);
        assert!(
            r.contains("this VM has no smmvmi agent") && !r.contains("magic missing"),
            "{r}"
        );
        // Wrapped transparently by a layer above: still an ALERT.
        let e = anyhow::anyhow!("ALERT: VM vm1: the agent did not answer").context("ps");
        assert_eq!(exit_of(&e), Exit::Silent);
    }
}
