//! `Spool` for [`Fallback`]: records written to the secondary while the
//! primary was unavailable drain back to it, with the same ids.
//!
//! - `enqueue` goes to the primary, or to the secondary when the primary is
//!   skipped, unavailable or late. A late primary may still have stored the
//!   batch: such records are counted ([`Fallback::double_enqueues`], a
//!   metric, a `warn` event) and delivered from one side only (the first
//!   side to hand a copy out keeps it; the other copy is acked unseen when a
//!   lease or a drain meets it; a drained copy is a duplicate id there).
//! - `lease` reads the primary, then tops the batch up from the secondary
//!   (records not drained yet); only the secondary while the breaker is
//!   open: delivery goes on during the outage. Leases handed out by the secondary
//!   are remembered, so `ack` / `nack` / `extend` / `dead_letter` go back to
//!   the side that gave them.
//! - [`Fallback::drain`] moves due records of the secondary to the primary
//!   (same id, payload, attempts and first-enqueue time) and acks them on the
//!   secondary only once the primary's `enqueue` returned, as durable as
//!   required: a crash in between leaves them on both sides, never on
//!   neither. A durable secondary is not drained into a primary that is not
//!   durable (Redis without AOF): its records stay and are delivered from
//!   there. See `fallback/drain.rs` for the batch bounds and the durability
//!   rule.
//! - `stats`, `list_dead`, `redrive_dead` and `purge_dead` cover both sides
//!   (the primary's only while it is reachable).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;

use tracing::warn;

use super::copies::{Side, Verdict};
use super::Fallback;
use crate::capability::Capabilities;
use crate::clock::Timestamp;
use crate::error::{Error, Result, UnavailableReason};
use crate::idempotency::LeaseToken;
use crate::spool::{
    DeadReason, DeadRecord, Enqueued, Leased, NackOutcome, NewRecord, Record, RecordId, Spool,
    SpoolStats, SpoolToken,
};

/// Leases handed out by the secondary kept before old ones are pruned.
const PRUNE_ROUTES_AT: usize = 1_024;

/// How long a secondary lease's token keeps routing to the secondary after
/// the lease ended: repeated or stale acks of it must still get the
/// secondary's answer (idempotent ack, `LeaseLost`), not the primary's.
const ROUTE_KEEP: Duration = Duration::from_secs(600);

/// Leases the secondary handed out, by token, with their end; and the
/// leases drains took from the secondary, by record.
#[derive(Debug, Default)]
pub(super) struct LocalLeases {
    routes: Mutex<HashMap<LeaseToken, Timestamp>>,
    drained: Mutex<HashMap<RecordId, u32>>,
}

impl LocalLeases {
    fn lock(&self) -> MutexGuard<'_, HashMap<LeaseToken, Timestamp>> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn drained(&self) -> MutexGuard<'_, HashMap<RecordId, u32>> {
        self.drained.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A drain leased these records: one more lease of each that was no
    /// delivery attempt.
    pub(super) fn borrow(&self, batch: &[Leased]) {
        let mut d = self.drained();
        if d.len() > MAX_DRAIN_BORROWS {
            // Records gone from the secondary some other way: start over.
            d.clear();
        }
        for l in batch {
            *d.entry(l.record.id.clone()).or_default() += 1;
        }
    }

    /// A lease of `id` that delivered nothing (a dropped copy whose ack
    /// failed: it will be leased again).
    pub(super) fn borrow_one(&self, id: &RecordId) {
        *self.drained().entry(id.clone()).or_default() += 1;
    }

    /// The record's delivery attempts: its count minus the drains' leases.
    pub(super) fn attempts(&self, record: &Record) -> u32 {
        let borrowed = self.drained().get(&record.id).copied().unwrap_or(0);
        record.attempts.saturating_sub(borrowed)
    }

    /// Corrects the attempts of records the secondary delivers.
    fn correct(&self, got: &mut [Leased]) {
        let d = self.drained();
        if d.is_empty() {
            return;
        }
        for l in got {
            if let Some(n) = d.get(&l.record.id) {
                l.record.attempts = l.record.attempts.saturating_sub(*n);
            }
        }
    }

    /// The record left the secondary.
    pub(super) fn settled(&self, id: &RecordId) {
        let mut d = self.drained();
        if !d.is_empty() {
            d.remove(id);
        }
    }
}

/// Records whose drain leases are remembered at most (a bound on memory:
/// past it the corrections start over).
const MAX_DRAIN_BORROWS: usize = 1 << 20;

impl<P: Spool, S: Spool> Fallback<P, S> {
    fn is_local(&self, token: &SpoolToken) -> bool {
        self.local_leases.lock().contains_key(&token.lease())
    }

