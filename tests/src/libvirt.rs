//! Monitored VMs managed by libvirt: the domain XML of a monitored VM
//! ([`DomainXml`], also what `cargo xtask vm xml` prints), a private libvirtd
//! for the tests ([`Libvirtd`]), and a domain served through a host-injector
//! daemon ([`LibvirtVm`]).
//!
//! The domain is an ordinary libvirt domain: the smmvmi firmware as the
//! `<loader type='rom'>` (QEMU `-bios`), `<smm state='on'/>`, the mailbox as
//! libvirt's own `<shmem>` of model `ivshmem-doorbell` whose `<server
//! path=.../>` is the daemon's socket for the VM (on bus 0: the firmware
//! assigns BARs on bus 0 only), no USB controller and no balloon. The one
//! thing libvirt has no element for is the agent key: it is packaged as a
//! launch secret table and loaded into the SEV launch secret area the
//! firmware image names, through `<qemu:commandline>` as `-device
//! loader,file=...,addr=...,force-raw=on`, the way the harness does
//! ([`KeyDelivery::LaunchSecret`]; under SEV, `sev-inject-launch-secret`
//! puts the same table there after the launch measurement is checked).
//! fw_cfg (`opt/smmvmi/key`, readable by a compromised guest) only when
//! asked for by name: [`KeyDelivery::InsecureFwCfg`]. The firmware's debug
//! console (`-debugcon`) is added the same way when asked for.
//!
//! TCG threads: libvirt 9.0 emits its own `-accel tcg` first and has no
//! element for TCG's `thread=` option (a second `-accel` in
//! `<qemu:commandline>` is ignored by QEMU: the first one wins), so a
//! `type='qemu'` domain runs QEMU's default, one thread per vCPU. Under KVM
//! (`type='kvm'`) the question does not arise.
//!
//! The private libvirtd runs as root in its own mount namespace, with
//! `/etc/libvirt`, `/run/libvirt`, `/var/lib/libvirt`, `/var/cache/libvirt`
//! and `/var/log/libvirt` bound to directories under `.cache/libvirt/`:
//! the host's libvirt configuration and domains are never touched, and no
//! systemd is needed. Clients reach it with
//! `qemu:///system?socket=<repo>/.cache/libvirt/run/libvirt-sock`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::command_channel::{CommandChannel, ExecOutput};
use crate::guest_image::{ACPI_CMDLINE_FLAG, READY_MARKER};
use smmvmi_mailbox::platform;

