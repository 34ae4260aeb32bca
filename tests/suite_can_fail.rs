//! The conformance suite can fail: each deliberately broken backend below
//! breaks one rule, and the matching suite case must panic on it while
//! passing on the honest backend it wraps.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use reliability::memory::{LocalRateLimiter, MemoryIdempotencyStore, MemorySpool};
use reliability::testkit::{idempotency, rate_limit, spool, SpoolFactory};
use reliability::{
    Capabilities, CheckFuture, Claim, DeadReason, DeadRecord, Decision, Durability, Enqueued,
    Error, Fingerprint, IdempotencyStore, Lease, LeaseToken, Leased, ManualClock, NackOutcome,
    NewRecord, Outcome, Quota, RateLimiter, Result, Spool, SpoolLimits, SpoolStats, SpoolToken,
};

/// Runs a suite case in its own task; `true` if it panicked (failed).
async fn fails<Fut>(case: Fut) -> bool
where
    Fut: Future<Output = ()> + Send + 'static,
{
    match tokio::spawn(case).await {
        Ok(()) => false,
        Err(e) => e.is_panic(),
    }
}

fn memory_store(clock: ManualClock) -> MemoryIdempotencyStore {
    MemoryIdempotencyStore::builder()
        .clock(Arc::new(clock))
        .build()
}

/// Breaks "exactly one Acquired": a pending claim is handed out again.
#[derive(Debug)]
struct DoubleAcquire(MemoryIdempotencyStore);

/// Breaks owner checks: LeaseLost is swallowed (Powertools' Redis bug).
#[derive(Debug)]
struct NoOwnerCheck(MemoryIdempotencyStore);

macro_rules! wrap_store {
    ($ty:ident, claim = $claim:expr, owner = $owner:expr) => {
        #[async_trait]
        impl IdempotencyStore for $ty {
            fn capabilities(&self) -> Capabilities {
                self.0.capabilities()
            }
            async fn claim(&self, key: &str, f: &Fingerprint, lease: Duration) -> Result<Claim> {
                let c = self.0.claim(key, f, lease).await;
                ($claim)(key, c)
            }
            async fn complete(&self, l: &Lease, r: Option<Bytes>, t: Duration) -> Result<()> {
                ($owner)(self.0.complete(l, r, t).await)
            }
            async fn release(&self, l: &Lease) -> Result<()> {
                ($owner)(self.0.release(l).await)
            }
            async fn extend(&self, l: &Lease, by: Duration) -> Result<()> {
                ($owner)(self.0.extend(l, by).await)
            }
        }
    };
}

fn honest_claim(_: &str, c: Result<Claim>) -> Result<Claim> {
    c
}
fn honest_owner(r: Result<()>) -> Result<()> {
    r
}

