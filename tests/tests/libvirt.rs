//! Monitored VMs managed by libvirt, end to end: a private libvirtd from
//! Debian's packages (started here, in its own mount namespace, without
//! systemd: `smmvmi_tests::libvirt`), TCG domains (`type='qemu'`) written
//! by `DomainXml` (what `cargo xtask vm xml` prints), defined and started
//! with `virsh`, and served through a host-injector daemon of the test's
//! own that names them by domain and never opens libvirt's QMP socket.
//!
//! - served: the banner and the process list read through the daemon equal
//!   the guest's `/proc/version` and `/proc/*/stat`; libvirt still owns
//!   the monitor; `virsh reboot` five times while a client polls: QEMU
//!   lives, every reboot is followed (the daemon stops monitor SMIs at
//!   QEMU's SHUTDOWN/RESET, which it hears through libvirt), served after
//!   each;
//! - lifecycle: `virsh destroy` then `start`: a clear per-VM status
//!   meanwhile, served again without restarting the daemon; libvirtd
//!   stopped and started again: the daemon follows the domain again and a
//!   `virsh reboot` after it is followed; a redefinition that moves the
//!   mailbox socket is reported; `virsh shutdown` (ACPI) stops it.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use host_injector::daemon::client::{DaemonAddr, DaemonClient};
use ids::kernel::{BannerSearch, find_banner};
use ids::linux::{self, Discovery, Kernel};
use ids::memory::SnapshotCache;
use smmvmi_tests::daemon::DaemonProcess;
use smmvmi_tests::libvirt::{LibvirtVm, Libvirtd};

const DEADLINE: Duration = Duration::from_secs(10);

/// A daemon of this test alone. Its doorbell grace is 200 ms: a libvirt
/// TCG domain runs one thread per vCPU (libvirt has no element for
/// `thread=single`), and with two vCPU threads on two busy host cores a
/// broadcast SMI's rendezvous often takes tens of milliseconds, which the
/// default 10 ms would count as an unanswered doorbell and back with
/// monitor SMIs (each a `virsh` process).
fn test_daemon(test: &str) -> DaemonProcess {
    let dir = smmvmi_tests::repo_root().join(".cache/injector-tests");
    let _ = std::fs::create_dir_all(&dir);
    let config = dir.join(format!("{test}-{}.toml", std::process::id()));
    std::fs::write(&config, "doorbell_grace_ms = 200\n").expect("write daemon config");
    let socket = dir.join(format!("{test}-{}.sock", std::process::id()));
    DaemonProcess::spawn(&socket, &["--config", &config.display().to_string()], false)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The tests share one libvirtd, and one of them stops and starts it: they
/// run one at a time, whatever `--test-threads` says.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn libvirtd() -> (Libvirtd, MutexGuard<'static, ()>) {
    let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    (Libvirtd::ensure().unwrap_or_else(|e| panic!("{e}")), guard)
}

