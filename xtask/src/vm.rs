//! `cargo xtask vm up|exec|down|list|rm|prune|attack|xml`: VMs that
//! outlive the command, for people and scripts (tests use the harness
//! library directly), and the libvirt domain XML of a monitored VM. Every
//! subcommand names the VM the same way (a position, or `--name`; `attack`
//! by position); `down` of a stopped VM is done, not an error; `rm` and
//! `prune` remove state directories; `list --json` is for scripts.

use std::time::Duration;

use anyhow::Context;
use smmvmi_tests::guest_image::{self, KernelDeb};
use smmvmi_tests::vm::{Vm, VmConfig, VmError};

use crate::FirmwareChoice;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Start a VM in the background; prints a JSON object on the last stdout line.
    Up(UpArgs),
    /// Run a shell command in the guest as root; exits with its exit code.
    Exec(ExecArgs),
    /// Stop a VM (QMP quit, then SIGKILL after 5 s); a VM that is not
    /// running is already down (exit 0).
    Down(NameArg),
    /// List VMs that have a state directory, and whether they run.
    List {
        /// One JSON array (name, pid, running, firmware, mem, smp, state
        /// dir, endpoints).
        #[arg(long)]
        json: bool,
    },
    /// Remove a stopped VM's state directory (logs, mailbox, key); with
    /// --force stop it first.
    Rm {
        #[command(flatten)]
        vm: NameArg,
        /// Stop the VM first if it runs.
        #[arg(long)]
        force: bool,
    },
    /// Remove the state directories of every stopped VM.
    Prune,
    /// Load a rootkit technique into a running VM to rehearse detection
    /// (`ids check`): a kernel module built against Debian's headers for
    /// the guest's kernel (test code, tests/attacks/). KIND: hook-syscall
    /// NR, patch-dispatch NR, hook-idt VECTOR, lstar CPU, hide-pid PID,
    /// hide-module (permanent), ftrace-hook SYSCALL_NAME; `remove` undoes
    /// the others.
    Attack {
        /// VM name.
        name: String,
        /// hook-syscall, patch-dispatch, hook-idt, lstar, hide-pid,
        /// hide-module, or remove.
        kind: String,
        /// The target: syscall number, IDT vector (32..=255), CPU or PID.
        arg: Option<String>,
    },
    /// Print the libvirt domain XML of a monitored VM (`virsh define` it,
    /// register the domain with the daemon, `virsh start` it).
    Xml(XmlArgs),
}

#[derive(clap::Args)]
pub struct XmlArgs {
    /// Domain name.
    pub name: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    pub mem_mib: u64,
    /// Number of vCPUs (the mailbox device gets 1 + N MSI-X vectors).
    #[arg(long, default_value_t = 2)]
    pub smp: u32,
    /// CPU model (default qemu64).
    #[arg(long)]
    pub cpu: Option<String>,
    /// `qemu` (TCG) or `kvm` (needs KVM with SMM: `host-injector doctor`).
    #[arg(long, default_value = "qemu")]
    pub domain_type: String,
    /// The daemon's ivshmem socket for this VM (default /run/smmvmi/NAME.ivshmem).
    #[arg(long)]
    pub ivshmem_socket: Option<std::path::PathBuf>,
    /// The agent key file, 32 bytes (default /var/lib/smmvmi/NAME.key). It
    /// must exist: it is packaged as a launch secret table next to it
    /// (NAME.secret, mode 0600) that the domain loads into the firmware's
    /// SEV launch secret area.
    #[arg(long)]
    pub key: Option<std::path::PathBuf>,
    /// INSECURE, test setups only: hand the raw key over fw_cfg
    /// (opt/smmvmi/key), which guest root can read, instead of the launch
    /// secret area.
    #[arg(long)]
    pub insecure_fw_cfg_key: bool,
    /// Serial console log file (default: a pty).
    #[arg(long)]
    pub serial_log: Option<std::path::PathBuf>,
    /// Firmware debug console log file (default: none).
    #[arg(long)]
    pub debugcon_log: Option<std::path::PathBuf>,
    /// Kernel package of the guest image (built and cached in .cache/guest).
    #[arg(long, value_name = "NAME|PATH", default_value = guest_image::DEFAULT_KERNEL_DEB)]
    pub kernel_deb: KernelDeb,
    /// Extra kernel command line.
    #[arg(long)]
    pub append: Option<String>,
}

