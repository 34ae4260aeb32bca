//! Randomized schedules of `Fallback(faulty primary, memory)`: the primary
//! is a real in-process backend wrapped so a seeded schedule makes its
//! calls unavailable, slow (past the deadline), or lost after they took
//! effect; several tasks interleave claim / complete / release / enqueue /
//! lease / ack / nack / reconcile / drain and probe successes.
//!
//! Invariants, checked on every schedule:
//! - at most one `Acquired` per key among all callers while a lease on it
//!   is held (leases never run out during a schedule: the clock stands);
//! - no completion lost after reconcile: the primary answers `Completed`
//!   for every key a caller completed (unless a lost reply left a claim
//!   there that no one knows of, a counted conflict);
//! - no spool record lost: every record enqueued is acked or still there;
//! - attempts never grow without a delivery: a record's attempts are at
//!   most the times it was handed out.
//!
//! `FALLBACK_RANDOM_SCHEDULES` (default 1000) sets how many schedules run,
//! from a base seed printed at the start; `FALLBACK_RANDOM_SEED=<n>` runs
//! only schedule `n` (a failure prints its seed).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use reliability::fallback::{Breaker, BreakerConfig, Fallback};
use reliability::memory::{MemoryIdempotencyStore, MemorySpool};
use reliability::status::BreakerState;
use reliability::{
    Capabilities, Claim, DeadReason, DeadRecord, Enqueued, Error, Fingerprint, IdempotencyStore,
    Lease, Leased, ManualClock, NackOutcome, NewRecord, RecordId, Result, Spool, SpoolStats,
    SpoolToken, UnavailableReason,
};

const DEADLINE: Duration = Duration::from_millis(250);
const LEASE: Duration = Duration::from_secs(3_600);
const KEYS: usize = 6;
const TASKS: usize = 3;
const OPS: usize = 30;

/// What the schedule does to one primary call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// Fails before doing anything.
    Unavailable,
    /// Takes longer than the deadline, then would do it (dropped first).
    Slow,
    /// Takes effect, then the answer is lost (past the deadline).
    Lost,
}

/// The seeded schedule shared by the faulty primaries, and what their
/// faults left behind that the invariants must allow for.
#[derive(Debug)]
struct Schedule {
    rng: Mutex<fastrand::Rng>,
    fault_rate: f64,
    healed: std::sync::atomic::AtomicBool,
    /// Keys a claim took on the primary whose answer was lost.
    orphaned: Mutex<HashSet<String>>,
    /// Records the primary leased whose answer was lost (attempts spent).
    lost_leases: Mutex<HashMap<RecordId, u32>>,
    /// Records the primary acked whose answer was lost.
    lost_acks: Mutex<HashSet<RecordId>>,
    /// What happened, in order (printed for a single seed).
    log: Mutex<Vec<String>>,
    trace: bool,
}

impl Schedule {
    fn fault(&self) -> Fault {
        if self.healed.load(std::sync::atomic::Ordering::SeqCst) {
            return Fault::None;
        }
        let mut rng = self.rng.lock().unwrap();
        if rng.f64() >= self.fault_rate {
            return Fault::None;
        }
        match rng.u8(0..3) {
            0 => Fault::Unavailable,
            1 => Fault::Slow,
            _ => Fault::Lost,
        }
    }

    fn note(&self, what: String) {
        if self.trace {
            self.log.lock().unwrap().push(what);
        }
    }

    fn yield_or_not(&self) -> bool {
        self.rng.lock().unwrap().bool()
    }

