//! The network and memory phases of the chaos run, shared by the `chaos`
//! example (which prints their reports) and `tests/chaos_network.rs`
//! (which asserts on them): a redis-server that stays up while the path to
//! it or its memory fails.
//!
//! - **black hole**: the harness's fault proxy keeps the connections open
//!   and passes nothing (no FIN, no RST), then heals. Degraded within 1 s,
//!   healthy within 1 s of the healing, no call over the deadline + 50 ms.
//! - **latency**: 80 ms added each way under the 250 ms deadline: the
//!   breaker stays closed and Redis answers the calls.
//! - **out of memory**: `maxmemory` reached under `noeviction`: callers are
//!   answered locally, the status is degraded, and once memory frees the
//!   records the local side took drain back to Redis.
//!
//! Each phase builds the `redis-enabled` profile (spool's local side in
//! memory) on its own server and drives claims (+ complete), rate-limit
//! checks and enqueues from several tasks; at the end every acknowledged
//! id must be leased back from the spool (0 lost) and no error may have
//! reached a caller. Timeouts are tightened where a bound of 1 s needs it:
//! connect and response 300 ms, probe every 100 ms.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use reliability::config::{RedisConfig, ReliabilityConfig};
use reliability::redis::harness::{RedisServer, Resp, ServerOptions};
use reliability::redis::proxy::FaultProxy;
use reliability::status::{BreakerState, HealthStatus, Overall};
use reliability::{
    Claim, Fingerprint, IdempotencyStore, NewRecord, Quota, RateLimiterExt, RecordId, Reliability,
};

/// Lease and retention of the claims.
const TTL: Duration = Duration::from_secs(60);
/// How long a phase waits for the status to turn.
const STATUS_WAIT: Duration = Duration::from_secs(5);
/// The added latency of the latency phase, each way.
const LATENCY: Duration = Duration::from_millis(80);
/// Claims looked up on Redis after the latency phase.
const LOOKED_UP: usize = 20;

/// A phase of this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NetFault {
    /// A black-holed link, then healed.
    BlackHole,
    /// 80 ms added each way.
    Latency,
    /// `maxmemory` reached under `noeviction`, then raised.
    OutOfMemory,
}

impl NetFault {
    pub(crate) const ALL: [NetFault; 3] = [
        NetFault::BlackHole,
        NetFault::Latency,
        NetFault::OutOfMemory,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            NetFault::BlackHole => "black hole",
            NetFault::Latency => "80 ms each way",
            NetFault::OutOfMemory => "maxmemory (noeviction)",
        }
    }
}

/// What one phase measured.
#[derive(Debug, Clone)]
pub(crate) struct NetReport {
    /// The fault.
    pub(crate) fault: NetFault,
    /// How long the fault lasted.
    pub(crate) lasted: Duration,
    /// Calls made.
    pub(crate) calls: u64,
    /// Errors that reached callers, and a few of them.
    pub(crate) errors: u64,
    /// See `errors`.
    pub(crate) error_samples: Vec<String>,
    /// Fresh claims answered other than `Acquired`.
    pub(crate) not_acquired: u64,
    /// The slowest call, and its operation.
    pub(crate) worst: Duration,
    /// See `worst`.
    pub(crate) worst_op: &'static str,
    /// From the fault to the status turning Degraded.
    pub(crate) to_degraded: Option<Duration>,
    /// From the end of the fault to the status turning Healthy.
    pub(crate) to_healthy: Option<Duration>,
    /// Breaker states seen during the phase.
    pub(crate) breaker_states: Vec<BreakerState>,
    /// Claims looked up on Redis after the phase, and those found.
    pub(crate) claims_on_redis: (usize, usize),
    /// Claims waiting to be replayed at the end of the fault.
    pub(crate) pending_reconcile: u64,
    /// Records on Redis after failback (the out-of-memory phase).
    pub(crate) records_on_redis: Option<u64>,
    /// Records acknowledged to producers.
    pub(crate) enqueued: u64,
    /// Acknowledged ids not leased back at the end, and a few of them.
    pub(crate) lost: u64,
    /// See `lost`.
    pub(crate) lost_sample: Vec<String>,
    /// The fallback deadline.
    pub(crate) deadline: Duration,
}

