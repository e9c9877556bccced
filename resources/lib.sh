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
OUT_DIR="$CACHE_DIR/images"
LOCK_FILE="${EBB_LOCK_FILE:-$RES_DIR/packages.lock}"
# Downloads are kept per machine, not per clone, so a second checkout reuses them (each file is
# checked against its sha256 on every use): $EBB_DOWNLOADS, else $XDG_CACHE_HOME/ebb-downloads.
DL_DIR="${EBB_DOWNLOADS:-${XDG_CACHE_HOME:-$HOME/.cache}/ebb-downloads}"
DEB_DIR="$DL_DIR/debs"

# Selects the lock file the other helpers work on: LOCK_FILE; APT_DIR, its private apt lists (one
# set per lock file, as each names its own suites); RESOLVED_FILE, the pins in force for this
# checkout: the lock's, with every pin that has left the archive replaced by what the suites
# offer now (written by fetch.sh, read by deb_path and the stamps).
use_lock() {
    LOCK_FILE=$1
    APT_DIR="$DL_DIR/apt/$(basename "$LOCK_FILE" .lock)"
    RESOLVED_FILE="$CACHE_DIR/$(basename "$LOCK_FILE" .lock).resolved"
}
use_lock "$LOCK_FILE"

# Scripts here run with pipefail: a pipeline whose reader stops early (head, grep -q, awk's exit)
# can fail with SIGPIPE, depending on timing. Readers here read their whole input.
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

# Updates the private lists from the suites named in a lock file's header ("# source: deb <uri>
# <suite> <component>"); $1 = the lock file (default $LOCK_FILE). Debian's suites are checked
# against Debian's keyring; a source that brings options of its own ("deb [...]") keeps them.
apt_private_update() {
    local lock="${1:-$LOCK_FILE}"
    mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial"
    : >"$APT_DIR/status"
    grep '^# source: ' "$lock" | sed 's/^# source: //' |
        sed '/^deb \[/!s|^deb |deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] |' \
            >"$APT_DIR/sources.list"
    [[ -s "$APT_DIR/sources.list" ]] || die "no '# source:' lines in $lock"
    log "updating private apt lists ($(wc -l <"$APT_DIR/sources.list") sources)"
    papt apt-get -qq update >&2 || die "apt-get update with the private list failed"
}

