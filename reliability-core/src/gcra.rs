//! The reference GCRA every rate limiter backend implements.
//!
//! State per key is one theoretical arrival time (TAT) in microseconds. With
//! interval `T`, burst `b`, tolerance `tau = T * (b - 1)` and a request for
//! `n` cells at time `now`:
//!
//! - `n > b`: [`Outcome::Never`], no change;
//! - `n == 0`: a peek, no change;
//! - allowed iff `now >= tat + T*(n-1) - tau`; then `tat' = max(tat, now) + T*n`;
//! - `remaining = min(now + tau + T - tat', tau + T) / T` (floored);
//! - denied: `retry_after = tat + T*(n-1) - tau - now`, no change.
//!
//! These are governor 0.10's semantics; the Redis backend's Lua script is a
//! line-by-line port, and the parity tests hold all three together.

use std::time::Duration;

use crate::rate_limit::{Decision, Outcome, Quota};

/// Decides a request for `cost` cells at `now` (µs) on a key whose stored TAT
/// is `tat` (`None` for a fresh key). Returns the decision and the new TAT to
/// store, or `None` when nothing changes.
pub fn decide(tat: Option<u64>, now: u64, quota: Quota, cost: u32) -> (Decision, Option<u64>) {
    let t = quota.emission_interval_us();
    let burst = quota.burst();
    let tau = t.saturating_mul(u64::from(burst - 1));
    let tat = tat.unwrap_or(now);
    let remaining_at = |tat: u64| -> u32 {
        let avail = now
            .saturating_add(tau)
            .saturating_add(t)
            .saturating_sub(tat);
        let cap = tau.saturating_add(t);
        u32::try_from(avail.min(cap) / t).unwrap_or(u32::MAX)
    };
    let reset_at = |tat: u64| Duration::from_micros(tat.saturating_sub(now));

    if cost > burst {
        return (
            Decision {
                outcome: Outcome::Never,
                limit: burst,
                remaining: remaining_at(tat),
                retry_after: Duration::MAX,
                reset_after: reset_at(tat),
            },
            None,
        );
    }
    if cost == 0 {
        return (
            Decision {
                outcome: Outcome::Allowed,
                limit: burst,
                remaining: remaining_at(tat),
                retry_after: Duration::ZERO,
                reset_after: reset_at(tat),
            },
            None,
        );
    }
    let additional = t.saturating_mul(u64::from(cost - 1));
    let earliest = tat.saturating_add(additional).saturating_sub(tau);
    if now < earliest {
        return (
            Decision {
                outcome: Outcome::Denied,
                limit: burst,
                remaining: remaining_at(tat),
                retry_after: Duration::from_micros(earliest - now),
                reset_after: reset_at(tat),
            },
            None,
        );
    }
    let next = tat.max(now).saturating_add(t).saturating_add(additional);
    (
        Decision {
            outcome: Outcome::Allowed,
            limit: burst,
            remaining: remaining_at(next),
            retry_after: Duration::ZERO,
            reset_after: reset_at(next),
        },
        Some(next),
    )
}

/// `true` when a stored TAT carries no information any more at `now` (the
/// full burst is available): the key may be forgotten without changing any
/// future decision.
pub fn is_idle(tat: u64, now: u64) -> bool {
    tat <= now
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_deny_then_recover() {
        let q = Quota::from_micros(1_000, 3).unwrap();
        let mut tat = None;
        let now = 1_000_000;
        for expected_remaining in [2, 1, 0] {
            let (d, next) = decide(tat, now, q, 1);
            assert_eq!(d.outcome, Outcome::Allowed);
            assert_eq!(d.remaining, expected_remaining);
            tat = next;
        }
        let (d, next) = decide(tat, now, q, 1);
        assert_eq!(d.outcome, Outcome::Denied);
        assert_eq!(d.retry_after, Duration::from_micros(1_000));
        assert_eq!(next, None);
        let (d, _) = decide(tat, now + 1_000, q, 1);
        assert_eq!(d.outcome, Outcome::Allowed);
        let (d, _) = decide(tat, now, q, 4);
        assert_eq!(d.outcome, Outcome::Never);
        let (d, n) = decide(tat, now, q, 0);
        assert_eq!((d.outcome, d.remaining, n), (Outcome::Allowed, 0, None));
        assert_eq!(d.reset_after, Duration::from_micros(3_000));
    }
}
