#!/usr/bin/env bash
# Downloads every package pinned in packages.lock into the cache (once) and checks its sha256 (every time).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need_tool apt-get sha256sum

mkdir -p "$DEB_DIR"
updated=0
missing=()
while read -r name version sha path; do
    file="$DEB_DIR/$(basename "$path")"
    if [[ -f "$file" ]]; then
        if [[ "$(sha256_of "$file")" == "$sha" ]]; then
            continue
        fi
        log "sha256 mismatch for cached $file: deleting and fetching again"
        rm -f "$file"
    fi
    missing+=("$name|$version|$sha|$file")
done < <(lock_entries)

if [[ ${#missing[@]} -gt 0 ]]; then
    apt_private_update
    mapfile -t opts < <(apt_private_opts)
    tmpd="$(mktemp -d "$DEB_DIR/.dl.XXXXXX")"
    trap 'rm -rf "$tmpd"' EXIT
    specs=()
    for entry in "${missing[@]}"; do
        IFS='|' read -r name version _ _ <<<"$entry"
        specs+=("$name=$version")
    done
    log "downloading ${#specs[@]} pinned packages"
    if ! (cd "$tmpd" && apt-get "${opts[@]}" -qq download "${specs[@]}" >&2); then
        die "apt-get download failed: a pinned version may have left the archive; run resources/lock-update.sh and commit the new pins"
    fi
    # apt names files by package and version; match them to the pins by sha256 instead.
    declare -A by_sha=()
    for f in "$tmpd"/*.deb; do
        [[ -f "$f" ]] && by_sha["$(sha256_of "$f")"]="$f"
    done
    for entry in "${missing[@]}"; do
        IFS='|' read -r name version sha file <<<"$entry"
        src="${by_sha[$sha]:-}"
        [[ -n "$src" ]] || die "no downloaded file for $name=$version has the pinned sha256 $sha"
        mv "$src" "$file"
    done
fi
log "all $(lock_entries | wc -l) pinned packages present and verified"
