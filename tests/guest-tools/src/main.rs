//! `ebb-guest`: workloads run inside ebb test guests (and in the rig's L1). Each subcommand prints
//! one `EBB-RESULT <name> key=value ...` line; the exit status is non-zero when a check failed.
//!
//! ```text
//! ebb-guest touch     --mib N [--thp never|always|default] [--hold-secs S]
//! ebb-guest churn     --mib N [--mode chunk|scattered] [--chunk-kib K] [--ops N | --secs S | --wait-signal] [--seed X]
//! ebb-guest hog       --mib N [--hold-secs S] [--release munmap|dontneed] [--after-secs S] [--wait-console]
//! ebb-guest integrity --mib N [--passes P] [--hold-secs S] [--churn-mib M --churn-secs S] [--wait-signal] [--wait-console]
//! ebb-guest wait-line                     (wait for a line on the console, print EBB-GUEST-LINE <line>)
//! ebb-guest qmp       --socket PATH [--timeout-secs S] -- JSON...
//! ebb-guest lines     [--tee FILE]        (relay stdin to stdout one line per write)
//! ebb-guest kvm-pin                       (in L1: hold an idle KVM VM; prints the holder's pid)
//! ```

mod args;
mod error;
mod integrity;
mod kvm_pin;
mod lines;
mod mem;
mod pattern;
mod qmp;
mod report;
mod signal;
mod workloads;

use error::ToolError;

const USAGE: &str = "usage: ebb-guest <touch|churn|hog|integrity|qmp|lines|wait-line|kvm-pin> [--option value]... (see the crate docs)";

fn run(argv: &[String]) -> Result<i32, ToolError> {
    let Some((cmd, rest)) = argv.split_first() else {
        return Err(ToolError::UnknownCommand(String::new()));
    };
    match cmd.as_str() {
        "touch" => workloads::touch(rest),
        "churn" => workloads::churn(rest),
        "hog" => workloads::hog(rest),
        "integrity" => integrity::integrity(rest),
        "qmp" => qmp::qmp(rest),
        "lines" => lines::lines(rest),
        "kvm-pin" => kvm_pin::kvm_pin(rest),
        "wait-line" => {
            let line = signal::read_console_line().map_err(|e| ToolError::Io {
                what: "read a line from /dev/console".into(),
                source: e,
            })?;
            println!("EBB-GUEST-LINE {line}");
            Ok(0)
        }
        other => Err(ToolError::UnknownCommand(other.to_string())),
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match run(&argv) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            let mut msg = format!("ebb-guest: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("{msg}");
            if matches!(e, ToolError::UnknownCommand(_) | ToolError::Args(_)) {
                eprintln!("{USAGE}");
            }
            std::process::exit(2);
        }
    }
}
