//! Round logs: what one L1 boot of the benchmark printed, parsed into each VMM's (or variant's)
//! figures per phase, its marks and periodic samples; and the log written for each round.

use std::collections::BTreeMap;
use std::error::Error;
use std::fmt::Write as _;
use std::path::Path;

use crate::{LOG_PREFIX, PHASES, Sizes, VMMS};

/// One phase's figures for one VMM: every numeric key=value of its `EBB-BENCH` line.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Phase {
    pub(crate) vmm: String,
    pub(crate) phase: String,
    pub(crate) f: BTreeMap<String, f64>,
}

/// A periodic sample of a VMM process (kB) and L1's KVM tables.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Sample {
    pub(crate) t_ms: f64,
    pub(crate) vm_pte_kb: f64,
    pub(crate) sec_kb: f64,
}

/// One round: one L1 boot, both VMMs (or all variants), one reporting setting.
#[derive(Clone, Debug, Default)]
pub(crate) struct Round {
    pub(crate) round: u32,
    pub(crate) reporting: String,
    /// What ran, in order, joined by `+` (VMMs, or variant labels).
    pub(crate) order: String,
    /// A round of `--variants`: its VMM names are variant labels.
    pub(crate) variants: bool,
    /// The scenario's sizes, when the header has them.
    pub(crate) sizes: Option<Sizes>,
    pub(crate) status: i32,
    pub(crate) elapsed_s: f64,
    /// Re-runs of the whole round.
    pub(crate) rig_faults: u32,
    /// Re-runs of one variant inside the round: (variant, fault).
    pub(crate) variant_faults: Vec<(String, String)>,
    pub(crate) phases: Vec<Phase>,
    /// (vmm, what, t_ms)
    pub(crate) marks: Vec<(String, String, f64)>,
    pub(crate) samples: BTreeMap<String, Vec<Sample>>,
    /// Why this round does not count at all (empty: it counts, but for `vmm_problems`).
    pub(crate) problems: Vec<String>,
    /// Why one VMM's (or variant's) figures of this round do not count.
    pub(crate) vmm_problems: BTreeMap<String, Vec<String>>,
    /// Each VMM's exit status (the last attempt's).
    pub(crate) statuses: BTreeMap<String, i32>,
}

pub(crate) fn kv(s: &str) -> BTreeMap<&str, &str> {
    s.split_whitespace()
        .filter_map(|t| t.split_once('='))
        .collect()
}

pub(crate) fn after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker).map(|i| &line[i + marker.len()..])
}

/// The VMM a process name (comm) belongs to.
pub(crate) fn vmm_of_comm(comm: &str) -> Option<&'static str> {
    if comm == "ebb" {
        Some("ebb")
    } else if comm.starts_with("qemu") {
        Some("qemu")
    } else {
        None
    }
}

