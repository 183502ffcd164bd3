//! The IDS in its own VM: an ordinary guest (SeaBIOS, no agent) that runs
//! the `ids` CLI and reaches the host-injector daemon over virtio-vsock.
//!
//! This host has no `/dev/vhost-vsock`, so the device is vhost-user:
//! `vhost-device-vsock` (rust-vmm, from crates.io, built by
//! [`vhost_device_vsock`]) serves the guest's vsock queues; a guest
//! connection to CID 2 port P arrives on the host unix socket
//! `<uds-path>_P`, where the daemon listens (`--vhost-vsock-uds`). QEMU
//! needs shared guest memory for a vhost-user device
//! (`memory-backend-memfd,share=on`).
//!
//! The guest image is the test image plus an overlay cpio (Linux unpacks
//! concatenated initramfs archives in order): the `ids` binary and
//! `smmvmi-paper` with the shared libraries `ldd` names, and the keys of the
//! monitored VMs under `/etc/smmvmi/` (the IDS VM is trusted: it holds the
//! keys; the host and the daemon never need them).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cpio::Archive;
use crate::guest_image::GuestImage;
use crate::vm::{Firmware, Vm, VmConfig, VmError, VmInfo};

/// The vhost-device-vsock release the harness builds (`cargo install --locked`).
pub const VHOST_DEVICE_VSOCK_VERSION: &str = "0.3.0";
/// The IDS VM's vsock CID (each IDS VM has its own backend, so all can be 3).
pub const IDS_GUEST_CID: u32 = 3;
/// The daemon's vsock port (host-injector's `DEFAULT_VSOCK_PORT`).
pub const DAEMON_VSOCK_PORT: u32 = host_injector::daemon::config::DEFAULT_VSOCK_PORT;
/// Where the overlay puts the monitored VMs' keys: `KEYS_DIR/<vm>.key`.
pub const KEYS_DIR: &str = "/etc/smmvmi";
/// The IDS VM's address on QEMU's user network (slirp); the host is 10.0.2.2.
pub const GUEST_IP: &str = "10.0.2.15";

/// Errors of the IDS VM harness.
#[derive(Debug, thiserror::Error)]
pub enum IdsVmError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(
        "`{command}` failed ({status}); expected it to build {what}. Check the crates.io registry is reachable and see the output above"
    )]
    Build {
        command: String,
        status: String,
        what: String,
    },
    #[error(
        "vhost-device-vsock did not create {socket} within {timeout:?} (see {log}); expected the vhost-user socket QEMU connects to"
    )]
    BackendNotReady {
        socket: String,
        timeout: Duration,
        log: String,
    },
    #[error(
        "`ldd {binary}` named no library path in {output:?}; expected a dynamically linked x86-64 ELF"
    )]
    Ldd { binary: String, output: String },
    #[error(transparent)]
    Vm(#[from] VmError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> IdsVmError {
    let what = what.into();
    move |source| IdsVmError::Io { what, source }
}

