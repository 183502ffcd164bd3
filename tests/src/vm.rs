//! VM lifecycle: start a q35 QEMU with SMM under TCG, wait for the guest,
//! talk to it, stop it.
//!
//! ```no_run
//! # use smmvmi_tests::vm::{Vm, VmConfig, Firmware};
//! let vm = Vm::up(VmConfig::new("example", Firmware::SeaBios).smp(2).mem("1G"))?;
//! assert_eq!(vm.run_shell_command("nproc")?.trim(), "2");
//! vm.down()?;
//! # Ok::<(), smmvmi_tests::vm::VmError>(())
//! ```
//!
//! Each VM has a state directory `<repo>/.cache/vms/<name>/` holding
//! `vm.json`, `serial.log` (ttyS0), `debugcon.log` (port 0x402), `qemu.log`
//! (QEMU's own stdout/stderr), `qmp.sock`, `cmd.sock` (ttyS1, the command
//! channel), `mailbox` (the ivshmem backing file), `key` (the agent's
//! 32-byte key, fresh per VM, 0600, passed with fw_cfg) and `qemu.pid`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use smmvmi_mailbox::{layout, platform};

use crate::command_channel::{ChannelError, CommandChannel, ExecOutput};
use crate::guest_image::{self, GuestImage, GuestImageError, KernelDeb, READY_MARKER};
use crate::mailbox::{MailboxFile, MailboxHeader};
use crate::qmp::{Qmp, QmpError};

/// SeaBIOS image from the Debian `seabios` package.
pub const SEABIOS_IMAGE: &str = "/usr/share/seabios/bios-256k.bin";
/// OVMF code and variable-store templates from the Debian `ovmf` package.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// The environment variable `cargo xtask test` sets to the firmware image.
pub const FIRMWARE_ENV: &str = "SMMVMI_FIRMWARE";
/// The QEMU binary every VM runs unless [`VmConfig::qemu`] says otherwise:
/// `$SMMVMI_QEMU` when set, else `qemu-system-x86_64` from `$PATH` (Debian's).
pub const QEMU_ENV: &str = "SMMVMI_QEMU";
/// Path of the QEMU built with `patches-qemu/` (`cargo xtask qemu-patched`),
/// which `cargo xtask test` sets for the tests that need it
/// (tests/tests/qemu_patched.rs); the other tests keep the stock QEMU.
pub const QEMU_PATCHED_ENV: &str = "SMMVMI_QEMU_PATCHED";
/// The stock QEMU binary.
pub const STOCK_QEMU: &str = "qemu-system-x86_64";
/// Debian's QEMU firmware blobs (qemu-system-data, seabios). Another QEMU
/// binary (e.g. the patched build, which QEMU 7.2 makes relocatable: it looks
/// for blobs relative to itself) is pointed here with `-L`, or `-kernel`
/// under SeaBIOS fails for want of linuxboot_dma.bin.
pub const QEMU_DATA_DIR: &str = "/usr/share/qemu";
/// QEMU accelerator for every VM: TCG, single-threaded (see `start`).
pub const TCG_ACCEL: &str = "tcg,thread=single";
/// How long a guest gets to reach its ready marker under TCG.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a fresh command-channel connection waits for the guest server.
pub const CHANNEL_SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// Default deadline of one guest command.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of the VM harness. Each says what was expected and what to do.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("VM name {0:?} is not valid: expected 1-40 characters from [A-Za-z0-9_-]")]
    InvalidName(String),
    #[error("VM {name} is already running (pid {pid}); stop it with `cargo xtask vm down {name}`")]
    AlreadyRunning { name: String, pid: u32 },
    #[error("no VM named {name} (no state in {dir}); see `cargo xtask vm list`")]
    NotFound { name: String, dir: String },
    #[error("VM {name} is not running (its QEMU is gone); logs are in {dir}")]
    NotRunning { name: String, dir: String },
    #[error(
        "socket path {0} is longer than 107 bytes (unix socket limit); \
         use a shorter VM name or a repository path closer to /"
    )]
    SocketPathTooLong(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("guest image: {0}")]
    GuestImage(#[from] GuestImageError),
    #[error(
        "{FIRMWARE_ENV} is not set: the end-to-end tests need the firmware image. \
         Run them with `cargo xtask test` (which builds it), or set {FIRMWARE_ENV}=<path>|seabios|ovmf"
    )]
    FirmwareUnset,
    #[error("firmware image {0} does not exist (build it with `cargo xtask build`)")]
    FirmwareMissing(String),
    #[error("cannot start QEMU ({command}): {source}; is qemu-system-x86 installed?")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    BootFailed(Box<BootFailure>),
    #[error("VM {name}: {source}")]
    Qmp { name: String, source: QmpError },
    #[error("VM {name}: {source}")]
    Channel { name: String, source: ChannelError },
    #[error(
        "VM {name}: guest command `{command}` exited with {status}, expected 0\n\
         stdout: {stdout}\nstderr: {stderr}"
    )]
    CommandFailed {
        name: String,
        command: String,
        status: i32,
        stdout: String,
        stderr: String,
    },
    #[error(
        "VM {name}: the SMM agent is not ready for host-raised SMIs (mailbox: {header}); \
         refusing to raise one from the monitor because QEMU 7.2 crashes when SMI broadcast \
         is not negotiated. Expected state Ready/Unprovisioned with FEATURE_SMI_BROADCAST. \
         debugcon.log tail:\n{debugcon_tail}"
    )]
    AgentNotReady {
        name: String,
        header: String,
        debugcon_tail: String,
    },
    #[error(
        "VM {name}: ping {value:#x} not acknowledged within {timeout:?} (mailbox now: {header}); \
         the SMI did not reach the handler or the handler did not answer. debugcon.log tail:\n{debugcon_tail}"
    )]
    PingTimeout {
        name: String,
        value: u64,
        timeout: Duration,
        header: String,
        debugcon_tail: String,
    },
    #[error(
        "VM {name}: no debug console line matching {pattern:?} within {timeout:?}; tail:\n{tail}"
    )]
    DebugconTimeout {
        name: String,
        pattern: String,
        timeout: Duration,
        tail: String,
    },
}

