//! The delivery worker: drains a [`Spool`] into a host's delivery function.
//!
//! The worker leases due records, hands each to the host's async `deliver`
//! closure (up to [`max_concurrency`](WorkerConfig::max_concurrency) at a
//! time), and settles the outcome with the spool:
//!
//! | delivery returns | the worker |
//! |---|---|
//! | `Ok(())` | [`ack`](Spool::ack)s the record |
//! | [`DeliveryError::transient`], or the delivery timed out or panicked | [`nack`](Spool::nack)s it with the [`RetryPolicy`]'s next delay; once the schedule is exhausted, dead-letters it as [`DeadReason::RetriesExhausted`] |
//! | [`DeliveryError::permanent`] | dead-letters it at once as [`DeadReason::Rejected`] |
//!
//! With the default policy a record that always fails is tried 7 times (at
//! about 0, 1m, 6m, 21m, 1h21m, 5h21m and 29h21m) and then dead-lettered.
//! Records past the spool's retention never reach `deliver`: the spool
//! dead-letters them as [`DeadReason::Expired`] when they come due, and the
//! worker reports them from [`SpoolStats::expired_total`].
//!
//! Delivery is at least once: a record whose ack is lost (the worker
//! crashed, or its lease ran out and another consumer took the record) is
//! delivered again, with the same [`RecordId`], so the
//! receiver can deduplicate with an [`IdempotencyStore`](crate::IdempotencyStore).
//!
//! Run the worker in the background with [`DeliveryWorker::spawn`] and stop it
//! with [`WorkerHandle::shutdown`], which stops leasing, lets the deliveries in
//! flight finish and settle, and returns the totals. Tests drive it one batch
//! at a time with [`DeliveryWorker::run_once`] and a
//! [`ManualClock`](crate::ManualClock).
//!
//! ```
//! use std::sync::Arc;
//! use reliability_core::worker::DeliveryError;
//! use reliability_core::{DeliveryWorker, Spool, WorkerConfig, WorkerHandle};
//!
//! /// Starts forwarding `spool`'s records to a downstream service.
//! fn start(spool: Arc<dyn Spool>) -> reliability_core::Result<WorkerHandle> {
//!     let config = WorkerConfig::default()
//!         .with_batch_size(64)
//!         .with_max_concurrency(8);
//!     let worker = DeliveryWorker::new(spool, config, |record| async move {
//!         match post(&record.payload).await {
//!             200..=299 => Ok(()),
//!             400..=499 => Err(DeliveryError::permanent("refused by the receiver")),
//!             status => Err(DeliveryError::transient(format!("HTTP {status}"))),
//!         }
//!     })?;
//!     Ok(worker.spawn())
//! }
//! # async fn post(_: &[u8]) -> u16 { 200 }
//! # let _ = start;
//! ```
//!
//! # Tracing
//!
//! Every delivery outcome is a `debug` event with `record_id` and
//! `attempts`; a dead-letter is a `warn` event with `reason`. Every
//! [`stats_interval`](WorkerConfig::stats_interval) the worker reports the
//! spool's depth at `info` with the fields `depth`, `ready`, `delayed`,
//! `leased`, `dead`, and at `warn` when the depth passes
//! [`alert_depth`](WorkerConfig::alert_depth).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::{JoinError, JoinHandle, JoinSet};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::config::MAX_DURATION;

use crate::error::{Error, Result};
use crate::retry::RetryPolicy;
use crate::spool::{
    DeadReason, Leased, NackOutcome, Record, RecordId, Spool, SpoolStats, SpoolToken,
    DEFAULT_ALERT_DEPTH,
};

