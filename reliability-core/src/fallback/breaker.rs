//! The circuit breaker of `Fallback` (docs on [`Breaker`]).

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::clock::{SharedClock, Timestamp};
use crate::error::{Error, Result};
use crate::status::{BreakerState, BreakerStatus};

/// When the breaker opens and closes.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct BreakerConfig {
    /// Consecutive unavailable errors that open the breaker. Default 3.
    pub failure_threshold: u32,
    /// Failure ratio over [`ratio_window`](Self::ratio_window) that opens
    /// the breaker. Default 0.5.
    pub failure_ratio: f64,
    /// Window of the failure ratio. Default 10 s.
    pub ratio_window: Duration,
    /// Calls a window needs before its ratio counts. Default 20.
    pub ratio_min_calls: u32,
    /// Consecutive successes that close a half-open breaker. Default 2.
    pub success_threshold: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 3,
            failure_ratio: 0.5,
            ratio_window: Duration::from_secs(10),
            ratio_min_calls: 20,
            success_threshold: 2,
        }
    }
}

impl BreakerConfig {
    /// Sets [`failure_threshold`](Self::failure_threshold) (at least 1).
    pub fn with_failure_threshold(mut self, n: u32) -> Self {
        self.failure_threshold = n.max(1);
        self
    }

    /// Sets [`success_threshold`](Self::success_threshold) (at least 1).
    pub fn with_success_threshold(mut self, n: u32) -> Self {
        self.success_threshold = n.max(1);
        self
    }

    /// Sets the failure ratio, its window and its minimum number of calls.
    pub fn with_failure_ratio(mut self, ratio: f64, window: Duration, min_calls: u32) -> Self {
        self.failure_ratio = ratio;
        self.ratio_window = window;
        self.ratio_min_calls = min_calls.max(1);
        self
    }
}

/// Checks whether the primary is healthy, for the breaker's background
/// probe (e.g. Redis `PING`, plus `ROLE` == master behind Sentinel).
#[async_trait]
pub trait Probe: Send + Sync + fmt::Debug + 'static {
    /// Succeeds when the primary can take calls.
    ///
    /// # Behavior
    /// Called every probe interval under the probe deadline; must not
    /// change any data.
    ///
    /// # Errors
    /// Any error means "not healthy"; unavailable errors are expected.
    async fn probe(&self) -> Result<()>;

    /// [`probe`](Self::probe), also saying which server and which data
    /// history answered, so the breaker notices a primary that lost data
    /// ([`Breaker::observe_identity`]). The background probe calls this.
    ///
    /// # Behavior
    /// As `probe`. The default runs `probe` and reports no identity.
    ///
    /// # Errors
    /// As `probe`.
    async fn probe_identity(&self) -> Result<Option<PrimaryIdentity>> {
        self.probe().await.map(|()| None)
    }
}

/// Which server process and which data history a primary answers from: a
/// change of either means the primary may have lost writes (Redis: `run_id`
/// changes on every restart, `master_replid` when a failover promotes a
/// replica).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct PrimaryIdentity {
    /// The server process (Redis `run_id`).
    pub run_id: String,
    /// The history of its data (Redis `master_replid`), if known.
    pub replication_id: Option<String>,
}

impl PrimaryIdentity {
    /// An identity of process `run_id` and data history `replication_id`.
    pub fn new(run_id: impl Into<String>, replication_id: Option<String>) -> Self {
        Self {
            run_id: run_id.into(),
            replication_id,
        }
    }

    /// Why `self` following `before` means the data may be lost, if it does.
    fn lost_since(&self, before: &PrimaryIdentity) -> Option<&'static str> {
        if self.run_id != before.run_id {
            Some("restarted")
        } else if self.replication_id != before.replication_id {
            Some("failover")
        } else {
            None
        }
    }
}

