//! Health status: the serialized shape (golden file), redaction, and the
//! watch subscription.
//!
//! Regenerate the golden file after an intended change with
//! `UPDATE_GOLDEN=1 cargo test -p reliability --test status`, then review
//! the diff by eye.

use std::path::Path;
use std::time::Duration;

use reliability::config::{
    IdempotencyBackend, RateLimiterBackend, RedisConfig, RedisUrl, ReliabilityConfig, SpoolBackend,
};
use reliability::status::{
    redact, BreakerState, BreakerStatus, HealthStatus, Overall, RedisFallback, SpoolHealth,
    StatusHub,
};
use reliability::{Error, SpoolStats, Timestamp, UnavailableReason};

const PASSWORD: &str = "hunter2-prod";

/// Redis-enabled, Redis down: breaker open, every component on its fallback,
/// a spool backlog above the alert depth.
fn degraded() -> HealthStatus {
    let url = RedisUrl::new(format!("redis://app:{PASSWORD}@10.0.0.5:6379/0")).unwrap();
    let cfg = ReliabilityConfig::redis_enabled(RedisConfig::standalone(url.clone()));
    let mut s = HealthStatus::from_config(&cfg);

    let error = Error::unavailable(
        "redis",
        UnavailableReason::Connection,
        format!(
            "connect to {} failed: Connection refused (os error 111)",
            url.expose()
        ),
    );
    s.redis.available = false;
    s.redis.degraded = true;
    s.redis.fallback = RedisFallback::Baseline;
    s.components.idempotency_store.active = IdempotencyBackend::Memory;
    s.components.rate_limiter.active = RateLimiterBackend::Local;
    s.components.spool.active = SpoolBackend::Disk;
    // 2025-01-01T00:00:00Z plus 90.25 s.
    let since = Timestamp::from_micros(1_735_689_600_000_000 + 90_250_000);
    s.breaker =
        Some(BreakerStatus::new(BreakerState::Open, since).with_last_error(error.to_string()));
    s.pending_reconcile = 3;
    let mut stats = SpoolStats::default();
    stats.ready = 97;
    stats.delayed = 20;
    stats.leased = 4;
    s.spool = Some(SpoolHealth::from_stats(
        &stats,
        cfg.spool_limits.alert_depth,
    ));
    s.overall = s.evaluate();
    s
}

#[test]
fn degraded_status_matches_golden_file() {
    let status = degraded();
    assert_eq!(status.overall, Overall::Degraded);
    assert!(status.is_ready(), "degraded stays ready");
    assert!(status.is_live(), "a Redis outage never fails liveness");
    assert_eq!(
        status.components.spool.fallback_from(),
        Some(SpoolBackend::Redis)
    );

    let yaml = serde_norway::to_string(&status.document()).unwrap();
    assert!(!yaml.contains(PASSWORD), "{yaml}");
    assert!(!format!("{status:?}").contains(PASSWORD));

    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/status_degraded.yaml");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(golden.parent().unwrap()).unwrap();
        std::fs::write(&golden, &yaml).unwrap();
    }
    let want = std::fs::read_to_string(&golden)
        .unwrap_or_else(|e| panic!("{}: {e}; run with UPDATE_GOLDEN=1", golden.display()));
    assert_eq!(
        yaml,
        want,
        "status YAML differs from {}; if intended, rerun with UPDATE_GOLDEN=1 and review",
        golden.display()
    );
    assert!(!want.contains(PASSWORD));

    // The golden file reads back as the same status.
    #[derive(serde::Deserialize)]
    struct Doc {
        status: Section,
    }
    #[derive(serde::Deserialize)]
    struct Section {
        reliability: HealthStatus,
    }
    let back: Doc = serde_norway::from_str(&want).unwrap();
    assert_eq!(back.status.reliability, status);
}

#[test]
fn baseline_status_reads_like_the_seed() {
    let s = HealthStatus::from_config(&ReliabilityConfig::baseline());
    let yaml = serde_norway::to_string(&s.document()).unwrap();
    assert_eq!(
        yaml,
        "status:
  reliability:
    profile: baseline
    overall: healthy
    redis:
      available: false
      degraded: false
      fallback: none
    local:
      available: true
    components:
      idempotencyStore: memory
      rateLimiter: local
      spool: none
    pendingReconcile: 0
"
    );
}

#[test]
fn overall_rules() {
    let mut s = degraded();
    s.breaker = Some(BreakerStatus::closed());
    s.redis.degraded = false;
    s.components.idempotency_store.active = IdempotencyBackend::Redis;
    s.components.rate_limiter.active = RateLimiterBackend::Redis;
    s.components.spool.active = SpoolBackend::Redis;
    assert_eq!(
        s.evaluate(),
        Overall::Healthy,
        "a spool alert alone is not degraded"
    );
    s.breaker = Some(BreakerStatus::new(BreakerState::Isolated, Timestamp::ZERO));
    assert_eq!(s.evaluate(), Overall::Degraded);
    s.breaker = Some(BreakerStatus::new(BreakerState::HalfOpen, Timestamp::ZERO));
    assert_eq!(s.evaluate(), Overall::Degraded);
    s.local.available = false;
    s.overall = s.evaluate();
    assert_eq!(s.overall, Overall::Unhealthy);
    assert!(!s.is_ready());
    assert!(s.is_live());
}

