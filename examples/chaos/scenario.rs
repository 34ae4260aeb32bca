//! The chaos scenario shared by the `chaos` example (which prints the
//! report) and `tests/chaos.rs` (which asserts on it).
//!
//! It starts a redis-server (password, AOF `appendfsync always`, so a kill -9
//! loses no acknowledged write) unless given a URL, builds the
//! `redis-enabled` profile with the spool's local side on disk, and drives
//! mixed load from several tokio tasks while a [`DeliveryWorker`] delivers
//! the spool to an in-process [`Sink`]:
//!
//! - claims of fresh keys (each must be acquired), then `complete`;
//! - claims of a few repeated keys (acquired once, then replayed);
//! - rate-limit checks;
//! - enqueues of unique record ids (each must be delivered).
//!
//! The fault schedule: warm up, kill -9 Redis, wait, restart it, wait for
//! recovery, SIGSTOP it, wait, SIGCONT it, wait, then stop the producers and
//! wait until every enqueued id was delivered (bounded). Every call is timed
//! and counted against the phase it started in; the status watch channel is
//! timestamped on every change of its verdict.
//!
//! With an external server (`redis_url`) nothing can be killed or stopped:
//! the phases run as a plain soak and the fault measurements are absent.

#![allow(dead_code)] // the example and the test each read their part

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use reliability::config::{DiskConfig, RedisConfig, RedisUrl, ReliabilityConfig, Secret};
use reliability::redis::harness::{RedisServer, ServerOptions};
use reliability::status::{BreakerState, Overall};
use reliability::worker::DeliveryError;
use reliability::{
    Claim, DeliveryCounts, DeliveryWorker, Fingerprint, NewRecord, Quota, RateLimiterExt, Record,
    RecordId, Reliability, RetryPolicy, WorkerConfig,
};

/// The password of the server the scenario starts.
const PASSWORD: &str = "chaos-pass";
/// Lease and retention of the fresh keys.
const FRESH_TTL: Duration = Duration::from_secs(60);
/// Lease and retention of the repeated keys and the outage keys: longer than
/// any run, so every second acquisition is one within the TTL.
const KEY_TTL: Duration = Duration::from_secs(600);
/// The worker's lease: short, so a record whose lease was lost with Redis
/// (or taken by a late command after SIGCONT) comes back within the drain.
const WORKER_LEASE: Duration = Duration::from_secs(2);
/// How long the scenario waits for the status to turn healthy or degraded.
const STATUS_WAIT: Duration = Duration::from_secs(5);
/// Calls at least this slow are listed in the report.
const SLOW: Duration = Duration::from_millis(100);
/// How long it waits for failback (claims replayed one by one: a busy
/// outage leaves thousands).
const FAILBACK_WAIT: Duration = Duration::from_secs(30);

/// The delivery worker's retry schedule: milliseconds, not minutes, so
/// retries and their backoff show within a run.
pub(crate) fn retry_policy() -> RetryPolicy {
    RetryPolicy::new(
        [20, 50, 100, 200, 400, 800]
            .into_iter()
            .map(Duration::from_millis)
            .collect(),
        0.1,
    )
    .expect("valid retry policy")
}

/// What to run.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Producer tasks.
    pub(crate) tasks: usize,
    /// Length of each phase (warm up, down, after restart, stopped, after
    /// SIGCONT).
    pub(crate) phase: Duration,
    /// Pause of a producer between two calls.
    pub(crate) pause: Duration,
    /// Bound on the final wait for every enqueued id to be delivered.
    pub(crate) drain_timeout: Duration,
    /// Share of deliveries the sink fails (transiently), to show retries.
    pub(crate) sink_failure_rate: f64,
    /// Keys claimed by the scenario during each outage, checked after
    /// failback.
    pub(crate) outage_keys: usize,
    /// Distinct repeated keys the producers claim.
    pub(crate) repeated_keys: usize,
    /// An external server: no faults are injected.
    pub(crate) redis_url: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            tasks: 8,
            phase: Duration::from_secs(5),
            pause: Duration::from_millis(2),
            drain_timeout: Duration::from_secs(30),
            sink_failure_rate: 0.05,
            outage_keys: 20,
            repeated_keys: 16,
            redis_url: None,
        }
    }
}

/// The phases of the fault schedule, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Phase {
    /// Redis up, before any fault.
    Warmup,
    /// After kill -9, until the restart.
    Killed,
    /// After the restart.
    Restarted,
    /// After SIGSTOP, until SIGCONT.
    Stopped,
    /// After SIGCONT, until the producers stop.
    Resumed,
}

impl Phase {
    pub(crate) const ALL: [Phase; 5] = [
        Phase::Warmup,
        Phase::Killed,
        Phase::Restarted,
        Phase::Stopped,
        Phase::Resumed,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Phase::Warmup => "warm-up",
            Phase::Killed => "killed",
            Phase::Restarted => "restarted",
            Phase::Stopped => "stopped",
            Phase::Resumed => "resumed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn from_index(i: u8) -> Phase {
        Phase::ALL[usize::from(i).min(Phase::ALL.len() - 1)]
    }
}

/// Calls of one phase.
#[derive(Debug, Clone, Default)]
pub(crate) struct PhaseStats {
    /// Calls started in the phase.
    pub(crate) calls: u64,
    /// Calls that returned an unavailable error.
    pub(crate) unavailable: u64,
    /// Calls that returned another error.
    pub(crate) other_errors: u64,
    /// Median latency.
    pub(crate) p50: Duration,
    /// 99th percentile latency.
    pub(crate) p99: Duration,
    /// The slowest call and its operation.
    pub(crate) worst: Duration,
    /// The operation of the slowest call.
    pub(crate) worst_op: &'static str,
    /// Rate-limit checks allowed / denied.
    pub(crate) allowed: u64,
    /// See `allowed`.
    pub(crate) denied: u64,
    /// Repeated keys acquired again while an earlier acquisition's TTL ran.
    pub(crate) reacquired: u64,
    latencies_us: Vec<u32>,
}

