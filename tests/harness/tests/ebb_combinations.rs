//! End to end: every combination of guest-memory settings that ebb's flags allow (reclaim
//! strategy x release mode x how guest RAM is filled; the list and why it is that list:
//! docs/TESTING.md, "Every combination of memory settings") boots a small Debian guest in the
//! rig, one after another in one L1 boot (`scripts/combos-l1.sh`). In each, the guest writes
//! checksummed pages and holds them while the balloon inflates and deflates, then checks every
//! page. After the inflation and after the deflation guest-mm's leaves are exactly the resident
//! pages and its table bytes are the minimum for them (with strategy `off`, at least the
//! minimum, and exactly it after `PUT /memory/reclaim`); ebb reports the strategy, release mode
//! and fault-around window asked for; the exit report is as exact. A failure names the
//! combination; every combination is checked before the test fails, and the figures of all of
//! them go to stderr. `EBB_COMBOS=all` also runs the pairs the default list leaves out.
//!
//! Needs `resources/setup.sh` to have run (fails loudly otherwise). The static `ebb` and
//! `ebb-ctl` are built by the test (or taken from `EBB_BIN` and its directory).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use ebb_harness::{
    EbbReport, Job, PAGES_PER_2M, Rig, l1_shell_lib, labelled_fields, static_ebb, workspace_root,
};

/// Guest vCPUs: the combinations differ in memory, not in how many vCPUs fault at once
/// (`ebb_boot`, `ebb_balloon` and the stress run use two), and one boots faster in the rig.
const VCPUS: u64 = 1;
/// Guest RAM, MiB. Small, because a tracked 4 KiB guest pays a userfault per page it touches
/// (the boot alone touches about 180 MiB: the kernel, and the initramfs twice).
const MEMORY_MIB: u64 = 256;
/// The pages `ebb-guest integrity` writes, holds through the balloon cycle and checks, MiB.
const HOLD_MIB: u64 = 32;
/// How far the balloon inflates, MiB.
const INFLATE_MIB: u64 = 32;
/// The fault-around window of the windowed 4 KiB runs, pages.
const WINDOW: u64 = 16;
/// ebb's default fault-around window for memfd RAM (`DEFAULT_HUGE_FAULT_AROUND`), pages.
const MEMFD_WINDOW: u64 = 4096;

/// One combination: its label in the script's output and what ebb must report for it.
struct Combo {
    label: String,
    /// Guest RAM has a fault path and tables (not `--no-track`).
    tracked: bool,
    strategy: &'static str,
    release: &'static str,
    fault_around: u64,
}

impl Combo {
    /// The release frees the pages at once (not `free`, which leaves them to the host).
    fn eager(&self) -> bool {
        self.release != "free"
    }
}

/// The combinations `scripts/combos-l1.sh` runs, in its order; with `all`, also the ten pairs
/// its default list leaves out (`COMBOS_ALL=1`).
fn combinations(all: bool) -> Vec<Combo> {
    let mut v = Vec::new();
    let tracked = |label: String, strategy, release, fault_around| Combo {
        label,
        tracked: true,
        strategy,
        release,
        fault_around,
    };
    for s in ["off", "scan", "count"] {
        for r in ["punch-hole", "remove"] {
            v.push(tracked(format!("memfd-{r}-{s}"), s, r, MEMFD_WINDOW));
        }
    }
    // 4 KiB fills: page by page with the --no-thp defaults; windows with dontneed and the other
    // strategies, and with free (which clears no leaf and frees no table).
    for (s, r, fault_around) in [
        ("count", "dontneed", 1),
        ("off", "dontneed", WINDOW),
        ("scan", "dontneed", WINDOW),
        ("count", "free", WINDOW),
    ] {
        let fill = if fault_around == 1 {
            "anon4k".to_owned()
        } else {
            format!("anon4k-w{WINDOW}")
        };
        v.push(tracked(format!("{fill}-{r}-{s}"), s, r, fault_around));
    }
    // With `all`, every other pair on both 4 KiB fills: the ones not in the list above.
    if all {
        for r in ["dontneed", "free"] {
            for s in ["off", "scan", "count"] {
                for (fill, fault_around) in [
                    ("anon4k".to_owned(), 1),
                    (format!("anon4k-w{WINDOW}"), WINDOW),
                ] {
                    let label = format!("{fill}-{r}-{s}");
                    if !v.iter().any(|c| c.label == label) {
                        v.push(tracked(label, s, r, fault_around));
                    }
                }
            }
        }
    }
    // Untracked: once per release mode, with THP and without.
    let mut untracked = vec![("thp", "dontneed", MEMFD_WINDOW), ("4k", "free", 1)];
    if all {
        untracked.extend([("thp", "free", MEMFD_WINDOW), ("4k", "dontneed", 1)]);
    }
    for (fill, r, fault_around) in untracked {
        v.push(Combo {
            label: format!("untracked-{fill}-{r}"),
            tracked: false,
            // Without a fault path the strategy is ebb's default and means nothing.
            strategy: "count",
            release: r,
            fault_around,
        });
    }
    v
}

