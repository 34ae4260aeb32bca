//! [`Reliability`]: the three primitives built from a [`ReliabilityConfig`].

use std::sync::Arc;

use reliability_core::config::{
    IdempotencyBackend, RateLimiterBackend, ReliabilityConfig, SpoolBackend,
};
use reliability_core::status::{HealthStatus, SpoolHealth, StatusHub};
use reliability_core::{
    system_clock, Error, IdempotencyStore, KeySpace, RateLimiter, Result, SharedClock, Spool,
};

/// The primitives a service uses, chosen by configuration: an idempotency
/// store, a rate limiter, an optional spool, and the [`StatusHub`] that
/// reports their health.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> reliability::Result<()> {
/// use reliability::config::from_yaml_str;
/// use reliability::{Overall, Reliability};
///
/// let cfg = from_yaml_str("reliability: { profile: baseline, spool: none }")?;
/// let r = Reliability::from_config(&cfg).await?;
/// assert!(r.spool().is_none());
/// assert_eq!(r.status().current().overall, Overall::Healthy);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Reliability {
    config: Arc<ReliabilityConfig>,
    key_space: KeySpace,
    idempotency: Arc<dyn IdempotencyStore>,
    rate_limiter: Arc<dyn RateLimiter>,
    spool: Option<Arc<dyn Spool>>,
    status: StatusHub,
    #[cfg(feature = "redis")]
    redis: Option<Arc<RedisRuntime>>,
}

/// The Redis parts of the `redis-enabled` profile and their background
/// tasks (stopped when the last clone of the [`Reliability`] goes).
#[cfg(feature = "redis")]
#[derive(Debug)]
struct RedisRuntime {
    parts: crate::redis_enabled::RedisParts,
    _tasks: Vec<crate::redis_enabled::Background>,
}

impl Reliability {
    /// Validates `config` and builds every backend it asks for, with the
    /// system clock.
    ///
    /// # Errors
    /// [`Error::Config`] naming the bad field; [`Error::FeatureDisabled`]
    /// when a backend's cargo feature is off (e.g. `spool: disk` without
    /// feature `disk`).
    pub async fn from_config(config: &ReliabilityConfig) -> Result<Self> {
        Self::builder(config.clone()).build().await
    }

    /// A builder, to set a clock before building.
    pub fn builder(config: ReliabilityConfig) -> ReliabilityBuilder {
        ReliabilityBuilder {
            config,
            clock: None,
        }
    }

    /// The idempotency store.
    pub fn idempotency(&self) -> &Arc<dyn IdempotencyStore> {
        &self.idempotency
    }

    /// The rate limiter.
    pub fn rate_limiter(&self) -> &Arc<dyn RateLimiter> {
        &self.rate_limiter
    }

    /// The spool; `None` with `spool: none`.
    pub fn spool(&self) -> Option<&Arc<dyn Spool>> {
        self.spool.as_ref()
    }

    /// The health status hub: [`StatusHub::current`] for a probe,
    /// [`StatusHub::subscribe`] to react to changes.
    pub fn status(&self) -> &StatusHub {
        &self.status
    }

    /// The configuration it was built from (validated).
    pub fn config(&self) -> &ReliabilityConfig {
        &self.config
    }

    /// The validated `keyPrefix` / `namespace` pair.
    pub fn key_space(&self) -> &KeySpace {
        &self.key_space
    }

    /// The breaker shared by the components configured `redis` (profile
    /// `redis-enabled`), for operators: [`Breaker::isolate`] forces local
    /// answers, [`Breaker::release`] lets the probe bring Redis back.
    /// `None` when no component is on Redis.
    ///
    /// [`Breaker::isolate`]: reliability_core::fallback::Breaker::isolate
    /// [`Breaker::release`]: reliability_core::fallback::Breaker::release
    #[cfg(feature = "redis")]
    pub fn breaker(&self) -> Option<&Arc<reliability_core::fallback::Breaker>> {
        self.redis.as_ref().map(|r| &r.parts.breaker)
    }

    /// The Redis client shared by the components configured `redis`.
    #[cfg(feature = "redis")]
    pub fn redis_client(&self) -> Option<&reliability_redis::RedisClient> {
        self.redis.as_ref().map(|r| &r.parts.client)
    }

