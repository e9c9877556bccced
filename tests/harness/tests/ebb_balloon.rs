//! End to end: the balloon under a real Debian guest in the rig. ebb boots with the balloon (free
//! page reporting and statistics on); the guest writes 128 MiB of checksummed pages and holds
//! them while L1 inflates the balloon to 256 MiB over the API socket (`ebb-ctl`), then deflates
//! it; the guest then checks every page, takes and frees 192 MiB (`hog`), and free page
//! reporting gives that memory back. At each step the test reads ebb's memory report: ballooned
//! and reported memory is not resident, leaves are exactly the resident pages, and the table
//! bytes are the minimum for those leaves, that is, the table pages that mapped the given-back
//! memory went with it.
//!
//! Needs `resources/setup.sh` to have run (fails loudly otherwise). The static `ebb` and
//! `ebb-ctl` are built by the test (or taken from `EBB_BIN` and its directory).

use std::collections::HashMap;
use std::time::Duration;

use ebb_harness::{EbbReport, Job, Rig, RigFault, labelled_fields, static_ebb};

/// Runs in L1. ebb in the background, its console in /tmp/ebb.out; `snap LABEL` (from
/// `scripts/ebb-l1-lib.sh`) prints one `EBB-BALLOON-SNAP` line with the report and balloon
/// figures, read again until the report is self-consistent (a fault can land between its figures
/// while the guest runs).
const SCRIPT: &str = r#"
E="$EBB_RIG_INPUTS/ebb"; CTL="$EBB_RIG_INPUTS/ebb-ctl"; S=/run/ebb.sock; OUT=/tmp/ebb.out
G="ebb-guest integrity --mib 128 --hold-secs 75 && ebb-guest hog --mib 192 --hold-secs 8 && sleep 20"
"$E" --kernel "$EBB_L2_KERNEL" --initrd "$EBB_L2_INITRAMFS" --vcpus 2 --memory-mib 512 \
    --hlt-in-guest --api-sock "$S" --balloon --balloon-reporting --balloon-stats-s 2 \
    --cmdline "console=ttyS0 reboot=k panic=-1 quiet -- $G" </dev/null >"$OUT" 2>&1 &
pid=$!
# The job ends with ebb's status, so the harness sees a triple fault (3) as the rig fault it is.
finish() { wait "$pid"; st=$?; cat "$OUT"; echo "EBB-BALLOON-EBB-STATUS $st"; exit "$st"; }
fail() { echo "EBB-BALLOON-FAIL $*"; kill "$pid" 2>/dev/null; finish; }
. "$EBB_RIG_INPUTS/ebb-l1-lib.sh"
wait_for "EBB-INTEGRITY-HOLDING" 120 || fail "the guest never held its pages"
snap held || fail "API snapshot failed"
set_target 256 60 || fail "the balloon did not reach 256 MiB in 60 s"
snap inflated || fail "API snapshot failed"
set_target 0 60 || fail "the balloon did not deflate to 0 in 60 s"
snap deflated || fail "API snapshot failed"
wait_for "EBB-RESULT hog phase=held" 150 || fail "the guest never ran hog"
snap hog || fail "API snapshot failed"
r0=$(api_get /balloon | num bytes_reported)
wait_for "EBB-RESULT hog phase=released" 60 || fail "hog never released its memory"
i=0
while [ $i -lt 30 ]; do
    sleep 0.5; i=$((i + 1))
    r=$(api_get /balloon | num bytes_reported)
    [ "$r" -ge $((r0 + 100 * 1048576)) ] && break
done
sleep 1
snap reported || fail "API snapshot failed"
finish
"#;

/// The shell helpers the script sources.
const L1_LIB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/ebb-l1-lib.sh");

/// The fields of the `EBB-BALLOON-SNAP` line labelled `label`.
fn snap(text: &str, label: &str) -> HashMap<String, u64> {
    labelled_fields(text, "EBB-BALLOON-SNAP", label)
        .unwrap_or_else(|| panic!("no {label} snapshot:\n{text}"))
}

#[test]
fn balloon_gives_back_memory_and_its_tables_with_guest_data_intact() {
    let rig = Rig::from_env().expect("rig images (run resources/setup.sh first)");
    let ebb = static_ebb().unwrap_or_else(|e| panic!("{e}"));
    let ctl = ebb.with_file_name("ebb-ctl");
    assert!(ctl.exists(), "{} missing", ctl.display());
    // As in ebb_boot: a guest triple fault or KVM internal error 3 is a known rig fault
    // (docs/ARCHITECTURE.md, "Known flakiness").
    let reruns = rig
        .l1_reruns("ebb_balloon")
        .on(RigFault::EbbTripleFault)
        .on(RigFault::EbbKvmInternalError)
        .on(RigFault::GuestInt3Oops)
        .max_reruns(2);
    let job = Job::shell(SCRIPT)
        .input(&ebb)
        .input(&ctl)
        .input(L1_LIB)
        .timeout(Duration::from_secs(900));
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
    assert_eq!(integrity.u64("checked"), Some(128 * 256));
    assert_eq!(
        integrity.u64("bad_pages"),
        Some(0),
        "guest data lost under the balloon:\n{text}"
    );

    let [held, inflated, deflated, hog, reported] =
        ["held", "inflated", "deflated", "hog", "reported"].map(|l| snap(&text, l));
    for (label, s) in [
        ("held", &held),
        ("inflated", &inflated),
        ("deflated", &deflated),
        ("hog", &hog),
        ("reported", &reported),
    ] {
        eprintln!("ebb_balloon: {label}: {s:?}");
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
    }
    // Inflated: the guest gave 256 MiB (65,536 pages) of its 512 MiB. guest-mm holds exactly the
    // pages the device holds, and none of them is resident, except pages the host could not
    // split out of a 2 MiB page (counted, and few).
    assert_eq!(inflated["actual_mib"], 256);
    let held = inflated["pages_inflated"] - inflated["pages_deflated"];
    assert_eq!(held, 65_536, "{inflated:?}");
    assert_eq!(
        inflated["held"], held,
        "guest-mm holds what the balloon holds"
    );
    assert!(
        inflated["kept"] <= held / 100,
        "the host kept too many: {inflated:?}"
    );
    assert!(
        inflated["resident"] <= 131_072 - held + inflated["kept"],
        "ballooned pages must not be resident: {inflated:?}"
    );
    assert_eq!(deflated["held"], 0, "deflated: nothing held: {deflated:?}");
    assert!(deflated["pages_deflated"] >= 65_536, "{deflated:?}");
    // Free page reporting took back most of what hog freed (192 MiB = 49,152 pages).
    assert!(
        reported["reports"] > hog["reports"],
        "{hog:?} -> {reported:?}"
    );
    assert!(
        reported["resident"] + 100 * 256 <= hog["resident"],
        "reported memory must leave the host: {hog:?} -> {reported:?}"
    );

    // The exit report: as exact as ever.
    let report = EbbReport::parse(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
    assert_eq!(report.leaf_pages(), report.resident_pages, "{report:?}");
    assert_eq!(report.table_bytes, report.min_table_bytes, "{report:?}");
    eprintln!(
        "ebb_balloon: run {:.1} s, rig faults {}",
        out.elapsed.as_secs_f64(),
        out.rig_faults.len()
    );
}
