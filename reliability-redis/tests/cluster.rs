//! Redis Cluster faults (3 masters, no replicas, cluster-node-timeout 2 s).
//!
//! - A killed node's errors are classified unavailable, and come within the
//!   client's deadline; keys on the other nodes keep working until the
//!   cluster itself declares the slots down.
//! - A hung node (SIGSTOP): no call blocks longer than the configured
//!   response timeout plus 50 ms.
#![allow(clippy::print_stdout)] // the test reports its figures

mod common;

use std::time::{Duration, Instant};

use common::fresh_key_space;
use reliability_core::config::RedisConfig;
use reliability_core::{Fingerprint, IdempotencyStore, Quota, RateLimiter};
use reliability_redis::harness::RedisCluster;
use reliability_redis::{RedisClient, RedisIdempotencyStore, RedisRateLimiter};

const RESPONSE_TIMEOUT: Duration = Duration::from_millis(200);

fn fast(mut cfg: RedisConfig) -> RedisConfig {
    cfg.connect_timeout = Duration::from_millis(200);
    cfg.response_timeout = RESPONSE_TIMEOUT;
    cfg.pool_timeout = Duration::from_millis(100);
    cfg
}

async fn warm(cluster: &RedisCluster) -> (RedisClient, RedisRateLimiter, RedisIdempotencyStore) {
    let client = RedisClient::connect(&fast(cluster.config()), fresh_key_space("cluster"))
        .await
        .expect("connect");
    let limiter = RedisRateLimiter::new(client.clone());
    let store = RedisIdempotencyStore::new(client.clone());
    let q = Quota::per_second(1_000).unwrap();
    for i in 0..100 {
        assert!(limiter
            .check(&format!("k{i}"), q, 1)
            .await
            .unwrap()
            .is_allowed());
        let _ = store
            .claim(
                &format!("c{i}"),
                &Fingerprint::of(b"x"),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
    }
    (client, limiter, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_errors_are_unavailable() {
    let mut cluster = tokio::task::block_in_place(|| RedisCluster::start(3));
    let (client, limiter, _store) = warm(&cluster).await;
    tokio::task::block_in_place(|| cluster.node_mut(0).kill9());
    let q = Quota::per_second(1_000).unwrap();
    let (mut ok, mut unavailable, mut worst) = (0, 0, Duration::ZERO);
    for i in 0..100 {
        let t = Instant::now();
        match limiter.check(&format!("k{i}"), q, 1).await {
            Ok(_) => ok += 1,
            Err(e) => {
                assert!(
                    e.is_unavailable(),
                    "a killed node's error is unavailable: {e:?}"
                );
                unavailable += 1;
            }
        }
        worst = worst.max(t.elapsed());
    }
    println!("cluster: node killed: {ok} ok, {unavailable} unavailable, worst call {worst:?} (deadline {:?})", client.deadline());
    assert!(unavailable > 0, "keys on the killed node fail");
    assert!(ok > 0, "keys on the live nodes still work");
    assert!(worst <= client.deadline(), "worst call {worst:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_node_never_blocks_past_the_response_timeout() {
    let cluster = tokio::task::block_in_place(|| RedisCluster::start(3));
    let (_client, limiter, store) = warm(&cluster).await;
    cluster.nodes()[1].sigstop();
    let q = Quota::per_second(1_000).unwrap();
    let (mut ok, mut timeouts, mut worst) = (0, 0, Duration::ZERO);
    for i in 0..60 {
        let t = Instant::now();
        let r = if i % 2 == 0 {
            limiter.check(&format!("k{i}"), q, 1).await.map(|_| ())
        } else {
            store
                .claim(
                    &format!("n{i}"),
                    &Fingerprint::of(b"x"),
                    Duration::from_secs(60),
                )
                .await
                .map(|_| ())
        };
        let took = t.elapsed();
        worst = worst.max(took);
        match r {
            Ok(()) => ok += 1,
            Err(e) => {
                assert!(e.is_unavailable(), "{e:?}");
                timeouts += 1;
            }
        }
        assert!(
            took <= RESPONSE_TIMEOUT + Duration::from_millis(50),
            "call #{i} blocked {took:?} on a hung node"
        );
    }
    cluster.nodes()[1].sigcont();
    println!("cluster: node hung: {ok} ok, {timeouts} timed out, worst call {worst:?} (response timeout {RESPONSE_TIMEOUT:?})");
    assert!(timeouts > 0 && ok > 0, "both hung and live nodes were hit");
}
