//! Feature `metrics`: the redis-enabled profile reports calls, fallbacks,
//! breaker state and transitions, probe latency, reconciliation and spool
//! depth through the `metrics` facade, while a real redis-server is killed
//! and restarted.
#![cfg(all(feature = "redis", feature = "metrics"))]

use std::time::Duration;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use reliability::config::ReliabilityConfig;
use reliability::redis::harness::RedisServer;
use reliability::status::Overall;
use reliability::{Claim, Fingerprint, IdempotencyStore, NewRecord, RecordId, Reliability};

/// A recorder that keeps every value, for the test to read.
#[derive(Debug, Default, Clone)]
struct Keep {
    counters: Arc<Mutex<HashMap<Key, Arc<AtomicU64>>>>,
    gauges: Arc<Mutex<HashMap<Key, Arc<AtomicU64>>>>,
    histograms: Arc<Mutex<HashMap<Key, Arc<Samples>>>>,
}

#[derive(Debug, Default)]
struct Samples(Mutex<Vec<f64>>);

impl HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0.lock().expect("lock").push(value);
    }
}

impl Recorder for Keep {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let c = self
            .counters
            .lock()
            .expect("lock")
            .entry(key.clone())
            .or_default()
            .clone();
        Counter::from_arc(c)
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let g = self
            .gauges
            .lock()
            .expect("lock")
            .entry(key.clone())
            .or_default()
            .clone();
        Gauge::from_arc(g)
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let h = self
            .histograms
            .lock()
            .expect("lock")
            .entry(key.clone())
            .or_default()
            .clone();
        Histogram::from_arc(h)
    }
}

fn matches(key: &Key, name: &str, labels: &[(&str, &str)]) -> bool {
    key.name() == name
        && labels
            .iter()
            .all(|(l, v)| key.labels().any(|x| x.key() == *l && x.value() == *v))
}

impl Keep {
    /// The sum of counter `name` over the series with every `labels` pair.
    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.counters
            .lock()
            .expect("lock")
            .iter()
            .filter(|(k, _)| matches(k, name, labels))
            .map(|(_, v)| v.load(Ordering::Relaxed))
            .sum()
    }

    /// Gauge `name` of the first series with every `labels` pair.
    fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.gauges
            .lock()
            .expect("lock")
            .iter()
            .find(|(k, _)| matches(k, name, labels))
            .map(|(_, v)| f64::from_bits(v.load(Ordering::Relaxed)))
    }

    /// Samples of histogram `name` over the series with every `labels` pair.
    fn samples(&self, name: &str, labels: &[(&str, &str)]) -> usize {
        self.histograms
            .lock()
            .expect("lock")
            .iter()
            .filter(|(k, _)| matches(k, name, labels))
            .map(|(_, v)| v.0.lock().expect("lock").len())
            .sum()
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within 5 s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_metrics_follow_an_outage() {
    let m = Keep::default();
    metrics::set_global_recorder(m.clone()).expect("the only recorder of this test binary");

    let mut redis = RedisServer::start();
    let mut cfg = ReliabilityConfig::redis_enabled(redis.config());
    cfg.namespace = format!("m{}", std::process::id());
    cfg.fallback.probe_interval = Duration::from_millis(50);
    let r = Reliability::from_config(&cfg).await.expect("build");
    let store = r.idempotency();
    let fp = Fingerprint::of("p");
    let ttl = Duration::from_secs(60);

    assert!(matches!(
        store.claim("up", &fp, ttl).await,
        Ok(Claim::Acquired(_))
    ));
    assert!(
        m.counter(
            "reliability_calls_total",
            &[("side", "primary"), ("outcome", "ok")]
        ) >= 1
    );
    eventually("a probe latency", || {
        m.samples("reliability_probe_duration_seconds", &[("outcome", "ok")]) > 0
    })
    .await;

    redis.kill9();
    let mut rx = r.status().subscribe();
    tokio::time::timeout(
        Duration::from_secs(2),
        rx.wait_for(|s| s.overall == Overall::Degraded),
    )
    .await
    .expect("degraded")
    .expect("hub");
    assert_eq!(m.gauge("reliability_breaker_state", &[]), Some(2.0), "open");
    assert!(
        m.counter(
            "reliability_breaker_transitions_total",
            &[("from", "closed"), ("to", "open")]
        ) >= 1
    );
    assert!(matches!(
        store.claim("down", &fp, ttl).await,
        Ok(Claim::Acquired(_))
    ));
    let spool = r.spool().expect("spool");
    spool
        .enqueue(vec![NewRecord::new(
            RecordId::new("m1").expect("id"),
            Bytes::from_static(b"x"),
        )])
        .await
        .expect("enqueue locally");
    assert!(m.counter("reliability_fallbacks_total", &[("reason", "open")]) >= 2);
    assert!(
        m.counter(
            "reliability_calls_total",
            &[("side", "secondary"), ("outcome", "ok")]
        ) >= 2
    );
    eventually("the backlog gauge", || {
        m.gauge("reliability_reconcile_pending", &[]) == Some(1.0)
    })
    .await;
    r.refresh_status().await.expect("refresh");
    assert_eq!(
        m.gauge("reliability_spool_depth", &[("state", "ready")]),
        Some(1.0)
    );

    redis.restart();
    eventually("replayed and drained after failback", || {
        m.counter("reliability_reconcile_replayed_total", &[]) >= 1
            && m.counter("reliability_drain_moved_total", &[]) >= 1
    })
    .await;
    assert_eq!(
        m.gauge("reliability_breaker_state", &[]),
        Some(0.0),
        "closed"
    );
    assert_eq!(m.gauge("reliability_reconcile_pending", &[]), Some(0.0));
}
