//! Redis backends of the `reliability` crates: standalone, Sentinel and
//! Cluster, behind one pooled [`RedisClient`].
//!
//! | type | primitive | layout |
//! |---|---|---|
//! | [`RedisClient`] | connections, deadlines, error mapping | — |
//! | [`RedisIdempotencyStore`] | idempotency | one hash per key, one script per operation ([layout](idempotency)) |
//! | [`RedisRateLimiter`] | rate limiting | one TAT string per key, one GCRA script ([layout](rate_limit)) |
//! | [`RedisSpool`] | store and forward | Redis Streams, see [`RedisSpool`] |
//!
//! Time comes from the Redis server (`TIME`, read inside the scripts): one
//! clock authority for every replica, no client clock skew.
//!
//! # Feature flags
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `tls` | no | `rediss://` connections (rustls with the ring provider; standalone, Sentinel and Cluster) |
//! | `test-harness` | no | `harness`: starts `redis-server`, Sentinel sets and clusters on free loopback ports, for tests; `proxy`: a loopback TCP proxy that adds latency, black-holes, resets or stalls connections |
#![doc(test(attr(deny(warnings))))]

pub mod client;
mod error;
pub mod idempotency;
mod policy;
mod probe;
pub mod rate_limit;
mod script;
mod spool;
mod unanswered;

#[cfg(feature = "test-harness")]
pub mod harness;
#[cfg(feature = "test-harness")]
pub mod proxy;

pub use client::{Mode, RedisClient};
pub use idempotency::{RedisIdempotencyStore, RedisIdempotencyStoreBuilder};
pub use policy::Policy;
pub use rate_limit::{RedisRateLimiter, RedisRateLimiterBuilder};
pub use spool::{
    call_weight, RedisSpool, RedisSpoolBuilder, DEFAULT_MAX_CALL_BYTES, RECORD_CALL_OVERHEAD,
};
