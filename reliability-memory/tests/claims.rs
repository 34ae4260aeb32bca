//! What the conformance suite (run in `conformance.rs`) does not cover for
//! `MemoryIdempotencyStore`: 1,000 concurrent claimers of one key, the stale
//! lease of issue 2's acceptance list on both clocks, defaults, moka's
//! physical expiry on the real clock, and which keys go at capacity.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reliability_core::{Claim, Error, Fingerprint, IdempotencyStore, ManualClock};
use reliability_memory::MemoryIdempotencyStore;
use tokio::sync::Barrier;

const LEASE: Duration = Duration::from_secs(30);
const RETENTION: Duration = Duration::from_secs(3600);

fn store(clock: &ManualClock) -> MemoryIdempotencyStore {
    MemoryIdempotencyStore::builder()
        .clock(Arc::new(clock.clone()))
        .build()
}

fn fp(s: &str) -> Fingerprint {
    Fingerprint::of(s.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_concurrent_claims_one_acquired() {
    const CLAIMERS: usize = 1_000;
    // Several rounds on fresh keys, each with the real system clock (the
    // physical-expiry path) and a manual one (logical only).
    let stores = [
        Arc::new(MemoryIdempotencyStore::new()),
        Arc::new(store(&ManualClock::new())),
    ];
    for store in stores {
        for round in 0..3 {
            let key = format!("hot-{round}");
            let barrier = Arc::new(Barrier::new(CLAIMERS));
            let tasks: Vec<_> = (0..CLAIMERS)
                .map(|_| {
                    let (store, barrier, key) = (store.clone(), barrier.clone(), key.clone());
                    tokio::spawn(async move {
                        barrier.wait().await;
                        store.claim(&key, &fp("body"), LEASE).await
                    })
                })
                .collect();
            let mut acquired = 0;
            let mut in_progress = 0;
            for t in tasks {
                match t.await.unwrap().unwrap() {
                    Claim::Acquired(_) => acquired += 1,
                    Claim::InProgress { retry_after } => {
                        assert!(retry_after <= LEASE && retry_after > Duration::ZERO);
                        in_progress += 1;
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            assert_eq!((acquired, in_progress), (1, CLAIMERS - 1), "{store:?}");
        }
    }
}

#[tokio::test]
async fn stale_lease_is_lease_lost_and_changes_nothing() {
    let clock = ManualClock::new();
    let s = store(&clock);
    let stale = s
        .claim("k", &fp("a"), LEASE)
        .await
        .unwrap()
        .into_lease()
        .unwrap();
    clock.advance(LEASE); // expires_at <= now: gone
    let fresh_lease = Duration::from_secs(60);
    let owner = s
        .claim("k", &fp("a"), fresh_lease)
        .await
        .unwrap()
        .into_lease()
        .expect("expired claim is re-acquired");
    assert_ne!(owner.token(), stale.token());
    clock.advance(Duration::from_secs(5));

    let lost = |r: reliability_core::Result<()>| matches!(r, Err(Error::LeaseLost { ref key }) if key == "k");
    assert!(lost(
        s.complete(&stale, Some("stale".into()), RETENTION).await
    ));
    assert!(lost(s.release(&stale).await));
    assert!(lost(s.extend(&stale, Duration::from_secs(3600)).await));

    // A third caller sees the new owner's claim, untouched: its remaining
    // lease, not the stale worker's extension or completion.
    assert_eq!(
        s.claim("k", &fp("a"), LEASE).await.unwrap(),
        Claim::InProgress {
            retry_after: Duration::from_secs(55)
        }
    );
    // And the new owner still owns it.
    s.complete(&owner, Some("fresh".into()), RETENTION)
        .await
        .unwrap();
    assert_eq!(
        s.claim("k", &fp("a"), LEASE).await.unwrap(),
        Claim::Completed(Some(Bytes::from_static(b"fresh")))
    );
    // Once completed, the owner's own lease is spent too.
    assert!(lost(s.complete(&owner, None, RETENTION).await));
    assert!(lost(s.release(&owner).await));
    assert!(lost(s.extend(&owner, LEASE).await));
}

#[test]
fn defaults_and_capabilities() {
    let s = MemoryIdempotencyStore::default();
    assert_eq!(s.max_entries(), reliability_memory::DEFAULT_MAX_ENTRIES);
    assert_eq!(
        s.max_result_bytes(),
        reliability_core::idempotency::DEFAULT_MAX_RESULT_BYTES
    );
    let c = s.capabilities();
    assert_eq!(c.backend, "memory");
    assert!(c.bounded && !c.distributed && !c.durable);
    assert!(format!("{s:?}").contains("MemoryIdempotencyStore"));
}

/// With a real-time clock moka also expires entries physically; completing
/// must move that deadline to the retention (the `Expiry` returns
/// the new TTL on update), or the completed entry would vanish with the lease.
#[tokio::test]
async fn real_clock_complete_outlives_the_lease() {
    let s = MemoryIdempotencyStore::new();
    let short = Duration::from_millis(40);
    let lease = s
        .claim("rt", &fp("a"), short)
        .await
        .unwrap()
        .into_lease()
        .unwrap();
    s.complete(&lease, Some("kept".into()), RETENTION)
        .await
        .unwrap();
    let pending = s.claim("rt-pending", &fp("a"), short).await.unwrap();
    assert!(matches!(pending, Claim::Acquired(_)));
    // A negative check (nothing may expire early) needs real time to pass:
    // wait well past the lease.
    tokio::time::sleep(short * 4).await;
    assert_eq!(
        s.claim("rt", &fp("a"), LEASE).await.unwrap(),
        Claim::Completed(Some(Bytes::from_static(b"kept")))
    );
    // The uncompleted claim did expire with its lease.
    assert!(matches!(
        s.claim("rt-pending", &fp("a"), LEASE).await.unwrap(),
        Claim::Acquired(_)
    ));
}

/// At capacity the store forgets the least recently used keys first: the
/// claims just made (the ones a retried delivery comes back for) stay
/// deduplicated. Under moka's default TinyLFU admission a key seen once
/// lost to the keys already held, so a fresh claim at capacity was often
/// not kept at all (here all 100 latest claims were acquired again).
#[tokio::test]
async fn at_capacity_the_latest_claims_are_kept() {
    const CAP: u64 = 1_000;
    let store = MemoryIdempotencyStore::builder().max_entries(CAP).build();
    for i in 0..6 * CAP {
        let claim = store
            .claim(&format!("k{i}"), &fp("x"), LEASE)
            .await
            .unwrap();
        assert!(matches!(claim, Claim::Acquired(_)), "k{i}: {claim:?}");
    }
    // moka applies evictions in batches, on later calls: give it some (a
    // tenth of the cap, so the keys checked stay among the latest).
    for i in 0..CAP / 10 {
        let claim = store.claim(&format!("other{i}"), &fp("x"), LEASE).await;
        assert!(
            matches!(claim, Ok(Claim::Acquired(_))),
            "other{i}: {claim:?}"
        );
    }
    let mut acquired_again = Vec::new();
    for i in 6 * CAP - 100..6 * CAP {
        let key = format!("k{i}");
        match store.claim(&key, &fp("x"), LEASE).await.unwrap() {
            Claim::InProgress { .. } => {}
            other => acquired_again.push((key, format!("{other:?}"))),
        }
    }
    assert!(
        acquired_again.is_empty(),
        "{} of the 100 latest pending claims forgotten at capacity, e.g. {:?}",
        acquired_again.len(),
        acquired_again.first()
    );
}
