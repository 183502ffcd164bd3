//! `cargo xtask build`: the firmware image and the guest image.

use smmvmi_tests::guest_image::{self, KernelDeb};

#[derive(clap::Args)]
pub struct Args {
    /// Kernel package name (apt-get download) or path to a local .deb.
    #[arg(long, value_name = "NAME|PATH", default_value = guest_image::DEFAULT_KERNEL_DEB)]
    pub kernel_deb: KernelDeb,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let image = crate::guest_image::build(&args.kernel_deb)?;
    crate::step("firmware");
    let fw = crate::firmware::build(&crate::root())?;
    eprintln!("    firmware {}", fw.display());
    println!(
        "{}",
        serde_json::json!({ "firmware": fw, "kernel": image.kernel, "initrd": image.initrd })
    );
    Ok(())
}