/// Default [`WorkerConfig::batch_size`]: 32 records per lease.
pub const DEFAULT_BATCH_SIZE: usize = 32;
/// Default [`WorkerConfig::lease_ttl`]: 60 s.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(60);
/// Default [`WorkerConfig::max_concurrency`]: 16 deliveries at a time.
pub const DEFAULT_MAX_CONCURRENCY: usize = 16;
/// Default [`WorkerConfig::poll_interval`]: 250 ms.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Default [`WorkerConfig::stats_interval`]: 30 s.
pub const DEFAULT_STATS_INTERVAL: Duration = Duration::from_secs(30);
/// The default delivery timeout is the lease TTL minus a tenth of it, at
/// most this much, so a timed-out delivery is settled before its lease ends.
pub const MAX_TIMEOUT_MARGIN: Duration = Duration::from_secs(5);

/// Why a delivery failed, as the host's `deliver` closure reports it.
///
/// A *transient* failure (the receiver is down, overloaded, timed out) is
/// retried on the [`RetryPolicy`]'s schedule; a *permanent* one (the receiver
/// refuses this record and always will) dead-letters the record at once as
/// [`DeadReason::Rejected`] with the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryError {
    permanent: bool,
    message: String,
}

impl DeliveryError {
    /// A failure worth retrying later.
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            permanent: false,
            message: message.into(),
        }
    }

    /// A failure no retry will fix: the record is dead-lettered at once.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            permanent: true,
            message: message.into(),
        }
    }

    /// `true` for [`permanent`](Self::permanent) failures.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }

    /// What went wrong.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.permanent {
            "permanent"
        } else {
            "transient"
        };
        write!(f, "{kind} delivery failure: {}", self.message)
    }
}

impl std::error::Error for DeliveryError {}

/// Settings of a [`DeliveryWorker`]. Start from [`WorkerConfig::default`]
/// and change what you need with the `with_*` setters.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct WorkerConfig {
    /// Records leased at most per [`lease`](Spool::lease) call. Default 32
    /// ([`DEFAULT_BATCH_SIZE`]).
    ///
    /// Neither [`DeliveryWorker::run_once`] nor the spawned loop leases more
    /// than it has free delivery slots
    /// ([`max_concurrency`](Self::max_concurrency)), so no leased record
    /// waits for a slot while its lease runs out.
    pub batch_size: usize,
    /// How long a leased record stays invisible to other consumers. Default
    /// 60 s ([`DEFAULT_LEASE_TTL`]).
    pub lease_ttl: Duration,
    /// Deliveries in flight at most. Default 16 ([`DEFAULT_MAX_CONCURRENCY`]).
    pub max_concurrency: usize,
    /// How long the loop waits before leasing again when nothing was due,
    /// or after the spool failed. Default 250 ms ([`DEFAULT_POLL_INTERVAL`]).
    pub poll_interval: Duration,
    /// When to try a failed record again. Default [`RetryPolicy::default`]:
    /// 1m, 5m, 15m, 1h, 4h, 24h, each ±10 %.
    pub retry: RetryPolicy,
    /// How long one delivery may run before it counts as a transient
    /// failure. `None` (the default) means
    /// [`lease_ttl`](Self::lease_ttl) minus a tenth of it, at most
    /// [`MAX_TIMEOUT_MARGIN`] less: 55 s for the default TTL. See
    /// [`effective_delivery_timeout`](Self::effective_delivery_timeout).
    pub delivery_timeout: Option<Duration>,
    /// How often the spawned loop reports the spool's depth. Default 30 s
    /// ([`DEFAULT_STATS_INTERVAL`]).
    pub stats_interval: Duration,
    /// Depth above which the depth report is a warning. Default 100
    /// ([`DEFAULT_ALERT_DEPTH`]).
    pub alert_depth: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            batch_size: DEFAULT_BATCH_SIZE,
            lease_ttl: DEFAULT_LEASE_TTL,
            max_concurrency: DEFAULT_MAX_CONCURRENCY,
            poll_interval: DEFAULT_POLL_INTERVAL,
            retry: RetryPolicy::default(),
            delivery_timeout: None,
            stats_interval: DEFAULT_STATS_INTERVAL,
            alert_depth: DEFAULT_ALERT_DEPTH,
        }
    }
}