impl Round {
    /// Parses a round log (see [`round_log`]).
    pub(crate) fn parse(text: &str) -> Round {
        let mut r = Round::default();
        for raw in text.lines() {
            let line = raw.trim_end_matches('\r');
            if let Some(rest) = after(line, "EBB-BENCH-ROUND ") {
                let m = kv(rest);
                r.round = m.get("round").and_then(|v| v.parse().ok()).unwrap_or(0);
                r.reporting = m.get("reporting").unwrap_or(&"?").to_string();
                r.order = m.get("order").unwrap_or(&"?").to_string();
                r.variants = m.get("mode") == Some(&"variants");
                let n = |k: &str| m.get(k).and_then(|v| v.parse::<u32>().ok());
                if let (Some(memory), Some(touch), Some(ws), Some(balloon), Some(retouch)) = (
                    n("memory_mib"),
                    n("touch_mib"),
                    n("ws_mib"),
                    n("balloon_mib"),
                    n("retouch_mib"),
                ) {
                    r.sizes = Some(Sizes {
                        memory,
                        touch,
                        ws,
                        balloon,
                        retouch,
                    });
                }
                r.status = m.get("status").and_then(|v| v.parse().ok()).unwrap_or(-1);
                r.elapsed_s = m
                    .get("elapsed_s")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0.0);
                r.rig_faults = m
                    .get("rig_faults")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if let Some(e) = after(rest, "error=") {
                    r.problems.push(format!("the rig run failed: {e}"));
                }
            } else if let Some(rest) = after(line, "EBB-BENCH ") {
                let m = kv(rest);
                let mut p = Phase {
                    vmm: m.get("vmm").unwrap_or(&"?").to_string(),
                    phase: m.get("phase").unwrap_or(&"?").to_string(),
                    f: BTreeMap::new(),
                };
                for (k, v) in &m {
                    if let Ok(x) = v.parse::<f64>() {
                        p.f.insert((*k).to_string(), x);
                    }
                }
                r.phases.push(p);
            } else if let Some(rest) = after(line, "EBB-BENCH-MARK ") {
                let m = kv(rest);
                if let (Some(v), Some(w), Some(t)) = (m.get("vmm"), m.get("what"), m.get("t_ms")) {
                    r.marks
                        .push((v.to_string(), w.to_string(), t.parse().unwrap_or(f64::NAN)));
                }
            } else if let Some(rest) = after(line, "EBB-BENCH-FAIL ") {
                let v = kv(rest).get("vmm").unwrap_or(&"?").to_string();
                let why = rest.split_once(' ').map_or("", |(_, w)| w);
                r.vmm_problems
                    .entry(v)
                    .or_default()
                    .push(format!("a step failed: {why}"));
            } else if let Some(rest) = after(line, "EBB-BENCH-STATUS ") {
                let m = kv(rest);
                if let (Some(v), Some(st)) = (m.get("vmm"), m.get("status")) {
                    r.statuses.insert(v.to_string(), st.parse().unwrap_or(-1));
                }
            } else if let Some(rest) = after(line, "EBB-BENCH-RIG-FAULT ") {
                // The attempt before this line does not count: its figures, marks and failed
                // steps go; the next attempt's come after.
                let v = kv(rest).get("vmm").unwrap_or(&"?").to_string();
                let fault = rest.split_once("fault=").map_or("?", |(_, f)| f);
                r.phases.retain(|p| p.vmm != v);
                r.marks.retain(|(m, _, _)| *m != v);
                r.vmm_problems.remove(&v);
                r.variant_faults.push((v, fault.to_string()));
            } else if let Some(rest) = after(line, "EBB-RIG-SAMPLE ") {
                let m = kv(rest);
                let num = |k: &str| m.get(k).and_then(|v| v.parse::<f64>().ok());
                if m.get("label") != Some(&"periodic") {
                    continue;
                }
                if let (Some(v), Some(t), Some(pte), Some(sec)) = (
                    m.get("comm").and_then(|c| vmm_of_comm(c)),
                    num("t_ms"),
                    num("VmPTE"),
                    num("SecPageTables"),
                ) {
                    r.samples.entry(v.to_string()).or_default().push(Sample {
                        t_ms: t,
                        vm_pte_kb: pte,
                        sec_kb: sec,
                    });
                }
            }
        }
        for (v, st) in r.statuses.clone() {
            if st != 0 {
                r.vmm_problems
                    .entry(v.clone())
                    .or_default()
                    .push(format!("{v} exited with status {st}"));
            }
        }
        for v in r.names() {
            let mut bad_v = Vec::new();
            for ph in PHASES {
                if r.phase(&v, ph).is_none() {
                    bad_v.push(format!("no {ph} figures for {v}"));
                }
            }
            let bad = r.get(&v, "retouch-ws", "bad_pages");
            if bad.is_some_and(|b| b != 0.0) {
                bad_v.push(format!(
                    "{v}: the guest found {} bad pages in its working set",
                    bad.unwrap_or(0.0)
                ));
            }
            if !bad_v.is_empty() {
                r.vmm_problems.entry(v).or_default().extend(bad_v);
            }
        }
        if r.status != 0 && r.problems.is_empty() && r.vmm_problems.is_empty() {
            r.problems
                .push(format!("the job exited with status {}", r.status));
        }
        r
    }

    /// What ran: the order's names (the two VMMs when the header has none).
    pub(crate) fn names(&self) -> Vec<String> {
        if self.order.is_empty() || self.order == "?" {
            VMMS.iter().map(|(v, _)| v.to_string()).collect()
        } else {
            self.order.split('+').map(str::to_string).collect()
        }
    }

    /// Whether the whole round counts.
    pub(crate) fn ok(&self) -> bool {
        self.problems.is_empty() && self.vmm_problems.values().all(Vec::is_empty)
    }

    /// Whether `vmm`'s figures of this round count.
    pub(crate) fn counts(&self, vmm: &str) -> bool {
        self.problems.is_empty() && self.vmm_problems.get(vmm).is_none_or(Vec::is_empty)
    }

    /// Whether `vmm` is in this round's order (a round of an older variant list may not have
    /// run every variant of today's).
    pub(crate) fn ran(&self, vmm: &str) -> bool {
        self.names().iter().any(|v| v == vmm)
    }

    /// Every reason this round or part of it does not count.
    pub(crate) fn all_problems(&self) -> Vec<String> {
        let mut v = self.problems.clone();
        for p in self.vmm_problems.values() {
            v.extend(p.iter().cloned());
        }
        v
    }

    pub(crate) fn phase(&self, vmm: &str, phase: &str) -> Option<&Phase> {
        self.phases
            .iter()
            .find(|p| p.vmm == vmm && p.phase == phase)
    }

    pub(crate) fn get(&self, vmm: &str, phase: &str, key: &str) -> Option<f64> {
        self.phase(vmm, phase)?.f.get(key).copied()
    }

    /// When the VMM was started (its start mark), ms of L1 uptime.
    pub(crate) fn start_ms(&self, vmm: &str) -> Option<f64> {
        self.marks
            .iter()
            .find(|(v, w, _)| v == vmm && w == "start")
            .map(|m| m.2)
    }
}

