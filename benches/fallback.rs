//! What `Fallback(redis, local)` costs, from one run on one redis-server this
//! bench starts (free loopback port, temp dir; stopped at the end). Issue 5:
//!
//! - **Open**: per-call latency (p50, p99, p99.9, max) of the fallback with
//!   the breaker isolated, then with redis-server really killed (`kill -9`,
//!   breaker opened by the failing calls), against the local backend called
//!   directly. Target: p99 within 1.5x of the local backend alone.
//! - **Closed**: throughput of 64 concurrent tasks through the fallback
//!   (Redis up) against the Redis backend alone, on the same client.
//!   Target: within 5% (ratio >= 0.95).
//!
//! Both primitives: claims of new keys (idempotency store) and checks on
//! 1,000 keys (rate limiter, as in `redis_throughput`). The rate limiter's
//! fallback is measured with the default policy
//! ([`RateLimitPolicy::LocalShare`] with one replica) and with
//! [`RateLimitPolicy::LocalFull`].
//!
//! The two sides of a comparison run in interleaved rounds (Open: A B A B
//! ...; Closed: A B B A A B ...) so drift (other load, cache warm-up,
//! growing tables) falls on both.
//! Latencies are raw per-call samples (two `Instant::now()` around each
//! `.await`; the cost of that pair is printed as `clock pair`), sorted for
//! the percentiles. Every section prints `/proc/loadavg`: on a shared
//! machine the figures are only as good as the load allows.
//!
//! Knobs (environment): `SECONDS_PER_STEP` (default 5) is the length of one
//! Closed round; `CLOSED_ROUNDS` (default 4) the pairs of Closed rounds;
//! `OPEN_CALLS` (default 500000) the calls per side of an Open comparison,
//! in `OPEN_ROUNDS` (default 10) pairs of rounds.
//!
//! `benches/fallback_ratios.sh` runs it.

// A bench binary: printing the table is its job.
#![allow(clippy::print_stdout)]

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reliability::fallback::{Breaker, BreakerConfig, Fallback, Probe, RateLimitPolicy};
use reliability::memory::{LocalRateLimiter, MemoryIdempotencyStore};
use reliability::redis::harness::RedisServer;
use reliability::redis::{RedisClient, RedisIdempotencyStore, RedisRateLimiter};
use reliability::status::BreakerState;
use reliability::{
    system_clock, Claim, Fingerprint, IdempotencyStore, KeySpace, Quota, RateLimiter,
};

mod common;

const TASKS: usize = 64;
/// Local stores hold every key the bench claims: no eviction on either side.
const CAPACITY: u64 = 8_000_000;
const LEASE: Duration = Duration::from_secs(30);
/// Rate-limit keys, as in `redis_throughput`.
const LIMIT_KEYS: u64 = 1000;
/// Calls between two yields of an Open round (the yield is not timed), so
/// the probe and the I/O driver get the worker now and then.
const YIELD_EVERY: usize = 1024;
/// An Open call this slow is printed (with its index) when it happens.
const STALL: Duration = Duration::from_millis(20);

/// Open: the fallback's p99 at most this times the local backend's.
const OPEN_P99_TARGET: f64 = 1.5;
/// Closed: the fallback's throughput at least this times Redis alone.
const CLOSED_TARGET: f64 = 0.95;