    /// Runs `call` (named by `what`, for the log) as the schedule says;
    /// `lost` records what a lost answer left behind.
    async fn run<T: std::fmt::Debug>(
        &self,
        what: impl FnOnce() -> String,
        call: impl std::future::Future<Output = Result<T>>,
        lost: impl FnOnce(&T),
    ) -> Result<T> {
        if self.yield_or_not() {
            tokio::task::yield_now().await;
        }
        let late = DEADLINE + Duration::from_millis(50);
        let fault = self.fault();
        let what = if self.trace { what() } else { String::new() };
        match fault {
            Fault::None => {
                let r = call.await;
                self.note(format!("  primary {what}: {r:?}"));
                r
            }
            Fault::Unavailable => {
                self.note(format!("  primary {what}: unavailable"));
                Err(Error::unavailable(
                    "faulty",
                    UnavailableReason::Connection,
                    "scheduled",
                ))
            }
            Fault::Slow => {
                self.note(format!("  primary {what}: slow"));
                tokio::time::sleep(late).await;
                call.await
            }
            Fault::Lost => {
                let r = call.await;
                self.note(format!("  primary {what}: answer lost: {r:?}"));
                if let Ok(v) = &r {
                    lost(v);
                }
                tokio::time::sleep(late).await;
                Err(Error::unavailable(
                    "faulty",
                    UnavailableReason::Timeout,
                    "answer lost",
                ))
            }
        }
    }
}

#[derive(Debug)]
struct Faulty<T> {
    inner: T,
    schedule: Arc<Schedule>,
}

#[async_trait]
impl IdempotencyStore for Faulty<Arc<MemoryIdempotencyStore>> {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn claim(&self, key: &str, fingerprint: &Fingerprint, lease: Duration) -> Result<Claim> {
        let orphaned = &self.schedule.orphaned;
        let r = self
            .schedule
            .run(
                || format!("claim {:?}", (key, fingerprint, lease,)),
                self.inner.claim(key, fingerprint, lease),
                |c| {
                    if matches!(c, Claim::Acquired(_)) {
                        orphaned.lock().unwrap().insert(key.to_string());
                    }
                },
            )
            .await;
        r
    }
    async fn complete(
        &self,
        lease: &Lease,
        result: Option<Bytes>,
        retention: Duration,
    ) -> Result<()> {
        self.schedule
            .run(
                || format!("complete {lease:?}"),
                self.inner.complete(lease, result, retention),
                |_| {},
            )
            .await
    }
    async fn release(&self, lease: &Lease) -> Result<()> {
        self.schedule
            .run(
                || format!("release {:?}", (lease,)),
                self.inner.release(lease),
                |_| {},
            )
            .await
    }
    async fn extend(&self, lease: &Lease, by: Duration) -> Result<()> {
        self.schedule
            .run(
                || format!("extend {:?}", (lease, by,)),
                self.inner.extend(lease, by),
                |_| {},
            )
            .await
    }
}

#[async_trait]
impl Spool for Faulty<Arc<MemorySpool>> {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn enqueue(&self, batch: Vec<NewRecord>) -> Result<Enqueued> {
        self.schedule
            .run(
                || {
                    let ids: Vec<_> = batch.iter().map(|r| r.id.to_string()).collect();
                    format!("enqueue {ids:?}")
                },
                self.inner.enqueue(batch.clone()),
                |_| {},
            )
            .await
    }
    async fn lease(&self, max: usize, ttl: Duration) -> Result<Vec<Leased>> {
        let lost = &self.schedule.lost_leases;
        self.schedule
            .run(
                || format!("lease {:?}", (max, ttl,)),
                self.inner.lease(max, ttl),
                |got| {
                    let mut lost = lost.lock().unwrap();
                    for l in got {
                        *lost.entry(l.record.id.clone()).or_default() += 1;
                    }
                },
            )
            .await
    }
    async fn ack(&self, token: &SpoolToken) -> Result<()> {
        let lost = &self.schedule.lost_acks;
        self.schedule
            .run(
                || format!("ack {:?}", (token,)),
                self.inner.ack(token),
                |()| {
                    lost.lock().unwrap().insert(token.id().clone());
                },
            )
            .await
    }
    async fn nack(&self, token: &SpoolToken, retry_in: Duration) -> Result<NackOutcome> {
        self.schedule
            .run(
                || format!("nack {:?}", (token, retry_in,)),
                self.inner.nack(token, retry_in),
                |_| {},
            )
            .await
    }
    async fn extend(&self, token: &SpoolToken, by: Duration) -> Result<()> {
        self.schedule
            .run(
                || format!("extend {:?}", (token, by,)),
                self.inner.extend(token, by),
                |_| {},
            )
            .await
    }
    async fn dead_letter(&self, token: &SpoolToken, reason: DeadReason) -> Result<()> {
        self.schedule
            .run(
                || format!("dead_letter {token:?}"),
                self.inner.dead_letter(token, reason),
                |_| {},
            )
            .await
    }
    async fn list_dead(&self, max: usize) -> Result<Vec<DeadRecord>> {
        self.schedule
            .run(
                || format!("list_dead {:?}", (max,)),
                self.inner.list_dead(max),
                |_| {},
            )
            .await
    }
    async fn redrive_dead(&self, max: usize) -> Result<usize> {
        self.schedule
            .run(
                || format!("redrive_dead {:?}", (max,)),
                self.inner.redrive_dead(max),
                |_| {},
            )
            .await
    }
    async fn purge_dead(&self, max: usize) -> Result<usize> {
        self.schedule
            .run(
                || format!("purge_dead {:?}", (max,)),
                self.inner.purge_dead(max),
                |_| {},
            )
            .await
    }
    async fn stats(&self) -> Result<SpoolStats> {
        self.schedule
            .run(|| "stats".to_string(), self.inner.stats(), |_| {})
            .await
    }
}

