//! The bounded maps behind the idempotency side of [`Fallback`](super::Fallback):
//! the journal of claims the secondary answered, the record of claims this
//! process completed through the primary, and the primary leases it holds.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;

use crate::clock::Timestamp;
use crate::idempotency::{Fingerprint, Lease, LeaseToken};

/// Shards of the maps: a resize (of a journal holding a long outage's
/// claims) or a busy lock stalls one shard's callers, not every claim.
const SHARDS: usize = 64;

/// A shard prunes dead entries on insert once it holds this many, and then
/// at twice what stayed (amortized).
const MIN_PRUNE_AT: usize = 64;

/// What an entry costs besides its key and result: the map slot, the
/// fingerprint, the leases, the timestamps.
const ENTRY_OVERHEAD: u64 = 160;

/// Bounds of the journal of local claims, and (the same bounds, counted
/// apart) of the record of claims completed through the primary. Past a
/// bound, the entries that end first go, those already on the primary
/// before the others; each one dropped is counted in
/// [`JournalUsage::evicted`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct JournalLimits {
    /// Entries at most. Default 100,000.
    pub max_entries: u64,
    /// Bytes of keys, results and bookkeeping at most. Default 64 MiB.
    pub max_bytes: u64,
}

impl Default for JournalLimits {
    fn default() -> Self {
        Self {
            max_entries: 100_000,
            max_bytes: 64 << 20,
        }
    }
}

impl JournalLimits {
    /// Bounds of `max_entries` entries and `max_bytes` bytes.
    pub fn new(max_entries: u64, max_bytes: u64) -> Self {
        Self {
            max_entries,
            max_bytes,
        }
    }
}

/// How full a bounded map of the fallback is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct JournalUsage {
    /// Entries held.
    pub entries: u64,
    /// Bytes held (keys, results, bookkeeping).
    pub bytes: u64,
    /// The entry bound.
    pub max_entries: u64,
    /// The byte bound.
    pub max_bytes: u64,
    /// Entries dropped to stay within the bounds since start.
    pub evicted: u64,
}

/// An entry of a [`Bounded`] map.
pub(super) trait Weighed {
    /// Bytes besides the key.
    fn weight(&self) -> u64;
    /// Still worth keeping at `now`.
    fn live(&self, now: Timestamp) -> bool;
    /// Lower goes first when the map is over a bound.
    fn rank(&self) -> (bool, Timestamp);
}

/// A map split into [`SHARDS`] mutex-guarded parts by key hash.
#[derive(Debug)]
pub(super) struct Sharded<K, V> {
    shards: Box<[Mutex<Shard<K, V>>]>,
    hasher: std::hash::RandomState,
}

#[derive(Debug)]
pub(super) struct Shard<K, V> {
    pub(super) map: HashMap<K, V>,
    prune_at: usize,
}

impl<K, V> Default for Sharded<K, V> {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        map: HashMap::new(),
                        prune_at: MIN_PRUNE_AT,
                    })
                })
                .collect(),
            hasher: std::hash::RandomState::new(),
        }
    }
}

impl<K: Hash + Eq, V> Sharded<K, V> {
    fn index<Q: Hash + ?Sized>(&self, key: &Q) -> usize {
        (self.hasher.hash_one(key) % SHARDS as u64) as usize
    }

    /// The shard of `key`, locked.
    pub(super) fn shard<Q: Hash + ?Sized>(&self, key: &Q) -> MutexGuard<'_, Shard<K, V>> {
        lock(&self.shards[self.index(key)])
    }

    /// Runs `f` on `key`'s value, if there is one.
    pub(super) fn update<Q, R>(&self, key: &Q, f: impl FnOnce(&mut V) -> R) -> Option<R>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shard(key).map.get_mut(key).map(f)
    }

    /// A copy of `key`'s value, if there is one.
    pub(super) fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
        V: Clone,
    {
        self.shard(key).map.get(key).cloned()
    }

    /// Every shard, locked one after the other.
    pub(super) fn each(&self) -> impl Iterator<Item = MutexGuard<'_, Shard<K, V>>> {
        self.shards.iter().map(lock)
    }

    /// Inserts, first dropping the entries `live` rejects if the shard
    /// reached its prune size.
    pub(super) fn insert(&self, key: K, value: V, live: impl Fn(&V) -> bool) {
        let mut shard = self.shard(&key);
        if shard.map.len() >= shard.prune_at {
            shard.map.retain(|_, v| live(v));
            shard.prune_at = (shard.map.len() * 2).max(MIN_PRUNE_AT);
        }
        shard.map.insert(key, value);
    }
}

/// A [`Sharded`] map of string keys within [`JournalLimits`].
#[derive(Debug)]
pub(super) struct Bounded<V> {
    map: Sharded<String, V>,
    limits: JournalLimits,
    entries: AtomicU64,
    bytes: AtomicU64,
    evicted: AtomicU64,
}