/// `vhost-device-vsock`, built once into `.cache/tools/` (about a minute).
pub fn vhost_device_vsock() -> Result<PathBuf, IdsVmError> {
    let root = crate::cache_dir()
        .join("tools")
        .join(format!("vhost-device-vsock-{VHOST_DEVICE_VSOCK_VERSION}"));
    let bin = root.join("bin/vhost-device-vsock");
    if bin.is_file() {
        return Ok(bin);
    }
    eprintln!(
        "[smmvmi] building vhost-device-vsock {VHOST_DEVICE_VSOCK_VERSION} (cargo install, about a minute)"
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args([
        "install",
        "--locked",
        "--quiet",
        "vhost-device-vsock",
        "--version",
        VHOST_DEVICE_VSOCK_VERSION,
        "--root",
    ])
    .arg(&root)
    // Its own target dir: never the workspace's, never a stale global one.
    .env("CARGO_TARGET_DIR", root.join("build"));
    let status = cmd.status().map_err(io(format!("run {cargo} install")))?;
    let _ = std::fs::remove_dir_all(root.join("build"));
    if !status.success() || !bin.is_file() {
        return Err(IdsVmError::Build {
            command: format!("{cmd:?}"),
            status: status.to_string(),
            what: bin.display().to_string(),
        });
    }
    Ok(bin)
}

/// A workspace binary, built if needed (debug profile): `(package, bin)`.
pub fn built_binary(package: &str, bin: &str) -> Result<PathBuf, IdsVmError> {
    build_binary(package, bin, false)
}

/// A workspace binary built with the release profile (benchmarks).
pub fn built_release_binary(package: &str, bin: &str) -> Result<PathBuf, IdsVmError> {
    build_binary(package, bin, true)
}

fn build_binary(package: &str, bin: &str, release: bool) -> Result<PathBuf, IdsVmError> {
    let root = crate::repo_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "-q", "-p", package, "--bin", bin])
        .current_dir(&root);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().map_err(io(format!("run {cargo} build")))?;
    if !status.success() {
        return Err(IdsVmError::Build {
            command: format!("{cmd:?}"),
            status: status.to_string(),
            what: bin.into(),
        });
    }
    let profile = if release { "release" } else { "debug" };
    Ok(root.join("target").join(profile).join(bin))
}

/// The shared libraries (and the ELF interpreter) `binary` loads, as `ldd`
/// names them.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, IdsVmError> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(io("run ldd"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let libs: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect();
    if libs.is_empty() {
        return Err(IdsVmError::Ldd {
            binary: binary.display().to_string(),
            output: text,
        });
    }
    Ok(libs)
}

/// Writes `base` followed by an overlay cpio that adds `binaries` (at
/// `/usr/bin/<name>`, with their shared libraries at the host's paths) and
/// `files` (`(guest path, bytes, mode)`) to `out`.
pub fn overlay_initrd(
    base: &Path,
    binaries: &[&Path],
    files: &[(String, Vec<u8>, u32)],
    out: &Path,
) -> Result<(), IdsVmError> {
    let mut a = Archive::new();
    let mut dirs: Vec<String> = Vec::new();
    let mut add_dirs = |a: &mut Archive, path: &str| {
        let mut cur = String::new();
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        for p in &parts[..parts.len().saturating_sub(1)] {
            cur = if cur.is_empty() {
                p.to_string()
            } else {
                format!("{cur}/{p}")
            };
            if !dirs.contains(&cur) {
                a.dir(&cur);
                dirs.push(cur.clone());
            }
        }
    };
    let mut libs: Vec<PathBuf> = Vec::new();
    for bin in binaries {
        let name = bin.file_name().and_then(|n| n.to_str()).unwrap_or("bin");
        let bytes = std::fs::read(bin).map_err(io(format!("read {}", bin.display())))?;
        let guest = format!("usr/bin/{name}");
        add_dirs(&mut a, &guest);
        a.file(&guest, 0o755, &bytes);
        for lib in shared_libraries(bin)? {
            if !libs.contains(&lib) {
                libs.push(lib);
            }
        }
    }
    for lib in &libs {
        let bytes = std::fs::read(lib).map_err(io(format!("read {}", lib.display())))?;
        let guest = lib.display().to_string();
        add_dirs(&mut a, &guest);
        a.file(guest.trim_start_matches('/'), 0o755, &bytes);
    }
    for (path, bytes, mode) in files {
        add_dirs(&mut a, path);
        a.file(path.trim_start_matches('/'), *mode, bytes);
    }
    let mut image = std::fs::read(base).map_err(io(format!("read {}", base.display())))?;
    // Each archive of a concatenated initramfs starts 4-byte aligned.
    image.resize(image.len().next_multiple_of(4), 0);
    image.extend_from_slice(&a.finish());
    std::fs::write(out, image).map_err(io(format!("write {}", out.display())))
}

/// The daemon-side socket path vhost-device-vsock is given as `--uds-path`
/// for IDS VMs of this checkout: the daemon listens on `<this>_<port>`.
pub fn daemon_vsock_uds() -> PathBuf {
    crate::cache_dir().join("injector/vsock.sock")
}

