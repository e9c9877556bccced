//! `ebb`: boots a Linux guest on KVM with every guest page tracked in guest-mm.

use ebb::{cli, logger, vmm};

use std::error::Error;
use std::process::ExitCode;

use clap::Parser;

/// Prints an error and every cause on one line.
fn error_line(e: &dyn Error) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        line.push_str(": ");
        line.push_str(&c.to_string());
        cause = c.source();
    }
    line
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
    let config = match cli.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ebb: {}", error_line(&e));
            return ExitCode::from(1);
        }
    };
    let tty = ebb::terminal::RawGuard::new();
    let result = vmm::run(config, |_| vmm::Plugins::default());
    drop(tty);
    match result {
        Ok(outcome) => {
            eprintln!("\n{}", outcome.report.render());
            let exits: u64 = outcome.vcpu_stats.iter().map(|s| s.exits).sum();
            eprintln!(
                "ebb: {} after {:.3} s ({} vCPU exits)",
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
