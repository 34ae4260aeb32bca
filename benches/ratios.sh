#!/usr/bin/env bash
# Runs the in-process benches once and prints each backend's time per
# operation against the anchor named in the issues, with the target ratio.
#
#   benches/ratios.sh            # full criterion run (about 2 minutes)
#   QUICK=1 benches/ratios.sh    # shorter measurement, noisier
set -euo pipefail
cd "$(dirname "$0")/.."

args=(--noplot)
if [[ "${QUICK:-0}" == 1 ]]; then
  args+=(--warm-up-time 1 --measurement-time 3)
fi
cargo bench --bench idempotency --bench rate_limit -- "${args[@]}" >&2

python3 - <<'PY'
import json, os, sys

root = "target/criterion"

def ns(group, fn):
    path = os.path.join(root, group, fn, "new", "estimates.json")
    with open(path) as f:
        e = json.load(f)
    return e["median"]["point_estimate"]

rows = [
    # (what, group, ours, anchor, target: ours/anchor time must be <= this)
    ("memory claim vs raw moka entry().or_insert_with (new keys)", "claim_new_key", "memory", "moka_raw", 1.3),
    ("local check (check_sync) vs raw governor keyed check", "rate_limit_check", "local_check_sync", "governor_keyed", 1.5),
    ("local check through the RateLimiter trait (CheckFuture) vs governor", "rate_limit_check", "local", "governor_keyed", 1.5),
]
failed = False
print(f"{'comparison':62} {'ours ns':>9} {'anchor ns':>9} {'ratio':>6} {'target':>7}")
for what, group, ours, anchor, target in rows:
    o, a = ns(group, ours), ns(group, anchor)
    r = o / a
    ok = r <= target
    failed |= not ok
    print(f"{what:62} {o:9.1f} {a:9.1f} {r:6.2f} {'<= ' + str(target):>7} {'ok' if ok else 'MISSED'}")
sys.exit(1 if failed else 0)
PY
