//! `IdempotencyStore` for [`Fallback`]: claims made on the secondary while
//! the primary was unavailable stay honoured for their TTL and are replayed
//! to the primary when it returns.
//!
//! - While the primary is skipped or unavailable, `claim` is answered by the
//!   secondary and the answer is written to a *journal* (key, fingerprint,
//!   state, expiry), bounded by [`JournalLimits`] (see
//!   [`Fallback::with_journal_limits`]).
//! - For every key in the journal, the secondary answers first, until the
//!   entry expires: a key claimed during the outage is not acquired again
//!   after failback within its TTL. If the bounded secondary evicted the
//!   key, the journal answers (its result, or in progress).
//! - [`Fallback::reconcile`] replays the journal to the primary with
//!   claim-if-absent semantics (a claim then, for completed entries, a
//!   complete with the remaining retention). A key the primary holds
//!   completed (or for another payload) is a *conflict*: counted, logged,
//!   and the primary's answer wins; a key another holder has in progress is
//!   tried again by later passes. Entries carry a version: one written
//!   while its replay was in flight (a completion) is replayed again, so the
//!   newest state reaches the primary.
//! - A lease acquired from the primary can still be completed while the
//!   primary is down: the completion is recorded on the secondary and
//!   replayed. While this process holds a primary lease on a key, a local
//!   claim of that key answers in progress.
//! - `release` / `extend` of a primary lease while the primary is down
//!   succeed locally; the release reaches the primary with the next
//!   reconcile pass.
//! - Claims completed through the primary are kept in a bounded local
//!   record (write-through, same bounds as the journal): while the primary
//!   is down a duplicate of one is answered `Completed` from it, and after
//!   the primary lost data ([`Breaker::observe_identity`](super::Breaker::observe_identity))
//!   they join the journal and are replayed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use tracing::{info, warn};

use super::journal::{
    Bounded, Completion, EntryState, JournalEntry, PrimaryLease, Sharded, Versions,
};
use super::Fallback;
use super::JournalLimits;
use crate::capability::Capabilities;
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::idempotency::{Claim, Fingerprint, IdempotencyStore, Lease};

/// What the fallback remembers of keys the secondary answered for, and of
/// claims it completed through the primary.
#[derive(Debug)]
pub(super) struct Journal {
    pub(super) entries: Bounded<JournalEntry>,
    /// Claims this process completed through the primary (write-through,
    /// same bounds as `entries`): answers while the primary is down, and
    /// replayed after the primary lost data.
    pub(super) completed: Bounded<Completion>,
    /// Leases acquired from the primary, by key: a completion can be
    /// recorded locally if the primary is gone, and a local claim of the
    /// same key during an outage sees that this process holds it.
    /// Keyed by a 64-bit hash of the key (see [`Fallback::slot`]): no copy
    /// of the key per claim on the Closed path; a collision only makes a
    /// local claim answer in progress, and tokens are still compared.
    primary_leases: Sharded<u64, PrimaryLease>,
    slots: std::hash::RandomState,
    versions: Versions,
    /// Primary leases released while the primary did not answer: released
    /// there by the next reconcile pass, before the key's replay (else the
    /// primary keeps a claim of ours that a local claim then conflicts with).
    unreleased: Sharded<String, Vec<Lease>>,
    conflicts: AtomicU64,
    replayed: AtomicU64,
    /// The breaker's count of primary data losses this journal acted on.
    losses_seen: AtomicU64,
    /// Held by a reconciliation pass: a second pass waits, then finds the
    /// entries the first replayed, instead of replaying them again.
    reconciling: tokio::sync::Mutex<()>,
}

impl Default for Journal {
    fn default() -> Self {
        Self::new(JournalLimits::default())
    }
}

impl Journal {
    pub(super) fn new(limits: JournalLimits) -> Self {
        Self {
            entries: Bounded::new(limits),
            completed: Bounded::new(limits),
            primary_leases: Sharded::default(),
            slots: std::hash::RandomState::new(),
            versions: Versions::default(),
            unreleased: Sharded::default(),
            conflicts: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            losses_seen: AtomicU64::new(0),
            reconciling: tokio::sync::Mutex::new(()),
        }
    }
}

/// Journal entries replayed to the primary at once.
const REPLAY_CONCURRENCY: usize = 32;

