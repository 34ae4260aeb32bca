//! The `redis-enabled` profile: each component configured `redis` is a
//! [`Fallback`] of the Redis backend in front of its in-process counterpart,
//! all on one lazily connecting [`RedisClient`] and one [`Breaker`].
//!
//! Background tasks, stopped when the last clone of the
//! [`Reliability`](crate::Reliability) is dropped:
//!
//! - the breaker's probe (`PING`, plus `ROLE` behind Sentinel, then the
//!   server's `maxmemory-policy`) every `fallback.probeInterval`, so
//!   detection needs no traffic; a misconfiguration it finds (a refused
//!   password or ACL, an evicting policy) is the status's `redis.alert`;
//! - the status bridge: every breaker transition lands in the
//!   [`StatusHub`];
//! - failback: whenever the breaker closes, and every second while it stays
//!   closed with work left, the claims answered locally are replayed to Redis
//!   ([`Fallback::reconcile`]) and the records spooled locally drain back
//!   ([`Fallback::drain`]).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reliability_core::config::{OnEvictingPolicy, ReliabilityConfig, SpoolBackend};
use reliability_core::fallback::{
    apply_breaker, spawn_status_bridge, Breaker, BreakerConfig, DrainReport, Fallback,
    PrimaryIdentity, Probe, ProbeTask, RateLimitPolicy, ReconcileReport,
};
use reliability_core::status::{BreakerState, Redacted, StatusHub};
use reliability_core::{Error, KeySpace, Result, SharedClock, Spool, UnavailableReason};
use reliability_memory::{LocalRateLimiter, MemoryIdempotencyStore};
use reliability_redis::{RedisClient, RedisIdempotencyStore, RedisRateLimiter, RedisSpool};
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// The idempotency store of the profile.
pub(crate) type FallbackStore = Fallback<RedisIdempotencyStore, MemoryIdempotencyStore>;
/// The rate limiter of the profile.
pub(crate) type FallbackLimiter = Fallback<RedisRateLimiter, LocalRateLimiter>;
/// The spool of the profile: Redis in front of the disk spool when `disk`
/// is configured, else the memory spool.
pub(crate) type FallbackSpool = Fallback<RedisSpool, Arc<dyn Spool>>;

/// How often failback looks for work while the breaker stays closed.
const FAILBACK_EVERY: Duration = Duration::from_secs(1);

/// What one failback pass did (see [`Reliability::failback_now`](crate::Reliability::failback_now)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FailbackReport {
    /// The idempotency claims replayed to Redis, if the store is on Redis.
    pub reconcile: Option<ReconcileReport>,
    /// The spool records moved back to Redis, if the spool is on Redis.
    pub drain: Option<DrainReport>,
}

/// The shared Redis client, breaker and the typed fallbacks.
#[derive(Debug)]
pub(crate) struct RedisParts {
    pub(crate) client: RedisClient,
    pub(crate) breaker: Arc<Breaker>,
    deadline: Duration,
    store: Option<Arc<FallbackStore>>,
    spool: Option<Arc<FallbackSpool>>,
}

impl RedisParts {
    /// The client (lazy: nothing is dialled here) and the breaker.
    pub(crate) fn new(
        config: &ReliabilityConfig,
        clock: &SharedClock,
        key_space: &KeySpace,
    ) -> Result<Self> {
        let redis = config
            .redis
            .as_ref()
            .ok_or_else(|| Error::config("reliability.redis", "required by the Redis backends"))?;
        let client = RedisClient::lazy(redis, key_space.clone())?;
        let breaker = Arc::new(Breaker::new(
            BreakerConfig::from(&config.fallback),
            clock.clone(),
        ));
        Ok(Self {
            client,
            breaker,
            deadline: config.fallback.deadline,
            store: None,
            spool: None,
        })
    }

    /// Fallback(redis, memory) for the idempotency store.
    pub(crate) fn store(&mut self, local: MemoryIdempotencyStore) -> Arc<FallbackStore> {
        let f = Arc::new(
            Fallback::new(
                RedisIdempotencyStore::new(self.client.clone()),
                local,
                Arc::clone(&self.breaker),
            )
            .with_deadline(self.deadline),
        );
        self.store = Some(Arc::clone(&f));
        f
    }

    /// Fallback(redis, local) for the rate limiter, with the configured
    /// policy while Redis is down.
    pub(crate) fn limiter(
        &self,
        local: LocalRateLimiter,
        policy: RateLimitPolicy,
    ) -> Arc<FallbackLimiter> {
        Arc::new(
            Fallback::new(
                RedisRateLimiter::new(self.client.clone()),
                local,
                Arc::clone(&self.breaker),
            )
            .with_deadline(self.deadline)
            .with_rate_limit_policy(policy),
        )
    }

