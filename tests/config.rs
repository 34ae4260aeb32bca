//! Configuration: YAML loading, validation naming the field, defaults,
//! round trips, secrets.

use std::time::Duration;

use reliability::config::{
    from_yaml_file, from_yaml_str, FsyncPolicy, IdempotencyBackend, Profile, RateLimitFallback,
    RateLimiterBackend, ReliabilityConfig, SpoolBackend,
};
use reliability::Error;
#[cfg(feature = "memory")]
use reliability::Reliability;

/// What a case must fail with.
#[cfg(feature = "memory")]
#[derive(Debug)]
enum Want {
    /// `Error::Config` naming this field.
    Config(&'static str),
    /// `Error::FeatureDisabled` naming this field, backend and feature.
    // Only built when a backend feature is off.
    #[cfg_attr(all(feature = "redis", feature = "disk"), allow(dead_code))]
    Feature(&'static str, &'static str, &'static str),
}

/// A redis-enabled profile. Only parsed, or built without feature `redis`:
/// nothing connects to this address.
const REDIS: &str = "profile: redis-enabled\n  redis: { url: redis://127.0.0.1:9 }";

/// A redis-enabled profile whose spool enqueues wait up to 1 s for one
/// replica.
const REDIS_WAIT: &str = "profile: redis-enabled\n  redis: { url: redis://127.0.0.1:9, \
                          spoolWaitReplicas: 1, spoolWaitTimeout: 1s }";

/// Loads `yaml` and, if that succeeds, builds it: the error of the first
/// step that fails.
#[cfg(feature = "memory")]
async fn load_and_build(yaml: &str) -> Result<Reliability, Error> {
    let cfg = from_yaml_str(yaml)?;
    Reliability::from_config(&cfg).await
}

// Builds baseline backends, so needs feature `memory` (a default).
#[cfg(feature = "memory")]
#[tokio::test]
async fn invalid_configurations_name_the_field() {
    use Want::Config;
    #[cfg(not(all(feature = "redis", feature = "disk")))]
    use Want::Feature;
    #[allow(unused_mut)]
    let mut cases: Vec<(String, Want)> = vec![
        // Profile and components.
        ("profile: redis-enabled".into(), Config("reliability.redis")),
        ("profile: redis".into(), Config("reliability.profile")),
        ("idempotencyStore: redis".into(), Config("reliability.idempotencyStore")),
        ("rateLimiter: redis".into(), Config("reliability.rateLimiter")),
        ("spool: redis".into(), Config("reliability.spool")),
        ("spool: kafka".into(), Config("reliability.spool")),
        ("rateLimitter: local".into(), Config("reliability.rateLimitter")),
        // Keys.
        ("keyPrefix: \"my:svc\"".into(), Config("reliability.keyPrefix")),
        ("namespace: \"\"".into(), Config("reliability.namespace")),
        // Redis.
        (
            "profile: redis-enabled\n  redis: { url: http://127.0.0.1:6379 }".into(),
            Config("reliability.redis.url"),
        ),
        (
            "profile: redis-enabled\n  redis: { url: \"redis://h:port\" }".into(),
            Config("reliability.redis.url"),
        ),
        (
            "profile: redis-enabled\n  redis: { urll: redis://h }".into(),
            Config("reliability.redis.urll"),
        ),
        ("profile: redis-enabled\n  redis: {}".into(), Config("reliability.redis")),
        (
            "profile: redis-enabled\n  redis: { sentinel: { masterName: mymaster, urls: [] } }"
                .into(),
            Config("reliability.redis.sentinel.urls"),
        ),
        (
            "profile: redis-enabled\n  redis: { sentinel: { masterName: '', urls: [redis://s:26379] } }"
                .into(),
            Config("reliability.redis.sentinel.masterName"),
        ),
        (
            "profile: redis-enabled\n  redis: { sentinel: { urls: [redis://s:26379] } }".into(),
            Config("reliability.redis.sentinel.masterName"),
        ),
        (
            "profile: redis-enabled\n  redis: { sentinel: { masterName: m, urls: [redis://s, 'ftp://x'] } }"
                .into(),
            Config("reliability.redis.sentinel.urls[1]"),
        ),
        (
            "profile: redis-enabled\n  redis: { url: redis://h, cluster: { urls: [redis://c] } }"
                .into(),
            Config("reliability.redis.cluster"),
        ),
        (
            "profile: redis-enabled\n  redis: { cluster: { urls: [] } }".into(),
            Config("reliability.redis.cluster.urls"),
        ),
        (
            "profile: redis-enabled\n  redis: { url: redis://h, db: 16 }".into(),
            Config("reliability.redis.db"),
        ),
        (
            "profile: redis-enabled\n  redis: { cluster: { urls: [redis://c] }, db: 1 }".into(),
            Config("reliability.redis.db"),
        ),
        (
            "profile: redis-enabled\n  redis: { url: redis://h, db: -1 }".into(),
            Config("reliability.redis.db"),
        ),
        (
            "profile: redis-enabled\n  redis: { url: redis://h, connectTimeout: 0s }".into(),
            Config("reliability.redis.connectTimeout"),
        ),
        (
            "profile: redis-enabled\n  redis: { url: redis://h, responseTimeout: 250 }".into(),
            Config("reliability.redis.responseTimeout"),
        ),
        (
            "profile: redis-enabled\n  redis: { url: redis://h, poolSize: 0 }".into(),
            Config("reliability.redis.poolSize"),
        ),
        (
            "profile: redis-enabled\n  redis: { url: redis://h, spoolWaitReplicas: 1, spoolWaitTimeout: 0s }".into(),
            Config("reliability.redis.spoolWaitTimeout"),
        ),
        (
            "profile: redis-enabled\n  redis: { cluster: { urls: [redis://h] }, spoolWaitReplicas: 1 }".into(),
            Config("reliability.redis.spoolWaitReplicas"),
        ),
        (
            "profile: redis-enabled\n  redis: { url: redis://h, password: '***' }".into(),
            Config("reliability.redis.password"),
        ),
        (
            "profile: redis-enabled\n  redis: { url: redis://h, tls: { caFile: /ca.pem } }".into(),
            Config("reliability.redis.tls"),
        ),
        (
            "profile: redis-enabled\n  redis: { url: rediss://h, tls: { certFile: /c.pem } }".into(),
            Config("reliability.redis.tls.keyFile"),
        ),
        // Disk.
        ("spool: disk".into(), Config("reliability.disk.dir")),
        ("spool: disk\n  disk: {}".into(), Config("reliability.disk.dir")),
        (
            "spool: disk\n  disk: { dir: /tmp/s, maxRecords: 0 }".into(),
            Config("reliability.disk.maxRecords"),
        ),
        (
            "spool: disk\n  disk: { dir: /tmp/s, fsync: sometimes }".into(),
            Config("reliability.disk.fsync"),
        ),
        (
            "spool: disk\n  disk: { dir: /tmp/s, fsync: interval, fsyncInterval: 0s }".into(),
            Config("reliability.disk.fsyncInterval"),
        ),
        // Memory and spool limits.
        ("memory: { maxKeys: 0 }".into(), Config("reliability.memory.maxKeys")),
        ("spoolLimits: { maxRecords: 0 }".into(), Config("reliability.spoolLimits.maxRecords")),
        (
            "spoolLimits: { maxBytes: 10, maxRecordBytes: 11 }".into(),
            Config("reliability.spoolLimits.maxRecordBytes"),
        ),
        ("spoolLimits: { retention: 0d }".into(), Config("reliability.spoolLimits.retention")),
        ("spoolLimits: { retention: 1.5d }".into(), Config("reliability.spoolLimits.retention")),
        // Retry.
        ("retry: { schedule: [] }".into(), Config("reliability.retry.schedule")),
        ("retry: { schedule: [1m, 0s] }".into(), Config("reliability.retry.schedule[1]")),
        ("retry: { schedule: [1m, 5x] }".into(), Config("reliability.retry.schedule[1]")),
        ("retry: { jitter: 1.0 }".into(), Config("reliability.retry.jitter")),
        ("retry: { jitter: -0.1 }".into(), Config("reliability.retry.jitter")),
        // Fallback.
        ("fallback: { deadline: 0ms }".into(), Config("reliability.fallback.deadline")),
        // A WAIT (default 1 s) longer than the deadline (250 ms): every
        // enqueue behind one lagging replica would time out and land twice.
        (
            format!("{REDIS_WAIT}\n  fallback: {{ deadline: 250ms }}"),
            Config("reliability.redis.spoolWaitTimeout"),
        ),
        ("fallback: { failureThreshold: 0 }".into(), Config("reliability.fallback.failureThreshold")),
        ("fallback: { successThreshold: 0 }".into(), Config("reliability.fallback.successThreshold")),
        ("fallback: { probeInterval: 0s }".into(), Config("reliability.fallback.probeInterval")),
        (
            "fallback: { rateLimitPolicy: localShare, replicas: 0 }".into(),
            Config("reliability.fallback.replicas"),
        ),
        (
            "fallback: { rateLimitPolicy: localShared }".into(),
            Config("reliability.fallback.rateLimitPolicy"),
        ),
        // Credentials a URL cannot carry unencoded (they would end the URL
        // in free text, so the password would show when redacted).
        (
            "profile: redis-enabled\n  redis: { url: 'redis://app:p ss@h:6379/0' }".into(),
            Config("reliability.redis.url"),
        ),
        // The database of a URL and the db field agree; both exist.
        (
            "profile: redis-enabled\n  redis: { url: redis://h:6379/3, db: 1 }".into(),
            Config("reliability.redis.db"),
        ),
        (
            "profile: redis-enabled\n  redis: { url: redis://h:6379/16 }".into(),
            Config("reliability.redis.url"),
        ),
        (
            "profile: redis-enabled\n  redis: { sentinel: { masterName: m, urls: [redis://s:26379/2] } }"
                .into(),
            Config("reliability.redis.sentinel.urls[0]"),
        ),
        (
            "profile: redis-enabled\n  redis: { cluster: { urls: [redis://c:7000, redis://c:7001/1] } }"
                .into(),
            Config("reliability.redis.cluster.urls[1]"),
        ),
        // Upper bounds of durations (a huge one overflows a deadline).
        ("fallback: { deadline: 36501d }".into(), Config("reliability.fallback.deadline")),
        (
            "fallback: { probeInterval: 213503982334601d }".into(),
            Config("reliability.fallback.probeInterval"),
        ),
        (
            "profile: redis-enabled\n  redis: { url: redis://h, responseTimeout: 99999999999d }".into(),
            Config("reliability.redis.responseTimeout"),
        ),
        (
            "spoolLimits: { retention: 213503982334601d }".into(),
            Config("reliability.spoolLimits.retention"),
        ),
        (
            "retry: { schedule: [1m, 213503982334601d] }".into(),
            Config("reliability.retry.schedule[1]"),
        ),
        (
            "spool: disk\n  disk: { dir: /tmp/s, fsync: interval, fsyncInterval: 213503982334601d }"
                .into(),
            Config("reliability.disk.fsyncInterval"),
        ),
        // Sizes and the pairs they form.
        (
            "spool: disk\n  disk: { dir: /tmp/s, maxBytes: 1000 }".into(),
            Config("reliability.disk.maxBytes"),
        ),
        (
            "spoolLimits: { maxBytes: 1099511627776, maxRecordBytes: 1099511627776 }".into(),
            Config("reliability.spoolLimits.maxRecordBytes"),
        ),
        ("memory: { maxBytes: 0 }".into(), Config("reliability.memory.maxBytes")),
        // A jitter that is not a number in [0, 1) (it would panic in use).
        ("retry: { jitter: .nan }".into(), Config("reliability.retry.jitter")),
        ("retry: { jitter: .inf }".into(), Config("reliability.retry.jitter")),
    ];
    // Backends whose cargo feature is off. With feature `redis` these
    // configurations connect to Redis (tested in reliability-redis), so the
    // cases apply only without the feature.
    #[cfg(not(feature = "redis"))]
    cases.extend([
        (
            format!("{REDIS}\n  idempotencyStore: redis"),
            Feature("reliability.idempotencyStore", "redis", "redis"),
        ),
        (
            format!("{REDIS}\n  idempotencyStore: memory"),
            Feature("reliability.rateLimiter", "redis", "redis"),
        ),
        (
            format!("{REDIS}\n  idempotencyStore: memory\n  rateLimiter: local"),
            Feature("reliability.spool", "redis", "redis"),
        ),
    ]);
    // With feature `disk` this configuration opens a real spool (tested in
    // reliability-disk), so the case applies only without the feature.
    #[cfg(not(feature = "disk"))]
    cases.push((
        "spool: disk\n  disk: { dir: /tmp/s }".into(),
        Feature("reliability.spool", "disk", "disk"),
    ));
    assert!(cases.len() >= 12);

    let mut failures = Vec::new();
    for (body, want) in &cases {
        let yaml = format!("reliability:\n  {body}\n");
        let got = load_and_build(&yaml).await;
        let ok = match (&got, want) {
            (Err(Error::Config { field, .. }), Want::Config(f)) => field == f,
            (
                Err(Error::FeatureDisabled {
                    field,
                    backend,
                    feature,
                }),
                Want::Feature(f, b, feat),
            ) => field == f && backend == b && feature == feat,
            _ => false,
        };
        if !ok {
            failures.push(format!(
                "--- {yaml}    want {want:?}\n    got  {:?}",
                got.map(|_| "Ok")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn yaml_errors_carry_the_location() {
    let err = from_yaml_str("reliability:\n  retry:\n    jitter: high\n").unwrap_err();
    let Error::Config { field, message } = err else {
        panic!("not a config error")
    };
    assert_eq!(field, "reliability.retry.jitter");
    assert!(message.contains("line 3"), "{message}");

    let err = from_yaml_str("reliability: [\n").unwrap_err();
    assert!(matches!(err, Error::Config { ref field, .. } if field == "reliability"));

    let err = from_yaml_str("other: 1\n").unwrap_err();
    assert!(matches!(err, Error::Config { ref field, .. } if field == "reliability"));
}

#[test]
fn all_problems_are_listed() {
    let mut cfg = ReliabilityConfig::baseline();
    cfg.memory.max_keys = 0;
    cfg.fallback.deadline = Duration::ZERO;
    cfg.retry.jitter = 2.0;
    let fields: Vec<String> = cfg
        .problems()
        .into_iter()
        .map(|e| match e {
            Error::Config { field, .. } => field,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        fields,
        [
            "reliability.memory.maxKeys",
            "reliability.retry.jitter",
            "reliability.fallback.deadline"
        ]
    );
}

#[test]
fn defaults() {
    for yaml in [
        "reliability:\n",
        "reliability: {}\n",
        "reliability: {}\nhost: { port: 8080 }\n",
    ] {
        let cfg = from_yaml_str(yaml).unwrap();
        assert_eq!(cfg, ReliabilityConfig::baseline(), "{yaml}");
    }
    let cfg = ReliabilityConfig::baseline();
    assert_eq!(cfg.profile, Profile::Baseline);
    assert_eq!(cfg.idempotency_backend(), IdempotencyBackend::Memory);
    assert_eq!(cfg.rate_limiter_backend(), RateLimiterBackend::Local);
    assert_eq!(cfg.spool_backend(), SpoolBackend::None);
    assert_eq!(cfg.key_prefix, "reliability");
    assert_eq!(cfg.namespace, "default");
    assert_eq!(cfg.memory.max_entries, 100_000);
    assert_eq!(cfg.memory.max_keys, 100_000);
    // Seed 004.
    assert_eq!(cfg.spool_limits.max_records, 10_000);
    assert_eq!(cfg.spool_limits.retention, Duration::from_secs(7 * 86_400));
    assert_eq!(cfg.spool_limits.alert_depth, 100);
    let mins: Vec<u64> = cfg
        .retry
        .schedule
        .iter()
        .map(|d| d.as_secs() / 60)
        .collect();
    assert_eq!(mins, [1, 5, 15, 60, 240, 1440]);
    assert_eq!(cfg.retry.jitter, 0.1);
    // Contract section 4.
    assert_eq!(cfg.fallback.deadline, Duration::from_millis(250));
    assert_eq!(cfg.fallback.failure_threshold, 3);
    assert_eq!(cfg.fallback.probe_interval, Duration::from_millis(250));
    assert_eq!(cfg.fallback.success_threshold, 2);
    assert_eq!(
        cfg.fallback.rate_limit_policy,
        RateLimitFallback::LocalShare
    );
    assert_eq!(cfg.fallback.replicas, 1);
    assert_eq!(
        cfg.retry_policy().unwrap(),
        reliability::RetryPolicy::default()
    );

    // Under redis-enabled, absent components take Redis.
    let cfg = from_yaml_str(&format!("reliability:\n  {REDIS}\n")).unwrap();
    assert_eq!(cfg.idempotency_backend(), IdempotencyBackend::Redis);
    assert_eq!(cfg.rate_limiter_backend(), RateLimiterBackend::Redis);
    assert_eq!(cfg.spool_backend(), SpoolBackend::Redis);
    let redis = cfg.redis.as_ref().unwrap();
    assert_eq!(redis.db, None);
    assert_eq!(redis.database().unwrap(), 0);
    assert_eq!(redis.connect_timeout, Duration::from_secs(1));
    assert_eq!(redis.response_timeout, Duration::from_millis(500));
    assert_eq!(redis.pool_timeout, Duration::from_millis(200));
    assert_eq!(redis.pool_size, 16);
}

const FULL: &str = r#"
reliability:
  profile: redis-enabled
  idempotencyStore: redis
  rateLimiter: redis
  spool: disk
  keyPrefix: gateway
  namespace: webhooks.v2
  redis:
    sentinel:
      masterName: mymaster
      urls: [redis://10.0.0.1:26379, redis://10.0.0.2:26379, "redis://[::1]:26379"]
    db: 3
    username: app
    tls:
      caFile: /etc/ssl/ca.pem
      certFile: /etc/ssl/client.pem
      keyFile: /etc/ssl/client.key
      insecureSkipVerify: false
    connectTimeout: 2s
    responseTimeout: 150ms
    poolTimeout: 100ms
    poolSize: 32
    spoolWaitReplicas: 1
    spoolWaitTimeout: 50ms
  disk:
    dir: /var/lib/gateway/spool
    maxBytes: 1073741824
    maxRecords: 50000
    fsync: interval
    fsyncInterval: 200ms
  memory: { maxEntries: 5000, maxKeys: 7000 }
  spoolLimits:
    maxRecords: 20000
    maxBytes: 536870912
    maxRecordBytes: 65536
    retention: 3d12h
    alertDepth: 250
  retry:
    schedule: [30s, 2m, 1h30m, 1d]
    jitter: 0.25
  fallback:
    deadline: 100ms
    failureThreshold: 5
    probeInterval: 500ms
    successThreshold: 3
    rateLimitPolicy: localShare
    replicas: 4
"#;

#[test]
fn full_config_round_trips() {
    let cfg = from_yaml_str(FULL).unwrap();
    assert_eq!(cfg.profile, Profile::RedisEnabled);
    assert_eq!(cfg.spool_backend(), SpoolBackend::Disk);
    assert_eq!(cfg.spool_limits.retention, Duration::from_secs(84 * 3600));
    let disk = cfg.disk.as_ref().unwrap();
    assert_eq!(disk.fsync, FsyncPolicy::Interval);
    assert_eq!(disk.limits(&cfg.spool_limits).max_records, 50_000);
    assert_eq!(disk.limits(&cfg.spool_limits).max_record_bytes, 65_536);
    assert_eq!(
        cfg.redis
            .as_ref()
            .unwrap()
            .sentinel
            .as_ref()
            .unwrap()
            .urls
            .len(),
        3
    );

    #[derive(serde::Serialize)]
    struct Doc<'a> {
        reliability: &'a ReliabilityConfig,
    }
    let yaml = serde_norway::to_string(&Doc { reliability: &cfg }).unwrap();
    assert!(yaml.contains("retention: 3d12h"), "{yaml}");
    assert!(
        yaml.contains("schedule:\n    - 30s\n    - 2m\n    - 1h30m\n    - 1d"),
        "{yaml}"
    );
    let back = from_yaml_str(&yaml).unwrap();
    assert_eq!(back, cfg);
    assert_eq!(
        serde_norway::to_string(&Doc { reliability: &back }).unwrap(),
        yaml
    );
}

#[test]
fn file_loading_names_the_file() {
    let dir = std::env::temp_dir().join(format!("reliability-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.yaml");
    std::fs::write(&good, FULL).unwrap();
    assert_eq!(from_yaml_file(&good).unwrap(), from_yaml_str(FULL).unwrap());
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "reliability: { retry: { jitter: 3 } }").unwrap();
    match from_yaml_file(&bad) {
        Err(Error::Config { field, message }) => {
            assert_eq!(field, "reliability.retry.jitter");
            assert!(message.contains("bad.yaml"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        from_yaml_file(dir.join("missing.yaml")),
        Err(Error::Config { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn passwords_never_show() {
    const PASSWORD: &str = "pw-hunter2";
    const URL_PASSWORD: &str = "url-s3cr3t";
    let yaml = format!(
        "reliability:\n  profile: redis-enabled\n  redis:\n    url: rediss://app:{URL_PASSWORD}@redis.internal:6380/1\n    password: {PASSWORD}\n    tls: {{}}\n"
    );
    let cfg = from_yaml_str(&yaml).unwrap();
    let redis = cfg.redis.as_ref().unwrap();
    assert_eq!(redis.password.as_ref().unwrap().expose(), PASSWORD);
    assert!(redis.url.as_ref().unwrap().expose().contains(URL_PASSWORD));

    let debug = format!("{cfg:?}");
    let pretty = format!("{cfg:#?}");
    let display = format!(
        "{} {}",
        redis.url.as_ref().unwrap(),
        redis.password.as_ref().unwrap()
    );
    let serialized = serde_norway::to_string(&cfg).unwrap();
    for out in [&debug, &pretty, &display, &serialized] {
        assert!(!out.contains(PASSWORD), "{out}");
        assert!(!out.contains(URL_PASSWORD), "{out}");
    }
    assert!(
        debug.contains("rediss://app:***@redis.internal:6380/1"),
        "{debug}"
    );
    assert!(serialized.contains("password: '***'"), "{serialized}");

    // Redacted output does not load back as if it held the real password.
    let dumped = format!("reliability:\n{}", indent(&serialized));
    match from_yaml_str(&dumped) {
        Err(Error::Config { field, .. }) => assert_eq!(field, "reliability.redis.url"),
        other => panic!("{other:?}"),
    }

    // Numeric passwords load, and errors never echo a password.
    let cfg = from_yaml_str(
        "reliability:\n  profile: redis-enabled\n  redis: { url: redis://h, password: 123456 }\n",
    )
    .unwrap();
    assert_eq!(cfg.redis.unwrap().password.unwrap().expose(), "123456");
    for bad in [
        "reliability:\n  profile: redis-enabled\n  redis: { url: 'redis://u:pa/ss#word@h:x' }\n",
        "reliability:\n  profile: redis-enabled\n  redis: { url: 'http://u:pa/ss#word@h' }\n",
        "reliability:\n  profile: redis-enabled\n  redis: { url: 'redis://u:pa/ss#word@h', db: 99 }\n",
    ] {
        let err = from_yaml_str(bad).unwrap_err();
        let text = format!("{err} {err:?}");
        assert!(!text.contains("pa/ss"), "{text}");
        assert!(!text.contains("word"), "{text}");
    }
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}

#[cfg(feature = "memory")]
#[tokio::test]
async fn baseline_builds_memory_backends() {
    let cfg = from_yaml_str("reliability: { spool: memory, memory: { maxEntries: 10 } }").unwrap();
    let r = Reliability::builder(cfg)
        .clock(std::sync::Arc::new(reliability::ManualClock::new()))
        .build()
        .await
        .unwrap();
    assert!(r.spool().is_some());
    assert_eq!(r.key_space().prefix(), "reliability");
    let s = r.status().current();
    assert_eq!(s.overall, reliability::Overall::Healthy);
    assert!(s.is_ready() && s.is_live());
    assert!(!s.redis.available && !s.redis.degraded);
    assert_eq!(s.components.spool.active, SpoolBackend::Memory);
    assert_eq!(s.spool.unwrap().depth, 0);
    r.refresh_status().await.unwrap();

    let r = Reliability::from_config(&ReliabilityConfig::baseline())
        .await
        .unwrap();
    assert!(r.spool().is_none());
    assert!(r.status().current().spool.is_none());
    assert_eq!(r.config(), &ReliabilityConfig::baseline());
}

#[cfg(not(feature = "memory"))]
#[tokio::test]
async fn baseline_without_memory_feature_names_it() {
    match reliability::Reliability::from_config(&ReliabilityConfig::baseline()).await {
        Err(Error::FeatureDisabled {
            field,
            backend,
            feature,
        }) => {
            assert_eq!(field, "reliability.idempotencyStore");
            assert_eq!((backend.as_str(), feature), ("memory", "memory"));
        }
        other => panic!("{other:?}"),
    }
}
