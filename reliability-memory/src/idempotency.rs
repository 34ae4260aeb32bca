//! [`MemoryIdempotencyStore`]: the in-process idempotency store (see its
//! docs).

use std::fmt;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use moka::ops::compute::Op;
use moka::policy::EvictionPolicy;
use moka::sync::Cache;
use moka::Expiry;
use reliability_core::idempotency::{
    check_lease_duration, check_result_size, DEFAULT_MAX_RESULT_BYTES,
};
use reliability_core::key::{normalize_id, MAX_VERBATIM_ID_BYTES};
use reliability_core::{
    system_clock, Capabilities, Claim, Error, Fingerprint, IdempotencyStore, Lease, LeaseToken,
    Result, SharedClock, Timestamp,
};

/// Default [`MemoryIdempotencyStoreBuilder::max_entries`].
pub const DEFAULT_MAX_ENTRIES: u64 = 100_000;

/// Default [`MemoryIdempotencyStoreBuilder::max_bytes`]: 128 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 128 * 1024 * 1024;

/// What an entry costs besides its key and result: the entry itself, its
/// slot in the table and moka's bookkeeping, rounded up.
const ENTRY_OVERHEAD_BYTES: u64 = 128;

/// The most entries the cache's table is sized for up front (see the
/// store's Bounds).
const PRESIZE_MAX: u64 = 1 << 20;

/// One stored key.
#[derive(Clone)]
struct Entry {
    fingerprint: Fingerprint,
    state: State,
}

#[derive(Clone)]
enum State {
    Pending {
        token: LeaseToken,
        expires_at: Timestamp,
    },
    Completed {
        result: Option<Bytes>,
        expires_at: Timestamp,
    },
}

impl Entry {
    /// The bytes the entry holds: its stored result, if any.
    fn result_bytes(&self) -> u64 {
        match &self.state {
            State::Completed {
                result: Some(r), ..
            } => r.len() as u64,
            _ => 0,
        }
    }

    fn expires_at(&self) -> Timestamp {
        match self.state {
            State::Pending { expires_at, .. } | State::Completed { expires_at, .. } => expires_at,
        }
    }

    /// `true` while the entry still counts at `now`.
    fn is_live(&self, now: Timestamp) -> bool {
        self.expires_at() > now
    }

    /// `true` if this is a live pending entry held by `token`.
    fn is_held_by(&self, token: LeaseToken, now: Timestamp) -> bool {
        self.is_live(now) && matches!(self.state, State::Pending { token: t, .. } if t == token)
    }
}

/// Physical expiry for moka: the time left until the entry's `expires_at`,
/// recomputed on every create and update. Only with a real-time clock; a
/// manual clock gets logical expiry only.
struct EntryExpiry {
    clock: SharedClock,
}

impl EntryExpiry {
    fn ttl(&self, entry: &Entry) -> Option<Duration> {
        if !self.clock.is_real_time() {
            return None;
        }
        Some(entry.expires_at().saturating_since(self.clock.now()))
    }
}

impl Expiry<String, Entry> for EntryExpiry {
    fn expire_after_create(&self, _key: &String, value: &Entry, _now: Instant) -> Option<Duration> {
        self.ttl(value)
    }

    fn expire_after_update(
        &self,
        _key: &String,
        value: &Entry,
        _now: Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        // The entry's deadline changed (complete, extend, re-acquire): the
        // new TTL, never the old one (the idempotency rules).
        self.ttl(value)
    }
}

