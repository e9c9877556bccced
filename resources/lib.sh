# Shared helpers for the resources/ scripts. Sourced, never run directly.
# shellcheck shell=bash

RES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$RES_DIR/.." && pwd)"

# Cache root: $EBB_CACHE, else $XDG_CACHE_HOME/ebb when EBB_USE_XDG_CACHE=1, else target/ebb-cache.
if [[ -n "${EBB_CACHE:-}" ]]; then
    CACHE_DIR="$EBB_CACHE"
elif [[ "${EBB_USE_XDG_CACHE:-0}" == 1 ]]; then
    CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/ebb"
else
    CACHE_DIR="$REPO_DIR/target/ebb-cache"
fi
DEB_DIR="$CACHE_DIR/debs"
APT_DIR="$CACHE_DIR/apt"
OUT_DIR="$CACHE_DIR/images"
LOCK_FILE="$RES_DIR/packages.lock"

log() { printf '[ebb-resources] %s\n' "$*" >&2; }
die() { printf '[ebb-resources] ERROR: %s\n' "$*" >&2; exit 1; }

need_tool() {
    local t
    for t in "$@"; do
        command -v "$t" >/dev/null 2>&1 || die "required tool '$t' is not installed (run resources/setup.sh)"
    done
}

# The private apt configuration: the system's sources, lists and status are never read or changed.
apt_private_opts() {
    printf '%s\n' \
        -o "Dir::Etc::SourceList=$APT_DIR/sources.list" \
        -o "Dir::Etc::SourceParts=/dev/null" \
        -o "Dir::State::Lists=$APT_DIR/lists" \
        -o "Dir::State::status=$APT_DIR/status" \
        -o "Dir::Cache=$APT_DIR/cache" \
        -o "APT::Architecture=amd64" \
        -o "APT::Architectures=amd64" \
        -o "APT::Install-Recommends=0" \
        -o "Debug::NoLocking=1" \
        -o "APT::Sandbox::User=root" \
        -o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false" \
        -o "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false" \
        -o "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false"
}

# Suites named in the lock file header ("# source: deb <uri> <suite> <component>").
apt_private_update() {
    mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial"
    : >"$APT_DIR/status"
    grep '^# source: ' "$LOCK_FILE" | sed 's/^# source: //' |
        sed 's|^deb |deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] |' \
            >"$APT_DIR/sources.list"
    [[ -s "$APT_DIR/sources.list" ]] || die "no '# source:' lines in $LOCK_FILE"
    local opts
    mapfile -t opts < <(apt_private_opts)
    log "updating private apt lists ($(wc -l <"$APT_DIR/sources.list") sources)"
    apt-get "${opts[@]}" -qq update >&2 || die "apt-get update with the private list failed"
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# Lock entries: "name version sha256 pool-path", comments skipped.
lock_entries() { grep -v -e '^#' -e '^[[:space:]]*$' "$LOCK_FILE"; }

# Path of the cached .deb for a package name, its sha256 checked against the pin on every use.
deb_path() {
    local name="$1" line
    line="$(lock_entries | awk -v n="$name" '$1 == n { print; exit }')"
    [[ -n "$line" ]] || die "package '$name' is not pinned in $LOCK_FILE"
    local file sha
    file="$DEB_DIR/$(basename "$(awk '{print $4}' <<<"$line")")"
    sha="$(awk '{print $3}' <<<"$line")"
    [[ -f "$file" ]] || die "$file missing: run resources/fetch.sh"
    [[ "$(sha256_of "$file")" == "$sha" ]] || die "$file does not match its pinned sha256 $sha"
    printf '%s\n' "$file"
}

# Hash of a set of files and strings, used for "already built" stamps.
stamp_of() {
    local f
    for f in "$@"; do
        if [[ -f "$f" ]]; then sha256_of "$f"; else printf '%s\n' "$f"; fi
    done | sha256sum | cut -d' ' -f1
}

# One newc cpio entry on stdout: name, mode (octal, with type bits), rdev major/minor. No data.
# Used for /dev/console, which the kernel needs before init runs and which cpio cannot make
# without mknod.
cpio_newc_entry() {
    local name="$1" mode="$2" maj="${3:-0}" min="${4:-0}" ino="${5:-1}"
    local namesize=$((${#name} + 1))
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        "$ino" "$((8#$mode))" 0 0 1 0 0 0 0 "$maj" "$min" "$namesize" 0
    printf '%s\0' "$name"
    # Header (110 bytes) plus name, padded to a multiple of 4.
    local pad=$(((4 - (110 + namesize) % 4) % 4))
    head -c "$pad" /dev/zero
}

# A small archive with the directories and nodes every init needs.
cpio_dev_archive() {
    cpio_newc_entry dev 040755 0 0 1
    cpio_newc_entry dev/console 020600 5 1 2
    cpio_newc_entry dev/null 020666 1 3 3
    cpio_newc_entry TRAILER!!! 0 0 0 0
}

# Archive a directory tree (newc, owned by root, stable order) to stdout.
cpio_dir() {
    (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible)
}

# Copy an ELF and the DT_NEEDED closure it has inside a staged root into a target root.
# $1 = staged root (libraries looked up in its lib dirs), $2 = ELF path, $3 = target root.
copy_with_libs() {
    local root="$1" elf="$2" dest="$3"
    local -a queue=("$elf")
    local -A seen=()
    local libdirs=("$root/usr/lib/x86_64-linux-gnu" "$root/lib/x86_64-linux-gnu" "$root/usr/lib64" "$root/lib64")
    mkdir -p "$dest/lib/x86_64-linux-gnu" "$dest/lib64"
    while [[ ${#queue[@]} -gt 0 ]]; do
        local f="${queue[0]}"
        queue=("${queue[@]:1}")
        local n
        for n in $(readelf -d "$f" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p'); do
            [[ -n "${seen[$n]:-}" ]] && continue
            seen[$n]=1
            local found="" d
            for d in "${libdirs[@]}"; do
                if [[ -e "$d/$n" ]]; then found="$d/$n"; break; fi
            done
            [[ -n "$found" ]] || die "library $n needed by $(basename "$f") is not in the staged packages"
            cp -L "$found" "$dest/lib/x86_64-linux-gnu/$n"
            queue+=("$found")
        done
    done
    local interp
    interp="$(readelf -l "$elf" | sed -n 's/.*Requesting program interpreter: \(.*\)\]/\1/p')"
    if [[ -n "$interp" ]]; then
        local src=""
        local d
        for d in "${libdirs[@]}"; do
            if [[ -e "$d/$(basename "$interp")" ]]; then src="$d/$(basename "$interp")"; break; fi
        done
        [[ -n "$src" ]] || die "dynamic loader $interp for $(basename "$elf") is not in the staged packages"
        mkdir -p "$dest/$(dirname "$interp")"
        cp -L "$src" "$dest/$interp"
    fi
}

# Populate $1/bin with busybox and one symlink per applet.
install_busybox() {
    local dest="$1" bb="$2"
    mkdir -p "$dest/bin" "$dest/sbin" "$dest/usr/bin" "$dest/usr/sbin"
    cp "$bb" "$dest/bin/busybox"
    chmod 755 "$dest/bin/busybox"
    local a
    for a in $("$bb" --list-full); do
        [[ -e "$dest/$a" ]] || ln -s /bin/busybox "$dest/$a"
    done
}
