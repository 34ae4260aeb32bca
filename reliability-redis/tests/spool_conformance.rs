//! The spool conformance suite on real Redis — a standalone server, a
//! Sentinel-discovered master and a 3-master Cluster — plus the checks only
//! the Redis spool has: an evicting `maxmemory-policy` is refused, a key of
//! the wrong type is a caller error, durability is reported as the server
//! is configured, `WAIT` reports replication, and two pools (two service
//! replicas) share one spool.
//!
//! The Sentinel set and the Cluster admit only an ACL user. Each topology
//! is started once per test binary (the harness kills it when
//! the binary exits); every case runs in its own namespace.
#![cfg(feature = "test-harness")]

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use reliability_core::config::RedisConfig;
use reliability_core::testkit::SpoolFactory;
use reliability_core::{
    Durability, Error, KeySpace, ManualClock, NewRecord, RecordId, Spool, SpoolLimits,
};
use reliability_redis::harness::{RedisCluster, RedisServer, SentinelSet, ServerOptions};
use reliability_redis::{RedisClient, RedisSpool};

const PREFIX: &str = "spooltest";

static STANDALONE: LazyLock<RedisServer> = LazyLock::new(RedisServer::start);
/// Behind an ACL user (the sentinel requires the password too): every
/// connection the spool makes, pooled ones for `WAIT` included, must
/// authenticate.
static SENTINEL: LazyLock<SentinelSet> = LazyLock::new(|| {
    SentinelSet::start_with(
        1,
        1,
        5_000,
        ServerOptions::new().acl_user("spool", "sentinel-pw-2"),
    )
});
/// Behind an ACL user.
static CLUSTER: LazyLock<RedisCluster> = LazyLock::new(|| {
    RedisCluster::start_with(3, ServerOptions::new().acl_user("spool", "cluster-pw-2"))
});

/// A namespace no other case of this binary uses.
fn unique_namespace() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "ns{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Starts a topology off the async workers (the harness blocks while it
/// waits for readiness) and returns its client configuration.
fn config_of(topology: fn() -> RedisConfig) -> RedisConfig {
    tokio::task::block_in_place(topology)
}

async fn client(cfg: &RedisConfig) -> RedisClient {
    RedisClient::connect(cfg, KeySpace::new(PREFIX, "default").expect("key space"))
        .await
        .expect("connect")
}

/// Builds spools on one topology, each in a fresh namespace, with the
/// suite's clock as the scripts' time.
struct RedisSpools {
    topology: fn() -> RedisConfig,
}

impl RedisSpools {
    async fn open(&self, ns: String, clock: ManualClock, limits: SpoolLimits) -> RedisSpool {
        let cfg = config_of(self.topology);
        let client = client(&cfg).await.with_clock_override(Arc::new(clock));
        RedisSpool::builder(client, ns)
            .limits(limits)
            .open()
            .await
            .expect("open spool")
    }
}

#[async_trait]
impl SpoolFactory for RedisSpools {
    type Spool = RedisSpool;

    async fn create(&self, clock: ManualClock, limits: SpoolLimits) -> RedisSpool {
        self.open(unique_namespace(), clock, limits).await
    }

    /// A new client and spool on the same namespace: the state is the
    /// server's.
    async fn reopen(
        &self,
        spool: RedisSpool,
        clock: ManualClock,
        limits: SpoolLimits,
    ) -> RedisSpool {
        let ns = spool.namespace().to_string();
        drop(spool);
        self.open(ns, clock, limits).await
    }
}

mod standalone {
    use super::*;
    reliability_core::spool_suite!(RedisSpools {
        topology: || STANDALONE.config()
    });
}

mod sentinel {
    use super::*;
    reliability_core::spool_suite!(RedisSpools {
        topology: || SENTINEL.config()
    });
}

mod cluster {
    use super::*;
    reliability_core::spool_suite!(RedisSpools {
        topology: || CLUSTER.config()
    });
}

