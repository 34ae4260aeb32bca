//! The server's `maxmemory-policy`, read with `CONFIG GET` at most once per
//! [`RECHECK`] per client and checked before the backends use the server.
//!
//! A policy other than `noeviction` lets Redis delete keys under memory
//! pressure: an evicted pending claim is acquired again (the event is
//! processed twice), an evicted limit starts afresh, an evicted spool record
//! is lost. Such a server is *misconfigured*: calls answer unavailable
//! ([`UnavailableReason::Misconfigured`], the message naming the policy),
//! so a `Fallback` answers them locally and its status shows why, unless
//! `redis.onEvictingPolicy: accept` says the idempotency store and the rate
//! limiter may use it anyway. The spool never accepts it.
//!
//! Where `CONFIG` is refused (managed Redis), the policy is unknown: the
//! backends go on, and a warning says it could not be checked.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use deadpool_redis::redis::cmd;
use reliability_core::config::OnEvictingPolicy;
use reliability_core::{Error, Result, UnavailableReason};

use crate::client::RedisClient;
use crate::error::BACKEND;

/// How long a policy read stays good: an operator's `CONFIG SET` shows
/// within this, and calls never repeat `CONFIG GET` in between.
pub(crate) const RECHECK: Duration = Duration::from_secs(5);

/// The last policy read of one client (shared by its clones).
#[derive(Debug, Default)]
pub(crate) struct PolicyCache {
    last: RwLock<Option<(Instant, Policy)>>,
    /// Held by the one task that reads the policy.
    reading: Arc<tokio::sync::Mutex<()>>,
}

/// The server's `maxmemory-policy`, as far as it could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// `CONFIG GET` answered this policy.
    Known(Arc<str>),
    /// `CONFIG` is refused (managed Redis): the policy cannot be checked.
    Unknown,
}

impl Policy {
    /// The policy's name when it may evict keys.
    pub fn evicting(&self) -> Option<&str> {
        match self {
            Policy::Known(p) if !p.eq_ignore_ascii_case("noeviction") => Some(p),
            _ => None,
        }
    }
}

impl PolicyCache {
    fn fresh(&self) -> Option<Policy> {
        let last = self.last.read().unwrap_or_else(|p| p.into_inner());
        last.as_ref()
            .filter(|(at, _)| at.elapsed() < RECHECK)
            .map(|(_, p)| p.clone())
    }

    fn stale(&self) -> Option<Policy> {
        let last = self.last.read().unwrap_or_else(|p| p.into_inner());
        last.as_ref().map(|(_, p)| p.clone())
    }

    fn store(&self, policy: Policy) {
        *self.last.write().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), policy));
    }
}

impl RedisClient {
    /// The server's `maxmemory-policy`, read at most once per 5 s:
    /// while it is read again, callers get the last value read. The read
    /// runs in a task of its own, so a caller dropped at its deadline does
    /// not take it along (on a slow link, a read and a call together may
    /// outlast the deadline; the read still lands for the next calls).
    ///
    /// # Errors
    /// Unavailable errors when the server cannot be asked.
    pub async fn maxmemory_policy(&self) -> Result<Policy> {
        let cache = self.policy_cache();
        if let Some(p) = cache.fresh() {
            return Ok(p);
        }
        let stale = cache.stale();
        let read = match Arc::clone(&cache.reading).try_lock_owned() {
            Ok(turn) => {
                let client = self.clone();
                Some(tokio::spawn(async move {
                    let policy = client.read_policy().await;
                    drop(turn);
                    policy
                }))
            }
            Err(_) => None,
        };
        match (stale, read) {
            (Some(p), _) => Ok(p),
            (None, Some(read)) => read.await.unwrap_or_else(|e| {
                Err(Error::unavailable(
                    BACKEND,
                    UnavailableReason::Other,
                    format!("reading maxmemory-policy: {e}"),
                ))
            }),
            (None, None) => {
                // Another caller's read is running: wait for it.
                let _turn = cache.reading.lock().await;
                cache.fresh().ok_or_else(|| {
                    Error::unavailable(
                        BACKEND,
                        UnavailableReason::Other,
                        "maxmemory-policy could not be read yet",
                    )
                })
            }
        }
    }

    /// `CONFIG GET maxmemory-policy`, stored in the cache.
    async fn read_policy(&self) -> Result<Policy> {
        let cache = self.policy_cache();
        let mut c = cmd("CONFIG");
        c.arg("GET").arg("maxmemory-policy");
        let policy = match crate::spool::config_value(self.query(&c).await, "maxmemory-policy") {
            Ok(Some(p)) => Policy::Known(p.into()),
            Ok(None) => Policy::Unknown,
            Err(e) if e.is_unavailable() => return Err(e),
            Err(e) => {
                if cache.stale() != Some(Policy::Unknown) {
                    tracing::warn!(
                        error = %e,
                        "redis: CONFIG GET refused (managed Redis?); cannot check that \
                         maxmemory-policy is noeviction"
                    );
                }
                Policy::Unknown
            }
        };
        cache.store(policy.clone());
        Ok(policy)
    }

    /// `Ok` unless the server may evict the keys of `what` and `on_evicting`
    /// refuses that: then unavailable ([`UnavailableReason::Misconfigured`])
    /// naming the policy. Cheap: the policy is cached (see
    /// [`maxmemory_policy`](Self::maxmemory_policy)).
    ///
    /// # Errors
    /// As described, and unavailable errors when the server cannot be asked.
    pub async fn check_eviction(&self, what: &str, on_evicting: OnEvictingPolicy) -> Result<()> {
        let policy = self.maxmemory_policy().await?;
        match (policy.evicting(), on_evicting) {
            (Some(p), OnEvictingPolicy::Refuse) => Err(evicting(p, what)),
            _ => Ok(()),
        }
    }
}

/// The refusal of a server whose policy `policy` may evict `what`.
pub(crate) fn evicting(policy: &str, what: &str) -> Error {
    Error::unavailable(
        BACKEND,
        UnavailableReason::Misconfigured,
        format!(
            "the server's maxmemory-policy is {policy}: it may evict {what} keys; use \
             noeviction (CONFIG SET maxmemory-policy noeviction), or accept the risk for the \
             idempotency store and rate limiter with reliability.redis.onEvictingPolicy: accept"
        ),
    )
}