/// Rounds of one reconcile pass: entries written while their replay was in
/// flight are replayed again (a completion forwarded), up to this many times.
const REPLAY_ROUNDS: usize = 3;

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

/// Which side answered a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Primary,
    Secondary,
}

/// The outcome of one entry's replay.
enum Replayed {
    /// The primary holds the entry; for a pending one, under this lease.
    Held(Option<Lease>),
    /// The primary already held the key.
    Conflict,
    /// Another holder's lease on the primary: not replayed yet.
    Busy,
}

impl<P, S> Fallback<P, S> {
    /// Bounds the journal of local claims and the record of claims
    /// completed through the primary (each within `limits`). Replaces both,
    /// so call it before the first claim.
    pub fn with_journal_limits(mut self, limits: JournalLimits) -> Self {
        self.journal = std::sync::Arc::new(Journal::new(limits));
        self
    }

    /// How full the journal of local claims is.
    pub fn journal_usage(&self) -> super::JournalUsage {
        self.journal.entries.usage()
    }

    /// How full the record of claims completed through the primary is.
    pub fn completed_usage(&self) -> super::JournalUsage {
        self.journal.completed.usage()
    }
}

impl<P: IdempotencyStore, S: IdempotencyStore> Fallback<P, S> {
    fn now(&self) -> Timestamp {
        self.breaker.clock().now()
    }

    /// Journal entries not yet replayed to the primary. After the primary
    /// lost data (see [`Breaker::observe_identity`](super::Breaker::observe_identity)),
    /// the claims this process completed through it count too: they are
    /// replayed like the journal.
    pub fn pending_reconcile(&self) -> u64 {
        self.after_data_loss();
        let now = self.now();
        self.unreleased()
            + self
                .journal
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
        self.journal.conflicts.load(Ordering::Relaxed)
    }

