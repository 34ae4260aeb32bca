#!/usr/bin/env bash
# Issue 3's Redis throughput ratios from one run on one redis-server the
# bench starts itself (needs redis-server and redis-benchmark: scripts/test.sh
# installs Debian's redis-server, redis-sentinel and redis-tools).
#
#   benches/redis_ratios.sh                   # 5 s per step
#   SECONDS_PER_STEP=10 benches/redis_ratios.sh
#
# Fairness: both sides are ONE client thread on the same machine as the one
# redis-server. redis-benchmark is single-threaded (one event loop, -c 64
# connections, one request in flight on each, no -P); the bench runs its 64
# tasks on one current-thread tokio runtime (the RedisClient pipelines them
# on its one shared connection, as any async client does). Neither side may
# add threads: on 2 cores a second client thread takes the server's core.
# The last row repeats the claims on a multi-thread runtime with one worker
# (two threads: the worker and the one blocking on it), for information.
#
# Load matters on a shared machine: the script prints `uptime` before and
# after; the measurements take turns (see the bench's docs) so a busy
# minute weighs on both sides alike. Exits 1 if a target is missed.
set -euo pipefail
cd "$(dirname "$0")/.."
uptime
status=0
cargo bench --features redis --bench redis_throughput || status=$?
uptime
exit "$status"
