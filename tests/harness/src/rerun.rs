//! Rig faults: outcomes caused by the rig (TCG's emulation of an AMD CPU with nested SVM, L1's own
//! kernel), not by the code under test. This is the harness's one way to re-run after them.
//!
//! A caller names the faults it tolerates ([`Reruns::on`]) and how many re-runs it allows (small:
//! 1 or 2). [`Reruns::run`] starts an attempt, classifies its outcome, and:
//! - returns the outcome at once when it is not one of the named faults (a pass, a test failure,
//!   or any other rig error): nothing is retried that was not named;
//! - on a named fault, writes one line to stderr naming the fault and the attempt (straight to
//!   the stream, so it shows even in a passing test), keeps the attempt's evidence, and starts
//!   the next attempt;
//! - when every attempt (1 + max re-runs) ended in a named fault, fails with
//!   [`RigFaultError::EveryAttempt`], carrying each attempt's evidence. A "rig fault" that happens
//!   every time is treated as what it may well be: a real bug.
//!
//! The faults are recognised from a run's outcome by [`RigFault::detect`]; the list and why each
//! is the rig's is in `docs/ARCHITECTURE.md` ("Known flakiness").

use std::collections::BTreeSet;
use std::fmt;
use std::io::Write as _;

use crate::error::RigError;
use crate::runner::{L1_DID_NOT_BOOT, RunOutput};

/// ebb's exit status when a vCPU triple-faulted (`vmm`'s `ExitReason::TripleFault`).
pub const EBB_EXIT_TRIPLE_FAULT: i32 = 3;

/// ebb's exit status when KVM reported an error (`vmm`'s `ExitReason::KvmError`).
pub const EBB_EXIT_KVM_ERROR: i32 = 4;

/// Output lines kept as an attempt's evidence (besides the line that matched).
const EVIDENCE_LINES: usize = 40;

/// A known way the rig fails independently of the code under test. The order is the order of
/// detection: a more specific fault comes before a more general one it implies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RigFault {
    /// L1's kernel oopsed during the run (TCG running kernel text that patches itself).
    L1Oops,
    /// L1's kernel reported a CPU stuck: a soft lockup or an RCU stall (seen with ebb's vCPU
    /// thread stuck for minutes; the report's stack is the evidence).
    L1Lockup,
    /// L1 never reached the job: the console ended before `EBB-RIG-KVM` (an oops while L1 boots,
    /// before kvm_amd is loaded, looks like this).
    L1Boot,
    /// L1's emulated CPU triple-faulted mid-run: QEMU logged "Triple fault" and exited. Nothing
    /// in L1's user space (ebb, the peer) can reset L1's CPU; this is the emulation or L1's
    /// kernel.
    L1TripleFault,
    /// L1's heartbeat stopped mid-run (its timer and scheduler made no progress for minutes):
    /// the emulation of L1 stopped, whatever ran inside it.
    L1Stopped,
    /// ebb's L2 guest triple-faulted: ebb exited with status 3 and said so.
    EbbTripleFault,
    /// KVM stopped ebb's L2 guest with an internal error of suberror 3 (delivering an event
    /// failed: the same #PF on an instruction fetch, error 0x10, as the triple faults); ebb
    /// exited with status 4.
    EbbKvmInternalError,
    /// An L2 guest kernel (under ebb or the peer) oopsed on an int3 left in code it had just
    /// patched: the same emulated cross-modifying-code race as L1's oopses, one level down.
    GuestInt3Oops,
    /// The QEMU peer's L2 guest never reached its init (`EBB-PEER-ERROR no-boot`).
    PeerNoBoot,
    /// The QEMU peer stopped its guest with "KVM internal error" (event delivery failed).
    PeerKvmInternalError,
    /// The QEMU peer's guest stopped (e.g. status shutdown) before it finished its command.
    PeerStoppedEarly,
}

impl RigFault {
    /// Every known fault, in detection order.
    pub const ALL: [RigFault; 11] = [
        RigFault::L1Oops,
        RigFault::L1Lockup,
        RigFault::L1Boot,
        RigFault::L1TripleFault,
        RigFault::L1Stopped,
        RigFault::EbbTripleFault,
        RigFault::EbbKvmInternalError,
        RigFault::GuestInt3Oops,
        RigFault::PeerNoBoot,
        RigFault::PeerKvmInternalError,
        RigFault::PeerStoppedEarly,
    ];

