//! The conformance suite: every rule of the contract as a named, plain async
//! function that any backend can run.
//!
//! Every backend — memory, Redis, disk, each `Fallback` pairing, and
//! third-party ones — runs the same cases. A rule a backend cannot keep is a
//! [`Capabilities`](crate::Capabilities) flag the cases gate on, never a
//! silent difference.
//!
//! # Running the suite on a backend
//!
//! 1. Depend on `reliability-core` with feature `testkit` and on `tokio` with
//!    features `macros` and `rt-multi-thread` (dev-dependencies).
//! 2. Give a factory: anything implementing [`IdempotencyFactory`],
//!    [`RateLimiterFactory`] or [`SpoolFactory`]. A closure
//!    `Fn(ManualClock) -> impl Future<Output = Backend>` is an
//!    `IdempotencyFactory` / `RateLimiterFactory`; spools need a type (they
//!    take limits and may be reopened). Each call must return a fresh,
//!    empty backend whose logical time follows the given
//!    [`ManualClock`] and which uses the crate's default
//!    result and record size limits.
//! 3. Invoke the macros in an integration test file:
//!
//! ```ignore
//! use reliability_core::{idempotency_suite, rate_limiter_suite, spool_suite, ManualClock};
//! use std::sync::Arc;
//!
//! idempotency_suite!(|clock: ManualClock| async move {
//!     my_backend::Store::builder().clock(Arc::new(clock)).build()
//! });
//! rate_limiter_suite!(|clock: ManualClock| async move { my_backend::Limiter::with_clock(Arc::new(clock)) });
//! spool_suite!(my_backend::SpoolFactory::default());
//! ```
//!
//! Each macro expands to one `#[tokio::test]` per case, named after it, so a
//! failure names the broken rule. The cases can also be called by hand:
//! `reliability_core::testkit::idempotency::exactly_one_acquired(&factory).await`.
//!
//! # Rule to case mapping
//!
//! Common rules:
//!
//! | rule | cases |
//! |---|---|
//! | keys validated: non-empty, bounded, long ids hashed | `idempotency::keys_are_validated`, `rate_limit::keys_are_validated`, `spool::record_ids_and_sizes_are_validated` |
//! | a denial, a duplicate, a full spool are answers | `rate_limit::burst_then_denied`, `idempotency::pending_claim_is_in_progress`, `spool::full_spool_answers_full_and_loses_nothing` |
//! | time from the injectable clock | every time-based case runs on a [`ManualClock`] |
//!
//! Section 1 (IdempotencyStore):
//!
//! | rule | cases |
//! |---|---|
//! | exactly one `Acquired` among concurrent claimers | `exactly_one_acquired` |
//! | `InProgress { retry_after }` = lease left | `pending_claim_is_in_progress` |
//! | `Completed` replays the stored result | `completed_claim_replays_result` |
//! | same key, other fingerprint: `Mismatch` | `other_fingerprint_is_mismatch` |
//! | a pending claim expires after its lease | `pending_claim_expires_after_lease` |
//! | `complete` resets the TTL to `retention` | `complete_resets_ttl_to_retention` |
//! | stale `complete` / `release` / `extend`: `LeaseLost`, nothing changed | `stale_lease_is_lease_lost_and_changes_nothing` |
//! | `release` lets others retry | `release_lets_others_acquire` |
//! | `extend` is an owner-checked heartbeat | `extend_keeps_claim_alive` |
//! | `first_seen` dedup helper | `first_seen_drops_duplicates` |
//! | bad arguments and oversize results refused | `zero_durations_are_invalid`, `oversize_result_is_refused` |
//!
//! Section 2 (RateLimiter):
//!
//! | rule | cases |
//! |---|---|
//! | GCRA, tolerance `T * (burst - 1)` | `burst_then_denied`, `matches_reference_gcra` |
//! | allowed whole or denied whole | `cost_is_taken_whole_or_not_at_all` |
//! | a denial changes no state; honest retry-after | `denial_changes_nothing_and_retry_after_is_exact` |
//! | `cost > burst` is `Never` | `cost_above_burst_is_never` |
//! | `cost == 0` peeks | `cost_zero_peeks` |
//! | integer microseconds, same decisions everywhere | `matches_reference_gcra` (2,000 random checks against [`gcra::decide`](crate::gcra::decide), itself held to governor by the memory crate's parity test) |
//! | keys are independent | `keys_are_independent` |
//! | concurrent checks admit exactly the burst | `concurrent_checks_admit_exactly_burst` |
//! | bounded keyed state | gated on `bounded`; measured by `reliability-memory`'s `memory_cap` test |
//!
//! Section 3 (Spool):
//!
//! | rule | cases |
//! |---|---|
//! | producer ids and payloads survive, oldest first | `enqueue_then_lease_in_order` |
//! | `lease` returns only due records | `delayed_records_are_not_due_early` |
//! | leased records invisible for `ttl`; expired lease is due again | `lease_hides_until_ttl_then_redelivers` |
//! | `ack` idempotent; `LeaseLost` if re-leased | `ack_is_idempotent_and_owner_checked` |
//! | `nack` schedules a retry | `nack_schedules_retry` |
//! | `extend` keeps the lease | `extend_keeps_lease` |
//! | attempt count lives in the record | `attempts_live_in_the_record` |
//! | full: `Err(Full)`, never drops oldest or newest | `full_spool_answers_full_and_loses_nothing` |
//! | retention expiry dead-letters as `Expired`, counted | `retention_expiry_dead_letters` |
//! | dead-letter, redrive; only purge deletes | `dead_letter_redrive_and_purge` |
//! | duplicate ids are not stored twice | `duplicate_ids_are_skipped` |
//! | stats count every state | `stats_count_every_state` |
//! | at-least-once under concurrent consumers | `concurrent_consumers_never_share_a_lease` |
//! | durable: state survives reopen (gated on `reopenable`) | `reopen_keeps_unacked_and_forgets_acked`, `reopen_keeps_dead_letters`, `reopen_keeps_limits` |
//!
//! The delivery worker's schedule (1m … 24h, then dead-letter) and retention
//! expiry are tested on the worker itself (`tests/worker.rs` of the facade).

