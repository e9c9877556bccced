//! `ebb-bench`: ebb and the QEMU peer side by side, the same guest scenario in the same L1 boot
//! (`scripts/bench-l1.sh`), over several rounds; a markdown table of medians, the raw numbers as
//! CSV, and a picture of both VMMs' page-table bytes over time (SVG).
//!
//! With `--variants`, the same scenario for ebb only, once per memory configuration (reclaim
//! strategy x release mode x fill: [`VARIANTS`]), all in one L1 boot per round with the order
//! rotated over rounds; the tables have one row per variant and ratios against ebb's default.
//!
//! ```text
//! ebb-bench [--rounds N] [--reporting on|off|both] [--ebb-flags "FLAGS"] [--out DIR] [--docs]
//! ebb-bench --variants [all|LABEL,LABEL...] [--rounds N] [sizes] [--out DIR] [--docs]
//! ebb-bench --from DIR [--docs]     (table, CSV and picture again from DIR's round logs)
//! ```
//! Run through `scripts/bench-tables.sh`, which builds what a round needs first.

use std::error::Error;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use ebb_harness::{Job, Rig, RigFault, l1_shell_lib, static_ebb, static_memscan, workspace_root};

mod picture;
mod round;
mod tables;
mod variants;
use picture::picture;
use round::{Round, load, round_log};
use tables::{csv, tables};
use variants::{
    VARIANT_COMMON_FLAGS, VARIANT_SIZES, VARIANTS, rotated, variants_of, write_variants,
};

/// The VMMs, as the L1 script names them, and as the tables name them.
const VMMS: [(&str, &str); 2] = [("ebb", "ebb"), ("qemu", "QEMU")];
/// The phases of the scenario, in order (`scripts/bench-l1.sh`).
const PHASES: [&str; 7] = [
    "touched",
    "freed",
    "ws",
    "inflated",
    "retouch-ws",
    "deflated",
    "retouch",
];
/// The balloon's size when inflated, MiB (`BENCH_BALLOON_MIB`): the guest keeps 256 of its 1024.
const BALLOON_MIB: u32 = 768;
/// Round logs in the output directory.
const LOG_PREFIX: &str = "round-";

/// The scenario's sizes, MiB: guest RAM, the first touch, the working set, the balloon when
/// inflated, the touch after deflation (`BENCH_*_MIB` in `scripts/bench-l1.sh`).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Sizes {
    memory: u32,
    touch: u32,
    ws: u32,
    balloon: u32,
    retouch: u32,
}

/// Against the QEMU peer: a 1 GiB guest, as the peer's tests run it.
const PEER_SIZES: Sizes = Sizes {
    memory: 1024,
    touch: 600,
    ws: 32,
    balloon: BALLOON_MIB,
    retouch: 512,
};
#[derive(Parser)]
#[command(
    name = "ebb-bench",
    about = "ebb and the QEMU peer side by side in the nested test host: page tables, balloon times, re-fault costs"
)]
struct Cli {
    /// Rounds per reporting setting; the order of the VMMs alternates (round 1 ebb first); with
    /// --variants it is rotated (round r starts (r-1)/rounds of the way down the list).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Free page reporting in both VMMs: on, off or both (default both; off with --variants,
    /// ebb's default).
    #[arg(long)]
    reporting: Option<String>,
    /// ebb only, one run per memory configuration (all, or labels separated by commas), side by
    /// side in each L1 boot; no QEMU peer.
    #[arg(long, num_args = 0..=1, default_missing_value = "all")]
    variants: Option<String>,
    /// Guest RAM, MiB (default 1024; 256 with --variants).
    #[arg(long)]
    memory_mib: Option<u32>,
    /// The first touch, MiB (default 600; 128 with --variants).
    #[arg(long)]
    touch_mib: Option<u32>,
    /// The working set, MiB (default 32; 16 with --variants).
    #[arg(long)]
    ws_mib: Option<u32>,
    /// The balloon when inflated, MiB (default 768; 96 with --variants).
    #[arg(long)]
    balloon_mib: Option<u32>,
    /// The touch after deflation, MiB (default 512; 96 with --variants).
    #[arg(long)]
    retouch_mib: Option<u32>,
    /// More ebb flags (e.g. "--zap-kvm-tables-after 64"); ebb runs at its defaults otherwise.
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    ebb_flags: String,
    /// Periodic sampling interval, ms.
    #[arg(long, default_value_t = 500)]
    sample_ms: u32,
    /// Timeout of one round (one L1 boot, both VMMs or all variants), seconds (default 1800;
    /// 3600 with --variants).
    #[arg(long)]
    timeout: Option<u64>,
    /// Output directory (default: target/bench/<seconds since the epoch>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Make the table, CSV and picture from the round logs in this directory; run nothing.
    #[arg(long, conflicts_with = "out")]
    from: Option<PathBuf>,
    /// Also write the table and the picture into docs/ (BENCH-tables.md, bench-tables.svg; with
    /// --variants the tables between the markers of BENCH-strategies.md).
    #[arg(long)]
    docs: bool,
    /// Do not stream the rig's console to stderr.
    #[arg(long)]
    quiet: bool,
}

