//! Conformance cases for [`IdempotencyStore`] (the idempotency rules).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::IdempotencyFactory;
use crate::clock::ManualClock;
use crate::error::Error;
use crate::idempotency::{
    Claim, Fingerprint, IdempotencyStore, IdempotencyStoreExt, Lease, DEFAULT_MAX_RESULT_BYTES,
};
use crate::key::{MAX_ID_BYTES, MAX_VERBATIM_ID_BYTES};

const LEASE: Duration = Duration::from_secs(30);
const RETENTION: Duration = Duration::from_secs(24 * 3600);

fn fp(s: &str) -> Fingerprint {
    Fingerprint::of(s)
}

async fn acquire<S: IdempotencyStore + ?Sized>(
    store: &S,
    key: &str,
    f: &Fingerprint,
    lease: Duration,
) -> Lease {
    match store.claim(key, f, lease).await {
        Ok(Claim::Acquired(l)) => l,
        other => panic!("claim of fresh key {key:?} should be Acquired, got {other:?}"),
    }
}

async fn claim<S: IdempotencyStore + ?Sized>(store: &S, key: &str, f: &Fingerprint) -> Claim {
    store
        .claim(key, f, LEASE)
        .await
        .unwrap_or_else(|e| panic!("claim of {key:?} failed: {e}"))
}

/// Exactly one `Acquired` among 64 concurrent claimers of one key.
pub async fn exactly_one_acquired<F: IdempotencyFactory>(factory: &F) {
    let store = Arc::new(factory.create(ManualClock::new()).await);
    for round in 0..3 {
        let key = format!("race-{round}");
        let barrier = Arc::new(tokio::sync::Barrier::new(64));
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let (store, barrier, key) = (store.clone(), barrier.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                store.claim(&key, &fp("body"), LEASE).await
            }));
        }
        let mut acquired = 0;
        for t in tasks {
            match t.await.expect("claim task panicked") {
                Ok(Claim::Acquired(_)) => acquired += 1,
                Ok(Claim::InProgress { .. }) => {}
                other => panic!("unexpected answer to a concurrent claim: {other:?}"),
            }
        }
        assert_eq!(
            acquired, 1,
            "exactly one of 64 concurrent claims must be Acquired"
        );
    }
}

/// A pending claim answers `InProgress` with the lease time left.
pub async fn pending_claim_is_in_progress<F: IdempotencyFactory>(factory: &F) {
    let clock = ManualClock::new();
    let store = factory.create(clock.clone()).await;
    let _lease = acquire(&store, "evt", &fp("a"), LEASE).await;
    clock.advance(Duration::from_secs(10));
    match claim(&store, "evt", &fp("a")).await {
        Claim::InProgress { retry_after } => {
            let expected = Duration::from_secs(20);
            assert!(
                retry_after <= expected && retry_after + Duration::from_millis(1) >= expected,
                "retry_after {retry_after:?} should be the lease left ({expected:?})"
            );
        }
        other => panic!("expected InProgress, got {other:?}"),
    }
}

/// A completed claim replays the stored result (or none).
pub async fn completed_claim_replays_result<F: IdempotencyFactory>(factory: &F) {
    let store = factory.create(ManualClock::new()).await;
    let lease = acquire(&store, "with-result", &fp("a"), LEASE).await;
    store
        .complete(&lease, Some(Bytes::from_static(b"201 Created")), RETENTION)
        .await
        .expect("complete by the owner");
    assert_eq!(
        claim(&store, "with-result", &fp("a")).await,
        Claim::Completed(Some(Bytes::from_static(b"201 Created")))
    );
    let lease = acquire(&store, "without-result", &fp("a"), LEASE).await;
    store
        .complete(&lease, None, RETENTION)
        .await
        .expect("complete");
    assert_eq!(
        claim(&store, "without-result", &fp("a")).await,
        Claim::Completed(None)
    );
    let lease = acquire(&store, "empty-result", &fp("a"), LEASE).await;
    store
        .complete(&lease, Some(Bytes::new()), RETENTION)
        .await
        .expect("complete");
    assert_eq!(
        claim(&store, "empty-result", &fp("a")).await,
        Claim::Completed(Some(Bytes::new())),
        "an empty result is not the same as no result"
    );
}

/// Same key with another fingerprint is `Mismatch`, pending or completed.
pub async fn other_fingerprint_is_mismatch<F: IdempotencyFactory>(factory: &F) {
    let store = factory.create(ManualClock::new()).await;
    let lease = acquire(&store, "k", &fp("a"), LEASE).await;
    assert_eq!(claim(&store, "k", &fp("b")).await, Claim::Mismatch);
    store
        .complete(&lease, None, RETENTION)
        .await
        .expect("complete");
    assert_eq!(claim(&store, "k", &fp("b")).await, Claim::Mismatch);
    assert_eq!(claim(&store, "k", &fp("a")).await, Claim::Completed(None));
}