impl PhaseStats {
    fn record(&mut self, op: &'static str, took: Duration) {
        self.calls += 1;
        self.latencies_us
            .push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
        if took > self.worst {
            self.worst = took;
            self.worst_op = op;
        }
    }

    fn merge(&mut self, o: &PhaseStats) {
        self.calls += o.calls;
        self.unavailable += o.unavailable;
        self.other_errors += o.other_errors;
        self.allowed += o.allowed;
        self.denied += o.denied;
        self.reacquired += o.reacquired;
        self.latencies_us.extend_from_slice(&o.latencies_us);
        if o.worst > self.worst {
            self.worst = o.worst;
            self.worst_op = o.worst_op;
        }
    }

    fn finish(&mut self) {
        self.latencies_us.sort_unstable();
        let at = |p: f64| -> Duration {
            if self.latencies_us.is_empty() {
                return Duration::ZERO;
            }
            let i = ((self.latencies_us.len() - 1) as f64 * p).round() as usize;
            Duration::from_micros(u64::from(self.latencies_us[i]))
        };
        self.p50 = at(0.50);
        self.p99 = at(0.99);
    }
}

/// One fault and the system's answer to it.
#[derive(Debug, Clone)]
pub(crate) struct FaultReport {
    /// `kill -9` or `SIGSTOP`.
    pub(crate) name: &'static str,
    /// From the fault (the signal call returned) to the end of it (restart
    /// answered PING, or SIGCONT sent).
    pub(crate) down_for: Duration,
    /// From the fault to the status turning Degraded (watch channel).
    pub(crate) to_degraded: Option<Duration>,
    /// From the end of the fault to the status turning Healthy again.
    pub(crate) to_recovered: Option<Duration>,
    /// From the end of the fault to failback done: no claim left to replay
    /// and no record left to drain (driven with `failback_now`).
    pub(crate) to_failback: Option<Duration>,
    /// Claims replayed to Redis by the failback passes the scenario ran.
    pub(crate) replayed: u64,
    /// Replays that found the key already on Redis (Redis's answer wins);
    /// these passes race the background one, whose replays count here.
    pub(crate) conflicts: u64,
    /// Records moved from the local spool to Redis by those passes.
    pub(crate) moved: u64,
    /// Errors of those passes.
    pub(crate) failback_errors: Vec<String>,
    /// `pendingReconcile` of the status at the end of the outage (at least
    /// `outage_claimed` entries, plus the producers' claims, were pending).
    pub(crate) pending_in_status_during_outage: u64,
    /// The slowest call in flight at any time during the fault (from just
    /// before the signal to the end of the fault), whichever phase it
    /// started in, and its operation.
    pub(crate) worst_call: Duration,
    /// See `worst_call`.
    pub(crate) worst_call_op: &'static str,
    /// Status changes to Degraded after the first recovery, within the
    /// following phase (flaps).
    pub(crate) flaps: usize,
    /// Keys the scenario claimed during the outage (all acquired locally).
    pub(crate) outage_claimed: usize,
    /// Outage claims answered with something other than `Acquired`.
    pub(crate) outage_not_acquired: usize,
    /// Of the outage keys, those acquired again after failback (must be 0).
    pub(crate) reacquired_after_failback: usize,
    /// What the claims after failback answered, by kind.
    pub(crate) answers_after: HashMap<&'static str, usize>,
}

/// Backoff observed for one retry step.
#[derive(Debug, Clone)]
pub(crate) struct BackoffStep {
    /// The failed attempt (1 = first try).
    pub(crate) after_attempt: u32,
    /// The schedule's bounds for this step (jitter included).
    pub(crate) scheduled: (Duration, Duration),
    /// Gaps observed from a failed try to the next try of the same id.
    pub(crate) gaps: usize,
    /// Shortest gap.
    pub(crate) min: Duration,
    /// Median gap.
    pub(crate) p50: Duration,
    /// Longest gap.
    pub(crate) max: Duration,
}

/// Everything the scenario measured.
#[derive(Debug, Clone)]
pub(crate) struct Report {
    /// The settings it ran with.
    pub(crate) settings: Settings,
    /// Whether faults were injected (not with an external server).
    pub(crate) faults: bool,
    /// Events, in seconds since the load started.
    pub(crate) timeline: Vec<(Duration, String)>,
    /// Status verdict changes (time since start, verdict, breaker).
    pub(crate) transitions: Vec<(Duration, Overall, Option<BreakerState>)>,
    /// The kill -9 fault.
    pub(crate) kill: Option<FaultReport>,
    /// The SIGSTOP fault.
    pub(crate) stop: Option<FaultReport>,
    /// Calls per phase, in [`Phase::ALL`] order.
    pub(crate) phases: Vec<(Phase, PhaseStats)>,
    /// Calls of the whole run.
    pub(crate) all: PhaseStats,
    /// A few error messages callers saw.
    pub(crate) error_samples: Vec<String>,
    /// Calls of 100 ms or more: start (since the load started), phase,
    /// operation, latency, and the breaker's state when the call started.
    pub(crate) slow_calls: Vec<(
        Duration,
        Phase,
        &'static str,
        Duration,
        Option<BreakerState>,
    )>,
    /// Fresh claims made / answered other than `Acquired`.
    pub(crate) fresh_claims: u64,
    /// See `fresh_claims`.
    pub(crate) fresh_not_acquired: u64,
    /// Records whose enqueue returned `Ok`.
    pub(crate) enqueued: u64,
    /// Distinct enqueued ids the sink received.
    pub(crate) delivered: u64,
    /// Enqueued ids never delivered.
    pub(crate) lost: u64,
    /// A few of the lost ids.
    pub(crate) lost_sample: Vec<String>,
    /// Deliveries beyond the first of an id.
    pub(crate) duplicates: u64,
    /// Ids delivered more than once.
    pub(crate) duplicate_ids: u64,
    /// Ids delivered that were never acknowledged to a producer.
    pub(crate) unknown_delivered: u64,
    /// Deliveries the sink failed on purpose.
    pub(crate) injected_failures: u64,
    /// The worker's totals.
    pub(crate) worker: DeliveryCounts,
    /// Backoff observed per retry step.
    pub(crate) backoff: Vec<BackoffStep>,
    /// Retries that came earlier than the schedule's lower bound.
    pub(crate) early_retries: u64,
    /// From stopping the producers to the last id delivered; `None` if the
    /// drain timed out.
    pub(crate) drain_time: Option<Duration>,
    /// Dead-lettered records left in the spool at the end.
    pub(crate) dead_at_end: u64,
    /// The fallback deadline of one primary call.
    pub(crate) deadline: Duration,
}

