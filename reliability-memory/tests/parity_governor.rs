//! `LocalRateLimiter` against governor 0.10.4, decision for decision.
//!
//! Random keys from a small set, each with a fixed quota (governor has one
//! quota per limiter, so one keyed governor limiter per quota), random costs
//! from 1 to burst + 1, random clock advances including zero. Both sides see
//! the same time: governor a `FakeRelativeClock`, ours a `ManualClock`,
//! advanced by the same whole microseconds.
#![allow(clippy::print_stdout)] // the test reports its figures

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock as _, FakeRelativeClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use reliability_core::{Decision, ManualClock, Outcome, Quota, RateLimiter};
use reliability_memory::LocalRateLimiter;

type Governor = governor::RateLimiter<
    String,
    DefaultKeyedStateStore<String>,
    FakeRelativeClock,
    StateInformationMiddleware,
>;

/// (emission interval µs, burst)
const QUOTAS: [(u64, u32); 5] = [
    (1_000, 1),
    (250_000, 5),
    (10, 20),
    (1_000_000, 3),
    (33_333, 10),
];
const KEYS: usize = 15;
const CHECKS: usize = 60_000;

/// splitmix64: a small deterministic generator, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0; the modulo bias is irrelevant here).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Seen {
    outcome: Outcome,
    remaining: Option<u32>,
    retry_after: Option<Duration>,
}

fn ours(d: &Decision) -> Seen {
    Seen {
        outcome: d.outcome,
        remaining: (d.outcome == Outcome::Allowed).then_some(d.remaining),
        retry_after: (d.outcome == Outcome::Denied).then_some(d.retry_after),
    }
}

#[tokio::test]
async fn local_limiter_matches_governor() {
    let gclock = FakeRelativeClock::default();
    let clock = ManualClock::new();
    let limiter = LocalRateLimiter::builder()
        .clock(Arc::new(clock.clone()))
        .build();
    let governors: Vec<(Quota, Governor)> = QUOTAS
        .iter()
        .map(|&(t, burst)| {
            let ours = Quota::from_micros(t, burst).unwrap();
            let theirs = governor::Quota::with_period(Duration::from_micros(t))
                .unwrap()
                .allow_burst(NonZeroU32::new(burst).unwrap());
            (
                ours,
                Governor::new(theirs, Default::default(), gclock.clone()),
            )
        })
        .collect();

    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let (mut allowed, mut denied, mut never, mut mismatches) = (0u64, 0u64, 0u64, 0u64);
    let mut advanced_zero = 0u64;
    for i in 0..CHECKS {
        let k = usize::try_from(rng.below(KEYS as u64)).unwrap();
        let key = format!("key-{k}");
        let (quota, gov) = &governors[k % QUOTAS.len()];
        let t = quota.emission_interval_us();
        let burst = quota.burst();
        let cost = u32::try_from(rng.below(u64::from(burst) + 1)).unwrap() + 1;

        // Advance: often not at all, often a fraction of T, sometimes long
        // enough to refill the burst.
        let advance_us = match rng.below(10) {
            0..=3 => 0,
            4..=6 => rng.below(t),
            7..=8 => rng.below(t * 3),
            _ => rng.below(t * u64::from(burst) * 2 + 1),
        };
        if advance_us == 0 {
            advanced_zero += 1;
        }
        let step = Duration::from_micros(advance_us);
        gclock.advance(step);
        clock.advance(step);

        let d = limiter.check(&key, *quota, cost).await.unwrap();
        let expected = match gov.check_key_n(&key, NonZeroU32::new(cost).unwrap()) {
            Err(_insufficient) => Seen {
                outcome: Outcome::Never,
                remaining: None,
                retry_after: None,
            },
            Ok(Ok(snapshot)) => Seen {
                outcome: Outcome::Allowed,
                remaining: Some(snapshot.remaining_burst_capacity()),
                retry_after: None,
            },
            Ok(Err(not_until)) => Seen {
                outcome: Outcome::Denied,
                remaining: None,
                retry_after: Some(not_until.wait_time_from(gclock.now())),
            },
        };
        let got = ours(&d);
        match got.outcome {
            Outcome::Allowed => allowed += 1,
            Outcome::Denied => denied += 1,
            Outcome::Never => never += 1,
        }
        if got != expected {
            mismatches += 1;
            if mismatches <= 10 {
                println!(
                    "mismatch at check {i}: key {key} quota {quota:?} cost {cost}: ours {got:?}, governor {expected:?}"
                );
            }
        }
        assert_eq!(d.limit, burst);
    }
    println!(
        "parity: {CHECKS} checks over {KEYS} keys and {} quotas ({advanced_zero} without clock advance): \
         {allowed} allowed, {denied} denied, {never} never; {mismatches} mismatches",
        QUOTAS.len()
    );
    assert!(
        allowed > 0 && denied > 0 && never > 0,
        "every outcome exercised"
    );
    assert_eq!(mismatches, 0);
}
