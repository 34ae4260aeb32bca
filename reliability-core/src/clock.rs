//! Time for the memory and disk backends, injectable so tests run days of
//! schedule in milliseconds.
//!
//! All backends measure time as [`Timestamp`]s: whole microseconds since the
//! Unix epoch, the unit the Redis backends read from `TIME`. Durations handed
//! to the API are relative [`Duration`]s.
//!
//! ```
//! use reliability_core::{Clock, ManualClock};
//! use std::time::Duration;
//!
//! let clock = ManualClock::new();
//! let t0 = clock.now();
//! clock.advance(Duration::from_secs(86_400));
//! assert_eq!(clock.now().saturating_since(t0), Duration::from_secs(86_400));
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The epoch itself.
    pub const ZERO: Timestamp = Timestamp(0);

    /// A timestamp of `micros` microseconds since the epoch.
    pub const fn from_micros(micros: u64) -> Self {
        Timestamp(micros)
    }

    /// Microseconds since the epoch.
    pub const fn as_micros(self) -> u64 {
        self.0
    }

    /// `self + d`, saturating at the maximum.
    pub fn saturating_add(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_add(duration_micros(d)))
    }

    /// `self - d`, saturating at the epoch.
    pub fn saturating_sub(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_sub(duration_micros(d)))
    }

    /// The time from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({}µs)", self.0)
    }
}

/// Whole microseconds of `d`, saturating at `u64::MAX`.
pub fn duration_micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A source of time.
///
/// Implementations must be cheap to call and never go backwards.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;

    /// `true` if this clock follows real elapsed time, so a backend may also
    /// let a physical timer (e.g. a cache TTL) expire entries. A manual clock
    /// returns `false`: expiry is then purely logical.
    fn is_real_time(&self) -> bool;
}

/// The system clock: wall time, forced monotonic within the process (a step
/// back of the system time holds the clock still instead of going back).
#[derive(Debug, Default)]
pub struct SystemClock {
    last: AtomicU64,
}

impl SystemClock {
    /// A new system clock.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(duration_micros)
            .unwrap_or(0);
        // Read first: the shared counter is written only when time moved on,
        // so concurrent readers do not bounce its cache line on every call.
        let prev = self.last.load(Ordering::Acquire);
        if wall <= prev {
            return Timestamp(prev);
        }
        let prev = self.last.fetch_max(wall, Ordering::AcqRel);
        Timestamp(prev.max(wall))
    }

    fn is_real_time(&self) -> bool {
        true
    }
}

/// A clock that moves only when told to. Clones share one time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<AtomicU64>,
}

impl ManualClock {
    /// Starts at a fixed, realistic time (2025-01-01T00:00:00Z), so records
    /// stamped with it look like real ones.
    pub fn new() -> Self {
        Self::starting_at(Timestamp::from_micros(1_735_689_600_000_000))
    }

    /// Starts at `t`.
    pub fn starting_at(t: Timestamp) -> Self {
        Self {
            now: Arc::new(AtomicU64::new(t.as_micros())),
        }
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.now.fetch_add(duration_micros(d), Ordering::AcqRel);
    }

    /// Sets the clock to `t` if that is later than now.
    pub fn advance_to(&self, t: Timestamp) {
        self.now.fetch_max(t.as_micros(), Ordering::AcqRel);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.now.load(Ordering::Acquire))
    }

    fn is_real_time(&self) -> bool {
        false
    }
}

/// A shared, type-erased clock as backends hold it.
pub type SharedClock = Arc<dyn Clock>;

/// The default clock: a shared [`SystemClock`].
pub fn system_clock() -> SharedClock {
    Arc::new(SystemClock::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_clock_never_goes_back() {
        let c = SystemClock::new();
        let mut prev = c.now();
        for _ in 0..1000 {
            let n = c.now();
            assert!(n >= prev);
            prev = n;
        }
    }

    #[test]
    fn manual_clock_is_shared_by_clones() {
        let a = ManualClock::new();
        let b = a.clone();
        a.advance(Duration::from_millis(5));
        assert_eq!(a.now(), b.now());
        b.advance_to(Timestamp::ZERO);
        assert_eq!(a.now(), b.now());
    }
}
