//! End-to-end: real rootkit techniques loaded into the guest as a kernel
//! module built against Debian's headers for the guest's own kernel
//! (`tests/attacks/smmvmi_attack.c`), each found by its check with the
//! module named as the owner, and gone again once the module is removed —
//! on the default kernel and on Debian's 6.12 LTS cloud kernel. A clean
//! guest has no finding before, between and after.
//!
//! Run with `cargo xtask test` (these are `#[ignore]`d for plain `cargo test`).

mod common;

use common::{boot, config, finish, ids_session, sh};
use ids::checks::{self, Report};
use ids::linux::{self, Discovery, Kernel};
use ids::memory::SnapshotCache;
use smmvmi_tests::attack::{self, Attack, MODULE};
use smmvmi_tests::guest_image::KernelDeb;
use smmvmi_tests::vm::VmConfig;

/// getpid: called by nothing the test guest runs between two checks.
const NR_GETPID: u32 = 39;

fn check_all(s: &mut ids::Session, k: &Kernel) -> Vec<Report> {
    let mut c = SnapshotCache::new(s);
    let modules = linux::lsmod(&mut c, k, 0).unwrap_or_else(|e| panic!("{e}"));
    vec![
        checks::check_syscalls(&mut c, k, 0, &modules).unwrap_or_else(|e| panic!("{e}")),
        checks::check_idt(&mut c, k, &modules).unwrap_or_else(|e| panic!("{e}")),
        checks::check_modules(&mut c, k, 0, &modules).unwrap_or_else(|e| panic!("{e}")),
        checks::check_processes(&mut c, k, 0).unwrap_or_else(|e| panic!("{e}")),
        checks::check_hooks(&mut c, k, 0, &modules).unwrap_or_else(|e| panic!("{e}")),
    ]
}

fn assert_clean(s: &mut ids::Session, k: &Kernel, when: &str) {
    let r = check_all(s, k);
    let findings: Vec<_> = r.iter().flat_map(|r| &r.findings).collect();
    assert!(
        findings.is_empty(),
        "{when}: a clean guest has findings: {findings:#?}"
    );
    assert!(
        r[0].checked >= 400,
        "{when}: only {} syscall items",
        r[0].checked
    );
    assert!(
        r[1].checked >= 200,
        "{when}: only {} IDT items",
        r[1].checked
    );
    assert!(
        r[2].checked >= 5,
        "{when}: only {} module links",
        r[2].checked
    );
    assert!(r[3].checked >= 100, "{when}: only {} tasks", r[3].checked);
    assert!(r[4].checked >= 1, "{when}: no ftrace ops or kprobes seen");
}

