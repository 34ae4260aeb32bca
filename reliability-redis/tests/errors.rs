//! Errors are classified, bounded in time, and never leak a secret.
//!
//! - A key holding the wrong type is a caller error (`WrongType`), never
//!   "unavailable" (a fallback must not mask it).
//! - Oversize ids follow the contract: hashed above 200 bytes, refused
//!   above 8 KiB.
//! - A killed server gives unavailable errors within the client's
//!   deadline; a hung (SIGSTOP) one times out within the response timeout.
//! - `WAIT` runs on an exclusive connection: calls on the shared one go on
//!   while it blocks, and it may outlast the response timeout.
//! - A failed AUTH is a clear error, and the password appears nowhere: not
//!   in `Debug`, `Display`, the error, the configuration's `Debug`, nor in
//!   tracing output captured from a global subscriber.
#![allow(clippy::print_stdout)] // the test reports its figures

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{fresh_key_space, STANDALONE};
use reliability_core::config::{RedisConfig, RedisUrl, ReliabilityConfig, Secret};
use reliability_core::key::{MAX_ID_BYTES, MAX_VERBATIM_ID_BYTES};
use reliability_core::status::HealthStatus;
use reliability_core::{
    Claim, Error, Fingerprint, IdempotencyStore, Lease, LeaseToken, Primitive, Quota, RateLimiter,
    UnavailableReason,
};
use reliability_redis::harness::{wait_for, RedisServer, Resp, ServerOptions};
use reliability_redis::{RedisClient, RedisIdempotencyStore, RedisRateLimiter};

const LEASE: Duration = Duration::from_secs(30);

fn fp() -> Fingerprint {
    Fingerprint::of(b"payload")
}

#[tokio::test]
async fn wrong_type_is_a_caller_error() {
    let ks = fresh_key_space("errors");
    let client = RedisClient::connect(&STANDALONE.config(), ks.clone())
        .await
        .expect("connect");
    let store = RedisIdempotencyStore::new(client.clone());
    let limiter = RedisRateLimiter::new(client);

    // A string where the idempotency hash lives.
    let idem_key = ks.key(Primitive::Idempotency, "taken").unwrap();
    assert_eq!(
        STANDALONE.cmd(&["SET", &idem_key, "x"]),
        Resp::Simple("OK".into())
    );
    let err = store.claim("taken", &fp(), LEASE).await.unwrap_err();
    assert!(matches!(err, Error::WrongType { .. }), "{err:?}");
    assert!(!err.is_unavailable());
    let stale = Lease::new("taken", LeaseToken::generate());
    let err = store.release(&stale).await.unwrap_err();
    assert!(matches!(err, Error::WrongType { .. }), "release: {err:?}");
    assert_eq!(
        STANDALONE.cmd(&["GET", &idem_key]).text().as_deref(),
        Some("x"),
        "untouched"
    );

    // A hash of another program (no `st` field).
    let foreign = ks.key(Primitive::Idempotency, "foreign").unwrap();
    STANDALONE.cmd(&["HSET", &foreign, "owner", "someone-else"]);
    let err = store.claim("foreign", &fp(), LEASE).await.unwrap_err();
    assert!(matches!(err, Error::WrongType { .. }), "{err:?}");

    // A hash where the limiter's TAT string lives, and a non-number string.
    let q = Quota::per_second(10).unwrap();
    let rl_hash = ks.key(Primitive::RateLimit, "hash").unwrap();
    STANDALONE.cmd(&["HSET", &rl_hash, "a", "b"]);
    let err = limiter.check("hash", q, 1).await.unwrap_err();
    assert!(matches!(err, Error::WrongType { .. }), "{err:?}");
    assert!(!err.is_unavailable());
    let rl_text = ks.key(Primitive::RateLimit, "text").unwrap();
    STANDALONE.cmd(&["SET", &rl_text, "not-a-number"]);
    let err = limiter.check("text", q, 1).await.unwrap_err();
    assert!(matches!(err, Error::WrongType { .. }), "{err:?}");
}

