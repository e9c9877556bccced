//! Running a job: nested (QEMU TCG booting L1 with the job appended to its initramfs) or directly
//! on a host with hardware virtualization. Both speak the same console protocol (`rig-job`).

use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::console::{Console, read_lines};
use crate::error::RigError;
use crate::host::{HostVirt, Mode, select_mode};
use crate::images::RigImages;
use crate::job::{Job, JobFiles};
use crate::protocol::{Meminfo, ProcSample, ResultLine, Transcript};
use crate::rerun::{FaultSeen, Reruns, RigFault};
use crate::tempdir::TempDir;

/// How long a run may go on after L1's kernel oopsed (to print the trace).
const OOPS_GRACE: Duration = Duration::from_secs(10);

/// How long L1 may go without its heartbeat (`EBB-RIG-ALIVE`, every 15 s of L1's time) once
/// the job has begun before the run counts as lost with L1 ([`RigError::L1Stopped`]). Far above
/// the heartbeat's period even when the machine's load slows L1 several times.
const L1_SILENCE: Duration = Duration::from_secs(300);

/// What is missing when L1's console ended before it reached the job (see [`RigFault::L1Boot`]).
pub const L1_DID_NOT_BOOT: &str = "EBB-RIG-KVM (L1 did not boot)";

/// The outer QEMU's accelerator unless `EBB_RIG_QEMU_ACCEL` says otherwise.
pub const DEFAULT_ACCEL: &str = "tcg,thread=multi";
/// The CPU the outer QEMU emulates for L1 unless `EBB_RIG_CPU` says otherwise (it must offer
/// SVM with NPT for kvm-amd in L1).
pub const DEFAULT_CPU: &str = "EPYC,+svm,+npt";

/// How many console lines an error message carries.
const TAIL_LINES: usize = 40;

/// The outcome of a job that ran to its end (whatever its exit status).
#[derive(Clone, Debug)]
pub struct RunOutput {
    pub mode: Mode,
    /// The job's exit status.
    pub status: i32,
    /// The job's output lines (stdout and stderr), markers of the rig removed.
    pub output: Vec<String>,
    /// `EBB-RESULT` lines in the output.
    pub results: Vec<ResultLine>,
    /// `EBB-RIG-SAMPLE` lines (periodic sampling or `rig-sample` calls).
    pub samples: Vec<ProcSample>,
    /// L1's (or the host's) page-table counters after the job.
    pub meminfo: Meminfo,
    /// The L2 guest's exit status if the job booted one that printed `EBB-L2-END`.
    pub guest_status: Option<i32>,
    /// The whole console, for diagnostics.
    pub console: Vec<String>,
    /// Wall-clock time of the whole run (L1 boot included).
    pub elapsed: Duration,
    /// Earlier attempts that ended in a rig fault and were run again (see [`Reruns`]).
    pub rig_faults: Vec<FaultSeen>,
    /// L1's heartbeats (`EBB-RIG-ALIVE`) during the job: one per 15 s of L1's time, none in
    /// host mode.
    pub l1_heartbeats: u64,
    /// L1's held idle VM during the job (`pid=N`, see `ebb-guest kvm-pin`), or why it could
    /// not be held; `None` in host mode.
    pub l1_kvm_pin: Option<String>,
}

impl RunOutput {
    /// The first result line named `name`.
    pub fn result(&self, name: &str) -> Option<&ResultLine> {
        self.results.iter().find(|r| r.name == name)
    }

    /// The output as one text.
    pub fn output_text(&self) -> String {
        self.output.join("\n")
    }

    /// The last console lines, for error messages.
    pub fn tail(&self) -> String {
        tail(&self.console)
    }
}

