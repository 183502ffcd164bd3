//! SEV launch measurement, as the guest owner computes it before injecting
//! the key: what `cargo xtask measure` prints, what the measured-boot tests
//! load into the hashes area, and the independent check (sev-snp-measure
//! from PyPI, installed into `.cache/venv` by [`sev_snp_measure`]).
//!
//! Plain SEV's launch digest (AMD SEV API spec, LAUNCH_UPDATE_DATA and
//! LAUNCH_MEASURE) is SHA-256 over the bytes QEMU passes to
//! LAUNCH_UPDATE_DATA, in order: the whole flash image (`sev_encrypt_flash`,
//! QEMU `hw/i386/pc_sysfw.c`), then, with `kernel-hashes=on` and `-kernel`,
//! the padded hashes table (`sev_add_kernel_loader_hashes`,
//! `target/i386/sev.c`). LAUNCH_MEASURE returns HMAC(TIK, 0x04 || API
//! major || minor || build || policy || this digest || mnonce); the guest
//! owner recomputes that from this digest.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest as _, Sha256};
use smmvmi_boot::ovmf_table::{Area, Table};
use smmvmi_boot::sev::{self, Digest, PADDED_HASH_TABLE_LEN};

/// The three blobs of a measured direct boot.
#[derive(Clone, Debug, Default)]
pub struct DirectBoot {
    /// `-kernel` (bzImage).
    pub kernel: PathBuf,
    /// `-initrd`, if any.
    pub initrd: Option<PathBuf>,
    /// `-append`, if any.
    pub append: Option<String>,
}

/// Errors of the measurement helpers: each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum SevError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{image}: no GUIDed table at the end of the image (footer GUID at end - 0x30): not an OVMF-like image, QEMU would find no SEV areas"
    )]
    NoTable { image: String },
    #[error("{image}: {source}")]
    Table {
        image: String,
        source: smmvmi_boot::ovmf_table::TableError,
    },
    #[error(
        "{image} has no SEV hashes area entry (7255371f-...): QEMU refuses -kernel with kernel-hashes=on for it"
    )]
    NoHashesArea { image: String },
    #[error("{what}: {detail}")]
    Tool { what: String, detail: String },
    #[error("writing the key's secret table {path}: {detail}")]
    SecretTable { path: String, detail: String },
}

/// Packages the agent key (`key_file`, 32 bytes) as the guest owner's
/// launch secret: a secret table (`smmvmi_boot::sev`, Linux `efi_secret`
/// layout, one entry with smmvmi's key GUID) written to `out` (mode 0600,
/// replaced if present). Under SEV this is what `sev-inject-launch-secret`
/// injects; without SEV the test setups load it into the secret area with
/// QEMU's generic loader (`-device loader,file=OUT,addr=AREA,force-raw=on`).
pub fn write_key_secret(key_file: &Path, out: &Path) -> Result<(), SevError> {
    let key = read(key_file)?;
    let fail = |detail: String| SevError::SecretTable {
        path: out.display().to_string(),
        detail,
    };
    if key.len() != smmvmi_mailbox::crypto::SHARED_KEY_LEN {
        return Err(fail(format!(
            "{} holds {} bytes, expected a {}-byte agent key",
            key_file.display(),
            key.len(),
            smmvmi_mailbox::crypto::SHARED_KEY_LEN
        )));
    }
    let mut table = vec![0u8; 0x100];
    let n = sev::write_secret_table(&[(sev::AGENT_KEY_SECRET_GUID, &key)], &mut table)
        .map_err(|e| fail(e.to_string()))?;
    table.truncate(n.next_multiple_of(16));
    crate::vm::write_private(out, &table).map_err(|e| fail(e.to_string()))
}

/// The QEMU argument that loads a secret table file into the secret area
/// at `addr` (`-device` takes it), as the harness and libvirt domains do.
pub fn secret_loader_arg(table: &Path, addr: u64) -> String {
    format!(
        "loader,file={},addr={addr:#x},force-raw=on",
        table.display()
    )
}