    /// The secondary's enqueue, counted as a fallback for `reason`; its
    /// durability is what drains require of the primary.
    async fn enqueue_locally(
        &self,
        reason: &'static str,
        batch: Vec<NewRecord>,
    ) -> Result<Enqueued> {
        let r = self
            .answer_locally(reason, self.secondary.enqueue(batch))
            .await;
        if let Ok(e) = &r {
            self.drain_state.saw_local(e.durability);
        }
        r
    }

    /// The copies of a batch the primary may have stored although its
    /// enqueue timed out, which the secondary takes too: counted, logged,
    /// and tracked so only one of the two copies is delivered.
    fn copies_on_both_sides(&self, batch: &[NewRecord]) {
        self.copies.both(batch.iter().map(|r| &r.id));
        crate::metrics::double_enqueue(batch.len() as u64);
        warn!(
            records = batch.len(),
            "the primary's enqueue timed out and may have stored the batch; the secondary takes it too (one copy will be delivered)"
        );
    }

    /// Acks, without delivering, the leased copies whose other copy was
    /// handed out first.
    async fn drop_delivered(&self, got: &mut Vec<Leased>, side: Side) {
        let mut dropped = Vec::new();
        got.retain(|l| {
            let keep = self.copies.verdict(&l.record.id, side) != Verdict::Drop;
            if !keep {
                dropped.push(l.token.clone());
            }
            keep
        });
        for token in dropped {
            let acked = match side {
                Side::Primary => self.primary.ack(&token).await,
                Side::Secondary => self.secondary.ack(&token).await,
            };
            if acked.is_err() {
                self.local_leases.borrow_one(token.id());
            }
            self.copies.dropped(token.id(), acked.is_ok());
        }
    }

    /// Leaves in a drain's batch only the records to move: acks those whose
    /// primary copy was handed out, gives back for a later drain those whose
    /// primary copy must go first (see `Copies::drain_verdict`); `true` if
    /// it gave some back.
    pub(super) async fn sort_drained(&self, batch: &mut Vec<Leased>) -> bool {
        let mut dropped = Vec::new();
        let mut held = Vec::new();
        batch.retain(|l| match self.copies.drain_verdict(&l.record.id) {
            Verdict::Keep => true,
            Verdict::Drop => {
                dropped.push(l.token.clone());
                false
            }
            Verdict::Hold => {
                held.push(l.token.clone());
                false
            }
        });
        for token in dropped {
            let acked = self.secondary.ack(&token).await;
            if acked.is_err() {
                self.local_leases.borrow_one(token.id());
            }
            self.copies.dropped(token.id(), acked.is_ok());
        }
        for token in &held {
            let _ = self.secondary.nack(token, Duration::ZERO).await;
        }
        !held.is_empty()
    }

    /// Records a timed-out primary enqueue may have left on both sides, and
    /// the copies acked without delivery because the other was handed out.
    pub fn double_enqueues(&self) -> super::DoubleEnqueues {
        self.copies.counts()
    }

    async fn lease_local(&self, max: usize, ttl: Duration) -> Result<Vec<Leased>> {
        let mut got = self.secondary.lease(max, ttl).await?;
        self.drop_delivered(&mut got, Side::Secondary).await;
        self.local_leases.correct(&mut got);
        if !got.is_empty() {
            let now = self.breaker.clock().now();
            let until = now.saturating_add(ttl);
            let mut leases = self.local_leases.lock();
            if leases.len() > PRUNE_ROUTES_AT {
                // Leases long over need no route any more.
                leases.retain(|_, end| end.saturating_add(ROUTE_KEEP) > now);
            }
            for l in &got {
                leases.insert(l.token.lease(), until);
            }
        }
        Ok(got)
    }

    /// A call that only the primary can answer (a primary lease): under the
    /// deadline while the breaker lets it, else unavailable. The record's
    /// lease then runs out and it is delivered again.
    async fn primary_only<T>(&self, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        self.call(f, async {
            Err(Error::unavailable(
                "fallback",
                UnavailableReason::Other,
                "the primary holds this lease and is unavailable; the record will be delivered again",
            ))
        })
        .await
    }

    /// The primary's answer while reachable, else `None`.
    async fn primary_if_up<T>(
        &self,
        f: impl std::future::Future<Output = Result<T>>,
    ) -> Result<Option<T>> {
        self.call(async { f.await.map(Some) }, async { Ok(None) })
            .await
    }
}

#[async_trait]
impl<P: Spool, S: Spool> Spool for Fallback<P, S> {
    fn capabilities(&self) -> Capabilities {
        let p = self.primary.capabilities();
        let s = self.secondary.capabilities();
        Capabilities::new("fallback")
            .with_distributed(p.distributed)
            .with_durable(p.durable && s.durable)
            .with_reopenable(p.reopenable && s.reopenable)
            .with_bounded(s.bounded)
    }