#[test]
fn error_text_is_redacted_on_every_path() {
    let raw =
        format!("AUTH failed for rediss://default:{PASSWORD}@cache:6380 (password={PASSWORD})");
    let b = BreakerStatus::closed().with_last_error(&raw);
    let shown = b.last_error.as_ref().unwrap().as_str();
    assert!(!shown.contains(PASSWORD), "{shown}");
    assert_eq!(
        shown,
        "AUTH failed for rediss://default:***@cache:6380 (password=***)"
    );
    assert_eq!(redact(&raw), shown);
    // Deserializing redacts too.
    let back: BreakerStatus =
        serde_norway::from_str(&format!("state: open\nlastError: '{raw}'\n")).unwrap();
    assert_eq!(back.last_error.unwrap().as_str(), shown);
}

#[tokio::test]
async fn watchers_are_woken_on_change_only() {
    let hub = StatusHub::new(HealthStatus::from_config(&ReliabilityConfig::baseline()));
    let mut rx = hub.subscribe();
    assert!(!rx.has_changed().unwrap());

    // A no-op update, and one that sets what is already there.
    assert!(!hub.update(|_| {}));
    assert!(!hub.update(|s| s.pending_reconcile = 0));
    // `overall` is derived: forcing it is undone, so nothing changes.
    assert!(!hub.update(|s| s.overall = Overall::Unhealthy));
    assert!(!rx.has_changed().unwrap());

    // A real change wakes the watcher, which sees the derived verdict.
    let hub2 = hub.clone();
    let waiter = tokio::spawn(async move {
        rx.changed().await.unwrap();
        let s = rx.borrow_and_update().clone();
        (s, rx)
    });
    assert!(hub2.update(|s| s.components.rate_limiter.active = RateLimiterBackend::Redis));
    let (seen, mut rx) = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("watcher woken")
        .unwrap();
    assert_eq!(seen.overall, Overall::Degraded);
    assert_eq!(
        seen.components.rate_limiter.fallback_from(),
        Some(RateLimiterBackend::Local)
    );
    assert_eq!(hub.current(), seen);

    // Setting the same value again wakes nobody.
    assert!(!hub.set(seen.clone()));
    assert!(!rx.has_changed().unwrap());
    assert!(hub.update(|s| s.local.available = false));
    assert!(rx.has_changed().unwrap());
    assert_eq!(rx.borrow_and_update().overall, Overall::Unhealthy);
}

/// Quarantined corrupt data shows in the status (only when there is some)
/// and raises the spool's alert.
#[test]
fn quarantined_items_show_and_alert() {
    let mut stats = SpoolStats::default();
    stats.ready = 1;
    let clean = SpoolHealth::from_stats(&stats, 100);
    assert!(!clean.alert);
    let yaml = serde_norway::to_string(&clean).unwrap();
    assert!(!yaml.contains("quarantined"), "{yaml}");

    stats.quarantined_total = 2;
    let found = SpoolHealth::from_stats(&stats, 100);
    assert_eq!(found.quarantined, 2);
    assert!(found.alert, "corrupt data needs an operator");
    let yaml = serde_norway::to_string(&found).unwrap();
    assert!(yaml.contains("quarantined: 2"), "{yaml}");
}

/// End to end: a disk spool opened over a directory holding a garbage
/// segment reports it through `refresh_status`.
#[cfg(feature = "disk")]
#[tokio::test]
async fn a_disk_spool_reports_quarantined_files_in_the_status() {
    use reliability::config::DiskConfig;

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("segments")).unwrap();
    std::fs::write(
        dir.path().join("segments").join("00000009.log"),
        vec![0xAB; 4096],
    )
    .unwrap();
    let mut cfg = ReliabilityConfig::baseline();
    cfg.spool = Some(SpoolBackend::Disk);
    cfg.disk = Some(DiskConfig::new(dir.path()));
    let r = reliability::Reliability::from_config(&cfg).await.unwrap();
    r.refresh_status().await.unwrap();
    let spool = r.status().current().spool.expect("a spool");
    assert_eq!(spool.quarantined, 1, "{spool:?}");
    assert!(spool.alert);
    assert!(dir.path().join("quarantine").exists());
}

/// A status read back from YAML whose `since` names a year beyond what a
/// timestamp holds is an error, never a panic (debug) or a wrapped, wrong
/// time (release); every year that fits reads back as it was written.
#[test]
fn since_with_a_huge_year_is_refused() {
    let yaml = serde_norway::to_string(&degraded()).unwrap();
    let written = "2025-01-01T00:01:30.250Z";
    assert!(yaml.contains(written), "{yaml}");
    for year in [
        "586913",
        "999999999999",
        "9223372036854775807",
        "99999999999999999999",
    ] {
        let bad = yaml.replace(written, &format!("{year}-01-01T00:00:00.000Z"));
        let got = std::panic::catch_unwind(|| serde_norway::from_str::<HealthStatus>(&bad));
        match got {
            Err(_) => panic!("year {year}: parsing panicked"),
            Ok(Ok(s)) => panic!(
                "year {year}: accepted as {:?}",
                s.breaker.and_then(|b| b.since)
            ),
            Ok(Err(e)) => assert!(e.to_string().contains("invalid RFC 3339"), "{e}"),
        }
    }
    for year in ["1970", "2025", "9999", "10000", "586000"] {
        let good = yaml.replace(written, &format!("{year}-03-04T05:06:07.089Z"));
        let s: HealthStatus = serde_norway::from_str(&good).unwrap();
        assert_eq!(serde_norway::to_string(&s).unwrap(), good, "year {year}");
    }
}
