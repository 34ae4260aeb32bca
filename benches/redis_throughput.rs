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
//! each measurement's total length. Exits 1 if a target is missed.
//!
//! The four compared measurements take turns (`BENCH_ROUNDS`, default 6,
//! turns of `SECONDS_PER_STEP / BENCH_ROUNDS`; each turn starts one
//! measurement later in the list), and a ratio is one of totals
//! (operations over seconds, summed over the turns): this VM's speed swings
//! up to 2x between minutes, which skewed a single pair measured one after
//! the other by as much.
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

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Each measurement's total length.
fn step() -> Duration {
    Duration::from_secs(env_or("SECONDS_PER_STEP", 5))
}

fn rounds() -> u32 {
    env_or("BENCH_ROUNDS", 6u32).max(1)
}

/// Runs `op(task, i)` in `TASKS` tasks for `length`: (operations, seconds).
async fn closed_loop<F, Fut>(length: Duration, op: F) -> (u64, f64)
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    common::closed_loop(TASKS, length, op).await
}

/// `redis-benchmark -c 64` running `requests` of one command, no
/// pipelining: (requests, seconds), the seconds from its own requests/s.
fn redis_benchmark(port: u16, requests: u64, args: &[&str]) -> (u64, f64) {
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-c", "64"])
        .args(["-n", &requests.to_string(), "-r", "1000000", "--csv"])
        .args(args)
        .output()
        .expect("redis-benchmark (Debian's redis-tools; scripts/test.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    // "test","rps",...  then  "SET","123456.79",...
    let rps: f64 = text
        .lines()
        .nth(1)
        .and_then(|l| l.split(',').nth(1))
        .and_then(|v| v.trim_matches('"').parse().ok())
        .unwrap_or_else(|| panic!("cannot read redis-benchmark output: {text}"));
    (requests, requests as f64 / rps)
}

/// Operations and seconds of one measurement, summed over its turns.
#[derive(Default, Clone, Copy)]
struct Total {
    ops: u64,
    secs: f64,
}

impl Total {
    fn add(&mut self, (ops, secs): (u64, f64)) -> f64 {
        self.ops += ops;
        self.secs += secs;
        ops as f64 / secs
    }

    fn rate(self) -> f64 {
        self.ops as f64 / self.secs
    }
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
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
    if rt.block_on(run()) {
        std::process::exit(1);
    }
}

/// Claims of new keys by [`TASKS`] tasks on `rt`'s workers (for the
/// informational multi-thread row).
fn claims_on(
    rt: &tokio::runtime::Runtime,
    store: Arc<RedisIdempotencyStore>,
    tag: &'static str,
) -> f64 {
    let (ops, secs) = rt.block_on(claims(store, tag.into(), step()));
    ops as f64 / secs
}

/// Claims of new keys (`evt-{tag}-{task}-{i}`) for `length`.
async fn claims(store: Arc<RedisIdempotencyStore>, tag: String, length: Duration) -> (u64, f64) {
    let fp = Fingerprint::of(b"payload");
    closed_loop(length, move |t, i| {
        let store = store.clone();
        let id = format!("evt-{tag}-{t}-{i}");
        async move {
            let c = store.claim(&id, &fp, Duration::from_secs(60)).await;
            assert!(matches!(c, Ok(Claim::Acquired(_))), "{c:?}");
        }
    })
    .await
}

/// Runs the bench and prints its table: whether a target was missed.
async fn run() -> bool {
    let server = RedisServer::start();
    let port = server.port();
    let cfg = server.config();
    let client = RedisClient::connect(&cfg, KeySpace::new("bench", "t").expect("key space"))
        .await
        .expect("connect");
    let secs = step().as_secs_f64();
    let rounds = rounds();
    let turn = step() / rounds;
    let load_before = load();

    let store = Arc::new(RedisIdempotencyStore::new(client.clone()));
    let limiter = Arc::new(RedisRateLimiter::new(client.clone()));
    let quota = Quota::from_micros(1, 1_000_000).expect("quota");
    // Load both scripts before the first turn.
    let _ = store
        .claim(
            "warm-up",
            &Fingerprint::of(b"payload"),
            Duration::from_secs(60),
        )
        .await
        .expect("claim");
    let _ = limiter.check("warm-up", quota, 1).await.expect("check");
    let sha = limiter.script_sha();
    let evalsha = [
        "EVALSHA",
        &sha,
        "1",
        "bench:rl:t:tenant-__rand_int__",
        "",
        "0",
        "1",
        "1000000",
        "1",
    ];

    // Claims of new keys vs SET; rate-limit checks on 1,000 keys vs
    // redis-benchmark on the same script. redis-benchmark runs a number of
    // requests, not a time: each turn asks for what its last turn did in
    // one turn's time.
    let mut totals = [Total::default(); 4];
    let mut requests = [0, (20_000.0 * turn.as_secs_f64()) as u64, 0, 0];
    requests[3] = requests[1];
    let mut turns = Vec::new();
    for round in 0..rounds {
        let mut rates = [0.0; 4];
        for k in 0..4 {
            let m = (k + round as usize) % 4;
            let got = match m {
                0 => claims(store.clone(), format!("ct{round}"), turn).await,
                1 => redis_benchmark(port, requests[1], &["SET", "bench:set:__rand_int__", "x"]),
                2 => {
                    let limiter = limiter.clone();
                    closed_loop(turn, move |t, i| {
                        let limiter = limiter.clone();
                        async move {
                            let key = format!("tenant-{}", (t as u64 * 7919 + i) % 1000);
                            let _ = limiter.check(&key, quota, 1).await.expect("check");
                        }
                    })
                    .await
                }
                _ => redis_benchmark(port, requests[3], &evalsha),
            };
            rates[m] = totals[m].add(got);
            requests[m] = ((rates[m] * turn.as_secs_f64()) as u64).max(1_000);
        }
        turns.push((rates, load()));
    }
    let [claims, set, checks, script] = totals.map(Total::rate);

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
        let (ops, secs) = closed_loop(step(), move |t, i| {
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
        .await;
        ops as f64 / secs
    };

    println!(
        "\nRedis backends vs redis-benchmark (one redis-server on 127.0.0.1:{port}, {TASKS} tasks / -c 64, {secs:.0} s per step in {rounds} turns; load {load_before} before, {} after the turns)\n",
        load()
    );
    println!(
        "{:<58} {:>12} {:>12} {:>6} {:>7}",
        "comparison", "ours /s", "anchor /s", "ratio", "target"
    );
    let mut missed = false;
    let mut row = |what: &str, ours: f64, anchor: f64| {
        let r = ours / anchor;
        missed |= r < 1.0;
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

    println!("\nturns: claims/s, SET/s, ratio | checks/s, EVALSHA/s, ratio | load after");
    for (k, ([c, s, ch, e], load)) in turns.iter().enumerate() {
        println!(
            "  {k}: {c:>8.0} {s:>8.0} {:>5.2} | {ch:>8.0} {e:>8.0} {:>5.2} | {load}",
            c / s,
            ch / e
        );
    }

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
    missed
}