    async fn enqueue(&self, batch: Vec<NewRecord>) -> Result<Enqueued> {
        if !self.breaker.routes_to_primary() {
            // Open: no copy of the batch, no primary future.
            return self.enqueue_locally("open", batch).await;
        }
        let reason =
            match tokio::time::timeout(self.deadline, self.primary.enqueue(batch.clone())).await {
                Ok(Ok(e)) => {
                    self.breaker.record_success();
                    crate::metrics::call("primary", "ok");
                    return Ok(e);
                }
                Ok(Err(e)) if !e.is_unavailable() => {
                    self.breaker.record_success();
                    crate::metrics::call("primary", "error");
                    return Err(e);
                }
                Ok(Err(e)) => {
                    self.breaker.record_failure(&e);
                    crate::metrics::call("primary", "unavailable");
                    if e.unavailable_reason() == Some(UnavailableReason::Timeout) {
                        self.copies_on_both_sides(&batch);
                    }
                    "unavailable"
                }
                Err(_) => {
                    self.breaker.record_failure(&Error::Timeout {
                        backend: "primary",
                        after: self.deadline,
                    });
                    crate::metrics::call("primary", "timeout");
                    self.copies_on_both_sides(&batch);
                    "timeout"
                }
            };
        self.enqueue_locally(reason, batch).await
    }

    async fn lease(&self, max: usize, ttl: Duration) -> Result<Vec<Leased>> {
        let Some(mut got) = self.primary_if_up(self.primary.lease(max, ttl)).await? else {
            return self.lease_local(max, ttl).await;
        };
        self.drop_delivered(&mut got, Side::Primary).await;
        self.local_leases.correct(&mut got);
        if got.len() < max {
            // Records the secondary still holds (not drained yet, or kept
            // there because the primary is not durable) are delivered too.
            got.extend(self.lease_local(max - got.len(), ttl).await?);
        }
        Ok(got)
    }

    async fn ack(&self, token: &SpoolToken) -> Result<()> {
        if self.is_local(token) {
            self.secondary.ack(token).await?;
            self.local_leases.settled(token.id());
            return Ok(());
        }
        self.primary_only(self.primary.ack(token)).await
    }

    async fn nack(&self, token: &SpoolToken, retry_in: Duration) -> Result<NackOutcome> {
        if self.is_local(token) {
            return self.secondary.nack(token, retry_in).await;
        }
        self.primary_only(self.primary.nack(token, retry_in)).await
    }

    async fn extend(&self, token: &SpoolToken, by: Duration) -> Result<()> {
        if self.is_local(token) {
            self.secondary.extend(token, by).await?;
            let until = self.breaker.clock().now().saturating_add(by);
            self.local_leases.lock().insert(token.lease(), until);
            return Ok(());
        }
        self.primary_only(self.primary.extend(token, by)).await
    }

    async fn dead_letter(&self, token: &SpoolToken, reason: DeadReason) -> Result<()> {
        if self.is_local(token) {
            self.secondary.dead_letter(token, reason).await?;
            self.local_leases.settled(token.id());
            return Ok(());
        }
        self.primary_only(self.primary.dead_letter(token, reason))
            .await
    }

    async fn list_dead(&self, max: usize) -> Result<Vec<DeadRecord>> {
        let mut dead = self
            .primary_if_up(self.primary.list_dead(max))
            .await?
            .unwrap_or_default();
        if dead.len() < max {
            dead.extend(self.secondary.list_dead(max - dead.len()).await?);
        }
        Ok(dead)
    }

    async fn redrive_dead(&self, max: usize) -> Result<usize> {
        let n = self
            .primary_if_up(self.primary.redrive_dead(max))
            .await?
            .unwrap_or(0);
        Ok(n + self.secondary.redrive_dead(max.saturating_sub(n)).await?)
    }

    async fn purge_dead(&self, max: usize) -> Result<usize> {
        let n = self
            .primary_if_up(self.primary.purge_dead(max))
            .await?
            .unwrap_or(0);
        Ok(n + self.secondary.purge_dead(max.saturating_sub(n)).await?)
    }

    async fn stats(&self) -> Result<SpoolStats> {
        let s = self.secondary.stats().await?;
        let Some(p) = self.primary_if_up(self.primary.stats()).await? else {
            return Ok(s);
        };
        let mut sum = p;
        sum.ready += s.ready;
        sum.delayed += s.delayed;
        sum.leased += s.leased;
        sum.dead += s.dead;
        sum.bytes += s.bytes;
        sum.expired_total += s.expired_total;
        sum.quarantined_total += s.quarantined_total;
        sum.oldest_age = match (p.oldest_age, s.oldest_age) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Ok(sum)
    }
}