    /// Runs one failback pass now: replays the claims answered locally to
    /// Redis and moves the records spooled locally back (a background task
    /// does the same whenever the breaker closes, and every second while it
    /// stays closed). Does nothing while Redis is not taking traffic.
    ///
    /// # Errors
    /// A caller error of Redis while draining (e.g. [`Error::Full`]); the
    /// records stay local.
    #[cfg(feature = "redis")]
    pub async fn failback_now(&self) -> Result<crate::FailbackReport> {
        match &self.redis {
            Some(r) => r.parts.failback_now(&self.status).await,
            None => Ok(crate::FailbackReport::default()),
        }
    }

    /// Reads the spool's statistics into the status (depth, dead, alert).
    /// Does nothing without a spool.
    ///
    /// # Errors
    /// Those of [`Spool::stats`]; the status is left as it was.
    pub async fn refresh_status(&self) -> Result<()> {
        if let Some(spool) = &self.spool {
            let stats = match spool.stats().await {
                Ok(stats) => stats,
                Err(e) => {
                    mark_local_failure(&self.status, &e);
                    return Err(e);
                }
            };
            reliability_core::metrics::record_spool_stats(&stats);
            let health = SpoolHealth::from_stats(&stats, self.config.spool_limits.alert_depth);
            self.status.update(|s| s.spool = Some(health));
        }
        Ok(())
    }
}

/// A disk spool that stopped (its stats fail: a sync failed, writes are
/// refused until it is reopened) makes the local side unavailable, so the
/// status turns unhealthy with the error (redacted) as the reason. Errors
/// of other backends (Redis down) leave the local side alone.
fn mark_local_failure(status: &StatusHub, e: &Error) {
    if matches!(
        e,
        Error::Unavailable {
            backend: "disk",
            ..
        }
    ) {
        let why = reliability_core::status::Redacted::new(e.to_string());
        status.update(|s| {
            s.local.available = false;
            s.local.last_error = Some(why);
        });
    }
}

/// Builds a [`Reliability`]; see [`Reliability::builder`].
#[derive(Debug)]
#[must_use]
pub struct ReliabilityBuilder {
    config: ReliabilityConfig,
    clock: Option<SharedClock>,
}

impl ReliabilityBuilder {
    /// The clock of the memory and disk backends (default: the system
    /// clock). Tests pass a [`ManualClock`](reliability_core::ManualClock).
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Validates the configuration and builds every backend.
    ///
    /// # Errors
    /// See [`Reliability::from_config`].
    pub async fn build(self) -> Result<Reliability> {
        let config = self.config;
        config.validate()?;
        let key_space = KeySpace::new(config.key_prefix.clone(), config.namespace.clone())
            .map_err(|e| Error::config("reliability.keyPrefix", e.to_string()))?;
        let clock = self.clock.unwrap_or_else(system_clock);
        let status = StatusHub::new(HealthStatus::from_config(&config));

        #[cfg(feature = "redis")]
        if uses_redis(&config) {
            return build_redis_enabled(config, clock, key_space, status).await;
        }

        let idempotency = idempotency_store(&config, &clock, &key_space).await?;
        let rate_limiter = rate_limiter(&config, &clock, &key_space).await?;
        let spool = spool(&config, &clock, &key_space).await?;
        Ok(Reliability {
            config: Arc::new(config),
            key_space,
            idempotency,
            rate_limiter,
            spool,
            status,
            #[cfg(feature = "redis")]
            redis: None,
        })
    }
}

/// Whether any component is configured `redis`.
#[cfg(feature = "redis")]
fn uses_redis(config: &ReliabilityConfig) -> bool {
    config.idempotency_backend() == IdempotencyBackend::Redis
        || config.rate_limiter_backend() == RateLimiterBackend::Redis
        || config.spool_backend() == SpoolBackend::Redis
}

