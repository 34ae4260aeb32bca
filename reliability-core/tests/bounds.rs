//! Durations have upper bounds and the pairs that must agree are checked:
//! a worker whose delivery outlives its lease would deliver a record twice,
//! and a huge interval overflows the deadline computed from it.

use std::time::Duration;

use reliability_core::{Error, WorkerConfig};

fn refused(cfg: &WorkerConfig) -> Option<&'static str> {
    match cfg.validate() {
        Err(Error::InvalidArgument { name, .. }) => Some(name),
        _ => None,
    }
}

#[test]
fn a_delivery_timeout_above_the_lease_ttl_is_refused() {
    let cfg = WorkerConfig::default()
        .with_lease_ttl(Duration::from_secs(10))
        .with_delivery_timeout(Duration::from_secs(60));
    assert_eq!(refused(&cfg), Some("delivery_timeout"), "{cfg:?}");
    let ok = cfg.clone().with_delivery_timeout(Duration::from_secs(10));
    assert_eq!(ok.validate().ok(), Some(()));
}

#[test]
fn huge_worker_durations_are_refused() {
    let huge = Duration::from_secs(u64::MAX / 2);
    for (cfg, name) in [
        (
            WorkerConfig::default().with_stats_interval(huge),
            "stats_interval",
        ),
        (
            WorkerConfig::default().with_poll_interval(huge),
            "poll_interval",
        ),
        (
            WorkerConfig::default()
                .with_lease_ttl(huge)
                .with_delivery_timeout(huge),
            "lease_ttl",
        ),
    ] {
        assert_eq!(refused(&cfg), Some(name), "{cfg:?}");
    }
}
