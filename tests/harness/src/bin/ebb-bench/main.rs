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

use std::collections::BTreeMap;
use std::error::Error;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use ebb_harness::{Job, Rig, RigFault, l1_shell_lib, static_ebb, static_memscan, workspace_root};

mod variants;
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

/// One phase's figures for one VMM: every numeric key=value of its `EBB-BENCH` line.
#[derive(Clone, Debug, Default, PartialEq)]
struct Phase {
    vmm: String,
    phase: String,
    f: BTreeMap<String, f64>,
}

/// A periodic sample of a VMM process (kB) and L1's KVM tables.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Sample {
    t_ms: f64,
    vm_pte_kb: f64,
    sec_kb: f64,
}

/// One round: one L1 boot, both VMMs (or all variants), one reporting setting.
#[derive(Clone, Debug, Default)]
struct Round {
    round: u32,
    reporting: String,
    /// What ran, in order, joined by `+` (VMMs, or variant labels).
    order: String,
    /// A round of `--variants`: its VMM names are variant labels.
    variants: bool,
    /// The scenario's sizes, when the header has them.
    sizes: Option<Sizes>,
    status: i32,
    elapsed_s: f64,
    /// Re-runs of the whole round.
    rig_faults: u32,
    /// Re-runs of one variant inside the round: (variant, fault).
    variant_faults: Vec<(String, String)>,
    phases: Vec<Phase>,
    /// (vmm, what, t_ms)
    marks: Vec<(String, String, f64)>,
    samples: BTreeMap<String, Vec<Sample>>,
    /// Why this round does not count at all (empty: it counts, but for `vmm_problems`).
    problems: Vec<String>,
    /// Why one VMM's (or variant's) figures of this round do not count.
    vmm_problems: BTreeMap<String, Vec<String>>,
    /// Each VMM's exit status (the last attempt's).
    statuses: BTreeMap<String, i32>,
}

fn kv(s: &str) -> BTreeMap<&str, &str> {
    s.split_whitespace()
        .filter_map(|t| t.split_once('='))
        .collect()
}

fn after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker).map(|i| &line[i + marker.len()..])
}

