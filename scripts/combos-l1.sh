#!/bin/sh
# Every combination of guest-memory settings that ebb's flags allow, one after another in one L1
# boot (inside the nested test host, or directly on a host with real VMX/SVM); POSIX sh, for L1's
# busybox. Driven by the rig test tests/harness/tests/ebb_combinations.rs, which checks what it
# prints; the list of combinations and why it is that list: docs/TESTING.md, "Every combination
# of memory settings".
#
# For each combination ebb boots a small guest with the balloon; the guest writes checksummed
# pages (`ebb-guest integrity`) and holds them while the balloon inflates and deflates; then it
# checks every page and powers off. At rest after each step this prints one line of ebb's figures:
#
#   EBB-COMBO-BEGIN label=L attempt=N flags=...
#   EBB-COMBO-SNAP label=held|inflated|reclaimed|deflated key=value ...   (reclaimed: strategy off)
#   EBB-COMBO-STEP-FAIL what failed                                          (the run went on)
#   ... ebb's console and exit report ...
#   EBB-COMBO-END label=L attempt=N status=S
#
# A combination that meets a rig fault of ebb's guest (docs/ARCHITECTURE.md, "Known
# flakiness": ebb exits 3 "triple-faulted" or 4 "internal error, suberror 3", or the guest
# kernel prints "Oops: int3") runs again, at most twice: EBB-COMBO-RIG-FAULT label=L
# attempt=N fault=WHAT. Re-running only that combination keeps the whole run within its time.
#
# Environment: COMBOS (labels to run, separated by spaces; default all), COMBOS_ALL (1: also
# the ten pairs the default list leaves out, so every pair the flags accept runs), EBB_VCPUS (1),
# EBB_MEMORY_MIB (256), COMBO_HOLD_MIB (integrity's pages, 32), COMBO_INFLATE_MIB (32),
# COMBO_WINDOW (the fault-around window of the windowed 4 KiB runs, 16 pages), COMBO_EBB_FLAGS
# (more ebb flags, default --hlt-in-guest: docs/ARCHITECTURE.md, "Known flakiness").
D=${EBB_RIG_INPUTS:-.}
E="$D/ebb"; CTL="$D/ebb-ctl"; S=/run/ebb-combo.sock; OUT=/tmp/ebb-combo.out
. "$D/ebb-l1-lib.sh"
EBB_VCPUS=${EBB_VCPUS:-1}
EBB_MEMORY_MIB=${EBB_MEMORY_MIB:-256}
HOLD=${COMBO_HOLD_MIB:-32}
INFLATE=${COMBO_INFLATE_MIB:-32}
WINDOW=${COMBO_WINDOW:-16}
MORE=${COMBO_EBB_FLAGS:---hlt-in-guest}
# The guest holds its pages until told to check them, then powers off.
G="ebb-guest integrity --mib $HOLD --wait-console"

# Sets shell variables from the JSON $1 in one pass: `pick JSON key var [key var]...` sets each
# var to the value of the last "key": in the text (a number or a word), or to nothing.
pick() {
    _j=$1
    shift
    _s=h
    while [ $# -gt 1 ]; do
        eval "$2="
        _s="$_s;g;s/.*\"$1\":\"*\([0-9a-z-]*\).*/$2=\1/p"
        shift 2
    done
    eval "$(echo "$_j" | sed -n "$_s")"
}

# Reads ebb's figures, as `figures` in ebb-l1-lib.sh does, and prints one EBB-COMBO-SNAP line
# labelled $1. Reads again (up to 5 times) until the figures are at rest: leaves cover exactly the
# resident pages, the table bytes are the minimum (at least the minimum with strategy off, which
# keeps emptied tables until a sweep), guest-mm, the device and the driver agree on the balloon's
# pages and none waits for the rest of its block. Untracked RAM has no leaves or tables: there
# only the balloon's figures must agree. The last reading stands either way; the test judges it.
# (GET /vm's keys are sorted, so its memory report comes after its configuration; GET /memory's
# balloon section comes before guest-mm's figures and is read on its own.)
csnap() {
    try=0
    while [ $try -lt 5 ]; do
        try=$((try + 1))
        vm=$(api_get /vm) || return 1
        b=$(api_get /memory) || return 1
        pick "$vm" resident_pages res leaves_4k l4 leaves_2m l2 table_bytes tb \
            min_table_bytes mb held_pages vh pages_kept kept balloon_pending_pages pend \
            strategy strat release rel fault_around fa faults faults
        pick "$(echo "$b" | sed 's/,"memory":.*//')" held_pages bh actual_pages ap \
            actual_mib amib pages_inflated pin pages_deflated pde bad_pfns bpf \
            release_errors rerr
        if [ -z "$l4" ]; then
            [ "$bh" = "$ap" ] && [ "${pend:-0}" -eq 0 ] && break
        elif [ $((l4 + 512 * l2)) -eq "$res" ] && [ "$vh" = "$bh" ] && [ "$bh" = "$ap" ] &&
            [ "${pend:-0}" -eq 0 ]; then
            [ "$tb" -eq "$mb" ] && break
            [ "$strat" = off ] && [ "$tb" -ge "$mb" ] && break
        fi
        sleep 0.5
    done
    echo "EBB-COMBO-SNAP label=$1 t_ms=$(($(now_ms) - _t0)) try=$try strategy=$strat" \
        "release=$rel fault_around=$fa resident=$res leaves_4k=$l4 leaves_2m=$l2" \
        "table_bytes=$tb min_table_bytes=$mb faults=$faults actual_mib=$amib actual_pages=$ap" \
        "device_held=$bh held=$vh kept=$kept pending=${pend:-0} pages_inflated=$pin" \
        "pages_deflated=$pde bad_pfns=$bpf release_errors=$rerr"
}

step_fail() { echo "EBB-COMBO-STEP-FAIL $*"; }

# Milliseconds since L1 booted.
now_ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }

