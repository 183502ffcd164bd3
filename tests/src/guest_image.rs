//! The guest image: Debian's cloud kernel plus a busybox initramfs with the
//! project's guest-side test programs.
//!
//! Inputs: a kernel package (`apt-get download`, pinned to
//! [`DEFAULT_KERNEL_DEB`], or a local `.deb`), the host's static busybox, the
//! C sources and scripts under `tests/guest/`. Output, cached under
//! `<repo>/.cache/guest/<hash of inputs>/`: `vmlinuz`, `initramfs.cpio.gz`,
//! `manifest.json`. Nothing is rebuilt while the inputs stay the same.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::cpio::Archive;
use crate::host::{self, HostError};

/// The pinned guest kernel package.
/// The default guest kernel: Debian 12's cloud kernel metapackage, resolved
/// to the ABI package it depends on today (`apt-cache depends`) and cached
/// in `.cache/debs/` (a pinned ABI package leaves the archive some weeks
/// after the next security update; a fresh machine must still find one).
/// Pin an ABI package with `--kernel-deb linux-image-6.1.0-NN-cloud-amd64`.
pub const DEFAULT_KERNEL_DEB: &str = "linux-image-cloud-amd64";

/// The line `/init` prints on ttyS0 once the command server is up.
pub const READY_MARKER: &str = "SMMVMI-GUEST-READY";

/// Modules loaded by `/init`, in this order (see shared/notes/guest-kernel.md:
/// the package has no modules.dep, so busybox insmod needs dependencies first).
pub const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "failover",
    "net_failover",
    "virtio_net",
];

/// Modules packed into the image but loaded only when the kernel command
/// line says `smmvmi.acpi` ([`ACPI_CMDLINE_FLAG`]): the ACPI power button
/// and the input events busybox `acpid` reads, so that the guest powers off
/// on an ACPI power-button press, as a distribution guest does (libvirt's
/// `virsh shutdown` and `virsh reboot` press it).
pub const ACPI_MODULES: &[&str] = &["evdev", "button"];

/// Kernel command-line word that makes `/init` load [`ACPI_MODULES`] and
/// start `acpid` (power button: `poweroff -f`).
pub const ACPI_CMDLINE_FLAG: &str = "smmvmi.acpi";

/// Flags for the guest programs (also used by host-side ground-truth tests).
pub const GUEST_CFLAGS: &[&str] = &["-static", "-O2", "-Wall", "-ffp-contract=off"];

const INIT_SH: &str = include_str!("../guest/init.sh");
const CMDD_SH: &str = include_str!("../guest/cmdd.sh");
/// Guest programs: (installed name, C source).
const PROGRAMS: &[(&str, &str)] = &[
    ("smi", include_str!("../guest/smi.c")),
    ("cpuburn", include_str!("../guest/cpuburn.c")),
    ("threads", include_str!("../guest/threads.c")),
    ("fwcfg", include_str!("../guest/fwcfg.c")),
];
/// Bump when the image layout changes in a way the inputs do not show.
const BUILDER_VERSION: &str = "guest-image v2 (compressed modules unpacked)";

/// Errors while building the guest image.
#[derive(Debug, thiserror::Error)]
pub enum GuestImageError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(
        "`{command}` failed: {detail}\n\
         (expected it to succeed; check the package name / network to the Debian mirror, \
         or pass a local file with --kernel-deb PATH)"
    )]
    Tool { command: String, detail: String },
    #[error(
        "kernel package {deb} contains no boot/vmlinuz-*; expected a Debian linux-image package"
    )]
    NoKernel { deb: String },
    #[error("--kernel-deb {0}: file does not exist (expected a package name or a path to a .deb)")]
    NoSuchDeb(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> GuestImageError {
    let what = what.into();
    move |source| GuestImageError::Io { what, source }
}

/// Where the guest kernel comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelDeb {
    /// A Debian package name, fetched with `apt-get download`.
    Package(String),
    /// A local `.deb` file.
    File(PathBuf),
}

impl Default for KernelDeb {
    fn default() -> Self {
        Self::Package(DEFAULT_KERNEL_DEB.to_string())
    }
}

impl FromStr for KernelDeb {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("empty --kernel-deb: expected a package name or a path to a .deb".into());
        }
        if s.contains('/') || s.ends_with(".deb") {
            Ok(Self::File(PathBuf::from(s)))
        } else {
            Ok(Self::Package(s.to_string()))
        }
    }
}

