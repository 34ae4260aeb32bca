//! The conformance suites on `Fallback(redis, memory)`: the functional
//! contract is the same whether Redis answers (closed), is dead (kill -9:
//! every call falls back, the breaker opens) or is isolated by the operator.
//! (Issue 5 adds the disk pairing and the chaos tests.)

mod common;

use std::sync::{Arc, LazyLock, Mutex};

use async_trait::async_trait;
use common::{client, fresh_key_space, STANDALONE};
use reliability_core::config::RedisConfig;
use reliability_core::fallback::{Breaker, BreakerConfig, Fallback};
use reliability_core::testkit::SpoolFactory;
use reliability_core::{
    idempotency_suite, rate_limiter_suite, spool_suite, ManualClock, SpoolLimits,
};
use reliability_memory::{LocalRateLimiter, MemoryIdempotencyStore, MemorySpool};
use reliability_redis::harness::RedisServer;
use reliability_redis::{RedisClient, RedisIdempotencyStore, RedisRateLimiter, RedisSpool};

/// A redis-server started, then killed with SIGKILL: its address refuses
/// every connection. Started after the live one, so no port is reused.
static KILLED: LazyLock<RedisServer> = LazyLock::new(|| {
    LazyLock::force(&STANDALONE);
    let mut s = RedisServer::start();
    s.kill9();
    s
});

#[derive(Clone, Copy, Debug, PartialEq)]
enum Redis {
    Up,
    Killed,
    Isolated,
}

fn config(redis: Redis) -> RedisConfig {
    match redis {
        Redis::Killed => KILLED.config(),
        Redis::Up | Redis::Isolated => STANDALONE.config(),
    }
}

async fn redis_client(redis: Redis, clock: &ManualClock) -> RedisClient {
    match redis {
        // Connecting would fail: the lazy client dials on first use.
        Redis::Killed => RedisClient::lazy(&config(redis), fresh_key_space("fb"))
            .expect("client")
            .with_clock_override(Arc::new(clock.clone())),
        _ => client(&config(redis), clock.clone()).await,
    }
}

fn breaker(clock: &ManualClock, redis: Redis) -> Arc<Breaker> {
    let b = Arc::new(Breaker::new(
        BreakerConfig::default(),
        Arc::new(clock.clone()),
    ));
    if redis == Redis::Isolated {
        b.isolate();
    }
    b
}

async fn stores(
    redis: Redis,
    clock: ManualClock,
) -> Fallback<RedisIdempotencyStore, MemoryIdempotencyStore> {
    let primary = RedisIdempotencyStore::new(redis_client(redis, &clock).await);
    let secondary = MemoryIdempotencyStore::builder()
        .clock(Arc::new(clock.clone()))
        .build();
    Fallback::new(primary, secondary, breaker(&clock, redis))
}

async fn limiters(
    redis: Redis,
    clock: ManualClock,
) -> Fallback<RedisRateLimiter, LocalRateLimiter> {
    let primary = RedisRateLimiter::new(redis_client(redis, &clock).await);
    let secondary = LocalRateLimiter::builder()
        .clock(Arc::new(clock.clone()))
        .build();
    Fallback::new(primary, secondary, breaker(&clock, redis))
}

/// Fallback(RedisSpool, MemorySpool). A RedisSpool checks the server's
/// policy when it opens, so for `Killed` each case opens on its own server
/// and kills it (SIGKILL) before the suite runs; the factory keeps the dead
/// servers until the case ends.
struct Spools {
    redis: Redis,
    dead: Mutex<Vec<RedisServer>>,
}

impl Spools {
    fn new(redis: Redis) -> Self {
        Self {
            redis,
            dead: Mutex::new(Vec::new()),
        }
    }
}

#[async_trait]
impl SpoolFactory for Spools {
    type Spool = Fallback<RedisSpool, MemorySpool>;

    async fn create(&self, clock: ManualClock, limits: SpoolLimits) -> Self::Spool {
        let own = (self.redis == Redis::Killed).then(RedisServer::start);
        let cfg = own
            .as_ref()
            .map_or_else(|| config(self.redis), RedisServer::config);
        let c = client(&cfg, clock.clone()).await;
        // The client's fresh namespace: cases never share a spool.
        let ns = c.key_space().namespace().to_string();
        let primary = RedisSpool::builder(c, ns)
            .limits(limits)
            .open()
            .await
            .expect("open");
        if let Some(mut server) = own {
            server.kill9();
            self.dead.lock().expect("lock").push(server);
        }
        let secondary = MemorySpool::builder()
            .limits(limits)
            .clock(Arc::new(clock.clone()))
            .build();
        Fallback::new(primary, secondary, breaker(&clock, self.redis))
    }

    async fn reopen(&self, _: Self::Spool, _: ManualClock, _: SpoolLimits) -> Self::Spool {
        unreachable!("a fallback over a memory spool is not reopenable")
    }
}

mod closed {
    use super::*;
    mod idempotency {
        use super::*;
        idempotency_suite!(|clock: ManualClock| stores(Redis::Up, clock));
    }
    mod rate_limit {
        use super::*;
        rate_limiter_suite!(|clock: ManualClock| limiters(Redis::Up, clock));
    }
    mod spool {
        use super::*;
        spool_suite!(Spools::new(Redis::Up));
    }
}

mod redis_killed {
    use super::*;
    mod idempotency {
        use super::*;
        idempotency_suite!(|clock: ManualClock| stores(Redis::Killed, clock));
    }
    mod rate_limit {
        use super::*;
        rate_limiter_suite!(|clock: ManualClock| limiters(Redis::Killed, clock));
    }
    mod spool {
        use super::*;
        spool_suite!(Spools::new(Redis::Killed));
    }
}

mod isolated {
    use super::*;
    mod idempotency {
        use super::*;
        idempotency_suite!(|clock: ManualClock| stores(Redis::Isolated, clock));
    }
    mod rate_limit {
        use super::*;
        rate_limiter_suite!(|clock: ManualClock| limiters(Redis::Isolated, clock));
    }
    mod spool {
        use super::*;
        spool_suite!(Spools::new(Redis::Isolated));
    }
}
