#!/bin/sh
# ebb-stress-guest: the guest's side of the stress run (scripts/stress-l1.sh drives it from the
# host; docs/STRESS.md). resources/build-l2.sh installs it in the L2 image as
# /bin/ebb-stress-guest. POSIX sh, for the guest's busybox. (A script of its own because the
# kernel hands init at most 32 words after " -- ", too few for this on the command line.)
#
#   ebb-stress-guest [HOLD_MIB [CPU_WEIGHT [CPU_US]]]
#
# CPU_WEIGHT and CPU_US set the stressors' cgroup cpu.weight and cpu.max quota (µs per 100 ms);
# unset, the cgroup keeps the kernel's defaults.
#
# 1. `ebb-guest integrity` writes HOLD_MIB (default 64) of checksummed pages and holds them
#    (EBB-INTEGRITY-WAITING); the host answers "go" on the console.
# 2. stress-ng and `ebb-guest churn` start in one cgroup (cgroup2), each in a session of its own
#    (stress-ng signals its own process group): three stress-ng processes, each with a vm worker
#    of its own method, verifying what it wrote (--verify), and together mmap (with its write
#    check), madvise, fork (--fork-vm), clone and forkheavy, all with --page-in. Then
#    EBB-STRESS-RUNNING.
# 3. Host lines: "pause TAG" freezes the cgroup and prints "EBB-STRESS-PAUSED TAG ." once every
#    task in it is frozen; "resume TAG" thaws it ("EBB-STRESS-RESUMED TAG ."); any other line
#    ends the stress: stress-ng stops on SIGINT and prints its summary, churn stops on SIGUSR1
#    and prints its result, "EBB-STRESS-EXIT ..." gives their exit statuses, and integrity
#    checks every page. The exit status is 0 only if all of them passed.
HOLD=${1:-64}
C=/sys/fs/cgroup/stress
mount -t cgroup2 none /sys/fs/cgroup && mkdir "$C" || exit 70
# The stressors take what CPU the rest of the guest leaves (the balloon's driver is a kernel
# worker outside the cgroup): under the rig's emulated CPUs, a fair share against eight busy
# stressor tasks made the driver's inflations several times slower.
echo +cpu >/sys/fs/cgroup/cgroup.subtree_control || exit 70
[ -z "$2" ] || echo "$2" >"$C/cpu.weight" || exit 70
[ -z "$3" ] || echo "$3 100000" >"$C/cpu.max" || exit 70

ebb-guest integrity --mib "$HOLD" --wait-signal &
integrity=$!
ebb-guest wait-line || exit 71

# Runs "$@" in the background, in the cgroup and a session of its own; $! is its pid.
in_cgroup() { (echo 0 >"$C/cgroup.procs" && exec setsid "$@") & }
V="--page-in --verify --timeout 1d --vm 1 --vm-bytes 24m --vm-method"
# shellcheck disable=SC2086 # $V is a list of options
in_cgroup stress-ng $V zero-one --mmap 1 --mmap-bytes 16m --mmap-write-check --madvise 1
s1=$!
# shellcheck disable=SC2086
in_cgroup stress-ng $V modulo-x --fork 1 --fork-vm --clone 1 --clone-max 16
s2=$!
# shellcheck disable=SC2086
in_cgroup stress-ng $V walk-1d --forkheavy 1 --forkheavy-procs 16
s3=$!
in_cgroup ebb-guest churn --mib 16 --wait-signal
churn=$!
echo "EBB-STRESS-RUNNING"

while line=$(ebb-guest wait-line); do
    # shellcheck disable=SC2086 # "EBB-GUEST-LINE word tag"
    set -- $line
    case $2 in
        pause)
            echo 1 >"$C/cgroup.freeze"
            until grep -q "frozen 1" "$C/cgroup.events"; do sleep 0.1; done
            echo "EBB-STRESS-PAUSED $3 ."
            ;;
        resume)
            echo 0 >"$C/cgroup.freeze"
            echo "EBB-STRESS-RESUMED $3 ."
            ;;
        *) break ;;
    esac
done

echo 0 >"$C/cgroup.freeze"
kill -INT "$s1" "$s2" "$s3"
kill -USR1 "$churn"
wait "$s1"; r1=$?
wait "$s2"; r2=$?
wait "$s3"; r3=$?
wait "$churn"; rc=$?
echo "EBB-STRESS-EXIT label=end stress_ng_1=$r1 stress_ng_2=$r2 stress_ng_3=$r3 churn=$rc"
kill -USR1 "$integrity"
wait "$integrity"; ri=$?
[ "$r1$r2$r3$rc$ri" = 00000 ]
