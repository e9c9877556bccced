#!/bin/sh
# Summarises rig-configs.sh output: per config and workload, the runs, each outcome class, and
# the median run time (ebb-rig's elapsed_s, L1 boot included; wall seconds where the run printed
# none).   tests/harness/scripts/rig-configs-summary.sh OUTDIR...
for d in "$@"; do
    grep '^RUN ' "$d/results" | while read -r line; do
        n=$(echo "$line" | sed -n 's/.* n=\([0-9]*\) .*/\1/p')
        e=$(sed -n 's/.*elapsed_s=\([0-9.]*\).*/\1/p' "$d/run-$n.out" 2>/dev/null)
        [ -n "$e" ] || e=$(echo "$line" | sed -n 's/.* secs=\([0-9]*\).*/\1/p')
        echo "$line t=$e"
    done
done | awk '
{
    for (i = 1; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
    k = f["config"] "/" f["work"]; runs[k]++; cls[k, f["class"]]++; classes[f["class"]] = 1
    t[k, runs[k]] = f["t"] + 0
}
END {
    for (k in runs) {
        m = runs[k]; for (i = 1; i <= m; i++) a[i] = t[k, i]
        for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (a[j] < a[i]) { x = a[i]; a[i] = a[j]; a[j] = x }
        med = (m % 2) ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2
        printf "%-16s runs=%-3d", k, m; for (c in classes) printf " %s=%d", c, cls[k, c]; printf " median_s=%.1f\n", med
    }
}' | sort