fn cost<V: Weighed>(key: &str, v: &V) -> u64 {
    key.len() as u64 + v.weight() + ENTRY_OVERHEAD
}

impl<V: Weighed> Bounded<V> {
    pub(super) fn new(limits: JournalLimits) -> Self {
        Self {
            map: Sharded::default(),
            limits,
            entries: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        }
    }

    pub(super) fn usage(&self) -> JournalUsage {
        JournalUsage {
            entries: self.entries.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            max_entries: self.limits.max_entries,
            max_bytes: self.limits.max_bytes,
            evicted: self.evicted.load(Ordering::Relaxed),
        }
    }

    fn counted(&self, added: Option<u64>, removed: Option<u64>) {
        if let Some(c) = added {
            self.entries.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add(c, Ordering::Relaxed);
        }
        if let Some(c) = removed {
            self.entries.fetch_sub(1, Ordering::Relaxed);
            self.bytes.fetch_sub(c, Ordering::Relaxed);
        }
    }

    /// The shard of `key`, locked. A caller that changes an entry's weight
    /// through it must go through [`update`](Self::update) instead.
    pub(super) fn shard(&self, key: &str) -> MutexGuard<'_, Shard<String, V>> {
        self.map.shard(key)
    }

    /// Every shard, locked one after the other (weights must not change).
    pub(super) fn each(&self) -> impl Iterator<Item = MutexGuard<'_, Shard<String, V>>> {
        self.map.each()
    }

    /// A copy of `key`'s entry.
    pub(super) fn get(&self, key: &str) -> Option<V>
    where
        V: Clone,
    {
        self.map.get(key)
    }

    /// `true` when no entry is held (a lock-free look).
    pub(super) fn is_empty(&self) -> bool {
        self.entries.load(Ordering::Relaxed) == 0
    }

    /// Runs `f` on `key`'s entry, keeping the byte count right (and within
    /// the byte bound if the entry grew: others go, as of `now`).
    pub(super) fn update<R>(
        &self,
        key: &str,
        now: Timestamp,
        f: impl FnOnce(&mut V) -> R,
    ) -> Option<R> {
        let mut shard = self.map.shard(key);
        let v = shard.map.get_mut(key)?;
        let before = cost(key, v);
        let r = f(v);
        let after = cost(key, v);
        drop(shard);
        self.bytes.fetch_add(after, Ordering::Relaxed);
        self.bytes.fetch_sub(before, Ordering::Relaxed);
        if after > before {
            self.make_room(key, Room::Grown, now);
        }
        Some(r)
    }

    /// Removes `key`'s entry.
    pub(super) fn remove(&self, key: &str) -> Option<V> {
        let v = self.map.shard(key).map.remove_entry(key)?;
        self.counted(None, Some(cost(&v.0, &v.1)));
        Some(v.1)
    }

    /// Removes `key`'s entry if `pred` holds for it.
    pub(super) fn remove_if(&self, key: &str, pred: impl FnOnce(&V) -> bool) {
        let mut shard = self.map.shard(key);
        if !shard.map.get(key).is_some_and(pred) {
            return;
        }
        if let Some((k, v)) = shard.map.remove_entry(key) {
            drop(shard);
            self.counted(None, Some(cost(&k, &v)));
        }
    }

    /// Drops the entries dead at `now`; returns how many.
    pub(super) fn prune(&self, now: Timestamp) -> u64 {
        self.map
            .each()
            .map(|mut shard| self.drop_dead(&mut shard, now))
            .sum()
    }

    /// Drops the entries of `shard` dead at `now`; returns how many.
    fn drop_dead(&self, shard: &mut Shard<String, V>, now: Timestamp) -> u64 {
        let mut freed = 0;
        let before = shard.map.len();
        shard.map.retain(|k, v| {
            let keep = v.live(now);
            if !keep {
                freed += cost(k, v);
            }
            keep
        });
        let n = (before - shard.map.len()) as u64;
        self.entries.fetch_sub(n, Ordering::Relaxed);
        self.bytes.fetch_sub(freed, Ordering::Relaxed);
        n
    }

    /// Inserts (or replaces) `key`'s entry, first making room within the
    /// bounds. An entry larger than the byte bound is not kept (counted as
    /// evicted); returns whether it was.
    pub(super) fn insert(&self, key: String, value: V, now: Timestamp) -> bool {
        let c = cost(&key, &value);
        if c > self.limits.max_bytes || self.limits.max_entries == 0 {
            self.evicted.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.make_room(&key, Room::New(c), now);
        let mut shard = self.map.shard(&key);
        if shard.map.len() >= shard.prune_at {
            self.drop_dead(&mut shard, now);
            shard.prune_at = (shard.map.len() * 2).max(MIN_PRUNE_AT);
        }
        let old = shard.map.remove_entry(&key).map(|(k, v)| cost(&k, &v));
        shard.map.insert(key, value);
        drop(shard);
        self.counted(Some(c), old);
        true
    }

    fn over(&self, room: Room) -> bool {
        let (entries, bytes) = match room {
            Room::New(bytes) => (1, bytes),
            Room::Grown => (0, 0),
        };
        self.entries.load(Ordering::Relaxed) + entries > self.limits.max_entries
            || self.bytes.load(Ordering::Relaxed) + bytes > self.limits.max_bytes
    }

    /// Evicts others than `key` until `room` fits: from `key`'s shard first,
    /// then the next ones; in a shard, the dead entries and an eighth of the
    /// live ones, lowest [`rank`](Weighed::rank) first, so the scan of a full
    /// shard is paid once per many inserts, not on each.
    fn make_room(&self, key: &str, room: Room, now: Timestamp) {
        if !self.over(room) {
            return;
        }
        let mut i = self.map.index(key);
        let mut empty_in_a_row = 0;
        while self.over(room) && empty_in_a_row < SHARDS {
            let mut shard = lock(&self.map.shards[i]);
            let mut ranks: Vec<Option<(bool, Timestamp)>> = shard
                .map
                .iter()
                .filter(|(k, _)| k.as_str() != key)
                .map(|(_, v)| v.live(now).then(|| v.rank()))
                .collect();
            let n = (ranks.len() / 8).max(1).min(ranks.len());
            if n == 0 {
                drop(shard);
                empty_in_a_row += 1;
                i = (i + 1) % SHARDS;
                continue;
            }
            empty_in_a_row = 0;
            let (_, &mut cut, _) = ranks.select_nth_unstable(n - 1);
            let (mut gone, mut freed, mut live) = (0, 0, 0);
            shard.map.retain(|k, v| {
                let rank = v.live(now).then(|| v.rank());
                if gone == n || k.as_str() == key || rank > cut {
                    return true;
                }
                gone += 1;
                freed += cost(k, v);
                live += u64::from(rank.is_some());
                false
            });
            drop(shard);
            self.entries.fetch_sub(gone as u64, Ordering::Relaxed);
            self.bytes.fetch_sub(freed, Ordering::Relaxed);
            self.evicted.fetch_add(live, Ordering::Relaxed);
        }
    }
}