fn run(cfg: VmConfig) {
    let vm = boot(cfg);
    let cpus: u32 = sh(&vm, "nproc").parse().expect("nproc");
    let mut s = ids_session(&vm);
    let k = Kernel::load(&mut s, &Discovery::default(), None).unwrap_or_else(|e| panic!("{e}"));
    assert_clean(&mut s, &k, "before any attack");
    let baseline = checks::record_baseline(&mut SnapshotCache::new(&mut s), &k, 0)
        .unwrap_or_else(|e| panic!("{e}"));
    let text = |s: &mut ids::Session| {
        let mut c = SnapshotCache::new(s);
        let modules = linux::lsmod(&mut c, &k, 0).unwrap_or_else(|e| panic!("{e}"));
        checks::check_text(&mut c, &k, 0, &baseline, &modules).unwrap_or_else(|e| panic!("{e}"))
    };
    let sleeper: u32 = sh(&vm, "sleep 100000 >/dev/null 2>&1 </dev/null & echo $!")
        .parse()
        .expect("pid");
    let module = Some(MODULE);
    let mut cases = vec![
        (
            Attack::HookSyscall(NR_GETPID),
            vec![format!("sys_call_table[{NR_GETPID}]")],
            module,
        ),
        (
            Attack::HookIdt(0x80),
            (0..cpus)
                .map(|c| format!("cpu {c} IDT vector 0x80"))
                .collect(),
            module,
        ),
        (
            Attack::Lstar(cpus - 1),
            vec![format!("cpu {} LSTAR", cpus - 1)],
            module,
        ),
        (
            Attack::HidePid(sleeper),
            vec![format!("pid {sleeper} (sleep)")],
            None,
        ),
    ];
    cases.push((
        Attack::FtraceHook("getdents64".into()),
        vec!["ftrace on __x64_sys_getdents64".into()],
        module,
    ));
    if k.kallsyms.addr("x64_sys_call").is_some() {
        cases.push((
            Attack::PatchDispatch(NR_GETPID),
            vec!["x64_sys_call+".into()],
            module,
        ));
    }
    // The kernel's own tracing is no hook: the function tracer on a
    // syscall function, and a syscall tracepoint.
    let t = "/sys/kernel/tracing";
    sh(
        &vm,
        &format!(
            "mkdir -p {t}; mount -t tracefs nodev {t} 2>/dev/null; \
             echo __x64_sys_getdents64 > {t}/set_ftrace_filter && echo function > {t}/current_tracer && \
             echo 1 > {t}/events/syscalls/sys_enter_getdents64/enable && ls / >/dev/null && echo on"
        ),
    );
    assert_clean(&mut s, &k, "with the function tracer and a tracepoint on");
    let r = text(&mut s);
    assert!(
        r.findings.is_empty(),
        "the kernel's own patching (ftrace, jump labels, static calls) is no finding: {:#?}",
        r.findings
    );
    sh(
        &vm,
        &format!(
            "echo nop > {t}/current_tracer; echo 0 > {t}/events/syscalls/sys_enter_getdents64/enable"
        ),
    );
    // A user process that renames itself like a kernel worker (no module).
    let disguised: u32 = sh(
        &vm,
        "sh -c 'echo -n kworker/1:7 > /proc/$$/comm; while :; do sleep 1; done' \
         >/dev/null 2>&1 </dev/null & echo $!",
    )
    .parse()
    .expect("pid");
    let reports = check_all(&mut s, &k);
    let found: Vec<_> = reports.iter().flat_map(|r| &r.findings).collect();
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0].what, format!("pid {disguised} (kworker/1:7)"));
    eprintln!("renamed process: found [{:?}]", found[0].what);
    sh(&vm, &format!("kill {disguised}"));
    assert_clean(&mut s, &k, "after the disguised process exits");
    // Last: it cannot be undone.
    cases.push((
        Attack::HideModule,
        vec![format!("module {MODULE} ")],
        module,
    ));
    // The watch runs the same checks pass after pass: its next pass after
    // a load reports each finding as a `hook-found` alert.
    let mut watcher = ids::watch::Watcher::new();
    let mut pass = |s: &mut ids::Session| {
        let mut c = SnapshotCache::new(s);
        watcher.pass(&mut c, &k).unwrap_or_else(|e| panic!("{e}"))
    };
    pass(&mut s);
    for (attack, expected, owner) in cases {
        attack::load(&vm, &attack).unwrap_or_else(|e| panic!("{attack:?}: {e}"));
        let alerts: Vec<String> = pass(&mut s)
            .into_iter()
            .filter_map(|e| match e {
                ids::watch::Event::HookFound(f) => Some(f.what),
                _ => None,
            })
            .collect();
        assert!(
            expected
                .iter()
                .all(|e| alerts.iter().any(|a| a.starts_with(e.as_str()))),
            "{attack:?}: the watch's next pass raised {alerts:?}, expected {expected:?}"
        );
        // The guest still runs its syscalls through the hook.
        assert_eq!(sh(&vm, "echo alive"), "alive");
        let reports = check_all(&mut s, &k);
        let found: Vec<_> = reports.iter().flat_map(|r| &r.findings).collect();
        let whats: Vec<&str> = found.iter().map(|f| f.what.as_str()).collect();
        assert_eq!(
            found.len(),
            expected.len(),
            "{attack:?}: expected {expected:?}, found {whats:?}"
        );
        for (f, e) in found.iter().zip(&expected) {
            assert!(
                f.what.starts_with(e.as_str()),
                "{attack:?}: {f:?}, expected {e}"
            );
            assert_eq!(
                f.owner.as_deref(),
                owner,
                "{attack:?}: the owner must be named where there is one: {f:?}"
            );
        }
        eprintln!("{attack:?}: found {whats:?}");
        // What the text baseline sees of the techniques that write text
        // or read-only data.
        let in_text = match &attack {
            Attack::HookSyscall(_) => Some(("rodata ", "sys_call_table")),
            Attack::PatchDispatch(_) => Some(("text ", "x64_sys_call")),
            _ => None,
        };
        if let Some((kind, sym)) = in_text {
            let r = text(&mut s);
            assert!(
                r.findings.len() == 1
                    && r.findings[0].what.starts_with(kind)
                    && r.findings[0].what.contains(sym)
                    && r.findings[0].owner.as_deref() == Some(MODULE),
                "{attack:?}: check text found {:#?}",
                r.findings
            );
            eprintln!("{attack:?}: check text found [{:?}]", r.findings[0].what);
        }
        if attack == Attack::HideModule {
            let mut c = SnapshotCache::new(&mut s);
            let listed = linux::lsmod(&mut c, &k, 0).unwrap_or_else(|e| panic!("{e}"));
            assert!(listed.iter().all(|m| m.name != MODULE), "hidden from lsmod");
            break;
        }
        if let Attack::HidePid(p) = attack {
            let mut c = SnapshotCache::new(&mut s);
            let listed = linux::ps(&mut c, &k, 0, true).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                listed.iter().all(|t| t.pid != p),
                "hidden from the task list"
            );
        }
        attack::unload(&vm).unwrap_or_else(|e| panic!("{attack:?}: {e}"));
        pass(&mut s);
        assert_clean(&mut s, &k, &format!("after removing {attack:?}"));
        if in_text.is_some() {
            let r = text(&mut s);
            assert!(
                r.findings.is_empty(),
                "after removing {attack:?}: {:#?}",
                r.findings
            );
        }
    }
    finish(vm);
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn attacks_found_on_the_default_kernel() {
    run(config("attacks-default"));
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn attacks_found_on_the_6_12_kernel() {
    let deb = std::env::var("SMMVMI_KERNEL_612_DEB")
        .ok()
        .map(|v| v.parse::<KernelDeb>().expect("kernel deb"))
        .unwrap_or_else(|| {
            smmvmi_tests::guest_image::resolve_lts_612().unwrap_or_else(|e| panic!("{e}"))
        });
    run(config("attacks-612").kernel_deb(deb));
}

/// `watch` on a live guest: a process started with a random name, the
/// attack module loaded (an LSTAR hook) and removed, then a guest reboot:
/// each reported as its ECS event, the hook within one interval of being
/// loaded, the reboot as `guest-rebooted`, and the watch goes on in the
/// new boot.
#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn watch_reports_processes_modules_hooks_and_reboots() {
    use std::sync::mpsc;
    use std::time::{Duration, Instant};
    let vm = boot(config("watch"));
    // A reset resets (the harness starts QEMU with -no-reboot).
    vm.qmp("set-action", Some(serde_json::json!({ "reboot": "reset" })))
        .unwrap_or_else(|e| panic!("{e}"));
    // The IDS's direct endpoint needs the QMP socket.
    vm.release_qmp();
    let endpoint = ids::Endpoint::from_state_dir(vm.state_dir());
    let interval = Duration::from_secs(1);
    let (tx, rx) = mpsc::channel::<(Instant, serde_json::Value)>();
    let opts = ids::watch::WatchOptions {
        interval,
        count: Some(70),
        cache: None,
        text_slices: 4,
    };
    let watcher = std::thread::spawn(move || {
        ids::watch::run(
            || ids::Session::connect(&endpoint, Duration::from_secs(5)),
            &opts,
            |e| {
                let _ = tx.send((
                    Instant::now(),
                    e.to_ecs("watch", std::time::SystemTime::now()),
                ));
            },
        )
    });
    let wait_for = |what: &str, pred: &dyn Fn(&serde_json::Value) -> bool, within: Duration| {
        let until = Instant::now() + within;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((at, e)) if pred(&e) => return (at, e),
                Ok((_, e)) => eprintln!("watch: {}", e["message"]),
                Err(_) => panic!("no {what} event within {within:?}"),
            }
        }
    };
    // The first pass learns the kernel (cold: a few seconds under TCG).
    wait_for(
        "baseline",
        &|e| e["event"]["action"] == "baseline",
        Duration::from_secs(60),
    );
    // A program named at random: busybox runs as `busyboxNAME APPLET ...`.
    let name = format!(
        "busybox{:08x}",
        std::process::id().wrapping_mul(2_654_435_761)
    );
    sh(
        &vm,
        &format!("cp /bin/busybox /tmp/{name}; /tmp/{name} sleep 600 >/dev/null 2>&1 </dev/null &"),
    );
    let (_, e) = wait_for(
        "process-started",
        &|e| e["event"]["action"] == "process-started" && e["process"]["name"] == name.as_str(),
        Duration::from_secs(20),
    );
    assert_eq!(e["event"]["kind"], "event");
    attack::load(&vm, &Attack::Lstar(0)).unwrap_or_else(|e| panic!("{e}"));
    let loaded = Instant::now();
    let (at, e) = wait_for(
        "hook-found",
        &|e| e["event"]["action"] == "hook-found",
        Duration::from_secs(20),
    );
    assert_eq!(e["event"]["kind"], "alert");
    assert_eq!(e["smmvmi"]["finding"]["owner"], MODULE);
    // One interval plus the pass that sees it (a few requests).
    let late = at.saturating_duration_since(loaded);
    assert!(late <= interval * 3, "hook reported {late:?} after loading");
    attack::unload(&vm).unwrap_or_else(|e| panic!("{e}"));
    wait_for(
        "hook-gone",
        &|e| e["event"]["action"] == "hook-gone",
        Duration::from_secs(20),
    );
    // Text: the dispatcher patched is found within one cover of the text
    // (4 slices, one per pass), by the text check and named by module.
    attack::load(&vm, &Attack::PatchDispatch(NR_GETPID)).unwrap_or_else(|e| panic!("{e}"));
    let (_, e) = wait_for(
        "hook-found (text)",
        &|e| e["event"]["action"] == "hook-found" && e["rule"]["name"] == "text",
        Duration::from_secs(30),
    );
    assert_eq!(e["smmvmi"]["finding"]["owner"], MODULE, "{e:#}");
    attack::unload(&vm).unwrap_or_else(|e| panic!("{e}"));
    let _ = vm.exec_timeout("reboot -f", Duration::from_secs(3));
    let (_, _) = wait_for(
        "guest-rebooted",
        &|e| e["event"]["action"] == "guest-rebooted",
        Duration::from_secs(60),
    );
    // And goes on: a process started in the new boot is reported.
    vm.wait_agent_ready(common::AGENT_READY)
        .unwrap_or_else(|e| panic!("{e}"));
    let again = format!("busybox{:08x}", std::process::id().wrapping_mul(40_503));
    sh(
        &vm,
        &format!(
            "cp /bin/busybox /tmp/{again}; /tmp/{again} sleep 600 >/dev/null 2>&1 </dev/null &"
        ),
    );
    wait_for(
        "process-started after the reboot",
        &|e| e["event"]["action"] == "process-started" && e["process"]["name"] == again.as_str(),
        Duration::from_secs(30),
    );
    let alerted = watcher.join().expect("watch thread");
    assert!(alerted, "the hook was an alert");
    finish(vm);
}

