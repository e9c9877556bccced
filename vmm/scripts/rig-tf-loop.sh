#!/bin/sh
# Runs inside the rig's L1 (see docs/ARCHITECTURE.md, "Known flakiness"): N tracked boots of the
# L2 guest running `ebb-guest integrity --mib MIB`, alternating ebb's defaults and
# --hlt-in-guest, with L1's KVM trace events on. Prints one RUN line per boot (mode, async-PF
# parks seen in L1, exit status, seconds, bad pages) and, for a failed boot, the tail of ebb's
# output and of L1's trace (the guest RIP before a triple fault is only there). Needs ./ebb.
#   cargo run -q -p ebb-harness --bin ebb-rig -- sh --timeout 3000 \
#       --input target/x86_64-unknown-linux-gnu/release/ebb \
#       --input vmm/scripts/rig-tf-loop.sh './rig-tf-loop.sh 20 256'
N=$1; MIB=$2
K=$EBB_L2_KERNEL; I=$EBB_L2_INITRAMFS
T=/sys/kernel/tracing
[ -d $T/events ] || mount -t tracefs nodev $T
echo 8192 > $T/buffer_size_kb
for e in kvm_exit kvm_inj_exception kvm_async_pf_repeated_fault kvm_async_pf_not_present kvm_async_pf_ready kvm_async_pf_completed kvm_msr kvm_apic_accept_irq; do
  echo 1 > $T/events/kvm/$e/enable
done
echo TRACE on: $(cat $T/set_event | tr '\n' ' ')
up() { read u _ < /proc/uptime; echo ${u%.*}; }
i=1
while [ $i -le $N ]; do
  if [ $((i % 2)) -eq 1 ]; then extra=""; else extra="--hlt-in-guest"; fi
  echo > $T/trace
  s=$(up)
  timeout 600 "$EBB_RIG_INPUTS"/ebb $extra --kernel $K --initrd $I --vcpus 2 --memory-mib 512 \
    --cmdline "console=ttyS0 reboot=k panic=-1 quiet -- grep -w _text /proc/kallsyms; ebb-guest integrity --mib $MIB" </dev/null > /tmp/run.log 2>&1
  rc=$?; apf=$(grep -c kvm_async_pf_not_present $T/trace)
  bad=$(grep -o 'bad_pages=[0-9]*' /tmp/run.log | head -1)
  echo "RUN $i mode=${extra:-default} apf_not_present=$apf rc=$rc secs=$(( $(up) - s )) $bad"
  if [ $rc -ne 0 ]; then
    echo "---- tail of run $i"; tail -n 30 /tmp/run.log; echo "----"
    echo "---- trace tail"; grep -v '^#' $T/trace | tail -n 60; echo "----"
  fi
  i=$((i+1))
done
