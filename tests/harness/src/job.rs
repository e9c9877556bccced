//! A job: what to run in L1 (or on the host), with which files, for how long, and what to sample.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cpio::CpioWriter;
use crate::error::RigError;

/// What the job executes.
#[derive(Clone, Debug)]
pub enum Command {
    /// A program from the host (copied into the job's input directory) and its arguments.
    Program { path: PathBuf, args: Vec<String> },
    /// A shell command line run by `sh` in the job's input directory; the rig's tools
    /// (`ebb-guest`, `rig-peer`, `rig-sample`, `rig-meminfo`) are on its PATH.
    Shell(String),
}

/// Periodic sampling of processes by name.
#[derive(Clone, Debug)]
pub struct Sampling {
    /// Process name as in `/proc/<pid>/comm` (at most 15 characters).
    pub comm: String,
    /// Interval in milliseconds.
    pub interval_ms: u32,
}

/// One run.
#[derive(Clone, Debug)]
pub struct Job {
    pub command: Command,
    /// Host files copied into the job's input directory (its working directory), by file name.
    pub inputs: Vec<PathBuf>,
    /// Extra environment for the command.
    pub env: Vec<(String, String)>,
    pub sample: Option<Sampling>,
    /// Wall-clock limit for the whole run, L1 boot included.
    pub timeout: Duration,
}

impl Job {
    /// A job running `path` with `args`, a 5-minute timeout, no inputs and no sampling.
    pub fn program(
        path: impl Into<PathBuf>,
        args: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Self::new(Command::Program {
            path: path.into(),
            args: args.into_iter().map(Into::into).collect(),
        })
    }

    /// A job running a shell command line.
    pub fn shell(line: impl Into<String>) -> Self {
        Self::new(Command::Shell(line.into()))
    }

    fn new(command: Command) -> Self {
        Job {
            command,
            inputs: Vec::new(),
            env: Vec::new(),
            sample: None,
            timeout: Duration::from_secs(300),
        }
    }

    /// Sets the timeout.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Adds an input file.
    pub fn input(mut self, p: impl Into<PathBuf>) -> Self {
        self.inputs.push(p.into());
        self
    }

    /// Samples processes named `comm` every `interval_ms`.
    pub fn sample(mut self, comm: impl Into<String>, interval_ms: u32) -> Self {
        self.sample = Some(Sampling {
            comm: comm.into(),
            interval_ms,
        });
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
}

/// Quotes `s` for a POSIX shell.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn file_name(p: &Path) -> Result<String, RigError> {
    let n = p
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| RigError::BadInputName(p.display().to_string()))?;
    if n.is_empty() || n.contains('/') || n == "." || n == ".." {
        return Err(RigError::BadInputName(n.to_string()));
    }
    Ok(n.to_string())
}

/// A job laid out as files: `cmd`, `env` and `in/<name>` (contents and permission bits).
pub struct JobFiles {
    pub cmd: String,
    pub env: String,
    pub inputs: Vec<(String, u32, Vec<u8>)>,
}

impl JobFiles {
    /// Reads the job's files from the host and writes its `cmd` and `env` scripts.
    pub fn build(job: &Job) -> Result<Self, RigError> {
        let mut inputs = Vec::new();
        let mut add = |p: &Path| -> Result<String, RigError> {
            use std::os::unix::fs::PermissionsExt;
            let name = file_name(p)?;
            let io = |source| RigError::JobFile {
                path: p.to_path_buf(),
                source,
            };
            let data = std::fs::read(p).map_err(io)?;
            let perm = std::fs::metadata(p).map_err(io)?.permissions().mode() & 0o777;
            if inputs
                .iter()
                .any(|(n, _, _): &(String, u32, Vec<u8>)| *n == name)
            {
                return Err(RigError::BadInputName(format!("{name} (given twice)")));
            }
            inputs.push((name.clone(), perm, data));
            Ok(name)
        };
        for p in &job.inputs {
            add(p)?;
        }
        let cmd = match &job.command {
            Command::Program { path, args } => {
                let name = add(path)?;
                let mut line = format!("exec ./{}", sh_quote(&name));
                for a in args {
                    line.push(' ');
                    line.push_str(&sh_quote(a));
                }
                line + "\n"
            }
            Command::Shell(s) => format!("{s}\n"),
        };
        let mut env = String::new();
        if let Some(s) = &job.sample {
            env += &format!(
                "RIG_SAMPLE_COMM={}\nRIG_SAMPLE_MS={}\n",
                sh_quote(&s.comm),
                s.interval_ms.max(50)
            );
        }
        for (k, v) in &job.env {
            if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(RigError::BadInputName(format!("environment name {k:?}")));
            }
            env += &format!("export {k}={}\n", sh_quote(v));
        }
        Ok(JobFiles { cmd, env, inputs })
    }

    /// The per-run cpio archive: `/rig/job/{cmd,env,in/...}`.
    pub fn to_cpio(&self) -> Vec<u8> {
        let mut w = CpioWriter::new();
        w.dir("rig");
        w.dir("rig/job");
        w.dir("rig/job/in");
        w.file("rig/job/cmd", 0o755, self.cmd.as_bytes());
        w.file("rig/job/env", 0o644, self.env.as_bytes());
        for (n, perm, data) in &self.inputs {
            w.file(&format!("rig/job/in/{n}"), *perm, data);
        }
        w.finish()
    }

    /// Writes the job into `dir` (host mode): `dir/cmd`, `dir/env`, `dir/in/...`.
    pub fn write_dir(&self, dir: &Path) -> Result<(), RigError> {
        use std::os::unix::fs::PermissionsExt;
        let w = |p: PathBuf, data: &[u8], perm: u32| -> Result<(), RigError> {
            let e = |source| RigError::TempFile {
                path: p.clone(),
                source,
            };
            std::fs::write(&p, data).map_err(e)?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(perm)).map_err(e)
        };
        let indir = dir.join("in");
        std::fs::create_dir_all(&indir).map_err(|source| RigError::TempFile {
            path: indir.clone(),
            source,
        })?;
        w(dir.join("cmd"), self.cmd.as_bytes(), 0o755)?;
        w(dir.join("env"), self.env.as_bytes(), 0o644)?;
        for (n, perm, data) in &self.inputs {
            w(indir.join(n), data, *perm)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn program_job_layout() {
        let exe = std::env::current_exe().unwrap();
        let name = exe.file_name().unwrap().to_str().unwrap().to_string();
        let job = Job::program(&exe, ["--x", "a b"])
            .sample("qemu-system-x86", 10)
            .env("K_1", "v v");
        let f = JobFiles::build(&job).unwrap();
        assert_eq!(f.cmd, format!("exec ./'{name}' '--x' 'a b'\n"));
        assert!(
            f.env
                .contains("RIG_SAMPLE_COMM='qemu-system-x86'\nRIG_SAMPLE_MS=50\n")
        );
        assert!(f.env.contains("export K_1='v v'\n"));
        assert_eq!(f.inputs.len(), 1);
        assert_eq!(f.inputs[0].1 & 0o100, 0o100, "executable bit kept");
        assert!(!f.to_cpio().is_empty());
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(JobFiles::build(&Job::program("/nonexistent/prog", Vec::<String>::new())).is_err());
        let exe = std::env::current_exe().unwrap();
        assert!(JobFiles::build(&Job::shell("true").input(&exe).input(&exe)).is_err());
        assert!(JobFiles::build(&Job::shell("true").env("A-B", "x")).is_err());
    }
}
