//! The short CI version of the `chaos` example (same scenario module): the
//! `redis-enabled` profile under mixed load while Redis is killed (-9) and
//! restarted, then stopped (SIGSTOP) and resumed.
//!
//! Done when: kill -9 under load gives callers no unavailable error; the
//! status is Degraded within 1 s of the kill and Healthy within 1 s of the
//! restart; under SIGSTOP no call exceeds the deadline + 50 ms; every
//! enqueued spool id is delivered (0 lost; duplicates counted and printed);
//! a key claimed during an outage is not acquired again after failback
//! within its TTL.
#![cfg(all(feature = "redis", feature = "disk"))]

#[path = "../examples/chaos/scenario.rs"]
mod scenario;

use std::time::Duration;

use scenario::{Phase, Settings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_restart_stop_resume_under_load() {
    let settings = Settings {
        tasks: 4,
        phase: Duration::from_secs(2),
        drain_timeout: Duration::from_secs(10),
        sink_failure_rate: 0.02,
        outage_keys: 10,
        ..Settings::default()
    };
    let report = scenario::run(&settings).await.expect("scenario runs");
    // Printed on failure, or with --nocapture.
    eprintln!("{report}");

    let kill = report.kill.as_ref().expect("kill -9 injected");
    let stop = report.stop.as_ref().expect("SIGSTOP injected");
    let killed = report.phase(Phase::Killed);
    assert!(killed.calls > 0, "load while Redis was dead\n{report}");
    assert_eq!(
        report.all.unavailable, 0,
        "unavailable errors reached callers\n{report}"
    );

    let second = Duration::from_secs(1);
    assert!(
        kill.to_degraded.is_some_and(|d| d <= second),
        "kill -9: degraded after {:?}\n{report}",
        kill.to_degraded
    );
    assert!(
        kill.to_recovered.is_some_and(|d| d <= second),
        "restart: healthy after {:?}\n{report}",
        kill.to_recovered
    );

    let stopped = report.phase(Phase::Stopped);
    assert!(stopped.calls > 0, "load while Redis was stopped\n{report}");
    let bound = report.deadline + Duration::from_millis(50);
    // Every call in flight while Redis was stopped, whichever phase it
    // started in (the calls hit by the signal often started just before).
    assert!(
        stop.worst_call <= bound,
        "SIGSTOP: a call ({}) took {:?}, over the deadline + 50 ms ({bound:?})\n{report}",
        stop.worst_call_op,
        stop.worst_call
    );
    assert!(stopped.worst <= stop.worst_call, "{report}");

    assert!(report.enqueued > 0, "records enqueued\n{report}");
    assert_eq!(
        report.lost, 0,
        "enqueued ids never delivered: {:?}\n{report}",
        report.lost_sample
    );
    assert_eq!(report.delivered, report.enqueued, "{report}");
    eprintln!(
        "duplicates: {} extra deliveries of {} ids",
        report.duplicates, report.duplicate_ids
    );

    for f in [kill, stop] {
        assert!(
            f.to_failback.is_some(),
            "{}: failback never finished (claims left to replay or records to drain)\n{report}",
            f.name
        );
        assert_eq!(
            f.outage_claimed, settings.outage_keys,
            "{}: outage claims acquired locally\n{report}",
            f.name
        );
        assert_eq!(
            f.reacquired_after_failback, 0,
            "{}: keys claimed during the outage acquired again after failback\n{report}",
            f.name
        );
    }
    assert!(report.violations().is_empty(), "{report}");
}
