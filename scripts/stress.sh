#!/usr/bin/env bash
# The stress run (docs/STRESS.md): ebb with the balloon, free page reporting and deflate-on-OOM
# under a guest that holds checksummed pages while stress-ng's memory stressors and a churn run;
# cycles of inflation to a random target and deflation, ebb's figures checked after each. It is
# the rig test tests/harness/tests/ebb_stress.rs (which the suite runs with 3 cycles) run longer,
# in boots of a few cycles each: the rig's emulated nested SVM does not last 20 cycles of balloon
# traffic in one boot (docs/STRESS.md, "Why several boots"). A boot whose every attempt ended in
# a rig fault the test tolerates is counted as lost and the next seed runs (at most 5 such
# boots); any other failure ends the run. Does its own set-up on a fresh machine, like
# scripts/test.sh.
#
#   scripts/stress.sh [--cycles N] [--per-boot K] [--minutes M] [--seed S] [--min-mib A] [--max-mib B]
#
# --cycles N    cycles in all (default 20), in boots of --per-boot K cycles (default 3)
# --minutes M   and go on with more boots until M minutes have passed
# --seed S      boot k runs seed S+k-1 (every boot prints its seed; EBB_STRESS_SEED repeats one)
# The summary table goes to stdout and to target/stress/<time>/summary.md; each boot's table,
# console and test output are in target/stress/<time>/boot-K/.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

cycles=20
per_boot=3
minutes=0
seed=$(( $(od -An -N4 -tu4 /dev/urandom | tr -d ' ') % 2147483648 ))
min_mib=32
max_mib=320
usage() { sed -n '12,18p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
    [ $# -ge 2 ] || usage
    case $1 in
        --cycles) cycles=$2 ;;
        --per-boot) per_boot=$2 ;;
        --minutes) minutes=$2 ;;
        --seed) seed=$2 ;;
        --min-mib) min_mib=$2 ;;
        --max-mib) max_mib=$2 ;;
        *) usage ;;
    esac
    shift 2
done
for v in "$cycles" "$per_boot" "$minutes" "$seed" "$min_mib" "$max_mib"; do
    [[ "$v" =~ ^[0-9]+$ ]] || { echo "stress.sh: '$v' is not a number" >&2; exit 2; }
done
[ "$per_boot" -ge 1 ] || { echo "stress.sh: --per-boot must be at least 1" >&2; exit 2; }

"$repo/resources/setup.sh"
out="$repo/target/stress/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
echo "== stress run: $cycles cycles in boots of $per_boot, at least $minutes min, seed $seed;" \
    "output in $out" >&2
start=$(date +%s)
done_cycles=0
boot=0
lost=""
while [ "$done_cycles" -lt "$cycles" ] || [ $(( $(date +%s) - start )) -lt $(( minutes * 60 )) ]; do
    boot=$((boot + 1))
    n=$per_boot
    if [ "$done_cycles" -lt "$cycles" ] && [ $((cycles - done_cycles)) -lt "$n" ]; then
        n=$((cycles - done_cycles))
    fi
    s=$(( (seed + boot - 1) % 2147483648 ))
    dir="$out/boot-$boot"
    mkdir -p "$dir"
    echo "== boot $boot: $n cycles, seed $s (after $(( $(date +%s) - start )) s)" >&2
    set +e
    EBB_STRESS_CYCLES=$n EBB_STRESS_SEED=$s EBB_STRESS_MIN_MIB=$min_mib \
        EBB_STRESS_MAX_MIB=$max_mib EBB_STRESS_SUMMARY="$dir/summary.md" \
        cargo test --release -q --locked -p ebb-harness --test ebb_stress -- --nocapture \
        >"$dir/run.log" 2>&1
    rc=$?
    set -e
    if [ "$rc" -ne 0 ] && grep -q 'a rig fault on each of' "$dir/run.log"; then
        grep -E 'RIG FAULT|ebb: KVM error|triple-faulted' "$dir/run.log" | sort -u | head -n 10 >&2 || true
        echo "== boot $boot (seed $s) lost to rig faults on every attempt; the next seed runs" >&2
        mv "$dir/summary.md" "$dir/summary.lost" 2>/dev/null || true
        lost="$lost $s"
        [ "$(echo "$lost" | wc -w)" -lt 5 ] || {
            echo "stress run failed: 5 boots lost to rig faults (seeds$lost)" >&2
            exit 1
        }
        continue
    fi
    if [ "$rc" -ne 0 ] || [ ! -s "$dir/summary.md" ]; then
        # The test's failure names the cycle and the seed; the rig's console is below it.
        grep -E 'ebb_stress: .*seed|RIG FAULT|panicked at|EBB-BALLOON-FAIL|seed [0-9]+ \(' \
            "$dir/run.log" | head -n 20 >&2 || true
        echo "stress run failed in boot $boot (seed $s, exit $rc) after $done_cycles cycles" \
            "had passed; the whole output: $dir/run.log" >&2
        exit 1
    fi
    grep -E 'RIG FAULT' "$dir/run.log" >&2 || true
    done_cycles=$((done_cycles + n))
