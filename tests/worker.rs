//! The delivery worker over the memory spool: the retry schedule and
//! retention on a manual clock (days in milliseconds, one batch at a time
//! with `run_once`), and graceful shutdown of the spawned loop in real time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use reliability::memory::MemorySpool;
use reliability::worker::{DeliveryError, DeliveryWorker, WorkerConfig};
use reliability::{
    Capabilities, Clock, DeadReason, DeadRecord, Enqueued, Error, Leased, ManualClock, NackOutcome,
    NewRecord, Record, RecordId, Result, RetryPolicy, Spool, SpoolLimits, SpoolStats, SpoolToken,
    Timestamp, UnavailableReason,
};
use tokio::sync::watch;

const STEP: Duration = Duration::from_secs(10);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

fn manual_spool() -> (Arc<MemorySpool>, ManualClock) {
    init_tracing();
    let clock = ManualClock::new();
    let spool = MemorySpool::builder()
        .limits(SpoolLimits::default())
        .clock(Arc::new(clock.clone()))
        .build();
    (Arc::new(spool), clock)
}

fn id(s: &str) -> RecordId {
    RecordId::new(s).unwrap()
}

/// Waits for `cond` with a deadline, polling.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let polled = async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), polled)
        .await
        .is_err()
    {
        panic!("timed out waiting for {what}");
    }
}

fn hms(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60)
}

#[tokio::test]
async fn always_failing_record_is_tried_seven_times_then_dead_lettered() {
    let (spool, clock) = manual_spool();
    let tries: Arc<Mutex<Vec<(Timestamp, u32)>>> = Arc::default();
    let deliver = {
        let (tries, clock) = (Arc::clone(&tries), clock.clone());
        move |r: Record| {
            tries.lock().unwrap().push((clock.now(), r.attempts));
            async { Err(DeliveryError::transient("receiver down")) }
        }
    };
    let worker = DeliveryWorker::new(Arc::clone(&spool), WorkerConfig::default(), deliver).unwrap();
    let policy = RetryPolicy::default();

    let t0 = clock.now();
    spool
        .enqueue(vec![NewRecord::new(id("always-fails"), "x")])
        .await
        .unwrap();
    // Advance in small steps until the record is dead (bounded: 40 h).
    let mut steps = 0;
    while spool.stats().await.unwrap().dead == 0 {
        assert!(steps < 40 * 360, "never dead-lettered");
        let report = worker.run_once().await.unwrap();
        assert_eq!(report.delivered, 0);
        clock.advance(STEP);
        steps += 1;
    }

    let tries = tries.lock().unwrap().clone();
    let offsets: Vec<Duration> = tries.iter().map(|(t, _)| t.saturating_since(t0)).collect();
    eprintln!(
        "observed try times: {}",
        offsets
            .iter()
            .map(|d| hms(*d))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert_eq!(tries.len(), 7, "tried exactly 7 times");
    assert_eq!(policy.max_attempts(), 7);
    assert_eq!(offsets[0], Duration::ZERO);
    let (mut lo_sum, mut hi_sum) = (Duration::ZERO, Duration::ZERO);
    for k in 1..7 {
        assert_eq!(tries[k].1, k as u32 + 1, "attempts counts every try");
        let (lo, hi) = policy.bounds_after(k as u32).unwrap();
        lo_sum += lo;
        hi_sum += hi;
        let gap = offsets[k] - offsets[k - 1];
        assert!(
            gap >= lo && gap < hi + STEP,
            "try {} came {} after the previous one, expected {}..{}",
            k + 1,
            hms(gap),
            hms(lo),
            hms(hi)
        );
        assert!(
            offsets[k] >= lo_sum && offsets[k] < hi_sum + STEP * k as u32,
            "try {} at {}, expected {}..{}",
            k + 1,
            hms(offsets[k]),
            hms(lo_sum),
            hms(hi_sum)
        );
    }
    // Nominal times, for the record: 0, 1m, 6m, 21m, 1h21m, 5h21m, 29h21m.
    let nominal = [0u64, 60, 360, 1260, 4860, 19260, 105660];
    for (k, n) in nominal.iter().enumerate() {
        let n = Duration::from_secs(*n);
        let off = offsets[k];
        let slack = n / 10 + STEP * k as u32;
        assert!(
            off + slack >= n && off <= n + slack,
            "try {k} at {}",
            hms(off)
        );
    }

    let dead = spool.list_dead(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, DeadReason::RetriesExhausted);
    assert_eq!(dead[0].record.attempts, 7);
    assert_eq!(dead[0].record.id, id("always-fails"));
    let totals = worker.totals().snapshot();
    assert_eq!(
        (
            totals.leased,
            totals.failures,
            totals.retried,
            totals.dead_lettered
        ),
        (7, 7, 6, 1)
    );
    assert_eq!(spool.stats().await.unwrap().depth(), 0);
}

#[tokio::test]
async fn record_past_retention_is_expired_and_never_delivered() {
    let (spool, clock) = manual_spool();
    let calls = Arc::new(AtomicUsize::new(0));
    let deliver = {
        let calls = Arc::clone(&calls);
        move |_: Record| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        }
    };
    let worker = DeliveryWorker::new(Arc::clone(&spool), WorkerConfig::default(), deliver).unwrap();
    spool
        .enqueue(vec![NewRecord::new(id("stale"), "x")])
        .await
        .unwrap();
    clock.advance(Duration::from_secs(7 * 24 * 3600 + 1));

    let report = worker.run_once().await.unwrap();
    assert_eq!((report.leased, report.delivered), (0, 0));
    assert_eq!(calls.load(Ordering::SeqCst), 0, "never delivered");
    let dead = spool.list_dead(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, DeadReason::Expired);
    assert_eq!(dead[0].record.attempts, 0);

    let stats = worker.report_depth().await.unwrap();
    assert_eq!((stats.expired_total, stats.dead, stats.depth()), (1, 1, 0));
    assert_eq!(worker.totals().expired(), 1);
    // Reported once, not again.
    worker.report_depth().await.unwrap();
    assert_eq!(worker.totals().expired(), 1);
}