fn tail(lines: &[String]) -> String {
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

/// The rig: images, mode, and how to start L1.
#[derive(Clone, Debug)]
pub struct Rig {
    pub images: RigImages,
    pub mode: Mode,
    /// The outer QEMU (nested mode).
    pub qemu: PathBuf,
    /// L1 memory in MiB.
    pub l1_mem_mib: u32,
    /// L1 vCPUs.
    pub l1_cpus: u32,
    /// Extra L1 kernel command line.
    pub l1_append: String,
    /// The outer QEMU's `-accel` value ([`DEFAULT_ACCEL`]).
    pub accel: String,
    /// The outer QEMU's `-cpu` value ([`DEFAULT_CPU`]).
    pub cpu: String,
    /// Copy every console line to stderr as it arrives.
    pub echo: bool,
    /// How many times [`Rig::run`] starts a job again after L1 oopsed or did not boot
    /// (default 1; `EBB_RIG_L1_OOPS_RETRIES`).
    pub l1_oops_retries: u32,
}

fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_string())
}

impl Rig {
    /// Configuration from the environment: images from `EBB_CACHE` (see [`RigImages::locate`]),
    /// `EBB_RIG_MODE`, `EBB_RIG_QEMU` (default: `qemu-system-x86_64` on PATH), `EBB_RIG_L1_MEM` (MiB, 3072), `EBB_RIG_L1_CPUS` (2),
    /// `EBB_RIG_L1_APPEND`, `EBB_RIG_QEMU_ACCEL` ([`DEFAULT_ACCEL`]), `EBB_RIG_CPU`
    /// ([`DEFAULT_CPU`]), `EBB_RIG_ECHO=1`.
    pub fn from_env() -> Result<Self, RigError> {
        let images = RigImages::locate()?;
        let qemu = std::env::var_os("EBB_RIG_QEMU")
            .filter(|q| !q.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| "qemu-system-x86_64".into());
        let mode = select_mode(
            std::env::var("EBB_RIG_MODE").ok().as_deref(),
            &HostVirt::probe(),
        )?;
        Ok(Rig {
            images,
            mode,
            qemu,
            l1_mem_mib: env_u32("EBB_RIG_L1_MEM", 3072),
            l1_cpus: env_u32("EBB_RIG_L1_CPUS", 2),
            l1_append: std::env::var("EBB_RIG_L1_APPEND").unwrap_or_default(),
            accel: env_or("EBB_RIG_QEMU_ACCEL", DEFAULT_ACCEL),
            cpu: env_or("EBB_RIG_CPU", DEFAULT_CPU),
            echo: std::env::var("EBB_RIG_ECHO").is_ok_and(|v| v == "1"),
            l1_oops_retries: env_u32("EBB_RIG_L1_OOPS_RETRIES", 1),
        })
    }

    /// Runs `job` and returns its output once it has ended. A non-zero exit status is not an
    /// error (see [`RunOutput::status`]); a rig that could not run the job to its end is. Rig
    /// faults of L1 itself (an oops, a lost boot) are run again per [`Rig::l1_reruns`].
    pub fn run(&self, job: &Job) -> Result<RunOutput, RigError> {
        self.run_with(job, &self.l1_reruns("rig job"))
    }

    /// The default re-runs: L1's own faults ([`RigFault::L1Oops`], [`RigFault::L1Lockup`],
    /// [`RigFault::L1Boot`], [`RigFault::L1TripleFault`], [`RigFault::L1Stopped`]), at most
    /// [`Rig::l1_oops_retries`] times. Tests add their own faults to it with [`Reruns::on`].
    pub fn l1_reruns(&self, what: impl Into<String>) -> Reruns {
        Reruns::new(what, self.l1_oops_retries)
            .on(RigFault::L1Oops)
            .on(RigFault::L1Lockup)
            .on(RigFault::L1Boot)
            .on(RigFault::L1TripleFault)
            .on(RigFault::L1Stopped)
    }

    /// The re-runs of a job that runs ebb's guest: [`Rig::l1_reruns`] and the rig faults seen in
    /// L2 under ebb ([`RigFault::EbbTripleFault`], [`RigFault::EbbKvmInternalError`],
    /// [`RigFault::GuestInt3Oops`]), at most twice (docs/ARCHITECTURE.md, "Known flakiness").
    /// Three in a row fail the run with each attempt's evidence.
    pub fn ebb_reruns(&self, what: impl Into<String>) -> Reruns {
        self.l1_reruns(what)
            .on(RigFault::EbbTripleFault)
            .on(RigFault::EbbKvmInternalError)
            .on(RigFault::GuestInt3Oops)
            .max_reruns(2)
    }

