//! [`RedisRateLimiter`]: GCRA limits shared by every replica through Redis.
//!
//! # Layout
//!
//! One string per key, `{prefix}:rl:{namespace}:{id}`, holding the key's
//! theoretical arrival time (TAT) in µs since the epoch (Redis time), with a
//! physical TTL of `TAT - now` (rounded up to ms): once it is gone the key
//! is idle, exactly as a TAT in the past.
//!
//! One Lua script decides: a line-by-line port of
//! [`gcra::decide`](reliability_core::gcra::decide) in integer microseconds
//! (Lua doubles hold them exactly below 2^53), with `now` from Redis `TIME`.
//! Every replica therefore gets the decisions of one limiter, and the same
//! decisions as `reliability-memory`'s `LocalRateLimiter`.
//!
//! A [`Quota`]'s window `T * burst` is at most
//! [`MAX_WINDOW_US`] (2^50 µs, 35.7 years): the script's largest value,
//! `now + 2 * window`, then stays below 2^53 and every double is exact (at
//! 2^52 some `retry_after` came out 1 µs off the reference).
//!
//! ```no_run
//! # #[allow(dead_code)]
//! # async fn demo(client: reliability_redis::RedisClient) -> reliability_core::Result<()> {
//! use reliability_core::{Quota, RateLimiter};
//! use reliability_redis::RedisRateLimiter;
//!
//! let limiter = RedisRateLimiter::new(client);
//! let d = limiter.check("tenant-7", Quota::per_second(10)?, 1).await?;
//! println!("{:?}, {} left", d.outcome, d.remaining);
//! # Ok(()) }
//! ```

use std::fmt;
use std::time::Duration;

use deadpool_redis::redis::{Script, Value};
use reliability_core::{
    Capabilities, CheckFuture, Decision, Error, Outcome, Primitive, Quota, RateLimiter, Result,
    SharedClock,
};

use crate::client::RedisClient;
use crate::error::{unexpected, BACKEND};
use crate::idempotency::OVERRIDE_MARGIN_MS;
use crate::script::{evalsha, int, push_now, LUA_NOW};

/// The largest `T * burst` the script computes exactly: the cap every
/// [`Quota`] keeps.
pub use reliability_core::rate_limit::MAX_WINDOW_US;

// ARGV: now ('' = TIME), margin_ms, T (µs), burst, cost
// Returns {outcome (0 allowed, 1 denied, 2 never, -1 wrong type),
//          remaining, retry_after_us, reset_after_us}.
const GCRA: &str = r"
local margin = tonumber(ARGV[2])
local t = tonumber(ARGV[3])
local burst = tonumber(ARGV[4])
local cost = tonumber(ARGV[5])
local tau = t * (burst - 1)
local tat = now
local stored = redis.call('GET', KEYS[1])
if stored then
  tat = tonumber(stored)
  if not tat then return {-1, 0, 0, 0} end
end
local function remaining_at(x)
  local avail = now + tau + t - x
  if avail < 0 then avail = 0 end
  local cap = tau + t
  if avail > cap then avail = cap end
  local q = math.floor(avail / t)
  if q * t > avail then q = q - 1 elseif (q + 1) * t <= avail then q = q + 1 end
  return q
end
local function reset_at(x)
  if x > now then return x - now end
  return 0
end
if cost > burst then return {2, remaining_at(tat), 0, reset_at(tat)} end
if cost == 0 then return {0, remaining_at(tat), 0, reset_at(tat)} end
local additional = t * (cost - 1)
local earliest = tat + additional - tau
if earliest < 0 then earliest = 0 end
if now < earliest then return {1, remaining_at(tat), earliest - now, reset_at(tat)} end
local nxt = math.max(tat, now) + t + additional
redis.call('SET', KEYS[1], string.format('%.0f', nxt), 'PX', math.ceil((nxt - now) / 1000) + margin)
return {0, remaining_at(nxt), 0, reset_at(nxt)}
";

/// A [`RateLimiter`] in Redis: one GCRA state per key shared by every
/// replica, decided atomically by one script.
///
/// See the [module docs](self) for the layout and an example.
pub struct RedisRateLimiter {
    client: RedisClient,
    script: Script,
    clock_override: Option<SharedClock>,
}

impl fmt::Debug for RedisRateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRateLimiter")
            .field("client", &self.client)
            .field("clock_override", &self.clock_override.is_some())
            .finish()
    }
}

