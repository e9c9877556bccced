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
      EBB-RESULT*|*"table bytes"*|*"leaves:"*|*"faults handled"*|*"touched (res"*) echo "$label $l" ;;
    esac
  done
  echo "DONE $label total_ms=$(( $(up) - s ))"
}
for i in 1 2 3; do
  t ebb "$EBB_RIG_INPUTS"/ebb --no-track --kernel $K --initrd $I --vcpus 2 --memory-mib 512 --cmdline "console=ttyS0 reboot=k panic=-1 quiet -- true"
  t ebb-track "$EBB_RIG_INPUTS"/ebb --kernel $K --initrd $I --vcpus 2 --memory-mib 512 --fault-around 64 --cmdline "console=ttyS0 reboot=k panic=-1 quiet -- true"
  t ebb-track512 "$EBB_RIG_INPUTS"/ebb --kernel $K --initrd $I --vcpus 2 --memory-mib 512 --fault-around 512 --cmdline "console=ttyS0 reboot=k panic=-1 quiet -- true"
  t ebb-pvh "$EBB_RIG_INPUTS"/ebb --pvh --no-track --kernel $EBB_L2_VMLINUX --initrd $I --vcpus 2 --memory-mib 512 --cmdline "console=ttyS0 reboot=k panic=-1 quiet -- true"
  t ebb-nothp "$EBB_RIG_INPUTS"/ebb --no-track --no-thp --kernel $K --initrd $I --vcpus 2 --memory-mib 512 --cmdline "console=ttyS0 reboot=k panic=-1 quiet -- true"
  t qemu qemu-system-x86_64 -M microvm -enable-kvm -cpu host -smp 2 -m 512 -nodefaults -no-user-config -display none -no-reboot -serial stdio -kernel $K -initrd $I -append "console=ttyS0 panic=-1 quiet noxsave -- true"
done
[ "${BOOT_ONLY:-0}" = 1 ] && exit 0
for i in 1 2; do
  t touch-off "$EBB_RIG_INPUTS"/ebb --no-track --kernel $K --initrd $I --vcpus 2 --memory-mib 512 --cmdline "console=ttyS0 reboot=k panic=-1 quiet -- ebb-guest touch --mib 256"
  t touch-on-fa64 "$EBB_RIG_INPUTS"/ebb --fault-around 64 --kernel $K --initrd $I --vcpus 2 --memory-mib 512 --cmdline "console=ttyS0 reboot=k panic=-1 quiet -- ebb-guest touch --mib 256"
  t touch-on-fa1 "$EBB_RIG_INPUTS"/ebb --kernel $K --initrd $I --vcpus 2 --memory-mib 512 --cmdline "console=ttyS0 reboot=k panic=-1 quiet -- ebb-guest touch --mib 256"
done
