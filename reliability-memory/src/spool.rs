//! [`MemorySpool`]: the in-process store-and-forward queue.
//!
//! Everything lives under one mutex that is never held across an `.await`:
//! a map of live records; an ordered index of when each waiting record
//! becomes due (its delay, or the end of its lease, so an expired lease
//! makes the record due again without any timer); the due records, oldest
//! (`enqueued_at`, then enqueue order) first; and the dead-letter queue in the
//! order records died. `lease` moves what came due from the first index to
//! the second and takes the oldest, `O(log n)` per record.
//!
//! Durability is [`Durability::Volatile`]: the records die with the process.
//! Use the disk or Redis spool where that matters.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use reliability_core::{
    system_clock, Capabilities, DeadReason, DeadRecord, Durability, Enqueued, Error, LeaseToken,
    Leased, NackOutcome, NewRecord, Record, RecordId, Result, SharedClock, Spool, SpoolLimits,
    SpoolStats, SpoolToken, Timestamp,
};

const BACKEND: &str = "memory";

/// A bounded, in-process [`Spool`]: records live in memory only
/// ([`Durability::Volatile`]).
///
/// Enforces every [`SpoolLimits`] (dead records count towards them: nothing
/// is ever dropped to make room) and takes an injectable clock, so retry
/// schedules and the 7-day retention can be tested in milliseconds.
/// Build one with [`MemorySpool::builder`], or [`MemorySpool::new`] for the
/// defaults and the system clock.
///
/// Retention is checked when a record comes due (in `lease`) and on `nack`:
/// a record past it moves to the dead-letter queue as
/// [`DeadReason::Expired`] and counts in [`SpoolStats::expired_total`].
/// [`redrive_dead`](Spool::redrive_dead) keeps a record's `enqueued_at`
/// (retention counts from its first enqueue), so a redriven record that had
/// expired expires again when next due.
///
/// ```
/// use std::time::Duration;
/// use reliability_core::{ManualClock, NewRecord, RecordId, Spool, SpoolLimits};
/// use reliability_memory::MemorySpool;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> reliability_core::Result<()> {
/// let clock = ManualClock::new();
/// let spool = MemorySpool::builder()
///     .limits(SpoolLimits::default().with_max_records(1_000))
///     .clock(std::sync::Arc::new(clock.clone()))
///     .build();
///
/// let id = RecordId::new("order-42")?;
/// spool.enqueue(vec![NewRecord::new(id.clone(), "payload")]).await?;
///
/// let leased = spool.lease(10, Duration::from_secs(30)).await?;
/// assert_eq!(leased[0].record.id, id);
/// assert_eq!(leased[0].record.attempts, 1);
///
/// // The delivery failed: try again in a minute.
/// let _ = spool.nack(&leased[0].token, Duration::from_secs(60)).await?;
/// assert!(spool.lease(10, Duration::from_secs(30)).await?.is_empty());
///
/// clock.advance(Duration::from_secs(60));
/// let again = spool.lease(10, Duration::from_secs(30)).await?;
/// assert_eq!(again[0].record.attempts, 2);
/// spool.ack(&again[0].token).await?;
/// assert_eq!(spool.stats().await?.depth(), 0);
/// # Ok(())
/// # }
/// ```
pub struct MemorySpool {
    limits: SpoolLimits,
    clock: SharedClock,
    state: Mutex<State>,
}

/// Builder of a [`MemorySpool`].
#[derive(Debug)]
pub struct MemorySpoolBuilder {
    limits: SpoolLimits,
    clock: Option<SharedClock>,
}

impl MemorySpoolBuilder {
    /// The limits to enforce. Default: [`SpoolLimits::default`].
    pub fn limits(mut self, limits: SpoolLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The clock to read time from. Default: the system clock.
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Builds the spool.
    pub fn build(self) -> MemorySpool {
        MemorySpool {
            limits: self.limits,
            clock: self.clock.unwrap_or_else(system_clock),
            state: Mutex::new(State::default()),
        }
    }
}

impl MemorySpool {
    /// A spool with the default limits and the system clock.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder, starting from the default limits and the system clock.
    pub fn builder() -> MemorySpoolBuilder {
        MemorySpoolBuilder {
            limits: SpoolLimits::default(),
            clock: None,
        }
    }

