#!/usr/bin/env bash
# Builds the guest kernel files and the L2 guest initramfs from the pinned packages:
#   images/bzImage, images/vmlinux, images/modules/*.ko (decompressed), images/l2-initramfs.cpio
# Usage: build-l2.sh GUEST_TOOLS_BINARY
# Skips all work when the inputs (pins, scripts, guest tools binary and script) are unchanged.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need_tool dpkg-deb xz zstd cpio readelf sha256sum

GUEST_TOOLS="${1:?usage: build-l2.sh GUEST_TOOLS_BINARY}"
[[ -x "$GUEST_TOOLS" ]] || die "guest tools binary $GUEST_TOOLS is missing (build it with resources/setup.sh)"
if readelf -l "$GUEST_TOOLS" | grep 'program interpreter' >/dev/null; then
    die "$GUEST_TOOLS is dynamically linked; the guest needs a static binary"
fi

STAMP="$OUT_DIR/l2.stamp"
STRESS_GUEST="$REPO_DIR/tests/guest-tools/stress-guest.sh"
stamp="$(stamp_of "$RESOLVED_FILE" "$RES_DIR/lib.sh" "$0" "$RES_DIR/init-l2.sh" "$GUEST_TOOLS" \
    "$STRESS_GUEST")"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$stamp" && -f "$OUT_DIR/l2-initramfs.cpio" &&
    -f "$OUT_DIR/bzImage" && -f "$OUT_DIR/vmlinux" ]]; then
    log "L2 images up to date"
    exit 0
fi

STAGE="$CACHE_DIR/stage"
rm -rf "$STAGE"
mkdir -p "$STAGE/kernel" "$STAGE/userland" "$OUT_DIR"

# --- kernel: bzImage, vmlinux, modules ---------------------------------------------------------
KPKG="$(lock_entries "$RESOLVED_FILE" | awk '$1 ~ /^linux-image-/ && !f { print $1; f = 1 }')"
[[ -n "$KPKG" ]] || die "no linux-image package pinned"
KVER="${KPKG#linux-image-}"
# The image package and, for kernels that come in parts, its parts (their names carry the release).
for p in $(lock_entries "$RESOLVED_FILE" | awk -v r="$KVER" '$1 ~ /^linux-/ && index($1, r) { print $1 }'); do
    dpkg-deb -x "$(deb_path "$p")" "$STAGE/kernel"
done
KCONFIG="$(kernel_file "$STAGE/kernel" "$KVER" config)"
check_kernel_config "$KCONFIG" "$KPKG"
vmlinuz="$(kernel_file "$STAGE/kernel" "$KVER" vmlinuz)"
[[ -f "$vmlinuz" ]] || die "no vmlinuz for $KVER in $KPKG or its parts"
cp "$vmlinuz" "$OUT_DIR/bzImage.tmp"

# The compressed payload's place comes from the boot protocol header: setup_sects at 0x1f1,
# payload_offset/payload_length at 0x248/0x24c (relative to the protected-mode code).
u8() { od -An -tu1 -j "$2" -N1 "$1" | tr -d ' '; }
u32() { od -An -tu4 -j "$2" -N4 "$1" | tr -d ' '; }
setup_sects="$(u8 "$vmlinuz" $((0x1f1)))"
[[ "$setup_sects" != 0 ]] || setup_sects=4
pm_start=$(((setup_sects + 1) * 512))
payload_off=$((pm_start + $(u32 "$vmlinuz" $((0x248)))))
payload_len="$(u32 "$vmlinuz" $((0x24c)))"
magic="$(od -An -tx1 -j "$payload_off" -N4 "$vmlinuz" | tr -d ' ')"
[[ "$magic" == 28b52ffd ]] || die "bzImage payload at $payload_off is not zstd (magic $magic)"
# The payload is a zstd frame followed by the uncompressed size as a 32-bit little-endian word.
dd if="$vmlinuz" iflag=skip_bytes,count_bytes skip="$payload_off" count="$((payload_len - 4))" \
    bs=1M status=none | zstd -dcq >"$OUT_DIR/vmlinux.tmp"