type FbStore = Fallback<RedisIdempotencyStore, MemoryIdempotencyStore>;
type FbLimiter = Fallback<RedisRateLimiter, LocalRateLimiter>;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn step() -> Duration {
    Duration::from_secs(env_or("SECONDS_PER_STEP", 5))
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn quota() -> Quota {
    Quota::from_micros(1, 1_000_000).expect("quota")
}

fn local_store() -> MemoryIdempotencyStore {
    MemoryIdempotencyStore::builder()
        .max_entries(CAPACITY)
        .build()
}

// ---------------------------------------------------------------------------
// Measurement
// ---------------------------------------------------------------------------

/// Sorted per-call latencies, in nanoseconds.
struct Latencies(Vec<u64>);

impl Latencies {
    fn new(mut v: Vec<u64>) -> Self {
        v.sort_unstable();
        Self(v)
    }

    /// Nearest-rank percentile.
    fn pct(&self, p: f64) -> u64 {
        let n = self.0.len();
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        self.0[rank.clamp(1, n) - 1]
    }

    fn max(&self) -> u64 {
        *self.0.last().expect("samples")
    }
}

/// Calls `op(i)` for `i` in `range`, timing each `.await` alone; appends
/// the latencies to `out`, then hands each answer to `verify` (not timed).
/// Calls of [`STALL`] or more are printed as they happen.
async fn time_calls<F, Fut, T>(
    what: &str,
    range: std::ops::Range<u64>,
    out: &mut Vec<u64>,
    mut op: F,
    mut verify: impl FnMut(u64, T),
) where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = T>,
{
    for (n, i) in range.enumerate() {
        if n % YIELD_EVERY == YIELD_EVERY - 1 {
            tokio::task::yield_now().await;
        }
        let fut = op(i);
        let t0 = Instant::now();
        let r = fut.await;
        let dt = t0.elapsed();
        out.push(u64::try_from(dt.as_nanos()).unwrap_or(u64::MAX));
        if dt >= STALL {
            println!("  stall: {what} call {i} took {dt:?}");
        }
        verify(i, r);
    }
}

/// The cost of the two clock reads around a call that does nothing.
fn clock_pair() -> Latencies {
    let mut v = Vec::with_capacity(1_000_000);
    for _ in 0..1_000_000 {
        let t0 = Instant::now();
        let dt = std::hint::black_box(t0).elapsed();
        v.push(u64::try_from(dt.as_nanos()).unwrap_or(u64::MAX));
    }
    Latencies::new(v)
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Report {
    lines: Vec<String>,
    missed: usize,
}

impl Report {
    fn verdict(&mut self, ok: bool) -> &'static str {
        if ok {
            "met"
        } else {
            self.missed += 1;
            "MISSED"
        }
    }

    fn open_row(&mut self, what: &str, fallback: &Latencies, local: &Latencies) {
        let r99 = fallback.pct(99.0) as f64 / local.pct(99.0) as f64;
        let r50 = fallback.pct(50.0) as f64 / local.pct(50.0) as f64;
        let v = self.verdict(r99 <= OPEN_P99_TARGET);
        self.lines.push(format!(
            "{what:<46} p99 {:>6} / {:>6} ns = {r99:>5.2} (<= {OPEN_P99_TARGET}) {v:<6}  \
             [p50 {} / {} = {r50:.2}; p99.9 {} / {}; max {} / {}]",
            fallback.pct(99.0),
            local.pct(99.0),
            fallback.pct(50.0),
            local.pct(50.0),
            fallback.pct(99.9),
            local.pct(99.9),
            fallback.max(),
            local.max(),
        ));
    }

    fn closed_row(&mut self, what: &str, ab: &Ab) {
        let (f, r) = (ab.fallback.rate(), ab.redis.rate());
        let ratio = f / r;
        let v = self.verdict(ratio >= CLOSED_TARGET);
        let lo = ab.ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ab.ratios.iter().copied().fold(0.0, f64::max);
        let ((rc, rs), (fc, fs)) = (ab.redis.cpu_us_per_op(), ab.fallback.cpu_us_per_op());
        self.lines.push(format!(
            "{what:<46} {f:>9.0} / {r:>9.0} /s = {ratio:>5.3} (>= {CLOSED_TARGET}) {v:<6}  \
             [{} rounds: {lo:.3} .. {hi:.3}; CPU us/op client {fc:.1} / {rc:.1}, \
             server {fs:.1} / {rs:.1}]",
            ab.ratios.len()
        ));
    }
}

// ---------------------------------------------------------------------------
// Open: fallback vs local backend alone
// ---------------------------------------------------------------------------

/// Claims of new keys: `fallback` and `local` alternately, `rounds` pairs
/// of `per_round` calls each. Keys are built before each round.
async fn open_claims(
    tag: &str,
    fallback: &FbStore,
    local: &MemoryIdempotencyStore,
    rounds: u64,
    per_round: u64,
) -> (Latencies, Latencies) {
    let fp = Fingerprint::of(b"payload");
    let cap = usize::try_from(rounds * per_round).unwrap_or(0);
    let (mut fb, mut lo) = (Vec::with_capacity(cap), Vec::with_capacity(cap));
    for round in 0..rounds {
        let base = round * per_round;
        let keys: Vec<String> = (base..base + per_round)
            .map(|i| format!("open-{tag}-{i}"))
            .collect();
        let k = |i: u64| &keys[usize::try_from(i - base).unwrap_or(0)];
        let range = base..base + per_round;
        let acquired = |side: &'static str| {
            move |i: u64, c: reliability::Result<Claim>| {
                assert!(
                    matches!(c, Ok(Claim::Acquired(_))),
                    "{side}, new key {i}: {c:?}"
                );
            }
        };
        time_calls(
            "fallback claim",
            range.clone(),
            &mut fb,
            |i| fallback.claim(k(i), &fp, LEASE),
            acquired("fallback"),
        )
        .await;
        time_calls(
            "memory claim",
            range.clone(),
            &mut lo,
            |i| local.claim(k(i), &fp, LEASE),
            acquired("local"),
        )
        .await;
        // Outside the timing: every claim of a new key must acquire.
        for i in [base, base + per_round - 1] {
            for (side, c) in [
                ("fallback", fallback.claim(k(i), &fp, LEASE).await),
                ("local", local.claim(k(i), &fp, LEASE).await),
            ] {
                assert!(matches!(c, Ok(Claim::InProgress { .. })), "{side}: {c:?}");
            }
        }
    }
    (Latencies::new(fb), Latencies::new(lo))
}

