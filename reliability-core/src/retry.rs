//! The retry schedule of the delivery worker.
//!
//! The default schedule waits 1 min, 5 min, 15 min, 1 h, 4 h and
//! 24 h between tries, each with up to ±10 % jitter, so a record whose
//! delivery always fails is tried 7 times (at about 0, 1m, 6m, 21m, 1h21m,
//! 5h21m and 29h21m) and then dead-lettered.
//!
//! ```
//! use reliability_core::RetryPolicy;
//! use std::time::Duration;
//!
//! let p = RetryPolicy::default();
//! let d = p.delay_after(1).unwrap();
//! assert!(d >= Duration::from_secs(54) && d <= Duration::from_secs(66));
//! assert!(p.delay_after(7).is_none()); // the 7th failure dead-letters
//! ```

use std::time::Duration;

use crate::error::{Error, Result};

/// A fixed schedule of delays with bounded, symmetric jitter.
///
/// Deserialized through the same checks as [`new`](Self::new): an invalid
/// policy is an error naming the field, never a value.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", try_from = "RetryFields")]
pub struct RetryPolicy {
    schedule: Vec<Duration>,
    jitter: f64,
}

/// The serialized fields of a [`RetryPolicy`], checked on the way in.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RetryFields {
    schedule: Vec<Duration>,
    jitter: f64,
}

impl TryFrom<RetryFields> for RetryPolicy {
    type Error = String;

    fn try_from(f: RetryFields) -> std::result::Result<Self, String> {
        RetryPolicy::new(f.schedule, f.jitter).map_err(|e| match e {
            Error::InvalidArgument { name, reason } => format!("{name}: {reason}"),
            other => other.to_string(),
        })
    }
}

/// The longest step of a schedule: 36,500 days (100 years), so a delay
/// with its jitter always fits a deadline.
pub const MAX_STEP: Duration = Duration::from_secs(36_500 * 86_400);

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            schedule: DEFAULT_SCHEDULE.to_vec(),
            jitter: DEFAULT_JITTER,
        }
    }
}

/// 1m, 5m, 15m, 1h, 4h, 24h.
pub const DEFAULT_SCHEDULE: [Duration; 6] = [
    Duration::from_secs(60),
    Duration::from_secs(5 * 60),
    Duration::from_secs(15 * 60),
    Duration::from_secs(3600),
    Duration::from_secs(4 * 3600),
    Duration::from_secs(24 * 3600),
];

/// ±10 %.
pub const DEFAULT_JITTER: f64 = 0.1;

impl RetryPolicy {
    /// A policy with `schedule` (steps greater than zero, at most
    /// [`MAX_STEP`]) and a jitter fraction in `[0, 1)`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if the jitter is out of range (or not a
    /// number) or a step is zero or above [`MAX_STEP`].
    pub fn new(schedule: Vec<Duration>, jitter: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&jitter) {
            return Err(Error::invalid_argument(
                "jitter",
                format!("{jitter} is outside [0, 1)"),
            ));
        }
        if let Some(i) = schedule.iter().position(Duration::is_zero) {
            return Err(Error::invalid_argument(
                "schedule",
                format!("step {i} must be greater than zero"),
            ));
        }
        if let Some(i) = schedule.iter().position(|d| *d > MAX_STEP) {
            return Err(Error::invalid_argument(
                "schedule",
                format!("step {i} is longer than 36500d"),
            ));
        }
        Ok(Self { schedule, jitter })
    }

    /// The schedule without jitter.
    pub fn schedule(&self) -> &[Duration] {
        &self.schedule
    }

    /// The jitter fraction.
    pub fn jitter(&self) -> f64 {
        self.jitter
    }

    /// Tries a record gets at most: the schedule's length plus one.
    pub fn max_attempts(&self) -> u32 {
        u32::try_from(self.schedule.len())
            .unwrap_or(u32::MAX)
            .saturating_add(1)
    }

    /// The delay before the next try after `failed_attempts` failures, or
    /// `None` when the schedule is exhausted and the record is dead.
    pub fn delay_after(&self, failed_attempts: u32) -> Option<Duration> {
        let step = usize::try_from(failed_attempts.checked_sub(1)?).ok()?;
        let base = *self.schedule.get(step)?;
        if self.jitter == 0.0 {
            return Some(base);
        }
        let factor = 1.0 + self.jitter * (fastrand::f64() * 2.0 - 1.0);
        Some(base.mul_f64(factor))
    }

    /// Bounds of [`delay_after`](Self::delay_after): `(min, max)`.
    pub fn bounds_after(&self, failed_attempts: u32) -> Option<(Duration, Duration)> {
        let step = usize::try_from(failed_attempts.checked_sub(1)?).ok()?;
        let base = *self.schedule.get(step)?;
        Some((
            base.mul_f64(1.0 - self.jitter),
            base.mul_f64(1.0 + self.jitter),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_bounds() {
        let p = RetryPolicy::default();
        for attempt in 1..=6 {
            let (lo, hi) = p.bounds_after(attempt).unwrap();
            for _ in 0..1000 {
                let d = p.delay_after(attempt).unwrap();
                assert!(d >= lo && d <= hi);
            }
        }
        assert_eq!(p.delay_after(0), None);
        assert_eq!(p.max_attempts(), 7);
        assert!(RetryPolicy::new(vec![Duration::ZERO], 0.1).is_err());
        assert!(RetryPolicy::new(vec![], 1.5).is_err());
    }
}
