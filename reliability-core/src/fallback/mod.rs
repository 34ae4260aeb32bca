//! `Fallback<Primary, Secondary>`: degrade, never break.
//!
//! A wrapper in tower's shape (`new`, `get_ref`, `into_inner`): it puts a
//! primary backend (Redis) in front of a secondary one (memory, local, disk).
//! Every primary call runs under a deadline (default 250 ms, pool checkout
//! included); an [unavailable](crate::Error::is_unavailable) error or a
//! timeout answers that same call from the secondary, and is recorded by the
//! shared [`Breaker`]. While the breaker is open, calls go straight to the
//! secondary and pay no timeout; a background [`Probe`] brings traffic back.
//! Caller errors (bad key, too large, lost lease) are returned as they are:
//! the secondary would give the same answer.
//!
//! `Fallback` implements [`RateLimiter`] with an explicit
//! [`RateLimitPolicy`], and [`IdempotencyStore`](crate::IdempotencyStore)
//! with a journal of the claims the secondary answered, replayed to the
//! primary by [`Fallback::reconcile`] (see `fallback/idempotency.rs`), and
//! [`Spool`](crate::Spool), whose records written to the secondary during an
//! outage move back with [`Fallback::drain`] (see `fallback/spool.rs`).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> reliability_core::Result<()> {
//! use reliability_core::fallback::{Breaker, BreakerConfig, Fallback, RateLimitPolicy};
//! use reliability_core::{system_clock, Quota, RateLimiter, RateLimiterExt};
//! use std::sync::Arc;
//! # use reliability_core::{Capabilities, CheckFuture, Decision, Outcome};
//! # #[derive(Debug)] struct Local;
//! # impl RateLimiter for Local {
//! #   fn capabilities(&self) -> Capabilities { Capabilities::new("local") }
//! #   fn check<'a>(&'a self, _: &'a str, q: Quota, _: u32) -> CheckFuture<'a> {
//! #     CheckFuture::ready(Ok(Decision { outcome: Outcome::Allowed, limit: q.burst(), remaining: 0,
//! #       retry_after: Default::default(), reset_after: Default::default() })) } }
//! # let (redis_limiter, local_limiter) = (Local, Local);
//!
//! let breaker = Arc::new(Breaker::new(BreakerConfig::default(), system_clock()));
//! let limiter = Fallback::new(redis_limiter, local_limiter, breaker)
//!     .with_rate_limit_policy(RateLimitPolicy::LocalShare { replicas: 4 });
//! let d = limiter.check_one("tenant-7", Quota::per_second(100)?).await?;
//! assert!(d.is_allowed());
//! # Ok(())
//! # }
//! ```

mod breaker;
mod copies;
mod drain;
mod idempotency;
mod journal;
mod spool;
mod status;

pub use breaker::{Breaker, BreakerConfig, PrimaryIdentity, Probe, ProbeTask};
pub use copies::DoubleEnqueues;
pub use drain::{DrainLimits, DrainReport};
pub use idempotency::ReconcileReport;
pub use journal::{JournalLimits, JournalUsage};
pub use status::{apply_breaker, spawn_status_bridge};

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::capability::Capabilities;
use crate::config::{FallbackConfig, RateLimitFallback};
use crate::error::{Error, Result};
use crate::metrics;
use crate::rate_limit::{CheckFuture, Decision, Outcome, Quota, RateLimiter};

/// Default deadline of one primary call.
pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(250);

/// How a rate limiter answers while the primary is unavailable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RateLimitPolicy {
    /// Allow every request.
    FailOpen,
    /// Deny every request (retry after one emission interval).
    FailClosed,
    /// Each replica enforces the full quota locally.
    LocalFull,
    /// Each replica enforces `quota / replicas` locally (the default, with
    /// one replica until told otherwise). A cost within the full burst but
    /// above the share's burst is denied, not "never".
    LocalShare {
        /// Replicas sharing the quota.
        replicas: u32,
    },
}