impl WorkerConfig {
    /// Sets [`batch_size`](Self::batch_size).
    pub fn with_batch_size(mut self, v: usize) -> Self {
        self.batch_size = v;
        self
    }

    /// Sets [`lease_ttl`](Self::lease_ttl).
    pub fn with_lease_ttl(mut self, v: Duration) -> Self {
        self.lease_ttl = v;
        self
    }

    /// Sets [`max_concurrency`](Self::max_concurrency).
    pub fn with_max_concurrency(mut self, v: usize) -> Self {
        self.max_concurrency = v;
        self
    }

    /// Sets [`poll_interval`](Self::poll_interval).
    pub fn with_poll_interval(mut self, v: Duration) -> Self {
        self.poll_interval = v;
        self
    }

    /// Sets [`retry`](Self::retry).
    pub fn with_retry(mut self, v: RetryPolicy) -> Self {
        self.retry = v;
        self
    }

    /// Sets [`delivery_timeout`](Self::delivery_timeout).
    pub fn with_delivery_timeout(mut self, v: Duration) -> Self {
        self.delivery_timeout = Some(v);
        self
    }

    /// Sets [`stats_interval`](Self::stats_interval).
    pub fn with_stats_interval(mut self, v: Duration) -> Self {
        self.stats_interval = v;
        self
    }

    /// Sets [`alert_depth`](Self::alert_depth).
    pub fn with_alert_depth(mut self, v: u64) -> Self {
        self.alert_depth = v;
        self
    }

    /// The delivery timeout in force: [`delivery_timeout`](Self::delivery_timeout)
    /// if set, else the lease TTL minus `min(ttl / 10, 5 s)`.
    pub fn effective_delivery_timeout(&self) -> Duration {
        self.delivery_timeout.unwrap_or_else(|| {
            self.lease_ttl
                .saturating_sub((self.lease_ttl / 10).min(MAX_TIMEOUT_MARGIN))
        })
    }

    /// Checks that every count and duration is greater than zero, every
    /// duration at most [`MAX_DURATION`], and the delivery timeout at most
    /// the lease TTL (a delivery still running when its lease ends would be
    /// leased, and delivered, a second time).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the first field that is wrong.
    pub fn validate(&self) -> Result<()> {
        for (name, d) in [
            ("lease_ttl", self.lease_ttl),
            ("poll_interval", self.poll_interval),
            ("stats_interval", self.stats_interval),
            (
                "delivery_timeout",
                self.delivery_timeout.unwrap_or_default(),
            ),
        ] {
            if d > MAX_DURATION {
                return Err(Error::invalid_argument(name, "must be at most 36500d"));
            }
        }
        if self.delivery_timeout.is_some_and(|t| t > self.lease_ttl) {
            return Err(Error::invalid_argument(
                "delivery_timeout",
                "must be at most lease_ttl: a delivery outliving its lease is delivered twice",
            ));
        }
        let zero =
            |name: &'static str| Err(Error::invalid_argument(name, "must be greater than zero"));
        if self.batch_size == 0 {
            return zero("batch_size");
        }
        if self.lease_ttl.is_zero() {
            return zero("lease_ttl");
        }
        if self.max_concurrency == 0 {
            return zero("max_concurrency");
        }
        if self.poll_interval.is_zero() {
            return zero("poll_interval");
        }
        if self.stats_interval.is_zero() {
            return zero("stats_interval");
        }
        if self.delivery_timeout.is_some_and(|t| t.is_zero()) {
            return zero("delivery_timeout");
        }
        Ok(())
    }
}