/// Builds the components of a configuration with at least one on Redis:
/// those are `Fallback(redis, local)` on one lazy client and one breaker
/// (see `redis_enabled.rs`); the others are built as in the baseline.
#[cfg(feature = "redis")]
async fn build_redis_enabled(
    config: ReliabilityConfig,
    clock: SharedClock,
    key_space: KeySpace,
    status: StatusHub,
) -> Result<Reliability> {
    use reliability_core::fallback::RateLimitPolicy;

    let mut parts = crate::redis_enabled::RedisParts::new(&config, &clock, &key_space)?;
    let idempotency: Arc<dyn IdempotencyStore> = match config.idempotency_backend() {
        IdempotencyBackend::Redis => parts.store(memory_store(&config, &clock)),
        _ => idempotency_store(&config, &clock, &key_space).await?,
    };
    let rate_limiter: Arc<dyn RateLimiter> = match config.rate_limiter_backend() {
        RateLimiterBackend::Redis => parts.limiter(
            local_limiter(&config, &clock),
            RateLimitPolicy::from(&config.fallback),
        ),
        _ => rate_limiter(&config, &clock, &key_space).await?,
    };
    let mut local_spool = SpoolBackend::None;
    let spool: Option<Arc<dyn Spool>> = match config.spool_backend() {
        SpoolBackend::Redis => {
            let (local, backend) = redis_spool_secondary(&config, &clock).await?;
            local_spool = backend;
            Some(parts.spool(&config, local, key_space.namespace())?)
        }
        _ => spool(&config, &clock, &key_space).await?,
    };
    let tasks = parts.start(&config, &status, local_spool).await;
    Ok(Reliability {
        config: Arc::new(config),
        key_space,
        idempotency,
        rate_limiter,
        spool,
        status,
        redis: Some(Arc::new(RedisRuntime {
            parts,
            _tasks: tasks,
        })),
    })
}

/// Where the spool's records go while Redis is down: the disk spool when
/// `disk` is configured, else the memory spool.
#[cfg(feature = "redis")]
async fn redis_spool_secondary(
    config: &ReliabilityConfig,
    clock: &SharedClock,
) -> Result<(Arc<dyn Spool>, SpoolBackend)> {
    #[cfg(feature = "disk")]
    if config.disk.is_some() {
        return Ok((
            Arc::new(disk_spool(config, clock).await?),
            SpoolBackend::Disk,
        ));
    }
    #[cfg(not(feature = "disk"))]
    if config.disk.is_some() {
        return Err(disabled("disk", "disk", "disk"));
    }
    Ok((
        Arc::new(
            reliability_memory::MemorySpool::builder()
                .limits(config.spool_limits.limits())
                .clock(clock.clone())
                .build(),
        ),
        SpoolBackend::Memory,
    ))
}

#[cfg(feature = "memory")]
fn memory_store(
    config: &ReliabilityConfig,
    clock: &SharedClock,
) -> reliability_memory::MemoryIdempotencyStore {
    reliability_memory::MemoryIdempotencyStore::builder()
        .max_entries(config.memory.max_entries)
        .max_bytes(config.memory.max_bytes)
        .clock(clock.clone())
        .build()
}

#[cfg(feature = "memory")]
fn local_limiter(
    config: &ReliabilityConfig,
    clock: &SharedClock,
) -> reliability_memory::LocalRateLimiter {
    reliability_memory::LocalRateLimiter::builder()
        .max_keys(usize::try_from(config.memory.max_keys).unwrap_or(usize::MAX))
        .clock(clock.clone())
        .build()
}

// Unused when every backend feature is on.
#[cfg_attr(
    all(feature = "memory", feature = "redis", feature = "disk"),
    allow(dead_code)
)]
fn disabled(field: &str, backend: &str, feature: &'static str) -> Error {
    Error::FeatureDisabled {
        field: format!("reliability.{field}"),
        backend: backend.to_string(),
        feature,
    }
}

fn unsupported(field: &str, backend: &str) -> Error {
    Error::config(
        format!("reliability.{field}"),
        format!("backend {backend} is not supported by this version of crate `reliability`"),
    )
}

async fn idempotency_store(
    config: &ReliabilityConfig,
    clock: &SharedClock,
    key_space: &KeySpace,
) -> Result<Arc<dyn IdempotencyStore>> {
    let _ = (clock, key_space);
    match config.idempotency_backend() {
        #[cfg(feature = "memory")]
        IdempotencyBackend::Memory => Ok(Arc::new(memory_store(config, clock))),
        #[cfg(not(feature = "memory"))]
        IdempotencyBackend::Memory => Err(disabled("idempotencyStore", "memory", "memory")),
        // Built by `build_redis_enabled`.
        #[cfg(feature = "redis")]
        IdempotencyBackend::Redis => unreachable!("redis components are built as fallbacks"),
        #[cfg(not(feature = "redis"))]
        IdempotencyBackend::Redis => Err(disabled("idempotencyStore", "redis", "redis")),
        other => Err(unsupported("idempotencyStore", other.as_str())),
    }
}

