//! Synthetic webhook traffic through the baseline profile:
//! dedup -> rate limit -> spool -> delivery worker with retries.
//!
//! Events arrive from several senders in bursts; some are re-sent
//! (duplicates), a few re-use an id with another payload (conflicts). Each
//! tenant is rate limited. Accepted events go to the spool, and a delivery
//! worker hands them to a flaky downstream that fails transiently (retried on
//! a fast schedule) or permanently (dead-lettered). At the end it prints a
//! summary table, checks that nothing was lost, and prints the health status
//! as YAML. No external service is needed.
//!
//! ```sh
//! cargo run --release --example evaluate
//! cargo run --release --example evaluate -- --events 200000 --failure-rate 0.5
//! cargo run --release --example evaluate -- --help
//! ```

// A command-line program: printing the report is its job.
#![allow(clippy::print_stdout)]

use std::collections::{BTreeMap, HashSet};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reliability::config::from_yaml_str;
use reliability::worker::DeliveryError;
use reliability::{
    Claim, DeliveryWorker, Error, Fingerprint, NewRecord, Quota, RecordId, Reliability,
    WorkerConfig,
};

#[derive(Debug, Clone)]
struct Args {
    events: usize,
    tenants: usize,
    senders: usize,
    duplicate_rate: f64,
    conflict_rate: f64,
    rate: u32,
    burst: u32,
    failure_rate: f64,
    permanent_rate: f64,
    max_seconds: u64,
    spool: String,
    config: Option<String>,
    seed: u64,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            events: 50_000,
            tenants: 20,
            senders: 8,
            duplicate_rate: 0.15,
            conflict_rate: 0.02,
            rate: 5_000,
            burst: 200,
            failure_rate: 0.3,
            permanent_rate: 0.005,
            max_seconds: 25,
            spool: "memory".into(),
            config: None,
            seed: 7,
        }
    }
}

const HELP: &str = "\
evaluate: synthetic webhook traffic through dedup -> rate limit -> spool -> delivery

options (defaults in brackets):
  --events N          events to send [50000]
  --tenants N         tenants, each rate limited on its own [20]
  --senders N         concurrent senders [8]
  --duplicate-rate F  share of events re-sent with the same id [0.15]
  --conflict-rate F   share of re-sent events whose payload differs [0.02]
  --rate N            per-tenant rate, events per second [5000]
  --burst N           per-tenant burst [200]
  --failure-rate F    chance a delivery fails transiently [0.3]
  --permanent-rate F  chance a delivery fails permanently [0.005]
  --max-seconds N     give up waiting for delivery after N seconds [25]
  --spool KIND        memory, or disk (durable, fsync per batch, in a temp dir; feature `disk`) [memory]
  --config PATH       a reliability YAML file instead of the built-in baseline
  --seed N            random seed [7]";

fn parse_args() -> Result<Args, String> {
    let mut a = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            return Err(String::new());
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--events" => a.events = value.parse().map_err(|e| bad(&e))?,
            "--tenants" => a.tenants = value.parse().map_err(|e| bad(&e))?,
            "--senders" => a.senders = value.parse().map_err(|e| bad(&e))?,
            "--duplicate-rate" => a.duplicate_rate = value.parse().map_err(|e| bad(&e))?,
            "--conflict-rate" => a.conflict_rate = value.parse().map_err(|e| bad(&e))?,
            "--rate" => a.rate = value.parse().map_err(|e| bad(&e))?,
            "--burst" => a.burst = value.parse().map_err(|e| bad(&e))?,
            "--failure-rate" => a.failure_rate = value.parse().map_err(|e| bad(&e))?,
            "--permanent-rate" => a.permanent_rate = value.parse().map_err(|e| bad(&e))?,
            "--max-seconds" => a.max_seconds = value.parse().map_err(|e| bad(&e))?,
            "--spool" => a.spool = value,
            "--config" => a.config = Some(value),
            "--seed" => a.seed = value.parse().map_err(|e| bad(&e))?,
            other => return Err(format!("unknown option {other}")),
        }
    }
    if a.tenants == 0 || a.senders == 0 {
        return Err("--tenants and --senders must be at least 1".into());
    }
    Ok(a)
}

/// The built-in configuration: the baseline profile with the chosen spool
/// and a retry schedule in milliseconds instead of minutes, so a run shows
/// retries and dead letters within seconds.
const BASELINE: &str = "
reliability:
  profile: baseline
  idempotencyStore: memory
  rateLimiter: local
  keyPrefix: evaluate
  spoolLimits: { maxRecords: 1000000, retention: 7d, alertDepth: 100 }
  retry: { schedule: [10ms, 20ms, 40ms, 80ms, 160ms, 320ms], jitter: 0.1 }