/// Builds a [`RedisRateLimiter`]; see [`RedisRateLimiter::builder`].
#[derive(Debug)]
#[must_use]
pub struct RedisRateLimiterBuilder {
    client: RedisClient,
    clock_override: Option<SharedClock>,
}

impl RedisRateLimiterBuilder {
    /// **Tests only.** The script takes `now` from `clock` instead of Redis
    /// `TIME` (see [`RedisClient::with_clock_override`]).
    pub fn clock_override(mut self, clock: SharedClock) -> Self {
        self.clock_override = Some(clock);
        self
    }

    /// Builds the limiter.
    pub fn build(self) -> RedisRateLimiter {
        let clock_override = self
            .clock_override
            .or_else(|| self.client.clock_override().cloned());
        let script = Script::new(&format!("{LUA_NOW}{GCRA}"));
        self.client.preload(&[&script]);
        RedisRateLimiter {
            client: self.client,
            script,
            clock_override,
        }
    }
}

impl RedisRateLimiter {
    /// A limiter on `client`.
    pub fn new(client: RedisClient) -> Self {
        Self::builder(client).build()
    }

    /// A builder, to set a test clock.
    pub fn builder(client: RedisClient) -> RedisRateLimiterBuilder {
        RedisRateLimiterBuilder {
            client,
            clock_override: None,
        }
    }

    /// The client this limiter uses.
    pub fn client(&self) -> &RedisClient {
        &self.client
    }

    /// The SHA1 of the GCRA script, for `EVALSHA` from other tools (the
    /// bench runs `redis-benchmark` on exactly this script). Its `ARGV` are
    /// `now` (empty: Redis `TIME`), the expiry margin in ms, `T` in µs, the
    /// burst and the cost.
    pub fn script_sha(&self) -> String {
        self.script.get_hash().to_string()
    }

    /// The script's source, to load it where the limiter has not run yet.
    pub fn script_source() -> String {
        format!("{LUA_NOW}{GCRA}")
    }
}

fn micros(v: Option<&Value>) -> Option<u64> {
    v.and_then(int).and_then(|i| u64::try_from(i).ok())
}

impl RateLimiter for RedisRateLimiter {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(BACKEND).with_distributed(true)
    }

    fn check<'a>(&'a self, key: &'a str, quota: Quota, cost: u32) -> CheckFuture<'a> {
        CheckFuture::new(self.check_script(key, quota, cost))
    }
}

impl RedisRateLimiter {
    /// One check: the GCRA script on the key's Redis state.
    async fn check_script(&self, key: &str, quota: Quota, cost: u32) -> Result<Decision> {
        let redis_key = self.client.key_space().key(Primitive::RateLimit, key)?;
        // `Quota` keeps `T * burst` within MAX_WINDOW_US: exact doubles.
        let t = quota.emission_interval_us();
        let margin = if self.clock_override.is_some() {
            OVERRIDE_MARGIN_MS
        } else {
            0
        };
        self.client
            .check_eviction("rate limit", self.client.on_evicting_policy())
            .await?;
        let mut cmd = evalsha(&self.script, 1, 6);
        cmd.arg(redis_key.as_str());
        push_now(&mut cmd, self.clock_override.as_ref());
        cmd.arg(margin).arg(t).arg(quota.burst()).arg(cost);
        let reply = self.client.eval(&self.script, &cmd, &redis_key).await?;
        let keys = [redis_key];
        let items = match &reply {
            Value::Array(items) if items.len() == 4 => items.as_slice(),
            _ => return Err(unexpected(&keys[0], reply)),
        };
        let (Some(code), Some(remaining), Some(retry), Some(reset)) = (
            items.first().and_then(int),
            micros(items.get(1)),
            micros(items.get(2)),
            micros(items.get(3)),
        ) else {
            return Err(unexpected(&keys[0], reply));
        };
        let (outcome, retry_after) = match code {
            0 => (Outcome::Allowed, Duration::ZERO),
            1 => (Outcome::Denied, Duration::from_micros(retry)),
            2 => (Outcome::Never, Duration::MAX),
            -1 => {
                return Err(Error::WrongType {
                    backend: BACKEND,
                    key: keys[0].clone(),
                })
            }
            _ => return Err(unexpected(&keys[0], reply)),
        };
        Ok(Decision {
            outcome,
            limit: quota.burst(),
            remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
            retry_after,
            reset_after: Duration::from_micros(reset),
        })
    }
}
