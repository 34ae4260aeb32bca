//! `Spool`: store and forward with retries and a dead-letter queue.
//!
//! Producers [`enqueue`](Spool::enqueue) records with ids they assign; the
//! ids travel with the record through every hop (Redis, disk and back) so
//! consumers can deduplicate with an [`IdempotencyStore`](crate::IdempotencyStore).
//! Consumers [`lease`](Spool::lease) due records, deliver them, then
//! [`ack`](Spool::ack) or [`nack`](Spool::nack) with a retry delay. A lease
//! that expires makes the record due again (at-least-once). The attempt count
//! lives in the record. A full spool answers [`Error::Full`]: it never drops
//! the oldest or the newest. Records older than the retention move to the
//! dead-letter queue with reason [`DeadReason::Expired`]; only
//! [`purge_dead`](Spool::purge_dead) deletes them.
//!
//! Most hosts do not call `lease`/`ack` themselves but run a
//! [`DeliveryWorker`](crate::DeliveryWorker).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::capability::Capabilities;
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::idempotency::LeaseToken;
use crate::key::validate_record_id;

/// Default maximum number of records a spool holds.
pub const DEFAULT_MAX_RECORDS: u64 = 10_000;
/// Default maximum of payload bytes a spool holds.
pub const DEFAULT_MAX_BYTES: u64 = 256 * 1024 * 1024;
/// Default limit on one record's payload.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1024 * 1024;
/// Default retention: 7 days.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default depth above which status reports an alert.
pub const DEFAULT_ALERT_DEPTH: u64 = 100;

/// A producer-assigned record id: 1 to 128 bytes, no control characters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RecordId(Arc<str>);

impl RecordId {
    /// Validates `id`.
    ///
    /// # Errors
    /// [`Error::InvalidKey`] or [`Error::TooLarge`].
    pub fn new(id: impl Into<String>) -> Result<Self> {
        let id = id.into();
        validate_record_id(&id)?;
        Ok(RecordId(id.into()))
    }

    /// A fresh, time-sortable id (a ULID).
    pub fn generate() -> Self {
        RecordId(ulid::Ulid::new().to_string().into())
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RecordId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        RecordId::new(s)
    }
}

impl From<RecordId> for String {
    fn from(id: RecordId) -> String {
        id.0.to_string()
    }
}

impl fmt::Debug for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecordId({})", self.0)
    }
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A record to enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NewRecord {
    /// The producer-assigned id.
    pub id: RecordId,
    /// The payload.
    pub payload: Bytes,
    /// Not due before this delay has passed.
    pub delay: Duration,
    /// Delivery attempts already made (non-zero when a record moves between
    /// spools, e.g. draining from disk back to Redis).
    pub attempts: u32,
    /// When the record first entered any spool; `None` means now. Retention
    /// counts from here.
    pub enqueued_at: Option<Timestamp>,
}

impl NewRecord {
    /// A record due now, with no attempts.
    pub fn new(id: RecordId, payload: impl Into<Bytes>) -> Self {
        Self {
            id,
            payload: payload.into(),
            delay: Duration::ZERO,
            attempts: 0,
            enqueued_at: None,
        }
    }

    /// The same record, due after `delay`.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// The same record carrying its history from another spool.
    pub fn with_history(mut self, attempts: u32, enqueued_at: Timestamp) -> Self {
        self.attempts = attempts;
        self.enqueued_at = Some(enqueued_at);
        self
    }
}

/// A stored record as a consumer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Record {
    /// The producer-assigned id.
    pub id: RecordId,
    /// The payload.
    pub payload: Bytes,
    /// Delivery attempts so far, including the current lease.
    pub attempts: u32,
    /// When the record first entered a spool.
    pub enqueued_at: Timestamp,
}

impl Record {
    /// Builds a record (backends).
    pub fn new(id: RecordId, payload: Bytes, attempts: u32, enqueued_at: Timestamp) -> Self {
        Self {
            id,
            payload,
            attempts,
            enqueued_at,
        }
    }
}

/// Proof of one lease of one record.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpoolToken {
    id: RecordId,
    lease: LeaseToken,
}

impl SpoolToken {
    /// A token for `id` (backends build these).
    pub fn new(id: RecordId, lease: LeaseToken) -> Self {
        Self { id, lease }
    }

    /// The record's id.
    pub fn id(&self) -> &RecordId {
        &self.id
    }

    /// This lease's token.
    pub fn lease(&self) -> LeaseToken {
        self.lease
    }
}