impl Report {
    /// The calls of `phase`.
    pub(crate) fn phase(&self, phase: Phase) -> &PhaseStats {
        &self
            .phases
            .iter()
            .find(|(p, _)| *p == phase)
            .expect("every phase is reported")
            .1
    }

    /// The done-when criteria this run failed (empty: all kept).
    pub(crate) fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        let second = Duration::from_secs(1);
        if self.all.unavailable > 0 {
            v.push(format!(
                "{} unavailable errors reached callers (want 0)",
                self.all.unavailable
            ));
        }
        if let Some(k) = &self.kill {
            match k.to_degraded {
                Some(d) if d <= second => {}
                d => v.push(format!("kill -9: degraded after {d:?} (want <= 1 s)")),
            }
            match k.to_recovered {
                Some(d) if d <= second => {}
                d => v.push(format!("restart: healthy after {d:?} (want <= 1 s)")),
            }
        }
        let bound = self.deadline + Duration::from_millis(50);
        if let Some(s) = &self.stop {
            if s.worst_call > bound {
                v.push(format!(
                    "SIGSTOP: a call ({}) took {:?} (want <= deadline + 50 ms = {bound:?})",
                    s.worst_call_op, s.worst_call
                ));
            }
        }
        if self.lost > 0 {
            v.push(format!(
                "{} enqueued ids never delivered (want 0), e.g. {:?}",
                self.lost, self.lost_sample
            ));
        }
        for f in [&self.kill, &self.stop].into_iter().flatten() {
            if f.reacquired_after_failback > 0 {
                v.push(format!(
                    "{}: {} keys claimed during the outage were acquired again after failback (want 0)",
                    f.name, f.reacquired_after_failback
                ));
            }
        }
        v
    }
}

/// Deliveries as the receiver saw them.
#[derive(Debug, Default)]
pub(crate) struct Sink {
    failure_rate: f64,
    by_id: Mutex<HashMap<String, Deliveries>>,
}

/// The tries of one id at the sink.
#[derive(Debug, Default)]
struct Deliveries {
    delivered: u32,
    /// When, the record's attempt count, and whether it succeeded.
    tries: Vec<(Instant, u32, bool)>,
}

impl Sink {
    fn new(failure_rate: f64) -> Self {
        Self {
            failure_rate,
            by_id: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Deliveries>> {
        self.by_id.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn deliver(&self, record: &Record) -> Result<(), DeliveryError> {
        let ok = fastrand::f64() >= self.failure_rate;
        let mut map = self.lock();
        let d = map.entry(record.id.as_str().to_string()).or_default();
        d.tries.push((Instant::now(), record.attempts, ok));
        if ok {
            d.delivered += 1;
            Ok(())
        } else {
            Err(DeliveryError::transient("injected failure"))
        }
    }

    fn delivered(&self, id: &str) -> bool {
        self.lock().get(id).is_some_and(|d| d.delivered > 0)
    }
}

/// State the orchestrator shares with the producers.
#[derive(Debug, Default)]
struct Shared {
    phase: AtomicU8,
    stop: AtomicBool,
    /// Repeated keys: when each was last acquired.
    repeated: Mutex<HashMap<String, Instant>>,
}

impl Shared {
    fn phase(&self) -> Phase {
        Phase::from_index(self.phase.load(Ordering::Relaxed))
    }

    fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Relaxed);
    }
}

/// What one producer saw.
#[derive(Debug, Default)]
struct TaskStats {
    phases: Vec<PhaseStats>,
    errors: Vec<String>,
    /// Calls of at least [`SLOW`]: start, phase, operation, latency.
    slow: Vec<(Instant, Phase, &'static str, Duration)>,
    enqueued: Vec<String>,
    fresh_claims: u64,
    fresh_not_acquired: u64,
}

impl TaskStats {
    fn new() -> Self {
        Self {
            phases: vec![PhaseStats::default(); Phase::ALL.len()],
            ..Self::default()
        }
    }

    /// Runs one call, timing it against the phase it starts in.
    async fn timed<T>(
        &mut self,
        shared: &Shared,
        op: &'static str,
        call: impl Future<Output = reliability::Result<T>>,
    ) -> Option<T> {
        let phase = shared.phase();
        let t0 = Instant::now();
        let r = call.await;
        let took = t0.elapsed();
        let stats = &mut self.phases[phase.index()];
        stats.record(op, took);
        if took >= SLOW && self.slow.len() < 10_000 {
            self.slow.push((t0, phase, op, took));
        }
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                if e.is_unavailable() {
                    stats.unavailable += 1;
                } else {
                    stats.other_errors += 1;
                }
                if self.errors.len() < 5 {
                    self.errors.push(format!("{} ({op}): {e}", phase.name()));
                }
                None
            }
        }
    }
}

