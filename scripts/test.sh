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

# Runs a cargo test invocation, keeps its output, and adds its "test result:" lines to the summary.
run_tests() {
    local name=$1; shift
    local out="$log_dir/$name.log"
    step "cargo test: $name"
    set +e
    "$@" 2>&1 | tee "$out"
    local rc=${PIPESTATUS[0]}
    set -e
    grep -E '^test result:' "$out" | sed "s/^/$name: /" >>"$summary" || true
    if [ "$rc" -ne 0 ]; then
        echo "FAILED: $name (exit $rc)"
        print_summary
        exit "$rc"
    fi
}

print_summary() {
    local passed failed ignored
    passed=$(grep -oE '[0-9]+ passed' "$summary" | awk '{s+=$1} END {print s+0}')
    failed=$(grep -oE '[0-9]+ failed' "$summary" | awk '{s+=$1} END {print s+0}')
    ignored=$(grep -oE '[0-9]+ ignored' "$summary" | awk '{s+=$1} END {print s+0}')
    echo
    echo "== summary after $(( $(date +%s) - start ))s"
    cat "$summary"
    echo "ebb tests: $passed passed, $failed failed, $ignored skipped"
}

step "set-up: host packages, pinned guest images, static binaries"
"$repo/resources/setup.sh"

step "format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings

run_tests workspace cargo test --workspace --locked --release

step "loom model of the reclaim protocol"
run_tests loom env RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR="$repo/target/loom" \
    cargo test -p guest-mm --locked --release --test loom_reclaim

step "benchmark smoke run (quick mode: the benchmarks build and run; numbers come from full runs)"
EBB_BENCH_QUICK=1 cargo bench -p guest-mm --locked

print_summary
