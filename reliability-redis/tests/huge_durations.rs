//! Durations a caller passes are bounded nowhere else: the longest ones
//! give a caller error or work, never a panic and never "unavailable" (a
//! fallback would hide a caller's mistake).
#![allow(clippy::print_stdout)] // the test reports what each call answered

mod common;

use std::time::Duration;

use common::{fresh_key_space, STANDALONE};
use reliability_core::{Fingerprint, IdempotencyStore, NewRecord, RecordId, Spool};
use reliability_redis::{RedisClient, RedisIdempotencyStore, RedisSpool};

fn caller_side<T: std::fmt::Debug>(what: &str, r: &reliability_core::Result<T>) {
    if let Err(e) = r {
        assert!(!e.is_unavailable(), "{what}: {e:?}");
    }
    println!("{what}: {r:?}");
}

#[tokio::test]
async fn huge_durations_are_caller_errors_or_work() {
    let client = RedisClient::connect(&STANDALONE.config(), fresh_key_space("huge"))
        .await
        .expect("connect");
    let store = RedisIdempotencyStore::new(client.clone());
    let fp = Fingerprint::of(b"p");
    for (i, d) in [
        Duration::MAX,
        Duration::from_secs(u64::MAX / 1_000_000),
        Duration::from_secs(1 << 40),
    ]
    .into_iter()
    .enumerate()
    {
        let claim = store.claim(&format!("k{i}"), &fp, d).await;
        caller_side("claim", &claim);
        if let Ok(c) = claim {
            if let Some(lease) = c.into_lease() {
                caller_side("extend", &store.extend(&lease, d).await);
                caller_side("complete", &store.complete(&lease, None, d).await);
            }
        }
    }
    let spool = RedisSpool::builder(client, "huge")
        .open()
        .await
        .expect("open");
    spool
        .enqueue(vec![NewRecord::new(RecordId::new("r").expect("id"), "p")])
        .await
        .expect("enqueue");
    let leased = spool.lease(1, Duration::MAX).await;
    caller_side("lease", &leased);
    if let Some(l) = leased.ok().and_then(|v| v.into_iter().next()) {
        caller_side("extend", &spool.extend(&l.token, Duration::MAX).await);
        caller_side("nack", &spool.nack(&l.token, Duration::MAX).await);
    }
}