/// A round's log: the header, the job's output, and its periodic samples.
pub(crate) fn round_log(header: &str, out: Option<&ebb_harness::RunOutput>) -> String {
    let mut s = format!("EBB-BENCH-ROUND {header}\n");
    if let Some(out) = out {
        for l in &out.output {
            s.push_str(l);
            s.push('\n');
        }
        for p in out.samples.iter().filter(|p| p.label == "periodic") {
            let _ = writeln!(
                s,
                "EBB-RIG-SAMPLE label=periodic pid={} comm={} t_ms={} VmRSS={} VmPTE={} SecPageTables={} PageTables={}",
                p.pid,
                p.comm,
                p.t_ms,
                p.vm_rss_kb,
                p.vm_pte_kb,
                p.meminfo.sec_page_tables_kb,
                p.meminfo.page_tables_kb
            );
        }
    }
    s
}

/// Reads every round log in `dir`.
pub(crate) fn load(dir: &Path) -> Result<Vec<Round>, Box<dyn Error>> {
    let mut rounds = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(LOG_PREFIX) && name.ends_with(".log") {
            rounds.push(Round::parse(&std::fs::read_to_string(&p)?));
        }
    }
    rounds.sort_by(|a, b| (a.round, &a.reporting).cmp(&(b.round, &b.reporting)));
    Ok(rounds)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn line(vmm: &str, phase: &str, extra: &str) -> String {
        format!(
            "EBB-BENCH vmm={vmm} reporting=on phase={phase} label={phase} pid=1 comm=x t_ms=1000 \
             VmRSS=2048 VmPTE=100 SecPageTables=40 PageTables=900 host_kB=3072 guest_kB=1024 \
             guest_zero_kB=256 {extra}\n"
        )
    }

    pub(crate) fn full_log(status: i32) -> String {
        let mut s = format!(
            "EBB-BENCH-ROUND round=2 reporting=on order=qemu+ebb status={status} elapsed_s=300.5 rig_faults=1\n"
        );
        s.push_str("EBB-BENCH-MARK vmm=ebb what=start t_ms=500\n");
        for v in ["ebb", "qemu"] {
            for ph in PHASES {
                s.push_str(&line(v, ph, "table_bytes=8192 bad_pages=0 "));
            }
        }
        s.push_str("EBB-RIG-SAMPLE label=periodic pid=1 comm=ebb t_ms=1500 VmRSS=1 VmPTE=72 SecPageTables=24 PageTables=9\n");
        s.push_str("EBB-RIG-SAMPLE label=guest-done pid=1 comm=qemu-system-x86 t_ms=1500 VmRSS=1 VmPTE=72 SecPageTables=24 PageTables=9\n");
        s
    }

    #[test]
    fn a_complete_round_counts_and_keeps_its_figures() {
        let r = Round::parse(&full_log(0));
        assert!(r.ok(), "{:?}", r.problems);
        assert_eq!((r.round, r.rig_faults), (2, 1));
        assert_eq!(r.get("ebb", "ws", "VmPTE"), Some(100.0));
        assert_eq!(r.get("qemu", "retouch", "table_bytes"), Some(8192.0));
        assert_eq!(r.start_ms("ebb"), Some(500.0));
        assert_eq!(r.samples["ebb"].len(), 1);
        assert!(!r.samples.contains_key("qemu"), "only periodic samples");
    }

    #[test]
    fn a_failed_step_a_missing_phase_or_bad_pages_do_not_count() {
        let mut log = full_log(0);
        log.push_str("EBB-BENCH-FAIL vmm=qemu the balloon did not reach 768 MiB\n");
        assert!(!Round::parse(&log).ok());
        assert!(!Round::parse(&full_log(3)).ok());
        let log = full_log(0).replace("phase=deflated", "phase=other");
        assert!(!Round::parse(&log).ok());
        let log = full_log(0).replacen("bad_pages=0", "bad_pages=2", 5);
        assert!(!Round::parse(&log).ok());
    }
}
