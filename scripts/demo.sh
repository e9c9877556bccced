#!/usr/bin/env bash
# ebb's main job: boot the pinned stock Debian cloud kernel under `ebb` (2 vCPUs, 512 MiB) with the
# balloon; the guest writes 128 MiB of checksummed pages and holds them while the balloon is
# inflated to 256 MiB over ebb's API socket and deflated again; then the guest checks every page,
# touches 64 MiB and powers off. ebb's memory figures are printed at each step, its full report
# at exit. Does its own set-up on a fresh machine. Where /dev/kvm cannot boot Linux (PVM), ebb
# runs inside the nested test host (docs/TESTING.md); on a host with real VMX/SVM it runs
# directly. The steps are in scripts/demo-l1.sh.
#
#   scripts/demo.sh
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

"$repo/resources/setup.sh"
echo "== building the static ebb and ebb-ctl binaries" >&2
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release -q --locked -p vmm --target x86_64-unknown-linux-gnu
cargo build --release -q --locked -p ebb-harness --bin ebb-rig
bin="$repo/target/x86_64-unknown-linux-gnu/release"

echo "== booting Debian under ebb with the balloon (2 vCPUs, 512 MiB)" >&2
exec "$repo/target/release/ebb-rig" sh --timeout 900 --input "$bin/ebb" --input "$bin/ebb-ctl" \
    --input "$repo/scripts/ebb-l1-lib.sh" --input "$repo/scripts/demo-l1.sh" "sh ./demo-l1.sh"