/// Why a guest did not come up, with the logs that tell the story.
#[derive(Debug)]
pub struct BootFailure {
    pub name: String,
    pub reason: String,
    /// QEMU's exit, decoded (isa-debug-exit codes as the value the firmware wrote).
    pub qemu_status: String,
    pub debugcon_tail: String,
    pub serial_tail: String,
    pub qemu_log_tail: String,
    pub state_dir: String,
}

impl std::fmt::Display for BootFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VM {}: the guest did not reach its ready marker {READY_MARKER:?}: {}\n\
             QEMU: {}\n\
             --- debugcon.log (firmware debug console, last lines) ---\n{}\n\
             --- serial.log (ttyS0, last lines) ---\n{}\n\
             --- qemu.log (QEMU stderr) ---\n{}\n\
             (full logs in {})",
            self.name,
            self.reason,
            self.qemu_status,
            self.debugcon_tail,
            self.serial_tail,
            self.qemu_log_tail,
            self.state_dir
        )
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
    let what = what.into();
    move |source| VmError::Io { what, source }
}

/// Which firmware the VM boots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Firmware {
    /// The smmvmi firmware image (read-only pflash unit 0).
    Ours(PathBuf),
    /// SeaBIOS from Debian (no SMM agent; for harness checks and baselines).
    SeaBios,
    /// OVMF from Debian, pflash code + a per-VM copy of the variable store.
    Ovmf,
}

impl Firmware {
    /// The firmware named by `$SMMVMI_FIRMWARE`: `seabios`, `ovmf` or a path
    /// to our image. Unset is an error that says how to run the tests.
    pub fn from_env() -> Result<Self, VmError> {
        let value = std::env::var(FIRMWARE_ENV).map_err(|_| VmError::FirmwareUnset)?;
        value.parse().map_err(|_| VmError::FirmwareUnset)
    }

    /// Short name: `ours`, `seabios`, `ovmf`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Ours(_) => "ours",
            Self::SeaBios => "seabios",
            Self::Ovmf => "ovmf",
        }
    }

    fn qemu_args(&self, state_dir: &Path) -> Result<Vec<String>, VmError> {
        match self {
            Self::Ours(path) => {
                if !path.is_file() {
                    return Err(VmError::FirmwareMissing(path.display().to_string()));
                }
                // Read-only pflash, as SEV needs it: QEMU encrypts and
                // measures the firmware only when it is pflash
                // (`pc_system_flash_map`), and only then reads the GUIDed
                // table. The image boots the same way as with -bios.
                Ok(vec![
                    "-drive".into(),
                    format!(
                        "if=pflash,format=raw,unit=0,readonly=on,file={}",
                        path.display()
                    ),
                ])
            }
            Self::SeaBios => Ok(vec!["-bios".into(), SEABIOS_IMAGE.into()]),
            Self::Ovmf => {
                let vars = state_dir.join("OVMF_VARS.fd");
                std::fs::copy(OVMF_VARS, &vars).map_err(io(format!("copy {OVMF_VARS}")))?;
                Ok(vec![
                    "-drive".into(),
                    format!("if=pflash,format=raw,unit=0,file={OVMF_CODE},readonly=on"),
                    "-drive".into(),
                    format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
                ])
            }
        }
    }
}

impl FromStr for Firmware {
    type Err = String;
    /// `seabios`, `ovmf`, or a path to our firmware image.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "seabios" => Ok(Self::SeaBios),
            "ovmf" => Ok(Self::Ovmf),
            "" | "ours" => Err("`ours` needs a built image path (cargo xtask build)".into()),
            path => Ok(Self::Ours(PathBuf::from(path))),
        }
    }
}

/// How to start a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub name: String,
    /// QEMU `-m` size, e.g. `1G`.
    pub mem: String,
    pub smp: u32,
    /// QEMU `-cpu` model; `None` means `qemu64`.
    pub cpu: Option<String>,
    pub firmware: Firmware,
    pub kernel_deb: KernelDeb,
    /// A prebuilt guest image; `None` builds (or finds cached) the one for `kernel_deb`.
    pub guest: Option<GuestImage>,
    /// Appended to the kernel command line.
    pub append: Option<String>,
    /// Extra QEMU arguments, appended last.
    pub extra_args: Vec<String>,
    pub boot_timeout: Duration,
    /// QEMU `-accel` value; [`TCG_ACCEL`] unless a benchmark compares.
    pub accel: String,
    /// Boot with `ivshmem-doorbell` through the host-injector daemon at this
    /// socket (registered before QEMU starts; mailbox kept in the state
    /// dir's `mailbox` file); `None`: `ivshmem-plain` over that file.
    pub daemon: Option<PathBuf>,
    /// The QEMU binary (see [`QEMU_ENV`]).
    pub qemu: PathBuf,
    /// Hand the key over in fw_cfg `opt/smmvmi/key` instead of the SEV
    /// launch secret area: INSECURE (fw_cfg stays guest-readable), for
    /// firmware without the secret area (SeaBIOS/OVMF baselines) and tests
    /// of that path only. Set by [`VmConfig::insecure_fw_cfg_key`].
    pub insecure_fw_cfg_key: bool,
}

