//! `cargo xtask demo`: boot a monitored VM on our firmware, show the
//! firmware's debug console, raise SMIs from the host and show the SMM agent
//! answering through the mailbox, then shut the VM down.

use std::time::Duration;

use anyhow::Context;
use ids::kernel::{self, BannerSearch};
use ids::{Endpoint, Session};
use smmvmi_mailbox::wire::{Op, Status};
use smmvmi_tests::guest_image::KernelDeb;
use smmvmi_tests::vm::{Vm, VmConfig};

use crate::FirmwareChoice;

#[derive(clap::Args)]
pub struct Args {
    /// How many SMIs to raise from the host.
    #[arg(long, default_value_t = 5)]
    pub smis: u32,
    /// Firmware to boot (only ours has an SMM agent).
    #[arg(long, value_enum, default_value_t)]
    pub firmware: FirmwareChoice,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    crate::step("installing what is missing and building");
    let image = crate::guest_image::build(&KernelDeb::default())?;
    let firmware = args.firmware.resolve()?;
    let socket = smmvmi_tests::daemon::ensure_default()?;
    crate::step(&format!("host-injector daemon on {}", socket.display()));
    let mut config = VmConfig::new("demo", firmware)
        .smp(2)
        .mem("1G")
        .through_daemon(socket);
    config.guest = Some(image);
    crate::step("booting the monitored VM (q35, SMM on, TCG)");
    let vm = Vm::up(config).context("booting the demo VM")?;
    let boot = vm.boot_time().unwrap_or_default();
    crate::step(&format!(
        "guest at its init after {:.2} s",
        boot.as_secs_f64()
    ));

    println!("--- firmware debug console ---");
    for line in vm.debugcon().lines().filter(|l| !l.trim().is_empty()) {
        println!("  {line}");
    }
    println!("--- guest ---");
    println!("  {}", vm.run_shell_command("uname -sr")?.trim());

    crate::step("waiting for the SMM agent to publish its ready state in the mailbox");
    let header = vm.wait_agent_ready(Duration::from_secs(10))?;
    println!(
        "--- mailbox: state {}, features {:#x}, {} CPUs, {} SMIs so far ---",
        header.state_name(),
        header.features,
        header.ncpus,
        header.smi_count
    );
    for i in 1..=args.smis {
        let rtt = vm.host_smi_ping(
            smmvmi_mailbox::platform::APM_CMD_SERVE,
            Duration::from_secs(10),
        )?;
        let h = vm.mailbox()?;
        println!(
            "  host SMI {i}: ping {:#018x} acknowledged in {:.2} ms; agent SMI count {}",
            h.ping_ack,
            rtt.as_secs_f64() * 1e3,
            h.smi_count
        );
    }
    println!(
        "  guest still answers: {}",
        vm.run_shell_command("echo ok")?.trim()
    );

    ids_demo(&vm)?;

    crate::step("shutting down");
    let status = vm.down()?;
    crate::step(&format!("QEMU {status}"));
    Ok(())
}

/// The IDS side: a sealed session with the agent reads the guest kernel
/// from outside, and the guest's own view is printed next to it.
fn ids_demo(vm: &Vm) -> anyhow::Result<()> {
    crate::step(
        "IDS: sealed session with the SMM agent through the host-injector daemon (AES-256-GCM, key from the launch secret area)",
    );
    let endpoint: Endpoint = vm
        .info()
        .endpoint()
        .parse()
        .context("the harness's daemon endpoint")?;
    println!("  endpoint {}", endpoint.to_spec());
    let mut s = Session::connect(&endpoint, Session::DEFAULT_DEADLINE)?;
    let agent = s.info()?;
    println!(
        "  agent {}.{}: {} CPUs, {} RAM ranges, SMRAM {:#x}+{:#x}, max read {} KiB",
        agent.header.agent_version >> 16,
        agent.header.agent_version & 0xffff,
        agent.header.cpu_count,
        agent.ram.len(),
        agent.header.smram_base,
        agent.header.smram_size,
        agent.header.max_read >> 10
    );
    let banner = kernel::find_banner(&mut s, BannerSearch::default())?;
    let truth = vm.run_shell_command("cat /proc/version")?;
    println!("  IDS reads linux_banner at {:#x}:", banner.addr);
    println!("    {}", banner.text.trim_end());
    println!(
        "  guest's /proc/version {}",
        if banner.text.trim_end() == truth.trim_end() {
            "matches"
        } else {
            "DIFFERS"
        }
    );
    let entry = vm.run_shell_command("grep ' entry_SYSCALL_64$' /proc/kallsyms")?;
    for cpu in 0..agent.header.cpu_count {
        let st = s.cpu_state(cpu)?;
        println!(
            "  CPU {cpu}: RIP {:#018x} CR3 {:#x} LSTAR {:#018x}",
            st.rip, st.cr3, st.msr_lstar
        );
    }
    println!(
        "  guest's kallsyms: {}",
        entry
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let refused = s.request(&[Op::ReadPhys {
        addr: agent.header.smram_base,
        len: 16,
    }])?;
    if let Some(r) = refused.first() {
        println!(
            "  READ_PHYS of SMRAM -> {}",
            if r.status == Status::RefusedSmram {
                "refused (the agent never reads SMRAM for anyone)".to_string()
            } else {
                ids::session::status_words(r.status, r.level, r.aux)
            }
        );
    }
    Ok(())
}
