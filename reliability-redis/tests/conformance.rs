//! The whole conformance suite (idempotency, rate limiting) on standalone
//! Redis, a Sentinel-discovered master and a 3-master Redis Cluster.
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