    /// The limits this spool enforces.
    pub fn limits(&self) -> SpoolLimits {
        self.limits
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // No code path panics while holding the lock, and every mutation
        // keeps the state consistent step by step; a poisoned lock is safe.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn expired(&self, enqueued_at: Timestamp, now: Timestamp) -> bool {
        enqueued_at.saturating_add(self.limits.retention) <= now
    }
}

impl Default for MemorySpool {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemorySpool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.state();
        f.debug_struct("MemorySpool")
            .field("limits", &self.limits)
            .field("clock", &self.clock)
            .field("live", &st.live.len())
            .field("dead", &st.dead.len())
            .field("bytes", &st.bytes)
            .finish()
    }
}

/// A live (ready, delayed or leased) record.
struct Entry {
    payload: Bytes,
    attempts: u32,
    enqueued_at: Timestamp,
    /// When the record is due, while not leased.
    due_at: Timestamp,
    /// The current lease and when it ends.
    lease: Option<(LeaseToken, Timestamp)>,
    /// Tie-breaker among records of the same age: enqueue order.
    seq: u64,
    /// Indexed in `State::ready` (found due), not `State::waiting`.
    ready: bool,
}

impl Entry {
    /// Where the entry sits in the waiting index: its lease end while leased
    /// (an expired lease makes it due again), else its due time.
    fn due_key(&self) -> Timestamp {
        self.lease.map_or(self.due_at, |(_, until)| until)
    }

    fn record(&self, id: &RecordId) -> Record {
        Record::new(
            id.clone(),
            self.payload.clone(),
            self.attempts,
            self.enqueued_at,
        )
    }
}

#[derive(Default)]
struct State {
    live: HashMap<RecordId, Entry>,
    /// `(due key, seq, id)` of live records not yet found due.
    waiting: BTreeSet<(Timestamp, u64, RecordId)>,
    /// `(enqueued_at, seq, id)` of live records found due: oldest first.
    ready: BTreeSet<(Timestamp, u64, RecordId)>,
    /// Dead records by the order they died (their `seq` at death).
    dead: BTreeMap<u64, DeadRecord>,
    /// Ids of dead records, for duplicate detection.
    dead_ids: HashMap<RecordId, u64>,
    /// Payload bytes held, dead records included.
    bytes: u64,
    next_seq: u64,
    expired_total: u64,
}

/// Why an owner check failed.
enum NotOwner {
    /// No record with this id at all (acked, or purged from dead).
    Gone,
    /// The record is dead, or held by another lease or none.
    Lost,
}

impl State {
    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    fn held(&self) -> u64 {
        (self.live.len() + self.dead.len()) as u64
    }

    /// Stores a live record as waiting until its due key.
    fn insert_live(&mut self, id: RecordId, mut entry: Entry) {
        entry.ready = false;
        self.waiting
            .insert((entry.due_key(), entry.seq, id.clone()));
        self.live.insert(id, entry);
    }

    /// Removes a live record from the map and its index.
    fn take_live(&mut self, id: &RecordId) -> Option<Entry> {
        let entry = self.live.remove(id)?;
        if entry.ready {
            self.ready
                .remove(&(entry.enqueued_at, entry.seq, id.clone()));
        } else {
            self.waiting
                .remove(&(entry.due_key(), entry.seq, id.clone()));
        }
        Some(entry)
    }

    /// Moves every waiting record that is due at `now` to `ready`.
    fn promote(&mut self, now: Timestamp) {
        while self.waiting.first().is_some_and(|(due, _, _)| *due <= now) {
            let Some((_, seq, id)) = self.waiting.pop_first() else {
                break;
            };
            if let Some(entry) = self.live.get_mut(&id) {
                entry.ready = true;
                self.ready.insert((entry.enqueued_at, seq, id));
            }
        }
    }

    /// Checks that `token` still holds its record, and takes the record out
    /// of the index (the caller puts it back or moves it).
    fn take_owned(&mut self, token: &SpoolToken) -> Result<Entry, NotOwner> {
        let id = token.id();
        match self.live.get(id) {
            Some(e) if matches!(e.lease, Some((t, _)) if t == token.lease()) => {}
            Some(_) => return Err(NotOwner::Lost),
            None if self.dead_ids.contains_key(id) => return Err(NotOwner::Lost),
            None => return Err(NotOwner::Gone),
        }
        self.take_live(id).ok_or(NotOwner::Gone)
    }

    fn bury(&mut self, id: RecordId, entry: Entry, reason: DeadReason, now: Timestamp) {
        if reason == DeadReason::Expired {
            self.expired_total += 1;
        }
        let seq = self.seq();
        let record = entry.record(&id);
        self.dead_ids.insert(id, seq);
        self.dead.insert(seq, DeadRecord::new(record, reason, now));
    }