done

# One table over every boot: the boots' rows renumbered, then the totals.
{
    echo "Stress run: $done_cycles cycles in $boot boots of up to $per_boot, seeds $seed..$((seed + boot - 1))," \
        "targets $min_mib..=$max_mib MiB of 1024 MiB, $(( $(date +%s) - start )) s in all"
    echo
    echo "| boot | seed | cycle | target MiB | inflate s | deflate s | pages in | pages out |" \
        "guest deflated | faults | zaps | notify max ms | VmPTE kB (in/out) | VmRSS MiB (in/out) |" \
        "guest available MiB |"
    echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    for k in $(seq 1 "$boot"); do
        [ -s "$out/boot-$k/summary.md" ] || continue
        awk -v boot="$k" -v seed=$(( (seed + k - 1) % 2147483648 )) \
            '/^\| [0-9]+ \|/ { printf "| %s | %s %s\n", boot, seed, $0 }' "$out/boot-$k/summary.md"
    done | awk -F'|' 'BEGIN { OFS = "|" } { $4 = " " NR " "; print }'
    echo
    echo "boots lost to rig faults on every attempt: $(echo "$lost" | wc -w)${lost:+ (seeds$lost)}"
    echo
    cat "$out"/boot-*/summary.md | awk -F'|' '
        /^\| [0-9]+ \|/ {
            c++; inf += $4; def += $5; pin += $6; pout += $7; gd += $8; f += $9; z += $10
            if ($4 > linf) linf = $4
            if ($5 > ldef) ldef = $5
            if ($11 + 0 > nmax) nmax = $11 + 0
            split($12, p, "/"); if (p[1] + 0 > pte) pte = p[1] + 0; if (p[2] + 0 > pte) pte = p[2] + 0
            split($13, r, "/"); if (r[1] + 0 > rss) rss = r[1] + 0; if (r[2] + 0 > rss) rss = r[2] + 0
            if (avail == "" || $14 + 0 < avail) avail = $14 + 0
        }
        /^integrity: / { checked += $0 ~ /integrity: [0-9]+/ ? substr($0, 12) + 0 : 0
            match($0, /, [0-9]+ bad/); bad += substr($0, RSTART + 2, RLENGTH - 6) }
        /rig faults re-run: / { match($0, /rig faults re-run: [0-9]+/); rf += substr($0, RSTART + 19, RLENGTH - 19) }
        /stale event-delivery report: / { match($0, /stale event-delivery report: [0-9]+/); st += substr($0, RSTART + 29, RLENGTH - 29) }
        END {
            printf "%d cycles; pages moved %d (%d in, %d out, %d deflated by the guest itself); ", c, pin + pout, pin, pout, gd
            printf "inflate %.1f s in all (longest %.1f s); deflate %.1f s in all (longest %.1f s); ", inf, linf, def, ldef
            printf "worst notify_ns_max %.1f ms; faults %d; KVM table zaps %d; VmPTE at most %d kB, ", nmax, f, z, pte
            printf "VmRSS at most %d MiB; guest available memory at least %d MiB with the balloon inflated; ", rss, avail
            printf "integrity: %d pages checked, %d bad; rig faults re-run: %d; ", checked, bad, rf
            printf "MMIO accesses ebb ran again after a stale event-delivery report: %d\n", st
        }'
} >"$out/summary.md"
cat "$out/summary.md"
