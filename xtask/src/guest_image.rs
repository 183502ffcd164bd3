//! `cargo xtask guest-image`: build (or find cached) the guest kernel and
//! initramfs.

use smmvmi_tests::guest_image::{self, GuestImage, KernelDeb};

#[derive(clap::Args)]
pub struct Args {
    /// Kernel package name (apt-get download) or path to a local .deb.
    #[arg(long, value_name = "NAME|PATH", default_value = guest_image::DEFAULT_KERNEL_DEB)]
    pub kernel_deb: KernelDeb,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let image = build(&args.kernel_deb)?;
    println!("{}", serde_json::to_string_pretty(&image)?);
    Ok(())
}

/// Builds the guest image, logging progress to stderr.
pub fn build(deb: &KernelDeb) -> anyhow::Result<GuestImage> {
    crate::step(&format!("guest image for {deb}"));
    let image = guest_image::build(&crate::root(), deb, &mut |m| eprintln!("    {m}"))?;
    eprintln!(
        "    kernel {} ({})",
        image.kernel.display(),
        image.kernel_release
    );
    eprintln!("    initrd {}", image.initrd.display());
    Ok(image)
}