/// The fingerprint of every claim.
fn fingerprint() -> Fingerprint {
    Fingerprint::of("chaos payload")
}

/// One producer: claims, checks and enqueues until told to stop.
async fn producer(
    task: usize,
    r: Reliability,
    shared: Arc<Shared>,
    settings: Settings,
) -> TaskStats {
    let store = Arc::clone(r.idempotency());
    let limiter = Arc::clone(r.rate_limiter());
    let spool = Arc::clone(r.spool().expect("the profile has a spool"));
    let quota = Quota::per_second(500)
        .and_then(|q| q.with_burst(50))
        .expect("valid quota");
    let fp = fingerprint();
    let mut rng = fastrand::Rng::with_seed(task as u64 + 1);
    let mut st = TaskStats::new();
    let mut n: u64 = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        n += 1;
        match (n + task as u64) % 4 {
            0 => {
                let key = format!("fresh-{task}-{n}");
                st.fresh_claims += 1;
                match st
                    .timed(&shared, "claim", store.claim(&key, &fp, FRESH_TTL))
                    .await
                {
                    Some(Claim::Acquired(lease)) => {
                        st.timed(
                            &shared,
                            "complete",
                            store.complete(&lease, Some("done".into()), FRESH_TTL),
                        )
                        .await;
                    }
                    Some(_) => st.fresh_not_acquired += 1,
                    None => {}
                }
            }
            1 => {
                let key = format!("rep-{}", rng.usize(0..settings.repeated_keys.max(1)));
                let phase = shared.phase();
                if let Some(Claim::Acquired(lease)) = st
                    .timed(&shared, "claim", store.claim(&key, &fp, KEY_TTL))
                    .await
                {
                    let now = Instant::now();
                    let before = shared
                        .repeated
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key.clone(), now);
                    if before.is_some_and(|t| now.duration_since(t) < KEY_TTL) {
                        st.phases[phase.index()].reacquired += 1;
                    }
                    st.timed(
                        &shared,
                        "complete",
                        store.complete(&lease, Some("done".into()), KEY_TTL),
                    )
                    .await;
                }
            }
            2 => {
                let key = format!("tenant-{}", rng.usize(0..8));
                let phase = shared.phase();
                if let Some(d) = st
                    .timed(&shared, "check", limiter.check_one(&key, quota))
                    .await
                {
                    let s = &mut st.phases[phase.index()];
                    if d.is_allowed() {
                        s.allowed += 1;
                    } else {
                        s.denied += 1;
                    }
                }
            }
            _ => {
                let id = format!("rec-{task:02}-{n:08}");
                let record =
                    NewRecord::new(RecordId::new(id.clone()).expect("valid id"), id.clone());
                if st
                    .timed(&shared, "enqueue", spool.enqueue(vec![record]))
                    .await
                    .is_some()
                {
                    st.enqueued.push(id);
                }
            }
        }
        tokio::time::sleep(settings.pause).await;
    }
    st
}

/// The status verdict changes, timestamped as the watch channel delivers
/// them.
type Transitions = Arc<Mutex<Vec<(Instant, Overall, Option<BreakerState>)>>>;

