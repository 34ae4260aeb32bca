//! The whole conformance suite (idempotency, rate limiting) on standalone
//! Redis, a Sentinel-discovered master and a 3-master Redis Cluster; the
//! Sentinel set and the Cluster admit only an ACL user with its password
//! (and the sentinels require the password too), so every case also checks
//! that the client authenticates on each connection those topologies make.
//!
//! Each binary starts one server (set, cluster) lazily and shares it; every
//! case works in its own namespace.

mod common;

use common::{client, CLUSTER, SENTINEL, STANDALONE};
use reliability_core::{idempotency_suite, rate_limiter_suite, ManualClock};
use reliability_redis::{RedisIdempotencyStore, RedisRateLimiter};

mod standalone_idempotency {
    use super::*;
    idempotency_suite!(|clock: ManualClock| async move {
        RedisIdempotencyStore::new(client(&STANDALONE.config(), clock).await)
    });
}

mod standalone_rate_limit {
    use super::*;
    rate_limiter_suite!(|clock: ManualClock| async move {
        RedisRateLimiter::new(client(&STANDALONE.config(), clock).await)
    });
}

mod sentinel_idempotency {
    use super::*;
    idempotency_suite!(|clock: ManualClock| async move {
        RedisIdempotencyStore::new(client(&SENTINEL.config(), clock).await)
    });
}

mod sentinel_rate_limit {
    use super::*;
    rate_limiter_suite!(|clock: ManualClock| async move {
        RedisRateLimiter::new(client(&SENTINEL.config(), clock).await)
    });
}

mod cluster_idempotency {
    use super::*;
    idempotency_suite!(|clock: ManualClock| async move {
        RedisIdempotencyStore::new(client(&CLUSTER.config(), clock).await)
    });
}

mod cluster_rate_limit {
    use super::*;
    rate_limiter_suite!(|clock: ManualClock| async move {
        RedisRateLimiter::new(client(&CLUSTER.config(), clock).await)
    });
}

/// Without a test clock a claim of a new key writes no `exp`: its lease
/// lasts as long as its key (the idempotency module docs). The suite above
/// drives time with a clock override, so this case checks that path on
/// Redis's own clock: in-progress time left, extend, complete, release,
/// and expiry, on a standalone server and on a Cluster.
#[tokio::test]
async fn claims_on_the_redis_clock() {
    use reliability_core::{Claim, Error, Fingerprint, IdempotencyStore};
    use std::time::{Duration, Instant};

    for cfg in [STANDALONE.config(), CLUSTER.config()] {
        let client = reliability_redis::RedisClient::connect(&cfg, common::fresh_key_space("rc"))
            .await
            .expect("connect");
        let store = RedisIdempotencyStore::new(client);
        let fp = Fingerprint::of(b"payload");
        let short = Duration::from_millis(300);

        let Ok(Claim::Acquired(lease)) = store.claim("a", &fp, short).await else {
            panic!("first claim acquires");
        };
        match store.claim("a", &fp, short).await {
            Ok(Claim::InProgress { retry_after }) => assert!(
                retry_after > Duration::ZERO && retry_after <= short,
                "{retry_after:?} left of {short:?}"
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            store.claim("a", &Fingerprint::of(b"other"), short).await,
            Ok(Claim::Mismatch)
        ));
        store
            .extend(&lease, Duration::from_secs(60))
            .await
            .expect("extend");
        match store.claim("a", &fp, short).await {
            Ok(Claim::InProgress { retry_after }) => assert!(
                retry_after > Duration::from_secs(59),
                "extended to 60 s, {retry_after:?} left"
            ),
            other => panic!("{other:?}"),
        }
        store
            .complete(&lease, Some("done".into()), Duration::from_secs(60))
            .await
            .expect("complete");
        match store.claim("a", &fp, short).await {
            Ok(Claim::Completed(Some(r))) => assert_eq!(&r[..], b"done"),
            other => panic!("{other:?}"),
        }

        let Ok(Claim::Acquired(lease)) = store.claim("b", &fp, short).await else {
            panic!("claim b");
        };
        store.release(&lease).await.expect("release");
        let Ok(Claim::Acquired(first)) = store.claim("b", &fp, short).await else {
            panic!("claim b after release");
        };
        // The lease ends with the key: someone else acquires within a
        // deadline, and the first holder has lost it.
        let end = Instant::now() + Duration::from_secs(10);
        let second = loop {
            match store.claim("b", &fp, short).await {
                Ok(Claim::Acquired(l)) => break l,
                Ok(Claim::InProgress { .. }) => {
                    assert!(Instant::now() < end, "the lease never expired");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => panic!("{other:?}"),
            }
        };
        assert!(matches!(
            store.complete(&first, None, short).await,
            Err(Error::LeaseLost { .. })
        ));
        assert!(matches!(
            store.extend(&first, short).await,
            Err(Error::LeaseLost { .. })
        ));
        store
            .complete(&second, None, short)
            .await
            .expect("complete");
    }
}

/// Wrong credentials behind Sentinel (for the data nodes, or for the
/// sentinels themselves) and on a Cluster: a clear error that is not an
/// outage, with no password in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::print_stdout, reason = "the test shows the errors it got")]
async fn wrong_credentials_behind_sentinel_and_cluster_are_clear_errors() {
    use reliability_core::config::{RedisUrl, Secret};
    use reliability_redis::RedisClient;

    async fn refused(cfg: &reliability_core::config::RedisConfig) -> reliability_core::Error {
        RedisClient::connect(cfg, common::fresh_key_space("auth"))
            .await
            .expect_err("wrong credentials must not connect")
    }

    let wrong = "Wrong-Pass-7373";
    let check = |what: &str, err: reliability_core::Error| {
        let text = format!("{err} {err:?}");
        println!("auth: {what} -> {err}");
        assert!(text.contains("authentication failed"), "{what}: {text}");
        assert!(!err.is_unavailable(), "{what}: not an outage: {err:?}");
        for secret in [wrong, "sentinel-pw-1", "cluster-pw-1"] {
            assert!(!text.contains(secret), "{what}: {secret} leaked: {text}");
        }
    };

    let mut cfg = tokio::task::block_in_place(|| SENTINEL.config());
    cfg.password = Some(Secret::new(wrong));
    let err = refused(&cfg).await;
    check("sentinel, wrong data-node password", err);

    let mut cfg = SENTINEL.config();
    let urls = cfg.sentinel.as_mut().expect("sentinel config");
    urls.urls = SENTINEL
        .sentinel_urls()
        .into_iter()
        .map(|u| RedisUrl::new(u.replacen("://", &format!("://:{wrong}@"), 1)).unwrap())
        .collect();
    let err = refused(&cfg).await;
    check("sentinel, wrong sentinel password", err);

    let mut cfg = tokio::task::block_in_place(|| CLUSTER.config());
    cfg.password = Some(Secret::new(wrong));
    let err = refused(&cfg).await;
    check("cluster, wrong password", err);
}
