//! Conformance cases for [`RateLimiter`] (the rate-limit rules).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::RateLimiterFactory;
use crate::clock::{Clock, ManualClock};
use crate::error::Error;
use crate::gcra;
use crate::key::MAX_ID_BYTES;
use crate::rate_limit::{Decision, Outcome, Quota, RateLimiter};

fn quota(interval_us: u64, burst: u32) -> Quota {
    Quota::from_micros(interval_us, burst).expect("valid quota")
}

async fn check<L: RateLimiter + ?Sized>(l: &L, key: &str, q: Quota, cost: u32) -> Decision {
    l.check(key, q, cost)
        .await
        .unwrap_or_else(|e| panic!("check({key:?}, cost {cost}) failed: {e}"))
}

/// A fresh key allows exactly `burst` cells with exact `remaining`, then
/// denies.
pub async fn burst_then_denied<F: RateLimiterFactory>(factory: &F) {
    let l = factory.create(ManualClock::new()).await;
    let q = quota(100_000, 5);
    for expected in (0..5).rev() {
        let d = check(&l, "k", q, 1).await;
        assert_eq!(d.outcome, Outcome::Allowed);
        assert_eq!(d.remaining, expected, "remaining after each allowed cell");
        assert_eq!(d.limit, 5);
        assert_eq!(d.retry_after, Duration::ZERO);
    }
    let d = check(&l, "k", q, 1).await;
    assert_eq!(d.outcome, Outcome::Denied);
    assert_eq!(d.remaining, 0);
    assert_eq!(d.retry_after, Duration::from_millis(100));
    assert_eq!(d.reset_after, Duration::from_millis(500));
}

/// A denial changes nothing, and waiting exactly `retry_after` is enough.
pub async fn denial_changes_nothing_and_retry_after_is_exact<F: RateLimiterFactory>(factory: &F) {
    let clock = ManualClock::new();
    let l = factory.create(clock.clone()).await;
    let q = quota(250_000, 2);
    assert!(check(&l, "k", q, 2).await.is_allowed());
    let first = check(&l, "k", q, 1).await;
    assert_eq!(first.outcome, Outcome::Denied);
    for _ in 0..10 {
        let again = check(&l, "k", q, 1).await;
        assert_eq!(again, first, "repeated denials must not move the state");
    }
    clock.advance(first.retry_after - Duration::from_micros(1));
    let d = check(&l, "k", q, 1).await;
    assert_eq!(d.outcome, Outcome::Denied);
    assert_eq!(d.retry_after, Duration::from_micros(1));
    clock.advance(Duration::from_micros(1));
    let d = check(&l, "k", q, 1).await;
    assert_eq!(
        d.outcome,
        Outcome::Allowed,
        "allowed exactly at retry_after"
    );
    assert_eq!(d.remaining, 0);
}

/// A request for `n` cells is allowed whole or denied whole.
pub async fn cost_is_taken_whole_or_not_at_all<F: RateLimiterFactory>(factory: &F) {
    let l = factory.create(ManualClock::new()).await;
    let q = quota(1_000_000, 5);
    let d = check(&l, "k", q, 3).await;
    assert_eq!((d.outcome, d.remaining), (Outcome::Allowed, 2));
    let d = check(&l, "k", q, 3).await;
    assert_eq!((d.outcome, d.remaining), (Outcome::Denied, 2));
    assert_eq!(d.retry_after, Duration::from_secs(1));
    let d = check(&l, "k", q, 2).await;
    assert_eq!((d.outcome, d.remaining), (Outcome::Allowed, 0));
}

/// `cost > burst` is `Never` and changes nothing.
pub async fn cost_above_burst_is_never<F: RateLimiterFactory>(factory: &F) {
    let l = factory.create(ManualClock::new()).await;
    let q = quota(1_000, 3);
    let d = check(&l, "k", q, 4).await;
    assert_eq!(d.outcome, Outcome::Never);
    assert_eq!(d.retry_after, Duration::MAX);
    assert_eq!(d.remaining, 3);
    let d = check(&l, "k", q, 3).await;
    assert_eq!(
        (d.outcome, d.remaining),
        (Outcome::Allowed, 0),
        "Never took nothing"
    );
}