    /// The re-runs of a job that runs the QEMU peer's guest: [`Rig::l1_reruns`] and the rig
    /// faults seen in L2 under the peer ([`RigFault::PeerNoBoot`],
    /// [`RigFault::PeerKvmInternalError`], [`RigFault::PeerStoppedEarly`],
    /// [`RigFault::GuestInt3Oops`]), at most twice (docs/ARCHITECTURE.md, "Known flakiness").
    pub fn peer_reruns(&self, what: impl Into<String>) -> Reruns {
        self.l1_reruns(what)
            .on(RigFault::PeerNoBoot)
            .on(RigFault::PeerKvmInternalError)
            .on(RigFault::PeerStoppedEarly)
            .on(RigFault::GuestInt3Oops)
            .max_reruns(2)
    }

    /// Runs `job`, running it again after the rig faults `reruns` names (see [`Reruns`]). Every
    /// attempt ending in one of them gives [`RigError::RigFaults`] with each attempt's evidence.
    pub fn run_with(&self, job: &Job, reruns: &Reruns) -> Result<RunOutput, RigError> {
        let r = reruns.run(|_| self.run_once(job), |o| reruns.classify(o))?;
        let mut out = r.outcome?;
        out.rig_faults = r.rig_faults;
        Ok(out)
    }

    fn run_once(&self, job: &Job) -> Result<RunOutput, RigError> {
        let files = JobFiles::build(job)?;
        let tmp = TempDir::new()?;
        let start = Instant::now();
        log::info!(
            "rig: running a job ({:?} mode, timeout {:?})",
            self.mode,
            job.timeout
        );
        let Collected {
            transcript: t,
            console,
            exit,
        } = match self.mode {
            Mode::Nested => self.run_nested(&files, &tmp, job.timeout)?,
            Mode::Host => self.run_host(&files, &tmp, job.timeout)?,
        };
        let elapsed = start.elapsed();
        if let Some(message) = t.l1_oops.clone() {
            return Err(RigError::L1Oops {
                message,
                tail: tail(&console),
            });
        }
        if let Some(message) = t.l1_lockup.clone() {
            return Err(RigError::L1Lockup {
                message,
                tail: tail(&console),
            });
        }
        if self.mode == Mode::Nested && l1_triple_faulted(&tmp) {
            return Err(RigError::L1TripleFault {
                tail: tail(&console),
            });
        }
        if let Some(message) = t.errors.first() {
            return Err(RigError::L1 {
                message: message.clone(),
            });
        }
        let missing = if self.mode == Mode::Nested && t.kvm.is_none() {
            Some(L1_DID_NOT_BOOT)
        } else if !t.begun {
            Some("EBB-RIG-BEGIN")
        } else if t.status.is_none() {
            Some("EBB-RIG-END (the job did not finish)")
        } else if t.meminfo.is_none() || (self.mode == Mode::Nested && !t.done) {
            Some("EBB-RIG-DONE")
        } else {
            None
        };
        if let Some(missing) = missing {
            return Err(RigError::Incomplete {
                missing,
                exit,
                tail: tail(&console),
            });
        }
        log::info!(
            "rig: job ended with status {:?} after {elapsed:?}",
            t.status
        );
        Ok(RunOutput {
            mode: self.mode,
            status: t.status.unwrap_or(-1),
            output: t.output,
            results: t.results,
            samples: t.samples,
            meminfo: t.meminfo.unwrap_or_default(),
            guest_status: t.guest_status,
            console,
            elapsed,
            rig_faults: Vec::new(),
            l1_heartbeats: t.heartbeats,
            l1_kvm_pin: t.kvm_pin.clone(),
        })
    }

