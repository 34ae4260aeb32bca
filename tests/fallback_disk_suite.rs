//! The spool conformance suite on Fallback(RedisSpool, DiskSpool), the
//! `redis-enabled` profile's spool when `disk` is configured: with Redis up
//! (breaker closed), killed (kill -9: every call falls back, the breaker
//! opens) and isolated by the operator, including the cases that reopen the
//! spool (both sides reopened: the disk spool on its directory, the Redis
//! spool on its namespace).
//!
//! The redis-servers run AOF `appendfsync always`: a durable pairing needs a
//! durable primary, and the suite holds the pairing to what it reports.
//! (The idempotency store and the rate limiter have no disk pairing: their
//! local side is always in memory; `tests/fallback_suite.rs` and
//! `reliability-redis/tests/fallback.rs` cover them.)
#![cfg(all(feature = "redis", feature = "disk"))]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use async_trait::async_trait;
use reliability::disk::DiskSpool;
use reliability::fallback::{Breaker, BreakerConfig, Fallback};
use reliability::redis::harness::{RedisServer, ServerOptions};
use reliability::redis::{RedisClient, RedisSpool};
use reliability::testkit::SpoolFactory;
use reliability::{spool_suite, KeySpace, ManualClock, SpoolLimits};
use reliability_core::config::RedisConfig;
use tempfile::TempDir;

fn durable_server() -> RedisServer {
    RedisServer::start_with(
        ServerOptions::new()
            .persistence(true)
            .config_line("appendonly yes")
            .config_line("appendfsync always"),
    )
}

/// The live server shared by the closed and isolated cases.
static UP: LazyLock<RedisServer> = LazyLock::new(durable_server);

static NEXT: AtomicUsize = AtomicUsize::new(0);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Redis {
    Up,
    Killed,
    Isolated,
}

type Pair = Fallback<RedisSpool, DiskSpool>;

/// Builds each pairing on a fresh namespace and a fresh directory; keeps
/// the directories and the killed servers until the case ends.
struct Spools {
    redis: Redis,
    dirs: Mutex<Vec<TempDir>>,
    dead: Mutex<Vec<RedisServer>>,
    /// The Redis config of each namespace (a killed server's stays dead).
    configs: Mutex<Vec<(String, RedisConfig)>>,
}

impl Spools {
    fn new(redis: Redis) -> Self {
        Self {
            redis,
            dirs: Mutex::default(),
            dead: Mutex::default(),
            configs: Mutex::default(),
        }
    }

    fn breaker(&self, clock: &ManualClock) -> Arc<Breaker> {
        let b = Arc::new(Breaker::new(
            BreakerConfig::default(),
            Arc::new(clock.clone()),
        ));
        if self.redis == Redis::Isolated {
            b.isolate();
        }
        b
    }

    fn client(cfg: &RedisConfig, namespace: &str, clock: &ManualClock) -> RedisClient {
        // Lazy: a killed server's client must still build.
        RedisClient::lazy(cfg, KeySpace::new("fbdisk", namespace).expect("key space"))
            .expect("client")
            .with_clock_override(Arc::new(clock.clone()))
    }

    async fn disk(dir: &std::path::Path, clock: &ManualClock, limits: SpoolLimits) -> DiskSpool {
        DiskSpool::builder(dir)
            .limits(limits)
            .clock(Arc::new(clock.clone()))
            .open()
            .await
            .expect("open disk spool")
    }
}

#[async_trait]
impl SpoolFactory for Spools {
    type Spool = Pair;

    async fn create(&self, clock: ManualClock, limits: SpoolLimits) -> Pair {
        let namespace = format!(
            "p{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        // A killed primary is opened (its server checks pass) before the kill.
        let own = (self.redis == Redis::Killed).then(durable_server);
        let cfg = own
            .as_ref()
            .map_or_else(|| UP.config(), RedisServer::config);
        let primary = RedisSpool::builder(Self::client(&cfg, &namespace, &clock), &namespace)
            .limits(limits)
            .open()
            .await
            .expect("open redis spool");
        if let Some(mut server) = own {
            server.kill9();
            self.dead.lock().expect("lock").push(server);
        }
        self.configs.lock().expect("lock").push((namespace, cfg));
        let dir = tempfile::tempdir().expect("tempdir");
        let secondary = Self::disk(dir.path(), &clock, limits).await;
        self.dirs.lock().expect("lock").push(dir);
        Fallback::new(primary, secondary, self.breaker(&clock))
    }

    async fn reopen(&self, spool: Pair, clock: ManualClock, limits: SpoolLimits) -> Pair {
        let (primary, secondary) = spool.into_inner();
        let namespace = primary.namespace().to_string();
        let cfg = self
            .configs
            .lock()
            .expect("lock")
            .iter()
            .find(|(ns, _)| *ns == namespace)
            .map(|(_, c)| c.clone())
            .expect("known namespace");
        drop(primary);
        let dir = secondary.dir().to_path_buf();
        secondary.close().await.expect("close disk spool");
        let primary =
            RedisSpool::builder(Self::client(&cfg, &namespace, &clock), &namespace).limits(limits);
        let primary = match self.redis {
            Redis::Killed => primary.open_lazy().expect("open lazily"),
            _ => primary.open().await.expect("reopen redis spool"),
        };
        let secondary = Self::disk(&dir, &clock, limits).await;
        Fallback::new(primary, secondary, self.breaker(&clock))
    }
}

mod closed {
    use super::*;
    spool_suite!(Spools::new(Redis::Up));
}

mod redis_killed {
    use super::*;
    spool_suite!(Spools::new(Redis::Killed));
}

mod isolated {
    use super::*;
    spool_suite!(Spools::new(Redis::Isolated));
}
