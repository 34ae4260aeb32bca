//! [`LocalRateLimiter`]: keyed GCRA in process memory, bounded (see its
//! docs).

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use reliability_core::gcra;
use reliability_core::key::normalize_id;
use reliability_core::{
    system_clock, Capabilities, CheckFuture, Decision, Quota, RateLimiter, Result, SharedClock,
};

/// Default [`LocalRateLimiterBuilder::max_keys`].
pub const DEFAULT_MAX_KEYS: usize = 100_000;

/// The fewest shards the default picks.
const MIN_DEFAULT_SHARDS: usize = 16;

/// At most one eviction warning per this many nanoseconds.
const WARN_INTERVAL_NS: u64 = 10_000_000_000;

type Map = HashMap<Box<str>, u64, SeededState>;

/// One shard, on its own cache line(s) so shards do not false-share.
#[repr(align(128))]
struct Shard {
    map: Mutex<Map>,
}

/// A keyed GCRA [`RateLimiter`] in process memory with a hard cap on the
/// number of keys it remembers.
///
/// Not shared between processes (`Capabilities::distributed` is `false`).
///
/// Each key's state is one theoretical arrival time (TAT, `u64` µs) and every
/// decision comes from [`gcra::decide`], the same reference the Redis backend
/// ports, so local and shared limiters answer alike (governor 0.10 is the test
/// oracle).
///
/// State lives in a fixed number of shards, each a `Mutex<HashMap>` picked by
/// the key's hash. A check locks one shard for a map lookup and a few integer
/// operations; it never awaits while holding the lock and allocates only when
/// it stores a new key.
///
/// ```
/// use reliability_core::{Outcome, Quota, RateLimiter};
/// use reliability_memory::LocalRateLimiter;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> reliability_core::Result<()> {
/// let limiter = LocalRateLimiter::builder().max_keys(50_000).build();
/// let quota = Quota::per_second(2)?;
/// assert_eq!(limiter.check("tenant-7", quota, 1).await?.remaining, 1);
/// assert_eq!(limiter.check("tenant-7", quota, 1).await?.remaining, 0);
/// assert_eq!(limiter.check("tenant-7", quota, 1).await?.outcome, Outcome::Denied);
/// assert_eq!(limiter.check("tenant-7", quota, 3).await?.outcome, Outcome::Never);
/// # Ok(()) }
/// ```
///
/// # Bounded memory
///
/// The limiter keeps at most [`max_keys`](LocalRateLimiterBuilder::max_keys)
/// keys (default [`DEFAULT_MAX_KEYS`]), split evenly over the shards. When a
/// new key arrives at a full shard, the shard first forgets every idle key
/// (its full burst is available again, see [`gcra::is_idle`]): that changes no
/// future decision. If the shard is still above 7/8 of its share, it evicts
/// the keys closest to idle (smallest TATs) down to 7/8. An evicted active key
/// starts again with a full burst, i.e. it is briefly allowed more than its
/// quota; such evictions are counted ([`LocalRateLimiter::evicted_active`])
/// and logged as a `tracing` warning at most once every 10 s. Each pass costs
/// `O(share)` and frees at least 1/8 of the share, so eviction is amortized
/// `O(1)` per new key. A shard's table is rebuilt when removals have left it
/// short of room, so it never grows past the bucket count its share needs:
/// about 25-60 bytes of table per key plus the key's own bytes
/// (`tests/memory_cap.rs` measures ~42 bytes per key for 8-byte keys).
pub struct LocalRateLimiter {
    shards: Box<[Shard]>,
    shard_mask: u64,
    per_shard: usize,
    hasher: SeededState,
    clock: SharedClock,
    evicted_active: AtomicU64,
    warn_epoch: Instant,
    next_warn_ns: AtomicU64,
}

impl LocalRateLimiter {
    /// A limiter with the defaults: [`DEFAULT_MAX_KEYS`] keys, the default
    /// shard count, the system clock.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder to set the bounds, the shard count and the clock.
    pub fn builder() -> LocalRateLimiterBuilder {
        LocalRateLimiterBuilder::default()
    }