    fn run_nested(
        &self,
        files: &JobFiles,
        tmp: &TempDir,
        timeout: Duration,
    ) -> Result<Collected, RigError> {
        // L1 initramfs followed by the job's archive (the kernel unpacks both).
        let initrd = tmp.path().join("l1-job.cpio");
        let e = |source| RigError::TempFile {
            path: initrd.clone(),
            source,
        };
        std::fs::copy(&self.images.l1_initramfs, &initrd).map_err(e)?;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&initrd)
            .map_err(e)?;
        f.write_all(&files.to_cpio()).map_err(e)?;
        drop(f);
        let mut append = "console=ttyS0 panic=-1 quiet".to_string();
        if !self.l1_append.is_empty() {
            append = format!("{append} {}", self.l1_append);
        }
        let monitor = tmp.path().join(L0_MONITOR);
        let mut cmd = std::process::Command::new(&self.qemu);
        cmd.args(["-accel", &self.accel, "-cpu", &self.cpu])
            .args([
                "-smp",
                &self.l1_cpus.to_string(),
                "-m",
                &self.l1_mem_mib.to_string(),
            ])
            .args(["-nographic", "-no-reboot", "-net", "none"])
            // A monitor to ask where L1's CPUs are when L1 stops beating (RigError::L1Stopped).
            .arg("-monitor")
            .arg(format!("unix:{},server=on,wait=off", monitor.display()))
            // CPU resets are logged, so a triple fault in L1 (which -no-reboot turns into a
            // silent exit with status 0) can be told from L1 powering off.
            .args(["-d", "cpu_reset", "-D"])
            .arg(tmp.path().join(L1_QEMU_LOG))
            .arg("-kernel")
            .arg(&self.images.l1_kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", &append])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().map_err(|source| RigError::Spawn {
            program: self.qemu.display().to_string(),
            source,
        })?;
        self.collect(child, timeout, &monitor)
    }

    fn run_host(
        &self,
        files: &JobFiles,
        tmp: &TempDir,
        timeout: Duration,
    ) -> Result<Collected, RigError> {
        use std::os::unix::process::CommandExt;
        let jobdir = tmp.path().join("job");
        files.write_dir(&jobdir)?;
        let tools_dir = self
            .images
            .guest_tools
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default();
        let path = format!(
            "{}:{}:{}",
            self.images.rig_bin.display(),
            tools_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let (reader, writer) = std::io::pipe().map_err(|source| RigError::Io {
            what: "creating a pipe",
            source,
        })?;
        let writer2 = writer.try_clone().map_err(|source| RigError::Io {
            what: "creating a pipe",
            source,
        })?;
        let mut cmd = std::process::Command::new("sh");
        cmd.arg(self.images.rig_bin.join("rig-job"))
            .arg(&jobdir)
            .env("PATH", path)
            .env("EBB_RIG", "host")
            .env("EBB_PEER_QMP", tmp.path().join("peer-qmp.sock"))
            .env("EBB_L2_KERNEL", &self.images.l2_kernel)
            .env("EBB_L2_VMLINUX", &self.images.l2_vmlinux)
            .env("EBB_L2_INITRAMFS", &self.images.l2_initramfs)
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(writer2)
            .process_group(0);
        let child = cmd.spawn().map_err(|source| RigError::Spawn {
            program: "sh rig-job".into(),
            source,
        })?;
        // The Command still holds the pipe's write ends: drop it so EOF arrives when the job ends.
        drop(cmd);
        self.collect_from(child, Box::new(reader), timeout, true, None)
    }

    /// [`Self::collect_from`] for the outer QEMU, whose monitor listens on `monitor`.
    fn collect(
        &self,
        mut child: Child,
        timeout: Duration,
        monitor: &Path,
    ) -> Result<Collected, RigError> {
        let out = child.stdout.take().ok_or(RigError::Io {
            what: "taking QEMU's stdout",
            source: std::io::ErrorKind::BrokenPipe.into(),
        })?;
        self.collect_from(child, Box::new(out), timeout, false, Some(monitor))
    }

    /// Reads console lines until EOF or the timeout; kills the process (group) on timeout.
    /// When L1 stops beating, the outer QEMU's `monitor` (if any) is asked where L1's CPUs are
    /// before the run is stopped.
    fn collect_from(
        &self,
        mut child: Child,
        out: Box<dyn Read + Send>,
        timeout: Duration,
        group: bool,
        monitor: Option<&Path>,
    ) -> Result<Collected, RigError> {
        let stderr = child.stderr.take().map(|mut e| {
            std::thread::spawn(move || {
                // Keep the first MiB; drain the rest so QEMU never blocks on a full pipe.
                let mut b = Vec::new();
                let _ = (&mut e).take(1 << 20).read_to_end(&mut b);
                let _ = std::io::copy(&mut e, &mut std::io::sink());
                String::from_utf8_lossy(&b).into_owned()
            })
        });
        let (tx, rx) = mpsc::channel::<String>();
        let reader =
            std::thread::spawn(move || read_lines(BufReader::new(out), |l| tx.send(l).is_ok()));
        let deadline = Instant::now() + timeout;
        // After an L1 oops the run gets a few seconds to print the trace, then it is stopped.
        let mut oops_deadline: Option<Instant> = None;
        let mut console = Console::default();
        let mut timed_out = false;
        // Set by the first heartbeat: L1 must beat again before it passes.
        let mut silence_deadline: Option<Instant> = None;
        let mut beats = 0;
        // Set when L1 stopped beating: what the monitor said about its CPUs.
        let mut l1_stopped: Option<String> = None;
        loop {
            let until = [oops_deadline, silence_deadline]
                .into_iter()
                .flatten()
                .fold(deadline, Instant::min);
            let left = until.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if self.echo {
                        eprintln!("{line}");
                    }
                    console.push(line);
                    let t = &console.transcript;
                    if t.heartbeats != beats {
                        beats = t.heartbeats;
                        silence_deadline = Some(Instant::now() + L1_SILENCE);
                    }
                    if oops_deadline.is_none() && (t.l1_oops.is_some() || t.l1_lockup.is_some()) {
                        oops_deadline = Some(Instant::now() + OOPS_GRACE);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if oops_deadline.is_some_and(|o| Instant::now() >= o) {
                        // Stopped for the oops, reported as such by run_once.
                        kill(&mut child, group);
                        break;
                    }
                    if silence_deadline.is_some_and(|s| Instant::now() >= s && s < deadline) {
                        l1_stopped = Some(match monitor {
                            Some(m) => l1_cpus(m),
                            None => "(no monitor)".to_string(),
                        });
                        kill(&mut child, group);
                        break;
                    }
                    timed_out = true;
                    break;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        if timed_out {
            kill(&mut child, group);
        }
        let status = child.wait().map_err(|source| RigError::Io {
            what: "waiting for the run",
            source,
        })?;
        let _ = reader.join();
        let err_text = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
        let (transcript, console) = console.into_lines();
        if let Some(cpu) = l1_stopped {
            return Err(RigError::L1Stopped {
                silent: L1_SILENCE,
                tail: tail(&console),
                cpu,
            });
        }
        if timed_out {
            let mut t = tail(&console);
            if !err_text.is_empty() {
                t = format!("{t}\n[stderr]\n{}", last_lines(&err_text, 10));
            }
            return Err(RigError::Timeout {
                after: timeout,
                tail: t,
            });
        }
        let mut exit = status.to_string();
        let errs = last_lines(&err_text, 10);
        if !errs.is_empty() && !status.success() {
            exit = format!("{exit}; stderr:\n{errs}");
        }
        Ok(Collected {
            transcript,
            console,
            exit,
        })
    }
}

/// QEMU's log for L1 (`-D`), in the run's temporary directory.
const L1_QEMU_LOG: &str = "l1-qemu.log";

/// The outer QEMU's monitor socket (HMP), in the run's temporary directory.
const L0_MONITOR: &str = "l0-monitor.sock";

/// Asks the outer QEMU's monitor (HMP) at `path` for `info cpus` and `info registers -a`:
/// where L1's CPUs are (halted or not, RIP, flags; L2's state when L1 was running its guest).
/// Never fails: a monitor that cannot be asked gives the reason instead.
pub fn l1_cpus(path: &Path) -> String {
    use std::os::unix::net::UnixStream;
    let ask = || -> std::io::Result<String> {
        let mut m = UnixStream::connect(path)?;
        m.set_read_timeout(Some(Duration::from_secs(2)))?;
        m.write_all(b"info cpus\ninfo registers -a\n")?;
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        // Read until the monitor has been quiet for the timeout (or 256 KiB).
        loop {
            match m.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(e) => return Err(e),
            }
            if out.len() > 256 << 10 {
                break;
            }
        }
        Ok(monitor_text(&out))
    };
    ask().unwrap_or_else(|e| format!("(the monitor could not be asked: {e})"))
}

/// One line per CPU from [`l1_cpus`]'s answer: its instruction pointer, flags, privilege level,
/// whether it is halted, CR3, and whose state it is: L1's own (EFER.SVME set, as L1's KVM sets
/// it) or the L2 guest's that L1 was running (clear). Empty if the answer has no registers.
pub fn l1_cpu_summary(dump: &str) -> String {
    let keep = |t: &str| {
        ["RIP=", "EIP=", "RFL=", "EFL=", "CPL=", "HLT=", "CR3="]
            .iter()
            .any(|k| t.starts_with(k))
    };
    let mut cpus: Vec<String> = Vec::new();
    for line in dump.lines() {
        let line = line.trim();
        if line.starts_with("CPU#") {
            cpus.push(line.to_string());
            continue;
        }
        let Some(cur) = cpus.last_mut() else {
            continue;
        };
        if line.contains("HLT=") || line.starts_with("CR0=") {
            for t in line.split_whitespace().filter(|t| keep(t)) {
                cur.push(' ');
                cur.push_str(t);
            }
        } else if let Some(v) = line.strip_prefix("EFER=") {
            let efer = u64::from_str_radix(v.trim(), 16).unwrap_or(0);
            cur.push_str(if efer & (1 << 12) != 0 {
                " (L1's own state)"
            } else {
                " (in L2)"
            });
        }
    }
    cpus.join("; ")
}

/// The monitor's output as plain lines: terminal escape sequences and carriage returns gone;
/// the banner, the prompts with their echoed commands, and the debug, x87 and vector registers
/// dropped (the general registers, flags, segments and control registers stay).
fn monitor_text(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut plain = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                // ESC [ ... final byte (a letter).
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for d in chars.by_ref() {
                        if d.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            c => plain.push(c),
        }
    }
    plain
        .lines()
        .filter(|l| {
            const NOISE: [&str; 9] = [
                "QEMU ", "(qemu)", "FPR", "XMM", "YMM", "ZMM", "FCW", "DR", "Opmask",
            ];
            !l.trim().is_empty() && !NOISE.iter().any(|n| l.starts_with(n))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether QEMU logged a triple fault of L1's CPU (x86 TCG logs "Triple fault" under
/// `-d cpu_reset` before it requests the reset).
fn l1_triple_faulted(tmp: &TempDir) -> bool {
    std::fs::read(tmp.path().join(L1_QEMU_LOG))
        .is_ok_and(|log| log.windows(12).any(|w| w == b"Triple fault"))
}

/// What a run printed, parsed.
struct Collected {
    transcript: Transcript,
    console: Vec<String>,
    exit: String,
}

fn last_lines(s: &str, n: usize) -> String {
    // QEMU's TCG prints one warning per CPUID feature it cannot emulate: not interesting.
    let lines: Vec<&str> = s
        .lines()
        .filter(|l| !l.contains("TCG doesn't support requested feature"))
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn kill(child: &mut Child, group: bool) {
    if group {
        let pgid = child.id() as libc::pid_t;
        // SAFETY: kill(2) with a negative pid signals the process group we created for this job
        // (process_group(0) made the child its leader); it touches no memory of ours.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
    let _ = child.kill();
}
