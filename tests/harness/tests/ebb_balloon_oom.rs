//! End to end: the balloon's statistics and deflate-on-OOM under a real Debian guest in the rig.
//! ebb boots with `--balloon-deflate-on-oom` and statistics every second. The guest holds 32 MiB
//! of checksummed pages while L1 inflates the balloon to 320 MiB of the guest's 512; the guest's
//! statistics must show that memory gone from its free memory. Then the guest writes a 192 MiB
//! file to its tmpfs, more than it has left and memory it cannot reclaim (no swap): its
//! out-of-memory path makes the Linux driver deflate the balloon, 1 MiB per out-of-memory call,
//! instead of killing a task. At that point the device has taken back what the guest deflated,
//! guest-mm holds exactly what the device still holds, nothing was killed, the guest's data is
//! intact, and the second-level tables are exact.
//!
//! The memory is taken by `write(2)` into tmpfs, not by touching anonymous memory (`hog`): in
//! this rig, a deflate-on-OOM that starts from a user page fault stops the guest under QEMU's
//! KVM as well as ebb's, with KVM's "internal error, suberror 3" on the driver's notify write
//! (docs/ARCHITECTURE.md, "Known flakiness").
//!
//! Needs `resources/setup.sh` to have run (fails loudly otherwise). The static `ebb` and
//! `ebb-ctl` are built by the test (or taken from `EBB_BIN` and its directory).

use std::collections::HashMap;
use std::time::Duration;

use ebb_harness::{EbbReport, Job, Rig, RigFault, labelled_fields, static_ebb};

/// The balloon's target in MiB, of 512 MiB of guest RAM.
const TARGET_MIB: u64 = 320;
/// What the guest writes to its tmpfs while the balloon is inflated, in MiB.
const FILL_MIB: u64 = 192;

/// Runs in L1; the helpers (`snap`, `stats_snap`, `set_target`, `wait_for`) are in
/// `scripts/ebb-l1-lib.sh`.
const SCRIPT: &str = r#"
E="$EBB_RIG_INPUTS/ebb"; CTL="$EBB_RIG_INPUTS/ebb-ctl"; S=/run/ebb.sock; OUT=/tmp/ebb.out
G="ebb-guest integrity --mib 32 --hold-secs 45 && dd if=/dev/zero of=/tmp/fill bs=1M count=$FILL_MIB && echo EBB-OOM-FILLED && sleep 8"
"$E" --kernel "$EBB_L2_KERNEL" --initrd "$EBB_L2_INITRAMFS" --vcpus 2 --memory-mib 512 \
    --hlt-in-guest --api-sock "$S" --balloon --balloon-deflate-on-oom --balloon-stats-s 1 \
    --cmdline "console=ttyS0 reboot=k panic=-1 quiet -- $G" </dev/null >"$OUT" 2>&1 &
pid=$!
# The job ends with ebb's status, so the harness sees a triple fault (3) as the rig fault it is.
finish() { wait "$pid"; st=$?; cat "$OUT"; echo "EBB-BALLOON-EBB-STATUS $st"; exit "$st"; }
fail() { echo "EBB-BALLOON-FAIL $*"; kill "$pid" 2>/dev/null; finish; }
. "$EBB_RIG_INPUTS/ebb-l1-lib.sh"
wait_for "EBB-INTEGRITY-HOLDING" 120 || fail "the guest never held its pages"
stats_snap first >/dev/null || fail "GET /balloon/stats failed"
sleep 2.5
stats_snap before || fail "GET /balloon/stats failed"
snap held || fail "API snapshot failed"
set_target "$TARGET_MIB" 60 || fail "the balloon did not reach $TARGET_MIB MiB in 60 s"
snap inflated || fail "API snapshot failed"
stats_snap first >/dev/null || fail "GET /balloon/stats failed"
sleep 2.5
stats_snap inflated || fail "GET /balloon/stats failed"
wait_for "^EBB-OOM-FILLED" 150 || fail "the guest never finished writing its file"
snap oom || fail "API snapshot failed"
stats_snap first >/dev/null || fail "GET /balloon/stats failed"
sleep 2.5
stats_snap oom || fail "GET /balloon/stats failed"
finish
"#;

fn fields(text: &str, tag: &str, label: &str) -> HashMap<String, u64> {
    labelled_fields(text, tag, label).unwrap_or_else(|| panic!("no {tag} {label}:\n{text}"))
}

