//! `MemoryIdempotencyStore` claim semantics: exactly one winner under
//! contention, owner checks on stale leases, replay, mismatch, expiry,
//! retention, and argument validation.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reliability_core::key::{MAX_ID_BYTES, MAX_VERBATIM_ID_BYTES};
use reliability_core::{
    Claim, Error, Fingerprint, IdempotencyStore, IdempotencyStoreExt, ManualClock,
};
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

#[tokio::test]
async fn expired_unreclaimed_lease_is_lost() {
    let clock = ManualClock::new();
    let s = store(&clock);
    let lease = s
        .claim("k", &fp("a"), LEASE)
        .await
        .unwrap()
        .into_lease()
        .unwrap();
    clock.advance(LEASE + Duration::from_micros(1));
    assert!(matches!(
        s.complete(&lease, None, RETENTION).await,
        Err(Error::LeaseLost { .. })
    ));
    assert!(matches!(
        s.extend(&lease, LEASE).await,
        Err(Error::LeaseLost { .. })
    ));
    assert!(s
        .claim("k", &fp("a"), LEASE)
        .await
        .unwrap()
        .into_lease()
        .is_some());
}

#[tokio::test]
async fn completed_replay_and_mismatch() {
    let clock = ManualClock::new();
    let s = store(&clock);
    let lease = s
        .claim("evt", &fp("a"), LEASE)
        .await
        .unwrap()
        .into_lease()
        .unwrap();
    // Pending: same fingerprint waits, another one is a mismatch.
    assert!(matches!(
        s.claim("evt", &fp("a"), LEASE).await.unwrap(),
        Claim::InProgress { retry_after } if retry_after == LEASE
    ));
    assert_eq!(
        s.claim("evt", &fp("b"), LEASE).await.unwrap(),
        Claim::Mismatch
    );
    s.complete(&lease, Some("200 OK".into()), RETENTION)
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(
            s.claim("evt", &fp("a"), LEASE).await.unwrap(),
            Claim::Completed(Some(Bytes::from_static(b"200 OK")))
        );
    }
    assert_eq!(
        s.claim("evt", &fp("b"), LEASE).await.unwrap(),
        Claim::Mismatch
    );
    // A completion without a result replays `None`.
    let l2 = s
        .claim("evt2", &fp("a"), LEASE)
        .await
        .unwrap()
        .into_lease()
        .unwrap();
    s.complete(&l2, None, RETENTION).await.unwrap();
    assert_eq!(
        s.claim("evt2", &fp("a"), LEASE).await.unwrap(),
        Claim::Completed(None)
    );
}

#[tokio::test]
async fn pending_claim_expires_after_lease_and_extend_moves_it() {
    let clock = ManualClock::new();
    let s = store(&clock);
    let lease = s
        .claim("k", &fp("a"), LEASE)
        .await
        .unwrap()
        .into_lease()
        .unwrap();
    clock.advance(LEASE - Duration::from_micros(1));
    assert_eq!(
        s.claim("k", &fp("a"), LEASE).await.unwrap(),
        Claim::InProgress {
            retry_after: Duration::from_micros(1)
        }
    );
    // Heartbeat: now expires 10 s from now.
    s.extend(&lease, Duration::from_secs(10)).await.unwrap();
    clock.advance(Duration::from_secs(9));
    assert_eq!(
        s.claim("k", &fp("a"), LEASE).await.unwrap(),
        Claim::InProgress {
            retry_after: Duration::from_secs(1)
        }
    );
    clock.advance(Duration::from_secs(1));
    // Expired: absent everywhere, even for another fingerprint.
    let next = s.claim("k", &fp("other"), LEASE).await.unwrap();
    assert!(matches!(next, Claim::Acquired(_)));
}

