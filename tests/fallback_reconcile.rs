//! Failback reconciliation of the idempotency journal: claims answered
//! locally while the primary was cut off (breaker isolated) stay honoured
//! for their TTL and are replayed to the primary; conflicts are counted.

use std::sync::Arc;
use std::time::Duration;

use reliability::fallback::{Breaker, BreakerConfig, Fallback};
use reliability::memory::MemoryIdempotencyStore;
use reliability::status::BreakerState;
use reliability::{Claim, Fingerprint, IdempotencyStore, ManualClock};

const LEASE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);

struct Setup {
    clock: ManualClock,
    breaker: Arc<Breaker>,
    /// The shared store other replicas reach directly.
    primary: Arc<MemoryIdempotencyStore>,
    fallback: Fallback<Arc<MemoryIdempotencyStore>, MemoryIdempotencyStore>,
}

fn setup() -> Setup {
    let clock = ManualClock::new();
    let shared = Arc::new(clock.clone());
    let breaker = Arc::new(Breaker::new(BreakerConfig::default(), shared.clone()));
    let primary = Arc::new(
        MemoryIdempotencyStore::builder()
            .clock(shared.clone())
            .build(),
    );
    let secondary = MemoryIdempotencyStore::builder().clock(shared).build();
    let fallback = Fallback::new(primary.clone(), secondary, breaker.clone());
    Setup {
        clock,
        breaker,
        primary,
        fallback,
    }
}

/// Back from isolation the way a probe brings it back: two successes.
fn fail_back(b: &Breaker) {
    b.release();
    b.record_success();
    b.record_success();
    assert_eq!(b.state(), BreakerState::Closed);
}

fn fp(s: &str) -> Fingerprint {
    Fingerprint::of(s)
}

#[tokio::test]
async fn outage_claims_are_replayed_and_honoured_after_failback() {
    let s = setup();
    s.breaker.isolate();
    let done = s
        .fallback
        .claim("done", &fp("a"), LEASE)
        .await
        .unwrap()
        .into_lease()
        .unwrap();
    s.fallback
        .complete(&done, Some("202".into()), DAY)
        .await
        .unwrap();
    let _pending = s
        .fallback
        .claim("pending", &fp("a"), LEASE)
        .await
        .unwrap()
        .into_lease()
        .unwrap();
    assert_eq!(s.fallback.pending_reconcile(), 2);

    fail_back(&s.breaker);
    // Within the TTL, the local claims answer first, before any replay.
    assert!(matches!(
        s.fallback.claim("pending", &fp("a"), LEASE).await.unwrap(),
        Claim::InProgress { .. }
    ));
    let report = s.fallback.reconcile().await.unwrap();
    assert_eq!((report.replayed, report.conflicts), (2, 0));
    assert_eq!(s.fallback.pending_reconcile(), 0);

    // Other replicas, going straight to the primary, see both keys.
    assert_eq!(
        s.primary.claim("done", &fp("a"), LEASE).await.unwrap(),
        Claim::Completed(Some("202".into()))
    );
    assert!(matches!(
        s.primary.claim("pending", &fp("a"), LEASE).await.unwrap(),
        Claim::InProgress { .. }
    ));
}

#[tokio::test]
async fn completing_a_replayed_pending_claim_reaches_the_primary() {
    let s = setup();
    s.breaker.isolate();
    let lease = s
        .fallback
        .claim("k", &fp("a"), LEASE)
        .await
        .unwrap()
        .into_lease()
        .unwrap();
    fail_back(&s.breaker);
    s.fallback.reconcile().await.unwrap();
    s.fallback
        .complete(&lease, Some("ok".into()), DAY)
        .await
        .unwrap();
    assert_eq!(
        s.primary.claim("k", &fp("a"), LEASE).await.unwrap(),
        Claim::Completed(Some("ok".into()))
    );
}

#[tokio::test]
async fn a_key_the_primary_got_first_is_a_conflict() {
    let s = setup();
    s.breaker.isolate();
    let _local = s.fallback.claim("k", &fp("a"), LEASE).await.unwrap();
    // Meanwhile another replica, still connected, processed the same event.
    let other = s
        .primary
        .claim("k", &fp("a"), LEASE)
        .await
        .unwrap()
        .into_lease()
        .unwrap();
    s.primary.complete(&other, None, DAY).await.unwrap();
    fail_back(&s.breaker);
    let report = s.fallback.reconcile().await.unwrap();
    assert_eq!((report.replayed, report.conflicts), (0, 1));
    assert_eq!(s.fallback.reconcile_conflicts(), 1);
}

#[tokio::test]
async fn a_primary_lease_completes_while_the_primary_is_cut_off() {
    let s = setup();
    let lease = s
        .fallback
        .claim("k", &fp("a"), LEASE)
        .await
        .unwrap()
        .into_lease()
        .unwrap();
    s.breaker.isolate();
    s.fallback
        .complete(&lease, Some("done".into()), DAY)
        .await
        .unwrap();
    // Answered locally meanwhile.
    assert_eq!(
        s.fallback.claim("k", &fp("a"), LEASE).await.unwrap(),
        Claim::Completed(Some("done".into()))
    );
    fail_back(&s.breaker);
    let report = s.fallback.reconcile().await.unwrap();
    assert_eq!(report.replayed, 1);
    assert_eq!(
        s.primary.claim("k", &fp("a"), LEASE).await.unwrap(),
        Claim::Completed(Some("done".into()))
    );
}

#[tokio::test]
async fn journal_entries_end_with_their_ttl() {
    let s = setup();
    s.breaker.isolate();
    let _ = s.fallback.claim("k", &fp("a"), LEASE).await.unwrap();
    s.clock.advance(LEASE + Duration::from_secs(1));
    fail_back(&s.breaker);
    let report = s.fallback.reconcile().await.unwrap();
    assert_eq!((report.replayed, report.expired), (0, 1));
    assert!(matches!(
        s.fallback.claim("k", &fp("a"), LEASE).await.unwrap(),
        Claim::Acquired(_)
    ));
}