/// An [`IdempotencyStore`] in process memory: a bounded moka cache with
/// per-key atomic claims and an injectable clock.
///
/// Not shared between processes (`Capabilities::distributed` is `false`) and
/// not durable.
///
/// Entries live in a bounded [moka](https://docs.rs/moka) cache keyed by the
/// normalized id (see [`normalize_id`]). Every read-modify-write of one key
/// runs inside moka's per-key atomic `and_compute_with`, so among any number
/// of concurrent claimers of a key exactly one gets [`Claim::Acquired`].
///
/// Time comes from the injected [`Clock`](reliability_core::Clock). An entry
/// whose lease or retention has passed is treated as absent everywhere
/// (logical expiry); with a real-time clock moka also drops it physically when
/// its time is up.
///
/// ```
/// use std::time::Duration;
/// use reliability_core::{Claim, Fingerprint, IdempotencyStore, ManualClock};
/// use reliability_memory::MemoryIdempotencyStore;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> reliability_core::Result<()> {
/// let clock = ManualClock::new();
/// let store = MemoryIdempotencyStore::builder()
///     .max_entries(10_000)
///     .clock(std::sync::Arc::new(clock.clone()))
///     .build();
/// let fp = Fingerprint::of(b"payload");
///
/// let lease = store
///     .claim("evt_1", &fp, Duration::from_secs(30))
///     .await?
///     .into_lease()
///     .expect("first claim acquires");
/// assert!(matches!(
///     store.claim("evt_1", &fp, Duration::from_secs(30)).await?,
///     Claim::InProgress { .. }
/// ));
/// store.complete(&lease, Some("done".into()), Duration::from_secs(3600)).await?;
/// assert_eq!(
///     store.claim("evt_1", &fp, Duration::from_secs(30)).await?,
///     Claim::Completed(Some("done".into()))
/// );
/// # Ok(()) }
/// ```
///
/// # Bounds
///
/// The cache holds at most [`max_entries`](MemoryIdempotencyStoreBuilder::max_entries)
/// entries (default [`DEFAULT_MAX_ENTRIES`]). At capacity the least recently
/// used entries go first (moka's LRU policy), pending or completed alike,
/// which weakens deduplication for the evicted keys: size the cap above the
/// number of keys live within the longest retention. The latest claims —
/// those a retried delivery comes back for — are the last to go; under
/// moka's default TinyLFU admission a key seen once lost to the keys already
/// held, so at capacity the newest claims were the ones not kept. moka applies its
/// eviction policy in batches, so the entry count can briefly exceed the cap
/// (moka#231).
///
/// Entries are bounded by bytes too: at most
/// [`max_bytes`](MemoryIdempotencyStoreBuilder::max_bytes) (default
/// [`DEFAULT_MAX_BYTES`]) of keys and stored results, each entry counted
/// for its key, its result and a fixed overhead, and for at least
/// `max_bytes / max_entries` bytes, so neither bound is exceeded: 100,000
/// results of 1 MiB never hold 100 GiB. The same LRU order decides what
/// goes.
///
/// The table is sized for the cap up front (up to 2^20 entries, about
/// 33 bytes each: 3.3 MB for the default cap): growing it while claims
/// arrive stalled them (worst claim 10-23 ms around 280-370 k keys, 600 k
/// fresh keys 3.7-4.2 s; presized: 2.6-2.9 s).
#[derive(Clone)]
pub struct MemoryIdempotencyStore {
    cache: Cache<String, Entry>,
    clock: SharedClock,
    max_entries: u64,
    max_bytes: u64,
    max_result_bytes: usize,
}

impl MemoryIdempotencyStore {
    /// A store with the defaults: [`DEFAULT_MAX_ENTRIES`] entries, results up
    /// to [`DEFAULT_MAX_RESULT_BYTES`], the system clock.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder to set the bounds and the clock.
    pub fn builder() -> MemoryIdempotencyStoreBuilder {
        MemoryIdempotencyStoreBuilder::default()
    }

    /// The configured maximum number of entries.
    pub fn max_entries(&self) -> u64 {
        self.max_entries
    }

    /// The configured maximum size of a stored result, in bytes.
    pub fn max_result_bytes(&self) -> usize {
        self.max_result_bytes
    }