/// The default QEMU binary: `$SMMVMI_QEMU`, else the stock one from `$PATH`.
pub fn default_qemu() -> PathBuf {
    std::env::var_os(QEMU_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(STOCK_QEMU), PathBuf::from)
}

/// The patched QEMU named by `$SMMVMI_QEMU_PATCHED`, if set and present.
pub fn patched_qemu_from_env() -> Option<PathBuf> {
    std::env::var_os(QEMU_PATCHED_ENV)
        .map(PathBuf::from)
        .filter(|p| p.is_file())
}

impl VmConfig {
    /// Defaults: 1 GiB, 2 vCPUs, qemu64, the pinned kernel, and the guest
    /// image from `$SMMVMI_KERNEL`/`$SMMVMI_INITRD` when xtask set them.
    pub fn new(name: impl Into<String>, firmware: Firmware) -> Self {
        Self {
            name: name.into(),
            mem: "1G".into(),
            smp: 2,
            cpu: None,
            firmware,
            kernel_deb: KernelDeb::default(),
            guest: GuestImage::from_env(),
            append: None,
            extra_args: Vec::new(),
            boot_timeout: DEFAULT_BOOT_TIMEOUT,
            accel: TCG_ACCEL.into(),
            daemon: None,
            qemu: default_qemu(),
            insecure_fw_cfg_key: false,
        }
    }

    /// Give the key in fw_cfg (guest-readable for the VM's life) instead of
    /// the launch secret area. Test setups of that path only.
    pub fn insecure_fw_cfg_key(mut self) -> Self {
        self.insecure_fw_cfg_key = true;
        self
    }

    /// Boot through the daemon at `socket` (see [`VmConfig::daemon`]).
    pub fn through_daemon(mut self, socket: impl Into<PathBuf>) -> Self {
        self.daemon = Some(socket.into());
        self
    }

    /// Runs this QEMU binary instead of the default (e.g. the patched build).
    pub fn qemu(mut self, path: impl Into<PathBuf>) -> Self {
        self.qemu = path.into();
        self
    }

    pub fn mem(mut self, mem: impl Into<String>) -> Self {
        self.mem = mem.into();
        self
    }

    pub fn smp(mut self, smp: u32) -> Self {
        self.smp = smp;
        self
    }

    pub fn cpu(mut self, cpu: impl Into<String>) -> Self {
        self.cpu = Some(cpu.into());
        self
    }

    pub fn kernel_deb(mut self, deb: KernelDeb) -> Self {
        self.kernel_deb = deb;
        self.guest = None;
        self
    }

    pub fn extra_arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    pub fn append(mut self, text: impl Into<String>) -> Self {
        self.append = Some(text.into());
        self
    }

    pub fn accel(mut self, accel: impl Into<String>) -> Self {
        self.accel = accel.into();
        self
    }

    pub fn boot_timeout(mut self, timeout: Duration) -> Self {
        self.boot_timeout = timeout;
        self
    }
}

/// What `vm.json` records and `cargo xtask vm up` prints.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    pub pid: u32,
    pub qmp: PathBuf,
    pub mailbox: PathBuf,
    pub serial_log: PathBuf,
    pub debugcon_log: PathBuf,
    pub cmd_socket: PathBuf,
    pub state_dir: PathBuf,
    /// The VM's 32-byte agent key (0600), given to the firmware with
    /// `-fw_cfg name=opt/smmvmi/key` (test setups only: the host sees it).
    #[serde(default)]
    pub key: PathBuf,
    pub firmware: String,
    pub mem: String,
    pub smp: u32,
    pub cpu: String,
    /// The daemon socket this VM is served through, if any.
    #[serde(default)]
    pub daemon: Option<PathBuf>,
    /// The QEMU binary the VM runs.
    #[serde(default)]
    pub qemu: PathBuf,
}

impl VmInfo {
    fn in_dir(name: &str, state_dir: &Path) -> Self {
        Self {
            name: name.to_string(),
            pid: 0,
            qmp: state_dir.join("qmp.sock"),
            mailbox: state_dir.join("mailbox"),
            serial_log: state_dir.join("serial.log"),
            debugcon_log: state_dir.join("debugcon.log"),
            cmd_socket: state_dir.join("cmd.sock"),
            state_dir: state_dir.to_path_buf(),
            key: state_dir.join("key"),
            firmware: String::new(),
            mem: String::new(),
            smp: 0,
            cpu: String::new(),
            daemon: None,
            qemu: PathBuf::new(),
        }
    }

    /// The JSON object `cargo xtask vm up` prints.
    pub fn summary_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "pid": self.pid,
            "qmp": self.qmp,
            "mailbox": self.mailbox,
            "serial_log": self.serial_log,
            "debugcon_log": self.debugcon_log,
            "cmd_socket": self.cmd_socket,
            "state_dir": self.state_dir,
            "key": self.key,
            "endpoint": self.endpoint(),
            "direct_endpoint": self.direct_endpoint(),
        })
    }

    /// The IDS endpoint of this VM (`ids --connect ENDPOINT`): through the
    /// daemon (`unix:PATH#VM,key=PATH`) when it was booted so, else direct.
    pub fn endpoint(&self) -> String {
        match &self.daemon {
            Some(sock) => format!(
                "unix:{}#{},key={}",
                sock.display(),
                self.name,
                self.key.display()
            ),
            None => self.direct_endpoint(),
        }
    }

    /// The direct endpoint (mailbox file and QMP socket).
    pub fn direct_endpoint(&self) -> String {
        format!(
            "qmp={},mailbox={},key={}",
            self.qmp.display(),
            self.mailbox.display(),
            self.key.display()
        )
    }

    /// True if a QEMU with this pid is alive and runs in this state dir.
    pub fn is_alive(&self) -> bool {
        pid_runs_in(self.pid, &self.state_dir)
    }
}