/// A fresh session answers (retried for up to `within`: right after a boot
/// the first request waits for the agent and a monitor SMI).
fn served(vm: &LibvirtVm, within: Duration) -> ids::Session {
    let until = Instant::now() + within;
    loop {
        let ep = vm.endpoint().parse().unwrap_or_else(|e| panic!("{e}"));
        let r = ids::Session::connect(&ep, DEADLINE).and_then(|mut s| s.info().map(|_| s));
        match r {
            Ok(s) => return s,
            Err(e) if Instant::now() > until => {
                panic!(
                    "VM {} not served within {within:?}: {e}\ndaemon status: {}",
                    vm.name,
                    status(vm)
                )
            }
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// The daemon's status of this VM.
fn status(vm: &LibvirtVm) -> serde_json::Value {
    let s = DaemonClient::connect(&DaemonAddr::Unix(vm.daemon.clone()), DEADLINE)
        .and_then(|mut c| c.status())
        .unwrap_or_else(|e| panic!("{e}"));
    s["vms"]
        .as_array()
        .and_then(|a| a.iter().find(|v| v["name"] == vm.name.as_str()).cloned())
        .unwrap_or_else(|| panic!("VM {} not in the daemon's status: {s}", vm.name))
}

/// Waits until `pred` holds on the VM's status; panics with the status.
fn wait_status(
    vm: &LibvirtVm,
    what: &str,
    within: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let until = Instant::now() + within;
    loop {
        let s = status(vm);
        if pred(&s) {
            return s;
        }
        if Instant::now() > until {
            panic!(
                "VM {}: expected {what} within {within:?}; status: {s:#}",
                vm.name
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn counter(s: &serde_json::Value, name: &str) -> u64 {
    s["counters"][name].as_u64().unwrap_or(0)
}

fn sh(vm: &LibvirtVm, cmd: &str) -> String {
    vm.sh(cmd).unwrap_or_else(|e| panic!("{e}"))
}

/// The guest's processes: pid -> (comm, ppid), from /proc/*/stat.
fn guest_processes(vm: &LibvirtVm) -> BTreeMap<u32, (String, u32)> {
    let out = sh(
        vm,
        "for d in /proc/[0-9]*; do cat $d/stat 2>/dev/null; echo; done",
    );
    let mut m = BTreeMap::new();
    for line in out.lines() {
        let (Some(open), Some(close)) = (line.find('('), line.rfind(')')) else {
            continue;
        };
        let Ok(pid) = line[..open].trim().parse() else {
            continue;
        };
        let comm = line[open + 1..close].to_string();
        let mut rest = line[close + 1..].split_whitespace();
        let _state = rest.next();
        if let Some(Ok(ppid)) = rest.next().map(str::parse) {
            m.insert(pid, (comm, ppid));
        }
    }
    m
}

/// Runs `f` again when the agent served while a vCPU was not in SMM: with
/// one TCG thread per vCPU (libvirt's TCG domains) on busy host cores a
/// vCPU thread may miss the 100 ms rendezvous, and ops on its state answer
/// `CpuNotInSmm` (a partial session, counted in the mailbox header).
fn retry_partial<T, E: std::fmt::Display>(what: &str, mut f: impl FnMut() -> Result<T, E>) -> T {
    for attempt in 1.. {
        match f() {
            Ok(v) => return v,
            Err(e) if attempt < 5 && e.to_string().contains("CpuNotInSmm") => {
                eprintln!("{what}: partial session (attempt {attempt}): {e}; again");
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
    unreachable!()
}

fn check_banner_and_ps(vm: &LibvirtVm, s: &mut ids::Session) {
    let banner = retry_partial("banner", || find_banner(&mut *s, BannerSearch::default()));
    let version = sh(vm, "cat /proc/version");
    assert_eq!(
        banner.text.trim_end(),
        version.trim_end(),
        "the banner read through the daemon differs from the guest's /proc/version"
    );

    let k = retry_partial("kernel", || {
        Kernel::load(&mut *s, &Discovery::default(), None)
    });
    let mine = retry_partial("ps", || {
        linux::ps(&mut SnapshotCache::new(&mut *s), &k, 0, false)
    });
    let truth = guest_processes(vm);
    let cmdd: u32 = sh(vm, "pidof smmvmi-cmdd | cut -d' ' -f1")
        .trim()
        .parse()
        .unwrap_or(0);
    let (ids_pids, guest_pids, skip) = common::settled_pids(
        mine.iter().map(|t| (t.pid, t.ppid)),
        truth.iter().map(|(&p, v)| (p, v.1)),
        cmdd,
    );
    assert!(
        ids_pids.len() >= 40,
        "only {} processes seen by the IDS",
        ids_pids.len()
    );
    assert_eq!(
        ids_pids, guest_pids,
        "the IDS (through the daemon) and the guest see different processes (command-channel tasks {skip:?} left out)"
    );
    for t in mine.iter().filter(|t| !skip.contains(&t.pid)) {
        let (comm, ppid) = &truth[&t.pid];
        let same_comm = common::same_comm(comm, t);
        assert!(
            same_comm && t.ppid == *ppid,
            "pid {}: IDS (comm, ppid) = {:?}, /proc says {:?}",
            t.pid,
            (&t.comm, t.ppid),
            (comm, ppid)
        );
    }
    eprintln!(
        "banner and {} processes equal the guest's view",
        ids_pids.len()
    );
}

/// A client polling the agent until told to stop: (answered, failed).
fn poller(vm: &LibvirtVm, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u64, u64)> {
    let ep: ids::Endpoint = vm.endpoint().parse().unwrap_or_else(|e| panic!("{e}"));
    std::thread::spawn(move || {
        let ok = AtomicU64::new(0);
        let failed = AtomicU64::new(0);
        let mut s: Option<ids::Session> = None;
        while !stop.load(Ordering::Relaxed) {
            if s.is_none() {
                s = ids::Session::connect(&ep, Duration::from_secs(3)).ok();
            }
            match s.as_mut().map(|s| s.cpu_state(0)) {
                Some(Ok(_)) => {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    s = None;
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (ok.into_inner(), failed.into_inner())
    })
}

#[test]
#[ignore = "boots a libvirt domain (run with --ignored, as root, with libvirt-daemon-system installed)"]
fn libvirt_domain_served_and_followed_through_reboots() {
    let (l, _one) = libvirtd();
    let d = test_daemon("lv-serve");
    let vm =
        LibvirtVm::define_and_start(&l, &d.socket, "lv-serve", 2).unwrap_or_else(|e| panic!("{e}"));
    let st = status(&vm);
    assert_eq!(st["monitor"], "libvirt", "{st:#}");
    assert!(
        st["qmp_socket"].is_null(),
        "the daemon has no QMP socket of its own: {st:#}"
    );
    assert_eq!(
        st["ivshmem_socket"].as_str().map(PathBuf::from),
        Some(vm.xml.ivshmem_socket.clone()),
        "the daemon took the socket from the domain's <shmem>"
    );
    assert_eq!(st["vectors"], 3, "vectors from <msi vectors='3'/>");
    let mut s = served(&vm, Duration::from_secs(60));
    check_banner_and_ps(&vm, &mut s);
    // The key came as a launch secret into the secret area, not over fw_cfg.
    let info = s.info().unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(
        info.header.sev_flags & smmvmi_mailbox::records::KEY_FROM_LAUNCH_SECRET,
        0,
        "INFO says the key came from the launch secret area: {:#x}",
        info.header.sev_flags
    );
    let xml = std::fs::read_to_string(vm.state_dir.join("domain.xml")).expect("domain.xml");
    assert!(
        !xml.contains("-fw_cfg") && xml.contains("loader,file="),
        "the domain loads the key into the secret area, not fw_cfg:\n{xml}"
    );
    drop(s);
    // libvirt still owns the monitor and answers on it.
    let v = vm
        .virsh(&["qemu-monitor-command", &vm.name, "--hmp", "info version"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(v.contains("7.2"), "monitor through libvirt: {v}");
    let st = wait_status(
        &vm,
        "libvirt events followed",
        Duration::from_secs(10),
        |s| s["libvirt"]["events_connected"] == true,
    );
    assert!(
        st["libvirt"]["state"]
            .as_str()
            .unwrap_or("")
            .starts_with("running"),
        "{st:#}"
    );

    let resets_before = counter(&status(&vm), "resets");
    let stop = Arc::new(AtomicBool::new(false));
    let poll = poller(&vm, stop.clone());
    for round in 1..=5 {
        let before = vm.ready_count();
        let t = Instant::now();
        vm.virsh(&["reboot", &vm.name])
            .unwrap_or_else(|e| panic!("{e}"));
        vm.wait_ready(before, Duration::from_secs(180))
            .unwrap_or_else(|e| panic!("reboot {round}: {e}\ndomstate: {}", vm.domstate()));
        let mut s = served(&vm, Duration::from_secs(60));
        s.cpu_state(0)
            .unwrap_or_else(|e| panic!("after reboot {round}: {e}"));
        eprintln!(
            "virsh reboot {round}: guest back and served after {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = poll.join().expect("poller");
    eprintln!("poller: {ok} requests answered, {failed} failed (during reboots)");
    assert!(ok > 20, "the poller was served {ok} times");
    assert!(
        vm.domstate().starts_with("running"),
        "QEMU must survive 5 reboots under polling: domstate {}",
        vm.domstate()
    );
    let st = status(&vm);
    // Each `virsh reboot`: ACPI power button, guest powers off (QEMU
    // SHUTDOWN), libvirt resets it (QEMU RESET): both reach the daemon.
    assert!(
        counter(&st, "resets") >= resets_before + 10,
        "expected ≥ 10 SHUTDOWN/RESET events through libvirt, counters {}",
        st["counters"]
    );
    assert_eq!(counter(&st, "qemu_gone"), 0, "{st:#}");
    eprintln!("counters after 5 reboots: {}", st["counters"]);
}

#[test]
#[ignore = "boots a libvirt domain (run with --ignored, as root, with libvirt-daemon-system installed)"]
fn libvirt_lifecycle_destroy_start_libvirtd_restart_redefine_shutdown() {
    let (l, _one) = libvirtd();
    let mut d = test_daemon("lv-life");
    let daemon_pid = d.pid();
    let vm =
        LibvirtVm::define_and_start(&l, &d.socket, "lv-life", 2).unwrap_or_else(|e| panic!("{e}"));
    served(&vm, Duration::from_secs(60));

    // destroy: a clear status and typed errors, then start: served again.
    vm.virsh(&["destroy", &vm.name])
        .unwrap_or_else(|e| panic!("{e}"));
    let st = wait_status(
        &vm,
        "state shut off (destroyed)",
        Duration::from_secs(10),
        |s| {
            s["libvirt"]["state"]
                .as_str()
                .unwrap_or("")
                .contains("destroyed")
        },
    );
    assert!(st["qemu"].is_null(), "{st:#}");
    let err = session_error(&vm);
    assert!(
        err.contains("shut off (destroyed)") && err.contains("virsh"),
        "a request while the domain is destroyed: {err}"
    );
    vm.start().unwrap_or_else(|e| panic!("{e}"));
    let mut s = served(&vm, Duration::from_secs(60));
    s.cpu_state(0).unwrap_or_else(|e| panic!("{e}"));
    assert!(d.is_running() && d.pid() == daemon_pid, "same daemon");
    drop(s);

    // libvirtd restarted: the domain keeps running and is served; the daemon
    // subscribes again and follows a reboot after it.
    l.stop();
    wait_status(
        &vm,
        "libvirt events not followed while libvirtd is down",
        Duration::from_secs(10),
        |s| s["libvirt"]["events_connected"] == false,
    );
    served(&vm, Duration::from_secs(30))
        .cpu_state(0)
        .unwrap_or_else(|e| panic!("served while libvirtd is down: {e}"));
    l.start().unwrap_or_else(|e| panic!("{e}"));
    wait_status(
        &vm,
        "libvirt events and QEMU's events (the monitor through libvirt) followed again",
        Duration::from_secs(30),
        |s| {
            s["libvirt"]["events_connected"] == true
                && s["qmp_connected"] == true
                && s["libvirt"]["state"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("running")
        },
    );
    let resets = counter(&status(&vm), "resets");
    let before = vm.ready_count();
    vm.virsh(&["reboot", &vm.name])
        .unwrap_or_else(|e| panic!("{e}"));
    vm.wait_ready(before, Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("{e}"));
    served(&vm, Duration::from_secs(60));
    assert!(
        counter(&status(&vm), "resets") >= resets + 2,
        "SHUTDOWN/RESET of a reboot after the libvirtd restart reach the daemon: {}",
        status(&vm)["counters"]
    );

    // A redefinition that moves the mailbox socket away from the daemon.
    let xml = vm
        .virsh(&["dumpxml", "--inactive", &vm.name])
        .unwrap_or_else(|e| panic!("{e}"));
    let ours = vm.xml.ivshmem_socket.display().to_string();
    let moved = xml.replace(&ours, "/run/elsewhere.sock");
    assert_ne!(moved, xml, "the definition names {ours}");
    let f = vm.state_dir.join("moved.xml");
    std::fs::write(&f, &moved).expect("write moved.xml");
    vm.virsh(&["define", &f.display().to_string()])
        .unwrap_or_else(|e| panic!("{e}"));
    let st = wait_status(
        &vm,
        "a redefinition problem",
        Duration::from_secs(15),
        |s| {
            s["libvirt"]["problem"]
                .as_str()
                .unwrap_or("")
                .contains("redefined")
        },
    );
    let p = st["libvirt"]["problem"].as_str().unwrap_or("");
    assert!(
        p.contains("/run/elsewhere.sock") && p.contains(&ours),
        "{p}"
    );
    let f = vm.state_dir.join("restored.xml");
    std::fs::write(&f, &xml).expect("write restored.xml");
    vm.virsh(&["define", &f.display().to_string()])
        .unwrap_or_else(|e| panic!("{e}"));
    wait_status(
        &vm,
        "the problem cleared by the restored definition",
        Duration::from_secs(15),
        |s| s["libvirt"]["problem"].is_null(),
    );

    // virsh shutdown: the guest honours the ACPI power button.
    vm.virsh(&["shutdown", &vm.name])
        .unwrap_or_else(|e| panic!("{e}"));
    wait_status(
        &vm,
        "state shut off (shutdown)",
        Duration::from_secs(60),
        |s| {
            s["libvirt"]["state"]
                .as_str()
                .unwrap_or("")
                .contains("shutdown")
                && s["libvirt"]["state"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("shut off")
        },
    );
    let err = session_error(&vm);
    assert!(err.contains("shut off"), "{err}");
}

/// The error a fresh request gets (the VM must not be served now).
fn session_error(vm: &LibvirtVm) -> String {
    let ep = vm.endpoint().parse().unwrap_or_else(|e| panic!("{e}"));
    match ids::Session::connect(&ep, Duration::from_secs(3)).and_then(|mut s| s.info().map(|_| ()))
    {
        Ok(()) => panic!("VM {} was served while it should not run", vm.name),
        Err(e) => e.to_string(),
    }
}
