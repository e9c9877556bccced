#!/bin/busybox sh
# /init of the L2 guest initramfs. Runs the command given after " -- " on the kernel command line,
# frames its output with markers the host parses from the serial console, and powers off.
#
#   EBB-L2-BEGIN cmd=<command>
#   ... command output (stdout and stderr) ...
#   EBB-L2-END status=<exit status>
#
# Without a command it prints EBB-L2-END status=127 after an error line.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
for m in virtio_mmio virtio_balloon; do
    [ -f "/lib/modules/$m.ko" ] || continue
    insmod "/lib/modules/$m.ko" || echo "EBB-L2-WARN insmod $m failed"
done

# The kernel also hands init every boot option it does not know (e.g. noxsave), so the command is
# taken from /proc/cmdline: everything after the first " -- ".
read -r cmdline </proc/cmdline
case "$cmdline" in
    *" -- "*) cmd="${cmdline#* -- }" ;;
    *) cmd="" ;;
esac
echo "EBB-L2-BEGIN cmd=$cmd"
if [ -z "$cmd" ]; then
    echo "EBB-L2-ERROR no command after -- on the kernel command line"
    rc=127
else
    cd /tmp
    sh -c "$cmd" </dev/null 2>&1
    rc=$?
fi
echo "EBB-L2-END status=$rc"
sync
# poweroff -f; if the machine has no way to power off, init exits and panic=-1 reboots it.
poweroff -f
exit "$rc"
