//! `cargo xtask qemu-patched`: builds `qemu-system-x86_64` from Debian's own
//! `qemu` source package with the patches of `patches-qemu/` applied, and
//! caches it under `.cache/qemu-patched/<key>/qemu-system-x86_64`, where
//! `<key>` hashes the source version, the code of the patches (their diffs:
//! a reworded commit message does not rebuild QEMU) and the configure flags.
//! Prints the binary's path on stdout. A warm cache returns at once (no apt,
//! no network).
//!
//! Steps on a cold cache: a `deb-src` entry for the system's own Debian
//! mirror (derived from `/etc/apt/sources.list.d/debian.sources`), the build
//! dependencies with apt, `apt-get source --download-only qemu=<version of
//! the installed qemu-system-x86>` into `.cache/qemu-src/`, `dpkg-source -x`
//! (which applies Debian's patches) into a scratch tree, our patches with
//! `patch -p1`, `configure` with every optional feature off, and `ninja -j2`
//! (about 5 minutes on 2 cores).
//!
//! The binary is configured with `--prefix=/usr`, so it finds its firmware
//! blobs (linuxboot_dma.bin, kvmvapic.bin, SeaBIOS, ...) where Debian's
//! `qemu-system-data` and `seabios` packages put them: `/usr/share/qemu`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// The Debian binary package whose source version we rebuild.
const INSTALLED_PACKAGE: &str = "qemu-system-x86";
/// Our deb-src entry (written only when no deb-src entry exists).
const DEB_SRC_FILE: &str = "/etc/apt/sources.list.d/smmvmi-deb-src.sources";
/// The system's own Debian sources (deb822), from which the deb-src entry is derived.
const DEBIAN_SOURCES: &str = "/etc/apt/sources.list.d/debian.sources";

/// Build dependencies of a minimal `x86_64-softmmu` build of QEMU 7.2, each
/// with a file that proves it is installed. Found by configuring with
/// `--without-default-features`: meson refuses to go on without glib,
/// pixman, zlib and libfdt (the x86_64 target needs fdt in 7.2).
const BUILD_DEPS: &[(&str, &str)] = &[
    ("dpkg-dev", "/usr/bin/dpkg-source"),
    ("patch", "/usr/bin/patch"),
    ("gcc", "/usr/bin/gcc"),
    ("make", "/usr/bin/make"),
    ("python3", "/usr/bin/python3"),
    ("meson", "/usr/bin/meson"),
    ("ninja-build", "/usr/bin/ninja"),
    ("pkg-config", "/usr/bin/pkg-config"),
    ("libglib2.0-dev", "/usr/include/glib-2.0/glib.h"),
    ("libpixman-1-dev", "/usr/include/pixman-1/pixman.h"),
    ("zlib1g-dev", "/usr/include/zlib.h"),
    ("libfdt-dev", "/usr/include/libfdt.h"),
];

/// Configure flags; part of the cache key.
const CONFIGURE: &[&str] = &[
    "--prefix=/usr",
    "--sysconfdir=/etc",
    "--localstatedir=/var",
    "--target-list=x86_64-softmmu",
    "--without-default-features",
    "--disable-docs",
    "--enable-tcg",
    "--enable-vhost-kernel",
    "--disable-werror",
];

#[derive(clap::Args)]
pub struct Args {
    /// Parallel build jobs.
    #[arg(long, default_value_t = 2)]
    pub jobs: u32,
    /// Keep the scratch source/build tree next to the binary.
    #[arg(long)]
    pub keep_tree: bool,
}

pub fn run(args: Args) -> Result<()> {
    let path = build(&crate::root(), args.jobs, args.keep_tree)?;
    println!("{}", path.display());
    Ok(())
}