/// A pending claim expires after its lease (crashed worker); the old lease
/// is lost at once, before anyone re-claims the key.
pub async fn pending_claim_expires_after_lease<F: IdempotencyFactory>(factory: &F) {
    let clock = ManualClock::new();
    let store = factory.create(clock.clone()).await;
    let old = acquire(&store, "k", &fp("a"), LEASE).await;
    clock.advance(LEASE - Duration::from_millis(1));
    assert!(matches!(
        claim(&store, "k", &fp("a")).await,
        Claim::InProgress { .. }
    ));
    clock.advance(Duration::from_millis(2));
    // Expired and not yet re-claimed: the lease is already lost.
    assert!(matches!(
        store.extend(&old, LEASE).await,
        Err(Error::LeaseLost { .. })
    ));
    assert!(matches!(
        store.complete(&old, None, RETENTION).await,
        Err(Error::LeaseLost { .. })
    ));
    let new = acquire(&store, "k", &fp("a"), LEASE).await;
    assert_ne!(old.token(), new.token());
    assert!(matches!(
        store.complete(&old, None, RETENTION).await,
        Err(Error::LeaseLost { .. })
    ));
}

/// `complete` resets the TTL to `retention`, whatever was left of the lease.
pub async fn complete_resets_ttl_to_retention<F: IdempotencyFactory>(factory: &F) {
    let clock = ManualClock::new();
    let store = factory.create(clock.clone()).await;
    let lease = acquire(&store, "k", &fp("a"), Duration::from_secs(10)).await;
    store
        .complete(&lease, None, Duration::from_secs(3600))
        .await
        .expect("complete");
    clock.advance(Duration::from_secs(3599));
    assert_eq!(claim(&store, "k", &fp("a")).await, Claim::Completed(None));
    clock.advance(Duration::from_secs(2));
    let _ = acquire(&store, "k", &fp("a"), LEASE).await;
}

/// `complete`, `release` and `extend` with a stale lease give `LeaseLost`
/// and leave the new owner's claim untouched.
pub async fn stale_lease_is_lease_lost_and_changes_nothing<F: IdempotencyFactory>(factory: &F) {
    let clock = ManualClock::new();
    let store = factory.create(clock.clone()).await;
    let stale = acquire(&store, "k", &fp("a"), LEASE).await;
    clock.advance(LEASE + Duration::from_secs(1));
    let owner = acquire(&store, "k", &fp("a"), LEASE).await;

    let lost = |r: Result<(), Error>, op: &str| {
        assert!(
            matches!(r, Err(Error::LeaseLost { .. })),
            "{op} with a stale lease must be LeaseLost, got {r:?}"
        );
    };
    lost(
        store
            .complete(&stale, Some(Bytes::from_static(b"stale")), RETENTION)
            .await,
        "complete",
    );
    lost(store.release(&stale).await, "release");
    lost(
        store.extend(&stale, Duration::from_secs(3600)).await,
        "extend",
    );

    // Nothing changed: still pending with the owner's lease left, not extended.
    clock.advance(Duration::from_secs(10));
    match claim(&store, "k", &fp("a")).await {
        Claim::InProgress { retry_after } => assert!(
            retry_after <= Duration::from_secs(20),
            "a stale extend must not extend the owner's lease (left: {retry_after:?})"
        ),
        other => panic!("the owner's claim must still be pending, got {other:?}"),
    }
    store
        .complete(&owner, Some(Bytes::from_static(b"owner")), RETENTION)
        .await
        .expect("the owner can still complete");
    assert_eq!(
        claim(&store, "k", &fp("a")).await,
        Claim::Completed(Some(Bytes::from_static(b"owner")))
    );
    // A completed entry is not the owner's to complete again or release.
    lost(
        store.complete(&owner, None, RETENTION).await,
        "second complete",
    );
    lost(store.release(&owner).await, "release after complete");
    // A lease of a key that never existed is lost too.
    let ghost = Lease::new("never-claimed", stale.token());
    lost(
        store.complete(&ghost, None, RETENTION).await,
        "complete of an unknown key",
    );
}

/// `release` deletes the owner's pending claim so another caller acquires.
pub async fn release_lets_others_acquire<F: IdempotencyFactory>(factory: &F) {
    let store = factory.create(ManualClock::new()).await;
    let lease = acquire(&store, "k", &fp("a"), LEASE).await;
    store.release(&lease).await.expect("release by the owner");
    let again = acquire(
        &store,
        "k",
        &fp("other payload is fine after release"),
        LEASE,
    )
    .await;
    assert_ne!(lease.token(), again.token());
}

