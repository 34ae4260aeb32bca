//! Conformance cases for [`Spool`] (the spool rules).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::SpoolFactory;
use crate::clock::{Clock, ManualClock};
use crate::error::Error;
use crate::spool::{
    DeadReason, Durability, Leased, NackOutcome, NewRecord, RecordId, Spool, SpoolLimits,
    DEFAULT_MAX_RECORD_BYTES,
};

const TTL: Duration = Duration::from_secs(30);

fn id(s: &str) -> RecordId {
    RecordId::new(s).expect("valid record id")
}

fn rec(s: &str) -> NewRecord {
    NewRecord::new(id(s), Bytes::from(format!("payload of {s}")))
}

async fn enqueue<S: Spool + ?Sized>(spool: &S, batch: Vec<NewRecord>) {
    let n = batch.len();
    let e = spool
        .enqueue(batch)
        .await
        .unwrap_or_else(|e| panic!("enqueue failed: {e}"));
    assert_eq!((e.accepted, e.duplicates), (n, 0));
}

async fn lease<S: Spool + ?Sized>(spool: &S, max: usize) -> Vec<Leased> {
    spool
        .lease(max, TTL)
        .await
        .unwrap_or_else(|e| panic!("lease failed: {e}"))
}

async fn lease_one<S: Spool + ?Sized>(spool: &S, expected: &str) -> Leased {
    let mut got = lease(spool, 1).await;
    assert_eq!(got.len(), 1, "expected {expected} to be due");
    let l = got.remove(0);
    assert_eq!(l.record.id.as_str(), expected);
    l
}

fn ids(leased: &[Leased]) -> Vec<String> {
    leased.iter().map(|l| l.record.id.to_string()).collect()
}

fn lost<T: std::fmt::Debug>(r: Result<T, Error>, op: &str) {
    assert!(
        matches!(r, Err(Error::LeaseLost { .. })),
        "{op} with a stale token must be LeaseLost, got {r:?}"
    );
}

/// Producer ids and payloads come back intact, oldest first, with
/// `attempts == 1` and the enqueue time; durability is reported honestly.
pub async fn enqueue_then_lease_in_order<F: SpoolFactory>(factory: &F) {
    let clock = ManualClock::new();
    let spool = factory.create(clock.clone(), SpoolLimits::default()).await;
    let t0 = clock.now();
    let e = spool
        .enqueue((0..5).map(|i| rec(&format!("r{i}"))).collect())
        .await
        .expect("enqueue");
    assert_eq!(e.accepted, 5);
    assert_eq!(
        spool.capabilities().durable,
        e.durability != Durability::Volatile,
        "durable backends report a durable mode, volatile ones Volatile ({:?})",
        e.durability
    );
    clock.advance(Duration::from_millis(5));
    enqueue(&spool, vec![rec("r5")]).await;
    let got = lease(&spool, 10).await;
    assert_eq!(ids(&got), ["r0", "r1", "r2", "r3", "r4", "r5"]);
    for l in &got {
        assert_eq!(l.record.attempts, 1);
        assert_eq!(
            l.record.payload,
            Bytes::from(format!("payload of {}", l.record.id))
        );
        assert_eq!(l.token.id(), &l.record.id);
    }
    assert_eq!(got[0].record.enqueued_at, t0);
    assert!(lease(&spool, 10).await.is_empty());
}

/// Delayed records are not due before their delay.
pub async fn delayed_records_are_not_due_early<F: SpoolFactory>(factory: &F) {
    let clock = ManualClock::new();
    let spool = factory.create(clock.clone(), SpoolLimits::default()).await;
    enqueue(
        &spool,
        vec![rec("later").with_delay(Duration::from_secs(60)), rec("now")],
    )
    .await;
    let now = lease(&spool, 10).await;
    assert_eq!(ids(&now), ["now"]);
    spool.ack(&now[0].token).await.expect("ack");
    clock.advance(Duration::from_millis(59_999));
    assert!(lease(&spool, 10).await.is_empty());
    clock.advance(Duration::from_millis(1));
    lease_one(&spool, "later").await;
}

/// A leased record is invisible for its ttl, then due again (crashed
/// consumer) with one more attempt and a new token.
pub async fn lease_hides_until_ttl_then_redelivers<F: SpoolFactory>(factory: &F) {
    let clock = ManualClock::new();
    let spool = factory.create(clock.clone(), SpoolLimits::default()).await;
    enqueue(&spool, vec![rec("a")]).await;
    let first = lease_one(&spool, "a").await;
    assert!(lease(&spool, 10).await.is_empty());
    clock.advance(TTL - Duration::from_millis(1));
    assert!(lease(&spool, 10).await.is_empty());
    clock.advance(Duration::from_millis(2));
    let second = lease_one(&spool, "a").await;
    assert_eq!(second.record.attempts, 2);
    assert_ne!(first.token, second.token);
    assert_eq!(second.record.payload, first.record.payload);
}

