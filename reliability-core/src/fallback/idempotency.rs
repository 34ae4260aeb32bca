//! `IdempotencyStore` for [`Fallback`]: claims made on the secondary while
//! the primary was unavailable stay honoured for their TTL and are replayed
//! to the primary when it returns.
//!
//! - While the primary is skipped or unavailable, `claim` is answered by the
//!   secondary and the answer is written to a *journal* (key, fingerprint,
//!   state, expiry).
//! - For every key in the journal, the secondary answers first, until the
//!   entry expires: a key claimed during the outage is not acquired again
//!   after failback within its TTL.
//! - [`Fallback::reconcile`] replays the journal to the primary with
//!   claim-if-absent semantics (a claim then, for completed entries, a
//!   complete with the remaining retention). A key the primary already holds
//!   is a *conflict*: counted, logged, and the primary's answer wins.
//! - A lease acquired from the primary can still be completed while the
//!   primary is down: the completion is recorded on the secondary and
//!   replayed.
//! - `release` / `extend` of a primary lease while the primary is down
//!   succeed without effect on the primary (its lease simply runs out).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use tracing::{info, warn};

use super::Fallback;
use crate::capability::Capabilities;
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::idempotency::{Claim, Fingerprint, IdempotencyStore, Lease, LeaseToken};

/// What the fallback remembers of keys the secondary answered for.
#[derive(Debug, Default)]
pub(super) struct Journal {
    entries: Sharded<String, JournalEntry>,
    /// Leases acquired from the primary: key and fingerprint, so a
    /// completion can be recorded locally if the primary is gone.
    primary_leases: Sharded<LeaseToken, (Fingerprint, Timestamp)>,
    conflicts: std::sync::atomic::AtomicU64,
    replayed: std::sync::atomic::AtomicU64,
    /// Held by a reconciliation pass: a second pass waits, then finds the
    /// entries the first replayed, instead of replaying them again.
    reconciling: tokio::sync::Mutex<()>,
}

/// Shards of the journal's maps: a resize (of a journal holding a long
/// outage's claims) or a busy lock stalls one shard's callers, not every
/// claim.
const SHARDS: usize = 64;

/// A shard prunes dead entries on insert once it holds this many, and then
/// at twice what stayed (amortized).
const MIN_PRUNE_AT: usize = 64;

/// A map split into [`SHARDS`] mutex-guarded parts by key hash.
#[derive(Debug)]
pub(super) struct Sharded<K, V> {
    shards: Box<[Mutex<Shard<K, V>>]>,
    hasher: std::hash::RandomState,
}

#[derive(Debug)]
struct Shard<K, V> {
    map: HashMap<K, V>,
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
    /// The shard of `key`, locked.
    fn shard<Q: Hash + ?Sized>(&self, key: &Q) -> MutexGuard<'_, Shard<K, V>> {
        let i = (self.hasher.hash_one(key) % SHARDS as u64) as usize;
        lock(&self.shards[i])
    }

    /// Runs `f` on `key`'s value, if there is one.
    fn update<Q>(&self, key: &Q, f: impl FnOnce(&mut V))
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(v) = self.shard(key).map.get_mut(key) {
            f(v);
        }
    }

    /// Removes `key`'s value.
    fn remove<Q>(&self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shard(key).map.remove(key)
    }

    /// Every shard, locked one after the other.
    fn each(&self) -> impl Iterator<Item = MutexGuard<'_, Shard<K, V>>> {
        self.shards.iter().map(lock)
    }

    /// Inserts, first dropping the entries `live` rejects if the shard
    /// reached its prune size.
    fn insert(&self, key: K, value: V, live: impl Fn(&V) -> bool) {
        let mut shard = self.shard(&key);
        if shard.map.len() >= shard.prune_at {
            shard.map.retain(|_, v| live(v));
            shard.prune_at = (shard.map.len() * 2).max(MIN_PRUNE_AT);
        }
        shard.map.insert(key, value);
    }
}

/// Journal entries replayed to the primary at once.
const REPLAY_CONCURRENCY: usize = 32;

