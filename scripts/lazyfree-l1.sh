#!/bin/sh
# MADV_FREE end to end (docs/LAZYFREE.md), run where ebb runs (in the nested test host): ebb in a
# memory cgroup, the balloon inflated with --release-mode free (and, for the comparison, with
# dontneed), then host memory pressure inside the cgroup; ebb's resident memory is sampled at
# every step and the guest checks its pages at the end.
#
# Per run (one release mode): the guest touches LF_TOUCH_MIB and frees it (so the balloon gets
# pages the host holds), then holds LF_HOLD_MIB of checksummed pages; the host inflates the
# balloon to LF_BALLOON_MIB, then sets the cgroup's memory.max to what ebb used before the
# inflation plus LF_HOG_MIB minus half the balloon, and runs a hog of LF_HOG_MIB in the cgroup:
# with `dontneed` the hog fits (the balloon's pages are gone already); with `free` it fits only
# if the kernel takes the lazily freed balloon pages. Then the limit goes, the balloon deflates,
# the guest checks its pages and touches the deflated memory again.
#
# Lines: EBB-LF-SAMPLE (ebb's VmRSS, RssAnon, VmPTE and the cgroup's usage at a step), EBB-LF-RESULT
# (one per run), EBB-LF-FAIL (a run that went wrong). Needs ebb, ebb-ctl, ebb-guest (static) and
# ebb-l1-lib.sh in $EBB_RIG_INPUTS and the L2 images in $EBB_L2_KERNEL / $EBB_L2_INITRAMFS.
D=${EBB_RIG_INPUTS:-.}
E="$D/ebb"; CTL="$D/ebb-ctl"; HOG="$D/ebb-guest"; S=/tmp/ebb-lf.sock; OUT=/tmp/ebb-lf.out
MODES=${LF_MODES:-"free dontneed dontneed free"}
FLAGS=${LF_FLAGS:---no-track --no-thp}
TOUCH=${LF_TOUCH_MIB:-320}
HOLD=${LF_HOLD_MIB:-64}
BALLOON=${LF_BALLOON_MIB:-288}
HOGMIB=${LF_HOG_MIB:-512}
EBB_MEMORY_MIB=${LF_MEMORY_MIB:-512}
. "$D/ebb-l1-lib.sh"

CG=/sys/fs/cgroup
if [ ! -f "$CG/cgroup.controllers" ]; then
    if ! { mkdir -p "$CG" && mount -t cgroup2 none "$CG"; }; then
        echo "EBB-LF-FAIL no cgroup2"
        exit 1
    fi
fi
echo +memory >"$CG/cgroup.subtree_control" || { echo "EBB-LF-FAIL no memory controller"; exit 1; }

now_ms() {
    read -r _up _ </proc/uptime
    echo $((${_up%.*} * 1000 + 1${_up#*.}0 - 1000))
}

# A /proc/$pid/status field in kB.
status_kb() { sed -n "s/^$1:[[:space:]]*\([0-9]*\).*/\1/p" "/proc/$pid/status"; }

# One EBB-LF-SAMPLE line for step $1; sets rss_kb, anon_kb and pte_kb.
sample() {
    rss_kb=$(status_kb VmRSS); anon_kb=$(status_kb RssAnon); pte_kb=$(status_kb VmPTE)
    _cur=$(cat "$cg/memory.current")
    echo "EBB-LF-SAMPLE mode=$mode step=$1 t_ms=$(now_ms) VmRSS=$rss_kb RssAnon=$anon_kb VmPTE=$pte_kb" \
        "cgroup_kb=$((_cur >> 10)) max=$(cat "$cg/memory.max")"
}

lf_fail() {
    echo "EBB-LF-FAIL mode=$mode $*"
    kill "$pid" 2>/dev/null
    exec 3>&-
    wait "$pid"
    grep -v '^\[' "$OUT" | tail -n 20
    failed=1
}

G="ebb-guest hog --mib $TOUCH --hold-secs 1"
G="$G && ebb-guest integrity --mib $HOLD --wait-console && ebb-guest touch --mib $((BALLOON - 64))"
failed=0
run=0
for mode in $MODES; do
    run=$((run + 1))
    cg="$CG/ebb-lf-$run"
    mkdir "$cg" || { echo "EBB-LF-FAIL cannot make $cg"; exit 1; }
    # ebb starts inside the cgroup (a child inherits it); this shell goes back to the root.
    echo $$ >"$cg/cgroup.procs"
    # shellcheck disable=SC2086
    start_ebb "$G" $FLAGS --release-mode "$mode" --balloon
    echo $$ >"$CG/cgroup.procs"
    if ! wait_for "EBB-INTEGRITY-WAITING" 600; then
        lf_fail "the guest never held its pages"
        continue
    fi
    sample held
    held_rss=$rss_kb; held_pte=$pte_kb
    base=$(cat "$cg/memory.current")
    t0=$(now_ms)
    set_target "$BALLOON" 300 || { lf_fail "the balloon did not reach $BALLOON MiB"; continue; }
    inflate_ms=$(($(now_ms) - t0))
    sample inflated
    inflated_rss=$rss_kb; inflated_pte=$pte_kb
    limit=$((base + (HOGMIB << 20) - (BALLOON << 19)))
    echo "$limit" >"$cg/memory.max"
    # The hog runs in ebb's cgroup (this shell joins it while the hog runs).
    echo $$ >"$cg/cgroup.procs"
    hog_done=$("$HOG" hog --mib "$HOGMIB" --hold-secs 1 2>&1 | grep -c 'phase=released')
    echo $$ >"$CG/cgroup.procs"
    sample pressed
    pressed_rss=$rss_kb; pressed_pte=$pte_kb
    oom_kills=$(sed -n 's/^oom_kill \([0-9]*\)/\1/p' "$cg/memory.events")
    echo max >"$cg/memory.max"
    kill -0 "$pid" 2>/dev/null || { lf_fail "ebb did not survive the pressure"; continue; }
    t0=$(now_ms)
    set_target 0 300 || { lf_fail "the balloon did not deflate"; continue; }
    deflate_ms=$(($(now_ms) - t0))
    sample deflated
    tell_guest check
    wait_for "EBB-RESULT touch" 600 || { lf_fail "the guest never touched the deflated memory"; continue; }
    sample retouched
    exec 3>&-
    wait "$pid"; st=$?
    bad=$(sed -n 's/.*EBB-RESULT integrity.* bad_pages=\([0-9]*\).*/\1/p' "$OUT" | head -n 1)
    echo "EBB-LF-RESULT mode=$mode run=$run inflate_ms=$inflate_ms deflate_ms=$deflate_ms" \
        "held_rss_kb=$held_rss inflated_rss_kb=$inflated_rss pressed_rss_kb=$pressed_rss" \
        "held_pte_kb=$held_pte inflated_pte_kb=$inflated_pte pressed_pte_kb=$pressed_pte" \
        "hog_done=$hog_done oom_kills=${oom_kills:-0} bad_pages=${bad:-?} ebb_status=$st"
    [ "$st" -eq 0 ] && [ "${bad:-1}" -eq 0 ] || failed=1
    rmdir "$cg" 2>/dev/null
done
exit "$failed"