/// A VM's name, as a position or with --name.
#[derive(clap::Args)]
pub struct NameArg {
    /// VM name (state in .cache/vms/NAME).
    #[arg(value_name = "NAME", required_unless_present = "name_opt")]
    name: Option<String>,
    /// The same, as an option.
    #[arg(long = "name", value_name = "NAME", conflicts_with = "name")]
    name_opt: Option<String>,
}

impl NameArg {
    fn get(&self) -> String {
        self.name
            .clone()
            .or_else(|| self.name_opt.clone())
            .expect("clap requires a name")
    }
}

#[derive(clap::Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub vm: NameArg,
    /// Guest memory (QEMU -m syntax: 512M, 1G, 5G).
    #[arg(long, default_value = "1G")]
    pub mem: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 2)]
    pub smp: u32,
    /// QEMU CPU model (default qemu64; `max,+la57` for 5-level paging).
    #[arg(long)]
    pub cpu: Option<String>,
    /// Kernel package name (apt-get download) or path to a local .deb.
    #[arg(long, value_name = "NAME|PATH", default_value = guest_image::DEFAULT_KERNEL_DEB)]
    pub kernel_deb: KernelDeb,
    /// Firmware to boot.
    #[arg(long, value_enum, default_value_t)]
    pub firmware: FirmwareChoice,
    /// Extra kernel command line.
    #[arg(long)]
    pub append: Option<String>,
    /// QEMU to run: `stock` (Debian's, or $SMMVMI_QEMU), `patched` (built
    /// with patches-qemu/ by `cargo xtask qemu-patched`, cached) or a path.
    #[arg(long, value_name = "stock|patched|PATH", default_value = "stock")]
    pub qemu: String,
    /// Seconds to wait for the guest's ready marker.
    #[arg(long, default_value_t = 120)]
    pub boot_timeout: u64,
    /// Boot with `ivshmem-plain` over the mailbox file and no daemon (the
    /// endpoint is then the direct one). By default the VM is served by the
    /// host-injector daemon (started if none answers on
    /// .cache/injector/injector.sock) through `ivshmem-doorbell`.
    #[arg(long)]
    pub direct: bool,
    /// Start an SEV guest (KVM, `sev-guest` with `kernel-hashes=on`, the
    /// firmware as read-only pflash, the key as a launch secret). Checks the
    /// host first and stops naming what is missing (KVM SMM, /dev/sev, the
    /// kvm_amd sev parameter), with the QEMU arguments it would have used.
    #[arg(long)]
    pub sev: bool,
    /// `monitored` (our firmware and agent) or `ids`: an IDS VM (SeaBIOS,
    /// `ids` inside, the keys of the `--monitor` VMs under /etc/smmvmi/)
    /// that reaches the daemon over virtio-vsock via vhost-device-vsock;
    /// inside it, `ids --connect vsock:2:7070#VM,key=/etc/smmvmi/VM.key`.
    #[arg(long, value_enum, default_value = "monitored")]
    pub role: Role,
    /// With `--role ids`: a monitored VM (started with `vm up`) it watches; repeatable.
    #[arg(long = "monitor", value_name = "VM")]
    pub monitor: Vec<String>,
}

/// What a VM started by `vm up` is.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Role {
    /// A guest with the smmvmi firmware, served by the daemon.
    Monitored,
    /// The IDS's own VM.
    Ids,
}

