//! Two "replicas": two separate `RedisClient`s (two pools, two sets of
//! connections) sharing one Redis.
//!
//! - 2 x 64 tasks claim the same 1,000 keys, each in its own order:
//!   exactly one `Acquired` per key, across both replicas.
//! - Both replicas rate-limit one key at the same instants: together they
//!   admit exactly what one limiter would.
#![allow(clippy::print_stdout)] // the test reports its figures

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{fresh_key_space, STANDALONE};
use reliability_core::{Claim, Fingerprint, IdempotencyStore, ManualClock, Quota, RateLimiter};
use reliability_memory::LocalRateLimiter;
use reliability_redis::{RedisClient, RedisIdempotencyStore, RedisRateLimiter};

const KEYS: usize = 1_000;
const TASKS_PER_REPLICA: usize = 64;

async fn two_replicas() -> (RedisClient, RedisClient) {
    let ks = fresh_key_space("replicas");
    let cfg = STANDALONE.config();
    let a = RedisClient::connect(&cfg, ks.clone())
        .await
        .expect("replica a");
    let b = RedisClient::connect(&cfg, ks).await.expect("replica b");
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_one_acquired_per_key_across_replicas() {
    let (a, b) = two_replicas().await;
    let stores = [
        Arc::new(RedisIdempotencyStore::new(a)),
        Arc::new(RedisIdempotencyStore::new(b)),
    ];
    let barrier = Arc::new(tokio::sync::Barrier::new(2 * TASKS_PER_REPLICA));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (r, store) in stores.iter().enumerate() {
        for t in 0..TASKS_PER_REPLICA {
            let (store, barrier) = (store.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                let mut order: Vec<usize> = (0..KEYS).collect();
                fastrand::Rng::with_seed((r * 1_000 + t) as u64).shuffle(&mut order);
                barrier.wait().await;
                let mut acquired = Vec::new();
                for k in order {
                    match store
                        .claim(
                            &format!("evt-{k}"),
                            &Fingerprint::of(b"body"),
                            Duration::from_secs(60),
                        )
                        .await
                        .expect("claim")
                    {
                        Claim::Acquired(_) => acquired.push(k),
                        Claim::InProgress { .. } => {}
                        other => panic!("unexpected {other:?}"),
                    }
                }
                (r, acquired)
            }));
        }
    }
    let mut per_key = vec![0u32; KEYS];
    let mut per_replica = [0usize; 2];
    for t in tasks {
        let (r, acquired) = t.await.expect("task");
        per_replica[r] += acquired.len();
        for k in acquired {
            per_key[k] += 1;
        }
    }
    let elapsed = started.elapsed();
    let claims = 2 * TASKS_PER_REPLICA * KEYS;
    println!(
        "replicas: {claims} claims in {elapsed:?} ({:.0}/s); Acquired per replica {per_replica:?}",
        claims as f64 / elapsed.as_secs_f64()
    );
    let wrong: Vec<(usize, u32)> = per_key
        .iter()
        .enumerate()
        .filter(|(_, &n)| n != 1)
        .map(|(k, &n)| (k, n))
        .collect();
    assert!(
        wrong.is_empty(),
        "keys without exactly one Acquired: {wrong:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_admit_what_one_limiter_would() {
    let clock = ManualClock::new();
    let (a, b) = two_replicas().await;
    let limiters = [
        Arc::new(
            RedisRateLimiter::builder(a)
                .clock_override(Arc::new(clock.clone()))
                .build(),
        ),
        Arc::new(
            RedisRateLimiter::builder(b)
                .clock_override(Arc::new(clock.clone()))
                .build(),
        ),
    ];
    let one = LocalRateLimiter::builder()
        .clock(Arc::new(clock.clone()))
        .build();
    let quota = Quota::from_micros(10_000, 20).expect("quota"); // 100/s, burst 20
    let mut total = (0usize, 0usize);
    for round in 0..20 {
        let checks_per_replica = 32;
        let mut tasks = Vec::new();
        for l in &limiters {
            for _ in 0..checks_per_replica {
                let l = l.clone();
                tasks.push(tokio::spawn(
                    async move { l.check("shared", quota, 1).await },
                ));
            }
        }
        let mut admitted = 0;
        for t in tasks {
            if t.await.expect("task").expect("check").is_allowed() {
                admitted += 1;
            }
        }
        let mut expected = 0;
        for _ in 0..2 * checks_per_replica {
            if one
                .check("shared", quota, 1)
                .await
                .expect("local")
                .is_allowed()
            {
                expected += 1;
            }
        }
        assert_eq!(
            admitted, expected,
            "round {round}: two replicas vs one limiter"
        );
        total.0 += admitted;
        total.1 += 2 * checks_per_replica;
        clock.advance(Duration::from_micros(10_000 * (round % 7)));
    }
    println!(
        "replicas: rate limit admitted {} of {} checks, as one limiter",
        total.0, total.1
    );
}