    /// A short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            RigFault::L1Oops => "L1 kernel oops",
            RigFault::L1Lockup => "L1 kernel lockup",
            RigFault::L1Boot => "L1 did not boot",
            RigFault::L1TripleFault => "L1 triple fault",
            RigFault::L1Stopped => "L1 stopped (no heartbeat)",
            RigFault::EbbTripleFault => "L2 triple fault under ebb",
            RigFault::EbbKvmInternalError => "KVM internal error (suberror 3) under ebb",
            RigFault::GuestInt3Oops => "L2 guest kernel int3 oops",
            RigFault::PeerNoBoot => "peer guest did not boot",
            RigFault::PeerKvmInternalError => "peer KVM internal error",
            RigFault::PeerStoppedEarly => "peer guest stopped early",
        }
    }

    /// Whether `outcome` shows this fault; if so, the evidence (the line that shows it, the
    /// last output or console lines).
    pub fn detect(self, outcome: &Result<RunOutput, RigError>) -> Option<String> {
        match (self, outcome) {
            (RigFault::L1Oops, Err(RigError::L1Oops { message, tail }))
            | (RigFault::L1Lockup, Err(RigError::L1Lockup { message, tail })) => {
                Some(format!("{message}\n{tail}"))
            }
            (
                RigFault::L1Boot,
                Err(RigError::Incomplete {
                    missing,
                    exit,
                    tail,
                }),
            ) if *missing == L1_DID_NOT_BOOT => Some(format!(
                "console ended before EBB-RIG-KVM; exit {exit}\n{tail}"
            )),
            (RigFault::L1TripleFault, Err(RigError::L1TripleFault { tail })) => {
                Some(format!("QEMU logged a triple fault of L1's CPU\n{tail}"))
            }
            (RigFault::L1Stopped, Err(RigError::L1Stopped { silent, tail, cpu })) => Some(format!(
                "L1 printed no heartbeat for {} s; L1's CPUs then: {}\n{tail}\n\
                 L1's CPUs then (outer QEMU's monitor):\n{cpu}",
                silent.as_secs(),
                crate::runner::l1_cpu_summary(cpu)
            )),
            (RigFault::EbbTripleFault, Ok(out)) if out.status == EBB_EXIT_TRIPLE_FAULT => {
                evidence(out, |l| l.contains("triple-faulted"))
            }
            (RigFault::EbbKvmInternalError, Ok(out)) if out.status == EBB_EXIT_KVM_ERROR => {
                evidence(out, |l| l.contains("internal error, suberror 3"))
            }
            (RigFault::GuestInt3Oops, Ok(out)) => evidence(out, |l| l.contains("Oops: int3")),
            (RigFault::PeerNoBoot, Ok(out)) => peer_error(out, "no-boot"),
            (RigFault::PeerKvmInternalError, Ok(out)) if peer_failed(out) => {
                evidence(out, |l| l.contains("KVM internal error"))
            }
            (RigFault::PeerStoppedEarly, Ok(out)) => peer_error(out, "the VM stopped"),
            _ => None,
        }
    }
}

impl fmt::Display for RigFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether the job shows the peer failed: a non-zero status with an `EBB-PEER-ERROR` line.
fn peer_failed(out: &RunOutput) -> bool {
    out.status != 0 && out.output.iter().any(|l| l.contains("EBB-PEER-ERROR "))
}

/// Evidence when the peer failed with an `EBB-PEER-ERROR <reason>...` line.
fn peer_error(out: &RunOutput, reason: &str) -> Option<String> {
    if !peer_failed(out) {
        return None;
    }
    evidence(out, |l| {
        l.split_once("EBB-PEER-ERROR ")
            .is_some_and(|(_, r)| r.starts_with(reason))
    })
}

/// The first output line matching `pred` and the last output lines, or None if none matches.
fn evidence(out: &RunOutput, pred: impl Fn(&str) -> bool) -> Option<String> {
    let hit = out.output.iter().find(|l| pred(l))?;
    let from = out.output.len().saturating_sub(EVIDENCE_LINES);
    Some(format!(
        "{hit}\n(exit status {}, after {:.1} s; last output lines:)\n{}",
        out.status,
        out.elapsed.as_secs_f64(),
        out.output[from..].join("\n")
    ))
}

/// One attempt that ended in a rig fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultSeen {
    /// Which attempt (1-based).
    pub attempt: u32,
    pub fault: RigFault,
    /// What showed it: the matching line and the last lines of output.
    pub evidence: String,
}

