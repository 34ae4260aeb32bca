//! The Redis GCRA computes in Lua doubles, exact below 2^53. A quota whose
//! window `T x burst` lets `tat + T x (cost - 1)` pass 2^53 gets rounded
//! answers; such quotas must be refused, and every quota that is accepted
//! must give the reference's decisions exactly, near the cap included.
#![allow(clippy::print_stdout)] // the test reports its figures

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{client, STANDALONE};
use reliability_core::{Error, ManualClock, Quota, RateLimiter};
use reliability_memory::LocalRateLimiter;
use reliability_redis::RedisRateLimiter;

const CHECKS_PER_QUOTA: usize = 1_500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_windows_are_refused_or_exact() {
    let seed = std::env::var("GCRA_WINDOW_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_2052_u64);
    println!("seed {seed} (GCRA_WINDOW_SEED reproduces)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut report = Vec::new();
    let mut mismatches = Vec::new();
    for shift in [53_u32, 52, 51, 50, 49] {
        for burst in [1_u32, 2, 3, 7, 1000] {
            let t = (1_u64 << shift) / u64::from(burst);
            let quota = match Quota::from_micros(t, burst) {
                Ok(q) => q,
                Err(e) => {
                    report.push(format!("2^{shift}/{burst}: refused by Quota ({e})"));
                    continue;
                }
            };
            let (refused, differ, first) = run(quota, &mut rng).await;
            report.push(if refused {
                format!("2^{shift}/{burst}: refused by Redis")
            } else {
                format!("2^{shift}/{burst}: {differ} of {CHECKS_PER_QUOTA} differ")
            });
            if let Some(first) = first {
                mismatches.push(format!("2^{shift}/{burst}: {differ} differ, first {first}"));
            }
        }
    }
    println!("{}", report.join("\n"));
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

/// Random checks of one quota on a fresh key and a fresh clock (today's
/// time, moved at most half a window in all): whether Redis refused the
/// quota, how many decisions differed from the reference, the first one.
async fn run(quota: Quota, rng: &mut fastrand::Rng) -> (bool, usize, Option<String>) {
    let clock = ManualClock::new();
    let redis = RedisRateLimiter::new(client(&STANDALONE.config(), clock.clone()).await);
    let local = LocalRateLimiter::builder()
        .clock(Arc::new(clock.clone()))
        .build();
    let t = quota.emission_interval_us();
    let burst = quota.burst();
    let window = t.saturating_mul(u64::from(burst));
    let mut budget = window / 2;
    let (mut differ, mut first) = (0, None);
    for i in 0..CHECKS_PER_QUOTA {
        let step = match rng.u8(0..8) {
            0 => rng.u64(0..t.max(2)),
            1 | 2 => rng.u64(0..=window / CHECKS_PER_QUOTA as u64),
            3 | 4 => rng.u64(0..1_000),
            _ => 0,
        }
        .min(budget);
        budget -= step;
        clock.advance(Duration::from_micros(step));
        let cost = rng.u32(0..=(burst + 1).min(9));
        let got = match redis.check("w", quota, cost).await {
            Err(Error::InvalidArgument { .. }) => return (true, 0, None),
            other => other.expect("redis check"),
        };
        let want = local.check("w", quota, cost).await.expect("local check");
        if got != want {
            differ += 1;
            first.get_or_insert_with(|| format!("#{i} cost {cost}: redis {got:?} local {want:?}"));
        }
    }
    (false, differ, first)
}