impl Default for RateLimitPolicy {
    fn default() -> Self {
        RateLimitPolicy::LocalShare { replicas: 1 }
    }
}

impl From<&FallbackConfig> for RateLimitPolicy {
    fn from(c: &FallbackConfig) -> Self {
        match c.rate_limit_policy {
            RateLimitFallback::FailOpen => RateLimitPolicy::FailOpen,
            RateLimitFallback::FailClosed => RateLimitPolicy::FailClosed,
            RateLimitFallback::LocalFull => RateLimitPolicy::LocalFull,
            _ => RateLimitPolicy::LocalShare {
                replicas: c.replicas.max(1),
            },
        }
    }
}

impl From<&FallbackConfig> for BreakerConfig {
    fn from(c: &FallbackConfig) -> Self {
        BreakerConfig::default()
            .with_failure_threshold(c.failure_threshold)
            .with_success_threshold(c.success_threshold)
    }
}

/// A primary backend with a secondary that answers while the primary is
/// unavailable. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct Fallback<P, S> {
    primary: P,
    secondary: S,
    breaker: Arc<Breaker>,
    deadline: Duration,
    rate_limit_policy: RateLimitPolicy,
    journal: Arc<idempotency::Journal>,
    local_leases: Arc<spool::LocalLeases>,
    copies: Arc<copies::Copies>,
    drain_limits: drain::DrainLimits,
    drain_state: Arc<drain::DrainState>,
}

impl<P, S> Fallback<P, S> {
    /// `primary` in front of `secondary`, sharing `breaker` with the other
    /// fallbacks in front of the same primary.
    pub fn new(primary: P, secondary: S, breaker: Arc<Breaker>) -> Self {
        Self {
            primary,
            secondary,
            breaker,
            deadline: DEFAULT_DEADLINE,
            rate_limit_policy: RateLimitPolicy::default(),
            journal: Arc::default(),
            local_leases: Arc::default(),
            copies: Arc::default(),
            drain_limits: drain::DrainLimits::default(),
            drain_state: Arc::default(),
        }
    }

    /// The deadline of one primary call (default 250 ms).
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// The policy of [`RateLimiter::check`] while the primary is down.
    pub fn with_rate_limit_policy(mut self, policy: RateLimitPolicy) -> Self {
        self.rate_limit_policy = policy;
        self
    }

    /// The primary and the secondary.
    pub fn get_ref(&self) -> (&P, &S) {
        (&self.primary, &self.secondary)
    }

    /// The shared breaker.
    pub fn breaker(&self) -> &Arc<Breaker> {
        &self.breaker
    }

    /// The deadline of one primary call.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// Takes the wrapper apart.
    pub fn into_inner(self) -> (P, S) {
        (self.primary, self.secondary)
    }

    /// Routes one call: the primary under the deadline while the breaker
    /// lets it, then the secondary if the primary was skipped, unavailable or
    /// late. Caller errors from the primary are returned as they are.
    ///
    /// # Errors
    /// The primary's caller errors, or whatever the secondary answers.
    pub async fn call<T, FP, FS>(&self, primary: FP, secondary: FS) -> Result<T>
    where
        FP: Future<Output = Result<T>>,
        FS: Future<Output = Result<T>>,
    {
        self.call_with(|| primary, || secondary).await
    }