/// `ack` is idempotent, accepted while this lease still holds the record,
/// and `LeaseLost` once another lease took it or it was nacked.
pub async fn ack_is_idempotent_and_owner_checked<F: SpoolFactory>(factory: &F) {
    let clock = ManualClock::new();
    let spool = factory.create(clock.clone(), SpoolLimits::default()).await;
    enqueue(&spool, vec![rec("a"), rec("b"), rec("c"), rec("d")]).await;
    let a = lease_one(&spool, "a").await;
    spool.ack(&a.token).await.expect("ack");
    spool.ack(&a.token).await.expect("a second ack is a no-op");

    let b1 = lease_one(&spool, "b").await;
    clock.advance(TTL + Duration::from_secs(1));
    let b2 = lease_one(&spool, "b").await;
    lost(spool.ack(&b1.token).await, "ack");
    spool.ack(&b2.token).await.expect("the new owner acks");

    let c = lease_one(&spool, "c").await;
    clock.advance(TTL + Duration::from_secs(1));
    spool
        .ack(&c.token)
        .await
        .expect("an expired lease not yet re-leased may still ack");
    let d = lease_one(&spool, "d").await;
    assert!(lease(&spool, 10).await.is_empty(), "c is gone");

    let _ = spool
        .nack(&d.token, Duration::from_secs(60))
        .await
        .expect("nack");
    lost(spool.ack(&d.token).await, "ack after nack");
    assert_eq!(
        spool.stats().await.expect("stats").depth(),
        1,
        "d waits for its retry"
    );
}

/// `nack` makes a record due again after `retry_in`.
pub async fn nack_schedules_retry<F: SpoolFactory>(factory: &F) {
    let clock = ManualClock::new();
    let spool = factory.create(clock.clone(), SpoolLimits::default()).await;
    enqueue(&spool, vec![rec("a")]).await;
    let first = lease_one(&spool, "a").await;
    let out = spool
        .nack(&first.token, Duration::from_secs(300))
        .await
        .expect("nack");
    assert_eq!(
        out,
        NackOutcome::Scheduled {
            retry_in: Duration::from_secs(300)
        }
    );
    clock.advance(Duration::from_millis(299_999));
    assert!(lease(&spool, 10).await.is_empty());
    clock.advance(Duration::from_millis(1));
    let second = lease_one(&spool, "a").await;
    assert_eq!(second.record.attempts, 2);
    lost(
        spool.nack(&first.token, Duration::from_secs(1)).await,
        "nack",
    );
}

/// `extend` moves the end of the owner's lease; stale tokens are refused.
pub async fn extend_keeps_lease<F: SpoolFactory>(factory: &F) {
    let clock = ManualClock::new();
    let spool = factory.create(clock.clone(), SpoolLimits::default()).await;
    enqueue(&spool, vec![rec("a")]).await;
    let l = lease_one(&spool, "a").await;
    clock.advance(Duration::from_secs(20));
    spool
        .extend(&l.token, Duration::from_secs(60))
        .await
        .expect("extend");
    assert!(matches!(
        spool.extend(&l.token, Duration::ZERO).await,
        Err(Error::InvalidArgument { .. })
    ));
    clock.advance(Duration::from_secs(59));
    assert!(
        lease(&spool, 10).await.is_empty(),
        "extended lease still holds"
    );
    clock.advance(Duration::from_secs(2));
    let again = lease_one(&spool, "a").await;
    lost(
        spool.extend(&l.token, Duration::from_secs(60)).await,
        "extend",
    );
    spool.ack(&again.token).await.expect("ack");
}

/// The attempt count and first-enqueue time travel with the record.
pub async fn attempts_live_in_the_record<F: SpoolFactory>(factory: &F) {
    let clock = ManualClock::new();
    let spool = factory.create(clock.clone(), SpoolLimits::default()).await;
    let born = clock.now().saturating_sub(Duration::from_secs(3600));
    enqueue(&spool, vec![rec("moved").with_history(3, born)]).await;
    let l = lease_one(&spool, "moved").await;
    assert_eq!(l.record.attempts, 4);
    assert_eq!(l.record.enqueued_at, born);
}

