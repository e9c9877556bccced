#!/usr/bin/env bash
# MADV_FREE end to end (docs/LAZYFREE.md): ebb in a memory cgroup inside the nested test host,
# the balloon inflated with --release-mode free and with dontneed (order alternating), then
# memory pressure in the cgroup; prints one table of ebb's resident memory at every step, the
# balloon's times, whether the pressure's hog got its memory, OOM kills and the guest's bad pages.
# Does its own set-up on a fresh machine. The steps in L1 are in scripts/lazyfree-l1.sh.
#
#   scripts/lazyfree.sh [--modes "free dontneed dontneed free"] [--flags "--no-track --no-thp"]
#
# The whole output goes to target/lazyfree/<time>/run.log, the table also to table.md there.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

modes="free dontneed dontneed free"
flags="--no-track --no-thp"
while [ $# -gt 0 ]; do
    case "$1" in
        --modes) modes=${2:?--modes needs a value} ;;
        --flags) flags=${2:?--flags needs a value} ;;
        *) sed -n '8p' "$0" | sed 's/^# *//' >&2; exit 2 ;;
    esac
    shift 2
done

"$repo/resources/setup.sh"
echo "== building the static ebb and ebb-ctl binaries" >&2
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release -q --locked -p vmm -p guest-tools --target x86_64-unknown-linux-gnu
cargo build --release -q --locked -p ebb-harness --bin ebb-rig
bin="$repo/target/x86_64-unknown-linux-gnu/release"
out="$repo/target/lazyfree/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
echo "== $modes ($flags); output in $out" >&2
set +e
"$repo/target/release/ebb-rig" sh --timeout 3600 --input "$bin/ebb" --input "$bin/ebb-ctl" \
    --input "$bin/ebb-guest" --input "$repo/scripts/ebb-l1-lib.sh" \
    --input "$repo/scripts/lazyfree-l1.sh" --env "LF_MODES=$modes" --env "LF_FLAGS=$flags" \
    "sh ./lazyfree-l1.sh" >"$out/run.log" 2>&1
rc=$?
set -e
grep -E 'EBB-LF-(FAIL|SAMPLE)' "$out/run.log" >&2 || true
{
    echo "| run | release mode | ebb VmRSS held (MiB) | after inflation | after pressure | VmPTE held / inflated / pressed (kB) | inflate (ms) | deflate (ms) | hog got its memory | OOM kills | bad pages | ebb exit |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
    grep -o 'EBB-LF-RESULT.*' "$out/run.log" | while read -r _ kv; do
        declare -A f=()
        for p in $kv; do f[${p%%=*}]=${p#*=}; done
        echo "| ${f[run]} | ${f[mode]} | $((f[held_rss_kb] >> 10)) | $((f[inflated_rss_kb] >> 10)) |" \
            "$((f[pressed_rss_kb] >> 10)) | ${f[held_pte_kb]} / ${f[inflated_pte_kb]} / ${f[pressed_pte_kb]} |" \
            "${f[inflate_ms]} | ${f[deflate_ms]} |" \
            "$([ "${f[hog_done]}" = 1 ] && echo yes || echo no) | ${f[oom_kills]} | ${f[bad_pages]} | ${f[ebb_status]} |"
        unset f
    done
} >"$out/table.md"
cat "$out/table.md"
[ "$rc" -eq 0 ] || echo "lazyfree run failed (exit $rc); the whole output: $out/run.log" >&2
exit "$rc"