/// Counts of what a worker did: one batch's ([`BatchReport`]) or a worker's
/// totals ([`WorkerTotals::snapshot`], [`WorkerHandle::shutdown`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct DeliveryCounts {
    /// Records leased.
    pub leased: u64,
    /// Records delivered and acked.
    pub delivered: u64,
    /// Failed deliveries scheduled for another try.
    pub retried: u64,
    /// Records the worker dead-lettered: schedule exhausted, rejected, or
    /// past retention when nacked.
    pub dead_lettered: u64,
    /// Records the spool dead-lettered for retention before delivery, as
    /// seen in [`SpoolStats::expired_total`] by
    /// [`DeliveryWorker::report_depth`]. Counts every consumer's leases of
    /// the spool, not only this worker's.
    pub expired: u64,
    /// Settlements refused with [`Error::LeaseLost`]: the lease ran out and
    /// another consumer took the record, which it will deliver again.
    pub lease_lost: u64,
    /// Failed deliveries (transient, permanent, timed out or panicked),
    /// whatever happened to the record next.
    pub failures: u64,
    /// Settlements that failed with another spool error (e.g. the backend is
    /// unavailable); the record reappears when its lease ends.
    pub spool_errors: u64,
}

impl DeliveryCounts {
    fn merge(&mut self, o: &DeliveryCounts) {
        self.leased += o.leased;
        self.delivered += o.delivered;
        self.retried += o.retried;
        self.dead_lettered += o.dead_lettered;
        self.expired += o.expired;
        self.lease_lost += o.lease_lost;
        self.failures += o.failures;
        self.spool_errors += o.spool_errors;
    }
}

/// What one [`DeliveryWorker::run_once`] call did.
pub type BatchReport = DeliveryCounts;

/// Live totals of a worker, shared with the host
/// ([`DeliveryWorker::totals`], [`WorkerHandle::totals`]).
#[derive(Debug, Default)]
pub struct WorkerTotals {
    leased: AtomicU64,
    delivered: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    expired: AtomicU64,
    lease_lost: AtomicU64,
    failures: AtomicU64,
    spool_errors: AtomicU64,
}

impl WorkerTotals {
    /// See [`DeliveryCounts::leased`].
    pub fn leased(&self) -> u64 {
        self.leased.load(Ordering::Relaxed)
    }

    /// See [`DeliveryCounts::delivered`].
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// See [`DeliveryCounts::retried`].
    pub fn retried(&self) -> u64 {
        self.retried.load(Ordering::Relaxed)
    }

    /// See [`DeliveryCounts::dead_lettered`].
    pub fn dead_lettered(&self) -> u64 {
        self.dead_lettered.load(Ordering::Relaxed)
    }

    /// See [`DeliveryCounts::expired`].
    pub fn expired(&self) -> u64 {
        self.expired.load(Ordering::Relaxed)
    }

    /// See [`DeliveryCounts::lease_lost`].
    pub fn lease_lost(&self) -> u64 {
        self.lease_lost.load(Ordering::Relaxed)
    }

    /// See [`DeliveryCounts::failures`].
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// See [`DeliveryCounts::spool_errors`].
    pub fn spool_errors(&self) -> u64 {
        self.spool_errors.load(Ordering::Relaxed)
    }

    /// All totals at once (each read separately: not an atomic snapshot).
    pub fn snapshot(&self) -> DeliveryCounts {
        DeliveryCounts {
            leased: self.leased(),
            delivered: self.delivered(),
            retried: self.retried(),
            dead_lettered: self.dead_lettered(),
            expired: self.expired(),
            lease_lost: self.lease_lost(),
            failures: self.failures(),
            spool_errors: self.spool_errors(),
        }
    }

    fn add(&self, c: &DeliveryCounts) {
        let add = |a: &AtomicU64, v: u64| {
            if v != 0 {
                a.fetch_add(v, Ordering::Relaxed);
            }
        };
        add(&self.leased, c.leased);
        add(&self.delivered, c.delivered);
        add(&self.retried, c.retried);
        add(&self.dead_lettered, c.dead_lettered);
        add(&self.expired, c.expired);
        add(&self.lease_lost, c.lease_lost);
        add(&self.failures, c.failures);
        add(&self.spool_errors, c.spool_errors);
    }
}