# One run of ebb with the flags "$@"; sets st (ebb's exit status). Every step that fails is
# said and ends the guest's part early; ebb's console follows in any case.
one_run() {
    start_ebb "$G" $MORE --balloon "$@"
    if ! wait_for "EBB-INTEGRITY-WAITING" 400; then
        step_fail "the guest never held its pages"
    elif ! csnap held; then
        step_fail "API snapshot failed (held)"
    elif ! set_target "$INFLATE" 240; then
        step_fail "the balloon did not reach $INFLATE MiB in 240 s"
    elif ! csnap inflated; then
        step_fail "API snapshot failed (inflated)"
    elif [ "$strat" = off ] && ! "$CTL" --api-sock "$S" PUT /memory/reclaim '{}'; then
        step_fail "PUT /memory/reclaim failed"
    elif [ "$strat" = off ] && ! csnap reclaimed; then
        step_fail "API snapshot failed (reclaimed)"
    elif ! set_target 0 240; then
        step_fail "the balloon did not deflate to 0 in 240 s"
    elif ! csnap deflated; then
        step_fail "API snapshot failed (deflated)"
    else
        tell_guest check
        wait_for "EBB-L2-END" 300 || step_fail "the guest did not finish its check in 300 s"
    fi
    kill -0 "$pid" 2>/dev/null && ! grep -q "EBB-L2-END" "$OUT" && kill "$pid" 2>/dev/null
    exec 3>&-
    wait "$pid"
    st=$?
}

# Runs the combination labelled $1 with the ebb flags that follow, unless COMBOS leaves it out.
combo() {
    _l=$1
    shift
    if [ -n "${COMBOS:-}" ]; then
        case " $COMBOS " in *" $_l "*) ;; *) return 0 ;; esac
    fi
    _a=1
    while :; do
        echo "EBB-COMBO-BEGIN label=$_l attempt=$_a flags=$*"
        _t0=$(now_ms)
        one_run "$@"
        cat "$OUT"
        _f=$(rig_fault)
        [ -n "$_f" ] && echo "EBB-COMBO-RIG-FAULT label=$_l attempt=$_a fault=$_f"
        echo "EBB-COMBO-END label=$_l attempt=$_a status=$st t_ms=$(($(now_ms) - _t0))"
        [ -z "$_f" ] || [ $_a -ge 3 ] && break
        _a=$((_a + 1))
    done
}

echo "EBB-COMBO-SIZES vcpus=$EBB_VCPUS memory_mib=$EBB_MEMORY_MIB hold_mib=$HOLD inflate_mib=$INFLATE window=$WINDOW"
# Tracked memfd RAM (the default): 2 MiB block fills, released by punching the file or MADV_REMOVE.
for s in off scan count; do
    for r in punch-hole remove; do
        combo "memfd-$r-$s" --reclaim-strategy $s --release-mode $r
    done
done
# Tracked anonymous RAM (--no-thp): 4 KiB fills, page by page (fault-around 1, the default) and
# by windows of $WINDOW pages. A 4 KiB guest runs several times slower than a memfd one in the
# rig, so not every pair runs with both fills: page by page with the --no-thp defaults; windows
# with dontneed and the other two strategies, and with free (which clears no leaf and frees no
# table, so the strategies do the same there; count, the default).
combo anon4k-dontneed-count --no-thp --reclaim-strategy count --release-mode dontneed
W="--no-thp --fault-around $WINDOW"
combo "anon4k-w$WINDOW-dontneed-off" $W --reclaim-strategy off --release-mode dontneed
combo "anon4k-w$WINDOW-dontneed-scan" $W --reclaim-strategy scan --release-mode dontneed
combo "anon4k-w$WINDOW-free-count" $W --reclaim-strategy count --release-mode free
# The rest of the 4 KiB pairs, with both fills (COMBOS_ALL=1 only).
if [ "${COMBOS_ALL:-0}" = 1 ]; then
    for r in dontneed free; do
        for s in off scan count; do
            [ "$r-$s" = dontneed-count ] ||
                combo "anon4k-$r-$s" --no-thp --reclaim-strategy $s --release-mode $r
            case "$r-$s" in
            dontneed-off | dontneed-scan | free-count) ;;
            *) combo "anon4k-w$WINDOW-$r-$s" $W --reclaim-strategy $s --release-mode $r ;;
            esac
        done
    done
fi
# Untracked anonymous RAM (--no-track): no fault path and no tables, so the strategy means
# nothing; once per release mode, one with THP (the default) and one without.
combo untracked-thp-dontneed --no-track --release-mode dontneed
combo untracked-4k-free --no-track --no-thp --release-mode free
if [ "${COMBOS_ALL:-0}" = 1 ]; then
    combo untracked-thp-free --no-track --release-mode free
    combo untracked-4k-dontneed --no-track --no-thp --release-mode dontneed
fi
echo "EBB-COMBO-DONE"
