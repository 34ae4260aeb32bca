//! Chaos run of the `redis-enabled` profile: mixed load while Redis is
//! killed (-9) and restarted, then stopped (SIGSTOP) and resumed, with a
//! report of what callers and the delivery worker saw (downtime,
//! recovery time, records lost or duplicated, retries and backoff).
//!
//! It starts its own `redis-server` (Debian's package; `scripts/test.sh`
//! installs it) with a password and AOF `appendfsync always`, builds
//! `Fallback(redis, local)` for every primitive with the spool's local side
//! on disk in a temporary directory, and drives claims, rate-limit checks and
//! enqueues from several tasks while a delivery worker (fast retry schedule:
//! 20 ms .. 800 ms) delivers to an in-process sink that fails a share of
//! deliveries on purpose.
//!
//! ```sh
//! cargo run --release --features redis,disk --example chaos
//! cargo run --release --features redis,disk --example chaos -- --seconds-per-phase 10 --tasks 16
//! cargo run --release --features redis,disk --example chaos -- --help
//! ```
//!
//! Then it runs the network and memory phases (`network.rs`), each on a
//! server of its own that stays up: a black-holed connection (a loopback
//! fault proxy passes nothing and closes nothing), 80 ms of latency each
//! way, and `maxmemory` reached under `noeviction`; each prints its report.
//!
//! With `--redis-url URL` it uses a server it did not start: it cannot kill
//! or restart that one, so the fault steps are skipped (the phases run as a
//! plain soak, and the report says so; the network phases are skipped). The
//! exit code is 1 when a done-when criterion of a report is violated.

// A command-line program: printing the report is its job.
#![allow(clippy::print_stdout)]

mod network;
mod scenario;

use std::process::ExitCode;
use std::time::Duration;

use scenario::Settings;

const HELP: &str = "\
chaos: mixed load on the redis-enabled profile while Redis is killed, restarted, stopped and resumed

options (defaults in brackets):
  --seconds-per-phase F  length of each phase: warm-up, killed, restarted, stopped, resumed [5]
  --tasks N              producer tasks [8]
  --pause-ms N           pause of a producer between two calls [2]
  --drain-seconds N      bound on the final wait for every enqueued id to be delivered [30]
  --sink-failure-rate F  share of deliveries the sink fails transiently, to show retries [0.05]
  --outage-keys N        keys claimed during each outage and checked after failback [20]
  --repeated-keys N      distinct keys the producers claim again and again [16]
  --network-seconds F    length of each network / memory fault: black hole, 80 ms latency,
                         maxmemory; 0 skips them [2]
  --redis-url URL        use this server instead of starting one: no fault can be injected,
                         so the fault steps are skipped (soak only)
  --help                 this text";

fn parse_args() -> Result<(Settings, Duration), String> {
    let mut s = Settings::default();
    let mut network = Duration::from_secs(2);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            return Err(String::new());
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--seconds-per-phase" => {
                let secs: f64 = value.parse().map_err(|e| bad(&e))?;
                s.phase = Duration::try_from_secs_f64(secs).map_err(|e| bad(&e))?;
            }
            "--tasks" => s.tasks = value.parse().map_err(|e| bad(&e))?,
            "--pause-ms" => {
                s.pause = Duration::from_millis(value.parse().map_err(|e| bad(&e))?);
            }
            "--drain-seconds" => {
                s.drain_timeout = Duration::from_secs(value.parse().map_err(|e| bad(&e))?);
            }
            "--sink-failure-rate" => {
                s.sink_failure_rate = value.parse().map_err(|e| bad(&e))?;
            }
            "--outage-keys" => s.outage_keys = value.parse().map_err(|e| bad(&e))?,
            "--repeated-keys" => s.repeated_keys = value.parse().map_err(|e| bad(&e))?,
            "--network-seconds" => {
                let secs: f64 = value.parse().map_err(|e| bad(&e))?;
                network = Duration::try_from_secs_f64(secs).map_err(|e| bad(&e))?;
            }
            "--redis-url" => s.redis_url = Some(value),
            other => return Err(format!("unknown option {other}")),
        }
    }
    if s.tasks == 0 {
        return Err("--tasks must be at least 1".into());
    }
    if !(0.0..0.5).contains(&s.sink_failure_rate) {
        return Err("--sink-failure-rate must be in [0, 0.5)".into());
    }
    Ok((s, network))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> ExitCode {
    let (settings, network) = match parse_args() {
        Ok(s) => s,
        Err(msg) if msg.is_empty() => {
            println!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("error: {msg}\n\n{HELP}");
            return ExitCode::from(2);
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    if settings.redis_url.is_some() {
        println!(
            "--redis-url: this server was not started here and cannot be killed or stopped; \
             the fault steps are skipped\n"
        );
    }
    let mut violated = match scenario::run(&settings).await {
        Ok(report) => {
            println!("{report}");
            !report.violations().is_empty()
        }
        Err(e) => {
            eprintln!("chaos: {e}");
            return ExitCode::from(2);
        }
    };
    if settings.redis_url.is_none() && !network.is_zero() {
        println!("network and memory faults (a server of its own each)\n");
        for fault in network::NetFault::ALL {
            match network::run(fault, settings.tasks, network).await {
                Ok(report) => {
                    println!("{report}");
                    for v in report.violations() {
                        println!("  VIOLATED: {v}");
                        violated = true;
                    }
                }
                Err(e) => {
                    eprintln!("chaos: {}: {e}", fault.name());
                    return ExitCode::from(2);
                }
            }
        }
    }
    if violated {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