    /// The number of keys remembered now (idle ones included until a full
    /// shard drops them). Locks every shard in turn.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(&s.map).len()).sum()
    }

    /// `true` if no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most keys this limiter remembers: the configured `max_keys`
    /// rounded down to a multiple of the shard count.
    pub fn max_keys(&self) -> usize {
        self.per_shard * self.shards.len()
    }

    /// The number of shards.
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// How many keys were evicted while still active (their TAT in the
    /// future), since this limiter was built. Each such key was briefly given
    /// a fresh burst; a growing count means `max_keys` is too small for the
    /// traffic.
    pub fn evicted_active(&self) -> u64 {
        self.evicted_active.load(Ordering::Relaxed)
    }

    /// Makes room in a full shard (see the type docs).
    ///
    /// Two passes: one collects the active TATs (and, if too many remain,
    /// finds the eviction threshold with `select_nth_unstable`), one
    /// `retain`s the survivors.
    fn evict(&self, map: &mut Map, now: u64) {
        // Down to 7/8 of the share, and at least one slot free even for
        // shares below 8.
        let target = self.per_shard - (self.per_shard / 8).max(1);
        let mut active: Vec<u64> = map
            .values()
            .copied()
            .filter(|&tat| !gcra::is_idle(tat, now))
            .collect();
        let excess = active.len().saturating_sub(target);
        // Idle TATs are <= now < every active TAT, so "below the threshold"
        // also drops every idle key.
        let (threshold, mut equal_to_drop) = if excess == 0 {
            (now.saturating_add(1), 0)
        } else {
            let (below, &mut threshold, _) = active.select_nth_unstable(excess - 1);
            // Everything strictly below the threshold goes; entries equal to
            // it go until `excess` active keys are gone.
            let strictly_below = below.iter().filter(|&&t| t < threshold).count();
            (threshold, excess - strictly_below)
        };
        drop(active);
        map.retain(|_, tat| {
            let tat = *tat;
            if tat < threshold {
                false
            } else if tat == threshold && equal_to_drop > 0 {
                equal_to_drop -= 1;
                false
            } else {
                true
            }
        });
        // `retain` may leave tombstones, which count against the table's
        // room until it is rehashed; were the room to drop below the share,
        // the next insert would double the bucket array. Rebuild instead
        // (rarely: only once tombstones have piled up).
        if map.capacity() < self.per_shard {
            let old = std::mem::replace(
                map,
                HashMap::with_capacity_and_hasher(self.per_shard, self.hasher.clone()),
            );
            map.extend(old);
        }
        if excess > 0 {
            let total = self
                .evicted_active
                .fetch_add(excess as u64, Ordering::Relaxed)
                + excess as u64;
            self.warn_evictions(total);
        }
    }

    fn warn_evictions(&self, total: u64) {
        let elapsed = u64::try_from(self.warn_epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let due = self.next_warn_ns.load(Ordering::Relaxed);
        if elapsed < due {
            return;
        }
        let next = elapsed.saturating_add(WARN_INTERVAL_NS);
        if self
            .next_warn_ns
            .compare_exchange(due, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::warn!(
                evicted_active = total,
                max_keys = self.max_keys(),
                "local rate limiter is full: evicted active keys (they get a fresh burst); raise max_keys"
            );
        }
    }
}

fn lock(m: &Mutex<Map>) -> std::sync::MutexGuard<'_, Map> {
    // The map holds plain integers and is never left half-updated; a panic
    // elsewhere while locked cannot corrupt it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Default for LocalRateLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for LocalRateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalRateLimiter")
            .field("shards", &self.shards.len())
            .field("max_keys", &self.max_keys())
            .field("evicted_active", &self.evicted_active())
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

impl RateLimiter for LocalRateLimiter {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new("local").with_bounded(true)
    }

    #[inline]
    fn check<'a>(&'a self, key: &'a str, quota: Quota, cost: u32) -> CheckFuture<'a> {
        CheckFuture::ready(self.check_sync(key, quota, cost))
    }
}

impl LocalRateLimiter {
    /// [`RateLimiter::check`] without a future, for synchronous callers
    /// (the trait method only wraps this): same decision, same state.
    ///
    /// # Errors
    /// [`Error::InvalidKey`](reliability_core::Error::InvalidKey) /
    /// [`Error::TooLarge`](reliability_core::Error::TooLarge) for a bad key.
    pub fn check_sync(&self, key: &str, quota: Quota, cost: u32) -> Result<Decision> {
        let id = normalize_id(key)?;
        let id: &str = id.as_ref();
        let now = self.clock.now().as_micros();
        let hash = self.hasher.hash_one(id);
        // hashbrown uses the low bits for the bucket and the top 7 for its
        // tag: take the shard from the middle so neither loses entropy.
        let shard = &self.shards[usize::try_from((hash >> 32) & self.shard_mask).unwrap_or(0)];
        let mut map = lock(&shard.map);
        if let Some(tat) = map.get_mut(id) {
            let (decision, next) = gcra::decide(Some(*tat), now, quota, cost);
            if let Some(next) = next {
                *tat = next;
            }
            return Ok(decision);
        }
        let (decision, next) = gcra::decide(None, now, quota, cost);
        if let Some(next) = next {
            if map.len() >= self.per_shard {
                self.evict(&mut map, now);
            }
            map.insert(Box::from(id), next);
        }
        Ok(decision)
    }
}