/// A running VM.
pub struct Vm {
    info: VmInfo,
    /// Set when this process started QEMU and must stop it.
    child: Option<Child>,
    boot_time: Option<Duration>,
    qmp: Mutex<Option<Qmp>>,
    channel: Mutex<Option<CommandChannel>>,
}

/// The directory that holds all VM state directories.
pub fn vms_dir() -> PathBuf {
    crate::cache_dir().join("vms")
}

fn check_name(name: &str) -> Result<(), VmError> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(VmError::InvalidName(name.to_string()))
    }
}

impl Vm {
    /// Starts a VM owned by this process: it is killed when the `Vm` is
    /// dropped, and (PR_SET_PDEATHSIG) when the thread that started it exits.
    pub fn up(config: VmConfig) -> Result<Self, VmError> {
        Self::start(config, false)
    }

    /// Starts a VM that outlives this process (own session); stop it with
    /// [`Vm::attach`] + [`Vm::down`].
    pub fn up_detached(config: VmConfig) -> Result<Self, VmError> {
        Self::start(config, true)
    }

    fn start(config: VmConfig, detached: bool) -> Result<Self, VmError> {
        check_name(&config.name)?;
        let state_dir = vms_dir().join(&config.name);
        if let Ok(existing) = read_info(&state_dir)
            && existing.is_alive()
        {
            return Err(VmError::AlreadyRunning {
                name: config.name,
                pid: existing.pid,
            });
        }
        let _ = std::fs::remove_dir_all(&state_dir);
        std::fs::create_dir_all(&state_dir)
            .map_err(io(format!("create {}", state_dir.display())))?;
        let mut info = VmInfo::in_dir(&config.name, &state_dir);
        for sock in [&info.qmp, &info.cmd_socket] {
            if sock.as_os_str().len() > 107 {
                return Err(VmError::SocketPathTooLong(sock.display().to_string()));
            }
        }
        info.firmware = config.firmware.label().to_string();
        info.mem = config.mem.clone();
        info.smp = config.smp;
        info.cpu = config.cpu.clone().unwrap_or_else(|| "qemu64".into());
        info.daemon = config.daemon.clone();
        info.qemu = config.qemu.clone();

        let guest = match &config.guest {
            Some(g) => g.clone(),
            None => guest_image::build(&crate::repo_root(), &config.kernel_deb, &mut |m| {
                eprintln!("[smmvmi] {m}")
            })?,
        };
        MailboxFile::new(&info.mailbox)
            .create_zeroed()
            .map_err(io(format!("create mailbox {}", info.mailbox.display())))?;
        write_fresh_key(&info.key)?;
        for log in [&info.serial_log, &info.debugcon_log] {
            std::fs::write(log, b"").map_err(io(format!("create {}", log.display())))?;
        }

        let mut append = String::from("console=ttyS0 panic=-1 8250.nr_uarts=4");
        if let Some(extra) = &config.append {
            append.push(' ');
            append.push_str(extra);
        }
        let s = |p: &Path| p.display().to_string();
        let mut args: Vec<String> = vec![
            "-name".into(),
            config.name.clone(),
            "-machine".into(),
            "q35,smm=on".into(),
            // One TCG thread for all vCPUs (round-robin). With one thread
            // per vCPU on a 2-core host, an SMM rendezvous waits for host
            // scheduling of every vCPU thread: measured host-SMI round trip
            // p50 4 ms / p99 108 ms and agent requests served before every
            // CPU arrived; round-robin: p50 0.8 ms / p99 5 ms (README).
            "-accel".into(),
            config.accel.clone(),
            "-m".into(),
            config.mem.clone(),
            "-smp".into(),
            config.smp.to_string(),
            "-cpu".into(),
            info.cpu.clone(),
        ];
        if config.qemu != Path::new(STOCK_QEMU) {
            args.extend(["-L".into(), QEMU_DATA_DIR.into()]);
        }
        args.extend(config.firmware.qemu_args(&state_dir)?);
        args.extend([
            "-kernel".into(),
            s(&guest.kernel),
            "-initrd".into(),
            s(&guest.initrd),
            "-append".into(),
            append,
            "-nodefaults".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-serial".into(),
            format!("file:{}", s(&info.serial_log)),
            "-chardev".into(),
            format!(
                "socket,id=cmd,path={},server=on,wait=off",
                s(&info.cmd_socket)
            ),
            "-serial".into(),
            "chardev:cmd".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", s(&info.qmp)),
            "-pidfile".into(),
            s(&state_dir.join("qemu.pid")),
        ]);
        args.extend(debug_device_args(&info.debugcon_log));
        args.extend(key_args(&config, &info, &state_dir)?);
        args.extend(mailbox_args(&config, &info)?);
        args.extend(config.extra_args.iter().cloned());
        std::fs::write(
            state_dir.join("qemu.cmdline"),
            shell_words(&config.qemu.display().to_string(), &args),
        )
        .map_err(io("write qemu.cmdline"))?;

        let qemu_log =
            std::fs::File::create(state_dir.join("qemu.log")).map_err(io("create qemu.log"))?;
        let qemu_err = qemu_log.try_clone().map_err(io("dup qemu.log"))?;
        let mut cmd = Command::new(&config.qemu);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(qemu_log)
            .stderr(qemu_err);
        if detached {
            new_session(&mut cmd);
        } else {
            die_with_parent(&mut cmd);
        }
        let started = Instant::now();
        let child = cmd.spawn().map_err(|source| VmError::Spawn {
            command: config.qemu.display().to_string(),
            source,
        })?;
        info.pid = child.id();
        write_info(&info)?;

        let mut vm = Self {
            info,
            child: Some(child),
            boot_time: None,
            qmp: Mutex::new(None),
            channel: Mutex::new(None),
        };
        let ready = vm.wait_ready(started, config.boot_timeout);
        if let Err(e) = ready {
            vm.kill();
            return Err(e);
        }
        if detached {
            // Nobody in this process waits for it any more; init reaps it.
            vm.child = None;
        }
        Ok(vm)
    }

