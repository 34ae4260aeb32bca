//! [`Fallback::drain`]: the secondary's records move back to the primary.
//!
//! - A batch is at most [`DrainLimits::max_records`] records and
//!   [`DrainLimits::max_bytes`] bytes of payload (at least one record), so
//!   one primary call fits its deadline; a batch cut short makes the next
//!   ones smaller.
//! - The secondary forgets a moved record only once the primary's reported
//!   [`Durability`] is at least the required one: the configured floor
//!   ([`DrainLimits::durability`]), else the durability the secondary last
//!   reported (or its capabilities say). A primary that syncs within an
//!   interval (Redis `appendfsync everysec`) gets the records acked on the
//!   secondary one interval later (the next drain after it, still under
//!   the drain's lease). A primary weaker than that for good (no sync, a
//!   `WAIT` short of replicas) keeps the records local: the copies it took
//!   are delivered from one side only, and drains pause for a while.
//! - A drain's lease is not a delivery attempt.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tracing::warn;

use super::Fallback;
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::spool::{Durability, Leased, NewRecord, Spool, SpoolToken};

/// Lease the drain holds on the secondary while it copies a batch (and
/// while an ack waits for the primary's sync).
const DRAIN_LEASE: Duration = Duration::from_secs(30);

/// How long drains pause after the primary reported a durability below
/// the required one for good.
const WEAK_PAUSE: Duration = Duration::from_secs(60);

/// How big one drain step is, and how durable the primary must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DrainLimits {
    /// Records per primary call at most. Default 256.
    pub max_records: usize,
    /// Payload bytes per primary call at most (one record always goes).
    /// Default 4 MiB.
    pub max_bytes: usize,
    /// The durability the primary must report before the secondary forgets
    /// a record; `None` (default): the secondary's own.
    pub durability: Option<Durability>,
}

impl Default for DrainLimits {
    fn default() -> Self {
        Self {
            max_records: 256,
            max_bytes: 4 << 20,
            durability: None,
        }
    }
}

impl DrainLimits {
    /// At most `max_records` records and `max_bytes` payload bytes per call.
    pub fn new(max_records: usize, max_bytes: usize) -> Self {
        Self {
            max_records: max_records.max(1),
            max_bytes,
            durability: None,
        }
    }

    /// Requires `floor` of the primary instead of the secondary's durability.
    pub fn with_durability(mut self, floor: Durability) -> Self {
        self.durability = Some(floor);
        self
    }
}

/// What one [`Fallback::drain`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DrainReport {
    /// Records the primary now holds and the secondary let go.
    pub moved: u64,
    /// Records the primary already had (same id).
    pub duplicates: u64,
    /// `true` if the primary became unavailable during the drain.
    pub interrupted: bool,
    /// `true` if nothing moved because the secondary is durable and the
    /// primary is not (e.g. Redis without AOF, or one that reported a
    /// weaker durability than required): the records stay where a crash
    /// cannot take them, and `lease` delivers them from there.
    pub kept_local: bool,
    /// Records the primary holds whose copy the secondary keeps until the
    /// primary's sync interval passed (acked by a later drain).
    pub awaiting_sync: u64,
}

/// How strong a durability is, for comparison.
fn rank(d: Durability) -> u8 {
    match d {
        Durability::Volatile => 0,
        Durability::Flushed | Durability::Replicated { replicas: 0 } => 1,
        Durability::Periodic { .. } => 2,
        Durability::Synced => 3,
        _ => 4,
    }
}

/// Not known yet.
const UNKNOWN: u8 = u8::MAX;

/// Moved records whose secondary copies are acked once `due`.
#[derive(Debug)]
struct Deferred {
    due: Timestamp,
    tokens: Vec<SpoolToken>,
}

/// The drain's memory between calls.
#[derive(Debug)]
pub(super) struct DrainState {
    deferred: Mutex<Vec<Deferred>>,
    /// Rank of the durability the secondary last reported.
    local: AtomicU8,
    weak_until: Mutex<Option<Timestamp>>,
    /// One drain at a time: a second caller waits for the pass under way,
    /// so its report never misses the records that pass holds leased.
    draining: tokio::sync::Mutex<()>,
}

impl Default for DrainState {
    fn default() -> Self {
        Self {
            deferred: Mutex::default(),
            local: AtomicU8::new(UNKNOWN),
            weak_until: Mutex::default(),
            draining: tokio::sync::Mutex::new(()),
        }
    }
}

impl DrainState {
    fn deferred(&self) -> MutexGuard<'_, Vec<Deferred>> {
        self.deferred.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn weak_until(&self) -> MutexGuard<'_, Option<Timestamp>> {
        self.weak_until.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The secondary reported `d` for an enqueue.
    pub(super) fn saw_local(&self, d: Durability) {
        self.local.store(rank(d), Ordering::Relaxed);
    }
}

/// What a drain step leaves to do.
enum Step {
    Again,
    Done,
}

impl<P: Spool, S: Spool> Fallback<P, S> {
    /// How big drain steps are and how durable the primary must be (see
    /// [`DrainLimits`]).
    pub fn with_drain_limits(mut self, limits: DrainLimits) -> Self {
        self.drain_limits = limits;
        self
    }

    fn required_rank(&self) -> u8 {
        if let Some(floor) = self.drain_limits.durability {
            return rank(floor);
        }
        match self.drain_state.local.load(Ordering::Relaxed) {
            UNKNOWN if self.secondary.capabilities().durable => rank(Durability::Synced),
            UNKNOWN => rank(Durability::Volatile),
            r => r,
        }
    }