/// A full spool answers `Full`, stores nothing of the batch and keeps what
/// it had; dead records count too.
pub async fn full_spool_answers_full_and_loses_nothing<F: SpoolFactory>(factory: &F) {
    let clock = ManualClock::new();
    let spool = factory
        .create(clock.clone(), SpoolLimits::default().with_max_records(3))
        .await;
    enqueue(&spool, vec![rec("a"), rec("b"), rec("c")]).await;
    assert!(matches!(
        spool.enqueue(vec![rec("d")]).await,
        Err(Error::Full {
            limit: "records",
            ..
        })
    ));
    let a = lease_one(&spool, "a").await;
    spool.ack(&a.token).await.expect("ack");
    assert!(
        matches!(
            spool.enqueue(vec![rec("d"), rec("e")]).await,
            Err(Error::Full { .. })
        ),
        "a batch that does not fit whole is refused whole"
    );
    enqueue(&spool, vec![rec("d")]).await;
    let b = lease_one(&spool, "b").await;
    spool
        .dead_letter(&b.token, DeadReason::Rejected("test".into()))
        .await
        .expect("dead_letter");
    assert!(
        matches!(spool.enqueue(vec![rec("e")]).await, Err(Error::Full { .. })),
        "dead records still take room: nothing is dropped"
    );
    assert_eq!(ids(&lease(&spool, 10).await), ["c", "d"]);
    assert_eq!(spool.list_dead(10).await.expect("list_dead").len(), 1);

    let by_bytes = factory
        .create(clock.clone(), SpoolLimits::default().with_max_bytes(10))
        .await;
    enqueue(
        &by_bytes,
        vec![NewRecord::new(id("x"), Bytes::from_static(b"123456"))],
    )
    .await;
    assert!(matches!(
        by_bytes
            .enqueue(vec![NewRecord::new(id("y"), Bytes::from_static(b"12345"))])
            .await,
        Err(Error::Full { limit: "bytes", .. })
    ));
    enqueue(
        &by_bytes,
        vec![NewRecord::new(id("z"), Bytes::from_static(b"1234"))],
    )
    .await;
    assert_eq!(by_bytes.stats().await.expect("stats").bytes, 10);
}

/// Records past retention are dead-lettered as `Expired`, counted, and kept
/// until purged; `nack` past retention dead-letters too.
pub async fn retention_expiry_dead_letters<F: SpoolFactory>(factory: &F) {
    let clock = ManualClock::new();
    let limits = SpoolLimits::default().with_retention(Duration::from_secs(3600));
    let spool = factory.create(clock.clone(), limits).await;
    enqueue(&spool, vec![rec("held"), rec("old")]).await;
    // "held" stays leased (long lease) past retention; "old" stays ready.
    let mut got = spool
        .lease(1, Duration::from_secs(7200))
        .await
        .expect("lease");
    assert_eq!(ids(&got), ["held"]);
    let held = got.remove(0);
    clock.advance(Duration::from_secs(1800));
    enqueue(&spool, vec![rec("young")]).await;
    clock.advance(Duration::from_secs(1801));
    assert_eq!(
        ids(&lease(&spool, 10).await),
        ["young"],
        "expired records are not delivered"
    );
    let out = spool
        .nack(&held.token, Duration::from_secs(1))
        .await
        .expect("nack");
    assert_eq!(out, NackOutcome::DeadLettered(DeadReason::Expired));
    let stats = spool.stats().await.expect("stats");
    assert_eq!(stats.dead, 2);
    assert_eq!(stats.expired_total, 2);
    clock.advance(Duration::from_secs(30 * 24 * 3600));
    let dead = spool.list_dead(10).await.expect("list_dead");
    let mut dead_ids: Vec<_> = dead.iter().map(|d| d.record.id.to_string()).collect();
    dead_ids.sort();
    assert_eq!(dead_ids, ["held", "old"], "time alone never deletes");
    assert!(dead.iter().all(|d| d.reason == DeadReason::Expired));
    assert_eq!(spool.purge_dead(10).await.expect("purge"), 2);
    assert_eq!(spool.stats().await.expect("stats").dead, 0);
}