#[derive(clap::Args)]
pub struct ExecArgs {
    #[command(flatten)]
    pub vm: NameArg,
    /// Seconds to wait for the command.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// The shell command (joined with spaces, run by sh in the guest).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Up(args) => up(args),
        Command::Exec(args) => {
            let vm = Vm::attach(&args.vm.get())?;
            let out =
                vm.exec_timeout(&args.command.join(" "), Duration::from_secs(args.timeout))?;
            print!("{}", out.stdout);
            eprint!("{}", out.stderr);
            std::process::exit(out.status);
        }
        Command::Attack { name, kind, arg } => {
            let vm = Vm::attach(&name)?;
            if kind == "remove" {
                smmvmi_tests::attack::unload(&vm)?;
                crate::step(&format!("attack module removed from {name}"));
                return Ok(());
            }
            let attack =
                smmvmi_tests::attack::Attack::parse(&kind, arg.as_deref().unwrap_or_default())?;
            crate::step(&format!(
                "loading {attack:?} into {name} (builds the module for its kernel on first use)"
            ));
            smmvmi_tests::attack::load(&vm, &attack)?;
            crate::step(&format!(
                "{kind} active in {name}; `cargo xtask vm attack {name} remove` undoes it"
            ));
            Ok(())
        }
        Command::Down(vm) => {
            let name = vm.get();
            down(&name)?;
            Ok(())
        }
        Command::Xml(args) => xml(args),
        Command::List { json } => list(json),
        Command::Rm { vm, force } => rm(&vm.get(), force),
        Command::Prune => {
            let mut removed = 0;
            for (info, alive) in Vm::list() {
                if !alive {
                    std::fs::remove_dir_all(&info.state_dir)
                        .with_context(|| format!("removing {}", info.state_dir.display()))?;
                    crate::step(&format!(
                        "removed VM {} ({})",
                        info.name,
                        info.state_dir.display()
                    ));
                    removed += 1;
                }
            }
            crate::step(&format!("{removed} stopped VM(s) removed"));
            Ok(())
        }
    }
}

/// Stops a VM; one that is not running is already down.
fn down(name: &str) -> anyhow::Result<()> {
    match Vm::attach(name) {
        Ok(vm) => {
            vm.down()?;
            crate::step(&format!("VM {name} stopped"));
        }
        Err(VmError::NotRunning { .. }) => crate::step(&format!("VM {name} is not running")),
        Err(e) => return Err(e.into()),
    }
    if smmvmi_tests::ids_vm::stop_detached_backend(name) {
        crate::step("its vhost-device-vsock stopped");
    }
    Ok(())
}