/// A leased record and the token to ack, nack, extend or dead-letter it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Leased {
    /// The record, with `attempts` already counting this lease.
    pub record: Record,
    /// The lease.
    pub token: SpoolToken,
}

impl Leased {
    /// Builds a leased record (backends).
    pub fn new(record: Record, token: SpoolToken) -> Self {
        Self { record, token }
    }
}

/// How durable an enqueued batch is when `enqueue` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub enum Durability {
    /// Held in process or server memory only; lost if it restarts.
    Volatile,
    /// Handed to the OS (survives a process crash, not a power loss).
    Flushed,
    /// Synced to stable storage within `interval`.
    Periodic {
        /// The sync interval.
        interval: Duration,
    },
    /// On stable storage (fsync, or Redis AOF with `appendfsync always`).
    Synced,
    /// Acknowledged by `replicas` replicas (Redis `WAIT`).
    Replicated {
        /// Replicas that acknowledged.
        replicas: u32,
    },
}

/// The answer to [`Spool::enqueue`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Enqueued {
    /// How durable the batch is.
    pub durability: Durability,
    /// Records stored.
    pub accepted: usize,
    /// Records skipped because a record with the same id is already in the
    /// spool (ready, delayed, leased or dead).
    pub duplicates: usize,
}

impl Enqueued {
    /// Builds the answer (backends).
    pub fn new(durability: Durability, accepted: usize, duplicates: usize) -> Self {
        Self {
            durability,
            accepted,
            duplicates,
        }
    }
}

/// Why a record is in the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub enum DeadReason {
    /// Older than the spool's retention.
    Expired,
    /// The retry schedule ran out.
    RetriesExhausted,
    /// The host declared the record undeliverable.
    Rejected(String),
}

impl DeadReason {
    /// A short stable code: `expired`, `retries_exhausted`, `rejected`.
    pub fn code(&self) -> &'static str {
        match self {
            DeadReason::Expired => "expired",
            DeadReason::RetriesExhausted => "retries_exhausted",
            DeadReason::Rejected(_) => "rejected",
        }
    }
}

/// A record in the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadRecord {
    /// The record as it was last leased.
    pub record: Record,
    /// Why it is dead.
    pub reason: DeadReason,
    /// When it was dead-lettered.
    pub dead_at: Timestamp,
}

impl DeadRecord {
    /// Builds a dead record (backends).
    pub fn new(record: Record, reason: DeadReason, dead_at: Timestamp) -> Self {
        Self {
            record,
            reason,
            dead_at,
        }
    }
}

/// The answer to [`Spool::nack`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum NackOutcome {
    /// Due again after `retry_in`.
    Scheduled {
        /// The delay until the record is due.
        retry_in: Duration,
    },
    /// Moved to the dead-letter queue instead (e.g. past retention).
    DeadLettered(DeadReason),
}

/// Counts of a spool's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct SpoolStats {
    /// Due now and not leased.
    pub ready: u64,
    /// Not yet due (delayed or scheduled for retry).
    pub delayed: u64,
    /// Leased and not acked.
    pub leased: u64,
    /// In the dead-letter queue.
    pub dead: u64,
    /// Age of the oldest live (ready, delayed or leased) record.
    pub oldest_age: Option<Duration>,
    /// Payload bytes held, dead records included.
    pub bytes: u64,
    /// Records dead-lettered for retention since the spool was opened.
    pub expired_total: u64,
    /// Corrupt items found and quarantined since the spool was opened
    /// (durable backends).
    pub quarantined_total: u64,
}

impl SpoolStats {
    /// Live records: ready + delayed + leased.
    pub fn depth(&self) -> u64 {
        self.ready + self.delayed + self.leased
    }
}

/// Limits every spool backend enforces, with their defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SpoolLimits {
    /// Records held at most, dead ones included. Default 10,000.
    pub max_records: u64,
    /// Payload bytes held at most, dead ones included. Default 256 MiB.
    pub max_bytes: u64,
    /// Largest payload of one record. Default 1 MiB.
    pub max_record_bytes: usize,
    /// Age after which a record is dead-lettered as expired. Default 7 days.
    pub retention: Duration,
}

impl Default for SpoolLimits {
    fn default() -> Self {
        Self {
            max_records: DEFAULT_MAX_RECORDS,
            max_bytes: DEFAULT_MAX_BYTES,
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
            retention: DEFAULT_RETENTION,
        }
    }
}