    /// The configured maximum bytes of all entries.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The approximate bytes the entries are counted for (see the store's
    /// Bounds); like [`entry_count`](Self::entry_count), updated in
    /// batches.
    pub fn weighted_bytes(&self) -> u64 {
        self.cache.weighted_size()
    }

    /// The approximate number of entries held, including expired ones not
    /// dropped yet (moka updates the count in batches).
    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    /// Applies an owner-checked change to `lease`'s key atomically. `f` gets
    /// the live entry held by the lease and returns the operation to apply.
    fn with_owned_entry(
        &self,
        lease: &Lease,
        f: impl FnOnce(Entry, Timestamp) -> Op<Entry>,
    ) -> Result<()> {
        let id = normalize_id(lease.key())?;
        let token = lease.token();
        let mut owned = false;
        self.cache
            .entry_by_ref(id.as_ref())
            .and_compute_with(|current| {
                let now = self.clock.now();
                match current.map(moka::Entry::into_value) {
                    Some(entry) if entry.is_held_by(token, now) => {
                        owned = true;
                        f(entry, now)
                    }
                    _ => Op::Nop,
                }
            });
        if owned {
            Ok(())
        } else {
            Err(Error::lease_lost(lease.key()))
        }
    }
}

impl Default for MemoryIdempotencyStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryIdempotencyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryIdempotencyStore")
            .field("entries", &self.cache.entry_count())
            .field("max_entries", &self.max_entries)
            .field("max_bytes", &self.max_bytes)
            .field("max_result_bytes", &self.max_result_bytes)
            .field("clock", &self.clock)
            .finish()
    }
}

#[async_trait]
impl IdempotencyStore for MemoryIdempotencyStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new("memory").with_bounded(true)
    }

    async fn claim(&self, key: &str, fingerprint: &Fingerprint, lease: Duration) -> Result<Claim> {
        let id = normalize_id(key)?;
        check_lease_duration("lease", lease)?;
        let mut outcome = None;
        self.cache
            .entry_by_ref(id.as_ref())
            .and_compute_with(|current| {
                let now = self.clock.now();
                let live = current
                    .map(moka::Entry::into_value)
                    .filter(|e| e.is_live(now));
                let (claim, op) = match live {
                    None => {
                        let token = LeaseToken::generate();
                        let entry = Entry {
                            fingerprint: *fingerprint,
                            state: State::Pending {
                                token,
                                expires_at: now.saturating_add(lease),
                            },
                        };
                        (Claim::Acquired(Lease::new(key, token)), Op::Put(entry))
                    }
                    Some(e) if e.fingerprint != *fingerprint => (Claim::Mismatch, Op::Nop),
                    Some(Entry {
                        state: State::Pending { expires_at, .. },
                        ..
                    }) => (
                        Claim::InProgress {
                            retry_after: expires_at.saturating_since(now),
                        },
                        Op::Nop,
                    ),
                    Some(Entry {
                        state: State::Completed { result, .. },
                        ..
                    }) => (Claim::Completed(result), Op::Nop),
                };
                outcome = Some(claim);
                op
            });
        // moka always runs the closure exactly once.
        outcome.ok_or_else(|| Error::Backend {
            backend: "memory",
            message: "compute closure did not run".into(),
            source: None,
        })
    }

    async fn complete(
        &self,
        lease: &Lease,
        result: Option<Bytes>,
        retention: Duration,
    ) -> Result<()> {
        check_lease_duration("retention", retention)?;
        check_result_size(result.as_ref(), self.max_result_bytes)?;
        self.with_owned_entry(lease, |entry, now| {
            Op::Put(Entry {
                fingerprint: entry.fingerprint,
                state: State::Completed {
                    result,
                    expires_at: now.saturating_add(retention),
                },
            })
        })
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        self.with_owned_entry(lease, |_, _| Op::Remove)
    }

    async fn extend(&self, lease: &Lease, by: Duration) -> Result<()> {
        check_lease_duration("by", by)?;
        self.with_owned_entry(lease, |entry, now| {
            Op::Put(Entry {
                fingerprint: entry.fingerprint,
                state: State::Pending {
                    token: lease.token(),
                    expires_at: now.saturating_add(by),
                },
            })
        })
    }
}