    fn wait_ready(&mut self, started: Instant, timeout: Duration) -> Result<(), VmError> {
        let deadline = started + timeout;
        let mut offset = 0usize;
        loop {
            if let Ok(bytes) = std::fs::read(&self.info.serial_log) {
                let from = offset.saturating_sub(READY_MARKER.len());
                if from < bytes.len()
                    && bytes[from..]
                        .windows(READY_MARKER.len())
                        .any(|w| w == READY_MARKER.as_bytes())
                {
                    self.boot_time = Some(started.elapsed());
                    return Ok(());
                }
                offset = bytes.len();
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(self.boot_failed(
                    "QEMU exited before the guest was ready".into(),
                    describe_exit(status),
                ));
            }
            if Instant::now() >= deadline {
                return Err(self.boot_failed(
                    format!("no ready marker within {timeout:?}"),
                    "still running; killed by the harness".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn boot_failed(&self, reason: String, qemu_status: String) -> VmError {
        VmError::BootFailed(Box::new(BootFailure {
            name: self.info.name.clone(),
            reason,
            qemu_status,
            debugcon_tail: crate::tail_file(&self.info.debugcon_log, 25),
            serial_tail: crate::tail_file(&self.info.serial_log, 25),
            qemu_log_tail: crate::tail_file(&self.info.state_dir.join("qemu.log"), 10),
            state_dir: self.info.state_dir.display().to_string(),
        }))
    }

    /// Attaches to a running VM started by another process (`vm up`). The
    /// returned handle does not stop the VM when dropped.
    pub fn attach(name: &str) -> Result<Self, VmError> {
        check_name(name)?;
        let dir = vms_dir().join(name);
        let info = read_info(&dir).map_err(|_| VmError::NotFound {
            name: name.into(),
            dir: dir.display().to_string(),
        })?;
        if !info.is_alive() {
            return Err(VmError::NotRunning {
                name: name.into(),
                dir: dir.display().to_string(),
            });
        }
        Ok(Self {
            info,
            child: None,
            boot_time: None,
            qmp: Mutex::new(None),
            channel: Mutex::new(None),
        })
    }

    /// Every VM with a state directory, and whether its QEMU is alive.
    pub fn list() -> Vec<(VmInfo, bool)> {
        let mut out = Vec::new();
        if let Ok(entries) = std::fs::read_dir(vms_dir()) {
            for e in entries.flatten() {
                if let Ok(info) = read_info(&e.path()) {
                    let alive = info.is_alive();
                    out.push((info, alive));
                }
            }
        }
        out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        out
    }

    pub fn name(&self) -> &str {
        &self.info.name
    }

    pub fn info(&self) -> &VmInfo {
        &self.info
    }

    pub fn state_dir(&self) -> &Path {
        &self.info.state_dir
    }

    /// QEMU start to the ready marker on ttyS0 (only for VMs started here).
    pub fn boot_time(&self) -> Option<Duration> {
        self.boot_time
    }

    /// Runs `command` in the guest (`sh`, as root), default deadline.
    pub fn exec(&self, command: &str) -> Result<ExecOutput, VmError> {
        self.exec_timeout(command, DEFAULT_EXEC_TIMEOUT)
    }

    /// Runs `command` in the guest with an explicit deadline.
    pub fn exec_timeout(&self, command: &str, timeout: Duration) -> Result<ExecOutput, VmError> {
        let mut guard = self.channel.lock().unwrap_or_else(|e| e.into_inner());
        let wrap = |source| VmError::Channel {
            name: self.info.name.clone(),
            source,
        };
        if guard.is_none() {
            *guard = Some(
                CommandChannel::connect_synced(&self.info.cmd_socket, CHANNEL_SYNC_TIMEOUT)
                    .map_err(wrap)?,
            );
        }
        let result = guard
            .as_mut()
            .expect("connected above")
            .exec(command, timeout);
        if result.is_err() {
            // The stream may hold half a reply; start fresh next time.
            *guard = None;
        }
        result.map_err(wrap)
    }

    /// Runs `command` and returns its stdout; a non-zero exit is an error.
    pub fn run_shell_command(&self, command: &str) -> Result<String, VmError> {
        let out = self.exec(command)?;
        if out.status != 0 {
            return Err(VmError::CommandFailed {
                name: self.info.name.clone(),
                command: command.into(),
                status: out.status,
                stdout: out.stdout,
                stderr: out.stderr,
            });
        }
        Ok(out.stdout)
    }

    /// Runs a QMP command.
    pub fn qmp(
        &self,
        command: &str,
        args: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, VmError> {
        let mut guard = self.qmp.lock().unwrap_or_else(|e| e.into_inner());
        let wrap = |source| VmError::Qmp {
            name: self.info.name.clone(),
            source,
        };
        if guard.is_none() {
            *guard = Some(Qmp::connect(&self.info.qmp, Duration::from_secs(10)).map_err(wrap)?);
        }
        let result = guard
            .as_mut()
            .expect("connected above")
            .execute(command, args);
        if result.is_err() {
            *guard = None;
        }
        result.map_err(wrap)
    }

    /// Hangs up the harness's QMP connection (QEMU serves one QMP client at
    /// a time): call it before another client, such as an IDS session,
    /// connects. The next [`Vm::qmp`] call reconnects.
    pub fn release_qmp(&self) {
        *self.qmp.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Runs a human monitor command through QMP (`o /b 0xb2 0x10`).
    pub fn hmp(&self, command_line: &str) -> Result<String, VmError> {
        let ret = self.qmp(
            "human-monitor-command",
            Some(serde_json::json!({ "command-line": command_line })),
        )?;
        Ok(ret.as_str().unwrap_or_default().to_string())
    }

    /// The mailbox backing file.
    pub fn mailbox_file(&self) -> MailboxFile {
        MailboxFile::new(&self.info.mailbox)
    }

    /// A snapshot of the mailbox header.
    pub fn mailbox(&self) -> Result<MailboxHeader, VmError> {
        self.mailbox_file()
            .header()
            .map_err(io(format!("read mailbox {}", self.info.mailbox.display())))
    }

    /// Waits until the agent says it accepts host-raised SMIs.
    pub fn wait_agent_ready(&self, timeout: Duration) -> Result<MailboxHeader, VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            let h = self.mailbox()?;
            if h.accepts_host_smi() {
                return Ok(h);
            }
            if Instant::now() >= deadline {
                return Err(VmError::AgentNotReady {
                    name: self.info.name.clone(),
                    header: format!("{h:?}"),
                    debugcon_tail: crate::tail_file(&self.info.debugcon_log, 15),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Writes `value` as the ping request, runs `trigger` (which should raise
    /// an SMI), and waits until the agent copies it to ping ack. Returns the
    /// time from the write to the acknowledgement.
    pub fn ping_with(
        &self,
        value: u64,
        timeout: Duration,
        trigger: impl FnOnce() -> Result<(), VmError>,
    ) -> Result<Duration, VmError> {
        let mb = self.mailbox_file();
        let start = Instant::now();
        mb.write_u64(layout::OFF_PING_REQ, value)
            .map_err(io("write ping request"))?;
        trigger()?;
        let deadline = start + timeout;
        loop {
            if mb
                .read_u64(layout::OFF_PING_ACK)
                .map_err(io("read ping ack"))?
                == value
            {
                return Ok(start.elapsed());
            }
            if Instant::now() >= deadline {
                return Err(VmError::PingTimeout {
                    name: self.info.name.clone(),
                    value,
                    timeout,
                    header: format!("{:?}", self.mailbox()?),
                    debugcon_tail: crate::tail_file(&self.info.debugcon_log, 15),
                });
            }
            std::hint::spin_loop();
            std::thread::yield_now();
        }
    }

    /// Raises an SMI from the host (QMP HMP `o /b 0xb2 CMD`) once the agent
    /// is ready, and waits for it to acknowledge a fresh ping value.
    pub fn host_smi_ping(&self, smi_command: u8, timeout: Duration) -> Result<Duration, VmError> {
        let h = self.mailbox()?;
        if !h.accepts_host_smi() {
            return Err(VmError::AgentNotReady {
                name: self.info.name.clone(),
                header: format!("{h:?}"),
                debugcon_tail: crate::tail_file(&self.info.debugcon_log, 15),
            });
        }
        let value = fresh_ping_value(h.ping_ack);
        self.ping_with(value, timeout, || {
            self.hmp(&format!(
                "o /b {:#x} {smi_command:#x}",
                platform::APM_CNT_PORT
            ))
            .map(|_| ())
        })
    }

    /// The firmware debug console so far.
    pub fn debugcon(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.info.debugcon_log).unwrap_or_default())
            .into_owned()
    }

    /// The guest serial console (ttyS0) so far.
    pub fn serial(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.info.serial_log).unwrap_or_default())
            .into_owned()
    }

    /// Waits for a debug console line containing `pattern`; returns the line.
    pub fn wait_debugcon_line(&self, pattern: &str, timeout: Duration) -> Result<String, VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.debugcon();
            if let Some(line) = text.lines().find(|l| l.contains(pattern)) {
                return Ok(line.to_string());
            }
            if Instant::now() >= deadline {
                return Err(VmError::DebugconTimeout {
                    name: self.info.name.clone(),
                    pattern: pattern.into(),
                    timeout,
                    tail: crate::tail_lines(&text, 20),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// True while QEMU runs.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => self.info.is_alive(),
        }
    }

    /// Stops the VM: QMP `quit`, then SIGKILL if it is still there after 5 s.
    /// Returns QEMU's exit description when this process started it.
    pub fn down(mut self) -> Result<String, VmError> {
        let _ = self.qmp("quit", None);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && self.is_running() {
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(self.kill())
    }

    /// Kills QEMU if still alive, reaps it, removes the pid file, and
    /// unregisters the VM from its daemon (best effort).
    fn kill(&mut self) -> String {
        let status = self.kill_qemu();
        if let Some(sock) = &self.info.daemon
            && let Ok(mut c) = host_injector::daemon::client::DaemonClient::connect(
                &host_injector::daemon::client::DaemonAddr::Unix(sock.clone()),
                Duration::from_secs(5),
            )
        {
            let _ = c.unregister(&self.info.name);
        }
        status
    }

    fn kill_qemu(&mut self) -> String {
        let status = if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            child
                .wait()
                .map(describe_exit)
                .unwrap_or_else(|e| format!("wait failed: {e}"))
        } else {
            if self.info.is_alive() {
                kill_pid(self.info.pid);
                let deadline = Instant::now() + Duration::from_secs(5);
                while self.info.is_alive() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            "stopped".into()
        };
        let _ = std::fs::remove_file(self.info.state_dir.join("qemu.pid"));
        status
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.kill();
        }
    }
}

/// The mailbox device: `ivshmem-plain` over the state dir's file, or
/// `ivshmem-doorbell` through the daemon (registered here, before QEMU
/// starts: QEMU connects to the ivshmem socket while it realizes the device).
/// How the VM's key reaches the firmware. Our firmware: a secret table
/// (`smmvmi_boot::sev`) loaded into the SEV launch secret area its image
/// names, with QEMU's generic loader, where `sev-inject-launch-secret` puts
/// it under SEV. Other firmware, or [`VmConfig::insecure_fw_cfg_key`]:
/// fw_cfg `opt/smmvmi/key`.
fn key_args(config: &VmConfig, info: &VmInfo, state_dir: &Path) -> Result<Vec<String>, VmError> {
    let fw_cfg = || {
        vec![
            "-fw_cfg".to_string(),
            format!("name={KEY_FW_CFG_NAME},file={}", info.key.display()),
        ]
    };
    let Firmware::Ours(image) = &config.firmware else {
        return Ok(fw_cfg());
    };
    if config.insecure_fw_cfg_key {
        return Ok(fw_cfg());
    }
    // An image that names no secret area (the harness's hand-made test
    // ROMs, an old build) gets the key the old way, and the log says so.
    let Some(secret) = crate::sev::areas(image).ok().and_then(|(secret, _)| secret) else {
        eprintln!(
            "[smmvmi] {} names no SEV secret area: the key goes to fw_cfg (insecure, test setups only)",
            image.display()
        );
        return Ok(fw_cfg());
    };
    let file = state_dir.join("key-secret.bin");
    crate::sev::write_key_secret(&info.key, &file).map_err(|e| VmError::Io {
        what: "build the secret table".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(vec![
        "-device".into(),
        crate::sev::secret_loader_arg(&file, secret.base.into()),
    ])
}

fn mailbox_args(config: &VmConfig, info: &VmInfo) -> Result<Vec<String>, VmError> {
    let s = |p: &Path| p.display().to_string();
    let Some(sock) = &config.daemon else {
        return Ok(vec![
            "-object".into(),
            format!(
                "memory-backend-file,id=mb,size={},mem-path={},share=on",
                MailboxFile::SIZE,
                s(&info.mailbox)
            ),
            "-device".into(),
            "ivshmem-plain,memdev=mb".into(),
        ]);
    };
    use host_injector::daemon::client::{DaemonAddr, DaemonClient};
    let ivshmem = info.state_dir.join("ivshmem.sock");
    let qmp = info.state_dir.join("qmp-daemon.sock");
    let vectors = 1 + config.smp.min(64) as u16;
    let daemon_err = |e: host_injector::daemon::client::ClientError| VmError::Io {
        what: format!(
            "register VM {} with the daemon at {}",
            info.name,
            sock.display()
        ),
        source: std::io::Error::other(e.to_string()),
    };
    let connect = || {
        DaemonClient::connect(&DaemonAddr::Unix(sock.clone()), Duration::from_secs(10))
            .map_err(daemon_err)
    };
    // A stale entry of a VM of this name (the daemon closes a connection
    // that names an unknown VM, hence a second connection).
    let _ = connect()?.unregister(&info.name);
    connect()?
        .register(host_injector::daemon::config::VmConfig {
            name: info.name.clone(),
            ivshmem_socket: ivshmem.clone(),
            qmp: Some(qmp.clone()),
            vectors,
            mailbox_size: MailboxFile::SIZE as usize,
            mailbox_file: Some(info.mailbox.clone()),
            libvirt: None,
        })
        .map_err(daemon_err)?;
    Ok(vec![
        "-chardev".into(),
        format!("socket,id=ivs,path={}", s(&ivshmem)),
        "-device".into(),
        format!("ivshmem-doorbell,chardev=ivs,vectors={vectors}"),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", s(&qmp)),
    ])
}

/// The fw_cfg file the firmware reads the agent key from.
pub const KEY_FW_CFG_NAME: &str = platform::KEY_FW_CFG_FILE;

/// QEMU arguments for the firmware's debug devices: `isa-debug-exit` at
/// [`platform::DEBUG_EXIT_PORT`] and `isa-debugcon` at
/// [`platform::DEBUGCON_PORT`] logging to `debugcon`.
pub fn debug_device_args(debugcon: &Path) -> [String; 6] {
    [
        "-device".into(),
        format!(
            "isa-debug-exit,iobase={:#x},iosize={}",
            platform::DEBUG_EXIT_PORT,
            platform::DEBUG_EXIT_IOSIZE
        ),
        "-debugcon".into(),
        format!("file:{}", debugcon.display()),
        "-global".into(),
        format!("isa-debugcon.iobase={:#x}", platform::DEBUGCON_PORT),
    ]
}

/// Writes 32 fresh random bytes (from /dev/urandom) to `path`, mode 0600.
pub fn write_fresh_key(path: &Path) -> Result<(), VmError> {
    use std::io::Read;
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .map_err(io("read /dev/urandom for the agent key"))?;
    write_private(path, &key).map_err(io(format!("write agent key {}", path.display())))
}

/// Replaces `path` with `data`, created with mode 0600 (key material).
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(data))
}

/// A ping value different from `previous` and not zero.
pub fn fresh_ping_value(previous: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let v = nanos ^ (previous.rotate_left(17));
    if v == previous || v == 0 {
        previous.wrapping_add(1).max(1)
    } else {
        v
    }
}

/// Kills every live VM whose name starts with `prefix` and whose starter is
/// gone (its QEMU was reparented): leftovers of a crashed test run. VMs of a
/// test run still in progress (another session in the same checkout) are
/// left alone. Returns the names it stopped.
pub fn kill_stale(prefix: &str) -> Vec<String> {
    let mut stopped = Vec::new();
    for (info, alive) in Vm::list() {
        if alive && info.name.starts_with(prefix) && parent_pid(info.pid) == Some(1) {
            kill_pid(info.pid);
            stopped.push(info.name);
        }
    }
    stopped
}

fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Explains a QEMU exit status, decoding isa-debug-exit codes.
pub fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(0), _) => "exited with status 0 (clean shutdown)".into(),
        (Some(1), _) => "exited with status 1 (QEMU error, or isa-debug-exit value 0)".into(),
        (Some(c), _) if c % 2 == 1 => {
            let code = match platform::ExitCode::from_qemu_status(c) {
                Some(code) => format!(" ({code:?})"),
                None => String::new(),
            };
            format!(
                "exited with status {c}: isa-debug-exit, the firmware wrote {:#x}{code}",
                (c - 1) / 2
            )
        }
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => "ended (unknown status)".into(),
    }
}

fn read_info(state_dir: &Path) -> Result<VmInfo, VmError> {
    let path = state_dir.join("vm.json");
    let text = std::fs::read_to_string(&path).map_err(io(format!("read {}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| VmError::Io {
        what: format!("parse {}", path.display()),
        source: std::io::Error::other(e),
    })
}

fn write_info(info: &VmInfo) -> Result<(), VmError> {
    let path = info.state_dir.join("vm.json");
    let text = serde_json::to_string_pretty(info).expect("serializable");
    std::fs::write(&path, text).map_err(io(format!("write {}", path.display())))
}

/// True if `pid` is a live (non-zombie) process whose command line mentions
/// `state_dir` (so a recycled pid is not mistaken for our QEMU).
fn pid_runs_in(pid: u32, state_dir: &Path) -> bool {
    if pid == 0 {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    if matches!(state, Some('Z') | Some('X') | None) {
        return false;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let needle = state_dir.as_os_str().as_encoded_bytes();
    cmdline.windows(needle.len()).any(|w| w == needle)
}

fn kill_pid(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    if pid <= 0 {
        return;
    }
    // SAFETY: kill(2) with a positive pid only sends a signal; no memory is shared.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

fn shell_words(program: &str, args: &[String]) -> String {
    let mut out = String::from(program);
    for a in args {
        out.push(' ');
        if a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=,./:".contains(c))
        {
            out.push_str(a);
        } else {
            out.push('\'');
            out.push_str(&a.replace('\'', "'\\''"));
            out.push('\'');
        }
    }
    out.push('\n');
    out
}

/// Makes the child of `cmd` lead a new session (setsid before exec), so it
/// outlives the harness process that starts it (`vm up`, the daemon).
/// Makes the child get SIGKILL when the thread that spawned it exits
/// (PR_SET_PDEATHSIG): a test that dies leaves no process behind.
pub(crate) fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and only
    // changes the forked child's own attributes, before exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

pub(crate) fn new_session(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid() is async-signal-safe and touches no memory of the
    // parent; it runs in the forked child before exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("t-boot-1").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name(&"x".repeat(41)).is_err());
    }

    #[test]
    fn exit_codes() {
        use std::os::unix::process::ExitStatusExt;
        let s = describe_exit(ExitStatus::from_raw(7 << 8));
        assert!(s.contains("isa-debug-exit") && s.contains("0x3"), "{s}");
        assert!(describe_exit(ExitStatus::from_raw(9)).contains("signal 9"));
    }

    #[test]
    fn firmware_parse() {
        assert_eq!("seabios".parse::<Firmware>(), Ok(Firmware::SeaBios));
        assert_eq!("ovmf".parse::<Firmware>(), Ok(Firmware::Ovmf));
        assert_eq!(
            "/x/fw.bin".parse::<Firmware>(),
            Ok(Firmware::Ours("/x/fw.bin".into()))
        );
        assert!("ours".parse::<Firmware>().is_err());
    }

    #[test]
    fn ping_values_change() {
        for prev in [0u64, 1, u64::MAX] {
            let v = fresh_ping_value(prev);
            assert_ne!(v, prev);
            assert_ne!(v, 0);
        }
    }

    #[test]
    fn parent_of_self() {
        assert_eq!(
            parent_pid(std::process::id()),
            Some(std::os::unix::process::parent_id())
        );
    }

    #[test]
    fn quoting() {
        let s = shell_words(
            STOCK_QEMU,
            &["-append".into(), "console=ttyS0 panic=-1".into()],
        );
        assert_eq!(s, "qemu-system-x86_64 -append 'console=ttyS0 panic=-1'\n");
    }
}
