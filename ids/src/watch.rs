//! `ids watch`: the checks plus process and module diffs, pass after pass,
//! as events a security pipeline ingests.
//!
//! # Event schema: Elastic Common Schema (ECS 8.x)
//! One JSON object per line. Every event has `@timestamp` (RFC 3339, UTC),
//! `event.kind`, `event.category`, `event.type`, `event.action`,
//! `event.module` = `smmvmi`, `observer.type` = `ids`, `host.name` = the VM
//! name given to `watch`, and `message` (one human sentence). By action:
//!
//! | `event.action` | `event.kind` | `event.category` / `event.type` | extra fields |
//! |---|---|---|---|
//! | `process-started`, `process-exited` | `event` | `process` / `start`, `end` | `process.pid`, `process.parent.pid`, `process.name`, `user.id` |
//! | `module-loaded`, `module-unloaded` | `event` | `driver` / `start`, `end` | `smmvmi.module.{name,base,size}` |
//! | `hook-found` | `alert` | `intrusion_detection` / `indicator` | `rule.name` (the check), `rule.description`, `smmvmi.finding.{what,expected,found,address,owner}` |
//! | `hook-gone` | `event` | `intrusion_detection` / `end` | as `hook-found` |
//! | `agent-unreachable` | `alert` | `host` / `error` | `error.message` |
//! | `reply-rejected` | `alert` | `intrusion_detection` / `denied` | `error.message` (a reply that failed authentication, replay or binding checks: someone between the agent and the IDS tampers) |
//! | `guest-rebooted` | `event` | `host` / `change` | none (the agent's per-boot salt changed; lists are re-learned without start/exit events) |
//! | `baseline` | `state` | `host` / `info` | `smmvmi.baseline.{processes,modules}` (the lists a first pass, or the first after a reboot, learned) |
//!
//! A process is identified by (pid, start time), so a reused PID is an exit
//! and a start; a module by (name, address of its `struct module`).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use crate::checks::{
    Finding, check_hooks, check_idt, check_modules, check_processes, check_processes_of,
    check_syscalls,
};
use crate::linux::{self, Kernel, LinuxError, Module, Task};
use crate::memory::{GuestMemory, SnapshotCache};

/// What one pass found changed, before it is rendered.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A process appeared.
    ProcessStarted(Task),
    /// A process vanished.
    ProcessExited(Task),
    /// A module appeared.
    ModuleLoaded(Module),
    /// A module vanished.
    ModuleUnloaded(Module),
    /// A check found something it had not found the pass before.
    HookFound(Finding),
    /// A finding of the pass before is gone.
    HookGone(Finding),
    /// The agent did not answer (or the session failed): the text says why.
    AgentUnreachable(String),
    /// A reply failed authentication, replay or binding checks.
    ReplyRejected(String),
    /// The guest rebooted (the agent's per-boot salt changed).
    GuestRebooted,
    /// A pass learned the lists it diffs against (the first pass, and the
    /// first after a reboot): what it saw.
    Baseline {
        /// Processes.
        processes: usize,
        /// Modules.
        modules: usize,
    },
}

impl Event {
    /// True for `event.kind: alert`.
    pub fn is_alert(&self) -> bool {
        matches!(
            self,
            Event::HookFound(_) | Event::AgentUnreachable(_) | Event::ReplyRejected(_)
        )
    }