    /// Moves the secondary's due records to the primary (see the module
    /// docs of `fallback/drain.rs`), until the secondary has none due or
    /// the primary fails. One drain runs at a time: a call made while
    /// another runs waits for it, then drains what is left.
    ///
    /// # Errors
    /// Caller errors of the primary (e.g. [`Error::Full`]); the records stay
    /// on the secondary.
    pub async fn drain(&self) -> Result<DrainReport> {
        let _pass = self.drain_state.draining.lock().await;
        let mut report = DrainReport::default();
        self.ack_synced().await?;
        let now = self.breaker.clock().now();
        let weak = self.drain_state.weak_until().is_some_and(|t| t > now);
        if weak || (self.secondary.capabilities().durable && !self.primary.capabilities().durable) {
            report.kept_local = true;
            return Ok(report);
        }
        let mut max = self.drain_limits.max_records.max(1);
        while self.breaker.routes_to_primary() {
            match self.drain_step(&mut report, &mut max).await? {
                Step::Again => {}
                Step::Done => break,
            }
        }
        Ok(report)
    }

    /// Acks on the secondary the moved records whose primary sync is due.
    async fn ack_synced(&self) -> Result<()> {
        let now = self.breaker.clock().now();
        let due: Vec<Deferred> = {
            let mut d = self.drain_state.deferred();
            let (due, later) = std::mem::take(&mut *d)
                .into_iter()
                .partition(|x| x.due <= now);
            *d = later;
            due
        };
        for token in due.iter().flat_map(|d| &d.tokens) {
            self.secondary.ack(token).await?;
            self.local_leases.settled(token.id());
            self.copies.merged(token.id());
        }
        Ok(())
    }

    /// Leaves in `batch` what fits `max_bytes` (one record at least); the
    /// rest goes back to the secondary, and the next batches are smaller.
    async fn fit_bytes(&self, batch: &mut Vec<Leased>, max: &mut usize) {
        let mut bytes = 0;
        let fit = batch
            .iter()
            .position(|l| {
                bytes += l.record.payload.len();
                bytes > self.drain_limits.max_bytes
            })
            .unwrap_or(batch.len())
            .max(1);
        if fit < batch.len() {
            *max = fit;
            for l in batch.split_off(fit) {
                let _ = self.secondary.nack(&l.token, Duration::ZERO).await;
            }
        }
    }

    async fn drain_step(&self, report: &mut DrainReport, max: &mut usize) -> Result<Step> {
        let mut batch = self.secondary.lease(*max, DRAIN_LEASE).await?;
        if batch.is_empty() {
            return Ok(Step::Done);
        }
        // This lease is the drain's, not a delivery attempt.
        self.local_leases.borrow(&batch);
        let held = self.sort_drained(&mut batch).await;
        if batch.is_empty() {
            // What was held waits for its primary copy to go.
            return Ok(if held { Step::Done } else { Step::Again });
        }
        self.fit_bytes(&mut batch, max).await;
        let records: Vec<NewRecord> = batch
            .iter()
            .map(|l| {
                NewRecord::new(l.record.id.clone(), l.record.payload.clone())
                    .with_history(self.local_leases.attempts(&l.record), l.record.enqueued_at)
            })
            .collect();
        let failure = match tokio::time::timeout(self.deadline, self.primary.enqueue(records)).await
        {
            Ok(Ok(e)) => {
                self.breaker.record_success();
                report.moved += e.accepted as u64;
                crate::metrics::drained(e.accepted as u64);
                report.duplicates += e.duplicates as u64;
                return self.settle_moved(&batch, e.durability, report).await;
            }
            Ok(Err(e)) if !e.is_unavailable() => {
                self.give_back(&batch).await;
                return Err(e);
            }
            Ok(Err(e)) => e,
            Err(_) => Error::Timeout {
                backend: "primary",
                after: self.deadline,
            },
        };
        self.breaker.record_failure(&failure);
        if failure.unavailable_reason() == Some(crate::error::UnavailableReason::Timeout) {
            // The primary may have stored them: one copy is delivered.
            self.copies.both(batch.iter().map(|l| &l.record.id));
        }
        report.interrupted = true;
        self.give_back(&batch).await;
        Ok(Step::Done)
    }

    async fn give_back(&self, batch: &[Leased]) {
        for l in batch {
            let _ = self.secondary.nack(&l.token, Duration::ZERO).await;
        }
    }

    /// The primary took `batch` with durability `d`: the secondary forgets
    /// it now, after the primary's sync interval, or (a primary weaker than
    /// required) keeps it, delivered from one side only.
    async fn settle_moved(
        &self,
        batch: &[Leased],
        d: Durability,
        report: &mut DrainReport,
    ) -> Result<Step> {
        let now = self.breaker.clock().now();
        if rank(d) >= self.required_rank() {
            for l in batch {
                // Only now may the secondary forget them.
                self.secondary.ack(&l.token).await?;
                self.local_leases.settled(&l.record.id);
                self.copies.merged(&l.record.id);
            }
            return Ok(Step::Again);
        }
        if let Durability::Periodic { interval } = d {
            if interval <= DRAIN_LEASE / 2 && rank(Durability::Synced) >= self.required_rank() {
                report.awaiting_sync += batch.len() as u64;
                self.drain_state.deferred().push(Deferred {
                    due: now.saturating_add(interval),
                    tokens: batch.iter().map(|l| l.token.clone()).collect(),
                });
                return Ok(Step::Again);
            }
        }
        warn!(
            durability = ?d,
            records = batch.len(),
            "drain: the primary is less durable than required; the records stay local"
        );
        *self.drain_state.weak_until() = Some(now.saturating_add(WEAK_PAUSE));
        self.copies.both(batch.iter().map(|l| &l.record.id));
        self.give_back(batch).await;
        report.kept_local = true;
        Ok(Step::Done)
    }
}