#[tokio::test]
async fn oversize_ids_follow_the_contract() {
    let ks = fresh_key_space("errors");
    let client = RedisClient::connect(&STANDALONE.config(), ks.clone())
        .await
        .expect("connect");
    let store = RedisIdempotencyStore::new(client.clone());
    let limiter = RedisRateLimiter::new(client);
    let q = Quota::per_second(10).unwrap();

    let huge = "h".repeat(MAX_ID_BYTES + 1);
    for err in [
        store.claim(&huge, &fp(), LEASE).await.unwrap_err(),
        limiter.check(&huge, q, 1).await.unwrap_err(),
    ] {
        assert!(
            matches!(err, Error::TooLarge { what: "key", .. }),
            "{err:?}"
        );
        assert!(!err.is_unavailable());
    }
    for err in [
        store.claim("", &fp(), LEASE).await.unwrap_err(),
        limiter.check("", q, 1).await.unwrap_err(),
    ] {
        assert!(matches!(err, Error::InvalidKey { .. }), "{err:?}");
    }

    // At the limit: accepted, stored under the hashed key.
    let max = "m".repeat(MAX_ID_BYTES);
    assert!(matches!(
        store.claim(&max, &fp(), LEASE).await.unwrap(),
        Claim::Acquired(_)
    ));
    let stored = ks.key(Primitive::Idempotency, &max).unwrap();
    assert!(stored.len() < MAX_VERBATIM_ID_BYTES, "hashed: {stored}");
    assert_eq!(STANDALONE.cmd(&["EXISTS", &stored]), Resp::Int(1));
    assert!(limiter.check(&max, q, 1).await.unwrap().is_allowed());
}

fn fast_config(server: &RedisServer) -> RedisConfig {
    let mut cfg = server.config();
    cfg.connect_timeout = Duration::from_millis(200);
    cfg.response_timeout = Duration::from_millis(200);
    cfg.pool_timeout = Duration::from_millis(100);
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_and_hung_servers_are_unavailable_within_the_deadline() {
    let mut server = RedisServer::start();
    let cfg = fast_config(&server);
    let client = RedisClient::connect(&cfg, fresh_key_space("errors"))
        .await
        .expect("connect");
    let store = RedisIdempotencyStore::new(client.clone());
    let limiter = RedisRateLimiter::new(client.clone());
    let q = Quota::per_second(100).unwrap();
    assert!(limiter.check("k", q, 1).await.unwrap().is_allowed());

    // Killed: every call fails fast and is classified unavailable.
    server.kill9();
    let mut worst = Duration::ZERO;
    for i in 0..20 {
        let t = Instant::now();
        let err = store
            .claim(&format!("k{i}"), &fp(), LEASE)
            .await
            .unwrap_err();
        let took = t.elapsed();
        worst = worst.max(took);
        assert!(err.is_unavailable(), "killed server: {err:?}");
        assert!(
            took <= client.deadline(),
            "call took {took:?} > deadline {:?}",
            client.deadline()
        );
    }
    println!(
        "errors: killed server, worst call {worst:?} (deadline {:?})",
        client.deadline()
    );

    // Restarted: the client recovers by itself (no new client).
    server.restart();
    let t = Instant::now();
    loop {
        match limiter.check("k", q, 1).await {
            Ok(_) => break,
            Err(e) => assert!(e.is_unavailable(), "{e:?}"),
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "no recovery after restart"
        );
    }
    println!("errors: recovered {:?} after restart", t.elapsed());

    // Hung: calls time out within the response timeout (plus scheduling).
    server.sigstop();
    let mut worst = Duration::ZERO;
    for i in 0..5 {
        let t = Instant::now();
        let err = limiter.check(&format!("h{i}"), q, 1).await.unwrap_err();
        let took = t.elapsed();
        worst = worst.max(took);
        assert!(err.is_unavailable(), "hung server: {err:?}");
        assert!(
            matches!(err.unavailable_reason(), Some(UnavailableReason::Timeout)),
            "a hung server is a timeout: {err:?}"
        );
        assert!(
            took <= cfg.response_timeout.max(cfg.connect_timeout) + Duration::from_millis(150),
            "call to a hung server took {took:?}"
        );
    }
    println!(
        "errors: hung server, worst call {worst:?} (response timeout {:?})",
        cfg.response_timeout
    );
    server.sigcont();
    wait_for("recovery after SIGCONT", Duration::from_secs(5), || {
        futures_ready(&limiter, q)
    });
}

/// One blocking check on the current runtime (inside `wait_for`'s poll).
fn futures_ready(limiter: &RedisRateLimiter, q: Quota) -> Option<()> {
    tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current()
            .block_on(limiter.check("after", q, 1))
            .ok()
            .map(|_| ())
    })
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_auth_is_clear_and_secrets_never_leak() {
    let buf = Capture(Arc::new(Mutex::new(Vec::new())));
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).expect("first global subscriber");

    let good = "Good-Pass-4242";
    let wrong = "Wrong-Pass-9191";
    let server = RedisServer::start_with(ServerOptions::new().password(good));
    let mut seen = Vec::new();

    // 1. The right password, given in the URL and as `password`.
    let url_cfg = RedisConfig::standalone(
        RedisUrl::new(format!("redis://:{good}@127.0.0.1:{}/0", server.port())).unwrap(),
    );
    let client = RedisClient::connect(&url_cfg, fresh_key_space("secrets"))
        .await
        .expect("connect with the password in the URL");
    let store = RedisIdempotencyStore::new(client.clone());
    assert!(matches!(
        store.claim("k", &fp(), LEASE).await.unwrap(),
        Claim::Acquired(_)
    ));
    seen.push(format!("{client:?} {store:?} {url_cfg:?}"));
    let ok_cfg = server.config();
    let client = RedisClient::connect(&ok_cfg, fresh_key_space("secrets"))
        .await
        .expect("connect");
    seen.push(format!("{client:?} {ok_cfg:?}"));
    let mut rc = ReliabilityConfig::redis_enabled(ok_cfg.clone());
    rc.key_prefix = "svc".into();
    seen.push(format!("{rc:?} {:?}", HealthStatus::from_config(&rc)));

    // 2. A wrong password: a clear error.
    let mut bad = server.config();
    bad.password = Some(Secret::new(wrong));
    let err = RedisClient::connect(&bad, fresh_key_space("secrets"))
        .await
        .unwrap_err();
    let text = format!("{err}");
    println!("errors: failed AUTH -> {text}");
    assert!(text.contains("authentication failed"), "{text}");
    assert!(
        !err.is_unavailable(),
        "wrong credentials are not an outage: {err:?}"
    );
    seen.push(format!("{err} {err:?} {bad:?}"));

    // 3. A wrong password in the URL.
    let bad_url = RedisConfig::standalone(
        RedisUrl::new(format!(
            "redis://default:{wrong}@127.0.0.1:{}",
            server.port()
        ))
        .unwrap(),
    );
    let err = RedisClient::connect(&bad_url, fresh_key_space("secrets"))
        .await
        .unwrap_err();
    assert!(format!("{err}").contains("authentication failed"), "{err}");
    seen.push(format!("{err} {err:?} {bad_url:?}"));

    // 4. No password at all (NOAUTH on the first command).
    let mut none = server.config();
    none.password = None;
    let err = RedisClient::connect(&none, fresh_key_space("secrets"))
        .await
        .unwrap_err();
    assert!(format!("{err}").contains("authentication failed"), "{err}");
    seen.push(format!("{err} {err:?}"));

    let logs = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert!(!logs.is_empty(), "tracing captured the failures");
    seen.push(logs);
    for text in &seen {
        for secret in [good, wrong] {
            assert!(!text.contains(secret), "{secret} leaked in: {text}");
        }
    }
    println!(
        "errors: {} texts checked, {} bytes of tracing output, no password",
        seen.len(),
        seen.last().map_or(0, String::len)
    );
}