#[tokio::test]
async fn permanent_failure_dead_letters_at_once_and_success_acks() {
    let (spool, _clock) = manual_spool();
    let worker = DeliveryWorker::new(
        Arc::clone(&spool),
        WorkerConfig::default(),
        |r: Record| async move {
            if r.payload == "bad" {
                Err(DeliveryError::permanent("schema violation"))
            } else {
                Ok(())
            }
        },
    )
    .unwrap();
    spool
        .enqueue(vec![
            NewRecord::new(id("good-1"), "ok"),
            NewRecord::new(id("bad"), "bad"),
            NewRecord::new(id("good-2"), "ok"),
        ])
        .await
        .unwrap();

    let report = worker.run_once().await.unwrap();
    assert_eq!(
        (
            report.leased,
            report.delivered,
            report.dead_lettered,
            report.failures,
            report.retried
        ),
        (3, 2, 1, 1, 0)
    );
    let dead = spool.list_dead(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].record.id, id("bad"));
    assert_eq!(
        dead[0].reason,
        DeadReason::Rejected("schema violation".into())
    );
    assert_eq!(dead[0].record.attempts, 1);
    let stats = spool.stats().await.unwrap();
    assert_eq!((stats.depth(), stats.dead, stats.bytes), (0, 1, 3));

    spool.purge_dead(10).await.unwrap();
    assert_eq!(spool.stats().await.unwrap(), SpoolStats::default());
    // Nothing left: an empty batch.
    let report = worker.run_once().await.unwrap();
    assert_eq!(report.leased, 0);
}

#[tokio::test]
async fn lost_lease_is_counted_not_fatal() {
    let (spool, clock) = manual_spool();
    let ttl = Duration::from_secs(30);
    let stolen: Arc<Mutex<Vec<Leased>>> = Arc::default();
    let deliver = {
        let (spool, clock, stolen) = (Arc::clone(&spool), clock.clone(), Arc::clone(&stolen));
        move |_: Record| {
            let (spool, clock, stolen) = (Arc::clone(&spool), clock.clone(), Arc::clone(&stolen));
            async move {
                // A slow delivery: the lease runs out and another consumer
                // takes the record before this one settles.
                clock.advance(ttl + Duration::from_secs(1));
                let taken = spool.lease(1, ttl).await.unwrap();
                assert_eq!(taken.len(), 1);
                stolen.lock().unwrap().extend(taken);
                Ok(())
            }
        }
    };
    let config = WorkerConfig::default().with_lease_ttl(ttl);
    let worker = DeliveryWorker::new(Arc::clone(&spool), config, deliver).unwrap();
    spool
        .enqueue(vec![NewRecord::new(id("slow"), "x")])
        .await
        .unwrap();

    let report = worker.run_once().await.unwrap();
    assert_eq!((report.delivered, report.lease_lost), (0, 1));
    // The new holder still owns it and settles it.
    let stolen = stolen.lock().unwrap().clone();
    assert_eq!(stolen[0].record.attempts, 2);
    spool.ack(&stolen[0].token).await.unwrap();
    assert_eq!(spool.stats().await.unwrap().depth(), 0);
}