/// `dead_letter` keeps the record and its reason; `redrive_dead` makes it
/// ready with attempts reset; `purge_dead` deletes.
pub async fn dead_letter_redrive_and_purge<F: SpoolFactory>(factory: &F) {
    let clock = ManualClock::new();
    let spool = factory.create(clock.clone(), SpoolLimits::default()).await;
    enqueue(&spool, vec![rec("a")]).await;
    let l = lease_one(&spool, "a").await;
    spool
        .dead_letter(&l.token, DeadReason::Rejected("HTTP 410".into()))
        .await
        .expect("dead_letter");
    lost(
        spool.dead_letter(&l.token, DeadReason::Expired).await,
        "dead_letter",
    );
    assert!(lease(&spool, 10).await.is_empty());
    let dead = spool.list_dead(10).await.expect("list_dead");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].record.id.as_str(), "a");
    assert_eq!(dead[0].record.payload, Bytes::from_static(b"payload of a"));
    assert_eq!(dead[0].reason, DeadReason::Rejected("HTTP 410".into()));
    assert_eq!(dead[0].dead_at, clock.now());
    assert_eq!(spool.redrive_dead(10).await.expect("redrive"), 1);
    let again = lease_one(&spool, "a").await;
    assert_eq!(again.record.attempts, 1, "redrive starts the schedule over");
    spool
        .dead_letter(&again.token, DeadReason::RetriesExhausted)
        .await
        .expect("dead_letter");
    assert_eq!(spool.purge_dead(10).await.expect("purge"), 1);
    assert!(spool.list_dead(10).await.expect("list_dead").is_empty());
    assert_eq!(spool.stats().await.expect("stats").bytes, 0);
}

/// An id already in the spool (live or dead) is skipped and counted; after
/// an ack the id may be used again.
pub async fn duplicate_ids_are_skipped<F: SpoolFactory>(factory: &F) {
    let clock = ManualClock::new();
    let spool = factory.create(clock.clone(), SpoolLimits::default()).await;
    enqueue(&spool, vec![rec("a")]).await;
    let e = spool
        .enqueue(vec![rec("a"), rec("b")])
        .await
        .expect("enqueue");
    assert_eq!((e.accepted, e.duplicates), (1, 1));
    assert!(matches!(
        spool.enqueue(vec![rec("c"), rec("c")]).await,
        Err(Error::InvalidArgument { .. })
    ));
    let got = lease(&spool, 10).await;
    assert_eq!(ids(&got), ["a", "b"]);
    spool
        .dead_letter(&got[1].token, DeadReason::RetriesExhausted)
        .await
        .expect("dead_letter");
    let e = spool.enqueue(vec![rec("b")]).await.expect("enqueue");
    assert_eq!(
        (e.accepted, e.duplicates),
        (0, 1),
        "dead ids are still known"
    );
    spool.ack(&got[0].token).await.expect("ack");
    let e = spool.enqueue(vec![rec("a")]).await.expect("enqueue");
    assert_eq!(
        (e.accepted, e.duplicates),
        (1, 0),
        "an acked id may come again"
    );
}

/// `stats` counts ready, delayed, leased, dead, bytes and the oldest age.
pub async fn stats_count_every_state<F: SpoolFactory>(factory: &F) {
    let clock = ManualClock::new();
    let spool = factory.create(clock.clone(), SpoolLimits::default()).await;
    let empty = spool.stats().await.expect("stats");
    assert_eq!(
        (empty.depth(), empty.dead, empty.bytes, empty.oldest_age),
        (0, 0, 0, None)
    );
    enqueue(&spool, vec![rec("r1"), rec("r2"), rec("r3")]).await;
    enqueue(
        &spool,
        vec![rec("r4").with_delay(Duration::from_secs(3600))],
    )
    .await;
    let _r1 = lease_one(&spool, "r1").await;
    let r2 = lease_one(&spool, "r2").await;
    spool
        .dead_letter(&r2.token, DeadReason::Rejected("no".into()))
        .await
        .expect("dead_letter");
    clock.advance(Duration::from_secs(10));
    let s = spool.stats().await.expect("stats");
    assert_eq!((s.ready, s.delayed, s.leased, s.dead), (1, 1, 1, 1));
    assert_eq!(s.depth(), 3);
    assert_eq!(s.bytes, 4 * "payload of r1".len() as u64);
    assert_eq!(s.oldest_age, Some(Duration::from_secs(10)));
    clock.advance(TTL);
    let s = spool.stats().await.expect("stats");
    assert_eq!(
        (s.ready, s.leased),
        (2, 0),
        "an expired lease counts as ready"
    );
}

/// Oversize payloads, zero ttls and bad ids are refused.
pub async fn record_ids_and_sizes_are_validated<F: SpoolFactory>(factory: &F) {
    let spool = factory
        .create(ManualClock::new(), SpoolLimits::default())
        .await;
    assert!(RecordId::new("").is_err());
    assert!(RecordId::new("x".repeat(129)).is_err());
    let big = NewRecord::new(id("big"), vec![0u8; DEFAULT_MAX_RECORD_BYTES + 1]);
    assert!(matches!(
        spool.enqueue(vec![rec("ok"), big]).await,
        Err(Error::TooLarge {
            what: "payload",
            ..
        })
    ));
    assert_eq!(
        spool.stats().await.expect("stats").depth(),
        0,
        "nothing of the batch stored"
    );
    let at_limit = NewRecord::new(id("max"), vec![1u8; DEFAULT_MAX_RECORD_BYTES]);
    enqueue(&spool, vec![at_limit]).await;
    assert!(matches!(
        spool.lease(1, Duration::ZERO).await,
        Err(Error::InvalidArgument { .. })
    ));
    let l = lease_one(&spool, "max").await;
    assert_eq!(l.record.payload.len(), DEFAULT_MAX_RECORD_BYTES);
}

