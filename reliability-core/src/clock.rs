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

/// The system clock: wall time, read cheaply and never going backwards.
///
/// Reading `SystemTime` costs a clock syscall (about 60 ns on a VM), so this
/// clock reads the CPU's time-stamp counter (through `quanta`, as governor
/// does) and re-anchors it to the system time every
/// [`RESYNC_INTERVAL`](Self::RESYNC_INTERVAL). A step back of the system
/// time holds the clock still instead of going back.
#[derive(Debug)]
pub struct SystemClock {
    mono: quanta::Clock,
    start: quanta::Instant,
    /// `wall - mono` at the last re-anchoring, in µs (wrapping).
    offset: AtomicU64,
    /// `mono` at the last re-anchoring, in µs.
    synced_at: AtomicU64,
    /// The last value returned.
    last: AtomicU64,
}

impl SystemClock {
    /// How often the counter is re-anchored to the system time.
    pub const RESYNC_INTERVAL: Duration = Duration::from_millis(100);

    /// A new system clock.
    pub fn new() -> Self {
        let mono = quanta::Clock::new();
        let start = mono.now();
        let wall = wall_micros();
        Self {
            mono,
            start,
            offset: AtomicU64::new(wall),
            synced_at: AtomicU64::new(0),
            last: AtomicU64::new(wall),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

fn wall_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(duration_micros)
        .unwrap_or(0)
}

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let mono = duration_micros(self.mono.now().saturating_duration_since(self.start));
        let since_sync = mono.saturating_sub(self.synced_at.load(Ordering::Relaxed));
        let t = if since_sync >= duration_micros(Self::RESYNC_INTERVAL) {
            let wall = wall_micros();
            self.offset
                .store(wall.wrapping_sub(mono), Ordering::Relaxed);
            self.synced_at.store(mono, Ordering::Relaxed);
            wall
        } else {
            mono.wrapping_add(self.offset.load(Ordering::Relaxed))
        };
        // Read first: the shared counter is written only when time moved on,
        // so concurrent readers do not bounce its cache line on every call.
        let prev = self.last.load(Ordering::Acquire);
        if t <= prev {
            return Timestamp(prev);
        }
        let prev = self.last.fetch_max(t, Ordering::AcqRel);
        Timestamp(prev.max(t))
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
    fn system_clock_follows_wall_time() {
        let c = SystemClock::new();
        for _ in 0..3 {
            let ours = c.now().as_micros();
            let wall = wall_micros();
            assert!(ours.abs_diff(wall) < 50_000, "within 50 ms of SystemTime");
            std::thread::yield_now();
        }
    }

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
