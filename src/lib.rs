//! `reliability`: idempotency, rate limiting and store-and-forward that stay
//! correct when the infrastructure around them is not.
//!
//! This facade re-exports [`reliability_core`] and, behind cargo features, the
//! backends.
//!
//! # Feature flags
//!
//! | feature | default | backends |
//! |---|---|---|
//! | `memory` | yes | `memory::{MemoryIdempotencyStore, LocalRateLimiter, MemorySpool}` |
//! | `redis` | no | `redis::{RedisIdempotencyStore, RedisRateLimiter, RedisSpool}`; profile `redis-enabled` puts each in front of its in-process counterpart (`Fallback`); implies `memory` |
//! | `tls` | no | `rediss://` for the Redis backends; implies `redis` |
//! | `disk` | no | `disk::DiskSpool` (also the local side of a Redis spool when `disk` is configured) |
//! | `metrics` | no | metrics through the `metrics` facade crate; names in [`metrics`] |
#![doc(test(attr(deny(warnings))))]
#![cfg_attr(doctest, doc = include_str!("../README.md"))]

pub use reliability_core::*;

mod build;
pub mod config;
#[cfg(feature = "redis")]
mod redis_enabled;

pub use build::{Reliability, ReliabilityBuilder};
#[cfg(feature = "redis")]
pub use redis_enabled::FailbackReport;

/// Redis backends (feature `redis`).
#[cfg(feature = "redis")]
pub use reliability_redis as redis;

/// Durable disk spool (feature `disk`).
#[cfg(feature = "disk")]
pub use reliability_disk as disk;

/// In-process backends (feature `memory`).
#[cfg(feature = "memory")]
pub use reliability_memory as memory;
