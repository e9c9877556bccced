#!/bin/busybox sh
# /init of the rig's L1 initramfs: loads KVM (irqbypass, kvm, kvm-amd), then runs the job that the
# harness appended as a second cpio archive under /rig/job, and powers off. Serial protocol:
#
#   EBB-RIG-KVM ok npt=Y                      /dev/kvm is there (or EBB-RIG-ERROR ...)
#   EBB-RIG-BEGIN                             the job starts; its stdout and stderr follow
#   EBB-RIG-SAMPLE label=.. pid=.. comm=.. t_ms=.. VmRSS=.. VmPTE=.. SecPageTables=.. PageTables=..
#   EBB-RIG-L1-OOPS <message>                 L1's own kernel oopsed (the harness stops the run)
#   EBB-RIG-L1-LOCKUP <message>               L1's kernel saw a CPU stuck (soft lockup, RCU stall)
#   EBB-RIG-ALIVE                             every 15 s while the job runs: L1 still runs
#   EBB-RIG-END status=N                      the job's exit status
#   EBB-RIG-MEMINFO SecPageTables=N PageTables=N   (kB, after /proc/sys/vm/stat_refresh)
#   EBB-RIG-DONE
export PATH=/rig/bin:/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/pts /run
mount -t devpts devpts /dev/pts 2>/dev/null

rig_fail() {
    echo "EBB-RIG-ERROR $*"
    echo "EBB-RIG-DONE"
    poweroff -f
    exit 1
}

for m in irqbypass kvm kvm-amd; do
    # A module the kernel has built in is not in the initramfs.
    [ -f "/lib/modules/$m.ko" ] || continue
    insmod "/lib/modules/$m.ko" || rig_fail "insmod $m failed"
done
[ -c /dev/kvm ] || rig_fail "no /dev/kvm after loading kvm-amd (does the CPU model have svm?)"
echo "EBB-RIG-KVM ok npt=$(cat /sys/module/kvm_amd/parameters/npt 2>/dev/null)"

# L1 is the test host of ebb: give shared memory 2 MiB pages where a mapping asks for them
# (MADV_HUGEPAGE), as ebb's tracked guest RAM (a memfd) does. Debian's default is "never".
echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled 2>/dev/null ||
    echo "EBB-RIG-WARN cannot set transparent_hugepage/shmem_enabled"

# Print kernel messages of the default level (4) on the console despite "quiet": a soft lockup's
# module list and the stuck task's stack are printed at that level, and they are the evidence
# (and how the harness tells L1's reports from the L2 guest's when L1's user space is stuck).
echo 5 > /proc/sys/kernel/printk

[ -f /rig/job/cmd ] || rig_fail "no job: /rig/job/cmd missing (the harness appends it)"
export EBB_L2_KERNEL=/l2/bzImage EBB_L2_VMLINUX=/l2/vmlinux EBB_L2_INITRAMFS=/l2/initramfs.cpio
export EBB_RIG=nested
rig-job /rig/job
echo "EBB-RIG-DONE"
sync
poweroff -f