fn spawn_watcher(r: &Reliability, log: Transitions) -> tokio::task::JoinHandle<()> {
    let mut rx = r.status().subscribe();
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let (overall, breaker) = {
                let s = rx.borrow_and_update();
                (s.overall, s.breaker.as_ref().map(|b| b.state))
            };
            let now = Instant::now();
            if last != Some((overall, breaker)) {
                last = Some((overall, breaker));
                log.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((now, overall, breaker));
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
}

/// Waits (bounded) for the verdict `want`; `true` if it came.
async fn wait_overall(r: &Reliability, want: Overall, within: Duration) -> bool {
    let mut rx = r.status().subscribe();
    let came = tokio::time::timeout(within, rx.wait_for(|s| s.overall == want))
        .await
        .is_ok_and(|r| r.is_ok());
    came
}

/// Runs failback passes ([`Reliability::failback_now`], as an operator
/// would; the background task runs its own too) until Redis takes traffic
/// and no claim is left to replay nor record to drain; the time from `from`,
/// or `None` if that did not happen `within`.
async fn wait_failback(
    r: &Reliability,
    from: Instant,
    within: Duration,
    report: &mut FaultReport,
) -> Option<Duration> {
    let deadline = Instant::now() + within;
    loop {
        match r.failback_now().await {
            Ok(pass) => {
                if let Some(c) = pass.reconcile {
                    report.replayed += c.replayed;
                    report.conflicts += c.conflicts;
                }
                let drained = pass.drain.map_or(0, |d| d.moved + d.duplicates);
                report.moved += drained;
                if pass.reconcile.is_none()
                    && drained == 0
                    && r.status().current().overall == Overall::Healthy
                {
                    return Some(from.elapsed());
                }
            }
            Err(e) => {
                if report.failback_errors.len() < 3 {
                    report.failback_errors.push(e.to_string());
                }
            }
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs a blocking harness call without stalling the other tasks of this
/// worker thread.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Claims `n` outage keys (named after `fault`); returns the keys acquired.
async fn claim_outage_keys(
    r: &Reliability,
    fault: &str,
    n: usize,
    report: &mut FaultReport,
) -> Vec<String> {
    let store = r.idempotency();
    let fp = fingerprint();
    let mut keys = Vec::new();
    for i in 0..n {
        let key = format!("outage-{fault}-{i}");
        match store.claim(&key, &fp, KEY_TTL).await {
            Ok(Claim::Acquired(lease)) => {
                report.outage_claimed += 1;
                // Half completed, half left in progress.
                if i % 2 == 0 {
                    let _ = store.complete(&lease, Some("outage".into()), KEY_TTL).await;
                }
                keys.push(key);
            }
            _ => report.outage_not_acquired += 1,
        }
    }
    keys
}

/// Claims the outage keys again after failback.
async fn check_outage_keys(r: &Reliability, keys: &[String], report: &mut FaultReport) {
    let store = r.idempotency();
    let fp = fingerprint();
    for key in keys {
        let kind = match store.claim(key, &fp, KEY_TTL).await {
            Ok(Claim::Acquired(lease)) => {
                report.reacquired_after_failback += 1;
                let _ = store.release(&lease).await;
                "acquired"
            }
            Ok(Claim::Completed(_)) => "completed",
            Ok(Claim::InProgress { .. }) => "in progress",
            Ok(Claim::Mismatch) => "mismatch",
            Err(_) => "error",
        };
        *report.answers_after.entry(kind).or_default() += 1;
    }
}

fn fault_report(name: &'static str) -> FaultReport {
    FaultReport {
        name,
        down_for: Duration::ZERO,
        to_degraded: None,
        to_recovered: None,
        to_failback: None,
        worst_call: Duration::ZERO,
        worst_call_op: "",
        replayed: 0,
        conflicts: 0,
        moved: 0,
        failback_errors: Vec::new(),
        pending_in_status_during_outage: 0,
        flaps: 0,
        outage_claimed: 0,
        outage_not_acquired: 0,
        reacquired_after_failback: 0,
        answers_after: HashMap::new(),
    }
}

/// The instants of one fault, to read the transitions against.
struct FaultTimes {
    /// Just before the fault signal.
    start: Instant,
    /// The signal call returned.
    hit: Instant,
    /// Just before the end of the fault (restart / SIGCONT).
    end_start: Instant,
    /// Restart answered PING / SIGCONT sent.
    end: Instant,
    /// End of the phase after the fault.
    settled: Instant,
}

/// The slowest call in flight during the fault: the worst of its phase,
/// and of the slow calls (every call of [`SLOW`] or more is listed) whose
/// run overlaps the fault, whichever phase they started in.
fn worst_during(
    report: &mut FaultReport,
    t: &FaultTimes,
    phase: &PhaseStats,
    slow: &[(Instant, Phase, &'static str, Duration)],
) {
    report.worst_call = phase.worst;
    report.worst_call_op = phase.worst_op;
    for (at, _, op, took) in slow {
        if *at <= t.end && *at + *took >= t.start && *took > report.worst_call {
            report.worst_call = *took;
            report.worst_call_op = op;
        }
    }
}

fn read_transitions(
    report: &mut FaultReport,
    t: &FaultTimes,
    log: &[(Instant, Overall, Option<BreakerState>)],
) {
    report.down_for = t.end.saturating_duration_since(t.hit);
    report.to_degraded = log
        .iter()
        .find(|(at, o, _)| *at >= t.start && *o == Overall::Degraded)
        .map(|(at, _, _)| at.saturating_duration_since(t.hit));
    let healthy = log
        .iter()
        .find(|(at, o, _)| *at >= t.end_start && *o == Overall::Healthy)
        .map(|(at, _, _)| *at);
    report.to_recovered = healthy.map(|at| at.saturating_duration_since(t.end));
    if let Some(h) = healthy {
        report.flaps = log
            .iter()
            .filter(|(at, o, _)| *at > h && *at <= t.settled && *o == Overall::Degraded)
            .count();
    }
}

fn server() -> RedisServer {
    RedisServer::start_with(
        ServerOptions::new()
            .password(PASSWORD)
            .persistence(true)
            .config_line("appendonly yes")
            .config_line("appendfsync always"),
    )
}

fn config(redis: RedisConfig, dir: &Path) -> ReliabilityConfig {
    let mut cfg = ReliabilityConfig::redis_enabled(redis);
    cfg.namespace = format!("chaos{}", std::process::id());
    cfg.disk = Some(DiskConfig::new(dir));
    cfg.spool_limits.max_records = 1_000_000;
    cfg
}

async fn sleep_until(t: Instant) {
    tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await;
}

/// Runs the scenario (see the module docs).
///
/// # Errors
/// When the profile cannot be built or an external URL is invalid.
///
/// # Panics
/// When the harness cannot start or signal redis-server.
pub(crate) async fn run(settings: &Settings) -> Result<Report, String> {
    let mut owned = match &settings.redis_url {
        None => Some(blocking(server)),
        Some(_) => None,
    };
    let redis_config = match (&owned, &settings.redis_url) {
        (Some(s), _) => {
            let mut c = s.config();
            c.password = Some(Secret::new(PASSWORD));
            c
        }
        (None, Some(url)) => {
            RedisConfig::standalone(RedisUrl::new(url.clone()).map_err(|e| e.to_string())?)
        }
        (None, None) => unreachable!("a server or a URL"),
    };
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let cfg = config(redis_config, dir.path());
    let deadline = cfg.fallback.deadline;
    let r = Reliability::from_config(&cfg)
        .await
        .map_err(|e| format!("build: {e}"))?;
    if !wait_overall(&r, Overall::Healthy, STATUS_WAIT).await {
        return Err(format!(
            "Redis not healthy at start: {:?}",
            r.status().current().breaker
        ));
    }

    let t0 = Instant::now();
    let mut timeline: Vec<(Duration, String)> = Vec::new();
    let mut event = |what: String| timeline.push((t0.elapsed(), what));
    let log: Transitions = Arc::default();
    let watcher = spawn_watcher(&r, Arc::clone(&log));

    let sink = Arc::new(Sink::new(settings.sink_failure_rate));
    let spool = Arc::clone(r.spool().expect("the profile has a spool"));
    let worker_config = WorkerConfig::default()
        .with_batch_size(64)
        .with_max_concurrency(16)
        .with_lease_ttl(WORKER_LEASE)
        .with_poll_interval(Duration::from_millis(20))
        .with_stats_interval(Duration::from_secs(1))
        .with_retry(retry_policy());
    let s = Arc::clone(&sink);
    let worker = DeliveryWorker::new(spool, worker_config, move |record: Record| {
        let s = Arc::clone(&s);
        async move { s.deliver(&record) }
    })
    .map_err(|e| format!("worker: {e}"))?
    .spawn();

    let shared = Arc::new(Shared::default());
    let producers: Vec<_> = (0..settings.tasks.max(1))
        .map(|task| {
            tokio::spawn(producer(
                task,
                r.clone(),
                Arc::clone(&shared),
                settings.clone(),
            ))
        })
        .collect();
    event(format!("load started: {} producer tasks", settings.tasks));

    let p = settings.phase;
    let mut kill = None;
    let mut stop = None;
    let mut fault_times = Vec::new();
    shared.set_phase(Phase::Warmup);
    sleep_until(t0 + p).await;
    if let Some(server) = owned.as_mut() {
        // kill -9, wait, restart.
        let mut k = fault_report("kill -9");
        shared.set_phase(Phase::Killed);
        let start = Instant::now();
        let pid = server.pid();
        let hit = blocking(|| {
            server.kill9();
            Instant::now()
        });
        event(format!("kill -9 redis-server (pid {pid})"));
        if wait_overall(&r, Overall::Degraded, STATUS_WAIT).await {
            event("status degraded".into());
        }
        let keys = claim_outage_keys(&r, "kill", settings.outage_keys, &mut k).await;
        sleep_until(hit + p).await;
        k.pending_in_status_during_outage = r.status().current().pending_reconcile;
        shared.set_phase(Phase::Restarted);
        let end_start = Instant::now();
        let end = blocking(|| {
            server.restart();
            Instant::now()
        });
        event(format!("redis-server restarted (pid {})", server.pid()));
        if wait_overall(&r, Overall::Healthy, STATUS_WAIT).await {
            event("status healthy".into());
        }
        k.to_failback = wait_failback(&r, end, FAILBACK_WAIT, &mut k).await;
        check_outage_keys(&r, &keys, &mut k).await;
        sleep_until(end + p).await;
        fault_times.push(FaultTimes {
            start,
            hit,
            end_start,
            end,
            settled: Instant::now(),
        });
        kill = Some(k);

        // SIGSTOP, wait, SIGCONT.
        let mut s = fault_report("SIGSTOP");
        shared.set_phase(Phase::Stopped);
        let start = Instant::now();
        let hit = blocking(|| {
            server.sigstop();
            Instant::now()
        });
        event("SIGSTOP redis-server".into());
        if wait_overall(&r, Overall::Degraded, STATUS_WAIT).await {
            event("status degraded".into());
        }
        let keys = claim_outage_keys(&r, "stop", settings.outage_keys, &mut s).await;
        sleep_until(hit + p).await;
        s.pending_in_status_during_outage = r.status().current().pending_reconcile;
        shared.set_phase(Phase::Resumed);
        let end_start = Instant::now();
        let end = blocking(|| {
            server.sigcont();
            Instant::now()
        });
        event("SIGCONT redis-server".into());
        if wait_overall(&r, Overall::Healthy, STATUS_WAIT).await {
            event("status healthy".into());
        }
        s.to_failback = wait_failback(&r, end, FAILBACK_WAIT, &mut s).await;
        check_outage_keys(&r, &keys, &mut s).await;
        sleep_until(end + p).await;
        fault_times.push(FaultTimes {
            start,
            hit,
            end_start,
            end,
            settled: Instant::now(),
        });
        stop = Some(s);
    } else {
        event("external server: no fault injected (soak only)".into());
        for phase in &Phase::ALL[1..] {
            shared.set_phase(*phase);
            tokio::time::sleep(p).await;
        }
    }

    // Stop the producers, then wait for every enqueued id.
    shared.stop.store(true, Ordering::Relaxed);
    let mut tasks = Vec::new();
    for h in producers {
        tasks.push(h.await.map_err(|e| format!("producer: {e}"))?);
    }
    let stopped_at = Instant::now();
    event("producers stopped".into());
    let enqueued: Vec<String> = tasks.iter().flat_map(|t| t.enqueued.clone()).collect();
    let drain_deadline = stopped_at + settings.drain_timeout;
    let mut missing: Vec<&String> = enqueued.iter().collect();
    let drain_time = loop {
        missing.retain(|id| !sink.delivered(id));
        if missing.is_empty() {
            break Some(stopped_at.elapsed());
        }
        if Instant::now() > drain_deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    event(match drain_time {
        Some(_) => "every enqueued id delivered".into(),
        None => format!("drain timed out: {} ids missing", missing.len()),
    });
    let worker_totals = worker.shutdown().await;
    let dead_at_end = match r.spool().expect("spool").stats().await {
        Ok(s) => s.dead,
        Err(_) => 0,
    };
    watcher.abort();

    // Per-phase call statistics.
    let mut phases: Vec<(Phase, PhaseStats)> = Phase::ALL
        .iter()
        .map(|p| (*p, PhaseStats::default()))
        .collect();
    let mut all = PhaseStats::default();
    let mut error_samples = Vec::new();
    let mut slow: Vec<(Instant, Phase, &'static str, Duration)> = Vec::new();
    let (mut fresh_claims, mut fresh_not_acquired) = (0, 0);
    for t in &tasks {
        for (i, s) in t.phases.iter().enumerate() {
            phases[i].1.merge(s);
            all.merge(s);
        }
        error_samples.extend(t.errors.iter().cloned());
        slow.extend(t.slow.iter().copied());
        fresh_claims += t.fresh_claims;
        fresh_not_acquired += t.fresh_not_acquired;
    }
    error_samples.truncate(10);
    for (_, s) in &mut phases {
        s.finish();
    }
    all.finish();

    // Transitions against the faults.
    let log = log.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if let (Some(k), Some(t)) = (kill.as_mut(), fault_times.first()) {
        read_transitions(k, t, &log);
        worst_during(k, t, &phases[Phase::Killed.index()].1, &slow);
    }
    if let (Some(s), Some(t)) = (stop.as_mut(), fault_times.get(1)) {
        read_transitions(s, t, &log);
        worst_during(s, t, &phases[Phase::Stopped.index()].1, &slow);
    }

    // Delivery: lost, duplicates, retries and their backoff.
    let policy = retry_policy();
    let by_id = sink.lock();
    let lost_ids: Vec<String> = missing.iter().map(|s| (*s).clone()).collect();
    let enqueued_set: std::collections::HashSet<&str> =
        enqueued.iter().map(String::as_str).collect();
    let mut duplicates = 0u64;
    let mut duplicate_ids = 0u64;
    let mut unknown_delivered = 0u64;
    let mut injected_failures = 0u64;
    let mut delivered = 0u64;
    let mut gaps: HashMap<u32, Vec<Duration>> = HashMap::new();
    let mut early_retries = 0u64;
    for (id, d) in by_id.iter() {
        if d.delivered > 0 {
            if enqueued_set.contains(id.as_str()) {
                delivered += 1;
            } else {
                unknown_delivered += 1;
            }
        }
        if d.delivered > 1 {
            duplicate_ids += 1;
            duplicates += u64::from(d.delivered - 1);
        }
        let mut tries = d.tries.clone();
        tries.sort_by_key(|t| t.0);
        for w in tries.windows(2) {
            let (at, attempts, ok) = w[0];
            if ok {
                continue;
            }
            injected_failures += 1;
            let gap = w[1].0.duration_since(at);
            if let Some((lo, _)) = policy.bounds_after(attempts) {
                // 5 ms of slack: the spools' clocks and ours.
                if gap + Duration::from_millis(5) < lo {
                    early_retries += 1;
                }
            }
            gaps.entry(attempts).or_default().push(gap);
        }
        if tries.last().is_some_and(|t| !t.2) {
            injected_failures += 1;
        }
    }
    drop(by_id);
    let mut steps: Vec<u32> = gaps.keys().copied().collect();
    steps.sort_unstable();
    let backoff = steps
        .into_iter()
        .filter_map(|step| {
            let mut g = gaps.remove(&step)?;
            g.sort_unstable();
            Some(BackoffStep {
                after_attempt: step,
                scheduled: policy
                    .bounds_after(step)
                    .unwrap_or((Duration::ZERO, Duration::ZERO)),
                gaps: g.len(),
                min: g[0],
                p50: g[g.len() / 2],
                max: g[g.len() - 1],
            })
        })
        .collect();

    slow.sort_by_key(|c| c.0);
    let slow_calls = slow
        .iter()
        .map(|(at, phase, op, took)| {
            let breaker = log
                .iter()
                .take_while(|(t, _, _)| t <= at)
                .last()
                .and_then(|(_, _, b)| *b);
            (
                at.saturating_duration_since(t0),
                *phase,
                *op,
                *took,
                breaker,
            )
        })
        .collect();
    let transitions = log
        .iter()
        .map(|(at, o, b)| (at.saturating_duration_since(t0), *o, *b))
        .collect();
    drop(owned);
    Ok(Report {
        settings: settings.clone(),
        faults: settings.redis_url.is_none(),
        timeline,
        transitions,
        kill,
        stop,
        phases,
        all,
        error_samples,
        slow_calls,
        fresh_claims,
        fresh_not_acquired,
        enqueued: enqueued.len() as u64,
        delivered,
        lost: lost_ids.len() as u64,
        lost_sample: lost_ids.into_iter().take(5).collect(),
        duplicates,
        duplicate_ids,
        unknown_delivered,
        injected_failures,
        worker: worker_totals,
        backoff,
        early_retries,
        drain_time,
        dead_at_end,
        deadline,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn opt_ms(d: Option<Duration>) -> String {
    d.map_or_else(|| "never".to_string(), ms)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.settings;
        writeln!(
            f,
            "chaos report: profile redis-enabled (Fallback(redis, local), spool local side on disk)"
        )?;
        writeln!(
            f,
            "  {} producer tasks, {:.1} s per phase, fallback deadline {}, sink failure rate {:.0} %",
            s.tasks,
            s.phase.as_secs_f64(),
            ms(self.deadline),
            s.sink_failure_rate * 100.0
        )?;
        if !self.faults {
            writeln!(
                f,
                "  external server: no fault injected; the phases are a plain soak \
                 (named after the fault steps they stand in for)"
            )?;
        }
        writeln!(f, "\ntimeline (s since load start)")?;
        for (at, what) in &self.timeline {
            writeln!(f, "  {:7.3}  {what}", at.as_secs_f64())?;
        }
        writeln!(f, "\nstatus changes (watch channel)")?;
        for (at, o, b) in &self.transitions {
            writeln!(f, "  {:7.3}  {o:?} (breaker {b:?})", at.as_secs_f64())?;
        }
        if self.kill.is_some() || self.stop.is_some() {
            writeln!(f, "\nfaults")?;
            writeln!(
                f,
                "  {:<10} {:>12} {:>16} {:>18} {:>18} {:>6} {:>26}",
                "fault",
                "downtime",
                "time to degraded",
                "time to recovered",
                "failback done",
                "flaps",
                "worst call in flight"
            )?;
            for k in [&self.kill, &self.stop].into_iter().flatten() {
                writeln!(
                    f,
                    "  {:<10} {:>12} {:>16} {:>18} {:>18} {:>6} {:>26}",
                    k.name,
                    ms(k.down_for),
                    opt_ms(k.to_degraded),
                    opt_ms(k.to_recovered),
                    opt_ms(k.to_failback),
                    k.flaps,
                    format!("{} ({})", ms(k.worst_call), k.worst_call_op)
                )?;
            }
            writeln!(
                f,
                "  (degraded: from the signal returning; recovered: from restart answering PING / SIGCONT;\n   \
                 failback done: no claim left to replay nor record to drain, driven by failback_now passes\n   \
                 that race the background pass, so both replay the journal)"
            )?;
        }
        writeln!(f, "\ncalls by phase (latency from the caller's side)")?;
        writeln!(
            f,
            "  {:<10} {:>7} {:>11} {:>6} {:>10} {:>10} {:>20} {:>13} {:>10}",
            "phase",
            "calls",
            "unavailable",
            "other",
            "p50",
            "p99",
            "worst (op)",
            "rl allow/deny",
            "re-acq"
        )?;
        let row = |f: &mut fmt::Formatter<'_>, name: &str, p: &PhaseStats| {
            writeln!(
                f,
                "  {:<10} {:>7} {:>11} {:>6} {:>10} {:>10} {:>20} {:>13} {:>10}",
                name,
                p.calls,
                p.unavailable,
                p.other_errors,
                ms(p.p50),
                ms(p.p99),
                format!("{} ({})", ms(p.worst), p.worst_op),
                format!("{}/{}", p.allowed, p.denied),
                p.reacquired
            )
        };
        for (phase, p) in &self.phases {
            row(f, phase.name(), p)?;
        }
        row(f, "all", &self.all)?;
        writeln!(
            f,
            "  (re-acq: repeated keys acquired again within their TTL; while Redis is dead the local store cannot know them)"
        )?;
        for e in &self.error_samples {
            writeln!(f, "  error seen: {e}")?;
        }
        writeln!(
            f,
            "  calls of 100 ms or more: {} (start s, phase, op, latency, breaker at start)",
            self.slow_calls.len()
        )?;
        for (at, phase, op, took, breaker) in self.slow_calls.iter().take(12) {
            writeln!(
                f,
                "    {:7.3}  {:<9} {:<8} {:>10}  {breaker:?}",
                at.as_secs_f64(),
                phase.name(),
                op,
                ms(*took)
            )?;
        }
        writeln!(f, "\nidempotency")?;
        writeln!(
            f,
            "  fresh keys: {} claims, {} not acquired",
            self.fresh_claims, self.fresh_not_acquired
        )?;
        for k in [&self.kill, &self.stop].into_iter().flatten() {
            let mut answers: Vec<_> = k.answers_after.iter().collect();
            answers.sort();
            writeln!(
                f,
                "  {}: {} keys claimed during the outage ({} not acquired); after failback: {} acquired again, answers {:?}",
                k.name, k.outage_claimed, k.outage_not_acquired, k.reacquired_after_failback, answers
            )?;
            writeln!(
                f,
                "    failback_now passes of the scenario: {} claims replayed, {} found on Redis already (includes keys the background pass replayed first), {} records moved back, errors {:?}",
                k.replayed, k.conflicts, k.moved, k.failback_errors
            )?;
            writeln!(
                f,
                "    status pendingReconcile read at the end of the outage: {}",
                k.pending_in_status_during_outage
            )?;
        }
        writeln!(f, "\nspool and delivery")?;
        writeln!(f, "  records enqueued (acknowledged): {}", self.enqueued)?;
        writeln!(f, "  delivered (distinct ids):        {}", self.delivered)?;
        writeln!(
            f,
            "  lost:                            {} {:?}",
            self.lost, self.lost_sample
        )?;
        writeln!(
            f,
            "  duplicates:                      {} extra deliveries of {} ids",
            self.duplicates, self.duplicate_ids
        )?;
        writeln!(
            f,
            "  delivered but never acknowledged to a producer: {}",
            self.unknown_delivered
        )?;
        writeln!(
            f,
            "  drain after producers stopped:   {}",
            opt_ms(self.drain_time)
        )?;
        writeln!(f, "  dead letters at the end:         {}", self.dead_at_end)?;
        let w = &self.worker;
        writeln!(
            f,
            "  worker: leased {}, delivered {}, retried {}, failures {}, dead-lettered {}, lease lost {}, spool errors {}",
            w.leased, w.delivered, w.retried, w.failures, w.dead_lettered, w.lease_lost, w.spool_errors
        )?;
        writeln!(
            f,
            "  retries: {} injected sink failures; backoff from a failed try to the next try of the same id:",
            self.injected_failures
        )?;
        for b in &self.backoff {
            writeln!(
                f,
                "    after try {}: scheduled {}..{}, observed n={} min {} p50 {} max {}",
                b.after_attempt,
                ms(b.scheduled.0),
                ms(b.scheduled.1),
                b.gaps,
                ms(b.min),
                ms(b.p50),
                ms(b.max)
            )?;
        }
        writeln!(
            f,
            "  retries earlier than scheduled: {}",
            self.early_retries
        )?;
        let v = self.violations();
        writeln!(f, "\ndone-when")?;
        if v.is_empty() {
            writeln!(f, "  all kept")?;
        }
        for x in &v {
            writeln!(f, "  VIOLATED: {x}")?;
        }
        Ok(())
    }
}