    fn remove_dead(&mut self, seq: u64) -> Option<DeadRecord> {
        let dead = self.dead.remove(&seq)?;
        self.dead_ids.remove(&dead.record.id);
        Some(dead)
    }
}

fn lost(token: &SpoolToken) -> Error {
    Error::lease_lost(token.id().as_str())
}

#[async_trait]
impl Spool for MemorySpool {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(BACKEND).with_bounded(true)
    }

    async fn enqueue(&self, batch: Vec<NewRecord>) -> Result<Enqueued> {
        self.limits.check_batch(&batch)?;
        let now = self.clock.now();
        let mut st = self.state();
        let offered = batch.len();
        let fresh: Vec<NewRecord> = batch
            .into_iter()
            .filter(|r| !st.live.contains_key(&r.id) && !st.dead_ids.contains_key(&r.id))
            .collect();
        let duplicates = offered - fresh.len();
        let add_bytes: u64 = fresh.iter().map(|r| r.payload.len() as u64).sum();
        self.limits
            .check_room(st.held(), st.bytes, fresh.len() as u64, add_bytes)?;
        let accepted = fresh.len();
        for r in fresh {
            let seq = st.seq();
            st.bytes += r.payload.len() as u64;
            let entry = Entry {
                payload: r.payload,
                attempts: r.attempts,
                enqueued_at: r.enqueued_at.unwrap_or(now),
                due_at: now.saturating_add(r.delay),
                lease: None,
                seq,
                ready: false,
            };
            st.insert_live(r.id, entry);
        }
        Ok(Enqueued::new(Durability::Volatile, accepted, duplicates))
    }

    async fn lease(&self, max: usize, ttl: Duration) -> Result<Vec<Leased>> {
        if ttl.is_zero() {
            return Err(Error::invalid_argument("ttl", "must be greater than zero"));
        }
        let now = self.clock.now();
        let until = now.saturating_add(ttl);
        let mut st = self.state();
        let mut out = Vec::new();
        st.promote(now);
        while out.len() < max {
            let Some((_, _, id)) = st.ready.pop_first() else {
                break;
            };
            let Some(mut entry) = st.live.remove(&id) else {
                continue; // unreachable: the index mirrors the map
            };
            if self.expired(entry.enqueued_at, now) {
                st.bury(id, entry, DeadReason::Expired, now);
                continue;
            }
            let token = LeaseToken::generate();
            entry.attempts = entry.attempts.saturating_add(1);
            entry.lease = Some((token, until));
            out.push(Leased::new(
                entry.record(&id),
                SpoolToken::new(id.clone(), token),
            ));
            st.insert_live(id, entry);
        }
        Ok(out)
    }

    async fn ack(&self, token: &SpoolToken) -> Result<()> {
        let mut st = self.state();
        match st.take_owned(token) {
            Ok(entry) => {
                st.bytes -= entry.payload.len() as u64;
                Ok(())
            }
            Err(NotOwner::Gone) => Ok(()),
            Err(NotOwner::Lost) => Err(lost(token)),
        }
    }

    async fn nack(&self, token: &SpoolToken, retry_in: Duration) -> Result<NackOutcome> {
        let now = self.clock.now();
        let mut st = self.state();
        let mut entry = st.take_owned(token).map_err(|_| lost(token))?;
        let id = token.id().clone();
        if self.expired(entry.enqueued_at, now) {
            st.bury(id, entry, DeadReason::Expired, now);
            return Ok(NackOutcome::DeadLettered(DeadReason::Expired));
        }
        entry.lease = None;
        entry.due_at = now.saturating_add(retry_in);
        st.insert_live(id, entry);
        Ok(NackOutcome::Scheduled { retry_in })
    }

    async fn extend(&self, token: &SpoolToken, by: Duration) -> Result<()> {
        if by.is_zero() {
            return Err(Error::invalid_argument("by", "must be greater than zero"));
        }
        let now = self.clock.now();
        let mut st = self.state();
        let mut entry = st.take_owned(token).map_err(|_| lost(token))?;
        entry.lease = Some((token.lease(), now.saturating_add(by)));
        st.insert_live(token.id().clone(), entry);
        Ok(())
    }

    async fn dead_letter(&self, token: &SpoolToken, reason: DeadReason) -> Result<()> {
        let now = self.clock.now();
        let mut st = self.state();
        let entry = st.take_owned(token).map_err(|_| lost(token))?;
        st.bury(token.id().clone(), entry, reason, now);
        Ok(())
    }

    async fn list_dead(&self, max: usize) -> Result<Vec<DeadRecord>> {
        let st = self.state();
        Ok(st.dead.values().take(max).cloned().collect())
    }

    async fn redrive_dead(&self, max: usize) -> Result<usize> {
        let now = self.clock.now();
        let mut st = self.state();
        let seqs: Vec<u64> = st.dead.keys().take(max).copied().collect();
        for seq in &seqs {
            let Some(dead) = st.remove_dead(*seq) else {
                continue;
            };
            let record = dead.record;
            let seq = st.seq();
            let entry = Entry {
                payload: record.payload,
                attempts: 0,
                enqueued_at: record.enqueued_at,
                due_at: now,
                lease: None,
                seq,
                ready: false,
            };
            st.insert_live(record.id, entry);
        }
        Ok(seqs.len())
    }

    async fn purge_dead(&self, max: usize) -> Result<usize> {
        let mut st = self.state();
        let seqs: Vec<u64> = st.dead.keys().take(max).copied().collect();
        for seq in &seqs {
            if let Some(dead) = st.remove_dead(*seq) {
                st.bytes -= dead.record.payload.len() as u64;
            }
        }
        Ok(seqs.len())
    }

    async fn stats(&self) -> Result<SpoolStats> {
        let now = self.clock.now();
        let st = self.state();
        let mut stats = SpoolStats::default();
        let mut oldest: Option<Timestamp> = None;
        for entry in st.live.values() {
            match entry.lease {
                Some((_, until)) if until > now => stats.leased += 1,
                Some(_) => stats.ready += 1,
                None if entry.due_at > now => stats.delayed += 1,
                None => stats.ready += 1,
            }
            oldest = Some(oldest.map_or(entry.enqueued_at, |o| o.min(entry.enqueued_at)));
        }
        stats.dead = st.dead.len() as u64;
        stats.oldest_age = oldest.map(|o| now.saturating_since(o));
        stats.bytes = st.bytes;
        stats.expired_total = st.expired_total;
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use reliability_core::{Clock, ManualClock};

    use super::*;

    const TTL: Duration = Duration::from_secs(30);

    fn id(s: &str) -> RecordId {
        RecordId::new(s).unwrap()
    }

    fn spool(limits: SpoolLimits) -> (MemorySpool, ManualClock) {
        let clock = ManualClock::new();
        let spool = MemorySpool::builder()
            .limits(limits)
            .clock(Arc::new(clock.clone()))
            .build();
        (spool, clock)
    }

    fn ids(leased: &[Leased]) -> Vec<&str> {
        leased.iter().map(|l| l.record.id.as_str()).collect()
    }

    #[tokio::test]
    async fn full_batch_is_all_or_nothing() {
        let (s, _) = spool(
            SpoolLimits::default()
                .with_max_records(3)
                .with_max_bytes(100),
        );
        s.enqueue(vec![
            NewRecord::new(id("a"), "1"),
            NewRecord::new(id("b"), "2"),
        ])
        .await
        .unwrap();
        // Two new records (plus one duplicate) do not fit beside two.
        let err = s
            .enqueue(vec![
                NewRecord::new(id("a"), "dup"),
                NewRecord::new(id("c"), "3"),
                NewRecord::new(id("d"), "4"),
            ])
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            Error::Full {
                limit: "records",
                max: 3
            }
        ));
        let st = s.stats().await.unwrap();
        assert_eq!((st.ready, st.bytes), (2, 2));
        // The duplicate does not count towards the room.
        let e = s
            .enqueue(vec![
                NewRecord::new(id("a"), "dup"),
                NewRecord::new(id("c"), "3"),
            ])
            .await
            .unwrap();
        assert_eq!((e.accepted, e.duplicates), (1, 1));
        assert_eq!(e.durability, Durability::Volatile);

        // Dead records count too, and are duplicates.
        let l = s.lease(1, TTL).await.unwrap();
        s.dead_letter(&l[0].token, DeadReason::Rejected("no".into()))
            .await
            .unwrap();
        assert!(matches!(
            s.enqueue(vec![NewRecord::new(id("z"), "")]).await,
            Err(Error::Full { .. })
        ));
        let e = s.enqueue(vec![NewRecord::new(id("a"), "")]).await.unwrap();
        assert_eq!((e.accepted, e.duplicates), (0, 1));

        // Bytes.
        let (s, _) = spool(SpoolLimits::default().with_max_bytes(4));
        assert!(matches!(
            s.enqueue(vec![
                NewRecord::new(id("a"), "123"),
                NewRecord::new(id("b"), "45")
            ])
            .await,
            Err(Error::Full { limit: "bytes", .. })
        ));
        assert_eq!(s.stats().await.unwrap(), SpoolStats::default());
        // Oversize payloads and repeated ids.
        let (s, _) = spool(SpoolLimits::default().with_max_record_bytes(2));
        assert!(matches!(
            s.enqueue(vec![NewRecord::new(id("a"), "123")]).await,
            Err(Error::TooLarge { .. })
        ));
        assert!(matches!(
            s.enqueue(vec![
                NewRecord::new(id("a"), "1"),
                NewRecord::new(id("a"), "2")
            ])
            .await,
            Err(Error::InvalidArgument { .. })
        ));
    }

    #[tokio::test]
    async fn lease_order_delay_and_expiry() {
        let (s, clock) = spool(SpoolLimits::default());
        s.enqueue(vec![
            NewRecord::new(id("late"), "x").with_delay(Duration::from_secs(10)),
            NewRecord::new(id("first"), "x"),
            NewRecord::new(id("second"), "x"),
        ])
        .await
        .unwrap();
        assert!(s.lease(1, Duration::ZERO).await.is_err());
        let st = s.stats().await.unwrap();
        assert_eq!((st.ready, st.delayed), (2, 1));

        let a = s.lease(10, TTL).await.unwrap();
        assert_eq!(ids(&a), ["first", "second"]);
        assert!(s.lease(10, TTL).await.unwrap().is_empty());
        assert_eq!(s.stats().await.unwrap().leased, 2);

        clock.advance(Duration::from_secs(10));
        let b = s.lease(10, TTL).await.unwrap();
        assert_eq!(ids(&b), ["late"]);

        // The first leases expire: the records are due again, one more attempt.
        clock.advance(TTL - Duration::from_secs(10));
        let st = s.stats().await.unwrap();
        assert_eq!((st.ready, st.leased), (2, 1));
        let c = s.lease(10, TTL).await.unwrap();
        assert_eq!(ids(&c), ["first", "second"]);
        assert!(c.iter().all(|l| l.record.attempts == 2));
        // The old tokens lost their records.
        assert!(matches!(
            s.ack(&a[0].token).await,
            Err(Error::LeaseLost { .. })
        ));
        assert!(matches!(
            s.nack(&a[1].token, TTL).await,
            Err(Error::LeaseLost { .. })
        ));
        s.ack(&c[0].token).await.unwrap();
        s.ack(&c[1].token).await.unwrap();
        // Past its expiry, a lease nobody took over still acks.
        clock.advance(TTL * 3);
        s.ack(&b[0].token).await.unwrap();
        assert_eq!(s.stats().await.unwrap(), SpoolStats::default());
    }

    #[tokio::test]
    async fn oldest_due_first() {
        let (s, clock) = spool(SpoolLimits::default());
        s.enqueue(vec![
            NewRecord::new(id("a"), "x"),
            NewRecord::new(id("b"), "x"),
        ])
        .await
        .unwrap();
        clock.advance(Duration::from_secs(1));
        s.enqueue(vec![NewRecord::new(id("c"), "x")]).await.unwrap();
        let a = s.lease(1, TTL).await.unwrap();
        assert_eq!(ids(&a), ["a"]);
        // a's lease ends after b and c came due: a is still the oldest.
        clock.advance(TTL);
        assert_eq!(ids(&s.lease(10, TTL).await.unwrap()), ["a", "b", "c"]);
        // A record carried from another spool keeps its age.
        let older = clock.now().saturating_sub(Duration::from_secs(3600));
        s.enqueue(vec![
            NewRecord::new(id("young"), "x"),
            NewRecord::new(id("carried"), "x").with_history(2, older),
        ])
        .await
        .unwrap();
        let l = s.lease(10, TTL).await.unwrap();
        assert_eq!(ids(&l), ["carried", "young"]);
        assert_eq!(l[0].record.attempts, 3);
    }

    #[tokio::test]
    async fn owner_checks() {
        let (s, clock) = spool(SpoolLimits::default());
        s.enqueue(vec![
            NewRecord::new(id("a"), "x"),
            NewRecord::new(id("b"), "y"),
        ])
        .await
        .unwrap();
        let l = s.lease(2, TTL).await.unwrap();
        let (a, b) = (&l[0].token, &l[1].token);
        let stranger = SpoolToken::new(id("a"), LeaseToken::generate());
        assert!(matches!(
            s.ack(&stranger).await,
            Err(Error::LeaseLost { .. })
        ));
        assert!(s.extend(&stranger, TTL).await.is_err());
        assert!(s.extend(a, Duration::ZERO).await.is_err());

        // extend pushes the lease end.
        clock.advance(TTL - Duration::from_secs(1));
        s.extend(a, TTL).await.unwrap();
        clock.advance(Duration::from_secs(2));
        let again = s.lease(10, TTL).await.unwrap();
        assert_eq!(ids(&again), ["b"]);
        assert!(matches!(
            s.extend(b, TTL).await,
            Err(Error::LeaseLost { .. })
        ));

        // ack is idempotent for the owner, nack of a gone record is lost.
        s.ack(a).await.unwrap();
        s.ack(a).await.unwrap();
        assert!(matches!(s.nack(a, TTL).await, Err(Error::LeaseLost { .. })));
        // A nacked record is no longer held by the token.
        let b2 = &again[0].token;
        assert_eq!(
            s.nack(b2, Duration::from_secs(5)).await.unwrap(),
            NackOutcome::Scheduled {
                retry_in: Duration::from_secs(5)
            }
        );
        assert!(matches!(s.ack(b2).await, Err(Error::LeaseLost { .. })));
        assert_eq!(s.stats().await.unwrap().delayed, 1);

        // Dead-lettered: ack is lost, dead holds it, redrive resets attempts.
        clock.advance(Duration::from_secs(5));
        let l = s.lease(1, TTL).await.unwrap();
        assert_eq!(l[0].record.attempts, 3);
        s.dead_letter(&l[0].token, DeadReason::RetriesExhausted)
            .await
            .unwrap();
        assert!(matches!(
            s.ack(&l[0].token).await,
            Err(Error::LeaseLost { .. })
        ));
        let dead = s.list_dead(10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].reason, DeadReason::RetriesExhausted);
        assert_eq!(dead[0].record.attempts, 3);
        assert_eq!(s.redrive_dead(10).await.unwrap(), 1);
        let l = s.lease(1, TTL).await.unwrap();
        assert_eq!(l[0].record.attempts, 1);
        assert_eq!(l[0].record.payload, "y");
        s.dead_letter(&l[0].token, DeadReason::Rejected("bad".into()))
            .await
            .unwrap();
        assert_eq!(s.stats().await.unwrap().bytes, 1);
        assert_eq!(s.purge_dead(10).await.unwrap(), 1);
        assert_eq!(s.stats().await.unwrap(), SpoolStats::default());
    }

    #[tokio::test]
    async fn retention_dead_letters_as_expired() {
        let retention = Duration::from_secs(3600);
        let (s, clock) = spool(SpoolLimits::default().with_retention(retention));
        let t0 = clock.now();
        s.enqueue(vec![
            NewRecord::new(id("old"), "x"),
            NewRecord::new(id("held"), "y"),
            NewRecord::new(id("moved"), "z").with_history(4, t0.saturating_sub(retention)),
        ])
        .await
        .unwrap();
        // Carried history counts: "moved" is already past retention.
        let l = s.lease(1, TTL).await.unwrap();
        assert_eq!(ids(&l), ["old"]);
        assert_eq!(s.stats().await.unwrap().expired_total, 1);
        let l2 = s.lease(1, TTL).await.unwrap();
        assert_eq!(ids(&l2), ["held"]);
        assert!(s.lease(1, TTL).await.unwrap().is_empty());
        let st = s.stats().await.unwrap();
        assert_eq!((st.expired_total, st.dead, st.leased), (1, 1, 2));
        assert_eq!(st.oldest_age, Some(Duration::ZERO));

        clock.advance(retention);
        assert_eq!(
            s.nack(&l[0].token, TTL).await.unwrap(),
            NackOutcome::DeadLettered(DeadReason::Expired)
        );
        clock.advance(TTL);
        assert!(s.lease(10, TTL).await.unwrap().is_empty());
        let st = s.stats().await.unwrap();
        assert_eq!((st.expired_total, st.dead, st.depth()), (3, 3, 0));
        let dead = s.list_dead(10).await.unwrap();
        assert!(dead.iter().all(|d| d.reason == DeadReason::Expired));
        let dead_ids: Vec<_> = dead.iter().map(|d| d.record.id.as_str()).collect();
        assert_eq!(dead_ids, ["moved", "old", "held"]);
        assert_eq!(dead[0].record.attempts, 4);
    }
}
