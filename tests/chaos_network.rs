//! Chaos on a real redis-server that stays up while the path to it or its
//! memory fails: the `redis-enabled` profile (spool's local side in
//! memory) under mixed load from several tasks, through the harness's
//! fault proxy.
//!
//! - A black-holed connection (no FIN, no RST): degraded within 1 s,
//!   healthy within 1 s of the link healing, no call over the deadline +
//!   50 ms.
//! - 80 ms of added latency each way under the 250 ms deadline: the breaker
//!   stays closed and Redis answers.
//! - `maxmemory` reached under `noeviction`: callers are answered locally,
//!   the status is degraded, and once memory frees the local records drain
//!   back to Redis.
//!
//! Each case: 0 errors reached callers and 0 acknowledged spool records
//! lost (every id enqueued is leased back from the spool at the end).
//! The timeouts are tightened where a bound of 1 s needs it: connect and
//! response 300 ms, probe every 100 ms.
#![cfg(feature = "redis")]
#![allow(clippy::print_stdout)] // the cases print their figures

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reliability::config::{RedisConfig, ReliabilityConfig};
use reliability::redis::harness::{RedisServer, Resp, ServerOptions};
use reliability::redis::proxy::FaultProxy;
use reliability::status::{BreakerState, HealthStatus, Overall};
use reliability::{
    Claim, Fingerprint, IdempotencyStore, NewRecord, Quota, RateLimiterExt, RecordId, Reliability,
};

const TASKS: usize = 3;
const TTL: Duration = Duration::from_secs(60);

fn config(redis: RedisConfig, name: &str) -> ReliabilityConfig {
    let mut redis = redis;
    redis.connect_timeout = Duration::from_millis(300);
    redis.response_timeout = Duration::from_millis(300);
    let mut cfg = ReliabilityConfig::redis_enabled(redis);
    cfg.namespace = format!("{name}{}", std::process::id());
    cfg.fallback.probe_interval = Duration::from_millis(100);
    cfg.spool_limits.max_records = 1_000_000;
    cfg
}

/// What the load saw.
#[derive(Debug, Default)]
struct Load {
    calls: u64,
    errors: Vec<String>,
    not_acquired: u64,
    /// The slowest call: when it started, how long, which.
    worst: (Option<Instant>, Duration, &'static str),
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
        if took > self.worst.1 {
            self.worst = (Some(t), took, op);
        }
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.errors.push(format!("{op}: {e}"));
                None
            }
        }
    }
}

/// Producers of claims, checks and enqueues until `stop`.
struct Producers {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Load>>,
}

impl Producers {
    fn start(r: &Reliability) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..TASKS)
            .map(|task| tokio::spawn(produce(task, r.clone(), Arc::clone(&stop))))
            .collect();
        Self { stop, tasks }
    }

    async fn stop(self) -> Load {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Load::default();
        for t in self.tasks {
            let l = t.await.expect("producer");
            all.calls += l.calls;
            all.errors.extend(l.errors);
            all.not_acquired += l.not_acquired;
            if l.worst.1 > all.worst.1 {
                all.worst = l.worst;
            }
            all.enqueued.extend(l.enqueued);
            all.claimed.extend(l.claimed);
        }
        all
    }
}

