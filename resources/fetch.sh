#!/usr/bin/env bash
# Brings every package pinned in packages.lock into the download cache (once per machine) and
# checks its sha256 (every time), then writes the pins in force to $RESOLVED_FILE.
#
# A pin whose version has left the archive (a point release, a newer backports kernel) does not
# stop the set-up: the version the suites offer now is taken instead (apt checks it against the
# signed index), with one "pin drifted: NAME OLD -> NEW" line on stderr; a kernel image package is
# replaced by the newest cloud kernel of the same or a later series, and refused if its config
# lacks what ebb and the rig need. resources/lock-update.sh moves the pins on purpose.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need_tool apt-get apt-cache dpkg dpkg-deb sha256sum flock

mkdir -p "$DEB_DIR" "$CACHE_DIR"
# One fetch at a time per download cache (two checkouts may set up at once).
exec 9>"$DL_DIR/.lock"
flock 9

# Whether the download cache holds the package NAME VERSION SHA256 POOL-PATH: the file is there,
# has the sha256, and is that package at that version (a lock edited by hand may name a version
# with another version's hash).
cached() {
    local f
    f="$DEB_DIR/$(basename "$4")"
    [[ -f "$f" && "$(sha256_of "$f")" == "$3" &&
        "$(dpkg-deb --show --showformat='${Package} ${Version}' "$f")" == "$1 $2" ]]
}

resolved=()
missing=0
while read -r name version sha path; do
    if cached "$name" "$version" "$sha" "$path"; then
        resolved+=("$name $version $sha $path")
    else
        resolved+=("? $name $version $sha $path")
        missing=$((missing + 1))
    fi
done < <(lock_entries)

if [[ $missing -gt 0 ]]; then
    apt_private_update
    for i in "${!resolved[@]}"; do
        read -r mark name version sha path <<<"${resolved[$i]}"
        [[ "$mark" == "?" ]] || continue
        resolved[i]=$(resolve_pin "$name" "$version" "$sha" "$path")
        # A kernel that replaces a gone pin may come in parts (Debian's 7.x kernels: image,
        # base, binary, modules); the parts come with it, at its exact version.
        read -r name version _ <<<"${resolved[$i]}"
        [[ -n "$(kernel_series "$name")" ]] || continue
        while read -r part; do
            printf '%s\n' "${resolved[@]}" | awk -v n="${part%% *}" '$1 == n || $2 == n { f = 1 } END { exit !f }' ||
                resolved+=("$part")
        done < <(kernel_parts "$name" "$version")
    done
    tmpd="$(mktemp -d "$DEB_DIR/.dl.XXXXXX")"
    trap 'rm -rf "$tmpd"' EXIT
    specs=()
    for entry in "${resolved[@]}"; do
        read -r name version sha path <<<"$entry"
        cached "$name" "$version" "$sha" "$path" || specs+=("$name=$version")
    done
    if [[ ${#specs[@]} -gt 0 ]]; then
        log "downloading ${#specs[@]} packages"
        (cd "$tmpd" && papt apt-get -qq download "${specs[@]}" >&2) || die "apt-get download failed"
        # apt names files by package and version; match them to the pins by sha256 instead.
        declare -A by_sha=()
        for f in "$tmpd"/*.deb; do
            [[ -f "$f" ]] && by_sha["$(sha256_of "$f")"]="$f"
        done
        for entry in "${resolved[@]}"; do
            read -r name version sha path <<<"$entry"
            cached "$name" "$version" "$sha" "$path" && continue
            src="${by_sha[$sha]:-}"
            [[ -n "$src" ]] || die "no downloaded file for $name=$version has the sha256 $sha"
            mv "$src" "$DEB_DIR/$(basename "$path")"
        done
    fi
    # A kernel that replaces a gone pin is checked before anything is built from it.
    kernel_debs=()
    drifted_kernel=0
    for entry in "${resolved[@]}"; do
        read -r name version sha path <<<"$entry"
        [[ "$name" == linux-* ]] || continue
        kernel_debs+=("$DEB_DIR/$(basename "$path")")
        if [[ -n "$(kernel_series "$name")" ]] &&
            ! lock_entries | awk -v n="$name" -v v="$version" '$1 == n && $2 == v { f = 1 } END { exit !f }'; then
            drifted_kernel=1
            kernel_name=$name
        fi
    done
    if [[ $drifted_kernel == 1 ]]; then
        cfg="$(mktemp -d)"
        for deb in "${kernel_debs[@]}"; do
            dpkg-deb -x "$deb" "$cfg" 2>/dev/null || die "cannot unpack $deb"
        done
        (check_kernel_config "$(kernel_file "$cfg" "${kernel_name#linux-image-}" config)" "$kernel_name") ||
            { rm -rf "$cfg"; exit 1; }
        rm -rf "$cfg"
    fi
fi

{
    echo "# The pins in force, written by resources/fetch.sh from $LOCK_FILE (drifted pins replaced)."
    printf '%s\n' "${resolved[@]}"
} >"$RESOLVED_FILE.tmp"
mv "$RESOLVED_FILE.tmp" "$RESOLVED_FILE"
log "all ${#resolved[@]} pinned packages present and verified"