type Store = Fallback<Faulty<Arc<MemoryIdempotencyStore>>, MemoryIdempotencyStore>;
type Queue = Fallback<Faulty<Arc<MemorySpool>>, MemorySpool>;

/// One schedule's world: the fallbacks, the raw primaries, and the model
/// the invariants are checked against.
struct World {
    schedule: Arc<Schedule>,
    clock: ManualClock,
    breaker: Arc<Breaker>,
    store: Store,
    store_primary: Arc<MemoryIdempotencyStore>,
    queue: Queue,
    model: Mutex<Model>,
}

#[derive(Default)]
struct Model {
    /// Keys a caller holds a lease on.
    held: BTreeMap<String, Lease>,
    completed: HashSet<String>,
    enqueued: HashSet<RecordId>,
    acked: HashSet<RecordId>,
    handed: HashMap<RecordId, u32>,
    violations: Vec<String>,
    next_id: u64,
}

fn fp(key: &str) -> Fingerprint {
    Fingerprint::of(key)
}

impl World {
    fn new(seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let fault_rate = [0.0, 0.05, 0.2, 0.5][rng.usize(0..4)];
        let schedule = Arc::new(Schedule {
            rng: Mutex::new(rng),
            fault_rate,
            healed: Default::default(),
            orphaned: Default::default(),
            lost_leases: Default::default(),
            lost_acks: Default::default(),
            log: Default::default(),
            trace: std::env::var("FALLBACK_RANDOM_SEED").is_ok(),
        });
        let clock = ManualClock::new();
        let shared = Arc::new(clock.clone());
        let breaker = Arc::new(Breaker::new(BreakerConfig::default(), shared.clone()));
        let store_primary = Arc::new(
            MemoryIdempotencyStore::builder()
                .clock(shared.clone())
                .build(),
        );
        let store = Fallback::new(
            Faulty {
                inner: store_primary.clone(),
                schedule: schedule.clone(),
            },
            MemoryIdempotencyStore::builder()
                .clock(shared.clone())
                .build(),
            breaker.clone(),
        )
        .with_deadline(DEADLINE);
        let queue = Fallback::new(
            Faulty {
                inner: Arc::new(MemorySpool::builder().clock(shared.clone()).build()),
                schedule: schedule.clone(),
            },
            MemorySpool::builder().clock(shared).build(),
            breaker.clone(),
        )
        .with_deadline(DEADLINE);
        Self {
            schedule,
            clock,
            breaker,
            store,
            store_primary,
            queue,
            model: Mutex::default(),
        }
    }

    fn log(&self, what: String) {
        let state = self.breaker.state();
        self.schedule.note(format!("[{state:?}] {what}"));
    }

    fn violation(&self, v: String) {
        self.model.lock().unwrap().violations.push(v);
    }

    fn pick(&self, n: usize) -> usize {
        self.schedule.rng.lock().unwrap().usize(0..n)
    }

