//! The nested test host ("the rig") for ebb.
//!
//! `/dev/kvm` on the development machines is PVM and cannot boot stock Linux guests, so ebb is
//! tested one level down: QEMU TCG emulates an AMD CPU with SVM and NPT, boots a Debian kernel as
//! L1 with `kvm-amd`, and the program under test runs inside L1 with real KVM, next to the L2
//! kernel and initramfs it may boot (`/l2/bzImage`, `/l2/vmlinux`, `/l2/initramfs.cpio`). On a
//! host with hardware VMX/SVM the same API runs the program directly instead.
//!
//! ```no_run
//! use ebb_harness::{Job, Rig};
//! let rig = Rig::from_env()?; // needs resources/setup.sh to have run
//! let out = rig.run(&Job::program("target/release/ebb", ["--help"]))?;
//! assert_eq!(out.status, 0);
//! # Ok::<(), ebb_harness::RigError>(())
//! ```
//!
//! Images come from `resources/setup.sh`; the console protocol is described in
//! `resources/init-l1.sh` and `resources/rig-bin/rig-job`; see `docs/TESTING.md`.

mod console;
mod cpio;
mod ebb_report;
mod error;
mod host;
mod images;
mod job;
mod peer;
mod protocol;
mod rerun;
mod runner;
mod tempdir;

pub use cpio::CpioWriter;
pub use ebb_report::{EbbReport, PAGES_PER_2M, ReportError, labelled_fields};
pub use error::RigError;
pub use host::{HostVirt, Mode, has_virt_flag, select_mode};
pub use images::{
    RigImages, images_dir, l1_shell_lib, static_ebb, static_harness_bin, static_memscan,
    workspace_root,
};
pub use job::{Command, Job, Sampling, sh_quote};
pub use peer::{PeerJob, PeerOutput};
pub use protocol::{Meminfo, ProcSample, ResultLine, Transcript, parse_result};
pub use rerun::{
    EBB_EXIT_KVM_ERROR, EBB_EXIT_TRIPLE_FAULT, FaultSeen, Reran, Reruns, RigFault, RigFaultError,
};
pub use runner::{
    DEFAULT_ACCEL, DEFAULT_CPU, L1_DID_NOT_BOOT, Rig, RunOutput, l1_cpu_summary, l1_cpus,
};
