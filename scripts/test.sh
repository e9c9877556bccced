#!/usr/bin/env bash
# ebb's whole test suite. Does all of its own set-up on a fresh machine: Debian packages, the pinned guest
# kernel and packages, the guest and L1 images, the static binaries that run inside the nested test host.
#
#   scripts/test.sh            everything (what CI runs)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
log_dir="$repo/target/test-logs"
mkdir -p "$log_dir"
summary="$log_dir/summary.txt"
: >"$summary"
start=$(date +%s)

step() { printf '\n== %s (%ss)\n' "$*" "$(( $(date +%s) - start ))"; }

failures="$log_dir/failures.txt"
: >"$failures"

# Runs a step's command, keeps its output, and notes a failure without stopping: every step runs,
# and the summary lists what failed.
run_step() {
    local name=$1; shift
    local out="$log_dir/$name.log"
    step "$name"
    set +e
    "$@" 2>&1 | tee "$out"
    local rc=${PIPESTATUS[0]}
    set -e
    if [ "$rc" -ne 0 ]; then
        echo "FAILED: $name (exit $rc)"
        echo "$name: exit $rc" >>"$failures"
    fi
    return 0
}

# Runs a cargo test invocation (--no-fail-fast: one failing test binary never hides the others),
# adds its "test result:" lines to the summary and each failing test's name to the failures.
run_tests() {
    local name=$1
    run_step "$@"
    local out="$log_dir/$name.log"
    grep -E '^test result:' "$out" | sed "s/^/$name: /" >>"$summary" || true
    sed -nE "s/^test (.+) \.\.\. FAILED\$/$name: \1/p" "$out" >>"$failures" || true
}

print_summary() {
    local passed failed ignored
    passed=$(grep -oE '[0-9]+ passed' "$summary" | awk '{s+=$1} END {print s+0}')
    failed=$(grep -oE '[0-9]+ failed' "$summary" | awk '{s+=$1} END {print s+0}')
    ignored=$(grep -oE '[0-9]+ ignored' "$summary" | awk '{s+=$1} END {print s+0}')
    echo
    echo "== summary after $(( $(date +%s) - start ))s"
    cat "$summary"
    if grep -q '^pin drifted: ' "$log_dir/setup.log"; then
        echo "pins that left the archive (resources/lock-update.sh moves them):"
        grep '^pin drifted: ' "$log_dir/setup.log" | sed 's/^/  /'
    fi
    # Rig faults the tests met and ran again (each announced where it happened); the harness's
    # unit tests ("unit") and the tests that inject a fault on purpose ("injected") are left out.
    local faults
    faults=$(grep -h 'RIG FAULT (' "$log_dir"/*.log | grep -v -e '^ebb-rig: unit:' -e '^ebb-rig: injected:' |
        grep -o 'RIG FAULT ([^)]*)' | sort | uniq -c || true)
    echo "rig faults met and re-run: ${faults:-none}"
    if [ -s "$failures" ]; then
        echo "failed:"
        sed 's/^/  /' "$failures"
    fi
    echo "summary: $passed passed, $failed failed, $ignored skipped"
}

# Without its images no rig test can run: a failed set-up ends the run here.
step "set-up: host packages, pinned guest images, static binaries"
"$repo/resources/setup.sh" 2>&1 | tee "$log_dir/setup.log"

run_step format cargo fmt --all --check
run_step clippy cargo clippy --workspace --all-targets --locked -- -D warnings

run_tests workspace cargo test --workspace --locked --release --no-fail-fast

run_tests loom env RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR="$repo/target/loom" \
    cargo test -p guest-mm --locked --release --test loom_reclaim

# Quick mode: the benchmarks build and run; the numbers come from full runs.
run_step bench-smoke env EBB_BENCH_QUICK=1 cargo bench -p guest-mm --locked

print_summary
# A failing step or test fails the run, whatever the counts say.
[ ! -s "$failures" ]
