//! Redis backends' throughput against `redis-benchmark`, from one run on one
//! redis-server this bench starts (free loopback port, temp dir; stopped at
//! the end). Prints one table:
//!
//! - claims of new keys by 64 concurrent tasks vs `redis-benchmark -c 64`
//!   `SET` (issue 3 target: >= 1.0x);
//! - rate-limit checks by 64 tasks vs `redis-benchmark -c 64` running the
//!   same GCRA script with `EVALSHA` (target >= 1.0x);
//! - spool enqueue + lease + ack, records/s (reported, no anchor).
//!
//! `benches/redis_ratios.sh` runs it; `SECONDS_PER_STEP` (default 5) sets
//! each measurement's length.
//!
//! Both sides are one client thread on the same machine as the server:
//! `redis-benchmark` is one event-loop thread (64 connections, one request
//! in flight on each); the bench is one current-thread tokio runtime
//! (64 tasks on one client, which pipelines them on one connection).

// A bench binary: printing the table is its job.
#![allow(clippy::print_stdout)]

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use reliability::redis::harness::RedisServer;
use reliability::redis::{RedisClient, RedisIdempotencyStore, RedisRateLimiter, RedisSpool};
use reliability::{
    Claim, Fingerprint, IdempotencyStore, KeySpace, NewRecord, Quota, RateLimiter, RecordId, Spool,
    SpoolLimits,
};

mod common;

const TASKS: usize = 64;

fn step() -> Duration {
    Duration::from_secs(
        std::env::var("SECONDS_PER_STEP")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(5),
    )
}

/// `redis-benchmark` requests/s for one command, from its CSV output.
/// Runs `op(task, i)` in `TASKS` tasks for `step()`; operations per second.
async fn per_second<F, Fut>(op: F) -> f64
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let (ops, secs) = common::closed_loop(TASKS, step(), op).await;
    ops as f64 / secs
}

fn redis_benchmark(port: u16, requests: u64, args: &[&str]) -> f64 {
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-c", "64"])
        .args(["-n", &requests.to_string(), "-r", "1000000", "--csv"])
        .args(args)
        .output()
        .expect("redis-benchmark (Debian's redis-tools; scripts/test.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    // "test","rps",...  then  "SET","123456.79",...
    text.lines()
        .nth(1)
        .and_then(|l| l.split(',').nth(1))
        .and_then(|v| v.trim_matches('"').parse().ok())
        .unwrap_or_else(|| panic!("cannot read redis-benchmark output: {text}"))
}

fn main() {
    // One client thread, as redis-benchmark is one event-loop thread: a
    // current-thread runtime runs the 64 tasks and the connection on the
    // thread that blocks on them. (A multi-thread runtime with one worker
    // is two threads and costs ~3x the client CPU per call here; its claims
    // are reported on the last row, for information.)
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

/// Claims of new keys by [`TASKS`] tasks on `rt`'s workers (for the
/// informational multi-thread row).
fn claims_on(
    rt: &tokio::runtime::Runtime,
    store: Arc<RedisIdempotencyStore>,
    tag: &'static str,
) -> f64 {
    rt.block_on(claims(store, tag))
}

async fn claims(store: Arc<RedisIdempotencyStore>, tag: &'static str) -> f64 {
    let fp = Fingerprint::of(b"payload");
    per_second(move |t, i| {
        let store = store.clone();
        async move {
            let c = store
                .claim(&format!("evt-{tag}-{t}-{i}"), &fp, Duration::from_secs(60))
                .await;
            assert!(matches!(c, Ok(Claim::Acquired(_))), "{c:?}");
        }
    })
    .await
}

async fn run() {
    let server = RedisServer::start();
    let port = server.port();
    let cfg = server.config();
    let client = RedisClient::connect(&cfg, KeySpace::new("bench", "t").expect("key space"))
        .await
        .expect("connect");
    let secs = step().as_secs_f64();
    // Enough requests for redis-benchmark to run about as long as our steps.
    let n = (150_000.0 * secs) as u64;

    // Claims of new keys.
    let store = Arc::new(RedisIdempotencyStore::new(client.clone()));
    let claims = claims(store.clone(), "ct").await;
    let set = redis_benchmark(port, n, &["SET", "bench:set:__rand_int__", "x"]);

    // Rate-limit checks on 1,000 keys, and redis-benchmark on the same script.
    let limiter = Arc::new(RedisRateLimiter::new(client.clone()));
    let quota = Quota::from_micros(1, 1_000_000).expect("quota");
    let checks = {
        let limiter = limiter.clone();
        per_second(move |t, i| {
            let limiter = limiter.clone();
            async move {
                let key = format!("tenant-{}", (t as u64 * 7919 + i) % 1000);
                let _ = limiter.check(&key, quota, 1).await.expect("check");
            }
        })
        .await
    };
    let sha = limiter.script_sha();
    let script = redis_benchmark(
        port,
        n,
        &[
            "EVALSHA",
            &sha,
            "1",
            "bench:rl:t:tenant-__rand_int__",
            "",
            "0",
            "1",
            "1000000",
            "1",
        ],
    );

    // Spool: enqueue one, lease one, ack it.
    let spool = Arc::new(
        RedisSpool::builder(client.clone(), "bench")
            .limits(SpoolLimits::default().with_max_records(1_000_000))
            .open()
            .await
            .expect("spool"),
    );
    let records = {
        let spool = spool.clone();
        per_second(move |t, i| {
            let spool = spool.clone();
            async move {
                let id = RecordId::new(format!("r-{t}-{i}")).expect("id");
                spool
                    .enqueue(vec![NewRecord::new(id, vec![7u8; 256])])
                    .await
                    .expect("enqueue");
                for l in spool
                    .lease(1, Duration::from_secs(60))
                    .await
                    .expect("lease")
                {
                    spool.ack(&l.token).await.expect("ack");
                }
            }
        })
        .await
    };

    println!("\nRedis backends vs redis-benchmark (one redis-server on 127.0.0.1:{port}, {TASKS} tasks / -c 64, {secs:.0} s per step)\n");
    println!(
        "{:<58} {:>12} {:>12} {:>6} {:>7}",
        "comparison", "ours /s", "anchor /s", "ratio", "target"
    );
    let row = |what: &str, ours: f64, anchor: f64| {
        let r = ours / anchor;
        println!(
            "{what:<58} {ours:>12.0} {anchor:>12.0} {r:>6.2} {:>7} {}",
            ">= 1.0",
            if r >= 1.0 { "ok" } else { "MISSED" }
        );
    };
    row("claims (new keys) vs redis-benchmark SET", claims, set);
    row(
        "rate-limit checks vs redis-benchmark EVALSHA same script",
        checks,
        script,
    );
    println!(
        "{:<58} {:>12.0}",
        "spool enqueue + lease + ack (records/s)", records
    );

    // The same claims from a multi-thread runtime with one worker (its own
    // client and connection), for information: no target.
    let cfg = cfg.clone();
    let mt = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let client = rt
            .block_on(RedisClient::connect(
                &cfg,
                KeySpace::new("bench", "mt").expect("key space"),
            ))
            .expect("connect");
        claims_on(&rt, Arc::new(RedisIdempotencyStore::new(client)), "mt")
    })
    .join()
    .expect("multi-thread claims");
    println!(
        "{:<58} {:>12.0} {:>12.0} {:>6.2}   (info)",
        "claims, multi-thread runtime with 1 worker, vs SET",
        mt,
        set,
        mt / set
    );
}
