#!/bin/sh
# The main job's steps, run where ebb runs (inside the nested test host, or directly on a host
# with real VMX/SVM): boot Debian under ebb with the balloon, let the guest write and hold
# checksummed pages, inflate the balloon over the API socket, deflate it, let the guest check its
# pages and power off; print ebb's memory figures at each step and its report at exit.
# Needs ebb, ebb-ctl and ebb-l1-lib.sh in $EBB_RIG_INPUTS (or the current directory) and the L2 images in
# $EBB_L2_KERNEL / $EBB_L2_INITRAMFS.
D=${EBB_RIG_INPUTS:-.}
E="$D/ebb"; CTL="$D/ebb-ctl"; S=/tmp/ebb-demo.sock; OUT=/tmp/ebb-demo.out
INFLATE=${DEMO_INFLATE_MIB:-256}
# Free page reporting is off by default here, so that the inflation's effect stands alone
# (DEMO_REPORTING=1 turns it on; tests/harness/tests/ebb_balloon.rs covers it).
REPORTING=; [ "${DEMO_REPORTING:-0}" = 1 ] && REPORTING=--balloon-reporting
. "$D/ebb-l1-lib.sh"
# The guest holds its pages until the host has inflated and deflated the balloon (tell_guest).
G="ebb-guest integrity --mib 128 --wait-console && ebb-guest touch --mib 64"
start_ebb "$G" ${EBB_DEMO_FLAGS:---hlt-in-guest} --balloon $REPORTING
mib() { echo "$(($1 / 256)).$(( ($1 % 256) * 10 / 256 ))"; }
show() {
    figures || return 1
    printf '%-34s resident %7s MiB | leaves %6s x 4K + %3s x 2M | table bytes %7s (min %s) | balloon %s MiB, reported %s MiB\n' \
        "$1" "$(mib "$res")" "$l4" "$l2" "$tb" "$mb" "$(echo "$b" | num actual_mib)" \
        "$(($(echo "$b" | num bytes_reported) >> 20))"
    printf '%-34s host page tables (VmPTE) %s kB | KVM nested tables %s kB | KVM table zaps %s\n' \
        "" "$(kb host_pte_bytes)" "$(kb kvm_table_bytes)" "$(echo "$vm" | num zaps)"
}
# A byte figure of the last /vm answer in kB, "?" where ebb did not give it.
kb() {
    _v=$(echo "$vm" | num "$1")
    if [ -n "$_v" ]; then echo $((_v >> 10)); else echo "?"; fi
}
step() {
    if wait_for "EBB-INTEGRITY-WAITING" 180; then
        show "guest holds 128 MiB of checksums:"
        set_target "$INFLATE" 120 && show "balloon inflated to $INFLATE MiB:"
        set_target 0 120 && show "balloon deflated:"
    else
        echo "the guest never reached its workload; console follows"
    fi
}
step
tell_guest check
exec 3>&-
wait "$pid"; st=$?
echo "---- guest console and ebb's exit report ----"
grep -v '^\[' "$OUT"
echo "ebb exit status: $st"
exit "$st"
