//! End-to-end tests of the host-injector daemon on QEMU: VMs boot with
//! `ivshmem-doorbell` through a daemon this test starts (its own socket, so
//! killing it touches nobody else), IDS clients talk to it over its unix
//! socket.
//!
//! - many clients, one VM: every reply reaches the client that asked; the
//!   same on the patched QEMU (patches-qemu/) with every request on one
//!   vCPU through the `qmp-targeted` path (`inject-smi`);
//! - malformed frames: that connection gets a typed error and is closed,
//!   the others are unaffected;
//! - QEMU SIGKILLed mid-request: typed "QEMU gone" errors, no hang; QEMU
//!   started again: served again, same daemon;
//! - daemon SIGTERM under load: in-flight requests answered, clean exit;
//!   daemon SIGKILLed and restarted under load: the running VM is served
//!   again (file-backed mailbox, over QMP), clients get clear errors
//!   meanwhile;
//! - not root: refusal.

mod common;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{
    AGENT_READY, assert_only_inject_smi, boot, config, daemon_socket_path as socket_path,
    patched_qemu, test_daemon,
};
use host_injector::Target;
use host_injector::daemon::client::{ClientError, DaemonAddr, DaemonClient, read_to_end};
use host_injector::daemon::protocol::{
    self, DaemonError, MAGIC, MAX_REPLY_BODY, ReplyHead, RequestHead, unhex,
};
use smmvmi_mailbox::client::Client;
use smmvmi_mailbox::crypto::SessionKeys;
use smmvmi_mailbox::frame::FLAG_NO_SNAPSHOT;
use smmvmi_mailbox::wire::{Op, Status};
use smmvmi_tests::daemon::DaemonProcess;
use smmvmi_tests::vm::{Vm, VmConfig};

const DEADLINE: Duration = Duration::from_secs(10);

/// Boots a VM served by `daemon`, waits for its agent.
fn vm_through(test: &str, daemon: &DaemonProcess) -> Vm {
    vm_through_with(config(test), daemon)
}

/// Boots `cfg` served by `daemon`, waits for its agent.
fn vm_through_with(cfg: VmConfig, daemon: &DaemonProcess) -> Vm {
    let vm = boot(cfg.through_daemon(&daemon.socket));
    vm.wait_agent_ready(AGENT_READY)
        .unwrap_or_else(|e| panic!("{e}"));
    vm
}

/// What IDS clients need to seal: the key and the boot's session salt.
struct Sealer {
    key: [u8; 32],
    salt: [u8; 16],
}

impl Sealer {
    fn new(vm: &Vm, daemon: &DaemonAddr) -> Self {
        let key: [u8; 32] = std::fs::read(&vm.info().key).unwrap().try_into().unwrap();
        let mut c = DaemonClient::connect(daemon, DEADLINE).unwrap();
        let h = c.header(vm.name()).unwrap_or_else(|e| panic!("{e}"));
        let salt = unhex(&h.salt).unwrap().try_into().unwrap();
        Self { key, salt }
    }

    /// An independent IDS client: its own random id (so its own keys) and
    /// its own sequence, as `ids::Session` makes them.
    fn independent_client(&self) -> Client {
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).unwrap();
        Client::new(
            SessionKeys::derive_for(&self.key, &self.salt, u64::from_le_bytes(id)),
            now_nanos(),
        )
    }
}

fn nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    getrandom::fill(&mut n).unwrap();
    n
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// Outcome counts of one client.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    ok: u32,
    replay: u32,
    crossed: u32,
    /// Targeted requests answered "CPU not in SMM" (served by a stale SMI
    /// on the other vCPU).
    not_in_smm: u32,
}

/// 8 clients × 1,000 requests at once to one VM through the daemon, with
/// doorbell SMIs (monitor SMIs for the first). Each client is independent, as IDS sessions are: its own
/// random id (its own keys) and its own sequence, sealed and sent without any
/// coordination with the others; the daemon interleaves them as they come.
/// Each reply must open under the client's own pending request (binding:
/// in-reply-to sequence, request tag, fresh IDS nonce): a reply delivered to
/// the wrong client fails that check and counts as crossed. None may be
/// lost, crossed, or rejected as a replay (the agent keeps a replay window
/// per client).
#[test]
#[ignore = "end-to-end: boots QEMU (cargo xtask test)"]
fn eight_clients_thousand_requests_each_reply_reaches_its_client() {
    let daemon = test_daemon("conc", &[]);
    let vm = vm_through("dconc", &daemon);
    eight_clients(&vm, &daemon.addr(), protocol::SmiPath::Auto, false);
    common::finish(vm);
}