async fn produce(task: usize, r: Reliability, stop: Arc<AtomicBool>) -> Load {
    let store = Arc::clone(r.idempotency());
    let limiter = Arc::clone(r.rate_limiter());
    let spool = Arc::clone(r.spool().expect("a spool"));
    let quota = Quota::per_second(10_000).expect("quota");
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
        let rec = NewRecord::new(RecordId::new(id.clone()).expect("id"), id.clone());
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

/// Status verdicts and breaker states, timestamped as they change.
type Log = Arc<Mutex<Vec<(Instant, Overall, Option<BreakerState>)>>>;

fn watch_status(r: &Reliability) -> (Log, tokio::task::JoinHandle<()>) {
    let log: Log = Arc::default();
    let mut rx = r.status().subscribe();
    let l = Arc::clone(&log);
    let h = tokio::spawn(async move {
        loop {
            let (o, b) = {
                let s: &HealthStatus = &rx.borrow_and_update();
                (s.overall, s.breaker.as_ref().map(|b| b.state))
            };
            l.lock().unwrap().push((Instant::now(), o, b));
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
    (log, h)
}

/// The first time at or after `from` the verdict was `want`.
fn first(log: &Log, from: Instant, want: Overall) -> Option<Instant> {
    let log = log.lock().unwrap();
    let mut last_before = None;
    for (at, o, _) in log.iter() {
        if *at < from {
            last_before = Some(*o);
            continue;
        }
        if *o == want {
            return Some(*at);
        }
    }
    // Already in `want` when `from` came.
    (last_before == Some(want)).then_some(from)
}

async fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Failback passes until nothing is left to replay or drain.
async fn failback(r: &Reliability) {
    let t = Instant::now();
    loop {
        let pass = r.failback_now().await.expect("failback");
        let moved = pass.drain.map_or(0, |d| d.moved + d.duplicates);
        if pass.reconcile.is_none() && moved == 0 {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "failback never ends");
    }
}

/// After failback, every record leased back from the spool (and acked):
/// the ids.
async fn drain_all(r: &Reliability) -> HashSet<String> {
    failback(r).await;
    let spool = r.spool().expect("a spool");
    let mut seen = HashSet::new();
    loop {
        let got = spool
            .lease(512, Duration::from_secs(60))
            .await
            .expect("lease");
        if got.is_empty() {
            return seen;
        }
        for l in got {
            spool.ack(&l.token).await.expect("ack");
            seen.insert(l.record.id.as_str().to_string());
        }
    }
}

/// 0 caller errors, every claim acquired, 0 lost records.
async fn check_nothing_lost(r: &Reliability, load: &Load) {
    assert!(load.calls > 0);
    assert!(
        load.errors.is_empty(),
        "{} errors reached callers, e.g. {:?}",
        load.errors.len(),
        &load.errors[..load.errors.len().min(5)]
    );
    assert_eq!(load.not_acquired, 0, "fresh keys not acquired");
    let seen = drain_all(r).await;
    let lost: Vec<_> = load
        .enqueued
        .iter()
        .filter(|id| !seen.contains(*id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged records lost, e.g. {:?}",
        lost.len(),
        load.enqueued.len(),
        &lost[..lost.len().min(5)]
    );
}

/// The profile built from `cfg`, healthy, with its status watched.
async fn started(cfg: ReliabilityConfig) -> (Reliability, Log, tokio::task::JoinHandle<()>) {
    let r = Reliability::from_config(&cfg).await.expect("build");
    let (log, watcher) = watch_status(&r);
    wait_until("healthy at start", Duration::from_secs(5), || {
        r.status().current().overall == Overall::Healthy
    })
    .await;
    (r, log, watcher)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holed_connection() {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(server.port());
    let (r, log, watcher) = started(config(proxy.config(&server), "bh")).await;
    let load = Producers::start(&r);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let hit = Instant::now();
    proxy.black_hole();
    wait_until("degraded", Duration::from_secs(5), || {
        first(&log, hit, Overall::Degraded).is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let healed = Instant::now();
    proxy.heal();
    wait_until("healthy again", Duration::from_secs(5), || {
        first(&log, healed, Overall::Healthy).is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let load = load.stop().await;
    watcher.abort();

    let degraded = first(&log, hit, Overall::Degraded).map(|t| t - hit);
    let healthy = first(&log, healed, Overall::Healthy).map(|t| t - healed);
    println!(
        "chaos_network: black hole: {} calls, degraded after {degraded:?}, healthy {healthy:?} \
         after healing, worst call {:?} ({})",
        load.calls, load.worst.1, load.worst.2
    );
    assert!(
        degraded.is_some_and(|d| d <= Duration::from_secs(1)),
        "{degraded:?}"
    );
    assert!(
        healthy.is_some_and(|d| d <= Duration::from_secs(1)),
        "{healthy:?}"
    );
    let bound = r.config().fallback.deadline + Duration::from_millis(50);
    assert!(
        load.worst.1 <= bound,
        "a call ({}) took {:?}",
        load.worst.2,
        load.worst.1
    );
    check_nothing_lost(&r, &load).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eighty_ms_each_way() {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(server.port());
    let (r, log, watcher) = started(config(proxy.config(&server), "lat")).await;
    proxy.set_latency(Duration::from_millis(80));
    log.lock().unwrap().clear();
    let load = Producers::start(&r);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let load = load.stop().await;
    watcher.abort();

    let states: Vec<_> = log.lock().unwrap().iter().map(|(_, _, b)| *b).collect();
    println!(
        "chaos_network: 80 ms each way: {} calls, worst {:?} ({}), breaker states {states:?}",
        load.calls, load.worst.1, load.worst.2
    );
    assert!(
        states.iter().all(|b| *b == Some(BreakerState::Closed)),
        "the breaker left Closed: {states:?}"
    );
    // Answered by Redis: the claims are there.
    let ns = &r.config().namespace;
    for key in load.claimed.iter().take(20) {
        let k = format!("reliability:idem:{ns}:{key}");
        assert_eq!(server.cmd(&["EXISTS", &k]), Resp::Int(1), "{k} on Redis");
    }
    check_nothing_lost(&r, &load).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maxmemory_reached_under_noeviction() {
    let server = RedisServer::start_with(
        ServerOptions::new()
            .config_line("maxmemory 8mb")
            .config_line("maxmemory-policy noeviction"),
    );
    let (r, log, watcher) = started(config(server.config(), "oom")).await;
    let load = Producers::start(&r);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let hit = Instant::now();
    tokio::task::block_in_place(|| server.fill_to_oom());
    wait_until("degraded", Duration::from_secs(5), || {
        first(&log, hit, Overall::Degraded).is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let local = r.status().current();
    let freed = Instant::now();
    server.cmd(&["CONFIG", "SET", "maxmemory", "0"]);
    wait_until("healthy again", Duration::from_secs(5), || {
        first(&log, freed, Overall::Healthy).is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let load = load.stop().await;
    watcher.abort();
    println!(
        "chaos_network: maxmemory: {} calls, degraded after {:?}, worst {:?} ({}), \
         pending reconcile while full {}",
        load.calls,
        first(&log, hit, Overall::Degraded).map(|t| t - hit),
        load.worst.1,
        load.worst.2,
        local.pending_reconcile
    );
    assert!(
        local.redis.degraded || local.overall == Overall::Degraded,
        "{local:?}"
    );
    // Drained back: Redis holds every record, those the local side took too.
    failback(&r).await;
    let age = format!("{{reliability:spool:{}}}:age", r.config().namespace);
    let on_redis = server.cmd(&["ZCARD", &age]);
    assert_eq!(
        on_redis,
        Resp::Int(load.enqueued.len() as i64),
        "records on Redis"
    );
    check_nothing_lost(&r, &load).await;
}
