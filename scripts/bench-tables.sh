#!/usr/bin/env bash
# ebb and the QEMU peer side by side: the same guest scenario (1 GiB, 1 vCPU; touch 600 MiB, free
# it, hold a 32 MiB working set, inflate the balloon to 768 MiB, re-read the working set,
# deflate, touch 512 MiB fresh) for both VMMs in the same boot of the nested test host, each at its
# defaults, with free page reporting on and/or off, over several rounds (the order alternates).
# Prints markdown tables of medians (host memory, VmRSS, guest RAM held and its non-zero pages,
# VmPTE, SecPageTables per phase; ebb's table bytes;
# balloon times; re-fault costs) and writes it with the raw numbers (CSV), every round's log and
# a picture of the page-table bytes over time (SVG) under target/bench/<time>/. Does its own
# set-up on a fresh machine. The steps in L1 are in scripts/bench-l1.sh, the rounds, table and
# picture in tests/harness/src/bin/ebb-bench/.
#
#   scripts/bench-tables.sh [--rounds N] [--reporting on|off|both] [--ebb-flags "FLAGS"] [--docs]
#   scripts/bench-tables.sh --variants [all|LABEL,...] [--rounds N] [--memory-mib M ...] [--docs]
#   scripts/bench-tables.sh --from target/bench/<time> [--docs]    (table and picture again)
#
# --variants runs ebb alone, once per memory configuration (reclaim strategy x release mode x
# fill), all in each L1 boot with the order rotated over rounds, in a smaller guest; one row per
# variant with ratios against ebb's default; --docs writes its tables into
# docs/BENCH-strategies.md (docs/TESTING.md, "ebb's memory configurations side by side").
#
# --docs also writes docs/BENCH-tables.md and docs/bench-tables.svg. Defaults: 3 rounds, both
# settings. A round that meets a known rig fault is run again (said on stderr, counted in the
# table); one that fails otherwise is left out of the medians, named in the table, and makes the
# exit status 1.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

from=0
for a in "$@"; do
    [ "$a" = --from ] && from=1
done
if [ $from -eq 0 ]; then
    "$repo/resources/setup.sh"
    echo "== building the static ebb and ebb-ctl binaries" >&2
    CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release -q --locked -p vmm --target x86_64-unknown-linux-gnu
    export EBB_BIN="$repo/target/x86_64-unknown-linux-gnu/release/ebb"
fi
cargo build --release -q --locked -p ebb-harness --bin ebb-bench
exec "$repo/target/release/ebb-bench" "$@"
