//! Races and edge cases of `Fallback` in front of a shared store: a
//! completion during a reconcile pass, probes while closed, a local claim
//! of a key this process holds on the primary, the bounded journal, drains
//! that do not count as delivery attempts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use reliability::fallback::{Breaker, BreakerConfig, Fallback};
use reliability::memory::MemoryIdempotencyStore;
use reliability::status::BreakerState;
use reliability::{Capabilities, Claim, Fingerprint, IdempotencyStore, Lease, ManualClock, Result};
use tokio::sync::{Notify, Semaphore};

const LEASE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);

fn fp(s: &str) -> Fingerprint {
    Fingerprint::of(s)
}

/// A claim that must be acquired.
async fn acquire(store: &impl IdempotencyStore, key: &str, fingerprint: &Fingerprint) -> Lease {
    store
        .claim(key, fingerprint, LEASE)
        .await
        .unwrap()
        .into_lease()
        .unwrap()
}

/// Back from isolation the way a probe brings it back: two successes.
fn fail_back(b: &Breaker) {
    b.release();
    b.record_success();
    b.record_success();
    assert_eq!(b.state(), BreakerState::Closed);
}

/// A store whose `claim` can be held at a gate: the test decides when the
/// primary's answer comes back.
#[derive(Debug)]
struct Gated<S> {
    inner: S,
    armed: AtomicBool,
    entered: Notify,
    gate: Semaphore,
}

impl<S> Gated<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            armed: AtomicBool::new(false),
            entered: Notify::new(),
            gate: Semaphore::new(0),
        }
    }
}

#[async_trait]
impl<S: IdempotencyStore> IdempotencyStore for Gated<S> {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn claim(&self, key: &str, fingerprint: &Fingerprint, lease: Duration) -> Result<Claim> {
        let c = self.inner.claim(key, fingerprint, lease).await;
        if self.armed.swap(false, Ordering::SeqCst) {
            self.entered.notify_one();
            let _permit = self.gate.acquire().await;
        }
        c
    }
    async fn complete(
        &self,
        lease: &Lease,
        result: Option<Bytes>,
        retention: Duration,
    ) -> Result<()> {
        self.inner.complete(lease, result, retention).await
    }
    async fn release(&self, lease: &Lease) -> Result<()> {
        self.inner.release(lease).await
    }
    async fn extend(&self, lease: &Lease, by: Duration) -> Result<()> {
        self.inner.extend(lease, by).await
    }
}

struct Setup {
    clock: ManualClock,
    breaker: Arc<Breaker>,
    /// The shared store other replicas reach directly.
    primary: Arc<Gated<Arc<MemoryIdempotencyStore>>>,
    fallback: Arc<Fallback<Arc<Gated<Arc<MemoryIdempotencyStore>>>, MemoryIdempotencyStore>>,
}

fn setup() -> Setup {
    let clock = ManualClock::new();
    let shared = Arc::new(clock.clone());
    let breaker = Arc::new(Breaker::new(BreakerConfig::default(), shared.clone()));
    let store = Arc::new(
        MemoryIdempotencyStore::builder()
            .clock(shared.clone())
            .build(),
    );
    let primary = Arc::new(Gated::new(store));
    let secondary = MemoryIdempotencyStore::builder().clock(shared).build();
    let fallback = Arc::new(Fallback::new(primary.clone(), secondary, breaker.clone()));
    Setup {
        clock,
        breaker,
        primary,
        fallback,
    }
}

/// A local claim completed while reconcile replays it (the primary's claim
/// is in flight) reaches the primary: the pass does not mark the entry
/// replayed over the completion, and no other replica acquires the key
/// once the replayed pending claim's lease ends.
#[tokio::test]
async fn a_completion_during_reconcile_reaches_the_primary() {
    let s = setup();
    s.breaker.isolate();
    let lease = acquire(&*s.fallback, "k", &fp("a")).await;
    fail_back(&s.breaker);

    s.primary.armed.store(true, Ordering::SeqCst);
    let entered = s.primary.entered.notified();
    let pass = tokio::spawn({
        let f = s.fallback.clone();
        async move { f.reconcile().await }
    });
    entered.await;
    // The replay's claim is at the primary; the caller completes meanwhile.
    s.fallback
        .complete(&lease, Some("done".into()), DAY)
        .await
        .unwrap();
    s.primary.gate.add_permits(1);
    pass.await.unwrap().unwrap();
    // The failback loop runs a pass whenever work is pending.
    while s.fallback.pending_reconcile() > 0 {
        s.fallback.reconcile().await.unwrap();
    }

    s.clock.advance(LEASE + Duration::from_secs(1));
    assert_eq!(
        s.primary.inner.claim("k", &fp("a"), LEASE).await.unwrap(),
        Claim::Completed(Some("done".into())),
        "another replica must see the completion"
    );
}