type DeliveryFuture = Pin<Box<dyn Future<Output = Result<(), DeliveryError>> + Send>>;
type DeliverFn = Arc<dyn Fn(Record) -> DeliveryFuture + Send + Sync>;

/// Leases records from a [`Spool`], delivers them with the host's closure,
/// and acks, retries or dead-letters each. See the [module docs](self).
///
/// Generic over any spool, `Arc<dyn Spool>` included (the default).
pub struct DeliveryWorker<S: ?Sized = dyn Spool> {
    inner: Arc<Inner<S>>,
}

struct Inner<S: ?Sized> {
    spool: Arc<S>,
    deliver: DeliverFn,
    config: WorkerConfig,
    timeout: Duration,
    totals: Arc<WorkerTotals>,
    /// `expired_total` at the last depth report.
    seen_expired: AtomicU64,
}

impl<S: Spool + ?Sized> fmt::Debug for DeliveryWorker<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeliveryWorker")
            .field("spool", &self.inner.spool)
            .field("config", &self.inner.config)
            .field("totals", &self.inner.totals)
            .finish_non_exhaustive()
    }
}

impl<S: Spool + ?Sized> DeliveryWorker<S> {
    /// A worker that delivers `spool`'s records with `deliver`.
    ///
    /// `deliver` gets each record (with its id, payload and attempt count,
    /// this try included) and returns `Ok(())` once the receiver has it.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if the configuration does not
    /// [`validate`](WorkerConfig::validate).
    pub fn new<F, Fut>(spool: Arc<S>, config: WorkerConfig, deliver: F) -> Result<Self>
    where
        F: Fn(Record) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), DeliveryError>> + Send + 'static,
    {
        config.validate()?;
        let deliver: DeliverFn = Arc::new(move |record| Box::pin(deliver(record)));
        Ok(Self {
            inner: Arc::new(Inner {
                spool,
                deliver,
                timeout: config.effective_delivery_timeout(),
                config,
                totals: Arc::default(),
                seen_expired: AtomicU64::new(0),
            }),
        })
    }

    /// The spool this worker drains.
    pub fn spool(&self) -> &Arc<S> {
        &self.inner.spool
    }

    /// The configuration.
    pub fn config(&self) -> &WorkerConfig {
        &self.inner.config
    }

    /// The live totals, updated as each delivery settles.
    pub fn totals(&self) -> Arc<WorkerTotals> {
        Arc::clone(&self.inner.totals)
    }

    /// Leases one batch (at most [`batch_size`](WorkerConfig::batch_size)
    /// and [`max_concurrency`](WorkerConfig::max_concurrency) records),
    /// delivers it concurrently, settles every record, and returns what
    /// happened.
    ///
    /// Settlement errors are counted, not returned: a lost lease in
    /// [`lease_lost`](DeliveryCounts::lease_lost), any other spool error in
    /// [`spool_errors`](DeliveryCounts::spool_errors).
    ///
    /// # Errors
    /// The spool's error if the lease itself fails; nothing was delivered.
    pub async fn run_once(&self) -> Result<BatchReport> {
        let cfg = &self.inner.config;
        // Every leased record starts at once: none waits for a slot (and
        // for a delivery timeout) while its lease runs out.
        let max = cfg.batch_size.min(cfg.max_concurrency).max(1);
        let batch = self.inner.spool.lease(max, cfg.lease_ttl).await?;
        let mut report = self.inner.leased(batch.len());
        let mut tasks = JoinSet::new();
        for leased in batch {
            tasks.spawn(Arc::clone(&self.inner).deliver_one(leased));
        }
        while let Some(r) = tasks.join_next().await {
            report.merge(&self.inner.reaped(r));
        }
        Ok(report)
    }

    /// Reads the spool's [`stats`](Spool::stats), logs the depth at `info`
    /// (`warn` above [`alert_depth`](WorkerConfig::alert_depth)) and counts
    /// the records the spool dead-lettered for retention since the last
    /// report into [`DeliveryCounts::expired`]. The spawned loop calls this
    /// every [`stats_interval`](WorkerConfig::stats_interval).
    ///
    /// # Errors
    /// The spool's error.
    pub async fn report_depth(&self) -> Result<SpoolStats> {
        let stats = self.inner.spool.stats().await?;
        let before = self
            .inner
            .seen_expired
            .fetch_max(stats.expired_total, Ordering::AcqRel);
        let expired = stats.expired_total.saturating_sub(before);
        if expired > 0 {
            self.inner.totals.add(&DeliveryCounts {
                expired,
                ..DeliveryCounts::default()
            });
            warn!(
                expired,
                expired_total = stats.expired_total,
                "spool dead-lettered records past retention"
            );
        }
        let depth = stats.depth();
        let oldest_age_secs = stats.oldest_age.map_or(0, |a| a.as_secs());
        if depth > self.inner.config.alert_depth {
            warn!(
                depth,
                ready = stats.ready,
                delayed = stats.delayed,
                leased = stats.leased,
                dead = stats.dead,
                oldest_age_secs,
                alert_depth = self.inner.config.alert_depth,
                "spool depth above alert threshold"
            );
        } else {
            info!(
                depth,
                ready = stats.ready,
                delayed = stats.delayed,
                leased = stats.leased,
                dead = stats.dead,
                oldest_age_secs,
                "spool depth"
            );
        }
        Ok(stats)
    }

    /// Runs the worker loop on the tokio runtime until
    /// [`WorkerHandle::shutdown`] (or until the handle is dropped, which
    /// also stops it gracefully, in the background).
    ///
    /// The loop leases no more records than it has free delivery slots,
    /// waits [`poll_interval`](WorkerConfig::poll_interval) when nothing is
    /// due, and backs off by the same interval when the spool fails (logged,
    /// never fatal).
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn spawn(self) -> WorkerHandle {
        let (stop, stop_rx) = watch::channel(false);
        let totals = self.totals();
        let join = tokio::spawn(self.run(stop_rx));
        WorkerHandle { stop, join, totals }
    }

    async fn run(self, mut stop: watch::Receiver<bool>) -> DeliveryCounts {
        let cfg = self.inner.config.clone();
        info!(
            batch_size = cfg.batch_size,
            max_concurrency = cfg.max_concurrency,
            lease_ttl_ms = millis(cfg.lease_ttl),
            delivery_timeout_ms = millis(self.inner.timeout),
            "delivery worker started"
        );
        let mut tasks: JoinSet<DeliveryCounts> = JoinSet::new();
        let mut next_report = Instant::now();
        let mut failing = false;
        loop {
            while let Some(r) = tasks.try_join_next() {
                self.inner.reaped(r);
            }
            if stopping(&stop) {
                break;
            }
            if Instant::now() >= next_report {
                if let Err(e) = self.report_depth().await {
                    warn!(error = %e, "spool stats unavailable");
                }
                next_report = Instant::now() + cfg.stats_interval;
            }
            let free = cfg.max_concurrency.saturating_sub(tasks.len());
            if free == 0 {
                tokio::select! {
                    Some(r) = tasks.join_next() => { self.inner.reaped(r); }
                    _ = stop.changed() => {}
                }
                continue;
            }
            let idle = match self
                .inner
                .spool
                .lease(cfg.batch_size.min(free), cfg.lease_ttl)
                .await
            {
                Ok(batch) => {
                    if failing {
                        failing = false;
                        info!("spool available again; delivery resumes");
                    }
                    self.inner.leased(batch.len());
                    let idle = batch.is_empty();
                    for leased in batch {
                        tasks.spawn(Arc::clone(&self.inner).deliver_one(leased));
                    }
                    idle
                }
                Err(e) => {
                    if !failing {
                        failing = true;
                        if e.is_unavailable() {
                            warn!(error = %e, "spool unavailable; backing off");
                        } else {
                            error!(error = %e, "spool lease failed; backing off");
                        }
                    } else {
                        debug!(error = %e, "spool lease still failing");
                    }
                    true
                }
            };
            if idle {
                let wake = (Instant::now() + cfg.poll_interval).min(next_report);
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => {}
                    _ = stop.changed() => {}
                    Some(r) = tasks.join_next(), if !tasks.is_empty() => { self.inner.reaped(r); }
                }
            }
        }
        info!(
            in_flight = tasks.len(),
            "delivery worker stopping; waiting for deliveries in flight"
        );
        while let Some(r) = tasks.join_next().await {
            self.inner.reaped(r);
        }
        let totals = self.inner.totals.snapshot();
        info!(
            delivered = totals.delivered,
            retried = totals.retried,
            dead_lettered = totals.dead_lettered,
            lease_lost = totals.lease_lost,
            failures = totals.failures,
            "delivery worker stopped"
        );
        totals
    }
}

