//! A Redis that forgets: restarted without persistence under the
//! `redis-enabled` profile. Claims this process completed through Redis
//! are answered locally while Redis is down; once it is back empty, the
//! status reports the data loss (when, why) and the claims are replayed, so
//! neither this process nor another replica acquires them again.
#![cfg(feature = "redis")]

use std::time::Duration;

use bytes::Bytes;
use reliability::config::{ReliabilityConfig, SpoolBackend};
use reliability::redis::harness::RedisServer;
use reliability::status::Overall;
use reliability::{Claim, Fingerprint, IdempotencyStore, Reliability};

mod common;
use common::wait_status;

const KEYS: usize = 200;
const RETENTION: Duration = Duration::from_secs(3_600);

fn config(server: &RedisServer, namespace: &str) -> ReliabilityConfig {
    let mut cfg = ReliabilityConfig::redis_enabled(server.config());
    cfg.namespace = namespace.to_string();
    cfg.spool = Some(SpoolBackend::None);
    cfg.fallback.probe_interval = Duration::from_millis(100);
    if let Some(r) = cfg.redis.as_mut() {
        r.connect_timeout = Duration::from_millis(200);
        r.response_timeout = Duration::from_millis(200);
        r.pool_timeout = Duration::from_millis(200);
    }
    cfg
}

fn fp(key: &str) -> Fingerprint {
    Fingerprint::of(key)
}

/// How many of the keys `store` hands out again (`Acquired`).
async fn reacquired(store: &dyn IdempotencyStore) -> Vec<String> {
    let mut again = Vec::new();
    for i in 0..KEYS {
        let key = format!("done-{i}");
        match store
            .claim(&key, &fp(&key), RETENTION)
            .await
            .expect("claim")
        {
            Claim::Completed(Some(r)) => assert_eq!(r, Bytes::from(key.clone())),
            Claim::Acquired(_) => again.push(key),
            other => panic!("{key}: {other:?}"),
        }
    }
    again
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_without_persistence_is_reported_and_repaired() {
    let mut redis = RedisServer::start();
    let namespace = format!("forget{}", std::process::id());
    let r = Reliability::from_config(&config(&redis, &namespace))
        .await
        .expect("build");
    let mut rx = r.status().subscribe();
    wait_status(&mut rx, Duration::from_secs(2), "healthy", |s| {
        s.overall == Overall::Healthy
    })
    .await;
    let store = r.idempotency();
    for i in 0..KEYS {
        let key = format!("done-{i}");
        let Claim::Acquired(lease) = store
            .claim(&key, &fp(&key), RETENTION)
            .await
            .expect("claim")
        else {
            panic!("{key} is new");
        };
        store
            .complete(&lease, Some(Bytes::from(key.clone())), RETENTION)
            .await
            .expect("complete");
    }
    let breaker = r.breaker().expect("redis-enabled").clone();
    let seen = tokio::time::Instant::now() + Duration::from_secs(2);
    while breaker.identity().is_none() {
        assert!(
            tokio::time::Instant::now() < seen,
            "the probe reports no identity"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    redis.kill9();
    wait_status(&mut rx, Duration::from_secs(2), "degraded", |s| {
        s.overall == Overall::Degraded
    })
    .await;
    let during = reacquired(store.as_ref()).await;
    assert!(
        during.is_empty(),
        "{} completed keys acquired again during the outage: {during:?}",
        during.len()
    );

    redis.restart();
    let s = wait_status(
        &mut rx,
        Duration::from_secs(3),
        "reporting the data loss",
        |s| s.breaker.as_ref().is_some_and(|b| b.data_lost_at.is_some()),
    )
    .await;
    let b = s.breaker.clone().expect("breaker");
    assert_eq!(b.data_loss.as_deref(), Some("restarted"));
    assert_eq!(b.data_losses, 1);
    let json = serde_norway::to_string(&s).expect("status serializes");
    assert!(json.contains("dataLostAt"), "{json}");

    wait_status(&mut rx, Duration::from_secs(3), "healthy again", |s| {
        s.overall == Overall::Healthy
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while r
        .failback_now()
        .await
        .expect("failback")
        .reconcile
        .is_some()
        || r.status().current().pending_reconcile > 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "replay did not settle"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let shown = r.status().current().fallback.and_then(|f| f.completed);
    assert!(
        shown.is_some_and(|c| c.entries >= KEYS as u64 && c.max_entries > 0),
        "the local record in status: {shown:?}"
    );
    let after = reacquired(store.as_ref()).await;
    assert!(after.is_empty(), "acquired again after the loss: {after:?}");

    // Another replica, with nothing local, finds them on Redis again.
    let other = Reliability::from_config(&config(&redis, &namespace))
        .await
        .expect("second replica");
    let elsewhere = reacquired(other.idempotency().as_ref()).await;
    assert!(
        elsewhere.is_empty(),
        "another replica acquired {} completed keys: {elsewhere:?}",
        elsewhere.len()
    );
}
