//! End to end: the balloon's statistics and deflate-on-OOM under a real Debian guest in the rig.
//! ebb boots with `--balloon-deflate-on-oom` and statistics every second. The guest holds 32 MiB
//! of checksummed pages while L1 inflates the balloon to 320 MiB of the guest's 512; the guest's
//! statistics must show that memory gone from its free memory. Then a guest process touches
//! 192 MiB of anonymous memory (`ebb-guest hog`), more than the guest has left and memory it
//! cannot reclaim (no swap): its out-of-memory path, inside the process's page faults, makes the
//! Linux driver deflate the balloon, 1 MiB per out-of-memory call, instead of killing a task. At
//! that point the device has taken back what the guest deflated, guest-mm holds exactly what the
//! device still holds, nothing was killed, the guest's data is intact, and the second-level
//! tables are exact.
//!
//! In this rig the driver's first notify write after such a page fault always met KVM's stale
//! "during event delivery" report, which stopped the guest until ebb learnt to run the access
//! again (docs/ARCHITECTURE.md, "A stale event-delivery report"); the test counts those re-runs.
//!
//! Needs `resources/setup.sh` to have run (fails loudly otherwise). The static `ebb` and
//! `ebb-ctl` are built by the test (or taken from `EBB_BIN` and its directory).

mod common;

use std::time::Duration;

use common::{check_exit_report, checked_snapshots, fields, run_balloon_script};

/// The balloon's target in MiB, of 512 MiB of guest RAM.
const TARGET_MIB: u64 = 320;
/// What the guest touches while the balloon is inflated, in MiB.
const FILL_MIB: u64 = 192;

/// Runs in L1; the helpers (`snap`, `stats_snap`, `set_target`, `wait_for`) are in
/// `scripts/ebb-l1-lib.sh`.
const SCRIPT: &str = r#"
E="$EBB_RIG_INPUTS/ebb"; CTL="$EBB_RIG_INPUTS/ebb-ctl"; S=/run/ebb.sock; OUT=/tmp/ebb.out
. "$EBB_RIG_INPUTS/ebb-l1-lib.sh"
# The guest holds its pages until the balloon is inflated, checks them, touches more anonymous
# memory than is left, and stays up until told it may power off.
G="ebb-guest integrity --mib 32 --wait-console && ebb-guest hog --mib $FILL_MIB --hold-secs 1"
G="$G && echo EBB-OOM-FILLED && ebb-guest wait-line"
start_ebb "$G" --hlt-in-guest --balloon --balloon-deflate-on-oom --balloon-stats-s 1
wait_for "EBB-INTEGRITY-WAITING" 120 || fail "the guest never held its pages"
fresh_stats 30 || fail "no fresh guest statistics"
stats_snap before || fail "GET /balloon/statistics failed"
snap held || fail "API snapshot failed"
set_target "$TARGET_MIB" 60 || fail "the balloon did not reach $TARGET_MIB MiB in 60 s"
snap inflated || fail "API snapshot failed"
fresh_stats 30 || fail "no fresh guest statistics"
stats_snap inflated || fail "GET /balloon/statistics failed"
tell_guest fill
wait_for "^EBB-OOM-FILLED" 150 || fail "the guest never finished touching its memory"
snap oom || fail "API snapshot failed"
fresh_stats 30 || fail "no fresh guest statistics"
stats_snap oom || fail "GET /balloon/statistics failed"
tell_guest done
finish
"#;

#[test]
fn balloon_statistics_and_deflate_on_oom() {
    let env = [
        ("TARGET_MIB", TARGET_MIB.to_string()),
        ("FILL_MIB", FILL_MIB.to_string()),
    ];
    let (out, text) = run_balloon_script("ebb_balloon_oom", SCRIPT, &env, Duration::from_secs(600));
    let integrity = out.result("integrity").expect("integrity result");
    assert_eq!(integrity.u64("checked"), Some(32 * 256));
    assert_eq!(
        integrity.u64("bad_pages"),
        Some(0),
        "guest data lost:\n{text}"
    );
    let hog = out.result("hog").expect("hog result");
    assert_eq!(
        (hog.str("phase"), hog.u64("mib")),
        (Some("held"), Some(FILL_MIB)),
        "the guest did not touch all its memory:\n{text}"
    );

    // Every snapshot is exact and holds what the device holds (common::checked_snapshots).
    let [_held, inflated, oom] = checked_snapshots(
        "ebb_balloon_oom",
        &text,
        ["held", "inflated", "oom"],
        131_072,
    );
    let [s_before, s_inflated, s_oom] =
        ["before", "inflated", "oom"].map(|l| fields(&text, "EBB-BALLOON-STATS", l));
    for (label, s) in [
        ("before", &s_before),
        ("inflated", &s_inflated),
        ("oom", &s_oom),
    ] {
        eprintln!("ebb_balloon_oom: guest statistics {label}: {s:?}");
        assert!(
            s["age_ms"] < 2_500,
            "{label}: statistics are polled every second: {s:?}"
        );
        // 512 MiB of RAM less what the kernel reserved; with deflate-on-OOM the driver leaves
        // the total alone while it inflates.
        let total = s["total_memory"];
        assert!((400 << 20..=512 << 20).contains(&total), "{label}: {s:?}");
    }
    assert_eq!(inflated["actual_mib"], TARGET_MIB, "{inflated:?}");
    assert_eq!(inflated["held"], TARGET_MIB * 256, "{inflated:?}");
    // The inflated pages came out of the guest's free memory.
    assert!(
        s_inflated["free_memory"] + ((TARGET_MIB - 32) << 20) <= s_before["free_memory"],
        "{s_before:?} -> {s_inflated:?}"
    );
    // The guest's out-of-memory path deflated the balloon instead of killing: the driver gave
    // back pages (at least what the process needed beyond the memory the guest had), the target
    // stayed.
    assert_eq!(oom["target_mib"], TARGET_MIB, "{oom:?}");
    let gave_back = oom["pages_deflated"] - inflated["pages_deflated"];
    assert!(
        gave_back >= 64 * 256,
        "deflated only {gave_back} pages: {oom:?}"
    );
    assert_eq!(oom["actual_pages"], oom["held"], "{oom:?}");
    assert!(oom["actual_mib"] < TARGET_MIB - 64, "{oom:?}");
    assert_eq!(s_oom["oom_kill"], s_before["oom_kill"], "{s_oom:?}");

    check_exit_report(&text);
    eprintln!(
        "ebb_balloon_oom: {gave_back} pages deflated on OOM; run {:.1} s, rig faults {}; {}",
        out.elapsed.as_secs_f64(),
        out.rig_faults.len(),
        text.lines()
            .find(|l| l.contains("vCPU exits"))
            .unwrap_or("(no exit line)")
    );
}