fn stopping(stop: &watch::Receiver<bool>) -> bool {
    // A dropped handle (closed channel) stops the loop too.
    *stop.borrow() || stop.has_changed().is_err()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl<S: Spool + ?Sized> Inner<S> {
    fn leased(&self, n: usize) -> DeliveryCounts {
        let c = DeliveryCounts {
            leased: n as u64,
            ..DeliveryCounts::default()
        };
        self.totals.add(&c);
        c
    }

    /// The counts of a finished delivery task. Its counts are already in the
    /// totals, unless the task itself failed.
    fn reaped(&self, r: Result<DeliveryCounts, JoinError>) -> DeliveryCounts {
        r.unwrap_or_else(|e| {
            error!(error = %e, "delivery task failed; its record reappears after its lease");
            let c = DeliveryCounts {
                spool_errors: 1,
                ..DeliveryCounts::default()
            };
            self.totals.add(&c);
            c
        })
    }

    async fn deliver_one(self: Arc<Self>, leased: Leased) -> DeliveryCounts {
        let Leased { record, token } = leased;
        let attempts = record.attempts;
        // Its own task, so a panic in the host's closure is a failed
        // delivery, not a lost settlement.
        let deliver = Arc::clone(&self.deliver);
        let mut task = tokio::spawn(async move { deliver(record).await });
        let outcome = match tokio::time::timeout(self.timeout, &mut task).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) if e.is_panic() => Err(DeliveryError::transient("delivery panicked")),
            Ok(Err(_)) => Err(DeliveryError::transient("delivery cancelled")),
            Err(_) => {
                task.abort();
                Err(DeliveryError::transient(format!(
                    "delivery timed out after {:?}",
                    self.timeout
                )))
            }
        };
        let counts = self.settle(&token, attempts, outcome).await;
        self.totals.add(&counts);
        counts
    }

    async fn settle(
        &self,
        token: &SpoolToken,
        attempts: u32,
        outcome: Result<(), DeliveryError>,
    ) -> DeliveryCounts {
        let id = token.id();
        let mut c = DeliveryCounts::default();
        let err = match outcome {
            Ok(()) => {
                match self.spool.ack(token).await {
                    Ok(()) => {
                        c.delivered = 1;
                        debug!(record_id = %id, attempts, outcome = "delivered", "record delivered");
                    }
                    Err(e) => settle_failed(&mut c, id, attempts, "ack", &e),
                }
                return c;
            }
            Err(err) => err,
        };
        c.failures = 1;
        let reason = if err.is_permanent() {
            DeadReason::Rejected(err.message().to_owned())
        } else if let Some(delay) = self.config.retry.delay_after(attempts) {
            match self.spool.nack(token, delay).await {
                Ok(NackOutcome::Scheduled { retry_in }) => {
                    c.retried = 1;
                    debug!(
                        record_id = %id,
                        attempts,
                        outcome = "retry",
                        retry_in_ms = millis(retry_in),
                        error = %err.message(),
                        "delivery failed; retry scheduled"
                    );
                }
                Ok(NackOutcome::DeadLettered(reason)) => {
                    c.dead_lettered = 1;
                    warn!(
                        record_id = %id,
                        attempts,
                        outcome = "dead_lettered",
                        reason = reason.code(),
                        error = %err.message(),
                        "delivery failed; the spool dead-lettered the record"
                    );
                }
                Err(e) => settle_failed(&mut c, id, attempts, "nack", &e),
            }
            return c;
        } else {
            DeadReason::RetriesExhausted
        };
        let code = reason.code();
        match self.spool.dead_letter(token, reason).await {
            Ok(()) => {
                c.dead_lettered = 1;
                warn!(
                    record_id = %id,
                    attempts,
                    outcome = "dead_lettered",
                    reason = code,
                    error = %err.message(),
                    "delivery failed; record dead-lettered"
                );
            }
            Err(e) => settle_failed(&mut c, id, attempts, "dead_letter", &e),
        }
        c
    }
}