fn read(path: &Path) -> Result<Vec<u8>, SevError> {
    std::fs::read(path).map_err(|source| SevError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn sha256(bytes: &[u8]) -> Digest {
    Digest(Sha256::digest(bytes).into())
}

/// The SEV areas an image names: (secret area, hashes area).
pub fn areas(image: &Path) -> Result<(Option<Area>, Option<Area>), SevError> {
    let bytes = read(image)?;
    let name = image.display().to_string();
    let table = Table::parse(&bytes)
        .map_err(|source| SevError::Table {
            image: name.clone(),
            source,
        })?
        .ok_or(SevError::NoTable {
            image: name.clone(),
        })?;
    let area = |g| {
        table.area(g).map_err(|source| SevError::Table {
            image: name.clone(),
            source,
        })
    };
    Ok((area(&sev::SECRET_AREA_GUID)?, area(&sev::HASHES_AREA_GUID)?))
}

/// The padded hashes table QEMU writes for `boot` (kernel file, initrd
/// file or nothing, `append` + NUL).
pub fn hashes_table(boot: &DirectBoot) -> Result<[u8; PADDED_HASH_TABLE_LEN], SevError> {
    hashes_table_with(boot, None)
}

/// [`hashes_table`] with the kernel digest overridden (the tests: without
/// SEV, QEMU serves a patched setup header, whose hash differs from the
/// file's).
pub fn hashes_table_with(
    boot: &DirectBoot,
    kernel: Option<Digest>,
) -> Result<[u8; PADDED_HASH_TABLE_LEN], SevError> {
    let k = match kernel {
        Some(k) => k,
        None => sha256(&read(&boot.kernel)?),
    };
    let i = match &boot.initrd {
        Some(p) => sha256(&read(p)?),
        None => sha256(b""),
    };
    let mut cmdline = boot.append.clone().unwrap_or_default().into_bytes();
    cmdline.push(0);
    Ok(sev::build_padded(&k, &i, &sha256(&cmdline)))
}

/// The expected SEV launch digest of `image`, with `boot`'s hashes table
/// when given. Refuses a kernel for an image without a hashes area, as
/// QEMU does.
pub fn launch_digest(image: &Path, boot: Option<&DirectBoot>) -> Result<Digest, SevError> {
    let bytes = read(image)?;
    let mut h = Sha256::new();
    h.update(&bytes);
    if let Some(boot) = boot {
        match areas(image)? {
            (_, Some(a)) if a.base != 0 => {}
            _ => {
                return Err(SevError::NoHashesArea {
                    image: image.display().to_string(),
                });
            }
        }
        h.update(hashes_table(boot)?);
    }
    Ok(Digest(h.finalize().into()))
}

/// The sev-snp-measure version the tests compare against.
pub const SEV_SNP_MEASURE: &str = "sev-snp-measure==0.0.13";

/// `.cache/venv/bin/sev-snp-measure`, from the project's venv
/// ([`crate::venv::ensure`], which installs [`SEV_SNP_MEASURE`] with the
/// other pinned tools).
pub fn sev_snp_measure(log: &mut dyn FnMut(&str)) -> Result<PathBuf, SevError> {
    crate::venv::ensure(log).map_err(|e| SevError::Tool {
        what: "the project's Python venv".into(),
        detail: e.to_string(),
    })?;
    Ok(crate::venv::bin("sev-snp-measure"))
}

/// sev-snp-measure's SEV launch digest for `image` (and `boot`).
pub fn sev_snp_measure_digest(
    tool: &Path,
    image: &Path,
    boot: Option<&DirectBoot>,
) -> Result<String, SevError> {
    let mut cmd = Command::new(tool);
    cmd.args(["--mode", "sev", "--output-format", "hex", "--ovmf"])
        .arg(image);
    if let Some(b) = boot {
        cmd.arg("--kernel").arg(&b.kernel);
        if let Some(i) = &b.initrd {
            cmd.arg("--initrd").arg(i);
        }
        if let Some(a) = &b.append {
            cmd.arg("--append").arg(a);
        }
    }
    let out = cmd.output().map_err(|e| SevError::Tool {
        what: "sev-snp-measure".into(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(SevError::Tool {
            what: "sev-snp-measure".into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