    async fn claim(&self) {
        let key = format!("k{}", self.pick(KEYS));
        let r = self.store.claim(&key, &fp(&key), LEASE).await;
        self.log(format!("claim {key}: {r:?}"));
        let Ok(c) = r else {
            return;
        };
        let mut m = self.model.lock().unwrap();
        match c {
            Claim::Acquired(lease) => {
                if let Some(other) = m.held.get(&key) {
                    let v = format!("{key} acquired twice: {other:?} and {lease:?}");
                    m.violations.push(v);
                } else if m.completed.contains(&key) {
                    m.violations
                        .push(format!("{key} acquired after completion"));
                }
                m.held.insert(key, lease);
            }
            Claim::Completed(_) | Claim::InProgress { .. } => {}
            Claim::Mismatch => m.violations.push(format!("{key}: mismatch")),
        }
    }

    fn held_lease(&self) -> Option<Lease> {
        let m = self.model.lock().unwrap();
        let n = m.held.len();
        if n == 0 {
            return None;
        }
        let i = self.pick(n);
        m.held.values().nth(i).cloned()
    }

    async fn complete(&self) {
        let Some(lease) = self.held_lease() else {
            return;
        };
        let result = Bytes::from(lease.key().to_string());
        let r = self.store.complete(&lease, Some(result), LEASE).await;
        self.log(format!("complete {lease:?}: {r:?}"));
        if r.is_ok() {
            let mut m = self.model.lock().unwrap();
            m.held.remove(lease.key());
            m.completed.insert(lease.key().to_string());
        }
    }

    async fn release(&self) {
        let Some(lease) = self.held_lease() else {
            return;
        };
        // Another caller may acquire as soon as the store let go.
        self.model.lock().unwrap().held.remove(lease.key());
        let r = self.store.release(&lease).await;
        self.log(format!("release {lease:?}: {r:?}"));
    }

    async fn enqueue(&self) {
        let n = 1 + self.pick(3);
        let ids: Vec<RecordId> = {
            let mut m = self.model.lock().unwrap();
            (0..n)
                .map(|_| {
                    m.next_id += 1;
                    RecordId::new(format!("r{}", m.next_id)).unwrap()
                })
                .collect()
        };
        let batch = ids
            .iter()
            .map(|id| NewRecord::new(id.clone(), Bytes::from_static(b"x")))
            .collect();
        if self.queue.enqueue(batch).await.is_ok() {
            self.model.lock().unwrap().enqueued.extend(ids);
        }
    }

    /// Leases a few records and settles each (ack, nack, or keep).
    async fn deliver(&self) {
        let Ok(got) = self.queue.lease(1 + self.pick(3), LEASE).await else {
            return;
        };
        for l in got {
            self.log(format!("delivered {}", l.record.id));
            self.check_attempts(&l);
            match self.pick(3) {
                0 => self.ack(&l).await,
                1 => {
                    let _ = self.queue.nack(&l.token, Duration::ZERO).await;
                }
                _ => {}
            }
        }
    }

    async fn ack(&self, l: &Leased) {
        if self.queue.ack(&l.token).await.is_ok() {
            self.model.lock().unwrap().acked.insert(l.record.id.clone());
        }
    }

    fn check_attempts(&self, l: &Leased) {
        let lost = self
            .schedule
            .lost_leases
            .lock()
            .unwrap()
            .get(&l.record.id)
            .copied()
            .unwrap_or(0);
        let mut m = self.model.lock().unwrap();
        let handed = m.handed.entry(l.record.id.clone()).or_default();
        *handed += 1;
        let handed = *handed + lost;
        if l.record.attempts > handed {
            let v = format!(
                "{}: attempts {} after {handed} deliveries",
                l.record.id, l.record.attempts
            );
            m.violations.push(v);
        }
    }

    async fn step(&self) {
        match self.pick(10) {
            0..=2 => self.claim().await,
            3 => self.complete().await,
            4 => self.release().await,
            5 => self.enqueue().await,
            6 => self.deliver().await,
            7 => {
                let r = self.store.reconcile().await;
                self.log(format!("reconcile: {r:?}"));
            }
            8 => {
                let r = self.queue.drain().await;
                self.log(format!("drain: {r:?}"));
            }
            _ => self.breaker.record_probe_success(),
        }
    }

