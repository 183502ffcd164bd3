//! `cargo xtask measure` (`smmvmi_tests::sev::launch_digest`) against an
//! independent implementation: sev-snp-measure from PyPI, `--mode sev`,
//! with and without a kernel. No QEMU; needs the firmware image and the
//! guest image, and installs sev-snp-measure into `.cache/venv`.
//!
//! Run with `cargo xtask test` (`#[ignore]`d for plain `cargo test`).

use smmvmi_tests::guest_image::GuestImage;
use smmvmi_tests::sev::{self, DirectBoot};
use smmvmi_tests::vm::Firmware;

fn image() -> std::path::PathBuf {
    match Firmware::from_env() {
        Ok(Firmware::Ours(p)) => p,
        other => panic!("SMMVMI_FIRMWARE must name our firmware image, got {other:?}"),
    }
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn launch_digest_equals_sev_snp_measure() {
    let tool = sev::sev_snp_measure(&mut |m| eprintln!("[smmvmi] {m}")).expect("sev-snp-measure");
    let fw = image();
    let g = GuestImage::from_env().expect("SMMVMI_KERNEL/SMMVMI_INITRD unset");

    // The image parses as OVMF-like: both SEV areas are named.
    let (secret, hashes) = sev::areas(&fw).expect("GUIDed table");
    assert!(
        secret.is_some() && hashes.is_some(),
        "{secret:?} {hashes:?}"
    );

    let ours = sev::launch_digest(&fw, None).unwrap().to_string();
    let theirs = sev::sev_snp_measure_digest(&tool, &fw, None).unwrap();
    assert_eq!(ours, theirs, "flash only");
    eprintln!("flash only: {ours}");

    for boot in [
        DirectBoot {
            kernel: g.kernel.clone(),
            initrd: Some(g.initrd.clone()),
            append: Some("console=ttyS0 panic=-1".into()),
        },
        DirectBoot {
            kernel: g.kernel.clone(),
            initrd: None,
            append: None,
        },
    ] {
        let ours = sev::launch_digest(&fw, Some(&boot)).unwrap().to_string();
        let theirs = sev::sev_snp_measure_digest(&tool, &fw, Some(&boot)).unwrap();
        assert_eq!(ours, theirs, "{boot:?}");
        eprintln!("with {boot:?}: {ours}");
    }
}

#[test]
#[ignore = "boots QEMU; run with `cargo xtask test`"]
fn kernel_for_an_image_without_hashes_area_is_refused() {
    // Debian's OVMF without the AmdSev build has no hashes area entry;
    // any image without our table is refused the same way.
    let dir = std::env::temp_dir().join(format!("smmvmi-measure-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plain = dir.join("plain.bin");
    std::fs::write(&plain, vec![0u8; 0x10000]).unwrap();
    let g = GuestImage::from_env().expect("SMMVMI_KERNEL/SMMVMI_INITRD unset");
    let boot = DirectBoot {
        kernel: g.kernel,
        initrd: None,
        append: None,
    };
    let err = sev::launch_digest(&plain, Some(&boot)).unwrap_err();
    assert!(err.to_string().contains("no GUIDed table"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}