impl NetReport {
    /// The done-when criteria this phase failed (empty: all kept).
    pub(crate) fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        let second = Duration::from_secs(1);
        let name = self.fault.name();
        if self.errors > 0 || self.not_acquired > 0 {
            v.push(format!(
                "{name}: {} errors reached callers, {} fresh claims not acquired (want 0): {:?}",
                self.errors, self.not_acquired, self.error_samples
            ));
        }
        if self.lost > 0 || self.enqueued == 0 {
            v.push(format!(
                "{name}: {} of {} acknowledged records lost (want 0), e.g. {:?}",
                self.lost, self.enqueued, self.lost_sample
            ));
        }
        let late = |d: Option<Duration>| d.is_none_or(|d| d > second);
        match self.fault {
            NetFault::BlackHole => {
                if late(self.to_degraded) || late(self.to_healthy) {
                    v.push(format!(
                        "{name}: degraded after {:?}, healthy after {:?} (want <= 1 s each)",
                        self.to_degraded, self.to_healthy
                    ));
                }
                let bound = self.deadline + Duration::from_millis(50);
                if self.worst > bound {
                    v.push(format!(
                        "{name}: a call ({}) took {:?} (want <= {bound:?})",
                        self.worst_op, self.worst
                    ));
                }
            }
            NetFault::Latency => {
                if self
                    .breaker_states
                    .iter()
                    .any(|b| *b != BreakerState::Closed)
                {
                    v.push(format!(
                        "{name}: the breaker left Closed: {:?}",
                        self.breaker_states
                    ));
                }
                if self.claims_on_redis.0 == 0 || self.claims_on_redis.1 < self.claims_on_redis.0 {
                    v.push(format!(
                        "{name}: {} of {} claims looked up were on Redis",
                        self.claims_on_redis.1, self.claims_on_redis.0
                    ));
                }
            }
            NetFault::OutOfMemory => {
                if self.to_degraded.is_none() || self.to_healthy.is_none() {
                    v.push(format!(
                        "{name}: degraded after {:?}, healthy after {:?}",
                        self.to_degraded, self.to_healthy
                    ));
                }
                if self.records_on_redis != Some(self.enqueued) {
                    v.push(format!(
                        "{name}: {:?} records on Redis after failback, {} enqueued",
                        self.records_on_redis, self.enqueued
                    ));
                }
            }
        }
        v
    }
}

impl fmt::Display for NetReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Option<Duration>| {
            d.map_or("never".into(), |d| {
                format!("{:.0} ms", d.as_secs_f64() * 1e3)
            })
        };
        writeln!(
            f,
            "{} ({:.1} s)",
            self.fault.name(),
            self.lasted.as_secs_f64()
        )?;
        writeln!(
            f,
            "  calls {}  errors to callers {}  fresh claims not acquired {}  worst call {} ({})",
            self.calls,
            self.errors,
            self.not_acquired,
            ms(Some(self.worst)),
            self.worst_op
        )?;
        writeln!(
            f,
            "  degraded after {}  healthy after {}  breaker states {:?}",
            ms(self.to_degraded),
            ms(self.to_healthy),
            self.breaker_states
        )?;
        if self.claims_on_redis.0 > 0 {
            writeln!(
                f,
                "  claims found on Redis {} of {}",
                self.claims_on_redis.1, self.claims_on_redis.0
            )?;
        }
        if let Some(n) = self.records_on_redis {
            writeln!(
                f,
                "  pending reconcile while full {}  records on Redis after failback {n}",
                self.pending_reconcile
            )?;
        }
        writeln!(
            f,
            "  records enqueued {}  lost {} {:?}",
            self.enqueued, self.lost, self.lost_sample
        )?;
        for e in &self.error_samples {
            writeln!(f, "  error: {e}")?;
        }
        Ok(())
    }
}

fn config(redis: RedisConfig, fault: NetFault) -> ReliabilityConfig {
    let mut redis = redis;
    redis.connect_timeout = Duration::from_millis(300);
    redis.response_timeout = Duration::from_millis(300);
    let mut cfg = ReliabilityConfig::redis_enabled(redis);
    cfg.namespace = format!("net{}{}", fault as u8, std::process::id());
    cfg.fallback.probe_interval = Duration::from_millis(100);
    cfg.spool_limits.max_records = 1_000_000;
    cfg
}

/// What the producers saw.
#[derive(Debug, Default)]
struct Load {
    calls: u64,
    errors: u64,
    error_samples: Vec<String>,
    not_acquired: u64,
    worst: Duration,
    worst_op: &'static str,
    enqueued: Vec<String>,
    claimed: Vec<String>,
}

impl Load {
    async fn timed<T>(
        &mut self,
        op: &'static str,
        call: impl std::future::Future<Output = reliability::Result<T>>,
    ) -> Option<T> {
        let t = Instant::now();
        let r = call.await;
        let took = t.elapsed();
        self.calls += 1;
        if took > self.worst {
            self.worst = took;
            self.worst_op = op;
        }
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.errors += 1;
                if self.error_samples.len() < 5 {
                    self.error_samples.push(format!("{op}: {e}"));
                }
                None
            }
        }
    }

    fn merge(&mut self, o: Load) {
        self.calls += o.calls;
        self.errors += o.errors;
        self.error_samples.extend(o.error_samples);
        self.error_samples.truncate(5);
        self.not_acquired += o.not_acquired;
        if o.worst > self.worst {
            self.worst = o.worst;
            self.worst_op = o.worst_op;
        }
        self.enqueued.extend(o.enqueued);
        self.claimed.extend(o.claimed);
    }
}

