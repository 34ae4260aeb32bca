#!/usr/bin/env bash
# Runs the disk spool bench once and prints, from that one run: durable
# enqueue of 256-byte records with 1 and 64 producers, a raw write+fdatasync
# loop and the queue-file crate (sync on every add) on the same disk, then
# the ratios against the targets of issue 4. Exits 1 if a target is missed.
#
#   benches/disk_ratios.sh                       # 3 s per measurement
#   BENCH_SECS=10 benches/disk_ratios.sh         # longer, steadier
#   BENCH_DIR=/mnt/disk benches/disk_ratios.sh   # measure another disk
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --features disk --bench disk_spool --no-run >&2
exec cargo bench --features disk --bench disk_spool
