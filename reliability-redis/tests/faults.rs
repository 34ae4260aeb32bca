//! Faults of a Redis that is up but cannot serve: out of memory under
//! `noeviction`, busy with a long script, configured to evict keys, a
//! batch too big for one script call.
//!
//! - `OOM` and `BUSY` are *unavailable*: a `Fallback` answers the call
//!   from its secondary and its breaker counts them.
//! - An evicting `maxmemory-policy` is refused by the idempotency store and
//!   the rate limiter (their keys must not vanish behind their back) with an
//!   error naming the policy, unless it was explicitly accepted.
//! - A spool batch larger than one script call may carry is refused
//!   (`TooLarge`) before anything is sent: never "failed" yet stored.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::fresh_key_space;
use reliability_core::fallback::{Breaker, BreakerConfig, Fallback};
use reliability_core::status::BreakerState;
use reliability_core::{
    system_clock, Claim, Error, Fingerprint, IdempotencyStore, NewRecord, Quota, RateLimiter,
    RecordId, Spool, SpoolLimits,
};
use reliability_memory::{LocalRateLimiter, MemoryIdempotencyStore, MemorySpool};
use reliability_redis::harness::{wait_for, RedisServer, Resp, ServerOptions};
use reliability_redis::{RedisClient, RedisIdempotencyStore, RedisRateLimiter, RedisSpool};

const LEASE: Duration = Duration::from_secs(30);

fn fp() -> Fingerprint {
    Fingerprint::of(b"payload")
}

/// A server with `maxmemory` of a few MiB and `noeviction`.
fn small_server() -> RedisServer {
    RedisServer::start_with(
        ServerOptions::new()
            .config_line("maxmemory 4mb")
            .config_line("maxmemory-policy noeviction"),
    )
}

/// Writes filler keys until the server refuses even a small write with
/// `OOM` (a big value's own query buffer counts while it is refused).
fn fill_to_oom(server: &RedisServer) {
    for (size, what) in [(16 * 1024, "big"), (64, "small")] {
        let value = "f".repeat(size);
        let refused = (0..200_000).any(|i| {
            match server.cmd(&["SET", &format!("filler:{what}:{i}"), &value]) {
                Resp::Error(e) if e.starts_with("OOM") => true,
                Resp::Error(e) => panic!("filling: {e}"),
                _ => false,
            }
        });
        assert!(refused, "the server never reported OOM");
    }
}

fn breaker() -> Arc<Breaker> {
    Arc::new(Breaker::new(BreakerConfig::default(), system_clock()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_is_unavailable_and_answered_locally() {
    let server = small_server();
    let client = RedisClient::connect(&server.config(), fresh_key_space("oom"))
        .await
        .expect("connect");
    let store = RedisIdempotencyStore::new(client.clone());
    let limiter = RedisRateLimiter::new(client.clone());
    let spool = RedisSpool::builder(client.clone(), "oom")
        .open()
        .await
        .expect("open");
    let q = Quota::per_second(100).unwrap();
    fill_to_oom(&server);

    // Each backend on its own: unavailable, not a caller error.
    let err = store.claim("k", &fp(), LEASE).await.unwrap_err();
    assert!(err.is_unavailable(), "claim under OOM: {err:?}");
    let err = limiter.check("k", q, 1).await.unwrap_err();
    assert!(err.is_unavailable(), "check under OOM: {err:?}");
    let rec = || vec![NewRecord::new(RecordId::new("r1").unwrap(), "x")];
    let err = spool.enqueue(rec()).await.unwrap_err();
    assert!(err.is_unavailable(), "enqueue under OOM: {err:?}");

    // Behind a Fallback: answered locally, counted by the breaker.
    let b = breaker();
    let store = Fallback::new(store, MemoryIdempotencyStore::new(), Arc::clone(&b));
    let limiter = Fallback::new(limiter, LocalRateLimiter::new(), Arc::clone(&b));
    let local_spool = MemorySpool::builder().build();
    let spool = Fallback::new(spool, local_spool, Arc::clone(&b));
    let claim = store.claim("k2", &fp(), LEASE).await.expect("answered");
    assert!(matches!(claim, Claim::Acquired(_)), "{claim:?}");
    assert!(limiter
        .check("k2", q, 1)
        .await
        .expect("answered")
        .is_allowed());
    spool.enqueue(rec()).await.expect("answered locally");
    assert_eq!(
        b.state(),
        BreakerState::Open,
        "three OOM errors open the breaker: {:?}",
        b.status()
    );
    let last = b.status().last_error.expect("last error");
    assert!(last.as_str().contains("OOM"), "{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_is_unavailable_and_answered_locally() {
    let server = Arc::new(RedisServer::start_with(
        ServerOptions::new().config_line("busy-reply-threshold 20"),
    ));
    let client = RedisClient::connect(&server.config(), fresh_key_space("busy"))
        .await
        .expect("connect");
    let store = RedisIdempotencyStore::new(client.clone());
    // A read-only script that runs until SCRIPT KILL.
    let looping = {
        let server = Arc::clone(&server);
        std::thread::spawn(move || {
            let _ = server.try_cmd(&["EVAL", "while true do end", "0"]);
        })
    };
    wait_for("the server reports BUSY", Duration::from_secs(5), || {
        matches!(server.try_cmd(&["PING"]), Ok(Resp::Error(e)) if e.starts_with("BUSY"))
            .then_some(())
    });

    let err = store.claim("k", &fp(), LEASE).await.unwrap_err();
    let b = breaker();
    let fallback = Fallback::new(store, MemoryIdempotencyStore::new(), Arc::clone(&b));
    let local = fallback.claim("k2", &fp(), LEASE).await;
    server.cmd(&["SCRIPT", "KILL"]);
    looping.join().expect("looping script ends");
    assert!(err.is_unavailable(), "claim while BUSY: {err:?}");
    assert!(
        matches!(local, Ok(Claim::Acquired(_))),
        "answered locally: {local:?}"
    );
    assert!(b.status().last_error.is_some(), "the breaker counted it");
}