/// A circuit breaker shared by every [`Fallback`](super::Fallback) in front
/// of one primary: when to stop calling the primary, and when to go back.
///
/// States ([`BreakerState`]):
///
/// - **Closed**: calls go to the primary. After
///   [`failure_threshold`](BreakerConfig::failure_threshold) consecutive
///   unavailable errors, or a failure ratio of at least
///   [`failure_ratio`](BreakerConfig::failure_ratio) over
///   [`ratio_window`](BreakerConfig::ratio_window) (once
///   [`ratio_min_calls`](BreakerConfig::ratio_min_calls) were seen), it opens.
/// - **Open**: calls go straight to the secondary, paying no timeout. A
///   background [`Probe`] (see [`Breaker::spawn_probe`]) checks the primary;
///   its first success moves to HalfOpen.
/// - **HalfOpen**: calls go to the primary again; after
///   [`success_threshold`](BreakerConfig::success_threshold) consecutive
///   successes it closes, after one failure it opens again.
/// - **Isolated**: forced to the secondary by the operator
///   ([`Breaker::isolate`]) until [`Breaker::release`].
///
/// The probe also runs while Closed, so an outage is detected without
/// traffic; there only its failures count (a probe that answers while the
/// calls fail must not keep the breaker closed). Every transition is a `tracing` event and a change on the
/// [`subscribe`](Breaker::subscribe) channel.
///
/// ```
/// use reliability_core::fallback::{Breaker, BreakerConfig};
/// use reliability_core::status::BreakerState;
/// use reliability_core::{Error, UnavailableReason, ManualClock};
/// use std::sync::Arc;
///
/// let breaker = Breaker::new(BreakerConfig::default(), Arc::new(ManualClock::new()));
/// let down = Error::unavailable("redis", UnavailableReason::Connection, "refused");
/// for _ in 0..3 {
///     breaker.record_failure(&down);
/// }
/// assert_eq!(breaker.state(), BreakerState::Open);
/// breaker.record_probe_success(); // half-open
/// breaker.record_success(); // a call succeeded
/// assert_eq!(breaker.state(), BreakerState::Closed);
/// ```
pub struct Breaker {
    config: BreakerConfig,
    clock: SharedClock,
    state: AtomicU8,
    inner: Mutex<Inner>,
    /// Times the primary was found to have lost data.
    data_losses: AtomicU64,
    changes: watch::Sender<BreakerStatus>,
}