/// Builds a [`MemoryIdempotencyStore`].
#[derive(Debug, Clone)]
#[must_use]
pub struct MemoryIdempotencyStoreBuilder {
    max_entries: u64,
    max_bytes: u64,
    max_result_bytes: usize,
    clock: Option<SharedClock>,
}

impl Default for MemoryIdempotencyStoreBuilder {
    fn default() -> Self {
        Self {
            max_entries: DEFAULT_MAX_ENTRIES,
            max_bytes: DEFAULT_MAX_BYTES,
            max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
            clock: None,
        }
    }
}

impl MemoryIdempotencyStoreBuilder {
    /// The most entries the cache holds (default [`DEFAULT_MAX_ENTRIES`], at
    /// least 1). At capacity moka may evict live entries; see
    /// [`MemoryIdempotencyStore`]'s bounds.
    pub fn max_entries(mut self, n: u64) -> Self {
        self.max_entries = n.max(1);
        self
    }

    /// The most bytes the entries hold, keys and stored results included
    /// (default [`DEFAULT_MAX_BYTES`], at least one largest entry:
    /// [`max_result_bytes`](Self::max_result_bytes) plus 328 bytes); see
    /// [`MemoryIdempotencyStore`]'s bounds.
    pub fn max_bytes(mut self, n: u64) -> Self {
        self.max_bytes = n.max(1);
        self
    }

    /// The largest result `complete` accepts, in bytes (default
    /// [`DEFAULT_MAX_RESULT_BYTES`]); larger ones get
    /// [`Error::TooLarge`].
    pub fn max_result_bytes(mut self, n: usize) -> Self {
        self.max_result_bytes = n;
        self
    }

    /// The clock (default [`system_clock`]). With a clock that is not real
    /// time (e.g. [`ManualClock`](reliability_core::ManualClock)) expiry is
    /// logical only: expired entries are ignored, and dropped only by
    /// eviction or replacement.
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Builds the store.
    pub fn build(self) -> MemoryIdempotencyStore {
        let clock = self.clock.unwrap_or_else(system_clock);
        // One weight bounds both: an entry weighs its bytes, and at least
        // max_bytes / max_entries, against a capacity of max_bytes.
        // The capacity holds at least one largest entry, so a completed
        // entry is never refused on arrival.
        let largest = (self.max_result_bytes as u64)
            .saturating_add(MAX_VERBATIM_ID_BYTES as u64)
            .saturating_add(ENTRY_OVERHEAD_BYTES);
        // Weights are u32: a capacity above max_entries x u32::MAX would
        // need a floor no weight can carry, and hold more entries.
        let capacity = self
            .max_bytes
            .max(largest)
            .min(self.max_entries.saturating_mul(u64::from(u32::MAX)));
        let floor = capacity.div_ceil(self.max_entries);
        let cache = Cache::builder()
            .max_capacity(capacity)
            .weigher(move |key: &String, entry: &Entry| {
                let bytes = (key.len() as u64)
                    .saturating_add(entry.result_bytes())
                    .saturating_add(ENTRY_OVERHEAD_BYTES);
                u32::try_from(bytes.max(floor)).unwrap_or(u32::MAX)
            })
            .initial_capacity(usize::try_from(self.max_entries.min(PRESIZE_MAX)).unwrap_or(0))
            .eviction_policy(EvictionPolicy::lru())
            .expire_after(EntryExpiry {
                clock: clock.clone(),
            })
            .build();
        MemoryIdempotencyStore {
            cache,
            clock,
            max_entries: self.max_entries,
            max_bytes: self.max_bytes,
            max_result_bytes: self.max_result_bytes,
        }
    }
}
