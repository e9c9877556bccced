#!/bin/sh
# Runs inside the rig's L1: the guest's first-touch cost (`ebb-guest touch --mib 256`, ns per 4 KiB
# page) under several ebb configurations, one L1 boot, the order rotated each round so that drift
# hits all alike. CONFIGS picks configurations (default below), ROUNDS the rounds (default 6).
# One "TOUCH <config> <ns_per_page>" line per run. Needs ./ebb (the static binary) next to it:
#   ebb-rig sh --input target/x86_64-unknown-linux-gnu/release/ebb --input vmm/scripts/measure-touch.sh \
#     'CONFIGS="off on off-hlt on-hlt" ROUNDS=10 sh ./measure-touch.sh'
E="$EBB_RIG_INPUTS"/ebb
C="console=ttyS0 reboot=k panic=-1 quiet -- ebb-guest touch --mib 256"
run() {
  case $1 in
    off) set -- off --no-track ;;
    off-hlt) set -- off-hlt --no-track --hlt-in-guest ;;
    on) set -- on ;;
    on-fa1) set -- on-fa1 --fault-around 1 ;;
    on-t1) set -- on-t1 --fault-around 1 --fault-threads 1 ;;
    on-hlt) set -- on-hlt --hlt-in-guest ;;
    on-hlt-t1) set -- on-hlt-t1 --fault-around 1 --hlt-in-guest --fault-threads 1 ;;
    on-hlt-t1-fa2048) set -- on-hlt-t1-fa2048 --fault-around 2048 --hlt-in-guest --fault-threads 1 ;;
    on-hlt-t1-fa4096) set -- on-hlt-t1-fa4096 --fault-around 4096 --hlt-in-guest --fault-threads 1 ;;
    on-hlt-fa4096) set -- on-hlt-fa4096 --fault-around 4096 --hlt-in-guest ;;
    on-hlt-fa2048) set -- on-hlt-fa2048 --fault-around 2048 --hlt-in-guest ;;
    on-fa4096) set -- on-fa4096 --fault-around 4096 ;;
  esac
  label=$1; shift
  "$E" "$@" --kernel $K --initrd $I --vcpus 2 --memory-mib 512 --cmdline "$C" </dev/null 2>&1 |
    sed -n -e "s/^EBB-RESULT touch .*ns_per_page=\([0-9.]*\).*/TOUCH $label \1/p"
}
set -- ${CONFIGS:-off-hlt on-hlt on-hlt-fa2048 on-hlt-fa4096 off on-fa4096}
for r in $(seq ${ROUNDS:-6}); do
  for c in "$@"; do run $c; done
  first=$1; shift; set -- "$@" "$first"
done
