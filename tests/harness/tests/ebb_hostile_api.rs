//! Hostile API clients while the guest runs a balloon cycle: `ebb-hostile`
//! (tests/harness/src/bin/ebb-hostile.rs) keeps four connections at a time misbehaving on ebb's
//! socket for 30 s (silent, one byte at a time, garbage, a 10 MB body, chunked, two
//! Content-Lengths, hanging up half way) while L1 inflates the balloon to 128 MiB and deflates it
//! with `ebb-ctl`. ebb must keep answering, refuse every hostile request with a 4xx (or drop it),
//! change nothing because of them, and complete the cycle with the guest's data intact and its
//! tables exact.
//!
//! Needs `resources/setup.sh` to have run (fails loudly otherwise).

mod common;

use std::time::Duration;

use common::{check_exit_report, checked_snapshots, default_rig, fields, run_balloon_script_on};

const SCRIPT: &str = r#"
E="$EBB_RIG_INPUTS/ebb"; CTL="$EBB_RIG_INPUTS/ebb-ctl"; S=/run/ebb.sock; OUT=/tmp/ebb.out
. "$EBB_RIG_INPUTS/ebb-l1-lib.sh"
G="ebb-guest integrity --mib 64 --wait-console && ebb-guest wait-line"
start_ebb "$G" --balloon --balloon-reporting
wait_for "EBB-INTEGRITY-WAITING" 120 || fail "the guest never held its pages"
snap held || fail "API snapshot failed"
"$EBB_RIG_INPUTS/ebb-hostile" "$S" 30 >/tmp/hostile.out 2>&1 &
hp=$!
set_target 128 120 || fail "the balloon did not reach 128 MiB under hostile clients"
snap inflated || fail "API snapshot failed"
set_target 0 120 || fail "the balloon did not deflate under hostile clients"
snap deflated || fail "API snapshot failed"
wait "$hp"
cat /tmp/hostile.out
# After all of it, ebb still answers, and the target is what the well-behaved client set.
echo "EBB-HOSTILE-AFTER label=after target_mib=$(api_get /balloon | num amount_mib)"
tell_guest check
wait_for "EBB-RESULT integrity" 120 || fail "the guest never checked its pages"
tell_guest done
finish
"#;

#[test]
fn ebb_keeps_serving_and_the_balloon_cycle_completes_under_hostile_clients() {
    let hostile = ebb_harness::static_harness_bin("ebb-hostile").unwrap_or_else(|e| panic!("{e}"));
    let (out, text) = run_balloon_script_on(
        &default_rig(),
        "ebb_hostile_api",
        SCRIPT,
        &[],
        &[hostile],
        Duration::from_secs(900),
    );
    let integrity = out.result("integrity").expect("integrity result");
    assert_eq!(
        integrity.u64("bad_pages"),
        Some(0),
        "guest data lost:\n{text}"
    );
    let [_held, inflated, deflated] = checked_snapshots(
        "ebb_hostile_api",
        &text,
        ["held", "inflated", "deflated"],
        131_072,
    );
    assert_eq!(inflated["actual_mib"], 128, "{inflated:?}");
    assert_eq!(deflated["held"], 0, "{deflated:?}");
    let h = fields(&text, "EBB-HOSTILE", "done");
    eprintln!("ebb_hostile_api: {h:?}");
    assert!(h["connections"] >= 20, "the hostile client ran: {h:?}");
    assert!(h["status_4xx"] > 0, "hostile requests were refused: {h:?}");
    assert_eq!(
        h["answered"],
        h["status_4xx"] + h["status_503"],
        "every answer to a hostile request is a refusal: {h:?}"
    );
    let after = fields(&text, "EBB-HOSTILE-AFTER", "after");
    assert_eq!(after["target_mib"], 0, "{after:?}");
    check_exit_report(&text);
}
