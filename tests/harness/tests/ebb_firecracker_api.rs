//! End to end: ebb driven only through Firecracker's API. ebb starts with nothing but its API
//! socket; L1 configures it with Firecracker's requests (boot source, machine, balloon with
//! statistics, deflate-on-OOM and free page reporting), starts it with `InstanceStart`, then
//! inflates the balloon with `PATCH /balloon`, reads `GET /balloon/statistics`, asks for hinting
//! (refused: ebb does not offer it) and deflates. The guest holds 64 MiB of checksummed pages
//! throughout and checks them at the end; ebb's tables stay exact at every step.
//!
//! Needs `resources/setup.sh` to have run (fails loudly otherwise). The static `ebb` and
//! `ebb-ctl` are built by the test (or taken from `EBB_BIN` and its directory).

mod common;

use std::time::Duration;

use common::{check_exit_report, checked_snapshots, fields, run_balloon_script};

const SCRIPT: &str = r#"
E="$EBB_RIG_INPUTS/ebb"; CTL="$EBB_RIG_INPUTS/ebb-ctl"; S=/run/ebb.sock; OUT=/tmp/ebb.out
. "$EBB_RIG_INPUTS/ebb-l1-lib.sh"
G="ebb-guest integrity --mib 64 --wait-console && ebb-guest wait-line"
EBB_BALLOON_JSON='{"amount_mib":0,"deflate_on_oom":true,"stats_polling_interval_s":1,"free_page_reporting":true}'
start_ebb_api "$G" || fail "configuring ebb over the API failed"
wait_for "EBB-INTEGRITY-WAITING" 120 || fail "the guest never held its pages"
echo "EBB-FC-INFO $(api_get /)"
echo "EBB-FC-BALLOON $(api_get /balloon)"
snap held || fail "API snapshot failed"
set_target 128 60 || fail "the balloon did not reach 128 MiB in 60 s"
snap inflated || fail "API snapshot failed"
# Statistics: the first read asks the guest for fresh figures, a later one shows them.
i=0
until api_get /balloon/statistics | grep -q free_memory; do
    i=$((i + 1))
    [ $i -gt 100 ] && fail "no guest statistics in 20 s"
    sleep 0.2
done
st=$(api_get /balloon/statistics)
echo "EBB-FC-STATS label=stats actual_mib=$(echo "$st" | num actual_mib) target_mib=$(echo "$st" | num target_mib)" \
    "free_memory=$(echo "$st" | num free_memory) total_memory=$(echo "$st" | num total_memory)"
h=$("$CTL" --api-sock "$S" PATCH /balloon/hinting/start '{}'; echo "status=$?")
echo "EBB-FC-HINTING $h" | tr '\n' ' '; echo
"$CTL" --api-sock "$S" PUT /machine-config '{"vcpu_count":1,"mem_size_mib":256}' &&
    fail "a machine change after start was accepted"
set_target 0 60 || fail "the balloon did not deflate to 0 in 60 s"
snap deflated || fail "API snapshot failed"
tell_guest check
wait_for "EBB-RESULT integrity" 120 || fail "the guest never checked its pages"
tell_guest done
finish
"#;

#[test]
fn firecrackers_api_configures_starts_and_drives_the_balloon() {
    let (out, text) =
        run_balloon_script("ebb_firecracker_api", SCRIPT, &[], Duration::from_secs(900));
    let integrity = out.result("integrity").expect("integrity result");
    assert_eq!(integrity.u64("checked"), Some(64 * 256));
    assert_eq!(
        integrity.u64("bad_pages"),
        Some(0),
        "guest data lost:\n{text}"
    );
    let info = text
        .lines()
        .find(|l| l.contains("EBB-FC-INFO"))
        .expect("GET / answered");
    assert!(info.contains("\"state\":\"Running\""), "{info}");
    let balloon = text
        .lines()
        .find(|l| l.contains("EBB-FC-BALLOON"))
        .expect("GET /balloon answered");
    for f in [
        "\"amount_mib\":0",
        "\"deflate_on_oom\":true",
        "\"stats_polling_interval_s\":1",
        "\"free_page_reporting\":true",
        "\"free_page_hinting\":false",
    ] {
        assert!(balloon.contains(f), "{f} in {balloon}");
    }
    let [_held, inflated, deflated] = checked_snapshots(
        "ebb_firecracker_api",
        &text,
        ["held", "inflated", "deflated"],
        131_072,
    );
    assert_eq!(inflated["actual_mib"], 128);
    assert_eq!(inflated["held"], 128 * 256, "{inflated:?}");
    assert_eq!(deflated["held"], 0, "{deflated:?}");
    let stats = fields(&text, "EBB-FC-STATS", "stats");
    assert_eq!(stats["actual_mib"], 128, "{stats:?}");
    assert_eq!(stats["target_mib"], 128, "{stats:?}");
    assert!(
        stats["free_memory"] > 0 && stats["total_memory"] > 0,
        "{stats:?}"
    );
    let hinting = text
        .lines()
        .find(|l| l.contains("EBB-FC-HINTING"))
        .expect("hinting asked");
    assert!(
        hinting.contains("Attempting to use hinting when not enabled")
            && hinting.contains("status=1"),
        "{hinting}"
    );
    check_exit_report(&text);
}