    /// The ECS document (see the module docs), for VM `host` at `now`.
    pub fn to_ecs(&self, host: &str, now: std::time::SystemTime) -> Value {
        let (kind, category, typ, action, message, extra) = match self {
            Event::ProcessStarted(t) | Event::ProcessExited(t) => {
                let started = matches!(self, Event::ProcessStarted(_));
                (
                    "event",
                    "process",
                    if started { "start" } else { "end" },
                    if started {
                        "process-started"
                    } else {
                        "process-exited"
                    },
                    format!(
                        "process {} ({}) {}",
                        t.pid,
                        t.comm,
                        if started { "started" } else { "exited" }
                    ),
                    json!({
                        "process": {"pid": t.pid, "parent": {"pid": t.ppid}, "name": t.comm},
                        "user": {"id": t.uid.to_string()},
                    }),
                )
            }
            Event::ModuleLoaded(m) | Event::ModuleUnloaded(m) => {
                let loaded = matches!(self, Event::ModuleLoaded(_));
                (
                    "event",
                    "driver",
                    if loaded { "start" } else { "end" },
                    if loaded {
                        "module-loaded"
                    } else {
                        "module-unloaded"
                    },
                    format!(
                        "module {} {}",
                        m.name,
                        if loaded { "loaded" } else { "unloaded" }
                    ),
                    json!({"smmvmi": {"module": {"name": m.name, "base": m.base, "size": m.size}}}),
                )
            }
            Event::HookFound(f) | Event::HookGone(f) => {
                let found = matches!(self, Event::HookFound(_));
                (
                    if found { "alert" } else { "event" },
                    "intrusion_detection",
                    if found { "indicator" } else { "end" },
                    if found { "hook-found" } else { "hook-gone" },
                    format!(
                        "{}: {} (expected {}; found {})",
                        if found { "hook found" } else { "hook gone" },
                        f.what,
                        f.expected,
                        f.found
                    ),
                    json!({
                        "rule": {"name": f.check, "description": format!("{}: expected {}", f.check, f.expected)},
                        "smmvmi": {"finding": f},
                    }),
                )
            }
            Event::AgentUnreachable(e) => (
                "alert",
                "host",
                "error",
                "agent-unreachable",
                format!("the agent did not answer: {e}"),
                json!({"error": {"message": e}}),
            ),
            Event::ReplyRejected(e) => (
                "alert",
                "intrusion_detection",
                "denied",
                "reply-rejected",
                format!("a reply was rejected: {e}"),
                json!({"error": {"message": e}}),
            ),
            Event::GuestRebooted => (
                "event",
                "host",
                "change",
                "guest-rebooted",
                "the guest rebooted".to_string(),
                json!({}),
            ),
            Event::Baseline { processes, modules } => (
                "state",
                "host",
                "info",
                "baseline",
                format!("watching: {processes} processes, {modules} modules"),
                json!({"smmvmi": {"baseline": {"processes": processes, "modules": modules}}}),
            ),
        };
        let mut doc = json!({
            "@timestamp": humantime::format_rfc3339_millis(now).to_string(),
            "event": {
                "kind": kind,
                "category": [category],
                "type": [typ],
                "action": action,
                "module": "smmvmi",
            },
            "observer": {"type": "ids"},
            "host": {"name": host},
            "message": message,
        });
        if let (Some(d), Value::Object(x)) = (doc.as_object_mut(), extra) {
            d.extend(x);
        }
        doc
    }
}

/// What the watcher remembers between passes.
#[derive(Debug, Default)]
pub struct Watcher {
    procs: Option<BTreeMap<(u32, u64), Task>>,
    mods: Option<BTreeMap<(String, u64), Module>>,
    findings: BTreeMap<(String, u64), Finding>,
    /// Kernel text against a baseline recorded by the first pass, one
    /// slice per pass ([`Watcher::with_text`]).
    text: Option<TextWatch>,
}

/// Slices the kernel's text and rodata are cut into by default, one
/// checked per pass (`ids watch --text-slices`).
pub const DEFAULT_TEXT_SLICES: usize = 256;

#[derive(Debug)]
struct TextWatch {
    slices: usize,
    next: usize,
    base: Option<crate::checks::TextBaseline>,
    /// The findings of each slice, as last checked.
    found: Vec<Vec<Finding>>,
}

impl Watcher {
    /// A watcher that has seen nothing: its first pass reports findings
    /// only, not every process and module as started.
    pub fn new() -> Self {
        Self::default()
    }

    /// Also checks kernel text and read-only data against a baseline the
    /// first pass records (about 22 MiB on Debian's 6.1: 2.8 s through the
    /// agent under TCG), `1/slices` of it per pass: a change is found
    /// within `slices` passes.
    pub fn with_text(mut self, slices: usize) -> Self {
        self.text = Some(TextWatch {
            slices: slices.max(1),
            next: 0,
            base: None,
            found: vec![Vec::new(); slices.max(1)],
        });
        self
    }

