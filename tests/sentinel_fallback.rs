//! Sentinel failover under the `redis-enabled` profile (1 master, 2
//! replicas, 3 sentinels, down-after 1000 ms; the spool's local side on
//! disk), with producers enqueueing all along:
//!
//! - `kill -9` of the master, the spool waiting for one replica
//!   (`redis.spoolWaitReplicas: 1`): callers see no error (the disk answers
//!   during the failover), traffic returns to Redis on the new master, and
//!   every acknowledged record is delivered afterwards.
//! - A manual `SENTINEL FAILOVER` (no `WAIT`): the same.
#![cfg(all(feature = "redis", feature = "disk"))]
#![allow(clippy::print_stdout)] // the test reports its figures

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use reliability::config::{DiskConfig, ReliabilityConfig};
use reliability::redis::harness::{Resp, SentinelSet};
use reliability::status::{BreakerState, HealthStatus};
use reliability::{NewRecord, RecordId, Reliability, Spool};
use tokio::sync::watch;

fn config(set: &SentinelSet, dir: &std::path::Path, wait_replicas: u32) -> ReliabilityConfig {
    let mut redis = set.config();
    redis.connect_timeout = Duration::from_millis(200);
    redis.response_timeout = Duration::from_millis(200);
    redis.pool_timeout = Duration::from_millis(100);
    redis.spool_wait_replicas = wait_replicas;
    redis.spool_wait_timeout = Duration::from_millis(150);
    let mut cfg = ReliabilityConfig::redis_enabled(redis);
    cfg.namespace = format!("sf{}", std::process::id());
    cfg.disk = Some(DiskConfig::new(dir));
    cfg.fallback.probe_interval = Duration::from_millis(100);
    cfg
}

/// Enqueues fresh ids from 4 tasks until `stop`; returns the acknowledged
/// ids. Any error fails the test: the fallback must answer every call.
fn start_producers(
    spool: Arc<dyn Spool>,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..4)
        .map(|p| {
            let (spool, stop, acked) = (spool.clone(), stop.clone(), acked.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let id = format!("p{p}-{i}");
                    let record = NewRecord::new(
                        RecordId::new(id.clone()).expect("id"),
                        Bytes::from_static(b"payload"),
                    );
                    match spool.enqueue(vec![record]).await {
                        Ok(e) => {
                            assert_eq!(e.accepted + e.duplicates, 1, "{id}: {e:?}");
                            acked.lock().expect("lock").push(id);
                        }
                        Err(e) => panic!("enqueue {id} failed under the fallback: {e:?}"),
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        })
        .collect()
}

async fn wait_closed(rx: &mut watch::Receiver<HealthStatus>, within: Duration) -> Duration {
    let t = Instant::now();
    tokio::time::timeout(
        within,
        rx.wait_for(|s| s.breaker.as_ref().map(|b| b.state) == Some(BreakerState::Closed)),
    )
    .await
    .expect("breaker closed again in time")
    .expect("status hub alive");
    t.elapsed()
}

/// Moves what the disk took back to Redis, then leases and acks everything;
/// returns the delivered ids and the number delivered twice.
async fn deliver_all(r: &Reliability) -> (HashSet<String>, usize) {
    let spool = r.spool().expect("spool");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut delivered = HashSet::new();
    let mut duplicates = 0;
    loop {
        let report = r.failback_now().await.expect("failback");
        let moved = report.drain.map_or(0, |d| d.moved + d.duplicates);
        let batch = spool
            .lease(512, Duration::from_secs(60))
            .await
            .expect("lease");
        if batch.is_empty() && moved == 0 {
            let stats = spool.stats().await.expect("stats");
            if stats.ready + stats.delayed + stats.leased == 0 {
                return (delivered, duplicates);
            }
        }
        for l in &batch {
            if !delivered.insert(l.record.id.as_str().to_string()) {
                duplicates += 1;
            }
            // Around a failover an ack can meet the primary unavailable
            // (the record would be delivered again): a consumer retries it.
            loop {
                match spool.ack(&l.token).await {
                    Ok(()) => break,
                    Err(e) if e.is_unavailable() && Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => panic!("ack: {e:?}"),
                }
            }
        }
        assert!(Instant::now() < deadline, "spool did not drain in time");
    }
}

/// The record key of `id` in the facade's Redis spool.
fn record_key(r: &Reliability, id: &str) -> String {
    let ks = r.key_space();
    format!("{{{}:spool:{}}}:r:{id}", ks.prefix(), ks.namespace())
}

async fn failover_loses_nothing(kill: bool) {
    let mut set = tokio::task::block_in_place(|| SentinelSet::start(2, 3, 1000));
    let dir = tempfile::tempdir().expect("tempdir");
    let r = Reliability::from_config(&config(&set, dir.path(), u32::from(kill)))
        .await
        .expect("build");
    let mut rx = r.status().subscribe();
    wait_closed(&mut rx, Duration::from_secs(5)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let spool = Arc::clone(r.spool().expect("spool"));
    let producers = start_producers(spool, stop.clone(), acked.clone());
    tokio::time::sleep(Duration::from_millis(700)).await;

    let old = set.master_port();
    let t0 = Instant::now();
    let new = tokio::task::block_in_place(|| {
        if kill {
            set.master().kill9();
            set.wait_for_new_master(old, Duration::from_secs(15))
        } else {
            set.failover()
        }
    });
    let promoted = t0.elapsed();
    let back = wait_closed(&mut rx, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    for p in producers {
        p.await.expect("producer");
    }

    // Traffic is back on Redis: a record enqueued now lands on the new master.
    let spool = r.spool().expect("spool");
    spool
        .enqueue(vec![NewRecord::new(
            RecordId::new("marker").expect("id"),
            Bytes::from_static(b"m"),
        )])
        .await
        .expect("enqueue marker");
    let node = set.node_by_port(new);
    let exists = node.cmd(&["EXISTS", &record_key(&r, "marker")]);
    assert_eq!(
        exists,
        Resp::Int(1),
        "the marker is on the new master {new}"
    );

    let acked: Vec<String> = acked.lock().expect("lock").clone();
    let (delivered, duplicates) = deliver_all(&r).await;
    let lost: Vec<&String> = acked.iter().filter(|id| !delivered.contains(*id)).collect();
    println!(
        "{}: new master after {promoted:?}, breaker closed {back:?} later; {} acknowledged, \
         {} delivered, {} lost, {duplicates} duplicates",
        if kill { "kill -9" } else { "SENTINEL FAILOVER" },
        acked.len(),
        delivered.len(),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "lost {} records, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert!(delivered.contains("marker"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_master_no_record_lost() {
    failover_loses_nothing(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manual_failover_no_record_lost() {
    failover_loses_nothing(false).await;
}
