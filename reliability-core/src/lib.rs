//! Core of the `reliability` crates: the traits every backend implements,
//! the one error type, an injectable clock, key namespacing, the GCRA
//! reference, the retry policy, the delivery worker, the configuration and
//! health-status models, and (feature `testkit`) the conformance suite.
//!
//! Three primitives keep services correct when the infrastructure around them
//! is not:
//!
//! | primitive | trait | answers |
//! |---|---|---|
//! | process each event once | [`IdempotencyStore`] | [`Claim`] |
//! | keyed GCRA limits | [`RateLimiter`] | [`Decision`] |
//! | store and forward | [`Spool`] | [`Leased`], [`Enqueued`], [`SpoolStats`] |
//!
//! Every trait is object safe, so a host holds `Arc<dyn IdempotencyStore>`
//! chosen from configuration at run time. Backends live in their own crates
//! (`reliability-memory`, `reliability-redis`, `reliability-disk`); the
//! facade crate `reliability` picks them with cargo features.
//!
//! # Feature flags
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `testkit` | no | `testkit`: the conformance suite and the `*_suite!` macros |
#![doc(test(attr(deny(warnings))))]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod capability;
pub mod clock;
pub mod config;
pub mod error;
pub mod fallback;
pub mod gcra;
pub mod idempotency;
pub mod key;
pub mod metrics;
pub mod rate_limit;
pub mod retry;
pub mod spool;
pub mod status;
pub mod worker;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use capability::Capabilities;
pub use clock::{system_clock, Clock, ManualClock, SharedClock, SystemClock, Timestamp};
pub use config::{Profile, ReliabilityConfig};
pub use error::{BoxError, Error, Result, UnavailableReason};
pub use idempotency::{
    Claim, Fingerprint, IdempotencyStore, IdempotencyStoreExt, Lease, LeaseToken,
};
pub use key::{KeySpace, Primitive};
pub use rate_limit::{CheckFuture, Decision, Outcome, Quota, RateLimiter, RateLimiterExt};
pub use retry::RetryPolicy;
pub use spool::{
    DeadReason, DeadRecord, Durability, Enqueued, Leased, NackOutcome, NewRecord, Record, RecordId,
    Spool, SpoolLimits, SpoolStats, SpoolToken,
};
pub use status::{HealthStatus, Overall, StatusHub};
pub use worker::{
    BatchReport, DeliveryCounts, DeliveryError, DeliveryWorker, WorkerConfig, WorkerHandle,
    WorkerTotals,
};

/// Re-exports for the `*_suite!` macros; not part of the public API.
#[cfg(feature = "testkit")]
#[doc(hidden)]
pub mod __private {
    pub use tokio;
}