    /// Forgets the lists (after a reboot: the new boot's processes are not
    /// "started" events, and its text is relocated: a new baseline);
    /// findings are kept so a hook that survives the reboot is not
    /// reported twice.
    pub fn forget_lists(&mut self) {
        self.procs = None;
        self.mods = None;
        if let Some(t) = &mut self.text {
            t.base = None;
            t.found.iter_mut().for_each(Vec::clear);
        }
    }

    /// One pass: processes, modules and the checks in new snapshots.
    pub fn pass<M: GuestMemory>(
        &mut self,
        c: &mut SnapshotCache<M>,
        k: &Kernel,
    ) -> Result<Vec<Event>, LinuxError> {
        c.new_snapshot();
        // The task list with threads serves the process diff (its leaders)
        // and the hidden-process check; a list that cannot be walked falls
        // back to the PID allocator (`ps`), and the check then reports the
        // walk's error.
        let listed = match k.offsets.pid_idr {
            Some(_) => match linux::ps_task_list(c, k, 0, true) {
                Ok(l) => Some(l),
                // A corrupt list only; a rejected reply or an outage ends
                // the pass.
                Err(LinuxError::BadList { .. }) => None,
                Err(e) => return Err(e),
            },
            None => None,
        };
        let tasks: Vec<Task> = match &listed {
            Some(l) => l.iter().filter(|t| t.pid == t.tgid).cloned().collect(),
            None => linux::ps(c, k, 0, false)?,
        };
        let modules = linux::lsmod(c, k, 0)?;
        // The process check first: it fetches every CPU's state, which the
        // IDT check then shares.
        let mut findings = Vec::new();
        if k.offsets.pid_idr.is_some() {
            findings.extend(
                match listed {
                    Some(l) => check_processes_of(c, k, 0, l),
                    None => check_processes(c, k, 0),
                }?
                .findings,
            );
        }
        findings.extend(check_syscalls(c, k, 0, &modules)?.findings);
        findings.extend(check_idt(c, k, &modules)?.findings);
        if k.offsets.module_views.is_some() {
            findings.extend(check_modules(c, k, 0, &modules)?.findings);
        }
        if k.offsets.hook_views.is_some() {
            findings.extend(check_hooks(c, k, 0, &modules)?.findings);
        }
        if let Some(tw) = &mut self.text {
            match &tw.base {
                None => tw.base = Some(crate::checks::record_baseline(c, k, 0)?),
                Some(base) => {
                    let slice = tw.next;
                    tw.found[slice] =
                        crate::checks::check_text_slice(c, k, 0, base, &modules, slice, tw.slices)?
                            .findings;
                    tw.next = (slice + 1) % tw.slices;
                }
            }
            findings.extend(tw.found.iter().flatten().cloned());
        }
        let mut out = Vec::new();

        if self.procs.is_none() {
            out.push(Event::Baseline {
                processes: tasks.len(),
                modules: modules.len(),
            });
        }
        let procs: BTreeMap<(u32, u64), Task> = tasks
            .into_iter()
            .map(|t| ((t.pid, t.start_ns), t))
            .collect();
        if let Some(prev) = &self.procs {
            diff(
                prev,
                &procs,
                &mut out,
                Event::ProcessStarted,
                Event::ProcessExited,
            );
        }
        self.procs = Some(procs);

        let mods: BTreeMap<(String, u64), Module> = modules
            .into_iter()
            .map(|m| ((m.name.clone(), m.addr), m))
            .collect();
        if let Some(prev) = &self.mods {
            diff(
                prev,
                &mods,
                &mut out,
                Event::ModuleLoaded,
                Event::ModuleUnloaded,
            );
        }
        self.mods = Some(mods);

        let now: BTreeMap<(String, u64), Finding> = findings
            .into_iter()
            .map(|f| ((f.what.clone(), f.address), f))
            .collect();
        diff(
            &self.findings,
            &now,
            &mut out,
            Event::HookFound,
            Event::HookGone,
        );
        self.findings = now;
        Ok(out)
    }
}

