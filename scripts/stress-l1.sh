#!/bin/sh
# The stress run's steps, run where ebb runs (inside the nested test host, or directly on a host
# with real VMX/SVM); POSIX sh, for L1's busybox. Driven by scripts/stress.sh and by the rig test
# tests/harness/tests/ebb_stress.rs, which checks what it prints (docs/STRESS.md).
#
# ebb boots Debian with 2 vCPUs and the balloon (free page reporting, deflate-on-OOM, statistics
# every second). In the guest, `ebb-guest integrity` writes checksummed pages and holds them;
# then stress-ng runs memory stressors (vm with three methods and --verify, mmap with its write
# check, madvise, fork, clone, forkheavy, all with --page-in) and `ebb-guest churn` runs beside
# them, all in one cgroup. Here, each cycle inflates the balloon to a random target (a seeded
# generator: the seed is printed, STRESS_SEED repeats a run), polls the guest's statistics,
# deflates, and after the inflation and after the deflation freezes the guest's stressors (the
# cgroup's freezer) to read ebb's figures at rest: EBB-BALLOON-SNAP (snap, scripts/ebb-l1-lib.sh),
# EBB-STRESS-HOST (ebb's VmRSS and VmPTE, faults, zaps, notify_ns_max) and, per cycle,
# EBB-STRESS-CYCLE (target, times). At the end the guest stops its stressors and checks its pages.
#
# Every line that ends a run early is "EBB-BALLOON-FAIL cycle N: ...".
#
# Environment: STRESS_CYCLES (20), STRESS_MINUTES (0: run at least this long as well),
# STRESS_SEED (random), STRESS_MIN_MIB / STRESS_MAX_MIB (the targets' range, 32 / 320),
# EBB_MEMORY_MIB (1024), STRESS_HOLD_MIB (integrity's pages, 64), STRESS_EBB_FLAGS (more ebb
# flags, default --hlt-in-guest: docs/ARCHITECTURE.md, "Known flakiness"),
# STRESS_BALLOON_TIMEOUT_S (240: how long one balloon change may take), STRESS_SPARE_MIB (256:
# what a target leaves of the memory the guest last reported available), STRESS_WEIGHT and
# STRESS_CPU_US (the stressors' cgroup cpu.weight, default 100, and cpu.max quota per 100 ms).
D=${EBB_RIG_INPUTS:-.}
E="$D/ebb"; CTL="$D/ebb-ctl"; S=/run/ebb-stress.sock; OUT=/tmp/ebb-stress.out
. "$D/ebb-l1-lib.sh"
CYCLES=${STRESS_CYCLES:-20}
MINUTES=${STRESS_MINUTES:-0}
MIN=${STRESS_MIN_MIB:-32}
MAX=${STRESS_MAX_MIB:-320}
HOLD=${STRESS_HOLD_MIB:-64}
SPARE=${STRESS_SPARE_MIB:-256}
EBB_MEMORY_MIB=${EBB_MEMORY_MIB:-1024}
# Balloon changes get this long (seconds); the rig is slow under load, and a stuck balloon fails.
TO=${STRESS_BALLOON_TIMEOUT_S:-240}
SEED=${STRESS_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}
SEED=$((SEED % 2147483648))
echo "EBB-STRESS-SEED label=run seed=$SEED cycles=$CYCLES minutes=$MINUTES min_mib=$MIN" \
    "max_mib=$MAX memory_mib=$EBB_MEMORY_MIB hold_mib=$HOLD"

# The guest's side is tests/guest-tools/stress-guest.sh (/bin/ebb-stress-guest in the image).
G="ebb-stress-guest $HOLD ${STRESS_WEIGHT:-100} ${STRESS_CPU_US:-}"