/// Checks on `LIMIT_KEYS` keys: each fallback and `local` alternately.
async fn open_checks(
    fallbacks: &[(&str, &FbLimiter)],
    local: &LocalRateLimiter,
    rounds: u64,
    per_round: u64,
) -> (Vec<Latencies>, Latencies) {
    let keys: Vec<String> = (0..LIMIT_KEYS).map(|i| format!("tenant-{i}")).collect();
    let k = |i: u64| &keys[usize::try_from(i % LIMIT_KEYS).unwrap_or(0)];
    let q = quota();
    let cap = usize::try_from(rounds * per_round).unwrap_or(0);
    let mut fbs: Vec<Vec<u64>> = fallbacks.iter().map(|_| Vec::with_capacity(cap)).collect();
    let mut lo = Vec::with_capacity(cap);
    for round in 0..rounds {
        let range = round * per_round..(round + 1) * per_round;
        let ok = |i: u64, d: reliability::Result<reliability::Decision>| {
            assert!(d.is_ok(), "check {i}: {d:?}");
        };
        for ((what, f), out) in fallbacks.iter().zip(fbs.iter_mut()) {
            time_calls(what, range.clone(), out, |i| f.check(k(i), q, 1), ok).await;
        }
        time_calls(
            "local check",
            range.clone(),
            &mut lo,
            |i| local.check(k(i), q, 1),
            ok,
        )
        .await;
    }
    for (_, f) in fallbacks {
        let d = f.check("tenant-0", q, 1).await;
        assert!(d.is_ok(), "{d:?}");
    }
    (
        fbs.into_iter().map(Latencies::new).collect(),
        Latencies::new(lo),
    )
}

struct OpenSide<'a> {
    store: &'a FbStore,
    limiter: &'a FbLimiter,
    limiter_full: &'a FbLimiter,
    local_store: &'a MemoryIdempotencyStore,
    local_limiter: &'a LocalRateLimiter,
}

async fn open_section(case: &str, s: &OpenSide<'_>, report: &mut Report) {
    let calls = env_or("OPEN_CALLS", 500_000);
    let rounds = env_or("OPEN_ROUNDS", 10).max(1);
    let per_round = (calls / rounds).max(1);
    println!(
        "Open ({case}): breaker {:?}; {} calls per side in {rounds} A/B rounds; load {}",
        s.store.breaker().state(),
        rounds * per_round,
        load()
    );
    let (fb, lo) = open_claims(case, s.store, s.local_store, rounds, per_round).await;
    report.open_row(&format!("Open {case}: claim, fallback vs memory"), &fb, &lo);
    let (fbs, lo) = open_checks(
        &[
            ("fallback check (LocalShare{1})", s.limiter),
            ("fallback check (LocalFull)", s.limiter_full),
        ],
        s.local_limiter,
        rounds,
        per_round,
    )
    .await;
    report.open_row(
        &format!("Open {case}: check (LocalShare{{1}}) vs local"),
        &fbs[0],
        &lo,
    );
    report.open_row(
        &format!("Open {case}: check (LocalFull) vs local"),
        &fbs[1],
        &lo,
    );
    assert!(
        !s.store.breaker().routes_to_primary(),
        "the breaker left Open during the {case} measurement"
    );
    println!("  done; load {}", load());
}

// ---------------------------------------------------------------------------
// Closed: fallback vs Redis alone
// ---------------------------------------------------------------------------