#[test]
fn balloon_statistics_and_deflate_on_oom() {
    let rig = Rig::from_env().expect("rig images (run resources/setup.sh first)");
    let ebb = static_ebb().unwrap_or_else(|e| panic!("{e}"));
    let ctl = ebb.with_file_name("ebb-ctl");
    assert!(ctl.exists(), "{} missing", ctl.display());
    let reruns = rig
        .l1_reruns("ebb_balloon_oom")
        .on(RigFault::EbbTripleFault)
        .on(RigFault::EbbKvmInternalError)
        .on(RigFault::GuestInt3Oops)
        .max_reruns(2);
    let lib = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/ebb-l1-lib.sh");
    let job = Job::shell(SCRIPT)
        .env("TARGET_MIB", TARGET_MIB.to_string())
        .env("FILL_MIB", FILL_MIB.to_string())
        .input(&ebb)
        .input(&ctl)
        .input(lib)
        .timeout(Duration::from_secs(600));
    let out = rig
        .run_with(&job, &reruns)
        .unwrap_or_else(|e| panic!("rig run failed: {e}"));
    let text = out.output_text();
    assert!(!text.contains("EBB-BALLOON-FAIL"), "{text}");
    assert_eq!(out.status, 0, "ebb exit status:\n{text}");
    assert!(
        text.contains("EBB-BALLOON-EBB-STATUS 0"),
        "ebb exit status:\n{text}"
    );
    assert_eq!(out.guest_status, Some(0), "guest command status:\n{text}");
    let integrity = out.result("integrity").expect("integrity result");
    assert_eq!(integrity.u64("checked"), Some(32 * 256));
    assert_eq!(
        integrity.u64("bad_pages"),
        Some(0),
        "guest data lost:\n{text}"
    );
    assert!(
        text.contains(&format!("{FILL_MIB}+0 records out")),
        "the guest's file is short:\n{text}"
    );

    let [held, inflated, oom] =
        ["held", "inflated", "oom"].map(|l| fields(&text, "EBB-BALLOON-SNAP", l));
    let [s_before, s_inflated, s_oom] =
        ["before", "inflated", "oom"].map(|l| fields(&text, "EBB-BALLOON-STATS", l));
    for (label, s) in [("held", &held), ("inflated", &inflated), ("oom", &oom)] {
        eprintln!("ebb_balloon_oom: {label}: {s:?}");
        assert_eq!(
            s["leaves_4k"] + 512 * s["leaves_2m"],
            s["resident"],
            "{label}: leaf pages are exactly the resident pages"
        );
        assert_eq!(
            s["table_bytes"], s["min_table_bytes"],
            "{label}: table bytes are the minimum for the leaves"
        );
        assert_eq!(s["bad_pfns"] + s["release_errors"], 0, "{label}: {s:?}");
        // guest-mm holds exactly what the device holds, at every step.
        assert_eq!(
            s["held"],
            s["pages_inflated"] - s["pages_deflated"],
            "{label}: {s:?}"
        );
        assert!(
            s["resident"] <= 131_072 - s["held"] + s["kept"],
            "{label}: ballooned pages must not be resident: {s:?}"
        );
    }
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
    // back pages (at least what the file needed beyond the memory the guest had), the target
    // stayed.
    assert_eq!(oom["target_mib"], TARGET_MIB, "{oom:?}");
    let gave_back = oom["pages_deflated"] - inflated["pages_deflated"];
    assert!(
        gave_back >= 64 * 256,
        "deflated only {gave_back} pages: {oom:?}"
    );
    assert_eq!(oom["actual_pages"], oom["held"], "{oom:?}");
    assert!(oom["actual_mib"] < TARGET_MIB - 64, "{oom:?}");
    assert_eq!(s_oom["oom_kills"], s_before["oom_kills"], "{s_oom:?}");

    let report = EbbReport::parse(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
    assert_eq!(report.leaf_pages(), report.resident_pages, "{report:?}");
    assert_eq!(report.table_bytes, report.min_table_bytes, "{report:?}");
    eprintln!(
        "ebb_balloon_oom: {gave_back} pages deflated on OOM; run {:.1} s, rig faults {}",
        out.elapsed.as_secs_f64(),
        out.rig_faults.len()
    );
}
