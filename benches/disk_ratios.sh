#!/usr/bin/env bash
# Runs the disk spool bench once and prints, from that one run: durable
# enqueue (FsyncMode::Always) of 256-byte records with 1 and 64 producers, a
# raw write+fdatasync loop and the queue-file crate (sync on every add) on
# the same disk, the load average before and after, then the ratios against
# the targets of issue 4. Exits 1 if a target is missed.
#
# Fair comparison: DiskSpool preallocates its active segment (1 MiB ahead,
# written padding, so a sync commits no metadata); the raw loop of the
# 1-producer target does the same with written zeros 1 MiB ahead. A raw loop
# on a growing file (every sync also commits the new size) is shown beside
# it for reference. The measurements take turns (BENCH_ROUNDS, default 6).
#
#   benches/disk_ratios.sh                       # 3 s per measurement
#   BENCH_SECS=10 benches/disk_ratios.sh         # longer, steadier
#   BENCH_DIR=/mnt/disk benches/disk_ratios.sh   # measure another disk
#   BENCH_ONLY=raw,1,1grow benches/disk_ratios.sh  # A/B: preallocation off
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --features disk --bench disk_spool --no-run >&2
exec cargo bench --features disk --bench disk_spool