";

struct Event {
    id: String,
    tenant: usize,
    payload: String,
}

/// Original events and re-sends, in arrival order (re-sends come after
/// their original, a little later).
fn traffic(a: &Args) -> Vec<Event> {
    let mut rng = fastrand::Rng::with_seed(a.seed);
    let mut events: Vec<Event> = Vec::with_capacity(a.events);
    let mut n = 0u64;
    while events.len() < a.events {
        // A burst from one tenant.
        let tenant = rng.usize(0..a.tenants);
        for _ in 0..rng.usize(1..=64) {
            if events.len() >= a.events {
                break;
            }
            if !events.is_empty() && rng.f64() < a.duplicate_rate {
                let from = events.len().saturating_sub(2_000);
                let orig = &events[rng.usize(from..events.len())];
                let payload = if rng.f64() < a.conflict_rate {
                    format!("{} (edited)", orig.payload)
                } else {
                    orig.payload.clone()
                };
                events.push(Event {
                    id: orig.id.clone(),
                    tenant: orig.tenant,
                    payload,
                });
            } else {
                n += 1;
                events.push(Event {
                    id: format!("evt-{n:09}"),
                    tenant,
                    payload: format!(r#"{{"tenant":{tenant},"n":{n},"kind":"push"}}"#),
                });
            }
        }
    }
    events
}

#[derive(Default)]
struct Ingest {
    received: AtomicU64,
    duplicates: AtomicU64,
    conflicts: AtomicU64,
    rate_limited: AtomicU64,
    spool_full: AtomicU64,
    enqueued: AtomicU64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) if msg.is_empty() => {
            println!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("error: {msg}\n\n{HELP}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<bool, Box<dyn std::error::Error>> {
    // Lives until the end of the run: the disk spool's directory.
    let dir = tempfile::tempdir()?;
    let yaml = match (&args.config, args.spool.as_str()) {
        (Some(path), _) => std::fs::read_to_string(path)?,
        (None, "memory") => format!("{BASELINE}  spool: memory\n"),
        (None, "disk") => format!(
            "{BASELINE}  spool: disk\n  disk: {{ dir: {:?}, fsync: always }}\n",
            dir.path().join("spool")
        ),
        (None, other) => return Err(format!("--spool {other}: memory or disk").into()),
    };
    let cfg = from_yaml_str(&yaml)?;
    let r = Reliability::from_config(&cfg).await?;
    let spool = r
        .spool()
        .cloned()
        .ok_or("the configuration has `spool: none`; evaluate needs a spool")?;
    let quota = Quota::per_second(args.rate)?.with_burst(args.burst)?;

    // The flaky downstream, and what it saw.
    let delivered_ids = Arc::new(Mutex::new(HashSet::new()));
    let redeliveries = Arc::new(AtomicU64::new(0));
    let worker = {
        let (seen, again) = (delivered_ids.clone(), redeliveries.clone());
        let (fail, permanent) = (args.failure_rate, args.permanent_rate);
        let config = WorkerConfig::default()
            .with_retry(cfg.retry_policy()?)
            .with_batch_size(256)
            .with_max_concurrency(64)
            .with_poll_interval(Duration::from_millis(5))
            .with_lease_ttl(Duration::from_secs(30));
        DeliveryWorker::new(spool.clone(), config, move |record| {
            let (seen, again) = (seen.clone(), again.clone());
            async move {
                tokio::time::sleep(Duration::from_micros(fastrand::u64(0..500))).await;
                let roll = fastrand::f64();
                if roll < permanent {
                    return Err(DeliveryError::permanent("HTTP 410 Gone"));
                }
                if roll < permanent + fail {
                    return Err(DeliveryError::transient("HTTP 503"));
                }
                if !seen.lock().expect("lock").insert(record.id.to_string()) {
                    again.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
        })?
        .spawn()
    };

    // Senders: dedup -> rate limit -> spool.
    let events = Arc::new(traffic(&args));
    let next = Arc::new(AtomicUsize::new(0));
    let ingest = Arc::new(Ingest::default());
    let started = Instant::now();
    let mut senders = Vec::new();
    for _ in 0..args.senders {
        let (r, events, next, ingest) = (r.clone(), events.clone(), next.clone(), ingest.clone());
        senders.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(ev) = events.get(i) else { break };
                handle(&r, ev, quota, &ingest).await?;
            }
            Ok::<_, Error>(())
        }));
    }
    for s in senders {
        s.await??;
    }
    let ingest_time = started.elapsed();

    // Wait until the spool is drained or the time is up.
    let deadline = started + Duration::from_secs(args.max_seconds);
    loop {
        let stats = spool.stats().await?;
        if stats.depth() == 0 || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let counts = worker.shutdown().await;
    let elapsed = started.elapsed();
    r.refresh_status().await?;

    let stats = spool.stats().await?;
    let mut dead_by_reason: BTreeMap<&'static str, u64> = BTreeMap::new();
    for d in spool.list_dead(usize::MAX).await? {
        *dead_by_reason.entry(d.reason.code()).or_default() += 1;
    }
    let delivered = delivered_ids.lock().expect("lock").len() as u64;
    let enqueued = ingest.enqueued.load(Ordering::Relaxed);
    let lost = enqueued.saturating_sub(delivered + stats.dead + stats.depth());

    let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let rows: Vec<(&str, String)> = vec![
        ("received", g(&ingest.received).to_string()),
        ("duplicates dropped", g(&ingest.duplicates).to_string()),
        (
            "payload conflicts (same id, other payload)",
            g(&ingest.conflicts).to_string(),
        ),
        ("rate limited (429)", g(&ingest.rate_limited).to_string()),
        ("spool full (503)", g(&ingest.spool_full).to_string()),
        ("enqueued", enqueued.to_string()),
        ("delivered (unique ids)", delivered.to_string()),
        (
            "delivered again (at-least-once)",
            g(&redeliveries).to_string(),
        ),
        (
            "retried (transient failures rescheduled)",
            counts.retried.to_string(),
        ),
        ("dead-lettered", stats.dead.to_string()),
        (
            "  by reason",
            if dead_by_reason.is_empty() {
                "-".into()
            } else {
                dead_by_reason
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        ),
        ("left in spool", stats.depth().to_string()),
        ("lost", lost.to_string()),
        (
            "ingest throughput",
            format!(
                "{:.0} events/s",
                g(&ingest.received) as f64 / ingest_time.as_secs_f64()
            ),
        ),
        (
            "delivery throughput",
            format!("{:.0} records/s", delivered as f64 / elapsed.as_secs_f64()),
        ),
        ("elapsed", format!("{:.2} s", elapsed.as_secs_f64())),
    ];
    println!(
        "\nevaluate: {} events, {} tenants, {} senders, spool {}, seed {}\n",
        args.events, args.tenants, args.senders, args.spool, args.seed
    );
    for (k, v) in &rows {
        println!("  {k:<44} {v:>16}");
    }
    let status = r.status().current();
    println!("\n{}", serde_norway::to_string(&status.document())?);
    if lost > 0 {
        eprintln!("error: {lost} enqueued records were neither delivered, dead-lettered nor left in the spool");
    }
    Ok(lost == 0)
}

async fn handle(r: &Reliability, ev: &Event, quota: Quota, ingest: &Ingest) -> Result<(), Error> {
    ingest.received.fetch_add(1, Ordering::Relaxed);
    let claim = r
        .idempotency()
        .claim(
            &ev.id,
            &Fingerprint::of(&ev.payload),
            Duration::from_secs(30),
        )
        .await?;
    let lease = match claim {
        Claim::Acquired(lease) => lease,
        Claim::InProgress { .. } | Claim::Completed(_) => {
            ingest.duplicates.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        Claim::Mismatch => {
            ingest.conflicts.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
    };
    let decision = r
        .rate_limiter()
        .check(&format!("tenant-{}", ev.tenant), quota, 1)
        .await?;
    if !decision.is_allowed() {
        // 429: give the claim back so the sender's retry is accepted.
        ingest.rate_limited.fetch_add(1, Ordering::Relaxed);
        return r.idempotency().release(&lease).await;
    }
    let spool = r.spool().expect("checked at start");
    let record = NewRecord::new(
        RecordId::new(ev.id.clone())?,
        ev.payload.clone().into_bytes(),
    );
    match spool.enqueue(vec![record]).await {
        Ok(_) => {
            ingest.enqueued.fetch_add(1, Ordering::Relaxed);
            r.idempotency()
                .complete(
                    &lease,
                    Some("202 Accepted".into()),
                    Duration::from_secs(86_400),
                )
                .await
        }
        Err(Error::Full { .. }) => {
            ingest.spool_full.fetch_add(1, Ordering::Relaxed);
            r.idempotency().release(&lease).await
        }
        Err(e) => Err(e),
    }
}
