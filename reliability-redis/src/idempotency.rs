//! [`RedisIdempotencyStore`]: claims shared by every replica through Redis.
//!
//! # Layout
//!
//! One hash per key, `{prefix}:idem:{namespace}:{id}` (long ids hashed, see
//! [`KeySpace::key`](reliability_core::KeySpace::key)):
//!
//! | field | value |
//! |---|---|
//! | `st` | `p` (pending) or `c` (completed) |
//! | `fp` | the 32-byte payload fingerprint |
//! | `tok` | the owner's lease token (32 hex digits) |
//! | `exp` | logical expiry, µs since the epoch (Redis time); absent on a fresh claim, see below |
//! | `res` | the stored result; absent for "no result" |
//!
//! Each operation is one Lua script touching one key (Cluster-safe), so a
//! claim, a completion, a release and an extension are atomic and
//! owner-checked: a stale lease gets [`Error::LeaseLost`] and changes
//! nothing. Time is Redis's — one clock for every replica. A claim of a
//! new key writes no `exp`: its lease ends with the key itself, which
//! `PEXPIRE` sets to the lease (in ms, rounded up: never early, less than
//! 2 ms late), so the hot path needs no `TIME`. Completions and extensions
//! write `exp` from `TIME`, and the scripts compare it with `now`; their
//! `PEXPIRE` only cleans up keys physically once they are logically gone.
//! (Under a test clock override every claim writes `exp` from the
//! override's time, and keys get a margin.)
//!
//! A claim whose answer never came (the server hung or died, the caller
//! gave up at its deadline) may still run on the server, holding the key
//! under a token no caller has: the store keeps such tokens, and when a
//! later claim of the key answers in progress it releases them (owner
//! checked) and claims once more.
//!
//! ```no_run
//! # #[allow(dead_code)]
//! # async fn demo(client: reliability_redis::RedisClient) -> reliability_core::Result<()> {
//! use reliability_core::{Claim, Fingerprint, IdempotencyStore};
//! use reliability_redis::RedisIdempotencyStore;
//! use std::time::Duration;
//!
//! let store = RedisIdempotencyStore::new(client);
//! if let Claim::Acquired(lease) = store.claim("evt_1", &Fingerprint::of(b"{}"), Duration::from_secs(30)).await? {
//!     store.complete(&lease, Some("200 OK".into()), Duration::from_secs(86_400)).await?;
//! }
//! # Ok(()) }
//! ```

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_redis::redis::{Cmd, Script, Value};
use reliability_core::clock::duration_micros;
use reliability_core::idempotency::{
    check_lease_duration, check_result_size, DEFAULT_MAX_RESULT_BYTES,
};
use reliability_core::{
    Capabilities, Claim, Error, Fingerprint, IdempotencyStore, Lease, LeaseToken, Primitive,
    Result, SharedClock,
};

use crate::client::RedisClient;
use crate::error::{unexpected, BACKEND};
use crate::script::{evalsha, int, push_now, LUA_NOW};
use crate::unanswered::Unanswered;

/// Physical TTL added to keys when a test clock override is set: real time
/// and the override diverge, and a key must never vanish before the
/// override says it expired.
pub(crate) const OVERRIDE_MARGIN_MS: u64 = 3_600_000;

const CODE_ACQUIRED: i64 = 1;
const CODE_IN_PROGRESS: i64 = 2;
const CODE_COMPLETED: i64 = 3;
const CODE_MISMATCH: i64 = 4;
const CODE_WRONG_TYPE: i64 = -1;

/// Physical TTL in ms for a logical lifetime of `us` microseconds.
const LUA_PTTL: &str = r"
local function pttl(us)
  return math.ceil(us / 1000) + tonumber(ARGV[2])
end
";

