#!/bin/sh
# Runs inside the rig's L1 (see docs/ARCHITECTURE.md, "Measurements"): boot-to-init time of ebb
# (untracked and tracked) and QEMU microvm with the same L2 kernel and initramfs, then the guest's
# touch ns/page with tracking off and on. Needs ./ebb (the static binary) next to it.
up() { read u _ < /proc/uptime; echo $(( ${u%.*} * 1000 + 10 * ${u#*.} )); }
K=$EBB_L2_KERNEL; I=$EBB_L2_INITRAMFS
t() {
  label=$1; shift
  s=$(up)
  "$@" </dev/null 2>&1 | while IFS= read -r l; do
    case "$l" in
      EBB-L2-BEGIN*) echo "BOOT $label init_ms=$(( $(up) - s ))" ;;
      EBB-RESULT*|*"table bytes"*|*"leaves:"*|*"faults handled"*|*"touched (res"*|*"host 2 MiB"*) echo "$label $l" ;;
    esac
  done
  echo "DONE $label total_ms=$(( $(up) - s ))"
}
C="console=ttyS0 reboot=k panic=-1 quiet --"
E="$EBB_RIG_INPUTS"/ebb
[ "${TOUCH_ONLY:-0}" = 1 ] || for i in 1 2 3; do
  t ebb $E --no-track --kernel $K --initrd $I --vcpus 2 --memory-mib 512 --cmdline "$C true"
  t ebb-track $E --kernel $K --initrd $I --vcpus 2 --memory-mib 512 --cmdline "$C true"
  t ebb-track-4k-fa64 $E --no-thp --fault-around 64 --kernel $K --initrd $I --vcpus 2 --memory-mib 512 --cmdline "$C true"
  t qemu qemu-system-x86_64 -M microvm -enable-kvm -cpu host -smp 2 -m 512 -nodefaults -no-user-config -display none -no-reboot -serial stdio -kernel $K -initrd $I -append "console=ttyS0 panic=-1 quiet noxsave -- true"
done
[ "${BOOT_ONLY:-0}" = 1 ] && exit 0
# touch: 2 MiB host pages (default) and 4 KiB host pages (--no-thp), tracking off and on.
for i in 1 2 3; do
  t touch-off $E --no-track --kernel $K --initrd $I --vcpus 2 --memory-mib 512 --cmdline "$C ebb-guest touch --mib 256"
  t touch-on $E --kernel $K --initrd $I --vcpus 2 --memory-mib 512 --cmdline "$C ebb-guest touch --mib 256"
  t touch-off-4k $E --no-track --no-thp --kernel $K --initrd $I --vcpus 2 --memory-mib 512 --cmdline "$C ebb-guest touch --mib 256"
  t touch-on-4k-fa512 $E --no-thp --fault-around 512 --kernel $K --initrd $I --vcpus 2 --memory-mib 512 --cmdline "$C ebb-guest touch --mib 256"
done