fn rm(name: &str, force: bool) -> anyhow::Result<()> {
    let dir = smmvmi_tests::vm::vms_dir().join(name);
    match Vm::attach(name) {
        Ok(vm) if force => {
            vm.down()?;
            crate::step(&format!("VM {name} stopped"));
        }
        Ok(_) => anyhow::bail!(
            "VM {name} is running: stop it first (`cargo xtask vm down {name}`) or use `vm rm --force {name}`"
        ),
        Err(VmError::NotRunning { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    crate::step(&format!("removed VM {name} ({})", dir.display()));
    Ok(())
}

fn list(json: bool) -> anyhow::Result<()> {
    let vms = Vm::list();
    if json {
        let rows: Vec<serde_json::Value> = vms
            .iter()
            .map(|(info, alive)| {
                let mut v = info.summary_json();
                v["running"] = (*alive).into();
                v["firmware"] = info.firmware.clone().into();
                v["mem"] = info.mem.clone().into();
                v["smp"] = info.smp.into();
                if !alive {
                    v["pid"] = serde_json::Value::Null;
                }
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if vms.is_empty() {
        eprintln!(
            "no VMs (state lives in {})",
            smmvmi_tests::vm::vms_dir().display()
        );
        return Ok(());
    }
    println!(
        "{:<24} {:>8} {:<8} {:<6} {:>4} {:<8} STATE DIR",
        "NAME", "PID", "FIRMWARE", "MEM", "SMP", "STATE"
    );
    for (info, alive) in vms {
        println!(
            "{:<24} {:>8} {:<8} {:<6} {:>4} {:<8} {}",
            info.name,
            if alive {
                info.pid.to_string()
            } else {
                "-".into()
            },
            info.firmware,
            info.mem,
            info.smp,
            if alive { "running" } else { "stopped" },
            info.state_dir.display()
        );
    }
    Ok(())
}

/// The QEMU arguments of an SEV guest (plain SEV; QEMU 7.2
/// `target/i386/sev.c`, `docs/system/i386/amd-memory-encryption.rst`): SEV
/// encrypts and measures the firmware only as pflash (`pc_system_flash_map`
/// calls `sev_encrypt_flash`), and `kernel-hashes=on` fills the hashes area
/// the image names. `cbitpos`/`reduced-phys-bits` are host facts (CPUID
/// 0x8000001F on the host); 51/1 are those of EPYC Milan/Genoa.
fn sev_qemu_args(firmware: &std::path::Path) -> Vec<String> {
    [
        "-accel",
        "kvm",
        "-machine",
        "q35,smm=on,confidential-guest-support=sev0",
        "-object",
        "sev-guest,id=sev0,policy=0x1,cbitpos=51,reduced-phys-bits=1,kernel-hashes=on",
    ]
    .into_iter()
    .map(String::from)
    .chain([
        "-drive".into(),
        format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={}",
            firmware.display()
        ),
    ])
    .collect()
}

fn up(args: UpArgs) -> anyhow::Result<()> {
    let name = args.vm.get();
    if let Role::Ids = args.role {
        return up_ids(&name, &args);
    }
    anyhow::ensure!(
        args.monitor.is_empty(),
        "--monitor goes with --role ids (an IDS VM names the VMs it watches)"
    );
    if args.sev {
        let missing = host_injector::doctor::sev_missing();
        let fw = crate::firmware::build(&crate::root())?;
        let qemu_args = sev_qemu_args(&fw).join(" ");
        anyhow::ensure!(
            missing.is_empty(),
            "cannot start an SEV guest on this host: missing {}. \
             (QEMU arguments it would use: {qemu_args}; provision the key with \
             `cargo xtask measure`, query-sev-launch-measure, sev-inject-launch-secret)",
            missing.join("; ")
        );
        anyhow::bail!(
            "this host has what SEV needs, but `vm up --sev` is not implemented past the host check \
             (never run on SEV hardware); QEMU arguments it would use: {qemu_args}"
        );
    }
    let image = crate::guest_image::build(&args.kernel_deb)?;
    crate::step(&format!("firmware: {:?}", args.firmware));
    let firmware = args.firmware.resolve()?;
    let mut config = VmConfig::new(&name, firmware)
        .mem(&args.mem)
        .smp(args.smp)
        .boot_timeout(Duration::from_secs(args.boot_timeout));
    config.guest = Some(image);
    match args.qemu.as_str() {
        "stock" => {}
        "patched" => {
            let path = crate::qemu_patched::build(&crate::root(), 2, false)?;
            crate::step(&format!("QEMU: {}", path.display()));
            config = config.qemu(path);
        }
        path => {
            anyhow::ensure!(
                std::path::Path::new(path).is_file(),
                "--qemu {path}: expected `stock`, `patched` or the path of a qemu-system-x86_64 binary"
            );
            config = config.qemu(path);
        }
    }
    if let Some(cpu) = args.cpu {
        config = config.cpu(cpu);
    }
    if let Some(append) = args.append {
        config = config.append(append);
    }
    if !args.direct {
        let socket = smmvmi_tests::daemon::ensure_default()?;
        crate::step(&format!("host-injector daemon on {}", socket.display()));
        config = config.through_daemon(socket);
    }
    crate::step(&format!(
        "starting VM {} ({} RAM, {} vCPUs)",
        name, args.mem, args.smp
    ));
    let vm = Vm::up_detached(config).with_context(|| format!("starting VM {name}"))?;
    if let Some(t) = vm.boot_time() {
        crate::step(&format!("guest ready after {:.2} s", t.as_secs_f64()));
    }
    println!("{}", vm.info().summary_json());
    Ok(())
}

/// `vm up --role ids`: an IDS VM for the `--monitor` VMs, through the
/// per-checkout daemon's vhost-device-vsock socket.
fn up_ids(name: &str, args: &UpArgs) -> anyhow::Result<()> {
    use smmvmi_tests::ids_vm::{DAEMON_VSOCK_PORT, IdsVm, IdsVmConfig, daemon_vsock_uds};
    anyhow::ensure!(
        !args.monitor.is_empty(),
        "--role ids needs at least one --monitor VM (start it first with `cargo xtask vm up NAME`)"
    );
    let mut monitored = Vec::new();
    for m in &args.monitor {
        let vm = Vm::attach(m).with_context(|| format!("--monitor {m}"))?;
        anyhow::ensure!(
            vm.info().daemon.is_some(),
            "--monitor {m}: that VM was started with --direct; an IDS VM reaches VMs through the daemon only"
        );
        monitored.push(vm.info().clone());
    }
    let socket = smmvmi_tests::daemon::ensure_default()?;
    let uds = daemon_vsock_uds();
    let listener = format!("{}_{DAEMON_VSOCK_PORT}", uds.display());
    anyhow::ensure!(
        std::path::Path::new(&listener).exists(),
        "the daemon on {} does not listen for vhost-device-vsock ({listener} is missing): it was started without --vhost-vsock-uds. Stop it (`pkill -f 'host-injector serve'`) and run this again: it is restarted with it",
        socket.display()
    );
    crate::step(&format!(
        "IDS VM {name} for {} (vsock to the daemon through {listener})",
        args.monitor.join(", ")
    ));
    let mut config = IdsVmConfig::new(name, monitored, uds);
    config.detached = true;
    config.network = true;
    config.mem = args.mem.clone();
    let vm = IdsVm::up(config).with_context(|| format!("starting IDS VM {name}"))?;
    let info = vm.detach();
    let mut out = info.summary_json();
    // Its own mailbox endpoints mean nothing: the IDS VM has no agent.
    if let Some(o) = out.as_object_mut() {
        for k in ["endpoint", "direct_endpoint", "mailbox"] {
            o.remove(k);
        }
    }
    out["role"] = "ids".into();
    out["endpoints"] = args
        .monitor
        .iter()
        .map(|m| IdsVm::endpoint_of(m))
        .collect::<Vec<_>>()
        .into();
    crate::step(&format!(
        "inside it: cargo xtask vm exec {name} -- ids --connect '{}' ps",
        IdsVm::endpoint_of(&args.monitor[0])
    ));
    println!("{out}");
    Ok(())
}

fn xml(args: XmlArgs) -> anyhow::Result<()> {
    use smmvmi_tests::libvirt::{DomainXml, KeyDelivery};
    let image = crate::guest_image::build(&args.kernel_deb)?;
    let firmware = match crate::FirmwareChoice::Ours.resolve()? {
        smmvmi_tests::vm::Firmware::Ours(p) => p,
        other => anyhow::bail!(
            "expected the smmvmi firmware image, found {}",
            other.label()
        ),
    };
    let run = std::path::Path::new("/run/smmvmi");
    let key_file = args
        .key
        .unwrap_or_else(|| format!("/var/lib/smmvmi/{}.key", args.name).into());
    let key = if args.insecure_fw_cfg_key {
        eprintln!(
            "warning: the key goes through fw_cfg: INSECURE, guest root can read it (test setups only)"
        );
        KeyDelivery::InsecureFwCfg { key: key_file }
    } else {
        let secret = smmvmi_tests::sev::areas(&firmware)?.0.with_context(|| {
            format!(
                "{} names no SEV launch secret area: rebuild it (cargo xtask build)",
                firmware.display()
            )
        })?;
        let table = key_file.with_extension("secret");
        smmvmi_tests::sev::write_key_secret(&key_file, &table).with_context(|| {
            format!(
                "create the key first: head -c 32 /dev/urandom > {}",
                key_file.display()
            )
        })?;
        eprintln!(
            "key packaged as a launch secret table in {} (loaded at {:#x})",
            table.display(),
            secret.base
        );
        KeyDelivery::LaunchSecret {
            table,
            addr: secret.base.into(),
        }
    };
    let mut x = DomainXml::new(
        &args.name,
        firmware,
        image.kernel,
        image.initrd,
        key,
        args.ivshmem_socket
            .unwrap_or_else(|| run.join(format!("{}.ivshmem", args.name))),
    );
    x.mem_mib = args.mem_mib;
    x.vcpus = args.smp;
    x.cpu = args.cpu;
    x.domain_type = args.domain_type;
    x.serial_log = args.serial_log;
    x.debugcon_log = args.debugcon_log;
    if let Some(a) = args.append {
        x.cmdline.push(' ');
        x.cmdline.push_str(&a);
    }
    print!("{}", x.xml());
    Ok(())
}
