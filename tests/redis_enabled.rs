//! The facade's `redis-enabled` profile on a real redis-server: each
//! component is Fallback(redis, local) on one client and one breaker; it
//! starts degraded when Redis is down, degrades when Redis dies and comes
//! back (with reconciliation) when it returns; its live status has the
//! golden file's shape and no secret.
#![cfg(all(feature = "redis", feature = "disk"))]

use std::time::Duration;

use bytes::Bytes;
use reliability::config::from_yaml_str;
use reliability::config::{
    DiskConfig, IdempotencyBackend, RateLimiterBackend, ReliabilityConfig, Secret, SpoolBackend,
};
use reliability::redis::harness::{RedisServer, ServerOptions};
use reliability::status::{BreakerState, Overall};
use reliability::{
    Claim, Fingerprint, IdempotencyStore, NewRecord, Quota, RateLimiterExt, RecordId, Reliability,
};

mod common;
use common::wait_status;

const PASSWORD: &str = "s3cr3t-facade-pass";

static FP: std::sync::LazyLock<Fingerprint> =
    std::sync::LazyLock::new(|| Fingerprint::of("payload"));

/// A redis-server with a password and AOF `always`, so a kill -9 loses no
/// acknowledged spool record.
fn server() -> RedisServer {
    RedisServer::start_with(
        ServerOptions::new()
            .password(PASSWORD)
            .persistence(true)
            .config_line("appendonly yes")
            .config_line("appendfsync always"),
    )
}

