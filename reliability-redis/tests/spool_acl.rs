//! The Redis spool under ACL key patterns. A script that reaches a key it
//! did not declare is refused by the ACL only when it gets there, after its
//! earlier writes: so every script whose record the caller names declares
//! that record's key, and a user refused it changes nothing. The scripts
//! that find records at run time (lease, dead-letter listing, redrive,
//! purge) need the whole pattern `{prefix:spool:namespace}:*`, which the
//! second case shows is enough.

mod common;

use std::time::Duration;

use common::fresh_key_space;
use reliability_core::config::Secret;
use reliability_core::{NewRecord, RecordId, Spool};
use reliability_redis::harness::{wait_for, RedisServer};
use reliability_redis::{RedisClient, RedisSpool};

const TTL: Duration = Duration::from_secs(60);

/// Runs `f` to completion from inside a (multi-thread) test runtime.
fn futures_block<T>(
    f: impl std::future::Future<Output = reliability_core::Result<T>>,
) -> Option<T> {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f)).ok()
}

/// A spool on `server` as the ACL user `user`.
async fn spool_as(
    server: &RedisServer,
    user: &str,
    prefix_ns: &reliability_core::KeySpace,
) -> RedisSpool {
    let mut cfg = server.config();
    cfg.username = Some(user.into());
    cfg.password = Some(Secret::new(format!("{user}-pw")));
    let client = RedisClient::connect(&cfg, prefix_ns.clone())
        .await
        .expect("connect");
    RedisSpool::builder(client, "acl")
        .open()
        .await
        .expect("open")
}

/// A user allowed the spool's index keys but not its record keys: every
/// call it makes is refused whole, and the records stay where they were
/// (a lease that took a record out of its index before the refusal lost it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_record_key_changes_nothing() {
    let server = RedisServer::start();
    let ks = fresh_key_space("acl");
    let owner = RedisSpool::builder(
        RedisClient::connect(&server.config(), ks.clone())
            .await
            .expect("connect"),
        "acl",
    )
    .open()
    .await
    .expect("open");
    let base = owner.base().to_string();
    let indexes: Vec<String> = ["meta", "ready", "delay", "lease", "age", "dead"]
        .iter()
        .map(|k| format!("~{{{base}}}:{k}"))
        .collect();
    let mut setuser = vec!["ACL", "SETUSER", "indexes", "on", ">indexes-pw", "+@all"];
    setuser.extend(indexes.iter().map(String::as_str));
    assert!(server.cmd(&setuser).is_ok());
    let limited = spool_as(&server, "indexes", &ks).await;
    let counts = |s: reliability_core::SpoolStats| (s.ready, s.leased, s.delayed);

    owner
        .enqueue(vec![NewRecord::new(RecordId::new("r1").expect("id"), "p")])
        .await
        .expect("enqueue");
    // A ready record.
    let refused = limited.lease(1, TTL).await;
    assert!(
        refused.is_err(),
        "lease without the record key: {refused:?}"
    );
    let stats = owner.stats().await.expect("stats");
    assert_eq!(
        counts(stats),
        (1, 0, 0),
        "a refused lease changed the spool"
    );

    // A record whose lease ran out (1 ms): due again.
    let leased = owner
        .lease(1, Duration::from_millis(1))
        .await
        .expect("lease");
    assert_eq!(leased.len(), 1);
    wait_for("the short lease to end", Duration::from_secs(5), || {
        let s = futures_block(owner.stats())?;
        (s.ready == 1).then_some(())
    });
    let refused = limited.lease(1, TTL).await;
    assert!(
        refused.is_err(),
        "lease without the record key: {refused:?}"
    );
    let stats = owner.stats().await.expect("stats");
    assert_eq!(
        counts(stats),
        (1, 0, 0),
        "a refused lease changed the spool"
    );

    // A leased record.
    let leased = owner.lease(1, TTL).await.expect("lease");
    let token = &leased.first().expect("one record").token;
    let refused = limited.ack(token).await;
    assert!(refused.is_err(), "ack without the record key: {refused:?}");
    let stats = owner.stats().await.expect("stats");
    assert_eq!(counts(stats), (0, 1, 0), "a refused ack changed the spool");
    owner.ack(token).await.expect("the owner still acks it");
    assert_eq!(owner.stats().await.expect("stats").depth(), 0);
}

/// A user allowed `{prefix:spool:namespace}:*` runs every operation.
#[tokio::test]
async fn the_documented_pattern_is_enough() {
    let server = RedisServer::start();
    let ks = fresh_key_space("acl");
    let base = format!("{}:spool:acl", ks.prefix());
    let pattern = format!("~{{{base}}}:*");
    assert!(server
        .cmd(&[
            "ACL",
            "SETUSER",
            "spooler",
            "on",
            ">spooler-pw",
            "+@all",
            &pattern
        ])
        .is_ok());
    let spool = spool_as(&server, "spooler", &ks).await;
    assert_eq!(spool.base(), base);
    let ids = ["a", "b", "c"];
    spool
        .enqueue(
            ids.iter()
                .map(|id| NewRecord::new(RecordId::new(*id).expect("id"), "p"))
                .collect(),
        )
        .await
        .expect("enqueue");
    let leased = spool.lease(3, TTL).await.expect("lease");
    assert_eq!(leased.len(), 3);
    spool.ack(&leased[0].token).await.expect("ack");
    let _ = spool
        .nack(&leased[1].token, Duration::from_secs(1))
        .await
        .expect("nack");
    spool.extend(&leased[2].token, TTL).await.expect("extend");
    spool
        .dead_letter(
            &leased[2].token,
            reliability_core::DeadReason::Rejected("x".into()),
        )
        .await
        .expect("dead_letter");
    assert_eq!(spool.list_dead(10).await.expect("list").len(), 1);
    assert_eq!(spool.redrive_dead(10).await.expect("redrive"), 1);
    let stats = spool.stats().await.expect("stats");
    assert_eq!(stats.depth(), 2, "{stats:?}");
    let again = spool.lease(3, TTL).await.expect("lease");
    spool
        .dead_letter(
            &again[0].token,
            reliability_core::DeadReason::Rejected("y".into()),
        )
        .await
        .expect("dead_letter");
    assert_eq!(spool.purge_dead(10).await.expect("purge"), 1);
}
