//! `RedisRateLimiter` (time from a `ManualClock` through the test override)
//! against `LocalRateLimiter` on the same clock: identical decisions —
//! outcome, remaining, retry_after and reset_after — over 12,000 random
//! checks with random keys, quotas (one fixed per key, plus a quota change
//! on a shared key), costs from 0 to burst + 1 and clock steps including
//! zero. Both use integer microseconds, so "identical" means equal.
#![allow(clippy::print_stdout)] // the test reports its figures

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{client, STANDALONE};
use reliability_core::{ManualClock, Outcome, Quota, RateLimiter};
use reliability_memory::LocalRateLimiter;
use reliability_redis::RedisRateLimiter;

/// (emission interval µs, burst)
const QUOTAS: [(u64, u32); 6] = [
    (1_000, 1),
    (250_000, 5),
    (10, 20),
    (1_000_000, 3),
    (33_333, 10),
    (1, 1_000),
];
const KEYS: usize = 16;
const CHECKS: usize = 12_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_matches_local_decision_for_decision() {
    let clock = ManualClock::new();
    let redis = RedisRateLimiter::new(client(&STANDALONE.config(), clock.clone()).await);
    let local = LocalRateLimiter::builder()
        .clock(Arc::new(clock.clone()))
        .build();
    let mut rng = fastrand::Rng::with_seed(0x0dd_ba11);
    let mut counts = [0usize; 3];
    let mut mismatches = Vec::new();
    let started = Instant::now();
    for i in 0..CHECKS {
        let k = rng.usize(0..KEYS);
        // Key 0 changes quota from call to call: the TAT is shared by every
        // quota used with a key, on both sides.
        let (t, burst) = if k == 0 {
            QUOTAS[rng.usize(0..QUOTAS.len())]
        } else {
            QUOTAS[k % QUOTAS.len()]
        };
        let quota = Quota::from_micros(t, burst).expect("quota");
        let cost = rng.u32(0..=(burst + 1).min(25));
        match rng.u8(0..5) {
            0 => {}
            1 => clock.advance(Duration::from_micros(rng.u64(0..t.max(2)))),
            2 => clock.advance(Duration::from_micros(rng.u64(0..5 * t.max(2)))),
            3 => clock.advance(Duration::from_micros(rng.u64(0..100))),
            _ => clock.advance(Duration::from_micros(
                rng.u64(0..(t * u64::from(burst)).max(2)),
            )),
        }
        let key = format!("key-{k}");
        let want = local.check(&key, quota, cost).await.expect("local check");
        let got = redis.check(&key, quota, cost).await.expect("redis check");
        counts[match want.outcome {
            Outcome::Allowed => 0,
            Outcome::Denied => 1,
            Outcome::Never => 2,
        }] += 1;
        if got != want {
            mismatches.push(format!(
                "#{i} {key} {quota:?} cost {cost}: redis {got:?} local {want:?}"
            ));
        }
    }
    println!(
        "parity: {CHECKS} checks in {:?}: {} allowed, {} denied, {} never; {} mismatches",
        started.elapsed(),
        counts[0],
        counts[1],
        counts[2],
        mismatches.len()
    );
    assert!(
        mismatches.is_empty(),
        "{} mismatches, first: {:?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(5)]
    );
    assert!(
        counts.iter().all(|&n| n > 200),
        "every outcome exercised: {counts:?}"
    );
}