/// What must fit in a [`Bounded`] map.
#[derive(Debug, Clone, Copy)]
enum Room {
    /// A new entry of this many bytes.
    New(u64),
    /// An entry that grew (already counted).
    Grown,
}

/// A claim the secondary answered, or a completion recorded locally.
#[derive(Debug, Clone)]
pub(super) struct JournalEntry {
    pub(super) fingerprint: Fingerprint,
    /// The secondary's lease while pending.
    pub(super) local: Option<LeaseToken>,
    /// The primary's lease once a pending entry was replayed, or the lease
    /// a completion recorded locally belongs to.
    pub(super) primary: Option<Lease>,
    pub(super) state: EntryState,
    pub(super) expires_at: Timestamp,
    pub(super) replayed: bool,
    /// Changes with every write to the entry: a replay that started from
    /// an older version must not mark the newer one replayed.
    pub(super) version: u64,
}

/// Where a journal entry stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum EntryState {
    Pending,
    Completed(Option<Bytes>),
}

impl Weighed for JournalEntry {
    fn weight(&self) -> u64 {
        let lease = self.primary.as_ref().map_or(0, |l| l.key().len() as u64);
        match &self.state {
            EntryState::Completed(Some(r)) => r.len() as u64 + lease,
            _ => lease,
        }
    }
    fn live(&self, now: Timestamp) -> bool {
        self.expires_at > now
    }
    fn rank(&self) -> (bool, Timestamp) {
        // Replayed entries (the primary holds them) go first.
        (!self.replayed, self.expires_at)
    }
}

/// A claim this process completed through the primary (write-through).
#[derive(Debug, Clone)]
pub(super) struct Completion {
    pub(super) fingerprint: Fingerprint,
    pub(super) result: Option<Bytes>,
    pub(super) expires_at: Timestamp,
}

impl Weighed for Completion {
    fn weight(&self) -> u64 {
        self.result.as_ref().map_or(0, |r| r.len() as u64)
    }
    fn live(&self, now: Timestamp) -> bool {
        self.expires_at > now
    }
    fn rank(&self) -> (bool, Timestamp) {
        (false, self.expires_at)
    }
}

/// A lease this process holds on the primary.
#[derive(Debug, Clone, Copy)]
pub(super) struct PrimaryLease {
    pub(super) token: LeaseToken,
    pub(super) fingerprint: Fingerprint,
    pub(super) expires_at: Timestamp,
}

/// Sequence of [`JournalEntry::version`].
#[derive(Debug, Default)]
pub(super) struct Versions(AtomicU64);

impl Versions {
    pub(super) fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