/// Errors of the libvirt helpers; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(
        "cannot run {program}: {source} (install Debian's libvirt-daemon-system and libvirt-clients: .ci/run does)"
    )]
    Missing {
        program: String,
        source: std::io::Error,
    },
    #[error("`virsh -c {uri} {args}` failed: {stderr}")]
    Virsh {
        uri: String,
        args: String,
        stderr: String,
    },
    #[error("libvirtd did not answer on {uri} within {timeout:?}; its log: {log}\n{tail}")]
    NotAnswering {
        uri: String,
        timeout: Duration,
        log: String,
        tail: String,
    },
    #[error(
        "domain {name}: no `{READY_MARKER}` on its serial console within {timeout:?}; tail of {log}:\n{tail}"
    )]
    NotReady {
        name: String,
        timeout: Duration,
        log: String,
        tail: String,
    },
    #[error("domain {name}: registering with the daemon at {socket}: {problem}")]
    Register {
        name: String,
        socket: String,
        problem: String,
    },
    #[error("domain {name}: guest command channel: {problem}")]
    Channel { name: String, problem: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LibvirtError {
    let what = what.into();
    move |source| LibvirtError::Io { what, source }
}

/// The domain XML of a monitored VM.
#[derive(Clone, Debug)]
pub struct DomainXml {
    pub name: String,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    pub vcpus: u32,
    /// CPU model; `qemu64` (the harness's) when `None`.
    pub cpu: Option<String>,
    /// The smmvmi firmware image.
    pub firmware: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The kernel command line.
    pub cmdline: String,
    /// How the agent key reaches the firmware.
    pub key: KeyDelivery,
    /// The daemon's ivshmem socket for this VM.
    pub ivshmem_socket: PathBuf,
    /// Serial console (ttyS0) log file.
    pub serial_log: Option<PathBuf>,
    /// A unix socket (libvirt binds it) for ttyS1, the harness's command channel.
    pub cmd_socket: Option<PathBuf>,
    /// The firmware's debug console (port 0x402) log file.
    pub debugcon_log: Option<PathBuf>,
    /// `kvm` or `qemu` (TCG).
    pub domain_type: String,
    /// PCI slot of the mailbox device on bus 0.
    pub shmem_slot: u8,
}

/// How a domain hands the agent key to the firmware.
#[derive(Clone, Debug)]
pub enum KeyDelivery {
    /// A secret table file (`crate::sev::write_key_secret`) loaded into the
    /// SEV launch secret area at `addr` (the firmware image's GUIDed table
    /// names it) by QEMU's generic loader; the firmware moves the key into
    /// SMRAM and zeroes the area.
    LaunchSecret { table: PathBuf, addr: u64 },
    /// INSECURE, test setups only: the raw 32-byte key file as fw_cfg
    /// `opt/smmvmi/key`, which guest root can read for the VM's whole life.
    InsecureFwCfg { key: PathBuf },
}

/// The kernel command line the harness uses, plus the ACPI power button.
pub fn default_cmdline() -> String {
    format!("console=ttyS0 panic=-1 8250.nr_uarts=4 {ACPI_CMDLINE_FLAG}")
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

fn p(path: &Path) -> String {
    esc(&path.display().to_string())
}

impl DomainXml {
    /// 1 GiB, 2 vCPUs, qemu64, TCG, the harness's command line.
    pub fn new(
        name: impl Into<String>,
        firmware: PathBuf,
        kernel: PathBuf,
        initrd: PathBuf,
        key: KeyDelivery,
        ivshmem_socket: PathBuf,
    ) -> Self {
        Self {
            name: name.into(),
            mem_mib: 1024,
            vcpus: 2,
            cpu: None,
            firmware,
            kernel,
            initrd,
            cmdline: default_cmdline(),
            key,
            ivshmem_socket,
            serial_log: None,
            cmd_socket: None,
            debugcon_log: None,
            domain_type: "qemu".into(),
            shmem_slot: 5,
        }
    }

    /// MSI-X vectors of the mailbox device: 1 broadcast + 1 per vCPU.
    pub fn vectors(&self) -> u32 {
        1 + self.vcpus.min(64)
    }

    /// The XML text.
    pub fn xml(&self) -> String {
        let mut x = String::new();
        let mut line = |s: &str| {
            x.push_str(s);
            x.push('\n');
        };
        line(&format!(
            "<domain type='{}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>",
            esc(&self.domain_type)
        ));
        line(&format!("  <name>{}</name>", esc(&self.name)));
        line(&format!("  <memory unit='MiB'>{}</memory>", self.mem_mib));
        line(&format!("  <vcpu>{}</vcpu>", self.vcpus));
        line("  <os>");
        line("    <type arch='x86_64' machine='q35'>hvm</type>");
        line("    <!-- the smmvmi firmware (QEMU -bios): SMM agent in locked SMRAM -->");
        line(&format!(
            "    <loader type='rom' readonly='yes'>{}</loader>",
            p(&self.firmware)
        ));
        line(&format!("    <kernel>{}</kernel>", p(&self.kernel)));
        line(&format!("    <initrd>{}</initrd>", p(&self.initrd)));
        line(&format!("    <cmdline>{}</cmdline>", esc(&self.cmdline)));
        line("  </os>");
        line("  <features>");
        line("    <acpi/>");
        line("    <smm state='on'/>");
        line("  </features>");
        line(&format!(
            "  <cpu mode='custom' match='exact' check='none'><model fallback='allow'>{}</model></cpu>",
            esc(self.cpu.as_deref().unwrap_or("qemu64"))
        ));
        line("  <clock offset='utc'/>");
        line("  <on_poweroff>destroy</on_poweroff>");
        line("  <on_reboot>restart</on_reboot>");
        line("  <on_crash>destroy</on_crash>");
        line("  <devices>");
        line("    <emulator>/usr/bin/qemu-system-x86_64</emulator>");
        if let Some(log) = &self.serial_log {
            line(&format!(
                "    <serial type='file'><source path='{}' append='on'/><target port='0'/></serial>",
                p(log)
            ));
        } else {
            line("    <serial type='pty'><target port='0'/></serial>");
        }
        if let Some(sock) = &self.cmd_socket {
            line(&format!(
                "    <serial type='unix'><source mode='bind' path='{}'/><target port='1'/></serial>",
                p(sock)
            ));
        }
        line("    <!-- the mailbox: served by the host-injector daemon (its ivshmem server) -->");
        line(&format!("    <shmem name='smmvmi-{}'>", esc(&self.name)));
        line("      <model type='ivshmem-doorbell'/>");
        line(&format!(
            "      <server path='{}'/>",
            p(&self.ivshmem_socket)
        ));
        line(&format!("      <msi vectors='{}'/>", self.vectors()));
        line(&format!(
            "      <address type='pci' domain='0x0000' bus='0x00' slot='{:#04x}' function='0x0'/>",
            self.shmem_slot
        ));
        line("    </shmem>");
        line("    <controller type='usb' model='none'/>");
        line("    <memballoon model='none'/>");
        line("  </devices>");
        line("  <!-- libvirt has no element for these: the agent key and, if asked, the");
        line("       firmware's debug console -->");
        line("  <qemu:commandline>");
        match &self.key {
            KeyDelivery::LaunchSecret { table, addr } => {
                line("    <!-- the key as a launch secret table, in the SEV secret area -->");
                line("    <qemu:arg value='-device'/>");
                line(&format!(
                    "    <qemu:arg value='{}'/>",
                    esc(&crate::sev::secret_loader_arg(table, *addr))
                ));
            }
            KeyDelivery::InsecureFwCfg { key } => {
                line("    <!-- INSECURE: fw_cfg is readable by guest root (test setups only) -->");
                line("    <qemu:arg value='-fw_cfg'/>");
                line(&format!(
                    "    <qemu:arg value='name={},file={}'/>",
                    platform::KEY_FW_CFG_FILE,
                    p(key)
                ));
            }
        }
        if let Some(log) = &self.debugcon_log {
            line("    <qemu:arg value='-debugcon'/>");
            line(&format!("    <qemu:arg value='file:{}'/>", p(log)));
            line("    <qemu:arg value='-global'/>");
            line(&format!(
                "    <qemu:arg value='isa-debugcon.iobase={:#x}'/>",
                platform::DEBUGCON_PORT
            ));
        }
        line("  </qemu:commandline>");
        line("</domain>");
        x
    }
}

/// The private libvirtd of the tests.
#[derive(Clone, Debug)]
pub struct Libvirtd {
    /// `.cache/libvirt`.
    pub dir: PathBuf,
    /// The URI clients use.
    pub uri: String,
}

/// How long libvirtd gets to answer after it starts.
const LIBVIRTD_START: Duration = Duration::from_secs(30);

impl Libvirtd {
    /// The instance under `<repo>/.cache/libvirt` (not started).
    pub fn at_repo() -> Self {
        let dir = crate::repo_root().join(".cache/libvirt");
        let uri = format!(
            "qemu:///system?socket={}",
            dir.join("run/libvirt-sock").display()
        );
        Self { dir, uri }
    }

    /// Starts it unless it answers already.
    pub fn ensure() -> Result<Self, LibvirtError> {
        let l = Self::at_repo();
        if !l.answers() {
            l.start()?;
        }
        Ok(l)
    }

    /// Whether it answers (`virsh version`).
    pub fn answers(&self) -> bool {
        self.virsh(&["version"]).is_ok()
    }

    fn log(&self) -> PathBuf {
        self.dir.join("libvirtd.log")
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("libvirtd.pid")
    }

    fn write_config(&self) -> Result<(), LibvirtError> {
        for sub in ["etc", "run", "lib", "cache", "log"] {
            let d = self.dir.join(sub);
            std::fs::create_dir_all(&d).map_err(io(format!("create {}", d.display())))?;
        }
        let libvirtd = format!(
            "# written by smmvmi-tests (tests/src/libvirt.rs)\n\
             unix_sock_dir = \"{}\"\n\
             unix_sock_rw_perms = \"0700\"\n\
             auth_unix_rw = \"none\"\n\
             auth_unix_ro = \"none\"\n\
             log_outputs = \"3:file:{}\"\n",
            self.dir.join("run").display(),
            self.log().display()
        );
        // QEMU as root with no security driver and no private /dev: this
        // libvirtd serves the test suite's own domains only.
        let qemu = "# written by smmvmi-tests (tests/src/libvirt.rs)\n\
                    user = \"root\"\n\
                    group = \"root\"\n\
                    dynamic_ownership = 0\n\
                    remember_owner = 0\n\
                    security_driver = \"none\"\n\
                    namespaces = [ ]\n\
                    stdio_handler = \"file\"\n";
        for (name, text) in [("libvirtd.conf", libvirtd.as_str()), ("qemu.conf", qemu)] {
            let f = self.dir.join("etc").join(name);
            std::fs::write(&f, text).map_err(io(format!("write {}", f.display())))?;
        }
        Ok(())
    }

    /// Starts libvirtd in its own mount namespace (see the module doc) and
    /// waits until it answers.
    pub fn start(&self) -> Result<(), LibvirtError> {
        self.write_config()?;
        let d = |s: &str| self.dir.join(s).display().to_string();
        let script = format!(
            "set -e; \
             for t in /etc/libvirt /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt; do mkdir -p $t; done; \
             mount --make-rprivate /; \
             mount --bind '{etc}' /etc/libvirt; mount --bind '{run}' /run/libvirt; \
             mount --bind '{lib}' /var/lib/libvirt; mount --bind '{cache}' /var/cache/libvirt; \
             mount --bind '{log}' /var/log/libvirt; \
             exec libvirtd -f '{etc}/libvirtd.conf' -p '{pid}'",
            etc = d("etc"),
            run = d("run"),
            lib = d("lib"),
            cache = d("cache"),
            log = d("log"),
            pid = self.pid_file().display()
        );
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("libvirtd.stdout"))
            .map_err(io("open libvirtd.stdout"))?;
        let err = out.try_clone().map_err(io("dup libvirtd.stdout"))?;
        let mut cmd = Command::new("unshare");
        cmd.args(["-m", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        crate::vm::new_session(&mut cmd);
        let mut child = cmd.spawn().map_err(|source| LibvirtError::Missing {
            program: "unshare/libvirtd".into(),
            source,
        })?;
        let until = Instant::now() + LIBVIRTD_START;
        while !self.answers() {
            if Instant::now() > until || matches!(child.try_wait(), Ok(Some(_))) {
                return Err(LibvirtError::NotAnswering {
                    uri: self.uri.clone(),
                    timeout: LIBVIRTD_START,
                    log: self.log().display().to_string(),
                    tail: crate::tail_file(&self.dir.join("libvirtd.stdout"), 10)
                        + &crate::tail_file(&self.log(), 10),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Reaped by init once this process is gone; it outlives the test.
        std::mem::forget(child);
        Ok(())
    }

    /// The pid of the running libvirtd (its pid file).
    pub fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Stops libvirtd (SIGTERM, then SIGKILL after 10 s). Running domains
    /// keep running: QEMU is not libvirtd's child in that sense.
    pub fn stop(&self) {
        let Some(pid) = self.pid() else { return };
        let alive = || Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid);
        // SAFETY: kill(2) on a pid read from libvirtd's own pid file.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let until = Instant::now() + Duration::from_secs(10);
        while alive() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        if alive() {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }

    /// Runs `virsh -c URI ARGS`; its stdout.
    pub fn virsh(&self, args: &[&str]) -> Result<String, LibvirtError> {
        let out = Command::new("virsh")
            .arg("-q")
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| LibvirtError::Missing {
                program: "virsh".into(),
                source,
            })?;
        if !out.status.success() {
            return Err(LibvirtError::Virsh {
                uri: self.uri.clone(),
                args: args.join(" "),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(|st| st == "Z"))
        })
        .unwrap_or(true)
}

/// A domain of the private libvirtd, served through a host-injector daemon.
pub struct LibvirtVm {
    pub name: String,
    pub libvirtd: Libvirtd,
    /// The daemon's client socket.
    pub daemon: PathBuf,
    pub state_dir: PathBuf,
    pub key: PathBuf,
    pub serial_log: PathBuf,
    pub debugcon_log: PathBuf,
    pub cmd_socket: PathBuf,
    pub xml: DomainXml,
    channel: Mutex<Option<CommandChannel>>,
}

impl LibvirtVm {
    /// Writes the domain (state in `.cache/vms/NAME`), defines it, registers
    /// it with the daemon by its domain name, and starts it; returns once
    /// the guest is ready.
    pub fn define_and_start(
        libvirtd: &Libvirtd,
        daemon: &Path,
        name: &str,
        vcpus: u32,
    ) -> Result<Self, LibvirtError> {
        let image = crate::guest_image::GuestImage::from_env().ok_or_else(|| LibvirtError::Io {
            what: "guest image".into(),
            source: std::io::Error::other(
                "SMMVMI_KERNEL and SMMVMI_INITRD are not set (cargo xtask test sets them)",
            ),
        })?;
        let firmware = match crate::vm::Firmware::from_env() {
            Ok(crate::vm::Firmware::Ours(p)) => p,
            _ => {
                return Err(LibvirtError::Io {
                    what: "firmware".into(),
                    source: std::io::Error::other(
                        "SMMVMI_FIRMWARE must name the smmvmi firmware image",
                    ),
                });
            }
        };
        let state_dir = crate::vm::vms_dir().join(name);
        let _ = libvirtd.virsh(&["destroy", name]);
        let _ = libvirtd.virsh(&["undefine", name]);
        let _ = std::fs::remove_dir_all(&state_dir);
        std::fs::create_dir_all(&state_dir)
            .map_err(io(format!("create {}", state_dir.display())))?;
        let key = state_dir.join("key");
        crate::vm::write_fresh_key(&key).map_err(|e| LibvirtError::Io {
            what: "agent key".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let secret = crate::sev::areas(&firmware)
            .ok()
            .and_then(|(secret, _)| secret)
            .ok_or_else(|| LibvirtError::Io {
                what: format!(
                    "{}: the image names no SEV launch secret area",
                    firmware.display()
                ),
                source: std::io::Error::other("rebuild the firmware (cargo xtask build)"),
            })?;
        let table = state_dir.join("key-secret.bin");
        crate::sev::write_key_secret(&key, &table).map_err(|e| LibvirtError::Io {
            what: "the key's secret table".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let mut xml = DomainXml::new(
            name,
            firmware,
            image.kernel.clone(),
            image.initrd.clone(),
            KeyDelivery::LaunchSecret {
                table,
                addr: secret.base.into(),
            },
            state_dir.join("ivshmem.sock"),
        );
        xml.vcpus = vcpus;
        let serial_log = state_dir.join("serial.log");
        let debugcon_log = state_dir.join("debugcon.log");
        let cmd_socket = state_dir.join("cmd.sock");
        xml.serial_log = Some(serial_log.clone());
        xml.debugcon_log = Some(debugcon_log.clone());
        xml.cmd_socket = Some(cmd_socket.clone());
        let xml_path = state_dir.join("domain.xml");
        std::fs::write(&xml_path, xml.xml()).map_err(io("write domain.xml"))?;
        libvirtd.virsh(&["define", &xml_path.display().to_string()])?;
        let vm = Self {
            name: name.into(),
            libvirtd: libvirtd.clone(),
            daemon: daemon.to_path_buf(),
            state_dir: state_dir.clone(),
            key,
            serial_log,
            debugcon_log,
            cmd_socket,
            xml,
            channel: Mutex::new(None),
        };
        vm.register()?;
        vm.start()?;
        Ok(vm)
    }

    /// Registers the domain with the daemon by name (the daemon reads the
    /// socket and the vectors from the definition).
    pub fn register(&self) -> Result<(), LibvirtError> {
        use host_injector::daemon::client::{DaemonAddr, DaemonClient};
        use host_injector::daemon::config::{LibvirtDomain, VmConfig};
        let err = |e: host_injector::daemon::client::ClientError| LibvirtError::Register {
            name: self.name.clone(),
            socket: self.daemon.display().to_string(),
            problem: e.to_string(),
        };
        let connect = || {
            DaemonClient::connect(
                &DaemonAddr::Unix(self.daemon.clone()),
                Duration::from_secs(10),
            )
            .map_err(err)
        };
        let _ = connect()?.unregister(&self.name);
        connect()?
            .register(VmConfig {
                name: self.name.clone(),
                ivshmem_socket: PathBuf::new(),
                qmp: None,
                vectors: 1,
                mailbox_size: host_injector::daemon::config::DEFAULT_MAILBOX_SIZE,
                mailbox_file: Some(self.state_dir.join("mailbox")),
                libvirt: Some(LibvirtDomain {
                    domain: self.name.clone(),
                    uri: Some(self.libvirtd.uri.clone()),
                }),
            })
            .map_err(err)
    }

    /// `virsh start`, then waits for the guest.
    pub fn start(&self) -> Result<Duration, LibvirtError> {
        let before = self.ready_count();
        self.virsh(&["start", &self.name])?;
        self.wait_ready(before, crate::vm::DEFAULT_BOOT_TIMEOUT)
    }

    /// Runs `virsh ARGS` on this VM's libvirtd.
    pub fn virsh(&self, args: &[&str]) -> Result<String, LibvirtError> {
        self.libvirtd.virsh(args)
    }

    /// `virsh domstate --reason`.
    pub fn domstate(&self) -> String {
        self.virsh(&["domstate", "--reason", &self.name])
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|e| e.to_string())
    }

    /// The IDS endpoint through the daemon.
    pub fn endpoint(&self) -> String {
        format!(
            "unix:{}#{},key={}",
            self.daemon.display(),
            self.name,
            self.key.display()
        )
    }

    /// How many ready markers the serial console shows (one per boot; the
    /// log is kept across reboots of one QEMU).
    pub fn ready_count(&self) -> usize {
        String::from_utf8_lossy(&std::fs::read(&self.serial_log).unwrap_or_default())
            .matches(READY_MARKER)
            .count()
    }

    /// Waits until the serial console shows more than `before` ready markers.
    pub fn wait_ready(&self, before: usize, timeout: Duration) -> Result<Duration, LibvirtError> {
        let start = Instant::now();
        while self.ready_count() <= before {
            if start.elapsed() > timeout {
                return Err(LibvirtError::NotReady {
                    name: self.name.clone(),
                    timeout,
                    log: self.serial_log.display().to_string(),
                    tail: crate::tail_file(&self.serial_log, 15),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        *self.channel.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Ok(start.elapsed())
    }

    /// Runs `command` in the guest (sh, as root) over ttyS1.
    pub fn exec(&self, command: &str) -> Result<ExecOutput, LibvirtError> {
        let mut guard = self.channel.lock().unwrap_or_else(|e| e.into_inner());
        let wrap = |e: crate::command_channel::ChannelError| LibvirtError::Channel {
            name: self.name.clone(),
            problem: e.to_string(),
        };
        if guard.is_none() {
            *guard = Some(
                CommandChannel::connect_synced(&self.cmd_socket, crate::vm::CHANNEL_SYNC_TIMEOUT)
                    .map_err(wrap)?,
            );
        }
        let r = guard
            .as_mut()
            .expect("connected above")
            .exec(command, crate::vm::DEFAULT_EXEC_TIMEOUT);
        if r.is_err() {
            *guard = None;
        }
        r.map_err(wrap)
    }

    /// Runs `command`; its stdout; a non-zero exit is an error.
    pub fn sh(&self, command: &str) -> Result<String, LibvirtError> {
        let out = self.exec(command)?;
        if out.status != 0 {
            return Err(LibvirtError::Channel {
                name: self.name.clone(),
                problem: format!(
                    "`{command}` exited with {}: {}",
                    out.status,
                    out.stderr.trim()
                ),
            });
        }
        Ok(out.stdout)
    }
}

impl Drop for LibvirtVm {
    fn drop(&mut self) {
        let _ = self.virsh(&["destroy", &self.name]);
        let _ = self.virsh(&["undefine", &self.name]);
        if let Ok(mut c) = host_injector::daemon::client::DaemonClient::connect(
            &host_injector::daemon::client::DaemonAddr::Unix(self.daemon.clone()),
            Duration::from_secs(5),
        ) {
            let _ = c.unregister(&self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_xml_has_the_monitored_vm_parts_and_escapes_paths() {
        let mut x = DomainXml::new(
            "mon1",
            "/fw/smmvmi-firmware.bin".into(),
            "/k".into(),
            "/i".into(),
            KeyDelivery::LaunchSecret {
                table: "/keys/it's.secret".into(),
                addr: 0x5_0000,
            },
            "/run/smmvmi/mon1.ivshmem".into(),
        );
        x.vcpus = 4;
        let t = x.xml();
        for want in [
            "<domain type='qemu'",
            "<loader type='rom' readonly='yes'>/fw/smmvmi-firmware.bin</loader>",
            "<smm state='on'/>",
            "<model type='ivshmem-doorbell'/>",
            "<server path='/run/smmvmi/mon1.ivshmem'/>",
            "<msi vectors='5'/>",
            "bus='0x00' slot='0x05'",
            "<qemu:arg value='-device'/>",
            "<qemu:arg value='loader,file=/keys/it&apos;s.secret,addr=0x50000,force-raw=on'/>",
            "smmvmi.acpi",
        ] {
            assert!(t.contains(want), "{want} missing in\n{t}");
        }
        assert!(!t.contains("debugcon"), "no debug console unless asked");
        assert!(!t.contains("-fw_cfg"), "no fw_cfg key by default:\n{t}");
        x.key = KeyDelivery::InsecureFwCfg {
            key: "/keys/it's.key".into(),
        };
        let t = x.xml();
        assert!(
            t.contains("<qemu:arg value='name=opt/smmvmi/key,file=/keys/it&apos;s.key'/>")
                && t.contains("INSECURE"),
            "{t}"
        );
    }
}
