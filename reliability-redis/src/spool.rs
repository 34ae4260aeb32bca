//! [`RedisSpool`]: the store-and-forward queue in Redis (standalone,
//! Sentinel or Cluster). The type's docs describe the key layout, why it
//! is not a Redis stream, and how durability is reported.

use std::fmt;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_redis::redis::{cmd, Script, Value};
use reliability_core::clock::duration_micros;
use reliability_core::config::OnEvictingPolicy;
use reliability_core::key::validate_segment;
use reliability_core::{
    Capabilities, DeadReason, DeadRecord, Durability, Enqueued, Error, KeySpace, LeaseToken,
    Leased, NackOutcome, NewRecord, Primitive, Record, RecordId, Result, Spool, SpoolLimits,
    SpoolStats, SpoolToken, Timestamp, UnavailableReason,
};
use tokio::sync::OnceCell;

use crate::client::{Mode, RedisClient};
use crate::error::{unexpected, BACKEND};

/// Shared head of every script: key names, `now`, helpers.
///
/// `KEYS`: meta, ready, delay, lease, age, dead (and, for the scripts of
/// one owned record, its key as `KEYS[7]`). `ARGV[1]`: the time in
/// microseconds, or empty for the server's `TIME`; `ARGV[2]`: the prefix of
/// record keys (`{B}:r:`).
const PRELUDE: &str = r#"
local meta, ready, delay, lease, age, dead = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local rp = ARGV[2]
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function str(n) return string.format('%.0f', n) end
local function member(seq, id) return string.format('%016x', seq) .. id end
local function kind(k)
  local t = redis.call('TYPE', k)['ok']
  if t ~= 'none' and t ~= 'hash' then
    error({err = 'WRONGTYPE spool record key ' .. k .. ' holds a ' .. t})
  end
  return t
end
local function bury(k, id, code, msg)
  redis.call('ZREM', age, id)
  local seq = redis.call('HINCRBY', meta, 'seq', 1)
  redis.call('HSET', k, 'dc', code, 'dm', msg, 'da', str(now))
  redis.call('HDEL', k, 't', 'u')
  redis.call('ZADD', dead, seq, id)
  if code == 'expired' then redis.call('HINCRBY', meta, 'expired', 1) end
end
-- The record ARGV[3] (key KEYS[7]) if lease token ARGV[4] holds it, taken
-- out of the lease and ready indexes: its key, id and enqueued_at.
-- Otherwise nil and 'gone' (no such record) or 'lost' (dead, or another
-- lease or none holds it).
local function owned()
  local id, token = ARGV[3], ARGV[4]
  local k = KEYS[7]
  if kind(k) == 'none' then return nil, 'gone' end
  local f = redis.call('HMGET', k, 't', 'da', 's', 'e')
  if f[2] or f[1] ~= token then return nil, 'lost' end
  redis.call('ZREM', lease, id)
  redis.call('ZREM', ready, member(tonumber(f[3]), id))
  return k, id, tonumber(f[4])
end
"#;

