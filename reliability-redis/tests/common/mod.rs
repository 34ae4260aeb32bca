//! Shared by the Redis test binaries: servers started once per binary
//! (killed with it: the harness's watchdogs stop them when the process
//! exits) and clients in a fresh namespace per case, so cases never collide.
#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use reliability_core::config::RedisConfig;
use reliability_core::{KeySpace, ManualClock};
use reliability_redis::harness::{RedisCluster, RedisServer, SentinelSet, ServerOptions};
use reliability_redis::RedisClient;

pub static STANDALONE: LazyLock<RedisServer> = LazyLock::new(RedisServer::start);
/// Behind an ACL user: the data nodes admit only `AUTH svc <password>`,
/// the sentinels require the password too.
pub static SENTINEL: LazyLock<SentinelSet> = LazyLock::new(|| {
    SentinelSet::start_with(
        2,
        3,
        1000,
        ServerOptions::new().acl_user("svc", "sentinel-pw-1"),
    )
});
/// Behind an ACL user: the nodes admit only `AUTH svc <password>`.
pub static CLUSTER: LazyLock<RedisCluster> = LazyLock::new(|| {
    RedisCluster::start_with(3, ServerOptions::new().acl_user("svc", "cluster-pw-1"))
});

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A key space no other case of this process (or other process) uses.
pub fn fresh_key_space(prefix: &str) -> KeySpace {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    KeySpace::new(prefix, format!("p{}-{n}", std::process::id())).expect("valid key space")
}

/// A connected client in a fresh namespace, its scripts driven by `clock`.
pub async fn client(cfg: &RedisConfig, clock: ManualClock) -> RedisClient {
    RedisClient::connect(cfg, fresh_key_space("test"))
        .await
        .expect("connect")
        .with_clock_override(Arc::new(clock))
}