impl std::fmt::Display for KernelDeb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Package(p) => f.write_str(p),
            Self::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A built guest image.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// `uname -r` of the kernel, from its file name.
    pub kernel_release: String,
    pub modules_included: Vec<String>,
    pub modules_missing: Vec<String>,
}

impl GuestImage {
    /// The image named by `$SMMVMI_KERNEL` and `$SMMVMI_INITRD` (set by
    /// `cargo xtask test`), if both are set.
    pub fn from_env() -> Option<Self> {
        let kernel = PathBuf::from(std::env::var_os("SMMVMI_KERNEL")?);
        let initrd = PathBuf::from(std::env::var_os("SMMVMI_INITRD")?);
        Some(Self {
            kernel,
            initrd,
            kernel_release: String::new(),
            modules_included: Vec::new(),
            modules_missing: Vec::new(),
        })
    }
}

static BUILD_LOCK: Mutex<()> = Mutex::new(());

/// Builds (or finds in the cache) the guest image for `deb`.
pub fn build(
    root: &Path,
    deb: &KernelDeb,
    log: &mut dyn FnMut(&str),
) -> Result<GuestImage, GuestImageError> {
    let _guard = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    host::ensure_packages(log)?;
    let cache = root.join(".cache");
    let deb_path = resolve_deb(&cache, deb, log)?;
    let busybox = Path::new("/bin/busybox");

    let mut h = Sha256::new();
    h.update(BUILDER_VERSION);
    for path in [deb_path.as_path(), busybox] {
        let meta = std::fs::metadata(path).map_err(io(format!("stat {}", path.display())))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        h.update(format!("{}|{}|{:?}\n", path.display(), meta.len(), mtime));
    }
    for text in [
        INIT_SH,
        CMDD_SH,
        READY_MARKER,
        &MODULES.join(","),
        &ACPI_MODULES.join(","),
        &GUEST_CFLAGS.join(" "),
    ] {
        h.update(text);
        h.update([0]);
    }
    for (name, src) in PROGRAMS {
        h.update(name);
        h.update(src);
    }
    let key: String = h
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    let out = cache.join("guest").join(&key);
    let manifest = out.join("manifest.json");
    if let Ok(text) = std::fs::read_to_string(&manifest)
        && let Ok(image) = serde_json::from_str::<GuestImage>(&text)
    {
        return Ok(image);
    }

    log(&format!(
        "building guest image {key} from {}",
        deb_path.display()
    ));
    let work = cache
        .join("guest")
        .join(format!("{key}.tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let extracted = work.join("deb");
    std::fs::create_dir_all(&extracted).map_err(io(format!("create {}", extracted.display())))?;
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb_path)
        .arg(&extracted))?;

    let boot = extracted.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .map_err(|_| GuestImageError::NoKernel {
            deb: deb_path.display().to_string(),
        })?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .ok_or_else(|| GuestImageError::NoKernel {
            deb: deb_path.display().to_string(),
        })?;
    let release =
        vmlinuz.file_name().and_then(|n| n.to_str()).unwrap_or("")["vmlinuz-".len()..].to_string();

    let mut archive = Archive::new();
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "root", "etc",
    ] {
        archive.dir(d);
    }
    archive.char_device("dev/console", 0o600, 5, 1);
    archive.char_device("dev/null", 0o666, 1, 3);
    let bb = std::fs::read(busybox).map_err(io("read /bin/busybox"))?;
    archive.file("bin/busybox", 0o755, &bb);
    let list = Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(io("busybox --list-full"))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim().trim_start_matches('/');
        if applet.is_empty() || applet == "bin/busybox" || applet.contains("..") {
            continue;
        }
        archive.symlink(applet, "/bin/busybox");
    }
    let init = INIT_SH
        .replace("@MODULES@", &MODULES.join(" "))
        .replace("@ACPI_MODULES@", &ACPI_MODULES.join(" "))
        .replace("@ACPI_FLAG@", ACPI_CMDLINE_FLAG)
        .replace("@READY@", READY_MARKER);
    archive.file("init", 0o755, init.as_bytes());
    archive.file("usr/sbin/smmvmi-cmdd", 0o755, CMDD_SH.as_bytes());
    archive.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n");

    let src_dir = work.join("src");
    std::fs::create_dir_all(&src_dir).map_err(io("create source dir"))?;
    for (name, src) in PROGRAMS {
        let c = src_dir.join(format!("{name}.c"));
        std::fs::write(&c, src).map_err(io(format!("write {}", c.display())))?;
        let bin = src_dir.join(name);
        run(Command::new("gcc")
            .args(GUEST_CFLAGS)
            .arg("-o")
            .arg(&bin)
            .arg(&c))?;
        let bytes = std::fs::read(&bin).map_err(io(format!("read {}", bin.display())))?;
        archive.file(&format!("usr/bin/{name}"), 0o755, &bytes);
    }

    let modules_root = extracted.join("lib/modules").join(&release);
    let mut found = Vec::new();
    find_files(&modules_root, &mut found);
    let (mut included, mut missing) = (Vec::new(), Vec::new());
    for m in MODULES.iter().chain(ACPI_MODULES) {
        let want = format!("{m}.ko");
        // Debian ships 6.1's modules plain and 6.12's compressed; busybox
        // insmod takes plain ELF only, so compressed ones are unpacked here.
        let hit = found.iter().find_map(|p| {
            let n = p.file_name()?.to_str()?;
            let how = n.strip_prefix(want.as_str())?;
            matches!(how, "" | ".xz" | ".zst").then(|| (p, how))
        });
        match hit {
            Some((p, how)) => {
                let bytes = match how {
                    "" => std::fs::read(p).map_err(io(format!("read {}", p.display())))?,
                    ".xz" => decompress(Command::new("xz").arg("-dc").arg(p))?,
                    _ => decompress(Command::new("zstd").arg("-dcq").arg(p))?,
                };
                archive.file(&format!("lib/modules/{want}"), 0o644, &bytes);
                included.push(m.to_string());
            }
            None => missing.push(m.to_string()),
        }
    }
    if !missing.is_empty() {
        log(&format!(
            "modules not in the package (init will skip them): {}",
            missing.join(" ")
        ));
    }

    let cpio_path = work.join("initramfs.cpio");
    std::fs::write(&cpio_path, archive.finish()).map_err(io("write initramfs.cpio"))?;
    run(Command::new("gzip")
        .args(["-n", "-6", "-f"])
        .arg(&cpio_path))?;
    std::fs::copy(&vmlinuz, work.join("vmlinuz")).map_err(io("copy vmlinuz"))?;
    let _ = std::fs::remove_dir_all(&extracted);
    let _ = std::fs::remove_dir_all(&src_dir);

    let image = GuestImage {
        kernel: out.join("vmlinuz"),
        initrd: out.join("initramfs.cpio.gz"),
        kernel_release: release,
        modules_included: included,
        modules_missing: missing,
    };
    let json = serde_json::to_string_pretty(&image).expect("serializable");
    std::fs::write(work.join("manifest.json"), json).map_err(io("write manifest.json"))?;
    let _ = std::fs::remove_dir_all(&out);
    std::fs::rename(&work, &out).map_err(io(format!("move image to {}", out.display())))?;
    log(&format!("guest image ready: {}", out.display()));
    Ok(image)
}