/// A clean guest watched with churn raises no alarm: processes starting
/// and exiting, a module chain unloaded and loaded again, the function
/// tracer and a syscall tracepoint on and off, a CPU taken offline and
/// back, for `SMMVMI_CHURN_SECS` seconds (default 300).
#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn a_clean_guest_with_churn_raises_no_alarm() {
    use std::time::{Duration, Instant};
    let secs: u64 = std::env::var("SMMVMI_CHURN_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let vm = boot(config("churn"));
    vm.release_qmp();
    let endpoint = ids::Endpoint::from_state_dir(vm.state_dir());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::<serde_json::Value>::new()));
    let watcher = {
        let (events, stop) = (events.clone(), stop.clone());
        std::thread::spawn(move || {
            // Passes until told to stop (count checked by the loop below).
            let mut passes = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && passes < 10_000 {
                let opts = ids::watch::WatchOptions {
                    interval: Duration::from_secs(1),
                    count: Some(10),
                    cache: Some(smmvmi_tests::cache_dir().join("churn-kernels")),
                    text_slices: 8,
                };
                ids::watch::run(
                    || ids::Session::connect(&endpoint, Duration::from_secs(5)),
                    &opts,
                    |e| {
                        events
                            .lock()
                            .unwrap()
                            .push(e.to_ecs("churn", std::time::SystemTime::now()))
                    },
                );
                passes += 10;
            }
        })
    };
    let t = "/sys/kernel/tracing";
    sh(
        &vm,
        &format!("mkdir -p {t}; mount -t tracefs nodev {t} 2>/dev/null; true"),
    );
    let started = Instant::now();
    let mut round = 0u32;
    while started.elapsed() < Duration::from_secs(secs) {
        round += 1;
        sh(
            &vm,
            "for i in 1 2 3 4 5; do sleep 0.$i & done; sh -c 'ls /proc >/dev/null'; wait",
        );
        match round % 4 {
            0 => {
                sh(
                    &vm,
                    "rmmod virtio_net && rmmod net_failover && rmmod failover",
                );
                sh(
                    &vm,
                    "insmod /lib/modules/failover.ko* && insmod /lib/modules/net_failover.ko* && insmod /lib/modules/virtio_net.ko*",
                );
            }
            1 => {
                sh(
                    &vm,
                    &format!(
                        "echo __x64_sys_getdents64 > {t}/set_ftrace_filter; echo function > {t}/current_tracer; \
                         echo 1 > {t}/events/syscalls/sys_enter_getdents64/enable; ls / >/dev/null; sleep 2; \
                         echo nop > {t}/current_tracer; echo 0 > {t}/events/syscalls/sys_enter_getdents64/enable"
                    ),
                );
            }
            2 => {
                sh(
                    &vm,
                    "echo 0 > /sys/devices/system/cpu/cpu1/online; sleep 2; echo 1 > /sys/devices/system/cpu/cpu1/online",
                );
            }
            _ => std::thread::sleep(Duration::from_secs(2)),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    watcher.join().expect("watch thread");
    let events = events.lock().unwrap();
    let alerts: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["event"]["kind"] == "alert")
        .collect();
    let count = |a: &str| events.iter().filter(|e| e["event"]["action"] == a).count();
    eprintln!(
        "churn {secs} s, {round} rounds: {} events, {} process starts, {} module loads, {} alerts",
        events.len(),
        count("process-started"),
        count("module-loaded"),
        alerts.len()
    );
    assert!(alerts.is_empty(), "alarms on a clean guest: {alerts:#?}");
    assert!(count("process-started") >= 10, "the churn was seen");
    assert!(count("module-loaded") >= 1, "the module reload was seen");
    finish(vm);
}