    /// Fallback(redis, `local`) for the spool; the Redis spool opens lazily
    /// (its server checks run on the first call that reaches Redis).
    pub(crate) fn spool(
        &mut self,
        config: &ReliabilityConfig,
        local: Arc<dyn Spool>,
        namespace: &str,
    ) -> Result<Arc<FallbackSpool>> {
        let mut primary = RedisSpool::builder(self.client.clone(), namespace)
            .limits(config.spool_limits.limits());
        if let Some(r) = &config.redis {
            primary = primary.wait_replicas(r.spool_wait_replicas, r.spool_wait_timeout);
        }
        let primary = primary.open_lazy()?;
        let f = Arc::new(
            Fallback::new(primary, local, Arc::clone(&self.breaker)).with_deadline(self.deadline),
        );
        self.spool = Some(Arc::clone(&f));
        Ok(f)
    }

    /// Probes Redis once (under the deadline); if it does not answer, the
    /// breaker opens at once so the service starts degraded. Then starts
    /// the background tasks.
    pub(crate) async fn start(
        &self,
        config: &ReliabilityConfig,
        status: &StatusHub,
        local_spool: SpoolBackend,
    ) -> Vec<Background> {
        let probe: Arc<dyn Probe> = Arc::new(CheckedProbe::new(config, &self.client, status));
        let first = match tokio::time::timeout(self.deadline, probe.probe()).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                backend: "redis",
                after: self.deadline,
            }),
        };
        match first {
            Err(e) => {
                warn!(error = %e, "redis unreachable at start: starting degraded");
                self.breaker.trip(&e);
            }
            Ok(()) => {
                if let Some(spool) = &self.spool {
                    // The spool's server checks take round trips: run them
                    // now, not in the first callers' deadline.
                    let primary = spool.get_ref().0.clone();
                    tokio::spawn(async move { primary.check_server().await });
                }
            }
        }
        let probe_task =
            self.breaker
                .spawn_probe(probe, config.fallback.probe_interval, probe_budget(config));
        // The status is right from the first read; the bridge keeps it so.
        let now = self.breaker.status();
        status.update(|s| apply_breaker(s, &now, local_spool));
        let bridge = spawn_status_bridge(&self.breaker, status.clone(), local_spool);
        let failback = tokio::spawn(failback_loop(
            Arc::clone(&self.breaker),
            self.store.clone(),
            self.spool.clone(),
            status.clone(),
        ));
        vec![
            Background::Probe(probe_task),
            Background::Task(bridge),
            Background::Task(failback),
        ]
    }

    /// One failback pass now (see [`failback_loop`]).
    pub(crate) async fn failback_now(&self, status: &StatusHub) -> Result<FailbackReport> {
        failback_pass(self.store.as_deref(), self.spool.as_deref(), status).await
    }
}

/// The breaker's probe: the client's own (`PING`, and `ROLE` behind
/// Sentinel), then the server's `maxmemory-policy` (cached by the client).
/// What it finds misconfigured (a refused password or ACL, an evicting
/// policy refused or accepted) goes to the status's `redis.alert`, so it
/// reads differently from an outage; a refusal also keeps the breaker
/// open, so the local side answers.
#[derive(Debug)]
struct CheckedProbe {
    client: RedisClient,
    /// Refuse when the spool is on Redis: it never accepts eviction.
    on_evicting: OnEvictingPolicy,
    status: StatusHub,
}

impl CheckedProbe {
    fn new(config: &ReliabilityConfig, client: &RedisClient, status: &StatusHub) -> Self {
        let on_evicting = if config.spool_backend() == SpoolBackend::Redis {
            OnEvictingPolicy::Refuse
        } else {
            client.on_evicting_policy()
        };
        Self {
            client: client.clone(),
            on_evicting,
            status: status.clone(),
        }
    }

    /// The alert of an evicting policy the configuration accepted.
    async fn accepted_policy(&self) -> Option<String> {
        let policy = self.client.maxmemory_policy().await.ok()?;
        let p = policy.evicting()?;
        Some(format!(
            "the server's maxmemory-policy is {p}, accepted by \
             reliability.redis.onEvictingPolicy: accept: idempotency claims and rate limits \
             may be evicted (a claim evicted is acquired again)"
        ))
    }
}