/// One Closed round of claims of new keys (`salt` keeps rounds apart).
async fn claims_round<S: IdempotencyStore>(store: Arc<S>, salt: u64) -> (u64, f64) {
    let fp = Fingerprint::of(b"payload");
    common::closed_loop(TASKS, step(), move |t, i| {
        let s = store.clone();
        async move {
            let c = s.claim(&format!("c{salt}-{t}-{i}"), &fp, LEASE).await;
            assert!(matches!(c, Ok(Claim::Acquired(_))), "{c:?}");
        }
    })
    .await
}

/// One Closed round of checks on `LIMIT_KEYS` keys.
async fn checks_round<L: RateLimiter>(limiter: Arc<L>) -> (u64, f64) {
    let q = quota();
    common::closed_loop(TASKS, step(), move |t, i| {
        let l = limiter.clone();
        async move {
            let key = format!("tenant-{}", (t as u64 * 7919 + i) % LIMIT_KEYS);
            let d = l.check(&key, q, 1).await;
            assert!(d.is_ok(), "{d:?}");
        }
    })
    .await
}

/// CPU seconds (user + system) a process has used so far, from
/// `/proc/<pid>/stat` (`"self"` for this one); 0 where there is no `/proc`.
fn cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces): state is
    // field 3, utime and stime are fields 14 and 15, in clock ticks (100/s).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum::<u64>() as f64 / 100.0
}

/// One side of a Closed comparison, summed over its rounds.
#[derive(Default, Clone, Copy)]
struct Tally {
    ops: u64,
    secs: f64,
    /// CPU seconds of this process (the client).
    client_cpu: f64,
    /// CPU seconds of redis-server.
    server_cpu: f64,
}

impl Tally {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.secs
    }

    fn add(&mut self, o: Tally) {
        self.ops += o.ops;
        self.secs += o.secs;
        self.client_cpu += o.client_cpu;
        self.server_cpu += o.server_cpu;
    }

    /// Client and server CPU microseconds per operation.
    fn cpu_us_per_op(&self) -> (f64, f64) {
        let n = self.ops.max(1) as f64;
        (self.client_cpu * 1e6 / n, self.server_cpu * 1e6 / n)
    }
}

/// Runs one round and tallies its operations, time and CPU.
async fn tally(server_pid: &str, round: impl Future<Output = (u64, f64)>) -> Tally {
    let (c0, s0) = (cpu_seconds("self"), cpu_seconds(server_pid));
    let (ops, secs) = round.await;
    Tally {
        ops,
        secs,
        client_cpu: cpu_seconds("self") - c0,
        server_cpu: cpu_seconds(server_pid) - s0,
    }
}

/// Both sides of a Closed comparison, and the ratio of every pair of rounds.
struct Ab {
    fallback: Tally,
    redis: Tally,
    ratios: Vec<f64>,
}

/// `rounds` pairs of rounds, the order alternating (A B, B A, A B, ...) so
/// a drift within a pair (Redis's key count grows with every claims round)
/// falls on both sides.
async fn ab<R, RF, F, FF>(
    what: &str,
    server_pid: &str,
    rounds: u64,
    mut redis: R,
    mut fallback: F,
) -> Ab
where
    R: FnMut(u64) -> RF,
    RF: Future<Output = (u64, f64)>,
    F: FnMut(u64) -> FF,
    FF: Future<Output = (u64, f64)>,
{
    let mut ab = Ab {
        fallback: Tally::default(),
        redis: Tally::default(),
        ratios: Vec::new(),
    };
    for round in 0..rounds {
        let (r, f) = if round % 2 == 0 {
            let r = tally(server_pid, redis(round)).await;
            (r, tally(server_pid, fallback(round)).await)
        } else {
            let f = tally(server_pid, fallback(round)).await;
            (tally(server_pid, redis(round)).await, f)
        };
        let ((rc, rs), (fc, fs)) = (r.cpu_us_per_op(), f.cpu_us_per_op());
        println!(
            "  {what} round {round}: redis {:.0}/s, fallback {:.0}/s = {:.3}; \
             CPU us/op client {rc:.1} / {fc:.1}, server {rs:.1} / {fs:.1}; load {}",
            r.rate(),
            f.rate(),
            f.rate() / r.rate(),
            load()
        );
        ab.ratios.push(f.rate() / r.rate());
        ab.redis.add(r);
        ab.fallback.add(f);
    }
    ab
}

// ---------------------------------------------------------------------------

/// Waits (on the breaker's channel, with a deadline) for `state`.
async fn wait_state(breaker: &Breaker, state: BreakerState, deadline: Duration) {
    let mut rx = breaker.subscribe();
    tokio::time::timeout(deadline, async {
        while rx.borrow_and_update().state != state {
            rx.changed().await.expect("breaker alive");
        }
    })
    .await
    .unwrap_or_else(|_| panic!("breaker not {state:?} after {deadline:?}"));
}

