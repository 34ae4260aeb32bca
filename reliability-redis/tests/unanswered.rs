//! Claims whose answer never came: a claim sent to a hung Redis (SIGSTOP)
//! gives up at the deadline, yet the server runs it once resumed, so the
//! key is held under a lease no caller has. That lease must not keep this
//! process's later claims of the key out (and so a claim the fallback made
//! locally meanwhile must replay, not wait for the unknown lease to end).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fresh_key_space;
use reliability_core::clock::system_clock;
use reliability_core::fallback::{Breaker, BreakerConfig, Fallback};
use reliability_core::{Claim, Fingerprint, IdempotencyStore};
use reliability_memory::MemoryIdempotencyStore;
use reliability_redis::harness::{RedisServer, Resp};
use reliability_redis::{RedisClient, RedisIdempotencyStore};

/// Longer than any wait of the tests: a key held under the unanswered
/// claim's lease stays held for the whole test.
const LEASE: Duration = Duration::from_secs(600);
const DEADLINE: Duration = Duration::from_millis(200);

fn fp() -> Fingerprint {
    Fingerprint::of(b"payload")
}

async fn store(server: &RedisServer) -> RedisIdempotencyStore {
    let mut cfg = server.config();
    cfg.response_timeout = DEADLINE;
    cfg.connect_timeout = DEADLINE;
    cfg.pool_timeout = DEADLINE;
    let client = RedisClient::connect(&cfg, fresh_key_space("unanswered"))
        .await
        .expect("connect");
    RedisIdempotencyStore::new(client)
}

/// Sends a claim of `key` to the stopped `server` and gives up at the
/// deadline (as a fallback does); the server runs it once resumed.
async fn unanswered_claim(store: &impl IdempotencyStore, server: &RedisServer, key: &str) {
    server.sigstop();
    let r = tokio::time::timeout(DEADLINE, store.claim(key, &fp(), LEASE)).await;
    assert!(!matches!(r, Ok(Ok(_))), "a stopped server answered: {r:?}");
    server.sigcont();
}

/// Waits until the server answers again, then until it ran the claim it
/// held while stopped (the key exists).
async fn wait_resumed(store: &RedisIdempotencyStore, server: &RedisServer, key: &str) {
    let redis_key = store
        .client()
        .key_space()
        .key(reliability_core::Primitive::Idempotency, key)
        .expect("key");
    let t = Instant::now();
    while !matches!(server.try_cmd(&["EXISTS", &redis_key]), Ok(Resp::Int(1))) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the unanswered claim never ran"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The claim this process gave up on holds the key on Redis; this
/// process's next claim of the key acquires it all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_given_up_on_does_not_hold_the_key_against_this_process() {
    let server = RedisServer::start();
    let store = store(&server).await;
    // Connected before the stop.
    assert!(matches!(
        store.claim("warm", &fp(), LEASE).await.unwrap(),
        Claim::Acquired(_)
    ));
    unanswered_claim(&store, &server, "k").await;
    wait_resumed(&store, &server, "k").await;
    let again = store.claim("k", &fp(), LEASE).await.unwrap();
    assert!(
        matches!(again, Claim::Acquired(_)),
        "the key is held by a lease nobody has: {again:?}"
    );
}

/// A claim answered locally because Redis hung (the primary claim timed
/// out) is replayed once Redis is back, though Redis ran the timed-out
/// claim meanwhile: reconciliation finishes, long before that lease ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_claim_replays_over_the_primary_claim_that_timed_out() {
    let server = RedisServer::start();
    let primary = store(&server).await;
    assert!(matches!(
        primary.claim("warm", &fp(), LEASE).await.unwrap(),
        Claim::Acquired(_)
    ));
    let breaker = Arc::new(Breaker::new(BreakerConfig::default(), system_clock()));
    let fallback = Fallback::new(primary, MemoryIdempotencyStore::new(), breaker.clone())
        .with_deadline(DEADLINE);
    server.sigstop();
    let local = fallback.claim("k", &fp(), LEASE).await.unwrap();
    server.sigcont();
    let Claim::Acquired(lease) = local else {
        panic!("answered locally: {local:?}");
    };
    wait_resumed(fallback.get_ref().0, &server, "k").await;
    // Back the way the probe brings it back.
    while !breaker.routes_to_primary() {
        breaker.record_success();
    }
    let t = Instant::now();
    while fallback.pending_reconcile() > 0 {
        let report = fallback.reconcile().await.unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the local claim was never replayed: {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fallback
        .complete(&lease, Some("done".into()), LEASE)
        .await
        .unwrap();
    while fallback.pending_reconcile() > 0 {
        fallback.reconcile().await.unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "completion never replayed"
        );
    }
    assert_eq!(
        fallback.get_ref().0.claim("k", &fp(), LEASE).await.unwrap(),
        Claim::Completed(Some("done".into())),
        "Redis holds the local claim's completion"
    );
}
