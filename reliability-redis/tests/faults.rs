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
#![allow(clippy::print_stdout)] // the batch case reports its figures

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::fresh_key_space;
use reliability_core::config::OnEvictingPolicy;
use reliability_core::fallback::{Breaker, BreakerConfig, Fallback};
use reliability_core::status::BreakerState;
use reliability_core::{
    system_clock, Claim, Error, Fingerprint, IdempotencyStore, NewRecord, Quota, RateLimiter,
    RecordId, Spool, SpoolLimits, UnavailableReason,
};
use reliability_memory::{LocalRateLimiter, MemoryIdempotencyStore, MemorySpool};
use reliability_redis::harness::{wait_for, RedisServer, Resp, ServerOptions};
use reliability_redis::{
    RedisClient, RedisIdempotencyStore, RedisRateLimiter, RedisSpool, DEFAULT_MAX_CALL_BYTES,
    RECORD_CALL_OVERHEAD,
};

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

/// A server with `line` in its configuration, and a client of it.
async fn server_with(line: &str, prefix: &str) -> (RedisServer, RedisClient) {
    let server = RedisServer::start_with(ServerOptions::new().config_line(line));
    let client = RedisClient::connect(&server.config(), fresh_key_space(prefix))
        .await
        .expect("connect");
    (server, client)
}

/// A claim of `key` is acquired and a check of it allowed.
async fn acquires_and_allows(store: &impl IdempotencyStore, limiter: &impl RateLimiter, key: &str) {
    let claim = store
        .claim(key, &fp(), LEASE)
        .await
        .expect("claim answered");
    assert!(matches!(claim, Claim::Acquired(_)), "{claim:?}");
    let q = Quota::per_second(100).unwrap();
    let d = limiter.check(key, q, 1).await.expect("check answered");
    assert!(d.is_allowed(), "{d:?}");
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
    server.fill_to_oom();

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
    acquires_and_allows(&store, &limiter, "k2").await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicting_policy_is_refused_naming_the_policy() {
    let (server, client) = server_with("maxmemory-policy volatile-lru", "evict").await;
    let refusing = RedisIdempotencyStore::new(client.clone());
    let limiter = RedisRateLimiter::new(client.clone());
    let q = Quota::per_second(100).unwrap();

    let claim = refusing.claim("k", &fp(), LEASE).await;
    let err = claim.expect_err("a claim on a server that may evict it is refused");
    assert!(err.to_string().contains("volatile-lru"), "{err}");
    let check = limiter.check("k", q, 1).await;
    let err = check.expect_err("a limit a server may evict is refused");
    assert!(err.to_string().contains("volatile-lru"), "{err}");
    assert_eq!(
        err.unavailable_reason(),
        Some(UnavailableReason::Misconfigured),
        "a Fallback answers locally: {err:?}"
    );

    // Accepted explicitly: both work; the spool still refuses.
    let mut cfg = server.config();
    cfg.on_evicting_policy = OnEvictingPolicy::Accept;
    let client = RedisClient::connect(&cfg, fresh_key_space("evict"))
        .await
        .expect("connect");
    let store = RedisIdempotencyStore::new(client.clone());
    let limiter = RedisRateLimiter::new(client.clone());
    acquires_and_allows(&store, &limiter, "k").await;
    let err = RedisSpool::builder(client, "evict")
        .open()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("volatile-lru"), "{err}");

    // Fixed by the operator: seen within the recheck period.
    server.cmd(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    let _ = wait_for("the fixed policy is seen", Duration::from_secs(10), || {
        futures_block(refusing.claim("k2", &fp(), LEASE)).ok()
    });
}

/// Runs a future to completion from a synchronous closure.
fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

/// `CONFIG` commands the server has run so far.
fn config_calls(server: &RedisServer) -> u64 {
    server
        .info_field("commandstats", "cmdstat_config")
        .and_then(|v| {
            v.split(',')
                .find_map(|f| f.strip_prefix("calls=")?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_spool_on_an_evicting_server_answers_locally_without_asking_each_call() {
    let (server, client) = server_with("maxmemory-policy allkeys-lru", "lazy").await;
    let primary = RedisSpool::builder(client, "lazy")
        .open_lazy()
        .expect("lazy open");
    let spool = Fallback::new(primary, MemorySpool::builder().build(), breaker());
    let before = config_calls(&server);
    for i in 0..20 {
        let batch = vec![NewRecord::new(RecordId::new(format!("r{i}")).unwrap(), "x")];
        let got = spool.enqueue(batch).await;
        assert!(got.is_ok(), "enqueue {i} answered locally: {got:?}");
    }
    let asked = config_calls(&server) - before;
    assert!(asked <= 2, "CONFIG ran {asked} times for 20 enqueues");
    let stats = spool.stats().await.expect("stats");
    assert_eq!(stats.depth(), 20, "every record held locally: {stats:?}");
}

/// `n` records with ids `{prefix}{i}` and 16-byte payloads.
fn records(prefix: &str, n: usize) -> Vec<NewRecord> {
    (0..n)
        .map(|i| {
            NewRecord::new(
                RecordId::new(format!("{prefix}{i}")).unwrap(),
                "0123456789abcdef",
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_never_reported_failed_yet_stored() {
    let server = RedisServer::start();
    let client = RedisClient::connect(&server.config(), fresh_key_space("big"))
        .await
        .expect("connect");
    let limits = SpoolLimits::default().with_max_records(1_000_000);
    let spool = RedisSpool::builder(client, "big")
        .limits(limits)
        .open()
        .await
        .expect("open");
    let n = 100_000;
    let t = std::time::Instant::now();
    let got = spool.enqueue(records("r", n)).await;
    let took = t.elapsed();
    // Whatever the server still runs, it has finished once stats answer.
    let stats = wait_for("stats answer", Duration::from_secs(30), || {
        futures_block(spool.stats()).ok()
    });
    println!(
        "faults: enqueue of {n} records: {took:?}, {got:?}, depth {}",
        stats.depth()
    );
    match got {
        Ok(e) => assert_eq!((e.accepted, stats.depth()), (n, n as u64)),
        Err(e) => {
            assert_eq!(stats.depth(), 0, "reported failed ({e}), yet stored");
            assert!(matches!(e, Error::TooLarge { what: "batch", .. }), "{e:?}");
        }
    }
    // A batch at the bound is one call, and fits a deadline.
    let fits = DEFAULT_MAX_CALL_BYTES / (RECORD_CALL_OVERHEAD + 16 + 6);
    let t = std::time::Instant::now();
    let e = spool
        .enqueue(records("f", fits))
        .await
        .expect("a batch at the bound");
    assert_eq!(e.accepted, fits);
    println!(
        "faults: enqueue of {fits} records (the bound): {:?}",
        t.elapsed()
    );
}