fn settle_failed(c: &mut DeliveryCounts, id: &RecordId, attempts: u32, op: &str, e: &Error) {
    if matches!(e, Error::LeaseLost { .. }) {
        c.lease_lost = 1;
        info!(
            record_id = %id,
            attempts,
            op,
            outcome = "lease_lost",
            "lease lost before settling; another consumer holds the record"
        );
    } else {
        c.spool_errors = 1;
        warn!(
            record_id = %id,
            attempts,
            op,
            outcome = "spool_error",
            error = %e,
            "could not settle the record; it reappears after its lease"
        );
    }
}

/// Controls a worker started with [`DeliveryWorker::spawn`].
///
/// Dropping the handle stops the worker gracefully in the background;
/// [`shutdown`](Self::shutdown) does the same and waits for it.
#[derive(Debug)]
pub struct WorkerHandle {
    stop: watch::Sender<bool>,
    join: JoinHandle<DeliveryCounts>,
    totals: Arc<WorkerTotals>,
}

impl WorkerHandle {
    /// The live totals.
    pub fn totals(&self) -> Arc<WorkerTotals> {
        Arc::clone(&self.totals)
    }

    /// `true` once the worker loop has ended.
    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }

    /// Stops leasing, waits for the deliveries in flight to finish (each
    /// bounded by the delivery timeout) and settle, and returns the totals.
    ///
    /// Nothing is lost: a record whose settlement failed simply reappears
    /// after its lease TTL.
    pub async fn shutdown(self) -> DeliveryCounts {
        let _ = self.stop.send(true);
        match self.join.await {
            Ok(totals) => totals,
            Err(e) => {
                error!(error = %e, "delivery worker task failed");
                self.totals.snapshot()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_validation() {
        let c = WorkerConfig::default();
        assert_eq!(c.batch_size, 32);
        assert_eq!(c.max_concurrency, 16);
        assert_eq!(c.effective_delivery_timeout(), Duration::from_secs(55));
        let short = c.clone().with_lease_ttl(Duration::from_secs(1));
        assert_eq!(
            short.effective_delivery_timeout(),
            Duration::from_millis(900)
        );
        assert!(c.validate().is_ok());
        assert!(c.clone().with_batch_size(0).validate().is_err());
        assert!(c.clone().with_lease_ttl(Duration::ZERO).validate().is_err());
        assert!(c.with_delivery_timeout(Duration::ZERO).validate().is_err());
        assert!(DeliveryError::permanent("x").is_permanent());
        assert_eq!(
            DeliveryError::transient("down").to_string(),
            "transient delivery failure: down"
        );
    }

    fn _dyn_spool_works(spool: Arc<dyn Spool>) -> Result<WorkerHandle> {
        let w = DeliveryWorker::new(spool, WorkerConfig::default(), |_| async { Ok(()) })?;
        Ok(w.spawn())
    }
}