/// `cost == 0` peeks: always allowed, shows the state, changes nothing.
pub async fn cost_zero_peeks<F: RateLimiterFactory>(factory: &F) {
    let l = factory.create(ManualClock::new()).await;
    let q = quota(1_000_000, 4);
    let d = check(&l, "k", q, 0).await;
    assert_eq!(
        (d.outcome, d.remaining, d.reset_after),
        (Outcome::Allowed, 4, Duration::ZERO)
    );
    assert!(check(&l, "k", q, 3).await.is_allowed());
    for _ in 0..5 {
        let d = check(&l, "k", q, 0).await;
        assert_eq!((d.outcome, d.remaining), (Outcome::Allowed, 1));
        assert_eq!(d.reset_after, Duration::from_secs(3));
    }
    assert!(
        check(&l, "k", q, 1).await.is_allowed(),
        "peeks consumed nothing"
    );
    assert_eq!(check(&l, "k", q, 1).await.outcome, Outcome::Denied);
}

/// Keys do not share state.
pub async fn keys_are_independent<F: RateLimiterFactory>(factory: &F) {
    let l = factory.create(ManualClock::new()).await;
    let q = quota(1_000_000, 1);
    assert!(check(&l, "a", q, 1).await.is_allowed());
    assert_eq!(check(&l, "a", q, 1).await.outcome, Outcome::Denied);
    assert!(check(&l, "b", q, 1).await.is_allowed());
    assert!(check(&l, "a:b", q, 1).await.is_allowed());
}

/// 2,000 random checks over several keys, quotas, costs and clock steps give
/// exactly the decisions of the reference GCRA ([`gcra::decide`]).
pub async fn matches_reference_gcra<F: RateLimiterFactory>(factory: &F) {
    let clock = ManualClock::new();
    let l = factory.create(clock.clone()).await;
    let mut rng = fastrand::Rng::with_seed(0x5eed_1234);
    let quotas = [
        quota(1_000, 1),
        quota(3_333, 7),
        quota(250_000, 10),
        quota(1, 1_000),
    ];
    let mut model: HashMap<String, u64> = HashMap::new();
    let mut outcomes = [0usize; 3];
    for i in 0..2_000 {
        let k = rng.usize(0..8);
        let key = format!("key-{k}");
        let q = quotas[k % quotas.len()];
        let cost = rng.u32(0..=q.burst().saturating_add(1).min(12));
        match rng.u8(0..4) {
            0 => {}
            1 => clock.advance(Duration::from_micros(rng.u64(0..q.emission_interval_us()))),
            2 => clock.advance(Duration::from_micros(
                rng.u64(0..5 * q.emission_interval_us()),
            )),
            _ => clock.advance(Duration::from_micros(rng.u64(0..50))),
        }
        let now = clock.now().as_micros();
        let (expected, next) = gcra::decide(model.get(&key).copied(), now, q, cost);
        if let Some(n) = next {
            model.insert(key.clone(), n);
        }
        let got = check(&l, &key, q, cost).await;
        assert_eq!(
            got, expected,
            "check #{i} ({key}, {q:?}, cost {cost}) differs from the reference"
        );
        outcomes[match got.outcome {
            Outcome::Allowed => 0,
            Outcome::Denied => 1,
            Outcome::Never => 2,
        }] += 1;
    }
    assert!(
        outcomes.iter().all(|&n| n > 50),
        "the sequence exercises every outcome: {outcomes:?}"
    );
}

/// 64 concurrent checks at one instant admit exactly the burst.
pub async fn concurrent_checks_admit_exactly_burst<F: RateLimiterFactory>(factory: &F) {
    let l = Arc::new(factory.create(ManualClock::new()).await);
    let q = quota(1_000_000, 10);
    let barrier = Arc::new(tokio::sync::Barrier::new(64));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (l, barrier) = (l.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            l.check("shared", q, 1).await
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        if t.await.expect("task").expect("check").is_allowed() {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 10, "exactly the burst is admitted");
}

/// Empty keys are invalid, huge ones refused, long ones work.
pub async fn keys_are_validated<F: RateLimiterFactory>(factory: &F) {
    let l = factory.create(ManualClock::new()).await;
    let q = quota(1_000, 1);
    assert!(matches!(
        l.check("", q, 1).await,
        Err(Error::InvalidKey { .. })
    ));
    assert!(matches!(
        l.check(&"k".repeat(MAX_ID_BYTES + 1), q, 1).await,
        Err(Error::TooLarge { what: "key", .. })
    ));
    let long = "l".repeat(1_000);
    assert!(check(&l, &long, q, 1).await.is_allowed());
    assert_eq!(check(&l, &long, q, 1).await.outcome, Outcome::Denied);
}
