//! Mirrors a [`Breaker`] into the health status: Redis available or not,
//! degraded or not, which backend answers each primitive, the breaker's
//! state, since when, and its last error (redacted).

use std::sync::Arc;

use crate::config::{IdempotencyBackend, RateLimiterBackend, SpoolBackend};
use crate::status::{BreakerState, BreakerStatus, HealthStatus, RedisFallback, StatusHub};

use super::Breaker;

/// Writes `breaker` into `status`. Components configured `redis` answer
/// from their local counterpart (memory, local, `local_spool`) while the
/// breaker is open or isolated.
pub fn apply_breaker(
    status: &mut HealthStatus,
    breaker: &BreakerStatus,
    local_spool: SpoolBackend,
) {
    let degraded = matches!(breaker.state, BreakerState::Open | BreakerState::Isolated);
    status.redis.available = matches!(breaker.state, BreakerState::Closed | BreakerState::HalfOpen);
    status.redis.degraded = degraded;
    status.redis.fallback = if degraded {
        RedisFallback::Baseline
    } else {
        RedisFallback::None
    };
    let c = &mut status.components;
    if c.idempotency_store.configured == IdempotencyBackend::Redis {
        c.idempotency_store.active = if degraded {
            IdempotencyBackend::Memory
        } else {
            IdempotencyBackend::Redis
        };
    }
    if c.rate_limiter.configured == RateLimiterBackend::Redis {
        c.rate_limiter.active = if degraded {
            RateLimiterBackend::Local
        } else {
            RateLimiterBackend::Redis
        };
    }
    if c.spool.configured == SpoolBackend::Redis {
        c.spool.active = if degraded {
            local_spool
        } else {
            SpoolBackend::Redis
        };
    }
    status.breaker = Some(breaker.clone());
}

/// Keeps `hub` in step with `breaker` (see [`apply_breaker`]) until the
/// breaker is dropped.
///
/// # Panics
/// Outside a tokio runtime.
pub fn spawn_status_bridge(
    breaker: &Arc<Breaker>,
    hub: StatusHub,
    local_spool: SpoolBackend,
) -> tokio::task::JoinHandle<()> {
    let mut changes = breaker.subscribe();
    tokio::spawn(async move {
        loop {
            let b = changes.borrow_and_update().clone();
            hub.update(|s| apply_breaker(s, &b, local_spool));
            if changes.changed().await.is_err() {
                break;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::config::{Profile, ReliabilityConfig};
    use crate::error::{Error, UnavailableReason};
    use crate::fallback::BreakerConfig;
    use crate::status::Overall;

    fn redis_status() -> HealthStatus {
        let mut cfg = ReliabilityConfig::baseline();
        cfg.profile = Profile::RedisEnabled;
        cfg.idempotency_store = Some(IdempotencyBackend::Redis);
        cfg.rate_limiter = Some(RateLimiterBackend::Redis);
        cfg.spool = Some(SpoolBackend::Redis);
        HealthStatus::from_config(&cfg)
    }

    #[tokio::test]
    async fn degraded_and_back() {
        let clock = ManualClock::new();
        let breaker = Arc::new(Breaker::new(BreakerConfig::default(), Arc::new(clock)));
        let hub = StatusHub::new(redis_status());
        let mut rx = hub.subscribe();
        let _bridge = spawn_status_bridge(&breaker, hub.clone(), SpoolBackend::Disk);
        rx.wait_for(|s| s.redis.available)
            .await
            .expect("bridge running");
        assert_eq!(hub.current().overall, Overall::Healthy);

        let down = Error::unavailable("redis", UnavailableReason::Connection, "refused");
        for _ in 0..3 {
            breaker.record_failure(&down);
        }
        let s = rx
            .wait_for(|s| s.redis.degraded)
            .await
            .expect("degraded")
            .clone();
        assert_eq!(s.overall, Overall::Degraded);
        assert!(s.is_ready(), "degraded stays ready");
        assert_eq!(
            s.components.idempotency_store.active,
            IdempotencyBackend::Memory
        );
        assert_eq!(s.components.rate_limiter.active, RateLimiterBackend::Local);
        assert_eq!(s.components.spool.active, SpoolBackend::Disk);
        assert_eq!(
            s.components.spool.fallback_from(),
            Some(SpoolBackend::Redis)
        );
        assert_eq!(
            s.breaker.as_ref().map(|b| b.state),
            Some(BreakerState::Open)
        );

        breaker.record_success();
        breaker.record_success();
        let s = rx
            .wait_for(|s| s.overall == Overall::Healthy)
            .await
            .expect("healthy")
            .clone();
        assert_eq!(s.components.spool.active, SpoolBackend::Redis);
    }
}