#[derive(Debug, Clone)]
struct JournalEntry {
    fingerprint: Fingerprint,
    /// The secondary's lease while pending.
    local: Option<LeaseToken>,
    /// The primary's lease once a pending entry was replayed, or the lease
    /// a completion recorded locally belongs to.
    primary: Option<Lease>,
    state: EntryState,
    expires_at: Timestamp,
    replayed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum EntryState {
    Pending,
    Completed(Option<Bytes>),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What one [`Fallback::reconcile`] pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReconcileReport {
    /// Entries the primary now holds.
    pub replayed: u64,
    /// Entries the primary already held (another replica got there first).
    pub conflicts: u64,
    /// Entries left for a later pass (primary unavailable meanwhile).
    pub pending: u64,
    /// Entries dropped because their TTL ended.
    pub expired: u64,
}

impl<P: IdempotencyStore, S: IdempotencyStore> Fallback<P, S> {
    fn now(&self) -> Timestamp {
        self.breaker.clock().now()
    }

    /// Journal entries not yet replayed to the primary.
    pub fn pending_reconcile(&self) -> u64 {
        let now = self.now();
        self.journal
            .entries
            .each()
            .map(|s| {
                s.map
                    .values()
                    .filter(|e| !e.replayed && e.expires_at > now)
                    .count()
            })
            .sum::<usize>() as u64
    }

    /// Conflicts found by reconciliation since the fallback was built.
    pub fn reconcile_conflicts(&self) -> u64 {
        self.journal
            .conflicts
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Replays the journal to the primary (see the module docs). Does nothing
    /// unless the breaker routes to the primary. Entries whose replay meets an
    /// unavailable primary stay for the next pass. Passes run one at a time:
    /// concurrent callers wait, and replay nothing twice.
    ///
    /// # Errors
    /// None so far: failures are counted in the report; the `Result` leaves
    /// room for backends that must report them.
    pub async fn reconcile(&self) -> Result<ReconcileReport> {
        let mut report = ReconcileReport::default();
        if !self.breaker.routes_to_primary() {
            report.pending = self.pending_reconcile();
            return Ok(report);
        }
        let _pass = self.journal.reconciling.lock().await;
        let now = self.now();
        let mut todo: Vec<(String, JournalEntry)> = Vec::new();
        for mut shard in self.journal.entries.each() {
            let before = shard.map.len();
            shard.map.retain(|_, e| e.expires_at > now);
            report.expired += (before - shard.map.len()) as u64;
            todo.extend(
                shard
                    .map
                    .iter()
                    .filter(|(_, e)| !e.replayed)
                    .map(|(k, e)| (k.clone(), e.clone())),
            );
        }
        let replays = todo.into_iter().filter_map(|(key, entry)| {
            let ttl = entry.expires_at.saturating_since(now);
            (!ttl.is_zero()).then_some((key, entry, ttl))
        });
        // Up to REPLAY_CONCURRENCY replays in flight: they pipeline on the
        // primary's connection, so a long outage's journal replays in a
        // fraction of the one-by-one time.
        let mut results = stream::iter(replays)
            .map(|(key, entry, ttl)| async move {
                // `None`: skipped, the primary went away meanwhile.
                let r = if self.breaker.routes_to_primary() {
                    Some(self.replay_one(&key, &entry, ttl).await)
                } else {
                    None
                };
                (key, r)
            })
            .buffer_unordered(REPLAY_CONCURRENCY);
        while let Some((key, r)) = results.next().await {
            let Some(r) = r else {
                report.pending += 1;
                continue;
            };
            match r {
                Ok(Some(primary)) => {
                    report.replayed += 1;
                    self.journal
                        .replayed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.journal.entries.update(&key, |e| {
                        e.replayed = true;
                        if e.state == EntryState::Pending {
                            e.primary = primary;
                        }
                    });
                }
                Ok(None) => {
                    report.conflicts += 1;
                    self.journal
                        .conflicts
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    warn!(key = %key, "reconcile conflict: the primary already holds this key");
                    self.journal.entries.update(&key, |e| e.replayed = true);
                }
                Err(e) if e.is_unavailable() => {
                    self.breaker.record_failure(&e);
                    report.pending += 1;
                }
                Err(e) => {
                    // A caller error will not change on retry: give up on
                    // this entry (the secondary keeps honouring it).
                    warn!(key = %key, error = %e, "reconcile: the primary refused an entry");
                    report.conflicts += 1;
                    self.journal.entries.update(&key, |e| e.replayed = true);
                }
            }
        }
        // Every live entry not replayed was tried: what is left is `pending`.
        crate::metrics::reconcile(report.replayed, report.conflicts, report.pending);
        if report.replayed + report.conflicts > 0 {
            info!(
                replayed = report.replayed,
                conflicts = report.conflicts,
                pending = report.pending,
                "idempotency journal reconciled"
            );
        }
        Ok(report)
    }

    /// `Ok(Some(lease))`: replayed (the primary lease for pending entries);
    /// `Ok(None)`: conflict.
    async fn replay_one(
        &self,
        key: &str,
        entry: &JournalEntry,
        ttl: Duration,
    ) -> Result<Option<Option<Lease>>> {
        // A completion of a lease the primary may still honour.
        if let (EntryState::Completed(result), Some(lease)) = (&entry.state, &entry.primary) {
            match self.primary.complete(lease, result.clone(), ttl).await {
                Ok(()) => return Ok(Some(None)),
                Err(Error::LeaseLost { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        match self.primary.claim(key, &entry.fingerprint, ttl).await? {
            Claim::Acquired(lease) => match &entry.state {
                EntryState::Completed(result) => {
                    self.primary.complete(&lease, result.clone(), ttl).await?;
                    Ok(Some(None))
                }
                EntryState::Pending => Ok(Some(Some(lease))),
            },
            Claim::InProgress { .. } | Claim::Completed(_) | Claim::Mismatch => Ok(None),
        }
    }

    fn journal_live(&self, key: &str) -> bool {
        let now = self.now();
        self.journal
            .entries
            .shard(key)
            .map
            .get(key)
            .is_some_and(|e| e.expires_at > now)
    }

    fn journal_claim(&self, key: &str, fingerprint: &Fingerprint, claim: &Claim, lease: Duration) {
        if let Claim::Acquired(l) = claim {
            let now = self.now();
            self.journal.entries.insert(
                key.to_string(),
                JournalEntry {
                    fingerprint: *fingerprint,
                    local: Some(l.token()),
                    primary: None,
                    state: EntryState::Pending,
                    expires_at: now.saturating_add(lease),
                    replayed: false,
                },
                |e| e.expires_at > now,
            );
        }
    }

    /// The journal entry a secondary lease belongs to, if any.
    fn local_entry(&self, lease: &Lease) -> Option<JournalEntry> {
        self.journal
            .entries
            .shard(lease.key())
            .map
            .get(lease.key())
            .filter(|e| e.local == Some(lease.token()))
            .cloned()
    }

    async fn claim_on_secondary(
        &self,
        key: &str,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Claim> {
        let c = self.secondary.claim(key, fingerprint, lease).await?;
        self.journal_claim(key, fingerprint, &c, lease);
        Ok(c)
    }

    /// Records locally the completion of a lease the primary gave, while the
    /// primary is unavailable.
    async fn complete_locally(
        &self,
        lease: &Lease,
        result: Option<Bytes>,
        retention: Duration,
    ) -> Result<()> {
        let token = lease.token();
        let Some((fingerprint, _)) = self
            .journal
            .primary_leases
            .shard(&token)
            .map
            .get(&token)
            .copied()
        else {
            // Not a lease this fallback handed out: nothing to record it by.
            return Err(Error::lease_lost(lease.key()));
        };
        match self
            .secondary
            .claim(lease.key(), &fingerprint, retention)
            .await?
        {
            Claim::Acquired(local) => {
                self.secondary
                    .complete(&local, result.clone(), retention)
                    .await?;
            }
            Claim::Completed(_) => {}
            Claim::InProgress { .. } | Claim::Mismatch => {
                return Err(Error::lease_lost(lease.key()))
            }
        }
        let now = self.now();
        self.journal.entries.insert(
            lease.key().to_string(),
            JournalEntry {
                fingerprint,
                local: None,
                primary: Some(lease.clone()),
                state: EntryState::Completed(result),
                expires_at: now.saturating_add(retention),
                replayed: false,
            },
            |e| e.expires_at > now,
        );
        self.journal.primary_leases.remove(&token);
        Ok(())
    }
}

#[async_trait]
impl<P: IdempotencyStore, S: IdempotencyStore> IdempotencyStore for Fallback<P, S> {
    fn capabilities(&self) -> Capabilities {
        let p = self.primary.capabilities();
        let s = self.secondary.capabilities();
        Capabilities::new("fallback")
            .with_distributed(p.distributed)
            .with_bounded(s.bounded)
    }

    async fn claim(&self, key: &str, fingerprint: &Fingerprint, lease: Duration) -> Result<Claim> {
        if self.journal_live(key) {
            let c = self.secondary.claim(key, fingerprint, lease).await?;
            match &c {
                Claim::Acquired(l) => {
                    // The local entry ran out: forget it and ask the primary.
                    let _ = self.secondary.release(l).await;
                    self.journal.entries.remove(key);
                }
                _ => return Ok(c),
            }
        }
        let claimed = self
            .call_with(
                || self.primary.claim(key, fingerprint, lease),
                || self.claim_on_secondary(key, fingerprint, lease),
            )
            .await?;
        if let Claim::Acquired(l) = &claimed {
            if !self.journal_live(key) {
                let now = self.now();
                self.journal.primary_leases.insert(
                    l.token(),
                    (*fingerprint, now.saturating_add(lease)),
                    |(_, exp)| *exp > now,
                );
            }
        }
        Ok(claimed)
    }

    async fn complete(
        &self,
        lease: &Lease,
        result: Option<Bytes>,
        retention: Duration,
    ) -> Result<()> {
        if let Some(entry) = self.local_entry(lease) {
            self.secondary
                .complete(lease, result.clone(), retention)
                .await?;
            let forward = {
                let mut entries = self.journal.entries.shard(lease.key());
                let e = entries
                    .map
                    .get_mut(lease.key())
                    .ok_or_else(|| Error::lease_lost(lease.key()))?;
                e.state = EntryState::Completed(result.clone());
                e.expires_at = self.now().saturating_add(retention);
                e.local = None;
                e.replayed = false;
                entry.primary.clone()
            };
            // Already replayed as pending: finish it on the primary too.
            if let Some(primary) = forward {
                if self
                    .primary
                    .complete(&primary, result, retention)
                    .await
                    .is_ok()
                {
                    self.journal
                        .entries
                        .update(lease.key(), |e| e.replayed = true);
                }
            }
            return Ok(());
        }
        let r = self
            .call_with(
                || self.primary.complete(lease, result.clone(), retention),
                || self.complete_locally(lease, result.clone(), retention),
            )
            .await;
        if r.is_ok() {
            let token = lease.token();
            self.journal.primary_leases.remove(&token);
        }
        r
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        if let Some(entry) = self.local_entry(lease) {
            self.secondary.release(lease).await?;
            self.journal.entries.remove(lease.key());
            if let Some(primary) = entry.primary {
                let _ = self.primary.release(&primary).await;
            }
            return Ok(());
        }
        let token = lease.token();
        let known = self.journal.primary_leases.remove(&token).is_some();
        self.call(self.primary.release(lease), async {
            if known {
                Ok(())
            } else {
                Err(Error::lease_lost(lease.key()))
            }
        })
        .await
    }

    async fn extend(&self, lease: &Lease, by: Duration) -> Result<()> {
        crate::idempotency::check_lease_duration("by", by)?;
        if let Some(entry) = self.local_entry(lease) {
            self.secondary.extend(lease, by).await?;
            let expires_at = self.now().saturating_add(by);
            self.journal
                .entries
                .update(lease.key(), |e| e.expires_at = expires_at);
            if let Some(primary) = entry.primary {
                let _ = self.primary.extend(&primary, by).await;
            }
            return Ok(());
        }
        let token = lease.token();
        let known = self
            .journal
            .primary_leases
            .shard(&token)
            .map
            .contains_key(&token);
        self.call(self.primary.extend(lease, by), async {
            if known {
                Ok(())
            } else {
                Err(Error::lease_lost(lease.key()))
            }
        })
        .await
    }
}