fn main() {
    // One client thread, like redis_throughput: on a 2-core machine a second
    // worker thread would take the server's core.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let missed = rt.block_on(async { tokio::spawn(run()).await.expect("bench") });
    if missed > 0 {
        println!("\n{missed} target(s) MISSED");
    }
}

async fn run() -> usize {
    let mut server = RedisServer::start();
    let port = server.port();
    let client = RedisClient::connect(
        &server.config(),
        KeySpace::new("bench", "fb").expect("key space"),
    )
    .await
    .expect("connect");
    let mut report = Report::default();
    let clock = clock_pair();
    println!(
        "\nFallback(redis, local) vs each side alone; redis-server on 127.0.0.1:{port}; \
         clock pair p50 {} ns, p99 {} ns; load {}",
        clock.pct(50.0),
        clock.pct(99.0),
        load()
    );

    // The profile's wiring: one client, one breaker, its PING probe.
    let breaker = Arc::new(Breaker::new(BreakerConfig::default(), system_clock()));
    let probe: Arc<dyn Probe> = Arc::new(client.clone());
    let _probe = breaker.spawn_probe(
        probe,
        Duration::from_millis(250),
        Duration::from_millis(250),
    );
    let redis_store = Arc::new(RedisIdempotencyStore::new(client.clone()));
    let redis_limiter = Arc::new(RedisRateLimiter::new(client.clone()));
    let fb_store: Arc<FbStore> = Arc::new(Fallback::new(
        RedisIdempotencyStore::new(client.clone()),
        local_store(),
        breaker.clone(),
    ));
    let fb_limiter: Arc<FbLimiter> = Arc::new(Fallback::new(
        RedisRateLimiter::new(client.clone()),
        LocalRateLimiter::new(),
        breaker.clone(),
    ));
    let fb_limiter_full = Fallback::new(
        RedisRateLimiter::new(client.clone()),
        LocalRateLimiter::new(),
        breaker.clone(),
    )
    .with_rate_limit_policy(RateLimitPolicy::LocalFull);
    let local_store = local_store();
    let local_limiter = LocalRateLimiter::new();

    // Closed.
    let rounds = env_or("CLOSED_ROUNDS", 4).max(1);
    println!(
        "Closed: {TASKS} tasks, {rounds} A/B rounds of {} s per side; load {}",
        step().as_secs(),
        load()
    );
    let pid = server.pid().to_string();
    let claims = ab(
        "claims",
        &pid,
        rounds,
        |round| claims_round(redis_store.clone(), 2 * round),
        |round| claims_round(fb_store.clone(), 2 * round + 1),
    )
    .await;
    report.closed_row("Closed: claims/s, fallback vs redis", &claims);
    let checks = ab(
        "checks",
        &pid,
        rounds,
        |_| checks_round(redis_limiter.clone()),
        |_| checks_round(fb_limiter.clone()),
    )
    .await;
    report.closed_row("Closed: checks/s, fallback vs redis", &checks);
    assert_eq!(
        breaker.state(),
        BreakerState::Closed,
        "the breaker left Closed during the Closed measurement"
    );
    assert_eq!(
        fb_store.get_ref().1.entry_count(),
        0,
        "the secondary answered claims while Closed"
    );

    // Open, isolated by the operator.
    let side = OpenSide {
        store: &fb_store,
        limiter: &fb_limiter,
        limiter_full: &fb_limiter_full,
        local_store: &local_store,
        local_limiter: &local_limiter,
    };
    breaker.isolate();
    open_section("isolated", &side, &mut report).await;

    // Back to Closed through the probe, then redis-server killed: the calls
    // that meet it open the breaker.
    breaker.release();
    wait_state(&breaker, BreakerState::Closed, Duration::from_secs(10)).await;
    server.kill9();
    let deadline = Instant::now() + Duration::from_secs(10);
    while breaker.routes_to_primary() {
        assert!(Instant::now() < deadline, "breaker still closed after 10 s");
        let d = fb_limiter.check("tenant-0", quota(), 1).await;
        assert!(d.is_ok(), "the fallback answers while redis dies: {d:?}");
    }
    println!("redis-server killed; breaker {:?}", breaker.status());
    open_section("killed", &side, &mut report).await;

    println!("\nResults (fallback / alone; load {})\n", load());
    for l in &report.lines {
        println!("{l}");
    }
    report.missed
}