/// `WAIT` blocks the connection it is sent on: it runs on an exclusive
/// pooled connection, so calls on the shared connection go on meanwhile,
/// and it may block longer than the response timeout (its own timeout
/// bounds it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_never_stalls_other_calls() {
    let server = RedisServer::start();
    let mut cfg = server.config();
    cfg.response_timeout = Duration::from_millis(300);
    let client = RedisClient::connect(&cfg, fresh_key_space("errors"))
        .await
        .expect("connect");
    let store = RedisIdempotencyStore::new(client.clone());

    // No replica will ever acknowledge: WAIT answers 0 after its timeout.
    let wait = Duration::from_millis(1_000);
    let waiter = {
        let client = client.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            let acked = client.wait_replicas(1, wait).await;
            (acked, t.elapsed())
        })
    };
    // Let the WAIT reach the server first.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut worst = Duration::ZERO;
    for i in 0..100 {
        let t = Instant::now();
        let c = store.claim(&format!("w{i}"), &fp(), LEASE).await.unwrap();
        assert!(matches!(c, Claim::Acquired(_)), "{c:?}");
        worst = worst.max(t.elapsed());
    }
    assert!(
        !waiter.is_finished(),
        "the claims ran while WAIT was blocked"
    );
    let (acked, took) = waiter.await.unwrap();
    assert_eq!(
        acked.expect("WAIT beyond the response timeout is no error"),
        0
    );
    assert!(took >= wait, "WAIT returned after {took:?}");
    assert!(
        worst < cfg.response_timeout,
        "a claim took {worst:?} during WAIT"
    );
    println!("errors: 100 claims during a {wait:?} WAIT, worst {worst:?}; WAIT took {took:?}");
}