    /// Heals the primary, closes the breaker, replays and drains.
    async fn settle(&self) {
        self.schedule
            .healed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for _ in 0..3 {
            self.breaker.record_probe_success();
        }
        if self.breaker.state() != BreakerState::Closed {
            self.violation(format!("breaker {:?} after healing", self.breaker.state()));
            return;
        }
        for _ in 0..5 {
            if self.store.pending_reconcile() == 0 {
                break;
            }
            let _ = self.store.reconcile().await;
        }
        if let Err(e) = self.queue.drain().await {
            self.violation(format!("drain after healing: {e}"));
        }
    }

    async fn check_completions(&self) {
        let completed = self.model.lock().unwrap().completed.clone();
        let orphaned = self.schedule.orphaned.lock().unwrap().clone();
        for key in completed {
            let c = self.store_primary.claim(&key, &fp(&key), LEASE).await;
            match c {
                Ok(Claim::Completed(Some(r))) if r == key.as_bytes() => {}
                Ok(Claim::InProgress { .. }) if orphaned.contains(&key) => {}
                other => self.violation(format!("{key} completed, primary says {other:?}")),
            }
        }
    }

    async fn check_records(&self) {
        // Every lease ends: what is left is due again.
        self.clock.advance(LEASE * 2);
        let mut left = HashSet::new();
        loop {
            let got = match self.queue.lease(100, LEASE).await {
                Ok(got) => got,
                Err(e) => return self.violation(format!("final lease: {e}")),
            };
            if got.is_empty() {
                break;
            }
            for l in got {
                self.log(format!("finally delivered {}", l.record.id));
                self.check_attempts(&l);
                left.insert(l.record.id.clone());
                if let Err(e) = self.queue.ack(&l.token).await {
                    return self.violation(format!("final ack: {e}"));
                }
            }
        }
        let lost_acks = self.schedule.lost_acks.lock().unwrap().clone();
        let mut m = self.model.lock().unwrap();
        let missing: Vec<_> = m
            .enqueued
            .iter()
            .filter(|id| !m.acked.contains(*id) && !lost_acks.contains(*id) && !left.contains(*id))
            .cloned()
            .collect();
        if !missing.is_empty() {
            m.violations.push(format!("records lost: {missing:?}"));
        }
    }
}

fn run_schedule(seed: u64) -> std::result::Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let world = Arc::new(World::new(seed));
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let w = world.clone();
                tokio::spawn(async move {
                    for _ in 0..OPS {
                        w.step().await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.map_err(|e| format!("task panicked: {e}"))?;
        }
        world.check_completions_after_settling().await;
        let mut m = world.model.lock().unwrap();
        let violations = std::mem::take(&mut m.violations);
        if !violations.is_empty() && std::env::var("FALLBACK_RANDOM_SEED").is_ok() {
            eprintln!("{}", world.schedule.log.lock().unwrap().join("\n"));
        }
        if violations.is_empty() {
            Ok(())
        } else {
            Err(violations.join("\n"))
        }
    })
}

impl World {
    async fn check_completions_after_settling(&self) {
        self.settle().await;
        self.check_completions().await;
        self.check_records().await;
    }
}

#[test]
fn random_schedules_keep_the_invariants() {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    if let Some(seed) = env("FALLBACK_RANDOM_SEED") {
        eprintln!("fallback_random: schedule seed {seed}");
        if let Err(v) = run_schedule(seed) {
            panic!("seed {seed}:\n{v}");
        }
        return;
    }
    let schedules = env("FALLBACK_RANDOM_SCHEDULES").unwrap_or(1_000);
    let base = fastrand::u64(..) >> 16;
    eprintln!("fallback_random: {schedules} schedules from seed {base}");
    let mut failed = Vec::new();
    for seed in base..base + schedules {
        if let Err(v) = run_schedule(seed) {
            failed.push(format!("seed {seed} (FALLBACK_RANDOM_SEED={seed}):\n{v}"));
            if failed.len() >= 3 {
                break;
            }
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
}