/// `extend` by the owner keeps a claim alive past its first lease.
pub async fn extend_keeps_claim_alive<F: IdempotencyFactory>(factory: &F) {
    let clock = ManualClock::new();
    let store = factory.create(clock.clone()).await;
    let lease = acquire(&store, "k", &fp("a"), LEASE).await;
    clock.advance(Duration::from_secs(25));
    store
        .extend(&lease, Duration::from_secs(60))
        .await
        .expect("extend");
    clock.advance(Duration::from_secs(50));
    match claim(&store, "k", &fp("a")).await {
        Claim::InProgress { retry_after } => assert!(
            retry_after <= Duration::from_secs(10) && retry_after >= Duration::from_secs(9),
            "after extend(60s) and 50s, about 10s are left, got {retry_after:?}"
        ),
        other => panic!("an extended claim must still be pending, got {other:?}"),
    }
    store
        .complete(&lease, None, RETENTION)
        .await
        .expect("complete after extend");
}

/// `first_seen` is true once per key within the TTL.
pub async fn first_seen_drops_duplicates<F: IdempotencyFactory>(factory: &F) {
    let clock = ManualClock::new();
    let store = factory.create(clock.clone()).await;
    let ttl = Duration::from_secs(300);
    assert!(store.first_seen("msg-1", ttl).await.expect("first_seen"));
    assert!(!store.first_seen("msg-1", ttl).await.expect("first_seen"));
    assert!(store.first_seen("msg-2", ttl).await.expect("first_seen"));
    clock.advance(ttl + Duration::from_secs(1));
    assert!(
        store.first_seen("msg-1", ttl).await.expect("first_seen"),
        "seen again after ttl"
    );
}

/// Empty keys are invalid, long ones work (hashed), huge ones are refused.
pub async fn keys_are_validated<F: IdempotencyFactory>(factory: &F) {
    let store = factory.create(ManualClock::new()).await;
    assert!(matches!(
        store.claim("", &fp("a"), LEASE).await,
        Err(Error::InvalidKey { .. })
    ));
    assert!(matches!(
        store
            .claim(&"k".repeat(MAX_ID_BYTES + 1), &fp("a"), LEASE)
            .await,
        Err(Error::TooLarge { what: "key", .. })
    ));
    let long_a = format!("{}a", "x".repeat(MAX_VERBATIM_ID_BYTES + 50));
    let long_b = format!("{}b", "x".repeat(MAX_VERBATIM_ID_BYTES + 50));
    let la = acquire(&store, &long_a, &fp("a"), LEASE).await;
    let _lb = acquire(&store, &long_b, &fp("a"), LEASE).await;
    assert_eq!(la.key(), long_a, "the lease names the key as given");
    store
        .complete(&la, None, RETENTION)
        .await
        .expect("complete long key");
    assert_eq!(
        claim(&store, &long_a, &fp("a")).await,
        Claim::Completed(None)
    );
    let odd = "tenant:7/evt 42 ✓";
    let _ = acquire(&store, odd, &fp("a"), LEASE).await;
}

/// Zero leases, retentions and extensions are invalid arguments.
pub async fn zero_durations_are_invalid<F: IdempotencyFactory>(factory: &F) {
    let store = factory.create(ManualClock::new()).await;
    assert!(matches!(
        store.claim("k", &fp("a"), Duration::ZERO).await,
        Err(Error::InvalidArgument { .. })
    ));
    let lease = acquire(&store, "k", &fp("a"), LEASE).await;
    assert!(matches!(
        store.extend(&lease, Duration::ZERO).await,
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        store.complete(&lease, None, Duration::ZERO).await,
        Err(Error::InvalidArgument { .. })
    ));
    store
        .complete(&lease, None, RETENTION)
        .await
        .expect("the lease is still usable");
}

/// A result above the default limit is refused and the claim stays pending.
pub async fn oversize_result_is_refused<F: IdempotencyFactory>(factory: &F) {
    let store = factory.create(ManualClock::new()).await;
    let lease = acquire(&store, "k", &fp("a"), LEASE).await;
    let big = Bytes::from(vec![7u8; DEFAULT_MAX_RESULT_BYTES + 1]);
    assert!(matches!(
        store.complete(&lease, Some(big), RETENTION).await,
        Err(Error::TooLarge { what: "result", .. })
    ));
    assert!(matches!(
        claim(&store, "k", &fp("a")).await,
        Claim::InProgress { .. }
    ));
    let max = Bytes::from(vec![7u8; DEFAULT_MAX_RESULT_BYTES]);
    store
        .complete(&lease, Some(max.clone()), RETENTION)
        .await
        .expect("a result at the limit fits");
    assert_eq!(
        claim(&store, "k", &fp("a")).await,
        Claim::Completed(Some(max))
    );
}