#[async_trait]
impl Probe for CheckedProbe {
    async fn probe(&self) -> Result<()> {
        self.probe_identity().await.map(|_| ())
    }

    /// The client's probe with the server's identity (so the breaker sees a
    /// Redis that lost its data), then the eviction check.
    async fn probe_identity(&self) -> Result<Option<PrimaryIdentity>> {
        let outcome = match Probe::probe_identity(&self.client).await {
            Ok(identity) => {
                let what = "idempotency, rate limit and spool";
                self.client
                    .check_eviction(what, self.on_evicting)
                    .await
                    .map(|()| identity)
            }
            Err(e) => Err(e),
        };
        let alert = match &outcome {
            Ok(_) => self.accepted_policy().await,
            // Redis answered, and refused: a deployment error.
            Err(e) if !e.is_unavailable() => Some(e.to_string()),
            Err(e) if e.unavailable_reason() == Some(UnavailableReason::Misconfigured) => {
                Some(e.to_string())
            }
            // An outage says nothing about the configuration.
            Err(_) => return outcome,
        };
        self.status
            .update(|s| s.redis.alert = alert.as_deref().map(Redacted::new));
        outcome
    }
}

/// The time one background probe may take: at least a connect and a
/// reply, so a probe can bring back a Redis whose connect takes longer than
/// the callers' deadline (the connect itself runs in the background either
/// way), and never less than the deadline.
fn probe_budget(config: &ReliabilityConfig) -> Duration {
    let deadline = config.fallback.deadline;
    config.redis.as_ref().map_or(deadline, |r| {
        deadline.max(r.connect_timeout + r.response_timeout)
    })
}

/// A background task of the profile, stopped on drop.
#[derive(Debug)]
pub(crate) enum Background {
    /// The breaker's probe (stops itself on drop).
    Probe(#[allow(dead_code)] ProbeTask),
    /// A spawned task, aborted on drop.
    Task(JoinHandle<()>),
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Background::Task(h) = self {
            h.abort();
        }
    }
}

/// Replays local claims and drains local records whenever the breaker
/// closes, and every [`FAILBACK_EVERY`] while it stays closed.
async fn failback_loop(
    breaker: Arc<Breaker>,
    store: Option<Arc<FallbackStore>>,
    spool: Option<Arc<FallbackSpool>>,
    status: StatusHub,
) {
    if store.is_none() && spool.is_none() {
        return;
    }
    let mut changes = breaker.subscribe();
    let mut tick = tokio::time::interval(FAILBACK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = tick.tick() => {}
        }
        if breaker.state() != BreakerState::Closed {
            if let Some(store) = &store {
                // The backlog grows while Redis is away: show it.
                publish_pending(store, &status);
            }
            continue;
        }
        if let Err(e) = failback_pass(store.as_deref(), spool.as_deref(), &status).await {
            warn!(error = %e, "failback: reconciliation stopped; retrying");
        }
    }
}

/// Replays the journal of local claims, then drains the local spool.
async fn failback_pass(
    store: Option<&FallbackStore>,
    spool: Option<&FallbackSpool>,
    status: &StatusHub,
) -> Result<FailbackReport> {
    let mut report = FailbackReport::default();
    if let Some(store) = store {
        if store.pending_reconcile() > 0 {
            let r = store.reconcile().await?;
            info!(
                replayed = r.replayed,
                conflicts = r.conflicts,
                pending = store.pending_reconcile(),
                "failback: idempotency claims replayed to redis"
            );
            report.reconcile = Some(r);
        }
        publish_pending(store, status);
    }
    if let Some(spool) = spool {
        let doubles = spool.double_enqueues();
        status.update(|s| s.fallback.get_or_insert_default().double_enqueues = Some(doubles));
        let d = spool.drain().await?;
        if d.moved + d.duplicates > 0 {
            info!(
                moved = d.moved,
                duplicates = d.duplicates,
                interrupted = d.interrupted,
                "failback: spooled records moved back to redis"
            );
        }
        report.drain = Some(d);
    }
    Ok(report)
}

/// The reconciliation backlog into the status and the metrics.
fn publish_pending(store: &FallbackStore, status: &StatusHub) {
    let pending = store.pending_reconcile();
    reliability_core::metrics::record_reconcile_pending(pending);
    let (journal, completed) = (store.journal_usage(), store.completed_usage());
    status.update(|s| {
        s.pending_reconcile = pending;
        let f = s.fallback.get_or_insert_default();
        (f.journal, f.completed) = (Some(journal), Some(completed));
    });
}