/// Finds the `.deb` for `deb`, downloading a package into `.cache/debs/`.
fn resolve_deb(
    cache: &Path,
    deb: &KernelDeb,
    log: &mut dyn FnMut(&str),
) -> Result<PathBuf, GuestImageError> {
    let name = match deb {
        KernelDeb::File(p) if p.is_file() => return Ok(p.clone()),
        KernelDeb::File(p) => return Err(GuestImageError::NoSuchDeb(p.display().to_string())),
        KernelDeb::Package(name) => name,
    };
    let dir = cache.join("debs");
    std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
    let resolved;
    let name = if is_metapackage(name) {
        resolved = resolve_metapackage(&dir, name, log)?;
        &resolved
    } else {
        name
    };
    let find = || -> Option<PathBuf> {
        let prefix = format!("{name}_");
        let mut hits: Vec<PathBuf> = std::fs::read_dir(&dir)
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
            })
            .collect();
        hits.sort();
        hits.pop()
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    log(&format!("downloading {name} (apt-get download)"));
    let download = || {
        Command::new("apt-get")
            .args(["-o", "APT::Sandbox::User=root", "download", name])
            .current_dir(&dir)
            .status()
    };
    if !matches!(download(), Ok(s) if s.success()) {
        log("apt-get download failed; running apt-get update and retrying");
        host::run_apt(&["update"], std::slice::from_ref(name))?;
        match download() {
            Ok(s) if s.success() => {}
            other => {
                return Err(GuestImageError::Tool {
                    command: format!("apt-get download {name}"),
                    detail: format!("{other:?}"),
                });
            }
        }
    }
    find().ok_or_else(|| GuestImageError::Tool {
        command: format!("apt-get download {name}"),
        detail: format!(
            "succeeded but no {name}_*.deb appeared in {}",
            dir.display()
        ),
    })
}