/// A rig fault on every attempt.
#[derive(Debug, thiserror::Error)]
pub enum RigFaultError {
    /// Every attempt ended in a rig fault; a fault that comes every time may be a real bug.
    #[error("{what}: a rig fault on each of {} attempts (a fault every time may be a real bug):{}",
        attempts.len(), list(attempts))]
    EveryAttempt {
        what: String,
        attempts: Vec<FaultSeen>,
    },
}

fn list(attempts: &[FaultSeen]) -> String {
    attempts
        .iter()
        .map(|a| {
            format!(
                "\n---- attempt {}: {} ----\n{}",
                a.attempt, a.fault, a.evidence
            )
        })
        .collect()
}

/// An outcome that was not a rig fault, and the rig faults of the attempts before it.
#[derive(Debug)]
pub struct Reran<O> {
    pub outcome: O,
    pub rig_faults: Vec<FaultSeen>,
}

/// Which rig faults a run tolerates, and how many times it is started again after one.
#[derive(Clone, Debug)]
pub struct Reruns {
    /// What runs (named in the stderr line and the error), e.g. the test's name.
    pub what: String,
    /// Re-runs after a rig fault (attempts = 1 + this).
    pub max_reruns: u32,
    /// The faults that are the rig's for this run.
    pub faults: BTreeSet<RigFault>,
}

impl Reruns {
    /// No fault tolerated yet (add them with [`Reruns::on`]).
    pub fn new(what: impl Into<String>, max_reruns: u32) -> Self {
        Reruns {
            what: what.into(),
            max_reruns,
            faults: BTreeSet::new(),
        }
    }

    /// Sets how many re-runs are allowed (keep it small: a fault every time is a finding).
    pub fn max_reruns(mut self, n: u32) -> Self {
        self.max_reruns = n;
        self
    }

    /// Also treats `fault` as the rig's.
    pub fn on(mut self, fault: RigFault) -> Self {
        self.faults.insert(fault);
        self
    }

    /// The first of the named faults that `outcome` shows.
    pub fn classify(&self, outcome: &Result<RunOutput, RigError>) -> Option<(RigFault, String)> {
        self.faults
            .iter()
            .find_map(|&f| f.detect(outcome).map(|e| (f, e)))
    }

    /// Runs `attempt` (given the 1-based attempt number) until `classify` finds no rig fault in
    /// its outcome, at most `1 + max_reruns` times. See the module documentation.
    pub fn run<O>(
        &self,
        mut attempt: impl FnMut(u32) -> O,
        mut classify: impl FnMut(&O) -> Option<(RigFault, String)>,
    ) -> Result<Reran<O>, RigFaultError> {
        let attempts = self.max_reruns.saturating_add(1);
        let mut seen = Vec::new();
        for n in 1..=attempts {
            let outcome = attempt(n);
            let Some((fault, evidence)) = classify(&outcome) else {
                return Ok(Reran {
                    outcome,
                    rig_faults: seen,
                });
            };
            let next = if n < attempts {
                "running it again"
            } else {
                "no attempts left"
            };
            let line = format!(
                "ebb-rig: {}: RIG FAULT ({fault}) on attempt {n} of {attempts}; {next}",
                self.what
            );
            log::warn!("{line}");
            // Straight to the stream: the test harness's capture would hide eprintln! on a pass.
            let _ = writeln!(std::io::stderr(), "{line}\n{}", indent(excerpt(&evidence)));
            seen.push(FaultSeen {
                attempt: n,
                fault,
                evidence,
            });
        }
        Err(RigFaultError::EveryAttempt {
            what: self.what.clone(),
            attempts: seen,
        })
    }
}

/// The first two lines of an attempt's evidence (what matched) and its last ten.
fn excerpt(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    if lines.len() <= 12 {
        return lines.join("\n");
    }
    format!(
        "{}\n...\n{}",
        lines[..2].join("\n"),
        lines[lines.len() - 10..].join("\n")
    )
}