#[tokio::test]
async fn timeouts_and_panics_are_transient_failures() {
    let (spool, clock) = manual_spool();
    let deliver = |r: Record| async move {
        match (r.payload.as_ref(), r.attempts) {
            (b"hang", 1) => std::future::pending().await,
            (b"panic", 1) => panic!("bug in the delivery closure"),
            _ => Ok(()),
        }
    };
    let config = WorkerConfig::default().with_delivery_timeout(Duration::from_millis(50));
    let worker = DeliveryWorker::new(Arc::clone(&spool), config, deliver).unwrap();
    spool
        .enqueue(vec![
            NewRecord::new(id("hangs"), "hang"),
            NewRecord::new(id("panics"), "panic"),
        ])
        .await
        .unwrap();

    let report = worker.run_once().await.unwrap();
    assert_eq!(
        (report.failures, report.retried, report.spool_errors),
        (2, 2, 0)
    );
    assert_eq!(spool.stats().await.unwrap().delayed, 2);
    clock.advance(RetryPolicy::default().bounds_after(1).unwrap().1);
    let report = worker.run_once().await.unwrap();
    assert_eq!((report.leased, report.delivered), (2, 2));
    assert_eq!(spool.stats().await.unwrap(), SpoolStats::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_deliveries_in_flight_finish() {
    init_tracing();
    // Real time, through a trait object.
    let spool: Arc<dyn Spool> = Arc::new(MemorySpool::new());
    let (gate, gate_rx) = watch::channel(false);
    let delivered: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let holding = Arc::new(AtomicUsize::new(0));
    let deliver = {
        let (delivered, holding) = (Arc::clone(&delivered), Arc::clone(&holding));
        move |r: Record| {
            let (delivered, holding, mut gate) = (
                Arc::clone(&delivered),
                Arc::clone(&holding),
                gate_rx.clone(),
            );
            async move {
                if r.payload == "hold" {
                    holding.fetch_add(1, Ordering::SeqCst);
                    gate.wait_for(|open| *open)
                        .await
                        .map_err(|_| DeliveryError::transient("gate dropped"))?;
                }
                *delivered
                    .lock()
                    .unwrap()
                    .entry(r.id.to_string())
                    .or_default() += 1;
                Ok(())
            }
        }
    };
    let config = WorkerConfig::default()
        .with_batch_size(4)
        .with_max_concurrency(4)
        .with_poll_interval(Duration::from_millis(10));
    let handle = DeliveryWorker::new(Arc::clone(&spool), config, deliver)
        .unwrap()
        .spawn();

    let quick: Vec<NewRecord> = (0..16)
        .map(|i| NewRecord::new(id(&format!("quick-{i}")), "go"))
        .collect();
    spool.enqueue(quick).await.unwrap();
    let totals = handle.totals();
    wait_until("16 quick deliveries", || totals.delivered() == 16).await;

    let held: Vec<NewRecord> = (0..4)
        .map(|i| NewRecord::new(id(&format!("held-{i}")), "hold"))
        .collect();
    spool.enqueue(held).await.unwrap();
    wait_until("4 deliveries in flight", || {
        holding.load(Ordering::SeqCst) == 4
    })
    .await;
    assert_eq!(spool.stats().await.unwrap().leased, 4);

    let mut shutdown = tokio::spawn(handle.shutdown());
    // Shutdown waits for the deliveries in flight.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut shutdown)
            .await
            .is_err(),
        "shutdown returned while deliveries were in flight"
    );
    gate.send(true).unwrap();
    let totals = tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("shutdown finishes")
        .unwrap();

    assert_eq!(totals.delivered, 20);
    assert_eq!(
        (totals.failures, totals.lease_lost, totals.spool_errors),
        (0, 0, 0)
    );
    let stats = spool.stats().await.unwrap();
    assert_eq!((stats.depth(), stats.dead), (0, 0), "{stats:?}");
    let delivered = delivered.lock().unwrap();
    assert_eq!(delivered.len(), 20, "every id delivered at least once");
    assert!(delivered.values().all(|n| *n >= 1));
}

/// A memory spool whose `lease` fails while `down` is set.
#[derive(Debug)]
struct Flaky {
    inner: MemorySpool,
    down: AtomicBool,
    failed_leases: AtomicUsize,
}

#[async_trait]
impl Spool for Flaky {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn enqueue(&self, batch: Vec<NewRecord>) -> Result<Enqueued> {
        self.inner.enqueue(batch).await
    }
    async fn lease(&self, max: usize, ttl: Duration) -> Result<Vec<Leased>> {
        if self.down.load(Ordering::SeqCst) {
            self.failed_leases.fetch_add(1, Ordering::SeqCst);
            return Err(Error::unavailable(
                "flaky",
                UnavailableReason::Connection,
                "connection refused",
            ));
        }
        self.inner.lease(max, ttl).await
    }
    async fn ack(&self, token: &SpoolToken) -> Result<()> {
        self.inner.ack(token).await
    }
    async fn nack(&self, token: &SpoolToken, retry_in: Duration) -> Result<NackOutcome> {
        self.inner.nack(token, retry_in).await
    }
    async fn extend(&self, token: &SpoolToken, by: Duration) -> Result<()> {
        self.inner.extend(token, by).await
    }
    async fn dead_letter(&self, token: &SpoolToken, reason: DeadReason) -> Result<()> {
        self.inner.dead_letter(token, reason).await
    }
    async fn list_dead(&self, max: usize) -> Result<Vec<DeadRecord>> {
        self.inner.list_dead(max).await
    }
    async fn redrive_dead(&self, max: usize) -> Result<usize> {
        self.inner.redrive_dead(max).await
    }
    async fn purge_dead(&self, max: usize) -> Result<usize> {
        self.inner.purge_dead(max).await
    }
    async fn stats(&self) -> Result<SpoolStats> {
        self.inner.stats().await
    }
}

#[tokio::test]
async fn unavailable_spool_backs_off_and_recovers() {
    init_tracing();
    let spool = Arc::new(Flaky {
        inner: MemorySpool::new(),
        down: AtomicBool::new(true),
        failed_leases: AtomicUsize::new(0),
    });
    let config = WorkerConfig::default().with_poll_interval(Duration::from_millis(10));
    let worker =
        DeliveryWorker::new(Arc::clone(&spool), config, |_: Record| async { Ok(()) }).unwrap();
    // run_once hands the error back.
    assert!(worker.run_once().await.unwrap_err().is_unavailable());

    spool
        .enqueue(vec![NewRecord::new(id("waits"), "x")])
        .await
        .unwrap();
    let handle = worker.spawn();
    wait_until("the loop to retry the lease", || {
        spool.failed_leases.load(Ordering::SeqCst) >= 3
    })
    .await;
    assert_eq!(handle.totals().delivered(), 0);
    spool.down.store(false, Ordering::SeqCst);
    let totals = handle.totals();
    wait_until("delivery after recovery", || totals.delivered() == 1).await;
    let totals = handle.shutdown().await;
    assert_eq!((totals.delivered, totals.spool_errors), (1, 0));
}

/// `run_once` leases no more records than it has delivery slots: none
/// waits for a slot while its lease runs out.
#[tokio::test]
async fn run_once_leases_no_more_than_it_can_deliver_at_once() {
    let (spool, _clock) = manual_spool();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let deliver = {
        let (in_flight, peak) = (Arc::clone(&in_flight), Arc::clone(&peak));
        move |_: Record| {
            let (in_flight, peak) = (Arc::clone(&in_flight), Arc::clone(&peak));
            async move {
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::task::yield_now().await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            }
        }
    };
    let config = WorkerConfig::default()
        .with_batch_size(32)
        .with_max_concurrency(4);
    let worker = DeliveryWorker::new(Arc::clone(&spool), config, deliver).unwrap();
    let batch = (0..40)
        .map(|i| NewRecord::new(id(&format!("r{i}")), "x"))
        .collect();
    spool.enqueue(batch).await.unwrap();

    let report = worker.run_once().await.unwrap();
    assert_eq!((report.leased, report.delivered), (4, 4));
    assert!(peak.load(Ordering::SeqCst) <= 4);
    assert_eq!(spool.stats().await.unwrap().ready, 36);
}