/// Builds a [`LocalRateLimiter`].
#[derive(Debug, Clone)]
#[must_use]
pub struct LocalRateLimiterBuilder {
    max_keys: usize,
    shards: Option<usize>,
    clock: Option<SharedClock>,
}

impl Default for LocalRateLimiterBuilder {
    fn default() -> Self {
        Self {
            max_keys: DEFAULT_MAX_KEYS,
            shards: None,
            clock: None,
        }
    }
}

impl LocalRateLimiterBuilder {
    /// The most keys remembered (default [`DEFAULT_MAX_KEYS`], at least 1).
    /// The bound is split evenly over the shards, so the effective maximum is
    /// rounded down to a multiple of the shard count.
    pub fn max_keys(mut self, n: usize) -> Self {
        self.max_keys = n.max(1);
        self
    }

    /// The number of shards, rounded up to a power of two (default: 4 × the
    /// available cores, at least 16). Never more than `max_keys` allows: each
    /// shard holds at least one key.
    pub fn shards(mut self, n: usize) -> Self {
        self.shards = Some(n.max(1));
        self
    }

    /// The clock (default [`system_clock`]).
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Builds the limiter.
    pub fn build(self) -> LocalRateLimiter {
        let wanted = self.shards.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, usize::from);
            cores.saturating_mul(4).max(MIN_DEFAULT_SHARDS)
        });
        let mut shards = wanted.checked_next_power_of_two().unwrap_or(1 << 16);
        // Largest power of two not above max_keys, so every shard holds >= 1.
        let cap = 1usize << (usize::BITS - 1 - self.max_keys.leading_zeros());
        shards = shards.min(cap).min(1 << 16);
        let per_shard = self.max_keys / shards;
        let hasher = SeededState::new();
        let shards: Box<[Shard]> = (0..shards)
            .map(|_| Shard {
                map: Mutex::new(HashMap::with_hasher(hasher.clone())),
            })
            .collect();
        LocalRateLimiter {
            shard_mask: (shards.len() - 1) as u64,
            shards,
            per_shard,
            hasher,
            clock: self.clock.unwrap_or_else(system_clock),
            evicted_active: AtomicU64::new(0),
            warn_epoch: Instant::now(),
            next_warn_ns: AtomicU64::new(0),
        }
    }
}

/// A fast hasher for short string keys, seeded at random per limiter.
///
/// Folded 64×64→128-bit multiplies over 8-byte words (the construction of
/// foldhash and aHash's fallback). Much faster than SipHash on short keys; the
/// random per-limiter seed keeps an attacker who cannot observe timings from
/// precomputing colliding keys. Worst case under collisions is bounded by the
/// per-shard key cap.
#[derive(Clone)]
struct SeededState {
    seed: u64,
    multiplier: u64,
}

impl SeededState {
    fn new() -> Self {
        // Two independent random words from std's per-process random keys.
        let rs = std::collections::hash_map::RandomState::new();
        let seed = rs.hash_one(0x243f_6a88_85a3_08d3_u64);
        let multiplier = rs.hash_one(0x1319_8a2e_0370_7344_u64) | 1;
        Self { seed, multiplier }
    }
}

impl BuildHasher for SeededState {
    type Hasher = FoldHasher;

    fn build_hasher(&self) -> FoldHasher {
        FoldHasher {
            acc: self.seed,
            multiplier: self.multiplier,
        }
    }
}

struct FoldHasher {
    acc: u64,
    multiplier: u64,
}

#[inline]
fn folded_multiply(a: u64, b: u64) -> u64 {
    let full = u128::from(a) * u128::from(b);
    (full as u64) ^ ((full >> 64) as u64)
}