impl SpoolLimits {
    /// Sets [`max_records`](Self::max_records).
    pub fn with_max_records(mut self, v: u64) -> Self {
        self.max_records = v;
        self
    }

    /// Sets [`max_bytes`](Self::max_bytes).
    pub fn with_max_bytes(mut self, v: u64) -> Self {
        self.max_bytes = v;
        self
    }

    /// Sets [`max_record_bytes`](Self::max_record_bytes).
    pub fn with_max_record_bytes(mut self, v: usize) -> Self {
        self.max_record_bytes = v;
        self
    }

    /// Sets [`retention`](Self::retention).
    pub fn with_retention(mut self, v: Duration) -> Self {
        self.retention = v;
        self
    }

    /// Checks a batch's records against the per-record limit and for ids
    /// repeated within the batch.
    ///
    /// # Errors
    /// [`Error::TooLarge`] for an oversize payload, [`Error::InvalidArgument`]
    /// for an id repeated within the batch.
    pub fn check_batch(&self, batch: &[NewRecord]) -> Result<()> {
        let mut seen = std::collections::HashSet::with_capacity(batch.len());
        for r in batch {
            if r.payload.len() > self.max_record_bytes {
                return Err(Error::TooLarge {
                    what: "payload",
                    size: r.payload.len(),
                    limit: self.max_record_bytes,
                });
            }
            if !seen.insert(&r.id) {
                return Err(Error::invalid_argument(
                    "batch",
                    format!("record id {} appears twice", r.id),
                ));
            }
        }
        Ok(())
    }

    /// Checks that `add_records` / `add_bytes` more fit beside what is held.
    ///
    /// # Errors
    /// [`Error::Full`] naming the limit that would be passed.
    pub fn check_room(
        &self,
        held_records: u64,
        held_bytes: u64,
        add_records: u64,
        add_bytes: u64,
    ) -> Result<()> {
        if held_records.saturating_add(add_records) > self.max_records {
            return Err(Error::Full {
                limit: "records",
                max: self.max_records,
            });
        }
        if held_bytes.saturating_add(add_bytes) > self.max_bytes {
            return Err(Error::Full {
                limit: "bytes",
                max: self.max_bytes,
            });
        }
        Ok(())
    }
}

/// A store-and-forward queue with leases, retries and a dead-letter queue.
#[async_trait]
pub trait Spool: Send + Sync + fmt::Debug + 'static {
    /// What this backend guarantees.
    fn capabilities(&self) -> Capabilities;

    /// Stores a batch.
    ///
    /// # Behavior
    /// All or nothing: returns only once the batch is as durable as the
    /// returned [`Durability`] says. A record whose id is already in the
    /// spool (live or dead) is skipped and counted in
    /// [`Enqueued::duplicates`].
    ///
    /// # Errors
    /// [`Error::Full`] if the batch does not fit (nothing is stored);
    /// [`Error::TooLarge`] for an oversize payload; [`Error::InvalidArgument`]
    /// for an id repeated within the batch; unavailable errors.
    async fn enqueue(&self, batch: Vec<NewRecord>) -> Result<Enqueued>;

    /// Leases up to `max` due records for `ttl`.
    ///
    /// # Behavior
    /// Due records are those whose delay has passed, and leased ones whose
    /// lease expired. Each leased record's `attempts` grows by one, and it is
    /// invisible to other `lease` calls for `ttl`. Records past retention are
    /// moved to the dead-letter queue as [`DeadReason::Expired`] instead of
    /// being returned. Oldest due first.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a zero `ttl`; unavailable errors.
    async fn lease(&self, max: usize, ttl: Duration) -> Result<Vec<Leased>>;

    /// Deletes a delivered record.
    ///
    /// # Behavior
    /// Idempotent: acking a record that is gone succeeds. Succeeds while the
    /// record is still held by this lease, even past its expiry, as long as
    /// no other lease took it.
    ///
    /// # Errors
    /// [`Error::LeaseLost`] if the record was leased again, nacked or
    /// dead-lettered since.
    async fn ack(&self, token: &SpoolToken) -> Result<()>;

    /// Gives a record back for another try after `retry_in`.
    ///
    /// # Behavior
    /// Owner-checked like [`ack`](Self::ack). A record past retention is
    /// dead-lettered as [`DeadReason::Expired`] instead.
    ///
    /// # Errors
    /// [`Error::LeaseLost`] as for `ack`, also when the record is gone.
    async fn nack(&self, token: &SpoolToken, retry_in: Duration) -> Result<NackOutcome>;

    /// Heartbeat: the lease now ends `by` from now.
    ///
    /// # Behavior
    /// Owner-checked like [`ack`](Self::ack).
    ///
    /// # Errors
    /// [`Error::LeaseLost`] as for `nack`; [`Error::InvalidArgument`] for a
    /// zero `by`.
    async fn extend(&self, token: &SpoolToken, by: Duration) -> Result<()>;

    /// Moves a leased record to the dead-letter queue.
    ///
    /// # Behavior
    /// Owner-checked like [`ack`](Self::ack).
    ///
    /// # Errors
    /// [`Error::LeaseLost`] as for `nack`.
    async fn dead_letter(&self, token: &SpoolToken, reason: DeadReason) -> Result<()>;

    /// Lists up to `max` dead records, oldest first, without changing them.
    ///
    /// # Behavior
    /// Read only.
    ///
    /// # Errors
    /// Unavailable errors.
    async fn list_dead(&self, max: usize) -> Result<Vec<DeadRecord>>;

    /// Moves up to `max` dead records back to ready, oldest first, with
    /// their attempt count reset to zero (the retry schedule starts over).
    ///
    /// # Behavior
    /// Returns how many moved.
    ///
    /// # Errors
    /// Unavailable errors.
    async fn redrive_dead(&self, max: usize) -> Result<usize>;

    /// Deletes up to `max` dead records, oldest first: the only call that
    /// deletes an undelivered record.
    ///
    /// # Behavior
    /// Returns how many were deleted.
    ///
    /// # Errors
    /// Unavailable errors.
    async fn purge_dead(&self, max: usize) -> Result<usize>;

    /// Counts of what the spool holds.
    ///
    /// # Behavior
    /// A snapshot; records whose lease expired count as ready.
    ///
    /// # Errors
    /// Unavailable errors.
    async fn stats(&self) -> Result<SpoolStats>;
}