/// The checkout's commit (short), or "?".
fn head_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(workspace_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "?".into())
}

/// The markdown document: how it was made (the command, and the commit the rounds ran at), the
/// scenario, the tables, the picture.
fn document(
    rounds: &[Round],
    settings: &[String],
    cmd: &str,
    commit: &str,
    picture: Option<&str>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Page tables side by side: ebb and the QEMU peer\n");
    let _ = writeln!(
        s,
        "Made by `{cmd}` at commit {commit}; the raw numbers of every round are in the CSV next to \
         the round logs (`target/bench/...`). Regenerate with that command (`--docs` writes this \
         file and the picture).\n"
    );
    let _ = write!(
        s,
        "Both VMMs run in the same L1 boot of the nested test host (docs/TESTING.md), one after \
         the other (the order alternates over rounds), each at its defaults with a 1 GiB, 1 vCPU \
         Debian guest and a balloon: ebb with `--balloon` (`--balloon-reporting` when reporting \
         is on), QEMU microvm with `virtio-balloon-device` (`free-page-reporting=on|off`). The \
         guest touches 600 MiB (`touched`), frees it (`freed`: the VMM's VmRSS has moved less \
         than 1 MiB over 2 s, at least 5 s after the free), writes a 32 MiB working set (`ws`), \
         the balloon inflates to {BALLOON_MIB} MiB (`inflated`, the guest keeps {} MiB), the \
         guest re-reads and checks its working set (`retouch-ws`), the balloon deflates (`deflated`, sampled once VmRSS settled as after the free), and the guest touches 512 MiB \
         fresh (`retouch`). VmRSS and VmPTE are the VMM process's; SecPageTables is L1's KVM \
         second-level tables (only one VM runs at a time). Host memory is what the host holds for \
         the VMM: its VmRSS, plus, for ebb, the pages of its guest-RAM memfd that no mapping of \
         ebb maps yet (VmRSS counts only mapped pages of a file; QEMU's anonymous guest RAM is all \
         in its VmRSS). Guest RAM held is the part of it that is guest memory (ebb: the memfd's \
         pages, by mincore; QEMU: the present pages of its guest RAM mapping, by pagemap), and \
         its non-zero pages are the guest's data: what any VMM that keeps the guest's memory \
         intact must hold (`ebb-memscan`, run in L1 at each phase). Balloon times run from setting the \
         target to the first reading (polled every 0.2 s) where the guest's driver reports it. \
         Absolute times under emulation mean little; the ratios do.\n\n",
        1024 - BALLOON_MIB
    );
    for st in settings {
        s.push_str(&tables(st, rounds));
    }
    if let Some(p) = picture {
        let _ = writeln!(
            s,
            "![VmPTE and SecPageTables over time, ebb and QEMU]({p})\n"
        );
    }
    s
}

fn settings_of(arg: &str) -> Result<Vec<String>, String> {
    match arg {
        "on" | "off" => Ok(vec![arg.to_string()]),
        "both" => Ok(vec!["on".into(), "off".into()]),
        other => Err(format!("--reporting takes on, off or both, not {other}")),
    }
}

/// The scenario's sizes: the mode's defaults, with the ones given on the command line.
fn sizes_of(cli: &Cli) -> Sizes {
    let d = if cli.variants.is_some() {
        VARIANT_SIZES
    } else {
        PEER_SIZES
    };
    Sizes {
        memory: cli.memory_mib.unwrap_or(d.memory),
        touch: cli.touch_mib.unwrap_or(d.touch),
        ws: cli.ws_mib.unwrap_or(d.ws),
        balloon: cli.balloon_mib.unwrap_or(d.balloon),
        retouch: cli.retouch_mib.unwrap_or(d.retouch),
    }
}