/// The output of the last attempt at the combination `label`: from its `EBB-COMBO-BEGIN` line to
/// its `EBB-COMBO-END` line (or to the end of the output).
fn block<'a>(text: &'a str, label: &str) -> Option<&'a str> {
    let begin = format!("EBB-COMBO-BEGIN label={label} ");
    let start = text.rfind(&begin)?;
    let rest = &text[start..];
    let end = format!("EBB-COMBO-END label={label} ");
    Some(match rest.find(&end) {
        Some(i) => {
            let line_end = rest[i..].find('\n').map_or(rest.len(), |j| i + j);
            &rest[..line_end]
        }
        None => rest,
    })
}

/// Every `key=value` field of the first line starting with `head`, numbers and words alike.
fn words(text: &str, head: &str) -> Option<HashMap<String, String>> {
    let line = text.lines().find(|l| l.starts_with(head))?;
    Some(
        line.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    )
}

/// A snapshot's figure; a missing one reads as `u64::MAX`, which fails every check it meets.
fn f(s: &HashMap<String, u64>, key: &str) -> u64 {
    s.get(key).copied().unwrap_or(u64::MAX)
}

/// The pages a snapshot's leaves cover, if it has both leaf counts.
fn leaf_pages(s: &HashMap<String, u64>) -> Option<u64> {
    Some(s.get("leaves_4k")? + PAGES_PER_2M * s.get("leaves_2m")?)
}