// ARGV: fp, token, pttl_ms[, now, lease_us] (the last two only under a
// test clock override).
//
// A new key (the common case) costs EXISTS, HSET of three fields and
// PEXPIRE: no TIME and no `exp`, since the key's own expiry ends the lease
// (the module docs). In this script the Lua interpreter's work weighs as
// much as the commands: each argument costs ~1.2k server instructions to
// hand to Lua, TIME with its conversions 8k, '%.0f' formatting of `exp`
// 5k, a table reply 4.6k. Server instructions per new key (perf stat -e
// instructions:u on redis-server, EVALSHA -P 16): 67k -> 39k.
const CLAIM: &str = r"
local key = KEYS[1]
if redis.call('EXISTS', key) == 1 then
  local now = tonumber(ARGV[4])
  if not now then
    local t = redis.call('TIME')
    now = t[1] * 1000000 + t[2]
  end
  local h = redis.call('HMGET', key, 'st', 'fp', 'exp', 'res')
  if h[1] ~= 'p' and h[1] ~= 'c' then return {-1} end
  local left
  if h[3] then
    local exp = tonumber(h[3])
    if exp and exp > now then left = exp - now end
  elseif h[1] == 'p' then
    -- A claim without exp lasts as long as its key.
    local ms = redis.call('PTTL', key)
    if ms >= 0 then left = ms * 1000 end
  end
  if left then
    if h[2] ~= ARGV[1] then return {4} end
    if h[1] == 'p' then return {2, left} end
    if h[4] then return {3, 1, h[4]} end
    return {3, 0}
  end
  -- An expired entry's fields (e.g. an old result) must not survive.
  redis.call('DEL', key)
end
if ARGV[4] then
  redis.call('HSET', key, 'st', 'p', 'fp', ARGV[1], 'tok', ARGV[2],
    'exp', string.format('%d', ARGV[4] + ARGV[5]))
else
  redis.call('HSET', key, 'st', 'p', 'fp', ARGV[1], 'tok', ARGV[2])
end
redis.call('PEXPIRE', key, ARGV[3])
return 1
";

/// Shared prologue of the owner operations: 1 if `ARGV[3]` holds a pending,
/// unexpired claim of `KEYS[1]`, else returns 0 (lease lost). A claim
/// without `exp` is unexpired while its key exists.
const LUA_OWNER: &str = r"
local key = KEYS[1]
local h = redis.call('HMGET', key, 'st', 'tok', 'exp')
if h[1] ~= 'p' or h[2] ~= ARGV[3] or (h[3] and not (tonumber(h[3]) and tonumber(h[3]) > now)) then
  if not h[1] and redis.call('EXISTS', key) == 1 then return -1 end
  return 0
end
";

// ARGV: now, margin_ms, token, retention_us, has_result ('1'/'0'), result
const COMPLETE_BODY: &str = r"
local retention = tonumber(ARGV[4])
redis.call('HSET', key, 'st', 'c', 'exp', string.format('%.0f', now + retention))
if ARGV[5] == '1' then
  redis.call('HSET', key, 'res', ARGV[6])
else
  redis.call('HDEL', key, 'res')
end
redis.call('PEXPIRE', key, pttl(retention))
return 1
";

// ARGV: now, margin_ms, token
const RELEASE_BODY: &str = r"
redis.call('DEL', key)
return 1
";

// ARGV: now, margin_ms, token, by_us
const EXTEND_BODY: &str = r"
local by = tonumber(ARGV[4])
redis.call('HSET', key, 'exp', string.format('%.0f', now + by))
redis.call('PEXPIRE', key, pttl(by))
return 1
";

struct Scripts {
    claim: Script,
    complete: Script,
    release: Script,
    extend: Script,
}

impl Scripts {
    fn new() -> Self {
        let owner = |body: &str| Script::new(&format!("{LUA_NOW}{LUA_PTTL}{LUA_OWNER}{body}"));
        Self {
            claim: Script::new(CLAIM),
            complete: owner(COMPLETE_BODY),
            release: owner(RELEASE_BODY),
            extend: owner(EXTEND_BODY),
        }
    }
}

/// An [`IdempotencyStore`] in Redis: exactly one `Acquired` per key across
/// every process that shares the Redis.
///
/// See the [module docs](self) for the layout and an example.
pub struct RedisIdempotencyStore {
    client: RedisClient,
    scripts: Scripts,
    max_result_bytes: usize,
    clock_override: Option<SharedClock>,
    /// Claims sent whose answer never came (see [`Unanswered`]).
    unanswered: Unanswered,
}

impl fmt::Debug for RedisIdempotencyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisIdempotencyStore")
            .field("client", &self.client)
            .field("max_result_bytes", &self.max_result_bytes)
            .field("clock_override", &self.clock_override.is_some())
            .finish()
    }
}

