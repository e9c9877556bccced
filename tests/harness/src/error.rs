//! What can go wrong while preparing or running a rig job.

use std::path::PathBuf;
use std::time::Duration;

/// Why a rig run did not produce a result.
#[derive(Debug, thiserror::Error)]
pub enum RigError {
    /// The images are not built (or the cache points elsewhere).
    #[error("rig image {path} is missing: run resources/setup.sh first (or set EBB_CACHE)")]
    ImageMissing { path: PathBuf },
    /// A file the job needs could not be read.
    #[error("cannot read job file {path}")]
    JobFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A job input has a name that cannot be placed in the job directory.
    #[error("job input name {0:?} is not a plain file name")]
    BadInputName(String),
    /// Writing a temporary file failed.
    #[error("cannot write {path}")]
    TempFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// QEMU or the job could not be started.
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// Reading the console or waiting for the process failed.
    #[error("i/o error while {what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Building a static binary for the rig failed.
    #[error("building the static {package} binary failed ({status})")]
    StaticBuild { package: String, status: String },
    /// The run took longer than its timeout; QEMU (or the job) was killed.
    #[error("timed out after {after:?}; last console lines:\n{tail}")]
    Timeout { after: Duration, tail: String },
    /// L1 reported a failure before the job ran (e.g. no /dev/kvm).
    #[error("L1 failed: {message}")]
    L1 { message: String },
    /// L1's own kernel oopsed during the run (under TCG this is an emulation fault, e.g. in
    /// cross-modified kernel code); the run was stopped.
    #[error("L1 kernel oops: {message}; last console lines:\n{tail}")]
    L1Oops { message: String, tail: String },
    /// L1's kernel reported a CPU stuck (a soft lockup or an RCU stall); the run was stopped
    /// seconds after the first report instead of waiting for its timeout.
    #[error("L1 kernel lockup: {message}; last console lines:\n{tail}")]
    L1Lockup { message: String, tail: String },
    /// L1's heartbeat (`EBB-RIG-ALIVE`, every 15 s while the job runs) stopped: L1 itself made no
    /// progress for `silent`, and the run was stopped then instead of at its timeout.
    /// `cpu` is what the outer QEMU's monitor said about L1's CPUs then (`info cpus`,
    /// `info registers -a`), or why it could not be asked.
    #[error(
        "L1 stopped: no heartbeat for {silent:?}; last console lines:\n{tail}\n\
         L1's CPUs then (outer QEMU's monitor):\n{cpu}"
    )]
    L1Stopped {
        silent: Duration,
        tail: String,
        cpu: String,
    },
    /// L1's emulated CPU triple-faulted (QEMU's log says "Triple fault"); with `-no-reboot` QEMU
    /// then exits with status 0, in the middle of the job.
    #[error("L1 triple-faulted (QEMU's log); last console lines:\n{tail}")]
    L1TripleFault { tail: String },
    /// The console ended without the end markers: L1 crashed or QEMU died.
    #[error("the run ended without {missing}; QEMU {exit}; last console lines:\n{tail}")]
    Incomplete {
        missing: &'static str,
        exit: String,
        tail: String,
    },
    /// The QEMU peer in L1 did not run the guest command to its end.
    #[error("peer failed: {message}; last console lines:\n{tail}")]
    Peer { message: String, tail: String },
    /// Every attempt of a run ended in a rig fault it tolerates (see `Reruns`).
    #[error(transparent)]
    RigFaults(#[from] crate::rerun::RigFaultError),
    /// `EBB_RIG_MODE` holds something other than auto, nested or host.
    #[error("EBB_RIG_MODE={0:?}: expected auto, nested or host")]
    BadMode(String),
}
