#!/bin/sh
# The side-by-side benchmark's steps, run where the VMMs run (inside the nested test host, or
# directly on a host with real VMX/SVM): the same scenario for ebb and for the QEMU peer, one
# after the other in this boot, each at its defaults with a 1 GiB, 1 vCPU guest. Driven by
# tests/harness/src/bin/ebb-bench/ (scripts/bench-tables.sh), which reads the lines below.
#
# Settings (environment):
#   BENCH_ORDER      what runs, in order (default "ebb qemu"): ebb, qemu, or ebb:LABEL, an ebb
#                    variant whose own flags are in BENCH_VARIANTS
#   BENCH_VARIANTS   the variants, "LABEL FLAGS...;LABEL FLAGS...;..." (ebb-bench --variants)
#   BENCH_REPORTING  free page reporting, on or off (default on)
#   BENCH_EBB_FLAGS  more ebb flags for every ebb run (e.g. --zap-kvm-tables-after 64)
#   BENCH_SAMPLE_MS  the periodic sampling interval (default 500)
#   BENCH_MEMORY_MIB BENCH_TOUCH_MIB BENCH_WS_MIB BENCH_BALLOON_MIB BENCH_RETOUCH_MIB
#                    the guest's RAM (default 1024), the first touch (600), the working set (32),
#                    the balloon's size when inflated (768) and the last touch (512)
#
# A variant whose guest meets a rig fault (ebb exits 3 "triple-faulted" or 4 "internal error,
# suberror 3", or the guest prints "Oops: int3"; docs/ARCHITECTURE.md, "Known flakiness") runs
# again, at most twice, after an EBB-BENCH-RIG-FAULT line; its earlier attempt's lines do not
# count. A variant that fails does not stop the ones after it. (Plain ebb and qemu runs leave
# re-runs to the caller: the first failure ends the job.)
#
# The scenario (the guest holds each step's memory until the script tells it to go on; the sizes
# are the defaults):
#   touched     the guest has touched 600 MiB and holds it
#   freed       the guest freed it (the process exited) and the VMM's VmRSS settled
#   ws          the guest holds a 32 MiB working set of checksummed pages
#   inflated    the balloon inflated to 768 MiB (the guest keeps 256 MiB); timed
#   retouch-ws  the guest read and checked its working set (ns per page)
#   deflated    the balloon deflated to 0 (timed), and the VMM's VmRSS settled
#   retouch     the guest touched 512 MiB fresh (ns per page) and holds it; then it powers off
#
# Output:
#   EBB-BENCH vmm=V reporting=R phase=P label=P pid= comm= t_ms= VmRSS= VmPTE= SecPageTables=
#       PageTables= RssAnon= RssFile= RssShmem= guest_kB= guest_zero_kB= [ebb's own figures]
#       [the phase's time: settle_ms, inflate_ms, deflate_ms, ns_per_page]
#                                          one per phase and VMM (sizes in kB, as /proc gives them;
#                                          guest_kB: the guest RAM the host holds for the VMM, and
#                                          how much of it is zeros, by ebb-memscan)
#   EBB-BENCH-MARK vmm=V what=W t_ms=      the VMM started (W=start), a balloon change began
#   EBB-RIG-SAMPLE label=periodic ...      every BENCH_SAMPLE_MS while a VMM runs
#   EBB-BENCH-FAIL vmm=V why               a step that did not happen; the VMM is stopped
#   EBB-BENCH-STATUS vmm=V status=N        the VMM's exit status
#   EBB-BENCH-RIG-FAULT vmm=V attempt=N fault=WHAT   a variant's rig fault; it runs again
#                                          (V is the variant's LABEL for ebb:LABEL)
#   [V] ...                                each VMM's console, after it ended
# Exit status: the first non-zero VMM status (ebb's 3 and 4 and the peer's failures are rig
# faults the caller re-runs), else 1 after an EBB-BENCH-FAIL, else 0.
D=${EBB_RIG_INPUTS:-.}
E="$D/ebb"; CTL="$D/ebb-ctl"; S=/tmp/bench-ebb.sock
Q=/tmp/bench-qmp.sock
. "$D/ebb-l1-lib.sh"
ORDER=${BENCH_ORDER:-ebb qemu}
REPORTING=${BENCH_REPORTING:-on}
SAMPLE_MS=${BENCH_SAMPLE_MS:-500}
MEM_MIB=${BENCH_MEMORY_MIB:-1024} TOUCH_MIB=${BENCH_TOUCH_MIB:-600} WS_MIB=${BENCH_WS_MIB:-32}
RETOUCH_MIB=${BENCH_RETOUCH_MIB:-512}
# The balloon leaves the guest 256 MiB. Next to a 128 MiB working set that did not fit (the QEMU
# peer's guest gave at most 715 MiB in 300 s), so the working set is 32 MiB: enough pages to time
# their re-faults after KVM's tables were dropped.
BALLOON_MIB=${BENCH_BALLOON_MIB:-768}

