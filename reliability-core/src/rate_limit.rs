//! `RateLimiter`: keyed GCRA limits with honest retry-after.
//!
//! A [`Quota`] is an emission interval `T` (whole microseconds) and a burst.
//! [`RateLimiter::check`] asks for `cost` cells of a key: the request is
//! allowed whole or denied whole, a denial changes nothing, and a cost above
//! the burst can never be allowed ([`Outcome::Never`], not "not now"). A cost
//! of zero peeks at the state without consuming. Every backend computes the
//! same [`Decision`] for the same sequence of requests: the reference is
//! [`gcra::decide`](crate::gcra::decide), which matches governor 0.10 decision
//! for decision.
//!
//! ```
//! # #[allow(dead_code)]
//! # async fn demo(limiter: &dyn reliability_core::RateLimiter) -> reliability_core::Result<()> {
//! use reliability_core::{Outcome, Quota};
//!
//! let quota = Quota::per_second(10)?; // 10/s, burst 10
//! let d = limiter.check("tenant-7", quota, 1).await?;
//! match d.outcome {
//!     Outcome::Allowed => { /* go on; d.remaining cells left */ }
//!     Outcome::Denied => { /* 429, Retry-After: d.retry_after */ }
//!     Outcome::Never => { /* 413: this cost exceeds the burst */ }
//! }
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;

use crate::capability::Capabilities;
use crate::error::{Error, Result};

/// The largest window `T x burst` of a [`Quota`], in microseconds: 2^50 µs,
/// about 35.7 years.
///
/// Every backend computes the same decisions below it; the Redis backend
/// computes in Lua doubles, exact below 2^53, and its largest intermediate
/// value is `now + 2 x window`, which stays below 2^53 with this cap until
/// the year 2184.
pub const MAX_WINDOW_US: u64 = 1 << 50;

/// A GCRA quota: one cell every `emission_interval`, up to `burst` at once,
/// with a window `emission_interval x burst` of at most [`MAX_WINDOW_US`].
///
/// Deserialized (`{emissionIntervalUs, burst}`) through the same checks as
/// [`from_micros`](Self::from_micros): an invalid quota is an error naming
/// the field, never a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", try_from = "QuotaFields")]
pub struct Quota {
    emission_interval_us: u64,
    burst: u32,
}

/// The serialized fields of a [`Quota`], checked on the way in.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct QuotaFields {
    emission_interval_us: u64,
    burst: u32,
}

impl TryFrom<QuotaFields> for Quota {
    type Error = String;

    fn try_from(f: QuotaFields) -> std::result::Result<Self, String> {
        Quota::from_micros(f.emission_interval_us, f.burst).map_err(|e| match e {
            Error::InvalidArgument { name, reason } => {
                let field = match name {
                    "emission_interval" => "emissionIntervalUs",
                    other => other,
                };
                format!("{field}: {reason}")
            }
            other => other.to_string(),
        })
    }
}

impl Quota {
    /// One cell every `emission_interval` (whole microseconds, at least 1 µs),
    /// bursts of up to `burst` cells (at least 1).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a zero burst, an interval below 1 µs or
    /// not a whole number of microseconds.
    pub fn new(emission_interval: Duration, burst: u32) -> Result<Self> {
        if !emission_interval.subsec_nanos().is_multiple_of(1_000) {
            return Err(Error::invalid_argument(
                "emission_interval",
                "must be a whole number of microseconds",
            ));
        }
        let us = u64::try_from(emission_interval.as_micros()).map_err(|_| {
            Error::invalid_argument("emission_interval", "longer than u64 microseconds")
        })?;
        Self::from_micros(us, burst)
    }

    /// Like [`new`](Self::new) with the interval in microseconds.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a zero interval or burst, or a window
    /// `interval x burst` above [`MAX_WINDOW_US`].
    pub fn from_micros(emission_interval_us: u64, burst: u32) -> Result<Self> {
        if emission_interval_us == 0 {
            return Err(Error::invalid_argument(
                "emission_interval",
                "must be at least 1 us",
            ));
        }
        if burst == 0 {
            return Err(Error::invalid_argument("burst", "must be at least 1"));
        }
        if u128::from(emission_interval_us) * u128::from(burst) > u128::from(MAX_WINDOW_US) {
            return Err(Error::invalid_argument(
                "quota",
                format!(
                    "the window emission interval x burst ({emission_interval_us} us x {burst}) \
                     exceeds {MAX_WINDOW_US} us (2^50, about 35 years)"
                ),
            ));
        }
        Ok(Self {
            emission_interval_us,
            burst,
        })
    }