fn rec(id: &str) -> NewRecord {
    NewRecord::new(RecordId::new(id).expect("id"), format!("payload of {id}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicting_maxmemory_policy_is_refused() {
    for policy in ["allkeys-lru", "volatile-ttl", "allkeys-random"] {
        let server = tokio::task::block_in_place(|| {
            RedisServer::start_with(
                ServerOptions::new().config_line(format!("maxmemory-policy {policy}")),
            )
        });
        let err = RedisSpool::builder(client(&server.config()).await, "evict")
            .open()
            .await
            .expect_err("an evicting policy must be refused");
        assert!(
            matches!(&err, Error::Config { .. }) && err.to_string().contains(policy),
            "{policy}: {err}"
        );
        assert!(!err.is_unavailable());
        assert!(server
            .cmd(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])
            .is_ok());
        RedisSpool::builder(client(&server.config()).await, "evict")
            .open()
            .await
            .expect("noeviction is accepted");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_type_in_the_spool_keyspace_is_a_caller_error() {
    let server: &RedisServer = tokio::task::block_in_place(|| &*STANDALONE);
    let ns = unique_namespace();
    let spool = RedisSpool::builder(client(&server.config()).await, ns.clone())
        .open()
        .await
        .expect("open");
    let tag = format!("{{{PREFIX}:spool:{ns}}}");

    // An index holding a string.
    assert!(server.cmd(&["SET", &format!("{tag}:ready"), "x"]).is_ok());
    let err = spool
        .lease(1, Duration::from_secs(1))
        .await
        .expect_err("lease over a string index");
    assert!(matches!(err, Error::WrongType { .. }), "{err:?}");
    assert!(!err.is_unavailable());
    assert!(server.cmd(&["DEL", &format!("{tag}:ready")]).is_ok());

    // A record key holding a string.
    assert!(server.cmd(&["SET", &format!("{tag}:r:a"), "x"]).is_ok());
    let err = spool
        .enqueue(vec![rec("b"), rec("a")])
        .await
        .expect_err("enqueue over a string record key");
    assert!(matches!(err, Error::WrongType { .. }), "{err:?}");
    assert_eq!(
        spool.stats().await.expect("stats").depth(),
        0,
        "nothing stored"
    );
    assert!(server.cmd(&["DEL", &format!("{tag}:r:a")]).is_ok());
    let e = spool.enqueue(vec![rec("a")]).await.expect("enqueue");
    assert_eq!(e.accepted, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durability_follows_the_servers_aof_settings() {
    let plain: &RedisServer = tokio::task::block_in_place(|| &*STANDALONE);
    let spool = RedisSpool::builder(client(&plain.config()).await, unique_namespace())
        .open()
        .await
        .expect("open");
    assert_eq!(spool.durability(), Durability::Volatile);
    assert!(!spool.capabilities().durable);

    let aof = tokio::task::block_in_place(|| {
        RedisServer::start_with(
            ServerOptions::new()
                .persistence(true)
                .config_line("appendonly yes")
                .config_line("appendfsync always"),
        )
    });
    let cases = [
        ("always", Durability::Synced),
        (
            "everysec",
            Durability::Periodic {
                interval: Duration::from_secs(1),
            },
        ),
        ("no", Durability::Flushed),
    ];
    for (fsync, expected) in cases {
        assert!(aof.cmd(&["CONFIG", "SET", "appendfsync", fsync]).is_ok());
        let spool = RedisSpool::builder(client(&aof.config()).await, "aof")
            .open()
            .await
            .expect("open");
        assert_eq!(spool.durability(), expected, "appendfsync {fsync}");
        assert!(spool.capabilities().durable);
        let e = spool
            .enqueue(vec![rec(&format!("r-{fsync}"))])
            .await
            .expect("enqueue");
        assert_eq!(e.durability, expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_reports_replicated_or_refuses() {
    let cfg = config_of(|| SENTINEL.config());
    let spool = RedisSpool::builder(client(&cfg).await, unique_namespace())
        .wait_replicas(1, Duration::from_secs(2))
        .open()
        .await
        .expect("open");
    assert!(spool.capabilities().durable);
    let e = spool.enqueue(vec![rec("a")]).await.expect("enqueue");
    assert_eq!(e.durability, Durability::Replicated { replicas: 1 });

    // Two replicas asked, one exists, no AOF: the batch is on the master
    // only, which is not what the caller asked for.
    let spool = RedisSpool::builder(client(&cfg).await, spool.namespace().to_string())
        .wait_replicas(2, Duration::from_millis(100))
        .open()
        .await
        .expect("open");
    let err = spool
        .enqueue(vec![rec("b")])
        .await
        .expect_err("not enough replicas");
    assert!(err.is_unavailable(), "{err:?}");
    // Retrying is safe: the record is a duplicate now.
    let spool = RedisSpool::builder(client(&cfg).await, spool.namespace().to_string())
        .open()
        .await
        .expect("open");
    let e = spool.enqueue(vec![rec("b")]).await.expect("enqueue");
    assert_eq!((e.accepted, e.duplicates), (0, 1));
}

/// Two pools (two replicas of a service) × 4 consumers drain one spool:
/// every record is delivered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pools_share_one_spool() {
    let cfg = config_of(|| STANDALONE.config());
    let ns = unique_namespace();
    let a = Arc::new(
        RedisSpool::builder(client(&cfg).await, ns.clone())
            .open()
            .await
            .expect("open"),
    );
    let b = Arc::new(
        RedisSpool::builder(client(&cfg).await, ns)
            .open()
            .await
            .expect("open"),
    );
    a.enqueue((0..250).map(|i| rec(&format!("a{i:03}"))).collect())
        .await
        .expect("enqueue");
    b.enqueue((0..250).map(|i| rec(&format!("b{i:03}"))).collect())
        .await
        .expect("enqueue");
    let mut tasks = Vec::new();
    for i in 0..8 {
        let spool = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = spool
                    .lease(5, Duration::from_secs(600))
                    .await
                    .expect("lease");
                if got.is_empty() {
                    break mine;
                }
                for l in got {
                    spool.ack(&l.token).await.expect("ack");
                    mine.push(l.record.id.to_string());
                }
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("consumer"));
    }
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!((all.len(), unique.len()), (500, 500));
    let stats = a.stats().await.expect("stats");
    assert_eq!((stats.depth(), stats.bytes), (0, 0));
}