/// A duplicate delivery of a key this process holds a primary lease on,
/// arriving during an outage, is in progress locally too: the original
/// holder keeps its lease and completes it.
#[tokio::test]
async fn a_local_claim_sees_the_primary_lease_of_this_process() {
    let s = setup();
    let original = acquire(&*s.fallback, "k", &fp("a")).await;
    s.breaker.isolate();
    let duplicate = s.fallback.claim("k", &fp("a"), LEASE).await.unwrap();
    assert!(
        matches!(duplicate, Claim::InProgress { .. }),
        "the original holder still works on k: {duplicate:?}"
    );
    assert_eq!(
        s.fallback.claim("k", &fp("b"), LEASE).await.unwrap(),
        Claim::Mismatch
    );
    s.fallback
        .complete(&original, Some("done".into()), DAY)
        .await
        .unwrap();
    assert_eq!(
        s.fallback.claim("k", &fp("a"), LEASE).await.unwrap(),
        Claim::Completed(Some("done".into()))
    );
}

/// The bounded secondary evicts a completed key: the journal still holds
/// its result and answers with it, instead of handing out a new lease.
#[tokio::test]
async fn a_key_the_secondary_evicted_is_answered_from_the_journal() {
    let clock = ManualClock::new();
    let shared = Arc::new(clock.clone());
    let breaker = Arc::new(Breaker::new(BreakerConfig::default(), shared.clone()));
    let primary = Arc::new(
        MemoryIdempotencyStore::builder()
            .clock(shared.clone())
            .build(),
    );
    let secondary = MemoryIdempotencyStore::builder()
        .max_entries(4)
        .clock(shared)
        .build();
    let fallback = Fallback::new(primary, secondary, breaker.clone());
    breaker.isolate();
    for i in 0..64 {
        let key = format!("k{i}");
        let lease = acquire(&fallback, &key, &fp("a")).await;
        fallback
            .complete(&lease, Some(key.clone().into()), DAY)
            .await
            .unwrap();
    }
    assert_eq!(
        fallback.claim("k0", &fp("a"), LEASE).await.unwrap(),
        Claim::Completed(Some("k0".into())),
        "k0 was completed during this outage"
    );
}

mod spool {
    use super::*;
    use reliability::memory::MemorySpool;
    use reliability::{
        DeadReason, DeadRecord, Durability, Enqueued, Leased, NackOutcome, NewRecord, RecordId,
        Spool, SpoolStats, SpoolToken,
    };

    /// A memory spool with another face: late answers to `enqueue`, a
    /// durability of its own, and the biggest batch it was given.
    #[derive(Debug, Default)]
    struct Shaped {
        inner: Arc<MemorySpool>,
        /// `enqueue` answers after the fallback's deadline (having stored).
        late: bool,
        durable: bool,
        durability: Option<Durability>,
        biggest: std::sync::atomic::AtomicUsize,
    }

    #[async_trait]
    impl Spool for Shaped {
        fn capabilities(&self) -> Capabilities {
            self.inner.capabilities().with_durable(self.durable)
        }
        async fn enqueue(&self, batch: Vec<NewRecord>) -> Result<Enqueued> {
            let bytes = batch.iter().map(|r| r.payload.len()).sum();
            self.biggest.fetch_max(bytes, Ordering::SeqCst);
            let mut r = self.inner.enqueue(batch).await;
            if self.late {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            if let (Ok(e), Some(d)) = (&mut r, self.durability) {
                *e = Enqueued::new(d, e.accepted, e.duplicates);
            }
            r
        }
        async fn lease(&self, max: usize, ttl: Duration) -> Result<Vec<Leased>> {
            self.inner.lease(max, ttl).await
        }
        async fn ack(&self, token: &SpoolToken) -> Result<()> {
            self.inner.ack(token).await
        }
        async fn nack(&self, token: &SpoolToken, retry_in: Duration) -> Result<NackOutcome> {
            self.inner.nack(token, retry_in).await
        }
        async fn extend(&self, token: &SpoolToken, by: Duration) -> Result<()> {
            self.inner.extend(token, by).await
        }
        async fn dead_letter(&self, token: &SpoolToken, reason: DeadReason) -> Result<()> {
            self.inner.dead_letter(token, reason).await
        }
        async fn list_dead(&self, max: usize) -> Result<Vec<DeadRecord>> {
            self.inner.list_dead(max).await
        }
        async fn redrive_dead(&self, max: usize) -> Result<usize> {
            self.inner.redrive_dead(max).await
        }
        async fn purge_dead(&self, max: usize) -> Result<usize> {
            self.inner.purge_dead(max).await
        }
        async fn stats(&self) -> Result<SpoolStats> {
            self.inner.stats().await
        }
    }

