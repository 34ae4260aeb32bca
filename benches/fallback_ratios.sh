#!/usr/bin/env bash
# Issue 5's Fallback ratios from one run on one redis-server the bench
# starts (and kills, for the Open case): needs redis-server (scripts/test.sh
# installs Debian's redis-server, redis-sentinel and redis-tools).
#
#   Open:   p99 per-call latency of Fallback(redis isolated / killed, local)
#           vs the local backend alone; target <= 1.5x.
#   Closed: throughput at 64 tasks of Fallback(redis up, local) vs the Redis
#           backend alone; target >= 0.95x.
#
#   benches/fallback_ratios.sh                       # 5 s per Closed round
#   SECONDS_PER_STEP=10 CLOSED_ROUNDS=8 benches/fallback_ratios.sh
#   OPEN_CALLS=1000000 OPEN_ROUNDS=20 benches/fallback_ratios.sh
#
# Prints each ratio with its target and met/MISSED; exits 1 if one is
# missed. The figures are only as good as the machine's load: the bench
# prints /proc/loadavg with every section.
set -euo pipefail
cd "$(dirname "$0")/.."

out=$(mktemp)
trap 'rm -f "$out"' EXIT
echo "before build: $(uptime)"
cargo bench --features redis --bench fallback --no-run >&2
echo "start: $(uptime)"
cargo bench --features redis --bench fallback | tee "$out"
echo "end: $(uptime)"
if grep -q 'MISSED' "$out"; then
  exit 1
fi