#[tokio::test]
async fn complete_resets_ttl_to_retention() {
    let clock = ManualClock::new();
    let s = store(&clock);
    let lease = s
        .claim("k", &fp("a"), Duration::from_secs(5))
        .await
        .unwrap()
        .into_lease()
        .unwrap();
    clock.advance(Duration::from_secs(4));
    let retention = Duration::from_secs(100);
    s.complete(&lease, Some("r".into()), retention)
        .await
        .unwrap();
    // Long past the lease, within retention: still completed.
    clock.advance(retention - Duration::from_micros(1));
    assert!(matches!(
        s.claim("k", &fp("a"), LEASE).await.unwrap(),
        Claim::Completed(Some(_))
    ));
    clock.advance(Duration::from_micros(1));
    assert!(matches!(
        s.claim("k", &fp("a"), LEASE).await.unwrap(),
        Claim::Acquired(_)
    ));
}

#[tokio::test]
async fn release_lets_others_acquire() {
    let clock = ManualClock::new();
    let s = store(&clock);
    let lease = s
        .claim("k", &fp("a"), LEASE)
        .await
        .unwrap()
        .into_lease()
        .unwrap();
    s.release(&lease).await.unwrap();
    assert!(matches!(
        s.release(&lease).await,
        Err(Error::LeaseLost { .. })
    ));
    let again = s.claim("k", &fp("b"), LEASE).await.unwrap();
    assert!(matches!(again, Claim::Acquired(_)));
}

#[tokio::test]
async fn first_seen_drops_duplicates() {
    let clock = ManualClock::new();
    let s = store(&clock);
    assert!(s.first_seen("msg-1", RETENTION).await.unwrap());
    assert!(!s.first_seen("msg-1", RETENTION).await.unwrap());
    clock.advance(RETENTION);
    assert!(s.first_seen("msg-1", RETENTION).await.unwrap());
}

#[tokio::test]
async fn bad_arguments_are_refused() {
    let clock = ManualClock::new();
    let s = MemoryIdempotencyStore::builder()
        .clock(Arc::new(clock.clone()))
        .max_result_bytes(16)
        .build();
    assert!(matches!(
        s.claim("", &fp("a"), LEASE).await,
        Err(Error::InvalidKey { .. })
    ));
    let huge = "x".repeat(MAX_ID_BYTES + 1);
    assert!(matches!(
        s.claim(&huge, &fp("a"), LEASE).await,
        Err(Error::TooLarge { what: "key", .. })
    ));
    assert!(matches!(
        s.claim("k", &fp("a"), Duration::ZERO).await,
        Err(Error::InvalidArgument { name: "lease", .. })
    ));
    let lease = s
        .claim("k", &fp("a"), LEASE)
        .await
        .unwrap()
        .into_lease()
        .unwrap();
    assert!(matches!(
        s.complete(&lease, None, Duration::ZERO).await,
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        s.extend(&lease, Duration::ZERO).await,
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        s.complete(&lease, Some(Bytes::from(vec![0u8; 17])), RETENTION)
            .await,
        Err(Error::TooLarge {
            what: "result",
            size: 17,
            limit: 16
        })
    ));
    // Refused calls changed nothing: still pending, the owner completes.
    assert!(matches!(
        s.claim("k", &fp("a"), LEASE).await.unwrap(),
        Claim::InProgress { .. }
    ));
    s.complete(&lease, Some(Bytes::from(vec![0u8; 16])), RETENTION)
        .await
        .unwrap();
}

#[tokio::test]
async fn long_ids_are_hashed_consistently() {
    let clock = ManualClock::new();
    let s = store(&clock);
    let long = "y".repeat(MAX_VERBATIM_ID_BYTES + 50);
    let lease = s
        .claim(&long, &fp("a"), LEASE)
        .await
        .unwrap()
        .into_lease()
        .unwrap();
    assert_eq!(lease.key(), long, "the lease keeps the caller's key");
    s.complete(&lease, Some("ok".into()), RETENTION)
        .await
        .unwrap();
    assert!(matches!(
        s.claim(&long, &fp("a"), LEASE).await.unwrap(),
        Claim::Completed(Some(_))
    ));
    // A different long id with the same prefix is a different key.
    let other = format!("{long}z");
    assert!(matches!(
        s.claim(&other, &fp("a"), LEASE).await.unwrap(),
        Claim::Acquired(_)
    ));
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
/// must move that deadline to the retention (CONTRACT.md: the `Expiry` returns
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