/// Who saw the primary answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Call,
    Probe,
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    since: Timestamp,
    consecutive_failures: u32,
    consecutive_successes: u32,
    window_start: Timestamp,
    window_calls: u32,
    window_failures: u32,
    last_error: Option<String>,
    identity: Option<PrimaryIdentity>,
    /// When and why the primary last lost data.
    data_loss: Option<(Timestamp, &'static str)>,
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("state", &self.state())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

const fn encode(s: BreakerState) -> u8 {
    match s {
        BreakerState::Closed => 0,
        BreakerState::Open => 1,
        BreakerState::HalfOpen => 2,
        BreakerState::Isolated => 3,
    }
}

const fn decode(v: u8) -> BreakerState {
    match v {
        0 => BreakerState::Closed,
        1 => BreakerState::Open,
        2 => BreakerState::HalfOpen,
        _ => BreakerState::Isolated,
    }
}

impl Breaker {
    /// A closed breaker; `clock` stamps the transitions.
    pub fn new(config: BreakerConfig, clock: SharedClock) -> Self {
        let now = clock.now();
        let (changes, _) = watch::channel(BreakerStatus::new(BreakerState::Closed, now));
        Self {
            config,
            clock,
            state: AtomicU8::new(encode(BreakerState::Closed)),
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                since: now,
                consecutive_failures: 0,
                consecutive_successes: 0,
                window_start: now,
                window_calls: 0,
                window_failures: 0,
                last_error: None,
                identity: None,
                data_loss: None,
            }),
            data_losses: AtomicU64::new(0),
            changes,
        }
    }

    /// The current state (lock-free; read on every call).
    pub fn state(&self) -> BreakerState {
        decode(self.state.load(Ordering::Acquire))
    }

    /// `true` when calls should try the primary (Closed or HalfOpen).
    pub fn routes_to_primary(&self) -> bool {
        matches!(self.state(), BreakerState::Closed | BreakerState::HalfOpen)
    }

    /// The state, since when, and the last error (redacted).
    pub fn status(&self) -> BreakerStatus {
        self.changes.borrow().clone()
    }

    /// A channel that changes on every transition.
    pub fn subscribe(&self) -> watch::Receiver<BreakerStatus> {
        self.changes.subscribe()
    }

    /// The clock that stamps transitions (and times the fallbacks' journals).
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// The configuration.
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The primary answered a call (a probe's success is
    /// [`record_probe_success`](Self::record_probe_success)).
    pub fn record_success(&self) {
        self.succeeded(Source::Call);
    }

    fn succeeded(&self, source: Source) {
        let mut g = self.lock();
        if source == Source::Probe && g.state == BreakerState::Closed {
            return;
        }
        let now = self.clock.now();
        self.roll_window(&mut g, now);
        g.consecutive_failures = 0;
        g.window_calls = g.window_calls.saturating_add(1);
        match g.state {
            BreakerState::Closed | BreakerState::Isolated => {}
            BreakerState::Open => {
                g.consecutive_successes = 1;
                let to = if self.config.success_threshold <= 1 {
                    BreakerState::Closed
                } else {
                    BreakerState::HalfOpen
                };
                self.transition(&mut g, to, now, "probe succeeded");
            }
            BreakerState::HalfOpen => {
                g.consecutive_successes = g.consecutive_successes.saturating_add(1);
                if g.consecutive_successes >= self.config.success_threshold {
                    self.transition(&mut g, BreakerState::Closed, now, "primary healthy again");
                }
            }
        }
    }

    /// The background probe succeeded. While Closed this changes nothing:
    /// a `PING` that answers says nothing of the calls (scripts refused, a
    /// slot down), so it neither resets their consecutive failures nor
    /// dilutes their failure ratio. Open: moves to HalfOpen (or Closed);
    /// HalfOpen: counts toward the successes that close.
    pub fn record_probe_success(&self) {
        self.succeeded(Source::Probe);
    }

    /// The primary failed with an unavailable error or a timeout (a call or
    /// a probe). Caller errors must not be recorded: the primary answered.
    pub fn record_failure(&self, error: &Error) {
        let mut g = self.lock();
        let now = self.clock.now();
        self.roll_window(&mut g, now);
        g.consecutive_successes = 0;
        g.consecutive_failures = g.consecutive_failures.saturating_add(1);
        g.window_calls = g.window_calls.saturating_add(1);
        g.window_failures = g.window_failures.saturating_add(1);
        g.last_error = Some(error.to_string());
        match g.state {
            BreakerState::Closed => {
                let consecutive = g.consecutive_failures >= self.config.failure_threshold;
                let ratio = g.window_calls >= self.config.ratio_min_calls
                    && f64::from(g.window_failures)
                        >= self.config.failure_ratio * f64::from(g.window_calls);
                if consecutive || ratio {
                    let why = if consecutive {
                        "consecutive unavailable errors"
                    } else {
                        "failure ratio over the window"
                    };
                    self.transition(&mut g, BreakerState::Open, now, why);
                } else {
                    self.publish(&g);
                }
            }
            BreakerState::HalfOpen => {
                self.transition(&mut g, BreakerState::Open, now, "failure while half-open");
            }
            BreakerState::Open | BreakerState::Isolated => self.publish(&g),
        }
    }

    /// The identity the primary answered from (see [`Probe::probe_identity`]).
    /// A change from the last one seen means the primary may have lost data:
    /// a `warn` event, the metric `reliability_primary_data_loss_total`, the
    /// status's `dataLostAt`, and [`data_losses`](Self::data_losses) grows,
    /// which the fallbacks in front of this primary act on (the idempotency
    /// store replays the claims it completed there).
    pub fn observe_identity(&self, identity: PrimaryIdentity) {
        let mut g = self.lock();
        let cause = g
            .identity
            .as_ref()
            .and_then(|before| identity.lost_since(before));
        let before = g.identity.replace(identity);
        let Some(cause) = cause else {
            return;
        };
        let now = self.clock.now();
        g.data_loss = Some((now, cause));
        let n = self.data_losses.fetch_add(1, Ordering::AcqRel) + 1;
        warn!(
            cause,
            data_losses = n,
            before = ?before,
            now = ?g.identity,
            "the primary may have lost data"
        );
        crate::metrics::primary_data_loss(cause);
        self.publish(&g);
    }

    /// The identity the primary last answered from, if the probe reports one.
    pub fn identity(&self) -> Option<PrimaryIdentity> {
        self.lock().identity.clone()
    }

    /// Times the primary was found to have lost data since start.
    pub fn data_losses(&self) -> u64 {
        self.data_losses.load(Ordering::Acquire)
    }

    /// Opens the breaker now, recording `error` as the last error: calls go
    /// to the secondary at once and the probe decides when the primary takes
    /// traffic again. For a primary found unreachable at start, so a service
    /// starts degraded instead of paying timeouts. No-op unless closed or
    /// half-open.
    pub fn trip(&self, error: &Error) {
        let mut g = self.lock();
        let now = self.clock.now();
        g.last_error = Some(error.to_string());
        if matches!(g.state, BreakerState::Closed | BreakerState::HalfOpen) {
            self.transition(&mut g, BreakerState::Open, now, "primary unreachable");
        } else {
            self.publish(&g);
        }
    }

    /// Forces every call to the secondary (operator action).
    pub fn isolate(&self) {
        let mut g = self.lock();
        let now = self.clock.now();
        if g.state != BreakerState::Isolated {
            self.transition(
                &mut g,
                BreakerState::Isolated,
                now,
                "isolated by the operator",
            );
        }
    }

    /// Ends an isolation: the breaker opens and lets the probe decide when
    /// the primary takes traffic again. No-op unless isolated.
    pub fn release(&self) {
        let mut g = self.lock();
        let now = self.clock.now();
        if g.state == BreakerState::Isolated {
            g.consecutive_successes = 0;
            self.transition(&mut g, BreakerState::Open, now, "isolation released");
        }
    }

    fn roll_window(&self, g: &mut Inner, now: Timestamp) {
        if now.saturating_since(g.window_start) >= self.config.ratio_window {
            g.window_start = now;
            g.window_calls = 0;
            g.window_failures = 0;
        }
    }

    fn transition(&self, g: &mut Inner, to: BreakerState, now: Timestamp, why: &'static str) {
        let from = g.state;
        crate::metrics::transition(from, to);
        g.state = to;
        g.since = now;
        g.window_start = now;
        g.window_calls = 0;
        g.window_failures = 0;
        if to != BreakerState::HalfOpen {
            g.consecutive_successes = 0;
        }
        g.consecutive_failures = 0;
        self.state.store(encode(to), Ordering::Release);
        let error = g.last_error.as_deref().map(crate::status::redact);
        match to {
            BreakerState::Open | BreakerState::Isolated => {
                warn!(from = ?from, to = ?to, reason = why, last_error = ?error, "breaker transition");
            }
            _ => info!(from = ?from, to = ?to, reason = why, "breaker transition"),
        }
        self.publish(g);
    }

    fn publish(&self, g: &Inner) {
        let mut status = BreakerStatus::new(g.state, g.since);
        if let Some(e) = &g.last_error {
            status = status.with_last_error(e);
        }
        if let Some((at, cause)) = g.data_loss {
            status = status.with_data_loss(at, cause, self.data_losses());
        }
        self.changes.send_if_modified(|s| {
            if *s == status {
                false
            } else {
                *s = status;
                true
            }
        });
    }

    /// Starts the background probe: every `interval`, unless isolated, run
    /// `probe` under `deadline` and record the outcome. The task stops when
    /// the returned [`ProbeTask`] is dropped.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn spawn_probe(
        self: &Arc<Self>,
        probe: Arc<dyn Probe>,
        interval: Duration,
        deadline: Duration,
    ) -> ProbeTask {
        let breaker = Arc::clone(self);
        let join = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if breaker.state() == BreakerState::Isolated {
                    continue;
                }
                let started = std::time::Instant::now();
                let outcome = match tokio::time::timeout(deadline, probe.probe_identity()).await {
                    Ok(Ok(identity)) => {
                        if let Some(identity) = identity {
                            breaker.observe_identity(identity);
                        }
                        breaker.record_probe_success();
                        "ok"
                    }
                    Ok(Err(e)) => {
                        breaker.record_failure(&e);
                        "error"
                    }
                    Err(_) => {
                        breaker.record_failure(&Error::Timeout {
                            backend: "probe",
                            after: deadline,
                        });
                        "timeout"
                    }
                };
                crate::metrics::probe(started.elapsed(), outcome);
            }
        });
        ProbeTask { join }
    }
}

