# Shell helpers for scripts that drive a running ebb over its API socket, where ebb runs (inside
# the nested test host, or on a host with real VMX/SVM). Sourced by scripts/demo-l1.sh and by the
# rig tests' scripts (tests/harness/tests/ebb_balloon*.rs; rig_peer_balloon.rs uses wait_for on
# the QEMU peer's output); POSIX sh, for L1's busybox.
#
# The caller sets E (ebb), CTL (ebb-ctl), S (ebb's API socket) and OUT (ebb's console file);
# start_ebb sets pid (ebb's process id).
#
# Host and guest are ordered by handshakes, never by sleeps: the guest prints a marker and the
# host waits for it (wait_for); the host answers with a line on ebb's stdin (tell_guest), which
# the guest waits for on its console (`ebb-guest wait-line`, or a workload's --wait-console).

# Starts ebb in the background on the L2 images ($EBB_L2_KERNEL, $EBB_L2_INITRAMFS) with 2 vCPUs
# and 512 MiB (or $EBB_VCPUS and $EBB_MEMORY_MIB), the API socket $S, its console in $OUT and
# its stdin on a FIFO the script holds open as fd 3 (for tell_guest). $1 is the guest command
# (run by the L2 init); the other arguments are more ebb flags.
start_ebb() {
    _g=$1
    shift
    # A line for a guest whose ebb has died must fail, not kill this script with SIGPIPE before
    # it prints ebb's console.
    trap '' PIPE
    rm -f "$S" "$S.in"
    mkfifo "$S.in"
    "$E" --kernel "$EBB_L2_KERNEL" --initrd "$EBB_L2_INITRAMFS" --vcpus "${EBB_VCPUS:-2}" \
        --memory-mib "${EBB_MEMORY_MIB:-512}" \
        --api-sock "$S" "$@" --cmdline "console=ttyS0 reboot=k panic=-1 quiet -- $_g" \
        <"$S.in" >"$OUT" 2>&1 &
    pid=$!
    exec 3>"$S.in"
}

# Starts ebb with only its API socket and configures it over the socket with Firecracker's
# requests: the boot source (the L2 kernel and initramfs, the guest command $1), the machine
# (EBB_VCPUS, EBB_MEMORY_MIB), the balloon when EBB_BALLOON_JSON holds a PUT /balloon body, then
# InstanceStart. Sets pid; fd 3 is the guest's console input. Fails if a request is refused.
start_ebb_api() {
    _g=$1
    trap '' PIPE
    rm -f "$S" "$S.in"
    mkfifo "$S.in"
    "$E" --api-sock "$S" <"$S.in" >"$OUT" 2>&1 &
    pid=$!
    exec 3>"$S.in"
    # The socket appears once ebb listens.
    _i=0
    while [ ! -S "$S" ]; do
        _i=$((_i + 1))
        [ $_i -gt 300 ] && return 1
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    "$CTL" --api-sock "$S" PUT /boot-source "{\"kernel_image_path\":\"$EBB_L2_KERNEL\",\
\"initrd_path\":\"$EBB_L2_INITRAMFS\",\"boot_args\":\"console=ttyS0 reboot=k panic=-1 quiet -- $_g\"}" ||
        return 1
    "$CTL" --api-sock "$S" PUT /machine-config \
        "{\"vcpu_count\":${EBB_VCPUS:-2},\"mem_size_mib\":${EBB_MEMORY_MIB:-512}}" || return 1
    if [ -n "${EBB_BALLOON_JSON:-}" ]; then
        "$CTL" --api-sock "$S" PUT /balloon "$EBB_BALLOON_JSON" || return 1
    fi
    "$CTL" --api-sock "$S" PUT /actions '{"action_type":"InstanceStart"}'
}

# The rig fault of ebb's guest that the last run's console ($OUT) and exit status ($st) show,
# if any (as the harness's RigFault names them).
rig_fault() {
    if [ "$st" -eq 3 ] && grep -q "triple-faulted" "$OUT"; then
        echo "L2 triple fault under ebb"
    elif [ "$st" -eq 4 ] && grep -q "internal error, suberror 3" "$OUT"; then
        echo "KVM internal error (suberror 3) under ebb"
    elif grep -q "Oops: int3" "$OUT"; then
        echo "L2 guest kernel int3 oops"
    fi
}

# Sends the line $1 to the guest's console (ebb keeps it until the guest's UART listens).
tell_guest() { echo "$1" >&3 2>/dev/null; }

# Ends a rig test's script: waits for ebb, prints its console and EBB-BALLOON-EBB-STATUS, and
# exits with ebb's status, so the harness sees e.g. a triple fault (3) as the rig fault it is.
finish() {
    exec 3>&-
    wait "$pid"
    _st=$?
    cat "$OUT"
    echo "EBB-BALLOON-EBB-STATUS $_st"
    exit "$_st"
}

# Fails a rig test's script with an EBB-BALLOON-FAIL line: stops ebb, then finish.
fail() {
    echo "EBB-BALLOON-FAIL $*"
    kill "$pid" 2>/dev/null
    finish
}

# The first integer value of JSON key $1 on stdin (one key per line once split at commas and
# braces, so a key that appears twice, like held_pages in GET /memory, gives its first value).
num() { tr ',{}' '\n\n\n' | sed -n "s/^[[:space:]]*\"$1\":[[:space:]]*\([0-9]*\).*/\1/p" | head -n 1; }