    fn memory(clock: &ManualClock) -> Arc<MemorySpool> {
        Arc::new(
            MemorySpool::builder()
                .clock(Arc::new(clock.clone()))
                .build(),
        )
    }

    /// The secondary fsyncs; the primary syncs once a second (Redis
    /// `appendfsync everysec`): a drained record stays on the secondary
    /// until the primary's sync covers it.
    #[tokio::test]
    async fn a_drain_acks_locally_once_the_primary_synced() {
        let clock = ManualClock::new();
        let breaker = Arc::new(Breaker::new(
            BreakerConfig::default(),
            Arc::new(clock.clone()),
        ));
        let (primary, secondary) = (memory(&clock), memory(&clock));
        let f = Fallback::new(
            Shaped {
                inner: primary.clone(),
                durable: true,
                durability: Some(Durability::Periodic {
                    interval: Duration::from_secs(1),
                }),
                ..Shaped::default()
            },
            Shaped {
                inner: secondary.clone(),
                durable: true,
                durability: Some(Durability::Synced),
                ..Shaped::default()
            },
            breaker.clone(),
        );
        breaker.isolate();
        f.enqueue(vec![rec("a"), rec("b"), rec("c")]).await.unwrap();
        fail_back(&breaker);
        f.drain().await.unwrap();
        assert_eq!(primary.stats().await.unwrap().depth(), 3);
        assert_eq!(
            secondary.stats().await.unwrap().depth(),
            3,
            "fsynced here, maybe not yet there"
        );
        clock.advance(Duration::from_secs(1));
        f.drain().await.unwrap();
        assert_eq!(
            secondary.stats().await.unwrap().depth(),
            0,
            "synced there now"
        );
    }

    /// 1 MiB records: a drain's primary calls carry at most its byte bound.
    #[tokio::test]
    async fn drain_batches_are_bounded_by_bytes() {
        let clock = ManualClock::new();
        let breaker = Arc::new(Breaker::new(
            BreakerConfig::default(),
            Arc::new(clock.clone()),
        ));
        let primary = Arc::new(Shaped {
            inner: memory(&clock),
            ..Shaped::default()
        });
        let secondary = memory(&clock);
        let f = Fallback::new(primary.clone(), secondary.clone(), breaker.clone());
        breaker.isolate();
        for i in 0..12 {
            let payload = Bytes::from(vec![b'x'; 1 << 20]);
            f.enqueue(vec![NewRecord::new(
                RecordId::new(format!("r{i}")).unwrap(),
                payload,
            )])
            .await
            .unwrap();
        }
        fail_back(&breaker);
        let report = f.drain().await.unwrap();
        assert_eq!(report.moved, 12);
        assert_eq!(secondary.stats().await.unwrap().depth(), 0);
        let biggest = primary.biggest.load(Ordering::SeqCst);
        assert!(biggest <= 4 << 20, "one call carried {biggest} bytes");
    }

    /// The primary stored a batch but answered after the deadline; the
    /// secondary took it too. Each record is still delivered once, and the
    /// double copies are counted.
    #[tokio::test(start_paused = true)]
    async fn a_late_primary_enqueue_is_not_delivered_twice() {
        let clock = ManualClock::new();
        let shared = Arc::new(clock.clone());
        let breaker = Arc::new(Breaker::new(BreakerConfig::default(), shared.clone()));
        let primary = Arc::new(MemorySpool::builder().clock(shared.clone()).build());
        let secondary = Arc::new(MemorySpool::builder().clock(shared).build());
        let late = Shaped {
            inner: primary.clone(),
            late: true,
            ..Shaped::default()
        };
        let f = Fallback::new(late, secondary.clone(), breaker.clone());
        let batch: Vec<_> = (0..10).map(|i| rec(&format!("r{i}"))).collect();
        f.enqueue(batch).await.unwrap();
        assert_eq!(primary.stats().await.unwrap().depth(), 10, "stored, late");
        assert_eq!(secondary.stats().await.unwrap().depth(), 10, "taken too");

        let mut delivered = std::collections::HashMap::<String, u32>::new();
        for round in 0..4 {
            let got = f.lease(4, Duration::from_secs(30)).await.unwrap();
            for l in &got {
                *delivered.entry(l.record.id.to_string()).or_default() += 1;
                f.ack(&l.token).await.unwrap();
            }
            if round == 1 {
                f.drain().await.unwrap();
            }
        }
        while let Some(l) = f.lease(1, Duration::from_secs(30)).await.unwrap().pop() {
            *delivered.entry(l.record.id.to_string()).or_default() += 1;
            f.ack(&l.token).await.unwrap();
        }
        let twice: Vec<_> = delivered.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "delivered twice: {twice:?}");
        assert_eq!(delivered.len(), 10);
        let d = f.double_enqueues();
        // The drain's own primary calls are late too: counted as well.
        assert!(d.uncertain >= 10 && d.avoided == 10, "{d:?}");
    }