/// Producers of claims, checks and enqueues until stopped.
struct Producers {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Load>>,
}

impl Producers {
    fn start(r: &Reliability, tasks: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..tasks.max(1))
            .map(|task| tokio::spawn(produce(task, r.clone(), Arc::clone(&stop))))
            .collect();
        Self { stop, tasks }
    }

    async fn stop(self) -> Result<Load, String> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Load::default();
        for t in self.tasks {
            all.merge(t.await.map_err(|e| format!("producer: {e}"))?);
        }
        Ok(all)
    }
}

async fn produce(task: usize, r: Reliability, stop: Arc<AtomicBool>) -> Load {
    let store = Arc::clone(r.idempotency());
    let limiter = Arc::clone(r.rate_limiter());
    let spool = Arc::clone(r.spool().expect("the profile has a spool"));
    let quota = Quota::per_second(10_000).expect("valid quota");
    let fp = Fingerprint::of(b"chaos");
    let mut load = Load::default();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let key = format!("k-{task}-{n}");
        match load.timed("claim", store.claim(&key, &fp, TTL)).await {
            Some(Claim::Acquired(lease)) => {
                load.timed("complete", store.complete(&lease, None, TTL))
                    .await;
                load.claimed.push(key.clone());
            }
            Some(_) => load.not_acquired += 1,
            None => {}
        }
        load.timed("check", limiter.check_one(&key, quota)).await;
        let id = format!("rec-{task}-{n}");
        let rec = NewRecord::new(RecordId::new(id.clone()).expect("valid id"), id.clone());
        if load
            .timed("enqueue", spool.enqueue(vec![rec]))
            .await
            .is_some()
        {
            load.enqueued.push(id);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    load
}

/// A status change: when, the verdict, the breaker's state.
type Change = (Instant, Overall, Option<BreakerState>);

/// Status verdicts and breaker states, timestamped as they change.
#[derive(Debug, Default, Clone)]
struct Log(Arc<Mutex<Vec<Change>>>);

impl Log {
    fn lock(&self) -> MutexGuard<'_, Vec<Change>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn watch(&self, r: &Reliability) -> tokio::task::JoinHandle<()> {
        let mut rx = r.status().subscribe();
        let log = self.clone();
        tokio::spawn(async move {
            loop {
                let (o, b) = {
                    let s: &HealthStatus = &rx.borrow_and_update();
                    (s.overall, s.breaker.as_ref().map(|b| b.state))
                };
                log.lock().push((Instant::now(), o, b));
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
    }

    /// From `from` to the first verdict `want` at or after it (zero when
    /// it already held).
    fn first(&self, from: Instant, want: Overall) -> Option<Duration> {
        let log = self.lock();
        let before = log.iter().rev().find(|(at, _, _)| *at < from).map(|e| e.1);
        let after = log.iter().find(|(at, o, _)| *at >= from && *o == want);
        match (after, before) {
            (Some((at, _, _)), _) => Some(at.saturating_duration_since(from)),
            (None, Some(o)) if o == want => Some(Duration::ZERO),
            _ => None,
        }
    }

    /// Waits (bounded) for `first(from, want)`.
    async fn wait(&self, from: Instant, want: Overall) -> Option<Duration> {
        let t = Instant::now();
        loop {
            if let Some(d) = self.first(from, want) {
                return Some(d);
            }
            if t.elapsed() > STATUS_WAIT {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The breaker's states from `from` on, the one in force then first.
    fn breaker_states(&self, from: Instant) -> Vec<BreakerState> {
        let log = self.lock();
        let before = log.iter().rev().find(|(at, _, _)| *at < from);
        let mut states: Vec<BreakerState> = Vec::new();
        for (_, _, b) in before
            .into_iter()
            .chain(log.iter().filter(|(at, _, _)| *at >= from))
        {
            if let Some(b) = b {
                if states.last() != Some(b) {
                    states.push(*b);
                }
            }
        }
        states
    }
}

/// Failback passes until nothing is left to replay or drain (bounded).
async fn failback(r: &Reliability) -> Result<(), String> {
    let t = Instant::now();
    loop {
        let pass = r
            .failback_now()
            .await
            .map_err(|e| format!("failback: {e}"))?;
        let moved = pass.drain.map_or(0, |d| d.moved + d.duplicates);
        if pass.reconcile.is_none() && moved == 0 {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(30) {
            return Err("failback never ended".into());
        }
    }
}

/// After failback, every record leased back from the spool (and acked).
async fn lease_all(r: &Reliability) -> Result<HashSet<String>, String> {
    failback(r).await?;
    let spool = r.spool().expect("the profile has a spool");
    let mut seen = HashSet::new();
    loop {
        let got = spool
            .lease(512, Duration::from_secs(60))
            .await
            .map_err(|e| format!("lease: {e}"))?;
        if got.is_empty() {
            return Ok(seen);
        }
        for l in got {
            spool.ack(&l.token).await.map_err(|e| format!("ack: {e}"))?;
            seen.insert(l.record.id.as_str().to_string());
        }
    }
}

/// The profile built on `cfg`, healthy, its status logged.
async fn started(cfg: &ReliabilityConfig) -> Result<(Reliability, Log), String> {
    let r = Reliability::from_config(cfg)
        .await
        .map_err(|e| format!("build: {e}"))?;
    let log = Log::default();
    log.watch(&r);
    if log.wait(Instant::now(), Overall::Healthy).await.is_none() {
        return Err(format!("not healthy at start: {:?}", r.status().current()));
    }
    Ok((r, log))
}

/// The report of a phase, before the records are counted.
fn report(fault: NetFault, load: &Load, deadline: Duration) -> NetReport {
    NetReport {
        fault,
        lasted: Duration::ZERO,
        calls: load.calls,
        errors: load.errors,
        error_samples: load.error_samples.clone(),
        not_acquired: load.not_acquired,
        worst: load.worst,
        worst_op: load.worst_op,
        to_degraded: None,
        to_healthy: None,
        breaker_states: Vec::new(),
        claims_on_redis: (0, 0),
        pending_reconcile: 0,
        records_on_redis: None,
        enqueued: load.enqueued.len() as u64,
        lost: 0,
        lost_sample: Vec::new(),
        deadline,
    }
}

/// Runs one phase for about `lasts` of fault, with `tasks` producers.
///
/// # Errors
/// When the profile cannot be built or does not start healthy.
pub(crate) async fn run(
    fault: NetFault,
    tasks: usize,
    lasts: Duration,
) -> Result<NetReport, String> {
    let server = tokio::task::block_in_place(|| match fault {
        NetFault::OutOfMemory => RedisServer::start_with(
            ServerOptions::new()
                .config_line("maxmemory 8mb")
                .config_line("maxmemory-policy noeviction"),
        ),
        _ => RedisServer::start(),
    });
    let proxy = FaultProxy::start(server.port());
    let cfg = config(proxy.config(&server), fault);
    let (r, log) = started(&cfg).await?;
    let producers = Producers::start(&r, tasks);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let hit = Instant::now();
    match fault {
        NetFault::BlackHole => proxy.black_hole(),
        NetFault::Latency => proxy.set_latency(LATENCY),
        NetFault::OutOfMemory => tokio::task::block_in_place(|| server.fill_to_oom()),
    }
    let to_degraded = match fault {
        NetFault::Latency => None,
        _ => log.wait(hit, Overall::Degraded).await,
    };
    tokio::time::sleep(lasts).await;
    let pending = r.status().current().pending_reconcile;
    let end = Instant::now();
    match fault {
        NetFault::BlackHole | NetFault::Latency => proxy.heal(),
        NetFault::OutOfMemory => {
            tokio::task::block_in_place(|| server.cmd(&["CONFIG", "SET", "maxmemory", "0"]));
        }
    }
    let to_healthy = log.wait(end, Overall::Healthy).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let load = producers.stop().await?;

    let mut rep = report(fault, &load, cfg.fallback.deadline);
    rep.lasted = end - hit;
    rep.to_degraded = to_degraded;
    rep.to_healthy = to_healthy;
    rep.breaker_states = log.breaker_states(hit);
    rep.pending_reconcile = pending;
    let ns = &cfg.namespace;
    if fault == NetFault::Latency {
        let looked: Vec<_> = load.claimed.iter().take(LOOKED_UP).collect();
        let found = looked
            .iter()
            .filter(|key| {
                let k = format!("{}:idem:{ns}:{key}", cfg.key_prefix);
                tokio::task::block_in_place(|| server.cmd(&["EXISTS", &k])) == Resp::Int(1)
            })
            .count();
        rep.claims_on_redis = (looked.len(), found);
    }
    if fault == NetFault::OutOfMemory {
        failback(&r).await?;
        let age = format!("{{{}:spool:{ns}}}:age", cfg.key_prefix);
        if let Resp::Int(n) = tokio::task::block_in_place(|| server.cmd(&["ZCARD", &age])) {
            rep.records_on_redis = u64::try_from(n).ok();
        }
    }
    let seen = lease_all(&r).await?;
    let lost: Vec<String> = load
        .enqueued
        .iter()
        .filter(|id| !seen.contains(*id))
        .cloned()
        .collect();
    rep.lost = lost.len() as u64;
    rep.lost_sample = lost.into_iter().take(5).collect();
    Ok(rep)
}