/// Builds a [`RedisIdempotencyStore`]; see [`RedisIdempotencyStore::builder`].
#[derive(Debug)]
#[must_use]
pub struct RedisIdempotencyStoreBuilder {
    client: RedisClient,
    max_result_bytes: usize,
    clock_override: Option<SharedClock>,
}

impl RedisIdempotencyStoreBuilder {
    /// The largest result `complete` stores, checked before sending.
    /// Default [`DEFAULT_MAX_RESULT_BYTES`] (1 MiB).
    pub fn max_result_bytes(mut self, n: usize) -> Self {
        self.max_result_bytes = n;
        self
    }

    /// **Tests only.** The scripts take `now` from `clock` instead of Redis
    /// `TIME` (see [`RedisClient::with_clock_override`]).
    pub fn clock_override(mut self, clock: SharedClock) -> Self {
        self.clock_override = Some(clock);
        self
    }

    /// Builds the store.
    pub fn build(self) -> RedisIdempotencyStore {
        let clock_override = self
            .clock_override
            .or_else(|| self.client.clock_override().cloned());
        let scripts = Scripts::new();
        self.client.preload(&[
            &scripts.claim,
            &scripts.complete,
            &scripts.release,
            &scripts.extend,
        ]);
        RedisIdempotencyStore {
            client: self.client,
            scripts,
            max_result_bytes: self.max_result_bytes,
            clock_override,
            unanswered: Unanswered::default(),
        }
    }
}

impl RedisIdempotencyStore {
    /// A store on `client` with default settings.
    pub fn new(client: RedisClient) -> Self {
        Self::builder(client).build()
    }

    /// A builder, to set the result limit or a test clock.
    pub fn builder(client: RedisClient) -> RedisIdempotencyStoreBuilder {
        RedisIdempotencyStoreBuilder {
            client,
            max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
            clock_override: None,
        }
    }

    /// The client this store uses.
    pub fn client(&self) -> &RedisClient {
        &self.client
    }

    fn key(&self, id: &str) -> Result<String> {
        self.client.key_space().key(Primitive::Idempotency, id)
    }

    /// `EVALSHA` of `script` on `key` with its first two arguments, `now`
    /// and `margin_ms`, ready for `extra` more.
    fn call(&self, script: &Script, key: &str, extra: usize) -> Cmd {
        let mut cmd = evalsha(script, 1, 3 + extra);
        cmd.arg(key);
        push_now(&mut cmd, self.clock_override.as_ref());
        cmd.arg(self.margin_ms());
        cmd
    }

    /// Refuses a server that may evict claims, unless accepted (see
    /// [`RedisClient::check_eviction`]).
    async fn check_eviction(&self) -> Result<()> {
        self.client
            .check_eviction("idempotency", self.client.on_evicting_policy())
            .await
    }

    /// Physical TTL margin: see [`OVERRIDE_MARGIN_MS`].
    fn margin_ms(&self) -> u64 {
        if self.clock_override.is_some() {
            OVERRIDE_MARGIN_MS
        } else {
            0
        }
    }