/// `ARGV[3]` max records, `ARGV[4]` max bytes, then five per record: id,
/// payload, delay µs, attempts, enqueued_at µs (empty: now).
/// Returns `{'ok', accepted, duplicates}` or `{'full', limit}`.
const ENQUEUE: &str = r#"
local max_records, max_bytes = tonumber(ARGV[3]), tonumber(ARGV[4])
local fresh, dup, add = {}, 0, 0
for i = 5, #ARGV, 5 do
  if kind(rp .. ARGV[i]) == 'none' then
    fresh[#fresh + 1] = i
    add = add + string.len(ARGV[i + 1])
  else
    dup = dup + 1
  end
end
local held = redis.call('ZCARD', age) + redis.call('ZCARD', dead)
if held + #fresh > max_records then return {'full', 'records'} end
local bytes = tonumber(redis.call('HGET', meta, 'bytes') or '0')
if bytes + add > max_bytes then return {'full', 'bytes'} end
for _, i in ipairs(fresh) do
  local id = ARGV[i]
  local seq = redis.call('HINCRBY', meta, 'seq', 1)
  local e = now
  if ARGV[i + 4] ~= '' then e = tonumber(ARGV[i + 4]) end
  local due = now + tonumber(ARGV[i + 2])
  redis.call('HSET', rp .. id, 'p', ARGV[i + 1], 'a', ARGV[i + 3], 'e', str(e), 's', seq)
  redis.call('ZADD', age, str(e), id)
  if due <= now then
    redis.call('ZADD', ready, str(e), member(seq, id))
  else
    redis.call('ZADD', delay, str(due), id)
  end
end
if add > 0 then redis.call('HINCRBY', meta, 'bytes', add) end
return {'ok', #fresh, dup}
"#;

/// `ARGV[3]` max, `ARGV[4]` ttl µs, `ARGV[5]` retention µs, `ARGV[6]` the
/// first 24 hex digits of this call's tokens (the last 8 count up).
/// Returns five items per leased record: id, payload, attempts,
/// enqueued_at, token.
const LEASE: &str = r#"
local max, ttl, retention, base = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
-- Each record is read before an index changes: a read refused (ACL)
-- stops the script before it wrote anything of that record.
local function promote(index)
  local ids = redis.call('ZRANGE', index, '-inf', str(now), 'BYSCORE')
  for _, id in ipairs(ids) do
    local f = redis.call('HMGET', rp .. id, 's', 'e')
    redis.call('ZREM', index, id)
    redis.call('ZADD', ready, f[2], member(tonumber(f[1]), id))
  end
end
promote(delay)
promote(lease)
local out, n, until_ = {}, 0, str(now + ttl)
while n < max do
  local m = redis.call('ZRANGE', ready, 0, 0)
  if #m == 0 then break end
  local id = string.sub(m[1], 17)
  local k = rp .. id
  local f = redis.call('HMGET', k, 'e', 'a', 'p')
  redis.call('ZREM', ready, m[1])
  if tonumber(f[1]) + retention <= now then
    bury(k, id, 'expired', '')
  else
    n = n + 1
    local a = tonumber(f[2]) + 1
    local token = base .. string.format('%08x', n)
    redis.call('HSET', k, 'a', a, 't', token, 'u', until_)
    redis.call('ZADD', lease, until_, id)
    out[#out + 1] = id
    out[#out + 1] = f[3]
    out[#out + 1] = a
    out[#out + 1] = f[1]
    out[#out + 1] = token
  end
end
return out
"#;

/// `ARGV[3]` id, `ARGV[4]` token. Returns 'ok', 'gone' or 'lost'.
const ACK: &str = r#"
local k, id = owned()
if not k then return id end
local n = redis.call('HSTRLEN', k, 'p')
redis.call('DEL', k)
redis.call('ZREM', age, id)
if n > 0 then redis.call('HINCRBY', meta, 'bytes', -n) end
return 'ok'
"#;

/// `ARGV[3]` id, `ARGV[4]` token, `ARGV[5]` retry in µs, `ARGV[6]`
/// retention µs. Returns 'ok' (scheduled), 'dead' (expired), 'gone' or
/// 'lost'.
const NACK: &str = r#"
local retry, retention = tonumber(ARGV[5]), tonumber(ARGV[6])
local k, id, e = owned()
if not k then return id end
if e + retention <= now then
  bury(k, id, 'expired', '')
  return 'dead'
end
redis.call('HDEL', k, 't', 'u')
redis.call('ZADD', delay, str(now + retry), id)
return 'ok'
"#;

/// `ARGV[3]` id, `ARGV[4]` token, `ARGV[5]` µs from now. Returns 'ok',
/// 'gone' or 'lost'.
const EXTEND: &str = r#"
local until_ = str(now + tonumber(ARGV[5]))
local k, id = owned()
if not k then return id end
redis.call('HSET', k, 'u', until_)
redis.call('ZADD', lease, until_, id)
return 'ok'
"#;

/// `ARGV[3]` id, `ARGV[4]` token, `ARGV[5]` reason code, `ARGV[6]` reason
/// text. Returns 'ok', 'gone' or 'lost'.
const DEAD_LETTER: &str = r#"
local k, id = owned()
if not k then return id end
bury(k, id, ARGV[5], ARGV[6])
return 'ok'
"#;

/// `ARGV[3]` max. Returns seven items per dead record: id, payload,
/// attempts, enqueued_at, reason code, reason text, dead_at.
const LIST_DEAD: &str = r#"
local ids = redis.call('ZRANGE', dead, 0, tonumber(ARGV[3]) - 1)
local out = {}
for _, id in ipairs(ids) do
  local f = redis.call('HMGET', rp .. id, 'p', 'a', 'e', 'dc', 'dm', 'da')
  out[#out + 1] = id
  for j = 1, 6 do out[#out + 1] = f[j] or '' end
end
return out
"#;

/// `ARGV[3]` max. Returns how many records moved back to ready.
const REDRIVE_DEAD: &str = r#"
local ids = redis.call('ZRANGE', dead, 0, tonumber(ARGV[3]) - 1)
for _, id in ipairs(ids) do
  local k = rp .. id
  local e = redis.call('HGET', k, 'e')
  local seq = redis.call('HINCRBY', meta, 'seq', 1)
  redis.call('ZREM', dead, id)
  redis.call('HDEL', k, 'dc', 'dm', 'da')
  redis.call('HSET', k, 'a', 0, 's', seq)
  redis.call('ZADD', age, e, id)
  redis.call('ZADD', ready, e, member(seq, id))
end
return #ids
"#;

/// `ARGV[3]` max. Returns how many dead records were deleted.
const PURGE_DEAD: &str = r#"
local ids = redis.call('ZRANGE', dead, 0, tonumber(ARGV[3]) - 1)
local freed = 0
for _, id in ipairs(ids) do
  local k = rp .. id
  freed = freed + redis.call('HSTRLEN', k, 'p')
  redis.call('DEL', k)
  redis.call('ZREM', dead, id)
end
if freed > 0 then redis.call('HINCRBY', meta, 'bytes', -freed) end
return #ids
"#;

/// Returns ready, delayed, leased, dead, oldest enqueued_at (or empty),
/// bytes, expired total, now.
const STATS: &str = r#"
local n = str(now)
local ready_n = redis.call('ZCARD', ready) + redis.call('ZCOUNT', delay, '-inf', n)
  + redis.call('ZCOUNT', lease, '-inf', n)
local delayed = redis.call('ZCOUNT', delay, '(' .. n, '+inf')
local leased = redis.call('ZCOUNT', lease, '(' .. n, '+inf')
local oldest = redis.call('ZRANGE', age, 0, 0, 'WITHSCORES')
local m = redis.call('HMGET', meta, 'bytes', 'expired')
return {ready_n, delayed, leased, redis.call('ZCARD', dead), oldest[2] or '', m[1] or '0', m[2] or '0', n}
"#;

/// The default bound of what one enqueue (one script call) carries,
/// counted by [`call_weight`]: 16 MiB, at most 8,192 records.
pub const DEFAULT_MAX_CALL_BYTES: usize = 16 << 20;

/// What a record costs one script call beyond its id and payload, in the
/// bytes of [`DEFAULT_MAX_CALL_BYTES`]: the server's work per record
/// (argument hand-over to Lua, `TYPE`, `HSET`, two `ZADD`) weighs as much as
/// 2 KiB of payload. Measured on 2 cores: 100,000 records of 16 bytes took
/// the server ~740 ms in one call, ~7 µs each, so 8,192 take ~60 ms.
pub const RECORD_CALL_OVERHEAD: usize = 2048;

/// The weight of `batch` in one script call: its ids and payloads plus
/// [`RECORD_CALL_OVERHEAD`] per record.
pub fn call_weight(batch: &[NewRecord]) -> usize {
    batch.iter().fold(0usize, |w, r| {
        w.saturating_add(r.id.as_str().len() + r.payload.len() + RECORD_CALL_OVERHEAD)
    })
}

/// The compiled scripts (prelude + body).
struct Scripts {
    enqueue: Script,
    lease: Script,
    ack: Script,
    nack: Script,
    extend: Script,
    dead_letter: Script,
    list_dead: Script,
    redrive_dead: Script,
    purge_dead: Script,
    stats: Script,
}

impl Scripts {
    fn all(&self) -> [&Script; 10] {
        [
            &self.enqueue,
            &self.lease,
            &self.ack,
            &self.nack,
            &self.extend,
            &self.dead_letter,
            &self.list_dead,
            &self.redrive_dead,
            &self.purge_dead,
            &self.stats,
        ]
    }
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| {
    let s = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
    Scripts {
        enqueue: s(ENQUEUE),
        lease: s(LEASE),
        ack: s(ACK),
        nack: s(NACK),
        extend: s(EXTEND),
        dead_letter: s(DEAD_LETTER),
        list_dead: s(LIST_DEAD),
        redrive_dead: s(REDRIVE_DEAD),
        purge_dead: s(PURGE_DEAD),
        stats: s(STATS),
    }
});

/// A [`Spool`] in Redis: shared by every process that opens the same
/// namespace on the same server, Sentinel group or Cluster.
///
/// Enforces every [`SpoolLimits`] (dead records count: nothing is dropped
/// to make room), checks owner tokens on `ack`/`nack`/`extend`/
/// `dead_letter`, and keeps dead letters until
/// [`purge_dead`](Spool::purge_dead).
///
/// ```no_run
/// use std::time::Duration;
/// use reliability_core::config::{RedisConfig, RedisUrl};
/// use reliability_core::{KeySpace, NewRecord, RecordId, Spool, SpoolLimits};
/// use reliability_redis::{RedisClient, RedisSpool};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> reliability_core::Result<()> {
/// let cfg = RedisConfig::standalone(RedisUrl::new("redis://127.0.0.1:6379/0")?);
/// let client = RedisClient::connect(&cfg, KeySpace::new("gateway", "default")?).await?;
/// let spool = RedisSpool::builder(client, "webhooks")
///     .limits(SpoolLimits::default().with_max_records(50_000))
///     .open()
///     .await?;
/// spool
///     .enqueue(vec![NewRecord::new(RecordId::new("evt_1")?, "payload")])
///     .await?;
/// for leased in spool.lease(10, Duration::from_secs(30)).await? {
///     // deliver leased.record.payload, then:
///     spool.ack(&leased.token).await?;
/// }
/// # Ok(())
/// # }
/// ```
///
/// # Layout
///
/// Everything of one spool lives under one hash tag, the spool's base
/// `{prefix}:spool:{namespace}` in braces, so every key of a spool hashes to
/// the same Cluster slot and every script is Cluster-safe:
///
/// | key | type | holds |
/// |---|---|---|
/// | `{B}:r:<id>` | hash | one record: `p` payload, `a` attempts, `e` enqueued_at (µs), `s` sequence number; while leased `t` token and `u` lease end (µs); once dead `dc` reason code, `dm` reason text, `da` dead_at (µs) |
/// | `{B}:ready` | zset | records found due and not leased (or whose lease expired), score `enqueued_at`, member the sequence number as 16 hex digits then the id, so equal scores sort in enqueue order: `ZPOPMIN` takes the oldest |
/// | `{B}:delay` | zset | records not yet found due, score the due time (µs), member the id |
/// | `{B}:lease` | zset | leased records, score the lease end (µs), member the id |
/// | `{B}:age` | zset | every live (ready, delayed or leased) record, score `enqueued_at`: the oldest age, and the live count |
/// | `{B}:dead` | zset | dead-lettered records, score the order they died |
/// | `{B}:meta` | hash | `seq` (the sequence counter), `bytes` (payload bytes held, dead included), `expired` (records dead-lettered for retention) |
///
/// A record key exists exactly as long as the record is held (live or
/// dead), so duplicate ids are found with one `TYPE` per id. `lease` first
/// moves every record of `delay` and `lease` whose score has passed into
/// `ready` (an expired lease makes its record due again without any timer),
/// then pops the oldest of `ready`. The limits are arguments of the scripts,
/// not stored state: a spool reopened with other limits enforces the new
/// ones.
///
/// Every state change is one Lua script (atomic on the server), run with
/// `EVALSHA` (reloaded on `NOSCRIPT`). Time is the server's `TIME` in
/// microseconds: one clock for every replica of the service, no client skew.
/// Keys carry no TTL: nothing expires or is evicted behind the spool's back,
/// and [`RedisSpoolBuilder::open`] refuses a server whose `maxmemory-policy`
/// may evict keys.
///
/// # ACL
///
/// A Redis ACL user of the spool needs every key under its hash tag:
/// `~{prefix:spool:namespace}:*` (`~{prefix:spool:*` for every namespace
/// of a prefix). The scripts of one owned record (`ack`, `nack`,
/// `extend`, `dead_letter`) declare its key; `enqueue` and the scripts that
/// find records as they run (`lease`, `list_dead`, `redrive_dead`,
/// `purge_dead`) reach record keys they cannot declare, all under the same
/// tag. Every script reads a record before it changes anything of it, so a
/// narrower pattern that refuses record keys refuses the call before the
/// spool changes (`tests/spool_acl.rs`).
///
/// # Why not Redis Streams
///
/// A stream with a consumer group gives at-least-once delivery and
/// `XAUTOCLAIM` for crashed consumers, but on Redis 7.0 it cannot keep the
/// rest of the contract: an entry cannot be delayed (a retry in 5 minutes
/// would need a second structure anyway, and re-adding changes the entry id);
/// `XACK` takes any consumer's word, so a stale consumer could ack a record
/// another one now holds (the contract wants an owner-checked token);
/// producer ids cannot be deduplicated (`XADD IDMP` is Redis 8.6); acking
/// and deleting in one step needs `XACKDEL` (8.2); and the only way to bound
/// a stream, `MAXLEN` trimming, drops pending entries. Dead letters with
/// redrive and an all-or-nothing `Full` check counting dead records come
/// naturally with sorted sets. So the spool uses sorted sets and hashes (the
/// design omniqueue and BullMQ use for delayed jobs), and no stream.
///
/// # Durability
///
/// At open the spool reads `CONFIG GET appendonly` / `appendfsync`:
/// `appendfsync always` is [`Durability::Synced`], `everysec` is
/// [`Durability::Periodic`] (1 s), `no` is [`Durability::Flushed`] (Redis
/// writes the AOF before it replies), and no AOF is
/// [`Durability::Volatile`]. With [`RedisSpoolBuilder::wait_replicas`] each
/// enqueue also runs `WAIT` and reports [`Durability::Replicated`]. Where
/// `CONFIG` is refused (managed Redis), the spool reports `Volatile` and
/// logs why. In a Cluster, `CONFIG GET` reaches one node (redis-rs routes
/// it to a random one), so give every node the same settings; `WAIT` is not
/// offered there (the builder refuses it).
///
/// # Costs
///
/// `enqueue` is `O(batch × log n)` in one round trip (one script call, so
/// a batch is bounded: see [`RedisSpoolBuilder::max_call_bytes`]); `ack`, `nack`,
/// `extend`, `dead_letter` and `stats` are `O(log n)`; `lease` is
/// `O((came due + leased) × log n)`: each record is moved from `delay` or
/// `lease` to `ready` once per time it comes due.
#[derive(Clone)]
pub struct RedisSpool {
    client: RedisClient,
    keys: Vec<String>,
    record_prefix: String,
    base: String,
    namespace: String,
    limits: SpoolLimits,
    /// The server's own durability (AOF settings), without `WAIT`: read
    /// at open, or on the first call of a [lazily
    /// opened](RedisSpoolBuilder::open_lazy) spool.
    checked: Arc<OnceCell<Durability>>,
    wait: Option<(u32, Duration)>,
    max_call_bytes: usize,
}

/// Builder of a [`RedisSpool`]; see [`RedisSpool::builder`].
#[must_use]
pub struct RedisSpoolBuilder {
    client: RedisClient,
    namespace: String,
    limits: SpoolLimits,
    wait: Option<(u32, Duration)>,
    max_call_bytes: usize,
}

impl fmt::Debug for RedisSpoolBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSpoolBuilder")
            .field("namespace", &self.namespace)
            .field("limits", &self.limits)
            .field("wait", &self.wait)
            .field("max_call_bytes", &self.max_call_bytes)
            .finish_non_exhaustive()
    }
}

impl RedisSpoolBuilder {
    /// The limits to enforce. Default: [`SpoolLimits::default`].
    pub fn limits(mut self, limits: SpoolLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The most one enqueue carries, by [`call_weight`] (ids, payloads and
    /// [`RECORD_CALL_OVERHEAD`] per record). A larger batch is refused
    /// before anything is sent ([`Error::TooLarge`], `what: "batch"`):
    /// one script call runs alone on the server, and one that outlives the
    /// caller's timeout is reported failed although it stored the whole
    /// batch (a retry elsewhere then stores it twice). Default
    /// [`DEFAULT_MAX_CALL_BYTES`].
    pub fn max_call_bytes(mut self, n: usize) -> Self {
        self.max_call_bytes = n.max(1);
        self
    }

    /// After each enqueue, `WAIT` until `replicas` replicas acknowledged the
    /// batch or `timeout` passed, and report
    /// [`Durability::Replicated`]. If fewer acknowledge in time, the batch
    /// is still stored on the master: `enqueue` answers the server's own
    /// durability when that is not volatile, else an unavailable error
    /// (retrying is safe: the ids are then duplicates). `replicas == 0`
    /// turns this off.
    pub fn wait_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.wait = (replicas > 0).then_some((replicas, timeout));
        self
    }

    /// Checks the server and opens the spool.
    ///
    /// # Errors
    /// [`Error::InvalidKey`] for a bad namespace; [`Error::Config`] when the
    /// server's `maxmemory-policy` may evict keys, or for
    /// [`wait_replicas`](Self::wait_replicas) on a Cluster; unavailable
    /// errors.
    pub async fn open(self) -> Result<RedisSpool> {
        let spool = self.open_lazy()?;
        spool.checked().await.map_err(|e| match e {
            // Refused at open: a deployment error, not an outage.
            Error::Unavailable {
                reason: UnavailableReason::Misconfigured,
                message,
                ..
            } => Error::config("redis.maxmemory-policy", message),
            other => other,
        })?;
        tracing::debug!(spool = %spool.base, durability = ?spool.durability(), "redis spool opened");
        Ok(spool)
    }

    /// Opens the spool without contacting the server, for a service that
    /// must start while Redis is down (behind a
    /// [`Fallback`](reliability_core::fallback::Fallback)). The checks of
    /// [`open`](Self::open) run on the first call that reaches the server,
    /// and that call fails with their error (an evicting policy is
    /// unavailable, [`UnavailableReason::Misconfigured`], so a `Fallback`
    /// answers from its secondary; the policy is read again at most every
    /// few seconds, not on every call); until they succeed,
    /// [`durability`](RedisSpool::durability) says
    /// [`Durability::Volatile`] (nothing is known yet).
    ///
    /// # Errors
    /// [`Error::InvalidKey`] for a bad namespace; [`Error::Config`] for
    /// [`wait_replicas`](Self::wait_replicas) on a Cluster.
    pub fn open_lazy(self) -> Result<RedisSpool> {
        validate_segment(&self.namespace)?;
        if self.wait.is_some() && self.client.mode() == Mode::Cluster {
            return Err(Error::config(
                "redis.cluster",
                "the spool cannot WAIT for replicas in a Cluster (the client does not offer it)",
            ));
        }
        self.client.preload(&SCRIPTS.all());
        let key_space = KeySpace::new(self.client.key_space().prefix(), &self.namespace)?;
        let base = key_space.base(Primitive::Spool);
        let tagged = format!("{{{base}}}");
        let keys = ["meta", "ready", "delay", "lease", "age", "dead"]
            .iter()
            .map(|k| format!("{tagged}:{k}"))
            .collect();
        Ok(RedisSpool {
            record_prefix: format!("{tagged}:r:"),
            client: self.client,
            keys,
            base,
            namespace: self.namespace,
            limits: self.limits,
            checked: Arc::new(OnceCell::new()),
            wait: self.wait,
            max_call_bytes: self.max_call_bytes,
        })
    }
}

/// Reads the eviction policy (refusing evicting ones: unavailable,
/// misconfigured, from the client's cached read, so a failing check never
/// repeats `CONFIG GET` on every call) and the AOF settings.
async fn server_durability(client: &RedisClient) -> Result<Durability> {
    if client.maxmemory_policy().await? == crate::Policy::Unknown {
        // CONFIG refused (the client warned): nothing to read the AOF with.
        return Ok(Durability::Volatile);
    }
    client
        .check_eviction("spool record", OnEvictingPolicy::Refuse)
        .await?;
    let mut c = cmd("CONFIG");
    c.arg("GET").arg("appendonly");
    let aof = config_value(client.query(&c).await, "appendonly");
    let mut c = cmd("CONFIG");
    c.arg("GET").arg("appendfsync");
    let fsync = config_value(client.query(&c).await, "appendfsync");
    Ok(match (aof, fsync) {
        (Ok(Some(a)), Ok(Some(f))) if a.eq_ignore_ascii_case("yes") => {
            match f.to_ascii_lowercase().as_str() {
                "always" => Durability::Synced,
                "everysec" => Durability::Periodic {
                    interval: Duration::from_secs(1),
                },
                _ => Durability::Flushed,
            }
        }
        (Ok(_), Ok(_)) => Durability::Volatile,
        (Err(e), _) | (_, Err(e)) => {
            if e.is_unavailable() {
                return Err(e);
            }
            tracing::warn!(error = %e, "redis spool: cannot read the AOF settings; reporting volatile");
            Durability::Volatile
        }
    })
}

/// The value of a `CONFIG GET name` reply (RESP2 array or RESP3 map).
pub(crate) fn config_value(reply: Result<Value>, name: &str) -> Result<Option<String>> {
    let reply = reply?;
    let pairs: Vec<(Value, Value)> = match reply {
        Value::Array(items) => {
            let mut it = items.into_iter();
            let mut pairs = Vec::new();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                pairs.push((k, v));
            }
            pairs
        }
        Value::Map(pairs) => pairs,
        other => return Err(unexpected("CONFIG GET", other)),
    };
    Ok(pairs.into_iter().find_map(|(k, v)| {
        let k = text(&k)?;
        k.eq_ignore_ascii_case(name).then(|| text(&v)).flatten()
    }))
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Okay => Some("OK".into()),
        _ => None,
    }
}

fn bytes_of(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.into_bytes()),
        _ => None,
    }
}

fn num(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::Double(d) if *d >= 0.0 => Some(*d as u64),
        _ => {
            let s = text(v)?;
            if s.is_empty() {
                return None;
            }
            s.parse::<u64>().ok().or_else(|| {
                s.parse::<f64>()
                    .ok()
                    .filter(|d| *d >= 0.0)
                    .map(|d| d as u64)
            })
        }
    }
}

fn array(v: Value, context: &str) -> Result<Vec<Value>> {
    match v {
        Value::Array(a) => Ok(a),
        Value::Nil => Ok(Vec::new()),
        other => Err(unexpected(context, other)),
    }
}

fn micros(d: Duration) -> Vec<u8> {
    duration_micros(d).to_string().into_bytes()
}

fn encode_reason(reason: &DeadReason) -> (&'static str, String) {
    match reason {
        DeadReason::Rejected(why) => ("rejected", why.clone()),
        other => (other.code(), String::new()),
    }
}

fn decode_reason(code: &str, text: String) -> DeadReason {
    match code {
        "expired" => DeadReason::Expired,
        "retries_exhausted" => DeadReason::RetriesExhausted,
        "rejected" => DeadReason::Rejected(text),
        other if text.is_empty() => DeadReason::Rejected(other.to_string()),
        other => DeadReason::Rejected(format!("{other}: {text}")),
    }
}

/// What an owner-checked script answered.
enum Owned {
    Ok,
    Dead,
    Gone,
    Lost,
}

impl RedisSpool {
    /// A builder for the spool of `namespace` (1 to 64 bytes of
    /// `[A-Za-z0-9_.-]`) under the client's key prefix: its keys are
    /// `{<prefix>:spool:<namespace>}:...`. Two spools with the same prefix
    /// and namespace on the same Redis are the same spool.
    pub fn builder(client: RedisClient, namespace: impl Into<String>) -> RedisSpoolBuilder {
        RedisSpoolBuilder {
            client,
            namespace: namespace.into(),
            limits: SpoolLimits::default(),
            wait: None,
            max_call_bytes: DEFAULT_MAX_CALL_BYTES,
        }
    }

    /// The limits this spool enforces.
    pub fn limits(&self) -> SpoolLimits {
        self.limits
    }

    /// Runs the server checks of [`RedisSpoolBuilder::open`] now, if they
    /// have not passed yet (a lazily opened spool runs them on its first
    /// call otherwise), and returns the server's own durability.
    ///
    /// # Errors
    /// As the first call of a lazily opened spool: unavailable errors, and
    /// unavailable ([`UnavailableReason::Misconfigured`]) for an evicting
    /// `maxmemory-policy`.
    pub async fn check_server(&self) -> Result<Durability> {
        self.checked().await
    }

    /// The most one enqueue carries (see
    /// [`RedisSpoolBuilder::max_call_bytes`]).
    pub fn max_call_bytes(&self) -> usize {
        self.max_call_bytes
    }

    /// The durability an enqueue reports (read from the server at open;
    /// [`Durability::Volatile`] while a lazily opened spool has not reached
    /// the server yet).
    pub fn durability(&self) -> Durability {
        match self.wait {
            Some((replicas, _)) => Durability::Replicated { replicas },
            None => self.server_durability(),
        }
    }

    /// The server's own durability, once checked.
    fn server_durability(&self) -> Durability {
        self.checked.get().copied().unwrap_or(Durability::Volatile)
    }

    /// Runs the open checks once (eviction policy, AOF settings); a failed
    /// check runs again on the next call. They run in a task of their own:
    /// they take round trips, and a caller dropped at its deadline must not
    /// take them along (on a slow link they would never complete).
    async fn checked(&self) -> Result<Durability> {
        if let Some(d) = self.checked.get() {
            return Ok(*d);
        }
        let cell = Arc::clone(&self.checked);
        let client = self.client.clone();
        let check = tokio::spawn(async move {
            cell.get_or_try_init(|| server_durability(&client))
                .await
                .copied()
        });
        check.await.unwrap_or_else(|e| {
            Err(Error::unavailable(
                BACKEND,
                UnavailableReason::Other,
                format!("spool server checks: {e}"),
            ))
        })
    }

    /// `{prefix}:spool:{namespace}`: the hash tag of every key of this spool.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The spool's namespace (the one given to [`RedisSpool::builder`]).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The client this spool runs on.
    pub fn client(&self) -> &RedisClient {
        &self.client
    }

    /// `ARGV[1]`: the override clock's time, or empty for `TIME`.
    fn now_arg(&self) -> Vec<u8> {
        match self.client.clock_override() {
            Some(clock) => clock.now().as_micros().to_string().into_bytes(),
            None => Vec::new(),
        }
    }

    fn args(&self, extra: usize) -> Vec<Vec<u8>> {
        let mut args = Vec::with_capacity(2 + extra);
        args.push(self.now_arg());
        args.push(self.record_prefix.clone().into_bytes());
        args
    }

    async fn run(&self, script: &Script, args: &[Vec<u8>]) -> Result<Value> {
        self.checked().await?;
        self.client.invoke(script, &self.keys, args).await
    }

    async fn owned(
        &self,
        script: &Script,
        token: &SpoolToken,
        extra: &[Vec<u8>],
        context: &str,
    ) -> Result<Owned> {
        let mut args = self.args(2 + extra.len());
        args.push(token.id().as_str().as_bytes().to_vec());
        args.push(token.lease().to_string().into_bytes());
        args.extend_from_slice(extra);
        // The record's key is declared (KEYS[7]), so an ACL refusing it
        // refuses the call before the script runs.
        let mut keys = self.keys.clone();
        keys.push(format!("{}{}", self.record_prefix, token.id().as_str()));
        self.checked().await?;
        let reply = self.client.invoke(script, &keys, &args).await?;
        match text(&reply).as_deref() {
            Some("ok") => Ok(Owned::Ok),
            Some("dead") => Ok(Owned::Dead),
            Some("gone") => Ok(Owned::Gone),
            Some("lost") => Ok(Owned::Lost),
            _ => Err(unexpected(context, reply)),
        }
    }

    /// The durability of a batch `replicas` replicas acknowledged.
    fn replicated(&self, replicas: u32, acked: u32, timeout: Duration) -> Result<Durability> {
        if acked >= replicas {
            return Ok(Durability::Replicated { replicas: acked });
        }
        let own = self.server_durability();
        if own != Durability::Volatile {
            tracing::warn!(
                spool = %self.base, wanted = replicas, acked,
                "redis spool: fewer replicas than asked acknowledged the batch"
            );
            return Ok(own);
        }
        Err(Error::unavailable(
            BACKEND,
            UnavailableReason::Other,
            format!(
                "only {acked} of {replicas} replicas acknowledged the batch within {timeout:?}; \
                 it is stored on the master only (retrying is safe: its ids are then duplicates)"
            ),
        ))
    }
}

impl fmt::Debug for RedisSpool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSpool")
            .field("base", &self.base)
            .field("limits", &self.limits)
            .field("durability", &self.durability())
            .field("client", &self.client)
            .finish()
    }
}

fn lost(token: &SpoolToken) -> Error {
    Error::lease_lost(token.id().as_str())
}

fn check_positive(name: &'static str, d: Duration) -> Result<()> {
    if d.is_zero() {
        return Err(Error::invalid_argument(name, "must be greater than zero"));
    }
    Ok(())
}

/// `max` as a script argument (at least 1 where 0 would mean "all").
fn count_arg(max: usize) -> Vec<u8> {
    max.min(i64::MAX as usize).to_string().into_bytes()
}

#[async_trait]
impl Spool for RedisSpool {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(BACKEND)
            .with_distributed(true)
            .with_durable(self.durability() != Durability::Volatile)
            .with_reopenable(true)
            .with_bounded(true)
    }

    async fn enqueue(&self, batch: Vec<NewRecord>) -> Result<Enqueued> {
        self.limits.check_batch(&batch)?;
        let weight = call_weight(&batch);
        if weight > self.max_call_bytes {
            return Err(Error::TooLarge {
                what: "batch",
                size: weight,
                limit: self.max_call_bytes,
            });
        }
        if batch.is_empty() {
            return Ok(Enqueued::new(self.durability(), 0, 0));
        }
        let mut args = self.args(2 + 5 * batch.len());
        args.push(self.limits.max_records.to_string().into_bytes());
        args.push(self.limits.max_bytes.to_string().into_bytes());
        for r in batch {
            args.push(r.id.as_str().as_bytes().to_vec());
            args.push(r.payload.to_vec());
            args.push(micros(r.delay));
            args.push(r.attempts.to_string().into_bytes());
            args.push(
                r.enqueued_at
                    .map(|t| t.as_micros().to_string().into_bytes())
                    .unwrap_or_default(),
            );
        }
        let (reply, durability) = match self.wait {
            None => (
                self.run(&SCRIPTS.enqueue, &args).await?,
                Ok(self.server_durability()),
            ),
            Some((replicas, timeout)) => {
                self.checked().await?;
                let (reply, acked) = self
                    .client
                    .invoke_replicated(&SCRIPTS.enqueue, &self.keys, &args, replicas, timeout)
                    .await?;
                (reply, self.replicated(replicas, acked, timeout))
            }
        };
        let reply = array(reply, "spool enqueue")?;
        match reply.as_slice() {
            [status, accepted, dups] if text(status).as_deref() == Some("ok") => {
                let (Some(accepted), Some(dups)) = (num(accepted), num(dups)) else {
                    return Err(unexpected("spool enqueue", reply));
                };
                let durability = durability?;
                Ok(Enqueued::new(durability, accepted as usize, dups as usize))
            }
            [status, limit] if text(status).as_deref() == Some("full") => {
                match text(limit).as_deref() {
                    Some("records") => Err(Error::Full {
                        limit: "records",
                        max: self.limits.max_records,
                    }),
                    _ => Err(Error::Full {
                        limit: "bytes",
                        max: self.limits.max_bytes,
                    }),
                }
            }
            _ => Err(unexpected("spool enqueue", reply)),
        }
    }

    async fn lease(&self, max: usize, ttl: Duration) -> Result<Vec<Leased>> {
        check_positive("ttl", ttl)?;
        if max == 0 {
            return Ok(Vec::new());
        }
        let base = LeaseToken::generate().as_u128() >> 32;
        let mut args = self.args(4);
        args.push(count_arg(max));
        args.push(micros(ttl));
        args.push(micros(self.limits.retention));
        args.push(format!("{base:024x}").into_bytes());
        let reply = array(self.run(&SCRIPTS.lease, &args).await?, "spool lease")?;
        if reply.len() % 5 != 0 {
            return Err(unexpected("spool lease", reply));
        }
        let mut out = Vec::with_capacity(reply.len() / 5);
        let mut it = reply.into_iter();
        while let (Some(id), Some(payload), Some(attempts), Some(enqueued_at), Some(token)) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        {
            let bad = |what: &str| unexpected("spool lease", what);
            let id = text(&id).ok_or_else(|| bad("id"))?;
            let id = RecordId::new(id)?;
            let payload = bytes_of(payload).ok_or_else(|| bad("payload"))?;
            let attempts = num(&attempts).ok_or_else(|| bad("attempts"))?;
            let enqueued_at = num(&enqueued_at).ok_or_else(|| bad("enqueued_at"))?;
            let token = text(&token)
                .and_then(|t| u128::from_str_radix(&t, 16).ok())
                .ok_or_else(|| bad("token"))?;
            let record = Record::new(
                id.clone(),
                Bytes::from(payload),
                u32::try_from(attempts).unwrap_or(u32::MAX),
                Timestamp::from_micros(enqueued_at),
            );
            out.push(Leased::new(
                record,
                SpoolToken::new(id, LeaseToken::from_u128(token)),
            ));
        }
        Ok(out)
    }

    async fn ack(&self, token: &SpoolToken) -> Result<()> {
        match self.owned(&SCRIPTS.ack, token, &[], "spool ack").await? {
            Owned::Lost => Err(lost(token)),
            _ => Ok(()),
        }
    }

    async fn nack(&self, token: &SpoolToken, retry_in: Duration) -> Result<NackOutcome> {
        let extra = [micros(retry_in), micros(self.limits.retention)];
        match self
            .owned(&SCRIPTS.nack, token, &extra, "spool nack")
            .await?
        {
            Owned::Ok => Ok(NackOutcome::Scheduled { retry_in }),
            Owned::Dead => Ok(NackOutcome::DeadLettered(DeadReason::Expired)),
            Owned::Gone | Owned::Lost => Err(lost(token)),
        }
    }

    async fn extend(&self, token: &SpoolToken, by: Duration) -> Result<()> {
        check_positive("by", by)?;
        match self
            .owned(&SCRIPTS.extend, token, &[micros(by)], "spool extend")
            .await?
        {
            Owned::Ok => Ok(()),
            _ => Err(lost(token)),
        }
    }

    async fn dead_letter(&self, token: &SpoolToken, reason: DeadReason) -> Result<()> {
        let (code, why) = encode_reason(&reason);
        let extra = [code.as_bytes().to_vec(), why.into_bytes()];
        match self
            .owned(&SCRIPTS.dead_letter, token, &extra, "spool dead_letter")
            .await?
        {
            Owned::Ok => Ok(()),
            _ => Err(lost(token)),
        }
    }

    async fn list_dead(&self, max: usize) -> Result<Vec<DeadRecord>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let mut args = self.args(1);
        args.push(count_arg(max));
        let reply = array(
            self.run(&SCRIPTS.list_dead, &args).await?,
            "spool list_dead",
        )?;
        if reply.len() % 7 != 0 {
            return Err(unexpected("spool list_dead", reply));
        }
        let bad = |what: &str| unexpected("spool list_dead", what);
        let mut out = Vec::with_capacity(reply.len() / 7);
        for f in reply.chunks(7) {
            let id = RecordId::new(text(&f[0]).ok_or_else(|| bad("id"))?)?;
            let payload = bytes_of(f[1].clone()).ok_or_else(|| bad("payload"))?;
            let attempts = num(&f[2]).ok_or_else(|| bad("attempts"))?;
            let enqueued_at = num(&f[3]).ok_or_else(|| bad("enqueued_at"))?;
            let code = text(&f[4]).ok_or_else(|| bad("reason"))?;
            let why = text(&f[5]).unwrap_or_default();
            let dead_at = num(&f[6]).ok_or_else(|| bad("dead_at"))?;
            out.push(DeadRecord::new(
                Record::new(
                    id,
                    Bytes::from(payload),
                    u32::try_from(attempts).unwrap_or(u32::MAX),
                    Timestamp::from_micros(enqueued_at),
                ),
                decode_reason(&code, why),
                Timestamp::from_micros(dead_at),
            ));
        }
        Ok(out)
    }

    async fn redrive_dead(&self, max: usize) -> Result<usize> {
        if max == 0 {
            return Ok(0);
        }
        let mut args = self.args(1);
        args.push(count_arg(max));
        let reply = self.run(&SCRIPTS.redrive_dead, &args).await?;
        num(&reply)
            .map(|n| n as usize)
            .ok_or_else(|| unexpected("spool redrive_dead", reply))
    }

    async fn purge_dead(&self, max: usize) -> Result<usize> {
        if max == 0 {
            return Ok(0);
        }
        let mut args = self.args(1);
        args.push(count_arg(max));
        let reply = self.run(&SCRIPTS.purge_dead, &args).await?;
        num(&reply)
            .map(|n| n as usize)
            .ok_or_else(|| unexpected("spool purge_dead", reply))
    }

    async fn stats(&self) -> Result<SpoolStats> {
        let args = self.args(0);
        let reply = array(self.run(&SCRIPTS.stats, &args).await?, "spool stats")?;
        let [ready, delayed, leased, dead, oldest, bytes, expired, now] = reply.as_slice() else {
            return Err(unexpected("spool stats", reply));
        };
        let n = |v: &Value| num(v).ok_or_else(|| unexpected("spool stats", v.clone()));
        let now = Timestamp::from_micros(n(now)?);
        let mut stats = SpoolStats::default();
        stats.ready = n(ready)?;
        stats.delayed = n(delayed)?;
        stats.leased = n(leased)?;
        stats.dead = n(dead)?;
        stats.bytes = n(bytes)?;
        stats.expired_total = n(expired)?;
        stats.oldest_age = num(oldest).map(|o| now.saturating_since(Timestamp::from_micros(o)));
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip() {
        for r in [
            DeadReason::Expired,
            DeadReason::RetriesExhausted,
            DeadReason::Rejected("HTTP 410".into()),
            DeadReason::Rejected(String::new()),
        ] {
            let (code, why) = encode_reason(&r);
            assert_eq!(decode_reason(code, why), r);
        }
    }

    #[test]
    fn config_replies_in_both_protocols() {
        let resp2 = Value::Array(vec![
            Value::BulkString(b"maxmemory-policy".to_vec()),
            Value::BulkString(b"allkeys-lru".to_vec()),
        ]);
        assert_eq!(
            config_value(Ok(resp2), "maxmemory-policy").unwrap(),
            Some("allkeys-lru".into())
        );
        let resp3 = Value::Map(vec![(
            Value::BulkString(b"appendonly".to_vec()),
            Value::BulkString(b"yes".to_vec()),
        )]);
        assert_eq!(
            config_value(Ok(resp3), "appendonly").unwrap(),
            Some("yes".into())
        );
        assert_eq!(config_value(Ok(Value::Array(vec![])), "x").unwrap(), None);
    }

    #[test]
    fn every_script_compiles_to_a_distinct_sha() {
        let shas: std::collections::HashSet<_> = SCRIPTS
            .all()
            .iter()
            .map(|s| s.get_hash().to_string())
            .collect();
        assert_eq!(shas.len(), 10);
    }
}