/// Builds (or finds cached) the patched QEMU; returns the binary's path.
pub fn build(root: &Path, jobs: u32, keep_tree: bool) -> Result<PathBuf> {
    let patches = patch_files(root)?;
    let version = installed_source_version()?;
    let key = cache_key(&version, &patches)?;
    let dir = root.join(".cache/qemu-patched").join(&key);
    let binary = dir.join("qemu-system-x86_64");
    if binary.is_file() {
        crate::step(&format!(
            "patched QEMU (cached, {} + {} patches)",
            version,
            patches.len()
        ));
        return Ok(binary);
    }
    let started = Instant::now();
    crate::step(&format!(
        "building patched QEMU from Debian source {version} + {} patches (cold cache: about 5 minutes)",
        patches.len()
    ));
    ensure_deb_src()?;
    ensure_build_deps()?;
    let dsc = download_source(root, &version)?;

    let tree = dir.join("tree");
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    crate::step("unpacking the source package (dpkg-source -x applies Debian's patches)");
    run_step(
        Command::new("dpkg-source")
            .args(["--no-check", "-x"])
            .arg(&dsc)
            .arg(&tree),
        "dpkg-source -x",
    )?;
    for p in &patches {
        crate::step(&format!("applying {}", p.display()));
        run_step(
            Command::new("patch")
                .args(["-p1", "--forward", "--batch", "--quiet", "-i"])
                .arg(p)
                .current_dir(&tree),
            &format!(
                "patch -p1 < {} (the patch does not apply to Debian's {version}; \
                 rebase it on `apt-get source qemu`)",
                p.display()
            ),
        )?;
    }
    crate::step("configure (x86_64-softmmu, optional features off)");
    run_step(
        Command::new("./configure")
            .args(CONFIGURE)
            .current_dir(&tree),
        "QEMU configure (build/meson-logs/meson-log.txt in the tree says why)",
    )?;
    crate::step(&format!("ninja -j{jobs} qemu-system-x86_64"));
    run_step(
        Command::new("ninja")
            .arg("-C")
            .arg(tree.join("build"))
            .arg(format!("-j{jobs}"))
            .arg("qemu-system-x86_64"),
        "building QEMU (the compiler output above says why)",
    )?;
    let tmp = dir.join("qemu-system-x86_64.tmp");
    std::fs::copy(tree.join("build/qemu-system-x86_64"), &tmp)
        .context("copying the built qemu-system-x86_64")?;
    let version_out = Command::new(&tmp)
        .arg("--version")
        .output()
        .context("running the built qemu-system-x86_64 --version")?;
    if !version_out.status.success() {
        bail!(
            "the built {} does not run: {}",
            tmp.display(),
            String::from_utf8_lossy(&version_out.stderr)
        );
    }
    let secs = started.elapsed().as_secs_f64();
    let manifest = serde_json::json!({
        "source_version": version,
        "patches": patches.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "configure": CONFIGURE,
        "build_seconds": secs,
        "version": String::from_utf8_lossy(&version_out.stdout).lines().next().unwrap_or(""),
    });
    std::fs::write(
        dir.join("build.json"),
        serde_json::to_string_pretty(&manifest)?,
    )?;
    std::fs::rename(&tmp, &binary).context("installing the built binary into the cache")?;
    if !keep_tree {
        let _ = std::fs::remove_dir_all(&tree);
    }
    crate::step(&format!("patched QEMU built in {secs:.0} s"));
    Ok(binary)
}

/// `patches-qemu/*.patch` (top level only; variants for upstream live in
/// subdirectories), in name order.
fn patch_files(root: &Path) -> Result<Vec<PathBuf>> {
    let dir = root.join("patches-qemu");
    let mut patches: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "patch"))
        .collect();
    patches.sort();
    if patches.is_empty() {
        bail!(
            "no *.patch files in {}; expected the git format-patch series",
            dir.display()
        );
    }
    Ok(patches)
}

/// The source version of the installed QEMU (`1:7.2+dfsg-7+deb12u18`): we
/// rebuild exactly what Debian ships, so the firmware blobs of
/// `/usr/share/qemu` match.
fn installed_source_version() -> Result<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${source:Version}", INSTALLED_PACKAGE])
        .output()
        .context("running dpkg-query")?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || v.is_empty() {
        bail!(
            "{INSTALLED_PACKAGE} is not installed (dpkg-query found no version); \
             run `apt-get install -y {INSTALLED_PACKAGE}` (or `cargo xtask test`, which installs it)"
        );
    }
    Ok(v)
}

fn cache_key(version: &str, patches: &[PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    h.update(version.as_bytes());
    h.update([0]);
    for f in CONFIGURE {
        h.update(f.as_bytes());
        h.update([0]);
    }
    for p in patches {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        h.update(p.file_name().unwrap_or_default().as_encoded_bytes());
        h.update([0]);
        h.update(patch_code(&text).as_bytes());
    }
    let mut s = String::new();
    for b in &h.finalize()[..8] {
        let _ = write!(s, "{b:02x}");
    }
    Ok(s)
}

/// The part of a `git format-patch` file that `patch` applies: from the
/// first `diff --git` line to the signature separator (`-- `) git appends;
/// the whole text if it has no `diff --git` line.
fn patch_code(text: &str) -> &str {
    let start = if text.starts_with("diff --git ") {
        0
    } else {
        text.find("\ndiff --git ").map_or(0, |i| i + 1)
    };
    let code = &text[start..];
    code.rfind("\n-- \n").map_or(code, |end| &code[..end + 1])
}

/// Adds a deb-src entry for the system's own mirror when apt has none, and
/// runs `apt-get update`.
fn ensure_deb_src() -> Result<()> {
    if has_deb_src() {
        return Ok(());
    }
    let base = std::fs::read_to_string(DEBIAN_SOURCES).with_context(|| {
        format!(
            "reading {DEBIAN_SOURCES} to derive a deb-src entry; add a `Types: deb-src` entry \
             for your Debian mirror to /etc/apt/sources.list.d/ by hand and retry"
        )
    })?;
    let src = deb_src_from(&base).with_context(|| {
        format!("{DEBIAN_SOURCES} has no `Types: deb` stanza to derive a deb-src entry from")
    })?;
    crate::step(&format!(
        "adding {DEB_SRC_FILE} (deb-src of {DEBIAN_SOURCES})"
    ));
    std::fs::write(DEB_SRC_FILE, src).with_context(|| {
        format!("writing {DEB_SRC_FILE} (needs root: run as root or add the deb-src entry by hand)")
    })?;
    smmvmi_tests::host::run_apt(&["update"], &["qemu (source)".into()])?;
    Ok(())
}

fn has_deb_src() -> bool {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(rd.filter_map(|e| e.ok().map(|e| e.path())));
    }
    files.iter().any(|f| {
        let ext_ok = f.extension().is_some_and(|e| e == "list" || e == "sources")
            || f.ends_with("sources.list");
        ext_ok
            && std::fs::read_to_string(f).is_ok_and(|t| {
                t.lines().any(|l| {
                    let l = l.trim();
                    l.starts_with("deb-src ")
                        || (l.starts_with("Types:") && l.split_whitespace().any(|w| w == "deb-src"))
                })
            })
    })
}

