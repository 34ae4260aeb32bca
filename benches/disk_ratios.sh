#!/usr/bin/env bash
# Runs the disk spool bench once and prints, from that one run: durable
# enqueue (FsyncMode::Always) of 256-byte records with 1 and 64 producers, a
# raw write+fdatasync loop (synchronous, and on a thread for a tokio caller)
# and the queue-file crate (sync on every add) on the same disk, the load
# average before and after, then the ratios against the targets:
#
#   1 producer   >= 0.95x the raw loop on a thread for a tokio caller (the
#                   floor of any async API), median of the turns; the raw
#                   synchronous loop is printed beside it for reference
#   64 producers >= 100,000 durable records/s and >= 20x queue-file
#
# Exits 1 if a target is missed.
#
# Fair comparison: DiskSpool preallocates its active segment (1 MiB ahead,
# written padding, so a sync commits no metadata); the raw loops do the
# same with written zeros 1 MiB ahead. A raw loop on a growing file (every
# sync also commits the new size) is shown beside it for reference. The
# measurements take turns (BENCH_ROUNDS, default 6).
#
#   benches/disk_ratios.sh                       # 3 s per measurement
#   BENCH_SECS=10 benches/disk_ratios.sh         # longer, steadier
#   BENCH_DIR=/mnt/disk benches/disk_ratios.sh   # measure another disk
#   BENCH_ONLY=raw,1,1grow benches/disk_ratios.sh  # A/B: preallocation off
#
# A/B against another commit (its bench binary built in a worktree of its
# own, with its own target dir), old and new taking turns BENCH_AB_RUNS
# times (default 6), each run BENCH_ONLY=rawthread,1,64 unless set:
#
#   BENCH_AB_OLD=7cabbd8 benches/disk_ratios.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# The absolute path of the disk_spool bench executable built in the
# current dir. Each worktree builds in a target dir of its own: in a shared
# one both commits' bench binaries get the same name.
bench_bin() {
  local bin
  bin=$(cargo bench --features disk --bench disk_spool --no-run 2>&1 >/dev/null |
    sed -n 's/.*Executable .*(\(.*disk_spool-[0-9a-f]*\)).*/\1/p' | tail -1)
  [[ $bin == /* ]] || bin="$PWD/$bin"
  echo "$bin"
}

if [[ -z "${BENCH_AB_OLD:-}" ]]; then
  cargo bench --features disk --bench disk_spool --no-run >&2
  exec cargo bench --features disk --bench disk_spool
fi

old_dir="${BENCH_AB_DIR:-${TMPDIR:-/tmp}/disk-ab-$BENCH_AB_OLD}"
if [[ ! -d "$old_dir" ]]; then
  git worktree add --detach "$old_dir" "$BENCH_AB_OLD" >&2
fi
new_bin=$(bench_bin)
old_bin=$(cd "$old_dir" && bench_bin)
echo "A/B: old $BENCH_AB_OLD ($old_bin) vs new $(git rev-parse --short HEAD) ($new_bin)"
export BENCH_ONLY="${BENCH_ONLY:-rawthread,1,64}"
runs="${BENCH_AB_RUNS:-6}"
# records/s of a row of the bench's table (the third field from the end).
rate() { awk -v row="$1" 'index($0, row) == 1 { print $(NF-2) }'; }
printf '%-4s %-4s %12s %12s %12s %10s  %s\n' run side "floor/s" "1 prod/s" "64 prod/s" "1/floor" "load"
results=$(mktemp)
for i in $(seq 1 "$runs"); do
  for side in old new; do
    bin=$old_bin; [[ $side == new ]] && bin=$new_bin
    # The bench exits 1 when it misses a target: its figures still count.
    out=$("$bin" --bench || true)
    floor=$(rate "raw, preallocated, on a thread" <<<"$out")
    one=$(rate "DiskSpool Always, 1 producer " <<<"$out")
    many=$(rate "DiskSpool Always, 64 producers " <<<"$out")
    ratio=$(awk -v a="$one" -v b="$floor" 'BEGIN { if (b > 0) printf "%.3f", a / b }')
    load=$(cut -d' ' -f1-3 /proc/loadavg)
    printf '%-4s %-4s %12s %12s %12s %10s  %s\n' "$i" "$side" "$floor" "$one" "$many" "$ratio" "$load"
    echo "$side $one $many $ratio" >>"$results"
  done
done
# Medians per side, and new / old.
awk '
  function median(a, n,   i, j, t) {
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
  { n[$1]++; one[$1, n[$1]] = $2; many[$1, n[$1]] = $3; r[$1, n[$1]] = $4 }
  END {
    for (s in n) {
      for (i = 1; i <= n[s]; i++) { o[i] = one[s, i]; m[i] = many[s, i]; q[i] = r[s, i] }
      mo[s] = median(o, n[s]); mm[s] = median(m, n[s]); mr[s] = median(q, n[s])
      printf "median %-4s 1 producer %10.0f/s  64 producers %10.0f/s  1/floor %.3f\n", s, mo[s], mm[s], mr[s]
    }
    if (mo["old"] > 0 && mm["old"] > 0)
      printf "new / old: 1 producer %.3f, 64 producers %.3f (a regression above 5%% is below 0.95)\n", mo["new"] / mo["old"], mm["new"] / mm["old"]
  }' "$results"
rm -f "$results"
