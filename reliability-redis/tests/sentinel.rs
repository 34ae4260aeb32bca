//! Sentinel failover (1 master, 2 replicas, 3 sentinels, down-after
//! 1000 ms), with the client writing all along.
//!
//! - `kill -9` of the master: writes succeed again on the new master within
//!   5 s.
//! - A manual `SENTINEL FAILOVER`: no write is accepted by the demoted
//!   master — every claim acknowledged as `Acquired` is on the new master
//!   afterwards.
#![allow(clippy::print_stdout)] // the test reports its figures

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fresh_key_space;
use reliability_core::config::RedisConfig;
use reliability_core::{Claim, Fingerprint, IdempotencyStore, Primitive};
use reliability_redis::harness::{Resp, SentinelSet};
use reliability_redis::{RedisClient, RedisIdempotencyStore};

fn fast(mut cfg: RedisConfig) -> RedisConfig {
    cfg.connect_timeout = Duration::from_millis(200);
    cfg.response_timeout = Duration::from_millis(200);
    cfg.pool_timeout = Duration::from_millis(100);
    cfg
}

/// Acknowledged claims: (key, when); an empty key records an error.
type Acks = Arc<Mutex<Vec<(String, Instant)>>>;

/// Claims fresh keys in a loop (4 writers) until `stop`; records each
/// `Acquired`.
fn start_writers(
    store: Arc<RedisIdempotencyStore>,
    stop: Arc<AtomicBool>,
    acks: Acks,
) -> Vec<tokio::task::JoinHandle<usize>> {
    (0..4)
        .map(|w| {
            let (store, stop, acks) = (store.clone(), stop.clone(), acks.clone());
            tokio::spawn(async move {
                let mut errors = 0;
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let key = format!("w{w}-{i}");
                    match store
                        .claim(&key, &Fingerprint::of(b"x"), Duration::from_secs(600))
                        .await
                    {
                        Ok(Claim::Acquired(_)) => acks.lock().unwrap().push((key, Instant::now())),
                        Ok(other) => panic!("fresh key {key}: {other:?}"),
                        Err(e) => {
                            assert!(e.is_unavailable(), "failover errors are unavailable: {e:?}");
                            acks.lock().unwrap().push((String::new(), Instant::now()));
                            errors += 1;
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                }
                errors
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_master_writes_resume_on_the_new_master_within_5s() {
    let mut set = tokio::task::block_in_place(|| SentinelSet::start(2, 3, 1000));
    let client = RedisClient::connect(&fast(set.config()), fresh_key_space("sentinel"))
        .await
        .expect("connect");
    let store = Arc::new(RedisIdempotencyStore::new(client));
    let (stop, acks) = (Arc::new(AtomicBool::new(false)), Acks::default());
    let writers = start_writers(store, stop.clone(), acks.clone());
    let t = Instant::now();
    while acks_len(&acks) < 100 {
        assert!(t.elapsed() < Duration::from_secs(10), "no writes");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let old = tokio::task::block_in_place(|| set.master_port());
    let killed_at = Instant::now();
    tokio::task::block_in_place(|| set.master().kill9());
    let before = acks_len(&acks);
    // The first write acknowledged after the first error that followed the
    // kill (writes in flight at the kill may still be acknowledged).
    let resumed = loop {
        let first_after = {
            let acks = acks.lock().unwrap();
            let first_error = acks
                .iter()
                .position(|(k, at)| k.is_empty() && *at > killed_at);
            first_error.and_then(|i| {
                acks[i..]
                    .iter()
                    .find(|(k, _)| !k.is_empty())
                    .map(|(_, at)| *at)
            })
        };
        if let Some(at) = first_after {
            break at.duration_since(killed_at);
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(15),
            "writes never resumed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    stop.store(true, Ordering::Relaxed);
    let mut errors = 0;
    for w in writers {
        errors += w.await.expect("writer");
    }
    let new = tokio::task::block_in_place(|| set.wait_for_new_master(old, Duration::from_secs(10)));
    println!(
        "sentinel: master {old} killed; writes resumed on {new} after {resumed:?} \
         ({before} writes before, {errors} unavailable errors during the failover)"
    );
    assert!(
        resumed < Duration::from_secs(5),
        "writes resumed after {resumed:?}"
    );
}

fn acks_len(acks: &Acks) -> usize {
    acks.lock()
        .unwrap()
        .iter()
        .filter(|(k, _)| !k.is_empty())
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manual_failover_no_write_accepted_by_the_demoted_master() {
    let set = tokio::task::block_in_place(|| SentinelSet::start(2, 3, 1000));
    let ks = fresh_key_space("sentinel");
    let client = RedisClient::connect(&fast(set.config()), ks.clone())
        .await
        .expect("connect");
    let store = Arc::new(RedisIdempotencyStore::new(client));
    let (stop, acks) = (Arc::new(AtomicBool::new(false)), Acks::default());
    let writers = start_writers(store, stop.clone(), acks.clone());
    while acks_len(&acks) < 100 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let old = tokio::task::block_in_place(|| set.master_port());
    let t = Instant::now();
    let new = tokio::task::block_in_place(|| set.failover());
    let switched = t.elapsed();
    // Keep writing until well after the switch: stale connections would
    // keep hitting the demoted master for seconds (deadpool#372).
    let after = acks_len(&acks);
    while acks_len(&acks) < after + 500 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut errors = 0;
    for w in writers {
        errors += w.await.expect("writer");
    }
    // Let the new master's replication settle, then look every
    // acknowledged key up on it.
    let acked: Vec<String> = acks
        .lock()
        .unwrap()
        .iter()
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, _)| k.clone())
        .collect();
    let new_master = set
        .nodes()
        .iter()
        .find(|n| n.port() == new)
        .expect("new master");
    let lost: Vec<&String> = tokio::task::block_in_place(|| {
        acked
            .iter()
            .filter(|k| {
                let key = ks.key(Primitive::Idempotency, k).unwrap();
                new_master.cmd(&["EXISTS", &key]) != Resp::Int(1)
            })
            .collect()
    });
    println!(
        "sentinel: manual failover {old} -> {new} in {switched:?}; {} writes acknowledged, \
         {} missing on the new master, {errors} unavailable errors",
        acked.len(),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "writes accepted by the demoted master were lost: {:?}",
        &lost[..lost.len().min(10)]
    );
}
