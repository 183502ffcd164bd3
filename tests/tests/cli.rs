//! The `ids` command line as an incident responder and an operator use it,
//! against a real VM: numbers read in the base they were meant, ranges,
//! exit codes, errors in words (no Rust type names, no backtrace), a closed
//! pipe, long reads that step over unmapped pages and keep what they read
//! on SIGINT, raw output (to a file, and by default into a pipe) that
//! equals QEMU's own `pmemsave` and the `--hex` dump, `translate`, the decoded `cpu-state`, a silent agent and a VM
//! without the smmvmi firmware.
//!
//! Run with `cargo xtask test` (these are `#[ignore]`d for plain `cargo test`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{AGENT_READY, boot, config, finish, sh};
use smmvmi_tests::vm::{Firmware, Vm, VmConfig};

/// The `ids` binary, built once per test process (`cargo build -p ids`
/// into this test's target directory).
fn ids_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "ids", "--bin", "ids"])
            .current_dir(smmvmi_tests::repo_root())
            .status()
            .expect("run cargo build -p ids");
        assert!(status.success(), "cargo build -p ids failed");
        // target/debug/deps/cli-HASH -> target/debug/ids
        let exe = std::env::current_exe().expect("test executable path");
        let bin = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/PROFILE/deps")
            .join("ids");
        assert!(
            bin.is_file(),
            "expected the ids binary at {}",
            bin.display()
        );
        bin
    })
}

/// Runs `ids ARGS` in the repository root (VM names resolve there).
fn ids(args: &[&str]) -> Output {
    ids_env(args, &[])
}

fn ids_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(ids_bin());
    c.args(args)
        .current_dir(smmvmi_tests::repo_root())
        .env_remove("IDS_CONNECT")
        .env_remove("RUST_BACKTRACE");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run ids")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts the exit code and that stderr speaks no Rust.
#[track_caller]
fn expect_exit(o: &Output, code: i32, what: &str) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "{what}: expected exit {code}\nstdout: {}\nstderr: {}",
        stdout(o),
        stderr(o)
    );
    let e = stderr(o);
    for rust in [
        "panicked",
        "stack backtrace",
        "Some(",
        "RefusedSmram",
        "RefusedNotRam",
        "NotPresent",
        "BadRequest",
        "expected Ok",
        "tip:",
    ] {
        assert!(
            !e.contains(rust),
            "{what}: stderr speaks Rust ({rust}): {e}"
        );
    }
}

/// Parses a hex dump back into bytes (`*` repeats the line before it up
/// to the next address).
fn parse_hexdump(text: &str, start: u64, len: usize) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::new();
    let mut last: Vec<u8> = Vec::new();
    let mut starred = false;
    for line in text.lines() {
        if line == "*" {
            starred = true;
            continue;
        }
        let addr = u64::from_str_radix(&line[..16], 16).expect("address column");
        let hex = &line[18..67];
        let bytes: Vec<u8> = hex
            .split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
            .collect();
        if starred {
            while (out.len() as u64) < addr - start {
                out.extend_from_slice(&last);
            }
            starred = false;
        }
        assert_eq!(out.len() as u64, addr - start, "line at {addr:#x}");
        out.extend_from_slice(&bytes);
        last = bytes;
    }
    out.truncate(len);
    out
}

/// Bytes of entry text compared between reads.
const TEXT: usize = 64 << 10;