/// The debug files of a kernel release, from Debian's
/// `linux-image-RELEASE-dbg` (about 280 MB for the 6.1 cloud kernel).
#[derive(Clone, Debug)]
pub struct DebugKernel {
    /// The `-dbg` package in `.cache/debs/`.
    pub deb: PathBuf,
    /// Its unstripped vmlinux (with DWARF).
    pub vmlinux: PathBuf,
    /// Its System.map (the linux-image package ships only a stub that
    /// points here).
    pub system_map: PathBuf,
}

/// Downloads `linux-image-RELEASE-dbg` into `.cache/debs/` (apt-get
/// download, as the kernel packages) unless it is there, and extracts its
/// vmlinux and System.map into `.cache/debs/RELEASE-dbg/` once.
pub fn debug_kernel(
    release: &str,
    log: &mut dyn FnMut(&str),
) -> Result<DebugKernel, GuestImageError> {
    let cache = crate::cache_dir();
    let package = format!("linux-image-{release}-dbg");
    let deb = resolve_deb(&cache, &KernelDeb::Package(package), log)?;
    let out = cache.join("debs").join(format!("{release}-dbg"));
    let member = |n: &str| format!("./usr/lib/debug/boot/{n}-{release}");
    let vmlinux = out.join(&member("vmlinux")[2..]);
    let system_map = out.join(&member("System.map")[2..]);
    if !(vmlinux.is_file() && system_map.is_file()) {
        log(&format!(
            "extracting vmlinux and System.map from {}",
            deb.display()
        ));
        let tmp = cache
            .join("debs")
            .join(format!("{release}-dbg.tmp{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io(format!("create {}", tmp.display())))?;
        let command = format!("dpkg-deb --fsys-tarfile {} | tar -x", deb.display());
        let tool = |detail: String| GuestImageError::Tool {
            command: command.clone(),
            detail,
        };
        let mut dpkg = Command::new("dpkg-deb")
            .arg("--fsys-tarfile")
            .arg(&deb)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| tool(e.to_string()))?;
        let stdout = dpkg.stdout.take().expect("piped stdout");
        // Both files are near the start of the archive: tar stops once it
        // has them (--occurrence), and dpkg-deb then ends on a closed pipe.
        let tar = Command::new("tar")
            .arg("-x")
            .arg("-C")
            .arg(&tmp)
            .arg("--occurrence=1")
            .arg(member("vmlinux"))
            .arg(member("System.map"))
            .stdin(stdout)
            .status()
            .map_err(|e| tool(e.to_string()))?;
        let _ = dpkg.kill();
        let _ = dpkg.wait();
        if !tar.success() {
            return Err(tool(format!("tar: {tar}")));
        }
        let _ = std::fs::remove_dir_all(&out);
        std::fs::rename(&tmp, &out).map_err(io(format!("rename to {}", out.display())))?;
    }
    for p in [&vmlinux, &system_map] {
        if !p.is_file() {
            return Err(GuestImageError::Tool {
                command: format!("extract {} from {}", p.display(), deb.display()),
                detail: "not in the package: expected a Debian linux-image-*-dbg package".into(),
            });
        }
    }
    Ok(DebugKernel {
        deb,
        vmlinux,
        system_map,
    })
}

fn find_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            find_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// Runs a decompressor and returns its stdout.
fn decompress(cmd: &mut Command) -> Result<Vec<u8>, GuestImageError> {
    let command = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| GuestImageError::Tool {
        command: command.clone(),
        detail: format!("{e} (install xz-utils / zstd)"),
    })?;
    if !out.status.success() || out.stdout.is_empty() {
        return Err(GuestImageError::Tool {
            command,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(out.stdout)
}

/// `linux-image-cloud-amd64`, `linux-image-amd64`, ...: a name with no
/// version after `linux-image-`.
fn is_metapackage(name: &str) -> bool {
    name.strip_prefix("linux-image-")
        .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
}

/// The ABI package a kernel metapackage depends on: what `apt-cache depends`
/// says (after one `apt-get update` if the lists know nothing), remembered
/// in `DIR/NAME.resolved` so that a machine without a network reuses the
/// cached `.deb`.
fn resolve_metapackage(
    dir: &Path,
    meta: &str,
    log: &mut dyn FnMut(&str),
) -> Result<String, GuestImageError> {
    let memo = dir.join(format!("{meta}.resolved"));
    let depends = || -> Option<String> {
        let out = Command::new("apt-cache")
            .args(["depends", meta])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .map(str::trim)
            .find(|d| d.starts_with("linux-image-") && !is_metapackage(d))
            .map(String::from)
    };
    let found = depends().or_else(|| {
        log(&format!(
            "apt-cache knows no {meta}; running apt-get update"
        ));
        host::run_apt(&["update"], &[meta.to_string()]).ok()?;
        depends()
    });
    match found {
        Some(abi) => {
            if std::fs::read_to_string(&memo).ok().as_deref() != Some(abi.as_str()) {
                log(&format!("{meta} resolves to {abi}"));
                let _ = std::fs::write(&memo, &abi);
            }
            Ok(abi)
        }
        None => std::fs::read_to_string(&memo)
            .map(|s| s.trim().to_string())
            .map_err(|_| GuestImageError::Tool {
                command: format!("apt-cache depends {meta}"),
                detail: format!(
                    "no linux-image ABI package found for {meta} and none resolved before: check the Debian archive entry in /etc/apt/sources.list.d, or pin one with --kernel-deb linux-image-6.1.0-NN-cloud-amd64"
                ),
            }),
    }
}

/// Debian 12's 6.12 LTS cloud kernel package: the newest one already in
/// `.cache/debs`, else the newest the archive lists (`apt-cache search`).
pub fn resolve_lts_612() -> Result<KernelDeb, GuestImageError> {
    let is_612 = |n: &str| {
        n.strip_prefix("linux-image-6.12.")
            .and_then(|r| r.strip_suffix("+deb12-cloud-amd64"))
            .is_some_and(|v| v.chars().all(|c| c.is_ascii_digit()))
    };
    let by_version = |a: &String, b: &String| {
        let num = |s: &String| -> u32 {
            s.trim_start_matches("linux-image-6.12.")
                .split('+')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        num(a).cmp(&num(b))
    };
    let dir = crate::repo_root().join(".cache").join("debs");
    let mut cached: Vec<String> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.to_string();
            let pkg = n.split('_').next()?.to_string();
            (n.ends_with(".deb") && is_612(&pkg)).then_some(pkg)
        })
        .collect();
    cached.sort_by(by_version);
    if let Some(p) = cached.pop() {
        return Ok(KernelDeb::Package(p));
    }
    let out = Command::new("apt-cache")
        .args([
            "search",
            "--names-only",
            "^linux-image-6\\.12\\..*deb12-cloud-amd64$",
        ])
        .output()
        .map_err(io("apt-cache search"))?;
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| is_612(n))
        .map(String::from)
        .collect();
    names.sort_by(by_version);
    names
        .pop()
        .map(KernelDeb::Package)
        .ok_or(GuestImageError::Tool {
            command: "apt-cache search linux-image-6.12.*+deb12-cloud-amd64".into(),
            detail: "no such package: run apt-get update (Debian 12's main archive carries it)"
                .into(),
        })
}

fn run(cmd: &mut Command) -> Result<(), GuestImageError> {
    let command = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| GuestImageError::Tool {
        command: command.clone(),
        detail: e.to_string(),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(GuestImageError::Tool {
            command,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metapackages_are_told_from_abi_packages() {
        assert!(is_metapackage("linux-image-cloud-amd64"));
        assert!(is_metapackage("linux-image-amd64"));
        assert!(!is_metapackage("linux-image-6.1.0-57-cloud-amd64"));
        assert!(!is_metapackage("linux-image-6.12.48+deb12-cloud-amd64"));
        assert!(!is_metapackage("busybox"));
    }

    #[test]
    fn kernel_deb_parsing() {
        assert_eq!(
            "linux-image-6.1.0-56-cloud-amd64"
                .parse::<KernelDeb>()
                .unwrap(),
            KernelDeb::Package("linux-image-6.1.0-56-cloud-amd64".into())
        );
        assert_eq!(
            "./k.deb".parse::<KernelDeb>().unwrap(),
            KernelDeb::File("./k.deb".into())
        );
        assert_eq!(
            "k.deb".parse::<KernelDeb>().unwrap(),
            KernelDeb::File("k.deb".into())
        );
        assert!("".parse::<KernelDeb>().is_err());
    }

    #[test]
    fn init_script_placeholders_are_known() {
        let init = INIT_SH
            .replace("@MODULES@", "m")
            .replace("@ACPI_MODULES@", "m")
            .replace("@ACPI_FLAG@", ACPI_CMDLINE_FLAG)
            .replace("@READY@", READY_MARKER);
        assert!(!init.contains('@'), "unreplaced placeholder in init.sh");
        assert!(init.contains(READY_MARKER));
    }
}