/// A running vhost-device-vsock, killed on drop unless detached.
pub struct VsockBackend {
    child: Option<Child>,
    /// The vhost-user socket QEMU connects to.
    pub socket: PathBuf,
}

/// The pid file of a detached backend in `dir`.
fn backend_pid_file(dir: &Path) -> PathBuf {
    dir.join("vhost-device-vsock.pid")
}

/// The directory of IDS VM `name`'s overlay and vsock backend.
pub fn ids_vm_dir(name: &str) -> PathBuf {
    crate::cache_dir().join("ids-vm").join(name)
}

/// Stops the detached vsock backend of IDS VM `name`, if any (after its
/// QEMU is down). Returns true if one was running.
pub fn stop_detached_backend(name: &str) -> bool {
    let file = backend_pid_file(&ids_vm_dir(name));
    let pid = std::fs::read_to_string(&file)
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok());
    let _ = std::fs::remove_file(&file);
    let Some(pid) = pid else { return false };
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if !comm.starts_with("vhost-device-vs") {
        return false;
    }
    // SAFETY: kill(2) on a pid whose comm was just checked; no memory is touched.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    true
}

impl VsockBackend {
    /// Starts a backend for guest CID [`IDS_GUEST_CID`] whose guest-initiated
    /// connections go to `<uds>_<port>`; its socket and log go in `dir`.
    pub fn start(dir: &Path, uds: &Path, detached: bool) -> Result<Self, IdsVmError> {
        let bin = vhost_device_vsock()?;
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        let socket = dir.join("vhost-user-vsock.sock");
        let _ = std::fs::remove_file(&socket);
        let log = dir.join("vhost-device-vsock.log");
        let out = std::fs::File::create(&log).map_err(io(format!("create {}", log.display())))?;
        let err = out.try_clone().map_err(io("dup log"))?;
        let mut cmd = Command::new(&bin);
        if detached {
            crate::vm::new_session(&mut cmd);
        } else {
            crate::vm::die_with_parent(&mut cmd);
        }
        let child = cmd
            .arg("--guest-cid")
            .arg(IDS_GUEST_CID.to_string())
            .arg("--socket")
            .arg(&socket)
            .arg("--uds-path")
            .arg(uds)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(io(format!("start {}", bin.display())))?;
        if detached {
            std::fs::write(backend_pid_file(dir), child.id().to_string())
                .map_err(io("write the backend's pid file"))?;
        }
        let mut b = Self {
            child: Some(child),
            socket,
        };
        let timeout = Duration::from_secs(10);
        let until = Instant::now() + timeout;
        while !b.socket.exists() {
            let exited = b
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if Instant::now() > until || exited {
                return Err(IdsVmError::BackendNotReady {
                    socket: b.socket.display().to_string(),
                    timeout,
                    log: crate::tail_file(&log, 10),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(b)
    }
}

impl VsockBackend {
    /// Leaves the backend running (its pid is in the IDS VM's directory;
    /// [`stop_detached_backend`] stops it).
    pub fn detach(mut self) {
        self.child = None;
    }
}

impl Drop for VsockBackend {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How to start an IDS VM.
pub struct IdsVmConfig {
    pub name: String,
    /// The monitored VMs whose keys the IDS VM gets (`/etc/smmvmi/<vm>.key`).
    pub monitored: Vec<VmInfo>,
    /// The daemon's `--vhost-vsock-uds` path.
    pub daemon_uds: PathBuf,
    /// Extra binaries for `/usr/bin` (`ids` is always there).
    pub binaries: Vec<PathBuf>,
    /// A user-mode network card (the host is 10.0.2.2).
    pub network: bool,
    /// Outlive this process (`cargo xtask vm up --role ids`).
    pub detached: bool,
    /// QEMU `-m`.
    pub mem: String,
}

impl IdsVmConfig {
    /// An IDS VM `name` for `monitored`, reaching the daemon at `daemon_uds`;
    /// 1 GiB, no network, owned by this process.
    pub fn new(name: impl Into<String>, monitored: Vec<VmInfo>, daemon_uds: PathBuf) -> Self {
        Self {
            name: name.into(),
            monitored,
            daemon_uds,
            binaries: Vec::new(),
            network: false,
            detached: false,
            mem: "1G".into(),
        }
    }
}

/// A running IDS VM and its vsock backend.
pub struct IdsVm {
    // Field order: QEMU goes before its backend.
    vm: Vm,
    backend: Option<VsockBackend>,
}

impl IdsVm {
    /// Builds the overlay, starts the vsock backend and the VM, brings up
    /// the network if asked.
    pub fn up(config: IdsVmConfig) -> Result<Self, IdsVmError> {
        let base = match GuestImage::from_env() {
            Some(g) => g,
            None => crate::guest_image::build(&crate::repo_root(), &Default::default(), &mut |m| {
                eprintln!("[smmvmi] {m}")
            })
            .map_err(VmError::from)?,
        };
        let dir = ids_vm_dir(&config.name);
        std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        let ids = built_binary("ids", "ids")?;
        let mut binaries: Vec<&Path> = vec![&ids];
        binaries.extend(config.binaries.iter().map(PathBuf::as_path));
        let mut files = Vec::new();
        for m in &config.monitored {
            let key = std::fs::read(&m.key).map_err(io(format!("read {}", m.key.display())))?;
            files.push((format!("{KEYS_DIR}/{}.key", m.name), key, 0o600));
        }
        let initrd = dir.join("initramfs.cpio.gz");
        overlay_initrd(&base.initrd, &binaries, &files, &initrd)?;
        let backend = VsockBackend::start(&dir, &config.daemon_uds, config.detached)?;
        let mem = config.mem.as_str();
        let mut vm = VmConfig::new(&config.name, Firmware::SeaBios).mem(mem);
        vm.guest = Some(GuestImage { initrd, ..base });
        for a in [
            "-object".to_string(),
            format!("memory-backend-memfd,id=ids-mem,size={mem},share=on"),
            "-machine".into(),
            "memory-backend=ids-mem".into(),
            "-chardev".into(),
            format!("socket,id=vsock0,path={}", backend.socket.display()),
            "-device".into(),
            "vhost-user-vsock-pci,chardev=vsock0".into(),
        ] {
            vm = vm.extra_arg(a);
        }
        if config.network {
            vm = vm
                .extra_arg("-netdev")
                .extra_arg("user,id=net0")
                .extra_arg("-device")
                .extra_arg("virtio-net-pci,netdev=net0");
        }
        let vm = if config.detached {
            Vm::up_detached(vm)?
        } else {
            Vm::up(vm)?
        };
        if config.network {
            bring_up_network(&vm)?;
        }
        Ok(Self {
            vm,
            backend: Some(backend),
        })
    }

    /// Leaves the VM and its backend running (see [`IdsVmConfig::detached`]).
    pub fn detach(mut self) -> VmInfo {
        if let Some(b) = self.backend.take() {
            b.detach();
        }
        self.vm.info().clone()
    }

    /// The VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The pid of its vhost-device-vsock.
    pub fn backend_pid(&self) -> Option<u32> {
        self.backend
            .as_ref()
            .and_then(|b| b.child.as_ref())
            .map(Child::id)
    }

    /// The `ids --connect` endpoint of monitored VM `name` from inside.
    pub fn endpoint_of(name: &str) -> String {
        format!("vsock:2:{DAEMON_VSOCK_PORT}#{name},key={KEYS_DIR}/{name}.key")
    }
}

/// Configures `eth0` for QEMU's user network (static: 10.0.2.15/24, gateway
/// and host 10.0.2.2).
pub fn bring_up_network(vm: &Vm) -> Result<(), IdsVmError> {
    let out = vm.exec(&format!(
        "ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0 && ip route add default via 10.0.2.2 && echo up"
    ))?;
    if out.status != 0 || !out.stdout.contains("up") {
        return Err(IdsVmError::Io {
            what: "bring up eth0 in the guest".into(),
            source: std::io::Error::other(format!(
                "status {}: {} {}",
                out.status, out.stdout, out.stderr
            )),
        });
    }
    Ok(())
}