/// Checks one combination's output; returns what is wrong (empty: it passed) and one line of its
/// figures for stderr.
fn check(c: &Combo, text: &str) -> (Vec<String>, String) {
    let mut bad = Vec::new();
    let Some(b) = block(text, &c.label) else {
        return (vec!["it never ran".into()], String::new());
    };
    let end = words(b, &format!("EBB-COMBO-END label={} ", c.label)).unwrap_or_default();
    let status = end.get("status").map_or("none", String::as_str);
    if status != "0" {
        bad.push(format!("ebb exit status {status}"));
    }
    if let Some(l) = b.lines().find(|l| l.contains("ebb: seccomp:")) {
        bad.push(format!("seccomp stopped ebb: {l}"));
    }
    if let Some(l) = b.lines().find(|l| l.starts_with("EBB-COMBO-RIG-FAULT ")) {
        bad.push(format!("a rig fault on every attempt, the last: {l}"));
    }
    for l in b.lines().filter(|l| l.starts_with("EBB-COMBO-STEP-FAIL ")) {
        bad.push(l.trim_start_matches("EBB-COMBO-STEP-FAIL ").to_owned());
    }
    match b
        .lines()
        .find_map(|l| l.split_once("EBB-RESULT integrity "))
    {
        None => bad.push("no integrity result".into()),
        Some((_, r)) => {
            let r = ebb_harness::parse_result(&format!("integrity {r}")).unwrap_or_default();
            if r.u64("checked") != Some(HOLD_MIB * 256) || r.u64("bad_pages") != Some(0) {
                bad.push(format!("integrity: {:?}", r.fields));
            }
        }
    }

    let mut labels = vec!["held", "inflated"];
    if c.tracked && c.strategy == "off" {
        labels.push("reclaimed");
    }
    labels.push("deflated");
    let mut snaps = Vec::new();
    for label in labels {
        let Some(s) = labelled_fields(b, "EBB-COMBO-SNAP", label) else {
            bad.push(format!("no {label} figures"));
            continue;
        };
        let w = words(b, &format!("EBB-COMBO-SNAP label={label} ")).unwrap_or_default();
        let mut say = |what: String| bad.push(format!("{label}: {what}: {s:?}"));
        let policy = (w.get("strategy"), w.get("release"));
        if policy != (Some(&c.strategy.to_owned()), Some(&c.release.to_owned())) {
            say(format!("policy in force {policy:?}"));
        }
        if f(&s, "fault_around") != c.fault_around {
            say(format!("fault-around is not {}", c.fault_around));
        }
        if f(&s, "bad_pfns") != 0 || f(&s, "release_errors") != 0 || f(&s, "pending") != 0 {
            say("bad frames, release errors or pages waiting for their block".into());
        }
        let held = f(&s, "device_held");
        if f(&s, "actual_pages") != held {
            say("the driver and the device disagree on the balloon".into());
        }
        let want = match label {
            "inflated" | "reclaimed" => INFLATE_MIB * 256,
            _ => 0,
        };
        if held != want {
            say(format!("the balloon holds {held} pages, not {want}"));
        }
        if c.tracked {
            let leaf_pages = leaf_pages(&s);
            if leaf_pages.is_none() || leaf_pages != s.get("resident").copied() {
                say("leaf pages are not the resident pages".into());
            }
            if f(&s, "held") != held {
                say("guest-mm and the device hold different pages".into());
            }
            let (tb, mb) = (f(&s, "table_bytes"), f(&s, "min_table_bytes"));
            let exact = c.strategy != "off" || label == "reclaimed" || label == "deflated";
            if (exact && tb != mb) || tb < mb {
                say("table bytes are not the minimum".into());
            }
        }
        // An eager release leaves no ballooned page resident, except pages the host could not
        // split out of a 2 MiB page (kept, with their leaves).
        let kept = s.get("kept").copied().unwrap_or(0); // untracked RAM keeps none
        if c.eager() && f(&s, "resident") > (MEMORY_MIB * 256).saturating_sub(held) + kept {
            say("ballooned pages are resident".into());
        }
        snaps.push((label, s));
    }
    if let Some((_, d)) = snaps.iter().find(|(l, _)| *l == "deflated")
        && f(d, "pages_deflated") < INFLATE_MIB * 256
    {
        bad.push(format!("deflated: fewer pages than inflated: {d:?}"));
    }

    if c.tracked {
        match EbbReport::parse(b) {
            Err(e) => bad.push(format!("exit report: {e}")),
            Ok(r) => {
                if r.leaf_pages() != r.resident_pages {
                    bad.push(format!(
                        "exit report: leaf pages are not resident pages: {r:?}"
                    ));
                }
                if r.table_bytes < r.min_table_bytes
                    || (c.strategy != "off" && r.table_bytes != r.min_table_bytes)
                {
                    bad.push(format!(
                        "exit report: table bytes are not the minimum: {r:?}"
                    ));
                }
            }
        }
    }

    let mut line = format!("{:<26}", c.label);
    for (label, s) in &snaps {
        if c.tracked {
            let _ = write!(
                line,
                " | {label}: leaves {} resident {} tables {} min {}",
                leaf_pages(s).map_or("?".to_owned(), |n| n.to_string()),
                f(s, "resident"),
                f(s, "table_bytes"),
                f(s, "min_table_bytes")
            );
        } else {
            let _ = write!(line, " | {label}: resident {}", f(s, "resident"));
        }
    }
    let integrity = b
        .lines()
        .find_map(|l| l.split_once("EBB-RESULT integrity "))
        .and_then(|(_, r)| ebb_harness::parse_result(&format!("integrity {r}")))
        .and_then(|r| r.u64("bad_pages"))
        .map_or("?".to_owned(), |n| n.to_string());
    let _ = write!(
        line,
        " | bad pages {integrity} | attempt {} | {} s",
        end.get("attempt").map_or("?", String::as_str),
        end.get("t_ms")
            .and_then(|t| t.parse::<u64>().ok())
            .map_or("?".to_owned(), |t| format!("{:.1}", t as f64 / 1000.0))
    );
    (bad, line)
}

