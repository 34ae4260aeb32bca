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