    /// `n` cells per `period`, burst `n`; the interval is `period / n`
    /// rounded down to whole microseconds.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `n` is zero or `period / n` is below 1 µs.
    pub fn per(period: Duration, n: u32) -> Result<Self> {
        if n == 0 {
            return Err(Error::invalid_argument("n", "must be greater than zero"));
        }
        let us = u64::try_from(period.as_micros() / u128::from(n))
            .map_err(|_| Error::invalid_argument("period", "too long"))?;
        if us == 0 {
            return Err(Error::invalid_argument(
                "period",
                "period / n is below one microsecond",
            ));
        }
        Self::from_micros(us, n)
    }

    /// `n` per second, burst `n`.
    ///
    /// # Errors
    /// As [`per`](Self::per).
    pub fn per_second(n: u32) -> Result<Self> {
        Self::per(Duration::from_secs(1), n)
    }

    /// `n` per minute, burst `n`.
    ///
    /// # Errors
    /// As [`per`](Self::per).
    pub fn per_minute(n: u32) -> Result<Self> {
        Self::per(Duration::from_secs(60), n)
    }

    /// `n` per hour, burst `n`.
    ///
    /// # Errors
    /// As [`per`](Self::per).
    pub fn per_hour(n: u32) -> Result<Self> {
        Self::per(Duration::from_secs(3600), n)
    }

    /// The same rate with another burst.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a zero burst.
    pub fn with_burst(self, burst: u32) -> Result<Self> {
        Self::from_micros(self.emission_interval_us, burst)
    }

    /// The emission interval `T` in microseconds.
    pub const fn emission_interval_us(&self) -> u64 {
        self.emission_interval_us
    }

    /// The emission interval `T`.
    pub const fn emission_interval(&self) -> Duration {
        Duration::from_micros(self.emission_interval_us)
    }

    /// The burst.
    pub const fn burst(&self) -> u32 {
        self.burst
    }

    /// A quota with the same burst-to-rate shape divided among `replicas`
    /// (for a local share of a shared limit): the interval is multiplied and
    /// the burst divided, each at least 1, the window still at most
    /// [`MAX_WINDOW_US`].
    pub fn share(self, replicas: u32) -> Self {
        let r = replicas.max(1);
        let burst = (self.burst / r).max(1);
        Self {
            emission_interval_us: self
                .emission_interval_us
                .saturating_mul(u64::from(r))
                .min(MAX_WINDOW_US / u64::from(burst)),
            burst,
        }
    }
}

/// The kind of answer to a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    /// The cells were taken.
    Allowed,
    /// Not now: retry after [`Decision::retry_after`]. Nothing was taken.
    Denied,
    /// Never: the cost exceeds the burst. Nothing was taken.
    Never,
}

/// The answer to [`RateLimiter::check`]: data, not an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "camelCase")]
#[must_use]
pub struct Decision {
    /// Allowed, denied or never.
    pub outcome: Outcome,
    /// The quota's burst.
    pub limit: u32,
    /// Cells that could be taken right now after this decision.
    pub remaining: u32,
    /// Zero when allowed; when denied, the wait until this same request
    /// would be allowed; [`Duration::MAX`] when never.
    pub retry_after: Duration,
    /// The wait until the key's full burst is available again.
    pub reset_after: Duration,
}

impl Decision {
    /// `true` if [`Outcome::Allowed`].
    pub fn is_allowed(&self) -> bool {
        self.outcome == Outcome::Allowed
    }
}

/// The future [`RateLimiter::check`] returns: ready at once, without an
/// allocation, for in-process limiters; boxed for remote ones.
///
/// `check` is the hot path of a gateway. An `#[async_trait]` method boxes
/// its future on every call, which measured ~55 ns here on a check that
/// costs ~87 ns in process; this type keeps the trait object safe while a
/// local limiter pays nothing for it. Await it like any future.
#[must_use = "futures do nothing unless awaited"]
pub struct CheckFuture<'a>(CheckInner<'a>);

type BoxedCheck<'a> = Pin<Box<dyn Future<Output = Result<Decision>> + Send + 'a>>;

enum CheckInner<'a> {
    Ready(Option<Result<Decision>>),
    Boxed(BoxedCheck<'a>),
}

impl<'a> CheckFuture<'a> {
    /// A decision already made (in-process limiters).
    #[inline]
    pub fn ready(decision: Result<Decision>) -> Self {
        CheckFuture(CheckInner::Ready(Some(decision)))
    }