wrap_store!(
    DoubleAcquire,
    claim = |key: &str, c: Result<Claim>| match c {
        Ok(Claim::InProgress { .. }) =>
            Ok(Claim::Acquired(Lease::new(key, LeaseToken::generate()))),
        other => other,
    },
    owner = honest_owner
);
wrap_store!(
    NoOwnerCheck,
    claim = honest_claim,
    owner = |r: Result<()>| match r {
        Err(Error::LeaseLost { .. }) => Ok(()),
        other => other,
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_cases_catch_broken_stores() {
    let honest = |c: ManualClock| async move { memory_store(c) };
    let double = |c: ManualClock| async move { DoubleAcquire(memory_store(c)) };
    let no_owner = |c: ManualClock| async move { NoOwnerCheck(memory_store(c)) };

    assert!(!fails(async move { idempotency::exactly_one_acquired(&honest).await }).await);
    assert!(fails(async move { idempotency::exactly_one_acquired(&double).await }).await);
    assert!(fails(async move { idempotency::pending_claim_is_in_progress(&double).await }).await);
    assert!(
        fails(async move {
            idempotency::stale_lease_is_lease_lost_and_changes_nothing(&no_owner).await
        })
        .await
    );
    assert!(
        !fails(
            async move { idempotency::stale_lease_is_lease_lost_and_changes_nothing(&honest).await }
        )
        .await
    );
}

/// Breaks "a denial is an answer": fails open on every denial and
/// reports `Never` as a plain denial.
#[derive(Debug)]
struct FailsOpen(LocalRateLimiter);

impl RateLimiter for FailsOpen {
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    fn check<'a>(&'a self, key: &'a str, quota: Quota, cost: u32) -> CheckFuture<'a> {
        CheckFuture::new(self.fails_open(key, quota, cost))
    }
}

impl FailsOpen {
    async fn fails_open(&self, key: &str, quota: Quota, cost: u32) -> Result<Decision> {
        let mut d = self.0.check(key, quota, cost).await?;
        match d.outcome {
            Outcome::Denied => d.outcome = Outcome::Allowed,
            Outcome::Never => d.outcome = Outcome::Denied,
            Outcome::Allowed => {}
        }
        Ok(d)
    }
}

/// Breaks "a denial changes no state": every check also consumes one cell.
#[derive(Debug)]
struct DenialConsumes(LocalRateLimiter);

impl RateLimiter for DenialConsumes {
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    fn check<'a>(&'a self, key: &'a str, quota: Quota, cost: u32) -> CheckFuture<'a> {
        CheckFuture::new(self.consumes(key, quota, cost))
    }
}

impl DenialConsumes {
    async fn consumes(&self, key: &str, quota: Quota, cost: u32) -> Result<Decision> {
        let d = self.0.check(key, quota, cost).await?;
        if d.outcome == Outcome::Denied {
            // Pretend the failed attempt was an arrival: push the TAT forward.
            let one = Quota::from_micros(quota.emission_interval_us(), 1_000_000)?;
            let _ = self.0.check(key, one, 1).await?;
        }
        Ok(d)
    }
}

fn limiter(c: ManualClock) -> LocalRateLimiter {
    LocalRateLimiter::builder().clock(Arc::new(c)).build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limit_cases_catch_broken_limiters() {
    let honest = |c: ManualClock| async move { limiter(c) };
    let open = |c: ManualClock| async move { FailsOpen(limiter(c)) };
    let consumes = |c: ManualClock| async move { DenialConsumes(limiter(c)) };

    assert!(!fails(async move { rate_limit::burst_then_denied(&honest).await }).await);
    assert!(fails(async move { rate_limit::burst_then_denied(&open).await }).await);
    assert!(fails(async move { rate_limit::cost_above_burst_is_never(&open).await }).await);
    assert!(
        fails(async move { rate_limit::concurrent_checks_admit_exactly_burst(&open).await }).await
    );
    assert!(
        fails(async move {
            rate_limit::denial_changes_nothing_and_retry_after_is_exact(&consumes).await
        })
        .await
    );
    assert!(fails(async move { rate_limit::matches_reference_gcra(&consumes).await }).await);
    assert!(!fails(async move { rate_limit::matches_reference_gcra(&honest).await }).await);
}

/// Spools with one broken rule each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Breakage {
    None,
    /// A full spool silently drops the newest batch instead of `Err(Full)`.
    DropsWhenFull,
    /// `ack` does nothing: acked records come back.
    AckIsNoop,
    /// Expired records vanish instead of going to the dead-letter queue.
    PurgesExpired,
}

#[derive(Debug)]
struct BrokenSpool(MemorySpool, Breakage);

#[async_trait]
impl Spool for BrokenSpool {
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    async fn enqueue(&self, batch: Vec<NewRecord>) -> Result<Enqueued> {
        let n = batch.len();
        match self.0.enqueue(batch).await {
            Err(Error::Full { .. }) if self.1 == Breakage::DropsWhenFull => {
                Ok(Enqueued::new(Durability::Volatile, n, 0))
            }
            other => other,
        }
    }
    async fn lease(&self, max: usize, ttl: Duration) -> Result<Vec<Leased>> {
        let got = self.0.lease(max, ttl).await?;
        if self.1 == Breakage::PurgesExpired {
            let _ = self.0.purge_dead(usize::MAX).await?;
        }
        Ok(got)
    }
    async fn ack(&self, token: &SpoolToken) -> Result<()> {
        if self.1 == Breakage::AckIsNoop {
            return Ok(());
        }
        self.0.ack(token).await
    }
    async fn nack(&self, token: &SpoolToken, retry_in: Duration) -> Result<NackOutcome> {
        self.0.nack(token, retry_in).await
    }
    async fn extend(&self, token: &SpoolToken, by: Duration) -> Result<()> {
        self.0.extend(token, by).await
    }
    async fn dead_letter(&self, token: &SpoolToken, reason: DeadReason) -> Result<()> {
        self.0.dead_letter(token, reason).await
    }
    async fn list_dead(&self, max: usize) -> Result<Vec<DeadRecord>> {
        self.0.list_dead(max).await
    }
    async fn redrive_dead(&self, max: usize) -> Result<usize> {
        self.0.redrive_dead(max).await
    }
    async fn purge_dead(&self, max: usize) -> Result<usize> {
        self.0.purge_dead(max).await
    }
    async fn stats(&self) -> Result<SpoolStats> {
        self.0.stats().await
    }
}

struct Broken(Breakage);

#[async_trait]
impl SpoolFactory for Broken {
    type Spool = BrokenSpool;
    async fn create(&self, clock: ManualClock, limits: SpoolLimits) -> BrokenSpool {
        BrokenSpool(
            MemorySpool::builder()
                .limits(limits)
                .clock(Arc::new(clock))
                .build(),
            self.0,
        )
    }
    async fn reopen(&self, s: BrokenSpool, _: ManualClock, _: SpoolLimits) -> BrokenSpool {
        s
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spool_cases_catch_broken_spools() {
    use Breakage::*;
    assert!(
        !fails(async { spool::full_spool_answers_full_and_loses_nothing(&Broken(None)).await })
            .await
    );
    assert!(
        fails(async {
            spool::full_spool_answers_full_and_loses_nothing(&Broken(DropsWhenFull)).await
        })
        .await
    );
    assert!(
        !fails(async { spool::ack_is_idempotent_and_owner_checked(&Broken(None)).await }).await
    );
    assert!(
        fails(async { spool::ack_is_idempotent_and_owner_checked(&Broken(AckIsNoop)).await }).await
    );

    assert!(!fails(async { spool::retention_expiry_dead_letters(&Broken(None)).await }).await);
    assert!(
        fails(async { spool::retention_expiry_dead_letters(&Broken(PurgesExpired)).await }).await
    );
}