/// The same 8 × 1,000 on the QEMU built with patches-qemu/, every SMI the
/// patched QEMU's `inject-smi` to one vCPU (smi path `qmp-targeted`):
/// client i asks for vCPU i mod 2's state in a request marked
/// `FLAG_NO_SNAPSHOT`, and the SMI goes to that vCPU alone.
#[test]
#[ignore = "end-to-end: boots QEMU (cargo xtask test)"]
fn eight_clients_thousand_targeted_requests_on_patched_qemu_qmp_targeted() {
    let Some(qemu) = patched_qemu("eight_clients_qmp_targeted") else {
        return;
    };
    let daemon = test_daemon("conc-qp", &[]);
    let vm = vm_through_with(config("dconc-qp").qemu(qemu), &daemon);
    let addr = daemon.addr();
    eight_clients(&vm, &addr, protocol::SmiPath::QmpTargeted, true);
    assert_only_inject_smi(&addr, vm.name(), 8 * 1000);
    common::finish(vm);
}

/// 8 independent clients × 1,000 one-op requests (CPU_STATE of vCPU i mod
/// 2) at once through the daemon at `addr`, on `smi`; `targeted`: each
/// request goes to that vCPU alone, marked `FLAG_NO_SNAPSHOT`.
fn eight_clients(vm: &Vm, addr: &DaemonAddr, smi: protocol::SmiPath, targeted: bool) {
    const CLIENTS: usize = 8;
    const REQUESTS: u32 = 1000;
    let sealer = Arc::new(Sealer::new(vm, addr));
    let started = Instant::now();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (addr, sealer) = (addr.clone(), sealer.clone());
            let name = vm.name().to_string();
            std::thread::spawn(move || {
                let mut c = DaemonClient::connect(&addr, DEADLINE).unwrap();
                let mut client = sealer.independent_client();
                let mut t = Tally::default();
                let cpu = (i % 2) as u32;
                let op = Op::CpuState { cpu };
                let (target, flags) = if targeted {
                    (Target::Cpu(cpu), FLAG_NO_SNAPSHOT)
                } else {
                    (Target::All, 0)
                };
                for _ in 0..REQUESTS {
                    let mut frame = vec![0u8; Client::request_frame_len(1)];
                    let n = client
                        .seal_request_with(&[op], nonce(), flags, &mut frame)
                        .unwrap();
                    frame.truncate(n);
                    let head = RequestHead::Transact {
                        vm: name.clone(),
                        target,
                        deadline_ms: DEADLINE.as_millis() as u64,
                        smi,
                    };
                    c.stream()
                        .write_all(&protocol::encode(&head, &frame))
                        .unwrap();
                    let (h, reply) = protocol::read_frame::<ReplyHead>(c.stream(), MAX_REPLY_BODY)
                        .unwrap_or_else(|e| panic!("client {i}: {e}"));
                    match h {
                        ReplyHead::Transact { .. } => match client.open_reply_vec(&reply) {
                            Ok(r) if r.len() == 1 && r[0].status == Status::Ok => t.ok += 1,
                            // A targeted SMI re-raised by the daemon (its
                            // vCPU had not entered SMM within the grace)
                            // can arrive after that request was served and
                            // serve the next one, aimed at the other vCPU:
                            // the agent then says so, authenticated, and a
                            // client (`Session::request_on_cpu`) sends it
                            // again as a snapshot request.
                            Ok(r)
                                if targeted
                                    && r.len() == 1
                                    && r[0].status == Status::CpuNotInSmm =>
                            {
                                t.ok += 1;
                                t.not_in_smm += 1;
                            }
                            Ok(r) => {
                                panic!("client {i}: bound reply with unexpected results {r:?}")
                            }
                            Err(_) => t.crossed += 1,
                        },
                        ReplyHead::Error {
                            error: DaemonError::Rejected { status: 4, .. },
                        } => t.replay += 1,
                        other => panic!(
                            "client {i}: expected a reply or a replay rejection, found {other:?}"
                        ),
                    }
                }
                t
            })
        })
        .collect();
    let tallies: Vec<Tally> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let elapsed = started.elapsed();
    let total_ok: u32 = tallies.iter().map(|t| t.ok).sum();
    let total_replay: u32 = tallies.iter().map(|t| t.replay).sum();
    eprintln!(
        "8 clients x {REQUESTS}: {total_ok} answered and bound, {total_replay} rejected as replays, in {:.1} s ({:.0} req/s); per client {tallies:?}",
        elapsed.as_secs_f64(),
        f64::from(CLIENTS as u32 * REQUESTS) / elapsed.as_secs_f64()
    );
    for (i, t) in tallies.iter().enumerate() {
        assert_eq!(
            t.crossed, 0,
            "client {i}: a reply did not bind its request (crossed)"
        );
        assert_eq!(
            t.ok + t.replay,
            REQUESTS,
            "client {i}: requests lost: {t:?}"
        );
    }
    assert_eq!(
        total_replay, 0,
        "independent clients were rejected as replays: the agent's per-client windows failed"
    );
    let not_in_smm: u32 = tallies.iter().map(|t| t.not_in_smm).sum();
    assert!(
        not_in_smm * 50 <= CLIENTS as u32 * REQUESTS,
        "{not_in_smm} targeted requests were served by a vCPU they were not aimed at (more than 2 %)"
    );
    let metrics = DaemonClient::connect(addr, DEADLINE)
        .unwrap()
        .metrics()
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "smmvmi_requests_total{{vm=\"{}\",result=\"ok\"}} {}",
            vm.name(),
            total_ok
        )),
        "{metrics}"
    );
}

