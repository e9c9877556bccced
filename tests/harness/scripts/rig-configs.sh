#!/bin/sh
# Interleaved runs of tracked ebb boots under several settings of the outer QEMU, to see whether
# a rig setting removes the L2 faults, and what it costs in time.
#
#   tests/harness/scripts/rig-configs.sh OUTDIR UNTIL [CONFIG...]
#
# UNTIL is a time `date -d` understands (e.g. 04:05): no run starts after it. CONFIGs (default:
# all, in this order; each round runs every workload under every config):
#   base    today's rig (EBB_RIG_QEMU_ACCEL=tcg,thread=multi, EBB_RIG_CPU=EPYC,+svm,+npt, 2 L1 vCPUs)
#   single  EBB_RIG_QEMU_ACCEL=tcg,thread=single
#   l1cpu1  EBB_RIG_L1_CPUS=1
#   rome    EBB_RIG_CPU=EPYC-Rome,+svm,+npt
#   q72     the system's QEMU (Debian 12: 7.2) as the outer QEMU
#   q10     the backports QEMU (10.0) that EBB_SETUP_QEMU_BACKPORTS=1 resources/setup.sh unpacks
# Workloads (EBB_MEASURE_WORKLOADS, default "w4k boot"): the guest runs `integrity --mib 256`
# and `touch --mib 256` with 2 vCPUs and 512 MiB, as tests/harness/tests/ebb_boot.rs does;
#   boot     ebb_boot's exact flags (--hlt-in-guest, default guest RAM: 2 MiB leaves)
#   w4k      --no-thp (4 KiB leaves: one fault per page) without --hlt-in-guest: the path where
#            tracked guests triple-faulted most often (docs/ARCHITECTURE.md, "Known flakiness")
#   balloon  the main job (scripts/demo-l1.sh: 128 MiB held, balloon inflated to 256 MiB and
#            deflated, pages checked) with free page reporting on
# One rig at a time, under nice -n 19; L1 oopses are not re-run (EBB_RIG_L1_OOPS_RETRIES=0) so
# they are counted. Uses target/release/ebb-rig and EBB_BIN (default: the static ebb), copied once
# so every run uses the same binary. Writes OUTDIR/results (one RUN line per run) and
# OUTDIR/run-N.{out,err} (the whole console only for runs that did not pass).
set -u
out=$1; until=$(date -d "$2" +%s); shift 2
configs=${*:-base single l1cpu1 rome}
workloads=${EBB_MEASURE_WORKLOADS:-w4k boot}
root=$(cd "$(dirname "$0")/../../.." && pwd)
rig=$root/target/release/ebb-rig
qemu10=$(sed -n 's/^EBB_RIG_QEMU_BACKPORTS=//p' "${EBB_CACHE:-$root/target/ebb-cache}/images/rig.env")
mkdir -p "$out"
ebb=$out/ebb
[ -x "$ebb" ] || cp "${EBB_BIN:-$root/target/x86_64-unknown-linux-gnu/release/ebb}" "$ebb"
ctl=$out/ebb-ctl
[ -x "$ctl" ] || cp "$root/target/x86_64-unknown-linux-gnu/release/ebb-ctl" "$ctl"
echo "ebb sha256 $(sha256sum "$ebb" | cut -c1-16)" >> "$out/results"
guest='echo cpus=$(grep -c ^processor /proc/cpuinfo); ebb-guest integrity --mib 256 && ebb-guest touch --mib 256'
n=$(grep -c '^RUN ' "$out/results" 2>/dev/null)
while :; do
    for c in $configs; do
        for w in $workloads; do
            [ "$(date +%s)" -lt "$until" ] || exit 0
            n=$((n + 1))
            case $c in
                base) set -- ;;
                single) set -- EBB_RIG_QEMU_ACCEL=tcg,thread=single ;;
                l1cpu1) set -- EBB_RIG_L1_CPUS=1 ;;
                rome) set -- EBB_RIG_CPU=EPYC-Rome,+svm,+npt ;;
                q72) set -- EBB_RIG_QEMU=qemu-system-x86_64 ;;
                q10) [ -n "$qemu10" ] || { echo "q10: run EBB_SETUP_QEMU_BACKPORTS=1 resources/setup.sh" >&2; exit 2; }
                    set -- EBB_RIG_QEMU="$qemu10" ;;
                *) echo "unknown config $c" >&2; exit 2 ;;
            esac
            case $w in
                boot) flags=--hlt-in-guest ;;
                w4k) flags=--no-thp ;;
                balloon) flags="" ;;
                *) echo "unknown workload $w" >&2; exit 2 ;;
            esac
            s=$(date +%s)
            if [ "$w" = balloon ]; then
                env "$@" EBB_RIG_L1_OOPS_RETRIES=0 DEMO_REPORTING=1 nice -n 19 "$rig" sh --timeout 900 \
                    --input "$ebb" --input "$ctl" --input "$root/scripts/ebb-l1-lib.sh" \
                    --input "$root/scripts/demo-l1.sh" "DEMO_REPORTING=1 sh ./demo-l1.sh" \
                    > "$out/run-$n.out" 2> "$out/run-$n.err"
            else
                env "$@" EBB_RIG_L1_OOPS_RETRIES=0 nice -n 19 "$rig" run --timeout 900 -- "$ebb" \
                    --kernel /l2/bzImage --initrd /l2/initramfs.cpio --vcpus 2 --memory-mib 512 $flags \
                    --cmdline "console=ttyS0 reboot=k panic=-1 quiet -- $guest" \
                    > "$out/run-$n.out" 2> "$out/run-$n.err"
            fi
            rc=$?
            secs=$(($(date +%s) - s))
            err=$out/run-$n.err
            if [ $rc -eq 0 ] && grep -q 'bad_pages=0' "$out/run-$n.out"; then class=pass
            elif [ $rc -eq 3 ] && grep -q 'triple-faulted' "$err"; then class=l2-triple-fault
            elif [ $rc -eq 4 ] && grep -q 'internal error, suberror 3' "$err"; then class=l2-kvm-internal-error
            elif [ $rc -eq 2 ] && grep -q 'guest kernel panicked' "$err"; then class=l2-panic
            elif grep -q 'L1 kernel oops' "$err"; then class=l1-oops
            elif grep -q 'L1 kernel lockup' "$err"; then class=l1-lockup
            elif grep -q 'L1 triple' "$err"; then class=l1-triple-fault
            elif grep -q 'Oops: int3' "$err"; then class=l2-int3-oops
            elif grep -q 'L1 did not boot\|without EBB-RIG-KVM' "$err"; then class=l1-no-boot
            elif grep -q 'KVM internal error' "$err"; then class=kvm-internal-error
            elif grep -q 'timed out after' "$err"; then class=timeout
            else class=other
            fi
            leaves=$(sed -n 's/^leaves: *\([0-9]*\) x 4 KiB + \([0-9]*\) x 2 MiB.*/4k=\1 2m=\2/p' "$err" | tail -1)
            echo "RUN n=$n config=$c work=$w rc=$rc class=$class secs=$secs $leaves $(grep -o 'fill_ns_per_page=[0-9.]*' "$out/run-$n.out" | head -1)" |
                tee -a "$out/results"
            if [ "$class" = pass ]; then tail -n 60 "$err" > "$err.tail" && rm -f "$err"; fi
        done
    done
done