/// Every component on Redis, the spool's local side on disk, a fast probe.
fn config(server: &RedisServer, dir: &std::path::Path) -> ReliabilityConfig {
    let mut cfg = ReliabilityConfig::redis_enabled(server.config());
    cfg.namespace = format!("t{}", std::process::id());
    cfg.disk = Some(DiskConfig::new(dir));
    cfg.fallback.probe_interval = Duration::from_millis(100);
    if let Some(r) = cfg.redis.as_mut() {
        r.password = Some(Secret::new(PASSWORD));
        r.connect_timeout = Duration::from_millis(200);
        r.response_timeout = Duration::from_millis(200);
        r.pool_timeout = Duration::from_millis(200);
    }
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn degrades_recovers_and_reconciles() {
    let mut redis = server();
    let dir = tempfile::tempdir().expect("tempdir");
    let r = Reliability::from_config(&config(&redis, dir.path()))
        .await
        .expect("build");
    let mut rx = r.status().subscribe();
    let s = wait_status(&mut rx, Duration::from_secs(2), "healthy", |s| {
        s.overall == Overall::Healthy
    })
    .await;
    assert_eq!(
        s.components.idempotency_store.active,
        IdempotencyBackend::Redis
    );
    assert_eq!(s.components.spool.active, SpoolBackend::Redis);

    let store = r.idempotency();
    let spool = r.spool().expect("spool");
    let ttl = Duration::from_secs(600);
    assert!(matches!(
        store.claim("before", &FP, ttl).await.expect("claim"),
        Claim::Acquired(_)
    ));
    spool
        .enqueue(vec![NewRecord::new(
            RecordId::new("rec-before").expect("id"),
            Bytes::from_static(b"a"),
        )])
        .await
        .expect("enqueue on redis");

    redis.kill9();
    let s = wait_status(&mut rx, Duration::from_secs(1), "degraded", |s| {
        s.overall == Overall::Degraded
    })
    .await;
    assert_eq!(
        s.components.idempotency_store.active,
        IdempotencyBackend::Memory
    );
    assert_eq!(s.components.rate_limiter.active, RateLimiterBackend::Local);
    assert_eq!(s.components.spool.active, SpoolBackend::Disk);
    assert_eq!(
        s.breaker.as_ref().map(|b| b.state),
        Some(BreakerState::Open)
    );

    // Answered locally, no error.
    let lease = match store
        .claim("during", &FP, ttl)
        .await
        .expect("claim while down")
    {
        Claim::Acquired(l) => l,
        other => panic!("expected Acquired, got {other:?}"),
    };
    store
        .complete(&lease, Some(Bytes::from_static(b"done")), ttl)
        .await
        .expect("complete locally");
    spool
        .enqueue(vec![NewRecord::new(
            RecordId::new("rec-during").expect("id"),
            Bytes::from_static(b"b"),
        )])
        .await
        .expect("enqueue on disk");
    let d = r
        .rate_limiter()
        .check_one("k", Quota::per_second(10).expect("quota"))
        .await
        .expect("check while down");
    assert!(d.is_allowed());

    redis.restart();
    let s = wait_status(&mut rx, Duration::from_secs(1), "healthy again", |s| {
        s.overall == Overall::Healthy
    })
    .await;
    assert_eq!(s.components.spool.active, SpoolBackend::Redis);

    // The background failback replays the claim and drains the record.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let report = r.failback_now().await.expect("failback");
        let drained = report.drain.map_or(0, |d| d.moved + d.duplicates);
        let pending = r.status().current().pending_reconcile;
        if pending == 0 && drained == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "failback did not settle"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Claimed during the outage: not acquired again after failback.
    assert!(matches!(
        store.claim("during", &FP, ttl).await.expect("claim after"),
        Claim::Completed(_)
    ));
    assert!(!matches!(
        store.claim("before", &FP, ttl).await.expect("claim after"),
        Claim::Acquired(_)
    ));
    // Both records are on Redis now: a raw look at the server.
    let leased = spool
        .lease(10, Duration::from_secs(30))
        .await
        .expect("lease");
    let mut ids: Vec<_> = leased
        .iter()
        .map(|l| l.record.id.as_str().to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, ["rec-before", "rec-during"]);
    for l in &leased {
        spool.ack(&l.token).await.expect("ack on redis");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_degraded_when_redis_is_down_and_status_shows_no_secret() {
    let mut redis = server();
    redis.kill9();
    let dir = tempfile::tempdir().expect("tempdir");
    let r = Reliability::from_config(&config(&redis, dir.path()))
        .await
        .expect("builds while redis is down");
    let s = r.status().current();
    assert_eq!(s.overall, Overall::Degraded, "{s:?}");
    assert!(s.is_ready());
    assert_eq!(
        s.breaker.as_ref().map(|b| b.state),
        Some(BreakerState::Open)
    );
    // Calls are answered locally.
    assert!(matches!(
        r.idempotency()
            .claim("k", &FP, Duration::from_secs(5))
            .await
            .expect("claim"),
        Claim::Acquired(_)
    ));
    r.refresh_status().await.expect("refresh");

    let yaml = serde_norway::to_string(&r.status().current().document()).expect("yaml");
    assert!(!yaml.contains(PASSWORD), "{yaml}");
    assert!(!format!("{r:?}").contains(PASSWORD));
    // The golden file's shape: the same keys, in the same order.
    let golden = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/status_degraded.yaml"),
    )
    .expect("golden file");
    assert_eq!(keys(&yaml), keys(&golden), "live status:\n{yaml}");

    redis.restart();
    let mut rx = r.status().subscribe();
    wait_status(&mut rx, Duration::from_secs(2), "healthy", |s| {
        s.overall == Overall::Healthy
    })
    .await;
}

/// The mapping keys of a YAML document, with their indentation.
fn keys(yaml: &str) -> Vec<String> {
    yaml.lines()
        .filter_map(|l| l.split_once(':').map(|(k, _)| k.to_string()))
        .filter(|k| !k.trim_start().starts_with('-'))
        .collect()
}

#[test]
fn redis_config_errors_name_the_field() {
    let e = from_yaml_str("reliability: { profile: redis-enabled }").expect_err("no redis section");
    assert!(e.to_string().contains("reliability.redis"), "{e}");
}

/// A durable disk spool is not drained into a Redis without persistence
/// (a kill -9 there would lose what the disk kept): the records stay on
/// disk and are delivered from there while Redis takes the new traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_records_are_not_drained_into_a_volatile_redis() {
    let mut redis = RedisServer::start_with(ServerOptions::new().password(PASSWORD));
    let dir = tempfile::tempdir().expect("tempdir");
    let r = Reliability::from_config(&config(&redis, dir.path()))
        .await
        .expect("build");
    let spool = r.spool().expect("spool");
    let mut rx = r.status().subscribe();
    redis.kill9();
    wait_status(&mut rx, Duration::from_secs(1), "degraded", |s| {
        s.overall == Overall::Degraded
    })
    .await;
    let ids = ["keep-1", "keep-2", "keep-3"];
    for id in ids {
        spool
            .enqueue(vec![NewRecord::new(
                RecordId::new(id).expect("id"),
                Bytes::from_static(b"x"),
            )])
            .await
            .expect("enqueue on disk");
    }
    redis.restart();
    wait_status(&mut rx, Duration::from_secs(1), "healthy", |s| {
        s.overall == Overall::Healthy
    })
    .await;
    // A call reaches Redis, so the spool knows it has no persistence.
    spool
        .enqueue(vec![NewRecord::new(
            RecordId::new("new-1").expect("id"),
            Bytes::from_static(b"y"),
        )])
        .await
        .expect("enqueue on redis");
    let drain = r
        .failback_now()
        .await
        .expect("failback")
        .drain
        .expect("spool");
    assert!(drain.kept_local, "{drain:?}");
    assert_eq!(drain.moved, 0);

    let leased = spool
        .lease(10, Duration::from_secs(30))
        .await
        .expect("lease");
    let mut got: Vec<_> = leased
        .iter()
        .map(|l| l.record.id.as_str().to_string())
        .collect();
    got.sort();
    assert_eq!(got, ["keep-1", "keep-2", "keep-3", "new-1"]);
    for l in &leased {
        spool.ack(&l.token).await.expect("ack where it was leased");
    }
    let stats = spool.stats().await.expect("stats");
    assert_eq!(stats.depth(), 0, "{stats:?}");
}

/// Failback passes run one at a time: two at once (plus the background
/// one) replay each outage claim once and report no conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_failback_passes_replay_each_claim_once() {
    let redis = server();
    let dir = tempfile::tempdir().expect("tempdir");
    let r = Reliability::from_config(&config(&redis, dir.path()))
        .await
        .expect("build");
    let breaker = r.breaker().expect("redis-enabled");
    breaker.isolate();
    let n = 600;
    for i in 0..n {
        let key = format!("outage-{i}");
        let claim = r
            .idempotency()
            .claim(&key, &FP, Duration::from_secs(600))
            .await;
        assert!(matches!(claim, Ok(Claim::Acquired(_))), "{key}: {claim:?}");
    }
    breaker.release();
    let mut rx = r.status().subscribe();
    wait_status(&mut rx, Duration::from_secs(2), "healthy", |s| {
        s.overall == Overall::Healthy
    })
    .await;
    let (a, b) = tokio::join!(r.failback_now(), r.failback_now());
    let (a, b) = (a.expect("pass a"), b.expect("pass b"));
    for report in [a, b] {
        if let Some(rec) = report.reconcile {
            assert_eq!(rec.conflicts, 0, "{rec:?}");
        }
    }
    assert_eq!(r.status().current().pending_reconcile, 0);
}