macro_rules! forward_spool {
    ($ty:ty) => {
        #[deny(clippy::missing_trait_methods)]
        #[async_trait]
        impl<T: Spool + ?Sized> Spool for $ty {
            fn capabilities(&self) -> Capabilities {
                (**self).capabilities()
            }
            async fn enqueue(&self, batch: Vec<NewRecord>) -> Result<Enqueued> {
                (**self).enqueue(batch).await
            }
            async fn lease(&self, max: usize, ttl: Duration) -> Result<Vec<Leased>> {
                (**self).lease(max, ttl).await
            }
            async fn ack(&self, token: &SpoolToken) -> Result<()> {
                (**self).ack(token).await
            }
            async fn nack(&self, token: &SpoolToken, retry_in: Duration) -> Result<NackOutcome> {
                (**self).nack(token, retry_in).await
            }
            async fn extend(&self, token: &SpoolToken, by: Duration) -> Result<()> {
                (**self).extend(token, by).await
            }
            async fn dead_letter(&self, token: &SpoolToken, reason: DeadReason) -> Result<()> {
                (**self).dead_letter(token, reason).await
            }
            async fn list_dead(&self, max: usize) -> Result<Vec<DeadRecord>> {
                (**self).list_dead(max).await
            }
            async fn redrive_dead(&self, max: usize) -> Result<usize> {
                (**self).redrive_dead(max).await
            }
            async fn purge_dead(&self, max: usize) -> Result<usize> {
                (**self).purge_dead(max).await
            }
            async fn stats(&self) -> Result<SpoolStats> {
                (**self).stats().await
            }
        }
    };
}

forward_spool!(Arc<T>);
forward_spool!(Box<T>);

#[cfg(test)]
mod tests {
    use super::*;

    fn _object_safe(_: &dyn Spool) {}

    #[test]
    fn limits_refuse_what_does_not_fit() {
        let l = SpoolLimits::default()
            .with_max_records(2)
            .with_max_bytes(10);
        assert!(l.check_room(1, 0, 1, 5).is_ok());
        assert!(matches!(
            l.check_room(2, 0, 1, 0),
            Err(Error::Full {
                limit: "records",
                ..
            })
        ));
        assert!(matches!(
            l.check_room(0, 8, 1, 3),
            Err(Error::Full { limit: "bytes", .. })
        ));
        let id = RecordId::new("a").unwrap();
        let dup = vec![NewRecord::new(id.clone(), "x"), NewRecord::new(id, "y")];
        assert!(l.check_batch(&dup).is_err());
    }
}