    fn rec(id: &str) -> NewRecord {
        NewRecord::new(RecordId::new(id).unwrap(), format!("payload {id}"))
    }

    /// Drains refused by a full primary (the failback loop retries every
    /// second) are not delivery attempts: the record is delivered as new.
    #[tokio::test]
    async fn refused_drains_do_not_count_as_attempts() {
        let clock = ManualClock::new();
        let shared = Arc::new(clock.clone());
        let breaker = Arc::new(Breaker::new(BreakerConfig::default(), shared.clone()));
        let limits = reliability::SpoolLimits::default().with_max_records(0);
        let primary = MemorySpool::builder()
            .limits(limits)
            .clock(shared.clone())
            .build();
        let secondary = Arc::new(MemorySpool::builder().clock(shared).build());
        let f = Fallback::new(primary, secondary.clone(), breaker.clone());
        breaker.isolate();
        f.enqueue(vec![rec("a")]).await.unwrap();
        fail_back(&breaker);
        for _ in 0..5 {
            assert!(matches!(
                f.drain().await,
                Err(reliability::Error::Full { .. })
            ));
        }
        let got = f.lease(1, Duration::from_secs(30)).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0].record.attempts, 1,
            "five refused drains, then the first delivery"
        );
    }
}

/// The journal stays within its bounds: past them the entries that end
/// first go, and each one dropped is counted.
#[tokio::test]
async fn the_journal_is_bounded_by_entries_and_bytes() {
    use reliability::fallback::JournalLimits;
    let s = setup();
    let fallback = Fallback::new(
        s.primary.clone(),
        MemoryIdempotencyStore::builder()
            .clock(Arc::new(s.clock.clone()))
            .build(),
        s.breaker.clone(),
    )
    .with_journal_limits(JournalLimits::new(8, 1 << 20));
    s.breaker.isolate();
    for i in 0..64 {
        let _ = fallback
            .claim(&format!("k{i}"), &fp("a"), LEASE)
            .await
            .unwrap();
    }
    let usage = fallback.journal_usage();
    assert!(usage.entries <= 8, "{usage:?}");
    assert_eq!(usage.entries + usage.evicted, 64, "{usage:?}");

    let big = Fallback::new(
        s.primary.clone(),
        MemoryIdempotencyStore::builder()
            .clock(Arc::new(s.clock.clone()))
            .build(),
        s.breaker.clone(),
    )
    .with_journal_limits(JournalLimits::new(1_000, 4_096));
    for i in 0..8 {
        let lease = acquire(&big, &format!("b{i}"), &fp("a")).await;
        big.complete(&lease, Some(Bytes::from(vec![b'x'; 1_000])), DAY)
            .await
            .unwrap();
    }
    let usage = big.journal_usage();
    assert!(usage.bytes <= 4_096, "{usage:?}");
    assert!(usage.evicted >= 4, "{usage:?}");
}

/// A duplicate of an event this process completed through the primary
/// before an outage is answered from the local record during the outage.
#[tokio::test]
async fn a_claim_completed_through_the_primary_is_answered_during_an_outage() {
    let s = setup();
    let lease = acquire(&*s.fallback, "k", &fp("a")).await;
    s.fallback
        .complete(&lease, Some("done".into()), DAY)
        .await
        .unwrap();
    assert_eq!(s.fallback.completed_usage().entries, 1);
    s.breaker.isolate();
    assert_eq!(
        s.fallback.claim("k", &fp("a"), LEASE).await.unwrap(),
        Claim::Completed(Some("done".into()))
    );
    assert_eq!(
        s.fallback.claim("k", &fp("b"), LEASE).await.unwrap(),
        Claim::Mismatch
    );
}

/// A primary that can lose everything it holds (a Redis restarted without
/// persistence).
#[derive(Debug)]
struct Forgetful {
    clock: ManualClock,
    inner: std::sync::RwLock<Arc<MemoryIdempotencyStore>>,
}