impl Hasher for FoldHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        // Mixing the length in first (through a multiply, so inputs of
        // different lengths start from unrelated states) keeps "ab" and
        // "ab\0" apart.
        let mut acc = folded_multiply(self.acc ^ bytes.len() as u64, self.multiplier);
        let mut rest = bytes;
        while let Some((word, tail)) = rest.split_first_chunk::<8>() {
            acc = folded_multiply(acc ^ u64::from_le_bytes(*word), self.multiplier);
            rest = tail;
        }
        // 0 to 7 bytes left: read them as (possibly overlapping) halves, the
        // way foldhash does, with the length already mixed in above.
        let n = rest.len();
        let tail = if n >= 4 {
            let lo = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
            let hi = u32::from_le_bytes([rest[n - 4], rest[n - 3], rest[n - 2], rest[n - 1]]);
            u64::from(lo) | (u64::from(hi) << 32)
        } else if n > 0 {
            u64::from(rest[0]) | (u64::from(rest[n / 2]) << 8) | (u64::from(rest[n - 1]) << 16)
        } else {
            0
        };
        if n > 0 || bytes.is_empty() {
            acc = folded_multiply(acc ^ tail, self.multiplier);
        }
        self.acc = acc;
    }

    #[inline]
    fn write_u8(&mut self, b: u8) {
        self.acc = folded_multiply(self.acc ^ u64::from(b), self.multiplier ^ 0xa5a5);
    }

    #[inline]
    fn finish(&self) -> u64 {
        folded_multiply(self.acc, self.multiplier.rotate_left(29) | 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reliability_core::{ManualClock, Outcome};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn hasher_separates_similar_keys() {
        let keys = [
            "",
            "a",
            "ab",
            "ab\0",
            "ba",
            "abcdefgh",
            "abcdefgh\0",
            "abcdefghi",
        ];
        // Fresh seeds each round: a weakness that shows for some seeds only
        // (as an additive length mix once did) fails here.
        for _ in 0..200 {
            let s = SeededState::new();
            let mut hashes: Vec<u64> = keys.iter().map(|k| s.hash_one(k)).collect();
            hashes.sort_unstable();
            hashes.dedup();
            assert_eq!(hashes.len(), keys.len());
        }
        // All one- to three-byte strings over a small alphabet, and
        // "k0".."k99999": no collision of the full 64-bit hash.
        let s = SeededState::new();
        let alphabet = [b'\0', b'a', b'b', b'z', 0xff];
        let mut short: Vec<Vec<u8>> = vec![Vec::new()];
        for len in 1..=3 {
            let prev: Vec<Vec<u8>> = short
                .iter()
                .filter(|k| k.len() == len - 1)
                .cloned()
                .collect();
            for p in prev {
                for &c in &alphabet {
                    let mut k = p.clone();
                    k.push(c);
                    short.push(k);
                }
            }
        }
        let mut hashes: Vec<u64> = short.iter().map(|k| s.hash_one(k.as_slice())).collect();
        hashes.extend((0..100_000).map(|i| s.hash_one(format!("k{i}").as_str())));
        let n = hashes.len();
        hashes.sort_unstable();
        hashes.dedup();
        assert_eq!(hashes.len(), n);
    }

    #[test]
    fn tiny_shares_stay_bounded() {
        let clock = ManualClock::new();
        for max_keys in 1..=9 {
            let l = LocalRateLimiter::builder()
                .max_keys(max_keys)
                .shards(1)
                .clock(Arc::new(clock.clone()))
                .build();
            let q = Quota::from_micros(1_000_000, 2).unwrap();
            for i in 0..50 {
                assert!(l.check_sync(&format!("k{i}"), q, 1).unwrap().is_allowed());
                assert!(l.len() <= max_keys, "max_keys {max_keys}: {} keys", l.len());
                clock.advance(Duration::from_micros(1));
            }
            // The newest key is always kept.
            assert_eq!(l.check_sync("k49", q, 1).unwrap().remaining, 0);
        }
    }

    #[test]
    fn shard_count_respects_max_keys() {
        let l = LocalRateLimiter::builder().max_keys(10).shards(64).build();
        assert_eq!(l.shards(), 8);
        assert_eq!(l.max_keys(), 8);
        let l = LocalRateLimiter::builder().max_keys(1).build();
        assert_eq!((l.shards(), l.max_keys()), (1, 1));
        let l = LocalRateLimiter::new();
        assert!(l.shards() >= MIN_DEFAULT_SHARDS && l.shards().is_power_of_two());
    }

    #[test]
    fn full_shard_drops_idle_then_evicts_oldest() {
        let clock = ManualClock::new();
        let l = LocalRateLimiter::builder()
            .max_keys(16)
            .shards(1)
            .clock(Arc::new(clock.clone()))
            .build();
        let q = Quota::from_micros(1_000_000, 1).unwrap();
        for i in 0..16 {
            assert!(l.check_sync(&format!("k{i}"), q, 1).unwrap().is_allowed());
            clock.advance(Duration::from_micros(1));
        }
        assert_eq!(l.len(), 16);
        // All 16 active: two (the oldest) are evicted down to 14, then one
        // inserted.
        assert!(l.check_sync("new", q, 1).unwrap().is_allowed());
        assert_eq!((l.len(), l.evicted_active()), (15, 2));
        // The oldest lost its state (fresh burst); a recent one did not.
        assert!(l.check_sync("k0", q, 1).unwrap().is_allowed());
        assert_eq!(l.check_sync("k15", q, 1).unwrap().outcome, Outcome::Denied);
        // Once everything is idle, a full shard forgets it without counting.
        clock.advance(Duration::from_secs(2));
        for i in 0..16 {
            let _ = l.check_sync(&format!("x{i}"), q, 1).unwrap();
        }
        assert_eq!(l.evicted_active(), 2);
        assert!(l.len() <= 16);
    }
}