fn expect_error_then_close(c: &mut DaemonClient, what: &str) -> DaemonError {
    let (h, _) = c.read_reply().unwrap_or_else(|e| panic!("{what}: {e}"));
    let ReplyHead::Error { error } = h else {
        panic!("{what}: expected an error reply, found {h:?}")
    };
    let rest = read_to_end(c.stream()).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        rest.is_empty(),
        "{what}: the daemon must close the connection"
    );
    error
}

/// Malformed frames: each such connection gets one typed error and is
/// closed; a client working meanwhile on its own connection is unaffected.
#[test]
#[ignore = "end-to-end: boots QEMU (cargo xtask test)"]
fn malformed_frames_close_only_their_connection() {
    let daemon = test_daemon("malf", &[]);
    let vm = vm_through("dmalf", &daemon);
    let addr = daemon.addr();
    let key_path = vm.info().key.clone();
    let ep = ids::Endpoint::Daemon(ids::endpoint::DaemonEndpoint {
        addr: addr.clone(),
        vm: vm.name().to_string(),
        key: Some(key_path),
    });
    let mut good = ids::Session::connect(&ep, DEADLINE).unwrap_or_else(|e| panic!("{e}"));
    let before = good.info().unwrap_or_else(|e| panic!("{e}"));

    let connect = || DaemonClient::connect(&addr, DEADLINE).unwrap();
    // Oversized length.
    let mut c = connect();
    let mut f = MAGIC.to_vec();
    f.extend_from_slice(&(protocol::MAX_REQUEST_BODY + 1).to_le_bytes());
    c.send_raw(&f).unwrap();
    let e = expect_error_then_close(&mut c, "oversized");
    assert!(matches!(e, DaemonError::TooLarge { .. }), "{e}");
    // Truncated: a prefix announcing 100 bytes, 10 sent, then end of stream.
    let mut c = connect();
    let mut f = MAGIC.to_vec();
    f.extend_from_slice(&100u32.to_le_bytes());
    f.extend_from_slice(&[0u8; 10]);
    c.send_raw(&f).unwrap();
    c.stream().shutdown(std::net::Shutdown::Write).unwrap();
    let e = expect_error_then_close(&mut c, "truncated");
    assert!(matches!(e, DaemonError::Malformed { .. }), "{e}");
    // Garbage.
    let mut c = connect();
    c.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let e = expect_error_then_close(&mut c, "garbage");
    assert!(matches!(e, DaemonError::Malformed { .. }), "{e}");
    // A well-framed head that is not JSON of a known request.
    let mut c = connect();
    c.send_raw(&protocol::encode(
        &serde_json::json!({"op": "format-disk"}),
        b"",
    ))
    .unwrap();
    let e = expect_error_then_close(&mut c, "unknown op");
    assert!(e.to_string().contains("not a known message"), "{e}");
    // Unknown VM.
    let mut c = connect();
    c.send_raw(&protocol::encode(
        &RequestHead::Transact {
            vm: "no-such-vm".into(),
            target: Target::All,
            deadline_ms: 1000,
            smi: protocol::SmiPath::Auto,
        },
        b"x",
    ))
    .unwrap();
    let e = expect_error_then_close(&mut c, "unknown VM");
    match &e {
        DaemonError::UnknownVm { vm: name, known } => {
            assert_eq!(name, "no-such-vm");
            assert!(known.contains(&vm.name().to_string()), "{known:?}");
        }
        other => panic!("expected UnknownVm, found {other}"),
    }
    // A vCPU without a vector: a typed error, the connection stays.
    let mut c = connect();
    let r = c.transact(vm.name(), Target::Cpu(40), DEADLINE, b"frame");
    assert!(
        matches!(r, Err(ClientError::Daemon(DaemonError::BadTarget { .. }))),
        "{r:?}"
    );
    c.status()
        .expect("connection kept after a typed request error");

    // The good client is unaffected.
    let after = good.info().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(before.header.cpu_count, after.header.cpu_count);
    common::finish(vm);
}