/// What the tampering proxy of
/// [`watch_reports_replies_tampered_or_replayed_by_the_host`] does to the
/// next sealed reply.
const PASS: u8 = 0;
const FLIP: u8 = 1;
const REPLAY: u8 = 2;

/// A host between the IDS and the daemon (the daemon, the host and the
/// guest are untrusted): on a proxy socket, it forwards every frame and,
/// when told, flips one bit of the next sealed reply or swaps it for the
/// one before. The watch reports each as `reply-rejected` (an alert), and
/// goes on: a process started afterwards is reported as usual.
#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn watch_reports_replies_tampered_or_replayed_by_the_host() {
    use host_injector::daemon::client::DaemonAddr;
    use host_injector::daemon::protocol::{MAX_REPLY_BODY, read_frame, write_frame};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::sync::{Arc, mpsc};
    use std::time::{Duration, Instant};

    let daemon = common::test_daemon("tamper", &[]);
    let vm = boot(config("tamper").through_daemon(&daemon.socket));
    let proxy_path = common::daemon_socket_path("tamper-proxy");
    let _ = std::fs::remove_file(&proxy_path);
    let listener = UnixListener::bind(&proxy_path).unwrap_or_else(|e| panic!("{e}"));
    let mode = Arc::new(AtomicU8::new(PASS));
    {
        let (mode, upstream) = (mode.clone(), daemon.socket.clone());
        std::thread::spawn(move || {
            // The last reply passed through unchanged, for a replay.
            let previous = Arc::new(std::sync::Mutex::new(None::<Vec<u8>>));
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = UnixStream::connect(&upstream) else {
                    continue;
                };
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || std::io::copy(&mut c_in, &mut s_out));
                let (mode, previous) = (mode.clone(), previous.clone());
                std::thread::spawn(move || {
                    let (mut s_in, mut c_out) = (server, client);
                    while let Ok((head, mut payload)) =
                        read_frame::<serde_json::Value>(&mut s_in, MAX_REPLY_BODY)
                    {
                        if head["reply"] == "transact" && !payload.is_empty() {
                            let mut prev = previous.lock().unwrap();
                            match mode.swap(PASS, Ordering::SeqCst) {
                                // A bit of the ciphertext (after the
                                // 32-byte frame header).
                                FLIP => {
                                    let at = 32.min(payload.len() - 1);
                                    payload[at] ^= 0x01;
                                }
                                REPLAY if prev.is_some() => {
                                    let old = prev.clone().expect("checked");
                                    *prev = Some(std::mem::replace(&mut payload, old));
                                }
                                _ => *prev = Some(payload.clone()),
                            }
                        }
                        if write_frame(&mut c_out, &head, &payload).is_err() {
                            break;
                        }
                    }
                });
            }
        });
    }
    vm.wait_agent_ready(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    let endpoint = ids::Endpoint::Daemon(ids::endpoint::DaemonEndpoint {
        addr: DaemonAddr::Unix(proxy_path.clone()),
        vm: vm.name().to_string(),
        key: Some(vm.info().key.clone()),
    });
    let (tx, rx) = mpsc::channel::<serde_json::Value>();
    let opts = ids::watch::WatchOptions {
        interval: Duration::from_secs(1),
        count: Some(25),
        cache: None,
        // Text slices through the daemon: requests on one vCPU.
        text_slices: 4,
    };
    let watcher = std::thread::spawn(move || {
        ids::watch::run(
            || ids::Session::connect(&endpoint, Duration::from_secs(5)),
            &opts,
            |e| {
                let _ = tx.send(e.to_ecs("tamper", std::time::SystemTime::now()));
            },
        )
    });
    let wait_for = |what: &str, pred: &dyn Fn(&serde_json::Value) -> bool| {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok(e) if pred(&e) => return e,
                Ok(e) => {
                    assert_ne!(
                        e["event"]["action"], "agent-unreachable",
                        "a tampered reply is not an outage: {e}"
                    );
                    assert_ne!(e["event"]["action"], "hook-found", "a clean guest: {e}");
                    eprintln!("watch: {}", e["message"]);
                }
                Err(_) => panic!("no {what} event within 60 s"),
            }
        }
    };
    wait_for("baseline", &|e| e["event"]["action"] == "baseline");
    for (n, (what, how)) in [("flipped", FLIP), ("replayed", REPLAY)]
        .into_iter()
        .enumerate()
    {
        mode.store(how, Ordering::SeqCst);
        let e = wait_for(&format!("reply-rejected ({what})"), &|e| {
            e["event"]["action"] == "reply-rejected"
        });
        eprintln!("{what}: {}", e["message"]);
        assert_eq!(e["event"]["kind"], "alert", "{e}");
        // The watch goes on: a process started now is seen.
        let name = format!("busybox{n}{:06x}", std::process::id() & 0xff_ffff);
        sh(
            &vm,
            &format!(
                "cp /bin/busybox /tmp/{name}; /tmp/{name} sleep 600 >/dev/null 2>&1 </dev/null &"
            ),
        );
        wait_for(&format!("process-started after the {what} reply"), &|e| {
            e["event"]["action"] == "process-started" && e["process"]["name"] == name.as_str()
        });
    }
    drop(rx);
    let alerted = watcher.join().expect("watch thread");
    assert!(alerted, "a rejected reply is an alert");
    let _ = std::fs::remove_file(&proxy_path);
    finish(vm);
}
