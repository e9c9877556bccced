#!/bin/sh
# Runs inside the rig's L1: the guest's first-touch cost (`ebb-guest touch`, ns per 4 KiB page) with
# tracking off and on, alternating in one L1 boot so that drift hits both alike. ROUNDS (default 8)
# rounds; each prints one line per configuration. Needs ./ebb (the static binary) next to it.
K=$EBB_L2_KERNEL; I=$EBB_L2_INITRAMFS
E="$EBB_RIG_INPUTS"/ebb
C="console=ttyS0 reboot=k panic=-1 quiet -- ebb-guest touch --mib ${MIB:-256}"
run() {
  label=$1; shift
  "$E" "$@" --kernel $K --initrd $I --vcpus 2 --memory-mib 512 --cmdline "$C" </dev/null 2>&1 |
    sed -n "s/^EBB-RESULT touch .*ns_per_page=\([0-9.]*\).*/TOUCH $label \1/p"
}
i=0
while [ $i -lt "${ROUNDS:-8}" ]; do
  if [ $((i % 2)) = 0 ]; then
    run off --no-track; run on
  else
    run on; run off --no-track
  fi
  i=$((i + 1))
done