    /// One claim script run. A claim sent without an answer coming back
    /// is remembered (see [`Unanswered`]).
    async fn claim_once(
        &self,
        key: &str,
        redis_key: &str,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Claim> {
        self.check_eviction().await?;
        let token = LeaseToken::generate();
        let lease_us = positive_us(lease);
        let mut cmd = evalsha(&self.scripts.claim, 1, 6);
        cmd.arg(redis_key)
            .arg(fingerprint.as_bytes())
            .arg(token.to_string())
            .arg(lease_us.div_ceil(1000) + self.margin_ms());
        if let Some(clock) = &self.clock_override {
            cmd.arg(clock.now().as_micros()).arg(lease_us);
        }
        let sent = self.unanswered.sent(key, token, lease);
        let reply = self
            .client
            .eval(&self.scripts.claim, &cmd, redis_key)
            .await?;
        sent.answered();
        let items = match &reply {
            Value::Int(CODE_ACQUIRED) => return Ok(Claim::Acquired(Lease::new(key, token))),
            Value::Array(items) => items.as_slice(),
            _ => return Err(unexpected(redis_key, reply)),
        };
        match items.first().and_then(int) {
            Some(CODE_IN_PROGRESS) => {
                let left = items.get(1).and_then(int).unwrap_or(0);
                Ok(Claim::InProgress {
                    retry_after: Duration::from_micros(u64::try_from(left).unwrap_or(0)),
                })
            }
            Some(CODE_COMPLETED) => match (items.get(1).and_then(int), items.get(2)) {
                (Some(1), Some(Value::BulkString(b))) => {
                    Ok(Claim::Completed(Some(Bytes::from(b.clone()))))
                }
                (Some(1), Some(Value::SimpleString(s))) => {
                    Ok(Claim::Completed(Some(Bytes::from(s.clone()))))
                }
                (Some(1), Some(Value::Okay)) => {
                    Ok(Claim::Completed(Some(Bytes::from_static(b"OK"))))
                }
                (Some(0), _) => Ok(Claim::Completed(None)),
                _ => Err(unexpected(redis_key, reply)),
            },
            Some(CODE_MISMATCH) => Ok(Claim::Mismatch),
            Some(CODE_WRONG_TYPE) => Err(wrong_type(redis_key)),
            _ => Err(unexpected(redis_key, reply)),
        }
    }

    /// Releases the holds of `key`'s unanswered claims (see
    /// [`Unanswered`]); `true` if one held it. A release that gets no
    /// answer either is kept for the next time.
    async fn release_unanswered(&self, key: &str, redis_key: &str) -> bool {
        let mut released = false;
        for (token, until) in self.unanswered.take(key) {
            let mut cmd = self.call(&self.scripts.release, redis_key, 1);
            cmd.arg(token.to_string());
            match self
                .client
                .eval(&self.scripts.release, &cmd, redis_key)
                .await
            {
                Ok(reply) => released |= int(&reply) == Some(1),
                Err(_) => self.unanswered.remember(key, (token, until)),
            }
        }
        released
    }

    /// Runs an owner-checked script: `Ok` if the lease held the key.
    /// `extra` appends the arguments after the token.
    async fn owned(
        &self,
        script: &Script,
        lease: &Lease,
        extra: usize,
        args: impl FnOnce(&mut Cmd),
    ) -> Result<()> {
        let key = self.key(lease.key())?;
        self.check_eviction().await?;
        let mut cmd = self.call(script, &key, 1 + extra);
        cmd.arg(lease.token().to_string());
        args(&mut cmd);
        let reply = self.client.eval(script, &cmd, &key).await?;
        match int(&reply) {
            Some(1) => Ok(()),
            Some(0) => Err(Error::lease_lost(lease.key())),
            Some(CODE_WRONG_TYPE) => Err(wrong_type(&key)),
            _ => Err(unexpected(&key, reply)),
        }
    }
}

fn wrong_type(key: &str) -> Error {
    Error::WrongType {
        backend: BACKEND,
        key: key.to_string(),
    }
}

fn positive_us(d: Duration) -> u64 {
    duration_micros(d).max(1)
}

#[async_trait]
impl IdempotencyStore for RedisIdempotencyStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(BACKEND).with_distributed(true)
    }

    async fn claim(&self, key: &str, fingerprint: &Fingerprint, lease: Duration) -> Result<Claim> {
        let redis_key = self.key(key)?;
        check_lease_duration("lease", lease)?;
        let claim = self.claim_once(key, &redis_key, fingerprint, lease).await?;
        if matches!(claim, Claim::InProgress { .. })
            && self.release_unanswered(key, &redis_key).await
        {
            return self.claim_once(key, &redis_key, fingerprint, lease).await;
        }
        Ok(claim)
    }

    async fn complete(
        &self,
        lease: &Lease,
        result: Option<Bytes>,
        retention: Duration,
    ) -> Result<()> {
        check_lease_duration("retention", retention)?;
        check_result_size(result.as_ref(), self.max_result_bytes)?;
        self.owned(&self.scripts.complete, lease, 3, |cmd| {
            cmd.arg(positive_us(retention));
            match &result {
                Some(r) => cmd.arg("1").arg(r.as_ref()),
                None => cmd.arg("0").arg(""),
            };
        })
        .await
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        self.owned(&self.scripts.release, lease, 0, |_| {}).await
    }

    async fn extend(&self, lease: &Lease, by: Duration) -> Result<()> {
        check_lease_duration("by", by)?;
        self.owned(&self.scripts.extend, lease, 1, |cmd| {
            cmd.arg(positive_us(by));
        })
        .await
    }
}