# The guest's steps; each waits for a line on its console before it goes on.
G="ebb-guest hog --mib $TOUCH_MIB --hold-secs 0 --wait-console && ebb-guest wait-line"
G="$G && ebb-guest integrity --mib $WS_MIB --wait-console && ebb-guest wait-line"
G="$G && ebb-guest hog --mib $RETOUCH_MIB --hold-secs 0 --wait-console"

# ---- How the bench speaks to each VMM: start it, its process, its balloon, its own figures. ----
# ebb's API is used only here.

# Starts VMM $KIND (ebb or qemu; ebb with the variant's flags $VFLAGS) with the guest command
# $G; sets pid (the process to wait for), vpid (the VMM's process, sampled) and OUT (its console);
# fd 3 is the guest's console input (tell_guest).
vmm_start() {
    OUT=/tmp/bench-$V.out
    case "$KIND" in
        ebb)
            _r=""
            [ "$REPORTING" = on ] && _r=--balloon-reporting
            # shellcheck disable=SC2086 # BENCH_EBB_FLAGS and VFLAGS are lists of flags
            EBB_VCPUS=1 EBB_MEMORY_MIB=$MEM_MIB start_ebb "$G" --balloon $_r ${BENCH_EBB_FLAGS:-} $VFLAGS
            vpid=$pid
            ;;
        qemu)
            trap '' PIPE
            rm -f /tmp/bench-qemu.in
            mkfifo /tmp/bench-qemu.in
            rig-peer -m "$MEM_MIB" -c 1 -s 0 -r "$REPORTING" -T 1200 -q "$Q" -i /tmp/bench-qemu.in \
                -- "$G" >"$OUT" 2>&1 &
            pid=$!
            exec 3>/tmp/bench-qemu.in
            vpid=""
            _i=0
            while [ -z "$vpid" ] && [ $_i -lt 300 ] && running "$pid"; do
                vpid=$(pidof qemu-system-x86_64 | cut -d' ' -f1)
                [ -n "$vpid" ] || sleep 0.1
                _i=$((_i + 1))
            done
            ;;
    esac
}

# Sets the balloon's target to $1 MiB.
balloon_set() {
    case "$KIND" in
        ebb) "$CTL" --api-sock "$S" balloon set "${1}MiB" >/dev/null ;;
        qemu)
            ebb-guest qmp --socket "$Q" -- \
                "{\"execute\":\"balloon\",\"arguments\":{\"value\":$(((MEM_MIB - $1) << 20))}}" >/dev/null
            ;;
    esac
}

# The balloon's size as the guest's driver last reported it, in MiB (empty if unknown).
balloon_mib() {
    case "$KIND" in
        ebb) "$CTL" --api-sock "$S" GET /memory | num actual_mib ;;
        qemu)
            _a=$(ebb-guest qmp --socket "$Q" -- '{"execute":"query-balloon"}' 2>/dev/null |
                sed -n 's/.*"actual": \([0-9]*\).*/\1/p' | head -n 1)
            [ -n "$_a" ] && echo $((MEM_MIB - (_a >> 20)))
            ;;
    esac
}

# The VMM's own figures as key=value (ebb: its table bytes and their minimum, resident pages, its
# longest balloon notification and KVM table zaps; the peer gives none). Absent keys stay out.
own_figures() {
    [ "$KIND" = ebb ] || return 0
    _vm=$("$CTL" --api-sock "$S" GET /vm) || return 0
    _b=$("$CTL" --api-sock "$S" GET /memory) || _b=""
    _f=""
    for _k in table_bytes min_table_bytes resident_pages leaves_4k leaves_2m host_pte_bytes \
        kvm_table_bytes zaps ns_max blocks_emptied; do
        _v=$(echo "$_vm" | num "$_k")
        [ -n "$_v" ] && _f="$_f $_k=$_v"
    done
    for _k in faults promotions promote_ns; do
        _v=$(echo "$_vm" | num "$_k")
        [ -n "$_v" ] && _f="$_f $_k=$_v"
    done
    for _k in notify_ns_max notify_ns_total notifications actual_mib bytes_reported; do
        _v=$(echo "$_b" | num "$_k")
        [ -n "$_v" ] && _f="$_f $_k=$_v"
    done
    echo "$_f"
}
# ---- end of the VMM-specific part ----

