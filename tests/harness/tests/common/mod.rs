//! What the balloon rig tests (`ebb_balloon`, `ebb_balloon_oom`) share: the job's inputs, the
//! checks every such run must pass, and the figures their L1 scripts print through
//! `scripts/ebb-l1-lib.sh` (`EBB-BALLOON-SNAP`, `EBB-BALLOON-STATS` lines).

use std::collections::HashMap;
use std::time::Duration;

use ebb_harness::{EbbReport, Job, Rig, RunOutput, l1_shell_lib, labelled_fields, static_ebb};

/// Runs `script` in L1 with the static `ebb` and `ebb-ctl` and the shell helpers as inputs
/// (after the rig faults of ebb's guests, again at most twice), and checks what every balloon
/// run must show: no `EBB-BALLOON-FAIL` line, ebb's status 0 (the script ends with it and prints
/// it as `EBB-BALLOON-EBB-STATUS`), and the guest command's status 0. Returns the run and its
/// whole output.
#[allow(dead_code)] // each test crate compiles this module; not every test uses every helper
pub fn run_balloon_script(
    name: &str,
    script: &str,
    env: &[(&str, String)],
    timeout: Duration,
) -> (RunOutput, String) {
    run_balloon_script_on(&default_rig(), name, script, env, &[], timeout)
}

/// The rig as the environment describes it (`resources/setup.sh` writes it).
#[allow(dead_code)]
pub fn default_rig() -> Rig {
    Rig::from_env().expect("rig images (run resources/setup.sh first)")
}

/// [`run_balloon_script`] on a rig the caller configured, with more host files (`inputs`)
/// copied into the job's directory.
pub fn run_balloon_script_on(
    rig: &Rig,
    name: &str,
    script: &str,
    env: &[(&str, String)],
    inputs: &[std::path::PathBuf],
    timeout: Duration,
) -> (RunOutput, String) {
    let ebb = static_ebb().unwrap_or_else(|e| panic!("{e}"));
    let ctl = ebb.with_file_name("ebb-ctl");
    assert!(ctl.exists(), "{} missing", ctl.display());
    let mut job = Job::shell(script)
        .input(&ebb)
        .input(&ctl)
        .input(l1_shell_lib())
        .timeout(timeout);
    for i in inputs {
        job = job.input(i);
    }
    for (k, v) in env {
        job = job.env(*k, v.clone());
    }
    let out = rig
        .run_with(&job, &rig.ebb_reruns(name))
        .unwrap_or_else(|e| panic!("rig run failed: {e}"));
    let text = out.output_text();
    // The script's own failure line first: it says what failed, and where.
    if let Some(line) = text.lines().find(|l| l.contains("EBB-BALLOON-FAIL")) {
        panic!("{line}\n{text}");
    }
    assert_eq!(out.status, 0, "ebb exit status:\n{text}");
    assert!(
        text.contains("EBB-BALLOON-EBB-STATUS 0"),
        "ebb exit status:\n{text}"
    );
    assert_eq!(out.guest_status, Some(0), "guest command status:\n{text}");
    (out, text)
}

/// The fields of the `tag` line labelled `label`; panics with the output when there is none.
pub fn fields(text: &str, tag: &str, label: &str) -> HashMap<String, u64> {
    labelled_fields(text, tag, label).unwrap_or_else(|| panic!("no {tag} {label}:\n{text}"))
}

/// The `EBB-BALLOON-SNAP` lines labelled `labels`, each checked (and printed on stderr under
/// `name`): leaf pages are exactly the resident pages, table bytes are the minimum for them, no
/// frame was refused or failed to release, guest-mm holds exactly the pages the device holds,
/// and none of those is resident except pages the host could not split out of a 2 MiB page
/// (counted as kept).
/// `ram_pages` is the guest's RAM in 4 KiB pages.
pub fn checked_snapshots<const N: usize>(
    name: &str,
    text: &str,
    labels: [&str; N],
    ram_pages: u64,
) -> [HashMap<String, u64>; N] {
    labels.map(|label| {
        let s = fields(text, "EBB-BALLOON-SNAP", label);
        eprintln!("{name}: {label}: {s:?}");
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
        assert_eq!(
            s["held"],
            s["pages_inflated"] - s["pages_deflated"],
            "{label}: guest-mm holds what the device holds: {s:?}"
        );
        assert_eq!(
            s["pending"], 0,
            "{label}: no ballooned page still waits for the rest of its 2 MiB block: {s:?}"
        );
        assert!(
            s["resident"] <= ram_pages - s["held"] + s["kept"],
            "{label}: ballooned pages must not be resident: {s:?}"
        );
        s
    })
}

/// ebb's exit report in `text`: leaves cover exactly the resident pages, with minimal tables.
pub fn check_exit_report(text: &str) {
    let report = EbbReport::parse(text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
    assert_eq!(report.leaf_pages(), report.resident_pages, "{report:?}");
    assert_eq!(report.table_bytes, report.min_table_bytes, "{report:?}");
}