/// Byte strings equal, or a failure naming the first difference (not the
/// megabytes themselves).
#[track_caller]
fn same(a: &[u8], b: &[u8], what: &str) {
    if a != b {
        let at = a.iter().zip(b).position(|(x, y)| x != y);
        panic!(
            "{what}: lengths {:#x} and {:#x}, first difference at {at:x?}",
            a.len(),
            b.len()
        );
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A booted VM whose agent is ready, with the harness's QMP released.
fn ready_vm(test: &str) -> Vm {
    let vm = boot(config(test));
    vm.wait_agent_ready(AGENT_READY)
        .unwrap_or_else(|e| panic!("{e}"));
    vm.release_qmp();
    vm
}

fn dir(vm: &Vm) -> String {
    vm.state_dir().display().to_string()
}

fn lstar(d: &str) -> u64 {
    let o = ids(&["-c", d, "cpu-state", "0", "--json", "--no-symbols"]);
    expect_exit(&o, 0, "cpu-state --json");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("cpu-state JSON");
    let l = v["msrs"]["lstar"].as_str().expect("lstar");
    u64::from_str_radix(l.trim_start_matches("0x"), 16).expect("hex lstar")
}

#[test]
#[ignore = "boots QEMU; cargo xtask test runs it in its end-to-end stage"]
fn cli_numbers_errors_and_exit_codes() {
    let vm = ready_vm("cli-codes");
    let d = dir(&vm);

    // Addresses are hex: 100000 is 0x100000, and the length 16 is 16 bytes
    // (a hex dump into this pipe with --hex: raw bytes without it).
    let plain = ids(&["-c", &d, "read-phys", "100000", "16", "--hex"]);
    expect_exit(&plain, 0, "read-phys 100000 16");
    let text = stdout(&plain);
    assert!(text.starts_with("0000000000100000  "), "{text}");
    assert_eq!(text.lines().count(), 1, "16 bytes are one line: {text}");
    let hex = ids(&["-c", &d, "read-phys", "0x100000+0x10", "--hex"]);
    assert_eq!(stdout(&hex), text, "100000 16 == 0x100000+0x10");
    let range = ids(&["read-phys", "100000..100010", "--hex", "--connect", &d]);
    assert_eq!(
        stdout(&range),
        text,
        "ADDR..END, with --connect after the subcommand"
    );

    // The VM by name (its directory is found from the repository root),
    // and from the environment.
    let name = vm.info().name.clone();
    let by_name = ids(&["read-phys", "100000", "16", "--hex", "-c", &name]);
    assert_eq!(stdout(&by_name), text, "--connect NAME");
    let by_env = ids_env(
        &["read-phys", "100000", "16", "--hex"],
        &[("IDS_CONNECT", &name)],
    );
    assert_eq!(stdout(&by_env), text, "$IDS_CONNECT");

    // Usage errors: exit 2, in words.
    let o = ids(&["-c", &d, "cpu-state", "-1"]);
    expect_exit(&o, 2, "cpu-state -1");
    assert!(stderr(&o).contains("not a CPU index"), "{}", stderr(&o));
    let o = ids(&["-c", &d, "--deadline-ms", "0", "info"]);
    expect_exit(&o, 2, "--deadline-ms 0");
    assert!(stderr(&o).contains("at least 10ms"), "{}", stderr(&o));
    let o = ids(&["-c", &d, "read-phys", "100000", "ff"]);
    expect_exit(&o, 2, "a hex size without 0x");
    assert!(stderr(&o).contains("0xff"), "{}", stderr(&o));
    let o = ids(&["info"]);
    expect_exit(&o, 2, "no --connect");
    assert!(stderr(&o).contains("--connect"), "{}", stderr(&o));
    let o = ids(&["-c", "no-such-vm-here", "info"]);
    expect_exit(&o, 6, "unknown VM name");

    // Refusals: exit 4, naming what exists and what to do; never a
    // backtrace, even with RUST_BACKTRACE set.
    let o = ids_env(&["-c", &d, "cpu-state", "2"], &[("RUST_BACKTRACE", "1")]);
    expect_exit(&o, 4, "cpu-state 2 on a 2-vCPU VM");
    assert!(
        stderr(&o).contains("CPU 2 does not exist: this VM has 2 CPUs (0-1)"),
        "{}",
        stderr(&o)
    );
    let smram = ids(&["-c", &d, "info", "--json"]);
    expect_exit(&smram, 0, "info --json");
    let info: serde_json::Value = serde_json::from_slice(&smram.stdout).expect("info JSON");
    let base = info["smram"]["base"]
        .as_str()
        .expect("smram base")
        .to_string();
    let o = ids_env(
        &["-c", &d, "read-phys", &format!("{base}+16")],
        &[("RUST_BACKTRACE", "full")],
    );
    expect_exit(&o, 4, "read-phys of SMRAM");
    assert!(stderr(&o).contains("SMRAM"), "{}", stderr(&o));
    let o = ids(&["-c", &d, "--debug", "cpu-state", "2"]);
    assert!(stderr(&o).contains("debug:"), "--debug shows the chain");
    // With --json the error is one JSON object on stderr, for scripts.
    let o = ids(&["-c", &d, "cpu-state", "2", "--json"]);
    expect_exit(&o, 4, "cpu-state 2 --json");
    let j: serde_json::Value = serde_json::from_slice(&o.stderr).expect("a JSON error");
    assert_eq!(j["error"]["exit_code"], 4, "{j}");
    assert_eq!(j["error"]["kind"], "refused", "{j}");

    // A closed pipe ends the run quietly: exit 0, no panic (small output,
    // and output far larger than the pipe).
    let l = lstar(&d);
    for cmd in [
        format!("'{}' -c '{d}' info | head -1", ids_bin().display()),
        format!(
            "'{}' -c '{d}' read-virt {l:x}+4M --hex | head -1",
            ids_bin().display()
        ),
    ] {
        let o = Command::new("bash")
            .args(["-c", &format!("{cmd}; exit ${{PIPESTATUS[0]}}")])
            .current_dir(smmvmi_tests::repo_root())
            .output()
            .expect("bash");
        expect_exit(&o, 0, &cmd);
        assert_eq!(stdout(&o).lines().count(), 1, "{cmd}");
    }

    // The decoded CPU state.
    let o = ids(&["-c", &d, "cpu-state", "0"]);
    expect_exit(&o, 0, "cpu-state 0");
    let t = stdout(&o);
    assert!(
        t.contains("CPU 0: kernel mode") || t.contains("CPU 0: user mode"),
        "{t}"
    );
    assert!(t.contains(" PG"), "CR0 decoded: {t}");
    assert!(t.contains("LME LMA"), "EFER decoded: {t}");
    assert!(t.contains("<entry_SYSCALL_64>"), "LSTAR named: {t}");
    let kallsyms = sh(&vm, "grep ' entry_SYSCALL_64$' /proc/kallsyms");
    assert!(
        kallsyms.starts_with(&format!("{l:016x}")),
        "LSTAR {l:#x} is entry_SYSCALL_64: {kallsyms}"
    );

    // translate: the walk, and the address the kernel text maps to.
    let o = ids(&["-c", &d, "translate", &format!("{l:x}"), "--json"]);
    expect_exit(&o, 0, "translate LSTAR");
    let w: serde_json::Value = serde_json::from_slice(&o.stdout).expect("translate JSON");
    assert!(w["walk"].as_array().is_some_and(|a| a.len() >= 3), "{w}");
    let pa = u64::from_str_radix(w["pa"].as_str().expect("pa").trim_start_matches("0x"), 16)
        .expect("hex pa");
    let via_virt = ids(&["-c", &d, "read-virt", &format!("{l:x}+64"), "-o", "-"]);
    let via_phys = ids(&["-c", &d, "read-phys", &format!("{pa:x}+64"), "-o", "-"]);
    expect_exit(&via_virt, 0, "read-virt -o -");
    assert_eq!(via_virt.stdout.len(), 64);
    assert_eq!(
        via_virt.stdout, via_phys.stdout,
        "virtual LSTAR == its physical page"
    );
    // An explicit CR3 reads the same through the same tables.
    let st = ids(&["-c", &d, "cpu-state", "0", "--json", "--no-symbols"]);
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).expect("JSON");
    let cr3 = st["cr3"].as_str().expect("cr3").to_string();
    let via_cr3 = ids(&[
        "-c",
        &d,
        "read-virt",
        &format!("{l:x}+64"),
        "--cr3",
        &cr3,
        "-o",
        "-",
    ]);
    expect_exit(&via_cr3, 0, "read-virt --cr3");
    same(&via_cr3.stdout, &via_virt.stdout, &format!("--cr3 {cr3}"));
    // An unmapped address: translate says where the walk stopped (exit 4).
    let o = ids(&["-c", &d, "translate", "1000", "--cr3", &cr3, "--as-is"]);
    assert!(matches!(o.status.code(), Some(0 | 4)), "{}", stderr(&o));

    // A silent agent (the VM paused): exit 5, an ALERT.
    vm.qmp("stop", None).unwrap_or_else(|e| panic!("{e}"));
    vm.release_qmp();
    let o = ids(&[
        "-c",
        &d,
        "--deadline",
        "500ms",
        "cpu-state",
        "0",
        "--no-symbols",
    ]);
    expect_exit(&o, 5, "paused VM");
    assert!(stderr(&o).contains("ALERT"), "{}", stderr(&o));
    vm.qmp("cont", None).unwrap_or_else(|e| panic!("{e}"));
    vm.release_qmp();

    finish(vm);
}

#[test]
#[ignore = "boots QEMU; cargo xtask test runs it in its end-to-end stage"]
fn cli_long_reads_stream_keep_bytes_and_match_pmemsave() {
    let vm = ready_vm("cli-reads");
    let d = dir(&vm);
    let tmp = vm.state_dir().to_path_buf();
    let l = lstar(&d);
    let version = sh(&vm, "cat /proc/version");

    // 64 MiB from LSTAR runs past the end of the kernel's mapping: the
    // unmapped part is a hole (zero-filled), the rest is kept: exit 7.
    let f = tmp.join("lstar.raw");
    let fs = f.display().to_string();
    let o = ids(&["-c", &d, "read-virt", &format!("{l:x}+64M"), "-o", &fs]);
    expect_exit(&o, 7, "read-virt LSTAR+64M");
    let e = stderr(&o);
    assert!(e.contains("not read:") && e.contains("not mapped"), "{e}");
    assert!(e.contains("sha256 "), "{e}");
    let raw = std::fs::read(&f).expect("output file");
    assert_eq!(raw.len(), 64 << 20, "zero-filled to the full length");
    assert!(
        find(&raw, version.as_bytes()).is_some(),
        "the bytes before the hole are kept: the banner is in them"
    );
    let sha = e
        .split("sha256 ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("sha")
        .to_string();
    assert_eq!(sha.len(), 64, "{e}");
    let sum = Command::new("sha256sum")
        .arg(&f)
        .output()
        .expect("sha256sum");
    assert!(
        stdout(&sum).starts_with(&sha),
        "the printed SHA-256 is the file's"
    );

    // --holes skip leaves the hole out; --holes stop ends there. Both keep
    // what they read and exit 7; the JSON report lists the hole.
    let o = ids(&[
        "-c",
        &d,
        "read-virt",
        &format!("{l:x}+64M"),
        "-o",
        &fs,
        "--holes",
        "skip",
        "--json",
    ]);
    expect_exit(&o, 7, "--holes skip");
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON report");
    let read = rep["read"].as_u64().expect("read");
    assert_eq!(std::fs::metadata(&f).expect("file").len(), read);
    assert!(!rep["holes"].as_array().expect("holes").is_empty());
    assert_eq!(rep["complete"], false);
    let skipped = std::fs::read(&f).expect("file");
    // (The range holds kernel data, which changes between two reads: the
    // comparisons cover the entry text at its start.)
    assert!(skipped.len() < raw.len(), "skip: the hole is left out");
    same(
        &skipped[..TEXT],
        &raw[..TEXT],
        "skip: the same bytes before the hole",
    );
    let o = ids(&[
        "-c",
        &d,
        "read-virt",
        &format!("{l:x}+64M"),
        "-o",
        &fs,
        "--holes",
        "stop",
    ]);
    expect_exit(&o, 7, "--holes stop");
    let stopped = std::fs::read(&f).expect("file");
    assert!(!stopped.is_empty() && stopped.len() < raw.len());
    assert_eq!(
        stopped.len(),
        skipped.len(),
        "stop keeps what skip read before the hole"
    );
    same(&stopped[..TEXT], &raw[..TEXT], "stop keeps the prefix");

    // SIGINT keeps what was read and says how far it got: exit 130.
    let f2 = tmp.join("int.raw");
    let child = Command::new(ids_bin())
        .args(["-c", &d, "read-phys", "0+900M", "-o"])
        .arg(&f2)
        .current_dir(smmvmi_tests::repo_root())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ids");
    let t = Instant::now();
    while std::fs::metadata(&f2).map(|m| m.len()).unwrap_or(0) < (1 << 20) {
        assert!(t.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    let o = child.wait_with_output().expect("wait ids");
    expect_exit(&o, 130, "SIGINT");
    let e = stderr(&o);
    assert!(e.contains("interrupted at"), "{e}");
    let kept = std::fs::metadata(&f2).expect("file").len();
    assert!(((1 << 20)..(900 << 20)).contains(&kept), "kept {kept:#x}");
    assert!(
        e.contains(&format!("{kept:#x}")),
        "says how far: {e}\nkept {kept:#x}"
    );

    // Raw = hex dump = QEMU's own pmemsave, on a static range (the kernel
    // text at LSTAR, by its physical address).
    let o = ids(&["-c", &d, "translate", &format!("{l:x}"), "--json"]);
    let w: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    let pa = u64::from_str_radix(w["pa"].as_str().expect("pa").trim_start_matches("0x"), 16)
        .expect("pa");
    let start = pa & !0xfff;
    let len: usize = 64 << 10;
    let f3 = tmp.join("text.raw");
    let o = ids(&[
        "-c",
        &d,
        "read-phys",
        &format!("{start:x}+64K"),
        "-o",
        &f3.display().to_string(),
    ]);
    expect_exit(&o, 0, "read-phys -o");
    let raw = std::fs::read(&f3).expect("raw");
    let o = ids(&["-c", &d, "read-phys", &format!("{start:x}+64K"), "--hex"]);
    expect_exit(&o, 0, "read-phys --hex");
    assert_eq!(
        parse_hexdump(&stdout(&o), start, len),
        raw,
        "hex dump == raw"
    );
    let pm = tmp.join("pmemsave.raw");
    vm.qmp(
        "pmemsave",
        Some(serde_json::json!({"val": start, "size": len, "filename": pm})),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    vm.release_qmp();
    assert_eq!(
        std::fs::read(&pm).expect("pmemsave"),
        raw,
        "raw == pmemsave"
    );
    // Into a pipe with no -o (and with -o -): the same raw bytes, not a
    // hex dump.
    for extra in [&[][..], &["-o", "-"][..]] {
        let mut args = vec!["-c", &d, "read-phys"];
        let r = format!("{start:x}+64K");
        args.push(&r);
        args.extend_from_slice(extra);
        let o = ids(&args);
        expect_exit(&o, 0, "read-phys into a pipe");
        assert_eq!(o.stdout.len(), len, "{args:?}: bytes on stdout");
        assert!(
            o.stdout == raw,
            "{args:?}: stdout into a pipe differs from -o FILE and pmemsave"
        );
    }

    for p in [&f, &f2, &f3, &pm] {
        let _ = std::fs::remove_file(p);
    }
    finish(vm);
}

#[test]
#[ignore = "boots QEMU; cargo xtask test runs it in its end-to-end stage"]
fn cli_vm_without_smmvmi_firmware() {
    let vm = boot(VmConfig::new(
        format!("t-cli-seabios-{}", std::process::id()),
        Firmware::SeaBios,
    ));
    let o = ids(&["-c", &dir(&vm), "info"]);
    expect_exit(&o, 6, "info on a SeaBIOS VM");
    assert!(
        stderr(&o).contains("this VM has no smmvmi agent"),
        "{}",
        stderr(&o)
    );
    finish(vm);

    // The same through the daemon: no SMI could be raised, and it says so
    // (not "the agent did not answer"), by the VM's name.
    let socket = smmvmi_tests::repo_root().join(format!(
        ".cache/injector-tests/cli-{}.sock",
        std::process::id()
    ));
    let daemon = smmvmi_tests::daemon::DaemonProcess::spawn(&socket, &[], false)
        .unwrap_or_else(|e| panic!("{e}"));
    let vm = boot(
        VmConfig::new(
            format!("t-cli-seabios-d-{}", std::process::id()),
            Firmware::SeaBios,
        )
        .through_daemon(&daemon.socket),
    );
    let name = vm.info().name.clone();
    let o = ids(&["info", "-c", &name, "--deadline", "2s"]);
    expect_exit(&o, 6, "info on a SeaBIOS VM through the daemon");
    let e = stderr(&o);
    assert!(e.contains("this VM has no smmvmi agent"), "{e}");
    assert!(!e.contains("ALERT"), "{e}");
    finish(vm);
    drop(daemon);
}

/// `cargo xtask` itself (built once), run in the repository root.
fn xtask(args: &[&str]) -> Output {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    let bin = BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "xtask"])
            .current_dir(smmvmi_tests::repo_root())
            .status()
            .expect("run cargo build -p xtask");
        assert!(status.success(), "cargo build -p xtask failed");
        ids_bin().with_file_name("xtask")
    });
    Command::new(bin)
        .args(args)
        .current_dir(smmvmi_tests::repo_root())
        .output()
        .expect("run xtask")
}

#[test]
#[ignore = "boots QEMU; cargo xtask test runs it in its end-to-end stage"]
fn xtask_vm_list_down_rm() {
    let vm = boot(config("cli-vm"));
    let name = vm.info().name.clone();
    let listed = |running: bool| {
        let o = xtask(&["vm", "list", "--json"]);
        assert!(o.status.success(), "vm list --json: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON array");
        let row = v
            .as_array()
            .expect("array")
            .iter()
            .find(|r| r["name"] == name.as_str())
            .cloned();
        if let Some(r) = &row {
            assert_eq!(r["running"], running, "{r}");
            assert!(
                r["endpoint"].is_string() && r["state_dir"].is_string(),
                "{r}"
            );
        }
        row.is_some()
    };
    assert!(listed(true), "a running VM is listed");
    let o = xtask(&["vm", "rm", &name]);
    assert_eq!(o.status.code(), Some(1), "rm of a running VM refuses");
    assert!(stderr(&o).contains("vm down"), "{}", stderr(&o));
    let o = xtask(&["vm", "down", &name]);
    assert!(o.status.success(), "vm down: {}", stderr(&o));
    let o = xtask(&["vm", "down", "--name", &name]);
    assert!(o.status.success(), "vm down again is done: {}", stderr(&o));
    assert!(stderr(&o).contains("not running"), "{}", stderr(&o));
    assert!(listed(false), "a stopped VM is listed as stopped");
    let o = xtask(&["vm", "rm", &name]);
    assert!(o.status.success(), "vm rm: {}", stderr(&o));
    assert!(
        !vm.state_dir().exists(),
        "vm rm removed the state directory"
    );
    assert!(!listed(false), "and the VM is gone from the list");
    drop(vm);
}