/// Runs the rounds; writes each round's log into `dir`.
fn run_rounds(cli: &Cli, settings: &[String], dir: &Path) -> Result<(), Box<dyn Error>> {
    let mut rig = Rig::from_env()?;
    rig.echo = !cli.quiet;
    let ebb = static_ebb()?;
    let ctl = ebb.with_file_name("ebb-ctl");
    let memscan = static_memscan()?;
    let script = workspace_root().join("scripts/bench-l1.sh");
    let variants = match &cli.variants {
        Some(v) => variants_of(v)?,
        None => Vec::new(),
    };
    let sizes = sizes_of(cli);
    let timeout = cli
        .timeout
        .unwrap_or(if variants.is_empty() { 1800 } else { 3600 });
    let mut ebb_flags = cli.ebb_flags.clone();
    let mut variant_env = String::new();
    if !variants.is_empty() {
        ebb_flags = format!("{VARIANT_COMMON_FLAGS} {ebb_flags}")
            .trim()
            .to_string();
        for (l, f) in VARIANTS.iter().filter(|(l, _)| variants.contains(l)) {
            let _ = write!(variant_env, "{l} {f};");
        }
    }
    for round in 1..=cli.rounds {
        for setting in settings {
            // Both VMMs alternate; variants rotate.
            let (order, order_csv) = if variants.is_empty() {
                let o = if round % 2 == 1 {
                    "ebb qemu"
                } else {
                    "qemu ebb"
                };
                (o.to_string(), o.replace(' ', "+"))
            } else {
                let r = rotated(&variants, round, cli.rounds);
                (
                    r.iter()
                        .map(|l| format!("ebb:{l}"))
                        .collect::<Vec<_>>()
                        .join(" "),
                    r.join("+"),
                )
            };
            eprintln!(
                "ebb-bench: round {round} of {}, reporting {setting}, {} first",
                cli.rounds,
                order_csv.split('+').next().unwrap_or("?")
            );
            let job = Job::shell("sh ./bench-l1.sh")
                .input(&ebb)
                .input(&ctl)
                .input(&memscan)
                .input(l1_shell_lib())
                .input(&script)
                .env("BENCH_ORDER", order.as_str())
                .env("BENCH_VARIANTS", variant_env.as_str())
                .env("BENCH_REPORTING", setting.as_str())
                .env("BENCH_EBB_FLAGS", ebb_flags.as_str())
                .env("BENCH_SAMPLE_MS", cli.sample_ms.to_string())
                .env("BENCH_MEMORY_MIB", sizes.memory.to_string())
                .env("BENCH_TOUCH_MIB", sizes.touch.to_string())
                .env("BENCH_WS_MIB", sizes.ws.to_string())
                .env("BENCH_BALLOON_MIB", sizes.balloon.to_string())
                .env("BENCH_RETOUCH_MIB", sizes.retouch.to_string())
                .timeout(Duration::from_secs(timeout));
            let what = format!("bench round {round} reporting {setting}");
            let reruns = if variants.is_empty() {
                // Both VMMs' guests run in this job: the rig faults of either are re-run.
                rig.ebb_reruns(what)
                    .on(RigFault::PeerNoBoot)
                    .on(RigFault::PeerKvmInternalError)
                    .on(RigFault::PeerStoppedEarly)
            } else {
                // The script re-runs a variant whose guest met a rig fault; only L1's own
                // faults re-run the whole round.
                rig.l1_reruns(what)
            };
            let header_more = format!(
                "{}memory_mib={} touch_mib={} ws_mib={} balloon_mib={} retouch_mib={}",
                if variants.is_empty() {
                    ""
                } else {
                    "mode=variants "
                },
                sizes.memory,
                sizes.touch,
                sizes.ws,
                sizes.balloon,
                sizes.retouch
            );
            let log = match rig.run_with(&job, &reruns) {
                Ok(out) => {
                    if !out.rig_faults.is_empty() {
                        eprintln!(
                            "ebb-bench: RIG FAULT: round {round} (reporting {setting}) was run \
                             again after: {}",
                            out.rig_faults
                                .iter()
                                .map(|f| f.fault.name())
                                .collect::<Vec<_>>()
                                .join(", ")
                        );
                    }
                    round_log(
                        &format!(
                            "round={round} reporting={setting} order={order_csv} status={} \
                             elapsed_s={:.1} rig_faults={} {header_more}",
                            out.status,
                            out.elapsed.as_secs_f64(),
                            out.rig_faults.len()
                        ),
                        Some(&out),
                    )
                }
                Err(e) => {
                    let msg = e.to_string().replace('\n', " | ");
                    eprintln!("ebb-bench: round {round} (reporting {setting}) FAILED: {e}");
                    round_log(
                        &format!(
                            "round={round} reporting={setting} order={order_csv} status=-1 \
                             elapsed_s=0 rig_faults=0 {header_more} error={msg}"
                        ),
                        None,
                    )
                }
            };
            let path = dir.join(format!("{LOG_PREFIX}{round}-reporting-{setting}.log"));
            std::fs::write(&path, &log)?;
            let r = Round::parse(&log);
            for (v, f) in &r.variant_faults {
                eprintln!("ebb-bench: RIG FAULT: round {round}, {v} was run again after: {f}");
            }
            if r.ok() {
                eprintln!(
                    "ebb-bench: round {round} (reporting {setting}) done in {:.0} s",
                    r.elapsed_s
                );
            } else {
                eprintln!(
                    "ebb-bench: round {round} (reporting {setting}) DOES NOT COUNT: {} (log: {})",
                    r.all_problems().join("; "),
                    path.display()
                );
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(&cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("ebb-bench: {e}");
            ExitCode::from(125)
        }
    }
}

/// Returns whether every round counted.
fn real_main(cli: &Cli) -> Result<bool, Box<dyn Error>> {
    let dir = match (&cli.from, &cli.out) {
        (Some(d), _) | (None, Some(d)) => d.clone(),
        (None, None) => {
            let secs = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
            workspace_root().join(format!("target/bench/{secs}"))
        }
    };
    std::fs::create_dir_all(&dir)?;
    let reporting = cli.reporting.clone().unwrap_or_else(|| {
        if cli.variants.is_some() {
            "off".into()
        } else {
            "both".into()
        }
    });
    let mut cmd = format!("scripts/bench-tables.sh --rounds {} ", cli.rounds);
    if let Some(v) = &cli.variants {
        let _ = write!(cmd, "--variants {v}");
        if cli.reporting.is_some() {
            let _ = write!(cmd, " --reporting {reporting}");
        }
    } else {
        let _ = write!(cmd, "--reporting {reporting}");
    }
    for (flag, v) in [
        ("--memory-mib", cli.memory_mib),
        ("--touch-mib", cli.touch_mib),
        ("--ws-mib", cli.ws_mib),
        ("--balloon-mib", cli.balloon_mib),
        ("--retouch-mib", cli.retouch_mib),
    ] {
        if let Some(v) = v {
            let _ = write!(cmd, " {flag} {v}");
        }
    }
    if !cli.ebb_flags.is_empty() {
        let _ = write!(cmd, " --ebb-flags \"{}\"", cli.ebb_flags);
    }
    // The command that made the logs, kept next to them for a later --from.
    let cmd_file = dir.join("command.txt");
    // The commit the rounds ran at, kept too: a later --from names it, not the checkout's.
    let commit_file = dir.join("commit.txt");
    let settings = if cli.from.is_none() {
        let s = settings_of(&reporting)?;
        std::fs::write(&cmd_file, format!("{cmd}\n"))?;
        std::fs::write(&commit_file, format!("{}\n", head_commit()))?;
        run_rounds(cli, &s, &dir)?;
        s
    } else {
        Vec::new()
    };
    let rounds = load(&dir)?;
    if rounds.is_empty() {
        return Err(format!("no round logs in {}", dir.display()).into());
    }
    // From logs: the settings the logs have, on before off; the command as it was run.
    let settings = if settings.is_empty() {
        let mut s: Vec<String> = rounds.iter().map(|r| r.reporting.clone()).collect();
        s.sort_by(|a, b| b.cmp(a));
        s.dedup();
        cmd = match std::fs::read_to_string(&cmd_file) {
            Ok(c) => c.trim().to_string(),
            Err(_) => {
                let n = rounds.iter().map(|r| r.round).max().unwrap_or(0);
                let rep = if s.len() == 2 { "both" } else { s[0].as_str() };
                format!("scripts/bench-tables.sh --rounds {n} --reporting {rep}")
            }
        };
        s
    } else {
        settings
    };
    let commit = std::fs::read_to_string(&commit_file)
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| head_commit());
    if rounds.iter().any(|r| r.variants) {
        return write_variants(cli, &dir, &rounds, &settings, &cmd, &commit);
    }
    let svg = dir.join("bench-tables.svg");
    let drew = picture(&rounds, &settings, &svg)?;
    let md = document(
        &rounds,
        &settings,
        &cmd,
        &commit,
        drew.then_some("bench-tables.svg"),
    );
    std::fs::write(dir.join("bench-tables.md"), &md)?;
    std::fs::write(dir.join("bench-tables.csv"), csv(&rounds))?;
    println!("{md}");
    eprintln!(
        "ebb-bench: wrote {}/bench-tables.{{md,csv{}}}",
        dir.display(),
        if drew { ",svg" } else { "" }
    );
    if cli.docs {
        let docs = workspace_root().join("docs");
        std::fs::write(docs.join("BENCH-tables.md"), &md)?;
        if drew {
            std::fs::copy(&svg, docs.join("bench-tables.svg"))?;
        }
        eprintln!("ebb-bench: wrote docs/BENCH-tables.md and docs/bench-tables.svg");
    }
    let all_ok = rounds.iter().all(Round::ok);
    if !all_ok {
        eprintln!("ebb-bench: some rounds do not count (see the table's notes)");
    }
    Ok(all_ok)
}