# Milliseconds since L1 booted (/proc/uptime has hundredths).
now_ms() {
    read -r _u _rest </proc/uptime
    echo $((${_u%.*} * 1000 + 1${_u#*.} * 10 - 1000))
}

# The next target in T (MiB, MIN..MAX): a 31-bit linear congruential generator, the same in
# every POSIX shell, so a seed repeats a run's targets.
next_target() {
    SEED=$(((SEED * 1103515245 + 12345) % 2147483648))
    T=$((MIN + (SEED >> 8) % (MAX - MIN + 1)))
    # A balloon takes only what the guest can spare: its driver waits, short of the target, while
    # the stressors hold the rest (a 303 MiB target stopped at 256 MiB with 467 MiB available).
    # So the target leaves SPARE MiB of what the guest last reported available.
    _avail=$(api_get /balloon/statistics | num available_memory)
    _cap=$((${_avail:-0} / 1048576 - SPARE))
    [ "$_cap" -lt "$MIN" ] && _cap=$MIN
    [ "$T" -gt "$_cap" ] && T=$_cap
}

# ebb's host figures as key=value: its VmRSS and the parts of it, VmPTE (kB, /proc), and from the
# last /vm and /memory answers (figures, in snap) KVM's tables, faults, zaps, notify_ns_max.
host_figures() {
    _kv=""
    for _k in VmRSS RssAnon RssFile RssShmem VmPTE; do
        _v=$(sed -n "s/^$_k:[[:space:]]*\([0-9]*\) kB/\1/p" "/proc/$pid/status")
        _kv="$_kv $(echo "$_k" | tr '[:upper:]' '[:lower:]')_kb=${_v:-0}"
    done
    echo "EBB-STRESS-HOST label=$1$_kv kvm_table_bytes=$(echo "$vm" | num kvm_table_bytes)" \
        "host_pte_bytes=$(echo "$vm" | num host_pte_bytes) faults=$(echo "$vm" | num faults)" \
        "zaps=$(echo "$vm" | num zaps) notify_ns_max=$(echo "$b" | num notify_ns_max)" \
        "notifications=$(echo "$b" | num notifications) notify_ns_total=$(echo "$b" | num notify_ns_total)" \
        "promotions=$(echo "$vm" | num promotions) promote_ns=$(echo "$vm" | num promote_ns)" \
        "stats_updates=$(echo "$b" | num stats_updates)"
}

# With the guest's stressors frozen: snap and host_figures labelled $1. Cycle $c.
at_rest() {
    tell_guest "pause $c-$1"
    wait_for "EBB-STRESS-PAUSED $c-$1 \." 180 || fail "cycle $c: the guest did not freeze its stressors ($1)"
    snap "c$c-$1" || fail "cycle $c: API snapshot failed ($1)"
    host_figures "c$c-$1"
    tell_guest "resume $c-$1"
    wait_for "EBB-STRESS-RESUMED $c-$1 \." 180 || fail "cycle $c: the guest did not thaw its stressors ($1)"
}

c=0
# shellcheck disable=SC2086 # STRESS_EBB_FLAGS is a list of flags
start_ebb "$G" ${STRESS_EBB_FLAGS---hlt-in-guest} --balloon --balloon-reporting --balloon-deflate-on-oom --balloon-stats-s 1
wait_for "EBB-INTEGRITY-WAITING" 240 || fail "cycle 0: the guest never held its pages"
snap c0-held || fail "cycle 0: API snapshot failed"
host_figures c0-held
tell_guest go
wait_for "EBB-STRESS-RUNNING" 120 || fail "cycle 0: the guest never started its stressors"
fresh_stats 60 || fail "cycle 0: no fresh guest statistics"
stats_snap c0 || fail "cycle 0: GET /balloon/statistics failed"
start=$(now_ms)
while [ "$c" -lt "$CYCLES" ] || [ $(($(now_ms) - start)) -lt $((MINUTES * 60000)) ]; do
    c=$((c + 1))
    next_target
    kill -0 "$pid" 2>/dev/null || fail "cycle $c: ebb is not running"
    t0=$(now_ms)
    set_target "$T" "$TO" ||
        fail "cycle $c: the balloon did not reach $T MiB in $TO s (it holds $(balloon_actual) MiB)"
    t1=$(now_ms)
    fresh_stats 60 || fail "cycle $c: no fresh guest statistics"
    stats_snap "c$c" || fail "cycle $c: GET /balloon/statistics failed"
    at_rest inflated
    t2=$(now_ms)
    set_target 0 "$TO" ||
        fail "cycle $c: the balloon did not deflate in $TO s (it holds $(balloon_actual) MiB)"
    t3=$(now_ms)
    at_rest deflated
    fresh_stats 60 || fail "cycle $c: no fresh guest statistics"
    stats_snap "c$c-deflated" || fail "cycle $c: GET /balloon/statistics failed"
    kill -0 "$pid" 2>/dev/null || fail "cycle $c: ebb is not running"
    echo "EBB-STRESS-CYCLE label=c$c cycle=$c target_mib=$T inflate_ms=$((t1 - t0))" \
        "deflate_ms=$((t3 - t2)) elapsed_ms=$((t3 - start))"
done
n=$c
c=end
fresh_stats 60 || fail "cycle end: no fresh guest statistics"
stats_snap end || fail "cycle end: GET /balloon/statistics failed"
tell_guest stop
wait_for "EBB-RESULT integrity" 300 || fail "cycle end: the guest never checked its pages"
echo "EBB-STRESS-DONE label=end cycles=$n elapsed_ms=$(($(now_ms) - start))"
finish