    /// Once per primary data loss the breaker noticed: every live journal
    /// entry is replayed again, and every claim completed through the
    /// primary joins the journal (answered from it, replayed by
    /// [`reconcile`](Self::reconcile)).
    fn after_data_loss(&self) {
        let losses = self.breaker.data_losses();
        let seen = self.journal.losses_seen.load(Ordering::Acquire);
        if losses == seen
            || self
                .journal
                .losses_seen
                .compare_exchange(seen, losses, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return;
        }
        let now = self.now();
        for mut shard in self.journal.entries.each() {
            for e in shard.map.values_mut() {
                e.replayed = false;
                e.version = self.journal.versions.next();
            }
        }
        let mut restored = 0u64;
        let completed: Vec<(String, Completion)> = self
            .journal
            .completed
            .each()
            .flat_map(|s| {
                s.map
                    .iter()
                    .filter(|(_, c)| c.expires_at > now)
                    .map(|(k, c)| (k.clone(), c.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        for (key, c) in completed {
            if self.journal.entries.get(&key).is_some() {
                continue;
            }
            let entry = JournalEntry {
                fingerprint: c.fingerprint,
                local: None,
                primary: None,
                state: EntryState::Completed(c.result),
                expires_at: c.expires_at,
                replayed: false,
                version: self.journal.versions.next(),
            };
            restored += u64::from(self.journal.entries.insert(key, entry, now));
        }
        warn!(
            restored,
            "the primary lost data: the claims completed through it are answered locally and replayed"
        );
    }

    /// Replays the journal to the primary (see the module docs). Does nothing
    /// unless the breaker routes to the primary. Entries whose replay meets an
    /// unavailable primary stay for the next pass. Passes run one at a time:
    /// concurrent callers wait, and replay nothing twice. An entry written
    /// while its replay was in flight (completed, say) is replayed again in
    /// the same pass, so its newest state reaches the primary.
    ///
    /// # Errors
    /// None so far: failures are counted in the report; the `Result` leaves
    /// room for backends that must report them.
    pub async fn reconcile(&self) -> Result<ReconcileReport> {
        self.after_data_loss();
        let mut report = ReconcileReport::default();
        if !self.breaker.routes_to_primary() {
            report.pending = self.pending_reconcile();
            return Ok(report);
        }
        let _pass = self.journal.reconciling.lock().await;
        report.expired = self.journal.entries.prune(self.now());
        self.release_all_stale().await;
        for _ in 0..REPLAY_ROUNDS {
            let changed = self.replay_round(&mut report).await;
            if changed == 0 {
                break;
            }
        }
        report.pending = self.pending_reconcile();
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

    /// Replays every live entry not replayed yet; returns how many changed
    /// while their replay was in flight.
    async fn replay_round(&self, report: &mut ReconcileReport) -> u64 {
        let now = self.now();
        let mut todo: Vec<(String, JournalEntry)> = Vec::new();
        for shard in self.journal.entries.each() {
            todo.extend(
                shard
                    .map
                    .iter()
                    .filter(|(_, e)| !e.replayed && e.expires_at > now)
                    .map(|(k, e)| (k.clone(), e.clone())),
            );
        }
        // In key order, so a pass is the same whatever the maps' hashing.
        todo.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        // Up to REPLAY_CONCURRENCY replays in flight: they pipeline on the
        // primary's connection, so a long outage's journal replays in a
        // fraction of the one-by-one time.
        let mut results = stream::iter(todo)
            .map(|(key, entry)| async move {
                let ttl = entry.expires_at.saturating_since(now);
                // `None`: skipped, the primary went away meanwhile.
                let r = if self.breaker.routes_to_primary() && !ttl.is_zero() {
                    Some(self.replay_one(&key, &entry, ttl).await)
                } else {
                    None
                };
                (key, entry.version, r)
            })
            .buffer_unordered(REPLAY_CONCURRENCY);
        let mut changed = 0;
        while let Some((key, version, r)) = results.next().await {
            match r {
                None => {}
                Some(Ok(outcome)) => {
                    changed += u64::from(!self.settle(&key, version, outcome, report).await);
                }
                Some(Err(e)) if e.is_unavailable() => self.breaker.record_failure(&e),
                Some(Err(e)) => {
                    // A caller error will not change on retry: give up on
                    // this entry (the secondary keeps honouring it).
                    warn!(key = %key, error = %e, "reconcile: the primary refused an entry");
                    report.conflicts += 1;
                    self.journal
                        .entries
                        .update(&key, self.now(), |e| e.replayed = true);
                }
            }
        }
        changed
    }

    /// Marks `key` replayed if it is still at `version`; returns `false` if
    /// it changed meanwhile (it stays for the next round, with the primary
    /// lease the replay got). A lease got for an entry released meanwhile
    /// is released on the primary.
    async fn settle(
        &self,
        key: &str,
        version: u64,
        outcome: Replayed,
        report: &mut ReconcileReport,
    ) -> bool {
        let counter = match &outcome {
            Replayed::Held(_) => {
                report.replayed += 1;
                &self.journal.replayed
            }
            Replayed::Conflict => {
                report.conflicts += 1;
                warn!(key = %key, "reconcile conflict: the primary already holds this key");
                &self.journal.conflicts
            }
            Replayed::Busy => return true,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let lease = match outcome {
            Replayed::Held(lease) => lease,
            Replayed::Conflict | Replayed::Busy => None,
        };
        let kept = self.journal.entries.update(key, self.now(), |e| {
            if lease.is_some() {
                // A fresh primary lease replaces any older one (the primary
                // may have lost it).
                e.primary.clone_from(&lease);
            }
            let same = e.version == version;
            e.replayed = same;
            same
        });
        match kept {
            Some(same) => same,
            None => {
                if let Some(lease) = lease {
                    if self.primary.release(&lease).await.is_err() {
                        self.release_later(lease);
                    }
                }
                true
            }
        }
    }

    /// Remembers a primary lease to release once the primary answers.
    fn release_later(&self, lease: Lease) {
        let mut shard = self.journal.unreleased.shard(lease.key());
        let leases = shard.map.entry(lease.key().to_string()).or_default();
        if !leases.contains(&lease) {
            leases.push(lease);
        }
    }

    fn unreleased(&self) -> u64 {
        self.journal
            .unreleased
            .each()
            .map(|s| s.map.len() as u64)
            .sum()
    }

    /// Releases on the primary the leases of `key` released locally while
    /// the primary did not answer, if any.
    async fn release_stale(&self, key: &str) -> Result<()> {
        let Some(leases) = self.journal.unreleased.get(key) else {
            return Ok(());
        };
        for lease in leases {
            match self.primary.release(&lease).await {
                Ok(()) | Err(Error::LeaseLost { .. }) => {}
                Err(e) => return Err(e),
            }
            let mut shard = self.journal.unreleased.shard(key);
            if let Some(left) = shard.map.get_mut(key) {
                left.retain(|l| *l != lease);
                if left.is_empty() {
                    shard.map.remove(key);
                }
            }
        }
        Ok(())
    }

    /// Releases every stale primary lease (see [`release_stale`](Self::release_stale)).
    async fn release_all_stale(&self) {
        let keys: Vec<String> = self
            .journal
            .unreleased
            .each()
            .flat_map(|s| s.map.keys().cloned().collect::<Vec<_>>())
            .collect();
        for key in keys {
            if !self.breaker.routes_to_primary() {
                return;
            }
            if let Err(e) = self.release_stale(&key).await {
                if e.is_unavailable() {
                    self.breaker.record_failure(&e);
                }
                return;
            }
        }
    }

    async fn replay_one(&self, key: &str, entry: &JournalEntry, ttl: Duration) -> Result<Replayed> {
        self.release_stale(key).await?;
        // A completion of a lease the primary may still honour.
        if let (EntryState::Completed(result), Some(lease)) = (&entry.state, &entry.primary) {
            match self.primary.complete(lease, result.clone(), ttl).await {
                Ok(()) => return Ok(Replayed::Held(None)),
                Err(Error::LeaseLost { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        // A pending entry replayed before a data loss: the primary may
        // still hold it under that replay's lease (it kept its data).
        if let (EntryState::Pending, Some(lease)) = (&entry.state, &entry.primary) {
            match self.primary.extend(lease, ttl).await {
                Ok(()) => return Ok(Replayed::Held(Some(lease.clone()))),
                Err(Error::LeaseLost { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        match self.primary.claim(key, &entry.fingerprint, ttl).await? {
            Claim::Acquired(lease) => match &entry.state {
                EntryState::Completed(result) => {
                    if let Err(e) = self.primary.complete(&lease, result.clone(), ttl).await {
                        // The primary holds the key under this lease now:
                        // the next replay completes through it.
                        self.journal
                            .entries
                            .update(key, self.now(), |e| e.primary = Some(lease));
                        return Err(e);
                    }
                    Ok(Replayed::Held(None))
                }
                EntryState::Pending => Ok(Replayed::Held(Some(lease))),
            },
            // Held by someone else for now: tried again by the next pass
            // (the holder may release it, and then the primary must learn).
            Claim::InProgress { .. } => Ok(Replayed::Busy),
            Claim::Completed(_) | Claim::Mismatch => Ok(Replayed::Conflict),
        }
    }

    fn journal_live(&self, key: &str) -> bool {
        // Lock-free while the journal is empty (the Closed path): a local
        // claim journaling this key meanwhile is caught by the primary
        // claim's own look at the journal (`hold_primary_lease`).
        if self.journal.entries.is_empty() {
            return false;
        }
        let now = self.now();
        self.journal
            .entries
            .shard(key)
            .map
            .get(key)
            .is_some_and(|e| e.expires_at > now)
    }

    /// What the journal says of `key` when the secondary no longer holds it
    /// (evicted by its bound): the completion, or the pending claim.
    fn journal_says(&self, key: &str, fingerprint: &Fingerprint) -> Option<Claim> {
        let now = self.now();
        let e = self
            .journal
            .entries
            .get(key)
            .filter(|e| e.expires_at > now)?;
        if e.fingerprint != *fingerprint {
            return Some(Claim::Mismatch);
        }
        Some(match e.state {
            EntryState::Completed(result) => Claim::Completed(result),
            EntryState::Pending => Claim::InProgress {
                retry_after: e.expires_at.saturating_since(now),
            },
        })
    }

    /// What this process knows of `key` without the primary: a lease it
    /// holds there, or a claim it completed there.
    fn known_locally(&self, key: &str, fingerprint: &Fingerprint) -> Option<Claim> {
        let now = self.now();
        let known = |matches: bool, claim: Claim| {
            if matches {
                claim
            } else {
                Claim::Mismatch
            }
        };
        if let Some(held) = self.journal.primary_leases.get(&self.slot(key)) {
            if held.expires_at > now {
                let retry_after = held.expires_at.saturating_since(now);
                return Some(known(
                    held.fingerprint == *fingerprint,
                    Claim::InProgress { retry_after },
                ));
            }
        }
        if self.journal.completed.is_empty() {
            return None;
        }
        let done = self
            .journal
            .completed
            .get(key)
            .filter(|c| c.expires_at > now)?;
        Some(known(
            done.fingerprint == *fingerprint,
            Claim::Completed(done.result),
        ))
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
                    version: self.journal.versions.next(),
                },
                now,
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

    /// The primary lease of `lease`'s key, if it is this one.
    fn primary_lease(&self, lease: &Lease) -> Option<PrimaryLease> {
        self.journal
            .primary_leases
            .get(&self.slot(lease.key()))
            .filter(|p| p.token == lease.token())
    }

    /// Where `key`'s primary lease is kept.
    fn slot(&self, key: &str) -> u64 {
        use std::hash::BuildHasher;
        self.journal.slots.hash_one(key)
    }

    fn forget_primary_lease(&self, lease: &Lease) {
        let slot = self.slot(lease.key());
        let mut shard = self.journal.primary_leases.shard(&slot);
        if shard
            .map
            .get(&slot)
            .is_some_and(|p| p.token == lease.token())
        {
            shard.map.remove(&slot);
        }
    }

    async fn claim_on_secondary(
        &self,
        key: &str,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Claim> {
        if let Some(known) = self.known_locally(key, fingerprint) {
            return Ok(known);
        }
        let c = self.secondary.claim(key, fingerprint, lease).await?;
        let Claim::Acquired(local) = &c else {
            return Ok(c);
        };
        // Journaled first, then this process's primary leases looked at;
        // a primary claim does the converse: of two that answered at once,
        // at least one sees the other and gives its lease back.
        self.journal_claim(key, fingerprint, &c, lease);
        let Some(held) = self.known_locally(key, fingerprint) else {
            return Ok(c);
        };
        self.journal
            .entries
            .remove_if(key, |e| e.local == Some(local.token()));
        let _ = self.secondary.release(local).await;
        Ok(held)
    }

    /// A lease the primary just gave: this process's primary lease of the
    /// key, unless a local claim of it answered meanwhile (then the primary
    /// lease goes back and the local holder's claim is the answer). The
    /// lease is recorded before the journal is looked at (a local claim does
    /// the converse), so two claims answering at once never both hold.
    async fn hold_primary_lease(
        &self,
        key: &str,
        fingerprint: &Fingerprint,
        lease: &Lease,
        duration: Duration,
    ) -> Result<Option<Claim>> {
        let now = self.now();
        self.journal.primary_leases.insert(
            self.slot(key),
            PrimaryLease {
                token: lease.token(),
                fingerprint: *fingerprint,
                expires_at: now.saturating_add(duration),
            },
            |p| p.expires_at > now,
        );
        let local = self.journal_says(key, fingerprint);
        if local.is_some() {
            self.forget_primary_lease(lease);
            if self.primary.release(lease).await.is_err() {
                self.release_later(lease.clone());
            }
        }
        Ok(local)
    }

    /// A claim of a key the journal holds: the secondary answers; if it lost
    /// the key (evicted), the journal does. `None` once the entry ran out.
    async fn claim_journaled(
        &self,
        key: &str,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Option<Claim>> {
        let c = self.secondary.claim(key, fingerprint, lease).await?;
        let Claim::Acquired(l) = &c else {
            return Ok(Some(c));
        };
        let _ = self.secondary.release(l).await;
        if let Some(said) = self.journal_says(key, fingerprint) {
            return Ok(Some(said));
        }
        // The local entry ran out: forget it and ask the primary.
        self.journal.entries.remove(key);
        Ok(None)
    }

    /// The primary's completion, written through to the local record.
    async fn complete_on_primary(
        &self,
        lease: &Lease,
        result: Option<Bytes>,
        retention: Duration,
    ) -> Result<()> {
        // Looked up first: a concurrent release may forget the lease.
        let held = self.primary_lease(lease);
        self.primary
            .complete(lease, result.clone(), retention)
            .await?;
        let Some(held) = held else {
            return Ok(());
        };
        let now = self.now();
        self.journal.completed.insert(
            lease.key().to_string(),
            Completion {
                fingerprint: held.fingerprint,
                result,
                expires_at: now.saturating_add(retention),
            },
            now,
        );
        self.forget_primary_lease(lease);
        Ok(())
    }

    /// Records locally the completion of a lease the primary gave, while the
    /// primary is unavailable.
    async fn complete_locally(
        &self,
        lease: &Lease,
        result: Option<Bytes>,
        retention: Duration,
    ) -> Result<()> {
        let Some(held) = self.primary_lease(lease) else {
            // Not a lease this fallback handed out: nothing to record it by.
            return Err(Error::lease_lost(lease.key()));
        };
        let fingerprint = held.fingerprint;
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
                version: self.journal.versions.next(),
            },
            now,
        );
        self.forget_primary_lease(lease);
        Ok(())
    }

    /// Completes a lease the secondary gave (a journal entry), and forwards
    /// the completion to the primary if a replay already holds the key there.
    async fn complete_journaled(
        &self,
        lease: &Lease,
        result: Option<Bytes>,
        retention: Duration,
    ) -> Result<()> {
        self.secondary
            .complete(lease, result.clone(), retention)
            .await?;
        let expires_at = self.now().saturating_add(retention);
        let version = self.journal.versions.next();
        let forward = self
            .journal
            .entries
            .update(lease.key(), self.now(), |e| {
                e.state = EntryState::Completed(result.clone());
                e.expires_at = expires_at;
                e.local = None;
                e.replayed = false;
                e.version = version;
                e.primary.clone()
            })
            .ok_or_else(|| Error::lease_lost(lease.key()))?;
        // Already replayed as pending: finish it on the primary too.
        if let Some(primary) = forward {
            if self
                .primary
                .complete(&primary, result, retention)
                .await
                .is_ok()
            {
                self.journal.entries.update(lease.key(), self.now(), |e| {
                    if e.version == version {
                        e.replayed = true;
                    }
                });
            }
        }
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
        // A data loss the breaker just noticed is acted on before the
        // emptied primary can hand out a completed key again.
        self.after_data_loss();
        if self.journal_live(key) {
            if let Some(c) = self.claim_journaled(key, fingerprint, lease).await? {
                return Ok(c);
            }
        }
        let (claimed, side) = self
            .call_with(
                || async {
                    let c = self.primary.claim(key, fingerprint, lease).await?;
                    Ok((c, Side::Primary))
                },
                || async {
                    let c = self.claim_on_secondary(key, fingerprint, lease).await?;
                    Ok((c, Side::Secondary))
                },
            )
            .await?;
        if let (Claim::Acquired(l), Side::Primary) = (&claimed, side) {
            if let Some(local) = self.hold_primary_lease(key, fingerprint, l, lease).await? {
                return Ok(local);
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
        if self.local_entry(lease).is_some() {
            return self.complete_journaled(lease, result, retention).await;
        }
        self.call_with(
            || self.complete_on_primary(lease, result.clone(), retention),
            || self.complete_locally(lease, result.clone(), retention),
        )
        .await
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        if let Some(entry) = self.local_entry(lease) {
            self.secondary.release(lease).await?;
            self.journal.entries.remove(lease.key());
            if let Some(primary) = entry.primary {
                if self.primary.release(&primary).await.is_err() {
                    self.release_later(primary);
                }
            }
            return Ok(());
        }
        let known = self.primary_lease(lease).is_some();
        self.forget_primary_lease(lease);
        self.call(self.primary.release(lease), async {
            if known {
                self.release_later(lease.clone());
                Ok(())
            } else {
                Err(Error::lease_lost(lease.key()))
            }
        })
        .await
    }

    async fn extend(&self, lease: &Lease, by: Duration) -> Result<()> {
        crate::idempotency::check_lease_duration("by", by)?;
        let expires_at = self.now().saturating_add(by);
        if let Some(entry) = self.local_entry(lease) {
            self.secondary.extend(lease, by).await?;
            let version = self.journal.versions.next();
            self.journal.entries.update(lease.key(), self.now(), |e| {
                e.expires_at = expires_at;
                e.version = version;
            });
            if let Some(primary) = entry.primary {
                let _ = self.primary.extend(&primary, by).await;
            }
            return Ok(());
        }
        let known = self.primary_lease(lease).is_some();
        let r = self
            .call(self.primary.extend(lease, by), async {
                if known {
                    Ok(())
                } else {
                    Err(Error::lease_lost(lease.key()))
                }
            })
            .await;
        if r.is_ok() {
            self.journal
                .primary_leases
                .update(&self.slot(lease.key()), |p| {
                    if p.token == lease.token() {
                        p.expires_at = expires_at;
                    }
                });
        }
        r
    }
}
