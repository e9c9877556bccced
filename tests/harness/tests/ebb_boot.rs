//! End to end: `ebb` boots the stock Debian cloud kernel with 2 vCPUs inside the rig, the guest
//! runs `integrity` over 256 MiB and `touch`, powers off, and ebb exits 0 with a memory report
//! whose leaves cover every page the guest touched and whose table bytes are minimal.
//!
//! Needs `resources/setup.sh` to have run (fails loudly otherwise). The static `ebb` binary is
//! built by the test (or taken from `EBB_BIN`).

use std::process::Command;
use std::time::Duration;

use ebb_harness::{EbbReport, Job, Rig, static_ebb};

#[test]
fn ebb_boots_debian_runs_integrity_and_touch_and_reports() {
    let rig = Rig::from_env().expect("rig images (run resources/setup.sh first)");
    let ebb = static_ebb().unwrap_or_else(|e| panic!("{e}"));
    let guest = "echo cpus=$(grep -c ^processor /proc/cpuinfo); \
                 ebb-guest integrity --mib 256 && ebb-guest touch --mib 256";
    let cmdline = format!("console=ttyS0 reboot=k panic=-1 quiet -- {guest}");
    let args = [
        "--kernel",
        "/l2/bzImage",
        "--initrd",
        "/l2/initramfs.cpio",
        "--vcpus",
        "2",
        "--memory-mib",
        "512",
        // The rig's emulated nested SVM can corrupt a vCPU re-entered after L1's KVM parked it
        // on a not-yet-filled page (async-PF halt); with HLT exits off KVM never parks it.
        // Tracking and every check below are unchanged (docs/ARCHITECTURE.md, "Known flakiness").
        "--hlt-in-guest",
        "--cmdline",
        &cmdline,
    ];
    // Tracked boots in the rig still end in a guest triple fault (exit 3) now and then, also with
    // --hlt-in-guest, or in KVM's internal error 3 (exit 4) with the same pending #PF
    // (docs/ARCHITECTURE.md, "Known flakiness"): rig faults, run again at most twice and said on
    // stderr; three in a row fail the test with each run's evidence.
    let reruns = rig.ebb_reruns("ebb_boot");
    let out = rig
        .run_with(
            &Job::program(&ebb, args).timeout(Duration::from_secs(900)),
            &reruns,
        )
        .unwrap_or_else(|e| panic!("rig run failed: {e}"));
    let text = out.output_text();
    assert_eq!(out.status, 0, "ebb exit status:\n{text}");
    assert_eq!(out.guest_status, Some(0), "guest command status:\n{text}");
    assert!(text.contains("cpus=2"), "guest sees 2 CPUs:\n{text}");
    assert!(
        text.contains("guest powered off"),
        "clean power-off:\n{text}"
    );

    let integrity = out.result("integrity").expect("integrity result");
    assert_eq!(integrity.u64("pages"), Some(256 * 256));
    assert_eq!(integrity.u64("checked"), Some(256 * 256));
    assert_eq!(integrity.u64("bad_pages"), Some(0), "{text}");
    let touch = out.result("touch").expect("touch result");
    assert_eq!(touch.u64("pages"), Some(256 * 256));

    // The report: every resident page is covered by a leaf (4 KiB or 2 MiB), the guest's own
    // 64 Ki pages are covered, and the tables are as small as those leaves allow.
    let report = EbbReport::parse(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
    let leaf_pages = report.leaf_pages();
    eprintln!(
        "ebb_boot: leaves {} x 4 KiB + {} x 2 MiB = {leaf_pages} leaf pages, resident {}, \
         table bytes {} (min {}), faults {}, touch {:?} ns/page, run {:.1} s, rig faults {}",
        report.leaves_4k,
        report.leaves_2m,
        report.resident_pages,
        report.table_bytes,
        report.min_table_bytes,
        report.faults,
        touch.f64("ns_per_page"),
        out.elapsed.as_secs_f64(),
        out.rig_faults.len()
    );
    assert!(leaf_pages >= 256 * 256, "leaves cover the guest's 256 MiB");
    assert_eq!(
        leaf_pages, report.resident_pages,
        "leaf pages are exactly the resident pages"
    );
    assert_eq!(
        report.table_bytes, report.min_table_bytes,
        "table bytes are minimal"
    );
    // Every leaf came from a fault: one fault fills at most ebb's default window of 8 blocks
    // (2 MiB leaves) or one block's 512 pages (4 KiB leaves).
    assert!(
        report.faults > 0
            && report.leaves_2m <= 8 * report.faults
            && report.leaves_4k <= 512 * report.faults,
        "every leaf came from a fault: {report:?}"
    );
    // The rig's L1 gives shmem 2 MiB pages, so the host maps guest RAM with PMDs.
    let huge = text
        .lines()
        .find_map(|l| l.strip_prefix("host 2 MiB mappings:"))
        .and_then(|r| r.split('(').nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no host 2 MiB mappings line:\n{text}"));
    assert!(
        huge >= 128,
        "at least the 256 MiB the guest touched is PMD-mapped, got {huge} x 2 MiB"
    );
    assert!(report.covers, "the report says the leaves cover:\n{text}");
}

#[test]
fn ebb_rejects_bad_arguments_with_one_line() {
    let ebb = static_ebb().unwrap_or_else(|e| panic!("{e}"));
    let cases: [&[&str]; 5] = [
        &[],
        &["--kernel", "/nonexistent"],
        &["--kernel", "/proc/self/exe", "--vcpus", "0"],
        &["--kernel", "/proc/self/exe", "--memory-mib", "1"],
        &["--kernel", "/proc/self/exe", "--memory-mib", "999999"],
    ];
    for args in cases {
        let out = Command::new(&ebb).args(args).output().expect("ebb runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: one line, got {err}"
        );
        assert!(err.starts_with("ebb: "), "{args:?}: {err}");
    }
    // A malformed image fails at load time, still with one clear line (KVM is needed first,
    // so this runs only where /dev/kvm opens; the message must not be a panic either way).
    let junk = std::env::temp_dir().join(format!("ebb-junk-{}", std::process::id()));
    std::fs::write(&junk, vec![0x5a; 8192]).unwrap();
    let out = Command::new(&ebb)
        .args([
            "--kernel",
            junk.to_str().unwrap(),
            "--memory-mib",
            "64",
            "--no-track",
        ])
        .output()
        .expect("ebb runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    std::fs::remove_file(&junk).unwrap();
}