/// The VMM a process name (comm) belongs to.
fn vmm_of_comm(comm: &str) -> Option<&'static str> {
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
    fn parse(text: &str) -> Round {
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
    fn names(&self) -> Vec<String> {
        if self.order.is_empty() || self.order == "?" {
            VMMS.iter().map(|(v, _)| v.to_string()).collect()
        } else {
            self.order.split('+').map(str::to_string).collect()
        }
    }

    /// Whether the whole round counts.
    fn ok(&self) -> bool {
        self.problems.is_empty() && self.vmm_problems.values().all(Vec::is_empty)
    }

    /// Whether `vmm`'s figures of this round count.
    fn counts(&self, vmm: &str) -> bool {
        self.problems.is_empty() && self.vmm_problems.get(vmm).is_none_or(Vec::is_empty)
    }

    /// Whether `vmm` is in this round's order (a round of an older variant list may not have
    /// run every variant of today's).
    fn ran(&self, vmm: &str) -> bool {
        self.names().iter().any(|v| v == vmm)
    }

    /// Every reason this round or part of it does not count.
    fn all_problems(&self) -> Vec<String> {
        let mut v = self.problems.clone();
        for p in self.vmm_problems.values() {
            v.extend(p.iter().cloned());
        }
        v
    }

    fn phase(&self, vmm: &str, phase: &str) -> Option<&Phase> {
        self.phases
            .iter()
            .find(|p| p.vmm == vmm && p.phase == phase)
    }

    fn get(&self, vmm: &str, phase: &str, key: &str) -> Option<f64> {
        self.phase(vmm, phase)?.f.get(key).copied()
    }

    /// When the VMM was started (its start mark), ms of L1 uptime.
    fn start_ms(&self, vmm: &str) -> Option<f64> {
        self.marks
            .iter()
            .find(|(v, w, _)| v == vmm && w == "start")
            .map(|m| m.2)
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// How a figure is shown.
#[derive(Clone, Copy)]
enum Unit {
    /// kB shown as MiB, one decimal.
    KbAsMib,
    /// As is, no decimals.
    Whole,
    /// Bytes shown as kB.
    BytesAsKb,
    /// ns shown as ms, one decimal.
    NsAsMs,
}

fn show(x: Option<f64>, u: Unit) -> String {
    let Some(x) = x else {
        return "–".into();
    };
    match u {
        Unit::KbAsMib => format!("{:.1}", x / 1024.0),
        Unit::Whole => format!("{x:.0}"),
        Unit::BytesAsKb => format!("{:.0}", x / 1024.0),
        Unit::NsAsMs => format!("{:.1}", x / 1e6),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
        (Some(0.0), Some(_)) => "1.00".into(),
        _ => "–".into(),
    }
}

/// Table cells: ebb's median of `key` in `phase`, QEMU's, and their ratio.
fn ebb_and_qemu(rounds: &[&Round], phase: &str, key: &str, unit: Unit) -> String {
    let e = med(rounds, "ebb", phase, key);
    let q = med(rounds, "qemu", phase, key);
    format!("{} | {} | {}", show(e, unit), show(q, unit), ratio(e, q))
}

/// The median over `rounds` of a figure of `vmm` at `phase`.
fn med(rounds: &[&Round], vmm: &str, phase: &str, key: &str) -> Option<f64> {
    median(
        rounds
            .iter()
            .filter_map(|r| r.get(vmm, phase, key))
            .collect(),
    )
}

/// The markdown tables for one reporting setting: medians over the rounds that count.
fn tables(setting: &str, all: &[Round]) -> String {
    let rounds: Vec<&Round> = all
        .iter()
        .filter(|r| r.reporting == setting && r.ok())
        .collect();
    let left_out: Vec<String> = all
        .iter()
        .filter(|r| r.reporting == setting && !r.ok())
        .map(|r| format!("round {} ({})", r.round, r.all_problems().join("; ")))
        .collect();
    let faults: u32 = all
        .iter()
        .filter(|r| r.reporting == setting)
        .map(|r| r.rig_faults)
        .sum();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### Free page reporting {setting}: median of {} round{}\n",
        rounds.len(),
        if rounds.len() == 1 { "" } else { "s" }
    );
    if !left_out.is_empty() {
        let _ = writeln!(s, "Left out: {}.\n", left_out.join("; "));
    }
    if faults > 0 {
        let _ = writeln!(
            s,
            "Rounds re-run after a rig fault: {faults} (the re-run counts, not the faulted attempt).\n"
        );
    }
    s.push_str(
        "| phase | host memory MiB ebb | QEMU | ebb/QEMU | VmRSS MiB ebb | QEMU \
         | guest RAM held MiB ebb | QEMU | its non-zero pages MiB ebb | QEMU |\n",
    );
    s.push_str("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for ph in PHASES {
        let g = |v| med(&rounds, v, ph, "guest_kB");
        let nz = |v| {
            rounds
                .iter()
                .filter_map(|r| Some(r.get(v, ph, "guest_kB")? - r.get(v, ph, "guest_zero_kB")?))
                .collect::<Vec<_>>()
        };
        let (e, q) = (
            med(&rounds, "ebb", ph, "host_kB"),
            med(&rounds, "qemu", ph, "host_kB"),
        );
        let _ = writeln!(
            s,
            "| {ph} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            show(e, Unit::KbAsMib),
            show(q, Unit::KbAsMib),
            ratio(e, q),
            show(med(&rounds, "ebb", ph, "VmRSS"), Unit::KbAsMib),
            show(med(&rounds, "qemu", ph, "VmRSS"), Unit::KbAsMib),
            show(g("ebb"), Unit::KbAsMib),
            show(g("qemu"), Unit::KbAsMib),
            show(median(nz("ebb")), Unit::KbAsMib),
            show(median(nz("qemu")), Unit::KbAsMib),
        );
    }
    s.push('\n');
    s.push_str(
        "| phase | VmPTE kB ebb | QEMU | ebb/QEMU \
         | SecPageTables kB ebb | QEMU | ebb/QEMU | ebb table kB (min) |\n",
    );
    s.push_str("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for ph in PHASES {
        let _ = write!(s, "| {ph} ");
        for key in ["VmPTE", "SecPageTables"] {
            let _ = write!(s, "| {} ", ebb_and_qemu(&rounds, ph, key, Unit::Whole));
        }
        let _ = writeln!(
            s,
            "| {} ({}) |",
            show(med(&rounds, "ebb", ph, "table_bytes"), Unit::BytesAsKb),
            show(med(&rounds, "ebb", ph, "min_table_bytes"), Unit::BytesAsKb)
        );
    }
    s.push('\n');
    s.push_str("| time | ebb | QEMU | ebb/QEMU |\n| --- | ---: | ---: | ---: |\n");
    for (what, phase, key, unit) in [
        (
            "touch 600 MiB, ns/page",
            "touched",
            "ns_per_page",
            Unit::Whole,
        ),
        (
            "settle after the free, ms",
            "freed",
            "settle_ms",
            Unit::Whole,
        ),
        (
            "inflate (target set to driver there), ms",
            "inflated",
            "inflate_ms",
            Unit::Whole,
        ),
        (
            "re-read 32 MiB working set, ns/page",
            "retouch-ws",
            "ns_per_page",
            Unit::Whole,
        ),
        ("deflate to 0, ms", "deflated", "deflate_ms", Unit::Whole),
        (
            "touch 512 MiB fresh, ns/page",
            "retouch",
            "ns_per_page",
            Unit::Whole,
        ),
    ] {
        let _ = writeln!(
            s,
            "| {what} | {} |",
            ebb_and_qemu(&rounds, phase, key, unit)
        );
    }
    s.push('\n');
    // ebb's counters only grow: the last phase has the whole run's.
    let last = "retouch";
    let _ = writeln!(
        s,
        "ebb's own, at the end: longest balloon queue notification (the thread that handled it held) {} ms; \
         KVM table zaps {} (longest {} ms, 2 MiB blocks emptied {}).\n",
        show(med(&rounds, "ebb", last, "notify_ns_max"), Unit::NsAsMs),
        show(med(&rounds, "ebb", last, "zaps"), Unit::Whole),
        show(med(&rounds, "ebb", last, "ns_max"), Unit::NsAsMs),
        show(med(&rounds, "ebb", last, "blocks_emptied"), Unit::Whole),
    );
    let times: Vec<String> = all
        .iter()
        .filter(|r| r.reporting == setting)
        .map(|r| format!("{:.0}", r.elapsed_s))
        .collect();
    let _ = writeln!(
        s,
        "Rounds took {} s (one L1 boot, both VMMs).\n",
        times.join(", ")
    );
    s
}

/// The CSV columns taken from each phase line, after round, reporting, order, vmm, phase.
const CSV_KEYS: [&str; 26] = [
    "t_ms",
    "host_kB",
    "VmRSS",
    "RssAnon",
    "RssFile",
    "RssShmem",
    "guest_kB",
    "guest_zero_kB",
    "VmPTE",
    "SecPageTables",
    "PageTables",
    "table_bytes",
    "min_table_bytes",
    "resident_pages",
    "host_pte_bytes",
    "kvm_table_bytes",
    "notify_ns_max",
    "zaps",
    "ns_max",
    "blocks_emptied",
    "faults",
    "settle_ms",
    "inflate_ms",
    "deflate_ms",
    "ns_per_page",
    "bad_pages",
];

fn csv(rounds: &[Round]) -> String {
    let mut s = format!(
        "round,reporting,order,counts,vmm,phase,{}\n",
        CSV_KEYS
            .iter()
            .map(|k| match *k {
                "VmRSS" | "VmPTE" | "SecPageTables" | "PageTables" | "RssAnon" | "RssFile"
                | "RssShmem" => format!("{k}_kB"),
                "ns_max" => "kvm_zap_ns_max".into(),
                "zaps" => "kvm_zaps".into(),
                other => other.into(),
            })
            .collect::<Vec<_>>()
            .join(",")
    );
    for r in rounds {
        for p in &r.phases {
            let vals: Vec<String> = CSV_KEYS
                .iter()
                .map(|k| p.f.get(*k).map(|v| v.to_string()).unwrap_or_default())
                .collect();
            let _ = writeln!(
                s,
                "{},{},{},{},{},{},{}",
                r.round,
                r.reporting,
                r.order,
                u8::from(r.ok()),
                p.vmm,
                p.phase,
                vals.join(",")
            );
        }
    }
    s
}

/// The picture: for the first round that counts of each reporting setting, VmPTE and
/// SecPageTables over time for both VMMs (seconds since each VMM started), with phase marks.
fn picture(rounds: &[Round], settings: &[String], path: &Path) -> Result<bool, Box<dyn Error>> {
    use plotters::prelude::*;
    let shown: Vec<&Round> = settings
        .iter()
        .filter_map(|s| rounds.iter().find(|r| &r.reporting == s && r.ok()))
        .collect();
    if shown.is_empty() {
        return Ok(false);
    }
    let panels = shown.len() * 2;
    let root = SVGBackend::new(path, (1000, 330 * panels as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((panels, 1));
    let colors = [RGBColor(31, 90, 180), RGBColor(200, 60, 40)];
    for (i, area) in areas.iter().enumerate() {
        let r = shown[i / 2];
        let sec = i % 2 == 1;
        let what = if sec {
            "KVM's nested tables (L1 SecPageTables)"
        } else {
            "host page tables of the VMM process (VmPTE)"
        };
        let value = |s: &Sample| if sec { s.sec_kb } else { s.vm_pte_kb };
        let mut series = Vec::new();
        let (mut xmax, mut ymax) = (1.0f64, 1.0f64);
        for (j, (v, name)) in VMMS.iter().enumerate() {
            let Some(t0) = r.start_ms(v) else { continue };
            let pts: Vec<(f64, f64)> = r
                .samples
                .get(*v)
                .map(|ss| {
                    ss.iter()
                        .map(|s| ((s.t_ms - t0) / 1000.0, value(s)))
                        .collect()
                })
                .unwrap_or_default();
            for &(x, y) in &pts {
                xmax = xmax.max(x);
                ymax = ymax.max(y);
            }
            let marks: Vec<(f64, &str)> = PHASES
                .iter()
                .filter_map(|ph| Some(((r.get(v, ph, "t_ms")? - t0) / 1000.0, *ph)))
                .collect();
            series.push((*name, colors[j], pts, marks));
        }
        let ymax = ymax * 1.25;
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!("{what}, kB; reporting {}, round {}", r.reporting, r.round),
                ("sans-serif", 16),
            )
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..xmax * 1.02, 0f64..ymax)?;
        chart
            .configure_mesh()
            .x_desc("seconds since the VMM started")
            .y_desc("kB")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .light_line_style(WHITE)
            .draw()?;
        for (k, (name, color, pts, marks)) in series.into_iter().enumerate() {
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            let label_y = ymax * (0.96 - 0.07 * k as f64);
            for (t, ph) in marks {
                chart.draw_series(LineSeries::new(
                    vec![(t, 0.0), (t, ymax)],
                    color.mix(0.25).stroke_width(1),
                ))?;
                chart.draw_series(std::iter::once(Text::new(
                    ph.to_string(),
                    (t, label_y),
                    ("sans-serif", 11).into_font().color(&color),
                )))?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(true)
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

/// A round's log: the header, the job's output, and its periodic samples.
fn round_log(header: &str, out: Option<&ebb_harness::RunOutput>) -> String {
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

/// Reads every round log in `dir`.
fn load(dir: &Path) -> Result<Vec<Round>, Box<dyn Error>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn line(vmm: &str, phase: &str, extra: &str) -> String {
        format!(
            "EBB-BENCH vmm={vmm} reporting=on phase={phase} label={phase} pid=1 comm=x t_ms=1000 \
             VmRSS=2048 VmPTE=100 SecPageTables=40 PageTables=900 host_kB=3072 guest_kB=1024 \
             guest_zero_kB=256 {extra}\n"
        )
    }

    fn full_log(status: i32) -> String {
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

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
        assert_eq!(ratio(Some(1.0), Some(4.0)), "0.25");
        assert_eq!(ratio(Some(0.0), Some(0.0)), "1.00");
        assert_eq!(ratio(Some(1.0), None), "–");
    }

    #[test]
    fn the_table_has_every_phase() {
        let rounds = vec![Round::parse(&full_log(0))];
        let t = tables("on", &rounds);
        for ph in PHASES {
            assert!(t.contains(&format!("| {ph} |")), "{t}");
        }
        assert!(
            t.contains("| 3.0 | 3.0 | 1.00 | 2.0 | 2.0 | 1.0 | 1.0 | 0.8 | 0.8 |"),
            "{t}"
        );
        assert!(t.contains("| 100 | 100 | 1.00 |"), "{t}");
        let c = csv(&rounds);
        assert_eq!(c.lines().count(), 1 + 14);
    }
}