/// The running background probe; dropping it stops the probe.
#[derive(Debug)]
pub struct ProbeTask {
    join: tokio::task::JoinHandle<()>,
}

impl Drop for ProbeTask {
    fn drop(&mut self) {
        self.join.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::error::UnavailableReason;
    use std::sync::atomic::AtomicBool;

    fn down() -> Error {
        Error::unavailable(
            "redis",
            UnavailableReason::Connection,
            "refused redis://u:hunter2@h",
        )
    }

    fn breaker(clock: &ManualClock) -> Breaker {
        Breaker::new(BreakerConfig::default(), Arc::new(clock.clone()))
    }

    #[test]
    fn opens_after_consecutive_failures_and_successes_reset_the_count() {
        let clock = ManualClock::new();
        let b = breaker(&clock);
        b.record_failure(&down());
        b.record_failure(&down());
        b.record_success();
        b.record_failure(&down());
        b.record_failure(&down());
        assert_eq!(b.state(), BreakerState::Closed);
        b.record_failure(&down());
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.routes_to_primary());
        let s = b.status();
        assert_eq!(s.since, Some(clock.now()));
        let e = s.last_error.expect("last error kept");
        assert!(!e.as_str().contains("hunter2"), "redacted: {}", e.as_str());
    }

    #[test]
    fn opens_on_failure_ratio() {
        let clock = ManualClock::new();
        let b = breaker(&clock);
        for i in 0..20 {
            if i % 2 == 0 {
                b.record_failure(&down());
            } else {
                b.record_success();
            }
        }
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "the ratio is judged on a failure"
        );
        b.record_failure(&down());
        assert_eq!(b.state(), BreakerState::Open, "11 of 21 calls failed");
    }

    #[test]
    fn failure_ratio_forgets_old_windows() {
        let clock = ManualClock::new();
        let b = breaker(&clock);
        for i in 0..19 {
            if i % 2 == 0 {
                b.record_failure(&down());
            } else {
                b.record_success();
            }
        }
        clock.advance(Duration::from_secs(11));
        b.record_success();
        b.record_failure(&down());
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn half_open_closes_after_successes_and_reopens_on_failure() {
        let clock = ManualClock::new();
        let b = breaker(&clock);
        for _ in 0..3 {
            b.record_failure(&down());
        }
        b.record_success();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.routes_to_primary());
        b.record_failure(&down());
        assert_eq!(b.state(), BreakerState::Open);
        b.record_success();
        b.record_success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn isolation_ignores_outcomes_until_released() {
        let clock = ManualClock::new();
        let b = breaker(&clock);
        b.isolate();
        for _ in 0..5 {
            b.record_success();
        }
        assert_eq!(b.state(), BreakerState::Isolated);
        b.release();
        assert_eq!(
            b.state(),
            BreakerState::Open,
            "the probe decides after isolation"
        );
    }

    #[tokio::test]
    async fn transitions_are_published() {
        let clock = ManualClock::new();
        let b = breaker(&clock);
        let mut rx = b.subscribe();
        for _ in 0..3 {
            b.record_failure(&down());
        }
        rx.changed().await.expect("changed");
        assert_eq!(rx.borrow_and_update().state, BreakerState::Open);
    }

    #[derive(Debug)]
    struct Flag(AtomicBool);

    #[async_trait]
    impl Probe for Flag {
        async fn probe(&self) -> Result<()> {
            if self.0.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err(down())
            }
        }
    }

    /// A probe that always succeeds and says when it ran.
    #[derive(Debug, Default)]
    struct Healthy {
        runs: std::sync::atomic::AtomicU32,
        ran: tokio::sync::Notify,
    }

    #[async_trait]
    impl Probe for Healthy {
        async fn probe(&self) -> Result<()> {
            self.runs.fetch_add(1, Ordering::SeqCst);
            self.ran.notify_waiters();
            Ok(())
        }
    }

    impl Healthy {
        /// Waits until the probe ran at least once more (and its outcome
        /// was recorded: the task records before its next tick).
        async fn next_run(&self) {
            let before = self.runs.load(Ordering::SeqCst);
            while self.runs.load(Ordering::SeqCst) <= before + 1 {
                let ran = self.ran.notified();
                if self.runs.load(Ordering::SeqCst) > before + 1 {
                    break;
                }
                ran.await;
            }
        }
    }

    /// PING answers while every call fails (scripts refused, a slot down):
    /// the probe's successes must not reset the count of failed calls.
    #[tokio::test(start_paused = true)]
    async fn probe_successes_do_not_mask_call_failures_while_closed() {
        let clock = ManualClock::new();
        let b = Arc::new(breaker(&clock));
        let probe = Arc::new(Healthy::default());
        let _task = b.spawn_probe(
            probe.clone(),
            Duration::from_millis(10),
            Duration::from_millis(5),
        );
        for _ in 0..2 {
            b.record_failure(&down());
            probe.next_run().await;
        }
        b.record_failure(&down());
        assert_eq!(b.state(), BreakerState::Open, "three calls failed in a row");
    }

    /// Nor do they dilute the failure ratio: half the calls fail, the probe
    /// succeeds in between.
    #[tokio::test(start_paused = true)]
    async fn probe_successes_do_not_dilute_the_failure_ratio() {
        let clock = ManualClock::new();
        let b = Arc::new(Breaker::new(
            BreakerConfig::default()
                .with_failure_threshold(100)
                .with_failure_ratio(0.5, Duration::from_secs(10), 20),
            Arc::new(clock.clone()),
        ));
        let probe = Arc::new(Healthy::default());
        let _task = b.spawn_probe(
            probe.clone(),
            Duration::from_millis(10),
            Duration::from_millis(5),
        );
        let mut opened_at = None;
        for i in 0..30 {
            if i % 2 == 0 {
                b.record_failure(&down());
                if b.state() == BreakerState::Open {
                    opened_at = Some(i);
                    break;
                }
            } else {
                b.record_success();
            }
            probe.next_run().await;
        }
        assert_eq!(opened_at, Some(20), "11 of 21 calls failed");
    }

    #[test]
    fn a_new_identity_is_a_data_loss_with_its_time_and_cause() {
        let clock = ManualClock::new();
        let b = breaker(&clock);
        let id = |run: &str, repl: &str| PrimaryIdentity::new(run, Some(repl.to_string()));
        b.observe_identity(id("a", "x"));
        b.observe_identity(id("a", "x"));
        assert_eq!(b.data_losses(), 0, "first sight and same identity");
        clock.advance(Duration::from_secs(5));
        b.observe_identity(id("b", "y"));
        let s = b.status();
        assert_eq!(b.data_losses(), 1);
        assert_eq!(s.data_lost_at, Some(clock.now()));
        assert_eq!(s.data_loss.as_deref(), Some("restarted"));
        b.observe_identity(id("b", "z"));
        assert_eq!(b.status().data_loss.as_deref(), Some("failover"));
        assert_eq!(b.status().data_losses, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn probe_detects_without_traffic_and_recovers() {
        let clock = ManualClock::new();
        let b = Arc::new(breaker(&clock));
        let healthy = Arc::new(Flag(AtomicBool::new(false)));
        let _task = b.spawn_probe(
            healthy.clone(),
            Duration::from_millis(250),
            Duration::from_millis(100),
        );
        let mut rx = b.subscribe();
        while rx.borrow_and_update().state != BreakerState::Open {
            rx.changed().await.expect("changed");
        }
        healthy.0.store(true, Ordering::SeqCst);
        while rx.borrow_and_update().state != BreakerState::Closed {
            rx.changed().await.expect("changed");
        }
    }
}
