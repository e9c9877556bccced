//! The stress run (docs/STRESS.md): ebb with the balloon, free page reporting and
//! deflate-on-OOM, 2 vCPUs and 1 GiB, under a guest that holds checksummed pages
//! (`ebb-guest integrity`) while stress-ng's memory stressors and `ebb-guest churn` run, and a
//! host that inflates the balloon to a random target and deflates it, cycle after cycle. The
//! steps are `scripts/stress-l1.sh` (L1) and `tests/guest-tools/stress-guest.sh` (the guest).
//!
//! After every inflation and every deflation, with the guest's stressors frozen, this test
//! checks ebb's figures: leaves cover exactly the resident pages, table bytes are the minimum,
//! guest-mm holds exactly what the device holds and the driver reports, ballooned pages are not
//! resident, and ebb's VmRSS and VmPTE stay within what guest RAM can explain; a failure names
//! its cycle and the seed. At the end the guest's pages, stress-ng's own checks and churn's must
//! all have passed, and ebb's exit report must be exact. It prints a summary table.
//!
//! In the suite it runs a few cycles (`EBB_STRESS_CYCLES`, default 3) in one L1 boot;
//! `scripts/stress.sh` runs it in several boots for 20 cycles or more. `EBB_STRESS_SEED` repeats a run's targets; `EBB_STRESS_MINUTES` keeps cycling for
//! at least that long; `EBB_STRESS_MIN_MIB` / `EBB_STRESS_MAX_MIB` set the targets' range;
//! `EBB_STRESS_SUMMARY` names a file for the summary (markdown).
//!
//! Needs `resources/setup.sh` to have run (fails loudly otherwise).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{check_exit_report, checked_snapshots, fields, run_balloon_script_on};
use ebb_harness::Rig;

/// The guest's RAM, MiB.
const GUEST_MIB: u64 = 1024;
/// What `integrity` holds, MiB.
const HOLD_MIB: u64 = 64;
/// ebb's own memory beside guest RAM (its binary, heap, thread stacks), as a bound, kB.
const EBB_OWN_KB: u64 = 64 << 10;
/// Pages the host may map twice for a moment (guest-mm fills a block through a second view of
/// guest RAM), as a bound on `RssShmem` above the resident pages, kB.
const TWICE_MAPPED_KB: u64 = 16 << 10;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
        _ => default,
    }
}

/// What this run does, from the environment.
struct Plan {
    cycles: u64,
    minutes: u64,
    seed: u64,
    min_mib: u64,
    max_mib: u64,
}

impl Plan {
    fn from_env() -> Plan {
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let plan = Plan {
            cycles: env_u64("EBB_STRESS_CYCLES", 3),
            minutes: env_u64("EBB_STRESS_MINUTES", 0),
            // The script's generator is 31 bits wide.
            seed: env_u64("EBB_STRESS_SEED", clock % (1 << 31)),
            min_mib: env_u64("EBB_STRESS_MIN_MIB", 32),
            max_mib: env_u64("EBB_STRESS_MAX_MIB", 320),
        };
        assert!(plan.cycles >= 1, "EBB_STRESS_CYCLES must be at least 1");
        assert!(
            plan.min_mib <= plan.max_mib && plan.max_mib <= GUEST_MIB / 2,
            "targets must be a range within half the guest's {GUEST_MIB} MiB"
        );
        plan
    }

    /// The rig's limit for the whole run: boot and the end's checks, then each cycle's
    /// inflation and deflation at the script's own limit (240 s each) and its handshakes.
    fn timeout(&self) -> Duration {
        Duration::from_secs(900 + self.minutes * 60 + self.cycles * 600)
    }
}

/// One cycle's figures, from its lines.
struct Cycle {
    n: u64,
    target_mib: u64,
    inflate_ms: u64,
    deflate_ms: u64,
    pages_in: u64,
    pages_out: u64,
    /// Pages the guest deflated while the host was inflating (deflate-on-OOM, or a balloon
    /// page the guest's compaction moved: one inflate and one deflate).
    guest_deflated: u64,
    faults: u64,
    zaps: u64,
    notify_ns_max: u64,
    vmpte_kb: [u64; 2],
    vmrss_kb: [u64; 2],
    available_mib: u64,
}