/// Appends `new` events for keys only in `b`, `gone` for keys only in `a`.
fn diff<K: Ord + Clone, V: Clone>(
    a: &BTreeMap<K, V>,
    b: &BTreeMap<K, V>,
    out: &mut Vec<Event>,
    new: impl Fn(V) -> Event,
    gone: impl Fn(V) -> Event,
) {
    let ka: BTreeSet<&K> = a.keys().collect();
    let kb: BTreeSet<&K> = b.keys().collect();
    for k in kb.difference(&ka) {
        out.push(new(b[*k].clone()));
    }
    for k in ka.difference(&kb) {
        out.push(gone(a[*k].clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(pid: u32, start: u64, comm: &str) -> Task {
        Task {
            pid,
            tgid: pid,
            ppid: 1,
            uid: 0,
            gid: 0,
            state: 'S',
            comm: comm.into(),
            kthread: false,
            has_mm: true,
            start_ns: start,
            addr: 0xffff_8880_0000_0000 + u64::from(pid) * 0x1000,
        }
    }

    #[test]
    fn a_reused_pid_is_an_exit_and_a_start() {
        let a: BTreeMap<_, _> = [((7, 100), task(7, 100, "old"))].into();
        let b: BTreeMap<_, _> = [((7, 900), task(7, 900, "new"))].into();
        let mut out = Vec::new();
        diff(
            &a,
            &b,
            &mut out,
            Event::ProcessStarted,
            Event::ProcessExited,
        );
        assert!(matches!(&out[0], Event::ProcessStarted(t) if t.comm == "new"));
        assert!(matches!(&out[1], Event::ProcessExited(t) if t.comm == "old"));
    }

    #[test]
    fn ecs_documents_carry_the_mapped_fields() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        let d = Event::ProcessStarted(task(42, 1, "sh")).to_ecs("vm1", t);
        assert_eq!(d["@timestamp"], "2023-11-14T22:13:20.123Z");
        assert_eq!(d["event"]["kind"], "event");
        assert_eq!(d["event"]["category"][0], "process");
        assert_eq!(d["event"]["action"], "process-started");
        assert_eq!(d["process"]["pid"], 42);
        assert_eq!(d["host"]["name"], "vm1");
        let f = Finding {
            check: "idt".into(),
            what: "cpu 1 LSTAR".into(),
            expected: "entry_SYSCALL_64".into(),
            found: "0xffffffffc0000000 in module rk's memory".into(),
            address: 0xffff_ffff_c000_0000,
            owner: Some("rk".into()),
        };
        let d = Event::HookFound(f).to_ecs("vm1", t);
        assert_eq!(d["event"]["kind"], "alert");
        assert_eq!(d["rule"]["name"], "idt");
        assert_eq!(d["smmvmi"]["finding"]["owner"], "rk");
        assert!(Event::ReplyRejected("bad tag".into()).is_alert());
        assert!(!Event::GuestRebooted.is_alert());
    }
}

/// How `watch` runs.
#[derive(Clone, Debug)]
pub struct WatchOptions {
    /// Time from the start of one pass to the start of the next.
    pub interval: std::time::Duration,
    /// Stop after this many passes (None: forever).
    pub count: Option<u64>,
    /// The kernel cache directory (None: no cache).
    pub cache: Option<std::path::PathBuf>,
    /// Check kernel text and rodata against a baseline the first pass
    /// records, this many slices per full cover (0: no text check).
    pub text_slices: usize,
}

/// True if `e` says the session's transport itself is broken (QMP, the
/// mailbox file, the daemon connection): only then is a new connection
/// worth making.
fn transport_failed(e: &LinuxError) -> bool {
    use crate::SessionError;
    use crate::memory::MemoryError;
    use host_injector::TransactError;
    matches!(
        e,
        LinuxError::Memory(MemoryError::Session(
            SessionError::Smi(_)
                | SessionError::Mailbox(_)
                | SessionError::Daemon(_)
                | SessionError::Carrier(_)
                | SessionError::Transact(TransactError::Smi(_) | TransactError::Mailbox(_))
        ))
    )
}

/// Watches a guest until `opts.count` passes are done: connects with
/// `connect` (again after a transport failure or a reboot), learns the kernel, runs
/// a [`Watcher`] pass per interval and hands every event to `emit`.
/// Returns whether any alert was emitted. An outage is reported once, when
/// it begins.
pub fn run(
    mut connect: impl FnMut() -> Result<crate::Session, crate::SessionError>,
    opts: &WatchOptions,
    mut emit: impl FnMut(&Event),
) -> bool {
    use crate::SessionError;
    use crate::memory::MemoryError;
    let mut alerted = false;
    let mut send = |e: Event, alerted: &mut bool| {
        *alerted |= e.is_alert();
        emit(&e);
    };
    let mut mem: Option<SnapshotCache<crate::Session>> = None;
    let mut kernel: Option<Kernel> = None;
    let mut watcher = if opts.text_slices > 0 {
        Watcher::new().with_text(opts.text_slices)
    } else {
        Watcher::new()
    };
    // Failed passes in a row.
    let mut failures = 0u32;
    let mut salt: Option<[u8; 16]> = None;
    // A reboot seen on reconnecting, reported with the first pass after it.
    let mut rebooted = false;
    let mut passes = 0u64;
    let d = linux::Discovery::default();
    while opts.count.is_none_or(|n| passes < n) {
        let started = std::time::Instant::now();
        passes += 1;
        let result: Result<Vec<Event>, LinuxError> = (|| {
            if mem.is_none() {
                let s = connect().map_err(MemoryError::from)?;
                // A new per-boot salt on reconnecting: the guest rebooted
                // while it could not be reached.
                if salt.is_some_and(|old| old != s.salt()) {
                    rebooted = true;
                    watcher.forget_lists();
                    kernel = None;
                }
                salt = Some(s.salt());
                mem = Some(SnapshotCache::new(s));
            }
            let c = mem.as_mut().expect("connected above");
            if kernel.is_none() {
                kernel = Some(Kernel::load(c.inner(), &d, opts.cache.as_deref())?);
            }
            watcher.pass(c, kernel.as_ref().expect("loaded above"))
        })();
        match result {
            Ok(events) => {
                failures = 0;
                if std::mem::take(&mut rebooted) {
                    send(Event::GuestRebooted, &mut alerted);
                }
                for e in events {
                    send(e, &mut alerted);
                }
            }
            Err(LinuxError::Memory(MemoryError::Session(SessionError::SaltChanged))) => {
                // Reported once the new boot answers (its salt differs).
                (mem, kernel) = (None, None);
            }
            Err(LinuxError::Memory(MemoryError::Session(SessionError::Reply(e)))) => {
                send(Event::ReplyRejected(e.to_string()), &mut alerted);
                mem = None;
            }
            Err(e) => {
                failures += 1;
                // One failed pass may be a moment's state (a vCPU between
                // INIT and SIPI missing the SMI rendezvous, a list being
                // changed): the next attempt comes at once; two in a row
                // are an outage, reported once.
                if failures == 2 {
                    send(Event::AgentUnreachable(e.to_string()), &mut alerted);
                }
                // Keep a session whose transport works: a direct session's
                // injector remembers a guest reset (QMP RESET) and holds
                // monitor SMIs until the new boot's agent is Ready, where a
                // new connection would know nothing of the reset and could
                // raise one at the stale Ready header of the old boot (QEMU
                // 7.2 dies of a monitor SMI before the firmware negotiates
                // SMI broadcast). Reconnect only when the transport failed.
                if transport_failed(&e) {
                    mem = None;
                }
                kernel = None;
                if failures == 1 {
                    passes -= 1;
                    continue;
                }
            }
        }
        if opts.count.is_none_or(|n| passes < n) {
            std::thread::sleep(opts.interval.saturating_sub(started.elapsed()));
        }
    }
    alerted
}
