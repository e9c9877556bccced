#!/usr/bin/env bash
# ebb's main job: boot the pinned stock Debian cloud kernel under `ebb` with 2 vCPUs, run guest workloads
# (integrity over 256 MiB, then touch), let the guest power off, and print ebb's memory report.
# Does its own set-up on a fresh machine. Where /dev/kvm cannot boot Linux (PVM), ebb runs inside the nested
# test host (docs/TESTING.md); on a host with real VMX/SVM it runs directly.
#
#   scripts/demo.sh [GUEST_COMMAND]     default: "ebb-guest integrity --mib 256 && ebb-guest touch --mib 256"
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
guest_cmd=${1:-"ebb-guest integrity --mib 256 && ebb-guest touch --mib 256"}

"$repo/resources/setup.sh"
echo "== building the static ebb binary" >&2
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release -q --locked -p vmm --target x86_64-unknown-linux-gnu
cargo build --release -q --locked -p ebb-harness --bin ebb-rig
ebb="$repo/target/x86_64-unknown-linux-gnu/release/ebb"
# Inside the nested rig, HLT exits are turned off: its emulated SVM can corrupt a vCPU re-entered
# after L1's KVM parked it on a page still being filled (docs/ARCHITECTURE.md, "Known flakiness").
hlt=--hlt-in-guest

echo "== booting Debian under ebb (2 vCPUs, 512 MiB); guest runs: $guest_cmd" >&2
exec "$repo/target/release/ebb-rig" sh --timeout 900 --input "$ebb" \
    "./ebb --kernel \$EBB_L2_KERNEL --initrd \$EBB_L2_INITRAMFS --vcpus 2 --memory-mib 512 $hlt \
     --cmdline 'console=ttyS0 reboot=k panic=-1 quiet -- $guest_cmd'"