# Whether process $1 runs: not gone and not a zombie (a VMM that exited stays one until this
# script waits for it, and kill -0 would still find it).
running() {
    _st=""
    read -r _ _ _st _ <"/proc/$1/stat" 2>/dev/null
    [ -n "$_st" ] && [ "$_st" != Z ]
}

now_ms() {
    read -r _up _ </proc/uptime
    echo $((${_up%.*} * 1000 + 1${_up#*.}0 - 1000))
}

# One EBB-BENCH line for phase $1, with more key=value pairs in the other arguments.
phase() {
    _p=$1
    shift
    _s=$(rig-sample "$vpid" "$_p") || _s="label=$_p"
    echo "EBB-BENCH vmm=$V reporting=$REPORTING phase=$_p ${_s#EBB-RIG-SAMPLE } $(rss_parts) \
$("$D/ebb-memscan" "$vpid") $(own_figures) $*"
}

mark() { echo "EBB-BENCH-MARK vmm=$V what=$1 t_ms=$(now_ms)"; }

failed=0
# Reports a step that did not happen and stops the VMM; the caller returns.
bench_fail() {
    echo "EBB-BENCH-FAIL vmm=$V $*"
    failed=1
    kill "$vpid" "$pid" 2>/dev/null
}

# Waits until $OUT has at least $2 lines matching $1, for at most $3 seconds (fails early when
# the VMM has exited).
wait_n() {
    _i=0
    while [ "$(grep -c "$1" "$OUT")" -lt "$2" ]; do
        _i=$((_i + 1))
        [ $_i -gt $(($3 * 5)) ] && return 1
        running "$pid" || return 1
        sleep 0.2
    done
}

# The value of key $2 in the $3-th line of $OUT matching $1.
field_n() { grep "$1" "$OUT" | sed -n "$3p" | sed -n "s/.* $2=\([0-9.]*\).*/\1/p"; }

# The VMM's RssAnon, RssFile and RssShmem (kB) as key=value.
rss_parts() {
    sed -n 's/^\(Rss[A-Za-z]*\):[^0-9]*\([0-9]*\).*/\1=\2/p' "/proc/$vpid/status" 2>/dev/null | tr '\n' ' '
}

vm_rss() { sed -n 's/^VmRSS:[^0-9]*\([0-9]*\).*/\1/p' "/proc/$vpid/status" 2>/dev/null; }

# After the guest freed memory: waits at least 5 s (free page reporting starts about 2 s after a
# free, and its releases take a while under emulation), then until the VMM's VmRSS has moved less
# than 1 MiB over 2 s (four readings 0.5 s apart), at most 90 s in all. The same for both VMMs and
# both reporting settings; prints the milliseconds waited.
settle() {
    _t0=$(now_ms)
    _last=$(vm_rss) _still=0
    while :; do
        sleep 0.5
        _r=$(vm_rss)
        [ -n "$_r" ] || break
        _d=$((_r - _last))
        if [ "${_d#-}" -lt 1024 ]; then _still=$((_still + 1)); else _still=0; fi
        _last=$_r
        _el=$(($(now_ms) - _t0))
        [ $_el -ge 5000 ] && [ $_still -ge 4 ] && break
        [ $_el -ge 90000 ] && break
    done
    echo $(($(now_ms) - _t0))
}

# Sets the balloon to $1 MiB and waits until the driver reports it (>= for an inflation, <= for
# a deflation), polling every 0.2 s, at most $2 seconds; prints the milliseconds from setting the
# target to the reading that showed it, or (failing) the balloon's last size.
balloon_to() {
    _t0=$(now_ms)
    _a=""
    balloon_set "$1" || { echo "setting the target failed"; return 1; }
    while :; do
        _a=$(balloon_mib)
        if [ -n "$_a" ]; then
            if [ "$1" -gt 0 ] && [ "$_a" -ge "$1" ]; then break; fi
            if [ "$1" -eq 0 ] && [ "$_a" -le 0 ]; then break; fi
        fi
        if [ $(($(now_ms) - _t0)) -gt $(($2 * 1000)) ] || ! running "$pid"; then
            echo "it was at ${_a:-?} MiB after $(($(now_ms) - _t0)) ms"
            return 1
        fi
        sleep 0.2
    done
    echo $(($(now_ms) - _t0))
}

sampler() {
    while running "$pid"; do
        rig-sample "$vpid" periodic
        sleep "$((SAMPLE_MS / 1000)).$(printf %03d $((SAMPLE_MS % 1000)))"
    done
}

# Runs the scenario for one VMM ($V).
scenario() {
    mark start
    vmm_start
    [ -n "$vpid" ] || { bench_fail "no VMM process"; return; }
    sampler &
    spid=$!
    wait_n "EBB-RESULT hog phase=held" 1 300 || { bench_fail "the guest never touched its memory"; return; }
    phase touched "ns_per_page=$(field_n 'EBB-RESULT hog phase=held' ns_per_page 1)"
    tell_guest free
    wait_n "EBB-RESULT hog phase=released" 1 120 || { bench_fail "the guest never freed its memory"; return; }
    phase freed "settle_ms=$(settle)"
    tell_guest go
    wait_n "EBB-INTEGRITY-WAITING" 1 300 || { bench_fail "the guest never held its working set"; return; }
    phase ws
    mark inflate
    _ms=$(balloon_to "$BALLOON_MIB" 300) || { bench_fail "the balloon did not reach $BALLOON_MIB MiB: $_ms"; return; }
    phase inflated "inflate_ms=$_ms"
    tell_guest check
    wait_n "EBB-RESULT integrity" 1 300 || { bench_fail "the guest never checked its working set"; return; }
    _r='EBB-RESULT integrity'
    phase retouch-ws "ns_per_page=$(field_n "$_r" verify_ns_per_page 1)" \
        "fill_ns_per_page=$(field_n "$_r" fill_ns_per_page 1) bad_pages=$(field_n "$_r" bad_pages 1)"
    mark deflate
    _ms=$(balloon_to 0 300) || { bench_fail "the balloon did not deflate: $_ms"; return; }
    phase deflated "deflate_ms=$_ms settle_ms=$(settle)"
    tell_guest go
    wait_n "EBB-RESULT hog phase=held" 2 300 || { bench_fail "the guest never touched its last 512 MiB"; return; }
    phase retouch "ns_per_page=$(field_n 'EBB-RESULT hog phase=held' ns_per_page 2)"
    tell_guest free
}

# The flags of variant $1 in BENCH_VARIANTS (empty if there is no such variant).
variant_flags() {
    echo "${BENCH_VARIANTS:-}" | tr ';' '\n' | while read -r _l _f; do
        [ "$_l" = "$1" ] && echo "$_f --"
    done | head -n 1
}

# Runs the scenario once for $V and waits for the VMM; sets st (its exit status).
run_once() {
    failed=0 pid="" vpid="" spid=""
    scenario
    exec 3>&-
    # A guest that has not powered off within 120 s is stopped.
    _i=0
    while running "$pid" && [ $_i -lt 600 ]; do
        sleep 0.2
        _i=$((_i + 1))
    done
    kill "$pid" 2>/dev/null
    wait "$pid"
    st=$?
    [ -n "$spid" ] && kill "$spid" 2>/dev/null
    echo "EBB-BENCH-STATUS vmm=$V status=$st"
    sed "s/^/[$V] /" "$OUT"
}

status=0 anyfail=0
for item in $ORDER; do
    case "$item" in
        ebb:*)
            V=${item#ebb:} KIND=ebb tries=3
            VFLAGS=$(variant_flags "$V")
            if [ -z "$VFLAGS" ]; then
                echo "EBB-BENCH-FAIL vmm=$V no such variant in BENCH_VARIANTS"
                anyfail=1
                continue
            fi
            VFLAGS=${VFLAGS% --}
            ;;
        *)
            [ $status -eq 0 ] && [ $anyfail -eq 0 ] || break
            V=$item KIND=$item VFLAGS="" tries=1
            ;;
    esac
    attempt=1
    while :; do
        run_once
        _f=""
        [ "$KIND" = ebb ] && _f=$(rig_fault)
        [ -n "$_f" ] && [ $attempt -lt $tries ] || break
        echo "EBB-BENCH-RIG-FAULT vmm=$V attempt=$attempt fault=$_f"
        attempt=$((attempt + 1))
    done
    [ $failed -ne 0 ] && anyfail=1
    [ "$st" -ne 0 ] && [ $status -eq 0 ] && status=$st
done
[ $status -eq 0 ] && [ $anyfail -ne 0 ] && status=1
exit "$status"