use std::future::Future;

use async_trait::async_trait;

use crate::clock::ManualClock;
use crate::idempotency::IdempotencyStore;
use crate::rate_limit::RateLimiter;
use crate::spool::{Spool, SpoolLimits};

pub mod idempotency;
pub mod rate_limit;
pub mod spool;

/// Builds fresh idempotency stores for the suite.
#[async_trait]
pub trait IdempotencyFactory: Send + Sync + 'static {
    /// The store type.
    type Store: IdempotencyStore;
    /// A fresh, empty store whose time follows `clock`.
    async fn create(&self, clock: ManualClock) -> Self::Store;
}

#[async_trait]
impl<F, Fut, S> IdempotencyFactory for F
where
    F: Fn(ManualClock) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = S> + Send,
    S: IdempotencyStore,
{
    type Store = S;
    async fn create(&self, clock: ManualClock) -> S {
        self(clock).await
    }
}

/// Builds fresh rate limiters for the suite.
#[async_trait]
pub trait RateLimiterFactory: Send + Sync + 'static {
    /// The limiter type.
    type Limiter: RateLimiter;
    /// A fresh limiter with no key state, whose time follows `clock`.
    async fn create(&self, clock: ManualClock) -> Self::Limiter;
}

#[async_trait]
impl<F, Fut, L> RateLimiterFactory for F
where
    F: Fn(ManualClock) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = L> + Send,
    L: RateLimiter,
{
    type Limiter = L;
    async fn create(&self, clock: ManualClock) -> L {
        self(clock).await
    }
}

/// Builds fresh spools for the suite and, for durable backends, reopens them.
#[async_trait]
pub trait SpoolFactory: Send + Sync + 'static {
    /// The spool type.
    type Spool: Spool;

    /// A fresh, empty spool with `limits`, whose time follows `clock`.
    async fn create(&self, clock: ManualClock, limits: SpoolLimits) -> Self::Spool;

    /// Closes `spool` and opens the same state again with `limits`. Only
    /// called when the spool's capabilities say `reopenable`.
    async fn reopen(
        &self,
        spool: Self::Spool,
        clock: ManualClock,
        limits: SpoolLimits,
    ) -> Self::Spool;
}

/// Expands to one `#[tokio::test]` per idempotency case for `$factory`.
///
/// See the [module docs](crate::testkit) for how to use it.
#[macro_export]
macro_rules! idempotency_suite {
    ($factory:expr) => {
        $crate::__suite_cases!(idempotency, $factory;
            exactly_one_acquired,
            pending_claim_is_in_progress,
            completed_claim_replays_result,
            other_fingerprint_is_mismatch,
            pending_claim_expires_after_lease,
            complete_resets_ttl_to_retention,
            stale_lease_is_lease_lost_and_changes_nothing,
            release_lets_others_acquire,
            extend_keeps_claim_alive,
            first_seen_drops_duplicates,
            keys_are_validated,
            zero_durations_are_invalid,
            oversize_result_is_refused,
        );
    };
}

/// Expands to one `#[tokio::test]` per rate limiter case for `$factory`.
///
/// See the [module docs](crate::testkit) for how to use it.
#[macro_export]
macro_rules! rate_limiter_suite {
    ($factory:expr) => {
        $crate::__suite_cases!(rate_limit, $factory;
            burst_then_denied,
            denial_changes_nothing_and_retry_after_is_exact,
            cost_is_taken_whole_or_not_at_all,
            cost_above_burst_is_never,
            cost_zero_peeks,
            keys_are_independent,
            matches_reference_gcra,
            concurrent_checks_admit_exactly_burst,
            keys_are_validated,
        );
    };
}

/// Expands to one `#[tokio::test]` per spool case for `$factory`.
///
/// See the [module docs](crate::testkit) for how to use it.
#[macro_export]
macro_rules! spool_suite {
    ($factory:expr) => {
        $crate::__suite_cases!(spool, $factory;
            enqueue_then_lease_in_order,
            delayed_records_are_not_due_early,
            lease_hides_until_ttl_then_redelivers,
            ack_is_idempotent_and_owner_checked,
            nack_schedules_retry,
            extend_keeps_lease,
            attempts_live_in_the_record,
            full_spool_answers_full_and_loses_nothing,
            retention_expiry_dead_letters,
            dead_letter_redrive_and_purge,
            duplicate_ids_are_skipped,
            stats_count_every_state,
            record_ids_and_sizes_are_validated,
            concurrent_consumers_never_share_a_lease,
            reopen_keeps_unacked_and_forgets_acked,
            reopen_keeps_dead_letters,
            reopen_keeps_limits,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __suite_cases {
    ($module:ident, $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let factory = $factory;
                $crate::testkit::$module::$case(&factory).await;
            }
        )*
    };
}