#[test]
fn stress_balloon_cycles_under_guest_memory_stress() {
    let plan = Plan::from_env();
    let ctx = format!("seed {} (EBB_STRESS_SEED={0} repeats it)", plan.seed);
    eprintln!(
        "ebb_stress: {} cycles, at least {} min, targets {}..={} MiB, {ctx}",
        plan.cycles, plan.minutes, plan.min_mib, plan.max_mib
    );
    let env = [
        ("STRESS_CYCLES", plan.cycles.to_string()),
        ("STRESS_MINUTES", plan.minutes.to_string()),
        ("STRESS_SEED", plan.seed.to_string()),
        ("STRESS_MIN_MIB", plan.min_mib.to_string()),
        ("STRESS_MAX_MIB", plan.max_mib.to_string()),
        ("STRESS_HOLD_MIB", HOLD_MIB.to_string()),
        ("EBB_MEMORY_MIB", GUEST_MIB.to_string()),
    ];
    let script = ebb_harness::workspace_root().join("scripts/stress-l1.sh");
    let mut rig = Rig::from_env().expect("rig images (run resources/setup.sh first)");
    // One emulated CPU for L1 unless EBB_RIG_L1_CPUS says otherwise: with two, L2 triple faults
    // and int3 oopses came on top of KVM's "internal error, suberror 3" on the balloon's MMIO
    // registers (docs/STRESS.md, "Why several boots"). The guest keeps its 2 vCPUs; L1 runs
    // them on one.
    if std::env::var_os("EBB_RIG_L1_CPUS").is_none() {
        rig.l1_cpus = 1;
    }
    eprintln!("ebb_stress: L1 with {} CPU(s)", rig.l1_cpus);
    let (out, text) = run_balloon_script_on(
        &rig,
        "ebb_stress",
        r#"sh "$EBB_RIG_INPUTS/stress-l1.sh""#,
        &env,
        &[script],
        plan.timeout(),
    );

    let seed = fields(&text, "EBB-STRESS-SEED", "run");
    assert_eq!(seed["seed"], plan.seed, "the script ran another seed");
    let done = fields(&text, "EBB-STRESS-DONE", "end");
    assert!(done["cycles"] >= plan.cycles, "{done:?}, {ctx}");

    let ram_pages = GUEST_MIB * 256;
    let c0 = fields(&text, "EBB-BALLOON-STATS", "c0");
    let mut before = fields(&text, "EBB-BALLOON-SNAP", "c0-held");
    let mut host_before: Option<HashMap<String, u64>> = None;
    let mut cycles = Vec::new();
    for n in 1..=done["cycles"] {
        let at = |what: &str| format!("cycle {n} ({what}), {ctx}");
        let labels = [format!("c{n}-inflated"), format!("c{n}-deflated")];
        // leaves == resident, table bytes == minimum, held == the device's, not resident.
        let [inflated] = checked_snapshots("ebb_stress", &text, [labels[0].as_str()], ram_pages);
        let [deflated] = checked_snapshots("ebb_stress", &text, [labels[1].as_str()], ram_pages);
        let cycle = fields(&text, "EBB-STRESS-CYCLE", &format!("c{n}"));
        let stats = fields(&text, "EBB-BALLOON-STATS", &format!("c{n}"));
        let hosts = labels.clone().map(|l| fields(&text, "EBB-STRESS-HOST", &l));

        // The driver's count is guest-mm's (deflate-on-OOM may leave it below the target).
        for s in [&inflated, &deflated] {
            assert_eq!(s["held"], s["actual_pages"], "{}: {s:?}", at("held pages"));
            assert!(
                s["actual_mib"] <= s["target_mib"],
                "{}: {s:?}",
                at("target")
            );
        }
        assert_eq!(
            inflated["target_mib"],
            cycle["target_mib"],
            "{}",
            at("target")
        );
        assert_eq!(deflated["held"], 0, "{}: {deflated:?}", at("deflated"));
        assert_eq!(
            stats["oom_kill"],
            c0["oom_kill"],
            "{}: {stats:?}",
            at("no OOM kill")
        );

        // ebb's host memory: its RSS is guest RAM's resident pages and its own memory, its page
        // tables at most those that map all of guest RAM twice with 4 KiB pages, and its own.
        for (s, h) in [(&inflated, &hosts[0]), (&deflated, &hosts[1])] {
            let resident_kb = s["resident"] * 4;
            assert!(
                h["rssshmem_kb"] <= resident_kb + TWICE_MAPPED_KB,
                "{}: guest RAM in ebb's RSS beyond its resident pages: {h:?} {s:?}",
                at("RSS")
            );
            assert!(
                h["rssanon_kb"] + h["rssfile_kb"] <= EBB_OWN_KB,
                "{}: ebb's own memory: {h:?}",
                at("RSS")
            );
            assert!(
                h["vmrss_kb"] <= resident_kb + TWICE_MAPPED_KB + EBB_OWN_KB,
                "{}: {h:?} {s:?}",
                at("RSS")
            );
            let pte_bound_kb = 2 * (GUEST_MIB / 2) * 4 + 1024;
            assert!(
                h["vmpte_kb"] <= pte_bound_kb,
                "{}: VmPTE above {pte_bound_kb} kB: {h:?}",
                at("VmPTE")
            );
        }

        let delta = |key: &str, h: &HashMap<String, u64>| {
            h[key] - host_before.as_ref().map_or(0, |b| b[key])
        };
        cycles.push(Cycle {
            n,
            target_mib: cycle["target_mib"],
            inflate_ms: cycle["inflate_ms"],
            deflate_ms: cycle["deflate_ms"],
            pages_in: deflated["pages_inflated"] - before["pages_inflated"],
            pages_out: deflated["pages_deflated"] - before["pages_deflated"],
            guest_deflated: inflated["pages_deflated"] - before["pages_deflated"],
            faults: delta("faults", &hosts[1]),
            zaps: delta("zaps", &hosts[1]),
            notify_ns_max: hosts[1]["notify_ns_max"],
            vmpte_kb: [hosts[0]["vmpte_kb"], hosts[1]["vmpte_kb"]],
            vmrss_kb: [hosts[0]["vmrss_kb"], hosts[1]["vmrss_kb"]],
            available_mib: stats["available_memory"] >> 20,
        });
        before = deflated;
        host_before = Some(hosts[1].clone());
    }

    // The end: every page intact, stress-ng's and churn's own checks passed.
    let integrity = out.result("integrity").expect("integrity result");
    assert_eq!(integrity.u64("checked"), Some(HOLD_MIB * 256), "{ctx}");
    assert_eq!(
        integrity.u64("bad_pages"),
        Some(0),
        "guest data lost under the stress run, {ctx}:\n{text}"
    );
    let churn = out.result("churn").expect("churn result");
    assert_eq!(churn.u64("nonzero"), Some(0), "churn: {ctx}");
    let exit = fields(&text, "EBB-STRESS-EXIT", "end");
    assert!(exit.values().all(|v| *v == 0), "{exit:?}, {ctx}");
    assert!(!text.contains("EBB-BAD-PAGE"), "{ctx}:\n{text}");
    let end = fields(&text, "EBB-BALLOON-STATS", "end");
    assert_eq!(end["oom_kill"], c0["oom_kill"], "{end:?}, {ctx}");
    check_exit_report(&text);

    let end = End {
        checked: integrity.u64("checked").unwrap_or(0),
        bad_pages: integrity.u64("bad_pages").unwrap_or(0),
        churn_ops: churn.u64("ops").unwrap_or(0),
        l1_cpus: rig.l1_cpus,
        elapsed: out.elapsed,
        rig_faults: out.rig_faults.len(),
        stale_reruns: stale_event_delivery_reruns(&text),
    };
    let table = summary(&plan, &cycles, &end);
    eprintln!("{table}");
    if let Some(path) = std::env::var_os("EBB_STRESS_SUMMARY").filter(|p| !p.is_empty()) {
        let path = std::path::PathBuf::from(path);
        std::fs::write(&path, &table).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        // The whole console beside it (a failing run prints it in its panic message instead).
        let console = path.with_file_name("console.log");
        std::fs::write(&console, &text).unwrap_or_else(|e| panic!("{console:?}: {e}"));
    }
}

