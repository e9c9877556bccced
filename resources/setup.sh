#!/usr/bin/env bash
# Single entry point: installs the host tools the rig needs (when missing), builds the static guest
# tools, fetches and verifies the pinned Debian packages, and builds the kernel images and both
# initramfs archives. Fast when everything is already built; safe to run before every test run.
#
# Output: $CACHE/images/{bzImage,vmlinux,l2-initramfs.cpio,l1-initramfs.cpio,modules/,rig.env}
# where CACHE is $EBB_CACHE, or target/ebb-cache in the repository (see docs/TESTING.md).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

HOST_PACKAGES=(qemu-system-x86 busybox-static xz-utils zstd cpio)

install_host_packages() {
    local missing=() p
    for p in "${HOST_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep 'install ok installed' >/dev/null; then
            missing+=("$p")
        fi
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    log "installing host packages: ${missing[*]}"
    local sudo=()
    [[ "$(id -u)" == 0 ]] || sudo=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    if ! "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2; then
        log "apt-get install failed; updating the package lists and trying again"
        "${sudo[@]}" apt-get update -qq >&2
        "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    fi
}

build_guest_tools() {
    need_tool cargo
    local target_dir="${CARGO_TARGET_DIR:-$REPO_DIR/target}"
    log "building the static guest tools"
    (cd "$REPO_DIR" && CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release -q -p guest-tools --target x86_64-unknown-linux-gnu)
    GUEST_TOOLS="$target_dir/x86_64-unknown-linux-gnu/release/ebb-guest"
    [[ -x "$GUEST_TOOLS" ]] || die "guest tools binary not found at $GUEST_TOOLS"
}

# With EBB_SETUP_QEMU_BACKPORTS=1: QEMU 10.0 from Debian 12's backports (qemu.lock), unpacked into
# the cache with its firmware, behind a wrapper that points it at that firmware, for comparing the
# rig under it (tests/harness/scripts/rig-configs.sh q10). It runs on the host's libraries, which
# the system's qemu-system-x86 brings. The rig itself runs the system's QEMU: measured, 10.0 met
# as many rig faults and ran about 10% slower (docs/TESTING.md).
install_rig_qemu() {
    EBB_LOCK_FILE="$RES_DIR/qemu.lock" "$RES_DIR/fetch.sh"
    local resolved="$CACHE_DIR/qemu.resolved" root="$CACHE_DIR/qemu"
    RIG_QEMU="$root/qemu-system-x86_64"
    local stamp
    stamp="$(stamp_of "$resolved" "$0")"
    if [[ -x "$RIG_QEMU" && "$(cat "$root/stamp" 2>/dev/null)" == "$stamp" ]]; then
        return 0
    fi
    rm -rf "$root"
    mkdir -p "$root/root"
    local name
    for name in $(lock_entries "$resolved" | awk '{ print $1 }'); do
        dpkg-deb -x "$(use_lock "$RES_DIR/qemu.lock" && deb_path "$name")" "$root/root"
    done
    cat >"$RIG_QEMU" <<WRAP
#!/bin/sh
# Written by resources/setup.sh: the backports QEMU with its own firmware.
exec "$root/root/usr/bin/qemu-system-x86_64" -L "$root/root/usr/share/qemu" \
    -L "$root/root/usr/share/seabios" "\$@"
WRAP
    chmod 755 "$RIG_QEMU"
    "$RIG_QEMU" --version | sed -n 1p >&2 || die "the rig's QEMU does not run on this host"
    echo "$stamp" >"$root/stamp"
}

start=$(date +%s)
install_host_packages
need_tool apt-get dpkg-deb xz zstd cpio readelf qemu-system-x86_64
build_guest_tools
RIG_QEMU=""
[[ "${EBB_SETUP_QEMU_BACKPORTS:-0}" != 1 ]] || install_rig_qemu
"$RES_DIR/fetch.sh"
"$RES_DIR/build-l2.sh" "$GUEST_TOOLS"
"$RES_DIR/build-l1.sh" "$GUEST_TOOLS"

cat >"$OUT_DIR/rig.env.tmp" <<ENV
# Written by resources/setup.sh: where the rig's images are.
EBB_RIG_L1_KERNEL=$OUT_DIR/bzImage
EBB_RIG_L1_INITRAMFS=$OUT_DIR/l1-initramfs.cpio
EBB_L2_KERNEL=$OUT_DIR/bzImage
EBB_L2_VMLINUX=$OUT_DIR/vmlinux
EBB_L2_INITRAMFS=$OUT_DIR/l2-initramfs.cpio
EBB_GUEST_TOOLS=$GUEST_TOOLS
EBB_KERNEL_RELEASE=$(cat "$OUT_DIR/kernel-release")
ENV
[[ -z "$RIG_QEMU" ]] || echo "EBB_RIG_QEMU_BACKPORTS=$RIG_QEMU" >>"$OUT_DIR/rig.env.tmp"
mv "$OUT_DIR/rig.env.tmp" "$OUT_DIR/rig.env"
log "ready in $(($(date +%s) - start)) s: $OUT_DIR/rig.env"
