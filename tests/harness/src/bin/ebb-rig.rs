//! `ebb-rig`: run a program, a shell line, or the QEMU peer inside the nested test host.
//!
//! ```text
//! ebb-rig run  [--input FILE]... [--sample-comm NAME] [--sample-ms MS] -- PROGRAM [ARGS]...
//! ebb-rig sh   [--input FILE]... 'shell command line'      (ebb-guest, rig-peer, rig-sample on PATH)
//! ebb-rig peer [--mem MIB] [--cpus N] [--append ARGS] -- GUEST COMMAND...
//! ebb-rig info
//! ```
//! The console streams to stderr; a summary goes to stdout; the exit status is the job's.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ebb_harness::{HostVirt, Job, Mode, PeerJob, Rig, RunOutput};

#[derive(Parser)]
#[command(
    name = "ebb-rig",
    about = "Run programs inside ebb's nested test host (L1 with kvm-amd)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct Common {
    /// Timeout for the whole run, L1 boot included, in seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Run directly on the host or nested (default: auto, or EBB_RIG_MODE).
    #[arg(long)]
    mode: Option<String>,
    /// Do not stream the console to stderr.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct JobOpts {
    /// Host file copied into the job's working directory (repeatable).
    #[arg(long = "input")]
    inputs: Vec<PathBuf>,
    /// Sample VmRSS/VmPTE of processes with this name (/proc/PID/comm).
    #[arg(long)]
    sample_comm: Option<String>,
    /// Sampling interval in milliseconds.
    #[arg(long, default_value_t = 500)]
    sample_ms: u32,
    /// Extra environment for the job, KEY=VALUE (repeatable).
    #[arg(long = "env")]
    envs: Vec<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Copy PROGRAM (and inputs) into L1 and run it there.
    Run {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        job: JobOpts,
        /// The program (a host path) and its arguments.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Run a shell command line in L1.
    Sh {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        job: JobOpts,
        /// The command line.
        line: String,
    },
    /// Boot the L2 guest in the QEMU peer inside L1 and run a command in the guest.
    Peer {
        #[command(flatten)]
        common: Common,
        /// Guest memory, MiB.
        #[arg(long, default_value_t = 1024)]
        mem: u32,
        /// Guest vCPUs.
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// QEMU sampling interval, ms (0: final sample only).
        #[arg(long, default_value_t = 1000)]
        sample_ms: u32,
        /// Extra guest kernel command line.
        #[arg(long, default_value = "")]
        append: String,
        /// The guest command line.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Print the mode and image paths.
    Info,
}

fn rig(common: &Common) -> Result<Rig, ebb_harness::RigError> {
    let mut rig = Rig::from_env()?;
    if let Some(m) = &common.mode {
        rig.mode = ebb_harness::select_mode(Some(m), &HostVirt::probe())?;
    }
    rig.echo = !common.quiet;
    Ok(rig)
}

fn with_opts(mut job: Job, o: &JobOpts, common: &Common) -> Result<Job, String> {
    job = job.timeout(Duration::from_secs(common.timeout));
    for i in &o.inputs {
        job = job.input(i);
    }
    if let Some(c) = &o.sample_comm {
        job = job.sample(c, o.sample_ms);
    }
    for e in &o.envs {
        let (k, v) = e
            .split_once('=')
            .ok_or_else(|| format!("--env {e}: expected KEY=VALUE"))?;
        job = job.env(k, v);
    }
    Ok(job)
}

fn summary(out: &RunOutput) {
    for r in &out.results {
        let fields: Vec<String> = r.fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("result {} {}", r.name, fields.join(" "));
    }
    for s in &out.samples {
        println!(
            "sample label={} pid={} comm={} t_ms={} VmRSS={} VmPTE={} SecPageTables={} PageTables={}",
            s.label,
            s.pid,
            s.comm,
            s.t_ms,
            s.vm_rss_kb,
            s.vm_pte_kb,
            s.meminfo.sec_page_tables_kb,
            s.meminfo.page_tables_kb
        );
    }
    if let Some(g) = out.guest_status {
        println!("guest_status={g}");
    }
    println!(
        "status={} mode={:?} elapsed_s={:.1} SecPageTables={} PageTables={}",
        out.status,
        out.mode,
        out.elapsed.as_secs_f64(),
        out.meminfo.sec_page_tables_kb,
        out.meminfo.page_tables_kb
    );
}

fn code(status: i32) -> ExitCode {
    ExitCode::from(u8::try_from(status).unwrap_or(1))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res: Result<ExitCode, Box<dyn std::error::Error>> = (|| match &cli.cmd {
        Cmd::Run { common, job, argv } => {
            let rig = rig(common)?;
            let (prog, args) = argv.split_first().ok_or("no program")?;
            let j = with_opts(Job::program(prog, args.iter().cloned()), job, common)?;
            let out = rig.run(&j)?;
            summary(&out);
            Ok(code(out.status))
        }
        Cmd::Sh { common, job, line } => {
            let rig = rig(common)?;
            let out = rig.run(&with_opts(Job::shell(line.clone()), job, common)?)?;
            summary(&out);
            Ok(code(out.status))
        }
        Cmd::Peer {
            common,
            mem,
            cpus,
            sample_ms,
            append,
            argv,
        } => {
            let rig = rig(common)?;
            let mut p = PeerJob::new(argv.join(" "));
            p.mem_mib = *mem;
            p.cpus = *cpus;
            p.sample_ms = *sample_ms;
            p.append = append.clone();
            p.timeout = Duration::from_secs(common.timeout);
            let out = rig.run_peer(&p)?;
            summary(&out.run);
            Ok(code(out.guest_status))
        }
        Cmd::Info => {
            let host = HostVirt::probe();
            println!("host: {host:?}");
            match Rig::from_env() {
                Ok(r) => {
                    println!(
                        "mode: {:?}{}",
                        r.mode,
                        if r.mode == Mode::Nested {
                            " (QEMU TCG, L1 with kvm-amd)"
                        } else {
                            ""
                        }
                    );
                    println!(
                        "outer QEMU: {} -accel {} -cpu {}; L1: {} vCPUs, {} MiB",
                        r.qemu.display(),
                        r.accel,
                        r.cpu,
                        r.l1_cpus,
                        r.l1_mem_mib
                    );
                    println!("{:#?}", r.images);
                }
                Err(e) => println!("images: {e}"),
            }
            Ok(ExitCode::SUCCESS)
        }
    })();
    match res {
        Ok(c) => c,
        Err(e) => {
            let mut msg = format!("ebb-rig: {e}");
            let mut src = e.source();
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("{msg}");
            ExitCode::from(125)
        }
    }
}
