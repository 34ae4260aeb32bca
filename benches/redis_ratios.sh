#!/usr/bin/env bash
# Issue 3's Redis throughput ratios from one run on one redis-server the
# bench starts itself (needs redis-server and redis-benchmark: scripts/test.sh
# installs Debian's redis-server, redis-sentinel and redis-tools).
#
#   benches/redis_ratios.sh                   # 5 s per step
#   SECONDS_PER_STEP=10 benches/redis_ratios.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --features redis --bench redis_throughput
