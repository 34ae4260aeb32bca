//! Redis backends of the `reliability` crates: standalone, Sentinel and
//! Cluster, behind one pooled [`RedisClient`].
//!
//! | type | primitive | layout |
//! |---|---|---|
//! | [`RedisClient`] | connections, deadlines, error mapping | — |
//!
//! Time comes from the Redis server (`TIME`, read inside the scripts): one
//! clock authority for every replica, no client clock skew.
//!
//! # Feature flags
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `test-harness` | no | `harness`: starts `redis-server`, Sentinel sets and clusters on free loopback ports, for tests |
#![doc(test(attr(deny(warnings))))]

pub mod client;
mod error;
mod spool;

#[cfg(feature = "test-harness")]
pub mod harness;

pub use client::{Mode, RedisClient};
pub use spool::{RedisSpool, RedisSpoolBuilder};