want_size="$(u32 "$vmlinuz" $((payload_off + payload_len - 4)))"
[[ "$(stat -c %s "$OUT_DIR/vmlinux.tmp")" == "$want_size" ]] ||
    die "decompressed vmlinux is $(stat -c %s "$OUT_DIR/vmlinux.tmp") bytes, the bzImage says $want_size"
[[ "$(head -c 4 "$OUT_DIR/vmlinux.tmp" | od -An -tx1 | tr -d ' ')" == 7f454c46 ]] ||
    die "decompressed payload is not an ELF file"

MODDIR="$STAGE/kernel/usr/lib/modules/$KVER"
[[ -d "$MODDIR" ]] || MODDIR="$STAGE/kernel/lib/modules/$KVER"
rm -rf "$OUT_DIR/modules"
mkdir -p "$OUT_DIR/modules"
for m in irqbypass kvm kvm-amd kvm-intel virtio_mmio virtio_balloon; do
    src="$(find "$MODDIR" -name "$m.ko.xz" -o -name "$m.ko" | sed -n 1p)"
    if [[ -z "$src" ]]; then
        # Built into the kernel (the inits load only the modules they find).
        grep -qx "CONFIG_$(tr 'a-z-' 'A-Z_' <<<"$m")=y" "$KCONFIG" && continue
        die "module $m not found in $KPKG"
    fi
    case "$src" in
        *.xz) xz -dc "$src" >"$OUT_DIR/modules/$m.ko" ;;
        *) cp "$src" "$OUT_DIR/modules/$m.ko" ;;
    esac
done
echo "$KVER" >"$OUT_DIR/kernel-release"

# --- L2 userland: busybox, stress-ng and its libraries, guest tools, init ------------------------
for p in $(lock_entries "$RESOLVED_FILE" | awk -v r="$KVER" '!($1 ~ /^linux-/ && index($1, r)) { print $1 }'); do
    deb="$(deb_path "$p")"
    dpkg-deb -x "$deb" "$STAGE/userland"
done
ROOT="$STAGE/l2root"
mkdir -p "$ROOT"/{proc,sys,tmp,root,etc,lib/modules}
install_busybox "$ROOT" "$STAGE/userland/usr/bin/busybox"
mkdir -p "$ROOT/usr/bin"
cp "$STAGE/userland/usr/bin/stress-ng" "$ROOT/usr/bin/stress-ng"
copy_with_libs "$STAGE/userland" "$STAGE/userland/usr/bin/stress-ng" "$ROOT"
strip -o "$ROOT/bin/ebb-guest" "$GUEST_TOOLS" 2>/dev/null || cp "$GUEST_TOOLS" "$ROOT/bin/ebb-guest"
cp "$STRESS_GUEST" "$ROOT/bin/ebb-stress-guest"
for m in virtio_mmio virtio_balloon; do
    [[ ! -f "$OUT_DIR/modules/$m.ko" ]] || cp "$OUT_DIR/modules/$m.ko" "$ROOT/lib/modules/"
done
cp "$RES_DIR/init-l2.sh" "$ROOT/init"
chmod 755 "$ROOT/init" "$ROOT/bin/ebb-guest" "$ROOT/bin/ebb-stress-guest"

{
    cpio_dev_archive
    cpio_dir "$ROOT"
} >"$OUT_DIR/l2-initramfs.cpio.tmp"

mv "$OUT_DIR/bzImage.tmp" "$OUT_DIR/bzImage"
mv "$OUT_DIR/vmlinux.tmp" "$OUT_DIR/vmlinux"
mv "$OUT_DIR/l2-initramfs.cpio.tmp" "$OUT_DIR/l2-initramfs.cpio"
rm -rf "$STAGE"
echo "$stamp" >"$STAMP"
log "L2 images built: kernel $KVER, initramfs $(du -h "$OUT_DIR/l2-initramfs.cpio" | cut -f1)"
