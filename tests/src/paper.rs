//! The published comparison's topology, shared by `cargo xtask bench
//! paper` and the end-to-end test of the baselines: a monitored VM (our
//! firmware, served by its own host-injector daemon through the doorbell;
//! RAM in a shared file; a user-mode network card with host port forwards
//! to the in-guest baselines), the raw-host baseline on the host, and an
//! IDS VM (SeaBIOS; `ids`, `smmvmi-paper` and the key inside; vsock to the
//! daemon; user-mode network to the host). See [`crate::baseline`].
//!
//! On a host with at least two CPUs the monitored VM's QEMU is pinned to
//! CPU 0 and everything else (IDS VM, vsock backend, daemon, raw-host) to
//! CPU 1, so that the IDS's own work does not count as the monitored VM's
//! slowdown.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;

use crate::daemon::DaemonProcess;
use crate::guest_image::GuestImage;
use crate::ids_vm::{self, IdsVm, IdsVmConfig, KEYS_DIR};
use crate::vm::{Firmware, Vm, VmConfig};

/// Guest RAM of the monitored VM (all below 4 GiB on q35).
pub const MON_MEM: &str = "1G";
const MON_MEM_BYTES: u64 = 1 << 30;
const SEED_PORT: u16 = 7001;
const IN_OS_PORT: u16 = 7002;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` in `vm`; its trimmed stdout, or an error with its stderr.
pub fn sh(vm: &Vm, cmd: &str, timeout: Duration) -> Result<String, BoxError> {
    let out = vm.exec_timeout(cmd, timeout)?;
    if out.status != 0 {
        return Err(format!(
            "`{cmd}` in {} exited {}: {}",
            vm.name(),
            out.status,
            out.stderr.trim()
        )
        .into());
    }
    Ok(out.stdout.trim().to_string())
}

/// Pins every thread of process `pid` to `cpu` (`taskset -a -p -c`);
/// a host with one CPU is left alone.
fn pin(pid: u32, cpu: u32) {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return;
    }
    let _ = Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The running topology. Dropping it stops everything.
pub struct Topology {
    // Drop order: IDS VM, raw-host, monitored VM, daemon.
    ids: IdsVm,
    _raw: KillOnDrop,
    mon: Vm,
    _daemon: DaemonProcess,
    seed_port: u16,
    in_os_port: u16,
    raw_port: u16,
    /// Where the logs and the RAM file are.
    pub dir: PathBuf,
}

impl Topology {
    /// Starts everything under `dir` (names carry `prefix`): `paper` is the
    /// `smmvmi-paper` binary, `base` the guest image.
    pub fn up(
        prefix: &str,
        dir: &Path,
        firmware: Firmware,
        base: &GuestImage,
        paper: &Path,
    ) -> Result<Self, BoxError> {
        std::fs::create_dir_all(dir)?;
        let uds = dir.join("vsock.sock");
        let daemon = DaemonProcess::spawn(
            &dir.join("injector.sock"),
            &["--vhost-vsock-uds", &uds.to_string_lossy()],
            false,
        )?;

        let (seed_port, in_os_port) = (free_port()?, free_port()?);
        let overlay = dir.join("mon-initramfs.cpio.gz");
        ids_vm::overlay_initrd(&base.initrd, &[paper], &[], &overlay)?;
        let ram_file = dir.join("guest-ram");
        let mut cfg = VmConfig::new(format!("{prefix}-mon"), firmware)
            .mem(MON_MEM)
            .through_daemon(&daemon.socket);
        cfg.guest = Some(GuestImage {
            initrd: overlay,
            ..base.clone()
        });
        for a in [
            "-object".to_string(),
            format!(
                "memory-backend-file,id=ram0,size={MON_MEM},mem-path={},share=on",
                ram_file.display()
            ),
            "-machine".into(),
            "memory-backend=ram0".into(),
            "-netdev".into(),
            format!(
                "user,id=net0,hostfwd=tcp:127.0.0.1:{seed_port}-:{SEED_PORT},hostfwd=tcp:127.0.0.1:{in_os_port}-:{IN_OS_PORT}"
            ),
            "-device".into(),
            "virtio-net-pci,netdev=net0".into(),
        ] {
            cfg = cfg.extra_arg(a);
        }
        let mon = Vm::up(cfg)?;
        mon.wait_agent_ready(Duration::from_secs(30))?;
        ids_vm::bring_up_network(&mon)?;
        // The baselines in the monitored VM. The in-OS agent holds the key
        // in guest memory: that is the design's weakness, not the harness's.
        let key = std::fs::read(&mon.info().key)?;
        let key_b64 = base64::engine::general_purpose::STANDARD.encode(&key);
        sh(
            &mon,
            &format!(
                "echo {key_b64} | base64 -d >/tmp/agent.key; \
                 smmvmi-paper seed-proxy --listen 0.0.0.0:{SEED_PORT} </dev/null >/tmp/seed.log 2>&1 & \
                 smmvmi-paper in-os-agent --listen 0.0.0.0:{IN_OS_PORT} --key /tmp/agent.key </dev/null >/tmp/in-os.log 2>&1 &"
            ),
            Duration::from_secs(30),
        )?;

        let raw_port = free_port()?;
        let raw_log = std::fs::File::create(dir.join("raw-host.log"))?;
        let mut cmd = Command::new(paper);
        crate::vm::die_with_parent(&mut cmd);
        let raw = KillOnDrop(
            cmd.args(["raw-host", "--listen"])
                .arg(format!("0.0.0.0:{raw_port}"))
                .arg("--key")
                .arg(&mon.info().key)
                .arg("--ram-file")
                .arg(&ram_file)
                .arg("--low-mem")
                .arg(MON_MEM_BYTES.to_string())
                .arg("--cpus-from")
                .arg(mon.info().endpoint())
                .stdin(Stdio::null())
                .stdout(raw_log.try_clone()?)
                .stderr(raw_log)
                .spawn()?,
        );

        let mut ids_cfg = IdsVmConfig::new(
            format!("{prefix}-ids"),
            vec![mon.info().clone()],
            uds.clone(),
        );
        ids_cfg.binaries = vec![paper.to_path_buf()];
        ids_cfg.network = true;
        let ids = IdsVm::up(ids_cfg)?;

        pin(mon.info().pid, 0);
        for p in [ids.vm().info().pid, raw.0.id()]
            .into_iter()
            .chain(daemon.pid())
            .chain(ids.backend_pid())
        {
            pin(p, 1);
        }
        Ok(Self {
            ids,
            _raw: raw,
            mon,
            _daemon: daemon,
            seed_port,
            in_os_port,
            raw_port,
            dir: dir.to_path_buf(),
        })
    }

    /// The monitored VM.
    pub fn mon(&self) -> &Vm {
        &self.mon
    }

    /// The IDS VM.
    pub fn ids(&self) -> &Vm {
        self.ids.vm()
    }

    /// What `smmvmi-paper --connect` takes for `design`, from the IDS VM.
    pub fn connect(&self, design: &str) -> String {
        match design {
            "proxyless" => IdsVm::endpoint_of(self.mon.name()),
            "seed-proxy" => format!("tcp:10.0.2.2:{}", self.seed_port),
            "in-os-agent" => format!("tcp:10.0.2.2:{}", self.in_os_port),
            _ => format!("tcp:10.0.2.2:{}", self.raw_port),
        }
    }

    /// The key's path inside the IDS VM.
    pub fn key_in_ids(&self) -> String {
        format!("{KEYS_DIR}/{}.key", self.mon.name())
    }

    /// The baseline processes' last log lines (for error messages).
    pub fn logs(&self) -> String {
        let guest = sh(
            &self.mon,
            "tail -n 5 /tmp/seed.log /tmp/in-os.log; true",
            Duration::from_secs(30),
        )
        .unwrap_or_default();
        format!(
            "{guest}\n==> raw-host <==\n{}",
            crate::tail_file(&self.dir.join("raw-host.log"), 5)
        )
    }

    /// `smmvmi-paper client` for `design` in the IDS VM: its JSON object.
    pub fn client(
        &self,
        design: &str,
        reads: usize,
        ps_runs: usize,
        bulk_mib: usize,
    ) -> Result<serde_json::Value, BoxError> {
        let out = sh(
            self.ids(),
            &format!(
                "smmvmi-paper client --design {design} --connect '{}' --key {} \
                 --reads {reads} --ps-runs {ps_runs} --bulk-mib {bulk_mib}",
                self.connect(design),
                self.key_in_ids(),
            ),
            Duration::from_secs(900),
        )
        .map_err(|e| format!("{design}: {e}\nbaseline logs:\n{}", self.logs()))?;
        Ok(serde_json::from_str(out.lines().last().unwrap_or(""))
            .map_err(|e| format!("{design}: client printed {out:?}: {e}"))?)
    }

    /// Stops the monitored VM cleanly (the rest goes on drop).
    pub fn down(self) -> Result<(), BoxError> {
        let Self { ids, mon, .. } = self;
        drop(ids);
        mon.down()?;
        Ok(())
    }
}
