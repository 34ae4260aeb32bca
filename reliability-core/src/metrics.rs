//! Metrics through the [`metrics`](https://docs.rs/metrics) facade crate
//! (feature `metrics`; without it every function here is a no-op the
//! compiler removes). Install any recorder (Prometheus, StatsD, ...) in the
//! host; nothing is recorded until one is installed.
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `reliability_calls_total` | counter | `side` (`primary`, `secondary`), `outcome` (`ok`, `error`, `unavailable`, `timeout`) | calls a [`Fallback`](crate::fallback::Fallback) routed, by the side that answered and how |
//! | `reliability_fallbacks_total` | counter | `reason` (`open`, `unavailable`, `timeout`) | calls answered by the secondary, by why |
//! | `reliability_breaker_state` | gauge | | 0 closed, 1 half-open, 2 open, 3 isolated |
//! | `reliability_breaker_transitions_total` | counter | `from`, `to` | breaker transitions |
//! | `reliability_probe_duration_seconds` | histogram | `outcome` (`ok`, `error`, `timeout`) | background probe latency |
//! | `reliability_reconcile_pending` | gauge | | local claims not yet replayed to the primary |
//! | `reliability_reconcile_replayed_total` | counter | | claims replayed to the primary |
//! | `reliability_reconcile_conflicts_total` | counter | | replayed claims the primary already held |
//! | `reliability_primary_data_loss_total` | counter | `cause` (`restarted`, `failover`) | times the primary was found to have lost data (its identity changed) |
//! | `reliability_fallback_double_enqueue_total` | counter | | records whose primary enqueue timed out (it may have stored them) and that the secondary took too; one copy is delivered |
//! | `reliability_drain_moved_total` | counter | | spool records moved from the secondary to the primary |
//! | `reliability_spool_depth` | gauge | `state` (`ready`, `delayed`, `leased`, `dead`) | spool records, when the host reads [`Spool::stats`](crate::Spool::stats) through [`record_spool_stats`] |

use std::time::Duration;

use crate::spool::SpoolStats;
use crate::status::BreakerState;

/// `reliability_calls_total{side, outcome}` + 1.
#[inline]
pub(crate) fn call(side: &'static str, outcome: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!("reliability_calls_total", "side" => side, "outcome" => outcome).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (side, outcome);
}

/// `reliability_fallbacks_total{reason}` + 1.
#[inline]
pub(crate) fn fallback(reason: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!("reliability_fallbacks_total", "reason" => reason).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = reason;
}

/// The outcome label of a result: `ok`, `unavailable` or `error`.
#[inline]
pub(crate) fn outcome<T>(r: &crate::Result<T>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(e) if e.is_unavailable() => "unavailable",
        Err(_) => "error",
    }
}

/// A breaker transition: the state gauge and the transitions counter.
pub(crate) fn transition(from: BreakerState, to: BreakerState) {
    #[cfg(feature = "metrics")]
    {
        metrics::gauge!("reliability_breaker_state").set(state_value(to));
        metrics::counter!(
            "reliability_breaker_transitions_total",
            "from" => state_label(from),
            "to" => state_label(to)
        )
        .increment(1);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (from, to);
}

/// One probe's latency and outcome.
pub(crate) fn probe(took: Duration, outcome: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::histogram!("reliability_probe_duration_seconds", "outcome" => outcome)
        .record(took.as_secs_f64());
    #[cfg(not(feature = "metrics"))]
    let _ = (took, outcome);
}

/// One reconciliation pass: what it replayed and found, and the backlog.
pub(crate) fn reconcile(replayed: u64, conflicts: u64, pending: u64) {
    #[cfg(feature = "metrics")]
    {
        metrics::counter!("reliability_reconcile_replayed_total").increment(replayed);
        metrics::counter!("reliability_reconcile_conflicts_total").increment(conflicts);
        metrics::gauge!("reliability_reconcile_pending").set(pending as f64);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (replayed, conflicts, pending);
}

/// Sets `reliability_reconcile_pending` (a no-op without feature
/// `metrics`). The facade calls it every second.
pub fn record_reconcile_pending(pending: u64) {
    #[cfg(feature = "metrics")]
    metrics::gauge!("reliability_reconcile_pending").set(pending as f64);
    #[cfg(not(feature = "metrics"))]
    let _ = pending;
}

/// The primary was found to have lost data.
pub(crate) fn primary_data_loss(cause: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!("reliability_primary_data_loss_total", "cause" => cause).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = cause;
}

/// Records a timed-out primary enqueue may have stored, that the
/// secondary took too.
pub(crate) fn double_enqueue(records: u64) {
    #[cfg(feature = "metrics")]
    metrics::counter!("reliability_fallback_double_enqueue_total").increment(records);
    #[cfg(not(feature = "metrics"))]
    let _ = records;
}

/// Records moved back to the primary by a drain.
pub(crate) fn drained(moved: u64) {
    #[cfg(feature = "metrics")]
    metrics::counter!("reliability_drain_moved_total").increment(moved);
    #[cfg(not(feature = "metrics"))]
    let _ = moved;
}

/// Sets `reliability_spool_depth{state}` from `stats` (a no-op without
/// feature `metrics`). The facade calls it from `refresh_status`.
pub fn record_spool_stats(stats: &SpoolStats) {
    #[cfg(feature = "metrics")]
    for (state, n) in [
        ("ready", stats.ready),
        ("delayed", stats.delayed),
        ("leased", stats.leased),
        ("dead", stats.dead),
    ] {
        metrics::gauge!("reliability_spool_depth", "state" => state).set(n as f64);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = stats;
}

#[cfg(feature = "metrics")]
fn state_value(s: BreakerState) -> f64 {
    match s {
        BreakerState::Closed => 0.0,
        BreakerState::HalfOpen => 1.0,
        BreakerState::Open => 2.0,
        BreakerState::Isolated => 3.0,
    }
}

#[cfg(feature = "metrics")]
fn state_label(s: BreakerState) -> &'static str {
    match s {
        BreakerState::Closed => "closed",
        BreakerState::HalfOpen => "half_open",
        BreakerState::Open => "open",
        BreakerState::Isolated => "isolated",
    }
}
