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

mod spool {
    use super::*;
    use reliability::memory::MemorySpool;
    use reliability::{NewRecord, RecordId, Spool};

    fn rec(id: &str) -> NewRecord {
        NewRecord::new(RecordId::new(id).unwrap(), format!("payload {id}"))
    }

    #[tokio::test]
    async fn outage_records_drain_back_with_their_ids_and_history() {
        let clock = ManualClock::new();
        let shared = Arc::new(clock.clone());
        let breaker = Arc::new(Breaker::new(BreakerConfig::default(), shared.clone()));
        let primary = Arc::new(MemorySpool::builder().clock(shared.clone()).build());
        let secondary = Arc::new(MemorySpool::builder().clock(shared).build());
        let f = Fallback::new(primary.clone(), secondary.clone(), breaker.clone());

        f.enqueue(vec![rec("before")]).await.unwrap();
        breaker.isolate();
        f.enqueue(vec![rec("during-1"), rec("during-2"), rec("during-3")])
            .await
            .unwrap();
        // Delivery goes on locally during the outage: one try fails.
        let got = f.lease(1, Duration::from_secs(30)).await.unwrap();
        assert_eq!(got[0].record.id.as_str(), "during-1");
        let _ = f.nack(&got[0].token, Duration::ZERO).await.unwrap();
        assert_eq!(secondary.stats().await.unwrap().depth(), 3);
        assert_eq!(primary.stats().await.unwrap().depth(), 1);

        fail_back(&breaker);
        let report = f.drain().await.unwrap();
        assert_eq!(
            (report.moved, report.duplicates, report.interrupted),
            (3, 0, false)
        );
        assert_eq!(
            secondary.stats().await.unwrap().depth(),
            0,
            "acked on the secondary"
        );
        let all = primary.lease(10, Duration::from_secs(30)).await.unwrap();
        let mut ids: Vec<_> = all.iter().map(|l| l.record.id.to_string()).collect();
        ids.sort();
        assert_eq!(ids, ["before", "during-1", "during-2", "during-3"]);
        let d1 = all
            .iter()
            .find(|l| l.record.id.as_str() == "during-1")
            .unwrap();
        assert_eq!(
            d1.record.attempts, 2,
            "the failed try travels with the record"
        );
        assert_eq!(d1.record.payload, bytes::Bytes::from("payload during-1"));
    }

    #[tokio::test]
    async fn a_drain_that_meets_a_full_primary_keeps_the_records() {
        let clock = ManualClock::new();
        let shared = Arc::new(clock.clone());
        let breaker = Arc::new(Breaker::new(BreakerConfig::default(), shared.clone()));
        let limits = reliability::SpoolLimits::default().with_max_records(1);
        let primary = MemorySpool::builder()
            .limits(limits)
            .clock(shared.clone())
            .build();
        let secondary = Arc::new(MemorySpool::builder().clock(shared).build());
        let f = Fallback::new(primary, secondary.clone(), breaker.clone());
        breaker.isolate();
        f.enqueue(vec![rec("a"), rec("b")]).await.unwrap();
        fail_back(&breaker);
        assert!(matches!(
            f.drain().await,
            Err(reliability::Error::Full { .. })
        ));
        assert_eq!(secondary.stats().await.unwrap().depth(), 2, "nothing lost");
    }
}