/// The run's end: the guest's checks and the rig's.
struct End {
    checked: u64,
    bad_pages: u64,
    churn_ops: u64,
    l1_cpus: u32,
    elapsed: Duration,
    rig_faults: usize,
    /// MMIO accesses ebb ran again after KVM's stale "during event delivery" report (its exit
    /// line; docs/ARCHITECTURE.md).
    stale_reruns: u64,
}

/// From ebb's exit line: "..., N MMIO accesses run again after a stale event-delivery report)".
fn stale_event_delivery_reruns(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_once(" MMIO accesses run again"))
        .filter_map(|(head, _)| head.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The summary: one row per cycle, then the run's totals.
fn summary(plan: &Plan, cycles: &[Cycle], end: &End) -> String {
    let s = |ms: u64| format!("{:.1}", ms as f64 / 1000.0);
    let mut t = String::new();
    t.push_str(&format!(
        "Stress run: {} cycles, seed {}, targets {}..={} MiB of {GUEST_MIB} MiB, \
         {:.0} s in the rig (L1 with {} CPU(s)), rig faults re-run: {}, MMIO accesses ebb \
         ran again after a stale event-delivery report: {}\n\
         integrity: {} pages checked, {} bad; churn: {} operations, every discarded page \
         read back as zero; stress-ng: every stressor passed its own checks\n\n",
        cycles.len(),
        plan.seed,
        plan.min_mib,
        plan.max_mib,
        end.elapsed.as_secs_f64(),
        end.l1_cpus,
        end.rig_faults,
        end.stale_reruns,
        end.checked,
        end.bad_pages,
        end.churn_ops,
    ));
    t.push_str(
        "| cycle | target MiB | inflate s | deflate s | pages in | pages out | \
         guest deflated | faults | zaps | notify max ms | VmPTE kB (in/out) | \
         VmRSS MiB (in/out) | guest available MiB |\n",
    );
    t.push_str("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for c in cycles {
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {} / {} | {} / {} | {} |\n",
            c.n,
            c.target_mib,
            s(c.inflate_ms),
            s(c.deflate_ms),
            c.pages_in,
            c.pages_out,
            c.guest_deflated,
            c.faults,
            c.zaps,
            c.notify_ns_max as f64 / 1e6,
            c.vmpte_kb[0],
            c.vmpte_kb[1],
            c.vmrss_kb[0] >> 10,
            c.vmrss_kb[1] >> 10,
            c.available_mib,
        ));
    }
    let sum = |f: fn(&Cycle) -> u64| cycles.iter().map(f).sum::<u64>();
    let max = |f: fn(&Cycle) -> u64| cycles.iter().map(f).max().unwrap_or(0);
    let mut inflate: Vec<u64> = cycles.iter().map(|c| c.inflate_ms).collect();
    let mut deflate: Vec<u64> = cycles.iter().map(|c| c.deflate_ms).collect();
    inflate.sort_unstable();
    deflate.sort_unstable();
    let median = |v: &[u64]| v.get(v.len() / 2).copied().unwrap_or(0);
    t.push_str(&format!(
        "\n{} cycles; pages moved {} ({} in, {} out, {} deflated by the guest itself); \
         inflate {} s in all (median {} s, longest {} s); deflate {} s in all (median {} s, \
         longest {} s); worst notify_ns_max {:.1} ms; faults {}; KVM table zaps {}; \
         VmPTE at most {} kB, VmRSS at most {} MiB; guest available memory at least {} MiB \
         with the balloon inflated\n",
        cycles.len(),
        sum(|c| c.pages_in + c.pages_out),
        sum(|c| c.pages_in),
        sum(|c| c.pages_out),
        sum(|c| c.guest_deflated),
        s(sum(|c| c.inflate_ms)),
        s(median(&inflate)),
        s(max(|c| c.inflate_ms)),
        s(sum(|c| c.deflate_ms)),
        s(median(&deflate)),
        s(max(|c| c.deflate_ms)),
        max(|c| c.notify_ns_max) as f64 / 1e6,
        sum(|c| c.faults),
        sum(|c| c.zaps),
        max(|c| c.vmpte_kb[0].max(c.vmpte_kb[1])),
        max(|c| c.vmrss_kb[0].max(c.vmrss_kb[1])) >> 10,
        cycles.iter().map(|c| c.available_mib).min().unwrap_or(0),
    ));
    t
}
