#!/usr/bin/env bash
# Builds the rig's L1 initramfs (images/l1-initramfs.cpio): busybox, the kvm modules, the L2 kernel
# and initramfs under /l2, the guest tools, the rig helper scripts, and QEMU with its libraries and
# microvm firmware for the peer. Run after build-l2.sh. Usage: build-l1.sh GUEST_TOOLS_BINARY
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need_tool dpkg-deb cpio ldd

GUEST_TOOLS="${1:?usage: build-l1.sh GUEST_TOOLS_BINARY}"
QEMU_BIN="$(command -v qemu-system-x86_64)" || die "qemu-system-x86_64 is not installed (run resources/setup.sh)"
for f in bzImage vmlinux l2-initramfs.cpio l2.stamp; do
    [[ -f "$OUT_DIR/$f" ]] || die "$OUT_DIR/$f missing: run build-l2.sh first"
done

STAMP="$OUT_DIR/l1.stamp"
stamp="$(stamp_of "$RESOLVED_FILE" "$RES_DIR/lib.sh" "$0" "$RES_DIR/init-l1.sh" "$RES_DIR"/rig-bin/* \
    "$OUT_DIR/l2.stamp" "$QEMU_BIN" "$GUEST_TOOLS")"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$stamp" && -f "$OUT_DIR/l1-initramfs.cpio" ]]; then
    log "L1 initramfs up to date"
    exit 0
fi

ROOT="$CACHE_DIR/stage/l1root"
rm -rf "$ROOT" "$CACHE_DIR/stage/bb"
mkdir -p "$ROOT"/{proc,sys,tmp,run,root,etc,lib/modules,l2,rig/bin,usr/share/qemu}
bbdeb="$(deb_path busybox-static)"
dpkg-deb -x "$bbdeb" "$CACHE_DIR/stage/bb"
install_busybox "$ROOT" "$CACHE_DIR/stage/bb/usr/bin/busybox"
rm -rf "$CACHE_DIR/stage/bb"

for m in irqbypass kvm kvm-amd; do
    [[ ! -f "$OUT_DIR/modules/$m.ko" ]] || cp "$OUT_DIR/modules/$m.ko" "$ROOT/lib/modules/"
done
cp "$OUT_DIR/bzImage" "$ROOT/l2/bzImage"
cp "$OUT_DIR/vmlinux" "$ROOT/l2/vmlinux"
cp "$OUT_DIR/l2-initramfs.cpio" "$ROOT/l2/initramfs.cpio"
strip -o "$ROOT/bin/ebb-guest" "$GUEST_TOOLS" 2>/dev/null || cp "$GUEST_TOOLS" "$ROOT/bin/ebb-guest"
cp "$RES_DIR"/rig-bin/* "$ROOT/rig/bin/"
cp "$RES_DIR/init-l1.sh" "$ROOT/init"
chmod 755 "$ROOT/init" "$ROOT"/rig/bin/* "$ROOT/bin/ebb-guest"

# QEMU for the peer, with the host's libraries (ldd) and the firmware microvm loads.
mkdir -p "$ROOT/usr/bin"
cp "$QEMU_BIN" "$ROOT/usr/bin/qemu-system-x86_64"
while read -r lib; do
    [[ -n "$lib" ]] || continue
    mkdir -p "$ROOT$(dirname "$lib")"
    cp -L "$lib" "$ROOT$lib"
done < <(ldd "$QEMU_BIN" | awk '/=> \// { print $3 } /^\t\/.*ld-linux/ { print $1 }')
for fw in qboot.rom bios-microvm.bin linuxboot_dma.bin pvh.bin kvmvapic.bin; do
    [[ -e "/usr/share/qemu/$fw" ]] || die "QEMU firmware /usr/share/qemu/$fw missing"
    cp -L "/usr/share/qemu/$fw" "$ROOT/usr/share/qemu/$fw"
done

{
    cpio_dev_archive
    cpio_dir "$ROOT"
} >"$OUT_DIR/l1-initramfs.cpio.tmp"
mv "$OUT_DIR/l1-initramfs.cpio.tmp" "$OUT_DIR/l1-initramfs.cpio"
rm -rf "$ROOT"
echo "$stamp" >"$STAMP"
log "L1 initramfs built: $(du -h "$OUT_DIR/l1-initramfs.cpio" | cut -f1)"
