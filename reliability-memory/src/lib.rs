//! In-process backends of the `reliability` crates: no external service, no
//! disk. The baseline profile's idempotency store, rate limiter and spool.
//!
//! | type | trait | state |
//! |---|---|---|
//! | [`MemoryIdempotencyStore`] | `IdempotencyStore` | moka cache, bounded entries |
//! | [`LocalRateLimiter`] | `RateLimiter` | sharded map of GCRA arrival times, bounded keys |
//! | [`MemorySpool`] | `Spool` | bounded queue; durability `Volatile` |
//!
//! Every type takes an injectable [`Clock`](reliability_core::Clock), so tests
//! run days of schedule in milliseconds.
#![doc(test(attr(deny(warnings))))]

mod idempotency;
mod rate_limit;
mod spool;

pub use idempotency::*;
pub use rate_limit::*;
pub use spool::*;