fn indent(s: String) -> String {
    s.lines().map(|l| format!("  | {l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::Mode;
    use crate::protocol::Meminfo;
    use std::time::Duration;

    fn output(status: i32, lines: &[&str]) -> Result<RunOutput, RigError> {
        Ok(RunOutput {
            mode: Mode::Nested,
            status,
            output: lines.iter().map(|l| l.to_string()).collect(),
            results: Vec::new(),
            samples: Vec::new(),
            meminfo: Meminfo::default(),
            guest_status: None,
            console: Vec::new(),
            elapsed: Duration::from_secs(90),
            rig_faults: Vec::new(),
            l1_heartbeats: 0,
            l1_kvm_pin: None,
        })
    }

    fn tf(n: u32) -> Result<RunOutput, RigError> {
        output(
            3,
            &[
                "guest booting",
                &format!("ebb: vCPU {n} triple-faulted (KVM shutdown exit)"),
            ],
        )
    }

    fn policy(max: u32) -> Reruns {
        Reruns::new("unit", max)
            .on(RigFault::L1Oops)
            .on(RigFault::EbbTripleFault)
    }

    #[test]
    fn a_fault_every_time_fails_after_all_attempts_with_all_evidence() {
        let mut calls = 0;
        let err = policy(2)
            .run(
                |n| {
                    calls += 1;
                    tf(n)
                },
                |o| policy(2).classify(o),
            )
            .unwrap_err();
        assert_eq!(calls, 3, "1 + 2 re-runs");
        let RigFaultError::EveryAttempt { what, attempts } = &err;
        assert_eq!(what, "unit");
        assert_eq!(attempts.len(), 3);
        for (i, a) in attempts.iter().enumerate() {
            assert_eq!(a.attempt, i as u32 + 1);
            assert_eq!(a.fault, RigFault::EbbTripleFault);
            assert!(
                a.evidence
                    .contains(&format!("vCPU {} triple-faulted", i + 1))
            );
        }
        let text = err.to_string();
        for n in 1..=3 {
            assert!(text.contains(&format!("vCPU {n} triple-faulted")), "{text}");
            assert!(
                text.contains(&format!("attempt {n}: L2 triple fault")),
                "{text}"
            );
        }
    }

    #[test]
    fn a_failure_that_is_not_a_rig_fault_returns_at_once() {
        let mut calls = 0;
        let p = policy(2);
        let r = p
            .run(
                |_| {
                    calls += 1;
                    output(1, &["integrity: bad_pages=7"])
                },
                |o| p.classify(o),
            )
            .unwrap();
        assert_eq!(calls, 1);
        assert!(r.rig_faults.is_empty());
        assert_eq!(r.outcome.unwrap().status, 1);
        // A rig error that was not named is not retried either.
        let mut calls = 0;
        let r = p
            .run(
                |_| {
                    calls += 1;
                    Err::<RunOutput, _>(RigError::Timeout {
                        after: Duration::from_secs(1),
                        tail: String::new(),
                    })
                },
                |o| p.classify(o),
            )
            .unwrap();
        assert_eq!(calls, 1);
        assert!(matches!(r.outcome, Err(RigError::Timeout { .. })));
    }

    #[test]
    fn a_flake_then_a_pass_passes_and_reports_the_rerun() {
        let p = policy(2);
        let r = p
            .run(
                |n| {
                    if n == 1 {
                        Err(RigError::L1Oops {
                            message: "Oops: int3".into(),
                            tail: "RIP: __apic_accept_irq".into(),
                        })
                    } else {
                        output(0, &["guest powered off"])
                    }
                },
                |o| p.classify(o),
            )
            .unwrap();
        assert_eq!(r.outcome.unwrap().status, 0);
        assert_eq!(r.rig_faults.len(), 1);
        let f = &r.rig_faults[0];
        assert_eq!((f.attempt, f.fault), (1, RigFault::L1Oops));
        assert!(f.evidence.contains("__apic_accept_irq"));
    }

    #[test]
    fn zero_reruns_means_one_attempt() {
        let p = policy(0);
        let err = p.run(tf, |o| p.classify(o)).unwrap_err();
        let RigFaultError::EveryAttempt { attempts, .. } = err;
        assert_eq!(attempts.len(), 1);
    }

    #[test]
    fn only_named_faults_count() {
        let p = Reruns::new("unit", 2).on(RigFault::L1Oops);
        assert_eq!(p.classify(&tf(0)), None, "triple fault not named");
        let p = p.on(RigFault::EbbTripleFault);
        assert_eq!(
            p.classify(&tf(0)).map(|x| x.0),
            Some(RigFault::EbbTripleFault)
        );
    }

    #[test]
    fn detectors() {
        let d = |f: RigFault, o: &Result<RunOutput, RigError>| f.detect(o).is_some();
        // Exit 3 without ebb saying why, or the words without exit 3: not this fault.
        assert!(!d(RigFault::EbbTripleFault, &output(3, &["something"])));
        assert!(!d(
            RigFault::EbbTripleFault,
            &output(0, &["vCPU 0 triple-faulted"])
        ));
        assert!(d(RigFault::EbbTripleFault, &tf(1)));
        let kvm3 = "ebb: KVM error on vCPU 0: internal error, suberror 3 (1 = emulation failure, 3 = during event delivery); data [0xd0000050 0x400 0x10000000e 0xd0000050 0x1]";
        assert!(d(RigFault::EbbKvmInternalError, &output(4, &[kvm3])));
        assert!(!d(RigFault::EbbKvmInternalError, &output(0, &[kvm3])));
        let other = "ebb: KVM error on vCPU 0: internal error, suberror 1 (1 = emulation failure)";
        assert!(
            !d(RigFault::EbbKvmInternalError, &output(4, &[other])),
            "an emulation failure is not this fault"
        );
        let int3 = "[    0.528541] Oops: int3: 0000 [#1] SMP NOPTI";
        assert!(d(RigFault::GuestInt3Oops, &output(0, &[int3])));
        let null = "[    9.100000] Oops: 0002 [#1] SMP NOPTI";
        assert!(
            !d(RigFault::GuestInt3Oops, &output(0, &[null])),
            "a guest's own crash (e.g. sysrq-c) is not this fault"
        );

        let kvm = output(
            125,
            &[
                "KVM internal error. Suberror: 3",
                "EBB-PEER-ERROR the VM stopped without EBB-L2-END ({\"return\": {\"status\": \"internal-error\"}})",
            ],
        );
        let all = RigFault::ALL
            .iter()
            .fold(Reruns::new("unit", 1), |p, &f| p.on(f));
        assert_eq!(
            all.classify(&kvm).map(|x| x.0),
            Some(RigFault::PeerKvmInternalError),
            "the specific fault first"
        );
        assert!(d(RigFault::PeerStoppedEarly, &kvm));
        let shutdown = output(
            125,
            &[
                "EBB-PEER-ERROR the VM stopped without EBB-L2-END ({\"return\": {\"status\": \"shutdown\"}})",
            ],
        );
        assert_eq!(
            all.classify(&shutdown).map(|x| x.0),
            Some(RigFault::PeerStoppedEarly)
        );
        // The words in a passing run's output are not a fault.
        assert!(!d(
            RigFault::PeerKvmInternalError,
            &output(0, &["KVM internal error"])
        ));
        assert!(d(
            RigFault::PeerNoBoot,
            &output(
                125,
                &["EBB-PEER-ERROR no-boot: the L2 guest did not reach its init"]
            )
        ));
        // A peer error of another kind (the guest ran too long) is a test failure.
        assert_eq!(
            all.classify(&output(
                125,
                &["EBB-PEER-ERROR the guest did not finish within 300 s"]
            )),
            None
        );
        let boot = Err(RigError::Incomplete {
            missing: L1_DID_NOT_BOOT,
            exit: "exit status: 0".into(),
            tail: "Oops: int3".into(),
        });
        assert!(d(RigFault::L1Boot, &boot));
        let later = Err(RigError::Incomplete {
            missing: "EBB-RIG-DONE",
            exit: "exit status: 0".into(),
            tail: String::new(),
        });
        assert_eq!(all.classify(&later), None, "L1 lost after the job began");
        let reset = Err(RigError::L1TripleFault {
            tail: "EBB-INTEGRITY-HOLDING pass=0 secs=60".into(),
        });
        assert_eq!(
            all.classify(&reset).map(|(f, _)| f),
            Some(RigFault::L1TripleFault)
        );
        // L1's heartbeat stopped: named, with the silence and the console as evidence; a job
        // that merely outlived its timeout (L1 still beating) is not.
        let stopped = Err(RigError::L1Stopped {
            silent: Duration::from_secs(300),
            tail: "EBB-BALLOON-STATS label=end".into(),
            cpu:
                "CPU#0\nRIP=ffffffff81000000 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\n\
                  CR0=80050033 CR2=0 CR3=000000000b469000 CR4=003106f0\nEFER=0000000000001d01"
                    .into(),
        });
        let (f, evidence) = all.classify(&stopped).expect("named");
        assert_eq!(f, RigFault::L1Stopped);
        assert!(evidence.contains("no heartbeat for 300 s"), "{evidence}");
        assert!(evidence.contains("label=end"), "{evidence}");
        assert!(
            evidence.starts_with(
                "L1 printed no heartbeat for 300 s; L1's CPUs then: CPU#0 RIP=ffffffff81000000 \
                 RFL=00000246 CPL=0 HLT=1 CR3=000000000b469000 (L1's own state)\n"
            ),
            "{evidence}"
        );
        let slow = Err(RigError::Timeout {
            after: Duration::from_secs(2700),
            tail: String::new(),
        });
        assert_eq!(all.classify(&slow), None);
    }
}