# Waits until ebb's console has a line matching $1, for at most $2 seconds; fails early when
# ebb has exited.
wait_for() { wait_for_n "$1" 1 "$2"; }

# Waits until ebb's console has $2 lines matching $1, for at most $3 seconds; fails early when
# ebb has exited.
wait_for_n() {
    _i=0
    while _n=$(grep -c "$1" "$OUT" 2>/dev/null); [ "${_n:-0}" -lt "$2" ]; do
        _i=$((_i + 1))
        [ $_i -gt $(($3 * 5)) ] && return 1
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.2
    done
}

# GET PATH on ebb's API socket.
api_get() { "$CTL" --api-sock "$S" GET "$1"; }

# The balloon's size as the driver last reported it, in MiB. (GET /memory: ebb's figures, the
# balloon's first, since its keys are sorted, and `num` reads the first match.)
balloon_actual() { api_get /memory | num actual_mib; }

# Sets the balloon's target to $1 MiB and waits up to $2 seconds for the driver to reach it
# (ebb-ctl follows it, and fails at once if ebb has gone).
set_target() {
    "$CTL" --api-sock "$S" balloon set "${1}MiB" --wait --timeout-s "$2" >/dev/null
}

# Reads ebb's memory figures into vm, b (the /vm and /memory answers), res, l4, l2, tb and mb
# (resident pages, 4 KiB and 2 MiB leaves, table bytes and their minimum). The two answers are
# two requests, and the guest runs meanwhile: a fault can land between the figures, and a
# balloon chain between the answers (Linux's balloon compaction moves a page with one inflate
# and one deflate). So it reads again (up to 5 times, tries in `try`) until leaves cover exactly
# the resident pages, the table bytes are the minimum, and guest-mm, the device and the driver
# agree on the balloon's pages, and no ballooned page waits for the rest of its 2 MiB block (ebb
# releases those once inflation pauses: docs/BALLOON.md, "Whole-block release"); the last
# reading stands either way, and the caller's checks judge it.
figures() {
    try=0
    while [ $try -lt 5 ]; do
        try=$((try + 1))
        vm=$(api_get /vm) || return 1
        b=$(api_get /memory) || return 1
        res=$(echo "$vm" | num resident_pages); l4=$(echo "$vm" | num leaves_4k)
        l2=$(echo "$vm" | num leaves_2m); tb=$(echo "$vm" | num table_bytes)
        mb=$(echo "$vm" | num min_table_bytes)
        _vh=$(echo "$vm" | num held_pages); _bh=$(echo "$b" | num held_pages)
        _ap=$(echo "$b" | num actual_pages)
        pend=$(echo "$vm" | num balloon_pending_pages)
        [ $((l4 + 512 * l2)) -eq "$res" ] && [ "$tb" -eq "$mb" ] &&
            [ "$_vh" = "$_bh" ] && [ "$_bh" = "$_ap" ] && [ "${pend:-0}" -eq 0 ] && return 0
        sleep 0.5
    done
}

# One EBB-BALLOON-SNAP line labelled $1: the figures and the balloon's counters as key=value,
# for the rig tests to parse.
snap() {
    figures || return 1
    echo "EBB-BALLOON-SNAP label=$1 try=$try resident=$res leaves_4k=$l4 leaves_2m=$l2" \
        "table_bytes=$tb min_table_bytes=$mb actual_mib=$(echo "$b" | num actual_mib)" \
        "target_mib=$(echo "$b" | num target_mib) actual_pages=$(echo "$b" | num actual_pages)" \
        "pages_inflated=$(echo "$b" | num pages_inflated) pages_deflated=$(echo "$b" | num pages_deflated)" \
        "reports=$(echo "$b" | num reports_handled) bytes_reported=$(echo "$b" | num bytes_reported)" \
        "bad_pfns=$(echo "$b" | num bad_pfns) release_errors=$(echo "$b" | num release_errors)" \
        "held=$(echo "$vm" | num held_pages) kept=$(echo "$vm" | num pages_kept) pending=${pend:-0}"
}

# Waits, for at most $1 seconds, until the guest has sent statistics asked for after this call:
# every GET /balloon/statistics asks for fresh ones, and the device counts each answer
# (stats_updates); the second answer after the start was asked for after it.
fresh_stats() {
    _u0=$(api_get /memory | num stats_updates)
    _i=0
    while [ "$(api_get /memory | num stats_updates)" -lt $((_u0 + 2)) ]; do
        _i=$((_i + 1))
        [ $_i -gt $(($1 * 5)) ] && return 1
        api_get /balloon/statistics >/dev/null || return 1
        sleep 0.2
    done
}

# One EBB-BALLOON-STATS line labelled $1: the guest's last statistics (age_ms old) as key=value.
# Call fresh_stats first for figures taken after a given moment.
stats_snap() {
    _st=$(api_get /balloon/statistics) || return 1
    echo "EBB-BALLOON-STATS label=$1 age_ms=$(api_get /memory | num stats_age_ms)" \
        "total_memory=$(echo "$_st" | num total_memory) free_memory=$(echo "$_st" | num free_memory)" \
        "available_memory=$(echo "$_st" | num available_memory) oom_kill=$(echo "$_st" | num oom_kill)"
}