# Runs an apt command ($1) with the private configuration and the other arguments.
papt() {
    local cmd=$1 opts
    shift
    mapfile -t opts < <(apt_private_opts)
    "$cmd" "${opts[@]}" "$@"
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# Entries of a lock file ($1, default $LOCK_FILE): "name version sha256 pool-path", comments skipped.
lock_entries() { grep -v -e '^#' -e '^[[:space:]]*$' "${1:-$LOCK_FILE}"; }

# The entry ("name version sha256 pool-path") the private lists hold for NAME=VERSION, if any.
offered_entry() {
    papt apt-cache show "$1=$2" 2>/dev/null | awk -v p="$1" -v v="$2" '
        /^SHA256: / { s = $2 } /^Filename: / { f = $2 }
        /^$/ { if (s != "" && f != "" && !found) { print p, v, s, f; found = 1 } }
        END { if (!found && s != "" && f != "") print p, v, s, f }'
}

# The version apt would install of a package (its candidate), if the suites offer one.
candidate_version() {
    papt apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ && !f { if ($2 != "(none)") print $2; f = 1 }'
}

# "major.minor" of a Debian cloud kernel image package name (linux-image-6.18.15+deb13-cloud-amd64,
# linux-image-6.1.0-28-cloud-amd64); nothing for any other package.
kernel_series() {
    sed -nE 's/^linux-image-([0-9]+)\.([0-9]+)\.[0-9]+(-[0-9]+)?(\+deb[0-9]+)?-cloud-amd64$/\1.\2/p' <<<"$1"
}

# "name version" of the newest cloud kernel image the suites offer of series $1 or later.
newest_cloud_kernel() {
    local min=$1 best="" best_ver="" n s v
    for n in $(papt apt-cache pkgnames linux-image- 2>/dev/null | LC_ALL=C sort); do
        s=$(kernel_series "$n")
        [[ -n "$s" ]] && dpkg --compare-versions "$s" ge "$min" || continue
        v=$(candidate_version "$n")
        [[ -n "$v" ]] || continue
        if [[ -z "$best" ]] || dpkg --compare-versions "$v" gt "$best_ver"; then
            best=$n best_ver=$v
        fi
    done
    [[ -n "$best" ]] && echo "$best $best_ver"
}

# Resolves one pin (name version sha256 pool-path) against the private lists and prints the entry
# to use: the pin while the suites still offer it, else what they offer now, announced on stderr
# as "pin drifted: NAME OLD -> NEW". A kernel image package whose pin is gone is replaced by the
# newest cloud kernel of the same or a later series. A pinned version offered with another sha256
# is refused: the archive never changes a published file.
resolve_pin() {
    local name=$1 ver=$2 sha=$3 path=$4 got series new_name=$1 new_ver=""
    got=$(offered_entry "$name" "$ver")
    if [[ -n "$got" ]]; then
        [[ "$(cut -d' ' -f3 <<<"$got")" == "$sha" ]] ||
            die "$name $ver is offered with another sha256 than its pin $sha: refusing it"
        echo "$name $ver $sha $path"
        return 0
    fi
    series=$(kernel_series "$name")
    if [[ -n "$series" ]]; then
        read -r new_name new_ver < <(newest_cloud_kernel "$series") ||
            die "kernel $name $ver has left the archive and no cloud kernel of series $series or later is offered"
    else
        new_ver=$(candidate_version "$name")
        [[ -n "$new_ver" ]] || die "$name $ver has left the archive and the suites offer no $name"
    fi
    got=$(offered_entry "$new_name" "$new_ver")
    [[ -n "$got" ]] || die "$new_name $new_ver has no SHA256 and Filename in the lists"
    if [[ "$new_name" == "$name" ]]; then
        printf 'pin drifted: %s %s -> %s\n' "$name" "$ver" "$new_ver" >&2
    else
        printf 'pin drifted: %s %s -> %s %s\n' "$name" "$ver" "$new_name" "$new_ver" >&2
    fi
    echo "$got"
}

# The entries of the packages a kernel image package NAME VERSION is made of besides itself: its
# dependencies at exactly VERSION whose names carry its release (linux-base-R, linux-binary-R,
# linux-modules-R in Debian's 7.x kernels; none in 6.x, whose image package holds everything).
kernel_parts() {
    local name=$1 version=$2 release=${1#linux-image-} dep
    for dep in $(papt apt-cache show "$name=$version" 2>/dev/null | sed -n 's/^Depends: //p' | sed -n 1p |
        tr ',' '\n' | sed -nE "s/^ *(linux-[a-z-]+-$(sed 's/[.+]/\\&/g' <<<"$release")) \(= ([^)]*)\).*/\1=\2/p"); do
        [[ "${dep#*=}" == "$version" ]] || continue
        offered_entry "${dep%%=*}" "$version"
    done
}

# Where an unpacked kernel (root $1, release $2) keeps its file $3 (config, vmlinuz, System.map):
# /boot/$3-$2 (Debian's 6.x kernels) or /usr/lib/modules/$2/$3 (7.x). Prints the first that
# exists, else the /boot path.
kernel_file() {
    local f
    for f in "$1/boot/$3-$2" "$1/usr/lib/modules/$2/$3"; do
        [[ -e "$f" ]] && { echo "$f"; return 0; }
    done
    echo "$1/boot/$3-$2"
}

# Kernel options ebb and the rig need: built in, or built in or a module for what the rig loads.
KERNEL_NEEDS_BUILTIN=(PT_RECLAIM USERFAULTFD PAGE_REPORTING PVH)
KERNEL_NEEDS_BUILTIN_OR_MODULE=(KVM KVM_AMD VIRTIO_MMIO VIRTIO_BALLOON)

# Refuses, with one line naming what is missing, a kernel (package $2) whose config file $1 lacks
# an option ebb or the rig needs.
check_kernel_config() {
    local cfg=$1 name=$2 o missing=()
    [[ -f "$cfg" ]] || die "kernel $name has no config file ($cfg)"
    for o in "${KERNEL_NEEDS_BUILTIN[@]}"; do
        grep -qx "CONFIG_$o=y" "$cfg" || missing+=("CONFIG_$o=y")
    done
    for o in "${KERNEL_NEEDS_BUILTIN_OR_MODULE[@]}"; do
        grep -qxE "CONFIG_$o=[ym]" "$cfg" || missing+=("CONFIG_$o=y|m")
    done
    [[ ${#missing[@]} -eq 0 ]] || die "kernel $name lacks ${missing[*]}, which ebb and the rig need: refusing it"
}

# Path of the cached .deb for a package name, its sha256 checked against the resolved pin on every
# use (fetch.sh writes the resolved pins).
deb_path() {
    local name="$1" line
    [[ -f "$RESOLVED_FILE" ]] || die "$RESOLVED_FILE missing: run resources/fetch.sh"
    line="$(lock_entries "$RESOLVED_FILE" | awk -v n="$name" '$1 == n && !f { print; f = 1 }')"
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