impl Forgetful {
    fn new(clock: &ManualClock) -> Self {
        let f = Self {
            clock: clock.clone(),
            inner: std::sync::RwLock::new(Arc::new(MemoryIdempotencyStore::new())),
        };
        f.forget();
        f
    }
    fn forget(&self) {
        let fresh = MemoryIdempotencyStore::builder()
            .clock(Arc::new(self.clock.clone()))
            .build();
        *self.inner.write().unwrap() = Arc::new(fresh);
    }
    fn now(&self) -> Arc<MemoryIdempotencyStore> {
        self.inner.read().unwrap().clone()
    }
}

#[async_trait]
impl IdempotencyStore for Forgetful {
    fn capabilities(&self) -> Capabilities {
        self.now().capabilities()
    }
    async fn claim(&self, key: &str, fingerprint: &Fingerprint, lease: Duration) -> Result<Claim> {
        self.now().claim(key, fingerprint, lease).await
    }
    async fn complete(
        &self,
        lease: &Lease,
        result: Option<Bytes>,
        retention: Duration,
    ) -> Result<()> {
        self.now().complete(lease, result, retention).await
    }
    async fn release(&self, lease: &Lease) -> Result<()> {
        self.now().release(lease).await
    }
    async fn extend(&self, lease: &Lease, by: Duration) -> Result<()> {
        self.now().extend(lease, by).await
    }
}

/// The primary restarts empty: once the breaker sees its new identity, the
/// claims this process completed there are answered locally and replayed,
/// so neither this process nor another replica processes them again.
#[tokio::test]
async fn claims_completed_before_a_data_loss_are_replayed() {
    use reliability::fallback::PrimaryIdentity;
    let clock = ManualClock::new();
    let shared = Arc::new(clock.clone());
    let breaker = Arc::new(Breaker::new(BreakerConfig::default(), shared.clone()));
    let primary = Arc::new(Forgetful::new(&clock));
    let secondary = MemoryIdempotencyStore::builder().clock(shared).build();
    let fallback = Fallback::new(primary.clone(), secondary, breaker.clone());
    breaker.observe_identity(PrimaryIdentity::new("run-1", None));
    for key in ["a", "b"] {
        let lease = acquire(&fallback, key, &fp(key)).await;
        fallback
            .complete(&lease, Some(key.into()), DAY)
            .await
            .unwrap();
    }
    primary.forget();
    breaker.observe_identity(PrimaryIdentity::new("run-2", None));
    assert!(breaker.status().data_lost_at.is_some());
    assert_eq!(fallback.pending_reconcile(), 2);
    assert_eq!(
        fallback.claim("a", &fp("a"), LEASE).await.unwrap(),
        Claim::Completed(Some("a".into()))
    );
    let report = fallback.reconcile().await.unwrap();
    assert_eq!(report.replayed, 2);
    assert_eq!(
        primary.now().claim("b", &fp("b"), LEASE).await.unwrap(),
        Claim::Completed(Some("b".into())),
        "other replicas see it again"
    );
}

/// The primary restarts with its data (a new identity, its keys kept, as
/// a Redis restarted from its append-only file) after a local claim still
/// in progress was replayed: the primary holds the key under the replay's
/// lease, which is this process's own, so the replay after the data loss
/// finds it held and reconciliation finishes; the completion reaches the
/// primary.
#[tokio::test]
async fn a_replayed_claim_kept_across_a_restart_is_not_pending_forever() {
    use reliability::fallback::PrimaryIdentity;
    let s = setup();
    s.breaker
        .observe_identity(PrimaryIdentity::new("run-1", None));
    s.breaker.isolate();
    let lease = acquire(&*s.fallback, "k", &fp("a")).await;
    fail_back(&s.breaker);
    assert_eq!(s.fallback.reconcile().await.unwrap().replayed, 1);
    assert_eq!(s.fallback.pending_reconcile(), 0);

    s.breaker
        .observe_identity(PrimaryIdentity::new("run-2", None));
    for _ in 0..3 {
        s.fallback.reconcile().await.unwrap();
    }
    assert_eq!(
        s.fallback.pending_reconcile(),
        0,
        "the key the primary holds under this process's lease stays pending"
    );
    s.fallback
        .complete(&lease, Some("done".into()), DAY)
        .await
        .unwrap();
    for _ in 0..3 {
        s.fallback.reconcile().await.unwrap();
    }
    assert_eq!(s.fallback.pending_reconcile(), 0, "the completion replays");
    s.clock.advance(LEASE + Duration::from_secs(1));
    assert_eq!(
        s.primary.inner.claim("k", &fp("a"), LEASE).await.unwrap(),
        Claim::Completed(Some("done".into())),
        "another replica must see the completion"
    );
}