async fn rate_limiter(
    config: &ReliabilityConfig,
    clock: &SharedClock,
    key_space: &KeySpace,
) -> Result<Arc<dyn RateLimiter>> {
    let _ = (clock, key_space);
    match config.rate_limiter_backend() {
        #[cfg(feature = "memory")]
        RateLimiterBackend::Local => Ok(Arc::new(local_limiter(config, clock))),
        #[cfg(not(feature = "memory"))]
        RateLimiterBackend::Local => Err(disabled("rateLimiter", "local", "memory")),
        // Built by `build_redis_enabled`.
        #[cfg(feature = "redis")]
        RateLimiterBackend::Redis => unreachable!("redis components are built as fallbacks"),
        #[cfg(not(feature = "redis"))]
        RateLimiterBackend::Redis => Err(disabled("rateLimiter", "redis", "redis")),
        other => Err(unsupported("rateLimiter", other.as_str())),
    }
}

async fn spool(
    config: &ReliabilityConfig,
    clock: &SharedClock,
    key_space: &KeySpace,
) -> Result<Option<Arc<dyn Spool>>> {
    let _ = (clock, key_space);
    match config.spool_backend() {
        SpoolBackend::None => Ok(None),
        #[cfg(feature = "disk")]
        SpoolBackend::Disk => Ok(Some(Arc::new(disk_spool(config, clock).await?))),
        #[cfg(not(feature = "disk"))]
        SpoolBackend::Disk => Err(disabled("spool", "disk", "disk")),
        // Built by `build_redis_enabled`.
        #[cfg(feature = "redis")]
        SpoolBackend::Redis => unreachable!("redis components are built as fallbacks"),
        #[cfg(not(feature = "redis"))]
        SpoolBackend::Redis => Err(disabled("spool", "redis", "redis")),
        #[cfg(feature = "memory")]
        SpoolBackend::Memory => Ok(Some(Arc::new(
            reliability_memory::MemorySpool::builder()
                .limits(config.spool_limits.limits())
                .clock(clock.clone())
                .build(),
        ))),
        #[cfg(not(feature = "memory"))]
        SpoolBackend::Memory => Err(disabled("spool", "memory", "memory")),
        other => Err(unsupported("spool", other.as_str())),
    }
}

/// The disk spool of `config.disk`: its directory, the spool limits with
/// `disk.maxBytes` / `disk.maxRecords` applied, and its fsync policy.
#[cfg(feature = "disk")]
async fn disk_spool(
    config: &ReliabilityConfig,
    clock: &SharedClock,
) -> Result<reliability_disk::DiskSpool> {
    use reliability_core::config::FsyncPolicy;
    use reliability_disk::{DiskSpool, FsyncMode};

    let Some(disk) = config.disk.as_ref() else {
        return Err(Error::config(
            "reliability.disk.dir",
            "spool: disk needs disk.dir",
        ));
    };
    let fsync = match disk.fsync {
        FsyncPolicy::Interval => FsyncMode::Interval(disk.fsync_interval),
        FsyncPolicy::None => FsyncMode::Never,
        // `always`, and any policy added later: the safest.
        _ => FsyncMode::Always,
    };
    DiskSpool::builder(&disk.dir)
        .limits(disk.limits(&config.spool_limits))
        .fsync(fsync)
        .clock(clock.clone())
        .open()
        .await
}

#[cfg(all(test, feature = "disk"))]
mod tests {
    use std::sync::Arc;

    use crate::config::from_yaml_str;
    use reliability_core::status::Overall;
    use reliability_core::{NewRecord, RecordId, Spool};
    use reliability_disk::faults::{Fault, Faults, Op};
    use reliability_disk::DiskSpool;

    use super::Reliability;

    /// A failed fsync of the disk spool turns the status unhealthy, with
    /// the reason.
    #[tokio::test]
    async fn failed_fsync_of_the_disk_spool_makes_the_status_unhealthy() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cfg = from_yaml_str("reliability: { profile: baseline, spool: none }").expect("cfg");
        let mut r = Reliability::from_config(&cfg).await.expect("build");
        let faults = Faults::new();
        let spool = DiskSpool::builder(tmp.path())
            .faults(faults.clone())
            .open()
            .await
            .expect("open");
        faults.fail_nth(Op::Sync, 1, Fault::LostSync);
        let rec = NewRecord::new(RecordId::new("a").expect("id"), "x");
        assert!(spool.enqueue(vec![rec]).await.is_err());
        r.spool = Some(Arc::new(spool));
        assert!(r.refresh_status().await.is_err());
        let s = r.status().current();
        assert_eq!(s.overall, Overall::Unhealthy);
        let why = s.local.last_error.expect("a reason");
        assert!(why.as_str().contains("sync"), "{why:?}");
    }
}