/// The deb822 stanzas of `base` with `Types: deb`, turned into `deb-src`.
fn deb_src_from(base: &str) -> Option<String> {
    let stanzas: Vec<String> = base
        .split("\n\n")
        .filter(|s| {
            s.lines()
                .any(|l| l.trim_start().starts_with("Types:") && l.contains(" deb"))
        })
        .map(|s| {
            s.lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .map(|l| {
                    if l.trim_start().starts_with("Types:") {
                        "Types: deb-src".to_string()
                    } else {
                        l.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect();
    if stanzas.is_empty() {
        None
    } else {
        Some(format!(
            "# Written by `cargo xtask qemu-patched` (smmvmi): sources of {DEBIAN_SOURCES}\n{}\n",
            stanzas.join("\n\n")
        ))
    }
}

fn ensure_build_deps() -> Result<()> {
    let missing: Vec<String> = BUILD_DEPS
        .iter()
        .filter(|(_, probe)| !Path::new(probe).exists())
        .map(|(name, _)| name.to_string())
        .collect();
    if !missing.is_empty() {
        crate::step(&format!(
            "installing build dependencies: {}",
            missing.join(" ")
        ));
        smmvmi_tests::host::install(&missing)?;
    }
    Ok(())
}

/// `apt-get source --download-only qemu=VERSION` into `.cache/qemu-src/`;
/// returns the `.dsc`.
fn download_source(root: &Path, version: &str) -> Result<PathBuf> {
    let dir = root.join(".cache/qemu-src");
    std::fs::create_dir_all(&dir)?;
    let upstream = version.split_once(':').map_or(version, |(_, v)| v);
    let dsc = dir.join(format!("qemu_{upstream}.dsc"));
    if dsc.is_file() {
        return Ok(dsc);
    }
    crate::step(&format!("apt-get source qemu={version}"));
    let status = Command::new("apt-get")
        .args(["source", "--download-only", "-q"])
        .arg(format!("qemu={version}"))
        .current_dir(&dir)
        .status()
        .context("running apt-get source")?;
    if !status.success() || !dsc.is_file() {
        bail!(
            "apt-get source qemu={version} failed ({status}); the mirror must still carry the \
             installed version's source (check the deb-src entry in {DEB_SRC_FILE}, or \
             `apt-get install qemu-system-x86` to move to the mirror's version)"
        );
    }
    Ok(dsc)
}

fn run_step(cmd: &mut Command, what: &str) -> Result<()> {
    // Progress goes to stderr: stdout carries only the binary's path.
    let status = cmd
        .stdout(std::process::Stdio::from(std::io::stderr()))
        .status()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{what}: failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb_src_is_derived_from_deb_stanzas() {
        let base = "Types: deb\n# comment\nURIs: http://deb.debian.org/debian\nSuites: bookworm\n\
                    Components: main\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\n\
                    Suites: bookworm-security\nComponents: main\n";
        let src = deb_src_from(base).unwrap();
        assert_eq!(src.matches("Types: deb-src").count(), 2);
        assert!(!src.contains("Types: deb\n"));
        assert!(!src.contains("# comment"));
        assert!(src.contains("Suites: bookworm-security"));
        assert!(deb_src_from("").is_none());
    }

    #[test]
    fn the_cache_key_covers_the_code_not_the_message() {
        let patch = |msg: &str, code: &str| {
            format!(
                "From 1 Mon Sep 17 00:00:00 2001\nSubject: [PATCH] x\n\n{msg}\n---\n a | 1 +\n\n\
                 diff --git a/a b/a\n--- a/a\n+++ b/a\n@@ -1 +1,2 @@\n x\n+{code}\n-- \n2.47.3\n\n"
            )
        };
        let one = patch("first wording", "y");
        assert_eq!(
            patch_code(&one),
            "diff --git a/a b/a\n--- a/a\n+++ b/a\n@@ -1 +1,2 @@\n x\n+y\n"
        );
        assert_eq!(patch_code(&one), patch_code(&patch("reworded", "y")));
        assert_ne!(patch_code(&one), patch_code(&patch("first wording", "z")));
        assert_eq!(patch_code("diff --git a b\n+x\n"), "diff --git a b\n+x\n");
    }
}
