//! The QEMU peer: QEMU `-M microvm -enable-kvm` inside L1 with a virtio-balloon device (free page
//! reporting on), booting the L2 guest with a command; see `resources/rig-bin/rig-peer`.

use std::time::Duration;

use crate::error::RigError;
use crate::job::{Job, sh_quote};
use crate::protocol::{ProcSample, ResultLine};
use crate::rerun::{Reruns, RigFault};
use crate::runner::{Rig, RunOutput};

/// One peer run.
#[derive(Clone, Debug)]
pub struct PeerJob {
    /// Shell command line run by the guest's init (e.g. `ebb-guest touch --mib 256`); it goes on
    /// the guest kernel command line, so it must be a single line.
    pub guest_command: String,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// Guest vCPUs.
    pub cpus: u32,
    /// Sampling interval for the QEMU process, ms (0: only the final sample).
    pub sample_ms: u32,
    /// Extra guest kernel command line (e.g. `init_on_alloc=0`).
    pub append: String,
    /// Limit for the whole run.
    pub timeout: Duration,
}

impl PeerJob {
    /// A 1 GiB, 1-vCPU guest running `command`, sampled every second, 10-minute timeout.
    pub fn new(command: impl Into<String>) -> Self {
        PeerJob {
            guest_command: command.into(),
            mem_mib: 1024,
            cpus: 1,
            sample_ms: 1000,
            append: String::new(),
            timeout: Duration::from_secs(600),
        }
    }

    /// How long the guest may run inside L1: the timeout less a margin for booting L1, so a
    /// stuck guest is reported by the peer (with its console) before the whole run is killed.
    pub fn guest_limit_secs(&self) -> u64 {
        let t = self.timeout.as_secs();
        t.saturating_sub(120).max(t / 2).max(1)
    }

    /// The shell line run in L1.
    pub fn shell_line(&self) -> String {
        format!(
            "rig-peer -m {} -c {} -s {} -T {} -a {} -- {}",
            self.mem_mib,
            self.cpus,
            self.sample_ms,
            self.guest_limit_secs(),
            sh_quote(&self.append),
            sh_quote(&self.guest_command)
        )
    }
}

/// What a peer run gives back.
#[derive(Clone, Debug)]
pub struct PeerOutput {
    /// The guest command's exit status.
    pub guest_status: i32,
    /// `EBB-RESULT` lines the guest printed.
    pub results: Vec<ResultLine>,
    /// The QEMU process and L1's page-table counters right after the guest finished, while the
    /// VM still existed (`label=guest-done`).
    pub at_guest_done: ProcSample,
    /// Periodic samples of the QEMU process.
    pub periodic: Vec<ProcSample>,
    /// The underlying run (console, timings, L1 meminfo after QEMU exited).
    pub run: RunOutput,
}

impl PeerOutput {
    /// The first result line named `name`.
    pub fn result(&self, name: &str) -> Option<&ResultLine> {
        self.results.iter().find(|r| r.name == name)
    }
}

impl Rig {
    /// Boots the L2 guest in the QEMU peer inside the rig and runs `peer.guest_command`. Rig
    /// faults run again: L1's own ([`Rig::l1_reruns`]) and a guest that never reached its init
    /// ([`RigFault::PeerNoBoot`]: nothing under test has run yet).
    pub fn run_peer(&self, peer: &PeerJob) -> Result<PeerOutput, RigError> {
        self.run_peer_with(peer, &self.l1_reruns("rig peer").on(RigFault::PeerNoBoot))
    }

    /// [`Rig::run_peer`], running again after the rig faults `reruns` names (see [`Reruns`]).
    pub fn run_peer_with(&self, peer: &PeerJob, reruns: &Reruns) -> Result<PeerOutput, RigError> {
        if peer.guest_command.contains('\n') || peer.append.contains('\n') {
            return Err(RigError::Peer {
                message: "guest command must be one line".into(),
                tail: String::new(),
            });
        }
        let run = self.run_with(&Job::shell(peer.shell_line()).timeout(peer.timeout), reruns)?;
        if let Some(e) = run
            .output
            .iter()
            .find_map(|l| l.split_once("EBB-PEER-ERROR ").map(|x| x.1.to_string()))
        {
            return Err(RigError::Peer {
                message: e,
                tail: run.tail(),
            });
        }
        let fail = |message: String| RigError::Peer {
            message,
            tail: run.tail(),
        };
        let Some(guest_status) = run.guest_status else {
            return Err(fail("the guest printed no EBB-L2-END".into()));
        };
        let Some(at_guest_done) = run
            .samples
            .iter()
            .rev()
            .find(|s| s.label == "guest-done")
            .cloned()
        else {
            return Err(fail("no guest-done sample of the QEMU process".into()));
        };
        let periodic = run
            .samples
            .iter()
            .filter(|s| s.label == "periodic")
            .cloned()
            .collect();
        Ok(PeerOutput {
            guest_status,
            results: run.results.clone(),
            at_guest_done,
            periodic,
            run,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_line_quotes_the_guest_command() {
        let mut p = PeerJob::new("ebb-guest touch --mib 8 ; echo 'x'");
        p.append = "init_on_alloc=0".into();
        assert_eq!(
            p.shell_line(),
            r"rig-peer -m 1024 -c 1 -s 1000 -T 480 -a 'init_on_alloc=0' -- 'ebb-guest touch --mib 8 ; echo '\''x'\'''"
        );
    }
}
