#!/usr/bin/env bash
# The stress run (docs/STRESS.md): ebb with the balloon, free page reporting and deflate-on-OOM
# under a guest that holds checksummed pages while stress-ng's memory stressors and a churn run;
# cycles of inflation to a random target and deflation, ebb's figures checked after each. It is
# the rig test tests/harness/tests/ebb_stress.rs (which the suite runs with 3 cycles) run longer.
# Does its own set-up on a fresh machine, like scripts/test.sh.
#
#   scripts/stress.sh [--cycles N] [--minutes M] [--seed S] [--min-mib A] [--max-mib B]
#
# --cycles N   cycles at least (default 20); --minutes M: and go on until M minutes have passed
# --seed S     repeat a run's targets (every run prints its seed)
# The summary table goes to stdout and to target/stress/<time>/summary.md, the rig's console
# to console.log beside it, the test's own output to run.log (with the console, when it fails).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

cycles=20
minutes=0
seed=
min_mib=
max_mib=
usage() { sed -n '8,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
    [ $# -ge 2 ] || usage
    case $1 in
        --cycles) cycles=$2 ;;
        --minutes) minutes=$2 ;;
        --seed) seed=$2 ;;
        --min-mib) min_mib=$2 ;;
        --max-mib) max_mib=$2 ;;
        *) usage ;;
    esac
    shift 2
done
for v in "$cycles" "$minutes" ${seed:+"$seed"} ${min_mib:+"$min_mib"} ${max_mib:+"$max_mib"}; do
    [[ "$v" =~ ^[0-9]+$ ]] || { echo "stress.sh: '$v' is not a number" >&2; exit 2; }
done

"$repo/resources/setup.sh"
out="$repo/target/stress/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
echo "== stress run: $cycles cycles, at least $minutes min; output in $out" >&2
set +e
EBB_STRESS_CYCLES=$cycles EBB_STRESS_MINUTES=$minutes EBB_STRESS_SEED=$seed \
    EBB_STRESS_MIN_MIB=$min_mib EBB_STRESS_MAX_MIB=$max_mib EBB_STRESS_SUMMARY="$out/summary.md" \
    cargo test --release -q --locked -p ebb-harness --test ebb_stress -- --nocapture \
    >"$out/run.log" 2>&1
rc=$?
set -e
if [ "$rc" -eq 0 ] && [ -s "$out/summary.md" ]; then
    cat "$out/summary.md"
else
    # The test's failure names the cycle and the seed; the rig's console is above it.
    grep -E 'ebb_stress: .*seed|panicked at|EBB-BALLOON-FAIL' "$out/run.log" | head -n 20 >&2
    echo "stress run failed (exit $rc); the whole output: $out/run.log" >&2
fi
exit "$rc"
