//! `ebb`: boots a Linux guest on KVM with every guest page tracked in guest-mm.

use ebb::{cli, error_line, logger, vmm};

use std::process::ExitCode;

use clap::Parser;

/// The devices and API endpoints the configuration asks for.
fn plugins(
    memory: &std::sync::Arc<ebb::memory::VmMemory>,
    balloon: Option<ebb::config::BalloonSettings>,
) -> vmm::Plugins {
    let Some(settings) = balloon else {
        return vmm::Plugins::default();
    };
    // The RAM size was checked before the VM was built, so this cannot fail in practice.
    let parts = match ebb::devices::virtio::balloon::build(memory, &settings) {
        Ok(p) => p,
        Err(e) => {
            log::error!("balloon left out: {}", error_line(&e));
            return vmm::Plugins::default();
        }
    };
    if settings.stats_polling_interval_s > 0 {
        let every = parts.polling_interval_s.clone();
        if let Err(e) = ebb::devices::virtio::balloon::spawn_stats_poller(&parts.shared, every) {
            log::warn!("balloon statistics polling off: cannot start its thread: {e}");
        }
    }
    vmm::Plugins {
        devices: vec![parts.device],
        api: Some(parts.api),
    }
}

fn main() -> ExitCode {
    logger::init();
    let cli = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("ebb: {}", first.trim_start_matches("error: "));
            return ExitCode::from(1);
        }
    };
    if let Err(e) = ebb::seccomp::init(cli.seccomp_mode()) {
        eprintln!("ebb: {}", error_line(&e));
        return ExitCode::from(1);
    }
    let file = match cli.into_file() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("ebb: {}", error_line(&e));
            return ExitCode::from(1);
        }
    };
    // No kernel but an API socket: wait for the configuration over the API (Firecracker's way).
    let (config, api) = match (&file.boot.kernel, file.api_sock.clone()) {
        (None, Some(path)) => match ebb::preboot::configure(file, &path) {
            Ok((c, sock)) => (c, Some(sock)),
            Err(e) => {
                eprintln!("ebb: {}", error_line(&e));
                return ExitCode::from(1);
            }
        },
        _ => match ebb::config::VmConfig::validate(file) {
            Ok(c) => (c, None),
            Err(e) => {
                eprintln!("ebb: {}", error_line(&e));
                return ExitCode::from(1);
            }
        },
    };
    if config.balloon.is_some() {
        if let Err(e) = balloon::Balloon::check_ram(config.memory_bytes()) {
            eprintln!("ebb: {}", error_line(&e));
            return ExitCode::from(1);
        }
        if config.api_sock.is_none() {
            log::warn!("--balloon without --api-sock: the balloon target cannot be changed");
        }
    }
    let balloon_settings = config.balloon;
    let tty = ebb::terminal::RawGuard::new();
    let result = vmm::run(config, |memory| plugins(memory, balloon_settings), api);
    drop(tty);
    match result {
        Ok(outcome) => {
            eprintln!("\n{}", outcome.report.render());
            let exits: u64 = outcome.vcpu_stats.iter().map(|s| s.exits).sum();
            let stale: u64 = outcome.vcpu_stats.iter().map(|s| s.stale_vectoring).sum();
            let stale = if stale > 0 {
                format!(", {stale} MMIO accesses run again after a stale event-delivery report")
            } else {
                String::new()
            };
            eprintln!(
                "ebb: {} after {:.3} s ({} vCPU exits{stale})",
                outcome.reason.describe(),
                outcome.elapsed.as_secs_f64(),
                exits
            );
            ExitCode::from(outcome.reason.exit_code() as u8)
        }
        Err(e) => {
            eprintln!("ebb: {}", error_line(&e));
            ExitCode::from(1)
        }
    }
}
