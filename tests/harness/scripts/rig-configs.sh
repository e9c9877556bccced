#!/bin/sh
# Interleaved runs of one tracked ebb boot (ebb_boot's job) under several settings of the outer
# QEMU, to see whether a rig setting removes the L2 faults, and what it costs in time.
#
#   tests/harness/scripts/rig-configs.sh OUTDIR UNTIL [CONFIG...]
#
# UNTIL is a time `date -d` understands (e.g. 04:05): no run starts after it. CONFIGs (default:
# all, in this order, one run of each per round):
#   base    today's rig (EBB_RIG_QEMU_ACCEL=tcg,thread=multi, EBB_RIG_CPU=EPYC,+svm,+npt, 2 L1 vCPUs)
#   single  EBB_RIG_QEMU_ACCEL=tcg,thread=single
#   l1cpu1  EBB_RIG_L1_CPUS=1
#   rome    EBB_RIG_CPU=EPYC-Rome,+svm,+npt
# One rig at a time, under nice -n 19; L1 oopses are not re-run (EBB_RIG_L1_OOPS_RETRIES=0) so
# they are counted. EBB_MEASURE_HLT=1 adds --hlt-in-guest (ebb_boot's exact flags); by default
# it is left out, which makes the tracked triple fault several times more frequent
# (docs/ARCHITECTURE.md, "Known flakiness") and so easier to see go away.
# Needs target/release/ebb-rig and EBB_BIN (default: the static ebb, copied once so every run
# uses the same binary). Writes OUTDIR/results (one RUN line per run) and OUTDIR/run-N.{out,err}.
set -u
out=$1; until=$(date -d "$2" +%s); shift 2
configs=${*:-base single l1cpu1 rome}
root=$(cd "$(dirname "$0")/../../.." && pwd)
rig=$root/target/release/ebb-rig
mkdir -p "$out"
ebb=$out/ebb
[ -x "$ebb" ] || cp "${EBB_BIN:-$root/target/x86_64-unknown-linux-gnu/release/ebb}" "$ebb"
echo "ebb sha256 $(sha256sum "$ebb" | cut -c1-16)" >> "$out/results"
hlt=""
[ "${EBB_MEASURE_HLT:-0}" = 1 ] && hlt="--hlt-in-guest"
guest='echo cpus=$(grep -c ^processor /proc/cpuinfo); ebb-guest integrity --mib 256 && ebb-guest touch --mib 256'
n=$(grep -c '^RUN ' "$out/results" 2>/dev/null)
while :; do
    for c in $configs; do
        [ "$(date +%s)" -lt "$until" ] || exit 0
        n=$((n + 1))
        case $c in
            base) set -- ;;
            single) set -- EBB_RIG_QEMU_ACCEL=tcg,thread=single ;;
            l1cpu1) set -- EBB_RIG_L1_CPUS=1 ;;
            rome) set -- EBB_RIG_CPU=EPYC-Rome,+svm,+npt ;;
            *) echo "unknown config $c" >&2; exit 2 ;;
        esac
        s=$(date +%s)
        env "$@" EBB_RIG_L1_OOPS_RETRIES=0 nice -n 19 "$rig" run --timeout 900 -- "$ebb" \
            --kernel /l2/bzImage --initrd /l2/initramfs.cpio --vcpus 2 --memory-mib 512 $hlt \
            --cmdline "console=ttyS0 reboot=k panic=-1 quiet -- $guest" \
            > "$out/run-$n.out" 2> "$out/run-$n.err"
        rc=$?
        secs=$(($(date +%s) - s))
        err=$out/run-$n.err
        if [ $rc -eq 0 ] && grep -q 'bad_pages=0' "$out/run-$n.out"; then class=pass
        elif [ $rc -eq 3 ] && grep -q 'triple-faulted' "$err"; then class=l2-triple-fault
        elif grep -q 'RIG FAULT (L1 kernel oops)' "$err"; then class=l1-oops
        elif grep -q 'RIG FAULT (L1 did not boot)' "$err"; then class=l1-no-boot
        elif grep -q 'KVM internal error' "$err"; then class=kvm-internal-error
        elif grep -q 'timed out after' "$err"; then class=timeout
        else class=other
        fi
        echo "RUN n=$n config=$c rc=$rc class=$class secs=$secs $(grep -o 'ns_per_page=[0-9.]*' "$out/run-$n.out" | head -1)" |
            tee -a "$out/results"
        # Keep the whole console only where something went wrong.
        if [ "$class" = pass ]; then tail -n 60 "$err" > "$err.tail" && rm -f "$err"; fi
    done
done