    /// [`call`](Self::call) with the futures built only when needed: while
    /// the breaker is open, the primary's future (an allocation for an
    /// `async_trait` backend) is never made.
    pub(crate) async fn call_with<T, FP, FS>(
        &self,
        primary: impl FnOnce() -> FP,
        secondary: impl FnOnce() -> FS,
    ) -> Result<T>
    where
        FP: Future<Output = Result<T>>,
        FS: Future<Output = Result<T>>,
    {
        let reason = if self.breaker.routes_to_primary() {
            match tokio::time::timeout(self.deadline, primary()).await {
                Ok(Ok(v)) => {
                    self.breaker.record_success();
                    metrics::call("primary", "ok");
                    return Ok(v);
                }
                Ok(Err(e)) if !e.is_unavailable() => {
                    // The primary answered: it is up, the caller is wrong.
                    self.breaker.record_success();
                    metrics::call("primary", "error");
                    return Err(e);
                }
                Ok(Err(e)) => {
                    self.breaker.record_failure(&e);
                    metrics::call("primary", "unavailable");
                    "unavailable"
                }
                Err(_) => {
                    self.breaker.record_failure(&Error::Timeout {
                        backend: "primary",
                        after: self.deadline,
                    });
                    metrics::call("primary", "timeout");
                    "timeout"
                }
            }
        } else {
            "open"
        };
        self.answer_locally(reason, secondary()).await
    }

    /// The secondary's answer, counted as a fallback for `reason`.
    pub(crate) async fn answer_locally<T>(
        &self,
        reason: &'static str,
        secondary: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        metrics::fallback(reason);
        let answer = secondary.await;
        metrics::call("secondary", metrics::outcome(&answer));
        answer
    }
}

impl<P: RateLimiter, S: RateLimiter> Fallback<P, S> {
    /// The answer of the rate-limit policy while the primary is down:
    /// ready (no allocation) for the fixed policies and a local secondary.
    fn check_degraded<'a>(&'a self, key: &'a str, quota: Quota, cost: u32) -> CheckFuture<'a> {
        let not_allowed = |outcome, retry_after| Decision {
            outcome,
            limit: quota.burst(),
            remaining: 0,
            retry_after,
            reset_after: retry_after,
        };
        match self.rate_limit_policy {
            RateLimitPolicy::FailOpen | RateLimitPolicy::FailClosed if cost > quota.burst() => {
                CheckFuture::ready(Ok(not_allowed(Outcome::Never, Duration::MAX)))
            }
            RateLimitPolicy::FailOpen => CheckFuture::ready(Ok(Decision {
                outcome: Outcome::Allowed,
                limit: quota.burst(),
                remaining: quota.burst().saturating_sub(cost),
                retry_after: Duration::ZERO,
                reset_after: Duration::ZERO,
            })),
            RateLimitPolicy::FailClosed => {
                CheckFuture::ready(Ok(not_allowed(Outcome::Denied, quota.emission_interval())))
            }
            RateLimitPolicy::LocalFull => self.secondary.check(key, quota, cost),
            RateLimitPolicy::LocalShare { replicas } => {
                let share = quota.share(replicas);
                self.secondary.check(key, share, cost).map(move |d| {
                    let mut d = d?;
                    if d.outcome == Outcome::Never && cost <= quota.burst() {
                        // Within the real burst: "not now", not "never".
                        d.outcome = Outcome::Denied;
                        d.retry_after = share.emission_interval().saturating_mul(cost);
                    }
                    d.limit = quota.burst();
                    Ok(d)
                })
            }
        }
    }
}

impl<P: RateLimiter, S: RateLimiter> RateLimiter for Fallback<P, S> {
    fn capabilities(&self) -> Capabilities {
        let p = self.primary.capabilities();
        let s = self.secondary.capabilities();
        Capabilities::new("fallback")
            .with_distributed(p.distributed)
            .with_bounded(s.bounded)
    }

    fn check<'a>(&'a self, key: &'a str, quota: Quota, cost: u32) -> CheckFuture<'a> {
        if !self.breaker.routes_to_primary() {
            // Open: the policy's answer, allocation-free with a local
            // secondary; no primary future is built.
            metrics::fallback("open");
            return self.check_degraded(key, quota, cost);
        }
        CheckFuture::new(self.call(
            self.primary.check(key, quota, cost),
            self.check_degraded(key, quota, cost),
        ))
    }
}