/// Eight consumers leasing concurrently never get the same record twice.
pub async fn concurrent_consumers_never_share_a_lease<F: SpoolFactory>(factory: &F) {
    let clock = ManualClock::new();
    let spool = Arc::new(factory.create(clock.clone(), SpoolLimits::default()).await);
    enqueue(
        &*spool,
        (0..200).map(|i| rec(&format!("r{i:03}"))).collect(),
    )
    .await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let spool = spool.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = spool
                    .lease(7, Duration::from_secs(600))
                    .await
                    .expect("lease");
                if got.is_empty() {
                    break mine;
                }
                for l in got {
                    spool.ack(&l.token).await.expect("ack");
                    mine.push(l.record.id.to_string());
                }
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("consumer task"));
    }
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), 200, "every record delivered exactly once");
    assert_eq!(unique.len(), 200);
}

async fn reopen<F: SpoolFactory>(
    factory: &F,
    spool: F::Spool,
    clock: &ManualClock,
    limits: SpoolLimits,
) -> Option<F::Spool> {
    if !spool.capabilities().reopenable {
        return None;
    }
    Some(factory.reopen(spool, clock.clone(), limits).await)
}

/// Durable backends: after reopen, acked records never return and every
/// unacked one is delivered, payload intact.
pub async fn reopen_keeps_unacked_and_forgets_acked<F: SpoolFactory>(factory: &F) {
    let clock = ManualClock::new();
    let spool = factory.create(clock.clone(), SpoolLimits::default()).await;
    enqueue(&spool, (0..10).map(|i| rec(&format!("r{i}"))).collect()).await;
    let got = lease(&spool, 4).await;
    spool.ack(&got[0].token).await.expect("ack");
    spool.ack(&got[1].token).await.expect("ack");
    let _ = spool
        .nack(&got[2].token, Duration::from_secs(60))
        .await
        .expect("nack");
    let Some(spool) = reopen(factory, spool, &clock, SpoolLimits::default()).await else {
        return;
    };
    clock.advance(Duration::from_secs(120));
    let after = lease(&spool, 100).await;
    let mut after_ids = ids(&after);
    after_ids.sort();
    assert_eq!(after_ids, ["r2", "r3", "r4", "r5", "r6", "r7", "r8", "r9"]);
    for l in &after {
        assert_eq!(
            l.record.payload,
            Bytes::from(format!("payload of {}", l.record.id))
        );
    }
}

/// Durable backends: dead letters and their reasons survive reopen.
pub async fn reopen_keeps_dead_letters<F: SpoolFactory>(factory: &F) {
    let clock = ManualClock::new();
    let spool = factory.create(clock.clone(), SpoolLimits::default()).await;
    enqueue(&spool, vec![rec("a"), rec("b")]).await;
    let a = lease_one(&spool, "a").await;
    spool
        .dead_letter(&a.token, DeadReason::Rejected("HTTP 400".into()))
        .await
        .expect("dead_letter");
    let Some(spool) = reopen(factory, spool, &clock, SpoolLimits::default()).await else {
        return;
    };
    let dead = spool.list_dead(10).await.expect("list_dead");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, DeadReason::Rejected("HTTP 400".into()));
    assert_eq!(dead[0].record.payload, Bytes::from_static(b"payload of a"));
    lease_one(&spool, "b").await;
}

/// Durable backends: limits hold after reopen.
pub async fn reopen_keeps_limits<F: SpoolFactory>(factory: &F) {
    let clock = ManualClock::new();
    let limits = SpoolLimits::default().with_max_records(3);
    let spool = factory.create(clock.clone(), limits).await;
    enqueue(&spool, vec![rec("a"), rec("b"), rec("c")]).await;
    let Some(spool) = reopen(factory, spool, &clock, limits).await else {
        return;
    };
    assert!(matches!(
        spool.enqueue(vec![rec("d")]).await,
        Err(Error::Full { .. })
    ));
    assert_eq!(spool.stats().await.expect("stats").depth(), 3);
}