/// QEMU SIGKILLed while a client polls: typed "QEMU gone" errors, bounded;
/// QEMU started again (same command line, so it connects to the same
/// ivshmem socket): the same daemon serves it again.
#[test]
#[ignore = "end-to-end: boots QEMU (cargo xtask test)"]
fn qemu_killed_mid_request_then_restarted_is_served_again() {
    let daemon = test_daemon("qkill", &[]);
    let vm = vm_through("dqkill", &daemon);
    let addr = daemon.addr();
    let ep = ids::Endpoint::Daemon(ids::endpoint::DaemonEndpoint {
        addr: addr.clone(),
        vm: vm.name().to_string(),
        key: Some(vm.info().key.clone()),
    });
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (ep, stop) = (ep.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut s = ids::Session::connect(&ep, DEADLINE).unwrap();
            let (mut ok, mut gone) = (0u32, 0u32);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match s.cpu_state(0) {
                    Ok(_) => ok += 1,
                    Err(ids::SessionError::Daemon(ClientError::Daemon(
                        DaemonError::QemuGone { .. },
                    ))) => {
                        gone += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => {
                        // After QEMU is back the salt changed: a real client
                        // reconnects; this one stops here.
                        if matches!(e, ids::SessionError::SaltChanged) {
                            break;
                        }
                        panic!("unexpected error while QEMU dies: {e}");
                    }
                }
                assert!(
                    t.elapsed() < DEADLINE + Duration::from_secs(2),
                    "a request hung"
                );
            }
            (ok, gone)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let pid = vm.info().pid;
    // SAFETY: kill(2) on the QEMU this test started; no memory involved.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(500));
    let st = DaemonClient::connect(&addr, DEADLINE)
        .unwrap()
        .status()
        .unwrap();
    let v = &st["vms"][0];
    assert!(v["qemu"].is_null(), "{st}");
    assert!(
        v["qemu_gone"]
            .as_str()
            .unwrap_or("")
            .contains("QEMU closed the ivshmem socket"),
        "{st}"
    );
    stop.store(true, Ordering::Relaxed);
    let (ok, gone) = poller.join().unwrap();
    assert!(ok > 0 && gone > 0, "ok {ok}, gone {gone}");

    // QEMU again, same command line.
    let dir = vm.state_dir().to_path_buf();
    let cmdline = std::fs::read_to_string(dir.join("qemu.cmdline")).unwrap();
    for f in ["serial.log", "debugcon.log"] {
        std::fs::write(dir.join(f), b"").unwrap();
    }
    let mut qemu = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("exec {}", cmdline.trim()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(120);
    let info = loop {
        assert!(
            Instant::now() < until,
            "the restarted VM was not served within 120 s"
        );
        assert!(matches!(qemu.try_wait(), Ok(None)), "restarted QEMU exited");
        if let Ok(mut s) = ids::Session::connect(&ep, DEADLINE)
            && let Ok(i) = s.info()
        {
            break i;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(info.authenticated);
    let st = DaemonClient::connect(&addr, DEADLINE)
        .unwrap()
        .status()
        .unwrap();
    assert_eq!(st["vms"][0]["counters"]["qemu_connects"], 2, "{st}");
    let _ = qemu.kill();
    let _ = qemu.wait();
    drop(vm);
    let _ = std::fs::remove_dir_all(dir);
}

fn daemon_config(path: &Path, vm_name: &str, socket: &Path) {
    let dir = smmvmi_tests::vm::vms_dir().join(vm_name);
    std::fs::write(
        path,
        format!(
            "socket = {socket:?}\n\
             [[vm]]\n\
             name = {vm_name:?}\n\
             ivshmem_socket = {:?}\n\
             qmp = {:?}\n\
             vectors = 3\n\
             mailbox_file = {:?}\n",
            dir.join("ivshmem.sock"),
            dir.join("qmp-daemon.sock"),
            dir.join("mailbox"),
        ),
    )
    .unwrap();
}

/// SIGTERM under load: in-flight requests are answered, then the daemon
/// exits 0. SIGKILL under load, then a restart with the same configuration:
/// clients see connection errors meanwhile, and the running VM (whose QEMU
/// still holds the first daemon's eventfds) is served again over QMP from
/// the file-backed mailbox.
#[test]
#[ignore = "end-to-end: boots QEMU (cargo xtask test)"]
fn daemon_terminated_and_killed_under_load_serves_the_vm_again() {
    let name = format!("t-drst-{}", std::process::id());
    let socket = socket_path("drst");
    let cfg = socket.with_extension("toml");
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    daemon_config(&cfg, &name, &socket);
    let cfg_s = cfg.display().to_string();
    let mut daemon = DaemonProcess::spawn(&socket, &["--config", &cfg_s], false)
        .unwrap_or_else(|e| panic!("{e}"));
    let vm = vm_through("drst", &daemon);
    assert_eq!(vm.name(), name);
    let ep = ids::Endpoint::Daemon(ids::endpoint::DaemonEndpoint {
        addr: daemon.addr(),
        vm: name.clone(),
        key: Some(vm.info().key.clone()),
    });
    // Load: 2 clients polling; each records what it saw.
    let load = |ep: ids::Endpoint, stop: Arc<std::sync::atomic::AtomicBool>| {
        std::thread::spawn(move || {
            let (mut ok, mut down) = (0u32, 0u32);
            let mut s = None;
            while !stop.load(Ordering::Relaxed) {
                if s.is_none() {
                    s = ids::Session::connect(&ep, DEADLINE).ok();
                    if s.is_none() {
                        down += 1;
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                }
                match s.as_mut().unwrap().cpu_state(0) {
                    Ok(_) => ok += 1,
                    Err(ids::SessionError::Daemon(
                        ClientError::Frame { .. }
                        | ClientError::Connect { .. }
                        | ClientError::Daemon(DaemonError::ShuttingDown),
                    )) => {
                        down += 1;
                        s = None;
                    }
                    // A restart can leave the agent having served a request
                    // whose reply never reached us; a fresh session starts
                    // clean.
                    Err(ids::SessionError::Daemon(ClientError::Daemon(
                        DaemonError::Rejected { status: 4, .. },
                    ))) => s = None,
                    Err(e) => panic!("unexpected error under daemon restarts: {e}"),
                }
            }
            (ok, down)
        })
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..2).map(|_| load(ep.clone(), stop.clone())).collect();
    std::thread::sleep(Duration::from_secs(1));

    // SIGTERM: drain and exit 0.
    let st = daemon
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(15))
        .expect("the daemon exits within 15 s of SIGTERM");
    assert!(st.success(), "SIGTERM exit: {st}");
    let log = std::fs::read_to_string(&daemon.log).unwrap_or_default();
    assert!(
        log.contains("SIGTERM: finishing in-flight requests") && log.contains("stopped"),
        "{log}"
    );

    // Restart; then SIGKILL under load; restart again.
    for round in 0..2 {
        daemon = DaemonProcess::spawn(&socket, &["--config", &cfg_s], false)
            .unwrap_or_else(|e| panic!("{e}"));
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let mut s = ids::Session::connect(&ep, DEADLINE);
            if let Ok(s) = &mut s
                && s.cpu_state(0).is_ok()
            {
                break;
            }
            assert!(
                Instant::now() < until,
                "round {round}: the restarted daemon did not serve the running VM within 30 s: {:?}; log {}",
                s.err().map(|e| e.to_string()),
                daemon.log.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(Duration::from_secs(1));
        if round == 0 {
            daemon.signal_and_wait(libc::SIGKILL, Duration::from_secs(5));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let results: Vec<(u32, u32)> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    eprintln!("load clients (ok, down): {results:?}");
    for (ok, down) in &results {
        assert!(
            *ok > 0 && *down > 0,
            "each client saw service and outage: {results:?}"
        );
    }
    let st = DaemonClient::connect(&daemon.addr(), DEADLINE)
        .unwrap()
        .status()
        .unwrap();
    assert!(
        st["vms"][0]["qemu"].is_null(),
        "QEMU kept the first daemon's fds: {st}"
    );
    assert_eq!(st["vms"][0]["qmp_connected"], true, "{st}");
    common::finish(vm);
}

/// Not root: `serve` refuses, saying why and what to do.
#[test]
#[ignore = "end-to-end: runs the daemon binary (cargo xtask test)"]
fn serve_refuses_without_root() {
    let bin = smmvmi_tests::daemon::binary().unwrap_or_else(|e| panic!("{e}"));
    let sock = socket_path("noroot");
    let mut cmd = if nix_is_root() {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&bin);
        c
    } else {
        std::process::Command::new(&bin)
    };
    let out = cmd
        .args(["serve", "--socket"])
        .arg(&sock)
        .output()
        .expect("run host-injector (setpriv from util-linux when root)");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("must run as root"), "{err}");
    assert!(err.contains("systemd"), "{err}");
    assert!(!sock.exists(), "no socket may be created");
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// Guest resets while a client polls through the daemon at 20 Hz: QEMU
/// stays alive (the daemon stops monitor SMIs at RESET until the new boot's
/// agent is Ready with a new salt), and after every reset the client, once
/// reconnected (new salt, new session keys), gets correct answers again.
#[test]
#[ignore = "end-to-end: boots QEMU (cargo xtask test)"]
fn guest_resets_under_polling_keep_qemu_alive_and_answers_correct() {
    const RESETS: u32 = 20;
    let daemon = test_daemon("reset", &[]);
    let mut vm = vm_through("dreset", &daemon);
    let ep = ids::Endpoint::Daemon(ids::endpoint::DaemonEndpoint {
        addr: daemon.addr(),
        vm: vm.name().to_string(),
        key: Some(vm.info().key.clone()),
    });
    let ok = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (ep, ok, stop) = (ep.clone(), ok.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut s: Option<ids::Session> = None;
            let mut errors = std::collections::BTreeMap::<String, u32>::new();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                let sess = match &mut s {
                    Some(x) => x,
                    None => match ids::Session::connect(&ep, Duration::from_secs(3)) {
                        Ok(x) => s.insert(x),
                        Err(e) => {
                            *errors.entry(kind(&e)).or_default() += 1;
                            continue;
                        }
                    },
                };
                match sess.info() {
                    Ok(i) => {
                        assert!(i.authenticated, "unauthenticated INFO after a reset");
                        assert_eq!(i.header.cpu_count, 2, "wrong INFO after a reset: {i:?}");
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        *errors.entry(kind(&e)).or_default() += 1;
                        s = None;
                    }
                }
            }
            errors
        })
    };
    // The harness starts QEMU with -no-reboot; a reset must reset here.
    vm.qmp("set-action", Some(serde_json::json!({ "reboot": "reset" })))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut c = DaemonClient::connect(&daemon.addr(), DEADLINE).unwrap();
    for i in 0..RESETS {
        let before = ok.load(Ordering::Relaxed);
        let salt = c.header(vm.name()).unwrap().salt;
        vm.qmp("system_reset", None)
            .unwrap_or_else(|e| panic!("reset {i}: {e}"));
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(
                vm.is_running(),
                "reset {i}: QEMU died; see {}",
                vm.state_dir().display()
            );
            let h = c.header(vm.name()).unwrap();
            if h.salt != salt && ok.load(Ordering::Relaxed) > before + 2 {
                break;
            }
            assert!(
                Instant::now() < until,
                "reset {i}: no correct answer within 60 s after the reset (header {})",
                h.summary
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let errors = poller.join().unwrap();
    let st = c.status().unwrap();
    eprintln!(
        "{RESETS} resets: {} correct answers; errors while rebooting {errors:?}; counters {}",
        ok.load(Ordering::Relaxed),
        st["vms"][0]["counters"]
    );
    assert!(vm.is_running());
    assert!(
        st["vms"][0]["counters"]["resets"].as_u64().unwrap() >= u64::from(RESETS),
        "{st}"
    );
    common::finish(vm);
}

/// A short label of a session error for the tally.
fn kind(e: &ids::SessionError) -> String {
    match e {
        ids::SessionError::Daemon(ClientError::Daemon(d)) => {
            serde_json::to_value(d).unwrap()["code"]
                .as_str()
                .unwrap_or("?")
                .to_string()
        }
        ids::SessionError::SaltChanged => "salt-changed".into(),
        ids::SessionError::Unprovisioned => "unprovisioned".into(),
        ids::SessionError::Reply(_) => "reply-rejected".into(),
        other => format!("other: {other}"),
    }
}

/// Clears MSI-X enable (as Linux does at PCI enumeration, or a hostile
/// guest at any time).
const DISARM: &str = r#"
for d in /sys/bus/pci/devices/*; do
  [ "$(cat $d/vendor)" = 0x1af4 ] && [ "$(cat $d/device)" = 0x1110 ] && dev=$d
done
cfgbyte() { od -An -tu1 -j "$1" -N1 "$dev/config" | tr -d ' '; }
cap=$(cfgbyte 52)
while [ "$cap" -ne 0 ] && [ "$(cfgbyte "$cap")" -ne 17 ]; do cap=$(cfgbyte $((cap + 1))); done
printf '\000' | dd of="$dev/config" bs=1 seek=$((cap + 3)) conv=notrunc 2>/dev/null
echo disarmed
"#;

fn counters(c: &mut DaemonClient) -> serde_json::Value {
    c.status().unwrap()["vms"][0]["counters"].clone()
}

/// The SMI doorbell end to end on stock QEMU 7.2: the agent arms the
/// ivshmem-doorbell MSI-X table with SMI delivery itself (Linux clears MSI-X
/// enable at PCI enumeration, so the first request after boot goes through
/// a monitor SMI and the agent re-arms), then requests are answered after an
/// eventfd write alone and the agent rings the daemon back. When guest root
/// disarms MSI-X, the next doorbell SMI goes unanswered, the daemon falls
/// back to a monitor SMI (counted apart), the request is still answered, the
/// agent re-arms (counted in the header) and the doorbell works again.
/// A request restricted to `qmp-targeted` is refused at once: stock QEMU
/// has no `inject-smi`.
#[test]
#[ignore = "end-to-end: boots QEMU (cargo xtask test)"]
fn doorbell_smis_answered_and_disarmed_doorbell_falls_back_counted() {
    let daemon = test_daemon("door", &[]);
    let vm = vm_through("ddoor", &daemon);
    let ep = ids::Endpoint::Daemon(ids::endpoint::DaemonEndpoint {
        addr: daemon.addr(),
        vm: vm.name().to_string(),
        key: Some(vm.info().key.clone()),
    });
    let mut s = ids::Session::connect(&ep, DEADLINE).unwrap_or_else(|e| panic!("{e}"));
    let mut c = DaemonClient::connect(&daemon.addr(), DEADLINE).unwrap();
    let header = c.header(vm.name()).unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(
        header.features & smmvmi_mailbox::layout::FEATURE_DOORBELL,
        0,
        "the agent must advertise its doorbell: {header:?}"
    );
    // The first request re-arms what Linux undid.
    s.cpu_state(0).unwrap_or_else(|e| panic!("{e}"));
    let rearms = |c: &mut DaemonClient| {
        c.header(vm.name())
            .unwrap_or_else(|e| panic!("{e}"))
            .doorbell_rearms
    };
    let rearms_after_boot = rearms(&mut c);
    assert!(rearms_after_boot >= 1, "the agent never armed its doorbell");
    let before = counters(&mut c);
    let mut times = Vec::new();
    for _ in 0..50 {
        s.cpu_state(0).unwrap_or_else(|e| panic!("{e}"));
        times.push(s.last_transaction().unwrap().elapsed);
    }
    let after = counters(&mut c);
    let d = |k: &str, a: &serde_json::Value, b: &serde_json::Value| {
        a[k].as_u64().unwrap() - b[k].as_u64().unwrap()
    };
    times.sort();
    eprintln!(
        "doorbell: 50 requests, p50 {:?}, max {:?}; doorbell SMIs {}, monitor SMIs {}, fallbacks {}, agent rings {}",
        times[25],
        times[49],
        d("smis_doorbell", &after, &before),
        d("smis_qmp", &after, &before),
        d("doorbell_fallbacks", &after, &before),
        d("agent_rings", &after, &before)
    );
    assert!(d("smis_doorbell", &after, &before) >= 50, "{after}");
    assert!(
        d("smis_qmp", &after, &before) <= 5,
        "the doorbell should answer nearly every request alone: {after}"
    );
    assert!(
        d("agent_rings", &after, &before) >= 45,
        "the agent should ring the daemon back: {after}"
    );

    // Targeted: CPU_STATE of vCPU 1 raises an SMI on vCPU 1 alone (its
    // own MSI-X vector), sealed with FLAG_NO_SNAPSHOT, so the agent serves
    // at once without waiting for vCPU 0: no partial session is counted
    // (a rendezvous that waited for an absent CPU would count one).
    let partial = |vm: &Vm| {
        vm.mailbox()
            .unwrap_or_else(|e| panic!("{e}"))
            .partial_sessions
    };
    let (before, partial_before) = (counters(&mut c), partial(&vm));
    for _ in 0..20 {
        let cpu1 = s.cpu_state(1).unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(cpu1.msr_lstar, 0, "vCPU 1's own snapshot");
    }
    let after = counters(&mut c);
    assert!(d("smis_doorbell", &after, &before) >= 20, "{after}");
    assert_eq!(
        partial(&vm),
        partial_before,
        "targeted requests must not wait for the other vCPUs"
    );

    let disarmed = common::sh(&vm, DISARM);
    assert!(disarmed.ends_with("disarmed"), "{disarmed}");
    let before = counters(&mut c);
    s.cpu_state(0)
        .unwrap_or_else(|e| panic!("a disarmed doorbell must fall back to QMP: {e}"));
    let after = counters(&mut c);
    assert!(d("doorbell_fallbacks", &after, &before) >= 1, "{after}");
    assert!(d("smis_qmp", &after, &before) >= 1, "{after}");
    assert!(
        rearms(&mut c) > rearms_after_boot,
        "the agent must count its re-arm"
    );
    // Re-armed: the doorbell answers alone again.
    let before = counters(&mut c);
    for _ in 0..5 {
        s.cpu_state(0).unwrap_or_else(|e| panic!("{e}"));
    }
    let after = counters(&mut c);
    assert_eq!(d("doorbell_fallbacks", &after, &before), 0, "{after}");
    // The smi path qmp-targeted needs the patched QEMU's `inject-smi`: on
    // this stock QEMU the daemon refuses at once (nothing posted, no SMI),
    // not silently at the deadline; the agent answers the next request.
    let mut targeted =
        common::daemon_ids_session(&vm, &daemon.addr(), protocol::SmiPath::QmpTargeted);
    let before = counters(&mut c);
    let started = Instant::now();
    let e = targeted
        .cpu_state(1)
        .expect_err("stock QEMU has no inject-smi");
    assert!(
        e.to_string().contains("inject-smi") && started.elapsed() < Duration::from_secs(3),
        "expected an immediate needs-patched-qemu refusal, got after {:?}: {e}",
        started.elapsed()
    );
    let after = counters(&mut c);
    assert_eq!(d("smis_qmp_targeted", &after, &before), 0, "{after}");
    assert_eq!(
        d("smis_qmp", &after, &before) + d("smis_doorbell", &after, &before),
        0,
        "{after}"
    );
    drop(targeted);
    s.cpu_state(0).unwrap_or_else(|e| panic!("{e}"));
    let metrics = c.metrics().unwrap();
    for name in [
        "smmvmi_doorbell_fallbacks_total",
        "smmvmi_doorbell_rearms_total",
    ] {
        assert!(
            metrics.contains(&format!("{name}{{vm=\"{}\"}}", vm.name())),
            "{metrics}"
        );
    }
    drop(s);
    common::finish(vm);
}
