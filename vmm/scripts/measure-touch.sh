#!/bin/sh
# Runs inside the rig's L1: the guest's first-touch cost (`ebb-guest touch`, ns per 4 KiB page) with
# tracking off, tracking on with one 2 MiB block per fault, and with 4- and 8-block fault-around
# windows, rotating the order each round in one L1 boot so that drift hits all alike.
# ROUNDS (default 8) rounds; one line per run. Needs ./ebb (the static binary) next to it.
K=$EBB_L2_KERNEL; I=$EBB_L2_INITRAMFS
E="$EBB_RIG_INPUTS"/ebb
C="console=ttyS0 reboot=k panic=-1 quiet -- ebb-guest touch --mib ${MIB:-256}"
run() {
  case $1 in
    off) set -- off --no-track ;;
    on) set -- on --fault-around 1 ;;
    on-fa2048) set -- on-fa2048 --fault-around 2048 ;;
    on-fa4096) set -- on-fa4096 --fault-around 4096 ;;
  esac
  label=$1; shift
  "$E" "$@" --kernel $K --initrd $I --vcpus 2 --memory-mib 512 --cmdline "$C" </dev/null 2>&1 |
    sed -n -e "s/^EBB-RESULT touch .*ns_per_page=\([0-9.]*\).*/TOUCH $label \1/p" \
      -e "s/^touched (resident): *\([0-9.]*\) MiB.*/RESIDENT $label \1/p"
}
i=0
while [ $i -lt "${ROUNDS:-8}" ]; do
  case $((i % 4)) in
    0) run off; run on; run on-fa2048; run on-fa4096 ;;
    1) run on; run on-fa2048; run on-fa4096; run off ;;
    2) run on-fa2048; run on-fa4096; run off; run on ;;
    3) run on-fa4096; run off; run on; run on-fa2048 ;;
  esac
  i=$((i + 1))
done