    /// A decision still to be made by `future` (remote limiters); boxed.
    pub fn new(future: impl Future<Output = Result<Decision>> + Send + 'a) -> Self {
        CheckFuture(CheckInner::Boxed(Box::pin(future)))
    }

    /// Applies `f` to the decision: at once (no allocation) when it is
    /// already made, else after the boxed future.
    pub fn map(self, f: impl FnOnce(Result<Decision>) -> Result<Decision> + Send + 'a) -> Self {
        match self.0 {
            CheckInner::Ready(Some(d)) => CheckFuture::ready(f(d)),
            CheckInner::Ready(None) => self,
            CheckInner::Boxed(fut) => CheckFuture::new(async move { f(fut.await) }),
        }
    }
}

impl Future for CheckFuture<'_> {
    type Output = Result<Decision>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            CheckInner::Ready(d) => Poll::Ready(d.take().unwrap_or_else(|| {
                Err(Error::invalid_argument(
                    "CheckFuture",
                    "polled again after it completed",
                ))
            })),
            CheckInner::Boxed(f) => f.as_mut().poll(cx),
        }
    }
}

impl fmt::Debug for CheckFuture<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            CheckInner::Ready(d) => f.debug_tuple("CheckFuture::Ready").field(d).finish(),
            CheckInner::Boxed(_) => f.write_str("CheckFuture::Boxed(..)"),
        }
    }
}

/// Keyed GCRA rate limiting.
///
/// Object safe: hosts hold `Arc<dyn RateLimiter>`. `check` returns a
/// [`CheckFuture`] rather than an `async_trait` box, so in-process limiters
/// answer without an allocation.
pub trait RateLimiter: Send + Sync + fmt::Debug + 'static {
    /// What this backend guarantees.
    fn capabilities(&self) -> Capabilities;

    /// Asks for `cost` cells of `key` under `quota`.
    ///
    /// # Behavior
    /// GCRA with tolerance `T * (burst - 1)`: allowed whole or denied whole;
    /// a denial changes no state; `cost > burst` is [`Outcome::Never`];
    /// `cost == 0` peeks (always allowed, changes nothing). The key's state
    /// is one theoretical arrival time, shared by every quota used with it.
    ///
    /// # Errors
    /// [`Error::InvalidKey`] / [`Error::TooLarge`] for a bad key,
    /// unavailable errors when the backend cannot answer.
    fn check<'a>(&'a self, key: &'a str, quota: Quota, cost: u32) -> CheckFuture<'a>;
}

/// Helpers on top of [`RateLimiter`], for every implementation.
#[async_trait]
pub trait RateLimiterExt: RateLimiter {
    /// [`check`](RateLimiter::check) with cost 1.
    ///
    /// # Errors
    /// As [`RateLimiter::check`].
    async fn check_one(&self, key: &str, quota: Quota) -> Result<Decision> {
        self.check(key, quota, 1).await
    }

    /// [`check`](RateLimiter::check) with cost 0: the state, unchanged.
    ///
    /// # Errors
    /// As [`RateLimiter::check`].
    async fn peek(&self, key: &str, quota: Quota) -> Result<Decision> {
        self.check(key, quota, 0).await
    }
}

impl<T: RateLimiter + ?Sized> RateLimiterExt for T {}

macro_rules! forward_rate_limiter {
    ($ty:ty) => {
        #[deny(clippy::missing_trait_methods)]
        impl<T: RateLimiter + ?Sized> RateLimiter for $ty {
            fn capabilities(&self) -> Capabilities {
                (**self).capabilities()
            }
            fn check<'a>(&'a self, key: &'a str, quota: Quota, cost: u32) -> CheckFuture<'a> {
                (**self).check(key, quota, cost)
            }
        }
    };
}

forward_rate_limiter!(Arc<T>);
forward_rate_limiter!(Box<T>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_constructors() {
        let q = Quota::per_second(10).unwrap();
        assert_eq!((q.emission_interval_us(), q.burst()), (100_000, 10));
        assert!(Quota::per_second(0).is_err());
        assert!(Quota::new(Duration::from_nanos(1_500), 1).is_err());
        assert!(Quota::new(Duration::from_micros(5), 0).is_err());
        assert_eq!(q.share(3).burst(), 3);
        assert_eq!(q.share(3).emission_interval_us(), 300_000);
        assert_eq!(q.share(100).burst(), 1);
    }

    fn _object_safe(_: &dyn RateLimiter) {}
}