#[test]
fn every_memory_combination_keeps_guest_data_and_exact_tables_through_a_balloon_cycle() {
    let rig = Rig::from_env().expect("rig images (run resources/setup.sh first)");
    let ebb = static_ebb().unwrap_or_else(|e| panic!("{e}"));
    let ctl = ebb.with_file_name("ebb-ctl");
    assert!(ctl.exists(), "{} missing", ctl.display());
    // EBB_COMBOS=all runs every pair the flags accept (22 runs); the default, the suite's, 12.
    let all = match std::env::var("EBB_COMBOS").as_deref() {
        Ok("all") => true,
        Ok("") | Err(_) => false,
        Ok(other) => panic!("EBB_COMBOS={other}: only \"all\" is known"),
    };
    let job = Job::shell("sh \"$EBB_RIG_INPUTS/combos-l1.sh\"")
        .input(&ebb)
        .input(&ctl)
        .input(l1_shell_lib())
        .input(workspace_root().join("scripts/combos-l1.sh"))
        .env("EBB_VCPUS", VCPUS.to_string())
        .env("EBB_MEMORY_MIB", MEMORY_MIB.to_string())
        .env("COMBO_HOLD_MIB", HOLD_MIB.to_string())
        .env("COMBO_INFLATE_MIB", INFLATE_MIB.to_string())
        .env("COMBO_WINDOW", WINDOW.to_string())
        .env("COMBOS_ALL", if all { "1" } else { "0" })
        .timeout(Duration::from_secs(if all { 5400 } else { 2700 }));
    // L1's own faults re-run the whole job; the faults of ebb's guests re-run only the
    // combination that met them, inside the script (scripts/combos-l1.sh).
    let out = rig
        .run_with(&job, &rig.l1_reruns("ebb_combinations"))
        .unwrap_or_else(|e| panic!("rig run failed: {e}"));
    let text = out.output_text();
    assert!(
        text.contains("EBB-COMBO-DONE"),
        "the script did not finish:\n{text}"
    );

    let combos = combinations(all);
    let mut failed = Vec::new();
    for c in &combos {
        let (bad, line) = check(c, &text);
        eprintln!("ebb_combinations: {line}");
        if !bad.is_empty() {
            failed.push(format!("{}:\n    {}", c.label, bad.join("\n    ")));
        }
    }
    // Rig faults survived, said the way the harness says them (scripts/test.sh counts them).
    for l in text
        .lines()
        .filter(|l| l.starts_with("EBB-COMBO-RIG-FAULT "))
    {
        let w = words(l, "EBB-COMBO-RIG-FAULT ").unwrap_or_default();
        let fault = l.split_once("fault=").map_or("?", |(_, f)| f);
        eprintln!(
            "ebb-rig: ebb_combinations: RIG FAULT ({fault}) on attempt {} of 3 of {}",
            w.get("attempt").map_or("?", String::as_str),
            w.get("label").map_or("?", String::as_str)
        );
    }
    let ran: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("EBB-COMBO-BEGIN label="))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for label in ran {
        if !combos.iter().any(|c| c.label == label) {
            failed.push(format!("{label}: ran, but the test does not know it"));
        }
    }
    eprintln!(
        "ebb_combinations: {} combinations, run {:.1} s, L1 rig faults {}",
        combos.len(),
        out.elapsed.as_secs_f64(),
        out.rig_faults.len()
    );
    assert!(
        failed.is_empty(),
        "{} combination(s) failed:\n{}\n---- output ----\n{text}",
        failed.len(),
        failed.join("\n")
    );
}
